"""Reference (XLA) attention: the numerics every kernel is tested against.

Masking convention shared by every implementation in `flaxllm.kernels`:
query i (absolute slot ``q_offset + i``) may attend to key j iff
  q_segment_ids[i] == kv_segment_ids[j]                     (packed documents, padding)
  and (not causal or j <= q_offset + i)                      (causal, also for a KV cache)
  and (window is None or q_offset + i - j < window)          (sliding window)
A query row with no allowed key returns zeros.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_mask(batch, seq_q, seq_kv, *, causal=False, q_segment_ids=None,
                   kv_segment_ids=None, q_offset=0, window=None):
  """Boolean mask [batch, 1, seq_q, seq_kv] (True = attend) following the convention above."""
  q_idx = jnp.arange(seq_q)[:, None] + q_offset
  kv_idx = jnp.arange(seq_kv)[None, :]
  mask = jnp.ones((batch, 1, seq_q, seq_kv), dtype=bool)
  if causal:
    mask = mask & (kv_idx <= q_idx)[None, None]
  if window is not None:
    mask = mask & (q_idx - kv_idx < window)[None, None]
  if q_segment_ids is not None or kv_segment_ids is not None:
    q_seg = jnp.zeros((batch, seq_q), jnp.int32) if q_segment_ids is None else q_segment_ids
    kv_seg = jnp.zeros((batch, seq_kv), jnp.int32) if kv_segment_ids is None else kv_segment_ids
    mask = mask & (q_seg[:, None, :, None] == kv_seg[:, None, None, :])
  return mask


def reference_attention(q, k, v, *, causal=False, q_segment_ids=None, kv_segment_ids=None,
                        q_offset=0, window=None, softcap=None, sm_scale=None,
                        heads_major_kv=False):
  """Plain attention. q [batch, seq_q, heads, head_dim]; k, v [batch, seq_kv, kv_heads, head_dim]
  (`heads_major_kv`: [batch, kv_heads, seq_kv, head_dim], the KV cache's layout, read in place).

  Grouped-query attention groups the `heads // kv_heads` query heads that share a KV head,
  without repeating K and V. Logits and softmax are computed in float32.
  Returns [batch, seq_q, heads, head_dim] in q's dtype.
  """
  b, sq, h, d = q.shape
  skv, kvh = (k.shape[2], k.shape[1]) if heads_major_kv else (k.shape[1], k.shape[2])
  kv = 'bksd' if heads_major_kv else 'bskd'
  groups = h // kvh
  scale = sm_scale if sm_scale is not None else d ** -0.5
  qg = q.reshape(b, sq, kvh, groups, d)
  logits = jnp.einsum(f'bqkgd,{kv}->bkgqs', qg, k,
                      preferred_element_type=jnp.float32) * scale
  if softcap is not None:
    logits = softcap * jnp.tanh(logits / softcap)
  mask = attention_mask(b, sq, skv, causal=causal, q_segment_ids=q_segment_ids,
                        kv_segment_ids=kv_segment_ids, q_offset=q_offset, window=window)
  mask = mask[:, :, None]  # [b, 1, 1, sq, skv] broadcasts over kv_heads and groups
  logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  # Softmax with the normalisation applied after the value product ([.., d] instead of
  # [.., seq_kv] divisions); the max is a constant shift, so it needs no gradient.
  row_max = jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True))
  weights = jnp.exp(logits - row_max)
  denom = weights.sum(axis=-1)                                        # [b, k, g, q]
  out = jnp.einsum(f'bkgqs,{kv}->bqkgd', weights.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  has_key = jnp.moveaxis(row_max[..., 0] > jnp.finfo(jnp.float32).min, 3, 1)   # [b, q, k, g]
  out = jnp.where(has_key[..., None], out / jnp.moveaxis(denom, 3, 1)[..., None], 0.0)
  return out.reshape(b, sq, h, d).astype(q.dtype)
