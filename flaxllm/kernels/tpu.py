"""TPU (Mosaic Pallas) attention kernels: flash forward, flash backward, decode.

The grid walks every (query tile, key tile) pair with the reduction axis last and
"arbitrary"; accumulators live in VMEM scratch. Steps outside a tile's block range do no
work, and their index maps repeat a visited block so that Mosaic skips the copy
(`_fetch`); the same `blocks.*_block_range` decides both. The tile math is the GPU
kernels' (`flaxllm.kernels.blocks`).

Mosaic tiles must be (8, 128)-aligned in their last two dims, so a head cannot be a
squeezed second-to-last dim: `_Heads` addresses it as a lane block of [b, s, h * d]
(a free reshape) when head_dim % 128 == 0, else as [b, h, s, d] (a transposed copy).
Row statistics are [.., rows, 1] columns, segment ids [b, sq, 1] and [b, 1, skv].
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from flaxllm.kernels import blocks
from flaxllm.kernels.options import BlockSizes

_F32 = jnp.float32


def default_block_sizes(head_dim):
  """Defaults for v4/v5-class TPUs (512-wide tiles keep the MXU busy; untuned)."""
  del head_dim
  return BlockSizes(block_q=512, block_k=512, block_q_dkv=256, block_k_dkv=512,
                    block_q_dq=512, block_k_dq=256)


def padded_head_dim(head_dim):
  return head_dim


@dataclasses.dataclass(frozen=True)
class _Heads:
  """How the kernels address one head of a [b, s, heads, d] array as [block, d] tiles."""
  heads: int
  head_dim: int

  @property
  def lanes(self):
    return self.head_dim % 128 == 0

  def wrap(self, x):
    b, s, h, d = x.shape
    return x.reshape(b, s, h * d) if self.lanes else x.transpose(0, 2, 1, 3)

  def unwrap(self, y):
    if self.lanes:
      return y.reshape(*y.shape[:2], self.heads, self.head_dim)
    return y.transpose(0, 2, 1, 3)

  def out_shape(self, x):
    b, s, h, d = x.shape
    return jax.ShapeDtypeStruct((b, s, h * d) if self.lanes else (b, h, s, d), x.dtype)

  def spec(self, block, index):
    """BlockSpec of [block, d] tiles; index(*grid) -> (batch, head, seq_block)."""
    if self.lanes:
      def lane_index(*grid):
        n, h, s = index(*grid)
        return n, s, h
      return pl.BlockSpec((None, block, self.head_dim), lane_index)
    return pl.BlockSpec((None, None, block, self.head_dim),
                        lambda *grid: (*index(*grid), 0))


def _fetch(j, ranges, num_blocks):
  """Block to copy in at grid step j: j when it is visited, else a visited neighbour."""
  lo, _, _, hi = ranges
  return jnp.minimum(jnp.maximum(jnp.minimum(j, hi - 1), lo), num_blocks - 1)


def _visit(j, ranges, step):
  """Runs step(masked) when block j is in [lo, hi): unmasked inside [full_lo, full_hi)."""
  lo, full_lo, full_hi, hi = ranges
  full = (j >= full_lo) & (j < full_hi)
  pl.when(full)(lambda: step(False))
  pl.when((j >= lo) & (j < hi) & jnp.logical_not(full))(lambda: step(True))


def _tile_mask(spec, q_pos, k_first, block_k, qseg_ref, kvseg_ref):
  """Mask of the resident tiles: queries at q_pos [rows, 1], keys from k_first."""
  segment = lambda ref: None if ref is None else ref[...]
  return blocks.tile_mask(spec, q_pos, blocks.col_positions(k_first, block_k),
                          segment(qseg_ref), segment(kvseg_ref))


def _load(refs):
  return tuple(r[...] for r in refs)


def _store(refs, values):
  for r, x in zip(refs, values):
    r[...] = x


def _params(*semantics):
  return pltpu.CompilerParams(dimension_semantics=semantics)


def _seg_specs(q_seg, kv_seg, q_index, kv_index, block_q, block_k):
  return [None if q_seg is None else pl.BlockSpec((None, block_q, 1), q_index),
          None if kv_seg is None else pl.BlockSpec((None, 1, block_k), kv_index)]


# ---------------------------------------------------------------------------- forward

def _forward_kernel(q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, o_ref, lse_ref, *scratch,
                    spec, q_offset, num_kv_blocks):
  (block_q, head_dim), block_k = q_ref.shape, k_ref.shape[0]
  i, j = pl.program_id(2), pl.program_id(3)
  q_first = q_offset + i * block_q

  @pl.when(j == 0)
  def _init():
    _store(scratch, blocks.init_carry(block_q, head_dim))

  def step(masked):
    mask = None
    if masked:
      mask = _tile_mask(spec, blocks.row_positions(q_first, block_q), j * block_k, block_k,
                        qseg_ref, kvseg_ref)
    _store(scratch, blocks.softmax_step(_load(scratch), q_ref[...], k_ref[...], v_ref[...],
                                        spec, mask))

  _visit(j, blocks.kv_block_range(spec, q_first, q_first + block_q - 1, block_k,
                                  num_kv_blocks), step)

  @pl.when(j == num_kv_blocks - 1)
  def _finish():
    out, lse = blocks.finalize(_load(scratch))
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


def flash_forward(q, k, v, q_seg, kv_seg, *, spec, q_offset, block_sizes, interpret):
  """Same contract as `flaxllm.kernels.gpu.flash_forward`."""
  b, sq, h, d = q.shape
  skv, kvh = k.shape[1], k.shape[2]
  groups = h // kvh
  bq, bk = block_sizes.block_q, block_sizes.block_k
  nq, nk = sq // bq, skv // bk
  qv, kvv = _Heads(h, d), _Heads(kvh, d)

  def kv_block(n, hd, i, j):
    q_first = q_offset + i * bq
    return _fetch(j, blocks.kv_block_range(spec, q_first, q_first + bq - 1, bk, nk), nk)

  q_index = lambda n, hd, i, j: (n, hd, i)
  kv_index = lambda n, hd, i, j: (n, lax.div(hd, groups), kv_block(n, hd, i, j))
  out, lse = pl.pallas_call(
      functools.partial(_forward_kernel, spec=spec, q_offset=q_offset, num_kv_blocks=nk),
      grid=(b, h, nq, nk),
      in_specs=[qv.spec(bq, q_index), kvv.spec(bk, kv_index), kvv.spec(bk, kv_index),
                *_seg_specs(q_seg, kv_seg, lambda n, hd, i, j: (n, i, 0),
                            lambda n, hd, i, j: (n, 0, kv_block(n, hd, i, j)), bq, bk)],
      out_specs=[qv.spec(bq, q_index),
                 pl.BlockSpec((None, None, bq, 1), lambda n, hd, i, j: (n, hd, i, 0))],
      out_shape=[qv.out_shape(q), jax.ShapeDtypeStruct((b, h, sq, 1), _F32)],
      scratch_shapes=[pltpu.VMEM((bq, d), _F32), pltpu.VMEM((bq, 1), _F32),
                      pltpu.VMEM((bq, 1), _F32)],
      compiler_params=_params('parallel', 'parallel', 'parallel', 'arbitrary'),
      interpret=interpret, name='flash_attention_fwd',
  )(qv.wrap(q), kvv.wrap(k), kvv.wrap(v), q_seg, kv_seg)
  return qv.unwrap(out), lse


# --------------------------------------------------------------------------- backward

def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kvseg_ref,
                dk_ref, dv_ref, *scratch, spec, q_offset, num_q_blocks, groups):
  block_q, (block_k, head_dim) = q_ref.shape[0], k_ref.shape
  j, t = pl.program_id(2), pl.program_id(3)
  i = lax.rem(t, num_q_blocks)
  k_first = j * block_k

  @pl.when(t == 0)
  def _init():
    _store(scratch, (jnp.zeros((block_k, head_dim), _F32),) * 2)

  def step(masked):
    mask = None
    if masked:
      mask = _tile_mask(spec, blocks.row_positions(q_offset + i * block_q, block_q), k_first,
                        block_k, qseg_ref, kvseg_ref)
    _store(scratch, blocks.dkv_step(_load(scratch), q_ref[...], k_ref[...], v_ref[...],
                                    do_ref[...], lse_ref[...], delta_ref[...], spec, mask))

  _visit(i, blocks.q_block_range(spec, k_first, k_first + block_k - 1, block_q, num_q_blocks,
                                 q_offset), step)

  @pl.when(t == groups * num_q_blocks - 1)
  def _finish():
    dk, dv = _load(scratch)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kvseg_ref,
               dq_ref, dq_acc, *, spec, q_offset, num_kv_blocks):
  (block_q, head_dim), block_k = q_ref.shape, k_ref.shape[0]
  i, j = pl.program_id(2), pl.program_id(3)
  q_first = q_offset + i * block_q

  @pl.when(j == 0)
  def _init():
    dq_acc[...] = jnp.zeros((block_q, head_dim), _F32)

  def step(masked):
    mask = None
    if masked:
      mask = _tile_mask(spec, blocks.row_positions(q_first, block_q), j * block_k, block_k,
                        qseg_ref, kvseg_ref)
    dq_acc[...] = blocks.dq_step(dq_acc[...], q_ref[...], k_ref[...], v_ref[...], do_ref[...],
                                 lse_ref[...], delta_ref[...], spec, mask)

  _visit(j, blocks.kv_block_range(spec, q_first, q_first + block_q - 1, block_k,
                                  num_kv_blocks), step)

  @pl.when(j == num_kv_blocks - 1)
  def _finish():
    dq_ref[...] = dq_acc[...].astype(dq_ref.dtype)


def flash_backward(q, k, v, do, lse, delta, q_seg, kv_seg, *, spec, q_offset, block_sizes,
                   interpret):
  """Same contract as `flaxllm.kernels.gpu.flash_backward`."""
  b, sq, h, d = q.shape
  skv, kvh = k.shape[1], k.shape[2]
  groups = h // kvh
  qv, kvv = _Heads(h, d), _Heads(kvh, d)
  qw, kw, vw, dow = qv.wrap(q), kvv.wrap(k), kvv.wrap(v), qv.wrap(do)

  # dK, dV: grid (batch, kv head, key tile, (query head in group, query tile)).
  bq, bk = block_sizes.block_q_dkv, block_sizes.block_k_dkv
  nq, nk = sq // bq, skv // bk

  def q_block(n, hk, j, t):
    ranges = blocks.q_block_range(spec, j * bk, j * bk + bk - 1, bq, nq, q_offset)
    return _fetch(lax.rem(t, nq), ranges, nq)

  q_index = lambda n, hk, j, t: (n, hk * groups + lax.div(t, nq), q_block(n, hk, j, t))
  stat = pl.BlockSpec((None, None, bq, 1), lambda *g: (*q_index(*g), 0))
  kv_tile = kvv.spec(bk, lambda n, hk, j, t: (n, hk, j))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, spec=spec, q_offset=q_offset, num_q_blocks=nq,
                        groups=groups),
      grid=(b, kvh, nk, groups * nq),
      in_specs=[qv.spec(bq, q_index), kv_tile, kv_tile, qv.spec(bq, q_index), stat, stat,
                *_seg_specs(q_seg, kv_seg, lambda n, hk, j, t: (n, q_block(n, hk, j, t), 0),
                            lambda n, hk, j, t: (n, 0, j), bq, bk)],
      out_specs=[kv_tile, kv_tile],
      out_shape=[kvv.out_shape(k), kvv.out_shape(v)],
      scratch_shapes=[pltpu.VMEM((bk, d), _F32), pltpu.VMEM((bk, d), _F32)],
      compiler_params=_params('parallel', 'parallel', 'parallel', 'arbitrary'),
      interpret=interpret, name='flash_attention_dkv',
  )(qw, kw, vw, dow, lse, delta, q_seg, kv_seg)

  # dQ: grid (batch, head, query tile, key tile), like the forward.
  bq, bk = block_sizes.block_q_dq, block_sizes.block_k_dq
  nq, nk = sq // bq, skv // bk

  def kv_block(n, hd, i, j):
    q_first = q_offset + i * bq
    return _fetch(j, blocks.kv_block_range(spec, q_first, q_first + bq - 1, bk, nk), nk)

  q_index = lambda n, hd, i, j: (n, hd, i)
  kv_index = lambda n, hd, i, j: (n, lax.div(hd, groups), kv_block(n, hd, i, j))
  stat = pl.BlockSpec((None, None, bq, 1), lambda n, hd, i, j: (n, hd, i, 0))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, spec=spec, q_offset=q_offset, num_kv_blocks=nk),
      grid=(b, h, nq, nk),
      in_specs=[qv.spec(bq, q_index), kvv.spec(bk, kv_index), kvv.spec(bk, kv_index),
                qv.spec(bq, q_index), stat, stat,
                *_seg_specs(q_seg, kv_seg, lambda n, hd, i, j: (n, i, 0),
                            lambda n, hd, i, j: (n, 0, kv_block(n, hd, i, j)), bq, bk)],
      out_specs=qv.spec(bq, q_index),
      out_shape=qv.out_shape(q),
      scratch_shapes=[pltpu.VMEM((bq, d), _F32)],
      compiler_params=_params('parallel', 'parallel', 'parallel', 'arbitrary'),
      interpret=interpret, name='flash_attention_dq',
  )(qw, kw, vw, dow, lse, delta, q_seg, kv_seg)
  return qv.unwrap(dq), kvv.unwrap(dk), kvv.unwrap(dv)


# ----------------------------------------------------------------------------- decode

def _decode_kernel(offset_ref, q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, acc_out, m_out,
                   l_out, *scratch, spec, groups, num_rows, num_kv_blocks, blocks_per_split):
  (block_r, head_dim), block_k = q_ref.shape, k_ref.shape[0]
  offset = offset_ref[0]
  r_first = pl.program_id(2) * block_r
  t = pl.program_id(4)
  j = pl.program_id(3) * blocks_per_split + t

  @pl.when(t == 0)
  def _init():
    _store(scratch, blocks.init_carry(block_r, head_dim))

  def step(masked):
    mask = None
    if masked:
      q_pos = offset + blocks.div(blocks.row_positions(r_first, block_r), groups)
      mask = _tile_mask(spec, q_pos, j * block_k, block_k, qseg_ref, kvseg_ref)
    _store(scratch, blocks.softmax_step(_load(scratch), q_ref[...], k_ref[...], v_ref[...],
                                        spec, mask))

  _visit(j, blocks.packed_rows_range(spec, offset, r_first, block_r, num_rows, groups,
                                     block_k, num_kv_blocks), step)

  @pl.when(t == blocks_per_split - 1)
  def _finish():
    _store((acc_out, m_out, l_out), _load(scratch))


def decode_partials(offset, q, k, v, q_seg, kv_seg, *, spec, groups, num_rows, block_r,
                    block_k, num_splits, interpret, heads_major_kv=False):
  """Same contract as `flaxllm.kernels.gpu.decode_partials` (offset is scalar-prefetched); a
  heads-major cache is read in place, a [b, S, kvh, d] one too when head_dim % 128 == 0."""
  b, kvh, rows, d = q.shape
  seq = k.shape[2 if heads_major_kv else 1]
  nk = seq // block_k
  per_split = -(-nk // num_splits)
  kvv = _Heads(kvh, d)

  def kv_block(n, hk, r, s, t, offset_ref):
    ranges = blocks.packed_rows_range(spec, offset_ref[0], r * block_r, block_r, num_rows,
                                      groups, block_k, nk)
    return _fetch(s * per_split + t, ranges, nk)

  kv_index = lambda n, hk, r, s, t, o: (n, hk, kv_block(n, hk, r, s, t, o))
  if heads_major_kv:
    kv_spec = pl.BlockSpec((None, None, block_k, d), lambda *g: (*kv_index(*g), 0))
  else:
    kv_spec = kvv.spec(block_k, kv_index)
    k, v = kvv.wrap(k), kvv.wrap(v)
  part = lambda width: pl.BlockSpec((None, None, None, block_r, width),
                                    lambda n, hk, r, s, t, o: (n, hk, s, r, 0))
  shape = lambda width: jax.ShapeDtypeStruct((b, kvh, num_splits, rows, width), _F32)
  return pl.pallas_call(
      functools.partial(_decode_kernel, spec=spec, groups=groups, num_rows=num_rows,
                        num_kv_blocks=nk, blocks_per_split=per_split),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(b, kvh, rows // block_r, num_splits, per_split),
          in_specs=[pl.BlockSpec((None, None, block_r, d), lambda n, hk, r, s, t, o: (n, hk, r, 0)),
                    kv_spec, kv_spec,
                    *_seg_specs(q_seg, kv_seg, lambda n, hk, r, s, t, o: (n, r, 0),
                                lambda *g: (g[0], 0, kv_block(*g)), block_r, block_k)],
          out_specs=[part(d), part(1), part(1)],
          scratch_shapes=[pltpu.VMEM((block_r, d), _F32), pltpu.VMEM((block_r, 1), _F32),
                          pltpu.VMEM((block_r, 1), _F32)]),
      out_shape=[shape(d), shape(1), shape(1)],
      compiler_params=_params('parallel', 'parallel', 'parallel', 'parallel', 'arbitrary'),
      interpret=interpret, name='decode_attention',
  )(offset, q, k, v, q_seg, kv_seg)
