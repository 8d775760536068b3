"""Models: `build(model_config)` returns a Linen module.

    model = flaxllm.models.build(flaxllm.models.presets.get('tiny_llama'))
    params = flaxllm.models.init_params(model, jax.random.key(0))
    logits = model.apply({'params': params}, tokens)        # [batch, seq, vocab]
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxllm.models import presets
from flaxllm.models.config import ConfigError, ModelConfig
from flaxllm.models.flops import flops_per_token, param_count
from flaxllm.models.transformer import Decoder, EncoderDecoder

__all__ = ['build', 'init_params', 'ModelConfig', 'ConfigError', 'presets', 'param_count',
           'flops_per_token', 'Decoder', 'EncoderDecoder']


def build(model_config, *, decode: bool = False, deterministic: bool = True) -> nn.Module:
  """A Linen module for `model_config` (ModelConfig, dict or ConfigDict; validated here)."""
  cfg = ModelConfig.from_dict(model_config)
  if cfg.arch == 'encoder_decoder':
    return EncoderDecoder(cfg, decode=decode, deterministic=deterministic)
  return Decoder(cfg, decode=decode, deterministic=deterministic)


def init_params(model: nn.Module, rng, batch: int = 1, seq: int = 8):
  """Freshly initialised params (unboxed) for `model`; the logical axis metadata can be read
  with `nn.get_partition_spec(jax.eval_shape(lambda: model.init(...)))`."""
  tokens = jnp.zeros((batch, seq), jnp.int32)
  args = (tokens, tokens) if isinstance(model, EncoderDecoder) else (tokens,)
  variables = jax.jit(model.init)(rng, *args)
  return nn.meta.unbox(variables['params'])
