"""LoRA as a parameter-tree transform (flaxllm.lora) on tiny LLaMAs, unrolled and scanned:
step-0 equality, merge == LoRA forward, unmerge/split/combine, trainable counts, training
that moves only the adapters (base bitwise unchanged), dropout, PiSSA, sharding specs, the
compiled memory of a LoRA step against full fine-tuning, and the bad inputs."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxllm import lora, models
from flaxllm.models import params as params_lib
from flaxllm.peft import path_rules as rules_lib


def _model(scan: bool, **kw):
  cfg = models.presets.get('tiny_llama', scan_layers=scan, **kw)
  model = models.build(cfg)
  return cfg, model, random_params(model)


def random_params(model, seed: int = 0):
  """Params like `models.init_params(model, ...)` without compiling model.init (slow on a
  loaded CPU): shapes from eval_shape, values N(0, 0.05), norm scales 1 + N(0, 0.1)."""
  abstract = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0)))
  rng = np.random.default_rng(seed)
  flat = {p: (1.0 + 0.1 * rng.standard_normal(x.shape) if p.endswith('scale')
              else 0.05 * rng.standard_normal(x.shape)).astype(x.dtype)
          for p, x in params_lib.flatten(abstract).items()}
  return jax.tree.map(jnp.asarray, params_lib.unflatten(flat))


def _abstract(scan: bool = False, **kw):
  """(cfg, model, abstract params): for checks that need shapes only (nothing computed)."""
  cfg = models.presets.get('tiny_llama', scan_layers=scan, **kw)
  model = models.build(cfg)
  return cfg, model, jax.eval_shape(lambda: models.init_params(model, jax.random.key(0)))


_CACHE = {}


def _cached(scan: bool):
  """(cfg, model, params, jitted forward(tree, tokens)) built once per layout."""
  if scan not in _CACHE:
    cfg, model, params = _model(scan)
    fwd = jax.jit(lambda tree, tokens: model.apply({'params': tree}, tokens))
    _CACHE[scan] = (cfg, model, params, fwd)
  return _CACHE[scan]


TOKENS = np.random.default_rng(1).integers(0, 256, (2, 16)).astype(np.int32)


def _perturb(adapters, std=0.05, seed=3):
  leaves, tdef = jax.tree.flatten(adapters)
  rng = np.random.default_rng(seed)  # numpy: jax.random compiles per shape (slow here)
  return jax.tree.unflatten(tdef, [x + std * rng.standard_normal(x.shape).astype(np.float32)
                                   for x in leaves])


@pytest.mark.parametrize('scan', [False, True])
def test_zero_b_equals_base_and_merge_equals_lora_forward(scan):
  _, _, params, fwd = _cached(scan)
  base = fwd(params, TOKENS)
  adapters = lora.init(params, lora.ALL_LINEAR, jax.random.key(2), rank=4, alpha=8)
  out = fwd(lora.combine(params, adapters), TOKENS)
  np.testing.assert_allclose(out, base, atol=1e-6, rtol=0)  # B = 0 at step 0
  trained = _perturb(adapters)
  lora_out = fwd(lora.combine(params, trained), TOKENS)
  merged = lora.merge(params, trained)
  merged_out = fwd(merged, TOKENS)
  assert float(jnp.max(jnp.abs(lora_out - base))) > 0.1   # the adapters do something
  np.testing.assert_allclose(lora_out, merged_out, atol=2e-5, rtol=0)
  # merge is exactly W0 + scale * A B on one kernel, computed by hand.
  path = 'decoder/layers/attn/o_proj/kernel' if scan else 'decoder/layers_1/attn/o_proj/kernel'
  ad = params_lib.flatten(trained)[path]
  w0 = params_lib.flatten(params)[path]
  lead = w0.shape[:w0.ndim - 3]  # [layers] when scanned; o_proj is [heads, head_dim, embed]
  a = np.asarray(ad.a).reshape(*lead, -1, 4)
  b = np.asarray(ad.b).reshape(*lead, 4, -1)
  expect = np.asarray(w0) + 2.0 * (a @ b).reshape(w0.shape)
  np.testing.assert_allclose(params_lib.flatten(merged)[path], expect, atol=1e-6)
  # unmerge undoes merge; split undoes combine.
  for x, y in zip(jax.tree.leaves(lora.unmerge(merged, trained)), jax.tree.leaves(params)):
    np.testing.assert_allclose(x, y, atol=1e-6)
  base2, ad2 = lora.split(lora.combine(params, trained))
  assert jax.tree.structure(base2) == jax.tree.structure(params)
  assert all(x is y for x, y in zip(jax.tree.leaves(base2), jax.tree.leaves(params)))
  assert jax.tree.structure(ad2) == jax.tree.structure(trained)


@pytest.mark.parametrize('scan', [False, True])
def test_trainable_count_and_targets(scan):
  cfg, _, params = _abstract(scan)
  init = lambda rules, **kw: jax.eval_shape(
      lambda p: lora.init(p, rules, jax.random.key(0), **kw), params)
  adapters = init(['q_proj', 'v_proj', 'down_proj'], rank=8)
  d, h, kv, hd, f = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head, cfg.mlp_dim
  per_layer = 8 * ((d + h * hd) + (d + kv * hd) + (f + d))
  assert lora.trainable_count(adapters) == cfg.num_layers * per_layer
  assert len(lora.targets(adapters)) == (3 if scan else 3 * cfg.num_layers)
  all_lin = init('all-linear', rank=2)
  assert not any('lm_head' in p or 'embed' in p for p in lora.targets(all_lin))
  # scale: alpha / r, rsLoRA alpha / sqrt(r)
  leaf = jax.tree.leaves(init('q_proj', rank=4, alpha=16, rslora=True),
                         is_leaf=lambda x: hasattr(x, 'scale'))[0]
  assert leaf.scale == 8.0 and lora.scale_of(4, 16) == 4.0


def test_inits_kaiming_gaussian_pissa():
  _, _, params, fwd = _cached(False)
  kaiming = params_lib.flatten(lora.init(params, 'up_proj', jax.random.key(0), rank=4))
  a = kaiming['decoder/layers_0/mlp/up_proj/kernel'].a
  assert float(jnp.max(jnp.abs(a))) <= 1 / math.sqrt(64) and float(jnp.std(a)) > 0.05
  assert not np.any(kaiming['decoder/layers_0/mlp/up_proj/kernel'].b)
  gauss = params_lib.flatten(lora.init(params, 'up_proj', jax.random.key(0), rank=4,
                                       init='gaussian'))
  assert abs(float(jnp.std(gauss['decoder/layers_0/mlp/up_proj/kernel'].a)) - 0.25) < 0.05
  # PiSSA: the adapters hold the top-r SVD of W0; train on the residual base, same model.
  pissa = lora.init(params, 'all-linear', jax.random.key(0), rank=4, alpha=8, init='pissa')
  residual = lora.unmerge(params, pissa)
  np.testing.assert_allclose(fwd(lora.combine(residual, pissa), TOKENS), fwd(params, TOKENS),
                             atol=2e-5)


def test_dropout_only_with_an_rng():
  _, model, params, fwd = _cached(False)
  ad = _perturb(lora.init(params, 'all-linear', jax.random.key(0), rank=4, dropout=0.5))
  tree = lora.combine(params, ad)
  plain = fwd(tree, TOKENS)
  drop = jax.jit(lambda t, r: model.apply({'params': t}, TOKENS, rngs={'dropout': r}))
  dropped = drop(tree, jax.random.key(5))
  again = drop(tree, jax.random.key(5))
  assert float(jnp.max(jnp.abs(plain - dropped))) > 1e-3
  np.testing.assert_array_equal(dropped, again)


def _loss(model, tree, batch):
  logits = model.apply({'params': tree}, batch[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


@pytest.mark.parametrize('scan', [False, True])
def test_training_moves_only_adapters(scan):
  _, model, params, _ = _cached(scan)
  before = jax.tree.map(np.array, params)
  adapters = lora.init(params, 'all-linear', jax.random.key(1), rank=4, alpha=8)
  tx = optax.adam(1e-2)
  opt = tx.init(adapters)
  assert sum(x.size for x in jax.tree.leaves(opt)) == 2 * lora.trainable_count(adapters) + 1
  batch = np.random.default_rng(7).integers(0, 32, (4, 33)).astype(np.int32)  # small vocab

  @jax.jit
  def step(adapters, opt, base):
    loss, g = jax.value_and_grad(lambda a: _loss(model, lora.combine(base, a), batch))(adapters)
    up, opt = tx.update(g, opt, adapters)
    return optax.apply_updates(adapters, up), opt, loss

  start = adapters
  losses = []
  for _ in range(15):
    adapters, opt, loss = step(adapters, opt, params)
    losses.append(float(loss))
  assert losses[-1] < losses[0] - 0.3
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(before)):
    np.testing.assert_array_equal(np.asarray(x), y)  # bitwise unchanged
  moved = [bool(jnp.any(x != y)) for x, y in zip(jax.tree.leaves(adapters),
                                                  jax.tree.leaves(start))]
  assert all(moved)


def test_lora_step_memory_against_full_finetuning():
  """Compiled memory (XLA's analysis, nothing run) of one AdamW step: LoRA keeps no
  optimizer state or gradient for the base, so its outputs are a small fraction of full
  fine-tuning's, and its temporaries hold no full-size weight gradient."""
  cfg = models.presets.get('tiny_llama', d_model=128, mlp_dim=512, num_heads=4,
                           num_kv_heads=4, scan_layers=True)
  model = models.build(cfg)
  abstract = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0)))
  tx = optax.adamw(1e-3)
  batch = jax.ShapeDtypeStruct((2, 33), jnp.int32)

  def full_step(p, opt, batch):
    g = jax.grad(lambda p: _loss(model, p, batch))(p)
    up, opt = tx.update(g, opt, p)
    return optax.apply_updates(p, up), opt

  def lora_step(a, opt, base, batch):
    g = jax.grad(lambda a: _loss(model, lora.combine(base, a), batch))(a)
    up, opt = tx.update(g, opt, a)
    return optax.apply_updates(a, up), opt

  ad = jax.eval_shape(lambda p: lora.init(p, 'all-linear', jax.random.key(0), rank=8), abstract)
  full = jax.jit(full_step, donate_argnums=(0, 1)).lower(
      abstract, jax.eval_shape(tx.init, abstract), batch).compile().memory_analysis()
  small = jax.jit(lora_step, donate_argnums=(0, 1)).lower(
      ad, jax.eval_shape(tx.init, ad), abstract, batch).compile().memory_analysis()
  weight_bytes = 4 * params_lib.count(abstract)
  kernel_bytes = 4 * sum(x.size for p, x in params_lib.flatten(abstract).items()
                         if p.endswith('kernel') and 'lm_head' not in p)
  assert full.output_size_in_bytes >= 3 * weight_bytes          # params + mu + nu
  assert small.output_size_in_bytes < 0.2 * full.output_size_in_bytes
  assert small.temp_size_in_bytes < full.temp_size_in_bytes - kernel_bytes / 2


def test_adapter_specs_follow_base_axes():
  from jax.sharding import PartitionSpec as P
  from flaxllm import parallel
  cfg, model, params, fwd = _cached(True)
  ad = lora.init(params, 'all-linear', jax.random.key(0), rank=4)
  specs = params_lib.flatten(lora.adapter_specs(parallel.param_specs(model), ad))
  assert specs['decoder/layers/attn/q_proj/kernel'].a == P('layers', 'embed', None)
  assert specs['decoder/layers/attn/q_proj/kernel'].b == P('layers', None, 'heads', 'head_dim')
  assert specs['decoder/layers/attn/o_proj/kernel'].a == P('layers', 'heads', 'head_dim', None)
  mesh = parallel.make_mesh({'fsdp': 8}, jax.devices()[:8])
  sh = parallel.state_shardings(ad, mesh, 'fsdp', lora.adapter_specs(
      parallel.param_specs(model), ad))
  q = params_lib.flatten(sh)['decoder/layers/attn/q_proj/kernel'].a
  assert q.spec == P(None, 'fsdp', None)
  placed = jax.device_put(ad, sh)  # and the LoRA forward runs on sharded adapters
  out = fwd(lora.combine(params, placed), TOKENS)
  assert out.shape == (2, 16, cfg.vocab_size)


def test_bad_inputs_one_sentence():
  _, _, params = _abstract()
  with pytest.raises(rules_lib.RuleError, match=r"LoRA rule 'qproj' matches no Linear kernel"):
    lora.init(params, ['q_proj', 'qproj'], jax.random.key(0))
  with pytest.raises(lora.LoRAError, match=r'rank 65 exceeds the dimensions of '
                                           r"'decoder/layers_0/attn/q_proj/kernel'"):
    lora.init(params, 'q_proj', jax.random.key(0), rank=65)
  with pytest.raises(lora.LoRAError, match='positive integer'):
    lora.init(params, 'q_proj', jax.random.key(0), rank=0)
  with pytest.raises(rules_lib.RuleError, match='not a valid regex'):
    lora.init(params, '(', jax.random.key(0))
  ad = lora.init(params, 'q_proj', jax.random.key(0), rank=4)
  _, _, other = _abstract(d_model=32, num_heads=2, num_kv_heads=1)
  with pytest.raises(lora.LoRAError, match=r'adapter tensor decoder/layers_0/attn/q_proj/'
                                           r'kernel/lora_a has shape .* different base model'):
    lora.merge(other, ad)
  _, _, three = _abstract(num_layers=1)
  with pytest.raises(lora.LoRAError, match=r"'decoder/layers_1/attn/q_proj/kernel' has no "
                                           'counterpart in the base model'):
    lora.combine(three, ad)
