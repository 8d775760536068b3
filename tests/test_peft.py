"""NF4 / int8 quantisation (flaxllm.peft.quant), QLoRA training, freezing rules and the
fine-tuning methods (flaxllm.objectives.finetune) on tiny LLaMAs."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxllm import lora, models
from flaxllm.models import params as params_lib
from flaxllm.objectives import finetune
from flaxllm.peft import path_rules as rules_lib
from flaxllm.peft import quant


def _weights(shape=(256, 384), seed=0):
  w = np.random.default_rng(seed).normal(0, 0.02, shape).astype(np.float32)
  w.flat[::997] *= 20  # outliers, so blocks have very different scales
  return jnp.asarray(w)


@pytest.mark.parametrize('kind,double', [('nf4', False), ('nf4', True), ('int8', False)])
def test_quantisation_error_within_bound(kind, double):
  w = _weights()
  q = quant.quantize(w, kind, block_size=64, double_quant=double)
  deq = q.dequantize()
  assert deq.shape == w.shape and deq.dtype == w.dtype
  err = jnp.abs(deq - w)
  assert bool(jnp.all(err <= quant.error_bound(q) + 1e-7))
  # The bound itself: NF4 rounds a normalised weight to within half the widest level gap.
  assert abs(quant.NF4_MAX_ERROR - (1 - 0.6961928) / 2) < 1e-6  # the widest gap: -1 .. -0.696
  rel_rms = float(jnp.sqrt(jnp.mean(err ** 2)) / jnp.std(w))
  assert rel_rms < (0.15 if kind == 'nf4' else 0.015), rel_rms
  # Block maxima are exact without double quantisation (the level +-1 hits them).
  if not double:
    blocks = np.abs(np.asarray(w).reshape(-1, 64))
    i = np.argmax(blocks, axis=1)
    np.testing.assert_allclose(np.abs(np.asarray(deq).reshape(-1, 64))[np.arange(len(i)), i],
                               blocks.max(axis=1), rtol=1e-6)


def test_bytes_per_param_and_layout():
  w = _weights((512, 512))
  nf4 = quant.quantize(w, 'nf4')
  nf4_dq = quant.quantize(w, 'nf4', double_quant=True)
  int8 = quant.quantize(w, 'int8')
  assert nf4.nbytes / w.size == 0.5 + 4 / 64                            # 4.5 bits
  assert abs(nf4_dq.nbytes / w.size - (0.5 + 1 / 64 + 4 / 64 / 256) - 4 / w.size) < 1e-9
  assert int8.nbytes / w.size == 1 + 4 / 64
  # Odd sizes are padded to whole blocks; the shape comes back.
  odd = _weights((3, 7, 5))
  np.testing.assert_allclose(quant.quantize(odd, 'nf4', block_size=16).dequantize(), odd,
                             atol=float(jnp.max(jnp.abs(odd))) * 0.14)
  # A leading [layers] axis: each layer is quantised on its own.
  stacked = jnp.stack([_weights((64, 96), s) for s in range(3)])
  qs = quant.quantize(stacked, 'nf4', double_quant=True, lead=1)
  assert qs.codes.shape[0] == qs.absmax.shape[0] == qs.absmax_offset.shape[0] == 3
  one = quant.quantize(stacked[1], 'nf4', double_quant=True)
  np.testing.assert_array_equal(qs.dequantize()[1], one.dequantize())
  with pytest.raises(quant.QuantError, match="kind 'nf3' is not known"):
    quant.quantize(w, 'nf3')


def _tiny(scan=True):
  cfg = models.presets.get('tiny_llama', scan_layers=scan)
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


def _loss(model, tree, batch):
  logits = model.apply({'params': tree}, batch[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


def _train(model, method, params, steps=12, lr=1e-2):
  """A few AdamW steps through a fine-tuning method; returns (losses, trainable, base)."""
  trainable, frozen = jax.jit(method.split)(params, jax.random.key(1))
  model_params = method.model_params
  tx = optax.adam(lr)
  opt = tx.init(trainable)
  batch = np.random.default_rng(7).integers(0, 32, (4, 33)).astype(np.int32)

  @jax.jit
  def step(t, opt, frozen):
    loss, g = jax.value_and_grad(lambda t: _loss(model, model_params(t, frozen), batch))(t)
    up, opt = tx.update(g, opt, t)
    return optax.apply_updates(t, up), opt, loss

  losses = []
  for _ in range(steps):
    trainable, opt, loss = step(trainable, opt, frozen)
    losses.append(float(loss))
  return losses, trainable, frozen['base']


def test_qlora_trains_on_an_nf4_base():
  _, model, params = _tiny()
  ft = {'method': 'qlora', 'targets': ('all-linear',), 'rank': 4, 'alpha': 8.0,
        'quant': 'nf4', 'double_quant': True}
  method = finetune.from_config(ft)
  losses, adapters, base = _train(model, method, params, steps=8)
  assert losses[-1] < losses[0] - 0.3, losses
  flat = params_lib.flatten(base)
  assert isinstance(flat['decoder/layers/attn/q_proj/kernel'], quant.QuantizedTensor)
  assert not isinstance(flat['lm_head/kernel'], quant.QuantizedTensor)  # the head stays
  stats = quant.tree_bytes(base)
  assert stats['quantized_bytes_per_param'] < 0.52
  # Merged export: dequantised base + adapters, a plain tree the model applies directly.
  merged = method.plain_params(adapters, {'base': base})
  fwd = jax.jit(lambda tree: model.apply({'params': tree}, jnp.arange(16)[None]))
  np.testing.assert_allclose(fwd(merged), fwd(method.model_params(adapters, {'base': base})),
                             atol=1e-4)


def test_freeze_trains_only_the_selected_params():
  cfg, model, params = _tiny(scan=False)
  before = jax.tree.map(np.array, params)
  train_rules = rules_lib.top_layers(1, cfg.num_layers) + [r'final_norm/']
  method = finetune.from_config({'method': 'freeze', 'train': train_rules})
  losses, trainable, base = _train(model, method, params, steps=6)
  assert losses[-1] < losses[0]
  names = set(params_lib.flatten(trainable))
  assert names and all('layers_1/' in n or 'final_norm' in n for n in names)
  assert not names & set(params_lib.flatten(base))
  for path, x in params_lib.flatten(base).items():   # frozen: bitwise unchanged
    np.testing.assert_array_equal(np.asarray(x), params_lib.flatten(before)[path])
  moved = [p for p, x in params_lib.flatten(trainable).items()
           if np.any(np.asarray(x) != params_lib.flatten(before)[p])]
  assert sorted(moved) == sorted(names)
  mask = rules_lib.mask(params, train_rules)
  assert sum(jax.tree.leaves(mask)) == len(names)   # the same rules as an optax mask
  with pytest.raises(rules_lib.RuleError, match="finetune.train rule 'layers_9/' matches no "
                                                'parameter'):
    finetune.partition(params, ['layers_9/'])
  with pytest.raises(rules_lib.RuleError, match='top_layers n=3'):
    rules_lib.top_layers(3, 2)


def test_methods_trace_abstractly_and_full_is_identity():
  """The trainer builds shardings from jax.eval_shape(split, abstract params): every method
  must trace without arrays."""
  cfg = models.presets.get('tiny_llama', scan_layers=True)
  abstract = jax.eval_shape(lambda: models.init_params(models.build(cfg), jax.random.key(0)))
  for method in finetune.METHODS:
    ft = {'method': method, 'targets': ('q_proj', 'v_proj'), 'train': ('norm/',), 'rank': 2}
    trainable, frozen = jax.eval_shape(finetune.from_config(ft).split, abstract,
                                       jax.random.key(0))
    if method == 'full':
      assert frozen == {} and trainable == abstract
    elif method in ('lora', 'qlora'):
      assert lora.trainable_count(trainable) == 2 * 2 * ((64 + 64) + (64 + 32))
  with pytest.raises(rules_lib.RuleError, match="finetune.method='prefix' is not known"):
    finetune.from_config({'method': 'prefix'})
