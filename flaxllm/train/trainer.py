"""The trainer: one linear function, top to bottom, in the style of big_vision's train.py.

    summary = train(config, workdir)      # config: a validated ConfigDict (flaxllm.config)

Sections: 1 workdir and config, 2 tokenizer, 3 model and optimizer, 4 state (resume or init),
5 data, 6 the loop (step, log, eval, checkpoint, preemption), 7 the end (final eval, loss curve,
exported model). Running it again on the same workdir resumes from the newest checkpoint
(params, optimizer, rng AND data iterator), or reports that the run is complete.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import signal
import threading
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from flaxllm import config as config_lib
from flaxllm import models
from flaxllm.data import pipeline as data_pipeline
from flaxllm.data import tokenizer as tokenizer_lib
from flaxllm.models.config import ConfigError
from flaxllm.train import checkpoint as ckpt_lib
from flaxllm.train import metrics as metrics_lib
from flaxllm.train import optim
from flaxllm.train import step as step_lib

log = logging.getLogger(__name__)

CONFIG_FILE = 'config.json'
TOKENIZER_FILE = 'tokenizer.model'
TOKENIZER_INFO = 'tokenizer.json'
MODEL_DIR = 'model'


class TrainError(RuntimeError):
  """Training cannot go on; the message says why and what to do. Checkpoints are intact."""


# ----------------------------------------------------------------------------- helpers

def _write_atomic(path: str, data: bytes | str):
  mode = 'wb' if isinstance(data, bytes) else 'w'
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, mode) as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def prepare_workdir(workdir: str) -> str:
  """Creates `workdir` and checks that it is writable (one-sentence error otherwise)."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f'.write_test{os.getpid()}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise TrainError(f'workdir {workdir} is not writable ({e.strerror or e}); choose a writable '
                     '--workdir.') from e
  return workdir


def workdir_tokenizer(workdir: str, config, reuse: bool = True) -> tokenizer_lib.Tokenizer:
  """The run's tokenizer: with `reuse`, the copy in `workdir` if there is one; else built from
  `config.tokenizer` (sentencepiece models are trained on the corpus, or loaded from
  tokenizer.model_path) and copied into `workdir` so that eval and generation use the same."""
  path = os.path.join(workdir, TOKENIZER_FILE)
  info_path = os.path.join(workdir, TOKENIZER_INFO)
  if reuse and os.path.exists(path):
    return tokenizer_lib.SentencePieceTokenizer.load(path)
  if reuse and os.path.exists(info_path):
    with open(info_path) as f:
      info = json.load(f)
    if info.get('kind') == 'bytes':
      return tokenizer_lib.ByteTokenizer()
  tokenizer = tokenizer_lib.get_tokenizer(config.tokenizer, corpus=config.data)
  info = {'kind': config.tokenizer.kind, 'vocab_size': tokenizer.vocab_size,
          'bos_id': tokenizer.bos_id, 'eos_id': tokenizer.eos_id, 'pad_id': tokenizer.pad_id}
  if isinstance(tokenizer, tokenizer_lib.SentencePieceTokenizer):
    _write_atomic(path, tokenizer.model_proto)
    info['source'] = tokenizer.path
    tokenizer = tokenizer_lib.SentencePieceTokenizer.load(path)
  elif os.path.exists(path):  # a tokenizer of an earlier attempt without checkpoints
    os.remove(path)
  _write_atomic(info_path, json.dumps(info, indent=2) + '\n')
  return tokenizer


def stored_config(workdir: str):
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return config_lib.from_json(f.read())


class Programs(NamedTuple):
  """What a config compiles to on a mesh: the model, the optimizer and the jitted functions.

  Every function takes and returns arrays sharded over `mesh` by the logical-axis `rules`; the
  state is created in its shards (`jax.jit(..., out_shardings=...)`), never whole on one host.
  """
  model_cfg: models.ModelConfig
  mesh: Any                  # jax.sharding.Mesh
  rules: Any                 # logical-axis rules (flaxllm.parallel.rules)
  tx: Any                    # optax.GradientTransformation (of the trainable tree)
  abstract_params: Any       # the model's full params: ShapeDtypeStructs with shardings
  abstract_state: Any        # TrainState of ShapeDtypeStructs with shardings (restore target)
  abstract_base: Any         # the frozen base (fine-tuning) with shardings, or None
  init_params: Callable      # rng -> the model's full params (random init)
  split: Callable            # (params, rng) -> (trainable, frozen base or None); params donated
  init: Callable             # (trainable, rng) -> TrainState (trainable is donated)
  train_step: Callable       # (state, batch, frozen) -> (state, metrics); state is donated
  eval_step: Callable        # (params, batch, frozen) -> {'ce', 'tokens'}
  model_params: Callable     # (trainable, frozen) -> the model's plain params (adapters merged)


# Keys of the config that the programs depend on (besides config.model and the mesh).
_PROGRAM_KEYS = ('optim', 'schedule', 'total_steps', 'z_loss', 'loss_chunk_size',
                 'skip_nonfinite_steps', 'parallel', 'finetune', 'distill')


def build_programs(config, mesh=None) -> Programs:
  """The Programs of `config` on `mesh` (default: `config.mesh` over all devices); the same
  settings in one process reuse the compiled functions (tests, notebooks and sweeps call
  train() repeatedly)."""
  from flaxllm import parallel  # pylint: disable=import-outside-toplevel
  mesh = parallel.make_mesh(config.mesh) if mesh is None else mesh
  key = json.dumps({k: config[k].to_dict() if hasattr(config[k], 'to_dict') else config[k]
                    for k in _PROGRAM_KEYS}, sort_keys=True, default=list)
  return _build_programs(models.ModelConfig.from_dict(config.model), key, mesh)


@functools.lru_cache(maxsize=8)
def _build_programs(model_cfg: models.ModelConfig, key: str, mesh) -> Programs:
  from flaxllm import parallel  # pylint: disable=import-outside-toplevel
  from flaxllm.distill import hooks as distill  # pylint: disable=import-outside-toplevel
  from flaxllm.peft import finetune  # pylint: disable=import-outside-toplevel
  config = config_lib.ConfigDict(json.loads(key))
  rules = parallel.get_rules(config.parallel.rules)
  model = models.build(model_cfg, deterministic=model_cfg.dropout == 0)
  specs = parallel.param_specs(model)  # logical PartitionSpec of every model param
  rng = jax.random.PRNGKey(0)

  # ---- what is trained: all params, a subset, LoRA adapters (flaxllm.peft.finetune) -------
  split, model_params = finetune.hooks(config.finetune)  # (params, rng) -> (trainable, base)
  # ---- the loss: next-token CE, or distillation from frozen['teacher'] (flaxllm.distill) --
  train_loss = None
  if distill.enabled(config):
    split, model_params, train_loss = distill.wrap(config, model_cfg, split, model_params,
                                                   config.z_loss)
  eval_loss = step_lib.lm_loss(model, z_loss=config.z_loss, model_params=model_params,
                               chunk_size=config.loss_chunk_size)
  train_loss = train_loss or eval_loss

  # ---- shardings: params, trainable, frozen base and state, from the logical axis names ---
  init_params = functools.partial(models.init_params, model)
  abstract_params, params_sh = parallel.abstract_state(init_params, mesh, rules, rng,
                                                       param_specs=specs)
  abstract_trainable, abstract_base = jax.eval_shape(split, abstract_params, rng)
  trainable_specs = finetune.trainable_specs(config.finetune, specs, abstract_trainable)
  tx = optim.make_optimizer(config, abstract_trainable)
  init = lambda trainable, rng: step_lib.init_state(trainable, tx, rng)
  abstract, state_sh = parallel.abstract_state(init, mesh, rules, abstract_trainable, rng,
                                               param_specs=trainable_specs)
  base_sh = (None if abstract_base is None else
             parallel.state_shardings(abstract_base, mesh, rules, specs))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def on_mesh(fn):
    """`fn` traced with the mesh and rules visible to the models' activation constraints."""
    @functools.wraps(fn)
    def wrapped(*args):
      with parallel.step_context(mesh, rules):
        return fn(*args)
    return wrapped

  def plain_params(trainable, frozen):
    return finetune.full_params(config.finetune, distill.student_params(trainable), frozen)

  train_step = step_lib.make_train_step(
      train_loss, tx, optim.schedule_from_config(config), accum_steps=config.optim.accum_steps,
      skip_nonfinite=config.skip_nonfinite_steps, use_dropout=model_cfg.dropout > 0)
  return Programs(
      model_cfg=model_cfg, mesh=mesh, rules=rules, tx=tx,
      abstract_params=abstract_params, abstract_state=abstract,
      abstract_base=None if abstract_base is None else parallel.with_shardings(abstract_base,
                                                                               base_sh),
      init_params=jax.jit(on_mesh(init_params), out_shardings=params_sh),
      split=jax.jit(on_mesh(split), out_shardings=(state_sh.params, base_sh),
                    donate_argnums=(0,)),
      init=jax.jit(on_mesh(init), out_shardings=state_sh, donate_argnums=(0,)),
      train_step=jax.jit(on_mesh(train_step), out_shardings=(state_sh, replicated),
                         donate_argnums=(0,)),
      eval_step=jax.jit(on_mesh(step_lib.make_eval_step(eval_loss)), out_shardings=replicated),
      # Full training: the trainable tree IS the model's (no jitted identity copying it).
      model_params=plain_params if config.finetune.method == 'full' else
      jax.jit(on_mesh(plain_params)))


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def load_init_params(path: str, abstract_params):
  """Params to start from (`config.init_from`): a flaxllm workdir (its newest checkpoint) or a
  model directory of `flaxllm convert` / Hugging Face (via flaxllm.interop)."""
  path = os.path.abspath(os.path.expanduser(path))
  mismatch = TrainError(f'the params in init_from={path!r} do not match config.model '
                        '(different shapes or names); use the same model settings as that run.')
  signature = lambda tree: jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), tree)
  if os.path.isdir(os.path.join(path, ckpt_lib.CHECKPOINT_DIR)):
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
    manager = ocp.CheckpointManager(
        os.path.join(path, ckpt_lib.CHECKPOINT_DIR),
        item_handlers={'state': ocp.PyTreeCheckpointHandler(),
                       'data': ocp.JsonCheckpointHandler()})
    with contextlib.closing(manager):
      step = manager.latest_step()
      if step is None:
        raise TrainError(f'init_from={path!r} has no checkpoint; train it first or point '
                         'init_from at another run.')
      stored = manager.item_metadata(step)['state'].tree.get('params')
      if stored is None or signature(stored) != signature(abstract_params):
        raise mismatch  # checked before reading any array
      target = {'params': abstract_params}  # only the params of that run's state
      params = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=True))).state['params']
  else:
    from flaxllm.interop import native  # pylint: disable=import-outside-toplevel
    if os.path.exists(os.path.join(path, native.CONFIG_NAME)):
      _, params = native.load_flaxllm(path)
    else:
      from flaxllm.interop import hf  # pylint: disable=import-outside-toplevel
      _, params = hf.load(path)
  if signature(params) != signature(abstract_params):
    raise mismatch
  return jax.tree.map(lambda x, a: jax.device_put(jnp.asarray(x, a.dtype), a.sharding),
                      params, abstract_params)


class _Preemption:
  """SIGTERM (TPU VM preemption, `kill`) sets a flag; the loop saves and exits at the next step."""

  def __init__(self):
    self.flag = threading.Event()
    self.previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self.previous = signal.signal(signal.SIGTERM, lambda *_: self.flag.set())
    return self

  def __exit__(self, *exc):
    if self.previous is not None:
      signal.signal(signal.SIGTERM, self.previous)
    return False


def sample_text(model_cfg, params, tokenizer, sample_cfg) -> str:
  """The prompt followed by a completion sampled from the model (flaxllm.generate)."""
  from flaxllm import generate as generate_lib  # pylint: disable=import-outside-toplevel
  ids = [tokenizer.bos_id] + tokenizer.encode(sample_cfg.prompt)
  out = generate_lib.generate(model_cfg, params, [ids], max_new_tokens=sample_cfg.max_new_tokens,
                              temperature=sample_cfg.temperature, top_k=sample_cfg.top_k or None,
                              stop_tokens=(tokenizer.eos_id,), seed=sample_cfg.seed,
                              pad_id=tokenizer.pad_id)[0]
  return sample_cfg.prompt + tokenizer.decode(out)


# ----------------------------------------------------------------------------- the trainer

def train(config, workdir: str, devices=None) -> dict:
  """Trains (or resumes) the run of `config` in `workdir` on a mesh (`config.mesh`) over
  `devices` (default: all); returns a summary dict with `step`, `complete`, `preempted`, the
  last `val_loss` / `val_ppl` and a `sample`."""
  from flaxllm import parallel  # pylint: disable=import-outside-toplevel
  from flaxllm.distill import hooks as distill  # pylint: disable=import-outside-toplevel
  from flaxllm.peft import finetune  # pylint: disable=import-outside-toplevel
  with contextlib.ExitStack() as closing:  # checkpoints, iterators, writers: closed on any exit
    # ---- 1. Workdir and config: a workdir with checkpoints only resumes its experiment -----
    config = config_lib.validate(config)
    workdir = prepare_workdir(workdir)
    is_main = jax.process_index() == 0
    checkpoints = ckpt_lib.Checkpoints(workdir, keep=config.keep_ckpts)
    closing.callback(checkpoints.close)  # waits for the last asynchronous save
    resuming = bool(checkpoints.steps())
    stored = stored_config(workdir)
    if resuming and stored is not None:
      config_lib.check_resume_compatible(stored, config, workdir)

    # ---- 2. Tokenizer (kept in the workdir); a teacher must share it ----------------------
    tokenizer = workdir_tokenizer(workdir, config, reuse=resuming)
    try:
      tokenizer_lib.check_vocab(tokenizer, config.model.vocab_size)
    except ValueError as e:
      raise ConfigError(str(e)) from e
    distill.check(config, tokenizer)

    # ---- 3. Mesh, model, optimizer, steps (every sharding checked before compiling) -------
    mesh = parallel.make_mesh(config.mesh, devices)
    rows = parallel.local_batch_slice(config.batch_size, mesh, config.parallel.rules)
    programs = build_programs(config, mesh)
    model_cfg, train_step, eval_step = programs.model_cfg, programs.train_step, programs.eval_step

    # ---- 4. State: resume or initialise; the frozen trees (fine-tuning base, teacher) ------
    restored = checkpoints.restore_latest(programs.abstract_state) if resuming else None
    teacher = distill.frozen_teacher(config, mesh, programs.rules)
    trainable, base = None, None
    if restored is None or programs.abstract_base is not None:  # the base is never saved
      trainable, base = start_params(config, programs, teacher)
    base_only = {} if base is None else {'base': base}
    frozen = {**base_only, **({} if teacher is None else {'teacher': teacher})}
    if restored is not None:
      start_step, state, saved_data = restored
      if start_step < config.total_steps:
        print(f'Resuming {workdir} from step {start_step} on '
              f'{parallel.describe_mesh(mesh)}.', flush=True)
      else:
        print(f'The run in {workdir} is already complete ({start_step}/{config.total_steps} '
              'steps; raise --config.total_steps to train on).', flush=True)
    else:
      start_step, saved_data = 0, None
      state = programs.init(trainable, seed_rngs(config)[1])
    del trainable, base

    def model_params():
      """The model's plain params now (adapters merged): export, samples, on-policy data."""
      return programs.model_params(state.params, base_only)

    # ---- 5. Data: this process's rows of the global batch; the iterators resume -----------
    n_rows = rows.stop - rows.start
    if config.data.process_sharding == 'global':  # every process reads the whole global batch
      shard, num_shards, load_rows = 0, 1, config.batch_size
    else:                                          # processes holding the same rows read alike
      shard, num_shards, load_rows = rows.start // n_rows, config.batch_size // n_rows, n_rows
    data_kw = dict(seq_len=config.seq_len, batch_size=load_rows, process_index=shard,
                   process_count=num_shards, seed=config.seed)
    train_iter = data_pipeline.make_iterator(config.data, tokenizer, split='train', **data_kw)
    closing.callback(train_iter.close)
    if saved_data is not None:
      train_iter.set_state(_data_state_of(saved_data, shard, num_shards, workdir))
    val_iter = data_pipeline.make_iterator(config.data, tokenizer, split='validation', **data_kw)
    closing.callback(val_iter.close)
    val_start = val_iter.get_state()
    keep = slice(rows.start, rows.stop) if load_rows != n_rows else slice(None)
    batch_hook = distill.batch_hook(  # offline teacher logits / on-policy student samples
        config, tokenizer, rows=rows if jax.process_count() > 1 else slice(None))

    def to_mesh(host_batch, step=None):
      """This process's rows of a loaded batch, sharded over the mesh (`step`: the 0-based
      update the batch feeds; None for validation)."""
      local = {k: v[keep] for k, v in host_batch.items()}
      if batch_hook is not None and step is not None:
        local = batch_hook(step, local, model_params)
      return parallel.shard_batch(local, mesh, programs.rules)

    def validate() -> dict:
      """Validation metrics on the first `eval_batches` batches (the same every time)."""
      val_iter.set_state(val_start)
      return evaluate(eval_step, state.params, frozen,
                      (to_mesh(b) for _, b in zip(range(config.eval_batches), val_iter)))

    if is_main:  # everything checked: record the experiment, rewind metrics to the state
      _write_atomic(os.path.join(workdir, CONFIG_FILE), config_lib.to_json(config))
      metrics_lib.rewind_metrics(workdir, start_step)

    # ---- 6. The loop --------------------------------------------------------------------
    total = config.total_steps
    tokens_per_step = config.batch_size * config.seq_len
    flops_per_step = models.flops_per_token(model_cfg, config.seq_len) * tokens_per_step
    peak = config.peak_flops
    if not peak and start_step < total:
      # One device's matmul peak times the mesh's devices (CPU devices share the host's cores:
      # one measurement covers them all).
      chips = 1 if mesh.devices.flat[0].platform == 'cpu' else mesh.devices.size
      peak = metrics_lib.measure_peak_flops(model_cfg.dtype) * chips
      print(f'Measured matmul peak: {peak / 1e9:.1f} GFLOP/s ({model_cfg.dtype}, {chips} '
            'device(s)).', flush=True)
    writer = metrics_lib.MetricsWriter(workdir, config, total_steps=total,
                                       start_step=start_step, is_main=is_main,
                                       use_wandb=start_step < total)
    closing.callback(writer.close)
    last_saved = start_step if restored is not None else None
    pending: list[dict] = []           # device metrics of the steps since the last flush
    window = [time.perf_counter(), 0]  # [start time, steps] of the throughput window
    last_eval, preempted = {}, False

    def flush(step: int):
      """Fetches pending metrics (the only host sync), stops on a non-finite loss, logs."""
      rows = jax.device_get(pending)
      pending.clear()
      for i, r in enumerate(rows):
        if not config.skip_nonfinite_steps and not (np.isfinite(r['loss']) and
                                                    np.isfinite(r['grad_norm'])):
          kept = f'step {last_saved}' if last_saved is not None else 'none yet'
          raise TrainError(
              f'the loss became {float(r["loss"])} (grad norm {float(r["grad_norm"])}) at step '
              f'{step - len(rows) + i + 1}; stopped without saving (last good checkpoint: '
              f'{kept}); lower optim.lr, raise schedule.warmup_steps or set '
              'skip_nonfinite_steps=True.')
      line = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
      line['lr'] = float(rows[-1]['lr'])
      elapsed = time.perf_counter() - window[0]
      if window[1] and elapsed > 0:  # not right after compilation
        line['tokens_per_s'] = window[1] * tokens_per_step / elapsed
        line['mfu'] = window[1] * flops_per_step / elapsed / peak
      writer.write(step, line, show=('loss', 'tokens_per_s', 'mfu', 'lr', 'grad_norm'))
      window[:] = [time.perf_counter(), 0]

    def save(step: int):
      nonlocal last_saved
      if not bool(_all_finite(state)):
        raise TrainError(f'the train state has NaN/inf values at step {step}; not saving it '
                         f'(last good checkpoint: step {last_saved}); lower optim.lr or set '
                         'skip_nonfinite_steps=True.')
      checkpoints.save(step, state, _data_states(train_iter.get_state(), shard, num_shards))
      last_saved = step

    step = start_step
    with _Preemption() as preemption:
      while step < total and not preempted:
        state, metrics = train_step(state, to_mesh(next(train_iter), step), frozen)
        pending.append(metrics)
        step += 1
        window[1] += 1
        if step == start_step + 1:  # the first step compiles: keep it out of tokens/s
          jax.block_until_ready(metrics)
          window[:] = [time.perf_counter(), 0]
        if jax.process_count() == 1 or step % config.log_every == 0:  # hosts stop together
          preempted = _any_process(preemption.flag.is_set())
        do_eval = step == total or (config.eval_every and step % config.eval_every == 0)
        do_ckpt = step == total or step % config.ckpt_every == 0 or preempted
        if step % config.log_every == 0 or do_eval or do_ckpt:
          flush(step)
        writer.advance(step)
        if do_eval:
          last_eval = validate()
          writer.write(step, last_eval, show=('loss', 'val_loss', 'val_ppl'))
          window[0] = time.perf_counter()
        if do_ckpt:
          save(step)
          window[0] = time.perf_counter()
    if preempted:
      print(f'\nSIGTERM: saved a checkpoint at step {step} in {checkpoints.directory}; run the '
            'same command to resume.', flush=True)
      return {'step': step, 'complete': False, 'preempted': True}

    # ---- 7. The end: final evaluation, loss curve, exported model, sample -------------------
    if not last_eval:  # a completed run started again: evaluate once more, log nothing new
      last_eval = validate()
    summary = {'step': step, 'complete': True, 'preempted': False, **last_eval}
    exporting = start_step < total or not os.path.isdir(os.path.join(workdir, MODEL_DIR))
    whole = lambda tree: tree  # whole arrays on every host (PEFT export, samples)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      whole = functools.partial(multihost_utils.process_allgather, tiled=True)
    if exporting:  # every process writes its shards
      export_model(workdir, model_cfg, model_params(), tokenizer_source=is_main)
    if is_main:
      metrics_lib.plot_losses(workdir)
    if exporting and config.finetune.method in ('lora', 'qlora'):  # + the PEFT adapter
      adapters = whole(distill.student_params(state.params))
      if is_main:
        finetune.export_adapter(workdir, config.finetune, model_cfg, adapters)
    if config.sample.max_new_tokens:
      summary['sample'] = sample_text(model_cfg, whole(model_params()), tokenizer, config.sample)
    return summary


def start_params(config, programs: Programs, teacher=None):
  """(trainable, frozen base or None) at step 0: the params of `config.init_from`, or a random
  init (with distill.init_every, layers copied from the `teacher`), split by the fine-tuning
  method. The base is the same every time, so checkpoints hold only the trainable tree."""
  from flaxllm.distill import hooks as distill  # pylint: disable=import-outside-toplevel
  params_rng = seed_rngs(config)[0]
  if config.init_from:
    params = load_init_params(config.init_from, programs.abstract_params)
  else:
    params = distill.init_student(config, programs.init_params(params_rng), teacher)
  return programs.split(params, params_rng)


def seed_rngs(config):
  """(params_rng, state_rng) of `config.seed`: the initial params and the dropout stream."""
  return jax.random.split(jax.random.PRNGKey(config.seed))


def evaluate(eval_step, params, frozen, batches) -> dict:
  """val_loss (mean CE per token), val_ppl and val_tokens over the sharded `batches` (an
  iterable)."""
  sums = jax.device_get([eval_step(params, batch, frozen) for batch in batches])
  ce = float(sum(s['ce'] for s in sums))
  tokens = float(sum(s['tokens'] for s in sums))
  if not tokens:
    raise TrainError('the validation split has no tokens; raise data.val_fraction or add files.')
  val_loss = ce / tokens
  return {'val_loss': val_loss, 'val_ppl': math.exp(min(val_loss, 700.0)),
          'val_tokens': int(tokens)}


def _any_process(flag: bool) -> bool:
  """True on every process when `flag` is True on any (a SIGTERM reaches hosts at different
  steps; all of them must save the same step)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


def _data_states(local_state: dict, shard: int, num_shards: int) -> dict:
  """What a checkpoint stores of the data: every shard's iterator state (gathered from all
  processes), so that any process can resume its shard."""
  states = {shard: local_state}
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    raw = np.frombuffer(json.dumps([shard, local_state]).encode(), np.uint8)
    size = int(np.max(multihost_utils.process_allgather(np.array([raw.size]))))
    padded = np.zeros((size,), np.uint8)
    padded[:raw.size] = raw
    for row in np.asarray(multihost_utils.process_allgather(padded[None], tiled=True)):
      s, state = json.loads(bytes(row).rstrip(b'\0').decode())
      states[s] = state
  return {'num_shards': num_shards, 'states': {str(k): v for k, v in sorted(states.items())}}


def _data_state_of(saved: dict, shard: int, num_shards: int, workdir: str) -> dict:
  """This process's iterator state in a checkpoint's data states (see `_data_states`)."""
  if 'states' not in saved:  # a single-process checkpoint of an earlier version
    saved = {'num_shards': 1, 'states': {'0': saved}}
  if saved['num_shards'] != num_shards:
    raise TrainError(
        f'the checkpoints in {workdir} read the data in {saved["num_shards"]} shard(s), this run '
        f'in {num_shards}; resume with the same processes and mesh, or (from the start) set '
        "data.process_sharding='global'.")
  return saved['states'][str(shard)]


def export_model(workdir: str, model_cfg, params, tokenizer_source: bool = True):
  """`<workdir>/model/`: the final params in the `flaxllm convert` layout plus the tokenizer, for
  `flaxllm generate --model=<workdir>/model --tokenizer=<workdir>/model/tokenizer.model`.
  Every process calls it (each writes its shards); one copies the tokenizer."""
  from flaxllm.interop import native  # pylint: disable=import-outside-toplevel
  path = os.path.join(workdir, MODEL_DIR)
  native.save_flaxllm(model_cfg, params, path)
  tok = os.path.join(workdir, TOKENIZER_FILE)
  if tokenizer_source and os.path.exists(tok):
    with open(tok, 'rb') as f:
      _write_atomic(os.path.join(path, TOKENIZER_FILE), f.read())
