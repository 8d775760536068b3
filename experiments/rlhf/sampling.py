"""Sampling and scoring shared by make_pairs.py and report.py: the experiment's prompts
continued by a model exactly as the RL stages continue them (`rollout.Sampler`: the same
rendering, cut, sampling settings and reward functions), plus each sample's KL to another model.
"""
from __future__ import annotations

import os
import sys

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from experiments.rlhf import config as rlhf_config  # noqa: E402
from flaxllm import rundir  # noqa: E402
from flaxllm.data import preference  # noqa: E402
from flaxllm.objectives.align import rollout  # noqa: E402

BATCH = 256   # completions per generate call (one compiled shape)


def sampler(data: str, reward_model: bool = True) -> rollout.Sampler:
  """The PPO stage's sampler (temperature 1, the true reward, and the reward model of `data`
  when `reward_model`)."""
  config = rlhf_config.get_config(f'stage=ppo,data={data}')
  if not reward_model:
    config.ppo.reward_model = ''
    config.ppo.reward_weights = ()
  return rollout.Sampler(config, config.ppo)


def prompt_records(data: str, split: str) -> list[dict]:
  """The prompts of `split` of the RL stages' prompt file."""
  return preference.prompts(rlhf_config.get_config(f'stage=ppo,data={data}').data, split)


def load(path: str, step: int | None = None):
  """(params, tokenizer) of a run (its checkpoint at `step`; default the newest)."""
  return rundir.load_params(path, step=step), rundir.load_tokenizer(path)


def sample(s: rollout.Sampler, params, tokenizer, records: list[dict], seed: int = 0,
           repeat: int = 1, others: dict | None = None) -> dict:
  """Completions of every record `repeat` times (row i*repeat + k: record i, sample k):
  {'prompt', 'completion', 'true', 'model' (reward-model score, if any)} lists, and for each
  `others` {name: params} 'kl_<name>': the sample's log-probability under `params` minus under
  those params, summed over the completion (a one-sample estimate of KL(policy || other))."""
  index = np.repeat(np.arange(len(records)), repeat)
  out = {'prompt': [], 'completion': [], 'true': [], 'model': [],
         **{f'kl_{n}': [] for n in (others or {})}}
  for start in range(0, len(index), BATCH):
    part = index[start:start + BATCH]
    padded = np.concatenate([part, -np.ones(BATCH - len(part), int)])
    tokens, mask = s.prompt_batch(tokenizer, [records[max(i, 0)] for i in padded])
    r = s.rollout(params, tokenizer, tokens, mask, padded,
                  jax.random.fold_in(jax.random.PRNGKey(seed), start), records)
    n = len(part)
    out['prompt'] += [rollout.prompt_text(records[i]) for i in part]
    out['completion'] += r.completions[:n]
    out['true'] += list(r.parts['true_rewards'][:n])
    if 'model' in r.parts:
      out['model'] += list(r.parts['model'][:n])
    if others:
      mine = np.asarray(s.token_logps(params, r.rows))
      for name, other in others.items():
        theirs = np.asarray(s.token_logps(other, r.rows))
        out[f'kl_{name}'] += list(((mine - theirs) * r.rows['loss_mask']).sum(-1)[:n])
  return out
