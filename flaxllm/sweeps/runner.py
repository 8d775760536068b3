"""The local sweep runner: every point a normal `flaxllm train` run in its own workdir.

    sweep = load_sweep('experiments/scaling/sweep.py')       # validates every point first
    statuses = run_sweep(sweep, 'runs/scaling', workers=2)

A sweep file is a config file (`get_config(arg)`, the base training config) that also defines
`get_sweep(arg) -> list of points` (see flaxllm.sweeps.spec); both get the text after `:`.

The sweep directory holds `sweep.json` (the definition), one workdir per point named after it,
and `results.jsonl` (one line per finished point, see `point_result`). Each workdir holds
`point.json`, written atomically: the point's overrides, its `status` ('running', 'complete',
'failed' with the `error`, 'interrupted'), wall time and, once complete, its result.

Points run as subprocesses (`python -m flaxllm.cli train ...`, output in `<workdir>/train.log`),
`workers` at a time, each a W&B run named after its point in the group `wandb.group` (default:
the sweep directory's name). Running the sweep again skips complete points (and failed ones,
unless `retry_failed`) and resumes the others from their newest checkpoint. A killed sweep
(also `kill -9`) takes its runs down with it: they get SIGTERM and save a checkpoint first.
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from typing import Any, Callable, NamedTuple, Sequence

from flaxllm import config as config_lib
from flaxllm import rundir
from flaxllm.models.config import ConfigError
from flaxllm.sweeps import spec as spec_lib
from flaxllm.train import metrics as metrics_lib

SWEEP_FILE = 'sweep.json'
POINT_FILE = rundir.SWEEP_POINT_FILE
RESULTS_FILE = 'results.jsonl'
LOG_FILE = rundir.SWEEP_LOG_FILE
LOCK_FILE = '.sweep.lock'


class Sweep(NamedTuple):
  spec: str                  # the sweep file and its variant, 'experiments/scaling/sweep.py:x=1'
  points: list[dict]         # every point with its unique `_name`
  common: tuple[str, ...]    # '--config.k=v' overrides applied to every point (before its own)


# ----------------------------------------------------------------------------- definitions

def load_module(path: str):
  if not path.endswith('.py') or not os.path.isfile(path):
    raise ConfigError(f'sweep file {path!r} does not exist; pass --config=path/to/sweep.py.')
  module_spec = importlib.util.spec_from_file_location('flaxllm_sweep_file', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def _arg_text(key: str, value: Any) -> str:
  """'--config.k=v' with `v` written so that flaxllm.config parses it back to `value`."""
  return f'--config.{key}={value if isinstance(value, str) else repr(value)}'


def point_args(point: dict) -> list[str]:
  return [_arg_text(k, v) for k, v in spec_lib.overrides(point).items()]


def _default_name(index: int, point: dict) -> str:
  parts = [f'{k.rsplit(".", 1)[-1]}={v}' for k, v in spec_lib.overrides(point).items()]
  return f'{index:03d}_' + '_'.join(parts)


def load_sweep(spec: str, common: Sequence[str] = ()) -> Sweep:
  """The points of a sweep file, each validated as a full config (a wrong key or value is a
  ConfigError naming the point) before anything runs."""
  path, _, arg = spec.partition(':')
  module = load_module(path)
  if not hasattr(module, 'get_sweep'):
    raise ConfigError(f'{path} has no get_sweep(arg) function; define one that returns the list '
                      'of override dicts (see flaxllm.sweeps.spec).')
  points = [dict(p) for p in module.get_sweep(arg or None)]
  if not points:
    raise ConfigError(f'get_sweep in {path} returned no points; return at least one override dict.')
  names = set()
  for i, point in enumerate(points):
    name = re.sub(r'[^A-Za-z0-9._=+-]', '-', str(point.get('_name') or _default_name(i, point)))
    name = name.lstrip('.') or f'{i:03d}'   # '..' or '.x' would leave the sweep directory
    if name in names:
      raise ConfigError(f'two sweep points are named {name!r}; give each point a unique _name.')
    names.add(name)
    point['_name'] = name
    try:
      config_lib.load_config(spec, [*common, *point_args(point)])
    except ConfigError as e:
      raise ConfigError(f'sweep point {name}: {e}') from e
  return Sweep(spec, points, tuple(common))


# ----------------------------------------------------------------------------- files

def _write_json(path: str, data: dict):
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(data, f, indent=2, default=repr)
    f.write('\n')
  os.replace(tmp, path)


def _read_json(path: str) -> dict | None:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return None


def read_point(workdir: str) -> dict | None:
  return _read_json(os.path.join(workdir, POINT_FILE))


def point_result(workdir: str) -> dict | None:
  """What a complete run measured, or None if it has not finished all its steps:
  {'steps', 'params' (N with embeddings), 'params_non_embedding', 'tokens' (D),
  'flops_6nd' (6 N D), 'flops' (flops_per_token x D, attention included), 'val_loss' (at the
  last step), 'best_val_loss', 'best_step'}."""
  config = _read_json(os.path.join(workdir, 'config.json'))
  evals = [r for r in metrics_lib.read_metrics(workdir) if 'val_loss' in r]
  if config is None or not evals or evals[-1]['step'] != config['total_steps']:
    return None
  config = config_lib.ConfigDict(config)
  counts = spec_lib.model_counts(config, {})
  tokens = config.total_steps * config.batch_size * config.seq_len
  best = min(evals, key=lambda r: r['val_loss'])
  return {'steps': config.total_steps, 'params': counts['params'],
          'params_non_embedding': counts['params_non_embedding'], 'tokens': tokens,
          'flops_6nd': 6.0 * counts['params'] * tokens,
          'flops': counts['flops_per_token'] * tokens,
          'val_loss': evals[-1]['val_loss'], 'best_val_loss': best['val_loss'],
          'best_step': best['step']}


def collect(sweep_dir: str) -> list[dict]:
  """point.json of every point of the sweep in `sweep_dir` (in sweep order), and writes
  results.jsonl with the complete ones: name, overrides, metadata and result flattened."""
  definition = _read_json(os.path.join(sweep_dir, SWEEP_FILE))
  if definition is None:
    raise ConfigError(f'{sweep_dir} has no {SWEEP_FILE}; run flaxllm sweep --workdir={sweep_dir} '
                      'first.')
  statuses, rows = [], []
  for point in definition['points']:
    status = read_point(os.path.join(sweep_dir, point['_name'])) or {
        'name': point['_name'], 'status': 'pending'}
    statuses.append(status)
    if status['status'] == 'complete':
      meta = {k[1:]: v for k, v in point.items() if k.startswith('_') and k != '_name'}
      result = point_result(os.path.join(sweep_dir, point['_name'])) or status['result']
      rows.append({'name': point['_name'], **meta, **result,
                   'wall_s': status.get('wall_s'), 'overrides': spec_lib.overrides(point)})
  tmp = os.path.join(sweep_dir, RESULTS_FILE + '.tmp')
  with open(tmp, 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)
  os.replace(tmp, os.path.join(sweep_dir, RESULTS_FILE))
  return statuses


def read_results(sweep_dir: str) -> list[dict]:
  """The complete points of a sweep (results.jsonl, refreshed from the point files)."""
  collect(sweep_dir)
  with open(os.path.join(sweep_dir, RESULTS_FILE)) as f:
    return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------- running

def _die_with_parent():
  """In the child: SIGTERM when the sweep process dies (Linux), so `kill -9` of a sweep saves
  and stops its runs instead of leaving them training alongside a resumed sweep."""
  with contextlib.suppress(OSError, AttributeError):
    ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _last_error(log_path: str) -> str:
  """The `error: ...` line of a failed run's log, else its last line."""
  try:
    with open(log_path, errors='replace') as f:
      lines = [l.strip() for l in f.read().splitlines()[-200:] if l.strip()]
  except OSError:
    return 'no log'
  errors = [l for l in lines if l.startswith('error: ')]
  return errors[-1][len('error: '):] if errors else (lines[-1] if lines else 'no output')


class _Run(NamedTuple):
  name: str
  workdir: str
  process: subprocess.Popen
  started: float
  status: dict


def _start(sweep: Sweep, sweep_dir: str, point: dict, group: str) -> _Run:
  name = point['_name']
  workdir = os.path.join(sweep_dir, name)
  os.makedirs(workdir, exist_ok=True)
  status = read_point(workdir) or {'name': name, 'wall_s': 0.0, 'attempts': 0}
  status.update(overrides=spec_lib.overrides(point), status='running', error=None,
                attempts=status['attempts'] + 1, pid=None)
  path, colon, arg = sweep.spec.partition(':')
  cmd = [sys.executable, '-m', 'flaxllm.cli', 'train', f'--config={os.path.abspath(path)}{colon}{arg}',
         f'--workdir={workdir}', f'--config.wandb.group={group}', f'--config.wandb.name={name}',
         *sweep.common, *point_args(point)]
  with open(os.path.join(workdir, LOG_FILE), 'a') as log:
    log.write(f'\n$ {" ".join(cmd)}\n')
    log.flush()
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
  status['pid'] = process.pid
  _write_json(os.path.join(workdir, POINT_FILE), status)
  return _Run(name, workdir, process, time.time(), status)


def _finish(run: _Run, stopping: bool) -> dict:
  status = run.status
  status['wall_s'] = status['wall_s'] + time.time() - run.started
  status['pid'] = None
  result = point_result(run.workdir)
  if run.process.returncode == 0 and result is not None:
    status.update(status='complete', result=result)
  elif stopping or run.process.returncode in (-signal.SIGTERM, -signal.SIGINT, 130) or (
      run.process.returncode == 0):
    status['status'] = 'interrupted'  # stopped before its last step: resumes next time
  else:
    status.update(status='failed', error=_last_error(os.path.join(run.workdir, LOG_FILE)))
  _write_json(os.path.join(run.workdir, POINT_FILE), status)
  return status


@contextlib.contextmanager
def _locked(sweep_dir: str):
  """One sweep process per directory (the lock goes away with the process, even on kill -9)."""
  with open(os.path.join(sweep_dir, LOCK_FILE), 'w') as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      raise ConfigError(f'another flaxllm sweep is running in {sweep_dir}; wait for it to end or '
                        'stop it before starting this one.') from e
    yield


def run_sweep(sweep: Sweep, sweep_dir: str, *, workers: int = 1, retry_failed: bool = False,
              group: str | None = None, echo: Callable[[str], Any] = print) -> list[dict]:
  """Runs the points of `sweep` that are not complete, `workers` at a time; returns every
  point's status (see `collect`). SIGTERM/SIGINT stop the runs (they checkpoint) and return."""
  if workers < 1:
    raise ConfigError(f'--workers={workers} must be at least 1.')
  sweep_dir = os.path.abspath(sweep_dir)
  os.makedirs(sweep_dir, exist_ok=True)
  group = group or os.path.basename(sweep_dir)
  with _locked(sweep_dir):
    before = _read_json(os.path.join(sweep_dir, SWEEP_FILE))
    if before is not None and before.get('common', []) != list(sweep.common):
      raise ConfigError(f'the sweep in {sweep_dir} was run with the overrides '
                        f'{before.get("common", [])} for every point, this one with '
                        f'{list(sweep.common)}; pass the same ones or use a new --workdir.')
    todo = []
    for point in sweep.points:
      workdir = os.path.join(sweep_dir, point['_name'])
      stored = read_point(workdir)
      if stored and stored['overrides'] != json.loads(json.dumps(spec_lib.overrides(point))):
        raise ConfigError(f'sweep point {point["_name"]} has different overrides from the run in '
                          f'{sweep_dir}; keep the sweep definition or use a new --workdir.')
      state = (stored or {}).get('status', 'pending')
      holder = rundir.lock_holder(workdir)   # e.g. the run of a killed sweep, still saving
      if holder is not None:
        echo(f'[{point["_name"]}] still running (pid {holder.get("pid")}), left alone')
      elif state == 'complete' or (state == 'failed' and not retry_failed):
        echo(f'[{point["_name"]}] {state}, skipped')
      else:
        todo.append(point)
    _write_json(os.path.join(sweep_dir, SWEEP_FILE),
                {'spec': sweep.spec, 'common': list(sweep.common), 'group': group,
                 'points': sweep.points})
    total, done = len(todo), 0
    stopping = []
    previous = {sig: signal.signal(sig, lambda *_: stopping.append(True))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    running: list[_Run] = []
    try:
      # Until one point has finished, run one at a time: the first run builds the caches that
      # all share (corpus, tokenizer, compiled programs), which parallel runs would race for.
      warm = any(read_point(os.path.join(sweep_dir, p['_name'])) for p in sweep.points)
      while (todo and not stopping) or running:
        while todo and len(running) < (workers if warm else 1) and not stopping:
          run = _start(sweep, sweep_dir, todo.pop(0), group)
          echo(f'[{run.name}] started ({total - len(todo)}/{total}), log {run.workdir}/{LOG_FILE}')
          running.append(run)
        if stopping:
          for run in running:
            with contextlib.suppress(OSError):
              run.process.send_signal(signal.SIGTERM)
          for run in running:
            run.process.wait()
        for run in [r for r in running if r.process.poll() is not None]:
          running.remove(run)
          status = _finish(run, bool(stopping))
          warm = True
          done += status['status'] == 'complete'
          detail = (f'val_loss {status["result"]["val_loss"]:.4f}'
                    if status['status'] == 'complete' else status.get('error') or 'resumes later')
          echo(f'[{run.name}] {status["status"]} in {time.time() - run.started:.0f} s: {detail}')
        time.sleep(0.2)
    finally:
      for sig, handler in previous.items():
        signal.signal(sig, handler)
    statuses = collect(sweep_dir)
  counts = {s: sum(p['status'] == s for p in statuses)
            for s in ('complete', 'failed', 'interrupted', 'pending', 'running')}
  echo('sweep: ' + ', '.join(f'{n} {s}' for s, n in counts.items() if n) +
       f' ({len(statuses)} points) in {sweep_dir}')
  return statuses
