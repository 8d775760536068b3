"""The decoder split at its output head: final hidden states, then logits chunk by chunk.

`hidden_states(cfg, params, batch)` runs the same modules as `flaxllm.models.Decoder` (same
parameter tree, so the params of a Decoder apply unchanged) up to the final norm, and
`head_logits(cfg, params, hidden)` applies the output head (tied embedding or lm_head). Their
composition equals `Decoder.apply` (tested); splitting them lets a loss compute
[batch, chunk, vocab] logits one sequence chunk at a time with `chunked_sums` (the trainer's
`loss_chunk_size`, the distillation loss).
"""
from __future__ import annotations

from typing import Callable, Optional

import flax.linen as nn
import jax
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


def chunked_sums(fn: Callable[..., dict], xs: tuple, chunk: Optional[int]) -> dict:
  """sum over sequence chunks of `fn(*chunk_of_xs) -> dict of scalar sums`.

  `xs`: arrays [batch, seq, ...] (hidden states, targets, mask, ...); the LAST one must be the
  mask (padding added to reach a multiple of `chunk` gets mask 0). With `chunk` None/0 or
  >= seq, `fn` sees the whole sequence. Otherwise `lax.scan` runs `jax.checkpoint(fn)` chunk
  by chunk: a chunk's logits are recomputed in the backward pass instead of being stored, so
  peak memory holds one chunk of logits instead of all of them.
  """
  seq = xs[0].shape[1]
  if not chunk or chunk >= seq:
    return fn(*xs)
  n = -(-seq // chunk)
  pad = n * chunk - seq

  def split(x):
    if pad:
      x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(x.shape[0], n, chunk, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)          # [n, batch, chunk, ...]

  body_fn = jax.checkpoint(fn)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                       jax.eval_shape(fn, *[x[:, :chunk] for x in xs]))

  def body(carry, chunk_xs):
    return jax.tree.map(jnp.add, carry, body_fn(*chunk_xs)), None

  sums, _ = jax.lax.scan(body, zeros, tuple(split(x) for x in xs))
  return sums


__all__ = ['DecoderHidden', 'hidden_states', 'head_logits', 'head_params', 'logits',
           'chunked_sums']
