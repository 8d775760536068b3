"""Losses of preference alignment and RLHF, over per-sequence or per-token log-probabilities.

Every function is pure JAX (jittable, float32 results, masks explicit) and matches one TRL
function number for number: tests/test_align_losses.py runs each against TRL 1.16 on the same
inputs or, for PPO, which TRL 1.16 no longer ships, against the lines of TRL's last PPOTrainer.
The log-prob of a sequence is the SUM over its completion tokens (`sequence_logps`) unless said
otherwise; a loss that needs per-token averages takes the completion lengths and divides itself,
one that needs the NLL of the chosen responses takes it as an argument. Shapes: B pairs,
examples or sequences; T completion positions.

Notation: sigma the logistic function, log sigma its log; for a pair, pi_c, pi_r the policy's
summed log-probs of the chosen and rejected completions, ref_c, ref_r the reference model's,
l_c, l_r the completion lengths in tokens (clamped to >= 1, as DPOTrainer's ipo does; TRL's
CPO and ORPO would divide by 0 on an empty completion), and the implicit reward margin
  h = (pi_c - ref_c) - (pi_r - ref_r).

Paired losses, `dpo_losses` (per pair; the batch loss is their mean):
  sigmoid  -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)
           DPO (Rafailov et al. 2023, eq. 7); eps = label_smoothing > 0 is conservative DPO
           (cDPO, Mitchell 2023). TRL's DPOTrainer (loss_type='sigmoid') is eps = 0; TRL 1.16
           has the eps form only in CPOTrainer.cpo_loss (loss_type='sigmoid').
  hinge    relu(1 - beta h)                     SLiC (Zhao et al. 2023); DPOTrainer 'hinge'.
  ipo      ((pi_c - ref_c) / l_c - (pi_r - ref_r) / l_r - 1 / (2 beta))^2
           IPO (Azar et al. 2023, eq. 17) on length-normalised log-ratios, as DPOTrainer 'ipo'
           (it divides by the completion token counts, clamped to >= 1).
  robust   (-(1 - eps) log sigma(beta h) + eps log sigma(-beta h)) / (1 - 2 eps)
           rDPO (Chowdhury et al. 2024), eps the label flip rate in [0, 0.5); DPOTrainer 'robust'.
  The rewards of these four are beta (pi_c - ref_c) and beta (pi_r - ref_r): summed log-ratios,
  for ipo too, as DPOTrainer logs them.
Reference-free, on the average log-probs a_c = pi_c / l_c and a_r = pi_r / l_r:
  simpo    -(1 - eps) log sigma(z) - eps log sigma(-z) + cpo_alpha nll,
           z = beta (a_c - a_r) - gamma.
           SimPO (Meng et al. 2024, eq. 6), gamma the target margin; TRL's CPOTrainer with
           loss_type='simpo' (`cpo_loss`, plus cpo_alpha times the NLL in
           `get_batch_loss_metrics`; CPOConfig defaults cpo_alpha to 1.0, SimPO itself is 0).
  orpo     nll - beta log sigma(o),
           o = (a_c - a_r) - (log(1 - e^a_c) - log(1 - e^a_r)) the log odds ratio.
           ORPO (Hong et al. 2024, eqs. 4-7; beta is the paper's lambda);
           ORPOTrainer.odds_ratio_loss and its `loss = nll - losses.mean()`.
  The rewards of these two are beta a_c and beta a_r. nll is the chosen responses' NLL as the
  caller's SFT term defines it; TRL's is the mean token cross-entropy over the batch's chosen
  sequences (for ORPO over prompt and response), a scalar: added to every pair it leaves the
  batch mean equal to TRL's loss.

KTO, `kto_losses` (unpaired; Ethayarajh et al. 2024, eq. 7; TRL's KTOTrainer, loss_type='kto'):
  z0 = max(0, mean_j(pi(y'_j | x_j) - ref(y'_j | x_j)))     (`kto_kl`, no gradient) over the KL
       batch, each prompt x_j paired with another example's completion y'_j
  desirable:    w_d (1 - sigma(beta ((pi - ref) - z0)))
  undesirable:  w_u (1 - sigma(beta (z0 - (pi - ref))))
  The batch loss is the mean over all examples; the rewards are beta (pi - ref).

Reward model, `reward_loss` (Bradley-Terry, Ouyang et al. 2022; TRL's RewardTrainer.compute_loss):
  -log sigma(r_c - r_r - margin) + c (r_c + r_r)^2     per pair; TRL's loss is the mean.
  c = center_rewards_coefficient (Eisenstein et al. 2023) pulls the rewards towards zero mean.

GRPO (Shao et al. 2024; TRL's GRPOTrainer, importance sampling at token level):
  `group_advantages` of rewards in consecutive groups of G completions of one prompt:
    A_i = (r_i - mean_group(r)) / (std + epsilon)
    std of the group ('group'), of the whole batch ('batch'; the mean stays the group's), or no
    division ('none'); TRL's std has Bessel's correction (ddof=1) and epsilon is 1e-4. NaN
    rewards (TRL's unscorable completions) are left out of means and stds and get advantage 0.
  per token (`grpo_per_token_loss`), with rho = exp(logp - old_logp):
    -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) + beta k3,
    k3 = exp(ref - logp) - (ref - logp) - 1      (`kl_penalty`; Schulman 2020, "Approximating
                                                  KL divergence")
  aggregated (`aggregate_token_loss`) over the completion mask m, L the per-token loss:
    grpo     mean_i(sum_t L m / max(1, sum_t m))          the token mean of each sequence
    bnpo     sum L m / max(1, sum m)                       the token mean of the batch
    dr_grpo  sum L m / (B max_completion_length)           Dr. GRPO (Liu et al. 2025)
    dapo     sum L m / max(1, num_items)                   DAPO (Yu et al. 2025), num_items the
             token count of the whole accumulated batch (TRL's num_items_in_batch over processes)
  `grpo_token_loss` is TRL's `_compute_loss` without gradient accumulation (in training TRL
  also divides grpo, bnpo and dr_grpo by the accumulation steps). Its metrics are `masked_mean`s
  over the completion tokens of `kl_penalty` and of `grpo_clip_flags` (clip_ratio/low_mean:
  rho < 1 - eps_low where A < 0; high_mean: rho > 1 + eps_high where A > 0; region_mean: either).

PPO (Ziegler et al. 2019, InstructGPT by Ouyang et al. 2022; TRL's PPOTrainer, last in
trl/experimental/ppo/ppo_trainer.py of huggingface/trl at fd09025884b6, removed before TRL 1.16):
  `ppo_rewards`: -kl_coef KL_t on each response token, KL_t = logp - ref ('k1', TRL's default) or
    k3 above, plus the sequence's score at one position (by default its last token).
  `gae` (Schulman et al. 2016) over an episode mask m (where m is 0 the episode has ended):
    delta_t = r_t + gamma V_{t+1} m_{t+1} - V_t,   A_t = m_t (delta_t + gamma lam A_{t+1}),
    returns R_t = A_t + V_t.
  TRL's episode is the response plus one position (`ppo_value_mask`): the value predicted at the
  first padding position is kept and the score lands there (on the last token if there is no
  room). With whiten_rewards TRL whitens the rewards over that episode (mean kept), and it
  always whitens the advantages over the response tokens (`masked_whiten`:
  (x - mean) / sqrt(var + 1e-8), variance with Bessel's correction).
  `ppo_policy_loss`: masked mean of -min(rho A, clip(rho, 1 - c, 1 + c) A), rho as in GRPO;
  `ppo_value_loss`: 0.5 masked mean of max((V - R)^2, (clip(V, V_old - c_v, V_old + c_v) - R)^2);
  each also returns its clip fraction (the clipped term strictly the larger).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

PAIRED_LOSSES = ('sigmoid', 'hinge', 'ipo', 'robust', 'simpo', 'orpo')
REFERENCE_FREE = ('simpo', 'orpo')       # no reference model
LENGTH_NORMALISED = ('ipo', 'simpo', 'orpo')   # need chosen_lengths and rejected_lengths
SCALE_REWARDS = ('group', 'batch', 'none')
GRPO_LOSSES = ('grpo', 'bnpo', 'dr_grpo', 'dapo')
KL_ESTIMATORS = ('k1', 'k3')


def _f32(x):
  return jnp.asarray(x, jnp.float32)


def _check(value: str, allowed: tuple, what: str):
  if value not in allowed:
    raise ValueError(f'{what} {value!r} is not known; choose one of {allowed}.')


def masked_mean(x, mask):
  """Mean of `x` over the positions where `mask` (same shape) is nonzero; 0 if there are none."""
  m = jnp.asarray(mask).astype(bool)
  return jnp.sum(jnp.where(m, _f32(x), 0.0)) / jnp.maximum(jnp.sum(m), 1).astype(jnp.float32)


def sequence_logps(token_logps, mask, average: bool = False):
  """Log-prob of each sequence [B]: the sum of `token_logps` [B, T] over `mask` [B, T]
  (1 = a completion token), or with `average` their mean (over max(1, tokens))."""
  m = jnp.asarray(mask).astype(bool)
  total = jnp.sum(jnp.where(m, _f32(token_logps), 0.0), axis=-1)
  if average:
    return total / jnp.maximum(jnp.sum(m, axis=-1), 1).astype(jnp.float32)
  return total


# ----------------------------------------------------------------------------- paired preferences

def _smoothed_logistic(z, label_smoothing: float):
  """-(1 - eps) log sigma(z) - eps log sigma(-z): the logistic loss with labels smoothed by eps."""
  return (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(z)
          - label_smoothing * jax.nn.log_sigmoid(-z))


def _log1mexp(x):
  """log(1 - exp(x)) for x < 0, the stable branch on each side of -log 2 (Maechler 2012), each
  branch fed only its own side so that neither leaks a NaN into the gradient."""
  t = -math.log(2.0)
  low = jnp.log1p(-jnp.exp(jnp.minimum(x, t)))
  high = jnp.log(-jnp.expm1(jnp.maximum(x, t)))
  return jnp.where(x < t, low, high)


def orpo_log_odds(chosen_avg_logps, rejected_avg_logps):
  """ORPO's log odds ratio [B] of the chosen over the rejected response, from average per-token
  log-probs [B] (< 0): (a_c - a_r) - (log(1 - e^a_c) - log(1 - e^a_r)). TRL logs the batch
  means of it (log_odds_chosen) and of its log sigma (log_odds_ratio)."""
  ac, ar = _f32(chosen_avg_logps), _f32(rejected_avg_logps)
  return (ac - ar) - (_log1mexp(ac) - _log1mexp(ar))


def dpo_losses(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None,
               ref_rejected_logps=None, *, loss_type: str = 'sigmoid', beta: float = 0.1,
               label_smoothing: float = 0.0, chosen_lengths=None, rejected_lengths=None,
               simpo_gamma: float = 0.5, cpo_alpha: float = 0.0, chosen_nll=None):
  """(losses, chosen_rewards, rejected_rewards), each [B], of the paired loss `loss_type` (one
  of PAIRED_LOSSES; formulas and TRL counterparts in the module docstring).

  The log-probs [B] are summed over each completion's tokens (`sequence_logps`); the reference
  ones are needed except for REFERENCE_FREE losses. `chosen_lengths`, `rejected_lengths` [B]
  are the completion token counts, needed for LENGTH_NORMALISED losses. `label_smoothing` is
  eps of sigmoid (cDPO), robust (flip rate < 0.5) and simpo; `simpo_gamma` the SimPO margin;
  `chosen_nll` (scalar or [B]) the chosen responses' NLL, needed for orpo and for simpo with
  `cpo_alpha` != 0. The rewards carry no gradient.
  """
  _check(loss_type, PAIRED_LOSSES, 'loss_type')
  if loss_type in LENGTH_NORMALISED and (chosen_lengths is None or rejected_lengths is None):
    raise ValueError(f'{loss_type} averages log-probs over tokens: it needs chosen_lengths and '
                     'rejected_lengths.')
  if loss_type not in REFERENCE_FREE and (ref_chosen_logps is None or ref_rejected_logps is None):
    raise ValueError(f'{loss_type} needs the reference log-probs.')
  if loss_type == 'robust' and not 0.0 <= label_smoothing < 0.5:
    raise ValueError(f'robust needs 0 <= label_smoothing < 0.5, got {label_smoothing}.')
  needs_nll = loss_type == 'orpo' or (loss_type == 'simpo' and cpo_alpha != 0.0)
  if needs_nll and chosen_nll is None:
    raise ValueError(f'{loss_type} (cpo_alpha={cpo_alpha}) needs chosen_nll.')
  pc, pr = _f32(policy_chosen_logps), _f32(policy_rejected_logps)

  if loss_type in REFERENCE_FREE:
    ac = pc / jnp.maximum(_f32(chosen_lengths), 1.0)
    ar = pr / jnp.maximum(_f32(rejected_lengths), 1.0)
    if loss_type == 'simpo':
      losses = _smoothed_logistic(beta * (ac - ar) - simpo_gamma, label_smoothing)
      if cpo_alpha != 0.0:
        losses = losses + cpo_alpha * _f32(chosen_nll)
    else:
      losses = _f32(chosen_nll) - beta * jax.nn.log_sigmoid(orpo_log_odds(ac, ar))
    return losses, jax.lax.stop_gradient(beta * ac), jax.lax.stop_gradient(beta * ar)

  chosen_logratios = pc - _f32(ref_chosen_logps)
  rejected_logratios = pr - _f32(ref_rejected_logps)
  z = beta * (chosen_logratios - rejected_logratios)
  if loss_type == 'sigmoid':
    losses = _smoothed_logistic(z, label_smoothing)
  elif loss_type == 'hinge':
    losses = jax.nn.relu(1.0 - z)
  elif loss_type == 'ipo':
    delta = (chosen_logratios / jnp.maximum(_f32(chosen_lengths), 1.0)
             - rejected_logratios / jnp.maximum(_f32(rejected_lengths), 1.0))
    losses = jnp.square(delta - 1.0 / (2.0 * beta))
  else:  # robust
    losses = ((-(1.0 - label_smoothing) * jax.nn.log_sigmoid(z)
               + label_smoothing * jax.nn.log_sigmoid(-z)) / (1.0 - 2.0 * label_smoothing))
  return (losses, jax.lax.stop_gradient(beta * chosen_logratios),
          jax.lax.stop_gradient(beta * rejected_logratios))


# ----------------------------------------------------------------------------- KTO

def kto_kl(policy_kl_logps, ref_kl_logps):
  """KTO's reference point z0, a scalar without gradient: max(0, mean(policy - ref)) of the
  summed log-probs [B] of the KL batch (each prompt with another example's completion). With
  several devices TRL averages the per-device means before the max."""
  kl = jnp.mean(_f32(policy_kl_logps) - _f32(ref_kl_logps))
  return jax.lax.stop_gradient(jnp.maximum(kl, 0.0))


def kto_losses(policy_logps, ref_logps, desirable, kl, *, beta: float = 0.1,
               desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
  """(losses, rewards), each [B], of KTO on unpaired examples: summed completion log-probs of
  the policy and the reference [B], `desirable` [B] (bool: TRL's label), `kl` the reference
  point z0 (`kto_kl`). The loss is the mean of `losses`; the rewards carry no gradient."""
  logratios = _f32(policy_logps) - _f32(ref_logps)
  losses = jnp.where(jnp.asarray(desirable).astype(bool),
                     desirable_weight * (1.0 - jax.nn.sigmoid(beta * (logratios - kl))),
                     undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (kl - logratios))))
  return losses, jax.lax.stop_gradient(beta * logratios)


# ----------------------------------------------------------------------------- reward model

def reward_loss(chosen_rewards, rejected_rewards, margin=None,
                center_rewards_coefficient: float = 0.0):
  """Bradley-Terry loss of each pair [B] from the reward model's scalar rewards [B]:
  -log sigma(r_c - r_r - margin) + center_rewards_coefficient (r_c + r_r)^2; `margin` [B] or
  None (0)."""
  rc, rr = _f32(chosen_rewards), _f32(rejected_rewards)
  diff = rc - rr if margin is None else rc - rr - _f32(margin)
  return -jax.nn.log_sigmoid(diff) + center_rewards_coefficient * jnp.square(rc + rr)


# ----------------------------------------------------------------------------- GRPO

def _nanstd(x, axis, ddof: int):
  """Standard deviation of x along `axis` (None: all), NaNs left out, with `ddof` subtracted
  from the count; NaN where at most `ddof` values are left (TRL's `nanstd` is ddof=1)."""
  mean = jnp.nanmean(x, axis=axis, keepdims=True)
  var = jnp.nanmean(jnp.square(x - mean), axis=axis, keepdims=True)
  n = jnp.sum(~jnp.isnan(x), axis=axis, keepdims=True).astype(jnp.float32)
  correction = jnp.where(n > ddof, n / jnp.maximum(n - ddof, 1.0), jnp.nan)
  return jnp.sqrt(var * correction)


def group_advantages(rewards, group_size: int, *, scale_rewards: str = 'group',
                     epsilon: float = 1e-4, ddof: int = 1):
  """GRPO advantages [N] of `rewards` [N], consecutive groups of `group_size` completions of one
  prompt: (r - group mean) / (std + epsilon), the std of the group ('group') or of the batch
  ('batch'), or r - group mean ('none'). NaN rewards are left out and get advantage 0. The
  defaults are TRL's (GRPOTrainer, multi_objective_aggregation='sum_then_normalize')."""
  _check(scale_rewards, SCALE_REWARDS, 'scale_rewards')
  r = _f32(rewards).reshape(-1, group_size)
  advantages = r - jnp.nanmean(r, axis=1, keepdims=True)
  if scale_rewards == 'group':
    advantages = advantages / (_nanstd(r, 1, ddof) + epsilon)
  elif scale_rewards == 'batch':
    advantages = advantages / (_nanstd(r, None, ddof) + epsilon)
  return jnp.nan_to_num(advantages.reshape(-1), nan=0.0)


def kl_penalty(logps, ref_logps, estimator: str = 'k3'):
  """Per-token estimate [B, T] of KL(policy || reference) from the sampled tokens' log-probs:
  'k1' logp - ref, 'k3' exp(ref - logp) - (ref - logp) - 1 (non-negative; GRPO's)."""
  _check(estimator, KL_ESTIMATORS, 'kl estimator')
  log_ratio = _f32(ref_logps) - _f32(logps)
  if estimator == 'k1':
    return -log_ratio
  return jnp.exp(log_ratio) - log_ratio - 1.0


def _ratio_and_advantages(logps, old_logps, advantages):
  """(rho [B, T], A [B, 1] or [B, T]): rho = exp(logps - old_logps) from log-probs [B, T], the
  advantages [B] (one per sequence) or [B, T] made to broadcast against it."""
  a = _f32(advantages)
  return jnp.exp(_f32(logps) - _f32(old_logps)), a[:, None] if a.ndim == 1 else a


def _surrogate_terms(logps, old_logps, advantages, epsilon_low: float, epsilon_high: float):
  """(-rho A, -clip(rho, 1 - epsilon_low, 1 + epsilon_high) A) [B, T] (`_ratio_and_advantages`)."""
  ratio, a = _ratio_and_advantages(logps, old_logps, advantages)
  return -ratio * a, -jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high) * a


def grpo_per_token_loss(logps, old_logps, ref_logps, advantages, *, epsilon_low: float = 0.2,
                        epsilon_high: float = 0.2, beta: float = 0.0):
  """GRPO's per-token loss [B, T]: -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) + beta k3,
  from the current, sampling-time and reference log-probs of the sampled tokens [B, T]
  (`ref_logps` may be None when beta is 0) and advantages [B] or [B, T]."""
  unclipped, clipped = _surrogate_terms(logps, old_logps, advantages, epsilon_low, epsilon_high)
  loss = jnp.maximum(unclipped, clipped)
  if beta != 0.0:
    loss = loss + beta * kl_penalty(logps, ref_logps, 'k3')
  return loss


def aggregate_token_loss(per_token_loss, mask, *, loss_type: str = 'dapo',
                         max_completion_length: int | None = None, num_items=None):
  """The scalar loss from a per-token loss [B, T] over the completion `mask` [B, T], as TRL's
  GRPO `loss_type` aggregates it (module docstring): 'grpo', 'bnpo', 'dr_grpo' (needs
  `max_completion_length`) or 'dapo' (`num_items`: the accumulated batch's token count; default
  this batch's)."""
  _check(loss_type, GRPO_LOSSES, 'loss_type')
  m = jnp.asarray(mask).astype(bool)
  masked = jnp.where(m, _f32(per_token_loss), 0.0)
  tokens = jnp.sum(m).astype(jnp.float32)
  if loss_type == 'grpo':
    lengths = jnp.maximum(jnp.sum(m, axis=-1), 1).astype(jnp.float32)
    return jnp.mean(jnp.sum(masked, axis=-1) / lengths)
  if loss_type == 'bnpo':
    return jnp.sum(masked) / jnp.maximum(tokens, 1.0)
  if loss_type == 'dr_grpo':
    if max_completion_length is None:
      raise ValueError('dr_grpo divides by max_completion_length; pass it.')
    return jnp.sum(masked) / (masked.shape[0] * max_completion_length)
  items = tokens if num_items is None else _f32(num_items)
  return jnp.sum(masked) / jnp.maximum(items, 1.0)


def grpo_token_loss(logps, old_logps, ref_logps, advantages, completion_mask, *,
                    epsilon_low: float = 0.2, epsilon_high: float = 0.2, beta: float = 0.0,
                    loss_type: str = 'dapo', max_completion_length: int | None = None,
                    num_items=None):
  """GRPO's scalar loss (TRL's GRPOTrainer._compute_loss, token-level importance sampling, no
  gradient accumulation): `grpo_per_token_loss` aggregated by `aggregate_token_loss`. Log-probs
  and `completion_mask` [B, T]; advantages [B] or [B, T]; the defaults are TRL's."""
  per_token = grpo_per_token_loss(logps, old_logps, ref_logps, advantages,
                                  epsilon_low=epsilon_low, epsilon_high=epsilon_high, beta=beta)
  return aggregate_token_loss(per_token, completion_mask, loss_type=loss_type,
                              max_completion_length=max_completion_length, num_items=num_items)


def grpo_clip_flags(logps, old_logps, advantages, *, epsilon_low: float = 0.2,
                    epsilon_high: float = 0.2):
  """(low, high), bool [B, T]: where the ratio rho was clipped from below with a negative
  advantage and from above with a positive one. Their `masked_mean`s over the completion mask
  (and that of low | high) are TRL's clip_ratio/low_mean, high_mean and region_mean."""
  ratio, a = _ratio_and_advantages(logps, old_logps, advantages)
  return (ratio < 1.0 - epsilon_low) & (a < 0), (ratio > 1.0 + epsilon_high) & (a > 0)


# ----------------------------------------------------------------------------- PPO

def ppo_value_mask(mask):
  """TRL PPO's episode mask [B, T] of right-padded response masks [B, T]: the response tokens
  and the position after the last one (where the value is kept and the score lands); a
  response that fills all T positions gets no extra one."""
  m = jnp.asarray(mask).astype(jnp.int32)
  return jnp.arange(m.shape[-1])[None, :] <= jnp.sum(m, axis=-1, keepdims=True)


def ppo_rewards(logps, ref_logps, scores, mask, *, kl_coef: float = 0.05,
                kl_estimator: str = 'k1', score_index=None):
  """Per-token rewards [B, T]: -kl_coef * `kl_penalty` on the response tokens (`mask` [B, T]),
  plus `scores` [B] (the reward model's) at `score_index` [B] (default: each response's last
  token; TRL's PPO: the last position of `ppo_value_mask`). Log-probs [B, T]."""
  m = jnp.asarray(mask).astype(bool)
  rewards = -kl_coef * jnp.where(m, kl_penalty(logps, ref_logps, kl_estimator), 0.0)
  if score_index is None:
    score_index = jnp.maximum(jnp.sum(m, axis=-1) - 1, 0)
  at_score = jnp.arange(m.shape[-1])[None, :] == jnp.asarray(score_index)[:, None]
  return rewards + jnp.where(at_score, _f32(scores)[:, None], 0.0)


def gae(rewards, values, mask, *, gamma: float = 1.0, lam: float = 0.95):
  """(advantages, returns) [B, T] by generalised advantage estimation from per-token `rewards`
  and `values` [B, T] over the episode `mask` [B, T] (0 ends an episode: no reward, no value,
  no bootstrap across it). Defaults: TRL's PPOConfig."""
  m = jnp.asarray(mask).astype(bool)
  r = jnp.where(m, _f32(rewards), 0.0)
  v = jnp.where(m, _f32(values), 0.0)
  next_v = jnp.concatenate([v[:, 1:], jnp.zeros_like(v[:, :1])], axis=1)
  delta = r + gamma * next_v - v

  def step(next_advantage, x):
    delta_t, m_t = x
    advantage = jnp.where(m_t, delta_t + gamma * lam * next_advantage, 0.0)
    return advantage, advantage

  _, advantages = jax.lax.scan(step, jnp.zeros(r.shape[0], jnp.float32), (delta.T, m.T),
                               reverse=True)
  advantages = advantages.T
  return advantages, advantages + v


def masked_whiten(values, mask, *, shift_mean: bool = True, eps: float = 1e-8):
  """`values` [B, T] whitened over `mask` (needs >= 2 positions): (x - mean) / sqrt(var + eps),
  var with Bessel's correction, the mean added back if not `shift_mean`; 0 outside the mask
  (TRL fills those positions with 0 after whitening)."""
  m = jnp.asarray(mask).astype(bool)
  x = _f32(values)
  mean = masked_mean(x, m)
  n = jnp.sum(m).astype(jnp.float32)
  var = masked_mean(jnp.square(x - mean), m) * n / (n - 1.0)
  whitened = (x - mean) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    whitened = whitened + mean
  return jnp.where(m, whitened, 0.0)


def ppo_policy_loss(logps, old_logps, advantages, mask, *, clip: float = 0.2):
  """(loss, clip fraction), scalars: the masked mean over `mask` [B, T] of PPO's clipped
  surrogate -min(rho A, clip(rho, 1 - clip, 1 + clip) A), and of where clipping won; log-probs
  and `advantages` [B, T]."""
  unclipped, clipped = _surrogate_terms(logps, old_logps, advantages, clip, clip)
  return (masked_mean(jnp.maximum(unclipped, clipped), mask),
          masked_mean(clipped > unclipped, mask))


def ppo_value_loss(values, old_values, returns, mask, *, clip_value: float = 0.2):
  """(loss, clip fraction), scalars: 0.5 times the masked mean over `mask` [B, T] of
  max((V - R)^2, (clip(V, V_old - clip_value, V_old + clip_value) - R)^2), and of where the
  clipped term was the larger; `values` V, `old_values` V_old (at sampling), `returns` R [B, T]."""
  v, old, ret = _f32(values), _f32(old_values), _f32(returns)
  unclipped = jnp.square(v - ret)
  clipped = jnp.square(jnp.clip(v, old - clip_value, old + clip_value) - ret)
  return (0.5 * masked_mean(jnp.maximum(unclipped, clipped), mask),
          masked_mean(clipped > unclipped, mask))
