"""Optimizers and learning-rate schedules, chosen by name from `config.optim` / `config.schedule`.

    tx = make_optimizer(config, params)    # clip -> {adamw | adam | sgd | lion} with the schedule

The weight-decay mask is a list of regexes over `/`-joined parameter paths
(`decoder/layers_0/attn_norm/scale`): a parameter whose path matches any of
`config.optim.wd_exclude` is not decayed (default: norms, biases, embeddings).
"""
from __future__ import annotations

import math
import re
from typing import Callable, Sequence

import jax.numpy as jnp
import optax
from ml_collections import ConfigDict

from flaxllm.models import params as params_lib
from flaxllm.models.config import ConfigError, require


# ----------------------------------------------------------------------------- schedules

def _warmup(step, warmup_steps: int):
  """Linear warmup reaching 1 at the last warmup step: (step + 1) / warmup_steps."""
  if warmup_steps <= 0:
    return 1.0
  return jnp.minimum(1.0, (step + 1.0) / warmup_steps)


def _cosine(progress, end):
  return end + (1.0 - end) * 0.5 * (1.0 + jnp.cos(math.pi * progress))


def _linear(progress, end):
  return 1.0 - (1.0 - end) * progress


SCHEDULES: dict[str, Callable] = {
    'cosine': _cosine,
    'linear': _linear,
    'constant': lambda progress, end: jnp.ones_like(progress),
    'rsqrt': None,  # decays with 1/sqrt(step) after warmup, not with progress (see below)
}


def make_schedule(name: str, *, lr: float, total_steps: int, warmup_steps: int = 0,
                  end_lr_frac: float = 0.0) -> Callable:
  """step (0-based update count) -> learning rate.

  lr(step) = lr * warmup(step) * decay(step), where warmup = min(1, (step+1)/warmup_steps) and
  decay, over progress p = clip((step - warmup_steps) / (total_steps - warmup_steps), 0, 1), is
    cosine:   end + (1 - end) * (1 + cos(pi p)) / 2
    linear:   1 - (1 - end) * p
    constant: 1
    rsqrt:    sqrt(w / max(step + 1, w)) with w = max(warmup_steps, 1)
  with end = end_lr_frac.
  """
  if name not in SCHEDULES:
    raise ValueError(f'schedule.name={name!r} is not known; choose one of {tuple(SCHEDULES)}.')
  decay_fn = SCHEDULES[name]

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    if name == 'rsqrt':
      w = float(max(warmup_steps, 1))
      decay = jnp.sqrt(w / jnp.maximum(step + 1.0, w))
    else:
      span = max(total_steps - warmup_steps, 1)
      progress = jnp.clip((step - warmup_steps) / span, 0.0, 1.0)
      decay = decay_fn(progress, end_lr_frac)
    return lr * _warmup(step, warmup_steps) * decay

  return schedule


def schedule_section() -> ConfigDict:
  """`config.schedule`: warmup, then one of SCHEDULES."""
  c = ConfigDict()
  c.name = 'cosine'                # after warmup: 'cosine' | 'linear' | 'constant' | 'rsqrt'
  c.warmup_steps = 100
  c.end_lr_frac = 0.1              # cosine/linear: final lr = lr * end_lr_frac
  return c


def schedule_from_config(config) -> Callable:
  s = config.schedule
  return make_schedule(s.name, lr=config.optim.lr, total_steps=config.total_steps,
                       warmup_steps=s.warmup_steps, end_lr_frac=s.end_lr_frac)


# ----------------------------------------------------------------------------- weight decay mask

def decay_mask(params, exclude: Sequence[str]):
  """A pytree of bools like `params`: True where weight decay applies, i.e. where the
  `/`-joined path matches none of the `exclude` regexes (re.search)."""
  patterns = [re.compile(p) for p in exclude]
  flat = params_lib.flatten(params)
  mask = {path: not any(p.search(path) for p in patterns) for path in flat}
  return params_lib.unflatten(mask)


# ----------------------------------------------------------------------------- optimizers

def _adamw(o, lr, mask):
  return optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=mask)


def _adam(o, lr, mask):
  del mask
  return optax.adam(lr, b1=o.b1, b2=o.b2, eps=o.eps)


def _sgd(o, lr, mask):
  return optax.chain(optax.add_decayed_weights(o.weight_decay, mask),
                     optax.sgd(lr, momentum=o.b1 or None))


def _lion(o, lr, mask):
  return optax.lion(lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=mask)


OPTIMIZERS: dict[str, Callable] = {'adamw': _adamw, 'adam': _adam, 'sgd': _sgd, 'lion': _lion}


def optim_section() -> ConfigDict:
  """`config.optim`: global-norm clipping, then one of OPTIMIZERS."""
  c = ConfigDict()
  c.name = 'adamw'                 # 'adamw' | 'adam' | 'sgd' | 'lion'
  c.lr = 1e-3                      # peak learning rate
  c.b1 = 0.9
  c.b2 = 0.95
  c.eps = 1e-8
  c.weight_decay = 0.1
  # Regexes over `/`-joined param paths (re.search): matching params get NO weight decay.
  c.wd_exclude = (r'norm/', r'bias$', r'embedding$')
  c.grad_clip = 1.0                # global-norm clipping; 0 = off
  c.accum_steps = 1                # micro-batches per step (lax.scan; per-token normalisation)
  return c


def check_sections(config) -> None:
  """ConfigError (one sentence) for `config.optim` / `config.schedule` values that cannot work
  (positivity of the numbers is checked with the run's keys)."""
  o, s = config.optim, config.schedule
  require(o.name in OPTIMIZERS, f'optim.name={o.name!r} is not a known optimizer; choose one of '
                                f'{tuple(OPTIMIZERS)}.')
  require(s.name in SCHEDULES, f'schedule.name={s.name!r} is not a known schedule; choose one '
                               f'of {tuple(SCHEDULES)}.')
  require(0.0 <= o.b1 < 1.0 and 0.0 <= o.b2 < 1.0,
          f'optim.b1={o.b1} and optim.b2={o.b2} must be in [0, 1); use e.g. 0.9 and 0.95.')
  require(0.0 <= s.end_lr_frac <= 1.0,
          f'schedule.end_lr_frac={s.end_lr_frac} must be in [0, 1]; use e.g. 0.1.')
  require(s.warmup_steps <= config.total_steps,
          f'schedule.warmup_steps={s.warmup_steps} exceeds total_steps={config.total_steps}; '
          'lower the warmup or raise total_steps.')
  for pattern in o.wd_exclude:
    try:
      re.compile(pattern)
    except re.error as e:
      raise ConfigError(f'optim.wd_exclude pattern {pattern!r} is not a valid regex ({e}); fix '
                        'or remove it.') from e
  require(config.batch_size % o.accum_steps == 0,
          f'batch_size={config.batch_size} is not divisible by optim.accum_steps='
          f'{o.accum_steps}; make batch_size a multiple of accum_steps.')


def make_optimizer(config, params) -> optax.GradientTransformation:
  """Gradient clipping (optional) followed by the named optimizer with the configured schedule."""
  o = config.optim
  if o.name not in OPTIMIZERS:
    raise ValueError(f'optim.name={o.name!r} is not known; choose one of {tuple(OPTIMIZERS)}.')
  mask = decay_mask(params, o.wd_exclude)
  parts = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
  parts.append(OPTIMIZERS[o.name](o, schedule_from_config(config), mask))
  return optax.chain(*parts)
