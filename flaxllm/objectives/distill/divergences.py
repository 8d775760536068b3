"""Knowledge-distillation divergences and their chunked, masked, per-token sums.

Per token, with p = softmax(teacher_logits / T) and q = softmax(student_logits / T):

  forward_kl   KL(p || q) = sum p (log p - log q)          (mode covering; Hinton et al. 2015)
  reverse_kl   KL(q || p) = sum q (log q - log p)          (mode seeking; MiniLLM)
  jsd          generalised JSD(beta) of GKD (Agarwal et al. 2024), in the convention of TRL's
               `GKDTrainer.generalized_jsd_loss`:
                 m = beta p + (1 - beta) q
                 JSD(beta) = beta KL(p || m) + (1 - beta) KL(q || m)      for 0 < beta < 1
               and the end points are defined as the (scaled) limits
                 beta = 0 -> forward KL(p || q)      (lim JSD(beta) / beta)
                 beta = 1 -> reverse KL(q || p)      (lim JSD(beta) / (1 - beta))
               so `jsd` with beta=0 IS forward_kl and with beta=1 IS reverse_kl (the unscaled
               JSD(beta) itself tends to 0 at both ends; tests check both statements).

The distillation loss scales the divergence by T^2 (Hinton et al.: keeps gradient magnitudes
comparable across temperatures): kd = T^2 * D(p_T, q_T).

Top-k teacher logits. With only the teacher's k largest logits (values v, indices i) the
teacher distribution is p_k = softmax(v / T) on those k tokens (renormalised, zero elsewhere)
and the student keeps its full distribution: its log-probs are gathered at i and the mass it
puts elsewhere, r = 1 - sum_k q_i, is one extra bucket where the teacher has zero mass. Then
  forward KL = sum_k p (log p - log q)                      (the bucket adds 0)
  JSD(beta)  = beta sum_k p (log p - log m) + (1 - beta) [sum_k q (log q - log m) - r log(1 - beta)]
are exact for that truncated teacher; reverse KL (and jsd with beta=1) is infinite wherever
the student puts mass outside the teacher's top-k, so top-k with reverse KL is refused.

`token_sums` computes CE, z and KD sums of one chunk of positions from logits;
`flaxllm.models.split.chunked_sums`
runs it over sequence chunks under `lax.scan` + `jax.checkpoint`, so only one
[batch, chunk, vocab] float32 block of student and teacher logits lives at a time, in the
forward and in the backward pass.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from flaxllm.models.losses import cross_entropy

DIVERGENCES = ('forward_kl', 'reverse_kl', 'jsd')


def _resolve(kind: str, beta: float) -> str:
  """'jsd' at beta 0 / 1 is forward / reverse KL (TRL's convention)."""
  if kind not in DIVERGENCES:
    raise ValueError(f'divergence {kind!r} is not known; choose one of {DIVERGENCES}.')
  if kind == 'jsd':
    if not 0.0 <= beta <= 1.0:
      raise ValueError(f'jsd needs 0 <= beta <= 1, got {beta}.')
    if beta == 0.0:
      return 'forward_kl'
    if beta == 1.0:
      return 'reverse_kl'
  return kind


def _plogp_diff(p, lp, lx):
  """sum p (lp - lx) over the last axis, with 0 log 0 = 0 (teacher zeros)."""
  return jnp.sum(jnp.where(p > 0, p * (lp - lx), 0.0), axis=-1)


def _divergence_on_support(lp, lq, q_rest, kind: str, beta: float):
  """Divergence between teacher log-probs `lp` and student log-probs `lq` [..., K] on a common
  support, the student having mass `q_rest` [...] outside it (where the teacher has none)."""
  p, q = jnp.exp(lp), jnp.exp(lq)
  kind = _resolve(kind, beta)
  if kind == 'forward_kl':
    return _plogp_diff(p, lp, lq)
  if kind == 'reverse_kl':
    return _plogp_diff(q, lq, lp)
  lm = jnp.logaddexp(math.log(beta) + lp, math.log1p(-beta) + lq)
  kl_teacher = _plogp_diff(p, lp, lm)
  kl_student = _plogp_diff(q, lq, lm) - q_rest * math.log1p(-beta)
  return beta * kl_teacher + (1.0 - beta) * kl_student


def divergence(student_logits, teacher_logits, *, kind: str = 'forward_kl', beta: float = 0.5,
               temperature: float = 1.0):
  """Per-token divergence [...] (float32, not scaled by T^2) between the full-vocabulary
  distributions of `teacher_logits` and `student_logits` [..., vocab] at `temperature`."""
  lq = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  lp = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
  return _divergence_on_support(lp, lq, jnp.zeros(lq.shape[:-1], jnp.float32), kind, beta)


def topk_divergence(student_logits, teacher_values, teacher_indices, *, kind: str = 'forward_kl',
                    beta: float = 0.5, temperature: float = 1.0):
  """Per-token divergence [...] between the teacher truncated to its top-k logits
  (`teacher_values`, `teacher_indices` [..., k]) and the full student distribution."""
  if _resolve(kind, beta) == 'reverse_kl':
    raise ValueError('reverse KL needs the full teacher distribution (it is infinite where the '
                     'top-k teacher has no mass); use forward_kl or jsd with beta < 1, or '
                     'top_k=0.')
  lq_full = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  lq = jnp.take_along_axis(lq_full, teacher_indices.astype(jnp.int32), axis=-1)
  lp = jax.nn.log_softmax(teacher_values.astype(jnp.float32) / temperature, axis=-1)
  q_rest = jnp.maximum(1.0 - jnp.sum(jnp.exp(lq), axis=-1), 0.0)
  return _divergence_on_support(lp, lq, q_rest, kind, beta)


def top_k_logits(logits, k: int):
  """(values, indices) [..., k] of the k largest logits (what an offline teacher stores)."""
  values, indices = jax.lax.top_k(logits.astype(jnp.float32), k)
  return values, indices.astype(jnp.int32)


# ----------------------------------------------------------------------------- sums of a chunk

def token_sums(student_logits, targets, mask, *, teacher_logits=None, teacher_topk=None,
               kind: str = 'forward_kl', beta: float = 0.5, temperature: float = 1.0,
               top_k: int = 0, ce_weight=None) -> dict:
  """Masked sums over the tokens of one block: {'ce', 'ce_train', 'z', 'kd', 'tokens'}.

  student_logits [b, s, V]; targets, mask [b, s]; the teacher as full `teacher_logits`
  [b, s, V] (truncated to `top_k` if > 0) or precomputed `teacher_topk` = (values, indices)
  [b, s, k]. kd = T^2 * divergence per token. `ce_weight` [b, s] (default: 1) weighs the CE
  that is trained on ('ce_train'); 'ce' stays the plain CE sum (the reported loss).
  """
  mask = mask.astype(jnp.float32)
  ce, lse = cross_entropy(student_logits, targets)
  if teacher_topk is None and top_k:
    teacher_topk = top_k_logits(teacher_logits, top_k)
  if teacher_topk is not None:
    div = topk_divergence(student_logits, *teacher_topk, kind=kind, beta=beta,
                          temperature=temperature)
  else:
    div = divergence(student_logits, teacher_logits, kind=kind, beta=beta,
                     temperature=temperature)
  w = mask if ce_weight is None else mask * ce_weight.astype(jnp.float32)
  return {'ce': jnp.sum(ce * mask), 'ce_train': jnp.sum(ce * w),
          'z': jnp.sum(jnp.square(lse) * mask),
          'kd': temperature ** 2 * jnp.sum(div * mask), 'tokens': jnp.sum(mask)}


# ----------------------------------------------------------------------------- hidden states

def hidden_loss(student_hidden, teacher_hidden, mask, kind: str, projection=None):
  """Masked sum over tokens of a hidden-state loss between [b, s, Ds] and [b, s, Dt]:
  'cosine' = 1 - cos(h_s W, h_t), 'mse' = mean over features of (h_s W - h_t)^2, W the
  learned projection [Ds, Dt] (needed when the widths differ)."""
  hs = student_hidden.astype(jnp.float32)
  ht = teacher_hidden.astype(jnp.float32)
  if projection is not None:
    hs = jnp.einsum('bsd,de->bse', hs, projection.astype(jnp.float32))
  if hs.shape[-1] != ht.shape[-1]:
    raise ValueError(f'hidden widths differ ({hs.shape[-1]} vs {ht.shape[-1]}); a projection '
                     'is needed.')
  if kind == 'cosine':
    cos = jnp.sum(hs * ht, -1) / (jnp.linalg.norm(hs, axis=-1) * jnp.linalg.norm(ht, axis=-1)
                                  + 1e-8)
    per_token = 1.0 - cos
  elif kind == 'mse':
    per_token = jnp.mean(jnp.square(hs - ht), axis=-1)
  else:
    raise ValueError(f"hidden loss {kind!r} is not known; use 'cosine' or 'mse'.")
  return jnp.sum(per_token * mask.astype(jnp.float32))
