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

from typing import Optional

import jax
import numpy as np

from flaxllm import models
from flaxllm.data import pipeline
from flaxllm.models.config import ConfigError
from flaxllm.objectives import step_store
from flaxllm.objectives.distill import divergences

SETTING = 'distill.offline_logits'
NAME = 'offline logits'
COMMAND = 'flaxllm distill-data --mode=topk'


def write_topk(config, tokenizer, teacher_cfg, teacher_params, out_dir: str, *, top_k: int,
               steps: Optional[int] = None, log_every: int = 20) -> dict:
  """Runs the teacher over the first `steps` (default: config.total_steps) train batches of
  `config` and writes their top-k logits to `out_dir`; returns meta."""
  if not 0 < top_k <= teacher_cfg.vocab_size:
    raise ConfigError(f'--top-k={top_k} must be between 1 and the vocabulary size '
                      f'{teacher_cfg.vocab_size}.')
  model = models.build(teacher_cfg)

  @jax.jit
  def topk(batch):
    logits = model.apply({'params': teacher_params}, batch['inputs'], batch['positions'],
                         batch['segment_ids'])
    values, indices = divergences.top_k_logits(logits, top_k)
    return {'values': values, 'indices': indices}

  it = pipeline.make_iterator(config.data, tokenizer, split='train', seq_len=config.seq_len,
                              batch_size=config.batch_size, seed=config.seed)
  try:
    return step_store.write_steps(
        config, it, out_dir,
        lambda b: topk({k: b[k] for k in ('inputs', 'positions', 'segment_ids')}),
        steps=steps or config.total_steps, crc_key='inputs',
        arrays={'values': ((config.seq_len, top_k), np.float16),
                'indices': ((config.seq_len, top_k), np.int32)},
        meta={'k': top_k, 'vocab_size': teacher_cfg.vocab_size}, log_every=log_every,
        what=f'teacher top-{top_k}')
  finally:
    it.close()


class OfflineLogits(step_store.StepStore):
  """Read side: `attach(step, batch)` adds `teacher_values` (float16) / `teacher_indices`
  [batch, seq, k] to a host batch."""

  def __init__(self, path: str, config, *, rows: slice = slice(None)):
    super().__init__(path, config, setting=SETTING, name=NAME, command=COMMAND, rows=rows)
    if self.meta['vocab_size'] != config.model.vocab_size:
      raise ConfigError(f'the offline logits in {path} are over {self.meta["vocab_size"]} tokens '
                        f'but model.vocab_size={config.model.vocab_size}; use the same vocabulary.')

  def attach(self, step: int, batch):
    return super().attach(step, batch, rename=lambda name: f'teacher_{name}')
