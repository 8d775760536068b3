"""Building blocks shared by every architecture: dense, embeddings, norms, positions, MLP.

Every parameter carries logical axis names (`batch, length, embed, heads, kv_heads, head_dim,
mlp, vocab, layers`); `flaxllm.parallel` maps them to mesh axes. Activations are annotated with
`constrain`, a no-op until sharding rules are active.
"""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxllm.models.config import ModelConfig


def constrain(x, axes: Sequence[str | None]):
  """Logical sharding annotation for an activation (no-op outside a mesh with rules)."""
  return nn.with_logical_constraint(x, tuple(axes))


def normal_init(std: float, axes: Sequence[str | None]):
  return nn.with_logical_partitioning(nn.initializers.normal(std), tuple(axes))


class Linear(nn.Module):
  """y = x · W (+ b) with a multi-dimensional kernel W[in..., out...].

  The last `len(axes) - len(features)` dims of x are contracted, e.g. the q projection maps
  [batch, seq, embed] to [batch, seq, heads, head_dim] with W[embed, heads, head_dim].

  The stored kernel may also be a kernel object (a pytree with a `contract(x, n_in, dtype,
  rng)` method): `flaxllm.lora.LoRAKernel` (x·W0 + scale·(x·A)·B, never forming W0 + BA) or
  `flaxllm.peft.quant.QuantizedTensor` (dequantised on the fly). Such trees come from
  `flaxllm.lora.combine` / `flaxllm.peft.quant.quantize_tree`, never from `init`.
  """
  features: tuple[int, ...]
  axes: tuple[str, ...]          # logical names of W's dims: (in..., out...)
  use_bias: bool = False
  init_std: float = 0.02
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    n_in = len(self.axes) - len(self.features)
    shape = tuple(x.shape[-n_in:]) + tuple(self.features)
    stored = self.get_variable('params', 'kernel') if self.has_variable('params', 'kernel') \
        else None
    if hasattr(stored, 'contract'):  # a LoRA / quantised kernel object (flaxllm.peft)
      rng = (self.make_rng('dropout') if getattr(stored, 'needs_rng', False)
             and self.has_rng('dropout') else None)
      y = stored.contract(x, n_in, self.dtype, rng)
    else:
      kernel = self.param('kernel', normal_init(self.init_std, self.axes), shape,
                          self.param_dtype)
      y = jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype), axes=n_in)
    if self.use_bias:
      bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros,
                                                             self.axes[n_in:]),
                        tuple(self.features), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


def dense(cfg: ModelConfig, features, axes, *, bias: bool, name: str, std=None) -> Linear:
  return Linear(tuple(features), tuple(axes), use_bias=bias,
                init_std=cfg.init_std if std is None else std,
                dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), name=name)


def norm(cfg: ModelConfig, name: str) -> nn.Module:
  """RMSNorm (LLaMA) or LayerNorm (GPT-2, Vaswani); statistics in float32."""
  common = dict(epsilon=cfg.norm_eps, dtype=jnp.dtype(cfg.dtype),
                param_dtype=jnp.dtype(cfg.param_dtype), name=name,
                scale_init=nn.with_logical_partitioning(nn.initializers.ones, ('embed',)))
  if cfg.norm == 'rmsnorm':
    return nn.RMSNorm(**common)
  return nn.LayerNorm(bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('embed',)),
                      **common)


def embed(cfg: ModelConfig, num: int, axes, name: str) -> nn.Embed:
  return nn.Embed(num, cfg.d_model, dtype=jnp.dtype(cfg.dtype),
                  param_dtype=jnp.dtype(cfg.param_dtype),
                  embedding_init=normal_init(cfg.init_std, axes), name=name)


# ----------------------------------------------------------------------------- positions

def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
  """Rotary inverse frequencies [head_dim // 2], with linear or Llama-3.1 scaling."""
  d = cfg.dim_per_head
  inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float32) / d))
  scaling = cfg.rope_scaling
  if scaling is None:
    return inv_freq
  factor = scaling['factor']
  if scaling['type'] == 'linear':
    return inv_freq / factor
  # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate in between.
  low, high = scaling['low_freq_factor'], scaling['high_freq_factor']
  old_len = scaling['original_max_position_embeddings']
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x, positions, inv_freq):
  """Rotates x [batch, seq, heads, head_dim] by positions [batch, seq] (rotate-half layout,
  as in Hugging Face LLaMA checkpoints)."""
  freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)  # [b, s, d/2]
  angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]          # [b, s, 1, d]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


def sinusoidal_positions(positions, d_model: int):
  """Vaswani et al. 2017: PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(...).
  positions [batch, seq] -> [batch, seq, d_model] float32."""
  inv = 1.0 / (10000.0 ** (np.arange(0, d_model, 2, dtype=np.float32) / d_model))
  angles = positions[..., None].astype(jnp.float32) * inv                  # [b, s, d/2]
  return jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(
      *positions.shape, d_model)


# ----------------------------------------------------------------------------- MLP

class MLP(nn.Module):
  """Feed-forward block: SwiGLU (LLaMA) or a plain activation (GPT-2 GELU, Vaswani ReLU).
  [batch, seq, embed] -> [batch, seq, embed]."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
    up = dense(cfg, (cfg.mlp_dim,), ('embed', 'mlp'), bias=cfg.mlp_bias, name='up_proj')(x)
    if cfg.mlp_activation == 'swiglu':
      gate = dense(cfg, (cfg.mlp_dim,), ('embed', 'mlp'), bias=cfg.mlp_bias, name='gate_proj')
      h = jax.nn.silu(gate(x)) * up
    else:
      act = {'gelu': lambda t: jax.nn.gelu(t, approximate=False),
             'gelu_tanh': lambda t: jax.nn.gelu(t, approximate=True),
             'relu': jax.nn.relu}[cfg.mlp_activation]
      h = act(up)
    h = constrain(h, ('batch', 'length', 'mlp'))
    return dense(cfg, (cfg.d_model,), ('mlp', 'embed'), bias=cfg.mlp_bias, name='down_proj',
                 std=out_std)(h)
