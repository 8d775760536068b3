"""What the trainer calls (flaxllm/train/trainer.py), in the order it calls it:

  2. `check(config, tokenizer)`            teacher vs student, one sentence, before compiling
  3. `wrap(config, model_cfg, split, model_params, z_loss)` in `_build_programs`
                                            -> (split, model_params, train LossFn); eval keeps
                                            the student's plain LM loss
  4. `frozen_teacher(config, mesh, rules)`  the teacher's params, sharded like a model of its
                                            config, for frozen['teacher']
     `init_student(config, params, teacher)` DistilBERT-style init (distill.init_every)
  6. `batch_hook(config, tokenizer, ...)`   per step on the host: offline top-k logits, or an
                                            on-policy student batch (GKD), else the data batch

Everything is a no-op unless `config.distill.teacher` or `config.distill.offline_logits` is set.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax

from flaxllm.distill import loss as loss_lib
from flaxllm.distill import teacher as teacher_lib
from flaxllm.models.config import ConfigError, ModelConfig


def enabled(config) -> bool:
  d = config.get('distill') if hasattr(config, 'get') else None
  return bool(d is not None and (d.teacher or d.offline_logits))


def _source(config) -> Optional[teacher_lib.TeacherSource]:
  d = config.distill
  if not d.teacher:
    return None
  return teacher_lib.resolve_teacher(d.teacher, d.teacher_dtype)


def check(config, tokenizer) -> Optional[teacher_lib.TeacherSource]:
  """Resolves the teacher and checks it against the student (ConfigError in one sentence)."""
  if not enabled(config):
    return None
  d = config.distill
  source = _source(config)
  student = ModelConfig.from_dict(config.model)
  if source is not None:
    teacher_lib.check_teacher(source, student, tokenizer,
                              top_k=0 if d.offline_logits else d.top_k)
    last = (student.num_layers - 1) * d.init_every
    if d.init_every and last >= source.model_cfg.num_layers:
      raise ConfigError(f'distill.init_every={d.init_every} needs teacher layer {last} for the '
                        f'student\'s {student.num_layers} layers, but the teacher has '
                        f'{source.model_cfg.num_layers}; lower init_every or the student\'s '
                        'num_layers.')
  elif d.hidden_loss or d.on_policy or d.init_every:
    raise ConfigError('distill.hidden_loss, distill.on_policy and distill.init_every need a live '
                      'teacher; set distill.teacher.')
  if d.offline_logits:
    from flaxllm.distill import offline  # pylint: disable=import-outside-toplevel
    offline.OfflineLogits(d.offline_logits, config)   # checks meta against this config
  return source


def wrap(config, model_cfg: ModelConfig, split: Callable, model_params: Callable,
         z_loss: float = 0.0):
  """(split, model_params, loss_fn) with distillation: the LossFn of flaxllm.distill.loss and,
  for a hidden-state loss between different widths, a trainable projection added to the
  trainable tree under `distill_proj` (stripped again before the model sees the params)."""
  d = config.distill
  settings = loss_lib.Settings.from_config(d)
  source = _source(config)
  teacher_cfg = None if settings.offline else source.model_cfg
  needs_proj = bool(d.hidden_loss) and teacher_cfg.d_model != model_cfg.d_model
  if needs_proj:
    inner_split = split

    def split(params, rng):  # noqa: F811 -- adds the projection to the trainable tree
      trainable, base = inner_split(params, rng)
      proj = loss_lib.init_projection(jax.random.fold_in(rng, 7), model_cfg.d_model,
                                      teacher_cfg.d_model)
      return {**trainable, loss_lib.PROJ_KEY: proj}, base

  inner_model_params = model_params

  def model_params(params, frozen):  # noqa: F811 -- strips the projection
    if isinstance(params, dict) and loss_lib.PROJ_KEY in params:
      params = {k: v for k, v in params.items() if k != loss_lib.PROJ_KEY}
    return inner_model_params(params, frozen)

  loss_fn = loss_lib.distill_loss(model_cfg, teacher_cfg, settings, z_loss=z_loss,
                                  model_params=inner_model_params)
  return split, model_params, loss_fn


def frozen_teacher(config, mesh=None, rules=None) -> Optional[Any]:
  """The teacher's params for frozen['teacher'] (None with offline logits), sharded over `mesh`
  by the logical-axis `rules` like any model of the teacher's config."""
  if not enabled(config) or config.distill.offline_logits:
    return None
  source = _source(config)
  abstract = None
  if mesh is not None:
    from flaxllm import models, parallel  # pylint: disable=import-outside-toplevel
    model = models.build(source.model_cfg)
    abstract, _ = parallel.abstract_state(
        lambda r: models.init_params(model, r), mesh, rules, jax.random.PRNGKey(0),
        param_specs=parallel.param_specs(model))
  return teacher_lib.load_teacher_params(source, abstract)


def init_student(config, params, teacher_params):
  """`params` with every k-th teacher layer copied in (distill.init_every = k), else as is."""
  k = config.distill.init_every if enabled(config) else 0
  if not k or teacher_params is None:
    return params
  return teacher_lib.student_from_teacher(params, teacher_params, k)


def student_params(params):
  """The student's model params of a trainable tree (the projection removed)."""
  if isinstance(params, dict) and loss_lib.PROJ_KEY in params:
    return {k: v for k, v in params.items() if k != loss_lib.PROJ_KEY}
  return params


def batch_hook(config, tokenizer, *, rows: slice = slice(None)) -> Optional[Callable]:
  """`hook(step, host_batch, params_fn) -> host_batch` for the trainer loop, or None.

  step is the 0-based index of the update the batch feeds; params_fn() returns the student's
  current params (only called for on-policy samples)."""
  if not enabled(config):
    return None
  d = config.distill
  if d.offline_logits:
    from flaxllm.distill import offline  # pylint: disable=import-outside-toplevel
    logits = offline.OfflineLogits(d.offline_logits, config, rows=rows)
    return lambda step, batch, params_fn: logits.attach(step, batch)
  if d.on_policy:
    from flaxllm.distill import onpolicy  # pylint: disable=import-outside-toplevel
    policy = onpolicy.OnPolicy(ModelConfig.from_dict(config.model), d.on_policy,
                               seed=config.seed, prompt_len=min(d.on_policy_prompt_len,
                                                                config.seq_len),
                               temperature=d.on_policy_temperature, pad_id=tokenizer.pad_id,
                               stop_tokens=(tokenizer.eos_id,))
    return policy
  return None
