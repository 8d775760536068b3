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
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import math
import os
import re
from typing import Any, Iterable, Sequence

import ml_collections
from ml_collections import ConfigDict

from flaxllm.models.config import ConfigError, ModelConfig

__all__ = ['ConfigError', 'ConfigDict', 'parse_arg', 'load_file', 'apply_overrides',
           'load_config', 'validate', 'base_config', 'to_json', 'from_json',
           'check_resume_compatible', 'SAFE_TO_CHANGE', 'flat_items']

# Names the trainer accepts for its pluggable components (see flaxllm/train/optim.py).
OPTIMIZERS = ('adamw', 'adam', 'sgd', 'lion')
SCHEDULES = ('cosine', 'linear', 'constant', 'rsqrt')
DATA_SOURCES = ('stdlib', 'text', 'tfds', 'jsonl')
FINETUNE_METHODS = ('full', 'freeze', 'lora', 'qlora')

# Keys that may differ between the stored config.json of a workdir and a resumed run. Everything
# else (model, data, tokenizer, optimizer, batch, seeds) must match, or the run would silently
# become a different experiment. Entries ending in '.' are prefixes.
SAFE_TO_CHANGE = ('total_steps', 'log_every', 'eval_every', 'eval_batches', 'ckpt_every',
                  'keep_ckpts', 'peak_flops', 'progress_bar', 'wandb.', 'sample.',
                  'skip_nonfinite_steps', 'model.attention_impl', 'model.remat',
                  'data.read_threads', 'data.data_dir', 'note', 'mesh.', 'parallel.')


# ----------------------------------------------------------------------------- the base config

def base_config() -> ConfigDict:
  """Every key the trainer reads, with defaults; config files start from this and change it."""
  c = ConfigDict()
  c.seed = 0                       # parameter init, data order and dropout all derive from it
  c.note = ''                      # free text, shown in W&B
  c.total_steps = 1000
  c.batch_size = 32                # global batch, in sequences
  c.seq_len = 256
  c.init_from = ''                 # '' | a flaxllm workdir/checkpoint dir to start params from

  # Devices: a mesh over all devices (flaxllm.parallel.make_mesh); one in-slice axis may be -1
  # (the remaining devices). The dcn_* factors split multi-slice TPU pods across slices.
  c.mesh = ConfigDict({'data': 1, 'fsdp': -1, 'tensor': 1, 'dcn_data': 1, 'dcn_fsdp': 1})
  c.parallel = ConfigDict()
  c.parallel.rules = 'fsdp'        # logical-axis rules: 'fsdp' | 'dp' | 'fsdp_tp' (parallel.rules)

  c.model = ConfigDict(ModelConfig().to_dict())
  c.model.num_kv_heads = ml_collections.config_dict.placeholder(int)
  c.model.num_encoder_layers = ml_collections.config_dict.placeholder(int)
  c.model.head_dim = ml_collections.config_dict.placeholder(int)
  c.model.sliding_window = ml_collections.config_dict.placeholder(int)
  c.model.rope_scaling = ml_collections.config_dict.placeholder(dict)

  c.data = ConfigDict()            # read by flaxllm.data.make_iterator
  c.data.source = 'stdlib'         # 'stdlib' (embedded default) | 'text' (data.path) | 'tfds'
  c.data.path = ''                 # text: directory, file or glob
  c.data.glob = ml_collections.config_dict.placeholder(str)
  c.data.name = ''                 # tfds: dataset name, e.g. 'lm1b'
  c.data.data_dir = ml_collections.config_dict.placeholder(str)
  c.data.train_split = 'train'     # tfds split names
  c.data.validation_split = 'validation'
  c.data.text_key = 'text'
  c.data.format = 'text'           # how a record becomes a document (data.DOCUMENT_FORMATS)
  c.data.template = ''             # alpaca/chat prompt template ('' = the format's default)
  c.data.val_fraction = 0.02       # stdlib/text: share of files held out for validation
  c.data.max_files = 0             # 0 = no limit
  c.data.max_bytes = 0
  c.data.shuffle = True            # seeded global shuffle of the train split, every epoch
  c.data.shuffle_window = 1024     # then shuffle packed rows within windows of this many rows
  c.data.packing = 'concat'        # 'concat' (no padding) | 'first_fit' (whole pieces)
  c.data.packing_bins = 16
  c.data.worker_count = 0          # grain worker processes for tokenization (0 = in-process)
  c.data.read_threads = 0
  # How processes share the global batch: 'source' (each reads its own share of the documents;
  # scales to pods) | 'global' (each builds the whole global batch and keeps its rows: the same
  # data, hence the same losses, on any number of processes).
  c.data.process_sharding = 'source'

  c.tokenizer = ConfigDict()       # read by flaxllm.data.get_tokenizer
  c.tokenizer.kind = 'sentencepiece'   # 'sentencepiece' (trained on the corpus) | 'bytes'
  c.tokenizer.model_path = ''      # an existing tokenizer.model; '' = train one on the corpus
  c.tokenizer.vocab_size = 4096    # sentencepiece training; <= model.vocab_size
  c.tokenizer.model_type = 'bpe'   # 'bpe' | 'unigram'
  c.tokenizer.character_coverage = 0.9995
  c.tokenizer.split_digits = True
  c.tokenizer.split_by_whitespace = True
  c.tokenizer.max_train_bytes = 0  # 0 = the whole train split

  c.optim = ConfigDict()
  c.optim.name = 'adamw'
  c.optim.lr = 1e-3                # peak learning rate
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.1
  # Regexes over `/`-joined param paths (re.search): matching params get NO weight decay.
  c.optim.wd_exclude = (r'norm/', r'bias$', r'embedding$')
  c.optim.grad_clip = 1.0          # global-norm clipping; 0 = off
  c.optim.accum_steps = 1          # micro-batches per step (lax.scan; per-token normalisation)

  c.schedule = ConfigDict()
  c.schedule.name = 'cosine'       # after warmup: 'cosine' | 'linear' | 'constant' | 'rsqrt'
  c.schedule.warmup_steps = 100
  c.schedule.end_lr_frac = 0.1     # cosine/linear: final lr = lr * end_lr_frac

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

  c.wandb = ConfigDict()
  c.wandb.enabled = True
  c.wandb.mode = ''                # '' = $WANDB_MODE, else 'offline' without $WANDB_API_KEY
  c.wandb.project = 'flaxllm'
  c.wandb.group = ''
  c.wandb.name = ''

  c.sample = ConfigDict()          # printed after training (max_new_tokens=0: no sample)
  c.sample.prompt = 'def '
  c.sample.max_new_tokens = 64
  c.sample.temperature = 0.8
  c.sample.top_k = 40
  c.sample.seed = 0

  c.distill = ConfigDict()         # knowledge distillation (flaxllm.distill); off while teacher
  c.distill.teacher = ''           # and offline_logits are '': a flaxllm workdir, a model dir
  #                                  (flaxllm convert / <workdir>/model) or a Hugging Face dir
  c.distill.teacher_dtype = ''     # '' = the teacher's own model.dtype
  c.distill.alpha = 0.5            # loss = alpha * KD + (1 - alpha) * CE
  c.distill.temperature = 2.0      # softmax temperature of both models; KD is scaled by T^2
  c.distill.divergence = 'forward_kl'  # 'forward_kl' | 'reverse_kl' | 'jsd'
  c.distill.beta = 0.5             # jsd mixture weight; 0 = forward KL, 1 = reverse KL (TRL)
  c.distill.top_k = 0              # > 0: only the teacher's top-k logits (renormalised)
  c.distill.chunk_size = 128       # sequence positions per logits chunk; 0 = all at once
  c.distill.hidden_loss = ''       # '' | 'cosine' | 'mse' between final hidden states
  c.distill.hidden_weight = 0.0    # its weight (a learned projection when widths differ)
  c.distill.init_every = 0         # > 0: student layer i starts as teacher layer i * init_every
  c.distill.on_policy = 0.0        # GKD lambda: fraction of steps on student-generated batches
  c.distill.on_policy_prompt_len = 16   # data tokens kept as the prompt of those samples
  c.distill.on_policy_temperature = 1.0
  c.distill.offline_logits = ''    # a `flaxllm distill-data --mode=topk` dir: no teacher forward

  c.finetune = ConfigDict()        # what is trained (flaxllm.peft.finetune), from init_from
  c.finetune.method = 'full'       # 'full' | 'freeze' | 'lora' | 'qlora'
  c.finetune.train = ()            # freeze: regexes of the params that train (the rest frozen)
  c.finetune.targets = ('all-linear',)  # lora/qlora: regexes of adapted kernels, or 'all-linear'
  c.finetune.rank = 8
  c.finetune.alpha = 16.0          # scale = alpha / rank (alpha / sqrt(rank) with rslora)
  c.finetune.rslora = False
  c.finetune.dropout = 0.0         # on the adapters' input
  c.finetune.init = 'kaiming'      # 'kaiming' (B = 0, as PEFT) | 'gaussian' | 'pissa'
  c.finetune.quant = 'nf4'         # qlora: base kernels as 'nf4' | 'int8'
  c.finetune.quant_targets = ('all-linear',)
  c.finetune.quant_block = 64
  c.finetune.double_quant = True   # nf4: absmax values in 8 bits too
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

def _require(ok: bool, message: str):
  if not ok:
    raise ConfigError(message)


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
      _require(ok, f'{key} must be {"non-negative" if allow_zero else "positive"}, got '
                   f'{value!r}; set --config.{key}=<number>.')

  positive('total_steps', 'batch_size', 'seq_len', 'optim.lr', 'optim.accum_steps',
           'log_every', 'ckpt_every', 'keep_ckpts', 'eval_batches')
  positive('optim.weight_decay', 'optim.grad_clip', 'optim.eps', 'schedule.warmup_steps',
           'z_loss', 'loss_chunk_size', 'eval_every', 'peak_flops', 'data.max_files', 'data.max_bytes',
           'data.worker_count', 'data.read_threads', 'sample.max_new_tokens',
           'sample.temperature', 'sample.top_k', allow_zero=True)
  _require(config.optim.name in OPTIMIZERS,
           f'optim.name={config.optim.name!r} is not a known optimizer; choose one of '
           f'{OPTIMIZERS}.')
  _require(config.schedule.name in SCHEDULES,
           f'schedule.name={config.schedule.name!r} is not a known schedule; choose one of '
           f'{SCHEDULES}.')
  _require(0.0 <= config.optim.b1 < 1.0 and 0.0 <= config.optim.b2 < 1.0,
           f'optim.b1={config.optim.b1} and optim.b2={config.optim.b2} must be in [0, 1); '
           'use e.g. 0.9 and 0.95.')
  _require(0.0 <= config.schedule.end_lr_frac <= 1.0,
           f'schedule.end_lr_frac={config.schedule.end_lr_frac} must be in [0, 1]; use e.g. 0.1.')
  _require(config.schedule.warmup_steps <= config.total_steps,
           f'schedule.warmup_steps={config.schedule.warmup_steps} exceeds total_steps='
           f'{config.total_steps}; lower the warmup or raise total_steps.')
  for pattern in config.optim.wd_exclude:
    try:
      re.compile(pattern)
    except re.error as e:
      raise ConfigError(f'optim.wd_exclude pattern {pattern!r} is not a valid regex ({e}); '
                        'fix or remove it.') from e
  accum = config.optim.accum_steps
  _require(config.batch_size % accum == 0,
           f'batch_size={config.batch_size} is not divisible by optim.accum_steps={accum}; '
           'make batch_size a multiple of accum_steps.')
  _require(model.arch == 'decoder',
           f"model.arch={model.arch!r} cannot be trained as a language model here; use "
           "model.arch='decoder'.")
  if model.position == 'learned':
    _require(config.seq_len <= model.max_seq_len,
             f'seq_len={config.seq_len} exceeds model.max_seq_len={model.max_seq_len} (learned '
             'positions); lower seq_len or raise model.max_seq_len.')
  _require(config.data.source in DATA_SOURCES,
           f'data.source={config.data.source!r} is not known; choose one of {DATA_SOURCES}.')
  if config.data.source == 'text':
    _require(bool(config.data.path), "data.source='text' needs data.path; set "
                                     '--config.data.path=/path/to/text/files.')
  if config.data.source == 'jsonl':
    _require(bool(config.data.path), "data.source='jsonl' needs data.path; set "
                                     '--config.data.path=/path/to/instructions.jsonl.')
    _require(config.tokenizer.kind == 'bytes' or bool(config.tokenizer.model_path),
             "data.source='jsonl' (instruction data) needs the base model's tokenizer; set "
             '--config.tokenizer.model_path=<base workdir>/tokenizer.model.')
  if config.data.source == 'tfds':
    _require(bool(config.data.name), "data.source='tfds' needs data.name; set e.g. "
                                     '--config.data.name=lm1b.')
  _require(config.data.packing in ('concat', 'first_fit'),
           f"data.packing={config.data.packing!r} is not known; use 'concat' or 'first_fit'.")
  _require(0 <= config.seed < 2**31, f'seed={config.seed} must be in [0, 2**31); pick another.')
  _require(0.0 <= config.data.val_fraction < 1.0,
           f'data.val_fraction={config.data.val_fraction} must be in [0, 1); use e.g. 0.02.')
  _require(config.tokenizer.kind in ('sentencepiece', 'bytes'),
           f"tokenizer.kind={config.tokenizer.kind!r} is not known; use 'sentencepiece' or "
           "'bytes'.")
  if config.tokenizer.kind == 'sentencepiece' and not config.tokenizer.model_path:
    _require(0 < config.tokenizer.vocab_size <= model.vocab_size,
             f'tokenizer.vocab_size={config.tokenizer.vocab_size} does not fit model.vocab_size='
             f'{model.vocab_size}; set tokenizer.vocab_size <= model.vocab_size.')
  if config.init_from:
    _require(os.path.isdir(config.init_from),
             f'init_from={config.init_from!r} is not a directory; point it at a flaxllm workdir '
             "or set it to ''.")
  for axis, size in config.mesh.items():
    _require(isinstance(size, int) and not isinstance(size, bool) and (size >= 1 or size == -1),
             f'mesh.{axis}={size!r} must be a positive integer or -1 (the remaining devices); '
             f'set e.g. --config.mesh.{axis}=1.')
  from flaxllm.parallel.rules import PRESETS  # pylint: disable=import-outside-toplevel
  _require(config.parallel.rules in PRESETS,
           f'parallel.rules={config.parallel.rules!r} is not a rule preset; choose one of '
           f'{sorted(PRESETS)}.')
  _require(config.data.process_sharding in ('source', 'global'),
           f"data.process_sharding={config.data.process_sharding!r} is not known; use 'source' "
           "or 'global'.")
  _require(config.wandb.mode in ('', 'online', 'offline', 'disabled'),
           f"wandb.mode={config.wandb.mode!r} is not known; use '', 'online', 'offline' or "
           "'disabled'.")
  _validate_distill(config.distill, model)
  _validate_finetune(config.finetune)
  return config


def _validate_finetune(f: ConfigDict):
  """config.finetune (flaxllm.peft); rules are checked against the model's params when the
  trainer builds its programs (a rule matching nothing is a one-sentence error there)."""
  _require(f.method in FINETUNE_METHODS, f'finetune.method={f.method!r} is not known; choose '
                                         f'one of {FINETUNE_METHODS}.')
  if f.method == 'freeze':
    _require(len(f.train) > 0, "finetune.method='freeze' needs finetune.train, the regexes of "
                               "the params to train, e.g. --config.finetune.train='final_norm/'.")
  for key in ('train', 'targets', 'quant_targets'):
    for pattern in f[key]:
      if pattern == 'all-linear':
        continue
      try:
        re.compile(pattern)
      except re.error as e:
        raise ConfigError(f'finetune.{key} pattern {pattern!r} is not a valid regex ({e}); fix '
                          'or remove it.') from e
  _require(isinstance(f.rank, int) and f.rank >= 1,
           f'finetune.rank={f.rank!r} must be a positive integer; use e.g. 8.')
  _require(f.alpha > 0, f'finetune.alpha={f.alpha} must be positive; use e.g. 16.')
  _require(0.0 <= f.dropout < 1.0, f'finetune.dropout={f.dropout} must be in [0, 1).')
  _require(f.init in ('kaiming', 'gaussian', 'pissa'),
           f"finetune.init={f.init!r} is not known; use 'kaiming', 'gaussian' or 'pissa'.")
  _require(f.quant in ('nf4', 'int8'), f"finetune.quant={f.quant!r} is not known; use 'nf4' or "
                                       "'int8'.")
  _require(f.quant_block >= 2 and f.quant_block % 2 == 0,
           f'finetune.quant_block={f.quant_block} must be an even number >= 2; use e.g. 64.')


def _validate_distill(d: ConfigDict, model: ModelConfig):
  """config.distill (flaxllm.distill); the teacher itself is checked against the student (vocab,
  tokenizer) by the trainer once the tokenizer exists, still before compiling."""
  if not d.teacher and not d.offline_logits:
    return
  from flaxllm.distill.losses import DIVERGENCES  # pylint: disable=import-outside-toplevel
  for key, path in (('teacher', d.teacher), ('offline_logits', d.offline_logits)):
    _require(not path or os.path.isdir(os.path.expanduser(path)),
             f'distill.{key}={path!r} does not exist; train or generate it first, or set '
             f"distill.{key}=''.")
  _require(0.0 <= d.alpha <= 1.0, f'distill.alpha={d.alpha} must be in [0, 1] (loss = alpha * KD '
                                  '+ (1 - alpha) * CE); use e.g. 0.5.')
  _require(d.temperature > 0, f'distill.temperature={d.temperature} must be positive; use e.g. 2.')
  _require(d.divergence in DIVERGENCES, f'distill.divergence={d.divergence!r} is not known; '
                                        f'choose one of {DIVERGENCES}.')
  _require(0.0 <= d.beta <= 1.0, f'distill.beta={d.beta} must be in [0, 1]; use e.g. 0.5.')
  _require(0 <= d.top_k <= model.vocab_size,
           f'distill.top_k={d.top_k} must be between 0 (full distribution) and the vocabulary '
           f'size {model.vocab_size}; lower it.')
  reverse = d.divergence == 'reverse_kl' or (d.divergence == 'jsd' and d.beta == 1.0)
  _require(not (reverse and (d.top_k or d.offline_logits)),
           'reverse KL needs the full teacher distribution (it is infinite where a top-k teacher '
           "has no mass); use distill.divergence='forward_kl' or 'jsd' with beta < 1.")
  _require(d.chunk_size >= 0 and d.init_every >= 0 and d.hidden_weight >= 0,
           'distill.chunk_size, distill.init_every and distill.hidden_weight must be >= 0.')
  _require(d.hidden_loss in ('', 'cosine', 'mse'),
           f"distill.hidden_loss={d.hidden_loss!r} is not known; use '', 'cosine' or 'mse'.")
  _require(0.0 <= d.on_policy <= 1.0 and d.on_policy_prompt_len >= 1,
           f'distill.on_policy={d.on_policy} must be in [0, 1] and on_policy_prompt_len >= 1.')
  if d.offline_logits:
    _require(not d.hidden_loss and not d.on_policy,
             'offline teacher logits cannot give hidden states or score new samples; set '
             "distill.hidden_loss='' and distill.on_policy=0, or use the live teacher.")


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
  Groups of settings added to base_config after the run was stored (e.g. `distill`) take their
  defaults, so older workdirs still resume and evaluate."""
  stored = json.loads(text)
  for key, value in base_config().items():
    if key not in stored and isinstance(value, ConfigDict):
      stored[key] = value.to_dict()
  return ConfigDict(stored)


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
