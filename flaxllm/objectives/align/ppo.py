"""Proximal policy optimisation as InstructGPT ran it (`objective='ppo'`, settings in
`config.ppo`; Ouyang et al. 2022 after Ziegler et al. 2019, as TRL's PPOTrainer did): the
policy samples a completion per prompt inside the training loop, a reward model scores it, and
the policy and a value function learn from the per-token rewards with a KL penalty to the
reference (the SFT model).

    flaxllm train --config=experiments/rlhf/config.py:stage=ppo --workdir=runs/rlhf/ppo

Each train step is one rollout, made on the host by the batch hook (`rollout.Sampler`):
  1. `config.batch_size` prompts are continued by the current policy (KV cache);
  2. the completions are scored (a reward model and/or reward functions: the sequence score);
  3. with the sampling policy's log-probs, the reference's and the value function's values at
     each completion token, the per-token rewards are -kl_coef * KL (k1 by default) plus the
     score at the end (`losses.ppo_rewards`, TRL's layout: the position after the last token,
     `losses.ppo_value_mask`); GAE(gamma, lam) gives advantages (whitened) and returns.
Then the step makes `ppo.epochs` passes of `ppo.minibatches` updates each over the rollout:
loss = the clipped policy loss (`clip`) + `vf_coef` times the clipped value loss (`clip_value`)
(`losses.ppo_policy_loss`, `ppo_value_loss`). The value function is a head on the policy's
own trunk (`ppo.value_model='shared'`) or on a copy of the starting model that trains alongside
(`'copy'`, TRL's separate value model), both in the trainable tree. A step depends only on the
params before it, the data position and (seed, step): a killed run resumes bitwise.

Metrics: `reward` (the scores' mean), `kl` (of the rollout, per sequence), `clip_ratio`,
`value_clip_ratio`, `value_loss`, `completion_length`; validation as GRPO's (mean rewards of
sampled completions).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from flaxllm.data import preference
from flaxllm.models import split as split_lib
from flaxllm.models.config import require
from flaxllm.objectives import base
from flaxllm.objectives.align import grpo, losses, reference, rollout, sequences

VALUE_HEAD = 'value_head'      # {'kernel': [embed, 1]} in the trainable tree
VALUE_MODEL = 'value_model'    # the copied trunk (value_model='copy')
VALUE_MODELS = ('shared', 'copy')


def config_section() -> ConfigDict:
  """`config.ppo` (objective='ppo')."""
  c = ConfigDict()
  rollout.sampler_section(c)       # sampling and rewards: temperature, reward_model, ...
  c.kl_coef = 0.05                 # the per-token KL penalty folded into the rewards
  c.kl_estimator = 'k1'            # one of losses.KL_ESTIMATORS (TRL's default k1)
  c.gamma = 1.0                    # GAE discount
  c.lam = 0.95                     # GAE lambda
  c.whiten_rewards = False
  c.clip = 0.2                     # policy ratio clipping
  c.clip_value = 0.2               # value clipping around the rollout's values
  c.vf_coef = 0.1                  # value loss weight
  c.epochs = 4                     # passes over each rollout
  c.minibatches = 1                # updates per pass
  c.value_model = 'shared'         # one of VALUE_MODELS: a head on the policy's trunk | 'copy'
  c.reference = ''                 # as DPO's (adapters off / a copy of the start / a dir)
  return c


class ProximalPolicy(rollout.RolloutObjective):
  """`objective='ppo'`: InstructGPT's RL step (see the module docstring)."""
  name = 'ppo'
  section = 'ppo'

  @classmethod
  def config_section(cls) -> ConfigDict:
    return config_section()

  @classmethod
  def check_section(cls, config) -> None:
    super().check_section(config)
    p = config.ppo
    require(p.kl_estimator in losses.KL_ESTIMATORS,
            f'ppo.kl_estimator={p.kl_estimator!r} is not known; use one of '
            f'{losses.KL_ESTIMATORS}.')
    require(p.value_model in VALUE_MODELS,
            f'ppo.value_model={p.value_model!r} is not known; use one of {VALUE_MODELS}.')
    require(p.epochs >= 1 and p.minibatches >= 1 and
            config.batch_size % (p.minibatches * config.optim.accum_steps) == 0,
            f'ppo.epochs and ppo.minibatches must be >= 1 and batch_size={config.batch_size} a '
            f'multiple of ppo.minibatches x optim.accum_steps; change one of them.')
    require(p.kl_coef >= 0 and p.clip > 0 and p.clip_value > 0 and p.vf_coef >= 0,
            'ppo.kl_coef and vf_coef must be >= 0, clip and clip_value > 0.')
    reference.check_reference_settings(config, 'ppo')
    rollout.check_sampler_section(config, 'ppo')

  @property
  def passes(self) -> int:
    return self.config.ppo.epochs

  @property
  def minibatches(self) -> int:
    return self.config.ppo.minibatches

  # ---- the value function ------------------------------------------------------------------

  def split(self, params, rng):
    """The policy's split, plus the value head (and with value_model='copy' its trunk, a copy
    of the starting params)."""
    trainable, frozen = super().split(params, rng)
    std = self.model_cfg.init_std
    trainable[VALUE_HEAD] = {'kernel': std * jax.random.normal(
        jax.random.fold_in(rng, 13), (self.model_cfg.d_model, 1), jnp.float32)}
    if self.config.ppo.value_model == 'copy':
      trainable[VALUE_MODEL] = jax.tree.map(jnp.copy, params)
    return trainable, frozen

  def trainable_specs(self, param_specs, abstract_trainable):
    specs = super().trainable_specs(param_specs, abstract_trainable)
    specs[VALUE_HEAD] = {'kernel': jax.sharding.PartitionSpec()}
    if VALUE_MODEL in abstract_trainable:
      specs[VALUE_MODEL] = param_specs
    return specs

  def values(self, trainable, frozen, rows, rng=None):
    """The value of each input position's state [B, T] (aligned with the targets)."""
    trunk = (trainable[VALUE_MODEL] if VALUE_MODEL in trainable
             else self.model_params(trainable, frozen))
    hidden = split_lib.hidden_states(self.model_cfg, trunk, rows, rng).astype(jnp.float32)
    return (hidden @ trainable[VALUE_HEAD]['kernel'].astype(jnp.float32))[..., 0]

  # ---- the rollout (host, before each step) ------------------------------------------------

  def data_iterator(self, tokenizer, split: str, *, seq_len: int, batch_size: int, **kw):
    return self.sampler.prompt_iterator(tokenizer, split, seq_len=seq_len,
                                        prompts_per_batch=batch_size, **kw)

  def batch_shapes(self, batch_size: int, seq_len: int) -> dict:
    per_token = ((batch_size, seq_len), jnp.float32)
    return {**super().batch_shapes(batch_size, seq_len), 'old_logps': per_token,
            'old_values': per_token, 'advantages': per_token, 'returns': per_token,
            'value_mask': per_token, 'reward': ((batch_size,), jnp.float32),
            'rollout_kl': ((batch_size,), jnp.float32)}

  @functools.cached_property
  def _rollout_stats(self):
    """Jitted (trainable, frozen, rows, scores) -> old log-probs, values, advantages, returns,
    the value mask and each sequence's KL, the per-token quantities over the completion
    (as `losses` lays them out: from the completion's first token) placed back in the rows."""
    p, cfg, chunk = self.config.ppo, self.model_cfg, self.config.ppo.chunk_size
    start = self.sampler.prompt_len - 1      # the targets' column of the first completion token

    def stats(trainable, frozen, rows, scores):
      policy = self.model_params(trainable, frozen)
      old = sequences.token_logps(cfg, policy, rows, chunk_size=chunk)
      ref = sequences.token_logps(cfg, self.reference_params(frozen), rows, chunk_size=chunk)
      values = self.values(trainable, frozen, rows)
      cut = lambda x: x[:, start:]
      mask = cut(rows['loss_mask'])
      value_mask = losses.ppo_value_mask(mask)
      last = jnp.sum(value_mask, axis=-1) - 1
      rewards = losses.ppo_rewards(cut(old), cut(ref), scores, mask, kl_coef=p.kl_coef,
                                   kl_estimator=p.kl_estimator, score_index=last)
      if p.whiten_rewards:
        rewards = losses.masked_whiten(rewards, value_mask, shift_mean=False)
      advantages, returns = losses.gae(rewards, cut(values), value_mask, gamma=p.gamma,
                                       lam=p.lam)
      advantages = losses.masked_whiten(advantages, mask)
      place = lambda x: jnp.zeros_like(rows['loss_mask']).at[:, start:].set(x)
      kl = jnp.sum(losses.kl_penalty(old, ref, p.kl_estimator) * rows['loss_mask'], -1)
      return {'old_logps': old, 'old_values': values, 'advantages': place(advantages),
              'returns': place(returns), 'value_mask': place(value_mask.astype(jnp.float32)),
              'rollout_kl': kl}
    return jax.jit(stats)

  def batch_hook(self, tokenizer, rows: slice):
    """The rollout of each step (see the module docstring)."""
    del rows
    texts = preference.prompts(self.config.data, 'train')
    key = jax.random.PRNGKey(self.config.seed)

    def hook(step: int, host_batch: dict, policy: base.Policy) -> dict:
      out = self.sampler.rollout(policy.plain(), tokenizer, host_batch['prompt_tokens'],
                                 host_batch['prompt_mask'], host_batch['prompt_index'],
                                 jax.random.fold_in(key, step), texts)
      scores = np.nan_to_num(out.scores).astype(np.float32)
      stats = jax.device_get(self._rollout_stats(policy.trainable, policy.frozen, out.rows,
                                                 scores))
      return {**out.rows, **{k: np.asarray(v) for k, v in stats.items()}, 'reward': scores}
    return hook

  # ---- the loss ----------------------------------------------------------------------------

  def train_loss(self, model) -> base.LossFn:
    p, cfg = self.config.ppo, self.model_cfg

    def loss_fn(params, frozen, batch, rng=None):
      rows = {k: batch[k] for k in sequences.ROW_KEYS}
      mask, value_mask = batch['loss_mask'], batch['value_mask']
      logps = sequences.token_logps(cfg, self.model_params(params, frozen), rows,
                                    chunk_size=p.chunk_size, rng=rng)
      values = self.values(params, frozen, rows, rng)
      pg, clip_ratio = losses.ppo_policy_loss(logps, batch['old_logps'], batch['advantages'],
                                              mask, clip=p.clip)
      vf, value_clip = losses.ppo_value_loss(values, batch['old_values'], batch['returns'],
                                             value_mask, clip_value=p.clip_value)
      tokens = jnp.sum(mask)
      real = (jnp.sum(mask, axis=-1) > 0).astype(jnp.float32)
      objective = (pg + p.vf_coef * vf) * tokens
      sums = {'ce': objective, 'tokens': tokens, 'value_loss': vf * tokens,
              'clip_ratio': clip_ratio * tokens, 'value_clip_ratio': value_clip * tokens,
              'reward': grpo.row_mean(batch['reward'], real) * tokens,
              'kl': grpo.row_mean(batch['rollout_kl'], real) * tokens,
              'completion_length': grpo.row_mean(jnp.sum(mask, -1), real) * tokens}
      return objective, sums
    return loss_fn

