"""The flaxllm model directory used by `flaxllm convert` (and a run's exported `<workdir>/model`):

    DIR/model_config.json     ModelConfig.to_dict()
    DIR/params/               the params pytree, saved with orbax StandardCheckpointer
    DIR/tokenizer.*           the run's tokenizer(s), copied in by `flaxllm.rundir.export_model`

Writing a model never mixes it with another and never deletes what flaxllm did not write: a
destination holding anything but a previous export of the same kind is refused unless
`overwrite` (`check_destination`), and the new model is written into a sibling directory that
is renamed into place once complete (`replacing`), so a failure half way leaves the old
destination intact. `flaxllm.interop.hf.save` writes Hugging Face directories the same way.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Callable, Iterator

import flax.linen as nn
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from flaxllm import models
from flaxllm.models import params as params_lib
from flaxllm.models.config import ConfigError, ModelConfig

CONFIG_NAME = 'model_config.json'
PARAMS_DIR = 'params'
# File stems of the tokenizers a model directory may hold next to its params: the model's, and
# a sequence-to-sequence model's source side (written by a training run; see flaxllm.rundir).
TOKENIZER_STEMS = ('tokenizer', 'source_tokenizer')
TOKENIZER_FILES = tuple(f'{stem}{ext}' for stem in TOKENIZER_STEMS for ext in ('.model', '.json'))
# Every name a flaxllm model directory may hold.
MODEL_FILES = frozenset({CONFIG_NAME, PARAMS_DIR, *TOKENIZER_FILES})


class ModelDirError(ValueError):
  """A model directory that cannot be read, or written as asked; the message says why."""


# ============================================================================ safe writing

def check_destination(path: str, is_previous_export: Callable[[str], bool], kind: str,
                      overwrite: bool) -> None:
  """Refuses `path` as the destination of a `kind` model unless it does not exist, is an empty
  directory, is a previous export of that kind (`is_previous_export(path)`: it holds only
  files flaxllm wrote, which the new model replaces) or `overwrite` is set."""
  if overwrite or not os.path.lexists(path):
    return
  if not os.path.isdir(path):
    held = 'is a file, not a directory'
  else:
    entries = sorted(os.listdir(path))
    if not entries or is_previous_export(path):
      return
    shown = ', '.join(entries[:3]) + (f' and {len(entries) - 3} more' if len(entries) > 3 else '')
    held = f'is not empty ({shown}) and is not a flaxllm {kind} export'
  raise ModelDirError(f'{path} {held}; choose a new or empty directory, or pass --overwrite '
                      '(overwrite=True) to replace it whole.')


def is_model_dir(path: str) -> bool:
  """Whether `path` is a flaxllm model directory holding nothing that flaxllm did not write."""
  return (os.path.isfile(os.path.join(path, CONFIG_NAME))
          and os.path.isdir(os.path.join(path, PARAMS_DIR))
          and set(os.listdir(path)) <= MODEL_FILES)


def staging_dir(path: str) -> str:
  """The sibling directory the new contents of `path` are written into before they replace
  it (named after `path`, so the same in every process)."""
  head, tail = os.path.split(path)
  return os.path.join(head, f'.{tail}.flaxllm-staging')


@contextlib.contextmanager
def replacing(path: str, main: bool = True) -> Iterator[str]:
  """`with replacing(path) as staging:` writes the new contents of `path` into the fresh
  directory `staging`; when the block completes they replace `path` whole (by renames: the old
  contents stay intact until the new ones are complete), and when it fails `path` is untouched
  and `staging` removed. Only the `main` process creates, renames and removes; in a
  multi-process write the others write into `staging` once main has created it."""
  staging = staging_dir(path)
  if main:
    _remove(staging)  # what an interrupted write left
    try:
      os.makedirs(staging)
    except PermissionError:
      raise PermissionError(f'cannot create {staging}: flaxllm writes a model next to its '
                            'destination and renames it into place, so make '
                            f'{os.path.dirname(path)} writable or choose another '
                            'destination.') from None
  try:
    yield staging
  except BaseException:
    if main:
      _remove(staging)
    raise
  if main:
    head, tail = os.path.split(path)
    old = os.path.join(head, f'.{tail}.flaxllm-old')
    _remove(old)
    if os.path.lexists(path):
      os.rename(path, old)
    os.rename(staging, path)
    _remove(old)


def _remove(path: str) -> None:
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path)
  elif os.path.lexists(path):
    os.remove(path)


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


# ============================================================================ save / load

def save_flaxllm(model_config, params, path: str, *, overwrite: bool = False) -> None:
  """Writes `model_config` and `params` as the flaxllm model directory `path`, replacing a
  previous one there (see `check_destination` for what else `path` may be). Every process
  calls it and writes its own shards."""
  cfg = ModelConfig.from_dict(model_config)
  params = nn.meta.unbox(params)
  if set(params) == {'params'}:
    params = params['params']
  path = os.path.realpath(os.fspath(path))
  # Every process checks (the same files), so all of them refuse before any writes.
  check_destination(path, is_model_dir, 'model', overwrite)
  main = jax.process_index() == 0
  with replacing(path, main) as staging:
    _sync(f'flaxllm_save_flaxllm:{staging}')  # main has created it
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.join(staging, PARAMS_DIR), params)
    ckpt.wait_until_finished()
    if main:
      with open(os.path.join(staging, CONFIG_NAME), 'w') as f:
        json.dump(cfg.to_dict(), f, indent=2, sort_keys=True)
  _sync(f'flaxllm_save_flaxllm:{path}')  # the new model is in place for every process


def read_json(path: str, error: type[Exception] = ModelDirError) -> dict:
  """The JSON object in the file `path`; a file that is not one raises `error` naming it."""
  try:
    with open(path, encoding='utf-8') as f:
      value = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise error(f'{path} is not valid JSON ({e}); replace it with the file the model came '
                'with.') from None
  if not isinstance(value, dict):
    raise error(f'{path} holds a JSON {type(value).__name__}, not an object; replace it with '
                'the file the model came with.')
  return value


def load_flaxllm(path: str):
  """(ModelConfig, params) from a directory written by `save_flaxllm`; the stored shapes are
  checked against the ones model_config.json gives before any array is read."""
  path = os.path.abspath(os.fspath(path))
  cfg_path = os.path.join(path, CONFIG_NAME)
  params_path = os.path.join(path, PARAMS_DIR)
  if not (os.path.isfile(cfg_path) and os.path.isdir(params_path)):
    raise FileNotFoundError(f'{path} is not a flaxllm model directory: it needs {CONFIG_NAME} '
                            f'and {PARAMS_DIR}/ (write one with flaxllm convert --to).')
  try:
    cfg = ModelConfig.from_dict(read_json(cfg_path))
  except (ConfigError, TypeError) as e:
    raise ModelDirError(f'{cfg_path} is not a valid model config ({e}); replace it with the '
                        'file the model was exported with.') from None
  ckpt = ocp.StandardCheckpointer()
  stored = ckpt.metadata(params_path).item_metadata
  if stored is None:
    raise ModelDirError(f'{params_path} has no readable orbax metadata; export or convert the '
                        'model again.')
  model = models.build(cfg)
  expected = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0)))
  _check_shapes(params_lib.flatten(stored.tree), params_lib.flatten(expected), params_path,
                cfg_path)
  try:
    params = ckpt.restore(params_path)
  except Exception as e:  # orbax / tensorstore raise a plain Exception for damaged array data
    raise ModelDirError(f'{params_path} holds damaged array data; export or convert the model '
                        'again.') from e
  return cfg, jax.tree.map(jax.numpy.asarray, params)


def _check_shapes(stored: dict, expected: dict, params_path: str, cfg_path: str) -> None:
  """A ModelDirError naming the first param whose presence or shape differs."""
  for name in sorted(set(stored) | set(expected)):
    have = tuple(stored[name].shape) if name in stored else 'missing'
    want = tuple(expected[name].shape) if name in expected else 'no such param'
    if have != want:
      raise ModelDirError(f'{params_path} does not match {cfg_path}: param {name!r} is {have} '
                          f'where the config gives {want}; export or convert the model again.')
