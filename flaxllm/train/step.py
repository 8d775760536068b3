"""The train state and the pure, jittable train and eval steps of a LossFn.

    loss_fn = objective.train_loss(model)     # flaxllm.objectives, e.g. lm.lm_loss(model)
    state = init_state(params, tx, jax.random.PRNGKey(seed))
    train_step = jax.jit(make_train_step(loss_fn, tx, schedule, accum_steps=2), donate_argnums=0)
    state, metrics = train_step(state, batch, frozen)   # batch: dict of [batch, seq] arrays

A batch is a dict of arrays whose layout the objective defines (a language model's: `inputs`,
`targets`, `positions`, `segment_ids`, `loss_mask`). The loss is the token-weighted mean
    loss = sum(CE * loss_mask) / sum(loss_mask)
over the WHOLE batch, also with gradient accumulation: each micro-batch contributes the
gradient of its loss *sum*, and the total is divided once by the batch's token count.

What is trained and what the loss is are both pluggable, as pure functions:
  * `state.params` is the TRAINABLE tree (all params, LoRA adapters, an unfrozen subset, an
    objective's heads); `frozen` is a dict of trees that get no gradient, no optimizer state and
    are not donated (frozen base weights, a distillation teacher); `{}` for plain training.
  * a LossFn `(params, frozen, batch, rng) -> (objective_sum, sums)` (flaxllm.objectives.base)
    returns float32 SUMS over its (micro-)batch; `sums` has 'ce' and 'tokens' (= sum(loss_mask)),
    and every other key k is reported as the metric `sums[k] / tokens` ('ce' as 'loss', 'z' as
    'z_loss').
The steps hold no host-side logic, so sharding only adds `in_shardings`/`out_shardings`.
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from flaxllm.objectives.base import LossFn


@flax.struct.dataclass
class TrainState:
  step: jax.Array       # int32 [], number of updates applied
  params: Any           # the trainable tree
  opt_state: Any
  rng: jax.Array        # uint32 [2], raw PRNG key: dropout of step t uses fold_in(rng, t)


def init_state(params, tx: optax.GradientTransformation, rng) -> TrainState:
  """A fresh state around the trainable `params` (jit or eval_shape this)."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=rng)


def _split_micro(batch, accum_steps: int):
  """[B, ...] -> [accum, B / accum, ...]; micro-batch i takes rows i, i + accum, ... so that
  each micro-batch draws evenly from every data-parallel shard of the batch dimension."""
  def split(x):
    b = x.shape[0]
    return x.reshape(b // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1)
  return jax.tree.map(split, batch)


def grads_and_sums(loss_fn: LossFn, params, frozen, batch, *, accum_steps=1, rng=None):
  """Gradients of the summed objective w.r.t. `params` and the loss sums over the whole batch,
  accumulated over `accum_steps` micro-batches with `lax.scan` (one micro-batch's activations
  live at once)."""
  grad_fn = jax.grad(loss_fn, has_aux=True)
  if accum_steps == 1:
    return grad_fn(params, frozen, batch, rng)

  def body(carry, xs):
    micro, i = xs
    micro_rng = None if rng is None else jax.random.fold_in(rng, i)
    g, s = grad_fn(params, frozen, micro, micro_rng)
    return jax.tree.map(jnp.add, carry, (g, s)), None

  micro_batches = _split_micro(batch, accum_steps)
  sums_shape = jax.eval_shape(lambda b: loss_fn(params, frozen, b, rng)[1],
                              jax.tree.map(lambda x: x[0], micro_batches))
  zeros = (jax.tree.map(jnp.zeros_like, params),
           jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape))
  (grads, sums), _ = jax.lax.scan(body, zeros, (micro_batches, jnp.arange(accum_steps)))
  return grads, sums


def per_token_metrics(sums: dict) -> dict:
  """Metrics of summed losses: 'loss' = ce / tokens, 'z_loss' = z / tokens, k = sums[k] / tokens."""
  tokens = jnp.maximum(sums['tokens'], 1.0)
  names = {'ce': 'loss', 'z': 'z_loss'}
  return {names.get(k, k): v / tokens for k, v in sums.items() if k != 'tokens'}


# ----------------------------------------------------------------------------- steps

def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, schedule: Callable, *,
                    accum_steps: int = 1, skip_nonfinite: bool = False,
                    use_dropout: bool = False, passes: int = 1,
                    minibatches: int = 1) -> Callable:
  """(state, batch, frozen) -> (state, metrics): an optimizer update of `state.params` on a
  token-normalised loss; with `passes` > 1 that many passes over the same batch (GRPO's mu
  passes over one rollout, PPO's epochs), each of `minibatches` updates on as many parts of
  the batch (rows i, i + minibatches, ...), all at the step's learning rate.

  metrics (float32 scalars, the last pass's): loss (mean CE per token), z_loss and any other
  per-token loss of `loss_fn`, grad_norm (before clipping), lr, tokens, and skipped (1 when a
  non-finite update was dropped, with `skip_nonfinite`; the step counter still advances so the
  data stays aligned).
  """
  def update(state: TrainState, batch, frozen, rng):
    grads, sums = grads_and_sums(loss_fn, state.params, frozen, batch,
                                 accum_steps=accum_steps, rng=rng)
    tokens = jnp.maximum(sums['tokens'], 1.0)
    grads = jax.tree.map(lambda g: g / tokens, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = per_token_metrics(sums)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(metrics['loss']) & jnp.isfinite(grad_norm)
    if skip_nonfinite:
      keep_new = lambda new, old: jnp.where(finite, new, old)
      params = jax.tree.map(keep_new, params, state.params)
      opt_state = jax.tree.map(keep_new, opt_state, state.opt_state)
    metrics.update(grad_norm=grad_norm, lr=jnp.asarray(schedule(state.step), jnp.float32),
                   tokens=sums['tokens'],
                   skipped=jnp.where(finite, 0.0, 1.0) if skip_nonfinite else jnp.zeros(()))
    return state.replace(params=params, opt_state=opt_state), metrics

  def train_step(state: TrainState, batch, frozen=None):
    frozen = {} if frozen is None else frozen
    rng = jax.random.fold_in(state.rng, state.step) if use_dropout else None
    if passes == 1 and minibatches == 1:
      state, metrics = update(state, batch, frozen, rng)
    else:
      parts = _split_micro(batch, minibatches)            # [minibatches, rows / minibatches]

      def one_update(s, i):
        part = jax.tree.map(lambda x: x[i % minibatches], parts)
        return update(s, part, frozen, None if rng is None else jax.random.fold_in(rng, i))
      state, metrics = jax.lax.scan(one_update, state, jnp.arange(passes * minibatches))
      metrics = jax.tree.map(lambda m: m[-1], metrics)
    return state.replace(step=state.step + 1), metrics

  return train_step


def make_eval_step(loss_fn: LossFn) -> Callable:
  """(params, batch, frozen) -> the sums of `loss_fn` ('ce', 'tokens' and the objective's
  others), summed over batches and divided once by `evaluate`."""
  def eval_step(params, batch, frozen=None):
    return loss_fn(params, {} if frozen is None else frozen, batch, None)[1]
  return eval_step
