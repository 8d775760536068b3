"""Direct preference optimisation and its relatives (`objective='dpo'`, settings in
`config.dpo`): the policy learns from (prompt, chosen, rejected) pairs without a reward model.

    flaxllm train --config=experiments/rlhf/config.py:stage=dpo --workdir=runs/rlhf/dpo

`dpo.loss_type` is one of `LOSS_TYPES`: sigmoid (DPO; with `label_smoothing` cDPO), hinge,
ipo, robust, the reference-free simpo and orpo, and kto on unpaired (prompt, completion,
label) data (formulas and their TRL counterparts in `flaxllm.objectives.align.losses`). KTO's
reference point comes from a KL batch built on the host (`preference.mismatched_rows`: each
prompt with the next example's completion), as TRL's KTOTrainer builds it. Each step runs
the decoder once over the stacked chosen and rejected rows (`sequences.stack_pair`), with the
head and log-softmax over `dpo.chunk_size` positions at a time in float32; a sequence's
log-prob is the sum over its response tokens (the data's loss mask).

The reference model:
  * LoRA / QLoRA: the base with the adapters switched off, `frozen['base']` itself: no second
    copy of the weights;
  * full or freeze fine-tuning: a frozen copy of the starting params, `frozen['reference']`;
  * `dpo.reference=<dir>`: another model (a flaxllm workdir, model directory or Hugging Face
    directory, checked against the policy's shapes), loaded once into `frozen['reference']`;
  * `dpo.reference_logps=<dir>`: the reference's log-probs of every training batch, stored
    once by `flaxllm reference-logps` (like distillation's offline teacher logits) and read by
    step: no reference model in memory or in the step.
It runs under `stop_gradient` and is never updated. The loss is the mean over pairs (`tokens`
counts pairs, so accumulation is exact); metrics per pair: `rewards_chosen`,
`rewards_rejected`, `margin`, `accuracy` (chosen reward above rejected), `logps_chosen`,
`logps_rejected`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from flaxllm.data import preference
from flaxllm.models.config import ConfigError, require
from flaxllm.objectives import base, step_store
from flaxllm.objectives.align import losses, reference, sequences


LOSS_TYPES = (*losses.PAIRED_LOSSES, 'kto')


def config_section() -> ConfigDict:
  """`config.dpo` (objective='dpo')."""
  c = ConfigDict()
  c.loss_type = 'sigmoid'          # one of LOSS_TYPES (kto: unpaired data)
  c.beta = 0.1                     # the KL strength (ORPO: the odds-ratio weight lambda)
  c.label_smoothing = 0.0          # cDPO / robust DPO's label noise, SimPO's smoothing
  c.simpo_gamma = 0.5              # SimPO's target margin
  c.cpo_alpha = 0.0                # SimPO: weight of the chosen responses' NLL (SimPO: 0)
  c.desirable_weight = 1.0         # KTO's weights of desirable / undesirable examples
  c.undesirable_weight = 1.0
  c.reference = ''                 # '': adapters off (LoRA/QLoRA) or a frozen copy of the start;
  #                                  or a flaxllm workdir / model dir / HF dir
  c.reference_logps = ''           # or its log-probs stored once (flaxllm reference-logps)
  c.max_prompt_len = 0             # prompt tokens kept (from the left); 0 = seq_len // 2
  c.chunk_size = 128               # positions per head chunk; 0 = all at once
  return c


def pair_logps(cfg, params, batch, *, chunk_size: int, rng=None):
  """(chosen, rejected) summed response log-probs [B] and (chosen, rejected) response lengths
  [B] and the chosen responses' mean token NLL (a scalar), from one forward over both sides."""
  rows = sequences.stack_pair(batch)
  token_logps = sequences.token_logps(cfg, params, rows, chunk_size=chunk_size, rng=rng)
  mask = rows['loss_mask'].astype(jnp.float32)
  seq = losses.sequence_logps(token_logps, mask)
  lengths = jnp.sum(mask, axis=-1)
  half = seq.shape[0] // 2
  nll = -jnp.sum(seq[:half]) / jnp.maximum(jnp.sum(lengths[:half]), 1.0)
  return (seq[:half], seq[half:]), (lengths[:half], lengths[half:]), nll


class DirectPreference(reference.WithReference):
  """`objective='dpo'`: DPO and its relatives on paired preference data."""
  name = 'dpo'
  token_ce = False
  section = 'dpo'

  def uses_reference(self) -> bool:
    """A reference model in the step (not with a reference-free loss or stored log-probs)."""
    d = self.config.dpo
    return d.loss_type not in losses.REFERENCE_FREE and not d.reference_logps

  def reference_logps(self, ref_params, batch) -> dict:
    """The reference model's summed log-probs of a batch's sequences (what
    `dpo.reference_logps` stores): chosen and rejected, or KTO's examples and KL rows."""
    chunk = self.config.dpo.chunk_size
    if self._kto:
      ref, ref_kl = self._kto_logps(ref_params, batch)
      return {'ref_logps': ref, 'ref_kl_logps': ref_kl}
    (rc, rr), _, _ = pair_logps(self.model_cfg, ref_params, batch, chunk_size=chunk)
    return {'ref_chosen_logps': rc, 'ref_rejected_logps': rr}

  def _reference(self, frozen, batch) -> dict:
    """The reference log-probs of `batch`: stored in it, or from the frozen reference."""
    if self.config.dpo.reference_logps:
      return batch
    return self.reference_logps(jax.lax.stop_gradient(self.reference_params(frozen)), batch)

  @classmethod
  def config_section(cls) -> ConfigDict:
    return config_section()

  @classmethod
  def check_section(cls, config) -> None:
    super().check_section(config)
    d = config.dpo
    require(d.loss_type in LOSS_TYPES,
            f'dpo.loss_type={d.loss_type!r} is not known; choose one of {LOSS_TYPES}.')
    require(d.desirable_weight > 0 and d.undesirable_weight > 0,
            'dpo.desirable_weight and dpo.undesirable_weight must be positive.')
    require(d.beta > 0, f'dpo.beta={d.beta} must be positive; use e.g. 0.1.')
    limit = 0.5 if d.loss_type == 'robust' else 1.0
    require(0.0 <= d.label_smoothing < limit,
            f'dpo.label_smoothing={d.label_smoothing} must be in [0, {limit}).')
    require(0 <= d.max_prompt_len <= config.seq_len and d.chunk_size >= 0,
            f'dpo.max_prompt_len={d.max_prompt_len} must be in [0, seq_len] and dpo.chunk_size '
            '>= 0.')
    if d.loss_type in losses.REFERENCE_FREE:
      require(not d.reference and not d.reference_logps,
              f'dpo.loss_type={d.loss_type!r} uses no reference model; set dpo.reference='
              "'' and dpo.reference_logps=''.")
    reference.check_reference_settings(config, 'dpo')

  def check(self, tokenizer) -> None:
    """The data holds pairs (one sentence if not, or if a record cannot be trained on)."""
    del tokenizer
    check_data_kind(self.config, 'unpaired' if self._kto else 'paired',
                    f"objective='dpo' with dpo.loss_type={self.config.dpo.loss_type!r}")
    if self.config.dpo.reference_logps:
      ReferenceLogps(self.config.dpo.reference_logps, self.config)   # made for this config

  @property
  def _kto(self) -> bool:
    return self.config.dpo.loss_type == 'kto'

  def train_loss(self, model) -> base.LossFn:
    if self._kto:
      return self._kto_loss()
    d, cfg = self.config.dpo, self.model_cfg
    reference_free = d.loss_type in losses.REFERENCE_FREE

    def loss_fn(params, frozen, batch, rng=None):
      (pc, pr), (lc, lr), nll = pair_logps(cfg, self.model_params(params, frozen), batch,
                                           chunk_size=d.chunk_size, rng=rng)
      rc = rr = None
      if not reference_free:
        ref = self._reference(frozen, batch)
        rc, rr = ref['ref_chosen_logps'], ref['ref_rejected_logps']
      pair_losses, chosen_rewards, rejected_rewards = losses.dpo_losses(
          pc, pr, rc, rr, loss_type=d.loss_type, beta=d.beta, label_smoothing=d.label_smoothing,
          chosen_lengths=lc, rejected_lengths=lr, simpo_gamma=d.simpo_gamma,
          cpo_alpha=d.cpo_alpha, chosen_nll=nll)
      real = (lc > 0).astype(jnp.float32)            # padding rows of a final batch: no pair
      total = lambda x: jnp.sum(x * real)
      sums = {'ce': total(pair_losses), 'tokens': jnp.sum(real),
              'rewards_chosen': total(chosen_rewards), 'rewards_rejected': total(rejected_rewards),
              'margin': total(chosen_rewards - rejected_rewards),
              'accuracy': total((chosen_rewards > rejected_rewards).astype(jnp.float32)),
              'logps_chosen': total(jax.lax.stop_gradient(pc)),
              'logps_rejected': total(jax.lax.stop_gradient(pr))}
      return sums['ce'], sums
    return loss_fn

  def _kto_logps(self, params, batch, rng=None):
    """(examples, KL rows) summed completion log-probs [B] each, from one forward."""
    rows = {k: jnp.concatenate([batch[k], batch[f'kl_{k}']]) for k in sequences.ROW_KEYS}
    token_logps = sequences.token_logps(self.model_cfg, params, rows,
                                        chunk_size=self.config.dpo.chunk_size, rng=rng)
    seq = losses.sequence_logps(token_logps, rows['loss_mask'])
    half = seq.shape[0] // 2
    return seq[:half], seq[half:]

  def _kto_loss(self) -> base.LossFn:
    """KTO on unpaired rows and their KL rows (`kl_<key>`)."""
    d = self.config.dpo

    def loss_fn(params, frozen, batch, rng=None):
      policy, policy_kl = self._kto_logps(self.model_params(params, frozen), batch, rng)
      stored = self._reference(frozen, batch)
      ref, ref_kl = stored['ref_logps'], stored['ref_kl_logps']
      kl = losses.kto_kl(policy_kl, ref_kl)
      example_losses, rewards = losses.kto_losses(
          policy, ref, batch['label'] > 0.5, kl, beta=d.beta,
          desirable_weight=d.desirable_weight, undesirable_weight=d.undesirable_weight)
      real = (jnp.sum(batch['loss_mask'], axis=-1) > 0).astype(jnp.float32)
      good = real * batch['label']
      sums = {'ce': jnp.sum(example_losses * real), 'tokens': jnp.sum(real),
              'kl': kl * jnp.sum(real),
              'rewards_desirable': jnp.sum(rewards * good),
              'rewards_undesirable': jnp.sum(rewards * (real - good))}
      return sums['ce'], sums
    return loss_fn

  def data_iterator(self, tokenizer, split: str, *, seq_len: int, **kw):
    make = (preference.make_unpaired_iterator if self._kto
            else preference.make_preference_iterator)
    return make(self.config.data, tokenizer, split=split, seq_len=seq_len,
                max_prompt_len=self.config.dpo.max_prompt_len or None, **kw)

  def batch_hook(self, tokenizer, rows: slice):
    """KTO's KL rows (`kl_<key>`, `preference.mismatched_rows`) and/or the stored reference
    log-probs of the step (`dpo.reference_logps`)."""
    kl_rows = (lambda batch: {f'kl_{k}': v for k, v in preference.mismatched_rows(
        batch, tokenizer.pad_id).items()}) if self._kto else (lambda batch: {})
    if not self.config.dpo.reference_logps:
      return (lambda step, batch, policy: {**batch, **kl_rows(batch)}) if self._kto else None
    store = ReferenceLogps(self.config.dpo.reference_logps, self.config, rows=rows)
    return lambda step, batch, policy: store.attach(step, {**batch, **kl_rows(batch)})

  def eval_loss(self, model):
    """Pairs validate with the training loss; KTO's validation rows have no KL rows, so its
    eval loss runs on the rows as their own KL batch. With stored reference log-probs (of the
    train batches only) there is no validation loss."""
    if self.config.dpo.reference_logps:
      return None
    loss = self.train_loss(model)
    if not self._kto:
      return loss
    return lambda params, frozen, batch, rng=None: loss(
        params, frozen, {**batch, **{f'kl_{k}': batch[k] for k in sequences.ROW_KEYS}}, rng)

  def batch_shapes(self, batch_size: int, seq_len: int) -> dict:
    rows = super().batch_shapes(batch_size, seq_len)
    if self._kto:
      shapes = {**rows, **{f'kl_{k}': v for k, v in rows.items()},
                'label': ((batch_size,), jnp.float32)}
    else:
      shapes = {f'{side}_{k}': shape for side in preference.SIDES for k, shape in rows.items()}
    if self.config.dpo.reference_logps:
      names = ('ref_logps', 'ref_kl_logps') if self._kto else ('ref_chosen_logps',
                                                                'ref_rejected_logps')
      shapes.update({name: ((batch_size,), jnp.float32) for name in names})
    return shapes

  def sample(self, plain_params, tokenizer):
    del plain_params, tokenizer
    return None


class ReferenceLogps(step_store.StepStore):
  """The reference model's log-probs of every train batch, stored once (`dpo.reference_logps`,
  written by `flaxllm reference-logps`)."""

  def __init__(self, path: str, config, *, rows: slice = slice(None)):
    super().__init__(path, config, setting='dpo.reference_logps', name='reference log-probs',
                     command='flaxllm reference-logps', rows=rows)


def check_data_kind(config, kind: str, what: str):
  """ConfigError unless the data holds records of `kind` ('paired': prompt, chosen, rejected;
  'unpaired': prompt, completion, label) that can all be trained on; `what` names the
  objective in the message."""
  fields = {'paired': '(prompt, chosen, rejected) pairs',
            'unpaired': '(prompt, completion, label) examples'}[kind]
  try:
    found = preference.record_kind(config.data)
    if found != kind:
      raise ConfigError(f'{what} trains on {fields} but {config.data.path} holds {found} '
                        f'records; give {kind} data (or use a loss for that kind).')
    preference.check_records(config.data, kind)
  except ValueError as e:
    raise e if isinstance(e, ConfigError) else ConfigError(str(e)) from e
