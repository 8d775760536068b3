"""Blocked attention in plain XLA: causal and sliding-window attention without the square.

The query rows are cut into blocks of `block_q`; block [a, b) attends only to the keys that
some row of it may see, [lo, hi) with hi = q_offset + b (causal) and lo = q_offset + a -
window + 1 (window), each block by `reference_attention` on those slices (softmax normalised
after the value product). The bounds are Python ints (q_offset is static), so the key
blocks above the diagonal and left of the window are never computed, in the forward or,
through autodiff of the same slices, in the backward: at seq 8 x block_q the logits are
(n + 1) / 2n of the square's. Rows of other segments are masked inside a block but not
skipped (segment ids are data, the slices are static).

This is what `flaxllm.kernels.attention(impl='auto')` runs on CPU (and wherever no Pallas
kernel is taken) for more than one block of queries at a static q_offset: also without a mask
to skip, [block_q, seq_kv] logit tiles run 1.1-2.5x faster than the whole square on CPU
(bench/results/attention_cpu.md). Exact against `reference_attention` up to float summation
order.
"""
from __future__ import annotations

import jax.numpy as jnp

from flaxllm.kernels.reference import reference_attention

DEFAULT_BLOCK_Q = 64   # CPU: bench/attention.py --cpu (bench/results/attention_cpu.md)


def key_range(q_first, q_last, seq_kv, *, causal, window):
  """[lo, hi): the keys that queries at absolute slots q_first..q_last may attend to."""
  hi = min(seq_kv, q_last + 1) if causal else seq_kv
  lo = max(0, q_first - window + 1) if window is not None else 0
  return lo, max(lo, hi)


def blocked_attention(q, k, v, *, causal=False, q_segment_ids=None, kv_segment_ids=None,
                      q_offset: int = 0, window=None, softcap=None, sm_scale=None,
                      heads_major_kv=False, block_q: int = DEFAULT_BLOCK_Q):
  """`reference_attention` (same arguments and convention; q_offset a Python int) computed
  one query block at a time against only the keys the block may see."""
  seq_q = q.shape[1]
  seq_kv = k.shape[2 if heads_major_kv else 1]
  if block_q < 1:
    raise ValueError(f'block_q must be positive, got {block_q}.')
  outs = []
  for a in range(0, seq_q, block_q):
    b = min(a + block_q, seq_q)
    lo, hi = key_range(q_offset + a, q_offset + b - 1, seq_kv, causal=causal, window=window)
    if hi == lo:  # no key for any row of the block: zeros, as the convention says
      outs.append(jnp.zeros_like(q[:, a:b]))
      continue
    keys = (slice(None), slice(None), slice(lo, hi)) if heads_major_kv else (
        slice(None), slice(lo, hi))
    outs.append(reference_attention(
        q[:, a:b], k[keys], v[keys], causal=causal,
        q_segment_ids=None if q_segment_ids is None else q_segment_ids[:, a:b],
        kv_segment_ids=None if kv_segment_ids is None else kv_segment_ids[:, lo:hi],
        q_offset=q_offset + a - lo, window=window, softcap=softcap, sm_scale=sm_scale,
        heads_major_kv=heads_major_kv))
  return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)
