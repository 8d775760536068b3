"""Tests for flaxllm.objectives.align.losses: every loss against a hand computation in numpy on a
tiny example, and against TRL's own implementation on the same numbers (as torch tensors).

TRL's losses are trainer methods; a trainer is made with `object.__new__` and given only the
attributes the method reads (`_bare`), the model being a stand-in that returns the per-token
log-probs of the test (TRL's fused LM head returns them zero outside the completion). PPO is
gone from TRL 1.16: its reference is the torch lines of TRL's last PPOTrainer, copied below.
"""
import functools
import math
import os
from collections import defaultdict
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxllm.objectives.align import losses as L

torch = pytest.importorskip('torch')
os.environ.setdefault('TRL_EXPERIMENTAL_SILENCE', '1')
trl = pytest.importorskip('trl')

from trl.experimental.cpo import CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOTrainer  # noqa: E402
from trl.trainer.utils import nanstd  # noqa: E402

RTOL, ATOL = 1e-5, 1e-6


def close(actual, expected, rtol=RTOL, atol=ATOL):
  np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64),
                             rtol=rtol, atol=atol)


def np_logsig(x):
  return -np.logaddexp(0.0, -np.asarray(x, np.float64))


def np_sig(x):
  return np.exp(np_logsig(x))


def t(x, **kw):
  return torch.tensor(np.asarray(x), dtype=torch.float32, **kw)


class _Accelerator:
  """What TRL's loss code asks of accelerate's Accelerator, on one CPU process."""
  device = torch.device('cpu')
  num_processes = 1
  process_index = 0
  sync_gradients = True

  def gather(self, x):
    return x

  gather_for_metrics = gather

  def reduce(self, x, reduction='sum'):
    return x


def _bare(cls, **attrs):
  """A TRL trainer without __init__: the given attributes, a one-process accelerator, metric
  stores, a token counter and a model in eval mode (TRL picks 'train' / 'eval' metrics and
  accumulation scaling by it)."""
  trainer = object.__new__(cls)
  trainer.accelerator = _Accelerator()
  trainer._metrics = {'train': defaultdict(list), 'eval': defaultdict(list)}
  trainer.model = SimpleNamespace(training=False)
  trainer.aux_loss_enabled = False
  trainer._total_train_tokens, trainer._tp_size = 0, 1
  for k, v in attrs.items():
    setattr(trainer, k, v)
  return trainer


# ----------------------------------------------------------------------------- data

@pytest.fixture(scope='module')
def pairs():
  """B=4 preference pairs, S=7 positions (the first a prompt token): per-token log-probs of
  policy and reference, rows [chosen..., rejected...] [2B, S-1], the completion mask of the
  shifted labels [2B, S-1] (right-padded, 1 to 6 tokens), and the summed log-probs [B]."""
  rng = np.random.default_rng(0)
  b, s = 4, 7
  lengths = np.array([6, 3, 1, 4, 2, 6, 5, 3])
  mask = (np.arange(s - 1)[None] < lengths[:, None]).astype(np.float32)
  policy = (-rng.gamma(2.0, 0.6, (2 * b, s - 1)) * mask).astype(np.float32)
  ref = (policy + rng.normal(0, 0.4, policy.shape) * mask).astype(np.float32)
  ref = np.minimum(ref, -1e-3) * mask
  ref = ref.astype(np.float32)
  policy_sums, ref_sums = policy.sum(1), ref.sum(1)
  return SimpleNamespace(
      b=b, s=s, mask=mask, policy=policy, ref=ref, lengths=lengths, pc=policy_sums[:b],
      pr=policy_sums[b:], rc=ref_sums[:b], rr=ref_sums[b:], lc=lengths[:b], lr=lengths[b:])


# ----------------------------------------------------------------------------- sequence_logps

def test_sequence_logps_hand_and_trl():
  """sum / mean over the mask; equals TRL's CPOTrainer.get_batch_logps (average_log_prob False
  and True; labels -100 outside the completion, shifted by one) on random logits."""
  tok = np.array([[-1.0, -2.0, -3.0], [-0.5, -9.0, -9.0]], np.float32)
  mask = np.array([[1, 1, 0], [1, 0, 0]])
  close(L.sequence_logps(tok, mask), [-3.0, -0.5])
  close(L.sequence_logps(tok, mask, average=True), [-1.5, -0.5])
  close(L.sequence_logps(tok, np.zeros_like(mask), average=True), [0.0, 0.0])

  rng = np.random.default_rng(1)
  logits = rng.normal(size=(3, 6, 11)).astype(np.float32)
  labels = rng.integers(0, 11, (3, 6))
  labels[:, :2] = -100
  labels[1, 4:] = -100
  labels[2, 3:] = -100
  logp = logits[:, :-1] - np.log(np.exp(logits[:, :-1]).sum(-1, keepdims=True))
  target = labels[:, 1:]
  tok = np.take_along_axis(logp, np.maximum(target, 0)[..., None], -1)[..., 0]
  for average in (False, True):
    expected = CPOTrainer.get_batch_logps(t(logits), torch.tensor(labels), average).numpy()
    close(jax.jit(L.sequence_logps, static_argnums=2)(tok, target != -100, average), expected)


# ----------------------------------------------------------------------------- DPO family

def _np_dpo(d, loss_type, beta, eps=0.0, gamma=0.5, nll=0.0):
  """The paired losses from their formulas (module docstring of losses.py) in numpy."""
  h = (d.pc - d.rc) - (d.pr - d.rr)
  if loss_type == 'sigmoid':
    return -(1 - eps) * np_logsig(beta * h) - eps * np_logsig(-beta * h)
  if loss_type == 'hinge':
    return np.maximum(0.0, 1 - beta * h)
  if loss_type == 'ipo':
    return ((d.pc - d.rc) / d.lc - (d.pr - d.rr) / d.lr - 1 / (2 * beta)) ** 2
  if loss_type == 'robust':
    return (-(1 - eps) * np_logsig(beta * h) + eps * np_logsig(-beta * h)) / (1 - 2 * eps)
  ac, ar = d.pc / d.lc, d.pr / d.lr
  if loss_type == 'simpo':
    z = beta * (ac - ar) - gamma
    return -(1 - eps) * np_logsig(z) - eps * np_logsig(-z) + nll
  odds = (ac - ar) - (np.log(1 - np.exp(ac)) - np.log(1 - np.exp(ar)))
  return nll - beta * np_logsig(odds)


def _dpo(d, loss_type, **kw):
  f = jax.jit(functools.partial(L.dpo_losses, loss_type=loss_type, **kw))
  return f(d.pc, d.pr, d.rc, d.rr, chosen_lengths=d.lc, rejected_lengths=d.lr)


TINY = SimpleNamespace(pc=np.array([-5.0, -7.0, -3.0]), pr=np.array([-6.0, -4.0, -3.5]),
                       rc=np.array([-5.5, -6.0, -3.2]), rr=np.array([-5.8, -5.0, -3.1]),
                       lc=np.array([4, 6, 2]), lr=np.array([5, 3, 3]))


@pytest.mark.parametrize('loss_type,kw', [
    ('sigmoid', {}), ('sigmoid', {'label_smoothing': 0.1}), ('hinge', {}), ('ipo', {}),
    ('robust', {'label_smoothing': 0.2}), ('simpo', {'label_smoothing': 0.1, 'simpo_gamma': 0.3}),
    ('simpo', {'cpo_alpha': 0.5, 'chosen_nll': 1.25}), ('orpo', {'chosen_nll': 1.25})])
def test_dpo_losses_hand(loss_type, kw):
  """Every paired loss on a tiny example equals its formula in numpy; the rewards are beta times
  the summed log-ratios, or for simpo / orpo beta times the average log-probs."""
  beta = 0.5
  losses, chosen, rejected = _dpo(TINY, loss_type, beta=beta, **kw)
  nll = kw.get('cpo_alpha', 1.0) * kw.get('chosen_nll', 0.0)
  close(losses, _np_dpo(TINY, loss_type, beta, kw.get('label_smoothing', 0.0),
                        kw.get('simpo_gamma', 0.5), nll))
  if loss_type in L.REFERENCE_FREE:
    close(chosen, beta * TINY.pc / TINY.lc)
    close(rejected, beta * TINY.pr / TINY.lr)
  else:
    close(chosen, beta * (TINY.pc - TINY.rc))
    close(rejected, beta * (TINY.pr - TINY.rr))


def test_dpo_policy_equal_reference_is_log2():
  """With the policy equal to the reference the DPO (sigmoid) loss is log 2, rewards 0."""
  logps = jnp.array([-3.0, -10.0, -0.5])
  losses, chosen, rejected = L.dpo_losses(logps, logps[::-1], logps, logps[::-1], beta=0.1)
  close(losses, [math.log(2.0)] * 3)
  close(chosen, [0.0] * 3)
  close(rejected, [0.0] * 3)


def test_dpo_losses_refuse_missing_inputs():
  """Unknown loss types and missing lengths, reference, NLL or a bad flip rate are refused."""
  x = jnp.zeros(2)
  with pytest.raises(ValueError, match='not known'):
    L.dpo_losses(x, x, x, x, loss_type='kto')
  with pytest.raises(ValueError, match='lengths'):
    L.dpo_losses(x, x, x, x, loss_type='ipo')
  with pytest.raises(ValueError, match='reference'):
    L.dpo_losses(x, x, loss_type='hinge')
  with pytest.raises(ValueError, match='chosen_nll'):
    L.dpo_losses(x, x, loss_type='orpo', chosen_lengths=x, rejected_lengths=x)
  with pytest.raises(ValueError, match='label_smoothing'):
    L.dpo_losses(x, x, x, x, loss_type='robust', label_smoothing=0.5)


def _trl_dpo_pair(d, i, loss_type, beta, label_smoothing):
  """TRL's DPOTrainer._compute_loss on pair i alone: (loss, rewards/chosen, rewards/rejected),
  the reference log-probs precomputed, the policy's per-token log-probs from a stand-in model."""
  trainer = _bare(trl.DPOTrainer, beta=beta, loss_types=[loss_type], loss_weights=[1.0],
                  label_smoothing=label_smoothing, f_divergence_type='reverse_kl', ld_alpha=None,
                  precompute_ref_logps=True, use_weighting=False,
                  args=SimpleNamespace(discopop_tau=0.05))
  rows = [i, d.b + i]
  mask = t(d.mask[rows])
  out = SimpleNamespace(log_probs=t(d.policy[rows]) * mask, entropy=torch.zeros_like(mask),
                        mean_logits=torch.zeros_like(mask), is_top1=torch.zeros_like(mask).bool())
  inputs = {'input_ids': torch.ones((2, d.s), dtype=torch.long),
            'attention_mask': torch.ones((2, d.s), dtype=torch.long),
            'completion_mask': torch.cat([torch.zeros((2, 1)), mask], 1).long(),
            'ref_chosen_logps': t(d.rc[i:i + 1]), 'ref_rejected_logps': t(d.rr[i:i + 1])}
  loss = trainer._compute_loss(lambda **kw: out, inputs, return_outputs=False)
  metrics = trainer._metrics['eval']
  return loss.item(), metrics['rewards/chosen'][-1], metrics['rewards/rejected'][-1]


@pytest.mark.parametrize('loss_type,label_smoothing', [
    ('sigmoid', 0.0), ('hinge', 0.0), ('ipo', 0.0), ('robust', 0.1)])
def test_dpo_losses_match_trl_dpo_trainer(pairs, loss_type, label_smoothing):
  """Per pair, losses and rewards equal TRL's DPOTrainer._compute_loss (sigmoid, hinge, ipo
  with TRL's division by the completion token counts, robust)."""
  beta = 0.3
  losses, chosen, rejected = _dpo(pairs, loss_type, beta=beta, label_smoothing=label_smoothing)
  for i in range(pairs.b):
    loss, rc, rr = _trl_dpo_pair(pairs, i, loss_type, beta, label_smoothing)
    close(losses[i], loss)
    close(chosen[i], rc)
    close(rejected[i], rr)


def test_cdpo_matches_trl_cpo_sigmoid(pairs):
  """sigmoid with label_smoothing (cDPO) equals TRL's CPOTrainer.cpo_loss (loss_type='sigmoid',
  the same smoothed logistic) fed the log-ratios policy - reference; TRL 1.16's DPOTrainer has
  no label smoothing for sigmoid."""
  beta, eps = 0.3, 0.15
  losses, _, _ = _dpo(pairs, 'sigmoid', beta=beta, label_smoothing=eps)
  trainer = _bare(CPOTrainer, alpha=0.0, loss_type='sigmoid', beta=beta, label_smoothing=eps)
  expected, _, _ = trainer.cpo_loss(t(pairs.pc - pairs.rc), t(pairs.pr - pairs.rr))
  close(losses, expected.numpy())


def _mock_forward(avg_c, avg_r, nll):
  """A stand-in for TRL's CPO / ORPO `concatenated_forward`: average log-probs, logits, NLL."""
  logits = torch.zeros((len(avg_c), 2, 3))
  return lambda model, batch: (t(avg_c), t(avg_r), logits, logits, torch.tensor(nll))


@pytest.mark.parametrize('cpo_alpha,eps', [(0.0, 0.0), (1.0, 0.1)])
def test_simpo_matches_trl_cpo(pairs, cpo_alpha, eps):
  """simpo equals TRL's CPOTrainer (loss_type='simpo'): per pair `cpo_loss` (losses, rewards) on
  the average log-probs, and the batch mean plus cpo_alpha * NLL of `get_batch_loss_metrics`."""
  beta, gamma, nll = 2.0, 0.7, 1.3
  losses, chosen, rejected = _dpo(pairs, 'simpo', beta=beta, label_smoothing=eps,
                                  simpo_gamma=gamma, cpo_alpha=cpo_alpha, chosen_nll=nll)
  avg_c, avg_r = pairs.pc / pairs.lc, pairs.pr / pairs.lr
  trainer = _bare(CPOTrainer, alpha=0.0, loss_type='simpo', beta=beta, label_smoothing=eps,
                  simpo_gamma=gamma, cpo_alpha=cpo_alpha,
                  concatenated_forward=_mock_forward(avg_c, avg_r, nll))
  per_pair, trl_chosen, trl_rejected = trainer.cpo_loss(t(avg_c), t(avg_r))
  close(losses - cpo_alpha * nll, per_pair.numpy())
  close(chosen, trl_chosen.numpy())
  close(rejected, trl_rejected.numpy())
  loss, _ = trainer.get_batch_loss_metrics(None, {})
  close(jnp.mean(losses), loss.item())


def test_orpo_matches_trl(pairs):
  """orpo equals TRL's ORPOTrainer: per pair -beta log sigma(log odds) from `odds_ratio_loss`
  (which returns +beta log sigma), its rewards and mean log odds, and `get_batch_loss_metrics`'s
  nll - mean."""
  beta, nll = 0.25, 2.1
  losses, chosen, rejected = _dpo(pairs, 'orpo', beta=beta, chosen_nll=nll)
  avg_c, avg_r = pairs.pc / pairs.lc, pairs.pr / pairs.lr
  trainer = _bare(ORPOTrainer, beta=beta, concatenated_forward=_mock_forward(avg_c, avg_r, nll))
  per_pair, trl_chosen, trl_rejected, _, log_odds = trainer.odds_ratio_loss(t(avg_c), t(avg_r))
  close(losses - nll, -per_pair.numpy())
  close(chosen, trl_chosen.numpy())
  close(rejected, trl_rejected.numpy())
  close(jnp.mean(L.orpo_log_odds(avg_c, avg_r)), log_odds.item())
  loss, _ = trainer.get_batch_loss_metrics(None, {})
  close(jnp.mean(losses), loss.item())


def test_orpo_log_odds_stable_near_zero():
  """log(1 - e^a) takes its stable branch on each side of -log 2 (average log-probs near 0 and
  very negative), and neither branch puts a NaN into the gradient."""
  a = np.array([-1e-4, -0.6931, -0.7, -30.0])
  b = a - 0.5
  expected = (a - b) - (np.log(-np.expm1(a)) - np.log(-np.expm1(b)))
  close(L.orpo_log_odds(a, b), expected)
  grad = jax.grad(lambda x: jnp.sum(L.orpo_log_odds(x, x - 0.5)))(jnp.asarray(a, jnp.float32))
  assert np.all(np.isfinite(grad))


# ----------------------------------------------------------------------------- KTO

KTO_DATA = SimpleNamespace(
    policy=np.array([-4.0, -6.0, -2.0, -8.0, -5.0]),
    ref=np.array([-4.5, -5.0, -2.5, -7.0, -5.5]),
    desirable=np.array([True, False, True, False, True]),
    kl_policy=np.array([-9.0, -7.0, -8.0, -6.0, -7.5]),
    kl_ref=np.array([-9.3, -7.5, -7.9, -6.6, -7.4]))


def test_kto_hand():
  """z0 = max(0, mean KL-batch log-ratio); losses w (1 - sigma(beta (r - z0))) for desirable and
  w (1 - sigma(beta (z0 - r))) for undesirable examples; z0 is clamped at 0 and has no gradient."""
  d, beta = KTO_DATA, 0.5
  z0 = max(0.0, np.mean(d.kl_policy - d.kl_ref))
  r = d.policy - d.ref
  expected = np.where(d.desirable, 1.3 * (1 - np_sig(beta * (r - z0))),
                      0.7 * (1 - np_sig(beta * (z0 - r))))
  kl = L.kto_kl(d.kl_policy, d.kl_ref)
  close(kl, z0)
  losses, rewards = L.kto_losses(d.policy, d.ref, d.desirable, kl, beta=beta,
                                 desirable_weight=1.3, undesirable_weight=0.7)
  close(losses, expected)
  close(rewards, beta * r)
  close(L.kto_kl(d.kl_ref, d.kl_policy), 0.0)
  close(jax.grad(lambda x: L.kto_kl(x, d.kl_ref))(jnp.asarray(d.kl_policy)), np.zeros(5))


def test_kto_matches_trl():
  """The mean KTO loss, its gradient per example, the KL and the mean rewards equal TRL's
  KTOTrainer._compute_loss (loss_type='kto', reference log-probs precomputed)."""
  d, beta, wd, wu = KTO_DATA, 0.5, 1.3, 0.7
  n, s, s_kl = len(d.policy), 5, 6
  rng = np.random.default_rng(2)
  # per-token log-probs whose sums are the data: the last 3 positions are the completion
  share = rng.dirichlet(np.ones(3), n)
  tokens = np.zeros((n, s - 1), np.float32)
  tokens[:, -3:] = d.policy[:, None] * share
  kl_tokens = np.zeros((n, s_kl - 1), np.float32)
  kl_tokens[:, -1] = d.kl_policy
  policy_tokens = t(tokens, requires_grad=True)

  def model(**kw):
    if kw['input_ids'].shape[1] == s_kl:
      return SimpleNamespace(log_probs=t(kl_tokens))
    zeros = torch.zeros((n, s - 1))
    return SimpleNamespace(log_probs=policy_tokens, entropy=zeros, mean_logits=zeros)

  trainer = _bare(trl.KTOTrainer, beta=beta, loss_type='kto', desirable_weight=wd,
                  undesirable_weight=wu, calculate_KL=True, precompute_ref_logps=True)
  completion_mask = torch.tensor([[0, 0, 1, 1, 1]] * n)
  inputs = {'input_ids': torch.ones((n, s), dtype=torch.long),
            'attention_mask': torch.ones((n, s), dtype=torch.long),
            'completion_mask': completion_mask, 'label': torch.tensor(d.desirable),
            'KL_input_ids': torch.ones((n, s_kl), dtype=torch.long),
            'KL_attention_mask': torch.ones((n, s_kl), dtype=torch.long),
            'KL_completion_mask': torch.ones((n, s_kl), dtype=torch.long),
            'ref_logps': t(d.ref), 'ref_KL_logps': t(d.kl_ref)}
  loss = trainer._compute_loss(model, inputs, return_outputs=False)
  loss.backward()

  def mean_loss(policy):
    losses, _ = L.kto_losses(policy, d.ref, d.desirable, L.kto_kl(d.kl_policy, d.kl_ref),
                             beta=beta, desirable_weight=wd, undesirable_weight=wu)
    return jnp.mean(losses)

  value, grad = jax.value_and_grad(mean_loss)(jnp.asarray(d.policy, jnp.float32))
  close(value, loss.item())
  close(grad, policy_tokens.grad[:, -1].numpy())
  metrics = trainer._metrics['eval']
  close(L.kto_kl(d.kl_policy, d.kl_ref), metrics['kl'][-1])
  _, rewards = L.kto_losses(d.policy, d.ref, d.desirable, 0.0, beta=beta)
  close(np.mean(rewards[d.desirable]), metrics['rewards/chosen'][-1])
  close(np.mean(rewards[~d.desirable]), metrics['rewards/rejected'][-1])


# ----------------------------------------------------------------------------- reward model

@pytest.mark.parametrize('with_margin,center', [(False, 0.0), (True, 0.01)])
def test_reward_loss_hand_and_trl(with_margin, center):
  """-log sigma(r_c - r_r - margin) + c (r_c + r_r)^2 by hand, and per pair equal to TRL's
  RewardTrainer.compute_loss (the model's logits [2B, 1] = chosen then rejected rewards)."""
  rc, rr = np.array([1.5, -0.3, 2.0]), np.array([0.5, 0.4, 2.5])
  margin = np.array([0.2, 0.0, 1.0]) if with_margin else np.zeros(3)
  losses = jax.jit(L.reward_loss, static_argnums=3)(rc, rr, margin if with_margin else None,
                                                    center)
  close(losses, -np_logsig(rc - rr - margin) + center * (rc + rr) ** 2)
  trainer = _bare(trl.RewardTrainer, args=SimpleNamespace(center_rewards_coefficient=center))
  for i in range(3):
    logits = t([[rc[i]], [rr[i]]])
    inputs = {'input_ids': torch.ones((2, 3), dtype=torch.long)}
    if with_margin:
      inputs['margin'] = t(margin[i:i + 1])
    loss = trainer.compute_loss(lambda **kw: SimpleNamespace(logits=logits), inputs)
    close(losses[i], loss.item())


# ----------------------------------------------------------------------------- GRPO

def _trl_advantages(rewards, num_generations, scale_rewards):
  """TRL 1.16 trl/trainer/grpo_trainer.py lines 2765-2787 and 2810 (GRPOTrainer.
  _generate_and_score_completions, multi_objective_aggregation='sum_then_normalize'), copied
  without the branches for a single completion: the method needs generation and reward
  functions, so its lines are the reference here."""
  mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
  mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
  if scale_rewards in ['group', 'none']:
    std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)
    std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
  else:
    std_rewards = nanstd(rewards).expand_as(rewards)
  advantages = rewards - mean_grouped_rewards
  if scale_rewards != 'none':
    advantages = advantages / (std_rewards + 1e-4)
  return torch.nan_to_num(advantages, nan=0.0)


def test_group_advantages_hand():
  """(r - group mean) / (group std, ddof 1, + 1e-4); a group of equal rewards gets 0, not NaN;
  'batch' divides by the std of all rewards; 'none' only centres."""
  rewards = np.array([1.0, 0.0, 0.5, 2.0, 2.0, 2.0])
  adv = L.group_advantages(rewards, 3)
  g = rewards[:3]
  close(adv[:3], (g - g.mean()) / (g.std(ddof=1) + 1e-4))
  close(adv[3:], [0.0, 0.0, 0.0])
  batch = L.group_advantages(rewards, 3, scale_rewards='batch')
  close(batch[:3], (g - g.mean()) / (rewards.std(ddof=1) + 1e-4))
  close(L.group_advantages(rewards, 3, scale_rewards='none')[:3], g - g.mean())
  close(L.group_advantages(rewards, 3, ddof=0, epsilon=0.0)[:3], (g - g.mean()) / g.std())
  assert np.all(np.isfinite(adv))


@pytest.mark.parametrize('scale_rewards', ['group', 'batch', 'none'])
def test_group_advantages_match_trl(scale_rewards):
  """Equal to TRL's GRPO advantages (lines copied in `_trl_advantages`, TRL's own `nanstd`) on
  random rewards with an all-equal group and a NaN (unscorable) reward, which gets 0."""
  rng = np.random.default_rng(3)
  rewards = rng.normal(size=12).astype(np.float32)
  rewards[4:8] = 0.5
  rewards[9] = np.nan
  adv = jax.jit(functools.partial(L.group_advantages, group_size=4,
                                  scale_rewards=scale_rewards))(rewards)
  close(adv, _trl_advantages(t(rewards), 4, scale_rewards).numpy())
  close(adv[9], 0.0)


@pytest.fixture(scope='module')
def rollout():
  """B=4 completions of T=6 tokens (right padded): current, sampling-time and reference per-token
  log-probs (far enough apart that the ratio is clipped both ways) and advantages of both signs."""
  rng = np.random.default_rng(4)
  b, tlen = 4, 6
  mask = (np.arange(tlen)[None] < np.array([6, 4, 1, 3])[:, None]).astype(np.float32)
  logps = -rng.gamma(2.0, 0.5, (b, tlen)).astype(np.float32)
  old = (logps + rng.normal(0, 0.3, (b, tlen))).astype(np.float32)
  ref = (logps + rng.normal(0, 0.3, (b, tlen))).astype(np.float32)
  return SimpleNamespace(b=b, t=tlen, mask=mask, logps=logps, old=old, ref=ref,
                         advantages=np.array([1.2, -0.7, 0.4, -1.5], np.float32))


def test_grpo_hand(rollout):
  """The per-token loss -min(rho A, clip(rho) A) + beta k3 and the four aggregations, by hand."""
  r, el, eh, beta = rollout, 0.2, 0.28, 0.04
  rho = np.exp(r.logps - r.old)
  a = r.advantages[:, None]
  k3 = np.exp(r.ref - r.logps) - (r.ref - r.logps) - 1
  per_token = -np.minimum(rho * a, np.clip(rho, 1 - el, 1 + eh) * a) + beta * k3
  got = L.grpo_per_token_loss(r.logps, r.old, r.ref, r.advantages, epsilon_low=el,
                              epsilon_high=eh, beta=beta)
  close(got, per_token)
  m = r.mask
  expected = {'grpo': np.mean((per_token * m).sum(1) / m.sum(1)),
              'bnpo': (per_token * m).sum() / m.sum(),
              'dr_grpo': (per_token * m).sum() / (r.b * 8),
              'dapo': (per_token * m).sum() / 50.0}
  for loss_type, value in expected.items():
    got = L.grpo_token_loss(r.logps, r.old, r.ref, r.advantages, m, epsilon_low=el,
                            epsilon_high=eh, beta=beta, loss_type=loss_type,
                            max_completion_length=8, num_items=50.0)
    close(got, value)
  close(L.kl_penalty(r.logps, r.ref), k3)
  close(L.kl_penalty(r.logps, r.ref, 'k1'), r.logps - r.ref)
  low, high = L.grpo_clip_flags(r.logps, r.old, r.advantages, epsilon_low=el, epsilon_high=eh)
  np.testing.assert_array_equal(low, (rho < 1 - el) & (a < 0))
  np.testing.assert_array_equal(high, (rho > 1 + eh) & (a > 0))
  assert low.any() and high.any()


@pytest.mark.parametrize('loss_type', ['grpo', 'bnpo', 'dr_grpo', 'dapo'])
@pytest.mark.parametrize('beta', [0.0, 0.04])
def test_grpo_matches_trl(rollout, loss_type, beta):
  """The loss, its gradient in the current log-probs, the KL and the clip ratios equal TRL's
  GRPOTrainer._compute_loss (eval mode: no accumulation scaling), with eps_low 0.2, eps_high
  0.28, max_completion_length 8 and for dapo num_items_in_batch 50."""
  r, el, eh = rollout, 0.2, 0.28
  logps = t(r.logps, requires_grad=True)
  trainer = _bare(
      trl.GRPOTrainer, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
      importance_sampling_level='token', beta=beta, loss_type=loss_type, epsilon_low=el,
      epsilon_high=eh, use_vllm=False, vllm_importance_sampling_correction=False,
      max_completion_length=8, _entropy_bonus_enabled=False,
      args=SimpleNamespace(use_bias_correction_kl=False, delta=None),
      _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None))
  inputs = {'prompt_ids': torch.ones((r.b, 2), dtype=torch.long),
            'prompt_mask': torch.ones((r.b, 2), dtype=torch.long),
            'completion_ids': torch.ones((r.b, r.t), dtype=torch.long),
            'completion_mask': t(r.mask), 'advantages': t(r.advantages),
            'old_per_token_logps': t(r.old), 'ref_per_token_logps': t(r.ref),
            'num_items_in_batch': torch.tensor(50.0)}
  loss = trainer._compute_loss(None, inputs)
  loss.backward()

  def ours(x):
    return L.grpo_token_loss(x, r.old, r.ref, r.advantages, r.mask, epsilon_low=el,
                             epsilon_high=eh, beta=beta, loss_type=loss_type,
                             max_completion_length=8, num_items=50.0)

  value, grad = jax.jit(jax.value_and_grad(ours))(jnp.asarray(r.logps))
  close(value, loss.item())
  close(grad * r.mask, logps.grad.numpy() * r.mask)
  metrics = trainer._metrics['eval']
  low, high = L.grpo_clip_flags(r.logps, r.old, r.advantages, epsilon_low=el, epsilon_high=eh)
  close(L.masked_mean(low, r.mask), metrics['clip_ratio/low_mean'][-1])
  close(L.masked_mean(high, r.mask), metrics['clip_ratio/high_mean'][-1])
  close(L.masked_mean(low | high, r.mask), metrics['clip_ratio/region_mean'][-1])
  if beta:
    close(L.masked_mean(L.kl_penalty(r.logps, r.ref), r.mask), metrics['kl'][-1])


# ----------------------------------------------------------------------------- PPO

INVALID_LOGPROB = 1.0


def _trl_masked_mean(values, mask, axis=None):
  if axis is not None:
    return (values * mask).sum(axis=axis) / mask.sum(axis=axis)
  return (values * mask).sum() / mask.sum()


def _trl_masked_var(values, mask):
  mean = _trl_masked_mean(values, mask)
  variance = _trl_masked_mean((values - mean) ** 2, mask)
  mask_sum = mask.sum()
  return variance * (mask_sum / (mask_sum - 1))


def _trl_masked_whiten(values, mask, shift_mean=True):
  mean, var = _trl_masked_mean(values, mask), _trl_masked_var(values, mask)
  whitened = (values - mean) * torch.rsqrt(var + 1e-8)
  if not shift_mean:
    whitened += mean
  return whitened


def _trl_ppo(sequence_lengths, logprobs, ref_logprobs, values, scores, new_logprobs, vpred, args):
  """TRL's PPO rollout processing and losses, copied from trl/experimental/ppo/ppo_trainer.py of
  huggingface/trl at fd09025884b619958c987fdbabf9e50a5bd86cdd (the file's last version; PPO is
  not in TRL 1.16): masked_mean / masked_var / masked_whiten lines 237-270 (above; masked_var's
  zero-mask check left out), PPOTrainer.train lines 762-798 (masks, rewards, whitening, GAE) and
  824-846, 852-854 (value and policy losses, clip fractions) on one micro-batch."""
  responses = torch.zeros(logprobs.shape, dtype=torch.long)
  response_idxs = torch.arange(responses.shape[1], device=responses.device).repeat(
      responses.shape[0], 1)
  padding_mask = response_idxs > sequence_lengths.unsqueeze(1)
  logprobs = torch.masked_fill(logprobs, padding_mask, INVALID_LOGPROB)
  ref_logprobs = torch.masked_fill(ref_logprobs, padding_mask, INVALID_LOGPROB)
  sequence_lengths_p1 = sequence_lengths + 1
  padding_mask_p1 = response_idxs > (sequence_lengths_p1.unsqueeze(1))
  values = torch.masked_fill(values, padding_mask_p1, 0)

  logr = ref_logprobs - logprobs
  kl = -logr if args.kl_estimator == 'k1' else (logr.exp() - 1) - logr
  non_score_reward = -args.kl_coef * kl
  rewards = non_score_reward.clone()
  actual_start = torch.arange(rewards.size(0), device=rewards.device)
  actual_end = torch.where(sequence_lengths_p1 < rewards.size(1), sequence_lengths_p1,
                           sequence_lengths)
  rewards[actual_start, actual_end] += scores

  if args.whiten_rewards:
    rewards = _trl_masked_whiten(rewards, mask=~padding_mask_p1, shift_mean=False)
    rewards = torch.masked_fill(rewards, padding_mask_p1, 0)

  lastgaelam = 0
  advantages_reversed = []
  gen_length = responses.shape[1]
  for t_ in reversed(range(gen_length)):
    nextvalues = values[:, t_ + 1] if t_ < gen_length - 1 else 0.0
    delta = rewards[:, t_] + args.gamma * nextvalues - values[:, t_]
    lastgaelam = delta + args.gamma * args.lam * lastgaelam
    advantages_reversed.append(lastgaelam)
  advantages = torch.stack(advantages_reversed[::-1], axis=1)
  returns = advantages + values
  advantages = _trl_masked_whiten(advantages, ~padding_mask)
  advantages = torch.masked_fill(advantages, padding_mask, 0)

  mb_values, mb_return, mb_advantage, mb_logprobs = values, returns, advantages, logprobs
  new_logprobs = torch.masked_fill(new_logprobs, padding_mask, INVALID_LOGPROB)
  vpred = torch.masked_fill(vpred, padding_mask_p1, 0)
  vpredclipped = torch.clamp(vpred, mb_values - args.cliprange_value,
                             mb_values + args.cliprange_value)
  vf_losses1 = torch.square(vpred - mb_return)
  vf_losses2 = torch.square(vpredclipped - mb_return)
  vf_loss_max = torch.max(vf_losses1, vf_losses2)
  vf_loss = 0.5 * _trl_masked_mean(vf_loss_max, ~padding_mask_p1)
  vf_clipfrac = _trl_masked_mean((vf_losses2 > vf_losses1).float(), ~padding_mask_p1)
  logprobs_diff = new_logprobs - mb_logprobs
  ratio = torch.exp(logprobs_diff)
  pg_losses = -mb_advantage * ratio
  pg_losses2 = -mb_advantage * torch.clamp(ratio, 1.0 - args.cliprange, 1.0 + args.cliprange)
  pg_loss_max = torch.max(pg_losses, pg_losses2)
  pg_loss = _trl_masked_mean(pg_loss_max, ~padding_mask)
  pg_clipfrac = _trl_masked_mean((pg_losses2 > pg_losses).float(), ~padding_mask)
  return SimpleNamespace(rewards=rewards, advantages=advantages, returns=returns,
                         pg_loss=pg_loss, pg_clipfrac=pg_clipfrac, vf_loss=vf_loss,
                         vf_clipfrac=vf_clipfrac)


def test_gae_hand():
  """GAE by the textbook recursion on a tiny episode, its end (mask 0) terminal; returns A + V."""
  rewards = np.array([[0.1, -0.2, 1.0, 9.0]])
  values = np.array([[0.5, 0.3, 0.8, 9.0]])
  mask = np.array([[1, 1, 1, 0]])
  gamma, lam = 0.9, 0.8
  adv, ret = L.gae(rewards, values, mask, gamma=gamma, lam=lam)
  expected, last = np.zeros(4), 0.0
  for k in (2, 1, 0):
    next_value = values[0, k + 1] if k < 2 else 0.0
    last = rewards[0, k] + gamma * next_value - values[0, k] + gamma * lam * last
    expected[k] = last
  close(adv[0], expected)
  close(ret[0], expected + np.array([0.5, 0.3, 0.8, 0.0]))


def test_ppo_pieces_hand():
  """ppo_rewards, ppo_value_mask, masked_whiten and the policy / value losses on a tiny example."""
  logps = np.array([[-1.0, -2.0, -0.5], [-0.3, -1.2, -4.0]])
  ref = np.array([[-1.5, -1.0, -0.5], [-0.2, -3.0, -1.0]])
  mask = np.array([[1, 1, 0], [1, 1, 1]])
  rewards = L.ppo_rewards(logps, ref, np.array([2.0, -1.0]), mask, kl_coef=0.1)
  close(rewards, [[-0.05, 0.1 + 2.0, 0.0], [0.01, -0.18, 0.3 - 1.0]])
  np.testing.assert_array_equal(L.ppo_value_mask(mask), [[1, 1, 1], [1, 1, 1]])
  np.testing.assert_array_equal(L.ppo_value_mask([[1, 0, 0, 0]]), [[1, 1, 0, 0]])

  x = np.array([[1.0, 2.0, 100.0], [4.0, 0.0, 0.0]])
  wmask = np.array([[1, 1, 0], [1, 0, 0]])
  v = np.array([1.0, 2.0, 4.0])
  white = (v - v.mean()) / np.sqrt(v.var(ddof=1) + 1e-8)
  close(L.masked_whiten(x, wmask), [[white[0], white[1], 0.0], [white[2], 0.0, 0.0]])
  close(L.masked_whiten(x, wmask, shift_mean=False)[0, :2], white[:2] + v.mean())

  adv = np.array([[1.0, -1.0, 5.0], [2.0, -0.5, 0.0]])
  new = logps + np.array([[0.5, 0.1, 0.0], [-0.5, 0.3, 0.0]])
  rho = np.exp(new - logps)
  unclipped, clipped = -adv * rho, -adv * np.clip(rho, 0.8, 1.2)
  loss, frac = L.ppo_policy_loss(new, logps, adv, mask, clip=0.2)
  m = mask.astype(bool)
  close(loss, np.maximum(unclipped, clipped)[m].mean())
  close(frac, (clipped > unclipped)[m].mean())
  values, old, returns = new, logps, adv
  unclipped = (values - returns) ** 2
  clipped = (np.clip(values, old - 0.2, old + 0.2) - returns) ** 2
  loss, frac = L.ppo_value_loss(values, old, returns, mask, clip_value=0.2)
  close(loss, 0.5 * np.maximum(unclipped, clipped)[m].mean())
  close(frac, (clipped > unclipped)[m].mean())


@pytest.mark.parametrize('kl_estimator', ['k1', 'k3'])
@pytest.mark.parametrize('whiten_rewards', [False, True])
def test_ppo_matches_trl(kl_estimator, whiten_rewards):
  """Rewards (KL penalty and score), GAE advantages (whitened) and returns, the policy and value
  losses, their gradients and clip fractions equal TRL's PPOTrainer lines (`_trl_ppo`), with
  TRL's episode mask (`ppo_value_mask`): responses of 6 (no room after), 3, 1 and 4 tokens."""
  rng = np.random.default_rng(5)
  b, tlen = 4, 6
  args = SimpleNamespace(kl_estimator=kl_estimator, kl_coef=0.05, whiten_rewards=whiten_rewards,
                         gamma=0.99, lam=0.95, cliprange=0.2, cliprange_value=0.2)
  last = np.array([5, 2, 0, 3])
  logps = -rng.gamma(2.0, 0.5, (b, tlen)).astype(np.float32)
  ref = (logps + rng.normal(0, 0.5, (b, tlen))).astype(np.float32)
  values = rng.normal(size=(b, tlen)).astype(np.float32)
  scores = rng.normal(size=b).astype(np.float32)
  new = (logps + rng.normal(0, 0.3, (b, tlen))).astype(np.float32)
  vpred = (values + rng.normal(0, 0.4, (b, tlen))).astype(np.float32)
  new_t, vpred_t = t(new, requires_grad=True), t(vpred, requires_grad=True)
  ref_out = _trl_ppo(torch.tensor(last), t(logps), t(ref), t(values), t(scores), new_t, vpred_t,
                     args)
  (ref_out.pg_loss + ref_out.vf_loss).backward()

  mask = np.arange(tlen)[None] <= last[:, None]
  vmask = L.ppo_value_mask(mask)
  rewards = L.ppo_rewards(logps, ref, scores, mask, kl_coef=args.kl_coef,
                          kl_estimator=kl_estimator, score_index=jnp.sum(vmask, -1) - 1)
  if whiten_rewards:
    rewards = L.masked_whiten(rewards, vmask, shift_mean=False)
  close(rewards, ref_out.rewards.detach().numpy())
  adv, returns = jax.jit(functools.partial(L.gae, gamma=args.gamma, lam=args.lam))(
      rewards, values, vmask)
  adv = L.masked_whiten(adv, mask)
  close(adv, ref_out.advantages.numpy(), atol=1e-5)
  close(returns, ref_out.returns.numpy(), atol=1e-5)

  def total(new_logps, v):
    pg, pg_frac = L.ppo_policy_loss(new_logps, logps, adv, mask, clip=args.cliprange)
    vf, vf_frac = L.ppo_value_loss(v, values, returns, vmask, clip_value=args.cliprange_value)
    return pg + vf, (pg, pg_frac, vf, vf_frac)

  (_, (pg, pg_frac, vf, vf_frac)), grads = jax.jit(
      jax.value_and_grad(total, (0, 1), has_aux=True))(jnp.asarray(new), jnp.asarray(vpred))
  assert 0 < pg_frac < 1 and 0 < vf_frac < 1
  close(pg, ref_out.pg_loss.item())
  close(vf, ref_out.vf_loss.item())
  close(pg_frac, ref_out.pg_clipfrac.item())
  close(vf_frac, ref_out.vf_clipfrac.item())
  close(grads[0], new_t.grad.numpy(), atol=1e-6)
  close(grads[1], vpred_t.grad.numpy(), atol=1e-6)
