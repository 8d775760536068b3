"""`flaxllm sweep --export-wandb=sweep.yaml`: a W&B sweep file for `wandb sweep` / `wandb agent`.

    flaxllm sweep --config=experiments/lr/sweep.py --export-wandb=sweep.yaml --method=grid
    wandb sweep sweep.yaml            # prints the sweep id
    wandb agent ENTITY/PROJECT/ID     # on any number of machines, in the repository root

The file (W&B's sweep syntax):

    name: lr                          # the sweep's name (also config.wandb.group of its runs)
    project: flaxllm                  # config.wandb.project of the sweep file
    program: flaxllm/cli.py
    method: grid                      # grid | random | bayes
    metric: {name: val_loss, goal: minimize}
    parameters:                       # one per config key, named config.KEY
      config.optim.lr: {values: [0.001, 0.003]}
    command: [${env}, ${interpreter}, -m, flaxllm.cli, train, --config=experiments/lr/sweep.py,
              '--workdir=runs/lr/{wandb_run_id}', --config.wandb.group=lr, ${args}]

The agent runs `python -m flaxllm.cli train ... --config.optim.lr=0.001` (its `${args}`), with
$WANDB_RUN_ID set: `flaxllm train` replaces `{wandb_run_id}` in --workdir by it, so every agent
run has its own workdir, and logs to that W&B run (flaxllm.train.main.resolve_workdir).

Parameters come from the sweep's points, which must then be a grid (every combination of the
values of each key: W&B grids and samplers pick each key independently). For `random` and
`bayes`, the sweep file may instead define `get_wandb_parameters(arg)`, a dict of W&B parameter
specs such as `{'config.optim.lr': {'distribution': 'log_uniform_values', 'min': 1e-4,
'max': 1e-2}}`.
Sweeps whose keys move together (IsoFLOP grids: steps depend on the model size) cannot be
expressed in W&B; they run with `flaxllm sweep`.
"""
from __future__ import annotations

import itertools
import json
from typing import Any

import yaml

from flaxllm import config as config_lib
from flaxllm.models.config import ConfigError
from flaxllm.sweeps import runner as runner_lib
from flaxllm.sweeps import spec as spec_lib
from flaxllm.train.main import RUN_ID_PLACEHOLDER

METHODS = ('grid', 'random', 'bayes')


def _plain(value: Any) -> Any:
  """Tuples as lists (YAML/JSON values the agent passes back as `[1, 2]`)."""
  return json.loads(json.dumps(value))


def grid_parameters(points: list[dict]) -> dict[str, dict]:
  """{'config.KEY': {'values': [...]}} of a sweep that is a full grid, else a ConfigError."""
  overrides = [spec_lib.overrides(p) for p in points]
  keys = list(dict.fromkeys(k for o in overrides for k in o))
  values = {k: [] for k in keys}
  for o in overrides:
    for k in keys:
      if k not in o:
        raise ConfigError(f'sweep key {k!r} is not set in every point, so the sweep is not a grid '
                          'that W&B can express; set it in every point or run flaxllm sweep.')
      if _plain(o[k]) not in values[k]:
        values[k].append(_plain(o[k]))
  combos = {json.dumps([_plain(o[k]) for k in keys]) for o in overrides}
  full = {json.dumps(list(c)) for c in itertools.product(*values.values())}
  if combos != full or len(overrides) != len(full):
    raise ConfigError(
        f'the sweep\'s {len(overrides)} points are not every combination of its keys\' values '
        f'({len(full)} would be), which a W&B sweep cannot express; run it with flaxllm sweep, '
        'or define get_wandb_parameters(arg) in the sweep file.')
  return {f'config.{k}': {'values': v} for k, v in values.items()}


def sweep_file(sweep: runner_lib.Sweep, *, name: str, workdir_root: str, method: str = 'grid',
               metric: str = 'val_loss') -> dict:
  """The W&B sweep configuration (a dict; `export` writes it as YAML)."""
  if method not in METHODS:
    raise ConfigError(f'--method={method!r} is not a W&B sweep method; use one of {METHODS}.')
  path, _, arg = sweep.spec.partition(':')
  module = runner_lib.load_module(path)
  base = config_lib.load_config(sweep.spec, sweep.common)
  if method != 'grid' and hasattr(module, 'get_wandb_parameters'):
    parameters = dict(module.get_wandb_parameters(arg or None))
    known = {k for k, _ in config_lib.flat_items(base)}
    for key in parameters:
      if not key.startswith('config.') or key[len('config.'):] not in known:
        raise ConfigError(f'get_wandb_parameters in {path} names {key!r}, which is not '
                          "'config.' + a config key; name parameters like config.optim.lr.")
  else:
    parameters = grid_parameters(sweep.points)
  command = ['${env}', '${interpreter}', '-m', 'flaxllm.cli', 'train', f'--config={sweep.spec}',
             f'--workdir={workdir_root.rstrip("/")}/{RUN_ID_PLACEHOLDER}',
             f'--config.wandb.group={name}', *sweep.common, '${args}']
  return {'name': name, 'project': base.wandb.project, 'program': 'flaxllm/cli.py',
          'method': method, 'metric': {'name': metric, 'goal': 'minimize'},
          'parameters': parameters, 'command': command}


def export(sweep: runner_lib.Sweep, path: str, **kw) -> dict:
  """Writes the W&B sweep file of `sweep` to `path` (YAML) and returns it."""
  data = sweep_file(sweep, **kw)
  with open(path, 'w') as f:
    f.write(f'# W&B sweep of {sweep.spec}: wandb sweep {path}; then wandb agent <sweep id> in the '
            'flaxllm repository root.\n')
    yaml.safe_dump(data, f, sort_keys=False, default_flow_style=False, width=100)
  return data
