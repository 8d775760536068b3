"""lm-evaluation-harness tasks inside `flaxllm train`: the `eval_tasks` config section.

    --config.eval_tasks.tasks=flaxllm_stdlib_docname --config.eval_tasks.limit=100

`flaxllm train` (flaxllm.train.main) turns a config whose `eval_tasks.tasks` is set into a
trainer hook (`hook(config)`): at each evaluation of the run (every `eval_every` steps, or every
`eval_tasks.every` steps, a multiple of it, and at the end) the hook scores the tasks on the
current params (adapters merged) through the `flaxllm` backend (flaxllm.evaluation.harness) and
returns their metrics as `harness/<task>/<metric>`, which the trainer logs with the validation
metrics (metrics.jsonl, W&B). The trainer knows nothing of lm-eval: it only calls its hooks.

The harness shares no state with training: it reads the params, draws from no training RNG or
data iterator, and the global `random` / `numpy.random` seeds lm-eval sets are restored
afterwards, so a resumed run logs the same losses and the same task metrics as one that was
never interrupted.

This module owns the section: `config_section()` is its defaults (flaxllm.config's base_config
holds the same plain values, as the config cannot import this layer) and `check_section(config)`
its checks, run by `flaxllm train` before anything is compiled.
"""
from __future__ import annotations

import logging
import math
import os
import random
from typing import Callable

import numpy as np
from ml_collections import ConfigDict

from flaxllm.evaluation import tasks as task_lib
from flaxllm.models.config import ConfigError

SECTION = 'eval_tasks'


def config_section() -> ConfigDict:
  """The `eval_tasks` section's defaults: no tasks (nothing runs)."""
  return ConfigDict(dict(
      tasks=(),          # lm-eval task, group or tag names, e.g. ('flaxllm_stdlib_docname',)
      num_fewshot=0,     # in-context examples per prompt
      limit=0,           # documents per task; 0 = all
      every=0,           # steps between harness evaluations (a multiple of eval_every);
      #                    0 = at each evaluation. Always at the end of the run.
      batch_size=8))     # rows per compiled call of the backend


def check_section(config) -> None:
  """One-sentence ConfigErrors for a bad `eval_tasks` section (numbers first, then the task
  names, which needs lm-eval's index)."""
  section = config[SECTION]
  for key in ('num_fewshot', 'limit', 'every', 'batch_size'):
    value = section[key]
    ok = isinstance(value, int) and not isinstance(value, bool) and (
        value > 0 if key == 'batch_size' else value >= 0)
    if not ok:
      what = 'positive' if key == 'batch_size' else 'an integer of 0 or more'
      raise ConfigError(f'{SECTION}.{key} must be {what}, got {value!r}; set '
                        f'--config.{SECTION}.{key}=<number>.')
  if not section.tasks:
    return
  if section.every and config.eval_every and section.every % config.eval_every:
    raise ConfigError(f'{SECTION}.every={section.every} is not a multiple of '
                      f'eval_every={config.eval_every} (the tasks run at evaluations); use a '
                      'multiple, or 0 for every evaluation.')
  try:
    manager = task_lib.task_manager()
  except ModuleNotFoundError as e:
    if (e.name or '').split('.')[0] != 'lm_eval':
      raise
    raise ConfigError(f"{SECTION}.tasks needs lm-evaluation-harness: pip install "
                      "'lm-eval==0.4.13' (or pip install -e '.[dev]').") from None
  unknown = [name for name in section.tasks if name not in manager.all_tasks]
  if unknown:
    raise ConfigError(f'{SECTION}.tasks has unknown task {unknown[0]!r}; flaxllm\'s tasks are '
                      f'{", ".join(task_lib.local_tasks(manager))} (and lm-eval\'s catalogue: lm-eval '
                      'ls tasks).')


def metrics_of(results: dict) -> dict:
  """`harness/<task>/<metric>` of lm-eval's results (the filter appended when it is not
  'none'; standard errors and non-numbers left out)."""
  out = {}
  for task, values in sorted((results.get('results') or {}).items()):
    for key, value in values.items():
      metric, _, filt = key.partition(',')
      if (not filt or metric.endswith('_stderr') or isinstance(value, bool)
          or not isinstance(value, (int, float))):
        continue
      name = metric if filt == 'none' else f'{metric}_{filt}'
      out[f'harness/{task}/{name}'] = float(value) if math.isfinite(value) else float('nan')
  return out


def hook(config) -> Callable[[int, Callable, object], dict]:
  """The trainer hook of `config.eval_tasks` (checked): (step, plain_params_fn, tokenizer) ->
  the tasks' metrics at the steps it runs (else {})."""
  check_section(config)
  section = config[SECTION]
  tasks, every, total = list(section.tasks), int(section.every), int(config.total_steps)
  model_cfg = None

  def run(step: int, plain_params: Callable, tokenizer) -> dict:
    nonlocal model_cfg
    if every and step % every and step != total:
      return {}
    import lm_eval  # pylint: disable=import-outside-toplevel -- heavy, optional: only with eval_tasks
    from flaxllm import models  # pylint: disable=import-outside-toplevel -- only when it runs
    from flaxllm.evaluation import harness  # pylint: disable=import-outside-toplevel -- imports lm_eval
    if model_cfg is None:
      model_cfg = models.ModelConfig.from_dict(config.model)
    if not os.environ.get('FLAXLLM_DEBUG'):
      logging.getLogger('lm_eval').setLevel(logging.ERROR)
    lm = harness.FlaxLM(model_cfg=model_cfg, params=plain_params(), tokenizer=tokenizer,
                        batch_size=int(section.batch_size))
    saved = random.getstate(), np.random.get_state()   # lm-eval seeds the global generators
    try:
      results = lm_eval.simple_evaluate(
          model=lm, tasks=tasks, num_fewshot=int(section.num_fewshot),
          limit=int(section.limit) or None, task_manager=task_lib.task_manager(),
          log_samples=False,
          bootstrap_iters=0, verbosity='ERROR')   # no standard errors: not logged
    finally:
      random.setstate(saved[0])
      np.random.set_state(saved[1])
    return metrics_of(results or {})

  return run
