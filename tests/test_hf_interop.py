"""Hugging Face interop: logits parity with `transformers` models built locally from a config
with random weights (no downloads), export back to transformers, scanned params, bfloat16,
sharded checkpoints, the convert CLI, and the error messages for bad checkpoints."""
from __future__ import annotations

import copy
import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from safetensors.numpy import save_file  # noqa: E402
from safetensors import safe_open  # noqa: E402

import flaxllm.models as M  # noqa: E402
from flaxllm.interop import hf  # noqa: E402
from flaxllm.interop.hf import HFInteropError  # noqa: E402
from flaxllm.models.layers import rope_inv_freq  # noqa: E402

TOL = 1e-4
BATCH, SEQ = 2, 32

LLAMA_BASE = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=128,
                  rms_norm_eps=1e-5)
LLAMA31_SCALING = dict(rope_type='llama3', factor=8.0, low_freq_factor=1.0,
                       high_freq_factor=4.0, original_max_position_embeddings=16)

CASES = {
    'llama_mha': ('llama', dict(LLAMA_BASE)),
    'llama_gqa': ('llama', dict(LLAMA_BASE, num_key_value_heads=2)),
    'llama31_rope_scaling': ('llama', dict(LLAMA_BASE, num_key_value_heads=2,
                                           rope_theta=500000.0, rope_scaling=LLAMA31_SCALING)),
    'llama_linear_rope': ('llama', dict(LLAMA_BASE, rope_scaling=dict(rope_type='linear',
                                                                       factor=4.0))),
    'llama_tied': ('llama', dict(LLAMA_BASE, num_key_value_heads=4, tie_word_embeddings=True)),
    'llama_bias_headdim': ('llama', dict(LLAMA_BASE, num_key_value_heads=2, head_dim=16,
                                         attention_bias=True, mlp_bias=True)),
    'mistral_window': ('mistral', dict(LLAMA_BASE, num_key_value_heads=2, sliding_window=5)),
    'gpt2': ('gpt2', dict(vocab_size=200, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                          bos_token_id=0, eos_token_id=0)),
}


def _build_torch(family, fields, seed=0):
  """A float32 transformers model with eager attention; every parameter (norm scales and
  biases included, which init to 1/0) is randomised so a wrong mapping cannot hide."""
  cls_cfg, cls_model = {
      'llama': (transformers.LlamaConfig, transformers.LlamaForCausalLM),
      'mistral': (transformers.MistralConfig, transformers.MistralForCausalLM),
      'gpt2': (transformers.GPT2Config, transformers.GPT2LMHeadModel),
  }[family]
  torch.manual_seed(seed)
  config = cls_cfg(**fields)
  config._attn_implementation = 'eager'
  model = cls_model(config).to(torch.float32).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1 and ('norm' in name or 'ln_' in name) and name.endswith('weight'):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      else:
        p.copy_(0.1 * torch.randn_like(p))
  return model


def _tokens(vocab, seed=0):
  return np.random.RandomState(seed).randint(0, vocab, (BATCH, SEQ)).astype(np.int32)


def _torch_logits(model, tokens):
  with torch.no_grad():
    return model(torch.from_numpy(tokens.astype(np.int64))).logits.float().numpy()


def _flax_logits(cfg, params, tokens):
  return np.asarray(M.build(cfg).apply({'params': params}, tokens))


def _random_params(cfg, seed=0):
  """Random params of the right tree (norm scales and biases included), without compiling."""
  model = M.build(cfg)
  abstract = jax.eval_shape(lambda: M.init_params(model, jax.random.key(0)))
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda a: (0.1 * rng.standard_normal(a.shape)).astype(a.dtype), abstract)


def _maxdiff(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


@pytest.fixture(scope='module', params=list(CASES))
def case(request, tmp_path_factory):
  family, fields = CASES[request.param]
  model = _build_torch(family, fields)
  path = str(tmp_path_factory.mktemp(request.param))
  model.save_pretrained(path, safe_serialization=True)
  tokens = _tokens(model.config.vocab_size)
  return dict(name=request.param, family=family, model=model, path=path, tokens=tokens,
              ref=_torch_logits(model, tokens))


# ------------------------------------------------------------------------------ parity

def test_import_logits_match_transformers(case):
  cfg, params = hf.load(case['path'])
  # The tree has exactly the shapes the flaxllm model initialises.
  model = M.build(cfg)
  abstract = jax.eval_shape(lambda: M.init_params(model, jax.random.key(0)))
  assert jax.tree.map(lambda a: (a.shape, a.dtype), params) == \
      jax.tree.map(lambda a: (a.shape, a.dtype), abstract)
  diff = _maxdiff(_flax_logits(cfg, params, case['tokens']), case['ref'])
  assert diff <= TOL, f"{case['name']}: max |logits diff| {diff}"


def test_export_reloads_in_transformers(case, tmp_path):
  cfg, params = hf.load(case['path'])
  hf.save(cfg, params, str(tmp_path))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path), attn_implementation='eager', dtype=torch.float32).eval()
  assert type(reloaded) is type(case['model'])
  diff = _maxdiff(_torch_logits(reloaded, case['tokens']), case['ref'])
  assert diff <= TOL, f"{case['name']}: max |logits diff| after export {diff}"
  # Every tensor round-trips exactly.
  orig = case['model'].state_dict()
  for name, value in reloaded.state_dict().items():
    np.testing.assert_array_equal(value.numpy(), orig[name].numpy(), err_msg=name)


@pytest.mark.parametrize('case', ['llama_gqa', 'llama_bias_headdim', 'gpt2'], indirect=True)
def test_scanned_import_equals_unrolled(case, tmp_path):
  cfg, params = hf.load(case['path'])
  scfg, sparams = hf.load(case['path'], scan_layers=True)
  assert scfg.scan_layers and 'layers' in sparams['decoder']
  assert scfg == cfg.replace(scan_layers=True)
  layer0 = jax.tree.map(lambda a: a[0], sparams['decoder']['layers'])
  jax.tree.map(np.testing.assert_array_equal, layer0, params['decoder']['layers_0'])
  diff = _maxdiff(_flax_logits(scfg, sparams, case['tokens']),
                  _flax_logits(cfg, params, case['tokens']))
  assert diff <= 1e-5
  if case['name'] != 'llama_bias_headdim':  # scanned params also export
    hf.save(scfg, sparams, str(tmp_path))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), attn_implementation='eager', dtype=torch.float32).eval()
    assert _maxdiff(_torch_logits(reloaded, case['tokens']), case['ref']) <= TOL


# ------------------------------------------------------------------------------ config mapping

def test_llama31_rope_scaling_is_active(tmp_path):
  family, fields = CASES['llama31_rope_scaling']
  cfg = hf.config_from_hf(_build_torch(family, fields).config.to_dict())
  assert cfg.rope_scaling == dict(type='llama3', factor=8.0, low_freq_factor=1.0,
                                  high_freq_factor=4.0, original_max_position_embeddings=16)
  assert cfg.rope_theta == 500000.0
  scaled, plain = rope_inv_freq(cfg), rope_inv_freq(cfg.replace(rope_scaling=None))
  assert not np.allclose(scaled, plain)
  # The test sequence is longer than original_max_position_embeddings, so low frequencies
  # (wavelength > 16) are rescaled within it.
  assert SEQ > 16 and np.any(2 * np.pi / plain > 16)


def test_config_formats_v4_and_v5():
  v5 = dict(architectures=['LlamaForCausalLM'], hidden_size=64, intermediate_size=96,
            num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, vocab_size=100,
            max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=True,
            rope_parameters=dict(LLAMA31_SCALING, rope_theta=500000.0))
  v4 = {k: v for k, v in v5.items() if k != 'rope_parameters'}
  v4.update(rope_theta=500000.0, rope_scaling=dict(LLAMA31_SCALING))
  v4['rope_scaling']['type'] = v4['rope_scaling'].pop('rope_type')
  a, b = hf.config_from_hf(v5), hf.config_from_hf(v4)
  assert a == b and a.rope_theta == 500000.0 and a.rope_scaling['type'] == 'llama3'
  assert a.num_kv_heads == 2 and a.tie_embeddings and a.max_seq_len == 256
  linear = dict(v4, rope_scaling={'type': 'linear', 'factor': 2.0})
  assert hf.config_from_hf(linear).rope_scaling == {'type': 'linear', 'factor': 2.0}
  # And back: config_to_hf -> transformers config -> config_from_hf is the identity.
  d = hf.config_to_hf(a)
  tcfg = transformers.LlamaConfig(**{k: v for k, v in d.items() if k != 'architectures'})
  assert hf.config_from_hf(dict(tcfg.to_dict(), architectures=d['architectures'])) == a


def test_gpt2_config_mapping():
  cfg = hf.config_from_hf(dict(architectures=['GPT2LMHeadModel'], n_embd=64, n_layer=3,
                               n_head=4, n_inner=None, vocab_size=50, n_positions=40,
                               activation_function='gelu_new', layer_norm_epsilon=1e-5))
  assert (cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.mlp_dim, cfg.max_seq_len) == \
      (64, 3, 4, 256, 40)
  assert cfg.mlp_activation == 'gelu_tanh' and cfg.position == 'learned'
  assert cfg.norm == 'layernorm' and cfg.tie_embeddings and cfg.attn_bias and cfg.mlp_bias


def test_flaxllm_preset_exports(tmp_path):
  """A model created in flaxllm (tiny_llama preset, random init) exports and matches."""
  cfg = M.presets.get('tiny_llama')
  params = _random_params(cfg, seed=1)
  hf.save(cfg, params, str(tmp_path))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path), attn_implementation='eager', dtype=torch.float32).eval()
  tokens = _tokens(cfg.vocab_size, seed=3)
  assert _maxdiff(_torch_logits(reloaded, tokens), _flax_logits(cfg, params, tokens)) <= TOL
  cfg2, params2 = hf.load(str(tmp_path))
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params2, params)


# ------------------------------------------------------------------------------ formats

def test_sharded_checkpoint_import_and_export(tmp_path):
  family, fields = CASES['llama_gqa']
  model = _build_torch(family, fields, seed=1)
  src = tmp_path / 'src'
  model.save_pretrained(str(src), safe_serialization=True, max_shard_size='40KB')
  assert (src / 'model.safetensors.index.json').exists()
  assert len([f for f in os.listdir(src) if f.endswith('.safetensors')]) > 1
  tokens = _tokens(model.config.vocab_size, seed=1)
  ref = _torch_logits(model, tokens)
  cfg, params = hf.load(str(src))
  assert _maxdiff(_flax_logits(cfg, params, tokens), ref) <= TOL

  out = tmp_path / 'out'
  hf.save(cfg, params, str(out), max_shard_size='30KB')
  index = json.loads((out / 'model.safetensors.index.json').read_text())
  shards = sorted(set(index['weight_map'].values()))
  assert len(shards) > 1 and all((out / s).exists() for s in shards)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
      str(out), attn_implementation='eager', dtype=torch.float32).eval()
  assert _maxdiff(_torch_logits(reloaded, tokens), ref) <= TOL
  # Re-saving unsharded into the same directory removes the stale shards.
  hf.save(cfg, params, str(out))
  assert sorted(f for f in os.listdir(out) if f.startswith('model')) == ['model.safetensors']


def test_bfloat16_checkpoint(tmp_path):
  family, fields = CASES['llama_gqa']
  model = _build_torch(family, fields, seed=2)
  with torch.no_grad():  # float32 weights with bfloat16-representable values: the reference
    for p in model.parameters():
      p.copy_(p.bfloat16().float())
  # (Casting a copy, not `model`: .to(bfloat16) would also round torch's rotary inv_freq.)
  copy.deepcopy(model).to(torch.bfloat16).save_pretrained(str(tmp_path / 'bf16'),
                                                          safe_serialization=True)
  cfg, params = hf.load(str(tmp_path / 'bf16'))  # keeps the checkpoint dtype
  assert cfg.param_dtype == 'bfloat16'
  assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(params))
  # Bit-exact against torch's bfloat16 values.
  q = model.model.layers[0].self_attn.q_proj.weight.detach().float().numpy()
  np.testing.assert_array_equal(
      np.asarray(params['decoder']['layers_0']['attn']['q_proj']['kernel'], np.float32),
      q.T.reshape(64, 8, 8))
  # Upcast on load: same logits as the bf16-valued weights run in float32 by torch.
  cfg32, params32 = hf.load(str(tmp_path / 'bf16'), dtype='float32')
  assert cfg32.param_dtype == 'float32'
  tokens = _tokens(model.config.vocab_size, seed=2)
  ref = _torch_logits(model, tokens)
  assert _maxdiff(_flax_logits(cfg32, params32, tokens), ref) <= TOL
  # bf16 export: the file holds BF16 tensors and transformers loads it.
  hf.save(cfg, params, str(tmp_path / 'out'))
  with safe_open(str(tmp_path / 'out' / 'model.safetensors'), 'np') as f:
    assert f.get_slice('model.embed_tokens.weight').get_dtype() == 'BF16'
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path / 'out'), attn_implementation='eager', dtype=torch.float32).eval()
  assert _maxdiff(_torch_logits(reloaded, tokens), ref) <= TOL


def test_gpt2_legacy_names_and_buffers(tmp_path):
  """Original GPT-2 files name tensors without 'transformer.' and carry attn.bias buffers."""
  family, fields = CASES['gpt2']
  model = _build_torch(family, fields, seed=4)
  tensors = {k.replace('transformer.', ''): v.numpy() for k, v in model.state_dict().items()
             if k != 'lm_head.weight'}
  for i in range(model.config.n_layer):
    tensors[f'h.{i}.attn.bias'] = np.tril(np.ones((1, 1, 64, 64), np.float32))
    tensors[f'h.{i}.attn.masked_bias'] = np.array(-1e4, np.float32)
  save_file(tensors, str(tmp_path / 'model.safetensors'), metadata={'format': 'pt'})
  (tmp_path / 'config.json').write_text(json.dumps(model.config.to_dict()))
  cfg, params = hf.load(str(tmp_path))
  tokens = _tokens(model.config.vocab_size, seed=4)
  assert _maxdiff(_flax_logits(cfg, params, tokens), _torch_logits(model, tokens)) <= TOL


def test_convert_cli_round_trip(tmp_path):
  family, fields = CASES['gpt2']
  model = _build_torch(family, fields, seed=5)
  model.save_pretrained(str(tmp_path / 'hf'), safe_serialization=True)
  assert hf.convert_main(['--from-hf', str(tmp_path / 'hf'), '--to', str(tmp_path / 'fl')]) == 0
  assert (tmp_path / 'fl' / 'model_config.json').exists()
  cfg, params = hf.load_flaxllm(str(tmp_path / 'fl'))
  tokens = _tokens(model.config.vocab_size, seed=5)
  ref = _torch_logits(model, tokens)
  assert _maxdiff(_flax_logits(cfg, params, tokens), ref) <= TOL
  assert hf.convert_main(['--from', str(tmp_path / 'fl'), '--to-hf', str(tmp_path / 'hf2'),
                          '--max-shard-size', '50KB']) == 0
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path / 'hf2'), attn_implementation='eager', dtype=torch.float32).eval()
  assert _maxdiff(_torch_logits(reloaded, tokens), ref) <= TOL
  with pytest.raises(SystemExit):
    hf.convert_main(['--from-hf', str(tmp_path / 'hf'), '--to-hf', str(tmp_path / 'x')])


# ------------------------------------------------------------------------------ bad input

@pytest.fixture(scope='module')
def small_llama_dir(tmp_path_factory):
  model = _build_torch('llama', dict(LLAMA_BASE, num_hidden_layers=1), seed=6)
  path = tmp_path_factory.mktemp('small_llama')
  model.save_pretrained(str(path), safe_serialization=True)
  return path


def _copy_with(src, dst, *, tensors=None, config=None):
  """Copies a single-file checkpoint, editing its tensor dict and/or config dict."""
  os.makedirs(dst, exist_ok=True)
  with safe_open(str(src / 'model.safetensors'), 'np') as f:
    t = {k: f.get_tensor(k) for k in f.keys()}
  c = json.loads((src / 'config.json').read_text())
  save_file(tensors(t) if tensors else t, str(dst / 'model.safetensors'),
            metadata={'format': 'pt'})
  (dst / 'config.json').write_text(json.dumps(config(c) if config else c))
  return str(dst)


def test_error_unsupported_architecture(small_llama_dir, tmp_path):
  path = _copy_with(small_llama_dir, tmp_path,
                    config=lambda c: dict(c, architectures=['BertForMaskedLM']))
  with pytest.raises(HFInteropError, match=r'unsupported architecture BertForMaskedLM; '
                     r'supported: LlamaForCausalLM, MistralForCausalLM, GPT2LMHeadModel'):
    hf.load(path)


def test_error_unsupported_activation_and_rope(small_llama_dir, tmp_path):
  path = _copy_with(small_llama_dir, tmp_path / 'a', config=lambda c: dict(c, hidden_act='gelu'))
  with pytest.raises(HFInteropError, match=r"hidden_act='gelu' is not supported"):
    hf.load(path)
  path = _copy_with(small_llama_dir, tmp_path / 'b', config=lambda c: dict(
      c, rope_parameters=dict(rope_type='yarn', factor=2.0, rope_theta=1e4)))
  with pytest.raises(HFInteropError, match=r"unsupported rope scaling type 'yarn'"):
    hf.load(path)


def test_error_missing_config(small_llama_dir, tmp_path):
  path = _copy_with(small_llama_dir, tmp_path)
  os.remove(os.path.join(path, 'config.json'))
  with pytest.raises(FileNotFoundError, match=r'no config\.json in'):
    hf.load(path)
  with pytest.raises(HFInteropError, match=r'does not exist'):
    hf.load(str(tmp_path / 'nope'))


def test_error_missing_weights(small_llama_dir, tmp_path):
  path = _copy_with(small_llama_dir, tmp_path)
  os.remove(os.path.join(path, 'model.safetensors'))
  with pytest.raises(HFInteropError, match=r'no weights in .*expected model\.safetensors'):
    hf.load(path)
  open(os.path.join(path, 'pytorch_model.bin'), 'wb').close()
  with pytest.raises(HFInteropError, match=r'found pytorch_model\.bin; only safetensors'):
    hf.load(path)


def test_error_missing_shard(tmp_path):
  model = _build_torch('llama', dict(LLAMA_BASE, num_hidden_layers=1), seed=7)
  model.save_pretrained(str(tmp_path), safe_serialization=True, max_shard_size='40KB')
  shard = sorted(f for f in os.listdir(tmp_path) if f.endswith('.safetensors'))[-1]
  os.remove(tmp_path / shard)
  with pytest.raises(HFInteropError, match=rf"weight shard '{shard}' listed in .* is missing"):
    hf.load(str(tmp_path))


def test_error_missing_tensor(small_llama_dir, tmp_path):
  name = 'model.layers.0.self_attn.k_proj.weight'
  path = _copy_with(small_llama_dir, tmp_path,
                    tensors=lambda t: {k: v for k, v in t.items() if k != name})
  with pytest.raises(HFInteropError, match=rf"missing tensor\(s\) '{name}'"):
    hf.load(path)


def test_error_wrong_shape(small_llama_dir, tmp_path):
  name = 'model.layers.0.mlp.up_proj.weight'
  path = _copy_with(small_llama_dir, tmp_path,
                    tensors=lambda t: dict(t, **{name: t[name][:50]}))
  with pytest.raises(HFInteropError, match=rf"tensor '{name}' has shape \(50, 64\) in the "
                     r'checkpoint but the config expects \(96, 64\)'):
    hf.load(path)
  # A config override that changes shapes is caught the same way.
  with pytest.raises(HFInteropError, match=r"'model.embed_tokens.weight' has shape \(160, 64\)"):
    hf.load(str(small_llama_dir), vocab_size=128)


def test_error_extra_tensors(small_llama_dir, tmp_path):
  path = _copy_with(small_llama_dir, tmp_path, tensors=lambda t: dict(
      t, **{'model.layers.1.self_attn.q_proj.weight': np.zeros((64, 64), np.float32),
            'model.extra.weight': np.zeros(3, np.float32)}))
  with pytest.raises(HFInteropError, match=r"unexpected tensor\(s\) 'model.extra.weight', "
                     r"'model.layers.1.self_attn.q_proj.weight'"):
    hf.load(path)


def test_errors_are_raised_before_reading_weights(small_llama_dir, tmp_path, monkeypatch):
  """Name/shape problems surface from the headers alone: no tensor is read, nothing compiled."""
  path = _copy_with(small_llama_dir, tmp_path, tensors=lambda t: dict(
      t, **{'model.norm.weight': np.zeros(3, np.float32)}))
  monkeypatch.setattr(hf._TensorSource, 'get', lambda *a: pytest.fail('read a tensor'))
  monkeypatch.setattr(jax, 'jit', lambda *a, **k: pytest.fail('compiled'))
  with pytest.raises(HFInteropError, match=r"tensor 'model.norm.weight' has shape \(3,\)"):
    hf.load(path)


def test_save_errors(tmp_path):
  cfg = M.presets.get('tiny_llama')
  params = _random_params(cfg)
  with pytest.raises(HFInteropError, match=r"cannot be exported to Hugging Face: "
                     r"arch='encoder_decoder'"):
    hf.save(M.presets.get('tiny_transformer'), {}, str(tmp_path))
  bad = jax.tree.map(lambda x: x, params)
  del bad['decoder']['layers_1']['mlp']['up_proj']
  with pytest.raises(HFInteropError, match=r"params are missing 'decoder/layers_1/mlp/up_proj/"
                     r"kernel'"):
    hf.save(cfg, bad, str(tmp_path))
  bad = jax.tree.map(lambda x: x, params)
  bad['lm_head']['kernel'] = bad['lm_head']['kernel'][:, :10]
  with pytest.raises(HFInteropError, match=r"param 'lm_head/kernel' has shape \(64, 10\) but "
                     r'the model config expects \(64, 256\)'):
    hf.save(cfg, bad, str(tmp_path))
  assert not os.listdir(tmp_path)  # nothing written on error


@pytest.mark.parametrize('preset', ['gpt2', 'llama2_7b', 'llama3.1_8b', 'llama3.2_1b'])
def test_preset_config_and_tensor_names_match_transformers(preset):
  """Full-size presets: config round trip through transformers, and the exact tensor names and
  shapes a transformers model of that config has (built on the meta device, no memory)."""
  cfg = M.presets.get(preset)
  d = hf.config_to_hf(cfg)
  tcfg = transformers.AutoConfig.for_model(
      d['model_type'], **{k: v for k, v in d.items() if k not in ('model_type',)})
  back = hf.config_from_hf(dict(tcfg.to_dict(), architectures=d['architectures']))
  norm = lambda c: c.replace(head_dim=c.dim_per_head, num_kv_heads=c.kv_heads, init_std=0.02)
  assert norm(back) == norm(cfg)
  with torch.device('meta'):
    model = transformers.AutoModelForCausalLM.from_config(tcfg)
  family = 'gpt2' if preset == 'gpt2' else 'llama'
  ours = {n: s for g in hf.tensor_groups(family, cfg) for n, s in zip(g.hf, g.hf_shapes)}
  theirs = {n: tuple(t.shape) for n, t in model.state_dict().items()
            if not (cfg.tie_embeddings and n == 'lm_head.weight')}
  assert ours == theirs
