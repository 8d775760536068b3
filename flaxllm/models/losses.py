"""Token losses shared by every objective: cross-entropy and its masked, token-weighted sums.

Losses are SUMS over the tokens of a (micro-)batch; the train step divides once by the batch's
token count (`flaxllm.train.step`), so the loss is per token also across gradient accumulation.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits, targets):
  """Per-token (CE, logsumexp) in float32: CE = logsumexp(logits) - logits[target]."""
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return lse - target_logit, lse


def smoothed_cross_entropy(logits, targets, smoothing: float):
  """Per-token cross-entropy against the label-smoothed target (1 - e) * onehot + e / vocab
  (Szegedy et al. 2016; Vaswani et al. 2017 use e = 0.1): (1 - e) * CE + e * (lse - mean
  logit). Equals `cross_entropy(...)[0]` at e = 0."""
  ce, lse = cross_entropy(logits, targets)
  if not smoothing:
    return ce
  uniform = lse - jnp.mean(logits.astype(jnp.float32), axis=-1)
  return (1.0 - smoothing) * ce + smoothing * uniform


def token_sums(ce, lse, mask) -> dict:
  """{'ce', 'z', 'tokens'}: masked sums of per-token CE and logsumexp^2, and the token count."""
  return {'ce': jnp.sum(ce * mask), 'z': jnp.sum(jnp.square(lse) * mask),
          'tokens': jnp.sum(mask)}


def lm_sums(logits, batch, z_loss: float = 0.0, label_smoothing: float = 0.0):
  """(objective sum, {'ce', 'z', 'tokens'} sums) of predicting `batch['targets']` where
  `batch['loss_mask']` is set. The objective is sum(mask * (CE' + z_loss * logsumexp^2)), CE'
  the label-smoothed CE; 'ce' is always the plain CE (the reported loss and perplexity)."""
  ce, lse = cross_entropy(logits, batch['targets'])
  mask = batch['loss_mask'].astype(jnp.float32)
  sums = token_sums(ce, lse, mask)
  objective = sums['ce']
  if label_smoothing:
    objective = jnp.sum(smoothed_cross_entropy(logits, batch['targets'], label_smoothing) * mask)
  if z_loss:
    objective = objective + z_loss * sums['z']
  return objective, sums
