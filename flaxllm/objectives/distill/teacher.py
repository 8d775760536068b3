"""A teacher against its student: checks before compiling, and a student initialised from it.

`check_teacher` raises a one-sentence ConfigError when the teacher (a `flaxllm.rundir.ModelSource`:
a flaxllm workdir, model directory or Hugging Face directory) cannot teach this student: a
different vocabulary size, a non-decoder teacher, or a different tokenizer (same size but other
pieces, e.g. two separately trained sentencepiece models). Logit distillation needs the SAME
token ids on both sides.
"""
from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp

from flaxllm import rundir
from flaxllm.data import tokenizer as tokenizer_lib
from flaxllm.models import params as params_lib
from flaxllm.models.config import ConfigError, ModelConfig


def check_teacher(source: rundir.ModelSource, student_cfg: ModelConfig, student_tokenizer=None,
                  *, top_k: int = 0):
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
    mine = tokenizer_lib.fingerprint(student_tokenizer)
    if mine is not None and mine != source.tokenizer:
      spm = os.path.join(source.path, rundir.TOKENIZER_FILE)
      hint = (f'set --config.tokenizer.model_path={spm}'
              if source.tokenizer[0] == 'sentencepiece' else "set tokenizer.kind='bytes'")
      raise ConfigError(f'the student\'s tokenizer ({mine[0]}) differs from the teacher\'s '
                        f'({source.tokenizer[0]}, in {source.path}): the same ids would mean '
                        f'different tokens; {hint}.')


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
