"""On-policy distillation (GKD, Agarwal et al. 2024) and sequence-level data.

On-policy: before step t the host draws u ~ U(0, 1) from a generator seeded by (seed, t); when
u < lambda (`distill.on_policy`) the data batch is replaced by the STUDENT's own samples:
each row keeps its first `on_policy_prompt_len` tokens (of its first document) as the prompt
and the student continues it with `flaxllm.generate.generate_tokens` (temperature
`on_policy_temperature`) to the row length. The teacher then scores those tokens inside the
jitted step as usual; `loss_mask` covers only the generated tokens and `ce_weight` = 0 turns
the CE off for them (the student's own tokens are no labels), so on-policy batches train the
divergence only. Every batch carries `ce_weight` [batch] (1 for data batches), so the step
compiles once. Generation runs outside the jitted step (one more compiled function); the
draw depends only on (seed, t), so a resumed run makes the same choices.

Sequence-level (Kim & Rush 2016; the "model trains model" recipe behind Alpaca):
`write_sequence_data` samples continuations of prompts taken from the start of training
documents with the teacher and writes each as a text file; the student then trains on them
with data.source='text' and the teacher's tokenizer (`flaxllm distill-data --mode=sequences`).
"""
from __future__ import annotations

import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from flaxllm import generate as generate_lib
from flaxllm.data import corpus


def _prompt_lengths(batch, prompt_len: int) -> np.ndarray:
  """Tokens of each row's first document usable as a prompt (at least 1)."""
  seg = np.asarray(batch['segment_ids'])
  first = (seg == seg[:, :1]) & (seg > 0)
  n = np.where(first.all(1), seg.shape[1], np.argmin(first, axis=1))
  return np.clip(n, 1, prompt_len)


def student_batch(model_cfg, params, batch: dict, *, prompt_len: int, temperature: float,
                  rng, pad_id: int = 0, stop_tokens: tuple = ()) -> dict:
  """A batch of the same shape whose rows are [prompt, student continuation]."""
  inputs = np.asarray(batch['inputs'])
  b, s = inputs.shape
  lens = _prompt_lengths(batch, prompt_len)
  prompts = [inputs[i, :lens[i]].tolist() for i in range(b)]
  tokens, mask = generate_lib.left_pad(prompts, pad_id, length=prompt_len)  # one compilation
  model = generate_lib.decode_model(model_cfg)
  out = generate_lib.generate_tokens(
      model, params, jnp.asarray(tokens), jnp.asarray(mask), rng, max_new_tokens=s,
      temperature=float(temperature), stop_tokens=tuple(stop_tokens), pad_id=int(pad_id))
  gen, gen_len = jax.device_get((out.tokens, out.lengths))
  rows = np.full((b, s + 1), pad_id, np.int32)
  real = np.zeros((b, s + 1), bool)
  generated = np.zeros((b, s + 1), bool)
  for i in range(b):
    seq = prompts[i] + gen[i, :gen_len[i]].tolist()
    seq = seq[:s + 1]
    rows[i, :len(seq)] = seq
    real[i, :len(seq)] = True
    generated[i, lens[i]:len(seq)] = True
  seg = real[:, :-1] & real[:, 1:]
  return {'inputs': rows[:, :-1], 'targets': rows[:, 1:],
          'segment_ids': seg.astype(np.int32),
          'positions': np.tile(np.arange(s, dtype=np.int32), (b, 1)),
          'loss_mask': (generated[:, 1:] & seg).astype(np.float32),
          'ce_weight': np.zeros((b,), np.float32)}


class OnPolicy:
  """The host-side switch between data batches and student samples (see the module doc)."""

  def __init__(self, model_cfg, fraction: float, *, seed: int, prompt_len: int,
               temperature: float, pad_id: int = 0, stop_tokens: tuple = ()):
    self.model_cfg = model_cfg
    self.fraction = fraction
    self.seed = seed
    self.kw = dict(prompt_len=prompt_len, temperature=temperature, pad_id=pad_id,
                   stop_tokens=tuple(stop_tokens))
    self.count = 0

  def chooses(self, step: int) -> bool:
    return bool(np.random.default_rng([self.seed, step]).random() < self.fraction)

  def __call__(self, step: int, batch: dict, policy) -> dict:
    """`batch` with `ce_weight` = 1, or (with probability lambda) a student batch; `params_fn()`
    returns the student's current params (only called when sampling)."""
    if not self.chooses(step):
      b = np.asarray(batch['inputs']).shape[0]
      return {**batch, 'ce_weight': np.ones((b,), np.float32)}
    self.count += 1
    rng = jax.random.fold_in(jax.random.PRNGKey(self.seed), step)
    return student_batch(self.model_cfg, policy.plain(), batch, rng=rng, **self.kw)


def write_sequence_data(teacher_cfg, teacher_params, tokenizer, prompts: list[list[int]],
                        out_dir: str, *, max_new_tokens: int, temperature: float = 0.8,
                        top_k: Optional[int] = None, batch_size: int = 16, seed: int = 0,
                        log: Any = print) -> int:
  """Teacher continuations of `prompts` (token id lists, BOS first) written as one text file
  per sample (prompt + continuation) under `out_dir`; returns the number written."""
  os.makedirs(out_dir, exist_ok=True)
  n = 0
  for start in range(0, len(prompts), batch_size):
    chunk = prompts[start:start + batch_size]
    outs = generate_lib.generate(teacher_cfg, teacher_params, chunk,
                                 max_new_tokens=max_new_tokens, temperature=temperature,
                                 top_k=top_k, stop_tokens=(tokenizer.eos_id,),
                                 seed=seed + start, pad_id=tokenizer.pad_id)
    for prompt, out in zip(chunk, outs):
      ids = [t for t in prompt[1:] + out if t not in (tokenizer.eos_id, tokenizer.bos_id)]
      with open(os.path.join(out_dir, f'sample_{n:06d}.txt'), 'w') as f:
        f.write(tokenizer.decode(ids))
      n += 1
    if log:
      log(f'sequence-level data: {n}/{len(prompts)} samples')
  return n


def document_prompts(config, tokenizer, num: int, prompt_len: int) -> list[list[int]]:
  """BOS + the first `prompt_len` tokens of `num` training documents (the seed prompts)."""
  prompts = []
  for text in corpus.iter_texts(config.data, 'train'):
    ids = tokenizer.encode(text[:20 * prompt_len])[:prompt_len]
    if ids:
      prompts.append([tokenizer.bos_id] + ids)
    if len(prompts) == num:
      break
  return prompts
