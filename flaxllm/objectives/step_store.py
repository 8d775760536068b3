"""Arrays computed once per train step by a frozen model and stored, so that later runs read them
instead of running that model: a distillation teacher's top-k logits, a DPO reference model's
log-probs.

    write_steps(config, iterator, out_dir, compute, steps=N, arrays={'values': ..., ...})
    store = StepStore(out_dir, config, rows=...)     # checks it was made for this config
    batch = store.attach(step, batch)                # + the stored arrays of `step`

Layout of a directory:
  meta.json      the settings that decide the batches (seed, batch_size, seq_len, data), the
                 number of steps, a CRC32 of every step's batch (alignment check), and what the
                 writer adds (e.g. the k of top-k)
  <name>.npy     one array per name, [steps, batch, ...]
Step i holds the outputs for the i-th batch of a FRESH train iterator of the same config (seed,
data, batch_size, seq_len, one process); since the trainer's iterator resumes exactly, step i of
any (resumed) run reads row i. `attach` checks the CRC of each batch and refuses misaligned
data in one sentence.
"""
from __future__ import annotations

import json
import os
import zlib
from typing import Any, Callable, Optional

import jax
import numpy as np

from flaxllm.models.config import ConfigError

META = 'meta.json'


def batch_crc(batch: dict, key: str) -> int:
  return zlib.crc32(np.ascontiguousarray(np.asarray(batch[key], np.int32)).tobytes())


def identity(config) -> dict:
  """The settings that decide which batches the trainer sees."""
  return {'seed': config.seed, 'batch_size': config.batch_size, 'seq_len': config.seq_len,
          'data': json.loads(json.dumps(config.data.to_dict(), default=list))}


def write_steps(config, iterator, out_dir: str, compute: Callable[[dict], dict], *,
                steps: int, arrays: dict[str, tuple], crc_key: str, meta: Optional[dict] = None,
                log_every: int = 20, what: str = 'outputs') -> dict:
  """Runs `compute(batch) -> {name: array [batch, ...]}` over the first `steps` batches of
  `iterator` and writes them (`arrays`: name -> (per-row shape, numpy dtype)) and meta.json
  to `out_dir`; returns the meta."""
  os.makedirs(out_dir, exist_ok=True)
  out = {name: np.lib.format.open_memmap(os.path.join(out_dir, f'{name}.npy.tmp'), 'w+', dtype,
                                         (steps, config.batch_size, *shape))
         for name, (shape, dtype) in arrays.items()}
  crcs = []
  for step in range(steps):
    batch = next(iterator)
    for name, value in jax.device_get(compute(batch)).items():
      out[name][step] = np.asarray(value).astype(out[name].dtype)
    crcs.append(batch_crc(batch, crc_key))
    if log_every and (step + 1) % log_every == 0:
      print(f'{what}: {step + 1}/{steps} batches', flush=True)
  for array in out.values():
    array.flush()
  del out
  meta = {**(meta or {}), 'steps': steps, 'config': identity(config), 'crc32': crcs,
          'crc_key': crc_key, 'arrays': sorted(arrays)}
  for name in arrays:
    os.replace(os.path.join(out_dir, f'{name}.npy.tmp'), os.path.join(out_dir, f'{name}.npy'))
  with open(os.path.join(out_dir, META), 'w') as f:
    json.dump(meta, f)
  return meta


class StepStore:
  """The read side: `attach(step, batch)` adds the stored arrays of `step` to a host batch
  (this process's `rows` of it)."""

  def __init__(self, path: str, config, *, setting: str, name: str, command: str,
               rows: slice = slice(None)):
    """`setting` the config key naming `path`, `name` what it holds (plural, e.g. 'offline
    logits'), `command` how to make it (for the messages)."""
    meta_path = os.path.join(path, META)
    if not os.path.exists(meta_path):
      raise ConfigError(f'{setting}={path!r} has no {META}; create it with {command}.')
    with open(meta_path) as f:
      self.meta = json.load(f)
    if self.meta['config'] != identity(config):
      raise ConfigError(f'the {name} in {path} were made for other data settings '
                        f'({self.meta["config"]}); regenerate them with this config.')
    if self.meta['steps'] < config.total_steps:
      raise ConfigError(f'the {name} in {path} cover {self.meta["steps"]} steps but '
                        f'total_steps={config.total_steps}; regenerate with more steps.')
    self.name = name
    self.arrays = {name: np.load(os.path.join(path, f'{name}.npy'), mmap_mode='r')
                   for name in self.meta['arrays']}
    self.rows, self.path = rows, path

  def attach(self, step: int, batch: dict[str, Any], rename: Callable[[str], str] = str) -> dict:
    """`batch` (this process's rows of step `step`'s global batch) plus the stored arrays of
    that step, named by `rename`."""
    if jax.process_count() == 1 and self.rows == slice(None) and \
        batch_crc(batch, self.meta['crc_key']) != self.meta['crc32'][step]:
      raise ConfigError(f'the batch of step {step} is not the one the {self.name} in '
                        f'{self.path} were computed for; regenerate them for this run.')
    return {**batch, **{rename(name): np.asarray(a[step][self.rows])
                        for name, a in self.arrays.items()}}
