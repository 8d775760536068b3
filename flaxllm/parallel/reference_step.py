"""A minimal language-model train step (next-token cross-entropy, AdamW) for the parallel
tests, the AOT memory check and the benchmark -- a stand-in until `flaxllm.train` provides
the real one, which plugs into the same `create_sharded` / `compile_aot` calls.

State is a plain dict {'step', 'params', 'opt_state'}; a batch is {'tokens': int32 [b, s+1]}.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from flaxllm.parallel import rules as rules_lib
from flaxllm.parallel import sharding as sharding_lib


def make_optimizer(lr: float = 1e-3, weight_decay: float = 0.1) -> optax.GradientTransformation:
  return optax.adamw(lr, b1=0.9, b2=0.95, weight_decay=weight_decay)


def make_init(model: nn.Module, tx: optax.GradientTransformation, seq_len: int = 8):
  """init(rng) -> state; params unboxed (shard with `param_specs=rules.param_specs(model)`)."""

  def init(rng):
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    params = sharding_lib.unbox(model.init(rng, tokens)['params'])
    return {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params)}

  return init


def loss_fn(model: nn.Module, params, tokens):
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  logits = model.apply({'params': params}, inputs)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  return losses.mean()


def make_train_step(model: nn.Module, tx: optax.GradientTransformation):
  """step(state, batch) -> (state, {'loss': scalar})."""

  def step(state, batch):
    loss, grads = jax.value_and_grad(lambda p: loss_fn(model, p, batch['tokens']))(
        state['params'])
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    return {'step': state['step'] + 1, 'params': params, 'opt_state': opt_state}, {'loss': loss}

  return step


def jit_train_step(model, tx, mesh, rules, state_shardings, donate: bool = True):
  """The step jitted for `mesh`: state in/out with `state_shardings`, batch over data axes."""
  step = make_train_step(model, tx)
  rules = rules_lib.get_rules(rules)
  batch_sh = {'tokens': rules_lib.batch_sharding(mesh, rules, ndim=2)}
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def wrapped(state, batch):
    with sharding_lib.step_context(mesh, rules):  # activation constraints while tracing
      return step(state, batch)

  return jax.jit(wrapped, in_shardings=(state_shardings, batch_sh),
                 out_shardings=(state_shardings, {'loss': replicated}),
                 donate_argnums=(0,) if donate else ())


def setup(model, tx, mesh, rules, rng, seq_len: int = 8):
  """(state, shardings, jitted step) on `mesh`."""
  init = make_init(model, tx, seq_len)
  state, shardings = sharding_lib.create_sharded(
      init, mesh, rules, rng, param_specs=rules_lib.param_specs(model))
  return state, shardings, jit_train_step(model, tx, mesh, rules, shardings)
