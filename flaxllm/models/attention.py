"""Multi-head attention (MHA, GQA, MQA) with rotary positions and a KV cache.

Masks are never materialised here: causality, packed-document segments, padding (segment 0 vs
1) and the sliding window are passed to `flaxllm.kernels.attention`, which picks the kernel.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from flaxllm import kernels
from flaxllm.models.config import ModelConfig
from flaxllm.models.layers import apply_rope, constrain, dense, rope_inv_freq


class Attention(nn.Module):
  """Self-attention (or cross-attention when `kv_input` is given).

  x [batch, seq, embed] -> [batch, seq, embed]. With `decode=True` the keys and values are
  written into a 'cache' collection of fixed length (set by the shape at init) at `index`,
  and queries attend to every filled slot up to their own.

  The cache layout (public: `flaxllm.generate` and the serving engine address it):
  'key', 'value' [batch, kv_heads, length, head_dim] (heads-major, so attention reads it in
  place and a decode step transposes only its new keys), 'segment_ids' [batch, length],
  'index' (the next slot to write).
  """
  cfg: ModelConfig
  causal: bool = True
  use_rope: bool = False
  decode: bool = False

  @nn.compact
  def __call__(self, x, positions, segment_ids, kv_input=None, kv_segment_ids=None):
    cfg = self.cfg
    h, kvh, d = cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
    bias = cfg.attn_bias
    q = dense(cfg, (h, d), ('embed', 'heads', 'head_dim'), bias=bias, name='q_proj')(x)
    source = x if kv_input is None else kv_input
    k = dense(cfg, (kvh, d), ('embed', 'kv_heads', 'head_dim'), bias=bias, name='k_proj')(source)
    v = dense(cfg, (kvh, d), ('embed', 'kv_heads', 'head_dim'), bias=bias, name='v_proj')(source)
    if self.use_rope:
      inv_freq = rope_inv_freq(cfg)
      q = apply_rope(q, positions, inv_freq)
      k = apply_rope(k, positions, inv_freq)
    q = constrain(q, ('batch', 'length', 'heads', 'head_dim'))
    k = constrain(k, ('batch', 'length', 'kv_heads', 'head_dim'))
    v = constrain(v, ('batch', 'length', 'kv_heads', 'head_dim'))

    if kv_input is None:
      kv_segment_ids = segment_ids
    elif (segment_ids is None) != (kv_segment_ids is None):  # one side padded: fill the other
      segment_ids = jnp.ones(x.shape[:2], jnp.int32) if segment_ids is None else segment_ids
      kv_segment_ids = (jnp.ones(source.shape[:2], jnp.int32) if kv_segment_ids is None
                        else kv_segment_ids)
    q_offset, heads_major_kv = 0, False
    if self.decode and kv_input is None:
      if segment_ids is None:
        segment_ids = kv_segment_ids = jnp.ones(x.shape[:2], jnp.int32)
      k, v, kv_segment_ids, q_offset, heads_major_kv = self._update_cache(k, v, segment_ids)

    out = kernels.attention(q, k, v, causal=self.causal, q_segment_ids=segment_ids,
                            kv_segment_ids=kv_segment_ids, q_offset=q_offset,
                            window=cfg.sliding_window, impl=cfg.attention_impl,
                            heads_major_kv=heads_major_kv)
    out = constrain(out, ('batch', 'length', 'heads', 'head_dim'))
    out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
    return dense(cfg, (cfg.d_model,), ('heads', 'head_dim', 'embed'), bias=bias, name='o_proj',
                 std=out_std)(out)

  def _update_cache(self, k, v, segment_ids):
    """Writes k, v [batch, seq, kv_heads, head_dim] at the cache index (heads-major: see the
    class docstring); returns the whole cache, its segment ids, the slot of the first new query
    and whether k, v are heads-major."""
    initialising = not self.has_variable('cache', 'key')
    k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)   # the new tokens only
    key = self.variable('cache', 'key', jnp.zeros, k.shape, k.dtype)
    value = self.variable('cache', 'value', jnp.zeros, v.shape, v.dtype)
    segments = self.variable('cache', 'segment_ids', jnp.zeros, segment_ids.shape, jnp.int32)
    index = self.variable('cache', 'index', lambda: jnp.array(0, jnp.int32))
    if initialising:  # init only records the cache shape (set by the input length)
      return k, v, segment_ids, 0, True
    i = index.value
    key.value = lax.dynamic_update_slice(key.value, k.astype(key.value.dtype), (0, 0, i, 0))
    value.value = lax.dynamic_update_slice(value.value, v.astype(value.value.dtype), (0, 0, i, 0))
    segments.value = lax.dynamic_update_slice(segments.value, segment_ids.astype(jnp.int32),
                                              (0, i))
    index.value = i + k.shape[2]
    return key.value, value.value, segments.value, i, True
