"""GPU (Triton-lowered Pallas) attention kernels: flash forward, flash backward, decode.

Arrays stay in the model layout [batch, seq, heads, head_dim]; a program owns one tile of
one head and walks the other sequence with `lax.fori_loop`, keeping its accumulators in
registers (the FlashAttention-2 schedule). Key/value heads are indexed as
head // groups, so grouped-query attention never repeats K and V. The loop over key
blocks is split in three: masked blocks, mask-free blocks, masked blocks (see
`blocks.kv_block_range`); fully masked blocks are never visited.

Triton tiles must have power-of-two shapes of at least 16: callers pad head_dim to
`padded_head_dim` and sequences to multiples of the blocks.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from flaxllm.kernels import blocks
from flaxllm.kernels.options import BlockSizes, fit_block


def default_block_sizes(head_dim):
  """Defaults for H100-class GPUs: the FlashAttention-2 Triton tutorial's tiles (not yet
  tuned on hardware; bench/attention.py measures them)."""
  warps = 4 if head_dim <= 64 else 8
  return BlockSizes(block_q=128, block_k=64, block_q_dkv=32, block_k_dkv=128,
                    block_q_dq=128, block_k_dq=32, num_warps=warps, num_stages=3,
                    num_warps_bwd=warps, num_stages_bwd=2)


def padded_head_dim(head_dim):
  return fit_block(head_dim)


def _params(num_warps, num_stages):
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _loop(ranges, step, carry):
  """Runs step(j, carry, masked) over key (or query) blocks j in [lo, hi)."""
  lo, full_lo, full_hi, hi = ranges
  carry = lax.fori_loop(lo, full_lo, lambda j, c: step(j, c, True), carry)
  carry = lax.fori_loop(full_lo, full_hi, lambda j, c: step(j, c, False), carry)
  return lax.fori_loop(full_hi, hi, lambda j, c: step(j, c, True), carry)


def _tile(j, size):
  return pl.ds(pl.multiple_of(j * size, size), size)


def _key_tile(j, block_k, k_ref, v_ref, kvseg_ref, spec, q_pos, q_seg, masked):
  """(k, v, mask) of key tile j read from whole-sequence refs; mask None when not `masked`."""
  kv = _tile(j, block_k)
  mask = None
  if masked:
    kv_seg = None if kvseg_ref is None else kvseg_ref[:, kv]
    mask = blocks.tile_mask(spec, q_pos, blocks.col_positions(j * block_k, block_k), q_seg,
                            kv_seg)
  return k_ref[kv, :], v_ref[kv, :], mask


# ---------------------------------------------------------------------------- forward

def _forward_kernel(q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, o_ref, lse_ref, *,
                    spec, q_offset, block_k):
  block_q, head_dim = q_ref.shape
  q_first = q_offset + pl.program_id(0) * block_q
  q = q_ref[...]
  q_pos = blocks.row_positions(q_first, block_q)
  q_seg = None if qseg_ref is None else qseg_ref[...]

  def step(j, carry, masked):
    k, v, mask = _key_tile(j, block_k, k_ref, v_ref, kvseg_ref, spec, q_pos, q_seg, masked)
    return blocks.softmax_step(carry, q, k, v, spec, mask)

  ranges = blocks.kv_block_range(spec, q_first, q_first + block_q - 1, block_k,
                                 k_ref.shape[0] // block_k)
  out, lse = blocks.finalize(_loop(ranges, step, blocks.init_carry(block_q, head_dim)))
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = lse


def flash_forward(q, k, v, q_seg, kv_seg, *, spec, q_offset, block_sizes, interpret):
  """q [b, sq, h, d]; k, v [b, skv, kvh, d]; q_seg [b, sq, 1], kv_seg [b, 1, skv] or None.

  Returns out [b, sq, h, d] and lse [b, h, sq, 1] (f32, base 2).
  """
  b, sq, h, d = q.shape
  skv, kvh = k.shape[1], k.shape[2]
  groups = h // kvh
  bq, bk = block_sizes.block_q, block_sizes.block_k
  q_spec = pl.BlockSpec((None, bq, None, d), lambda i, n, hd: (n, i, hd, 0))
  kv_spec = pl.BlockSpec((None, skv, None, d), lambda i, n, hd: (n, 0, lax.div(hd, groups), 0))
  return pl.pallas_call(
      functools.partial(_forward_kernel, spec=spec, q_offset=q_offset, block_k=bk),
      grid=(sq // bq, b, h),
      in_specs=[q_spec, kv_spec, kv_spec,
                None if q_seg is None else pl.BlockSpec((None, bq, 1), lambda i, n, hd: (n, i, 0)),
                None if kv_seg is None else pl.BlockSpec((None, 1, skv), lambda i, n, hd: (n, 0, 0))],
      out_specs=[q_spec, pl.BlockSpec((None, None, bq, 1), lambda i, n, hd: (n, hd, i, 0))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, sq, 1), jnp.float32)],
      compiler_params=_params(block_sizes.num_warps, block_sizes.num_stages),
      interpret=interpret, name='flash_attention_fwd',
  )(q, k, v, q_seg, kv_seg)


# --------------------------------------------------------------------------- backward

def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kvseg_ref,
                dk_ref, dv_ref, *, spec, q_offset, block_q):
  block_k, head_dim = k_ref.shape
  groups = q_ref.shape[1]
  k_first = pl.program_id(0) * block_k
  k, v = k_ref[...], v_ref[...]
  kv_pos = blocks.col_positions(k_first, block_k)
  kv_seg = None if kvseg_ref is None else kvseg_ref[...]
  ranges = blocks.q_block_range(spec, k_first, k_first + block_k - 1, block_q,
                                q_ref.shape[0] // block_q, q_offset)

  def group(g, carry):
    def step(i, carry, masked):
      rows = _tile(i, block_q)
      mask = None
      if masked:
        q_seg = None if qseg_ref is None else qseg_ref[rows, :]
        mask = blocks.tile_mask(spec, blocks.row_positions(q_offset + i * block_q, block_q),
                                kv_pos, q_seg, kv_seg)
      return blocks.dkv_step(carry, q_ref[rows, g, :], k, v, do_ref[rows, g, :],
                             lse_ref[g, rows, :], delta_ref[g, rows, :], spec, mask)
    return _loop(ranges, step, carry)

  zeros = jnp.zeros((block_k, head_dim), jnp.float32)
  dk, dv = lax.fori_loop(0, groups, group, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kvseg_ref,
               dq_ref, *, spec, q_offset, block_k):
  block_q, head_dim = q_ref.shape
  q_first = q_offset + pl.program_id(0) * block_q
  q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
  q_pos = blocks.row_positions(q_first, block_q)
  q_seg = None if qseg_ref is None else qseg_ref[...]

  def step(j, dq, masked):
    k, v, mask = _key_tile(j, block_k, k_ref, v_ref, kvseg_ref, spec, q_pos, q_seg, masked)
    return blocks.dq_step(dq, q, k, v, do, lse, delta, spec, mask)

  ranges = blocks.kv_block_range(spec, q_first, q_first + block_q - 1, block_k,
                                 k_ref.shape[0] // block_k)
  dq = _loop(ranges, step, jnp.zeros((block_q, head_dim), jnp.float32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


def flash_backward(q, k, v, do, lse, delta, q_seg, kv_seg, *, spec, q_offset, block_sizes,
                   interpret):
  """Gradients (dq, dk, dv) given the forward's lse and delta = rowsum(out * do).

  lse, delta [b, h, sq, 1] (f32); other shapes as in `flash_forward`.
  """
  b, sq, h, d = q.shape
  skv, kvh = k.shape[1], k.shape[2]
  groups = h // kvh
  params = _params(block_sizes.num_warps_bwd, block_sizes.num_stages_bwd)

  # dK, dV: one program per (key tile, batch, kv head), looping over its query heads.
  bq, bk = block_sizes.block_q_dkv, block_sizes.block_k_dkv
  grouped = pl.BlockSpec((None, sq, groups, d), lambda j, n, hk: (n, 0, hk, 0))
  stats = pl.BlockSpec((None, groups, sq, 1), lambda j, n, hk: (n, hk, 0, 0))
  kv_tile = pl.BlockSpec((None, bk, None, d), lambda j, n, hk: (n, j, hk, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, spec=spec, q_offset=q_offset, block_q=bq),
      grid=(skv // bk, b, kvh),
      in_specs=[grouped, kv_tile, kv_tile, grouped, stats, stats,
                None if q_seg is None else pl.BlockSpec((None, sq, 1), lambda j, n, hk: (n, 0, 0)),
                None if kv_seg is None else pl.BlockSpec((None, 1, bk), lambda j, n, hk: (n, 0, j))],
      out_specs=[kv_tile, kv_tile],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=params, interpret=interpret, name='flash_attention_dkv',
  )(q, k, v, do, lse, delta, q_seg, kv_seg)

  # dQ: one program per (query tile, batch, head), looping over key tiles.
  bq, bk = block_sizes.block_q_dq, block_sizes.block_k_dq
  q_tile = pl.BlockSpec((None, bq, None, d), lambda i, n, hd: (n, i, hd, 0))
  kv_all = pl.BlockSpec((None, skv, None, d), lambda i, n, hd: (n, 0, lax.div(hd, groups), 0))
  stat_tile = pl.BlockSpec((None, None, bq, 1), lambda i, n, hd: (n, hd, i, 0))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, spec=spec, q_offset=q_offset, block_k=bk),
      grid=(sq // bq, b, h),
      in_specs=[q_tile, kv_all, kv_all, q_tile, stat_tile, stat_tile,
                None if q_seg is None else pl.BlockSpec((None, bq, 1), lambda i, n, hd: (n, i, 0)),
                None if kv_seg is None else pl.BlockSpec((None, 1, skv), lambda i, n, hd: (n, 0, 0))],
      out_specs=q_tile,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=params, interpret=interpret, name='flash_attention_dq',
  )(q, k, v, do, lse, delta, q_seg, kv_seg)
  return dq, dk, dv


# ----------------------------------------------------------------------------- decode

def _decode_kernel(offset_ref, q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, acc_ref, m_ref,
                   l_ref, *, spec, groups, num_rows, block_k, blocks_per_split):
  block_r, head_dim = q_ref.shape
  offset = offset_ref[0]
  r_first = pl.program_id(2) * block_r
  q = q_ref[...]
  q_pos = offset + blocks.div(blocks.row_positions(r_first, block_r), groups)
  q_seg = None if qseg_ref is None else qseg_ref[...]

  def step(j, carry, masked):
    k, v, mask = _key_tile(j, block_k, k_ref, v_ref, kvseg_ref, spec, q_pos, q_seg, masked)
    return blocks.softmax_step(carry, q, k, v, spec, mask)

  ranges = blocks.packed_rows_range(spec, offset, r_first, block_r, num_rows, groups, block_k,
                                    k_ref.shape[0] // block_k)
  first = pl.program_id(3) * blocks_per_split
  ranges = blocks.restrict(ranges, first, first + blocks_per_split)
  acc_ref[...], m_ref[...], l_ref[...] = _loop(ranges, step,
                                               blocks.init_carry(block_r, head_dim))


def decode_partials(offset, q, k, v, q_seg, kv_seg, *, spec, groups, num_rows, block_r,
                    block_k, num_splits, interpret, heads_major_kv=False):
  """Un-normalized split-K attention of packed query rows against a KV cache.

  offset (1,) int32: absolute slot of query 0. q [b, kvh, rows, d]: row r is query
  r // groups of head kv_head * groups + r % groups. k, v [b, S, kvh, d] (`heads_major_kv`:
  [b, kvh, S, d]);
  q_seg [b, rows, 1], kv_seg [b, 1, S] or None. Returns acc [b, kvh, splits, rows, d]
  and m, l [b, kvh, splits, rows, 1] (f32) for `blocks.merge_partials`.
  """
  b, kvh, rows, d = q.shape
  seq = k.shape[2 if heads_major_kv else 1]
  per_split = -(-(seq // block_k) // num_splits)
  q_spec = pl.BlockSpec((None, None, block_r, d), lambda n, hk, r, s: (n, hk, r, 0))
  if heads_major_kv:
    kv_spec = pl.BlockSpec((None, None, seq, d), lambda n, hk, r, s: (n, hk, 0, 0))
  else:
    kv_spec = pl.BlockSpec((None, seq, None, d), lambda n, hk, r, s: (n, 0, hk, 0))
  part = lambda width: pl.BlockSpec((None, None, None, block_r, width),
                                    lambda n, hk, r, s: (n, hk, s, r, 0))
  shape = lambda width: jax.ShapeDtypeStruct((b, kvh, num_splits, rows, width), jnp.float32)
  return pl.pallas_call(
      functools.partial(_decode_kernel, spec=spec, groups=groups, num_rows=num_rows,
                        block_k=block_k, blocks_per_split=per_split),
      grid=(b, kvh, rows // block_r, num_splits),
      in_specs=[pl.BlockSpec((1,), lambda *_: (0,)), q_spec, kv_spec, kv_spec,
                None if q_seg is None else pl.BlockSpec((None, block_r, 1), lambda n, hk, r, s: (n, r, 0)),
                None if kv_seg is None else pl.BlockSpec((None, 1, seq), lambda n, hk, r, s: (n, 0, 0))],
      out_specs=[part(d), part(1), part(1)],
      out_shape=[shape(d), shape(1), shape(1)],
      compiler_params=_params(4, 2),
      interpret=interpret, name='decode_attention',
  )(offset, q, k, v, q_seg, kv_seg)
