"""Reward models (`objective='reward'`, settings in `config.reward`): a scalar head on the
decoder's final hidden state at each sequence's last real token, trained on preference pairs
with the Bradley-Terry loss (InstructGPT's step 2).

    flaxllm train --config=experiments/rlhf/config.py:stage=reward --workdir=runs/rlhf/reward
    flaxllm reward --model=runs/rlhf/reward --data=pairs.jsonl      # accuracy on pairs

loss per pair = -log sigma(r_c - r_r) + reward.center_rewards_coefficient (r_c + r_r)^2
(`losses.reward_loss`, TRL's RewardTrainer); metrics per pair: `accuracy` (r_c > r_r),
`margin` (r_c - r_r), `reward_chosen`, `reward_rejected`. The head is the objective's own
trainable tensor, `reward_head` [embed, 1] (no bias, as Hugging Face's
LlamaForSequenceClassification `score`); the decoder trains with any fine-tuning method. The
run exports the decoder as usual (`<workdir>/model/`, its head in `model/reward_head.npy`) and,
for LLaMA-family models, a Hugging Face LlamaForSequenceClassification directory
(`<workdir>/reward_hf/`) that transformers loads and scores identically.
"""
from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from flaxllm import rundir
from flaxllm.data import preference
from flaxllm.interop import hf
from flaxllm.models import split as split_lib
from flaxllm.models.config import require
from flaxllm.objectives import base
from flaxllm.objectives.align import dpo, losses, sequences

log = logging.getLogger(__name__)

HEAD_KEY = 'reward_head'         # the trainable tree's head, {'kernel': [embed, 1]}
HEAD_FILE = 'reward_head.npy'    # its export next to the decoder's params
HF_DIR = 'reward_hf'


def config_section() -> ConfigDict:
  """`config.reward` (objective='reward')."""
  c = ConfigDict()
  c.center_rewards_coefficient = 0.0   # > 0 pulls rewards to zero mean (Eisenstein et al.: 0.01)
  c.max_prompt_len = 0                 # prompt tokens kept (from the left); 0 = seq_len // 2
  return c


def rewards(cfg, params, head_kernel, rows: dict, rng=None):
  """The scalar reward [B] of each row (`inputs`, `positions`, `segment_ids`; right-padded)."""
  hidden = split_lib.hidden_states(cfg, params, rows, rng)
  h = sequences.last_hidden(hidden, rows['segment_ids']).astype(jnp.float32)
  return (h @ head_kernel.astype(jnp.float32))[:, 0]


class RewardModel(base.Objective):
  """`objective='reward'`: a Bradley-Terry reward model on paired preference data."""
  name = 'reward'
  token_ce = False
  section = 'reward'

  @classmethod
  def config_section(cls) -> ConfigDict:
    return config_section()

  @classmethod
  def check_section(cls, config) -> None:
    super().check_section(config)
    r = config.reward
    require(r.center_rewards_coefficient >= 0,
            f'reward.center_rewards_coefficient={r.center_rewards_coefficient} must be >= 0.')
    require(0 <= r.max_prompt_len <= config.seq_len,
            f'reward.max_prompt_len={r.max_prompt_len} must be in [0, seq_len].')

  def check(self, tokenizer) -> None:
    del tokenizer
    dpo.check_data_kind(self.config, 'paired', "objective='reward'")

  def split(self, params, rng):
    trainable, frozen = super().split(params, rng)
    std = self.model_cfg.init_std
    trainable[HEAD_KEY] = {'kernel': std * jax.random.normal(
        jax.random.fold_in(rng, 11), (self.model_cfg.d_model, 1), jnp.float32)}
    return trainable, frozen

  def trainable_specs(self, param_specs, abstract_trainable):
    specs = super().trainable_specs(param_specs, abstract_trainable)
    specs[HEAD_KEY] = {'kernel': jax.sharding.PartitionSpec()}
    return specs

  def train_loss(self, model) -> base.LossFn:
    cfg, center = self.model_cfg, self.config.reward.center_rewards_coefficient

    def loss_fn(params, frozen, batch, rng=None):
      rows = sequences.stack_pair(batch)
      r = rewards(cfg, self.model_params(params, frozen), params[HEAD_KEY]['kernel'], rows, rng)
      half = r.shape[0] // 2
      rc, rr = r[:half], r[half:]
      pair_losses = losses.reward_loss(rc, rr, center_rewards_coefficient=center)
      real = (jnp.sum(batch['chosen_loss_mask'], axis=-1) > 0).astype(jnp.float32)
      total = lambda x: jnp.sum(x * real)
      sums = {'ce': total(pair_losses), 'tokens': jnp.sum(real),
              'accuracy': total((rc > rr).astype(jnp.float32)),
              'margin': total(jax.lax.stop_gradient(rc - rr)),
              'reward_chosen': total(jax.lax.stop_gradient(rc)),
              'reward_rejected': total(jax.lax.stop_gradient(rr))}
      return sums['ce'], sums
    return loss_fn

  def data_iterator(self, tokenizer, split: str, *, seq_len: int, **kw):
    return preference.make_preference_iterator(
        self.config.data, tokenizer, split=split, seq_len=seq_len,
        max_prompt_len=self.config.reward.max_prompt_len or None, **kw)

  def batch_shapes(self, batch_size: int, seq_len: int) -> dict:
    return {f'{side}_{k}': shape for side in preference.SIDES
            for k, shape in super().batch_shapes(batch_size, seq_len).items()}

  def sample(self, plain_params, tokenizer):
    del plain_params, tokenizer
    return None

  def export(self, workdir: str, plain_params, trainable, gather, is_main: bool):
    """The decoder (`<workdir>/model/`) with its head (`model/reward_head.npy`) and, for
    LLaMA-family models, a Hugging Face LlamaForSequenceClassification directory."""
    super().export(workdir, plain_params, trainable, gather, is_main)
    kernel = np.asarray(jax.device_get(gather(trainable[HEAD_KEY]['kernel'])), np.float32)
    if not is_main:
      return
    np.save(os.path.join(workdir, rundir.MODEL_DIR, HEAD_FILE), kernel)
    tokenizer = rundir.load_tokenizer(workdir)
    try:
      hf.save(self.model_cfg, gather(plain_params), os.path.join(workdir, HF_DIR),
              score_kernel=kernel, pad_token_id=tokenizer.pad_id, overwrite=True)
    except hf.HFInteropError as e:
      log.warning('not exporting a Hugging Face reward model: %s', e)


def load_reward_model(path: str):
  """(ModelConfig, decoder params, head kernel [embed, 1]) of a reward model: a reward run's
  workdir (its newest checkpoint) or its exported `model/` directory."""
  model_dir = os.path.join(path, rundir.MODEL_DIR) if os.path.isdir(
      os.path.join(path, rundir.MODEL_DIR)) else path
  head = os.path.join(model_dir, HEAD_FILE)
  if not os.path.exists(head):
    raise rundir.RunDirError(f'{path} holds no reward model ({HEAD_FILE} is missing); train one '
                             "with objective='reward' and point at its workdir or model/.")
  source = rundir.model_source(model_dir, what='--model')
  return source.model_cfg, rundir.load_params(model_dir, what='--model'), np.load(head)
