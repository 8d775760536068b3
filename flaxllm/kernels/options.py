"""Input checks and static options shared by the flash and decode entry points."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from flaxllm.kernels import blocks

SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))
BACKENDS = ('gpu', 'tpu')
MIN_BLOCK = 16  # smallest tile: Triton's tensor-core dot needs >= 16, bf16 packs 16 sublanes


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes (powers of two) of the flash kernels; num_warps/num_stages are GPU-only.

  block_q x block_k: forward tiles. block_q_dkv x block_k_dkv: the dK/dV kernel (a key
  tile of block_k_dkv rows meets query tiles of block_q_dkv rows). block_q_dq x
  block_k_dq: the dQ kernel. Sequences are padded to a multiple of the blocks in use;
  blocks longer than a sequence shrink to fit it.
  """
  block_q: int
  block_k: int
  block_q_dkv: int
  block_k_dkv: int
  block_q_dq: int
  block_k_dq: int
  num_warps: int | None = None
  num_stages: int | None = None
  num_warps_bwd: int | None = None
  num_stages_bwd: int | None = None

  def __post_init__(self):
    for f in ('block_q', 'block_k', 'block_q_dkv', 'block_k_dkv', 'block_q_dq', 'block_k_dq'):
      b = getattr(self, f)
      if not isinstance(b, int) or b < 1 or b & (b - 1):
        raise ValueError(f'BlockSizes.{f} must be a positive power of two, got {b!r}.')

  def fit(self, seq_q, seq_kv):
    """Shrinks blocks longer than the (power-of-two rounded) sequence lengths."""
    fq, fk = fit_block(seq_q), fit_block(seq_kv)
    return dataclasses.replace(
        self, block_q=min(self.block_q, fq), block_k=min(self.block_k, fk),
        block_q_dkv=min(self.block_q_dkv, fq), block_k_dkv=min(self.block_k_dkv, fk),
        block_q_dq=min(self.block_q_dq, fq), block_k_dq=min(self.block_k_dq, fk))

  @property
  def q_multiple(self):
    return max(self.block_q, self.block_q_dkv, self.block_q_dq)

  @property
  def kv_multiple(self):
    return max(self.block_k, self.block_k_dkv, self.block_k_dq)


def fit_block(seq):
  """The smallest power-of-two block >= MIN_BLOCK that holds `seq` positions."""
  return max(MIN_BLOCK, 1 << max(seq - 1, 0).bit_length())


def round_up(x, m):
  return -(-x // m) * m


def resolve_backend(backend):
  """'gpu' or 'tpu': the kernel family to run (default: TPU kernels on TPU, else GPU)."""
  if backend is None:
    return 'tpu' if jax.default_backend() == 'tpu' else 'gpu'
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}.")
  return backend


def resolve_interpret(interpret, backend):
  """Interpret mode defaults to on when no accelerator matches the kernel family.

  interpret=False off that accelerator still traces and lowers the kernels (for
  `jax.export` with platforms=['cuda'] or ['tpu']); only running them needs the hardware.
  """
  if interpret is None:
    platform = jax.default_backend()
    return not (platform == backend or (backend == 'gpu' and platform in ('cuda', 'rocm')))
  return bool(interpret)


def split_segment_ids(segment_ids, q, k):
  """(q_segment_ids, kv_segment_ids) from None, one [batch, seq] array or a pair."""
  if segment_ids is None:
    return None, None
  if isinstance(segment_ids, (tuple, list)):
    if len(segment_ids) != 2:
      raise ValueError('segment_ids must be one [batch, seq] array or a pair '
                       f'(q_segment_ids, kv_segment_ids), got {len(segment_ids)} arrays.')
    q_seg, kv_seg = segment_ids
  else:
    if q.shape[1] != k.shape[1]:
      raise ValueError('A single segment_ids array needs seq_q == seq_kv '
                       f'(got {q.shape[1]} and {k.shape[1]}); pass a (q, kv) pair instead.')
    q_seg = kv_seg = segment_ids
  if q_seg is None and kv_seg is None:
    return None, None
  zeros = lambda x: jnp.zeros(x.shape[:2], jnp.int32)
  return (zeros(q) if q_seg is None else q_seg), (zeros(k) if kv_seg is None else kv_seg)


def seq_major_shape(x, heads_major_kv: bool):
  """A heads-major k or v [batch, kv_heads, seq_kv, head_dim] as the shape (a
  ShapeDtypeStruct) of [batch, seq_kv, kv_heads, head_dim], for the checks and segment-id
  helpers here; anything else as it is."""
  if not heads_major_kv or getattr(x, 'ndim', None) != 4:
    return x
  b, h, s, d = x.shape
  return jax.ShapeDtypeStruct((b, s, h, d), x.dtype)


def check_inputs(q, k, v, q_seg=None, kv_seg=None, *, window=None, softcap=None,
                 sm_scale=None):
  """Raises one clear ValueError for inputs no kernel supports (before any lowering)."""
  for name, x in (('q', q), ('k', k), ('v', v)):
    if getattr(x, 'ndim', None) != 4:
      raise ValueError(f'{name} must be [batch, seq, heads, head_dim], got shape '
                       f'{getattr(x, "shape", None)}.')
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f'q, k and v must share one dtype, got {q.dtype}, {k.dtype} and {v.dtype}.')
  if q.dtype not in SUPPORTED_DTYPES:
    raise ValueError(f'Unsupported dtype {q.dtype}: the attention kernels take bfloat16 or '
                     'float32.')
  if k.shape != v.shape:
    raise ValueError(f'k and v must have the same shape, got {k.shape} and {v.shape}.')
  if q.shape[0] != k.shape[0]:
    raise ValueError(f'q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}.')
  if q.shape[3] != k.shape[3]:
    raise ValueError(f'q and k/v must have the same head_dim, got {q.shape[3]} and {k.shape[3]}.')
  if q.shape[2] % k.shape[2]:
    raise ValueError(f'The number of query heads ({q.shape[2]}) must be a multiple of the '
                     f'number of key/value heads ({k.shape[2]}).')
  if min(q.shape) < 1 or min(k.shape) < 1:
    raise ValueError(f'Empty inputs are not supported, got q {q.shape} and k {k.shape}.')
  for name, seg, x in (('q_segment_ids', q_seg, q), ('kv_segment_ids', kv_seg, k)):
    if seg is None:
      continue
    if tuple(getattr(seg, 'shape', ())) != x.shape[:2]:
      raise ValueError(f'{name} must have shape [batch, seq] = {x.shape[:2]}, got '
                       f'{getattr(seg, "shape", None)}.')
    if not jnp.issubdtype(seg.dtype, jnp.integer):
      raise ValueError(f'{name} must be integers, got {seg.dtype}.')
  if window is not None and (not isinstance(window, (int, np.integer)) or window < 1):
    raise ValueError(f'window must be a positive int or None, got {window!r}.')
  if softcap is not None and not softcap > 0:
    raise ValueError(f'softcap must be positive or None, got {softcap!r}.')
  if sm_scale is not None and not isinstance(sm_scale, (int, float)):
    raise ValueError(f'sm_scale must be a Python number or None, got {type(sm_scale).__name__}.')


def make_spec(dtype, head_dim, *, causal, window, softcap, sm_scale, segments, kv_len):
  """The static `blocks.Spec` of a checked call (sm_scale defaults to 1/sqrt(head_dim))."""
  return blocks.Spec(sm_scale=float(head_dim ** -0.5 if sm_scale is None else sm_scale),
                     causal=bool(causal), window=None if window is None else int(window),
                     softcap=None if softcap is None else float(softcap), segments=segments,
                     kv_len=kv_len, exact=jnp.dtype(dtype) == jnp.float32)
