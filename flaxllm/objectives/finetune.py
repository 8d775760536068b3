"""What is trained of the model: the fine-tuning methods of `config.finetune`, which every
objective composes with (`flaxllm.objectives.base.Objective` holds one).

    method = finetune.from_config(config.finetune)
    trainable, frozen = method.split(params, rng)      # jit this; frozen = {'base': ...} or {}
    tree = method.model_params(trainable, frozen)      # what model.apply gets
    plain = method.plain_params(trainable, frozen)     # adapters merged: export, sampling

  full   trainable = params, nothing frozen.
  freeze trainable = the params selected by finetune.train (regexes, the same rule system as
         the weight-decay mask); the rest is frozen['base'] (no gradient, no optimizer state).
  lora   trainable = the LoRA adapters of finetune.targets; frozen['base'] = the params (or
         PiSSA's residual with finetune.init='pissa'), applied as x·W0 + scale·(x·A)·B.
  qlora  as lora, with the base's Linear kernels (finetune.quant_targets) quantised to NF4 or
         int8 (finetune.quant), dequantised on the fly.

The section's defaults (`config_section`) and checks (`check_section`) live here too.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Any, Callable

import jax
from ml_collections import ConfigDict

from flaxllm import rundir
from flaxllm.interop import hf
from flaxllm.interop import peft as peft_io
from flaxllm.models.config import ConfigError, require
from flaxllm.peft import lora
from flaxllm.peft import path_rules
from flaxllm.peft import quant as quant_lib

log = logging.getLogger(__name__)


def config_section() -> ConfigDict:
  """`config.finetune`: what is trained, from init_from (flaxllm.objectives.finetune)."""
  c = ConfigDict()
  c.method = 'full'                # one of METHODS: 'full' | 'freeze' | 'lora' | 'qlora'
  c.train = ()                     # freeze: regexes of the params that train (the rest frozen)
  c.targets = (path_rules.ALL_LINEAR,)  # lora/qlora: regexes of adapted kernels, or all-linear
  c.rank = 8
  c.alpha = 16.0                   # scale = alpha / rank (alpha / sqrt(rank) with rslora)
  c.rslora = False
  c.dropout = 0.0                  # on the adapters' input
  c.init = 'kaiming'               # one of lora.INITS: 'kaiming' (B = 0, as PEFT) | 'gaussian'
  #                                  | 'pissa'
  c.quant = 'nf4'                  # qlora: base kernels as one of quant.KINDS ('nf4' | 'int8')
  c.quant_targets = (path_rules.ALL_LINEAR,)
  c.quant_block = 64
  c.double_quant = True            # nf4: absmax values in 8 bits too
  return c


def check_section(f) -> None:
  """ConfigError (one sentence) for a `config.finetune` that cannot work; rules are checked
  against the model's params when the trainer builds its programs."""
  require(f.method in METHODS, f'finetune.method={f.method!r} is not known; choose one of '
                               f'{tuple(METHODS)}.')
  if f.method == 'freeze':
    require(len(f.train) > 0, "finetune.method='freeze' needs finetune.train, the regexes of "
                              "the params to train, e.g. --config.finetune.train='final_norm/'.")
  for key in ('train', 'targets', 'quant_targets'):
    for pattern in f[key]:
      if pattern == path_rules.ALL_LINEAR:
        continue
      try:
        re.compile(pattern)
      except re.error as e:
        raise ConfigError(f'finetune.{key} pattern {pattern!r} is not a valid regex ({e}); fix '
                          'or remove it.') from e
  require(isinstance(f.rank, int) and f.rank >= 1,
          f'finetune.rank={f.rank!r} must be a positive integer; use e.g. 8.')
  require(f.alpha > 0, f'finetune.alpha={f.alpha} must be positive; use e.g. 16.')
  require(0.0 <= f.dropout < 1.0, f'finetune.dropout={f.dropout} must be in [0, 1).')
  require(f.init in lora.INITS, f'finetune.init={f.init!r} is not known; use one of '
                                f'{lora.INITS}.')
  require(f.quant in quant_lib.KINDS, f'finetune.quant={f.quant!r} is not known; use one of '
                                      f'{quant_lib.KINDS}.')
  require(f.quant_block >= 2 and f.quant_block % 2 == 0,
          f'finetune.quant_block={f.quant_block} must be an even number >= 2; use e.g. 64.')


def _rules(value) -> list[str]:
  return path_rules.as_list(value) if isinstance(value, str) else [str(v) for v in value]


class Full:
  """Every parameter trains; nothing is frozen."""

  def __init__(self, ft):
    self.ft = ft

  def split(self, params, rng) -> tuple[Any, dict]:
    del rng
    return params, {}

  def model_params(self, trainable, frozen):
    del frozen
    return trainable

  def plain_params(self, trainable, frozen):
    return self.model_params(trainable, frozen)

  def trainable_specs(self, param_specs, abstract_trainable):
    del abstract_trainable
    return param_specs

  def frozen_specs(self, param_specs, abstract_frozen) -> dict:
    return {name: param_specs for name in abstract_frozen}

  def export(self, workdir: str, model_cfg, trainable, gather: Callable, is_main: bool):
    """Extra files besides the exported model (none)."""
    del workdir, model_cfg, trainable, gather, is_main


class Freeze(Full):
  """The params matching finetune.train train; the rest is frozen['base']."""

  def split(self, params, rng):
    del rng
    trainable, base = partition(params, _rules(self.ft.train))
    return trainable, {'base': base}

  def model_params(self, trainable, frozen):
    return union(trainable, frozen['base'])


class LoRA(Full):
  """LoRA adapters train; the base (frozen['base']) is applied through LoRAKernel objects."""
  quantize = False

  def split(self, params, rng):
    ft = self.ft
    adapters = lora.init(params, _rules(ft.targets), rng, rank=ft.rank, alpha=ft.alpha,
                         rslora=ft.rslora, dropout=ft.dropout, init=ft.init)
    base = lora.unmerge(params, adapters) if ft.init == 'pissa' else params
    if self.quantize:
      base = quant_lib.quantize_tree(base, _rules(ft.quant_targets), kind=ft.quant,
                                     block_size=ft.quant_block, double_quant=ft.double_quant)
    return adapters, {'base': base}

  def model_params(self, trainable, frozen):
    return lora.combine(frozen['base'], trainable)

  def plain_params(self, trainable, frozen):
    """Adapters merged, quantised kernels dequantised (one compiled program)."""
    return _merged(frozen['base'], trainable)

  def trainable_specs(self, param_specs, abstract_trainable):
    return lora.adapter_specs(param_specs, abstract_trainable)

  def export(self, workdir: str, model_cfg, trainable, gather: Callable, is_main: bool):
    """`<workdir>/adapter/`: the adapters in Hugging Face PEFT format (LLaMA-family models;
    logged and skipped for others)."""
    adapters = gather(trainable)
    if not is_main:
      return
    try:
      peft_io.save_adapter(model_cfg, adapters, os.path.join(workdir, rundir.ADAPTER_DIR))
    except (peft_io.PeftInteropError, hf.HFInteropError) as e:
      log.warning('not exporting a PEFT adapter: %s', e)


class QLoRA(LoRA):
  """LoRA on a quantised base (finetune.quant)."""
  quantize = True


@jax.jit
def _merged(base, adapters):
  return quant_lib.dequantize_tree(lora.merge(base, adapters))


METHODS = {'full': Full, 'freeze': Freeze, 'lora': LoRA, 'qlora': QLoRA}


def from_config(ft) -> Full:
  """The fine-tuning method of a (complete) `config.finetune` section."""
  section = ConfigDict({**config_section().to_dict(), **dict(ft)})
  if section.method not in METHODS:
    raise path_rules.RuleError(f'finetune.method={section.method!r} is not known; choose one '
                               f'of {tuple(METHODS)}.')
  return METHODS[section.method](section)


def partition(params, train_rules) -> tuple[Any, Any]:
  """(selected, rest): two disjoint subtrees of `params` (no arrays copied)."""
  chosen = set(path_rules.select(params, train_rules, what='finetune.train rule'))
  flat = path_rules.flatten(params)
  trainable = {p: v for p, v in flat.items() if p in chosen}
  frozen = {p: v for p, v in flat.items() if p not in chosen}
  return path_rules.unflatten(trainable), path_rules.unflatten(frozen)


def union(a, b):
  """The tree with the leaves of both disjoint subtrees (inverse of `partition`)."""
  flat = path_rules.flatten(b)
  flat.update(path_rules.flatten(a))
  return path_rules.unflatten(flat)
