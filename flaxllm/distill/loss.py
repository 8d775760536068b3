"""The distillation LossFn of the trainer (flaxllm.train.step's `(params, frozen, batch, rng)
-> (objective_sum, sums)` contract).

    objective = alpha * sum(mask * T^2 * D(p_T, q_T)) + (1 - alpha) * sum(mask * CE)
                + hidden_weight * sum(mask * hidden) + z_loss * sum(mask * lse^2)

a SUM over the (micro-)batch's tokens; the train step divides the gradient once by the
batch's token count, so the loss is per token also across gradient accumulation. `sums` has
'ce' (plain CE, reported as `loss`), 'tokens', 'z', 'kd' (T^2-scaled divergence, reported per
token as `kd`) and 'hidden' when the hidden-state loss is on.

The student runs with `model_params(params, frozen)` (so LoRA and freezing compose); the
teacher runs on `frozen['teacher']` under `stop_gradient` in the same jitted step (no
gradient, no optimizer state). Both models stop at their final hidden states and the output
heads run over sequence chunks of `chunk_size` positions (`model_lib.chunked_sums`): only one
[batch, chunk, vocab] block of each model's logits is alive at a time. An offline teacher
reads its top-k (values, indices) from the batch instead (`teacher_values`,
`teacher_indices` [batch, seq, k], see flaxllm.distill.offline) and runs no forward at all.

On-policy batches (flaxllm.distill.onpolicy) carry `ce_weight` [batch] = 0: the student's own
samples get only the divergence (GKD), no CE on them.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from flaxllm.distill import losses
from flaxllm.models import split as model_lib
from flaxllm.models.config import ModelConfig

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
  (None with an offline teacher)."""
  s = settings
  kd_kw = dict(kind=s.divergence, beta=s.beta, temperature=s.temperature)
  if s.offline and s.hidden_loss:
    raise ValueError('the hidden-state loss needs the teacher forward; it cannot be used with '
                     'offline teacher logits.')

  def loss_fn(params, frozen, batch, rng=None):
    proj = None
    if isinstance(params, dict) and PROJ_KEY in params:
      proj = params[PROJ_KEY]['kernel']
      params = {k: v for k, v in params.items() if k != PROJ_KEY}
    sp = model_params(params, frozen)
    hs = model_lib.hidden_states(student_cfg, sp, batch, rng)
    s_head = model_lib.head_params(student_cfg, sp)
    mask = batch['loss_mask'].astype(jnp.float32)
    ce_w = batch.get('ce_weight')
    ce_w = (jnp.ones_like(mask) if ce_w is None
            else jnp.broadcast_to(ce_w.astype(jnp.float32)[:, None], mask.shape))

    if s.offline:
      def chunk_fn(h, values, indices, targets, w, m):
        return losses.token_sums(model_lib.head_logits(student_cfg, s_head, h), targets, m,
                                 teacher_topk=(values, indices), ce_weight=w, **kd_kw)
      xs = (hs, batch['teacher_values'], batch['teacher_indices'], batch['targets'], ce_w, mask)
      ht = None
    else:
      tp = jax.lax.stop_gradient(frozen['teacher'])
      ht = model_lib.hidden_states(teacher_cfg, tp, batch)
      t_head = model_lib.head_params(teacher_cfg, tp)

      def chunk_fn(h, h_t, targets, w, m):
        t_logits = model_lib.head_logits(teacher_cfg, t_head, h_t)
        return losses.token_sums(model_lib.head_logits(student_cfg, s_head, h), targets, m,
                                 teacher_logits=t_logits, top_k=s.top_k, ce_weight=w, **kd_kw)
      xs = (hs, ht, batch['targets'], ce_w, mask)

    sums = model_lib.chunked_sums(chunk_fn, xs, s.chunk_size)
    ce_train = sums.pop('ce_train')
    objective = s.alpha * sums['kd'] + (1.0 - s.alpha) * ce_train
    if z_loss:
      objective = objective + z_loss * sums['z']
    if s.hidden_loss:
      sums['hidden'] = losses.hidden_loss(hs, ht, mask, s.hidden_loss, proj)
      objective = objective + s.hidden_weight * sums['hidden']
    return objective, sums

  return loss_fn


def init_projection(rng, student_width: int, teacher_width: int, dtype=jnp.float32):
  """{'kernel': [Ds, Dt]} for the hidden-state loss when the widths differ (None if equal)."""
  if student_width == teacher_width:
    return None
  std = student_width ** -0.5
  return {'kernel': (std * jax.random.normal(rng, (student_width, teacher_width))).astype(dtype)}
