"""Rollouts of the on-policy RL objectives (GRPO, PPO): prompts continued by the current policy
inside the training loop, turned into training rows and scored.

    sampler = Sampler(config, config.grpo)        # the section's sampling and reward settings
    rollout = sampler.rollout(params, tokenizer, prompt_batch, rng, repeat=G, texts=...)
    rollout.rows, rollout.scores, rollout.parts, rollout.index

Sampling settings of the section: `temperature`, `top_p`, `top_k`, `max_prompt_len` (prompts
are left-padded to it; completions take the rest of the `seq_len + 1` tokens of a row).
Rewards: functions named by import path in `reward_funcs` (`f(prompts, completions) -> one
float per completion`, TRL's convention) and/or a learned reward model (`reward_model`, a
reward run), combined with `reward_weights`.
"""
from __future__ import annotations

import functools
import importlib
import os
import sys
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from flaxllm import generate as generate_lib
from flaxllm.data import preference
from flaxllm.models.config import ConfigError, ModelConfig, require
from flaxllm.objectives.align import reference, reward, sequences


def sampler_section(c) -> None:
  """Adds the sampling and reward keys an RL section shares (GRPO's, PPO's) to `c`."""
  c.max_prompt_len = 0             # prompt tokens kept (from the left); 0 = seq_len // 2
  c.temperature = 1.0              # sampling of the completions
  c.top_p = 1.0
  c.top_k = 0                      # 0 = no top-k filter
  c.reward_funcs = ()              # 'module.path:function' (prompts, completions) -> rewards
  c.reward_model = ''              # a reward run (its workdir or model/): its score is a reward
  c.reward_weights = ()            # one per reward (functions, then the model); () = all 1
  c.chunk_size = 128               # positions per head chunk (log-probs); 0 = all at once
  c.eval_prompts = 32              # validation prompts sampled and scored (0: none)


def check_sampler_section(config, name: str) -> None:
  """ConfigError (one sentence) for sampling and reward settings that cannot work; the reward
  functions are imported and called once on one example."""
  s = config[name]
  require(bool(s.reward_funcs) or bool(s.reward_model),
          f'{name} needs a reward: set {name}.reward_funcs=<module:function,...> and/or '
          f'{name}.reward_model=<a reward run>.')
  n_rewards = len(s.reward_funcs) + bool(s.reward_model)
  require(not s.reward_weights or len(s.reward_weights) == n_rewards,
          f'{name}.reward_weights has {len(s.reward_weights)} values for {n_rewards} rewards; '
          'give one per reward function (then the reward model), or none.')
  require(s.temperature > 0 and 0 < s.top_p <= 1 and s.top_k >= 0,
          f'{name}.temperature must be > 0, top_p in (0, 1] and top_k >= 0.')
  require(0 < s.max_prompt_len < config.seq_len or s.max_prompt_len == 0,
          f'{name}.max_prompt_len={s.max_prompt_len} must be in [1, seq_len) (or 0).')
  for path in s.reward_funcs:
    call_reward(load_reward_func(path), path, ['p'], ['c'])


def load_reward_func(path: str) -> Callable:
  """The function of 'module.path:function' (one-sentence ConfigError if it cannot be)."""
  module, _, name = path.partition(':')
  if os.getcwd() not in sys.path:   # 'experiments.rlhf.rewards:...' from the repository root
    sys.path.append(os.getcwd())
  try:
    fn = getattr(importlib.import_module(module), name)
  except (ImportError, AttributeError, ValueError) as e:
    raise ConfigError(f'reward function {path!r} cannot be imported ({e}); write it as '
                      "'package.module:function' importable from the working directory.") from e
  if not callable(fn):
    raise ConfigError(f'reward function {path!r} is not a function.')
  return fn


def call_reward(fn: Callable, name: str, prompts: list[str], completions: list[str]
                ) -> np.ndarray:
  """The rewards [N] of a reward function, checked to be N finite-or-NaN floats."""
  out = np.asarray(fn(prompts, completions), np.float32)
  if out.shape != (len(completions),):
    raise ConfigError(f'reward function {name} returned shape {out.shape} for '
                      f'{len(completions)} completions; return one float per completion.')
  return out


def rollout_rows(prompt_tokens, prompt_mask, completion, lengths, pad_id: int) -> dict:
  """Training rows [N, P + C - 1] of left-padded prompts [N, P] and their completions [N, C]
  (`lengths` real tokens each, stop token included): the loss mask covers the completion."""
  n, p = prompt_tokens.shape
  c = completion.shape[1]
  tokens = np.concatenate([prompt_tokens, completion], axis=1)
  real = np.concatenate([prompt_mask, np.arange(c)[None] < lengths[:, None]], axis=1)
  tokens = np.where(real, tokens, pad_id).astype(np.int32)
  positions = np.maximum(np.cumsum(real, axis=1) - 1, 0).astype(np.int32)
  generated = np.zeros_like(real)
  generated[:, p:] = real[:, p:]
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'positions': positions[:, :-1],
          'segment_ids': real[:, :-1].astype(np.int32),
          'loss_mask': generated[:, 1:].astype(np.float32)}


def right_aligned(rows: dict, pad_id: int) -> dict:
  """`rows` with each row's real tokens moved to the left (a reward model reads the last real
  position of right-padded rows)."""
  order = np.argsort(rows['segment_ids'] == 0, axis=1, kind='stable')
  take = lambda x: np.take_along_axis(np.asarray(x), order, axis=1)
  seg = take(rows['segment_ids'])
  return {'inputs': np.where(seg > 0, take(rows['inputs']), pad_id),
          'positions': np.where(seg > 0, take(rows['positions']), 0), 'segment_ids': seg}


class Rollout(NamedTuple):
  rows: dict                 # training rows [N, seq_len] (`rollout_rows`)
  scores: np.ndarray         # [N] weighted total reward (NaN on padding rows)
  parts: dict                # {source name: rewards [N]}
  index: np.ndarray          # [N] prompt index into the split's records (-1: padding)
  completions: list          # [N] the completions' text (without the stop token)


class Sampler:
  """Generation and scoring of an RL section's rollouts (see the module docstring)."""

  def __init__(self, config, section):
    self.config, self.s = config, section
    self.model_cfg = ModelConfig.from_dict(config.model)
    self.prompt_len = section.max_prompt_len or max(1, config.seq_len // 2)
    self.completion_len = config.seq_len + 1 - self.prompt_len
    self.reward_funcs = {path.partition(':')[2]: load_reward_func(path)
                         for path in section.reward_funcs}

  @functools.cached_property
  def _reward_model(self):
    """(params, head, jitted scorer) of the section's reward model, loaded on first use."""
    cfg, params, head = reward.load_reward_model(self.s.reward_model)
    return params, head, jax.jit(functools.partial(reward.rewards, cfg))

  def score(self, prompts: list[str], completions: list[str], rows: dict, pad_id: int
            ) -> tuple[np.ndarray, dict]:
    """(weighted total reward [N], {source name: its rewards [N]})."""
    parts = {name: call_reward(fn, name, prompts, completions)
             for name, fn in self.reward_funcs.items()}
    if self.s.reward_model:
      params, head, scorer = self._reward_model
      parts['model'] = np.asarray(scorer(params, head, right_aligned(rows, pad_id)))
    weights = self.s.reward_weights or (1.0,) * len(parts)
    total = sum(w * r for w, r in zip(weights, parts.values()))
    return total.astype(np.float32), parts

  def rollout(self, params, tokenizer, prompt_tokens, prompt_mask, index, rng,
              texts: list[dict]) -> Rollout:
    """Completions of left-padded prompts [N, prompt_len] by the policy `params`, as training
    rows, scored (`index`: each row's record in `texts`, -1 on padding rows)."""
    s = self.s
    out = generate_lib.generate_tokens(
        generate_lib.decode_model(self.model_cfg), params, jnp.asarray(prompt_tokens),
        jnp.asarray(prompt_mask), rng, max_new_tokens=self.completion_len,
        temperature=float(s.temperature), top_k=s.top_k or None,
        top_p=None if s.top_p >= 1 else float(s.top_p), stop_tokens=(tokenizer.eos_id,),
        pad_id=tokenizer.pad_id)
    completion, lengths = (np.asarray(x) for x in jax.device_get((out.tokens, out.lengths)))
    rows = rollout_rows(np.asarray(prompt_tokens), np.asarray(prompt_mask), completion, lengths,
                        tokenizer.pad_id)
    rows['loss_mask'] = rows['loss_mask'] * (np.asarray(index) >= 0)[:, None]
    prompts = [prompt_text(texts[i]) if i >= 0 else '' for i in index]
    completions = [tokenizer.decode([t for t in row[:n] if t != tokenizer.eos_id])
                   for row, n in zip(completion, lengths)]
    total, parts = self.score(prompts, completions, rows, tokenizer.pad_id)
    return Rollout(rows, np.where(np.asarray(index) >= 0, total, np.nan), parts,
                   np.asarray(index), completions)

  def prompt_iterator(self, tokenizer, split: str, *, seq_len: int, prompts_per_batch: int,
                      **kw):
    return preference.make_prompt_iterator(self.config.data, tokenizer, split=split,
                                           seq_len=seq_len, batch_size=prompts_per_batch,
                                           max_prompt_len=self.prompt_len, **kw)

  def evaluate(self, params, tokenizer) -> dict:
    """The mean rewards of completions sampled (the key of the seed) for the first
    `eval_prompts` validation prompts."""
    records = preference.prompts(self.config.data, 'validation')[:self.s.eval_prompts]
    if not self.s.eval_prompts or not records:
      return {}
    tokens, mask = self.prompt_batch(tokenizer, records)
    rollout = self.rollout(params, tokenizer, tokens, mask,
                           np.arange(len(records)), jax.random.PRNGKey(self.config.seed),
                           records)
    return {'reward': float(np.mean(rollout.scores)),
            **{f'reward_{name}': float(np.mean(r)) for name, r in rollout.parts.items()}}

  def prompt_batch(self, tokenizer, records: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, mask) [N, prompt_len] of prompt records, rendered, cut and left-padded as the
    training prompts are."""
    template = self.config.data.template
    prompts = [preference.cut_prompt(preference.prompt_ids(tokenizer, r['prompt'], template),
                                     self.prompt_len) for r in records]
    return generate_lib.left_pad(prompts, tokenizer.pad_id, length=self.prompt_len)

  @functools.cached_property
  def token_logps(self):
    """Jitted (params, rows) -> log-probs [N, T] of the rows' targets (no dropout)."""
    cfg, chunk = self.model_cfg, self.s.chunk_size
    return jax.jit(lambda params, rows: sequences.token_logps(cfg, params, rows,
                                                              chunk_size=chunk))


def prompt_text(record: dict) -> str:
  """A record's prompt as text (a chat prompt: its messages' contents, one per line)."""
  prompt = record['prompt']
  if isinstance(prompt, str):
    return prompt
  return '\n'.join(str(m.get('content', '')) for m in prompt)


def check_prompt_data(config) -> None:
  """ConfigError unless every record of the data has a prompt (any record kind works)."""
  try:
    preference.check_records(config.data, preference.record_kind(config.data))
  except ValueError as e:
    raise e if isinstance(e, ConfigError) else ConfigError(str(e)) from e


class RolloutObjective(reference.WithReference):
  """What the on-policy RL objectives (GRPO, PPO) share: a `Sampler` over their section, prompt
  data, and validation by sampling and scoring (no fixed targets, so no validation loss and no
  sample to print)."""

  def __init__(self, config):
    super().__init__(config)
    self.sampler = Sampler(config, config[self.section])

  def check(self, tokenizer) -> None:
    del tokenizer
    check_prompt_data(self.config)

  def eval_loss(self, model):
    return None

  def eval_metrics(self, plain_params: Callable[[], Any], tokenizer) -> dict:
    return self.sampler.evaluate(plain_params(), tokenizer)

  def sample(self, plain_params, tokenizer):
    del plain_params, tokenizer
    return None

