"""Model structure and numerics that need no external reference beyond hand counts.

(Hugging Face parity lives in test_hf_interop.py, KV-cache decoding in test_generate.py.)
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxllm import models
from flaxllm.models import presets
from flaxllm.models.config import ConfigError, ModelConfig
from flaxllm.models.layers import apply_rope, rope_inv_freq
from flaxllm.models.params import flatten, stack_layers, unstack_layers

LOGICAL = {'batch', 'length', 'embed', 'heads', 'kv_heads', 'head_dim', 'mlp', 'vocab', 'layers'}


def _tokens(cfg, batch=2, seq=12, seed=0):
  return jax.random.randint(jax.random.key(seed), (batch, seq), 0, cfg.vocab_size)


def _forward(cfg, params, tokens, **kw):
  return jax.jit(models.build(cfg).apply)({'params': params}, tokens, **kw)


@pytest.mark.parametrize('name', ['tiny_llama', 'tiny_gpt2'])
def test_scanned_equals_unrolled_and_remat_changes_nothing(name):
  cfg = presets.get(name)
  params = models.init_params(models.build(cfg), jax.random.key(1))
  tokens = _tokens(cfg)
  ref = _forward(cfg, params, tokens)
  stacked = stack_layers(params)
  g_ref = jax.grad(lambda p: _forward(cfg, p, tokens).mean())(params)
  for variant in [dict(scan_layers=True), dict(scan_layers=True, remat='full'),
                  dict(remat='dots')]:
    vcfg = cfg.replace(**variant)
    p = stacked if vcfg.scan_layers else params
    np.testing.assert_allclose(_forward(vcfg, p, tokens), ref, atol=1e-6, rtol=0)
    # Gradients too: remat and scan must not change the numerics.
    g = jax.grad(lambda p, c=vcfg: _forward(c, p, tokens).mean())(p)
    g = unstack_layers(g) if vcfg.scan_layers else g
    for (k, a), b in zip(flatten(g).items(), flatten(g_ref).values()):
      np.testing.assert_allclose(a, b, atol=1e-7, rtol=1e-5, err_msg=k)
  assert jax.tree.structure(unstack_layers(stacked)) == jax.tree.structure(params)


def test_scanned_init_has_leading_layers_axis():
  cfg = presets.get('tiny_llama', scan_layers=True)
  params = models.init_params(models.build(cfg), jax.random.key(0))
  q = flatten(params)['decoder/layers/attn/q_proj/kernel']
  assert q.shape == (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.dim_per_head)


@pytest.mark.parametrize('name,scan', [('tiny_llama', False), ('tiny_llama', True),
                                       ('tiny_gpt2', False), ('tiny_transformer', False)])
def test_every_parameter_has_logical_axes(name, scan):
  cfg = presets.get(name, scan_layers=scan)
  model = models.build(cfg)
  t = jnp.zeros((1, 4), jnp.int32)
  args = (t, t) if cfg.arch == 'encoder_decoder' else (t,)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *args))['params']
  specs = flatten(nn.get_partition_spec(boxed))
  shapes = flatten(nn.meta.unbox(boxed))
  for path, spec in specs.items():
    assert isinstance(spec, jax.sharding.PartitionSpec), path
    assert len(spec) == len(shapes[path].shape), (path, spec)
    assert set(spec) <= LOGICAL, (path, spec)
    if scan and '/layers/' in path:
      assert spec[0] == 'layers', (path, spec)


def test_param_count_matches_published_sizes_and_init():
  # Papers' sizes are truncated to the digits shown (LLaMA 1 table: 6.7B, 13.0B, 32.5B, 65.2B).
  papers = {'llama1_7b': '6.7', 'llama1_13b': '13.0', 'llama1_33b': '32.5',
            'llama1_65b': '65.2', 'llama3_8b': '8.03', 'llama2_70b': '68.9'}
  for name, size in papers.items():
    total = models.param_count(presets.get(name))['total'] / 1e9
    unit = 10.0 ** -len(size.split('.')[1])
    assert float(size) <= total < float(size) + unit, (name, total, size)
  # Exact counts that Hugging Face model cards / num_parameters() report.
  exact = {'gpt2': 124_439_808, 'gpt2_medium': 354_823_168, 'gpt2_large': 774_030_080,
           'gpt2_xl': 1_557_611_200, 'llama3_8b': 8_030_261_248,
           'llama3.2_1b': 1_235_814_400, 'llama3.2_3b': 3_212_749_824,
           'llama3.1_405b': 405_853_388_800}
  for name, size in exact.items():
    assert models.param_count(presets.get(name))['total'] == size, name
  # Exact counts against initialised trees (all architectures, incl. biases and positions).
  for name in ['tiny_llama', 'tiny_gpt2', 'tiny_transformer']:
    cfg = presets.get(name)
    params = models.init_params(models.build(cfg), jax.random.key(0))
    assert models.param_count(cfg)['total'] == sum(x.size for x in jax.tree.leaves(params))


def test_param_count_by_hand_llama_7b():
  d, f, v, layers = 4096, 11008, 32000, 32
  per_layer = 4 * d * d + 3 * d * f + 2 * d
  hand = layers * per_layer + d + 2 * v * d
  counts = models.param_count(presets.get('llama1_7b'))
  assert counts['total'] == hand == 6_738_415_616
  assert counts['non_embedding'] == hand - 2 * v * d


def test_flops_per_token_by_hand():
  cfg = presets.get('llama3_8b')
  s = 8192
  d, f, v, layers, kv = 4096, 14336, 128256, 32, 8 * 128
  matmul = layers * (2 * d * d + 2 * d * kv + 3 * d * f) + v * d
  attention_causal = 12 * layers * s * d / 2
  assert models.flops_per_token(cfg, s) == 6 * matmul + attention_causal
  assert models.flops_per_token(cfg, s, causal=False) == 6 * matmul + 2 * attention_causal
  assert models.flops_per_token(cfg, s, training=False) == (6 * matmul + attention_causal) / 3


def test_bf16_compute_with_f32_params():
  cfg = presets.get('tiny_llama', dtype='bfloat16')
  params = models.init_params(models.build(cfg), jax.random.key(0))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  logits = _forward(cfg, params, _tokens(cfg))
  ref = _forward(cfg.replace(dtype='float32'), params, _tokens(cfg))
  assert logits.dtype == jnp.float32
  assert float(jnp.abs(logits - ref).max()) < 0.05 * float(jnp.abs(ref).max())


def test_packed_segments_do_not_interact():
  """Changing one document of a packed row leaves the other documents' logits unchanged."""
  cfg = presets.get('tiny_llama')
  params = models.init_params(models.build(cfg), jax.random.key(0))
  seg = jnp.array([[1, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 0]])
  pos = jnp.array([[0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 1, 0]])
  tokens = _tokens(cfg, batch=1)
  changed = tokens.at[0, 4:9].set((tokens[0, 4:9] + 7) % cfg.vocab_size)
  a = _forward(cfg, params, tokens, positions=pos, segment_ids=seg)
  b = _forward(cfg, params, changed, positions=pos, segment_ids=seg)
  keep = np.asarray(seg[0] != 2)
  np.testing.assert_array_equal(np.asarray(a)[0, keep], np.asarray(b)[0, keep])
  assert not np.allclose(np.asarray(a)[0, ~keep], np.asarray(b)[0, ~keep])
  # And each document equals the model run on that document alone.
  alone = _forward(cfg, params, tokens[:, 4:9])
  np.testing.assert_allclose(a[:, 4:9], alone, atol=1e-5)


def test_rope_matches_complex_rotation_and_llama31_scaling():
  cfg = presets.get('tiny_llama', head_dim=8)
  x = jax.random.normal(jax.random.key(0), (1, 5, 2, 8))
  pos = jnp.arange(5)[None]
  inv = rope_inv_freq(cfg)
  # Rotate-half RoPE == multiplying (x[:d/2] + i x[d/2:]) by exp(i * pos * inv_freq).
  z = (x[..., :4] + 1j * x[..., 4:]) * np.exp(1j * pos[0, :, None, None] * inv)
  expected = np.concatenate([z.real, z.imag], -1)
  np.testing.assert_allclose(apply_rope(x, pos, inv), expected, atol=1e-5)
  # Llama 3.1: high frequencies kept, low frequencies divided by factor, smooth in between.
  scaled_cfg = cfg.replace(head_dim=64, rope_theta=500000.0, rope_scaling=dict(
      type='llama3', factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
      original_max_position_embeddings=8192))
  base, scaled = rope_inv_freq(scaled_cfg.replace(rope_scaling=None)), rope_inv_freq(scaled_cfg)
  wavelen = 2 * np.pi / base
  np.testing.assert_allclose(scaled[wavelen < 8192 / 4], base[wavelen < 8192 / 4])
  np.testing.assert_allclose(scaled[wavelen > 8192], base[wavelen > 8192] / 8, rtol=1e-6)
  mid = (wavelen >= 2048) & (wavelen <= 8192)
  assert mid.any() and np.all(scaled[mid] <= base[mid]) and np.all(scaled[mid] >= base[mid] / 8)


def test_encoder_decoder_learns_sequence_reversal():
  cfg = presets.get('tiny_transformer')
  model = models.build(cfg)
  params = models.init_params(model, jax.random.key(0))
  bos, seq, batch = 1, 8, 64

  def make_batch(rng):
    src = jax.random.randint(rng, (batch, seq), 2, cfg.vocab_size)
    tgt = src[:, ::-1]
    tgt_in = jnp.concatenate([jnp.full((batch, 1), bos), tgt[:, :-1]], axis=1)
    return src, tgt_in, tgt

  opt = optax.adam(optax.warmup_cosine_decay_schedule(0.0, 3e-3, 50, 600))
  opt_state = opt.init(params)

  @jax.jit
  def step(params, opt_state, rng):
    src, tgt_in, tgt = make_batch(rng)
    def loss_fn(p):
      logits = model.apply({'params': p}, src, tgt_in)
      return optax.softmax_cross_entropy_with_integer_labels(logits, tgt).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = jax.random.key(42)
  for _ in range(600):
    rng, sub = jax.random.split(rng)
    params, opt_state, loss = step(params, opt_state, sub)
  src, tgt_in, tgt = make_batch(jax.random.key(7))
  # Greedy autoregressive decoding, not teacher forcing: the model must produce the reversal.
  out = jnp.full((batch, 1), bos)
  for _ in range(seq):
    logits = jax.jit(model.apply)({"params": params}, src, out)
    out = jnp.concatenate([out, logits[:, -1].argmax(-1)[:, None]], axis=1)
  accuracy = float((out[:, 1:] == tgt).mean())
  print("reversal accuracy", accuracy)
  assert accuracy >= 0.95, (accuracy, float(loss))


@pytest.mark.parametrize('overrides,match', [
    (dict(d_model=100, num_heads=3), 'num_heads=3 does not divide model.d_model=100'),
    (dict(num_heads=4, num_kv_heads=3), 'num_kv_heads=3 does not divide model.num_heads=4'),
    (dict(d_model=60, num_heads=4), 'RoPE needs an even head dim'),
    (dict(norm='batchnorm'), "model.norm='batchnorm' is not supported"),
    (dict(rope_scaling=dict(type='yarn', factor=2)), "rope_scaling type 'yarn'"),
    (dict(rope_scaling=dict(type='llama3', factor=2)), 'missing'),
])
def test_bad_model_configs_fail_with_one_sentence(overrides, match):
  with pytest.raises(ConfigError, match=match):
    presets.get('tiny_llama', **overrides)


def test_unknown_key_and_unknown_preset():
  with pytest.raises(ConfigError, match=r"unknown model config key\(s\) \['n_layers'\]"):
    ModelConfig.from_dict({'n_layers': 2})
  with pytest.raises(KeyError, match='unknown model preset'):
    presets.get('llama9_1t')
