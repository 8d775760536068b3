"""Experiment configs: ml-collections files, big_vision-style variants, overrides, validation.

A config file defines `get_config(arg=None) -> ConfigDict`; `arg` is the text after `:` in
`--config=configs/default.py:size=tiny,steps=50`, parsed with `parse_arg`:

    def get_config(arg=None):
      arg = parse_arg(arg, size='small', steps=300)   # -> ConfigDict(size=..., steps=...)
      config = base_config()
      ...
      return config

`load_config(spec, overrides)` loads the file, locks the dict (no new keys), applies
`--config.x.y=v` overrides with the types of the existing values and validates the whole
experiment (`validate`) before anything is built or compiled. Every error is a `ConfigError`
whose one-sentence message names the key and the fix.

This module keeps the mechanics (files, variants, overrides, stored configs, resume
compatibility) and the run's own keys; every section belongs to its feature, which owns its
defaults, registries and checks: `model` (flaxllm.models.config), `data` (flaxllm.data.corpus,
checked by flaxllm.data.pipeline), `tokenizer` (flaxllm.data.tokenizer), `mesh` / `parallel`
(flaxllm.parallel), `optim` / `schedule` (flaxllm.train.optim), `wandb` (flaxllm.train.metrics),
`sample`, `finetune` and each objective's section (flaxllm.objectives), `eval_tasks`
(flaxllm.evaluation.in_training, checked by `flaxllm train`).
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import math
import os
from typing import Any, Iterable, Sequence

from ml_collections import ConfigDict

from flaxllm import rundir
from flaxllm.data import corpus, pipeline
from flaxllm.data import tokenizer as tokenizer_lib
from flaxllm.models import config as model_config
from flaxllm.models.config import ConfigError, ModelConfig, require
from flaxllm.objectives import base as objective_base
from flaxllm.objectives import registry as objectives
from flaxllm.parallel import axis_rules, mesh as mesh_lib
from flaxllm.train import metrics, optim

__all__ = ['ConfigError', 'ConfigDict', 'parse_arg', 'load_file', 'apply_overrides',
           'load_config', 'validate', 'base_config', 'to_json', 'from_json', 'stored_config',
           'check_resume_compatible', 'SAFE_TO_CHANGE', 'flat_items']

# Keys that may differ between the stored config.json of a workdir and a resumed run. Everything
# else (model, data, tokenizer, optimizer, batch, seeds) must match, or the run would silently
# become a different experiment. Entries ending in '.' are prefixes.
SAFE_TO_CHANGE = ('total_steps', 'log_every', 'eval_every', 'eval_batches', 'ckpt_every',
                  'keep_ckpts', 'peak_flops', 'progress_bar', 'wandb.', 'sample.',
                  'skip_nonfinite_steps', 'model.attention_impl', 'model.remat',
                  'data.read_threads', 'data.data_dir', 'note', 'mesh.', 'parallel.',
                  'eval_tasks.')


# ----------------------------------------------------------------------------- the base config

def base_config() -> ConfigDict:
  """Every key the trainer reads, with defaults; config files start from this and change it."""
  c = ConfigDict()
  c.seed = 0                       # parameter init, data order and dropout all derive from it
  c.note = ''                      # free text, shown in W&B
  c.objective = 'lm'               # what is trained and how: a name of flaxllm.objectives.REGISTRY
  c.total_steps = 1000
  c.batch_size = 32                # global batch, in sequences
  c.seq_len = 256
  c.init_from = ''                 # '' | a flaxllm workdir, model dir or HF dir to start from
  c.z_loss = 0.0                   # coefficient of mean(logsumexp(logits)^2) (PaLM: 1e-4)
  c.loss_chunk_size = 0            # > 0: head + loss over chunks of this many positions, so
  #                                  only one chunk's logits live at once (decoder-only models)
  c.skip_nonfinite_steps = False   # skip updates whose loss/grads are NaN/inf instead of stopping
  c.log_every = 10
  c.eval_every = 200               # 0 = only at the end
  c.eval_batches = 8
  c.ckpt_every = 200
  c.keep_ckpts = 3
  c.peak_flops = 0.0               # FLOP/s for MFU; 0 = measure this machine's matmul peak
  c.progress_bar = True

  c.mesh = mesh_lib.config_section()
  c.parallel = axis_rules.config_section()
  c.model = model_config.config_section()
  c.data = corpus.config_section()
  c.tokenizer = tokenizer_lib.config_section()
  c.optim = optim.optim_section()
  c.schedule = optim.schedule_section()
  c.wandb = metrics.wandb_section()
  c.sample = objective_base.sample_section()
  for name, section in objectives.config_sections().items():   # finetune, distill, ...
    c[name] = section
  # lm-eval tasks run inside `flaxllm train`: owned (checked, run) by
  # flaxllm.evaluation.in_training, a layer above this one, whose config_section() these
  # defaults equal (tests/test_eval_in_training.py); no tasks = nothing runs.
  c.eval_tasks = ConfigDict(dict(tasks=(), num_fewshot=0, limit=0, every=0, batch_size=8))
  return c


# ----------------------------------------------------------------------------- variants

def _parse_value(text: str) -> Any:
  """'3' -> 3, '1e-3' -> 0.001, 'true' -> True, '(1,2)' -> (1, 2), anything else -> str."""
  low = text.strip().lower()
  if low in ('true', 'false'):
    return low == 'true'
  if low in ('none', 'null'):
    return None
  try:
    return ast.literal_eval(text.strip())
  except (ValueError, SyntaxError):
    return text


def _convert(value: Any, like: Any, key: str, fix: str) -> Any:
  """`value` converted to the type of `like` (the current value), or a ConfigError."""
  if like is None or isinstance(value, type(like)) and not (
      isinstance(like, int) and not isinstance(like, bool) and isinstance(value, bool)):
    return value
  if isinstance(like, bool):
    if isinstance(value, int) and value in (0, 1):
      return bool(value)
  elif isinstance(like, int):
    if isinstance(value, float) and value.is_integer():
      return int(value)
  elif isinstance(like, float):
    if isinstance(value, int) and not isinstance(value, bool):
      return float(value)
  elif isinstance(like, str):
    return str(value)
  elif isinstance(like, (tuple, list)):
    if isinstance(value, (tuple, list)):
      return type(like)(value)
    if isinstance(value, str):
      return type(like)(v for v in value.split(',') if v)
    return type(like)([value])
  raise ConfigError(f'{key}={value!r} has type {type(value).__name__} but must be '
                    f'{type(like).__name__} (like its current value {like!r}); {fix}.')


def parse_arg(arg: str | None, **spec) -> ConfigDict:
  """big_vision-style `get_config` argument: 'size=tiny,steps=50' -> ConfigDict.

  `spec` gives every allowed key with its default (whose type converts the text); a bare
  key means True (`'quick'` == `'quick=True'`); unknown keys are an error.
  """
  out = ConfigDict(spec)
  for item in _split_items(arg or ''):
    if not item.strip():
      continue
    key, eq, text = item.partition('=')
    key = key.strip()
    if key not in spec:
      raise ConfigError(f'unknown config variant {key!r} in {arg!r}; allowed variants are '
                        f'{sorted(spec)}.')
    value = _parse_value(text) if eq else True
    out[key] = _convert(value, spec[key], key, f'write e.g. {key}={spec[key]!r}')
  return out


def _split_items(arg: str) -> list[str]:
  """'a=1,b=(2,3),c' -> ['a=1', 'b=(2,3)', 'c']: commas inside brackets stay in the value."""
  items, depth, start = [], 0, 0
  for i, ch in enumerate(arg):
    depth += (ch in '([{') - (ch in ')]}')
    if ch == ',' and depth == 0:
      items.append(arg[start:i])
      start = i + 1
  return items + [arg[start:]]


def load_file(spec: str) -> ConfigDict:
  """'configs/default.py:size=tiny' -> the ConfigDict returned by that file's get_config."""
  path, _, arg = spec.partition(':')
  if not path.endswith('.py') or not os.path.isfile(path):
    raise ConfigError(f'config file {path!r} does not exist; pass --config=configs/default.py '
                      '(optionally :key=value,... for its variants).')
  module_spec = importlib.util.spec_from_file_location('flaxllm_config_file', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise ConfigError(f'config file {path!r} has no get_config(arg) function; define one that '
                      'returns a ConfigDict.')
  config = module.get_config(arg or None)
  if not isinstance(config, ConfigDict):
    raise ConfigError(f'get_config in {path!r} returned {type(config).__name__}; return an '
                      'ml_collections.ConfigDict.')
  return config


# ----------------------------------------------------------------------------- overrides

def flat_items(config: ConfigDict | dict, prefix: str = '') -> Iterable[tuple[str, Any]]:
  """('optim.lr', 0.001), ... for every leaf (dict-valued fields like rope_scaling are leaves)."""
  items = config.items() if hasattr(config, 'items') else []
  for key, value in items:
    if isinstance(value, (ConfigDict, dict)) and not (prefix + key).endswith('rope_scaling'):
      yield from flat_items(value, f'{prefix}{key}.')
    else:
      yield prefix + key, value


def _unknown_key(config: ConfigDict, key: str) -> ConfigError:
  known = [k for k, _ in flat_items(config)]
  close = difflib.get_close_matches(key, known, n=1)
  hint = f'did you mean {close[0]!r}?' if close else 'the keys are listed in base_config()'
  return ConfigError(f'unknown config key {key!r}; remove it or fix the name ({hint}).')


def set_value(config: ConfigDict, key: str, value: Any, *, parse: bool = False):
  """config[key] = value for a dotted key, converting to the existing type."""
  *parents, leaf = key.split('.')
  node = config
  for name in parents:
    if not isinstance(node, ConfigDict) or name not in node:
      raise _unknown_key(config, key)
    node = node[name]
  if not isinstance(node, ConfigDict) or leaf not in node:
    raise _unknown_key(config, key)
  current = node[leaf]
  if isinstance(current, ConfigDict):
    raise ConfigError(f'{key} is a group of settings; override one of its keys, e.g. '
                      f'--config.{key}.{next(iter(current.keys()), "x")}=...')
  if parse and isinstance(current, str) and isinstance(value, str):
    new = value  # strings stay strings ('none', '1e-3' as text)
  else:
    new = _parse_value(value) if parse and isinstance(value, str) else value
    field = node.get_ref(leaf) if hasattr(node, 'get_ref') else None
    like = current
    if like is None and field is not None and field.get_type() is not None:
      like = field.get_type()()  # placeholder(int) -> 0 gives the type
      if new is None:
        like = None
    new = _convert(new, like, key, f'write e.g. --config.{key}=<{type(like).__name__}>')
  try:
    node[leaf] = new
  except (TypeError, KeyError, AttributeError) as e:
    raise ConfigError(f'cannot set {key}={new!r} ({e}); give a value of the type of its '
                      f'default {current!r}.') from e


def apply_overrides(config: ConfigDict, overrides: Sequence[str]) -> ConfigDict:
  """Applies ['--config.optim.lr=1e-3', 'config.total_steps=50', ...] to a locked config."""
  for item in overrides:
    text = item[2:] if item.startswith('--') else item
    if not text.startswith('config.') or '=' not in text:
      raise ConfigError(f'cannot read override {item!r}; write it as --config.KEY=VALUE, e.g. '
                        '--config.optim.lr=1e-3.')
    key, _, value = text[len('config.'):].partition('=')
    set_value(config, key, value, parse=True)
  return config


def load_config(spec: str, overrides: Sequence[str] = ()) -> ConfigDict:
  """The validated, locked experiment config of `--config=spec` plus `--config.x=v` overrides."""
  config = load_file(spec)
  config.lock()
  apply_overrides(config, overrides)
  return validate(config)


# ----------------------------------------------------------------------------- validation

def validate(config: ConfigDict) -> ConfigDict:
  """Checks every value the trainer uses; raises a one-sentence ConfigError naming key and fix."""
  known = {k for k, _ in flat_items(base_config())}
  for key, _ in flat_items(config):
    if key not in known:
      raise _unknown_key(base_config(), key)
  for key in known:
    node = config
    for name in key.split('.'):
      if name not in node:
        raise ConfigError(f'config key {key!r} is missing; start config files from '
                          'flaxllm.config.base_config().')
      node = node[name]
  model = ModelConfig.from_dict(config.model)  # raises ConfigError naming model.<key>

  def positive(*keys, allow_zero=False):
    for key in keys:
      value = _get(config, key)
      ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
          value >= 0 if allow_zero else value > 0) and math.isfinite(value)
      require(ok, f'{key} must be {"non-negative" if allow_zero else "positive"}, got '
                   f'{value!r}; set --config.{key}=<number>.')

  positive('total_steps', 'batch_size', 'seq_len', 'optim.lr', 'optim.accum_steps',
           'log_every', 'ckpt_every', 'keep_ckpts', 'eval_batches')
  positive('optim.weight_decay', 'optim.grad_clip', 'optim.eps', 'schedule.warmup_steps',
           'z_loss', 'loss_chunk_size', 'eval_every', 'peak_flops', 'sample.max_new_tokens',
           'sample.temperature', 'sample.top_k', allow_zero=True)
  require(0 <= config.seed < 2**31, f'seed={config.seed} must be in [0, 2**31); pick another.')
  why = 'learned positions' if model.position == 'learned' else 'the longest sequence it is for'
  require(config.seq_len <= model.max_seq_len,
          f'seq_len={config.seq_len} exceeds model.max_seq_len={model.max_seq_len} ({why}); '
          'lower seq_len or raise model.max_seq_len.')
  if config.init_from:
    require(os.path.isdir(os.path.expanduser(config.init_from)),
             f'init_from={config.init_from!r} is not a directory; point it at a flaxllm workdir, '
             "model directory or Hugging Face directory, or set it to ''.")
  try:  # each section's owner checks it
    optim.check_sections(config)
    pipeline.check_section(config.data, config.tokenizer)
    tokenizer_lib.check_section(config.tokenizer, model.vocab_size)
    mesh_lib.check_section(config.mesh)
    axis_rules.check_section(config.parallel)
    metrics.check_wandb_section(config.wandb)
    objectives.check_config(config)
  except ValueError as e:
    raise e if isinstance(e, ConfigError) else ConfigError(str(e)) from e
  return config


def _get(config: ConfigDict, key: str) -> Any:
  node = config
  for name in key.split('.'):
    node = node[name]
  return node


# ----------------------------------------------------------------------------- stored configs

def to_json(config: ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=repr) + '\n'


def from_json(text: str) -> ConfigDict:
  """The ConfigDict of a stored config.json (tuples come back as lists, compared as lists).
  Keys added to base_config after the run was stored (e.g. `objective`, a new section) take
  their defaults, so older workdirs still resume and evaluate; a run stored before
  `objective` existed that distilled is an `objective='distill'` run, one stored before
  `data.interleave` read one document at a time (interleave 1)."""
  stored = json.loads(text)
  if isinstance(stored.get('data'), dict) and 'interleave' not in stored['data']:
    stored['data']['interleave'] = 1  # stored before data.interleave: one document at a time
  if 'objective' not in stored and (stored.get('distill', {}).get('teacher') or
                                    stored.get('distill', {}).get('offline_logits')):
    stored['objective'] = 'distill'
  return ConfigDict(_with_defaults(stored, base_config().to_dict()))


def _with_defaults(stored: dict, defaults: dict) -> dict:
  out = dict(stored)
  for key, value in defaults.items():
    if key not in out:
      out[key] = value
    elif isinstance(value, dict) and isinstance(out[key], dict) and key != 'rope_scaling':
      out[key] = _with_defaults(out[key], value)
  return out


def stored_config(workdir: str) -> ConfigDict | None:
  """The config a workdir was trained with (its config.json), or None."""
  path = os.path.join(workdir, rundir.CONFIG_FILE)
  return from_json(json.dumps(rundir.read_json(path))) if os.path.exists(path) else None


def _norm(value: Any) -> Any:
  if isinstance(value, (tuple, list)):
    return [_norm(v) for v in value]
  if isinstance(value, (ConfigDict, dict)):
    return {k: _norm(v) for k, v in dict(value).items()}
  return value


def check_resume_compatible(stored: ConfigDict, new: ConfigDict, workdir: str):
  """Raises a ConfigError if `new` differs from the workdir's config in an unsafe key."""
  old = dict(flat_items(stored))
  cur = dict(flat_items(new))
  for key in sorted(set(old) | set(cur)):
    if any(key == s or (s.endswith('.') and key.startswith(s)) for s in SAFE_TO_CHANGE):
      continue
    if _norm(old.get(key)) != _norm(cur.get(key)):
      raise ConfigError(
          f'{key} is {cur.get(key)!r} but the run in {workdir} was started with '
          f'{old.get(key)!r}; resume with the same value or use a new --workdir.')
