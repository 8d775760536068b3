"""Attention kernels and the dispatcher the models call.

Modules: `reference` (XLA numerics and the masking convention), `blocked` (causal/windowed
attention in XLA without the square: the CPU path), `blocks` (tile math shared by all
kernels), `gpu` / `tpu` (the Pallas kernels of each backend), `flash` (flash attention with a
custom VJP), `decode` (KV-cache decoding), `options` (checks).
"""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from flaxllm.kernels.blocked import DEFAULT_BLOCK_Q, blocked_attention
from flaxllm.kernels.decode import decode_attention
from flaxllm.kernels.flash import default_block_sizes, flash_attention
from flaxllm.kernels.options import BlockSizes, SUPPORTED_DTYPES, seq_major_shape, split_segment_ids
from flaxllm.kernels.reference import attention_mask, reference_attention

__all__ = ['BlockSizes', 'attention', 'attention_mask', 'blocked_attention', 'decode_attention',
           'default_block_sizes', 'flash_attention', 'reference_attention']

IMPLS = ('auto', 'xla', 'blocked', 'cudnn', 'pallas')
_MIN_PALLAS_SEQ = 256  # below this the fused XLA reference is as fast (not yet measured)


def _static_offset(q_offset):
  return isinstance(q_offset, (int, np.integer))


def _pallas_fits(q, k, q_offset, heads_major_kv):
  """Whether 'auto' should take the Pallas kernels on this accelerator and shape."""
  if q.dtype not in SUPPORTED_DTYPES or not q.dtype == k.dtype or q.shape[-1] > 256:
    return False
  if not _static_offset(q_offset):  # decoding against a cache
    # On TPU the decode kernel reads a [b, s, kv_heads, d] cache in place only when
    # head_dim % 128 == 0; a heads-major cache always.
    return jax.default_backend() != 'tpu' or heads_major_kv or q.shape[-1] % 128 == 0
  return k.shape[2 if heads_major_kv else 1] >= _MIN_PALLAS_SEQ


def _auto_impl(q, k, q_offset, heads_major_kv):
  if (jax.default_backend() in ('gpu', 'cuda', 'rocm', 'tpu')
      and _pallas_fits(q, k, q_offset, heads_major_kv)):
    return 'pallas'
  return 'blocked'


def _blocked_or_reference(q, k, v, *, causal, q_segment_ids, kv_segment_ids, q_offset, window,
                          softcap, sm_scale, heads_major_kv):
  """'blocked' for more than one query block (it skips the keys a causal or windowed block
  cannot see, and smaller logit tiles run faster on CPU for any mask), else the reference. A
  traced q_offset (a KV cache) with several causal queries is a prefill: when the offset is 0 at
  run time the new keys are the cache's first seq_q slots, attended blocked."""
  kw = dict(causal=causal, window=window, softcap=softcap, sm_scale=sm_scale,
            heads_major_kv=heads_major_kv)
  seq_q, seq_kv = q.shape[1], k.shape[2 if heads_major_kv else 1]
  reference = functools.partial(reference_attention, q, k, v, q_segment_ids=q_segment_ids,
                                kv_segment_ids=kv_segment_ids, q_offset=q_offset, **kw)
  if seq_q <= DEFAULT_BLOCK_Q:
    return reference()
  if _static_offset(q_offset):
    return blocked_attention(q, k, v, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                             q_offset=int(q_offset), **kw)
  if not causal or seq_q > seq_kv:
    return reference()
  new = (slice(None), slice(None), slice(0, seq_q)) if heads_major_kv else (
      slice(None), slice(0, seq_q))
  kv_new_segments = None if kv_segment_ids is None else kv_segment_ids[:, :seq_q]
  return lax.cond(q_offset == 0,
                  lambda: blocked_attention(q, k[new], v[new], q_segment_ids=q_segment_ids,
                                            kv_segment_ids=kv_new_segments, q_offset=0, **kw),
                  reference)


def cudnn_arguments(*, causal, q_segment_ids, kv_segment_ids, q_offset, window, softcap,
                    sm_scale):
  """Keyword arguments of `jax.nn.dot_product_attention` for this mask, or a ValueError."""
  missing = []
  if softcap is not None:
    missing.append('a logit soft-cap')
  if q_segment_ids is not None or kv_segment_ids is not None:
    missing.append('segment ids')
  if (causal or window is not None) and not (_static_offset(q_offset) and q_offset == 0):
    missing.append('a non-zero q_offset')
  if window is not None and not causal:
    missing.append('a window without causal masking')
  if missing:
    raise ValueError(f"impl='cudnn' cannot express {' or '.join(missing)}; "
                     "use impl='pallas' or impl='xla'.")
  return dict(scale=sm_scale, is_causal=bool(causal),
              local_window_size=None if window is None else (window - 1, 0))


def attention(q, k, v, *, causal=False, q_segment_ids=None, kv_segment_ids=None, q_offset=0,
              window=None, softcap=None, sm_scale=None, impl='auto', heads_major_kv=False):
  """Dispatches attention to an implementation ('auto' | 'xla' | 'cudnn' | 'pallas').

  q [batch, seq_q, heads, head_dim]; k, v [batch, seq_kv, kv_heads, head_dim], or with
  `heads_major_kv` [batch, kv_heads, seq_kv, head_dim] (the KV cache's layout: 'xla' and the
  decode kernel read it in place, with no per-step transpose; 'cudnn' and `flash_attention`
  get a transposed copy). See `flaxllm.kernels.reference` for the masking convention.

  'xla': `reference_attention`. 'blocked': `blocked_attention` (the reference one query block
  at a time against only the keys the block may see) for more than one block of queries,
  including a causal prefill against a fresh KV cache; the reference elsewhere. 'cudnn': `jax.nn.dot_product_attention(implementation=
  'cudnn')`, for masks it can express (no soft-cap, segment ids or q_offset). 'pallas':
  `flash_attention` when q_offset is a Python int, else `decode_attention` (a traced
  offset: decoding against a KV cache; forward only). 'auto': Pallas on GPU/TPU for
  sequences of at least 256 keys and for decoding, else 'blocked' (always on CPU). Under a
  multi-device `jax.set_mesh`, the Pallas kernels run per shard (`_per_shard`).
  """
  if impl not in IMPLS:
    raise ValueError(f'attention impl must be one of {IMPLS}, got {impl!r}.')
  if impl == 'auto':
    impl = _auto_impl(q, k, q_offset, heads_major_kv)
  if impl == 'blocked':
    return _blocked_or_reference(q, k, v, causal=causal, q_segment_ids=q_segment_ids,
                                 kv_segment_ids=kv_segment_ids, q_offset=q_offset, window=window,
                                 softcap=softcap, sm_scale=sm_scale, heads_major_kv=heads_major_kv)
  if impl == 'xla':
    return reference_attention(q, k, v, causal=causal, q_segment_ids=q_segment_ids,
                               kv_segment_ids=kv_segment_ids, q_offset=q_offset,
                               window=window, softcap=softcap, sm_scale=sm_scale,
                               heads_major_kv=heads_major_kv)
  if heads_major_kv and (impl == 'cudnn' or _static_offset(q_offset)):
    k, v, heads_major_kv = k.swapaxes(1, 2), v.swapaxes(1, 2), False
  if impl == 'cudnn':
    kwargs = cudnn_arguments(causal=causal, q_segment_ids=q_segment_ids,
                             kv_segment_ids=kv_segment_ids, q_offset=q_offset, window=window,
                             softcap=softcap, sm_scale=sm_scale)
    return jax.nn.dot_product_attention(q, k, v, implementation='cudnn', **kwargs)
  if _static_offset(q_offset):
    def kernel(q, k, v, q_seg, kv_seg):
      segments = None if q_seg is None and kv_seg is None else (q_seg, kv_seg)
      return flash_attention(q, k, v, causal=causal, segment_ids=segments, window=window,
                             softcap=softcap, sm_scale=sm_scale, q_offset=int(q_offset))
    return _per_shard(kernel, q, k, v, q_segment_ids, kv_segment_ids)

  def kernel(q, k, v, q_seg, kv_seg, offset):
    return decode_attention(q, k, v, q_offset=offset, causal=causal, q_segment_ids=q_seg,
                            kv_segment_ids=kv_seg, window=window, softcap=softcap,
                            sm_scale=sm_scale, heads_major_kv=heads_major_kv)
  return _per_shard(kernel, q, k, v, q_segment_ids, kv_segment_ids,
                    jnp.asarray(q_offset, jnp.int32), heads_major_kv=heads_major_kv)


def _mesh_axes(name, size, mesh):
  """The mesh axes the models' logical axis `name` maps to, if they divide `size`."""
  axes = nn.logical_to_mesh_axes((name,))[0]
  if axes is None:
    return None
  shards = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
  return axes if size % shards == 0 else None


def _per_shard(kernel, q, k, v, q_seg, kv_seg, *scalars, heads_major_kv=False):
  """kernel(q, k, v, q_seg, kv_seg, *scalars), run per shard under a multi-device mesh.

  XLA cannot partition a Pallas call, so under `jax.set_mesh` the kernel runs in a
  `shard_map` over the batch and head axes, split as the models' logical axis rules
  ('batch', 'heads', 'kv_heads'; see flaxllm.parallel.axis_rules) split the activations.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return kernel(q, k, v, q_seg, kv_seg, *scalars)
  if nn.logical_to_mesh_axes(('length',))[0] is not None:
    raise ValueError("impl='pallas' does not support sequence-sharded activations; "
                     "map the logical axis 'length' to no mesh axis.")
  batch = _mesh_axes('batch', q.shape[0], mesh)
  kv_heads_axis = 1 if heads_major_kv else 2
  q_heads = _mesh_axes('heads', q.shape[2], mesh)
  kv_heads = _mesh_axes('kv_heads', k.shape[kv_heads_axis], mesh)
  if (q_heads is None) != (kv_heads is None):  # keep each query head with its kv head
    q_heads = kv_heads = None
  q_spec = P(batch, None, q_heads, None)
  kv_spec = P(batch, kv_heads, None, None) if heads_major_kv else P(batch, None, kv_heads, None)
  if (q_seg is None) != (kv_seg is None):
    q_seg, kv_seg = split_segment_ids((q_seg, kv_seg), q, seq_major_shape(k, heads_major_kv))
  segments = () if q_seg is None else (q_seg, kv_seg)

  def per_shard(q, k, v, *rest):
    segs, rest = rest[:len(segments)], rest[len(segments):]
    return kernel(q, k, v, *(segs or (None, None)), *rest)

  return jax.shard_map(
      per_shard, in_specs=(q_spec, kv_spec, kv_spec, *[P(batch, None)] * len(segments),
                           *[P()] * len(scalars)),
      out_specs=q_spec, check_vma=False)(q, k, v, *segments, *scalars)
