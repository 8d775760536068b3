"""Offline teacher: the teacher's top-k logits of every training batch, computed once and
stored, so students train from them without running (or even having) the teacher.

    flaxllm distill-data --mode=topk --config=experiments/distill/config.py:role=distill \
        --teacher=runs/distill/teacher --top-k=64 --out=runs/distill/teacher_top64
    flaxllm train --config=experiments/distill/config.py:role=offline --workdir=...

Layout of the directory:
  meta.json        k, steps, batch, seq_len, vocab_size, the data settings they were made
                   with, and a CRC32 of every step's `inputs` (alignment check)
  values.npy       float16 [steps, batch, seq_len, k]   teacher logits (raw, temperature 1)
  indices.npy      int32   [steps, batch, seq_len, k]   their token ids
Step i holds the teacher outputs for the i-th batch of a FRESH train iterator of the same
config (seed, data, batch_size, seq_len, one process); since the trainer's iterator resumes
exactly, step i of any (resumed) run reads row i. `attach` checks the CRC of each batch's
inputs and refuses misaligned data in one sentence. Sizes: steps * batch * seq * k * 6 bytes
(200 steps of 8 x 128 tokens with k=64: 79 MB; the full 4096-way logits would be 3.4 GB).
"""
from __future__ import annotations

import json
import os
import zlib
from typing import Any, Optional

import jax
import numpy as np

from flaxllm import models
from flaxllm.data import pipeline
from flaxllm.models.config import ConfigError
from flaxllm.objectives.distill import divergences

META = 'meta.json'
VALUES = 'values.npy'
INDICES = 'indices.npy'


def _crc(inputs) -> int:
  return zlib.crc32(np.ascontiguousarray(np.asarray(inputs, np.int32)).tobytes())


def _identity(config) -> dict:
  """The settings that decide which batches the trainer sees."""
  return {'seed': config.seed, 'batch_size': config.batch_size, 'seq_len': config.seq_len,
          'data': json.loads(json.dumps(config.data.to_dict(), default=list))}


def write_topk(config, tokenizer, teacher_cfg, teacher_params, out_dir: str, *, top_k: int,
               steps: Optional[int] = None, log_every: int = 20) -> dict:
  """Runs the teacher over the first `steps` (default: config.total_steps) train batches of
  `config` and writes their top-k logits to `out_dir`; returns meta."""
  if not 0 < top_k <= teacher_cfg.vocab_size:
    raise ConfigError(f'--top-k={top_k} must be between 1 and the vocabulary size '
                      f'{teacher_cfg.vocab_size}.')
  steps = steps or config.total_steps
  os.makedirs(out_dir, exist_ok=True)
  model = models.build(teacher_cfg)

  @jax.jit
  def topk(params, batch):
    logits = model.apply({'params': params}, batch['inputs'], batch['positions'],
                         batch['segment_ids'])
    return divergences.top_k_logits(logits, top_k)

  shape = (steps, config.batch_size, config.seq_len, top_k)
  values = np.lib.format.open_memmap(os.path.join(out_dir, VALUES + '.tmp'), 'w+', np.float16,
                                     shape)
  indices = np.lib.format.open_memmap(os.path.join(out_dir, INDICES + '.tmp'), 'w+', np.int32,
                                      shape)
  it = pipeline.make_iterator(config.data, tokenizer, split='train', seq_len=config.seq_len,
                              batch_size=config.batch_size, seed=config.seed)
  crcs = []
  try:
    for step in range(steps):
      batch = next(it)
      v, i = jax.device_get(topk(teacher_params, {k: batch[k] for k in
                                                  ('inputs', 'positions', 'segment_ids')}))
      values[step], indices[step] = v.astype(np.float16), i
      crcs.append(_crc(batch['inputs']))
      if log_every and (step + 1) % log_every == 0:
        print(f'teacher top-{top_k}: {step + 1}/{steps} batches', flush=True)
  finally:
    it.close()
  values.flush()
  indices.flush()
  del values, indices
  meta = {'k': top_k, 'steps': steps, 'vocab_size': teacher_cfg.vocab_size,
          'config': _identity(config), 'crc32': crcs}
  for name in (VALUES, INDICES):
    os.replace(os.path.join(out_dir, name + '.tmp'), os.path.join(out_dir, name))
  with open(os.path.join(out_dir, META), 'w') as f:
    json.dump(meta, f)
  return meta


class OfflineLogits:
  """Read side: `attach(step, batch)` adds `teacher_values` / `teacher_indices` to a host batch."""

  def __init__(self, path: str, config, *, rows: slice = slice(None)):
    meta_path = os.path.join(path, META)
    if not os.path.exists(meta_path):
      raise ConfigError(f'distill.offline_logits={path!r} has no {META}; create it with flaxllm '
                        'distill-data --mode=topk.')
    with open(meta_path) as f:
      self.meta = json.load(f)
    if self.meta['config'] != _identity(config):
      raise ConfigError(f'the offline logits in {path} were made for other data settings '
                        f'({self.meta["config"]}); regenerate them with this config.')
    if self.meta['steps'] < config.total_steps:
      raise ConfigError(f'the offline logits in {path} cover {self.meta["steps"]} steps but '
                        f'total_steps={config.total_steps}; regenerate with more steps.')
    if self.meta['vocab_size'] != config.model.vocab_size:
      raise ConfigError(f'the offline logits in {path} are over {self.meta["vocab_size"]} tokens '
                        f'but model.vocab_size={config.model.vocab_size}; use the same vocabulary.')
    self.values = np.load(os.path.join(path, VALUES), mmap_mode='r')
    self.indices = np.load(os.path.join(path, INDICES), mmap_mode='r')
    self.rows = rows
    self.path = path

  def attach(self, step: int, batch: dict[str, Any]) -> dict[str, Any]:
    """`batch` (the host rows `rows` of step `step`'s global batch) plus the teacher's top-k."""
    if jax.process_count() == 1 and self.rows == slice(None) and \
        _crc(batch['inputs']) != self.meta['crc32'][step]:
      raise ConfigError(f'the batch of step {step} is not the one the offline logits in '
                        f'{self.path} were computed for; regenerate them for this run.')
    return {**batch, 'teacher_values': np.asarray(self.values[step][self.rows]),  # float16
            'teacher_indices': np.asarray(self.indices[step][self.rows], np.int32)}
