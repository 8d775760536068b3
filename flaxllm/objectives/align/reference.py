"""The reference model of the alignment objectives (DPO's, GRPO's KL anchor), in three modes:

  * LoRA / QLoRA: the base with the adapters switched off, `frozen['base']` itself (no second
    copy of the weights);
  * full or freeze fine-tuning: a frozen copy of the starting params, `frozen['reference']`;
  * `<section>.reference=<dir>`: another model (a flaxllm workdir, model directory or Hugging
    Face directory, checked against the policy's shapes), loaded once as `frozen['reference']`.

It is frozen (no gradient, no optimizer state, never saved) and used under `stop_gradient`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from flaxllm import rundir
from flaxllm.models.config import require
from flaxllm.objectives import base, finetune


def check_reference_settings(config, section: str) -> None:
  """ConfigError when the adapters-off reference would not be the starting model."""
  if config.finetune.method in ('lora', 'qlora') and not config[section].reference:
    require(config.finetune.init != 'pissa',
            "the adapters-off reference of LoRA is the base, but with finetune.init='pissa' "
            f'the base is a residual, not the starting model; set {section}.reference=<the '
            'model> or another finetune.init.')


class WithReference(base.Objective):
  """An objective whose loss compares the policy with a frozen reference model (config key
  `<section>.reference`); `uses_reference()` says whether this configuration needs one."""

  def uses_reference(self) -> bool:
    return True

  def _reference_path(self) -> str:
    return self.config[self.section].reference

  def _reference_in_base(self) -> bool:
    """Whether the reference is the frozen base with the adapters off (LoRA / QLoRA)."""
    return isinstance(self.finetune, finetune.LoRA) and not self._reference_path()

  def split(self, params, rng):
    """The fine-tuning split, plus a frozen copy of the starting params as the reference when
    the policy trains them itself."""
    trainable, frozen = super().split(params, rng)
    if (self.uses_reference() and not self._reference_path() and
        not self._reference_in_base()):
      frozen['reference'] = jax.tree.map(jnp.copy, params)
    return trainable, frozen

  def frozen_specs(self, param_specs, abstract_frozen):
    specs = super().frozen_specs(param_specs, abstract_frozen)
    if 'reference' in abstract_frozen:
      specs['reference'] = param_specs
    return specs

  def load_frozen(self, mesh, rules, *, abstract: bool = False) -> dict:
    """{'reference': the model of `<section>.reference`}, sharded like the policy's params."""
    path = self._reference_path()
    if not path or not self.uses_reference():
      return {}
    shapes = base.sharded_abstract_params(self.model_cfg, mesh, rules)
    if abstract:
      return {'reference': shapes}
    return {'reference': rundir.load_params(path, shapes, what=f'{self.section}.reference')}

  def reference_params(self, frozen):
    """The reference model's params (the base with adapters off, or frozen['reference'])."""
    return frozen['base'] if self._reference_in_base() else frozen['reference']
