"""Group relative policy optimisation (`objective='grpo'`, settings in `config.grpo`; Shao et al.
2024, as TRL's GRPOTrainer): the policy samples a group of completions per prompt inside the
training loop and learns from their rewards relative to the group.

    flaxllm train --config=experiments/rlhf/config.py:step=grpo --workdir=runs/rlhf/grpo

Each train step is one rollout, made on the host by the batch hook before the step:
  1. `config.batch_size / grpo.group_size` prompts (`flaxllm.data.preference`, left-padded),
     each repeated `group_size` times, are continued by the current policy with
     `flaxllm.generate.generate_tokens` (KV cache; `grpo.temperature`, `top_p`, `top_k`) up to
     `seq_len + 1 - max_prompt_len` tokens, the random key folded from (seed, step);
  2. the completions' texts are scored: reward functions named by import path in
     `grpo.reward_funcs` (`f(prompts, completions) -> rewards`, one float per completion) and/or
     a learned reward model (`grpo.reward_model`, a reward run), weighted by `reward_weights`;
  3. advantages are normalised per group (`losses.group_advantages`, `scale_rewards`);
  4. the sampling policy's log-probs of the completion tokens are computed (the "old" policy).
Then the step makes `grpo.num_iterations` (mu) optimiser passes over the rollout with the
clipped-ratio loss (`epsilon_low`, `epsilon_high`), the k3 KL to the reference times `beta`,
aggregated as `loss_type` (grpo, bnpo, dr_grpo, dapo; `losses.aggregate_token_loss`). The
loss is returned as a sum with the aggregation's divisor as `tokens`, so it is exact across
gradient accumulation. A step depends only on the params before it, the data position and
(seed, step): a killed run resumes to bitwise-equal losses.

Metrics: `reward` (and `reward_<name>` per source) means of the rollout, `kl`, `clip_ratio`
(token means), `completion_length`. Validation samples completions for the first
`grpo.eval_prompts` validation prompts and reports their mean rewards.
"""
from __future__ import annotations

import functools
import importlib
import os
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from flaxllm import generate as generate_lib
from flaxllm.data import preference
from flaxllm.models.config import ConfigError, require
from flaxllm.objectives import base
from flaxllm.objectives.align import losses, reference, reward, sequences


def config_section() -> ConfigDict:
  """`config.grpo` (objective='grpo')."""
  c = ConfigDict()
  c.group_size = 4                 # G completions per prompt (>= 2); batch_size / G prompts
  c.max_prompt_len = 0             # prompt tokens kept (from the left); 0 = seq_len // 2
  c.temperature = 1.0              # sampling of the completions
  c.top_p = 1.0
  c.top_k = 0                      # 0 = no top-k filter
  c.reward_funcs = ()              # 'module.path:function' (prompts, completions) -> rewards
  c.reward_model = ''              # a reward run (its workdir or model/): its score is a reward
  c.reward_weights = ()            # one per reward (functions, then the model); () = all 1
  c.scale_rewards = 'group'        # advantages over the group's std | 'batch' | 'none'
  c.advantage_epsilon = 1e-4       # TRL's epsilon of the std
  c.std_ddof = 1                   # TRL's std has Bessel's correction
  c.epsilon_low = 0.2              # ratio clipping
  c.epsilon_high = 0.2
  c.beta = 0.0                     # weight of the k3 KL to the reference (TRL's default 0)
  c.loss_type = 'dapo'             # one of losses.GRPO_LOSSES (TRL's default dapo)
  c.num_iterations = 1             # mu: optimiser passes over each rollout
  c.reference = ''                 # with beta > 0: as DPO's (adapters off / copy / a dir)
  c.chunk_size = 128               # positions per head chunk; 0 = all at once
  c.eval_prompts = 32              # validation prompts sampled and scored (0: none)
  return c


def load_reward_func(path: str) -> Callable:
  """The function of 'module.path:function' (one-sentence ConfigError if it cannot be)."""
  module, _, name = path.partition(':')
  if os.getcwd() not in sys.path:   # 'experiments.rlhf.rewards:...' from the repository root
    sys.path.append(os.getcwd())
  try:
    fn = getattr(importlib.import_module(module), name)
  except (ImportError, AttributeError, ValueError) as e:
    raise ConfigError(f'grpo.reward_funcs entry {path!r} cannot be imported ({e}); write it as '
                      "'package.module:function' importable from the working directory.") from e
  if not callable(fn):
    raise ConfigError(f'grpo.reward_funcs entry {path!r} is not a function.')
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


class GroupRelative(reference.WithReference):
  """`objective='grpo'`: on-policy RL from programmatic or learned rewards (see the module)."""
  name = 'grpo'
  section = 'grpo'

  @classmethod
  def config_section(cls) -> ConfigDict:
    return config_section()

  @classmethod
  def check_section(cls, config) -> None:
    super().check_section(config)
    g = config.grpo
    require(g.group_size >= 2, f'grpo.group_size={g.group_size} must be at least 2: advantages '
                               'compare the completions of one prompt.')
    require(config.batch_size % g.group_size == 0,
            f'batch_size={config.batch_size} (completions per step) is not a multiple of '
            f'grpo.group_size={g.group_size}; make it one.')
    require(bool(g.reward_funcs) or bool(g.reward_model),
            'grpo needs a reward: set grpo.reward_funcs=<module:function,...> and/or '
            'grpo.reward_model=<a reward run>.')
    n_rewards = len(g.reward_funcs) + bool(g.reward_model)
    require(not g.reward_weights or len(g.reward_weights) == n_rewards,
            f'grpo.reward_weights has {len(g.reward_weights)} values for {n_rewards} rewards; '
            'give one per reward function (then the reward model), or none.')
    require(g.scale_rewards in losses.SCALE_REWARDS,
            f'grpo.scale_rewards={g.scale_rewards!r} is not known; use one of '
            f'{losses.SCALE_REWARDS}.')
    require(g.loss_type in losses.GRPO_LOSSES,
            f'grpo.loss_type={g.loss_type!r} is not known; use one of {losses.GRPO_LOSSES}.')
    require(g.num_iterations >= 1 and g.temperature > 0 and 0 < g.top_p <= 1 and g.top_k >= 0,
            'grpo.num_iterations must be >= 1, temperature > 0, top_p in (0, 1], top_k >= 0.')
    require(0 < g.max_prompt_len < config.seq_len or g.max_prompt_len == 0,
            f'grpo.max_prompt_len={g.max_prompt_len} must be in [1, seq_len) (or 0).')
    require(g.beta >= 0 and g.epsilon_low >= 0 and g.epsilon_high >= 0,
            'grpo.beta, epsilon_low and epsilon_high must be >= 0.')
    reference.check_reference_settings(config, 'grpo')
    for path in g.reward_funcs:
      call_reward(load_reward_func(path), path, ['p'], ['c'])   # imports, and the shape

  def __init__(self, config):
    super().__init__(config)
    g = config.grpo
    self.prompt_len = g.max_prompt_len or max(1, config.seq_len // 2)
    self.reward_funcs = {path.partition(':')[2]: load_reward_func(path)
                         for path in g.reward_funcs}

  def uses_reference(self) -> bool:
    return self.config.grpo.beta > 0

  @property
  def passes(self) -> int:
    return self.config.grpo.num_iterations

  def check(self, tokenizer) -> None:
    del tokenizer
    try:
      preference.check_records(self.config.data, preference.record_kind(self.config.data))
    except ValueError as e:
      raise e if isinstance(e, ConfigError) else ConfigError(str(e)) from e

  # ---- the rollout (host, before each step) ------------------------------------------------

  def data_iterator(self, tokenizer, split: str, *, seq_len: int, batch_size: int, **kw):
    """Prompt batches: `batch_size / group_size` prompts (`batch_size` completions)."""
    return preference.make_prompt_iterator(
        self.config.data, tokenizer, split=split, seq_len=seq_len,
        batch_size=batch_size // self.config.grpo.group_size,
        max_prompt_len=self.prompt_len, **kw)

  def batch_shapes(self, batch_size: int, seq_len: int) -> dict:
    shapes = super().batch_shapes(batch_size, seq_len)
    return {**shapes, 'old_logps': ((batch_size, seq_len), jnp.float32),
            'advantages': ((batch_size,), jnp.float32), 'reward': ((batch_size,), jnp.float32)}

  @functools.cached_property
  def _reward_model(self):
    """(config, params, head, jitted scorer) of grpo.reward_model, loaded on first use."""
    cfg, params, head = reward.load_reward_model(self.config.grpo.reward_model)
    return cfg, params, head, jax.jit(functools.partial(reward.rewards, cfg))

  def score(self, prompts: list[str], completions: list[str], rows: dict, pad_id: int
            ) -> tuple[np.ndarray, dict]:
    """(weighted total reward [N], {source name: its rewards [N]})."""
    parts = {name: call_reward(fn, name, prompts, completions)
             for name, fn in self.reward_funcs.items()}
    if self.config.grpo.reward_model:
      _, params, head, scorer = self._reward_model
      parts['model'] = np.asarray(scorer(params, head, right_aligned(rows, pad_id)))
    weights = self.config.grpo.reward_weights or (1.0,) * len(parts)
    total = sum(w * r for w, r in zip(weights, parts.values()))
    return total.astype(np.float32), parts

  def sample(self, plain_params, tokenizer):
    del plain_params, tokenizer
    return None

  def rollout(self, params, tokenizer, host_batch: dict, rng, texts: list[dict]) -> dict:
    """Completions of the batch's prompts (each `group_size` times) by the policy `params`,
    as training rows with their rewards, advantages and sampling log-probs."""
    g = self.config.grpo
    tokens = np.repeat(np.asarray(host_batch['prompt_tokens']), g.group_size, axis=0)
    mask = np.repeat(np.asarray(host_batch['prompt_mask']), g.group_size, axis=0)
    index = np.repeat(np.asarray(host_batch['prompt_index']), g.group_size)
    out = generate_lib.generate_tokens(
        generate_lib.decode_model(self.model_cfg), params, jnp.asarray(tokens),
        jnp.asarray(mask), rng, max_new_tokens=self.config.seq_len + 1 - self.prompt_len,
        temperature=float(g.temperature), top_k=g.top_k or None,
        top_p=None if g.top_p >= 1 else float(g.top_p), stop_tokens=(tokenizer.eos_id,),
        pad_id=tokenizer.pad_id)
    completion, lengths = (np.asarray(x) for x in jax.device_get((out.tokens, out.lengths)))
    rows = rollout_rows(tokens, mask, completion, lengths, tokenizer.pad_id)
    prompt_texts = [_prompt_text(texts[i]) if i >= 0 else '' for i in index]
    completions = [tokenizer.decode([t for t in row[:n] if t != tokenizer.eos_id])
                   for row, n in zip(completion, lengths)]
    total, _ = self.score(prompt_texts, completions, rows, tokenizer.pad_id)
    total = np.where(index >= 0, total, np.nan)            # padding rows: no reward
    advantages = np.asarray(losses.group_advantages(
        total, g.group_size, scale_rewards=g.scale_rewards, epsilon=g.advantage_epsilon,
        ddof=g.std_ddof))
    old = self._old_logps(params, rows)
    return {**rows, 'old_logps': np.asarray(old), 'advantages': advantages.astype(np.float32),
            'reward': np.nan_to_num(total).astype(np.float32),
            'loss_mask': rows['loss_mask'] * (index >= 0)[:, None]}

  @functools.cached_property
  def _old_logps(self):
    cfg, chunk = self.model_cfg, self.config.grpo.chunk_size
    return jax.jit(lambda params, rows: sequences.token_logps(cfg, params, rows,
                                                              chunk_size=chunk))

  def batch_hook(self, tokenizer, rows: slice):
    """The rollout of each step (see the module docstring)."""
    del rows
    texts = preference.prompts(self.config.data, 'train')
    key = jax.random.PRNGKey(self.config.seed)

    def hook(step: int, host_batch: dict, params_fn) -> dict:
      return self.rollout(params_fn(), tokenizer, host_batch, jax.random.fold_in(key, step),
                          texts)
    return hook

  # ---- the loss ----------------------------------------------------------------------------

  def train_loss(self, model) -> base.LossFn:
    g, cfg = self.config.grpo, self.model_cfg
    completion_len = self.config.seq_len + 1 - self.prompt_len

    def loss_fn(params, frozen, batch, rng=None):
      rows = {k: batch[k] for k in sequences.ROW_KEYS}
      mask = batch['loss_mask'].astype(jnp.float32)
      logps = sequences.token_logps(cfg, self.model_params(params, frozen), rows,
                                    chunk_size=g.chunk_size, rng=rng)
      ref = None
      if g.beta > 0:
        ref = sequences.token_logps(cfg, jax.lax.stop_gradient(self.reference_params(frozen)),
                                    rows, chunk_size=g.chunk_size)
      per_token = losses.grpo_per_token_loss(
          logps, batch['old_logps'], ref, batch['advantages'], epsilon_low=g.epsilon_low,
          epsilon_high=g.epsilon_high, beta=g.beta) * mask
      real = (jnp.sum(mask, axis=-1) > 0).astype(jnp.float32)
      if g.loss_type == 'grpo':       # the token mean of each sequence, averaged
        objective = jnp.sum(jnp.sum(per_token, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0))
        tokens = jnp.sum(real)
      elif g.loss_type == 'dr_grpo':  # over batch x max completion length
        objective, tokens = jnp.sum(per_token) / completion_len, jnp.sum(real)
      else:                           # bnpo, dapo: the token mean of the batch
        objective, tokens = jnp.sum(per_token), jnp.sum(mask)
      low, high = losses.grpo_clip_flags(logps, batch['old_logps'], batch['advantages'],
                                         epsilon_low=g.epsilon_low, epsilon_high=g.epsilon_high)
      token_mean = lambda x: jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0) * tokens
      row_mean = lambda x: jnp.sum(x * real) / jnp.maximum(jnp.sum(real), 1.0) * tokens
      sums = {'ce': objective, 'tokens': tokens,
              'clip_ratio': token_mean((low | high).astype(jnp.float32)),
              'reward': row_mean(batch['reward']),
              'completion_length': row_mean(jnp.sum(mask, -1))}
      if ref is not None:
        sums['kl'] = token_mean(jax.lax.stop_gradient(losses.kl_penalty(logps, ref, 'k3')))
      return objective, sums
    return loss_fn

  def eval_loss(self, model):
    return None   # no fixed targets: validation samples and scores (eval_metrics)

  def eval_metrics(self, plain_params: Callable[[], Any], tokenizer) -> dict:
    """The mean rewards of completions sampled for the first `grpo.eval_prompts` validation
    prompts (one per prompt, the key of the seed)."""
    n = self.config.grpo.eval_prompts
    records = preference.prompts(self.config.data, 'validation')[:n]
    if not n or not records:
      return {}
    g = self.config.grpo
    prompts = [preference.cut_prompt(preference.prompt_ids(tokenizer, r['prompt'],
                                                           self.config.data.template),
                                     self.prompt_len) for r in records]
    tokens, mask = generate_lib.left_pad(prompts, tokenizer.pad_id, length=self.prompt_len)
    out = generate_lib.generate_tokens(
        generate_lib.decode_model(self.model_cfg), plain_params(), jnp.asarray(tokens),
        jnp.asarray(mask), jax.random.PRNGKey(self.config.seed),
        max_new_tokens=self.config.seq_len + 1 - self.prompt_len,
        temperature=float(g.temperature), top_k=g.top_k or None,
        top_p=None if g.top_p >= 1 else float(g.top_p), stop_tokens=(tokenizer.eos_id,),
        pad_id=tokenizer.pad_id)
    completion, lengths = (np.asarray(x) for x in jax.device_get((out.tokens, out.lengths)))
    rows = rollout_rows(tokens, mask, completion, lengths, tokenizer.pad_id)
    completions = [tokenizer.decode([t for t in row[:k] if t != tokenizer.eos_id])
                   for row, k in zip(completion, lengths)]
    total, parts = self.score([_prompt_text(r) for r in records], completions, rows,
                              tokenizer.pad_id)
    return {'reward': float(np.mean(total)),
            **{f'reward_{name}': float(np.mean(r)) for name, r in parts.items()}}


def _prompt_text(record: dict) -> str:
  """A record's prompt as text (a chat prompt: its messages' contents, one per line)."""
  prompt = record['prompt']
  if isinstance(prompt, str):
    return prompt
  return '\n'.join(str(m.get('content', '')) for m in prompt)
