"""GGUF export (`flaxllm convert --from=DIR --to-gguf=FILE`), read back with the gguf library:
every tensor equals its flaxllm parameter after the documented permutations (inverted here,
apart from the exporter), the metadata and tokenizers round trip, f16 and q8_0 stay within their
rounding, a numpy transcription of llama.cpp's llama and gpt2 graphs run on the file gives
flaxllm's logits, LoRA adapters are merged, and bad input is refused in one sentence with
nothing written. With llama-cpp-python installed, llama.cpp itself: logits and greedy tokens."""
from __future__ import annotations

import inspect
import json
import os
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

gguf = pytest.importorskip('gguf', reason="the gguf library is not installed "
                                          "(pip install 'flaxllm[gguf]')")

import flaxllm.models as M  # noqa: E402
from flaxllm import cli  # noqa: E402
from flaxllm import generate as generate_lib  # noqa: E402
from flaxllm.data import tokenizer as tokenizer_lib  # noqa: E402
from flaxllm.interop import convert, hf, native  # noqa: E402
from flaxllm.interop import gguf as gguf_export  # noqa: E402
from flaxllm.interop import peft as peft_io  # noqa: E402
from flaxllm.models.config import ModelConfig  # noqa: E402
from flaxllm.models.layers import rope_inv_freq  # noqa: E402
from flaxllm.peft import lora  # noqa: E402

try:
  import llama_cpp  # noqa: E402
except ImportError:
  llama_cpp = None
needs_llama_cpp = pytest.mark.skipif(
    llama_cpp is None, reason="llama-cpp-python is not installed (it is in the dev extra; "
                              "pip install 'flaxllm[llamacpp]' builds llama.cpp from source)")

BASE = dict(arch='decoder', vocab_size=288, d_model=64, num_layers=2, num_heads=4, mlp_dim=96,
            max_seq_len=64, norm_eps=1e-5)
LLAMA31 = dict(type='llama3', factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
               original_max_position_embeddings=16)
CASES = {
    'llama_gqa': dict(BASE, num_kv_heads=2),
    'llama_tied_mqa_scanned': dict(BASE, num_kv_heads=1, tie_embeddings=True, scan_layers=True),
    'llama31_rope_scaling': dict(BASE, num_kv_heads=2, rope_theta=500000.0, rope_scaling=LLAMA31),
    'llama_linear_rope_head_dim': dict(BASE, num_kv_heads=2, head_dim=32,
                                       rope_scaling=dict(type='linear', factor=4.0)),
    'gpt2': dict(BASE, position='learned', norm='layernorm', mlp_activation='gelu_tanh',
                 attn_bias=True, mlp_bias=True, tie_embeddings=True),
}
TEXT = 'def add(a, b):\n\treturn a + b  # caf\u00e9 \u20ac \U0001f600\n'
TOKENS = [1] + tokenizer_lib.ByteTokenizer().encode(TEXT)   # BOS + 47 bytes
PROMPT = 12                                                  # greedy runs continue TOKENS[:12]
# MQA + tied + scanned layers, GQA + Llama-3.1 RoPE, GPT-2
MEMORIZED = ['llama_tied_mqa_scanned', 'llama31_rope_scaling', 'gpt2']


def _random_params(cfg, seed=0, std=0.1):
  """Random params of the model's tree (norm scales around 1), without compiling."""
  abstract = jax.eval_shape(lambda: M.init_params(M.build(cfg), jax.random.key(0)))
  rng = np.random.RandomState(seed)

  def draw(path, a):
    name = jax.tree_util.keystr(path)
    centre = 1.0 if 'norm' in name and 'scale' in name else 0.0
    return (centre + std * rng.standard_normal(a.shape)).astype(a.dtype)
  return jax.tree_util.tree_map_with_path(draw, abstract)


def _model_dir(path, cfg, params, tokenizer='bytes'):
  native.save_flaxllm(cfg, params, str(path))
  if tokenizer == 'bytes':
    (path / 'tokenizer.json').write_text(json.dumps({'kind': 'bytes'}))
  elif tokenizer is not None:
    (path / 'tokenizer.model').write_bytes(tokenizer)
  return str(path)


def _export(src, out, *args):
  assert convert.convert_main(['--from', str(src), '--to-gguf', str(out), *args]) == 0
  return _read(out)


def _read(path):
  """(fields, {name: float32 array}, {name: ggml type}) of a GGUF file."""
  reader = gguf.GGUFReader(str(path))
  fields = {k: f.contents() for k, f in reader.fields.items()}
  values = {t.name: np.asarray(gguf.quants.dequantize(np.array(t.data), t.tensor_type),
                               np.float32) for t in reader.tensors}
  types = {t.name: t.tensor_type for t in reader.tensors}
  return fields, values, types


def _unrolled(params):
  """`params` with a scanned `decoder/layers` split into `layers_{i}`, as numpy."""
  params = jax.tree.map(np.asarray, params)
  dec = dict(params['decoder'])
  if 'layers' in dec:
    stacked = dec.pop('layers')
    n = jax.tree.leaves(stacked)[0].shape[0]
    for i in range(n):
      dec[f'layers_{i}'] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return dict(params, decoder=dec)


def _flat(tree, prefix=''):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f'{prefix}{k}/'))
    else:
      out[f'{prefix}{k}'] = np.asarray(v)
  return out


# ------------------------------------------------------------------------------ the inverse

def _unpermute(w, n_heads):
  """The inverse of the exporter's q/k permutation: row 2i + j of a head in the file (llama.cpp's
  adjacent-pair RoPE) is row i + j*d/2 of flaxllm's (rotate-half RoPE)."""
  d = w.shape[0] // n_heads
  return w.reshape(n_heads, d // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def _to_flaxllm(cfg, t):
  """The flaxllm param tree (unrolled layers) rebuilt from the file's tensors, and the tensor
  names it used."""
  D, h, kv, d = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
  used = set()

  def get(name):
    used.add(name)
    return t[name]
  params = {'embed': {'embedding': get('token_embd.weight')}}
  dec = {}
  for i in range(cfg.num_layers):
    b = f'blk.{i}.'
    if cfg.position == 'rope':
      layer = {
          'attn': {
              'q_proj': {'kernel': _unpermute(get(b + 'attn_q.weight'), h).T.reshape(D, h, d)},
              'k_proj': {'kernel': _unpermute(get(b + 'attn_k.weight'), kv).T.reshape(D, kv, d)},
              'v_proj': {'kernel': get(b + 'attn_v.weight').T.reshape(D, kv, d)},
              'o_proj': {'kernel': get(b + 'attn_output.weight').T.reshape(h, d, D)}},
          'mlp': {n: {'kernel': get(f'{b}ffn_{g}.weight').T}
                  for n, g in (('gate_proj', 'gate'), ('up_proj', 'up'), ('down_proj', 'down'))},
          'attn_norm': {'scale': get(b + 'attn_norm.weight')},
          'mlp_norm': {'scale': get(b + 'ffn_norm.weight')}}
    else:
      q, k, v = np.split(get(b + 'attn_qkv.weight'), 3, axis=0)       # [3D, D] -> 3 x [D, D]
      qb, kb, vb = np.split(get(b + 'attn_qkv.bias'), 3)
      layer = {
          'attn': {n: {'kernel': w.T.reshape(D, h, d), 'bias': bias.reshape(h, d)}
                   for n, w, bias in (('q_proj', q, qb), ('k_proj', k, kb), ('v_proj', v, vb))},
          'mlp': {'up_proj': {'kernel': get(b + 'ffn_up.weight').T, 'bias': get(b + 'ffn_up.bias')},
                  'down_proj': {'kernel': get(b + 'ffn_down.weight').T,
                                'bias': get(b + 'ffn_down.bias')}},
          'attn_norm': {'scale': get(b + 'attn_norm.weight'), 'bias': get(b + 'attn_norm.bias')},
          'mlp_norm': {'scale': get(b + 'ffn_norm.weight'), 'bias': get(b + 'ffn_norm.bias')}}
      layer['attn']['o_proj'] = {'kernel': get(b + 'attn_output.weight').T.reshape(h, d, D),
                                 'bias': get(b + 'attn_output.bias')}
    dec[f'layers_{i}'] = layer
  dec['final_norm'] = {'scale': get('output_norm.weight')}
  if cfg.position == 'learned':
    dec['final_norm']['bias'] = get('output_norm.bias')
    params['pos_embed'] = {'embedding': get('position_embd.weight')}
  params['decoder'] = dec
  if not cfg.tie_embeddings:
    params['lm_head'] = {'kernel': get('output.weight').T}
  return params, used


def _check_metadata(fields, cfg, file_type):
  arch = 'llama' if cfg.position == 'rope' else 'gpt2'
  assert fields['general.architecture'] == arch
  f = {k[len(arch) + 1:]: v for k, v in fields.items() if k.startswith(arch + '.')}
  assert (f['block_count'], f['embedding_length'], f['feed_forward_length']) == (
      cfg.num_layers, cfg.d_model, cfg.mlp_dim)
  assert (f['attention.head_count'], f['attention.head_count_kv']) == (cfg.num_heads,
                                                                         cfg.kv_heads)
  assert (f['context_length'], f['vocab_size']) == (cfg.max_seq_len, cfg.vocab_size)
  assert fields['general.file_type'] == file_type
  if arch == 'llama':
    assert f['rope.freq_base'] == cfg.rope_theta
    assert f['attention.layer_norm_rms_epsilon'] == np.float32(cfg.norm_eps)
    assert f['rope.dimension_count'] == f['attention.key_length'] == cfg.dim_per_head
    if cfg.rope_scaling and cfg.rope_scaling['type'] == 'linear':
      assert (f['rope.scaling.type'], f['rope.scaling.factor']) == (
          'linear', cfg.rope_scaling['factor'])
    else:
      assert 'rope.scaling.type' not in f
  else:
    assert f['attention.layer_norm_epsilon'] == np.float32(cfg.norm_eps)


# ------------------------------------------------------------------------------ llama.cpp in numpy

def _q8_0(x):
  """ggml's CPU matmul with a Q8_0 weight quantizes the activation rows to Q8_0 too."""
  q = gguf.GGMLQuantizationType.Q8_0
  return gguf.quants.dequantize(gguf.quants.quantize(x.astype(np.float32), q), q)


def _mm(x, name, t, types):
  """x @ W.T as ggml's CPU matmul computes it for W's type (activations rounded to f16 / Q8_0
  for f16 / Q8_0 weights)."""
  kind = types.get(name)
  if kind == gguf.GGMLQuantizationType.F16:
    x = x.astype(np.float16).astype(np.float32)
  elif kind == gguf.GGMLQuantizationType.Q8_0:
    x = _q8_0(x)
  return x.astype(np.float64) @ t[name].T.astype(np.float64)


def _rope_pairs(x, theta, factors, freq_scale):
  """ggml_rope mode 0 (LLaMA): dims 2i and 2i+1 rotate by p * freq_scale * theta^(-2i/d) /
  factors[i]. x [T, heads, d]."""
  d = x.shape[-1]
  inv = theta ** (-np.arange(0, d, 2) / d) / factors * freq_scale
  ang = np.arange(x.shape[0])[:, None, None] * inv
  x0, x1 = x[..., 0::2], x[..., 1::2]
  out = np.empty_like(x)
  out[..., 0::2] = x0 * np.cos(ang) - x1 * np.sin(ang)
  out[..., 1::2] = x0 * np.sin(ang) + x1 * np.cos(ang)
  return out


def _attend(q, k, v):
  """Causal attention; query head h reads kv head h // (heads / kv_heads) (ggml broadcast)."""
  rep = q.shape[1] // k.shape[1]
  k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
  s = np.einsum('thd,shd->hts', q, k) / np.sqrt(q.shape[-1])
  s = np.where(np.tril(np.ones(s.shape[1:], bool)), s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum('hts,shd->thd', p, v).reshape(q.shape[0], -1)


def _rms(x, w, eps):
  return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _ln(x, w, b, eps):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


def _llama_cpp_numpy(fields, t, types, tokens):
  """Logits [T, V] of llama.cpp's llama / gpt2 graph (llm_build_llama / llm_build_gpt2)
  transcribed to numpy and run on the file's tensors and metadata."""
  arch = fields['general.architecture']

  def hp(key, default=None):
    return fields.get(f'{arch}.{key}', default)
  H, KV = hp('attention.head_count'), hp('attention.head_count_kv')
  x = t['token_embd.weight'][tokens].astype(np.float64)
  if arch == 'gpt2':
    x = x + t['position_embd.weight'][np.arange(len(tokens))]
  for i in range(hp('block_count')):
    b = f'blk.{i}.'

    def mm(x, name, b=b):
      return _mm(x, b + name, t, types)
    if arch == 'llama':
      eps = hp('attention.layer_norm_rms_epsilon')
      factors = t.get('rope_freqs.weight', 1.0)
      scale = 1.0 / hp('rope.scaling.factor', 1.0)
      n = _rms(x, t[b + 'attn_norm.weight'], eps)
      q = _rope_pairs(mm(n, 'attn_q.weight').reshape(len(tokens), H, -1),
                      hp('rope.freq_base'), factors, scale)
      k = _rope_pairs(mm(n, 'attn_k.weight').reshape(len(tokens), KV, -1),
                      hp('rope.freq_base'), factors, scale)
      v = mm(n, 'attn_v.weight').reshape(len(tokens), KV, -1)
      x = x + mm(_attend(q, k, v), 'attn_output.weight')
      n = _rms(x, t[b + 'ffn_norm.weight'], eps)
      gate, up = mm(n, 'ffn_gate.weight'), mm(n, 'ffn_up.weight')
      x = x + mm(gate / (1 + np.exp(-gate)) * up, 'ffn_down.weight')
    else:
      eps = hp('attention.layer_norm_epsilon')
      n = _ln(x, t[b + 'attn_norm.weight'], t[b + 'attn_norm.bias'], eps)
      qkv = mm(n, 'attn_qkv.weight') + t[b + 'attn_qkv.bias']
      q, k, v = (a.reshape(len(tokens), H, -1) for a in np.split(qkv, 3, axis=-1))
      x = x + mm(_attend(q, k, v), 'attn_output.weight') + t[b + 'attn_output.bias']
      n = _ln(x, t[b + 'ffn_norm.weight'], t[b + 'ffn_norm.bias'], eps)
      u = mm(n, 'ffn_up.weight') + t[b + 'ffn_up.bias']
      u = 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u ** 3)))
      x = x + mm(u, 'ffn_down.weight') + t[b + 'ffn_down.bias']
  if arch == 'llama':
    x = _rms(x, t['output_norm.weight'], hp('attention.layer_norm_rms_epsilon'))
  else:
    x = _ln(x, t['output_norm.weight'], t['output_norm.bias'], hp('attention.layer_norm_epsilon'))
  head = 'output.weight' if 'output.weight' in t else 'token_embd.weight'   # tied: llama.cpp's
  return _mm(x, head, t, types)


def _flax_logits(cfg, params, tokens):
  return np.asarray(M.build(cfg).apply({'params': params}, np.asarray([tokens], np.int32)))[0]


def _prompt(cfg, n=40):
  return [1] + list(np.random.RandomState(1).randint(3, cfg.vocab_size, n - 1))


# ------------------------------------------------------------------------------ fixtures

_MADE: dict = {}


def _case(name, tmp_path_factory):
  """A flaxllm model directory of the case `name` (random params, bytes tokenizer) and its f32
  export, made once per module."""
  if name not in _MADE:
    cfg = ModelConfig.from_dict(CASES[name])
    params = _random_params(cfg)
    root = tmp_path_factory.mktemp(name)
    src = _model_dir(root / 'model', cfg, params)
    fields, t, types = _export(src, root / 'model.gguf')
    _MADE[name] = dict(name=name, cfg=cfg, params=params, src=src, root=root, fields=fields,
                       t=t, types=types)
  return _MADE[name]


@pytest.fixture(scope='module', params=list(CASES))
def case(request, tmp_path_factory):
  return _case(request.param, tmp_path_factory)


@pytest.fixture
def gqa(tmp_path_factory):
  return _case('llama_gqa', tmp_path_factory)


@pytest.fixture(scope='module')
def texts():
  return [inspect.getsource(textwrap), inspect.getsource(json.decoder)]


@pytest.fixture(scope='module')
def spm_proto(texts):
  """A flaxllm-style SentencePiece model (BPE, byte fallback, no dummy prefix), trained here."""
  settings = tokenizer_lib.spm_settings(dict(vocab_size=400, model_type='bpe'))
  return tokenizer_lib.train_sentencepiece(texts, settings)


def _memorize(cfg, params, tokens, steps=150):
  """`params` trained (Adam) until the model continues `tokens` greedily: peaked logits, unlike a
  random model's near-ties, which any rounding flips."""
  model = M.build(cfg)
  x, y = jnp.asarray([tokens[:-1]]), jnp.asarray([tokens[1:]])
  opt = optax.adam(3e-3)

  @jax.jit
  def step(params, state):
    def loss(p):
      return optax.softmax_cross_entropy_with_integer_labels(
          model.apply({'params': p}, x), y).mean()
    grads = jax.grad(loss)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  state = opt.init(params)
  for _ in range(steps):
    params, state = step(params, state)
  return jax.device_get(params)


@pytest.fixture(scope='module', params=MEMORIZED)
def memorized(request, tmp_path_factory):
  """A model of each case that has memorized TEXT, exported f32 and q8_0, with flaxllm's logits
  for the whole text and flaxllm.generate's greedy continuation of its first PROMPT tokens."""
  cfg = ModelConfig.from_dict(CASES[request.param])
  params = _memorize(cfg, _random_params(cfg), TOKENS)
  root = tmp_path_factory.mktemp(f'memorized_{request.param}')
  src = _model_dir(root / 'model', cfg, params)
  _export(src, root / 'f32.gguf')
  _export(src, root / 'q8_0.gguf', '--type=q8_0')
  want = generate_lib.generate(cfg, params, [TOKENS[:PROMPT]],
                               max_new_tokens=len(TOKENS) - PROMPT, temperature=0.0)[0]
  return dict(name=request.param, cfg=cfg, params=params, root=root, want=want,
              ref=_flax_logits(cfg, params, TOKENS))


# ------------------------------------------------------------------------------ f32: every tensor

def test_every_tensor_equals_its_param(case):
  cfg, t = case['cfg'], case['t']
  rebuilt, used = _to_flaxllm(cfg, t)
  want = _flat(_unrolled(case['params']))
  got = _flat(rebuilt)
  assert sorted(got) == sorted(want)
  for name, value in want.items():
    assert got[name].shape == value.shape, name
    assert np.array_equal(got[name], value.astype(np.float32)), name
  extra = set(t) - used
  assert extra == ({'rope_freqs.weight'} if case['name'] == 'llama31_rope_scaling' else set())
  assert set(case['types'].values()) == {gguf.GGMLQuantizationType.F32}


def test_metadata(case):
  _check_metadata(case['fields'], case['cfg'], gguf.LlamaFileType.ALL_F32)


def test_llama31_rope_freqs_are_flaxllm_frequencies(tmp_path_factory):
  """rope_freqs (what llama.cpp divides each frequency by) times flaxllm's scaled frequencies
  gives the unscaled ones."""
  case = _case('llama31_rope_scaling', tmp_path_factory)
  cfg = case['cfg']
  d = cfg.dim_per_head
  unscaled = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2) / d))
  factors = case['t']['rope_freqs.weight']
  assert factors.shape == (d // 2,) and 1.0 <= factors.min() < factors.max() == 8.0
  np.testing.assert_allclose(unscaled / factors, rope_inv_freq(cfg), rtol=1e-6)


def test_llama_cpp_graph_in_numpy_gives_flaxllm_logits(case):
  cfg = case['cfg']
  tokens = _prompt(cfg)
  ref = _flax_logits(cfg, case['params'], tokens)
  got = _llama_cpp_numpy(case['fields'], case['t'], case['types'], tokens)
  rel = np.max(np.abs(got - ref)) / np.max(np.abs(ref))
  assert rel < 1e-5, f"{case['name']}: relative logits difference {rel:.2e}"


def _numpy_greedy(fields, t, types, prompt, n):
  out = list(prompt)
  for _ in range(n):
    out.append(int(_llama_cpp_numpy(fields, t, types, out)[-1].argmax()))
  return out[len(prompt):]


def test_memorized_model_argmax_and_greedy_tokens_through_the_numpy_graph(memorized):
  """On a trained model, llama.cpp's graph (numpy, with ggml's f16/Q8_0 activation rounding)
  on the f32 and q8_0 files gives flaxllm's argmax at >= 99% of positions and the greedy
  tokens of flaxllm.generate."""
  m = memorized
  assert m['want'] == TOKENS[PROMPT:]   # flaxllm's greedy decoding continues the memorized text
  for kind in ('f32', 'q8_0'):
    fields, t, types = _read(m['root'] / f'{kind}.gguf')
    got = _llama_cpp_numpy(fields, t, types, TOKENS)
    agree = np.mean(got.argmax(-1) == m['ref'].argmax(-1))
    assert agree >= 0.99, f'{kind}: the same argmax at {agree:.1%} of positions'
    assert _numpy_greedy(fields, t, types, TOKENS[:PROMPT], len(TOKENS) - PROMPT) == m['want']


# ------------------------------------------------------------------------------ f16 and q8_0

@pytest.mark.parametrize('kind', ['f16', 'q8_0'])
def test_f16_and_q8_0(case, kind):
  fields, t, types = _export(case['src'], case['root'] / f'{kind}.gguf', '--type', kind)
  _check_metadata(fields, case['cfg'], {'f16': gguf.LlamaFileType.MOSTLY_F16,
                                        'q8_0': gguf.LlamaFileType.MOSTLY_Q8_0}[kind])
  exact = case['t']
  assert set(t) == set(exact)
  F32, F16, Q8 = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
                  gguf.GGMLQuantizationType.Q8_0)
  for name, x in exact.items():
    if x.ndim == 1 or name.startswith('position_embd'):   # norms, biases, rope_freqs, positions
      assert types[name] == F32 and np.array_equal(t[name], x), name
    elif kind == 'f16' or x.shape[-1] % 32:
      assert types[name] == F16, name
      assert np.array_equal(t[name], x.astype(np.float16).astype(np.float32)), name
    else:   # Q8_0: blocks of 32, q = round(x / s) with s = max|x| / 127, stored as f16(s):
      assert types[name] == Q8, name   # |q f16(s) - x| <= s / 2 + 127 |f16(s) - s|
      blocks = x.reshape(-1, 32)
      scale = np.abs(blocks).max(-1, keepdims=True) / 127
      err = np.abs(t[name].reshape(-1, 32) - blocks)
      assert np.all(err <= scale * (0.5 + 127 * 2.0 ** -11) + 1e-8), name
  tokens = _prompt(case['cfg'])   # a random model's logits: near-ties, so no argmax check here
  ref = _flax_logits(case['cfg'], case['params'], tokens)
  got = _llama_cpp_numpy(fields, t, types, tokens)
  rel = np.max(np.abs(got - ref)) / np.max(np.abs(ref))
  assert rel < (5e-3 if kind == 'f16' else 5e-2), f'{kind}: relative logits difference {rel:.2e}'


def test_q8_0_falls_back_to_f16_for_rows_not_a_multiple_of_32(tmp_path):
  cfg = ModelConfig.from_dict(dict(BASE, num_kv_heads=2, mlp_dim=80))
  src = _model_dir(tmp_path / 'm', cfg, _random_params(cfg))
  _, _, types = _export(src, tmp_path / 'q.gguf', '--type=q8_0')
  assert types['blk.0.ffn_down.weight'] == gguf.GGMLQuantizationType.F16      # rows of 80
  assert types['blk.0.ffn_up.weight'] == gguf.GGMLQuantizationType.Q8_0       # rows of 64


# ------------------------------------------------------------------------------ tokenizers

def _llama_cpp_spm_detokenize(fields, ids):
  """llama.cpp's token_to_piece for a 'llama' vocabulary: a byte token <0xNN> is that byte,
  a normal token its text with '\u2581' as a space, control tokens nothing."""
  tokens, types = fields['tokenizer.ggml.tokens'], fields['tokenizer.ggml.token_type']
  out = b''
  for i in ids:
    if types[i] == gguf.TokenType.BYTE:
      out += bytes([int(tokens[i][3:5], 16)])
    elif types[i] == gguf.TokenType.NORMAL:
      out += tokens[i].replace('\u2581', ' ').encode()
  return out.decode()


def test_bytes_tokenizer_as_a_llama_vocabulary(case):
  """flaxllm's bytes tokenizer: llama.cpp's SentencePiece tokenizer (spaces escaped to
  '\u2581', then whole tokens or <0xNN> byte fallback; no merges exist) and detokenizer give
  flaxllm's ids and text."""
  fields, cfg = case['fields'], case['cfg']
  tokens, types = fields['tokenizer.ggml.tokens'], fields['tokenizer.ggml.token_type']
  assert fields['tokenizer.ggml.model'] == 'llama' and len(tokens) == cfg.vocab_size
  assert tokens[:3] == ['<pad>', '<s>', '</s>'] and list(types[:3]) == [gguf.TokenType.CONTROL] * 3
  assert tokens[3 + 0x41] == '<0x41>' and tokens[3 + 0x20] == '\u2581'
  assert tokens[259:] == [f'[PAD{i}]' for i in range(259, cfg.vocab_size)]
  assert (fields['tokenizer.ggml.bos_token_id'], fields['tokenizer.ggml.eos_token_id'],
          fields['tokenizer.ggml.padding_token_id']) == (1, 2, 0)
  assert fields['tokenizer.ggml.add_bos_token'] is True
  assert fields['tokenizer.ggml.add_space_prefix'] is False
  lookup = {tok: i for i, tok in enumerate(tokens)}
  ids = []
  for ch in TEXT.replace(' ', '\u2581'):
    ids += [lookup[ch]] if ch in lookup else [lookup[f'<0x{b:02X}>'] for b in ch.encode()]
  assert ids == tokenizer_lib.ByteTokenizer().encode(TEXT)
  assert _llama_cpp_spm_detokenize(fields, ids) == TEXT


def test_sentencepiece_tokenizer(tmp_path, spm_proto):
  import sentencepiece as spm
  sp = spm.SentencePieceProcessor(model_proto=spm_proto)
  cfg = ModelConfig.from_dict(dict(BASE, vocab_size=416, num_kv_heads=2))
  src = _model_dir(tmp_path / 'm', cfg, _random_params(cfg), tokenizer=spm_proto)
  fields, t, _ = _export(src, tmp_path / 'spm.gguf', '--type=q8_0')
  tokens, types = fields['tokenizer.ggml.tokens'], fields['tokenizer.ggml.token_type']
  n = sp.get_piece_size()
  assert tokens[:n] == [sp.id_to_piece(i) for i in range(n)]
  assert tokens[n:] == [f'[PAD{i}]' for i in range(n, 416)]
  np.testing.assert_allclose(fields['tokenizer.ggml.scores'][:n],
                             [sp.get_score(i) for i in range(n)])
  T = gguf.TokenType
  assert [types[i] for i in (0, 1, 2, 3)] == [T.UNKNOWN, T.CONTROL, T.CONTROL, T.CONTROL]
  assert types[sp.piece_to_id('<0x41>')] == T.BYTE and types[n - 1] == T.NORMAL
  assert types[n] == T.UNUSED
  assert (fields['tokenizer.ggml.unknown_token_id'], fields['tokenizer.ggml.bos_token_id'],
          fields['tokenizer.ggml.eos_token_id'], fields['tokenizer.ggml.padding_token_id']) == (
              0, 1, 2, 3)
  assert fields['tokenizer.ggml.add_space_prefix'] is False   # flaxllm: no dummy prefix
  ids = tokenizer_lib.SentencePieceTokenizer(spm_proto).encode(TEXT)
  assert _llama_cpp_spm_detokenize(fields, ids) == TEXT
  assert t['token_embd.weight'].shape == (416, cfg.d_model)


def test_hugging_face_gpt2_with_a_byte_level_bpe_tokenizer(tmp_path, texts):
  """A Hugging Face GPT-2 directory with a trained byte-level BPE tokenizer.json."""
  tokenizers = pytest.importorskip('tokenizers')
  bpe = tokenizers.ByteLevelBPETokenizer()
  bpe.train_from_iterator(texts, vocab_size=400, min_frequency=2,
                          special_tokens=['<|endoftext|>'], show_progress=False)
  cfg = ModelConfig.from_dict(dict(CASES['gpt2'], vocab_size=416))
  params = _random_params(cfg, seed=3)
  hf_dir = tmp_path / 'hf'
  hf.save(cfg, params, str(hf_dir))
  bpe.save(str(hf_dir / 'tokenizer.json'))
  (hf_dir / 'tokenizer_config.json').write_text(json.dumps(
      {'bos_token': '<|endoftext|>', 'eos_token': '<|endoftext|>', 'add_bos_token': False}))
  fields, t, _ = _export(hf_dir, tmp_path / 'gpt2.gguf')
  rebuilt, used = _to_flaxllm(cfg, t)
  want = _flat(_unrolled(params))
  assert sorted(_flat(rebuilt)) == sorted(want) and used == set(t)
  for name, value in want.items():
    assert np.array_equal(_flat(rebuilt)[name], value), name
  tj = json.loads((hf_dir / 'tokenizer.json').read_text())
  vocab = tj['model']['vocab']
  tokens = fields['tokenizer.ggml.tokens']
  assert fields['tokenizer.ggml.model'] == 'gpt2' and fields['tokenizer.ggml.pre'] == 'gpt-2'
  assert all(tokens[i] == tok for tok, i in vocab.items()) and len(tokens) == 416
  assert tokens[len(vocab):] == [f'[PAD{i}]' for i in range(len(vocab), 416)]
  assert fields['tokenizer.ggml.merges'] == [' '.join(m) for m in tj['model']['merges']]
  assert fields['tokenizer.ggml.token_type'][0] == gguf.TokenType.CONTROL      # <|endoftext|>
  assert fields['tokenizer.ggml.eos_token_id'] == 0
  assert fields['tokenizer.ggml.add_bos_token'] is False


# ------------------------------------------------------------------------------ LoRA

def test_lora_adapter_is_merged(tmp_path):
  cfg = ModelConfig.from_dict(CASES['llama_gqa'])
  params = _random_params(cfg)
  adapters = lora.init(params, ['q_proj', 'v_proj', 'down_proj'], jax.random.key(1), rank=4,
                       alpha=8)
  rng = np.random.RandomState(2)
  adapters = jax.tree.map(
      lambda ad: ad.replace(b=(0.1 * rng.standard_normal(ad.b.shape)).astype(np.float32)),
      adapters, is_leaf=lambda x: isinstance(x, lora.LoRAWeights))
  src = _model_dir(tmp_path / 'base', cfg, params)
  peft_io.save_adapter(cfg, adapters, str(tmp_path / 'adapter'))
  _, t, _ = _export(src, tmp_path / 'merged.gguf', '--adapter', str(tmp_path / 'adapter'))
  got = _flat(_to_flaxllm(cfg, t)[0])
  base = _flat(_unrolled(params))
  for name, w in base.items():
    ad = _adapter_at(adapters, name)
    if ad is None:
      assert np.array_equal(got[name], w), name
    else:   # W0 + (alpha / r) * A B, in numpy
      a = np.asarray(ad.a).reshape(-1, ad.rank)
      b = np.asarray(ad.b).reshape(ad.rank, -1)
      np.testing.assert_allclose(got[name], w + (2.0 * a @ b).reshape(w.shape), atol=1e-5)
      assert not np.allclose(got[name], w), name


def _adapter_at(adapters, name):
  node = adapters
  for key in name.split('/'):
    if not isinstance(node, dict) or key not in node:
      return None
    node = node[key]
  return node if isinstance(node, lora.LoRAWeights) else None


# ------------------------------------------------------------------------------ refusals

def _refused(capsys, argv, *, via_cli=False):
  with pytest.raises(SystemExit) as e:
    if via_cli:
      cli.main(['convert', *argv])
    else:
      convert.convert_main(argv)
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert err.startswith('flaxllm convert: error: ')
  return err


def test_encoder_decoder_is_refused_before_anything_is_written(tmp_path, capsys):
  src = tmp_path / 'seq2seq'
  src.mkdir()
  (src / native.CONFIG_NAME).write_text(json.dumps(ModelConfig.from_dict(
      M.presets.PRESETS['tiny_transformer']).to_dict()))
  (src / 'tokenizer.json').write_text(json.dumps({'kind': 'bytes'}))
  out = tmp_path / 'out' / 'm.gguf'
  err = _refused(capsys, ['--from', str(src), '--to-gguf', str(out)], via_cli=True)
  assert "arch='encoder_decoder' is an encoder-decoder model" in err
  assert not out.exists() and not out.parent.exists()


def test_existing_file_needs_overwrite(gqa, tmp_path, capsys):
  case = gqa
  out = tmp_path / 'taken.gguf'
  out.write_text('keep me')
  err = _refused(capsys, ['--from', case['src'], '--to-gguf', str(out)])
  assert 'already exists' in err and '--overwrite' in err
  assert out.read_text() == 'keep me' and os.listdir(tmp_path) == ['taken.gguf']
  _export(case['src'], out, '--overwrite')
  assert out.read_bytes()[:4] == b'GGUF' and os.listdir(tmp_path) == ['taken.gguf']


def test_a_failed_write_leaves_no_file(gqa, tmp_path, monkeypatch):
  case = gqa

  def fail(self, *a, **k):
    raise OSError('No space left on device')
  monkeypatch.setattr(gguf.GGUFWriter, 'write_tensors_to_file', fail)
  with pytest.raises(OSError, match='No space left'):
    convert.convert_main(['--from', case['src'], '--to-gguf', str(tmp_path / 'x.gguf')])
  assert os.listdir(tmp_path) == []


def test_no_or_unsupported_tokenizer_is_refused(gqa, tmp_path, capsys):
  case = gqa
  src = tmp_path / 'bare'
  native.save_flaxllm(case['cfg'], case['params'], str(src))
  err = _refused(capsys, ['--from', str(src), '--to-gguf', str(tmp_path / 'a.gguf')])
  assert 'holds no tokenizer' in err
  (src / 'tokenizer.json').write_text(json.dumps(
      {'version': '1.0', 'model': {'type': 'WordLevel', 'vocab': {'a': 0}, 'unk_token': 'a'}}))
  err = _refused(capsys, ['--from', str(src), '--to-gguf', str(tmp_path / 'a.gguf')])
  assert 'is a WordLevel tokenizer' in err
  assert sorted(os.listdir(tmp_path)) == ['bare']


@pytest.mark.parametrize('fields,message', [
    (dict(CASES['llama_gqa'], sliding_window=8), 'sliding_window=8'),
    (dict(CASES['llama_gqa'], attn_bias=True), 'attention or MLP biases'),
    (dict(CASES['gpt2'], mlp_activation='gelu'), "mlp_activation='gelu_tanh'"),
    (dict(CASES['gpt2'], mlp_activation='relu'), "mlp_activation='gelu_tanh'"),
    (dict(CASES['llama_gqa'], norm_position='post'), "norm_position='post'"),
    (dict(CASES['gpt2'], position='sinusoidal'), "position='sinusoidal'"),
])
def test_architectures_gguf_cannot_express(fields, message):
  with pytest.raises(gguf_export.GGUFExportError, match='cannot be written as GGUF') as e:
    gguf_export.gguf_arch(fields)
  assert message in str(e.value) and str(e.value).count('.') <= 3


# ------------------------------------------------------------------------------ llama.cpp itself

def _llama_cpp_greedy(llm, prompt, n):
  llm.reset()
  llm.eval(prompt)
  out = []
  for _ in range(n):
    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    out.append(tok)
    llm.eval([tok])
  return out


@needs_llama_cpp
def test_llama_cpp_logits_and_greedy_tokens(memorized):
  """llama.cpp loads the files: its logits for the text match flaxllm's (f32: within 1e-3
  relative; q8_0: the same argmax at >= 99% of positions), greedy generation gives
  flaxllm.generate's tokens, and its tokenizer gives the bytes tokenizer's ids and text."""
  m = memorized
  n_ctx = m['cfg'].max_seq_len
  llm = gguf_export.llama_cpp_model(str(m['root'] / 'f32.gguf'), n_ctx=n_ctx, logits_all=True,
                                    n_threads=2, verbose=False)
  assert llm.tokenize(TEXT.encode(), add_bos=False, special=False) == TOKENS[1:]
  assert llm.detokenize(TOKENS[1:]).decode() == TEXT
  llm.reset()
  llm.eval(TOKENS)
  got = np.asarray(llm.scores[:len(TOKENS)])
  rel = np.max(np.abs(got - m['ref'])) / np.max(np.abs(m['ref']))
  assert rel <= 1e-3, f'f32: logits differ by {rel:.2e} relative'
  assert _llama_cpp_greedy(llm, TOKENS[:PROMPT], len(TOKENS) - PROMPT) == m['want']

  llm8 = gguf_export.llama_cpp_model(str(m['root'] / 'q8_0.gguf'), n_ctx=n_ctx, logits_all=True,
                                     n_threads=2, verbose=False)
  llm8.eval(TOKENS)
  agree = np.mean(np.asarray(llm8.scores[:len(TOKENS)]).argmax(-1) == m['ref'].argmax(-1))
  assert agree >= 0.99, f'q8_0: the same argmax at {agree:.1%} of positions'
  assert _llama_cpp_greedy(llm8, TOKENS[:PROMPT], len(TOKENS) - PROMPT) == m['want']
