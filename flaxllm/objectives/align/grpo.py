"""Group relative policy optimisation (`objective='grpo'`, settings in `config.grpo`; Shao et al.
2024, as TRL's GRPOTrainer): the policy samples a group of completions per prompt inside the
training loop and learns from their rewards relative to the group.

    flaxllm train --config=experiments/rlhf/config.py:stage=grpo --workdir=runs/rlhf/grpo

Each train step is one rollout, made on the host by the batch hook before the step
(`rollout.Sampler`):
  1. `config.batch_size / grpo.group_size` prompts (left-padded), each repeated `group_size`
     times, are continued by the current policy (KV cache; `temperature`, `top_p`, `top_k`),
     the random key folded from (seed, step);
  2. the completions are scored by the reward functions and/or the reward model;
  3. advantages are normalised per group (`losses.group_advantages`, `scale_rewards`);
  4. with `num_iterations` > 1, the sampling policy's log-probs of the completion tokens are
     recorded (the "old" policy); with one pass the old policy is the current one, so the loss
     uses its own log-probs without gradient (ratio 1, as TRL) and no forward is spent on it.
Then the step makes `grpo.num_iterations` (mu) optimiser passes over the rollout with the
clipped-ratio loss (`epsilon_low`, `epsilon_high`), the k3 KL to the reference times `beta`,
aggregated as `loss_type` (grpo, bnpo, dr_grpo, dapo; `losses.aggregate_token_loss`). The
loss is returned as a sum with the aggregation's divisor as `tokens`, so it is exact across
gradient accumulation. A step depends only on the params before it, the data position and
(seed, step): a killed run resumes to bitwise-equal losses.

Metrics: `reward` (the rollout's mean), `clip_ratio`, `kl` (token means), `completion_length`.
Validation samples completions for the first `grpo.eval_prompts` validation prompts and
reports their mean rewards (per source as `reward_<name>`).
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from flaxllm.data import preference
from flaxllm.models.config import require
from flaxllm.objectives import base
from flaxllm.objectives.align import losses, reference, rollout, sequences


def config_section() -> ConfigDict:
  """`config.grpo` (objective='grpo')."""
  c = ConfigDict()
  c.group_size = 4                 # G completions per prompt (>= 2); batch_size / G prompts
  rollout.sampler_section(c)       # sampling and rewards: temperature, reward_funcs, ...
  c.scale_rewards = 'group'        # advantages over the group's std | 'batch' | 'none'
  c.advantage_epsilon = 1e-4       # TRL's epsilon of the std
  c.std_ddof = 1                   # TRL's std has Bessel's correction
  c.epsilon_low = 0.2              # ratio clipping
  c.epsilon_high = 0.2
  c.beta = 0.0                     # weight of the k3 KL to the reference (TRL's default 0)
  c.loss_type = 'dapo'             # one of losses.GRPO_LOSSES (TRL's default dapo)
  c.num_iterations = 1             # mu: optimiser passes over each rollout
  c.reference = ''                 # with beta > 0: as DPO's (adapters off / copy / a dir)
  return c


class GroupRelative(rollout.RolloutObjective):
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
    require(g.scale_rewards in losses.SCALE_REWARDS,
            f'grpo.scale_rewards={g.scale_rewards!r} is not known; use one of '
            f'{losses.SCALE_REWARDS}.')
    require(g.loss_type in losses.GRPO_LOSSES,
            f'grpo.loss_type={g.loss_type!r} is not known; use one of {losses.GRPO_LOSSES}.')
    require(g.num_iterations >= 1 and g.beta >= 0 and g.epsilon_low >= 0 and
            g.epsilon_high >= 0,
            'grpo.num_iterations must be >= 1 and beta, epsilon_low, epsilon_high >= 0.')
    reference.check_reference_settings(config, 'grpo')
    rollout.check_sampler_section(config, 'grpo')

  def uses_reference(self) -> bool:
    return self.config.grpo.beta > 0

  @property
  def passes(self) -> int:
    return self.config.grpo.num_iterations

  # ---- the rollout (host, before each step) ------------------------------------------------

  def data_iterator(self, tokenizer, split: str, *, seq_len: int, batch_size: int, **kw):
    """Prompt batches: `batch_size / group_size` prompts (`batch_size` completions)."""
    return self.sampler.prompt_iterator(
        tokenizer, split, seq_len=seq_len,
        prompts_per_batch=batch_size // self.config.grpo.group_size, **kw)

  def batch_shapes(self, batch_size: int, seq_len: int) -> dict:
    shapes = super().batch_shapes(batch_size, seq_len)
    return {**shapes, 'old_logps': ((batch_size, seq_len), jnp.float32),
            'advantages': ((batch_size,), jnp.float32), 'reward': ((batch_size,), jnp.float32)}

  def batch_hook(self, tokenizer, rows: slice):
    """The rollout of each step (see the module docstring)."""
    del rows
    texts = preference.prompts(self.config.data, 'train')
    key = jax.random.PRNGKey(self.config.seed)
    g = self.config.grpo

    def hook(step: int, host_batch: dict, policy: base.Policy) -> dict:
      params = policy.plain()
      repeat = lambda x: np.repeat(np.asarray(x), g.group_size, axis=0)
      out = self.sampler.rollout(params, tokenizer, repeat(host_batch['prompt_tokens']),
                                 repeat(host_batch['prompt_mask']),
                                 repeat(host_batch['prompt_index']),
                                 jax.random.fold_in(key, step), texts)
      advantages = losses.group_advantages(out.scores, g.group_size,
                                           scale_rewards=g.scale_rewards,
                                           epsilon=g.advantage_epsilon, ddof=g.std_ddof)
      old = (np.asarray(self.sampler.token_logps(params, out.rows)) if g.num_iterations > 1
             else np.zeros_like(out.rows['loss_mask']))   # unused: see the module docstring
      return {**out.rows, 'old_logps': old,
              'advantages': np.asarray(advantages, np.float32),
              'reward': np.nan_to_num(out.scores).astype(np.float32)}
    return hook

  # ---- the loss ----------------------------------------------------------------------------

  def train_loss(self, model) -> base.LossFn:
    g, cfg = self.config.grpo, self.model_cfg
    completion_len = self.sampler.completion_len

    def loss_fn(params, frozen, batch, rng=None):
      rows = {k: batch[k] for k in sequences.ROW_KEYS}
      mask = batch['loss_mask'].astype(jnp.float32)
      logps = sequences.token_logps(cfg, self.model_params(params, frozen), rows,
                                    chunk_size=g.chunk_size, rng=rng)
      ref = None
      if g.beta > 0:
        ref = sequences.token_logps(cfg, jax.lax.stop_gradient(self.reference_params(frozen)),
                                    rows, chunk_size=g.chunk_size)
      old = batch['old_logps'] if g.num_iterations > 1 else jax.lax.stop_gradient(logps)
      per_token = losses.grpo_per_token_loss(
          logps, old, ref, batch['advantages'], epsilon_low=g.epsilon_low,
          epsilon_high=g.epsilon_high, beta=g.beta) * mask
      real = (jnp.sum(mask, axis=-1) > 0).astype(jnp.float32)
      if g.loss_type == 'grpo':       # the token mean of each sequence, averaged
        objective = jnp.sum(jnp.sum(per_token, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0))
        tokens = jnp.sum(real)
      elif g.loss_type == 'dr_grpo':  # over batch x max completion length
        objective, tokens = jnp.sum(per_token) / completion_len, jnp.sum(real)
      else:                           # bnpo, dapo: the token mean of the batch
        objective, tokens = jnp.sum(per_token), jnp.sum(mask)
      low, high = losses.grpo_clip_flags(logps, old, batch['advantages'],
                                         epsilon_low=g.epsilon_low, epsilon_high=g.epsilon_high)
      sums = {'ce': objective, 'tokens': tokens,
              'clip_ratio': token_mean((low | high).astype(jnp.float32), mask) * tokens,
              'reward': row_mean(batch['reward'], real) * tokens,
              'completion_length': row_mean(jnp.sum(mask, -1), real) * tokens}
      if ref is not None:
        kl = jax.lax.stop_gradient(losses.kl_penalty(logps, ref, 'k3'))
        sums['kl'] = token_mean(kl, mask) * tokens
      return objective, sums
    return loss_fn



def token_mean(x, mask):
  """The mean of `x` over the tokens of `mask` (a metric: times `tokens` in a sums dict)."""
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def row_mean(x, real):
  """The mean of `x` [B] over the real rows (a metric: times `tokens` in a sums dict)."""
  return jnp.sum(x * real) / jnp.maximum(jnp.sum(real), 1.0)


