"""Per-token log-probabilities and last-token hidden states of whole sequences, what the
alignment objectives are computed from.

    side = stack_pair(batch)                          # chosen rows, then rejected rows [2B, T]
    logps = token_logps(cfg, params, side, chunk_size=128)   # [2B, T] log p(target), float32
    h = last_hidden(hidden, side['segment_ids'])      # [2B, embed]: a reward head's input

The decoder runs once over the stacked chosen and rejected rows (one forward per pair batch).
The output head runs over sequence chunks of `chunk_size` positions under `jax.checkpoint`
(`flaxllm.models.split.chunked_map`): one chunk's [batch, chunk, vocab] logits are alive at a
time, and the log-softmax is taken in float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from flaxllm.data.preference import SIDES
from flaxllm.models import split as split_lib

ROW_KEYS = ('inputs', 'targets', 'positions', 'segment_ids', 'loss_mask')


def stack_pair(batch: dict) -> dict:
  """The rows of both sides of a pair batch (`{side}_{key}`), chosen first: [2B, T] each."""
  return {k: jnp.concatenate([batch[f'{side}_{k}'] for side in SIDES]) for k in ROW_KEYS}


def token_logps(cfg, params, rows: dict, *, chunk_size: int = 0, rng=None):
  """log p(targets[t] | inputs[:t+1]) [B, T] in float32 (0 where `loss_mask` is 0); dropout
  with `rng`."""
  hidden = split_lib.hidden_states(cfg, params, rows, rng)
  head = split_lib.head_params(cfg, params)

  def chunk_logps(h, targets):
    logits = split_lib.head_logits(cfg, head, h).astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)

  logps = split_lib.chunked_map(chunk_logps, (hidden, rows['targets']), chunk_size)
  return logps * rows['loss_mask'].astype(jnp.float32)


def last_hidden(hidden, segment_ids):
  """The hidden state [B, embed] at each row's last real position (rows are right-padded:
  segment id 0 on padding)."""
  last = jnp.maximum(jnp.sum(segment_ids > 0, axis=-1) - 1, 0)
  return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
