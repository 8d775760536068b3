"""Tile math shared by every attention kernel (GPU and TPU, flash and decode).

A kernel works on tiles: a query tile q [rows, head_dim] against key/value tiles
k, v [cols, head_dim]. Logits are kept in base 2 (pre-multiplied by log2(e)) so that the
softmax uses exp2; the saved log-sum-exp `lse` is in base 2 too. Row statistics (running
max `m`, running sum `l`, `lse`, `delta`) are column vectors [rows, 1], a shape both the
Triton and the Mosaic lowerings handle without relayouts.

Masking follows `flaxllm.kernels.reference`. Masked logits are -inf; a row whose keys
are all masked keeps m = -inf and l = 0, returns zeros and saves lse = +inf, so that the
backward's exp2(s - lse) is exactly 0 for it.

Block ranges: for a query tile, `kv_block_range` returns the key blocks [lo, hi) that it
must visit (causal and window skipping) and the sub-range [full_lo, full_hi) of blocks in
which every pair is allowed, which the kernels run without building a mask.
`q_block_range` is the same for the query blocks a key tile meets (backward dK/dV).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax.numpy as jnp
from jax import lax

LOG2E = math.log2(math.e)
_NN = (((1,), (0,)), ((), ()))  # a @ b
_NT = (((1,), (1,)), ((), ()))  # a @ b.T


@dataclasses.dataclass(frozen=True)
class Spec:
  """Static description of one attention problem, closed over by the kernels.

  kv_len: keys at positions >= kv_len are padding (None when the keys are not padded).
  exact: full-precision (f32) matmuls; set for float32 inputs.
  """
  sm_scale: float
  causal: bool = False
  window: int | None = None
  softcap: float | None = None
  segments: bool = False
  kv_len: int | None = None
  exact: bool = False

  @property
  def precision(self):
    return lax.Precision.HIGHEST if self.exact else None


def _dot(a, b, spec, dims=_NN):
  return lax.dot_general(a, b, dims, precision=spec.precision,
                         preferred_element_type=jnp.float32)


# ----------------------------------------------------------------------------- masks

def row_positions(first, rows):
  """Positions first, first + 1, ... as a column [rows, 1] (int32)."""
  return first + lax.broadcasted_iota(jnp.int32, (rows, 1), 0)


def col_positions(first, cols):
  """Positions first, first + 1, ... as a row [1, cols] (int32)."""
  return first + lax.broadcasted_iota(jnp.int32, (1, cols), 1)


def tile_mask(spec, q_pos, kv_pos, q_seg=None, kv_seg=None):
  """Allowed pairs [rows, cols] of a tile, or None when `spec` masks nothing.

  q_pos, q_seg [rows, 1]; kv_pos, kv_seg [1, cols]; positions are absolute slots.
  """
  conds = []
  if spec.causal:
    conds.append(kv_pos <= q_pos)
  if spec.window is not None:
    conds.append(q_pos - kv_pos < spec.window)
  if spec.kv_len is not None:
    conds.append(kv_pos < spec.kv_len)
  if spec.segments:
    conds.append(q_seg == kv_seg)
  return functools.reduce(jnp.logical_and, conds) if conds else None


# ----------------------------------------------------------------------- block ranges

def _traced(*xs):
  return any(not isinstance(x, int) for x in xs)


def _min(a, b):
  return jnp.minimum(a, b) if _traced(a, b) else min(a, b)


def _max(a, b):
  return jnp.maximum(a, b) if _traced(a, b) else max(a, b)


def div(x, d):
  """x // d for x >= 0 (lax.div truncates, which lowers cheaply on both backends)."""
  return lax.div(x, jnp.asarray(d, x.dtype)) if _traced(x) else x // d


def cdiv(x, d):
  return div(x + (d - 1), d)


def _ordered(lo, full_lo, full_hi, hi, num_blocks, no_full):
  """Clamps to 0 <= lo <= full_lo <= full_hi <= hi <= num_blocks."""
  hi = _min(hi, num_blocks)
  lo = _min(lo, hi)
  full_lo = _min(_max(full_lo, lo), hi)
  full_hi = _min(_max(full_hi, full_lo), hi)
  if no_full:
    full_lo = full_hi = hi
  return lo, full_lo, full_hi, hi


def kv_block_range(spec, q_first, q_last, block_k, num_blocks):
  """(lo, full_lo, full_hi, hi): key blocks seen by queries at positions q_first..q_last."""
  lo, full_lo, full_hi, hi = 0, 0, num_blocks, num_blocks
  if spec.causal:
    hi = div(q_last, block_k) + 1
    full_hi = div(q_first + 1, block_k)
  if spec.window is not None:
    lo = div(_max(q_first - spec.window + 1, 0), block_k)
    full_lo = cdiv(_max(q_last - spec.window + 1, 0), block_k)
  if spec.kv_len is not None:
    hi = _min(hi, cdiv(spec.kv_len, block_k))
    full_hi = _min(full_hi, spec.kv_len // block_k)
  return _ordered(lo, full_lo, full_hi, hi, num_blocks, spec.segments)


def q_block_range(spec, k_first, k_last, block_q, num_blocks, q_offset=0):
  """(lo, full_lo, full_hi, hi): query blocks (slot q_offset + i * block_q + r) that meet
  the keys at positions k_first..k_last."""
  lo, full_lo, full_hi, hi = 0, 0, num_blocks, num_blocks
  if spec.causal:
    lo = div(_max(k_first - q_offset, 0), block_q)
    full_lo = cdiv(_max(k_last - q_offset, 0), block_q)
  if spec.window is not None:
    hi = cdiv(_max(k_last + spec.window - q_offset, 0), block_q)
    full_hi = div(_max(k_first + spec.window - q_offset, 0), block_q)
  if spec.kv_len is not None:  # a key tile holding padding is masked throughout
    full_hi = jnp.where(k_last < spec.kv_len, full_hi, 0)
  return _ordered(lo, full_lo, full_hi, hi, num_blocks, spec.segments)


def packed_rows_range(spec, offset, r_first, rows, num_rows, groups, block_k, num_blocks):
  """kv_block_range for packed decode rows r_first.. (row r is query r // groups)."""
  r_last = _min(r_first + rows - 1, num_rows - 1)
  return kv_block_range(spec, offset + div(r_first, groups), offset + div(r_last, groups),
                        block_k, num_blocks)


def restrict(ranges, start, stop):
  """Intersects block ranges with [start, stop) (a decode split)."""
  return tuple(jnp.clip(r, start, stop) for r in ranges)


# ---------------------------------------------------------------------------- forward

def logits(q, k, spec):
  """Base-2 logits [rows, cols] (f32), soft-capped when spec.softcap is set."""
  s = _dot(q, k, spec, _NT)
  if spec.softcap is None:
    return s * (spec.sm_scale * LOG2E)
  return (spec.softcap * LOG2E) * jnp.tanh(s * (spec.sm_scale / spec.softcap))


def init_carry(rows, head_dim):
  """Online-softmax state: acc [rows, head_dim], m [rows, 1], l [rows, 1] (f32)."""
  return (jnp.zeros((rows, head_dim), jnp.float32),
          jnp.full((rows, 1), -jnp.inf, jnp.float32),
          jnp.zeros((rows, 1), jnp.float32))


def softmax_step(carry, q, k, v, spec, mask=None):
  """Folds one key/value tile into the online-softmax state (mask None: all allowed)."""
  acc, m_prev, l_prev = carry
  s = logits(q, k, spec)
  if mask is not None:
    s = jnp.where(mask, s, -jnp.inf)
  m = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
  # Rows with every key so far masked have m = -inf: shift them by 0, not by inf.
  shift = m if mask is None else jnp.where(m == -jnp.inf, 0.0, m)
  p = jnp.exp2(s - shift)
  alpha = jnp.exp2(m_prev - shift)
  l = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
  acc = alpha * acc + _dot(p.astype(v.dtype), v, spec)
  return acc, m, l


def finalize(carry):
  """(out [rows, head_dim] f32, lse [rows, 1] base 2) from the online-softmax state."""
  acc, m, l = carry
  empty = l == 0.0
  out = acc * (1.0 / jnp.where(empty, 1.0, l))
  lse = jnp.where(empty, jnp.inf, m + jnp.log2(jnp.where(empty, 1.0, l)))
  return out, lse


def merge_partials(acc, m, l, axis):
  """Merges un-normalized partial states (acc, m, l) along `axis` (split-K decode)."""
  m_all = jnp.max(m, axis=axis, keepdims=True)
  w = jnp.exp2(m - jnp.where(m_all == -jnp.inf, 0.0, m_all))
  l_all = jnp.sum(w * l, axis=axis)
  acc_all = jnp.sum(w * acc, axis=axis)
  return acc_all / jnp.where(l_all == 0.0, 1.0, l_all)


# --------------------------------------------------------------------------- backward

def _probs_and_dlogits(q, k, v, do, lse, delta, spec, mask):
  """Probabilities p and dLoss/d(q @ k.T) for a tile, both [rows, cols] f32."""
  s = logits(q, k, spec)
  if spec.softcap is None:
    dscale = spec.sm_scale
  else:  # d/dx of c * tanh(x * scale / c) is scale * (1 - tanh^2)
    t = s * (1.0 / (spec.softcap * LOG2E))
    dscale = spec.sm_scale * (1.0 - t * t)
  if mask is not None:
    s = jnp.where(mask, s, -jnp.inf)
  p = jnp.exp2(s - lse)
  dp = _dot(do, v, spec, _NT)
  return p, p * (dp - delta) * dscale


def dkv_step(carry, q, k, v, do, lse, delta, spec, mask=None):
  """Accumulates (dk, dv) [cols, head_dim] of a key tile over one query tile."""
  dk, dv = carry
  p, ds = _probs_and_dlogits(q, k, v, do, lse, delta, spec, mask)
  dv = dv + _dot(p.astype(do.dtype).T, do, spec)
  dk = dk + _dot(ds.astype(q.dtype).T, q, spec)
  return dk, dv


def dq_step(dq, q, k, v, do, lse, delta, spec, mask=None):
  """Accumulates dq [rows, head_dim] of a query tile over one key tile."""
  _, ds = _probs_and_dlogits(q, k, v, do, lse, delta, spec, mask)
  return dq + _dot(ds.astype(k.dtype), k, spec)
