"""The flaxllm checkpoint directory used by `flaxllm convert`:

    DIR/model_config.json     ModelConfig.to_dict()
    DIR/params/               the params pytree, saved with orbax StandardCheckpointer
"""
from __future__ import annotations

import json
import os
import shutil

import flax.linen as nn
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from flaxllm.models.config import ModelConfig

CONFIG_NAME = 'model_config.json'
PARAMS_DIR = 'params'


def save_flaxllm(model_config, params, path: str) -> None:
  """Writes `model_config` and `params` to the directory `path` (replacing params/ there)."""
  cfg = ModelConfig.from_dict(model_config)
  params = nn.meta.unbox(params)
  if set(params) == {'params'}:
    params = params['params']
  path = os.path.abspath(os.fspath(path))
  target = os.path.join(path, PARAMS_DIR)
  main = jax.process_index() == 0  # every process calls this: each writes its own shards
  if main:
    os.makedirs(path, exist_ok=True)
    if os.path.exists(target):
      shutil.rmtree(target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f'flaxllm_save_flaxllm:{target}')
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(target, params)
  ckpt.wait_until_finished()
  if main:
    with open(os.path.join(path, CONFIG_NAME), 'w') as f:
      json.dump(cfg.to_dict(), f, indent=2, sort_keys=True)


def load_flaxllm(path: str):
  """(ModelConfig, params) from a directory written by `save_flaxllm`."""
  path = os.path.abspath(os.fspath(path))
  cfg_path = os.path.join(path, CONFIG_NAME)
  params_path = os.path.join(path, PARAMS_DIR)
  for p in (cfg_path, params_path):
    if not os.path.exists(p):
      raise FileNotFoundError(f'{p} does not exist; a flaxllm checkpoint directory has '
                              f'{CONFIG_NAME} and {PARAMS_DIR}/.')
  with open(cfg_path) as f:
    cfg = ModelConfig.from_dict(json.load(f))
  params = ocp.StandardCheckpointer().restore(params_path)
  return cfg, jax.tree.map(jax.numpy.asarray, params)
