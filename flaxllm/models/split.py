"""The decoder split at its output head: final hidden states, then logits chunk by chunk.

`hidden_states(cfg, params, batch)` applies `Decoder.hidden_states` (up to the final norm) and
`head_logits(cfg, params, hidden)` `Decoder.head` (tied embedding or lm_head), the decoder's
public seams. Their composition equals `Decoder.apply` (tested); splitting them lets a loss
compute [batch, chunk, vocab] logits one sequence chunk at a time with `chunked_sums` (the
trainer's `loss_chunk_size`, the distillation loss).
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from flaxllm.models import transformer
from flaxllm.models.config import ModelConfig


def _model(cfg: ModelConfig, rng=None):
  return transformer.Decoder(cfg, deterministic=rng is None or cfg.dropout == 0)


def hidden_states(cfg: ModelConfig, params, batch, rng=None):
  """Final (normed) hidden states [batch, seq, embed] of a packed batch; dropout with `rng`
  (`Decoder.hidden_states`; the head's params are not needed)."""
  body = {k: v for k, v in params.items() if k != 'lm_head'}
  rngs = {'dropout': rng} if rng is not None and cfg.dropout > 0 else None
  return _model(cfg, rng).apply({'params': body}, batch['inputs'], batch['positions'],
                                batch['segment_ids'], rngs=rngs, method='hidden_states')


def head_params(cfg: ModelConfig, params):
  """The part of `params` the head reads (so chunked loops close over nothing else)."""
  return {'embed': params['embed']} if cfg.tie_embeddings else {'lm_head': params['lm_head']}


def head_logits(cfg: ModelConfig, params, hidden):
  """Logits [..., vocab] of hidden states [..., embed] (`Decoder.head`); `params` needs only
  the head's part (`head_params`)."""
  return _model(cfg).apply({'params': head_params(cfg, params)}, hidden, method='head')


def logits(cfg: ModelConfig, params, batch, rng=None):
  """Full logits via hidden states + head (equal to the Decoder's forward)."""
  return head_logits(cfg, params, hidden_states(cfg, params, batch, rng))


def chunk_sequence(xs: tuple, chunk: int):
  """The arrays `xs` [batch, seq, ...] as [n, batch, chunk, ...] (the seq axis padded with zeros
  to a multiple of `chunk`), and n."""
  seq = xs[0].shape[1]
  n = -(-seq // chunk)
  pad = n * chunk - seq

  def split(x):
    if pad:
      x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(x.shape[0], n, chunk, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)          # [n, batch, chunk, ...]

  return tuple(split(x) for x in xs), n


def unchunk_sequence(ys, seq: int):
  """The inverse of `chunk_sequence` for one array: [n, batch, chunk, ...] -> [batch, seq, ...]."""
  ys = jnp.moveaxis(ys, 0, 1)
  return ys.reshape(ys.shape[0], -1, *ys.shape[3:])[:, :seq]


def chunked_sums(fn: Callable[..., dict], xs: tuple, chunk: Optional[int]) -> dict:
  """sum over sequence chunks of `fn(*chunk_of_xs) -> dict of scalar sums`.

  `xs`: arrays [batch, seq, ...] (hidden states, targets, mask, ...); the LAST one must be the
  mask (padding added to reach a multiple of `chunk` gets mask 0). With `chunk` None/0 or
  >= seq, `fn` sees the whole sequence. Otherwise `lax.scan` runs `jax.checkpoint(fn)` chunk
  by chunk: a chunk's logits are recomputed in the backward pass instead of being stored, so
  peak memory holds one chunk of logits instead of all of them.
  """
  if not chunk or chunk >= xs[0].shape[1]:
    return fn(*xs)
  chunks, _ = chunk_sequence(xs, chunk)
  body_fn = jax.checkpoint(fn)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                       jax.eval_shape(fn, *[x[:, :chunk] for x in xs]))

  def body(carry, chunk_xs):
    return jax.tree.map(jnp.add, carry, body_fn(*chunk_xs)), None

  sums, _ = jax.lax.scan(body, zeros, chunks)
  return sums


def chunked_map(fn: Callable[..., jax.Array], xs: tuple, chunk: Optional[int]) -> jax.Array:
  """`fn(*xs)` [batch, seq, ...] computed over sequence chunks of `chunk` positions (`fn` maps
  chunks [batch, chunk, ...] to [batch, chunk, ...]), each under `jax.checkpoint` as in
  `chunked_sums`: per-token values (log-probs) without the whole [batch, seq, vocab] logits."""
  seq = xs[0].shape[1]
  if not chunk or chunk >= seq:
    return fn(*xs)
  chunks, _ = chunk_sequence(xs, chunk)
  ys = jax.lax.map(lambda c: jax.checkpoint(fn)(*c), chunks)      # [n, batch, chunk, ...]
  return unchunk_sequence(ys, seq)


__all__ = ['hidden_states', 'head_logits', 'head_params', 'logits', 'chunked_sums',
           'chunked_map', 'chunk_sequence', 'unchunk_sequence']
