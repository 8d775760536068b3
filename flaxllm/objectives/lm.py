"""Language modelling: next-token cross-entropy on packed documents (pretraining, and
instruction tuning where `loss_mask` covers the responses).

    loss_fn = lm_loss(model, z_loss=1e-4)                  # a LossFn (flaxllm.objectives.base)
    objective, sums = loss_fn(params, frozen, batch, rng)  # sums: 'ce', 'z', 'tokens'

With `chunk_size` > 0 (decoder-only models) the output head and the loss run fused over chunks
of that many positions with their own VJP (`flaxllm.models.head_loss.chunked_head_ce`): one
chunk's [batch, chunk, vocab] float32 logits are alive at a time instead of the whole
sequence's, which dominates activation memory at large vocabularies, and each logit is computed
once (the gradient of the head is formed in the forward pass). Same sums and gradients.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn

from flaxllm.models import head_loss, losses
from flaxllm.models import split as split_lib
from flaxllm.objectives import base


def forward(model: nn.Module, params, batch, rng=None):
  """The model's logits [batch, seq, vocab] for a packed batch (dropout when `rng` is given)."""
  rngs = {'dropout': rng} if rng is not None else None
  return model.apply({'params': params}, batch['inputs'], batch['positions'],
                     batch['segment_ids'], rngs=rngs)


def _params_only(params, frozen):
  del frozen
  return params


def lm_loss(model: nn.Module, *, z_loss: float = 0.0,
            model_params: Callable[[Any, Any], Any] = _params_only,
            chunk_size: int = 0) -> base.LossFn:
  """The language-modelling LossFn; `model_params(params, frozen)` assembles the tree that
  `model` applies (the default: the params themselves)."""
  if chunk_size:
    return _chunked_lm_loss(model.cfg, z_loss, model_params, chunk_size)

  def loss_fn(params, frozen, batch, rng=None):
    logits = forward(model, model_params(params, frozen), batch, rng)
    return losses.lm_sums(logits, batch, z_loss)
  return loss_fn


def _chunked_lm_loss(cfg, z_loss: float, model_params, chunk_size: int) -> base.LossFn:
  def loss_fn(params, frozen, batch, rng=None):
    tree = model_params(params, frozen)
    hidden = split_lib.hidden_states(cfg, tree, batch, rng)    # [batch, seq, embed]
    return head_loss.chunked_head_ce(
        functools.partial(split_lib.head_logits, cfg), split_lib.head_params(cfg, tree), hidden,
        batch['targets'], batch['loss_mask'], z_loss=z_loss, chunk_size=chunk_size)
  return loss_fn


class LanguageModel(base.Objective):
  """`objective='lm'`: next-token prediction with z_loss and loss_chunk_size (config)."""
  name = 'lm'

  def train_loss(self, model) -> base.LossFn:
    return lm_loss(model, z_loss=self.config.z_loss, model_params=self.model_params,
                   chunk_size=self.config.loss_chunk_size)
