"""The teacher: where it comes from, checks against the student, loading, and initialising a
student from it.

`config.distill.teacher` is one of
  * a flaxllm workdir (config.json + checkpoints/): the model section of its config.json and the
    params of its newest checkpoint; its tokenizer.model / tokenizer.json;
  * a flaxllm model directory (`flaxllm convert --to=DIR`, or a workdir's exported `model/`):
    model_config.json + params, tokenizer.model if present;
  * a Hugging Face checkpoint directory (config.json with `model_type` + safetensors), read by
    `flaxllm.interop.hf`; tokenizer.model if present (else only the vocabulary is compared).

`check_teacher` runs before anything compiles and raises a one-sentence ConfigError when the
teacher cannot teach this student: a missing path or checkpoint, a different vocabulary size,
or a different tokenizer (same size but other pieces, e.g. two separately trained
sentencepiece models). Logit distillation needs the SAME token ids on both sides.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from typing import Any, Optional

import jax
import jax.numpy as jnp

from flaxllm import models
from flaxllm.models import params as params_lib
from flaxllm.models.config import ConfigError, ModelConfig

TOKENIZER_FILE = 'tokenizer.model'
TOKENIZER_INFO = 'tokenizer.json'


@dataclasses.dataclass(frozen=True)
class TeacherSource:
  """What `config.distill.teacher` points at (read without loading any array)."""
  path: str
  kind: str                    # 'workdir' | 'flaxllm_model' | 'hf'
  model_cfg: ModelConfig
  tokenizer: Optional[tuple]   # ('sentencepiece', sha256) | ('bytes',) | None (unknown)


def _fingerprint_dir(path: str) -> Optional[tuple]:
  spm = os.path.join(path, TOKENIZER_FILE)
  if os.path.exists(spm):
    with open(spm, 'rb') as f:
      return ('sentencepiece', hashlib.sha256(f.read()).hexdigest())
  info = os.path.join(path, TOKENIZER_INFO)
  if os.path.exists(info):
    try:
      with open(info) as f:
        kind = json.load(f).get('kind')
    except (OSError, ValueError):
      kind = None
    if kind == 'bytes':
      return ('bytes',)
  return None


def tokenizer_fingerprint(tokenizer) -> Optional[tuple]:
  """('sentencepiece', sha256 of the model proto) | ('bytes',) of a flaxllm tokenizer."""
  proto = getattr(tokenizer, 'model_proto', None)
  if proto is not None:
    return ('sentencepiece', hashlib.sha256(proto).hexdigest())
  if type(tokenizer).__name__ == 'ByteTokenizer':
    return ('bytes',)
  return None


def resolve_teacher(path: str, dtype: str = '') -> TeacherSource:
  """The TeacherSource of `path` (ConfigError if it is missing or not a model)."""
  if not path:
    raise ConfigError("distill.teacher is empty; set --config.distill.teacher=<a flaxllm workdir "
                      "or model directory>.")
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise ConfigError(f'distill.teacher={path!r} does not exist; train the teacher first or point '
                      'distill.teacher at its workdir or model directory.')
  cfg_json = os.path.join(path, 'config.json')
  overrides = {'dtype': dtype} if dtype else {}
  if os.path.isdir(os.path.join(path, 'checkpoints')) or (
      os.path.exists(cfg_json) and 'model' in _read_json(cfg_json)):
    if not os.path.exists(cfg_json):
      raise ConfigError(f'the teacher workdir {path} has no config.json; point distill.teacher at '
                        'a complete flaxllm workdir.')
    ckpt_dir = os.path.join(path, 'checkpoints')
    steps = [d for d in os.listdir(ckpt_dir) if d.isdigit()] if os.path.isdir(ckpt_dir) else []
    if not steps:
      raise ConfigError(f'the teacher workdir {path} has no checkpoint; train it first (flaxllm '
                        f'train --workdir={path}) or point distill.teacher at another run.')
    model = dict(_read_json(cfg_json)['model'])
    model.update(overrides, scan_layers=False, remat='none')
    return TeacherSource(path, 'workdir', ModelConfig.from_dict(model), _fingerprint_dir(path))
  if os.path.exists(os.path.join(path, 'model_config.json')):
    model = dict(_read_json(os.path.join(path, 'model_config.json')))
    model.update(overrides)
    return TeacherSource(path, 'flaxllm_model', ModelConfig.from_dict(model),
                         _fingerprint_dir(path))
  if os.path.exists(cfg_json):
    from flaxllm.interop import hf  # pylint: disable=import-outside-toplevel
    cfg = hf.config_from_hf(hf.read_hf_config(path), **overrides)
    return TeacherSource(path, 'hf', cfg, _fingerprint_dir(path))
  raise ConfigError(f'distill.teacher={path!r} is neither a flaxllm workdir (config.json + '
                    'checkpoints/), a flaxllm model directory (model_config.json) nor a Hugging '
                    'Face checkpoint (config.json); point it at one of those.')


def _read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def check_teacher(source: TeacherSource, student_cfg: ModelConfig, student_tokenizer=None, *,
                  top_k: int = 0):
  """One-sentence ConfigError when `source` cannot teach a student of `student_cfg` that uses
  `student_tokenizer` (checked before anything compiles)."""
  student_cfg = ModelConfig.from_dict(student_cfg)
  t_vocab, s_vocab = source.model_cfg.vocab_size, student_cfg.vocab_size
  if t_vocab != s_vocab:
    raise ConfigError(f'the teacher {source.path} has vocab_size {t_vocab} but the student has '
                      f'{s_vocab}; logit distillation needs one vocabulary, so give the student '
                      f'model.vocab_size={t_vocab} and the teacher\'s tokenizer (or use '
                      'sequence-level distillation, which only needs text).')
  if source.model_cfg.arch != 'decoder':
    raise ConfigError(f'the teacher {source.path} is a {source.model_cfg.arch!r} model; '
                      'distillation needs a decoder-only teacher.')
  if top_k and top_k > s_vocab:
    raise ConfigError(f'distill.top_k={top_k} is larger than the vocabulary ({s_vocab} tokens); '
                      f'use a top_k between 1 and {s_vocab}, or 0 for the full distribution.')
  if student_tokenizer is not None and source.tokenizer is not None:
    mine = tokenizer_fingerprint(student_tokenizer)
    if mine is not None and mine != source.tokenizer:
      hint = (f'set --config.tokenizer.model_path={os.path.join(source.path, TOKENIZER_FILE)}'
              if source.tokenizer[0] == 'sentencepiece' else "set tokenizer.kind='bytes'")
      raise ConfigError(f'the student\'s tokenizer ({mine[0]}) differs from the teacher\'s '
                        f'({source.tokenizer[0]}, in {source.path}): the same ids would mean '
                        f'different tokens; {hint}.')


def abstract_params(model_cfg: ModelConfig, sharding=None):
  """ShapeDtypeStructs of a decoder's params (with `sharding` on every leaf if given)."""
  model = models.build(model_cfg)
  shapes = jax.eval_shape(lambda: models.init_params(model, jax.random.PRNGKey(0)))
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      shapes)


def load_teacher_params(source: TeacherSource, abstract: Any = None):
  """The teacher's params, placed like `abstract` (ShapeDtypeStructs with shardings; default:
  one device, in the teacher config's param_dtype)."""
  abstract = abstract if abstract is not None else abstract_params(source.model_cfg)
  if source.kind == 'workdir':
    from flaxllm.train import trainer  # pylint: disable=import-outside-toplevel
    return trainer.load_init_params(source.path, abstract)
  if source.kind == 'flaxllm_model':
    from flaxllm.interop import native  # pylint: disable=import-outside-toplevel
    _, params = native.load_flaxllm(source.path)
  else:
    from flaxllm.interop import hf  # pylint: disable=import-outside-toplevel
    _, params = hf.load(source.path)
  sig = lambda t: jax.tree.map(lambda x: tuple(x.shape), t)
  if sig(params) != sig(abstract):
    raise ConfigError(f'the params in {source.path} do not match its model config; re-export '
                      'the teacher.')
  return jax.tree.map(lambda x, a: jax.device_put(jnp.asarray(x, a.dtype), a.sharding),
                      params, abstract)


# ----------------------------------------------------------------------------- student init

_LAYER = re.compile(r'(^|/)layers_(\d+)(/|$)')


def student_from_teacher(student_params, teacher_params, every: int):
  """DistilBERT-style initialisation: student layer i <- teacher layer i * `every`; every
  other weight (embeddings, final norm, head) copied. Unrolled layers (`layers_{i}`) or
  scanned (`layers` with a leading axis) on either side. Shapes must agree (same widths)."""
  if every < 1:
    raise ConfigError(f'distill.init_every={every} must be >= 1.')
  s_flat = params_lib.flatten(params_lib.unstack_layers(student_params))
  t_flat = params_lib.flatten(params_lib.unstack_layers(teacher_params))
  out = {}
  for path, s in s_flat.items():
    m = _LAYER.search(path)
    src = path
    if m:
      src = f'{path[:m.start(2)]}{int(m.group(2)) * every}{path[m.end(2):]}'
    t = t_flat.get(src)
    if t is None:
      raise ConfigError(f'distill.init_every={every}: the teacher has no {src} for the student\'s '
                        f'{path}; use fewer student layers or a smaller init_every.')
    if t.shape != s.shape:
      raise ConfigError(f'distill.init_every needs equal widths, but {path} is {tuple(s.shape)} '
                        f'in the student and {tuple(t.shape)} in the teacher; give the student '
                        'the teacher\'s d_model / heads / mlp_dim or set distill.init_every=0.')
    out[path] = jnp.array(t, s.dtype, copy=True)  # the trainer donates the student params
  tree = params_lib.unflatten(out)
  scanned = any(re.search(r'(^|/)layers/', p) for p in params_lib.flatten(student_params))
  tree = params_lib.stack_layers(tree) if scanned else tree
  return jax.tree.map(lambda new, old: jax.device_put(new, old.sharding)
                      if hasattr(old, 'sharding') else new, tree, student_params)
