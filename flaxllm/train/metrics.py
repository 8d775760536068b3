"""Where training metrics go: metrics.jsonl, W&B, a tqdm progress bar, a loss-curve PNG;
and the machine's matmul peak (the denominator of MFU).

`metrics.jsonl` has one JSON object per line: train lines `{"step", "loss", ...}` (averaged over
the steps since the previous line) and eval lines `{"step", "val_loss", "val_ppl"}`.
"""
from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
import uuid
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict
from tqdm.auto import tqdm

from flaxllm import rundir
from flaxllm.models.config import ConfigError

log = logging.getLogger(__name__)

METRICS_FILE = rundir.METRICS_FILE
WANDB_ID_FILE = rundir.WANDB_ID_FILE
WANDB_MODES = ('', 'online', 'offline', 'disabled')


def wandb_section() -> ConfigDict:
  """`config.wandb`: the W&B run of a training run."""
  c = ConfigDict()
  c.enabled = True
  c.mode = ''                      # '' = $WANDB_MODE, else 'offline' without $WANDB_API_KEY
  c.project = 'flaxllm'
  c.group = ''
  c.name = ''
  return c


def check_wandb_section(section) -> None:
  if section.mode not in WANDB_MODES:
    raise ConfigError(f'wandb.mode={section.mode!r} is not known; use one of {WANDB_MODES}.')


# ----------------------------------------------------------------------------- peak FLOP/s

def measure_peak_flops(dtype: str = 'float32', n: int = 1024, repeats: int = 5) -> float:
  """The best FLOP/s of an [n, n] x [n, n] jitted matmul on the default device (about 1 s)."""
  x = jnp.ones((n, n), jnp.dtype(dtype))
  f = jax.jit(lambda a, b: a @ b)
  f(x, x).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    t = time.perf_counter()
    f(x, x).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best


# ----------------------------------------------------------------------------- metrics.jsonl

def read_metrics(workdir: str) -> list[dict]:
  """All complete lines of metrics.jsonl (a line cut by a crash is ignored)."""
  path = os.path.join(workdir, METRICS_FILE)
  rows = []
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError:
          continue
  return rows


def rewind_metrics(workdir: str, step: int):
  """Drops lines after `step` (they will be written again by the resumed run); the dropped
  lines are appended to metrics.discarded.jsonl rather than lost."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return
  rows = read_metrics(workdir)
  keep = [r for r in rows if r.get('step', 0) <= step]
  drop = [r for r in rows if r.get('step', 0) > step]
  if not drop and len(keep) == sum(1 for _ in open(path)):
    return
  if drop:
    with open(os.path.join(workdir, 'metrics.discarded.jsonl'), 'a') as f:
      f.writelines(json.dumps(r) + '\n' for r in drop)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in keep)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def git_commit() -> str:
  """The git commit of the flaxllm source tree ('' outside a repository)."""
  try:
    out = subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.abspath(__file__)), timeout=5)
    return out.stdout.strip() if out.returncode == 0 else ''
  except (OSError, subprocess.SubprocessError):
    return ''


class MetricsWriter:
  """Writes each metrics dict to metrics.jsonl, W&B and the progress bar."""

  def __init__(self, workdir: str, config, *, total_steps: int, start_step: int,
               is_main: bool = True, use_wandb: bool = True):
    self.workdir = workdir
    self.is_main = is_main
    self.file = open(os.path.join(workdir, METRICS_FILE), 'a') if is_main else None
    self.run = self._init_wandb(config) if is_main and use_wandb else None
    self.bar = None
    self.last_print = 0.0
    if is_main and config.progress_bar:
      self.bar = tqdm(total=total_steps, initial=start_step, unit='step', dynamic_ncols=True,
                      disable=None, file=sys.stderr)
      if self.bar.disable:  # not a terminal: plain log lines instead (see write)
        self.bar = None

  def _init_wandb(self, config):
    if not config.wandb.enabled:
      return None
    mode = config.wandb.mode or os.environ.get('WANDB_MODE') or (
        'online' if os.environ.get('WANDB_API_KEY') else 'offline')
    if mode == 'disabled':
      return None
    id_path = os.path.join(self.workdir, WANDB_ID_FILE)
    if os.path.exists(id_path):  # a resumed run continues the same W&B run
      with open(id_path) as f:
        run_id = f.read().strip()
    else:
      run_id = uuid.uuid4().hex[:12]
      with open(id_path, 'w') as f:
        f.write(run_id + '\n')
    try:
      import wandb  # pylint: disable=import-outside-toplevel -- heavy, only when W&B is on
      return wandb.init(project=config.wandb.project, group=config.wandb.group or None,
                        name=config.wandb.name or os.path.basename(os.path.abspath(self.workdir)),
                        id=run_id, resume='allow', mode=mode, dir=self.workdir,
                        config={**config.to_dict(), 'git_commit': git_commit()},
                        notes=config.note or None)
    except Exception as e:  # W&B trouble must never stop training.  pylint: disable=broad-except
      log.warning('W&B init failed (%s); continuing without W&B.', e)
      return None

  def write(self, step: int, metrics: dict[str, Any], *, show: Iterable[str] = ()):
    """One line to metrics.jsonl and W&B; `show` keys go to the progress bar."""
    if not self.is_main:
      return
    row = {'step': int(step), **{k: _py(v) for k, v in metrics.items()}}
    self.file.write(json.dumps(row) + '\n')
    self.file.flush()
    if self.run is not None:
      self.run.log({k: v for k, v in row.items() if k != 'step'}, step=int(step))
    shown = {k: row[k] for k in show if k in row}
    if shown:
      text = ' '.join(f'{k}={_fmt(v)}' for k, v in shown.items())
      if self.bar is not None:
        self.bar.set_postfix_str(text, refresh=False)
      elif time.time() - self.last_print > 5 or step == 1:
        self.last_print = time.time()
        print(f'step {step}: {text}', flush=True)

  def advance(self, step: int):
    if self.bar is not None:
      self.bar.update(step - self.bar.n)

  def close(self):
    if self.bar is not None:
      self.bar.close()
    if self.file is not None:
      self.file.close()
    if self.run is not None:
      self.run.finish()


def _py(v):
  v = np.asarray(v).item() if hasattr(v, 'shape') else v
  return float(v) if isinstance(v, (float, np.floating)) else v


def _fmt(v):
  if isinstance(v, float):
    return f'{v:.3g}' if (abs(v) < 1e-2 or abs(v) >= 1e4) and v else f'{v:.3f}'
  return str(v)


# ----------------------------------------------------------------------------- loss curve

def plot_losses(workdir: str, path: str | None = None) -> str | None:
  """Writes loss_curve.png (train loss and val loss against step) from metrics.jsonl."""
  rows = read_metrics(workdir)
  train = [(r['step'], r['loss']) for r in rows if 'loss' in r and math.isfinite(r['loss'])]
  val = [(r['step'], r['val_loss']) for r in rows if 'val_loss' in r]
  if not train and not val:
    return None
  import matplotlib  # pylint: disable=import-outside-toplevel -- heavy, only for the plot
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel -- heavy
  fig, ax = plt.subplots(figsize=(7, 4))
  if train:
    ax.plot(*zip(*train), label='train loss', lw=1)
  if val:
    ax.plot(*zip(*val), 'o-', label='validation loss')
  ax.set_xlabel('step')
  ax.set_ylabel('cross-entropy (nats/token)')
  ax.set_title(os.path.basename(os.path.abspath(workdir)))
  ax.grid(alpha=0.3)
  ax.legend()
  path = path or os.path.join(workdir, rundir.LOSS_CURVE)
  fig.tight_layout()
  fig.savefig(path + '.tmp.png', dpi=100)
  plt.close(fig)
  os.replace(path + '.tmp.png', path)
  return path
