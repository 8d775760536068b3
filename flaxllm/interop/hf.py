"""Hugging Face checkpoints <-> flaxllm params, for LLaMA (also Mistral) and GPT-2.

    cfg, params = flaxllm.interop.hf.load('/ckpt/Llama-3.2-1B')          # config.json + safetensors
    logits = flaxllm.models.build(cfg).apply({'params': params}, tokens)
    flaxllm.interop.hf.save(cfg, params, '/out/hf_dir')   # AutoModelForCausalLM.from_pretrained

`load` streams one tensor at a time with `safetensors.safe_open(..., framework='np')` (no torch;
bfloat16 goes through `ml_dtypes`), and checks every name and shape against the config before
reading any tensor data, so a bad checkpoint fails fast with an `HFInteropError` naming the
problem. Nothing in a checkpoint is trusted further than the files themselves: every size in
config.json is checked against the tensors' headers before anything is built for it, every
header against its file's length, and weight files must lie inside the checkpoint directory.
`save` writes like `flaxllm.interop.native` (a sibling directory renamed into place, marked with
flaxllm_export.json) and never replaces a directory flaxllm did not write unless asked.
Only the safetensors format is read; `pytorch_model.bin` checkpoints must be converted
first (e.g. `transformers`' `save_pretrained(..., safe_serialization=True)`).

Layout conversions (PyTorch `nn.Linear.weight` is [out, in]; flaxllm kernels are [in, out...]):
  LLaMA  self_attn.q_proj.weight [h*d, D]  -> attn/q_proj/kernel [D, h, d]   (k, v: kv_heads)
         self_attn.o_proj.weight [D, h*d]  -> attn/o_proj/kernel [h, d, D]
         mlp.{gate,up}_proj.weight [F, D]  -> mlp/{gate,up}_proj/kernel [D, F]; down: [F, D]
  GPT-2  Conv1D weights are already [in, out]; attn.c_attn packs q, k, v along the output axis.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers 'bfloat16' with numpy, which safetensors' np needs)
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from flaxllm.interop import native
from flaxllm.interop.native import load_flaxllm, save_flaxllm
from flaxllm.models.config import ConfigError, ModelConfig

__all__ = ['load', 'save', 'convert_main', 'config_from_hf', 'config_to_hf', 'HFInteropError',
           'SUPPORTED_ARCHITECTURES', 'save_flaxllm', 'load_flaxllm', 'is_hf_export']

SUPPORTED_ARCHITECTURES = ('LlamaForCausalLM', 'MistralForCausalLM', 'GPT2LMHeadModel')
_FAMILY = {'LlamaForCausalLM': 'llama', 'MistralForCausalLM': 'llama',
           'GPT2LMHeadModel': 'gpt2'}
_MODEL_TYPE_ARCH = {'llama': 'LlamaForCausalLM', 'mistral': 'MistralForCausalLM',
                    'gpt2': 'GPT2LMHeadModel'}

CONFIG_NAME = 'config.json'
WEIGHTS_NAME = 'model.safetensors'
INDEX_NAME = 'model.safetensors.index.json'
EXPORT_MARKER = 'flaxllm_export.json'  # written by `save`: {'files': [the names it wrote]}
DEFAULT_MAX_SHARD_SIZE = '5GB'

_ST_DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16,
              'BF16': ml_dtypes.bfloat16, 'F8_E4M3': ml_dtypes.float8_e4m3fn,
              'F8_E5M2': ml_dtypes.float8_e5m2, 'I64': np.int64, 'I32': np.int32,
              'I16': np.int16, 'I8': np.int8, 'U64': np.uint64, 'U32': np.uint32,
              'U16': np.uint16, 'U8': np.uint8, 'BOOL': np.bool_}
_FLOAT_CODES = ('F64', 'F32', 'F16', 'BF16')
_GPT2_ACT = {'gelu_new': 'gelu_tanh', 'gelu_pytorch_tanh': 'gelu_tanh', 'gelu_fast': 'gelu_tanh',
             'gelu': 'gelu', 'relu': 'relu'}


class HFInteropError(ValueError):
  """A Hugging Face checkpoint or config that cannot be converted; the message says why."""


class HFFileNotFoundError(HFInteropError, FileNotFoundError):
  """A required file (config.json, weights, a shard) is missing."""


# ============================================================================ dtypes

def _np_dtype(dtype) -> Optional[np.dtype]:
  """'bfloat16' / jnp.bfloat16 / np.float32 / torch-style 'torch.float16' -> np.dtype."""
  if dtype is None:
    return None
  if isinstance(dtype, str):
    name = dtype.replace('torch.', '')
    name = {'bf16': 'bfloat16', 'fp16': 'float16', 'half': 'float16', 'fp32': 'float32',
            'float': 'float32'}.get(name, name)
    try:
      return np.dtype(name)
    except TypeError:
      raise HFInteropError(f'unknown dtype {dtype!r}; use e.g. float32, bfloat16, float16.')
  return np.dtype(dtype)


def _dtype_name(dtype) -> str:
  return np.dtype(dtype).name


# ============================================================================ HF config

def read_hf_config(path: str) -> dict:
  """config.json of the checkpoint directory `path` as a dict."""
  if not os.path.isdir(path):
    raise HFFileNotFoundError(f'Hugging Face checkpoint directory {path!r} does not exist.')
  cfg_path = os.path.join(path, CONFIG_NAME)
  if not os.path.isfile(cfg_path):
    raise HFFileNotFoundError(f'no {CONFIG_NAME} in {path!r}; a Hugging Face checkpoint '
                              'directory needs config.json next to its safetensors weights.')
  return native.read_json(cfg_path, HFInteropError)


def _architecture(hf: dict) -> str:
  archs = hf.get('architectures') or []
  if not archs and hf.get('model_type') in _MODEL_TYPE_ARCH:
    archs = [_MODEL_TYPE_ARCH[hf['model_type']]]
  if not archs:
    raise HFInteropError(f'config.json names no architecture (model_type='
                         f'{hf.get("model_type")!r}); supported: '
                         f'{", ".join(SUPPORTED_ARCHITECTURES)}.')
  for arch in archs:
    if arch in _FAMILY:
      return arch
  raise HFInteropError(f'unsupported architecture {", ".join(map(str, archs))}; supported: '
                       f'{", ".join(SUPPORTED_ARCHITECTURES)}.')


def _rope_from_hf(hf: dict) -> tuple[float, Optional[dict]]:
  """(rope_theta, flaxllm rope_scaling) from transformers 4 (`rope_theta` + `rope_scaling`) or
  transformers 5 (`rope_parameters` with `rope_type` and `rope_theta`) fields."""
  params = hf.get('rope_parameters') or {}
  scaling = hf.get('rope_scaling') or {}
  merged = {**params, **scaling}
  if merged and all(isinstance(v, dict) for v in merged.values()):
    raise HFInteropError('per-layer-type rope_parameters are not supported; this importer '
                         'handles one RoPE setting for all layers.')
  theta = float(merged.get('rope_theta', hf.get('rope_theta', 10000.0)))
  kind = merged.get('rope_type', merged.get('type', 'default'))
  prf = merged.get('partial_rotary_factor', hf.get('partial_rotary_factor', 1.0))
  if prf not in (None, 1, 1.0):
    raise HFInteropError(f'partial_rotary_factor={prf} is not supported (flaxllm rotates the '
                         'whole head dim).')
  if kind in (None, 'default'):
    return theta, None
  if kind == 'linear':
    return theta, {'type': 'linear', 'factor': float(merged['factor'])}
  if kind == 'llama3':
    keys = ('factor', 'low_freq_factor', 'high_freq_factor', 'original_max_position_embeddings')
    missing = [k for k in keys if k not in merged]
    if missing:
      raise HFInteropError(f"rope scaling of type 'llama3' in config.json is missing {missing}.")
    out = {'type': 'llama3', 'factor': float(merged['factor']),
           'low_freq_factor': float(merged['low_freq_factor']),
           'high_freq_factor': float(merged['high_freq_factor']),
           'original_max_position_embeddings': int(merged['original_max_position_embeddings'])}
    return theta, out
  raise HFInteropError(f"unsupported rope scaling type {kind!r}; supported: 'default', "
                       "'linear', 'llama3'.")


def config_from_hf(hf: dict, **overrides) -> ModelConfig:
  """A ModelConfig from a Hugging Face config.json dict (LLaMA, Mistral or GPT-2)."""
  arch = _architecture(hf)
  try:
    if _FAMILY[arch] == 'llama':
      d = _llama_config_from_hf(hf, arch)
    else:
      d = _gpt2_config_from_hf(hf)
  except KeyError as e:
    raise HFInteropError(f'config.json for {arch} is missing the field {e.args[0]!r}.') from None
  except HFInteropError:
    raise
  except (TypeError, ValueError, ArithmeticError) as e:
    raise HFInteropError(f'config.json for {arch} has a field of the wrong type or value ({e}); '
                         'use the config.json that came with the checkpoint.') from None
  d.update(overrides)
  try:
    return ModelConfig.from_dict(d)
  except (ConfigError, TypeError) as e:
    raise HFInteropError(f'config.json does not map to a valid flaxllm config: {e}') from None


def _llama_config_from_hf(hf: dict, arch: str) -> dict:
  act = hf.get('hidden_act', 'silu')
  if act not in ('silu', 'swish'):
    raise HFInteropError(f'{arch} with hidden_act={act!r} is not supported; flaxllm LLaMA '
                         "uses SwiGLU ('silu').")
  d_model, heads = int(hf['hidden_size']), int(hf['num_attention_heads'])
  head_dim = hf.get('head_dim')
  head_dim = None if head_dim in (None, d_model // heads) else int(head_dim)
  kv = hf.get('num_key_value_heads')
  theta, scaling = _rope_from_hf(hf)
  # transformers' Llama ignores any sliding_window field; Mistral applies it (None = full).
  sliding = hf.get('sliding_window') if arch == 'MistralForCausalLM' else None
  return dict(
      arch='decoder', vocab_size=int(hf['vocab_size']), d_model=d_model,
      num_layers=int(hf['num_hidden_layers']), num_heads=heads,
      num_kv_heads=None if kv in (None, heads) else int(kv), head_dim=head_dim,
      mlp_dim=int(hf['intermediate_size']), mlp_activation='swiglu', norm='rmsnorm',
      norm_eps=float(hf.get('rms_norm_eps', 1e-6)), norm_position='pre',
      attn_bias=bool(hf.get('attention_bias', False)), mlp_bias=bool(hf.get('mlp_bias', False)),
      tie_embeddings=bool(hf.get('tie_word_embeddings', False)), position='rope',
      max_seq_len=int(hf.get('max_position_embeddings', 2048)), rope_theta=theta,
      rope_scaling=scaling, sliding_window=None if sliding is None else int(sliding),
      init_std=float(hf.get('initializer_range', 0.02)))


def _gpt2_config_from_hf(hf: dict) -> dict:
  act = hf.get('activation_function', 'gelu_new')
  if act not in _GPT2_ACT:
    raise HFInteropError(f'GPT2LMHeadModel with activation_function={act!r} is not supported; '
                         f'supported: {", ".join(_GPT2_ACT)}.')
  for key, ok in (('scale_attn_by_inverse_layer_idx', False), ('scale_attn_weights', True),
                  ('add_cross_attention', False)):
    if bool(hf.get(key, ok)) != ok:
      raise HFInteropError(f'GPT2LMHeadModel with {key}={hf[key]} is not supported.')
  d_model = int(hf['n_embd'])
  return dict(
      arch='decoder', vocab_size=int(hf['vocab_size']), d_model=d_model,
      num_layers=int(hf['n_layer']), num_heads=int(hf['n_head']),
      mlp_dim=int(hf.get('n_inner') or 4 * d_model), mlp_activation=_GPT2_ACT[act],
      norm='layernorm', norm_eps=float(hf.get('layer_norm_epsilon', 1e-5)), norm_position='pre',
      attn_bias=True, mlp_bias=True, tie_embeddings=bool(hf.get('tie_word_embeddings', True)),
      position='learned', max_seq_len=int(hf.get('n_positions', hf.get('n_ctx', 1024))),
      init_std=float(hf.get('initializer_range', 0.02)))


def export_family(cfg: ModelConfig) -> str:
  """'llama' | 'mistral' | 'gpt2' for a ModelConfig that a transformers class can express."""
  def bad(why):
    raise HFInteropError(f'this model config cannot be exported to Hugging Face: {why}.')
  if cfg.arch != 'decoder':
    bad(f"arch={cfg.arch!r} (only decoder-only LLaMA/Mistral/GPT-2 models export)")
  if cfg.norm_position != 'pre':
    bad("norm_position must be 'pre'")
  if cfg.scale_embeddings:
    bad('scale_embeddings=True has no LLaMA/GPT-2 equivalent')
  if cfg.position == 'rope':
    if cfg.mlp_activation != 'swiglu' or cfg.norm != 'rmsnorm':
      bad("a RoPE model needs mlp_activation='swiglu' and norm='rmsnorm' (LLaMA)")
    if cfg.sliding_window is not None:
      if cfg.attn_bias or cfg.mlp_bias:
        bad('Mistral (sliding_window) has no attention/MLP biases')
      return 'mistral'
    return 'llama'
  if cfg.position == 'learned':
    if cfg.norm != 'layernorm' or cfg.mlp_activation == 'swiglu':
      bad("a learned-position model needs norm='layernorm' and a non-gated MLP (GPT-2)")
    if not (cfg.attn_bias and cfg.mlp_bias):
      bad('GPT-2 has attention and MLP biases; set attn_bias=True and mlp_bias=True')
    if cfg.kv_heads != cfg.num_heads or cfg.dim_per_head * cfg.num_heads != cfg.d_model:
      bad('GPT-2 needs num_kv_heads == num_heads and head_dim == d_model // num_heads')
    if cfg.sliding_window is not None:
      bad('GPT-2 has no sliding window')
    return 'gpt2'
  bad(f'position={cfg.position!r} (use rope for LLaMA or learned for GPT-2)')


def config_to_hf(model_config, dtype=None) -> dict:
  """The config.json dict transformers needs for `model_config` (LLaMA, Mistral or GPT-2)."""
  cfg = ModelConfig.from_dict(model_config)
  family = export_family(cfg)
  dtype_name = _dtype_name(_np_dtype(dtype or cfg.param_dtype))
  common = dict(vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings,
                initializer_range=cfg.init_std, use_cache=True, dtype=dtype_name,
                torch_dtype=dtype_name)
  if family == 'gpt2':
    act = {'gelu_tanh': 'gelu_new', 'gelu': 'gelu', 'relu': 'relu'}[cfg.mlp_activation]
    special = 50256 if cfg.vocab_size == 50257 else None
    return dict(architectures=['GPT2LMHeadModel'], model_type='gpt2', n_embd=cfg.d_model,
                n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.mlp_dim,
                n_positions=cfg.max_seq_len, n_ctx=cfg.max_seq_len,
                layer_norm_epsilon=cfg.norm_eps, activation_function=act,
                resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
                scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
                reorder_and_upcast_attn=False, bos_token_id=special, eos_token_id=special,
                **common)
  rope_parameters = {'rope_type': 'default', 'rope_theta': cfg.rope_theta}
  rope_scaling = None
  if cfg.rope_scaling is not None:
    rope_scaling = {k: v for k, v in cfg.rope_scaling.items() if k != 'type'}
    rope_scaling['rope_type'] = cfg.rope_scaling['type']
    rope_parameters = {**rope_scaling, 'rope_theta': cfg.rope_theta}
  d = dict(architectures=['MistralForCausalLM' if family == 'mistral' else 'LlamaForCausalLM'],
           model_type=family, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_dim,
           num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
           num_key_value_heads=cfg.kv_heads, head_dim=cfg.dim_per_head, hidden_act='silu',
           max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
           # transformers 5 reads rope_parameters; 4.x reads rope_theta + rope_scaling.
           rope_theta=cfg.rope_theta, rope_scaling=rope_scaling, rope_parameters=rope_parameters,
           attention_dropout=0.0, bos_token_id=None, eos_token_id=None, **common)
  if family == 'mistral':
    d['sliding_window'] = cfg.sliding_window
  else:
    d.update(attention_bias=cfg.attn_bias, mlp_bias=cfg.mlp_bias, pretraining_tp=1)
  return d


# ============================================================================ tensor mapping

@dataclasses.dataclass(frozen=True)
class TensorGroup:
  """HF tensors <-> flaxllm params that convert together (one-to-one except GPT-2 c_attn).

  `flax` paths are relative to the layer (`decoder/layers_{i}/...`) when `layer` is set."""
  hf: tuple[str, ...]
  hf_shapes: tuple[tuple[int, ...], ...]
  flax: tuple[tuple[str, ...], ...]
  flax_shapes: tuple[tuple[int, ...], ...]
  to_flax: Callable[[list], list]
  to_hf: Callable[[list], list]
  layer: Optional[int] = None


def _one(hf, hf_shape, flax, flax_shape, to_flax, to_hf, layer=None) -> TensorGroup:
  return TensorGroup((hf,), (tuple(hf_shape),), (tuple(flax),), (tuple(flax_shape),),
                lambda a: [to_flax(a[0])], lambda a: [to_hf(a[0])], layer)


def _same(hf, flax, shape, layer=None) -> TensorGroup:
  return _one(hf, shape, flax, shape, lambda x: x, lambda x: x, layer)


def _linear_t(hf, flax, out_shape, in_dim, layer=None) -> TensorGroup:
  """nn.Linear weight [prod(out), in] <-> kernel [in, *out]."""
  out_shape = tuple(out_shape)
  n = math.prod(out_shape)
  return _one(hf, (n, in_dim), flax, (in_dim,) + out_shape,
              lambda w: w.T.reshape((in_dim,) + out_shape), lambda k: k.reshape(in_dim, n).T,
              layer)


def _linear_in(hf, flax, in_shape, out_dim, layer=None) -> TensorGroup:
  """nn.Linear weight [out, prod(in)] <-> kernel [*in, out] (the attention output proj)."""
  in_shape = tuple(in_shape)
  n = math.prod(in_shape)
  return _one(hf, (out_dim, n), flax, in_shape + (out_dim,),
              lambda w: w.T.reshape(in_shape + (out_dim,)), lambda k: k.reshape(n, out_dim).T,
              layer)


def _reshape(hf, flax, hf_shape, flax_shape, layer=None) -> TensorGroup:
  hf_shape, flax_shape = tuple(hf_shape), tuple(flax_shape)
  return _one(hf, hf_shape, flax, flax_shape, lambda x: x.reshape(flax_shape),
              lambda x: x.reshape(hf_shape), layer)


def _llama_groups(cfg: ModelConfig) -> list[TensorGroup]:
  D, h, kvh, d, F, V = (cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head, cfg.mlp_dim,
                        cfg.vocab_size)
  groups = [_same('model.embed_tokens.weight', ('embed', 'embedding'), (V, D))]
  for i in range(cfg.num_layers):
    p = f'model.layers.{i}.'
    heads = {'q': h, 'k': kvh, 'v': kvh}
    for n in 'qkv':
      groups.append(_linear_t(f'{p}self_attn.{n}_proj.weight', ('attn', f'{n}_proj', 'kernel'),
                              (heads[n], d), D, i))
      if cfg.attn_bias:
        groups.append(_reshape(f'{p}self_attn.{n}_proj.bias', ('attn', f'{n}_proj', 'bias'),
                               (heads[n] * d,), (heads[n], d), i))
    groups.append(_linear_in(f'{p}self_attn.o_proj.weight', ('attn', 'o_proj', 'kernel'),
                             (h, d), D, i))
    if cfg.attn_bias:
      groups.append(_same(f'{p}self_attn.o_proj.bias', ('attn', 'o_proj', 'bias'), (D,), i))
    for n, (fin, fout) in (('gate', (D, F)), ('up', (D, F)), ('down', (F, D))):
      groups.append(_linear_t(f'{p}mlp.{n}_proj.weight', ('mlp', f'{n}_proj', 'kernel'),
                              (fout,), fin, i))
      if cfg.mlp_bias:
        groups.append(_same(f'{p}mlp.{n}_proj.bias', ('mlp', f'{n}_proj', 'bias'), (fout,), i))
    groups.append(_same(f'{p}input_layernorm.weight', ('attn_norm', 'scale'), (D,), i))
    groups.append(_same(f'{p}post_attention_layernorm.weight', ('mlp_norm', 'scale'), (D,), i))
  groups.append(_same('model.norm.weight', ('decoder', 'final_norm', 'scale'), (D,)))
  if not cfg.tie_embeddings:
    groups.append(_linear_t('lm_head.weight', ('lm_head', 'kernel'), (V,), D))
  return groups


def _gpt2_groups(cfg: ModelConfig, prefix: str = 'transformer.') -> list[TensorGroup]:
  D, h, d, F, V = cfg.d_model, cfg.num_heads, cfg.dim_per_head, cfg.mlp_dim, cfg.vocab_size
  t = prefix
  groups = [_same(f'{t}wte.weight', ('embed', 'embedding'), (V, D)),
            _same(f'{t}wpe.weight', ('pos_embed', 'embedding'), (cfg.max_seq_len, D))]
  qkv = tuple(('attn', f'{n}_proj', 'kernel') for n in 'qkv')
  qkv_b = tuple(('attn', f'{n}_proj', 'bias') for n in 'qkv')
  for i in range(cfg.num_layers):
    p = f'{t}h.{i}.'
    groups.append(TensorGroup(
        (f'{p}attn.c_attn.weight',), ((D, 3 * D),), qkv, ((D, h, d),) * 3,
        lambda a: [w.reshape(D, h, d) for w in np.split(a[0], 3, axis=1)],
        lambda a: [np.concatenate([k.reshape(D, h * d) for k in a], axis=1)], i))
    groups.append(TensorGroup(
        (f'{p}attn.c_attn.bias',), ((3 * D,),), qkv_b, ((h, d),) * 3,
        lambda a: [b.reshape(h, d) for b in np.split(a[0], 3)],
        lambda a: [np.concatenate([b.reshape(h * d) for b in a])], i))
    groups.append(_reshape(f'{p}attn.c_proj.weight', ('attn', 'o_proj', 'kernel'), (D, D),
                           (h, d, D), i))
    groups.append(_same(f'{p}attn.c_proj.bias', ('attn', 'o_proj', 'bias'), (D,), i))
    groups.append(_same(f'{p}mlp.c_fc.weight', ('mlp', 'up_proj', 'kernel'), (D, F), i))
    groups.append(_same(f'{p}mlp.c_fc.bias', ('mlp', 'up_proj', 'bias'), (F,), i))
    groups.append(_same(f'{p}mlp.c_proj.weight', ('mlp', 'down_proj', 'kernel'), (F, D), i))
    groups.append(_same(f'{p}mlp.c_proj.bias', ('mlp', 'down_proj', 'bias'), (D,), i))
    for hf_n, fx in (('ln_1', 'attn_norm'), ('ln_2', 'mlp_norm')):
      groups.append(_same(f'{p}{hf_n}.weight', (fx, 'scale'), (D,), i))
      groups.append(_same(f'{p}{hf_n}.bias', (fx, 'bias'), (D,), i))
  groups.append(_same(f'{t}ln_f.weight', ('decoder', 'final_norm', 'scale'), (D,)))
  groups.append(_same(f'{t}ln_f.bias', ('decoder', 'final_norm', 'bias'), (D,)))
  if not cfg.tie_embeddings:
    groups.append(_linear_t('lm_head.weight', ('lm_head', 'kernel'), (V,), D))
  return groups


# Buffers or redundant tensors that some checkpoints carry and that are safe to skip.
_IGNORED = {
    'llama': [r'(model\.)?(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq'],
    'gpt2': [r'(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)'],
}


def tensor_groups(family: str, cfg: ModelConfig, prefix: str = 'transformer.'
                  ) -> list[TensorGroup]:
  """The tensor groups of a 'llama' or 'gpt2' family model (how every tensor converts)."""
  return _gpt2_groups(cfg, prefix) if family == 'gpt2' else _llama_groups(cfg)


def flax_path(g: TensorGroup, rel: tuple[str, ...], scanned: bool) -> tuple[str, ...]:
  """The flaxllm param path of a group's relative path `rel` (in layer `g.layer`)."""
  if g.layer is None:
    return rel
  return ('decoder', 'layers' if scanned else f'layers_{g.layer}') + rel


# ============================================================================ safetensors reading

class _TensorSource:
  """Tensor names, shapes and dtypes of a checkpoint's safetensors file(s), read from the
  headers only (each checked against its file's length); `get(name)` reads one tensor as
  numpy."""

  def __init__(self, path: str):
    self._safe_open = safe_open
    index = os.path.join(path, INDEX_NAME)
    single = os.path.join(path, WEIGHTS_NAME)
    if os.path.isfile(index):
      weight_map = native.read_json(index, HFInteropError).get('weight_map')
      if (not isinstance(weight_map, dict) or not weight_map
          or not all(isinstance(f, str) for f in weight_map.values())):
        raise HFInteropError(f'{index} has no weight_map of tensor names to shard files; '
                             'replace it with the index the checkpoint came with.')
      files = sorted(set(weight_map.values()))
    elif os.path.isfile(single):
      files = [WEIGHTS_NAME]
    else:
      others = sorted(f for f in os.listdir(path) if f.endswith(('.bin', '.pt', '.pth', '.h5',
                                                                  '.msgpack', '.safetensors')))
      hint = (f' (found {", ".join(others)}; only safetensors weights are read, re-save with '
              'save_pretrained(..., safe_serialization=True))' if others else '')
      raise HFFileNotFoundError(f'no weights in {path!r}: expected {WEIGHTS_NAME} or '
                                f'{INDEX_NAME}{hint}.')
    self.location: dict[str, str] = {}
    self.shape: dict[str, tuple[int, ...]] = {}
    self.dtype: dict[str, str] = {}
    for fname in files:
      if not _inside(path, fname):
        raise HFInteropError(f'weight file {fname!r} of {path!r} lies outside that directory '
                             "(an absolute path, '..' or a link out of it); keep a checkpoint's "
                             'weight files inside its directory.')
      fpath = os.path.join(path, fname)
      if not os.path.isfile(fpath):
        raise HFFileNotFoundError(f'weight shard {fname!r} listed in {INDEX_NAME} is missing '
                                  f'from {path!r}; download the checkpoint again.')
      header = _read_safetensors_header(fpath)
      for name, info in header.items():
        if name == '__metadata__':
          continue
        self.location[name] = fpath
        self.shape[name] = tuple(info['shape'])
        self.dtype[name] = info['dtype']
    self._open: dict[str, Any] = {}

  def names(self) -> set[str]:
    return set(self.location)

  def get(self, name: str) -> np.ndarray:
    fpath = self.location[name]
    try:
      if fpath not in self._open:
        self._open[fpath] = self._safe_open(fpath, framework='np')
      return self._open[fpath].get_tensor(name)
    except TypeError:  # a numpy without the ml_dtypes names registered: read the raw bytes
      return _read_raw_tensor(fpath, name)
    except SafetensorError as e:
      raise HFInteropError(f'{fpath} cannot be read ({e}); download or save the checkpoint '
                           'again.') from None

  def close(self):
    self._open.clear()


def _inside(path: str, fname: str) -> bool:
  """Whether the weight file `fname` of the checkpoint directory `path` lies inside it, links
  resolved (a Hugging Face hub cache snapshot's links into its repository's blobs/ count)."""
  if os.path.isabs(fname):
    return False
  root = os.path.realpath(path)
  roots = [root]
  if os.path.basename(os.path.dirname(root)) == 'snapshots':
    roots.append(os.path.join(os.path.dirname(os.path.dirname(root)), 'blobs'))
  real = os.path.realpath(os.path.join(root, fname))
  return any(os.path.commonpath([real, r]) == r for r in roots)


def _read_safetensors_header(fpath: str) -> dict:
  """The header of the safetensors file `fpath`, refused unless every tensor's dtype, shape and
  byte range agree and lie inside the file (so its shapes bound what reading it allocates)."""
  def bad(why):
    return HFInteropError(f'{fpath} is not a valid safetensors file ({why}); download or save '
                          'the checkpoint again.')
  size = os.path.getsize(fpath)
  with open(fpath, 'rb') as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise bad('shorter than its 8-byte header length')
    n = int.from_bytes(raw, 'little')
    if n > 100_000_000 or 8 + n > size:
      raise bad(f'a header of {n} bytes in a file of {size}')
    try:
      header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
      raise bad('its header is not JSON') from None
  if not isinstance(header, dict):
    raise bad('its header is not a JSON object')
  data_size = size - 8 - n
  for name, info in header.items():
    if name == '__metadata__':
      continue
    try:
      itemsize = np.dtype(_ST_DTYPES[info['dtype']]).itemsize
      shape, (start, end) = info['shape'], info['data_offsets']
      ok = all(type(v) is int and v >= 0 for v in (*shape, start, end))
    except (KeyError, TypeError, ValueError):
      ok = False
    if not ok:
      raise bad(f'tensor {name!r} has no valid dtype, shape and data_offsets')
    if end - start != math.prod(shape) * itemsize:
      raise bad(f'tensor {name!r} of shape {tuple(shape)} spans {end - start} bytes')
    if end > data_size:
      raise bad(f'truncated: tensor {name!r} ends at byte {end} of {data_size} data bytes')
  return header


def _read_raw_tensor(fpath: str, name: str) -> np.ndarray:
  header = _read_safetensors_header(fpath)
  info = header[name]
  with open(fpath, 'rb') as f:
    n = int.from_bytes(f.read(8), 'little')
    start, end = info['data_offsets']
    f.seek(8 + n + start)
    buf = f.read(end - start)
  return np.frombuffer(buf, dtype=_ST_DTYPES[info['dtype']]).reshape(info['shape']).copy()


# ============================================================================ load

def load(path: str, *, dtype=None, compute_dtype=None, scan_layers: bool = False,
         **config_overrides) -> tuple[ModelConfig, dict]:
  """Imports a Hugging Face LLaMA / Mistral / GPT-2 checkpoint directory.

  Args:
    path: directory with config.json and model.safetensors (or shards plus
      model.safetensors.index.json).
    dtype: dtype of the returned params (and `param_dtype` of the config); None keeps the
      checkpoint's floating dtype.
    compute_dtype: the config's activation dtype (`ModelConfig.dtype`); default float32.
    scan_layers: return params with the layers stacked on a leading axis
      (`decoder/layers/...`) and `scan_layers=True` in the config.
    **config_overrides: other ModelConfig fields to set (e.g. attention_impl, remat); fields
      that change parameter shapes make the shape check fail.

  Returns:
    (ModelConfig, params) where params is the nested dict for `model.apply({'params': ...})`.
  """
  path = os.fspath(path)
  hf = read_hf_config(path)
  arch = _architecture(hf)
  family = _FAMILY[arch]
  src = _TensorSource(path)
  present = src.names()

  if dtype is None:
    dtype = config_overrides.pop('param_dtype', None)
  else:
    config_overrides.pop('param_dtype', None)
  if dtype is None:
    codes = [c for c in src.dtype.values() if c in _FLOAT_CODES]
    if not codes:
      raise HFInteropError(f'the checkpoint in {path!r} has no floating-point tensors.')
    dtype = _ST_DTYPES[max(set(codes), key=codes.count)]
  dtype = _np_dtype(dtype)
  overrides = dict(config_overrides, param_dtype=_dtype_name(dtype), scan_layers=scan_layers)
  if compute_dtype is not None:
    overrides['dtype'] = _dtype_name(_np_dtype(compute_dtype))
  cfg = config_from_hf(hf, **overrides)

  prefix = 'transformer.'
  if family == 'gpt2' and not any(n.startswith('transformer.') for n in present):
    prefix = ''  # the original OpenAI-converted GPT-2 files name tensors 'h.0...', 'wte...'
  # The layer count is the one size that sets how much is built below: bound it by the headers.
  layer = re.compile(r'model\.layers\.(\d+)\.' if family == 'llama'
                     else re.escape(prefix) + r'h\.(\d+)\.')
  held = len({m.group(1) for n in present if (m := layer.match(n))})
  if cfg.num_layers > held:
    raise HFInteropError(f'the config gives {cfg.num_layers} layers but the weights in {path!r} '
                         f'hold {held}; use the config.json that came with these weights.')
  groups = tensor_groups(family, cfg, prefix)
  _check_tensors(groups, src, family, cfg, arch)

  params: dict = {}
  stacked: dict[tuple, np.ndarray] = {}
  try:
    for g in groups:
      arrays = g.to_flax([src.get(n) for n in g.hf])
      for rel, arr in zip(g.flax, arrays):
        arr = np.asarray(arr).astype(dtype, copy=False)
        if g.layer is not None and scan_layers:
          key = flax_path(g, rel, True)
          if key not in stacked:
            stacked[key] = np.empty((cfg.num_layers,) + arr.shape, dtype)
          stacked[key][g.layer] = arr
        else:
          # To the device now, so the host holds about one tensor at a time.
          _set(params, flax_path(g, rel, False), jnp.asarray(arr))
  finally:
    src.close()
  for key in list(stacked):
    _set(params, key, jnp.asarray(stacked.pop(key)))
  return cfg, params


def _check_tensors(groups, src: _TensorSource, family: str, cfg: ModelConfig, arch: str):
  """Missing / extra / mis-shaped tensors -> one HFInteropError naming them."""
  present = src.names()
  expected = {n: s for g in groups for n, s in zip(g.hf, g.hf_shapes)}
  missing = sorted(set(expected) - present, key=natural_key)
  if missing:
    raise HFInteropError(f'{arch} checkpoint is missing tensor(s) {_names(missing)} that its '
                         'config.json requires.')
  ignored = [re.compile(p) for p in _IGNORED[family]]
  extra = sorted((n for n in present - set(expected)
                  if not any(p.fullmatch(n) for p in ignored)
                  and not (n == 'lm_head.weight' and cfg.tie_embeddings)), key=natural_key)
  if extra:
    raise HFInteropError(f'{arch} checkpoint has unexpected tensor(s) {_names(extra)} that '
                         'its config.json does not account for.')
  for n in expected:  # checkpoint order: embeddings, layers, head
    if src.shape[n] != expected[n]:
      raise HFInteropError(f'tensor {n!r} has shape {src.shape[n]} in the checkpoint but the '
                           f'config expects {expected[n]}.')


def natural_key(s: str):
  """Sort key that orders 'layers.10' after 'layers.9'."""
  return [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', s)]


def _names(names: Sequence[str], limit: int = 8) -> str:
  shown = ', '.join(repr(n) for n in names[:limit])
  return shown + (f' and {len(names) - limit} more' if len(names) > limit else '')


def _set(tree: dict, path: tuple[str, ...], value):
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _get(tree, path: tuple[str, ...]):
  for k in path:
    tree = tree[k]
  return tree


# ============================================================================ save

def _parse_size(size) -> int:
  if isinstance(size, (int, np.integer)):
    return int(size)
  m = re.fullmatch(r'\s*(\d+(?:\.\d+)?)\s*(?:([KMGT])(i?))?B?\s*', str(size), re.IGNORECASE)
  if not m:
    raise HFInteropError(f'max_shard_size {size!r} is not a size like 5GB, 500MB or 1000000.')
  base = 1024 if m.group(3) else 1000
  power = 'KMGT'.index(m.group(2).upper()) + 1 if m.group(2) else 0
  return int(float(m.group(1)) * base ** power)


def _flatten_paths(tree, prefix=()) -> dict[tuple[str, ...], Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict) or hasattr(v, 'items') and not hasattr(v, 'shape'):
      out.update(_flatten_paths(v, prefix + (str(k),)))
    else:
      out[prefix + (str(k),)] = v
  return out


def checked_leaves(cfg: ModelConfig, params: dict, groups) -> tuple[dict, bool]:
  """(flat params {path tuple: array}, whether the layers are scanned), checked against the
  tensor `groups` of `cfg`: an HFInteropError (one sentence) for a missing, unexpected or
  misshapen param. `params` unboxed, without a 'params' wrapper."""
  leaves = _flatten_paths(params)
  scanned = any(p[:2] == ('decoder', 'layers') for p in leaves)
  expected = {}
  for g in groups:
    for rel, shape in zip(g.flax, g.flax_shapes):
      fp = flax_path(g, rel, scanned)
      expected[fp] = (cfg.num_layers,) + shape if (scanned and g.layer is not None) else shape
  missing = sorted(('/'.join(p) for p in set(expected) - set(leaves)), key=natural_key)
  if missing:
    raise HFInteropError(f'params are missing {_names(missing)} required by the model config.')
  extra = sorted(('/'.join(p) for p in set(leaves) - set(expected)), key=natural_key)
  if extra:
    raise HFInteropError(f'params have unexpected entries {_names(extra)} that the model '
                         'config does not account for.')
  for fp, shape in expected.items():
    if tuple(np.shape(leaves[fp])) != shape:
      raise HFInteropError(f"param '{'/'.join(fp)}' has shape {tuple(np.shape(leaves[fp]))} "
                           f'but the model config expects {shape}.')
  return leaves, scanned


def group_tensors(g: TensorGroup, leaves: dict, scanned: bool):
  """(Hugging Face name, array in the Hugging Face layout) of one tensor group, from the
  `checked_leaves` of a param tree."""
  flax_arrays = []
  for rel in g.flax:
    x = leaves[flax_path(g, rel, scanned)]
    if scanned and g.layer is not None:
      x = x[g.layer]
    flax_arrays.append(np.asarray(jax.device_get(x)))
  return zip(g.hf, g.to_hf(flax_arrays))


def save(model_config, params, path: str, *, dtype=None,
         max_shard_size=DEFAULT_MAX_SHARD_SIZE, overwrite: bool = False, score_kernel=None,
         pad_token_id=None) -> None:
  """Writes `params` as a Hugging Face checkpoint directory that
  `transformers.AutoModelForCausalLM.from_pretrained(path)` loads; with `score_kernel`
  [embed, num_labels] (a reward model's head) a LLaMA-family sequence classifier instead
  (`LlamaForSequenceClassification`: the decoder without its LM head, `score.weight`, and
  `pad_token_id`, which transformers uses to find each row's last token).

  Args:
    model_config: ModelConfig (or dict) of a LLaMA-, Mistral- or GPT-2-shaped decoder.
    params: the params dict (unrolled `layers_{i}` or scanned `layers`; `{'params': ...}` and
      Flax-boxed leaves are accepted).
    path: output directory, replaced whole once the new checkpoint is complete; it must be
      absent, empty or a previous `save` (`is_hf_export`) unless `overwrite`.
    dtype: dtype of the written tensors; None keeps each param's dtype.
    max_shard_size: bytes (int) or a string like '5GB' / '200MB'; larger checkpoints are split
      into model-0000i-of-0000n.safetensors shards with model.safetensors.index.json.
    overwrite: replace `path` whatever it holds.
    score_kernel, pad_token_id: see above.
  """
  cfg = ModelConfig.from_dict(model_config)
  family = export_family(cfg)
  if score_kernel is not None and family == 'gpt2':
    raise HFInteropError('a sequence classifier is exported for LLaMA-family models only.')
  path = os.path.realpath(os.fspath(path))
  native.check_destination(path, is_hf_export, 'Hugging Face', overwrite)
  params = nn.meta.unbox(params)
  if set(params) == {'params'}:
    params = params['params']
  params = dict(params)
  groups = tensor_groups('gpt2' if family == 'gpt2' else 'llama', cfg)
  if score_kernel is not None:   # the decoder without its LM head, then the score
    params.pop('lm_head', None)
    params['score'] = {'kernel': np.asarray(score_kernel)}
    labels = np.shape(score_kernel)[1]
    groups = [g for g in groups if g.hf != ('lm_head.weight',)]
    groups.append(_linear_t('score.weight', ('score', 'kernel'), (labels,), cfg.d_model))
  leaves, scanned = checked_leaves(cfg, params, groups)   # before writing anything
  out_dtype = _np_dtype(dtype)

  def group_dtype(g):
    if out_dtype is not None:
      return out_dtype
    return np.dtype(leaves[flax_path(g, g.flax[0], scanned)].dtype)

  # Plan shards by group (a group's tensors stay together).
  limit = _parse_size(max_shard_size)
  shards: list[list[TensorGroup]] = [[]]
  size = 0
  for g in groups:
    nbytes = sum(math.prod(s) for s in g.hf_shapes) * group_dtype(g).itemsize
    if shards[-1] and size + nbytes > limit:
      shards.append([])
      size = 0
    shards[-1].append(g)
    size += nbytes

  hf_dtype = out_dtype or _np_dtype(cfg.param_dtype)
  if out_dtype is None and groups:
    hf_dtype = group_dtype(groups[0])
  n = len(shards)
  weight_map, total = {}, 0
  with native.replacing(path) as staging:
    for s, shard in enumerate(shards):
      fname = WEIGHTS_NAME if n == 1 else f'model-{s + 1:05d}-of-{n:05d}.safetensors'
      tensors = {}
      for g in shard:
        for name, arr in group_tensors(g, leaves, scanned):
          arr = np.ascontiguousarray(arr.astype(group_dtype(g), copy=False))
          tensors[name] = arr
          weight_map[name] = fname
          total += arr.nbytes
      save_file(tensors, os.path.join(staging, fname), metadata={'format': 'pt'})
      del tensors
    written = [CONFIG_NAME, *sorted(set(weight_map.values()))]
    if n > 1:
      written.append(INDEX_NAME)
      with open(os.path.join(staging, INDEX_NAME), 'w') as f:
        json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f, indent=2,
                  sort_keys=True)
    hf_config = config_to_hf(cfg, hf_dtype)
    if score_kernel is not None:
      hf_config.update(architectures=['LlamaForSequenceClassification'],
                       num_labels=int(np.shape(score_kernel)[1]), pad_token_id=pad_token_id)
    with open(os.path.join(staging, CONFIG_NAME), 'w') as f:
      json.dump(hf_config, f, indent=2, sort_keys=True)
    with open(os.path.join(staging, EXPORT_MARKER), 'w') as f:
      json.dump({'files': written}, f, indent=2)


def is_hf_export(path: str) -> bool:
  """Whether `path` is a directory that `save` wrote, holding nothing else."""
  try:
    with open(os.path.join(path, EXPORT_MARKER)) as f:
      files = json.load(f)['files']
    return isinstance(files, list) and set(os.listdir(path)) <= {EXPORT_MARKER, *files}
  except (OSError, ValueError, KeyError, TypeError):
    return False


# ============================================================================ native + CLI

def byte_level_tokenizer():
  """A Hugging Face byte-level tokenizer without merges: <s> = 0, </s> = 1, then one token per
  byte (the ByteLevel alphabet, 258 in all), so every split of a text is a split of its
  tokens. For random-init Hugging Face models built locally (tests, benchmarks): nothing is
  downloaded. Its ids are not those of flaxllm's own bytes tokenizer."""
  import tokenizers  # pylint: disable=import-outside-toplevel -- heavy, optional: HF tools only
  import transformers  # pylint: disable=import-outside-toplevel -- heavy, optional: HF tools only
  alphabet = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())
  vocab = {'<s>': 0, '</s>': 1, **{ch: i + 2 for i, ch in enumerate(alphabet)}}
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                          use_regex=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  tok.add_special_tokens(['<s>', '</s>'])
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token='<s>',
                                              eos_token='</s>')


def convert_main(argv: Optional[Sequence[str]] = None) -> int:
  """`flaxllm convert`: Hugging Face <-> flaxllm checkpoint directories.

      flaxllm convert --from-hf HF_DIR --to FLAXLLM_DIR [--dtype bfloat16] [--scan-layers]
      flaxllm convert --from FLAXLLM_DIR --to-hf HF_DIR [--dtype bfloat16] [--max-shard-size 5GB]

  The destination must be absent, empty or a previous export of the same kind, unless
  --overwrite; it is replaced whole once the new model is complete. `argv` excludes the
  program and the 'convert' word. Returns the exit status (0); a bad source or destination
  raises one ValueError / FileNotFoundError sentence (`flaxllm.cli.run` prints it).
  """
  parser = argparse.ArgumentParser(
      prog='flaxllm convert',
      description='Convert between Hugging Face (LLaMA, Mistral, GPT-2 safetensors) and '
                  'flaxllm (model_config.json + orbax params/) checkpoint directories.',
      epilog='A GGUF file for llama.cpp: flaxllm convert --from=DIR --to-gguf=FILE '
             '[--type=f32|f16|q8_0] (--to-gguf=FILE --help for its flags).')
  src = parser.add_mutually_exclusive_group(required=True)
  src.add_argument('--from-hf', metavar='HF_DIR', help='Hugging Face checkpoint to import.')
  src.add_argument('--from', dest='from_flaxllm', metavar='FLAXLLM_DIR',
                   help='flaxllm checkpoint to export.')
  dst = parser.add_mutually_exclusive_group(required=True)
  dst.add_argument('--to', dest='to_flaxllm', metavar='FLAXLLM_DIR',
                   help='flaxllm checkpoint directory to write (with --from-hf).')
  dst.add_argument('--to-hf', metavar='HF_DIR',
                   help='Hugging Face directory to write (with --from).')
  parser.add_argument('--dtype', default=None,
                      help='dtype of the written params/tensors (default: keep).')
  parser.add_argument('--scan-layers', action='store_true',
                      help='with --from-hf: stack layer params (scan_layers=True).')
  parser.add_argument('--max-shard-size', default=DEFAULT_MAX_SHARD_SIZE,
                      help='with --to-hf: largest safetensors shard (default %(default)s).')
  parser.add_argument('--overwrite', action='store_true',
                      help='replace the destination whole even if it holds files flaxllm did '
                           'not write.')
  args = parser.parse_args(list(argv) if argv is not None else None)
  if args.from_hf and not args.to_flaxllm:
    parser.error('--from-hf needs --to FLAXLLM_DIR.')
  if args.from_flaxllm and not args.to_hf:
    parser.error('--from needs --to-hf HF_DIR.')
  if args.from_hf:  # the destination is checked before the (slow) load, and again when saving
    native.check_destination(args.to_flaxllm, native.is_model_dir, 'model', args.overwrite)
    cfg, params = load(args.from_hf, dtype=args.dtype, scan_layers=args.scan_layers)
    save_flaxllm(cfg, params, args.to_flaxllm, overwrite=args.overwrite)
    print(f'wrote flaxllm checkpoint {args.to_flaxllm}')
  else:
    native.check_destination(args.to_hf, is_hf_export, 'Hugging Face', args.overwrite)
    cfg, params = load_flaxllm(args.from_flaxllm)
    save(cfg, params, args.to_hf, dtype=args.dtype, max_shard_size=args.max_shard_size,
         overwrite=args.overwrite)
    print(f'wrote Hugging Face checkpoint {args.to_hf}')
  return 0
