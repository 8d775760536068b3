"""The run directory and model directories: the one owner of their layout.

A run directory (`flaxllm train --workdir=W`):

    W/config.json            the validated experiment config (CONFIG_FILE)
    W/tokenizer.model        the run's sentencepiece model (TOKENIZER_FILE), or
    W/tokenizer.json         {'kind': 'bytes', ...}: which tokenizer the run uses (TOKENIZER_INFO)
    W/source_tokenizer.*     the same for the source side of a sequence-to-sequence run with
                             separate vocabularies (stem SOURCE_TOKENIZER)
    W/checkpoints/<step>/    orbax: `state` (the TrainState) + `data` (iterator state)
    W/checkpoints_corrupt/   checkpoints that could not be read, moved aside, never deleted
    W/metrics.jsonl, W/loss_curve.png, W/wandb_id.txt     (flaxllm.train.metrics)
    W/model/                 the exported model: a flaxllm model directory + tokenizer
    W/adapter/               a LoRA run's adapter in Hugging Face PEFT format

A flaxllm model directory (`flaxllm convert --to=D`, or W/model): model_config.json + params/
(`flaxllm.interop.native`), tokenizer.model if any. A Hugging Face directory: config.json with
`model_type` + safetensors (`flaxllm.interop.hf`).

    source = model_source(path, what='init_from')   # any of the three, read without arrays
    params = load_params(path, abstract_params)     # placed like `abstract` (with shardings)

`init_from`, distillation teachers, `flaxllm generate` and `flaxllm eval` all load through here.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from flaxllm import models
from flaxllm.data import tokenizer as tokenizer_lib
from flaxllm.interop import hf, native
from flaxllm.models.config import ConfigError, ModelConfig

log = logging.getLogger(__name__)

CONFIG_FILE = 'config.json'
TOKENIZER = 'tokenizer'                  # file stem of the run's tokenizer
SOURCE_TOKENIZER = 'source_tokenizer'    # ... and of a seq2seq run's source-side tokenizer
TOKENIZER_FILE = f'{TOKENIZER}.model'
TOKENIZER_INFO = f'{TOKENIZER}.json'
CHECKPOINT_DIR = 'checkpoints'
CORRUPT_DIR = 'checkpoints_corrupt'
METRICS_FILE = 'metrics.jsonl'
LOSS_CURVE = 'loss_curve.png'
WANDB_ID_FILE = 'wandb_id.txt'
MODEL_DIR = 'model'
ADAPTER_DIR = 'adapter'
MODEL_KEY = 'model'   # the model's part of a train state's (objective-namespaced) params

KINDS = ('workdir', 'flaxllm_model', 'hf')


class RunDirError(ConfigError):
  """A run or model directory that cannot be used; the message names the setting that points
  at it and the fix."""


def write_atomic(path: str, data: bytes | str):
  """Writes `data` to `path` through a temporary file and a rename (never half a file)."""
  mode = 'wb' if isinstance(data, bytes) else 'w'
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, mode) as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


# ----------------------------------------------------------------------------- the workdir

def prepare_workdir(workdir: str) -> str:
  """Creates `workdir` and checks that it is writable; returns its absolute path."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f'.write_test{os.getpid()}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise RunDirError(f'workdir {workdir} is not writable ({e.strerror or e}); choose a '
                      'writable --workdir.') from e
  return workdir


def stored_config_json(workdir: str) -> Optional[str]:
  """The text of `workdir`'s config.json, or None when it has none."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return f.read()


def save_config_json(workdir: str, text: str):
  write_atomic(os.path.join(workdir, CONFIG_FILE), text)


def run_tokenizer(workdir: str, tokenizer_cfg, corpus, reuse: bool = True,
                  stem: str = TOKENIZER) -> tokenizer_lib.Tokenizer:
  """The run's tokenizer `stem`: with `reuse`, the copy in `workdir` if there is one; else
  built from `tokenizer_cfg` (sentencepiece models are trained on `corpus`, a data config or
  texts, or loaded from tokenizer.model_path) and copied into `workdir` so that eval and
  generation use the same."""
  if reuse:
    found = load_tokenizer(workdir, stem)
    if found is not None:
      return found
  tokenizer = tokenizer_lib.get_tokenizer(tokenizer_cfg, corpus=corpus)
  path = os.path.join(workdir, f'{stem}.model')
  info = {'kind': tokenizer_cfg.kind, 'vocab_size': tokenizer.vocab_size,
          'bos_id': tokenizer.bos_id, 'eos_id': tokenizer.eos_id, 'pad_id': tokenizer.pad_id}
  if isinstance(tokenizer, tokenizer_lib.SentencePieceTokenizer):
    write_atomic(path, tokenizer.model_proto)
    info['source'] = tokenizer.path
    tokenizer = tokenizer_lib.SentencePieceTokenizer.load(path)
  elif os.path.exists(path):  # a tokenizer of an earlier attempt without checkpoints
    os.remove(path)
  write_atomic(os.path.join(workdir, f'{stem}.json'), json.dumps(info, indent=2) + '\n')
  return tokenizer


def load_tokenizer(path: str, stem: str = TOKENIZER) -> Optional[tokenizer_lib.Tokenizer]:
  """The tokenizer `stem` stored in a workdir or model directory (<stem>.model, or a bytes
  tokenizer recorded in <stem>.json), or None."""
  spm = os.path.join(path, f'{stem}.model')
  if os.path.exists(spm):
    return tokenizer_lib.SentencePieceTokenizer.load(spm)
  if _tokenizer_info_kind(path, stem) == 'bytes':
    return tokenizer_lib.ByteTokenizer()
  return None


def _tokenizer_info_kind(path: str, stem: str = TOKENIZER) -> Optional[str]:
  info = os.path.join(path, f'{stem}.json')
  if not os.path.exists(info):
    return None
  try:
    return read_json(info).get('kind')
  except (OSError, ValueError, AttributeError):
    return None  # e.g. a Hugging Face tokenizer.json (another format)


def tokenizer_fingerprint(path: str) -> Optional[tuple]:
  """('sentencepiece', sha256) | ('bytes',) of the tokenizer stored in `path`, or None."""
  spm = os.path.join(path, TOKENIZER_FILE)
  if os.path.exists(spm):
    with open(spm, 'rb') as f:
      return ('sentencepiece', hashlib.sha256(f.read()).hexdigest())
  return ('bytes',) if _tokenizer_info_kind(path) == 'bytes' else None


def export_model(workdir: str, model_cfg, params, tokenizer_source: bool = True) -> str:
  """`<workdir>/model/`: the final params in the `flaxllm convert` layout plus the tokenizer
  files, for `flaxllm generate --model=<workdir>/model`. Every process calls it (each writes
  its shards); the one with `tokenizer_source` copies the tokenizer."""
  path = os.path.join(workdir, MODEL_DIR)
  native.save_flaxllm(model_cfg, params, path)
  for name in (f'{stem}{ext}' for stem in (TOKENIZER, SOURCE_TOKENIZER)
               for ext in ('.model', '.json')):
    src = os.path.join(workdir, name)
    if tokenizer_source and os.path.exists(src):
      with open(src, 'rb') as f:
        write_atomic(os.path.join(path, name), f.read())
  return path


def has_exported_model(workdir: str) -> bool:
  return os.path.exists(os.path.join(workdir, MODEL_DIR, native.CONFIG_NAME))


# ----------------------------------------------------------------------------- checkpoints

class Checkpoints:
  """Save / restore (state, data iterator state) pairs of one workdir.

  Saves are asynchronous (training continues while arrays are written) and atomic: orbax writes
  to a temporary directory and renames it when complete, so a crash mid-save leaves the
  previous checkpoints untouched. A latest checkpoint that cannot be read is moved aside to
  `<workdir>/checkpoints_corrupt/` (never deleted) and the previous one is used; a checkpoint
  whose structure does not match the run (another model or objective) is an error, and
  nothing is moved.
  """

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, CHECKPOINT_DIR)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'data': ocp.JsonCheckpointHandler()})

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict) -> None:
    """Starts an asynchronous save of `state` and `data_state` at `step` (a no-op if a
    checkpoint of this step exists)."""
    if step in self.manager.all_steps():
      return
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    data=ocp.args.JsonSave(data_state)),
                      force=True)

  def check_structure(self, step: int, abstract_state: Any):
    """RunDirError when checkpoint `step` holds another tree than `abstract_state` (names and
    shapes), read from its metadata only; an unreadable metadata is left to `restore`."""
    try:
      stored = self.manager.item_metadata(step)['state']
    except Exception:  # pylint: disable=broad-except -- unreadable: corruption, see restore
      return
    stored = getattr(stored, 'tree', stored)
    if not stored:
      return
    mine, theirs = _shape_signature(abstract_state), _shape_signature(stored)
    if mine != theirs:
      raise RunDirError(
          f'checkpoint {step} in {self.directory} holds a different train state than this run '
          f'({_first_difference(mine, theirs)}): another model, objective or fine-tuning '
          'method, or an older flaxllm; resume with the settings it was trained with, or use '
          'a new --workdir.')

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """(state, data_state) of `step`; `abstract_state` gives shapes, dtypes and shardings."""
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return out.state, out.data

  def restore_latest(self, abstract_state: Any) -> Optional[tuple[int, Any, dict]]:
    """(step, state, data_state) of the newest readable checkpoint, or None if there is none.

    A checkpoint that fails to restore is moved to `checkpoints_corrupt/` with a warning and
    the next older one is tried; one of another structure raises RunDirError (nothing moved).
    """
    for step in reversed(self.steps()):
      self.check_structure(step, abstract_state)
      try:
        state, data_state = self.restore(step, abstract_state)
        return step, state, data_state
      except Exception as e:  # orbax/tensorstore raise many types.  pylint: disable=broad-except
        moved = self._move_aside(step)
        log.warning('Checkpoint %d in %s cannot be restored (%s: %s); moved it to %s and '
                    'falling back to the previous checkpoint.', step, self.directory,
                    type(e).__name__, str(e).splitlines()[0][:200] if str(e) else '', moved)
    return None

  def _move_aside(self, step: int) -> str:
    src = os.path.join(self.directory, str(step))
    dst_root = os.path.join(self.workdir, CORRUPT_DIR)
    os.makedirs(dst_root, exist_ok=True)
    dst = os.path.join(dst_root, f'{step}-{time.strftime("%Y%m%d-%H%M%S")}')
    if jax.process_index() == 0 and os.path.exists(src):
      shutil.move(src, dst)
    self.manager.reload()
    return dst

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _shape_signature(tree) -> dict:
  """{'/'-joined path: shape} of a tree of arrays / ShapeDtypeStructs / orbax metadata."""
  flat = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: hasattr(x, 'shape') and not isinstance(x, dict))[0]
  out = {}
  for path, leaf in flat:
    key = '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))))
                   for k in path)
    out[key] = tuple(getattr(leaf, 'shape', None) or ())
  return out


def _first_difference(mine: dict, theirs: dict) -> str:
  for key in sorted(set(mine) | set(theirs), key=lambda k: (not k.startswith('params'), k)):
    if key not in theirs:
      return f'it has no {key}'
    if key not in mine:
      return f'it has {key}, which this run does not'
    if mine[key] != theirs[key]:
      return f'{key} is {theirs[key]} there, {mine[key]} here'
  return 'same names and shapes'


# ----------------------------------------------------------------------------- model sources

@dataclasses.dataclass(frozen=True)
class ModelSource:
  """A model to load, resolved without reading any array."""
  path: str
  kind: str                    # one of KINDS
  model_cfg: ModelConfig
  tokenizer: Optional[tuple]   # tokenizer_fingerprint of its directory (None: unknown)


def model_source(path: str, *, what: str = '--model', dtype: str = '') -> ModelSource:
  """The ModelSource of `path`: a flaxllm workdir (config.json with a `model` section; its
  newest checkpoint), a flaxllm model directory or a Hugging Face directory. `what` names the
  setting in error messages; `dtype` overrides the model's compute dtype."""
  if not path:
    raise RunDirError(f'{what} is empty; point it at a flaxllm workdir or model directory.')
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise RunDirError(f'{what}={path!r} does not exist; train it first or point {what} at a '
                      'flaxllm workdir, a flaxllm model directory or a Hugging Face directory.')
  overrides = {'dtype': dtype} if dtype else {}
  cfg_json = os.path.join(path, CONFIG_FILE)
  stored = read_json(cfg_json) if os.path.exists(cfg_json) else None
  if os.path.isdir(os.path.join(path, CHECKPOINT_DIR)) or (stored and 'model' in stored):
    if stored is None:
      raise RunDirError(f'the workdir {what}={path!r} has no {CONFIG_FILE}; point {what} at a '
                        'complete flaxllm workdir.')
    if not checkpoint_steps(path):
      raise RunDirError(f'the workdir {what}={path!r} has no checkpoint; train it first (flaxllm '
                        f'train --workdir={path}) or point {what} at another run.')
    model = {**stored['model'], **overrides, 'remat': 'none'}
    return ModelSource(path, 'workdir', ModelConfig.from_dict(model), tokenizer_fingerprint(path))
  if os.path.exists(os.path.join(path, native.CONFIG_NAME)):
    model = {**read_json(os.path.join(path, native.CONFIG_NAME)), **overrides}
    return ModelSource(path, 'flaxllm_model', ModelConfig.from_dict(model),
                       tokenizer_fingerprint(path))
  if stored is not None:
    return ModelSource(path, 'hf', hf.config_from_hf(hf.read_hf_config(path), **overrides),
                       tokenizer_fingerprint(path))
  raise RunDirError(f'{what}={path!r} is neither a flaxllm workdir (config.json + '
                    'checkpoints/), a flaxllm model directory (model_config.json) nor a Hugging '
                    f'Face checkpoint (config.json); point {what} at one of those.')


def checkpoint_steps(workdir: str) -> list[int]:
  """The steps of the finished checkpoints in `workdir` (from the directory names)."""
  directory = os.path.join(workdir, CHECKPOINT_DIR)
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def abstract_params(model_cfg: ModelConfig, sharding=None):
  """ShapeDtypeStructs of a model's params (with `sharding` on every leaf; default: the first
  device)."""
  model = models.build(model_cfg)
  shapes = jax.eval_shape(lambda: models.init_params(model, jax.random.PRNGKey(0)))
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      shapes)


def load_params(path: str, abstract: Any = None, *, what: str = '--model', dtype: str = ''):
  """The params of the model in `path` (see `model_source`), cast and placed like `abstract`
  (ShapeDtypeStructs with shardings; default: the source's own params on one device).

  A workdir gives the model params of its newest checkpoint (or, for a fine-tuning run whose
  checkpoints hold adapters, its exported `model/`). Shapes are compared before any array is
  read; a mismatch is one RunDirError naming `what`."""
  source = model_source(path, what=what, dtype=dtype)
  abstract = abstract_params(source.model_cfg) if abstract is None else abstract
  mismatch = RunDirError(f'the params in {what}={source.path!r} do not match the model config '
                         '(different shapes or names); use the same model settings as that run.')
  if source.kind == 'workdir':
    params = _workdir_params(source.path, abstract, mismatch)
  elif source.kind == 'flaxllm_model':
    params = native.load_flaxllm(source.path)[1]
  else:
    params = hf.load(source.path)[1]
  if _signature(params) != _signature(abstract):
    raise mismatch
  return jax.tree.map(lambda x, a: jax.device_put(jnp.asarray(x, a.dtype), a.sharding),
                      params, abstract)


def _signature(tree):
  return jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), tree)


def _workdir_params(path: str, abstract, mismatch: RunDirError):
  """The model params of the newest checkpoint of a workdir, else its exported model."""
  manager = ocp.CheckpointManager(
      os.path.join(path, CHECKPOINT_DIR),
      item_handlers={'state': ocp.PyTreeCheckpointHandler(), 'data': ocp.JsonCheckpointHandler()})
  try:
    step = manager.latest_step()
    stored = manager.item_metadata(step)['state'].tree.get('params', {})
    stored = stored.get(MODEL_KEY) if isinstance(stored, dict) else None
    if stored is not None and _signature(stored) == _signature(abstract):
      target = {'params': {MODEL_KEY: abstract}}  # only the model params of that run's state
      restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=True)))
      return restored.state['params'][MODEL_KEY]
  finally:
    manager.close()
  exported = os.path.join(path, MODEL_DIR)
  if os.path.exists(os.path.join(exported, native.CONFIG_NAME)):  # e.g. a LoRA run's model
    return native.load_flaxllm(exported)[1]
  raise mismatch
