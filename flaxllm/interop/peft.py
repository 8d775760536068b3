"""LoRA adapters in Hugging Face PEFT format, both ways, and merged exports.

    save_adapter(cfg, adapters, 'out/adapter')   # adapter_config.json + adapter_model.safetensors
    adapters = load_adapter('out/adapter', cfg)     # back to a flaxllm.lora adapters tree
    save_merged(cfg, params, adapters, 'out/hf')    # W0 + scale*BA as a full HF checkpoint

The export loads in Python with
    base = transformers.AutoModelForCausalLM.from_pretrained(<flaxllm.interop.hf.save dir>)
    model = peft.PeftModel.from_pretrained(base, 'out/adapter')

Conventions (PEFT LoRA on nn.Linear): `lora_A.weight` [r, in], `lora_B.weight` [out, r], keys
`base_model.model.<module>.lora_{A,B}.weight`, scale lora_alpha / r (lora_alpha / sqrt(r) with
use_rslora). Module names and layouts come from `flaxllm.interop.hf`'s tensor mapping (one
place for HF names): a flaxllm kernel [*in, *out] is the HF weight [prod(out), prod(in)]
transposed, so A = a.reshape(prod(in), r).T and B = b.reshape(r, prod(out)).T. LLaMA and
Mistral models export; GPT-2's fused c_attn has no per-projection LoRA counterpart.
"""
from __future__ import annotations

import json
import math
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from flaxllm.interop import hf as hf_lib
from flaxllm.models.config import ModelConfig
from flaxllm.peft import lora, quant
from flaxllm.peft import path_rules as rules_lib

ADAPTER_CONFIG = 'adapter_config.json'
ADAPTER_WEIGHTS = 'adapter_model.safetensors'
PREFIX = 'base_model.model.'


class PeftInteropError(ValueError):
  """An adapter that cannot be exported or imported; the message says why."""


def _kernel_modules(cfg: ModelConfig, scanned: bool) -> dict[str, list[tuple]]:
  """flaxllm kernel path -> [(HF module name, layer index or None, per-layer kernel shape)]
  for the Linear kernels of a LLaMA-family model, taken from the HF tensor mapping."""
  family = hf_lib.export_family(cfg)
  if family not in ('llama', 'mistral'):
    raise PeftInteropError(f'PEFT adapters export for LLaMA/Mistral models; this is a {family} '
                           'model (its fused projections have no per-projection LoRA).')
  out = {}
  for g in hf_lib.tensor_groups('llama', cfg):
    for name, rel, shape in zip(g.hf, g.flax, g.flax_shapes):
      if rel[-1] != 'kernel':
        continue
      path = '/'.join(hf_lib.flax_path(g, rel, scanned))
      out.setdefault(path, []).append((name[:-len('.weight')], g.layer, shape))
  return out


def save_adapter(model_config, adapters, path: str, *,
                 base_model_name_or_path: str = '') -> None:
  """Writes `adapters` (flaxllm.lora) as a PEFT LoRA adapter directory."""
  cfg = ModelConfig.from_dict(model_config)
  items = rules_lib.flatten(adapters)
  if not items:
    raise PeftInteropError('the adapters tree is empty; nothing to export.')
  scanned = any('/layers/' in f'/{p}/' for p in items)
  modules = _kernel_modules(cfg, scanned)
  ranks = {ad.rank for ad in items.values()}
  scales = {ad.scale for ad in items.values()}
  dropouts = {ad.dropout for ad in items.values()}
  if len(ranks) != 1 or len(scales) != 1:
    raise PeftInteropError(f'the adapters have several ranks {sorted(ranks)} or scales '
                           f'{sorted(scales)}; PEFT export needs one rank and alpha.')
  rank, scale = ranks.pop(), scales.pop()
  tensors, targets = {}, []
  for p, ad in items.items():
    if p not in modules:
      raise PeftInteropError(f'adapter {p!r} is not on a Linear of the HF model (LoRA on '
                             'embeddings or the head does not export).')
    a = np.asarray(jax.device_get(ad.a), np.float32)
    b = np.asarray(jax.device_get(ad.b), np.float32)
    for module, layer, _ in modules[p]:
      la, lb = (a[layer], b[layer]) if scanned and layer is not None else (a, b)
      d_in = math.prod(la.shape[:-1])
      tensors[f'{PREFIX}{module}.lora_A.weight'] = np.ascontiguousarray(
          la.reshape(d_in, rank).T)
      tensors[f'{PREFIX}{module}.lora_B.weight'] = np.ascontiguousarray(
          lb.reshape(rank, -1).T)
      targets.append(module)
  os.makedirs(path, exist_ok=True)
  save_file(tensors, os.path.join(path, ADAPTER_WEIGHTS), metadata={'format': 'pt'})
  config = {
      'peft_type': 'LORA', 'task_type': 'CAUSAL_LM', 'r': rank, 'lora_alpha': scale * rank,
      'use_rslora': False, 'lora_dropout': dropouts.pop() if len(dropouts) == 1 else 0.0,
      'target_modules': sorted(targets, key=hf_lib.natural_key),
      'bias': 'none', 'fan_in_fan_out': False, 'modules_to_save': None,
      'init_lora_weights': True, 'inference_mode': True,
      'base_model_name_or_path': base_model_name_or_path or None,
      'revision': None, 'layers_to_transform': None, 'layers_pattern': None,
      'rank_pattern': {}, 'alpha_pattern': {}, 'use_dora': False,
  }
  with open(os.path.join(path, ADAPTER_CONFIG), 'w') as f:
    json.dump(config, f, indent=2, sort_keys=True)


def save_merged(model_config, params, adapters, path: str, **hf_kwargs) -> None:
  """A full HF checkpoint of the merged model W0 + scale*BA (`flaxllm.interop.hf.save`)."""
  hf_lib.save(model_config, quant.dequantize_tree(lora.merge(params, adapters)), path,
              **hf_kwargs)


def load_adapter(path: str, model_config, *, scan_layers: Optional[bool] = None,
                 dtype=np.float32):
  """A PEFT LoRA adapter directory -> a flaxllm.lora adapters tree for `model_config` (its
  scan_layers layout unless given). Raises PeftInteropError naming any tensor that does not
  fit the base model."""
  cfg = ModelConfig.from_dict(model_config)
  scanned = cfg.scan_layers if scan_layers is None else scan_layers
  cfg_path = os.path.join(path, ADAPTER_CONFIG)
  weights_path = os.path.join(path, ADAPTER_WEIGHTS)
  for p in (cfg_path, weights_path):
    if not os.path.isfile(p):
      raise PeftInteropError(f'{p} does not exist; a PEFT adapter directory holds '
                             f'{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}.')
  with open(cfg_path) as f:
    conf = json.load(f)
  if conf.get('peft_type', 'LORA') != 'LORA':
    raise PeftInteropError(f'{cfg_path} is a {conf.get("peft_type")} adapter; only LoRA '
                           'adapters import.')
  for key, ok in (('fan_in_fan_out', False), ('use_dora', False)):
    if bool(conf.get(key, ok)) != ok:
      raise PeftInteropError(f'{cfg_path} sets {key}={conf[key]}, which flaxllm does not '
                             'support.')
  if conf.get('rank_pattern') or conf.get('alpha_pattern'):
    raise PeftInteropError(f'{cfg_path} has per-module rank/alpha patterns; export it with one '
                           'rank and alpha.')
  rank = int(conf['r'])
  scale = lora.scale_of(rank, float(conf.get('lora_alpha', rank)),
                        bool(conf.get('use_rslora', False)))
  dropout = float(conf.get('lora_dropout') or 0.0)
  tensors = load_file(weights_path)
  by_module = {}
  for path_, pairs in _kernel_modules(cfg, False).items():
    for module, _, shape in pairs:
      by_module[module] = (path_, shape)
  names = {}
  for name in tensors:
    stem = name[len(PREFIX):] if name.startswith(PREFIX) else name
    for part in ('.lora_A.weight', '.lora_B.weight', '.lora_A.default.weight',
                 '.lora_B.default.weight'):
      if stem.endswith(part):
        module = stem[:-len(part)]
        break
    else:
      raise PeftInteropError(f'adapter tensor {name!r} is not a LoRA A/B weight (bias or '
                             'modules_to_save entries are not supported).')
    if module not in by_module:
      raise PeftInteropError(f'adapter tensor {name!r} names module {module!r}, which the '
                             'base model does not have: the adapter was made for a different '
                             'base model.')
    names.setdefault(module, {})['A' if '.lora_A.' in stem else 'B'] = (name, tensors[name])
  flat = {}
  for module, ab in names.items():
    if set(ab) != {'A', 'B'}:
      raise PeftInteropError(f'adapter module {module!r} has lora_{"".join(ab)} but not both '
                             'lora_A and lora_B.')
    kpath, shape = by_module[module]
    (name_a, a), (name_b, b) = ab['A'], ab['B']
    _, in_shape, out_shape = lora.kernel_dims(kpath, shape)
    want_a, want_b = (rank, math.prod(in_shape)), (math.prod(out_shape), rank)
    for name, x, want in ((name_a, a, want_a), (name_b, b, want_b)):
      if tuple(x.shape) != want:
        raise PeftInteropError(f'adapter tensor {name!r} has shape {tuple(x.shape)} but the '
                               f'base model needs {want}: the adapter was made for a different '
                               'base model.')
    flat[kpath] = (np.asarray(a.T, np.float32).reshape(*in_shape, rank),
                   np.asarray(b.T, np.float32).reshape(rank, *out_shape))
  if not flat:
    raise PeftInteropError(f'{weights_path} holds no LoRA tensors.')
  out = {}
  for kpath, (a, b) in flat.items():
    target = kpath
    if scanned:
      target = _scanned_path(kpath)
      out.setdefault(target, {})[_layer_of(kpath)] = (a, b)
    else:
      out[target] = (a, b)
  tree = {}
  for target, value in out.items():
    if scanned and isinstance(value, dict):
      missing = [i for i in range(cfg.num_layers) if i not in value]
      if missing:
        raise PeftInteropError(f'the adapter covers {target!r} in only some layers (missing '
                               f'{missing}); load it with scan_layers=False.')
      a = np.stack([value[i][0] for i in range(cfg.num_layers)])
      b = np.stack([value[i][1] for i in range(cfg.num_layers)])
    else:
      a, b = value
    tree[target] = lora.LoRAWeights(a=jnp.asarray(a, dtype), b=jnp.asarray(b, dtype),
                                    scale=scale, n_in=a.ndim - 1 - _lead(target),
                                    dropout=dropout)
  return rules_lib.unflatten(tree)


def _lead(path: str) -> int:
  return 1 if '/layers/' in f'/{path}/' else 0


def _scanned_path(path: str) -> str:
  parts = path.split('/')
  return '/'.join('layers' if p.startswith('layers_') else p for p in parts)


def _layer_of(path: str) -> int:
  for p in path.split('/'):
    if p.startswith('layers_'):
      return int(p[len('layers_'):])
  raise PeftInteropError(f'{path!r} is not inside a layer.')
