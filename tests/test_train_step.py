"""The pure pieces of the trainer against hand computations: loss normalisation, gradient
accumulation, z-loss, learning-rate schedules, the weight-decay mask, skipping bad updates."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxllm import config as config_lib
from flaxllm import models
from flaxllm.models.params import flatten
from flaxllm.objectives import lm
from flaxllm.train import optim
from flaxllm.train import step as step_lib

CFG = dict(vocab_size=64, d_model=32, num_layers=2, num_heads=2, num_kv_heads=2, mlp_dim=64,
           max_seq_len=32)


def _model(**kw):
  return models.build(models.ModelConfig.from_dict({**CFG, **kw}))


def _batch(batch=4, seq=16, seed=0, vocab=64):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, vocab, (batch, seq + 1)).astype(np.int32)
  mask = np.ones((batch, seq), np.float32)
  mask[0, : seq // 2] = 0.0      # uneven token counts per row: normalisation matters
  mask[3, 3:] = 0.0
  segs = np.ones((batch, seq), np.int32)
  segs[1, seq // 2:] = 2          # a packed row with two documents
  pos = np.tile(np.arange(seq, dtype=np.int32), (batch, 1))
  pos[1, seq // 2:] -= seq // 2
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'loss_mask': mask,
          'segment_ids': segs, 'positions': pos}


@pytest.fixture(scope='module')
def model_and_params():
  model = _model()
  return model, jax.jit(functools.partial(models.init_params, model))(jax.random.key(0))


def test_loss_is_token_weighted_mean_and_z_loss_matches_hand_computation(model_and_params):
  model, params = model_and_params
  batch = _batch()
  logits = np.asarray(jax.jit(model.apply)({'params': params}, batch['inputs'],
                                           batch['positions'], batch['segment_ids']), np.float64)
  lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  target_logit = np.take_along_axis(logits, batch['targets'][..., None], -1)[..., 0]
  mask = batch['loss_mask']
  want_ce = ((lse - target_logit) * mask).sum()
  want_z = (lse ** 2 * mask).sum()
  loss_fn = lm.lm_loss(model, z_loss=1e-2)
  objective, sums = jax.jit(lambda p, b: loss_fn(p, {}, b))(params, batch)
  np.testing.assert_allclose(sums['ce'], want_ce, rtol=1e-5)
  np.testing.assert_allclose(sums['z'], want_z, rtol=1e-5)
  np.testing.assert_allclose(sums['tokens'], mask.sum())
  np.testing.assert_allclose(objective, want_ce + 1e-2 * want_z, rtol=1e-5)

  tx = optax.sgd(0.0)
  state = step_lib.init_state(params, tx, jax.random.key(0))
  train_step = step_lib.make_train_step(loss_fn, tx, lambda s: 0.0)
  _, metrics = jax.jit(train_step)(state, batch, {})
  np.testing.assert_allclose(metrics['loss'], want_ce / mask.sum(), rtol=1e-5)
  np.testing.assert_allclose(metrics['z_loss'], want_z / mask.sum(), rtol=1e-5)


@pytest.mark.parametrize('tie', [False, True])
def test_chunked_loss_equals_whole_logits_loss(tie):
  """loss_chunk_size: the head and loss over chunks of 5 positions (16 is not a multiple:
  the padded tail is masked) give the same sums and gradients as the whole [b, s, vocab]."""
  model = _model(tie_embeddings=tie)
  params = jax.jit(functools.partial(models.init_params, model))(jax.random.key(1))
  batch = _batch()
  whole = lm.lm_loss(model, z_loss=1e-2)
  chunked = lm.lm_loss(model, z_loss=1e-2, chunk_size=5)
  grad = lambda fn: jax.jit(jax.grad(lambda p: fn(p, {}, batch), has_aux=True))(params)
  (g_whole, s_whole), (g_chunk, s_chunk) = grad(whole), grad(chunked)
  for k in ('ce', 'z', 'tokens'):
    np.testing.assert_allclose(s_chunk[k], s_whole[k], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               g_chunk, g_whole)


def test_grad_accumulation_equals_full_batch_per_token(model_and_params):
  model, params = model_and_params
  batch, accum = _batch(batch=4), 4   # one row per micro-batch; rows have different token counts
  loss_fn = lm.lm_loss(model, z_loss=1e-3)
  grads_and_sums = lambda a: jax.jit(functools.partial(
      step_lib.grads_and_sums, loss_fn, accum_steps=a))(params, {}, batch)
  full_grads, full_sums = grads_and_sums(1)
  acc_grads, acc_sums = grads_and_sums(accum)
  for key in ('ce', 'z', 'tokens'):
    np.testing.assert_allclose(acc_sums[key], full_sums[key], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               acc_grads, full_grads)

  # And through the whole step (SGD, lr 1: the update is the normalised gradient itself).
  tx = optax.sgd(1.0)
  state = step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                              opt_state=tx.init(params), rng=jax.random.PRNGKey(0))
  out = {}
  for a in (1, accum):
    fn = jax.jit(step_lib.make_train_step(loss_fn, tx, lambda s: 1.0, accum_steps=a))
    out[a] = fn(state, batch)
  np.testing.assert_allclose(out[accum][1]['loss'], out[1][1]['loss'], rtol=1e-5)
  np.testing.assert_allclose(out[accum][1]['grad_norm'], out[1][1]['grad_norm'], rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
               out[accum][0].params, out[1][0].params)
  full = jax.tree.map(lambda g: g / full_sums['tokens'], full_grads)  # per-token normalised
  jax.tree.map(lambda new, old, g: np.testing.assert_allclose(old - new, g, rtol=1e-4, atol=1e-7),
               out[1][0].params, params, full)
  # Averaging per-micro-batch means instead would weight tokens unequally (rows differ).
  sums = jax.jit(lambda b: loss_fn(params, {}, b)[1])
  per_micro = [sums(jax.tree.map(lambda x: x[i::accum], batch)) for i in range(accum)]
  mean_of_means = np.mean([float(s['ce'] / s['tokens']) for s in per_micro])
  assert abs(mean_of_means - float(out[1][1]['loss'])) > 1e-3


def test_schedules_match_hand_computed_values():
  lr, total, warm, end = 1.0, 110, 10, 0.1
  sched = {name: optim.make_schedule(name, lr=lr, total_steps=total, warmup_steps=warm,
                                     end_lr_frac=end) for name in optim.SCHEDULES}
  for name, fn in sched.items():  # warmup: (step + 1) / warmup_steps
    np.testing.assert_allclose(fn(0), 0.1, rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(fn(4), 0.5, rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(fn(9), 1.0, rtol=1e-6, err_msg=name)
  # After warmup, progress p = (step - 10) / 100.
  np.testing.assert_allclose(sched['cosine'](60), 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)),
                             rtol=1e-6)
  np.testing.assert_allclose(sched['cosine'](35), 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * .25)),
                             rtol=1e-6)
  np.testing.assert_allclose(sched['cosine'](110), 0.1, rtol=1e-6)
  np.testing.assert_allclose(sched['cosine'](500), 0.1, rtol=1e-6)
  np.testing.assert_allclose(sched['linear'](60), 1 - 0.9 * 0.5, rtol=1e-6)
  np.testing.assert_allclose(sched['linear'](110), 0.1, rtol=1e-6)
  np.testing.assert_allclose(sched['constant'](60), 1.0, rtol=1e-6)
  np.testing.assert_allclose(sched['rsqrt'](39), math.sqrt(10 / 40), rtol=1e-6)
  np.testing.assert_allclose(sched['rsqrt'](99), math.sqrt(10 / 100), rtol=1e-6)
  no_warmup = optim.make_schedule('constant', lr=3e-4, total_steps=10, warmup_steps=0)
  np.testing.assert_allclose(no_warmup(0), 3e-4, rtol=1e-6)


def test_weight_decay_mask_selects_paths(model_and_params):
  default_exclude = config_lib.base_config().optim.wd_exclude
  for preset, decayed_extra in (('tiny_llama', {'lm_head/kernel'}), ('tiny_gpt2', set())):
    model = models.build(models.presets.get(preset))
    params = jax.eval_shape(functools.partial(models.init_params, model), jax.random.key(0))
    mask = flatten(optim.decay_mask(params, default_exclude))
    decayed = {p for p, m in mask.items() if m}
    assert decayed == {p for p in mask if p.endswith('/kernel')}, preset
    assert decayed_extra <= decayed
    assert not mask['embed/embedding']
    assert not mask['decoder/layers_0/attn_norm/scale']
    assert not mask['decoder/final_norm/scale']
    if preset == 'tiny_gpt2':
      assert not mask['pos_embed/embedding']
      assert not mask['decoder/layers_0/mlp/up_proj/bias']
      assert not mask['decoder/layers_0/mlp_norm/bias']
  # Custom rules: only the attention projections are excluded.
  model, real = model_and_params
  mask = flatten(optim.decay_mask(real, [r'/attn/']))
  assert not mask['decoder/layers_1/attn/q_proj/kernel']
  assert mask['decoder/layers_1/mlp/up_proj/kernel'] and mask['embed/embedding']

  # The mask reaches AdamW: with zero gradients only decayed params shrink.
  config = config_lib.base_config()
  config.optim.lr, config.optim.weight_decay, config.schedule.name = 0.1, 0.5, 'constant'
  config.schedule.warmup_steps, config.optim.grad_clip = 0, 0.0
  tx = optim.make_optimizer(config, real)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, real), tx.init(real), real)
  flat_u, flat_p = flatten(updates), flatten(real)
  np.testing.assert_allclose(flat_u['embed/embedding'], 0.0)
  np.testing.assert_allclose(flat_u['decoder/layers_0/attn_norm/scale'], 0.0)
  np.testing.assert_allclose(flat_u['lm_head/kernel'], -0.1 * 0.5 * flat_p['lm_head/kernel'],
                             rtol=1e-6)


def test_skip_nonfinite_keeps_the_previous_state(model_and_params):
  model, params = model_and_params
  tx = optax.adamw(1e-2)
  state = step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                              opt_state=tx.init(params), rng=jax.random.PRNGKey(0))
  batch = _batch()
  bad_lr = lambda s: jnp.float32(1.0)
  fn = jax.jit(step_lib.make_train_step(lm.lm_loss(model), tx, bad_lr,
                                        skip_nonfinite=True))
  ok_state, ok_metrics = fn(state, batch)
  assert float(ok_metrics['skipped']) == 0.0 and int(ok_state.step) == 1
  poisoned = jax.tree.map(lambda x: x, state)
  poisoned = poisoned.replace(params={**poisoned.params,
                                      'lm_head': {'kernel': poisoned.params['lm_head']['kernel']
                                                  * jnp.nan}})
  new_state, metrics = fn(poisoned, batch)
  assert float(metrics['skipped']) == 1.0 and int(new_state.step) == 1
  np.testing.assert_array_equal(new_state.params['embed']['embedding'],
                                poisoned.params['embed']['embedding'])


def test_fused_head_loss_trains_only_what_is_trained_and_equals_autodiff():
  """`head_loss.chunked_head_ce` with a LoRA-like head (a frozen float kernel, an int8 code
  leaf, trained adapters): the objective, sums and gradients of the adapters and the hidden
  states equal autodiff of the plain whole-logits loss, and the frozen leaves get none."""
  from flaxllm.models import head_loss, losses
  rng = np.random.default_rng(0)
  b, s, d, v, r = 3, 11, 8, 40, 2
  hidden = jnp.asarray(rng.normal(size=(b, s, d)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, v, (b, s)), jnp.int32)
  mask = jnp.asarray(rng.random((b, s)) < 0.8, jnp.float32)
  frozen = {'kernel': jnp.asarray(rng.normal(size=(d, v)) * 0.3, jnp.float32),
            'codes': jnp.asarray(rng.integers(-3, 4, (v,)), jnp.int8)}
  trained = {'a': jnp.asarray(rng.normal(size=(d, r)), jnp.float32),
             'b': jnp.asarray(rng.normal(size=(r, v)) * 0.1, jnp.float32)}

  def head(p, h):
    return h @ (p['kernel'] + p['a'] @ p['b']) + 0.1 * p['codes'].astype(jnp.float32)

  def plain(tr, h):
    return losses.lm_sums(head({**frozen, **tr}, h), {'targets': targets, 'loss_mask': mask},
                          z_loss=1e-2)

  def fused(tr, h):
    return head_loss.chunked_head_ce(head, {**frozen, **tr}, h, targets, mask, z_loss=1e-2,
                                     chunk_size=4)

  grad = lambda fn: jax.jit(jax.grad(fn, argnums=(0, 1), has_aux=True))(trained, hidden)
  (g_plain, s_plain), (g_fused, s_fused) = grad(plain), grad(fused)
  for k in ('ce', 'z', 'tokens'):
    np.testing.assert_allclose(s_fused[k], s_plain[k], rtol=1e-5)
  np.testing.assert_allclose(jax.jit(fused)(trained, hidden)[0], jax.jit(plain)(trained, hidden)[0],
                             rtol=1e-5)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6),
               g_fused, g_plain)
  # The whole head, frozen leaves included, as the argument: d codes is float0 (int leaf).
  g_all = jax.grad(lambda p: head_loss.chunked_head_ce(
      head, p, hidden, targets, mask, chunk_size=4)[0], allow_int=True)({**frozen, **trained})
  assert g_all['codes'].dtype == jax.dtypes.float0
  want = jax.grad(lambda p: losses.lm_sums(head(p, hidden),
                                           {'targets': targets, 'loss_mask': mask})[0],
                  allow_int=True)({**frozen, **trained})
  np.testing.assert_allclose(g_all['kernel'], want['kernel'], rtol=1e-4, atol=1e-6)
