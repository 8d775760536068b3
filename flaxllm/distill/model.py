"""The decoder split at its output head: final hidden states, then logits chunk by chunk.

`hidden_states(cfg, params, batch)` runs the same modules as `flaxllm.models.Decoder` (same
parameter tree, so the params of a Decoder apply unchanged) up to the final norm, and
`head_logits(cfg, params, hidden)` applies the output head (tied embedding or lm_head). Their
composition equals `Decoder.apply` (tested); splitting them lets the distillation loss
compute [batch, chunk, vocab] logits one sequence chunk at a time.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from flaxllm.models import transformer
from flaxllm.models.config import ModelConfig
from flaxllm.models.layers import constrain


class DecoderHidden(nn.Module):
  """`flaxllm.models.Decoder` without the output head: tokens -> [batch, seq, embed]."""
  cfg: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, tokens, positions=None, segment_ids=None):
    cfg = self.cfg
    positions = transformer._default_positions(tokens, positions)  # pylint: disable=protected-access
    tok, pos = transformer._embedders(cfg)  # pylint: disable=protected-access
    x = transformer._embed_inputs(cfg, tok, pos, tokens, positions,  # pylint: disable=protected-access
                                  self.deterministic)
    return transformer.Stack(cfg, cfg.num_layers, causal=True, deterministic=self.deterministic,
                             name='decoder')(x, positions, segment_ids)


def hidden_states(cfg: ModelConfig, params, batch, rng=None):
  """Final (normed) hidden states [batch, seq, embed] of a packed batch; dropout with `rng`."""
  module = DecoderHidden(cfg, deterministic=rng is None or cfg.dropout == 0)
  body = {k: v for k, v in params.items() if k != 'lm_head'}
  rngs = {'dropout': rng} if rng is not None and cfg.dropout > 0 else None
  return module.apply({'params': body}, batch['inputs'], batch['positions'],
                      batch['segment_ids'], rngs=rngs)


def head_logits(cfg: ModelConfig, params, hidden):
  """Logits [..., vocab] of hidden states [..., embed], exactly as the Decoder's head."""
  dtype = jnp.dtype(cfg.dtype)
  if cfg.tie_embeddings:
    w = params['embed']['embedding']                     # [vocab, embed]
    logits = jnp.einsum('...d,vd->...v', hidden.astype(dtype), w.astype(dtype))
  else:
    w = params['lm_head']['kernel']                      # [embed, vocab]
    if hasattr(w, 'contract'):   # a LoRA / quantised kernel object (flaxllm.peft), as in Linear
      logits = w.contract(hidden, 1, dtype, None)
    else:
      logits = jnp.tensordot(hidden.astype(dtype), w.astype(dtype), axes=1)
  logits = logits.astype(jnp.dtype(cfg.logits_dtype))
  if logits.ndim == 3:
    logits = constrain(logits, ('batch', 'length', 'vocab'))
  return logits


def head_params(cfg: ModelConfig, params):
  """The part of `params` the head reads (so chunked loops close over nothing else)."""
  return {'embed': params['embed']} if cfg.tie_embeddings else {'lm_head': params['lm_head']}


def logits(cfg: ModelConfig, params, batch, rng=None):
  """Full logits via hidden states + head (equal to the Decoder's forward)."""
  return head_logits(cfg, params, hidden_states(cfg, params, batch, rng))


__all__ = ['DecoderHidden', 'hidden_states', 'head_logits', 'head_params', 'logits']
