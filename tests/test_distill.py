"""Knowledge distillation (flaxllm.distill): divergences against hand computations, the
generalised JSD end points, chunking, the LossFn in the train step (zero gradient for a student
equal to its teacher, teacher untouched, per-token normalisation across accumulation), teacher
checks, offline top-k logits and on-policy batches."""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxllm import models, rundir
from flaxllm.objectives import base as objective_base
from flaxllm.objectives.distill import divergences as losses
from flaxllm.objectives.distill import objective as loss_lib
from flaxllm.objectives.distill import teacher as teacher_lib
from flaxllm.models import split as model_lib
from flaxllm.models.config import ConfigError
from flaxllm.train import step as step_lib

V = 11


def _np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _np_div(s, t, kind, beta=0.5, T=1.0):
  lq, lp = _np_log_softmax(s / T), _np_log_softmax(t / T)
  p, q = np.exp(lp), np.exp(lq)
  if kind == 'forward_kl':
    return (p * (lp - lq)).sum(-1)
  if kind == 'reverse_kl':
    return (q * (lq - lp)).sum(-1)
  m = beta * p + (1 - beta) * q
  return beta * (p * (lp - np.log(m))).sum(-1) + (1 - beta) * (q * (lq - np.log(m))).sum(-1)


def _logits(seed, shape=(2, 5, V), scale=2.0):
  return scale * np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize('kind', ['forward_kl', 'reverse_kl', 'jsd'])
@pytest.mark.parametrize('T', [1.0, 2.5])
def test_divergences_match_hand_computation(kind, T):
  s, t = _logits(0), _logits(1)
  got = losses.divergence(jnp.asarray(s), jnp.asarray(t), kind=kind, beta=0.3, temperature=T)
  np.testing.assert_allclose(got, _np_div(s, t, kind, 0.3, T), rtol=1e-5, atol=1e-6)


def test_token_sums_apply_t_squared_mask_and_per_token_normalisation():
  s, t = _logits(2), _logits(3)
  targets = np.random.default_rng(4).integers(0, V, (2, 5)).astype(np.int32)
  mask = np.array([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], np.float32)
  T = 2.0
  sums = losses.token_sums(jnp.asarray(s), jnp.asarray(targets), jnp.asarray(mask),
                           teacher_logits=jnp.asarray(t), kind='forward_kl', temperature=T)
  want_kd = T ** 2 * (_np_div(s, t, 'forward_kl', T=T) * mask).sum()
  lq = _np_log_softmax(s)
  want_ce = (-np.take_along_axis(lq, targets[..., None], -1)[..., 0] * mask).sum()
  np.testing.assert_allclose(sums['kd'], want_kd, rtol=1e-5)
  np.testing.assert_allclose(sums['ce'], want_ce, rtol=1e-5)
  np.testing.assert_allclose(sums['tokens'], mask.sum())
  # The trainer's per-token metric: sum / tokens (7 real tokens of 10).
  metrics = step_lib.per_token_metrics(sums)
  np.testing.assert_allclose(metrics['kd'], want_kd / 7, rtol=1e-5)
  np.testing.assert_allclose(metrics['loss'], want_ce / 7, rtol=1e-5)


def test_generalised_jsd_end_points_are_forward_and_reverse_kl():
  s, t = jnp.asarray(_logits(5)), jnp.asarray(_logits(6))
  fwd = losses.divergence(s, t, kind='forward_kl', temperature=1.5)
  rev = losses.divergence(s, t, kind='reverse_kl', temperature=1.5)
  np.testing.assert_allclose(losses.divergence(s, t, kind='jsd', beta=0.0, temperature=1.5), fwd)
  np.testing.assert_allclose(losses.divergence(s, t, kind='jsd', beta=1.0, temperature=1.5), rev)
  # ... which are the scaled limits of JSD(beta) (Agarwal et al.), TRL's convention.
  eps = 1e-3
  np.testing.assert_allclose(_np_div(s, t, 'jsd', eps, 1.5) / eps, fwd, rtol=2e-2)
  np.testing.assert_allclose(_np_div(s, t, 'jsd', 1 - eps, 1.5) / eps, rev, rtol=2e-2)
  # And the jsd formula in between is bounded by log(1/beta)-ish: symmetric at beta=0.5.
  np.testing.assert_allclose(losses.divergence(s, t, kind='jsd', beta=0.5),
                             losses.divergence(t, s, kind='jsd', beta=0.5), rtol=1e-5)


def test_top_k_divergence():
  s, t = _logits(7), _logits(8)
  # k = vocab: the exact full-vocabulary divergence.
  vals, idx = losses.top_k_logits(jnp.asarray(t), V)
  for kind in ('forward_kl', 'jsd'):
    np.testing.assert_allclose(
        losses.topk_divergence(jnp.asarray(s), vals, idx, kind=kind, temperature=2.0),
        _np_div(s, t, kind, T=2.0), rtol=1e-5, atol=1e-6)
  # k = 3 forward KL: the teacher renormalised on its top 3, the student's full log-probs.
  vals, idx = losses.top_k_logits(jnp.asarray(t), 3)
  lp = _np_log_softmax(np.asarray(vals))
  lq = np.take_along_axis(_np_log_softmax(s), np.asarray(idx), -1)
  np.testing.assert_allclose(losses.topk_divergence(jnp.asarray(s), vals, idx),
                             (np.exp(lp) * (lp - lq)).sum(-1), rtol=1e-5)
  with pytest.raises(ValueError, match='reverse KL needs the full teacher'):
    losses.topk_divergence(jnp.asarray(s), vals, idx, kind='reverse_kl')


def test_chunked_sums_equal_unchunked_values_and_gradients():
  rng = np.random.default_rng(9)
  h = jnp.asarray(rng.standard_normal((2, 13, 6)), jnp.float32)
  ht = jnp.asarray(rng.standard_normal((2, 13, 6)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((6, V)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, V, (2, 13)), jnp.int32)
  mask = jnp.asarray(rng.random((2, 13)) > 0.3, jnp.float32)

  def total(w, chunk):
    fn = lambda a, b, tg, m: losses.token_sums(a @ w, tg, m, teacher_logits=b @ w * 1.3,
                                               kind='jsd', beta=0.2, temperature=2.0)
    sums = model_lib.chunked_sums(fn, (h, ht, targets, mask), chunk)
    return sums['kd'] + sums['ce'], sums

  (v0, s0), g0 = jax.value_and_grad(total, has_aux=True)(w, 0)
  (v4, s4), g4 = jax.value_and_grad(total, has_aux=True)(w, 4)    # 13 = 4 + 4 + 4 + 1 (padded)
  np.testing.assert_allclose(v4, v0, rtol=1e-5)
  np.testing.assert_allclose(s4['tokens'], s0['tokens'])
  np.testing.assert_allclose(g4, g0, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- with models

S_CFG = dict(vocab_size=64, d_model=32, num_layers=2, num_heads=2, num_kv_heads=2, mlp_dim=64,
             max_seq_len=32)
T_CFG = dict(S_CFG, d_model=48, num_layers=3, num_heads=3, num_kv_heads=3, mlp_dim=96)


def _cfg(**kw):
  return models.ModelConfig.from_dict(kw)


@functools.lru_cache(maxsize=None)
def _init(cfg, seed):
  """Random params of the model's shapes (traced with eval_shape: nothing to compile)."""
  shapes = jax.eval_shape(lambda: models.init_params(models.build(cfg), jax.random.key(0)))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (1.0 if len(s.shape) == 1 else 0.05)
                      * rng.standard_normal(s.shape).astype(np.float32), shapes)


def _params(cfg, seed=0):
  return jax.tree.map(jnp.array, _init(cfg, seed))   # a fresh copy (steps donate their state)


def _batch(batch=4, seq=16, seed=0, vocab=64):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, vocab, (batch, seq + 1)).astype(np.int32)
  mask = np.ones((batch, seq), np.float32)
  mask[0, : seq // 2] = 0.0
  mask[3, 3:] = 0.0
  segs = np.ones((batch, seq), np.int32)
  segs[1, seq // 2:] = 2
  segs[2, -3:] = 0               # padding
  mask[2, -3:] = 0.0
  pos = np.tile(np.arange(seq, dtype=np.int32), (batch, 1))
  pos[1, seq // 2:] -= seq // 2
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'loss_mask': mask,
          'segment_ids': segs, 'positions': pos}


@pytest.mark.parametrize('tie', [False, True])
def test_hidden_states_and_head_equal_the_decoder(tie):
  cfg = _cfg(**S_CFG, tie_embeddings=tie)
  params, batch = _params(cfg), _batch()
  want = models.build(cfg).apply({'params': params}, batch['inputs'], batch['positions'],
                                 batch['segment_ids'])
  np.testing.assert_allclose(model_lib.logits(cfg, params, batch), want, rtol=1e-5, atol=1e-5)


def test_distill_loss_matches_hand_computation_with_chunks_and_accumulation():
  s_cfg, t_cfg = _cfg(**S_CFG), _cfg(**T_CFG)
  sp, tp, batch = _params(s_cfg, 0), _params(t_cfg, 1), _batch()
  st = loss_lib.Settings(alpha=0.7, temperature=2.0, divergence='jsd', beta=0.3, chunk_size=5)
  loss_fn = loss_lib.distill_loss(s_cfg, t_cfg, st, z_loss=1e-3)
  obj, sums = jax.jit(loss_fn)(sp, {'teacher': tp}, batch)
  s_logits = np.asarray(jax.jit(models.build(s_cfg).apply)(
      {'params': sp}, batch['inputs'], batch['positions'], batch['segment_ids']))
  t_logits = np.asarray(jax.jit(models.build(t_cfg).apply)(
      {'params': tp}, batch['inputs'], batch['positions'], batch['segment_ids']))
  m = batch['loss_mask']
  kd = 4.0 * (_np_div(s_logits, t_logits, 'jsd', 0.3, 2.0) * m).sum()
  lq = _np_log_softmax(s_logits)
  ce = (-np.take_along_axis(lq, batch['targets'][..., None], -1)[..., 0] * m).sum()
  lse = np.log(np.exp(s_logits.astype(np.float64)).sum(-1))
  np.testing.assert_allclose(sums['kd'], kd, rtol=1e-3)   # f32 vs f64 (KD is small at init)
  np.testing.assert_allclose(sums['ce'], ce, rtol=1e-5)
  np.testing.assert_allclose(obj, 0.7 * kd + 0.3 * ce + 1e-3 * (lse ** 2 * m).sum(), rtol=1e-4)
  # Gradient accumulation: the same sums and per-token gradients as the full batch.
  full = jax.jit(functools.partial(step_lib.grads_and_sums, loss_fn, accum_steps=1))
  acc = jax.jit(functools.partial(step_lib.grads_and_sums, loss_fn, accum_steps=2))
  (g1, s1), (g4, s4) = full(sp, {'teacher': tp}, batch), acc(sp, {'teacher': tp}, batch)
  for k in ('ce', 'kd', 'tokens'):
    np.testing.assert_allclose(s4[k], s1[k], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g4, g1)


def test_student_equal_to_teacher_with_alpha_one_has_zero_gradient():
  cfg = _cfg(**S_CFG)
  params, batch = _params(cfg), _batch()

  @functools.partial(jax.jit, static_argnums=(0,))
  def grads(st, p, b):
    return jax.grad(loss_lib.distill_loss(cfg, cfg, st), has_aux=True)(p, {'teacher': p}, b)

  for kind in ('forward_kl', 'reverse_kl', 'jsd'):
    g, sums = grads(loss_lib.Settings(alpha=1.0, temperature=2.0, divergence=kind), params,
                    batch)
    assert abs(float(sums['kd'])) < 1e-5
    assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(g)) < 1e-6, kind
  # ... while the CE part alone (alpha=0) has a real gradient.
  g, _ = grads(loss_lib.Settings(alpha=0.0), params, batch)
  assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(g)) > 1e-3


def test_train_step_updates_student_and_leaves_teacher_unchanged():
  s_cfg, t_cfg = _cfg(**S_CFG), _cfg(**T_CFG)
  sp, tp = _params(s_cfg, 0), _params(t_cfg, 1)
  tp['lm_head']['kernel'] = tp['lm_head']['kernel'] * 30.0   # a confident teacher
  teacher_before = jax.tree.map(np.array, tp)
  loss_fn = loss_lib.distill_loss(s_cfg, t_cfg, loss_lib.Settings(alpha=0.9, temperature=2.0,
                                                                  chunk_size=8))
  tx = optax.adamw(3e-3)
  step = jax.jit(step_lib.make_train_step(loss_fn, tx, lambda s: 3e-3), donate_argnums=0)
  state = step_lib.init_state(sp, tx, jax.random.key(0))
  frozen = {'teacher': tp}
  kds = []
  for i in range(6):
    state, metrics = step(state, _batch(seed=i % 2), frozen)
    kds.append(float(metrics['kd']))
  assert kds[-1] < kds[0]
  assert {'loss', 'kd', 'grad_norm', 'z_loss'} <= set(metrics)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, frozen['teacher']),
               teacher_before)
  assert jax.tree.structure(state.opt_state) == jax.tree.structure(tx.init(sp))  # no teacher


def test_hidden_state_loss_with_learned_projection():
  s_cfg, t_cfg = _cfg(**S_CFG), _cfg(**T_CFG)
  sp, tp, batch = _params(s_cfg, 0), _params(t_cfg, 1), _batch()
  proj = loss_lib.init_projection(jax.random.key(2), 32, 48)
  params = {'model': sp, loss_lib.PROJ_KEY: proj}   # the objective's namespaced trainable tree
  for kind in ('cosine', 'mse'):
    st = loss_lib.Settings(alpha=0.5, hidden_loss=kind, hidden_weight=1.0)
    loss_fn = loss_lib.distill_loss(s_cfg, t_cfg, st, model_params=lambda p, f: p['model'])
    grads, sums = jax.jit(jax.grad(loss_fn, has_aux=True))(params, {'teacher': tp}, batch)
    hs = np.asarray(model_lib.hidden_states(s_cfg, sp, batch)) @ np.asarray(proj['kernel'])
    ht = np.asarray(model_lib.hidden_states(t_cfg, tp, batch))
    if kind == 'cosine':
      per = 1 - (hs * ht).sum(-1) / np.linalg.norm(hs, axis=-1) / np.linalg.norm(ht, axis=-1)
    else:
      per = ((hs - ht) ** 2).mean(-1)
    np.testing.assert_allclose(sums['hidden'], (per * batch['loss_mask']).sum(), rtol=1e-4)
    assert float(jnp.abs(grads[loss_lib.PROJ_KEY]['kernel']).max()) > 0


# ----------------------------------------------------------------------------- teacher checks

def _fake_workdir(path, model_cfg, tokenizer_kind='bytes', checkpoint=True):
  os.makedirs(os.path.join(path, 'checkpoints', '10' if checkpoint else 'tmp'), exist_ok=True)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump({'model': model_cfg.to_dict()}, f)
  with open(os.path.join(path, 'tokenizer.json'), 'w') as f:
    json.dump({'kind': tokenizer_kind}, f)
  return str(path)


def test_bad_teachers_are_refused_in_one_sentence(tmp_path):
  from flaxllm.data import tokenizer as tok_lib
  student = _cfg(**S_CFG)
  with pytest.raises(ConfigError, match='does not exist'):
    rundir.model_source(str(tmp_path / 'nope'))
  empty = _fake_workdir(tmp_path / 'empty', _cfg(**T_CFG), checkpoint=False)
  with pytest.raises(ConfigError, match='has no checkpoint'):
    rundir.model_source(empty)
  # Different vocabularies (as Qwen2.5-0.5B's 151936 vs 7B's 152064).
  big = rundir.model_source(_fake_workdir(tmp_path / 'big', _cfg(**{**T_CFG, 'vocab_size': 80})))
  with pytest.raises(ConfigError, match='vocab_size 80 but the student has 64'):
    teacher_lib.check_teacher(big, student)
  good = rundir.model_source(_fake_workdir(tmp_path / 'good', _cfg(**T_CFG)))
  teacher_lib.check_teacher(good, student, tok_lib.ByteTokenizer())   # fine
  with pytest.raises(ConfigError, match='top_k=65 is larger than the vocabulary'):
    teacher_lib.check_teacher(good, student, top_k=65)
  # Same size, different tokenizer.
  spm_teacher = rundir.ModelSource(good.path, 'workdir', good.model_cfg,
                                   ('sentencepiece', 'abc'))
  with pytest.raises(ConfigError, match="tokenizer .* differs from the teacher's"):
    teacher_lib.check_teacher(spm_teacher, student, tok_lib.ByteTokenizer())


def test_hf_and_model_dir_teachers_load_their_params(tmp_path):
  from flaxllm.interop import hf, native
  t_cfg = _cfg(**{**T_CFG, 'mlp_activation': 'swiglu', 'norm': 'rmsnorm', 'position': 'rope'})
  params = _init(t_cfg, 3)
  hf.save(t_cfg, params, str(tmp_path / 'hf'))
  native.save_flaxllm(t_cfg, params, str(tmp_path / 'native'))
  for path, kind in ((tmp_path / 'hf', 'hf'), (tmp_path / 'native', 'flaxllm_model')):
    source = rundir.model_source(str(path))
    assert source.kind == kind and source.model_cfg.d_model == 48
    teacher_lib.check_teacher(source, _cfg(**{**S_CFG, 'mlp_activation': 'swiglu'}))
    with pytest.raises(ConfigError, match='vocab_size 64 but the student has 65'):
      teacher_lib.check_teacher(source, _cfg(**{**S_CFG, 'vocab_size': 65}))
    loaded = rundir.load_params(source.path)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-6), loaded,
                 params)


def test_student_from_teacher_takes_every_kth_layer():
  t_cfg = _cfg(**{**S_CFG, 'num_layers': 4})
  s_cfg = _cfg(**S_CFG)
  tp, sp = _params(t_cfg, 1), _params(s_cfg, 0)
  out = teacher_lib.student_from_teacher(sp, tp, 2)
  np.testing.assert_array_equal(out['decoder']['layers_1']['mlp']['up_proj']['kernel'],
                                tp['decoder']['layers_2']['mlp']['up_proj']['kernel'])
  np.testing.assert_array_equal(out['embed']['embedding'], tp['embed']['embedding'])
  with pytest.raises(ConfigError, match='needs equal widths'):
    teacher_lib.student_from_teacher(sp, _params(_cfg(**T_CFG), 1), 1)
  with pytest.raises(ConfigError, match='has no decoder/layers_4'):
    teacher_lib.student_from_teacher(sp, tp, 4)


# ----------------------------------------------------------------------------- offline, on-policy

def test_offline_top_k_loss_equals_live_top_k_teacher():
  s_cfg, t_cfg = _cfg(**S_CFG), _cfg(**T_CFG)
  sp, tp, batch = _params(s_cfg, 0), _params(t_cfg, 1), _batch()
  t_logits = jax.jit(models.build(t_cfg).apply)({'params': tp}, batch['inputs'],
                                                batch['positions'], batch['segment_ids'])
  values, indices = losses.top_k_logits(t_logits, 8)
  kw = dict(alpha=0.6, temperature=2.0, divergence='jsd', beta=0.4, chunk_size=5)
  live = loss_lib.distill_loss(s_cfg, t_cfg, loss_lib.Settings(top_k=8, **kw))
  off = loss_lib.distill_loss(s_cfg, None, loss_lib.Settings(offline=True, **kw))
  obj_live, sums_live = jax.jit(live)(sp, {'teacher': tp}, batch)
  obj_off, sums_off = jax.jit(off)(sp, {}, {**batch, 'teacher_values': values,
                                   'teacher_indices': indices})
  np.testing.assert_allclose(obj_off, obj_live, rtol=1e-5)
  np.testing.assert_allclose(sums_off['kd'], sums_live['kd'], rtol=1e-5)


def test_offline_logits_written_once_and_read_aligned(tmp_path):
  from flaxllm import config as config_lib
  from flaxllm.data import tokenizer as tok_lib
  from flaxllm.objectives.distill import offline
  config = config_lib.load_config('configs/default.py:size=tiny', [
      '--config.total_steps=2', '--config.data.max_files=8'])
  t_cfg = models.ModelConfig.from_dict(config.model)
  tp = _params(t_cfg, 3)
  tok = tok_lib.get_tokenizer(config.tokenizer, corpus=config.data)
  meta = offline.write_topk(config, tok, t_cfg, tp, str(tmp_path / 'top'), top_k=4, log_every=0)
  assert meta['steps'] == 2 and len(meta['crc32']) == 2
  reader = offline.OfflineLogits(str(tmp_path / 'top'), config)
  from flaxllm.data import pipeline
  it = pipeline.make_iterator(config.data, tok, split='train', seq_len=config.seq_len,
                              batch_size=config.batch_size, seed=config.seed)
  next(it)
  second = next(it)
  it.close()
  out = reader.attach(1, second)
  assert out['teacher_values'].shape == (config.batch_size, 32, 4)
  logits = models.build(t_cfg).apply({'params': tp}, second['inputs'], second['positions'],
                                     second['segment_ids'])
  np.testing.assert_array_equal(out['teacher_indices'][second['loss_mask'] > 0],
                                np.asarray(jax.lax.top_k(logits, 4)[1])[second['loss_mask'] > 0])
  with pytest.raises(ConfigError, match='is not the one the offline logits'):
    reader.attach(0, second)
  config.total_steps = 5
  with pytest.raises(ConfigError, match='cover 2 steps but total_steps=5'):
    offline.OfflineLogits(str(tmp_path / 'top'), config)


def test_on_policy_batches_are_student_samples_scored_without_ce():
  from flaxllm.objectives.distill import onpolicy
  cfg = _cfg(**S_CFG)
  params, batch = _params(cfg), _batch(seq=12)
  policy = onpolicy.OnPolicy(cfg, 0.5, seed=0, prompt_len=4, temperature=1.0)
  choices = [policy.chooses(t) for t in range(40)]
  assert 8 < sum(choices) < 32 and choices == [policy.chooses(t) for t in range(40)]
  t_data = choices.index(False)
  view = objective_base.Policy(None, {}, lambda: params)
  assert np.all(policy(t_data, batch, view)['ce_weight'] == 1)
  out = policy(choices.index(True), batch, view)
  assert {k: v.shape for k, v in out.items()} == {**{k: v.shape for k, v in batch.items()},
                                                  'ce_weight': (4,)}
  assert np.all(out['ce_weight'] == 0)
  # The prompt is the row's first tokens (row 0: 4 of them); only the samples are scored.
  np.testing.assert_array_equal(out['inputs'][0, :4], batch['inputs'][0, :4])
  np.testing.assert_array_equal(out['inputs'][:, 1:], out['targets'][:, :-1])
  assert out['loss_mask'][0, :3].sum() == 0 and out['loss_mask'][0, 3:].sum() == 12 - 3
  # The loss of such a batch has no CE part: alpha * KD only.
  st = loss_lib.Settings(alpha=0.5, temperature=1.0)
  obj, sums = jax.jit(loss_lib.distill_loss(cfg, cfg, st))(params, {'teacher': _params(cfg, 5)},
                                                           out)
  np.testing.assert_allclose(obj, 0.5 * sums['kd'], rtol=1e-6)


# ----------------------------------------------------------------------------- the trainer

@pytest.fixture(scope='module')
def tiny_teacher(tmp_path_factory):
  """A workdir as the trainer leaves it (config.json, tokenizer.json, a checkpoint) holding
  random params of the tiny config: a teacher without training one."""
  from flaxllm import config as config_lib
  workdir = str(tmp_path_factory.mktemp('teacher'))
  config = config_lib.load_config('configs/default.py:size=tiny')
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config_lib.to_json(config))
  with open(os.path.join(workdir, 'tokenizer.json'), 'w') as f:
    json.dump({'kind': 'bytes'}, f)
  params = jax.tree.map(jnp.asarray, _init(models.ModelConfig.from_dict(config.model), 7))
  state = step_lib.init_state({'model': params}, optax.sgd(0.1), jax.random.key(0))
  checkpoints = rundir.Checkpoints(workdir)
  checkpoints.save(3, state, {})
  checkpoints.close()
  return workdir


def _student_config(teacher, *overrides):
  from flaxllm import config as config_lib
  return config_lib.load_config('configs/default.py:size=tiny,steps=3', [
      '--config.sample.max_new_tokens=0', '--config.eval_every=0', '--config.batch_size=8',
      '--config.model.d_model=16', '--config.objective=distill',
      f'--config.distill.teacher={teacher}', '--config.distill.chunk_size=8', *overrides])


def test_trainer_distills_with_frozen_teacher(tiny_teacher, tmp_path):
  from flaxllm.train import trainer
  before = jax.tree.map(np.array, rundir.load_params(tiny_teacher))
  summary = trainer.train(_student_config(tiny_teacher, '--config.distill.alpha=0.7'),
                          str(tmp_path / 'student'), devices=jax.devices()[:2])
  assert summary['complete'] and np.isfinite(summary['val_loss'])
  rows = [json.loads(x) for x in open(tmp_path / 'student' / 'metrics.jsonl')]
  assert all(np.isfinite(r['kd']) for r in rows if 'loss' in r)
  after = rundir.load_params(tiny_teacher)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, after), before)


def test_trainer_on_policy_and_offline_batches(tiny_teacher, tmp_path):
  """The trainer's batch hook: on-policy (GKD) student batches and stored top-k teacher logits
  both reach the jitted step through the mesh (ce_weight [batch], teacher_* [batch, seq, k])."""
  from flaxllm.data import tokenizer as tok_lib
  from flaxllm.objectives.distill import offline, onpolicy
  from flaxllm.train import trainer
  summary = trainer.train(_student_config(tiny_teacher, '--config.distill.on_policy=0.5'),
                          str(tmp_path / 'gkd'))
  rows = [json.loads(x) for x in open(tmp_path / 'gkd' / 'metrics.jsonl')]
  assert summary['complete'] and all(np.isfinite(r['kd']) for r in rows if 'loss' in r)
  policy = onpolicy.OnPolicy(None, 0.5, seed=0, prompt_len=4, temperature=1.0)
  assert any(policy.chooses(t) for t in range(3))  # a student batch was among the 3 steps
  config = _student_config(tiny_teacher)   # the student's data settings, as the offline one
  t_cfg = models.ModelConfig.from_dict(config.model)
  offline.write_topk(config, tok_lib.ByteTokenizer(), t_cfg, _params(t_cfg, 3),
                     str(tmp_path / 'top'), top_k=4, log_every=0)
  summary = trainer.train(_student_config('', '--config.distill.teacher=',
                                          f'--config.distill.offline_logits={tmp_path}/top'),
                          str(tmp_path / 'offline'))
  rows = [json.loads(x) for x in open(tmp_path / 'offline' / 'metrics.jsonl')]
  assert summary['complete'] and all(np.isfinite(r['kd']) for r in rows if 'loss' in r)


def test_trainer_refuses_bad_teachers_before_compiling(tiny_teacher, tmp_path):
  from flaxllm.train import trainer
  with pytest.raises(ConfigError, match='vocab_size 259 but the student has 300'):
    trainer.train(_student_config(tiny_teacher, '--config.model.vocab_size=300'),
                  str(tmp_path / 'a'))
  empty = tmp_path / 'empty_teacher'
  (empty / 'checkpoints').mkdir(parents=True)
  (empty / 'config.json').write_text(open(os.path.join(tiny_teacher, 'config.json')).read())
  with pytest.raises(ConfigError, match='has no checkpoint'):
    trainer.train(_student_config(str(empty)), str(tmp_path / 'b'))
  with pytest.raises(ConfigError, match='distill.teacher=.* does not exist'):
    _student_config(str(tmp_path / 'missing'))
  with pytest.raises(ConfigError, match='top_k=1000 must be between 0'):
    _student_config(tiny_teacher, '--config.distill.top_k=1000')


def test_sequence_level_data_is_teacher_text_files(tmp_path):
  from flaxllm import config as config_lib
  from flaxllm.data import tokenizer as tok_lib
  from flaxllm.objectives.distill import onpolicy
  config = config_lib.load_config('configs/default.py:size=tiny')
  tok = tok_lib.ByteTokenizer()
  prompts = onpolicy.document_prompts(config, tok, 3, prompt_len=5)
  assert len(prompts) == 3 and all(p[0] == tok.bos_id and len(p) == 6 for p in prompts)
  t_cfg = models.ModelConfig.from_dict(config.model)
  n = onpolicy.write_sequence_data(t_cfg, _params(t_cfg, 2), tok, prompts, str(tmp_path),
                                   max_new_tokens=6, batch_size=4, log=None)
  files = sorted(os.listdir(tmp_path))
  assert n == 3 and files == ['sample_000000.txt', 'sample_000001.txt', 'sample_000002.txt']
  first = open(tmp_path / files[0]).read()
  assert first.startswith(tok.decode(prompts[0][1:]))
