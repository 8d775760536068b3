"""The train state and the pure, jittable train and eval steps.

    state = jax.jit(functools.partial(init_state, model, tx))(jax.random.PRNGKey(seed))
    train_step = jax.jit(make_train_step(model, tx, schedule, accum_steps=2), donate_argnums=0)
    state, metrics = train_step(state, batch)   # batch: dict of [batch, seq] arrays

A batch holds `inputs`, `targets`, `positions`, `segment_ids` and `loss_mask` (the layout of
`flaxllm.data.make_iterator`). The loss is the token-weighted mean
    loss = sum(CE * loss_mask) / sum(loss_mask)
over the WHOLE batch, also with gradient accumulation: each micro-batch contributes the
gradient of its loss *sum*, and the total is divided once by the batch's token count.
The steps hold no host-side logic, so sharding only adds `in_shardings`/`out_shardings`.
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from flaxllm import models

BATCH_KEYS = ('inputs', 'targets', 'positions', 'segment_ids', 'loss_mask')


@flax.struct.dataclass
class TrainState:
  step: jax.Array       # int32 [], number of updates applied
  params: Any
  opt_state: Any
  rng: jax.Array        # uint32 [2], raw PRNG key: dropout of step t uses fold_in(rng, t)


def init_state(model: nn.Module, tx: optax.GradientTransformation, rng) -> TrainState:
  """A fresh state (jit or eval_shape this)."""
  params_rng, state_rng = jax.random.split(rng)
  params = models.init_params(model, params_rng)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=state_rng)


# ----------------------------------------------------------------------------- losses

def cross_entropy(logits, targets):
  """Per-token (CE, logsumexp) in float32: CE = logsumexp(logits) - logits[target]."""
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return lse - target_logit, lse


def loss_sums(model: nn.Module, params, batch, *, z_loss: float = 0.0, dropout_rng=None):
  """(objective sum, aux sums) of one (micro-)batch; the objective is
  sum(mask * (CE + z_loss * logsumexp^2)), aux = {'ce', 'z', 'tokens'} sums."""
  rngs = {'dropout': dropout_rng} if dropout_rng is not None else None
  logits = model.apply({'params': params}, batch['inputs'], batch['positions'],
                       batch['segment_ids'], rngs=rngs)
  ce, lse = cross_entropy(logits, batch['targets'])
  mask = batch['loss_mask'].astype(jnp.float32)
  sums = {'ce': jnp.sum(ce * mask), 'z': jnp.sum(jnp.square(lse) * mask),
          'tokens': jnp.sum(mask)}
  objective = sums['ce'] + z_loss * sums['z'] if z_loss else sums['ce']
  return objective, sums


def _split_micro(batch, accum_steps: int):
  """[B, ...] -> [accum, B / accum, ...]; micro-batch i takes rows i, i + accum, ... so that
  each micro-batch draws evenly from every data-parallel shard of the batch dimension."""
  def split(x):
    b = x.shape[0]
    return x.reshape(b // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1)
  return jax.tree.map(split, batch)


def grads_and_sums(model, params, batch, *, accum_steps=1, z_loss=0.0, dropout_rng=None):
  """Gradients of the summed objective and the loss sums over the whole batch, accumulated
  over `accum_steps` micro-batches with `lax.scan` (one micro-batch's activations live at once)."""
  grad_fn = jax.grad(lambda p, b, r: loss_sums(model, p, b, z_loss=z_loss, dropout_rng=r),
                     has_aux=True)
  if accum_steps == 1:
    return grad_fn(params, batch, dropout_rng)

  def body(carry, xs):
    grads, sums = carry
    micro, i = xs
    rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, i)
    g, s = grad_fn(params, micro, rng)
    return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, sums, s)), None

  zeros = (jax.tree.map(jnp.zeros_like, params),
           {'ce': jnp.zeros(()), 'z': jnp.zeros(()), 'tokens': jnp.zeros(())})
  (grads, sums), _ = jax.lax.scan(body, zeros,
                                  (_split_micro(batch, accum_steps), jnp.arange(accum_steps)))
  return grads, sums


# ----------------------------------------------------------------------------- steps

def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    schedule: Callable, *, accum_steps: int = 1, z_loss: float = 0.0,
                    skip_nonfinite: bool = False, use_dropout: bool = False) -> Callable:
  """(state, batch) -> (state, metrics): one optimizer update on a token-normalised loss.

  metrics (float32 scalars): loss (mean CE per token), z_loss (mean logsumexp^2), grad_norm
  (before clipping), lr, tokens, and skipped (1 when a non-finite update was dropped, with
  `skip_nonfinite`; the step counter still advances so the data stays aligned).
  """
  def train_step(state: TrainState, batch):
    dropout_rng = jax.random.fold_in(state.rng, state.step) if use_dropout else None
    grads, sums = grads_and_sums(model, state.params, batch, accum_steps=accum_steps,
                                 z_loss=z_loss, dropout_rng=dropout_rng)
    tokens = jnp.maximum(sums['tokens'], 1.0)
    grads = jax.tree.map(lambda g: g / tokens, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    loss = sums['ce'] / tokens
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if skip_nonfinite:
      keep_new = lambda new, old: jnp.where(finite, new, old)
      params = jax.tree.map(keep_new, params, state.params)
      opt_state = jax.tree.map(keep_new, opt_state, state.opt_state)
    metrics = {'loss': loss, 'z_loss': sums['z'] / tokens, 'grad_norm': grad_norm,
               'lr': jnp.asarray(schedule(state.step), jnp.float32), 'tokens': sums['tokens'],
               'skipped': jnp.where(finite, 0.0, 1.0) if skip_nonfinite else jnp.zeros(())}
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  return train_step


def make_eval_step(model: nn.Module) -> Callable:
  """(params, batch) -> {'ce': summed CE over masked tokens, 'tokens': their count}."""
  def eval_step(params, batch):
    _, sums = loss_sums(model, params, batch)
    return {'ce': sums['ce'], 'tokens': sums['tokens']}
  return eval_step
