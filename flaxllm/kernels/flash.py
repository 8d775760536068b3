"""Flash attention: validation, padding and the custom VJP around the Pallas kernels.

The forward saves only (q, k, v, segment ids, out, lse); the backward recomputes the
probabilities tile by tile (FlashAttention-2). The kernels of the chosen backend
(`flaxllm.kernels.gpu` or `flaxllm.kernels.tpu`) see sequences padded to a multiple of
their blocks, padded keys being masked through `Spec.kv_len`.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from flaxllm.kernels import blocks, gpu, options, tpu

_BACKENDS = {'gpu': gpu, 'tpu': tpu}


def default_block_sizes(backend=None, head_dim=128):
  """The tuned-by-default `BlockSizes` of a backend ('gpu' | 'tpu' | None: current)."""
  return _BACKENDS[options.resolve_backend(backend)].default_block_sizes(head_dim)


@dataclasses.dataclass(frozen=True)
class _Call:
  """Everything static about one padded kernel call."""
  spec: blocks.Spec
  q_offset: int
  block_sizes: options.BlockSizes
  backend: str
  interpret: bool

  @property
  def kernels(self):
    return _BACKENDS[self.backend]

  def kwargs(self):
    return dict(spec=self.spec, q_offset=self.q_offset, block_sizes=self.block_sizes,
                interpret=self.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, q_seg, kv_seg, call):
  return call.kernels.flash_forward(q, k, v, q_seg, kv_seg, **call.kwargs())[0]


def _flash_fwd(q, k, v, q_seg, kv_seg, call):
  out, lse = call.kernels.flash_forward(q, k, v, q_seg, kv_seg, **call.kwargs())
  return out, (q, k, v, q_seg, kv_seg, out, lse)


def _flash_bwd(call, residuals, do):
  q, k, v, q_seg, kv_seg, out, lse = residuals
  delta = jnp.einsum('bshd,bshd->bhs', out.astype(jnp.float32), do.astype(jnp.float32))
  dq, dk, dv = call.kernels.flash_backward(q, k, v, do.astype(q.dtype), lse, delta[..., None],
                                           q_seg, kv_seg, **call.kwargs())
  return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _pad(x, axis, size):
  if x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths)


def flash_attention(q, k, v, *, causal=False, segment_ids=None, window=None, softcap=None,
                    sm_scale=None, q_offset=0, block_sizes=None, backend=None, interpret=None):
  """Memory-efficient attention with Pallas kernels, differentiable in q, k and v.

  q [batch, seq_q, heads, head_dim]; k, v [batch, seq_kv, kv_heads, head_dim] with
  heads % kv_heads == 0 (GQA/MQA; K and V are never repeated). Returns
  [batch, seq_q, heads, head_dim] in q's dtype (bfloat16 or float32).

  Masking follows `flaxllm.kernels.reference` (query i sits at slot q_offset + i):
  segment_ids: one [batch, seq] array (needs seq_q == seq_kv) or a pair
    (q_segment_ids [batch, seq_q], kv_segment_ids [batch, seq_kv]), for packed sequences.
  window: sliding window (Mistral-style), keys with q_slot - k_slot < window.
  softcap: logits become softcap * tanh(logits / softcap) (Gemma-2-style).
  sm_scale: logit scale, default 1 / sqrt(head_dim). q_offset: a static Python int.
  block_sizes: `BlockSizes` (default `default_block_sizes(backend, head_dim)`).
  backend: 'gpu' (Triton) or 'tpu' (Mosaic); default TPU kernels on TPU, else GPU ones.
  interpret: run the kernels in the Pallas interpreter; default on when the kernels'
    platform is absent (e.g. on CPU).
  """
  q_seg, kv_seg = options.split_segment_ids(segment_ids, q, k)
  options.check_inputs(q, k, v, q_seg, kv_seg, window=window, softcap=softcap,
                       sm_scale=sm_scale)
  if not isinstance(q_offset, int) or q_offset < 0:
    raise ValueError(f'q_offset must be a non-negative Python int here, got {q_offset!r}; '
                     'traced offsets go to decode_attention.')
  backend = options.resolve_backend(backend)
  interpret = options.resolve_interpret(interpret, backend)
  kernels = _BACKENDS[backend]
  b, seq_q, heads, head_dim = q.shape
  seq_kv = k.shape[1]
  sizes = (block_sizes or kernels.default_block_sizes(head_dim)).fit(seq_q, seq_kv)
  pad_q = options.round_up(seq_q, sizes.q_multiple)
  pad_kv = options.round_up(seq_kv, sizes.kv_multiple)
  pad_d = kernels.padded_head_dim(head_dim)
  spec = options.make_spec(q.dtype, head_dim, causal=causal, window=window, softcap=softcap,
                           sm_scale=sm_scale, segments=q_seg is not None,
                           kv_len=seq_kv if pad_kv != seq_kv else None)
  call = _Call(spec, q_offset, sizes, backend, interpret)

  q = _pad(_pad(q, 1, pad_q), 3, pad_d)
  k = _pad(_pad(k, 1, pad_kv), 3, pad_d)
  v = _pad(_pad(v, 1, pad_kv), 3, pad_d)
  if q_seg is not None:
    q_seg = _pad(q_seg.astype(jnp.int32), 1, pad_q)[:, :, None]
    kv_seg = _pad(kv_seg.astype(jnp.int32), 1, pad_kv)[:, None, :]
  out = _flash(q, k, v, q_seg, kv_seg, call)
  return out[:, :seq_q, :, :head_dim]
