"""The objective protocol: everything the trainer knows about what it trains and how.

The trainer builds one objective from the config (`flaxllm.objectives.from_config`) and talks
only to it; it never names LoRA, distillation or sequence-to-sequence. An objective says

  what is trained    `split(params, rng) -> (trainable, frozen)`: the trainable tree (in the
                     train state: gradients, optimizer state, checkpoints) and named frozen
                     trees (no gradient, never donated or checkpointed, e.g. a LoRA base);
                     `model_params` / `plain_params` assemble the model's params back;
                     `trainable_specs` / `frozen_specs` shard them by logical axis names.
  frozen models      `load_frozen(mesh, rules)`: frozen trees loaded from elsewhere (a teacher,
                     later a reference or reward model); `initial_params` may use them.
  the loss           `train_loss(model)` / `eval_loss(model)`: LossFns (see below).
  data               `data_iterator(...)`, the batch layout `batch_shapes(...)`, and an optional
                     per-step host `batch_hook(...)` (on-policy samples, offline logits).
  checks             `check(tokenizer)` and the class's `check_section(config)`: one sentence,
                     before anything compiles.
  the end            `eval_metrics` (besides the loss), `sample`, `export`.

The trainable tree is namespaced: `{'model': <what fine-tuning trains of the model>,
**extras}`; `model` comes from the fine-tuning method of `config.finetune`
(`flaxllm.objectives.finetune`: full | freeze | lora | qlora), which every objective composes
with, and extras are the objective's own trainable tensors (a distillation projection, a reward
head). `Objective` implements every hook for a language model on packed documents; an objective
overrides what differs. Adding one is a module with a subclass and an entry in
`flaxllm.objectives.REGISTRY`.

A LossFn is `(params, frozen, batch, rng) -> (objective_sum, sums)`: params the trainable tree,
frozen the dict of frozen trees, rng a dropout key or None. It returns float32 SUMS over its
(micro-)batch; `sums` has 'ce' (reported as `loss`) and 'tokens' (the divisor), and every other
key k is reported as `sums[k] / tokens` (flaxllm.train.step).
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, NamedTuple, Optional

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from flaxllm import generate as generate_lib
from flaxllm import models, parallel, rundir
from flaxllm.data import pipeline
from flaxllm.models.config import ConfigError, ModelConfig
from flaxllm.objectives import finetune as finetune_lib

LossFn = Callable[[Any, Any, dict, Any], tuple[jax.Array, dict]]
MODEL = rundir.MODEL_KEY   # the model's part of the trainable tree

# The layout of a packed language-model batch (flaxllm.data.make_iterator): name -> dtype.
LM_BATCH = {'inputs': jnp.int32, 'targets': jnp.int32, 'positions': jnp.int32,
            'segment_ids': jnp.int32, 'loss_mask': jnp.float32}


class Policy(NamedTuple):
  """The model being trained, as a batch hook sees it before a step."""
  trainable: Any                 # the trainable tree (sharded)
  frozen: dict                   # the frozen trees
  plain: Callable[[], Any]       # () -> the model's plain params (adapters merged)


def sharded_abstract_params(model_cfg: ModelConfig, mesh, rules):
  """The params of a model of `model_cfg` as ShapeDtypeStructs sharded over `mesh` by the
  logical-axis `rules` (a frozen model to load: a teacher, a reference)."""
  model = models.build(model_cfg)
  shapes, _ = parallel.abstract_state(lambda r: models.init_params(model, r), mesh, rules,
                                      jax.random.PRNGKey(0),
                                      param_specs=parallel.param_specs(model))
  return shapes


def sample_section() -> ConfigDict:
  """`config.sample`: the sample printed after training (`Objective.sample`)."""
  c = ConfigDict()
  c.prompt = 'def '                # the prompt (a sequence-to-sequence model: the source)
  c.max_new_tokens = 64            # 0 = no sample
  c.temperature = 0.8
  c.top_k = 40
  c.seed = 0
  return c


class Objective:
  """A language model's objective on packed documents; subclasses override what differs."""
  name: ClassVar[str] = ''
  section: ClassVar[Optional[str]] = None   # the config section it owns, e.g. 'distill'
  arch: ClassVar[str] = 'decoder'           # the model.arch it trains
  token_ce: ClassVar[bool] = True           # val_loss is a cross-entropy per token: report a
  #                                           perplexity (not for a pairwise loss)

  def __init__(self, config):
    self.config = config
    self.model_cfg = ModelConfig.from_dict(config.model)
    self.finetune = finetune_lib.from_config(config.finetune)

  # ---- its config section ------------------------------------------------------------------

  @classmethod
  def config_section(cls) -> Optional[ConfigDict]:
    """The defaults of `config.<section>` (None: the objective has no settings of its own)."""
    return None

  @classmethod
  def check_section(cls, config) -> None:
    """ConfigError (one sentence) when `config` cannot train this objective; the base checks
    the model architecture."""
    arch = config.model.arch
    if arch != cls.arch:
      raise ConfigError(f"objective={cls.name!r} trains model.arch={cls.arch!r} models but "
                        f"model.arch={arch!r}; set --config.model.arch={cls.arch} or choose "
                        'another objective.')

  @classmethod
  def load_tokenizer(cls, workdir: str, config, reuse: bool):
    """The run's tokenizer, kept in `workdir` (`flaxllm.rundir.run_tokenizer`; a sentencepiece
    model is trained on the train split of `config.data` unless tokenizer.model_path is set)."""
    return rundir.run_tokenizer(workdir, config.tokenizer, config.data, reuse)

  def check(self, tokenizer) -> None:
    """Checks that need the run's tokenizer (e.g. a teacher's), before compiling."""
    del tokenizer

  # ---- the model and what is trained -------------------------------------------------------

  def build_model(self, *, train: bool):
    """The Linen module the losses apply: for training with dropout (when model.dropout > 0),
    for evaluation without."""
    return models.build(self.model_cfg, deterministic=not train or self.model_cfg.dropout == 0)

  def split(self, params, rng) -> tuple[Any, dict]:
    """(trainable, frozen) of the model's full `params` (jitted, params donated)."""
    trainable, frozen = self.finetune.split(params, rng)
    return {MODEL: trainable}, frozen

  def model_params(self, trainable, frozen):
    """The tree the model applies (e.g. LoRA kernels around the frozen base)."""
    return self.finetune.model_params(trainable[MODEL], frozen)

  def plain_params(self, trainable, frozen):
    """The model's plain params (adapters merged): export, samples, on-policy data. Not
    jitted by the trainer: a method that computes (a LoRA merge) jits its own computation,
    and one that only picks subtrees copies nothing."""
    return self.finetune.plain_params(trainable[MODEL], frozen)

  def trainable_specs(self, param_specs, abstract_trainable):
    """Logical PartitionSpecs of the trainable tree, from the model params' specs."""
    return {MODEL: self.finetune.trainable_specs(param_specs, abstract_trainable[MODEL])}

  def frozen_specs(self, param_specs, abstract_frozen):
    """Logical PartitionSpecs of the frozen trees of `split`."""
    return self.finetune.frozen_specs(param_specs, abstract_frozen)

  def load_frozen(self, mesh, rules, *, abstract: bool = False) -> dict:
    """Frozen trees that do not come from the model's params (a teacher), sharded over `mesh`;
    with `abstract`, their ShapeDtypeStructs only (ahead-of-time compilation reads nothing)."""
    del mesh, rules, abstract
    return {}

  def initial_params(self, params, loaded: dict):
    """The model's params at step 0, given a random init (or init_from) and `load_frozen`'s."""
    del loaded
    return params

  # ---- the loss ----------------------------------------------------------------------------

  def train_loss(self, model) -> LossFn:
    raise NotImplementedError(f'objective {self.name!r} defines no train_loss.')

  def eval_loss(self, model) -> Optional[LossFn]:
    """The validation LossFn (its 'ce' / 'tokens' give val_loss and val_ppl), or None when the
    objective has no validation loss (its `eval_metrics` are the validation)."""
    return self.train_loss(model)

  @property
  def passes(self) -> int:
    """Optimisation passes over each batch (GRPO's mu, PPO's epochs); 1: one per batch."""
    return 1

  @property
  def minibatches(self) -> int:
    """Updates per pass, each on a part of the batch (PPO's minibatches); 1: the whole."""
    return 1

  # ---- data --------------------------------------------------------------------------------

  def data_iterator(self, tokenizer, split: str, **kw) -> pipeline.DataIterator:
    """Batches of `split` (keywords: seq_len, batch_size, seed, process_index, process_count)."""
    return pipeline.make_iterator(self.config.data, tokenizer, split=split, **kw)

  def batch_shapes(self, batch_size: int, seq_len: int) -> dict:
    """name -> (shape, dtype) of one batch (ahead-of-time compilation)."""
    return {k: ((batch_size, seq_len), dtype) for k, dtype in LM_BATCH.items()}

  def batch_hook(self, tokenizer, rows: slice) -> Optional[Callable]:
    """`hook(step, host_batch, policy) -> host_batch`, run on the host before each train step
    (`step` 0-based; `policy` the `Policy` now; `rows` this process's rows of the global
    batch), or None."""
    del tokenizer, rows
    return None

  # ---- evaluation and the end --------------------------------------------------------------

  def eval_metrics(self, plain_params: Callable[[], Any], tokenizer) -> dict:
    """Validation metrics besides the loss (e.g. BLEU); `plain_params()` gives whole params."""
    del plain_params, tokenizer
    return {}

  def sample(self, plain_params: Callable[[], Any], tokenizer) -> Optional[str]:
    """A sample of the trained model printed at the end (config.sample), or None."""
    s = self.config.sample
    if not s.max_new_tokens:
      return None
    ids = [tokenizer.bos_id] + tokenizer.encode(s.prompt)
    out = generate_lib.generate(self.model_cfg, plain_params(), [ids],
                                max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                                top_k=s.top_k or None, stop_tokens=(tokenizer.eos_id,),
                                seed=s.seed, pad_id=tokenizer.pad_id)[0]
    return s.prompt + tokenizer.decode(out)

  def export(self, workdir: str, plain_params, trainable, gather: Callable, is_main: bool):
    """Writes what the run leaves behind: `<workdir>/model/` (every process writes its shards)
    and the fine-tuning method's extras (a PEFT adapter; `gather` makes arrays whole)."""
    rundir.export_model(workdir, self.model_cfg, plain_params, tokenizer_source=is_main)
    self.finetune.export(workdir, self.model_cfg, trainable[MODEL], gather, is_main)
