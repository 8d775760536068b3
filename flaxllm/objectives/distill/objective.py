"""Knowledge distillation as an objective (`objective='distill'`, settings in `config.distill`):
a frozen teacher's forward inside the student's train step.

    objective = alpha * sum(mask * T^2 * D(p_T, q_T)) + (1 - alpha) * sum(mask * CE)
                + hidden_weight * sum(mask * hidden) + z_loss * sum(mask * lse^2)

a SUM over the (micro-)batch's tokens; the train step divides the gradient once by the
batch's token count, so the loss is per token also across gradient accumulation. `sums` has
'ce' (plain CE, reported as `loss`), 'tokens', 'z', 'kd' (T^2-scaled divergence, reported per
token as `kd`) and 'hidden' when the hidden-state loss is on.

The student runs with `model_params(params, frozen)` (so LoRA and freezing compose); the
teacher runs on `frozen['teacher']` under `stop_gradient` in the same jitted step (no
gradient, no optimizer state). Both models stop at their final hidden states and the output
heads run over sequence chunks of `chunk_size` positions (`split_lib.chunked_sums`): only one
[batch, chunk, vocab] block of each model's logits is alive at a time. An offline teacher
reads its top-k (values, indices) from the batch instead (`teacher_values`,
`teacher_indices` [batch, seq, k], see `offline`) and runs no forward at all. A hidden-state
loss between different widths trains a projection, the trainable tree's `distill_proj`.

On-policy batches (`onpolicy`) carry `ce_weight` [batch] = 0: the student's own samples get
only the divergence (GKD), no CE on them. The teacher comes from a flaxllm workdir, model
directory or Hugging Face directory (`flaxllm.rundir.load_params`); `teacher.check_teacher`
refuses one that cannot teach this student, before anything compiles.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from flaxllm import rundir
from flaxllm.models import split as split_lib
from flaxllm.models.config import ConfigError, ModelConfig, require
from flaxllm.objectives import base, lm
from flaxllm.objectives.distill import divergences, offline, onpolicy
from flaxllm.objectives.distill import teacher as teacher_lib

PROJ_KEY = 'distill_proj'   # trainable top-level key of the hidden-state projection


@dataclasses.dataclass(frozen=True)
class Settings:
  """The loss-relevant part of `config.distill` (hashable: it keys compiled programs)."""
  alpha: float = 0.5
  temperature: float = 1.0
  divergence: str = 'forward_kl'
  beta: float = 0.5
  top_k: int = 0
  chunk_size: int = 0
  hidden_loss: str = ''
  hidden_weight: float = 0.0
  offline: bool = False

  @classmethod
  def from_config(cls, d) -> 'Settings':
    fields = {f.name for f in dataclasses.fields(cls)}
    d = dict(d.to_dict() if hasattr(d, 'to_dict') else d)
    kw = {k: v for k, v in d.items() if k in fields}
    kw['offline'] = bool(d.get('offline_logits'))
    return cls(**kw)


def _identity(params, frozen):
  del frozen
  return params


def distill_loss(student_cfg: ModelConfig, teacher_cfg: Optional[ModelConfig],
                 settings: Settings, *, z_loss: float = 0.0,
                 model_params: Callable[[Any, Any], Any] = _identity):
  """The distillation LossFn for a student of `student_cfg` and a teacher of `teacher_cfg`
  (None with an offline teacher); `params[PROJ_KEY]` is the hidden-state projection, if any."""
  s = settings
  kd_kw = dict(kind=s.divergence, beta=s.beta, temperature=s.temperature)
  if s.offline and s.hidden_loss:
    raise ValueError('the hidden-state loss needs the teacher forward; it cannot be used with '
                     'offline teacher logits.')

  def loss_fn(params, frozen, batch, rng=None):
    proj = params.get(PROJ_KEY) if s.hidden_loss else None
    proj = None if proj is None else proj['kernel']
    sp = model_params(params, frozen)
    hs = split_lib.hidden_states(student_cfg, sp, batch, rng)
    s_head = split_lib.head_params(student_cfg, sp)
    mask = batch['loss_mask'].astype(jnp.float32)
    ce_w = batch.get('ce_weight')
    ce_w = (jnp.ones_like(mask) if ce_w is None
            else jnp.broadcast_to(ce_w.astype(jnp.float32)[:, None], mask.shape))

    if s.offline:
      def chunk_fn(h, values, indices, targets, w, m):
        return divergences.token_sums(split_lib.head_logits(student_cfg, s_head, h), targets, m,
                                 teacher_topk=(values, indices), ce_weight=w, **kd_kw)
      xs = (hs, batch['teacher_values'], batch['teacher_indices'], batch['targets'], ce_w, mask)
      ht = None
    else:
      tp = jax.lax.stop_gradient(frozen['teacher'])
      ht = split_lib.hidden_states(teacher_cfg, tp, batch)
      t_head = split_lib.head_params(teacher_cfg, tp)

      def chunk_fn(h, h_t, targets, w, m):
        t_logits = split_lib.head_logits(teacher_cfg, t_head, h_t)
        return divergences.token_sums(split_lib.head_logits(student_cfg, s_head, h), targets, m,
                                 teacher_logits=t_logits, top_k=s.top_k, ce_weight=w, **kd_kw)
      xs = (hs, ht, batch['targets'], ce_w, mask)

    sums = split_lib.chunked_sums(chunk_fn, xs, s.chunk_size)
    ce_train = sums.pop('ce_train')
    objective = s.alpha * sums['kd'] + (1.0 - s.alpha) * ce_train
    if z_loss:
      objective = objective + z_loss * sums['z']
    if s.hidden_loss:
      sums['hidden'] = divergences.hidden_loss(hs, ht, mask, s.hidden_loss, proj)
      objective = objective + s.hidden_weight * sums['hidden']
    return objective, sums

  return loss_fn


def init_projection(rng, student_width: int, teacher_width: int, dtype=jnp.float32):
  """{'kernel': [Ds, Dt]} for the hidden-state loss when the widths differ (None if equal)."""
  if student_width == teacher_width:
    return None
  std = student_width ** -0.5
  return {'kernel': (std * jax.random.normal(rng, (student_width, teacher_width))).astype(dtype)}


# ----------------------------------------------------------------------------- the objective

def config_section() -> ConfigDict:
  """`config.distill` (objective='distill')."""
  c = ConfigDict()
  c.teacher = ''                   # a flaxllm workdir, a model dir (flaxllm convert /
  #                                  <workdir>/model) or a Hugging Face dir; '' with offline_logits
  c.teacher_dtype = ''             # '' = the teacher's own model.dtype
  c.alpha = 0.5                    # loss = alpha * KD + (1 - alpha) * CE
  c.temperature = 2.0              # softmax temperature of both models; KD is scaled by T^2
  c.divergence = 'forward_kl'      # one of divergences.DIVERGENCES: 'forward_kl' | 'reverse_kl'
  #                                  | 'jsd'
  c.beta = 0.5                     # jsd mixture weight; 0 = forward KL, 1 = reverse KL (TRL)
  c.top_k = 0                      # > 0: only the teacher's top-k logits (renormalised)
  c.chunk_size = 128               # sequence positions per logits chunk; 0 = all at once
  c.hidden_loss = ''               # '' | 'cosine' | 'mse' between final hidden states
  c.hidden_weight = 0.0            # its weight (a learned projection when widths differ)
  c.init_every = 0                 # > 0: student layer i starts as teacher layer i * init_every
  c.on_policy = 0.0                # GKD lambda: fraction of steps on student-generated batches
  c.on_policy_prompt_len = 16      # data tokens kept as the prompt of those samples
  c.on_policy_temperature = 1.0
  c.offline_logits = ''            # a `flaxllm distill-data --mode=topk` dir: no teacher forward
  return c


class Distillation(lm.LanguageModel):
  """`objective='distill'`: the student (with any fine-tuning method) learns from a frozen
  teacher (`frozen['teacher']`) or from its offline top-k logits; evaluation is the student's
  plain next-token loss."""
  name = 'distill'
  section = 'distill'

  @classmethod
  def config_section(cls) -> ConfigDict:
    return config_section()

  @classmethod
  def check_section(cls, config) -> None:
    super().check_section(config)
    d = config.distill
    require(bool(d.teacher or d.offline_logits),
            "objective='distill' needs a teacher; set --config.distill.teacher=<a flaxllm "
            'workdir or model directory> or --config.distill.offline_logits=<dir>.')
    for key, path in (('teacher', d.teacher), ('offline_logits', d.offline_logits)):
      require(not path or os.path.isdir(os.path.expanduser(path)),
              f'distill.{key}={path!r} does not exist; train or generate it first, or set '
              f"distill.{key}=''.")
    require(0.0 <= d.alpha <= 1.0, f'distill.alpha={d.alpha} must be in [0, 1] (loss = alpha * '
                                   'KD + (1 - alpha) * CE); use e.g. 0.5.')
    require(d.temperature > 0, f'distill.temperature={d.temperature} must be positive; use e.g. '
                               '2.')
    require(d.divergence in divergences.DIVERGENCES,
            f'distill.divergence={d.divergence!r} is not known; choose one of '
            f'{divergences.DIVERGENCES}.')
    require(0.0 <= d.beta <= 1.0, f'distill.beta={d.beta} must be in [0, 1]; use e.g. 0.5.')
    vocab = config.model.vocab_size
    require(0 <= d.top_k <= vocab,
            f'distill.top_k={d.top_k} must be between 0 (full distribution) and the vocabulary '
            f'size {vocab}; lower it.')
    reverse = d.divergence == 'reverse_kl' or (d.divergence == 'jsd' and d.beta == 1.0)
    require(not (reverse and (d.top_k or d.offline_logits)),
            'reverse KL needs the full teacher distribution (it is infinite where a top-k '
            "teacher has no mass); use distill.divergence='forward_kl' or 'jsd' with beta < 1.")
    require(d.chunk_size >= 0 and d.init_every >= 0 and d.hidden_weight >= 0,
            'distill.chunk_size, distill.init_every and distill.hidden_weight must be >= 0.')
    require(d.hidden_loss in ('', 'cosine', 'mse'),
            f"distill.hidden_loss={d.hidden_loss!r} is not known; use '', 'cosine' or 'mse'.")
    require(0.0 <= d.on_policy <= 1.0 and d.on_policy_prompt_len >= 1,
            f'distill.on_policy={d.on_policy} must be in [0, 1] and on_policy_prompt_len >= 1.')
    if d.offline_logits:
      require(not d.hidden_loss and not d.on_policy,
              'offline teacher logits cannot give hidden states or score new samples; set '
              "distill.hidden_loss='' and distill.on_policy=0, or use the live teacher.")
    if not d.teacher:
      require(not (d.hidden_loss or d.on_policy or d.init_every),
              'distill.hidden_loss, distill.on_policy and distill.init_every need a live '
              'teacher; set distill.teacher.')

  def __init__(self, config):
    super().__init__(config)
    self.settings = Settings.from_config(config.distill)
    d = config.distill
    self.teacher = (rundir.model_source(d.teacher, what='distill.teacher', dtype=d.teacher_dtype)
                    if d.teacher else None)

  def check(self, tokenizer) -> None:
    """The teacher against the student (vocabulary, tokenizer, init_every layers) and the
    offline logits against this config."""
    d = self.config.distill
    if self.teacher is not None:
      teacher_lib.check_teacher(self.teacher, self.model_cfg, tokenizer,
                                top_k=0 if d.offline_logits else d.top_k)
      last = (self.model_cfg.num_layers - 1) * d.init_every
      if d.init_every and last >= self.teacher.model_cfg.num_layers:
        raise ConfigError(f'distill.init_every={d.init_every} needs teacher layer {last} for '
                          f"the student's {self.model_cfg.num_layers} layers, but the teacher "
                          f'has {self.teacher.model_cfg.num_layers}; lower init_every or the '
                          "student's num_layers.")
    if d.offline_logits:
      offline.OfflineLogits(d.offline_logits, self.config)   # checks meta against this config

  def _teacher_width(self) -> int:
    return self.teacher.model_cfg.d_model if self.teacher is not None else self.model_cfg.d_model

  def split(self, params, rng):
    """The fine-tuning split, plus the hidden-state projection when the widths differ."""
    trainable, frozen = super().split(params, rng)
    if self.settings.hidden_loss and self._teacher_width() != self.model_cfg.d_model:
      trainable[PROJ_KEY] = init_projection(jax.random.fold_in(rng, 7), self.model_cfg.d_model,
                                            self._teacher_width())
    return trainable, frozen

  def trainable_specs(self, param_specs, abstract_trainable):
    specs = super().trainable_specs(param_specs, abstract_trainable)
    if PROJ_KEY in abstract_trainable:
      specs[PROJ_KEY] = {'kernel': jax.sharding.PartitionSpec()}
    return specs

  def load_frozen(self, mesh, rules, *, abstract: bool = False) -> dict:
    """{'teacher': its params} sharded like any model of the teacher's config (none offline)."""
    if self.teacher is None or self.settings.offline:
      return {}
    shapes = base.sharded_abstract_params(self.teacher.model_cfg, mesh, rules)
    if abstract:
      return {'teacher': shapes}
    return {'teacher': rundir.load_params(self.teacher.path, shapes, what='distill.teacher',
                                          dtype=self.config.distill.teacher_dtype)}

  def initial_params(self, params, loaded: dict):
    """With distill.init_every = k, student layer i starts as teacher layer i * k."""
    k = self.config.distill.init_every
    if not k or 'teacher' not in loaded:
      return params
    return teacher_lib.student_from_teacher(params, loaded['teacher'], k)

  def train_loss(self, model) -> base.LossFn:
    teacher_cfg = None if self.settings.offline else self.teacher.model_cfg
    return distill_loss(self.model_cfg, teacher_cfg, self.settings, z_loss=self.config.z_loss,
                        model_params=self.model_params)

  def eval_loss(self, model) -> base.LossFn:
    return super().train_loss(model)   # the student's plain next-token loss

  def batch_shapes(self, batch_size: int, seq_len: int) -> dict:
    shapes = super().batch_shapes(batch_size, seq_len)
    if self.settings.offline:
      k = offline.OfflineLogits(self.config.distill.offline_logits, self.config).meta['k']
      shapes['teacher_values'] = ((batch_size, seq_len, k), jnp.float16)
      shapes['teacher_indices'] = ((batch_size, seq_len, k), jnp.int32)
    if self.config.distill.on_policy:
      shapes['ce_weight'] = ((batch_size,), jnp.float32)
    return shapes

  def batch_hook(self, tokenizer, rows: slice):
    """Offline top-k logits attached to each batch, or on-policy student batches (GKD)."""
    d = self.config.distill
    if d.offline_logits:
      logits = offline.OfflineLogits(d.offline_logits, self.config, rows=rows)
      return lambda step, batch, policy: logits.attach(step, batch)
    if d.on_policy:
      return onpolicy.OnPolicy(self.model_cfg, d.on_policy, seed=self.config.seed,
                               prompt_len=min(d.on_policy_prompt_len, self.config.seq_len),
                               temperature=d.on_policy_temperature, pad_id=tokenizer.pad_id,
                               stop_tokens=(tokenizer.eos_id,))
    return None
