"""The objectives by name (`config.objective`), and the config sections they own."""
from __future__ import annotations

import json

from ml_collections import ConfigDict

from flaxllm.models.config import ConfigError
from flaxllm.objectives import base, finetune, lm, seq2seq
from flaxllm.objectives.align.dpo import DirectPreference
from flaxllm.objectives.align.grpo import GroupRelative
from flaxllm.objectives.align.ppo import ProximalPolicy
from flaxllm.objectives.align.reward import RewardModel
from flaxllm.objectives.distill.objective import Distillation

REGISTRY: dict[str, type[base.Objective]] = {
    'lm': lm.LanguageModel,
    'distill': Distillation,
    'seq2seq': seq2seq.Seq2Seq,
    'reward': RewardModel,
    'dpo': DirectPreference,
    'grpo': GroupRelative,
    'ppo': ProximalPolicy,
}


def get(name: str) -> type[base.Objective]:
  """The objective class registered as `name` (one sentence listing the known ones if none)."""
  if name not in REGISTRY:
    raise ConfigError(f'objective={name!r} is not a known objective; choose one of '
                      f'{sorted(REGISTRY)}.')
  return REGISTRY[name]


def from_config(config) -> base.Objective:
  """The objective of a validated config (`config.objective`)."""
  return get(config.objective)(config)


def config_sections() -> dict[str, ConfigDict]:
  """{section: defaults} of the settings objectives own: `finetune` (every objective composes
  with it) and each registered objective's own section."""
  sections = {'finetune': finetune.config_section()}
  for cls in REGISTRY.values():
    if cls.section:
      sections[cls.section] = cls.config_section()
  return sections


def check_config(config) -> None:
  """One-sentence ConfigError when the objective settings of `config` cannot work: an unknown
  objective, the fine-tuning section, the chosen objective's own checks, and settings of
  another objective left set (they would be silently ignored)."""
  cls = get(config.objective)
  finetune.check_section(config.finetune)
  cls.check_section(config)
  for other in REGISTRY.values():
    if other.section and other.section != cls.section:
      plain = lambda v: json.dumps(v.to_dict() if hasattr(v, 'to_dict') else v, sort_keys=True)
      changed = sorted(k for k, v in other.config_section().items()
                       if plain(config[other.section][k]) != plain(v))
      if changed:
        raise ConfigError(f'{other.section}.{changed[0]} is set but objective='
                          f'{config.objective!r} does not use it; set --config.objective='
                          f'{other.name} or leave {other.section}.* at their defaults.')
