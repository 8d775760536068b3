"""Decode attention: a few queries at a traced cache slot against a whole KV cache.

The queries of the `groups` heads that share a KV head are packed into the rows of one
tile (row r is query r // groups), so single-token decoding still runs full tensor-core
or MXU tiles and reads each cache block once per KV head. The cache is split into
`num_splits` chunks processed in parallel (flash-decoding) and merged in XLA. Causal
and window masking skip the cache blocks past q_offset + seq_q (the unwritten slots)
and before the window; the skipped blocks are not read. Forward only.
"""
from __future__ import annotations

import jax.numpy as jnp

from flaxllm.kernels import blocks, gpu, options, tpu

_BACKENDS = {'gpu': gpu, 'tpu': tpu}
_DEFAULT_BLOCK_K = {'gpu': 64, 'tpu': 512}
_MAX_BLOCK_ROWS = {'gpu': 64, 'tpu': 256}
_GPU_PROGRAMS = 256  # split the cache until about this many programs run (~2 per SM)


def _cache_block(seq, block_k):
  """Largest power-of-two block <= block_k dividing seq (no cache copy), else block_k."""
  b = min(block_k, options.fit_block(seq))
  while b >= options.MIN_BLOCK and seq % b:
    b //= 2
  return b if b >= options.MIN_BLOCK else min(block_k, options.fit_block(seq))


def decode_attention(q, k, v, *, q_offset, causal=True, q_segment_ids=None,
                     kv_segment_ids=None, window=None, softcap=None, sm_scale=None,
                     block_k=None, num_splits=None, backend=None, interpret=None,
                     heads_major_kv=False):
  """Attention of q [batch, seq_q, heads, head_dim] at slots q_offset + i (an int or a
  traced int32 scalar) against a cache k, v [batch, seq_kv, kv_heads, head_dim], or
  [batch, kv_heads, seq_kv, head_dim] with `heads_major_kv` (read in place on every backend).

  Masking follows `flaxllm.kernels.reference`. block_k: cache tile (a power of two; the
  cache is copied only if no such tile divides seq_kv). num_splits: cache chunks run in
  parallel (default: enough to fill a GPU; 1 on TPU). Returns [batch, seq_q, heads,
  head_dim] in q's dtype.
  """
  kv_shape = options.seq_major_shape(k, heads_major_kv)
  options.check_inputs(q, kv_shape, options.seq_major_shape(v, heads_major_kv), q_segment_ids,
                       kv_segment_ids, window=window, softcap=softcap, sm_scale=sm_scale)
  backend = options.resolve_backend(backend)
  interpret = options.resolve_interpret(interpret, backend)
  kernels = _BACKENDS[backend]
  b, seq_q, heads, head_dim = q.shape
  seq_kv, kv_heads = kv_shape.shape[1], kv_shape.shape[2]
  groups = heads // kv_heads
  if (q_segment_ids is None) != (kv_segment_ids is None):
    q_segment_ids, kv_segment_ids = options.split_segment_ids(
        (q_segment_ids, kv_segment_ids), q, kv_shape)

  block_k = _cache_block(seq_kv, block_k or _DEFAULT_BLOCK_K[backend])
  num_blocks = -(-seq_kv // block_k)
  if num_splits is None:
    programs = b * kv_heads
    num_splits = 1 if backend == 'tpu' else max(1, min(num_blocks, _GPU_PROGRAMS // programs))
  num_splits = max(1, min(num_splits, num_blocks))
  pad_kv = options.round_up(seq_kv, block_k)
  pad_d = kernels.padded_head_dim(head_dim)

  rows = seq_q * groups
  block_r = min(_MAX_BLOCK_ROWS[backend], options.fit_block(rows))
  pad_rows = options.round_up(rows, block_r)
  # [b, sq, kvh * groups, d] -> [b, kvh, sq * groups, d]: row r = query r // groups.
  qp = q.reshape(b, seq_q, kv_heads, groups, head_dim).transpose(0, 2, 1, 3, 4)
  qp = qp.reshape(b, kv_heads, rows, head_dim)
  qp = jnp.pad(qp, ((0, 0), (0, 0), (0, pad_rows - rows), (0, pad_d - head_dim)))
  seq_axis = 2 if heads_major_kv else 1
  widths = [(0, 0), (0, 0), (0, 0), (0, pad_d - head_dim)]
  widths[seq_axis] = (0, pad_kv - seq_kv)
  widths = tuple(widths)
  if widths != ((0, 0),) * 4:
    k, v = jnp.pad(k, widths), jnp.pad(v, widths)
  q_seg = kv_seg = None
  if q_segment_ids is not None:
    q_seg = jnp.repeat(q_segment_ids.astype(jnp.int32), groups, axis=1)
    q_seg = jnp.pad(q_seg, ((0, 0), (0, pad_rows - rows)))[:, :, None]
    kv_seg = jnp.pad(kv_segment_ids.astype(jnp.int32), ((0, 0), (0, pad_kv - seq_kv)))
    kv_seg = kv_seg[:, None, :]

  spec = options.make_spec(q.dtype, head_dim, causal=causal, window=window, softcap=softcap,
                           sm_scale=sm_scale, segments=q_seg is not None,
                           kv_len=seq_kv if pad_kv != seq_kv else None)
  offset = jnp.asarray(q_offset, jnp.int32).reshape(1)
  acc, m, l = kernels.decode_partials(
      offset, qp, k, v, q_seg, kv_seg, spec=spec, groups=groups, num_rows=rows,
      block_r=block_r, block_k=block_k, num_splits=num_splits, interpret=interpret,
      heads_major_kv=heads_major_kv)
  out = blocks.merge_partials(acc, m, l, axis=2)[:, :, :rows, :head_dim]
  out = out.reshape(b, kv_heads, seq_q, groups, head_dim).transpose(0, 2, 1, 3, 4)
  return out.reshape(b, seq_q, heads, head_dim).astype(q.dtype)
