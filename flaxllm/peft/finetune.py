"""What is trained: the trainer's fine-tuning hooks for `config.finetune.method`.

    split, model_params = finetune.hooks(config.finetune)
    trainable, base = split(params, rng)          # jit this; base is frozen['base']
    tree = model_params(trainable, {'base': base})  # what model.apply gets

  full   trainable = params, no frozen base.
  freeze trainable = the params selected by finetune.train (regexes, the same rule system as
         the weight-decay mask); the rest is frozen['base'] (no gradient, no optimizer state).
  lora   trainable = the LoRA adapters of finetune.targets; frozen['base'] = the params (or
         PiSSA's residual with finetune.init='pissa'), applied as x·W0 + scale·(x·A)·B.
  qlora  as lora, with the base's Linear kernels (finetune.quant_targets) quantised to NF4 or
         int8 (finetune.quant), dequantised on the fly.
"""
from __future__ import annotations

from typing import Any, Callable

from flaxllm import lora
from flaxllm.peft import quant as quant_lib
from flaxllm.peft import rules as rules_lib

METHODS = ('full', 'freeze', 'lora', 'qlora')


def _get(ft, key, default):
  try:
    value = ft[key]
  except (KeyError, AttributeError, TypeError):
    return default
  return default if value is None else value


def _rules(value) -> list[str]:
  return rules_lib.as_list(value) if isinstance(value, str) else [str(v) for v in value]


def lora_kwargs(ft) -> dict:
  return dict(rank=int(_get(ft, 'rank', 8)), alpha=float(_get(ft, 'alpha', 16.0)),
              rslora=bool(_get(ft, 'rslora', False)), dropout=float(_get(ft, 'dropout', 0.0)),
              init=str(_get(ft, 'init', 'kaiming')))


def hooks(ft) -> tuple[Callable, Callable]:
  """(split, model_params) for the `config.finetune` settings `ft` (a dict or ConfigDict;
  None or method 'full' gives the identity pair)."""
  method = _get(ft, 'method', 'full') if ft is not None else 'full'
  if method not in METHODS:
    raise rules_lib.RuleError(f'finetune.method={method!r} is not known; choose one of '
                              f'{METHODS}.')
  if method == 'full':
    return (lambda params, rng: (params, None)), (lambda params, frozen: params)

  if method == 'freeze':
    train_rules = _rules(_get(ft, 'train', ()))

    def split_freeze(params, rng):
      del rng
      return partition(params, train_rules)

    def merge_freeze(trainable, frozen):
      return union(trainable, frozen['base'])
    return split_freeze, merge_freeze

  targets = _rules(_get(ft, 'targets', (rules_lib.ALL_LINEAR,)))
  kw = lora_kwargs(ft)

  def split_lora(params, rng):
    adapters = lora.init(params, targets, rng, **kw)
    base = lora.unmerge(params, adapters) if kw['init'] == 'pissa' else params
    if method == 'qlora':
      base = quant_lib.quantize_tree(
          base, _rules(_get(ft, 'quant_targets', (rules_lib.ALL_LINEAR,))),
          kind=str(_get(ft, 'quant', 'nf4')), block_size=int(_get(ft, 'quant_block', 64)),
          double_quant=bool(_get(ft, 'double_quant', True)))
    return adapters, base

  def combine(trainable, frozen):
    return lora.combine(frozen['base'], trainable)
  return split_lora, combine


def partition(params, train_rules) -> tuple[Any, Any]:
  """(selected, rest): two disjoint subtrees of `params` (no arrays copied)."""
  chosen = set(rules_lib.select(params, train_rules, what='finetune.train rule'))
  flat = rules_lib.flatten(params)
  trainable = {p: v for p, v in flat.items() if p in chosen}
  frozen = {p: v for p, v in flat.items() if p not in chosen}
  return rules_lib.unflatten(trainable), rules_lib.unflatten(frozen)


def union(a, b):
  """The tree with the leaves of both disjoint subtrees (inverse of `partition`)."""
  flat = rules_lib.flatten(b)
  flat.update(rules_lib.flatten(a))
  return rules_lib.unflatten(flat)


def trainable_specs(ft, param_specs, abstract_trainable):
  """Logical PartitionSpecs for the trainable tree: LoRA adapters follow their base weight's
  axes (see `lora.adapter_specs`); the other methods keep the params' own specs."""
  method = _get(ft, 'method', 'full') if ft is not None else 'full'
  if method in ('lora', 'qlora'):
    return lora.adapter_specs(param_specs, abstract_trainable)
  return param_specs


def full_params(ft, trainable, frozen):
  """Plain params of the fine-tuned model (adapters merged, quantised kernels dequantised):
  what export, sampling and `flaxllm generate` use."""
  split_fn, model_params = hooks(ft)
  del split_fn
  tree = model_params(trainable, frozen or {})
  method = _get(ft, 'method', 'full') if ft is not None else 'full'
  if method in ('lora', 'qlora'):
    base, adapters = lora.split(tree)
    return quant_lib.dequantize_tree(lora.merge(base, adapters))
  return tree


ADAPTER_DIR = 'adapter'


def export_adapter(workdir: str, ft, model_cfg, trainable) -> str | None:
  """`<workdir>/adapter/`: LoRA adapters in Hugging Face PEFT format (for LLaMA-family models;
  the merged model goes to `<workdir>/model/` as usual). Returns the path, or None when the
  method has no adapters or the model has no PEFT equivalent (logged)."""
  import logging
  import os
  method = _get(ft, 'method', 'full') if ft is not None else 'full'
  if method not in ('lora', 'qlora'):
    return None
  from flaxllm.interop import hf, peft as peft_io
  path = os.path.join(workdir, ADAPTER_DIR)
  try:
    peft_io.save_adapter(model_cfg, trainable, path)
  except (peft_io.PeftInteropError, hf.HFInteropError) as e:
    logging.getLogger(__name__).warning('not exporting a PEFT adapter: %s', e)
    return None
  return path
