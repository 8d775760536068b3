"""Sweep definitions: lists of override dicts, built with small helpers.

A sweep is a list of *points*; a point is a dict of config overrides (dotted keys, as on the
command line without `--config.`) plus optional metadata keys starting with `_` that are
recorded with the run but not applied to the config (`_name`: the point's run name and
workdir; `_budget`: its nominal compute budget in FLOPs):

    product({'optim.lr': [1e-3, 3e-3]}, {'seed': [0, 1]})        # 4 points
    zip_({'model.num_layers': [2, 4]}, {'model.d_model': [64, 128]})  # 2 points, paired
    chain(sweep_a, sweep_b)                                       # a, then b

`shape_for_params(model, n)` is the size knob: the decoder shape (depth *and* width grown
together at a fixed width/depth ratio) whose non-embedding parameter count is closest to `n`.
`isoflop(config, budgets, sizes)` lays out a Chinchilla IsoFLOP grid: for each compute budget
C and model size N, D = C / (6 N) tokens and a learning-rate schedule as long as those tokens.
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Iterable, Mapping, Sequence

from flaxllm import models
from flaxllm.models.config import ConfigError

Point = dict[str, Any]
# What the helpers accept as a factor: a list of points, or {key: [values]} (one axis per key).
Factor = Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]]


def _points(factor: Factor) -> list[Point]:
  """A factor as a list of points; a {key: values} dict is the product of its axes."""
  if isinstance(factor, Mapping):
    keys = list(factor)
    for key in keys:
      if isinstance(factor[key], (str, bytes)) or not isinstance(factor[key], Iterable):
        raise ConfigError(f'sweep axis {key!r} must be a list of values, got '
                          f'{factor[key]!r}; write {{{key!r}: [{factor[key]!r}]}}.')
    return [dict(zip(keys, values)) for values in itertools.product(*factor.values())]
  return [dict(p) for p in factor]


def _merge(parts: Sequence[Point]) -> Point:
  out: Point = {}
  for part in parts:
    for key, value in part.items():
      if key in out and out[key] != value:
        raise ConfigError(f'sweep key {key!r} is set by two factors ({out[key]!r} and '
                          f'{value!r}); set each key in only one factor.')
      out[key] = value
  return out


def product(*factors: Factor) -> list[Point]:
  """Every combination of one point from each factor (the first factor varies slowest)."""
  return [_merge(parts) for parts in itertools.product(*map(_points, factors))]


def zip_(*factors: Factor) -> list[Point]:
  """The i-th points of all factors merged; the factors must have the same length."""
  lists = [_points(f) for f in factors]
  if len({len(l) for l in lists}) > 1:
    raise ConfigError(f'zip_ needs factors of equal length, got {[len(l) for l in lists]}; '
                      'give every factor the same number of values.')
  return [_merge(parts) for parts in zip(*lists)]


def chain(*factors: Factor) -> list[Point]:
  """The points of each factor, one factor after the other."""
  return [p for f in factors for p in _points(f)]


def overrides(point: Mapping[str, Any]) -> dict[str, Any]:
  """The config overrides of a point (its keys without the `_` metadata)."""
  return {k: v for k, v in point.items() if not k.startswith('_')}


# ----------------------------------------------------------------------------- size knob

def _model_with(model_cfg, shape: Mapping[str, Any]) -> models.ModelConfig:
  base = models.ModelConfig.from_dict(model_cfg)
  return base.replace(**{k.split('.', 1)[1]: v for k, v in shape.items()})


def shape(depth: int, width: int, *, head_dim: int = 16, mlp_ratio: float = 8 / 3,
          multiple_of: int = 8) -> dict[str, int]:
  """Overrides for a decoder of `depth` layers and residual width `width` (a multiple of
  head_dim): heads = width / head_dim (no GQA), mlp_dim = mlp_ratio * width rounded up to a
  multiple of `multiple_of` (8/3 keeps SwiGLU's MLP at the FLOPs of a 4x GELU MLP)."""
  heads = width // head_dim
  mlp = multiple_of * math.ceil(mlp_ratio * width / multiple_of)
  return {'model.num_layers': depth, 'model.d_model': width, 'model.num_heads': heads,
          'model.num_kv_heads': heads, 'model.head_dim': head_dim, 'model.mlp_dim': mlp}


def shape_for_params(model_cfg, n_params: float, *, aspect: float = 32.0, head_dim: int = 16,
                     mlp_ratio: float = 8 / 3) -> dict[str, int]:
  """The size knob: overrides giving ~`n_params` NON-embedding parameters with width/depth
  close to `aspect` (Kaplan et al.: loss depends weakly on the shape near a fixed ratio).

  A LLaMA block has ~(4 + 3 * mlp_ratio) d^2 = 12 d^2 weights, so N ~ 12 aspect^2 L^3: the
  depth L is rounded from that, then the width (a multiple of head_dim) that brings the exact
  count (`models.param_count` of `model_cfg` with this shape) closest to `n_params` in log.
  """
  if n_params <= 0:
    raise ConfigError(f'a model size must be a positive parameter count, got {n_params!r}.')
  per_layer = 4 + 3 * mlp_ratio
  depth = max(1, round((n_params / (per_layer * aspect ** 2)) ** (1 / 3)))
  best, best_err = None, math.inf
  width = head_dim
  while True:
    candidate = shape(depth, width, head_dim=head_dim, mlp_ratio=mlp_ratio)
    n = models.param_count(_model_with(model_cfg, candidate))['non_embedding']
    err = abs(math.log(n / n_params))
    if err < best_err:
      best, best_err = candidate, err
    if n > n_params:
      return best
    width += head_dim


# ----------------------------------------------------------------------------- IsoFLOP grids

def human(x: float) -> str:
  """3e12 -> '3e12', 120000 -> '120k', 2.5e6 -> '2.5M' (point names, table cells)."""
  for scale, suffix in ((1e9, 'G'), (1e6, 'M'), (1e3, 'k')):
    if 1 <= x / scale < 1000:
      return f'{x / scale:.3g}{suffix}'
  if x >= 1e12:
    mantissa, exponent = f'{x:.2g}'.split('e')
    return f'{mantissa}e{int(exponent)}'
  return f'{x:.3g}'


def model_counts(config, point: Mapping[str, Any]) -> dict[str, float]:
  """N (total and non-embedding) and training FLOPs per token of `config` with a point's
  model overrides: {'params', 'params_non_embedding', 'flops_per_token'}."""
  model_keys = {k: v for k, v in overrides(point).items() if k.startswith('model.')}
  cfg = _model_with(config.model, model_keys)
  counts = models.param_count(cfg)
  seq_len = overrides(point).get('seq_len', config.seq_len)
  return {'params': counts['total'], 'params_non_embedding': counts['non_embedding'],
          'flops_per_token': models.flops_per_token(cfg, seq_len)}


def isoflop(config, budgets: Sequence[float], sizes: Sequence[float], *, flops: str = '6nd',
            aspect: float = 32.0, head_dim: int = 16, min_steps: int = 50,
            warmup_frac: float = 0.05, evals: int = 4, checkpoints: int = 4) -> list[Point]:
  """An IsoFLOP sweep: for every budget C (FLOPs) and size N (target non-embedding params,
  shaped by `shape_for_params`), a run of D = C / (6 N_total) tokens (flops='6nd', Chinchilla's
  count) or D = C / flops_per_token (flops='exact', the attention term included).

  Each point sets the model shape, total_steps = round(D / (batch_size * seq_len)) with a
  warmup of `warmup_frac` of it (so the cosine schedule ends at the token budget), `evals`
  evaluations and `checkpoints` checkpoints over the run. Metadata: `_name` ('C1e12_N60k'),
  `_budget` (C) and `_size` (the target N). Sizes that get fewer than `min_steps` steps of a
  budget are left out of it; a budget too small even for the smallest size is an error.
  """
  if flops not in ('6nd', 'exact'):
    raise ConfigError(f"isoflop flops={flops!r} is not known; use '6nd' or 'exact'.")
  if not budgets or not sizes:
    raise ConfigError('isoflop needs at least one budget and one size; give both lists.')
  tokens_per_step = config.batch_size * config.seq_len
  shapes = [(n, shape_for_params(config.model, n, aspect=aspect, head_dim=head_dim))
            for n in sorted(sizes)]
  points = []
  for budget in sorted(budgets):
    fitting = []
    for n, model_shape in shapes:
      counts = model_counts(config, model_shape)
      per_token = 6 * counts['params'] if flops == '6nd' else counts['flops_per_token']
      steps = round(budget / per_token / tokens_per_step)
      if steps < min_steps:
        if n == shapes[0][0]:
          need = min_steps * tokens_per_step * per_token
          raise ConfigError(
              f'compute budget C={budget:.3g} FLOPs gives the smallest model (N={human(n)}) '
              f'only {steps} steps of {tokens_per_step} tokens (min_steps={min_steps}); raise '
              f'the budget to at least {need:.3g} FLOPs or use smaller models.')
        continue
      fitting.append({
          **model_shape,
          'total_steps': steps,
          'schedule.warmup_steps': max(1, round(warmup_frac * steps)),
          'eval_every': max(1, steps // evals),
          'ckpt_every': max(1, math.ceil(steps / checkpoints)),
          '_name': f'C{human(budget)}_N{human(n)}',
          '_budget': float(budget),
          '_size': float(n),
      })
    points += fitting
  return points
