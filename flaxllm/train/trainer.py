"""The trainer: one linear function, top to bottom, in the style of big_vision's train.py.

    summary = train(config, workdir)      # config: a validated ConfigDict (flaxllm.config)

Sections: 1 workdir and config, 2 tokenizer and the objective's checks, 3 mesh and programs, 4 state
(resume or init) and frozen trees, 5 data, 6 the loop (step, log, eval, checkpoint, preemption), 7
the end (final eval, loss curve, exports, sample). Running it again on the same workdir resumes
from the newest checkpoint (params, optimizer, rng AND data iterator), or reports that the run is
complete.

What is trained, what stays frozen, the loss, the data layout and what is exported all come
from the objective (`flaxllm.objectives`, built from `config.objective`); the trainer knows no
feature by name. The run directory's layout belongs to `flaxllm.rundir`. Commands add work at
evaluation time through `hooks` (see `train`), e.g. benchmark tasks on the current params.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import signal
import threading
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from flaxllm import config as config_lib
from flaxllm import models, parallel, rundir
from flaxllm.data import tokenizer as tokenizer_lib
from flaxllm.models.config import ConfigError
from flaxllm.objectives import base as objective_base
from flaxllm.objectives import registry as objectives
from flaxllm.train import metrics as metrics_lib
from flaxllm.train import optim
from flaxllm.train import step as step_lib

log = logging.getLogger(__name__)


# An evaluation-time hook: (step, plain_params_fn, tokenizer) -> metrics dict.
Hook = Callable[[int, Callable[[], Any], Any], dict]


class TrainError(RuntimeError):
  """Training cannot go on; the message says why and what to do. Checkpoints are intact."""


class Programs(NamedTuple):
  """What a config compiles to on a mesh: the objective, the model, the optimizer and the
  jitted functions.

  Every function takes and returns arrays sharded over `mesh` by the logical-axis `rules`; the
  state is created in its shards (`jax.jit(..., out_shardings=...)`), never whole on one host.
  """
  objective: Any             # flaxllm.objectives.base.Objective
  model_cfg: models.ModelConfig
  mesh: Any                  # jax.sharding.Mesh
  rules: Any                 # logical-axis rules (flaxllm.parallel.axis_rules)
  tx: Any                    # optax.GradientTransformation (of the trainable tree)
  abstract_params: Any       # the model's full params: ShapeDtypeStructs with shardings
  abstract_state: Any        # TrainState of ShapeDtypeStructs with shardings (restore target)
  abstract_frozen: dict      # the frozen trees of `split` (ShapeDtypeStructs with shardings)
  init_params: Callable      # rng -> the model's full params (random init)
  split: Callable            # (params, rng) -> (trainable, frozen dict); params donated
  init: Callable             # (trainable, rng) -> TrainState (trainable is donated)
  train_step: Callable       # (state, batch, frozen) -> (state, metrics); state is donated
  eval_step: Any            # (params, batch, frozen) -> loss sums; None: no validation loss
  plain_params: Callable     # (trainable, frozen) -> the model's plain params (adapters merged)


def build_programs(config, mesh=None) -> Programs:
  """The Programs of `config` on `mesh` (default: `config.mesh` over all devices); the same
  config in one process reuses the compiled functions (tests, notebooks and sweeps call
  train() repeatedly). Everything but the mesh comes from the config itself, so nothing the
  programs depend on can be left out of the cache key."""
  mesh = parallel.make_mesh(config.mesh) if mesh is None else mesh
  return _build_programs(config_lib.to_json(config), mesh)


@functools.lru_cache(maxsize=8)
def _build_programs(config_json: str, mesh) -> Programs:
  config = config_lib.from_json(config_json)
  objective = objectives.from_config(config)
  model_cfg = objective.model_cfg
  rules = parallel.get_rules(config.parallel.rules)
  model = objective.build_model(train=True)
  specs = parallel.param_specs(model)  # logical PartitionSpec of every model param
  rng = jax.random.PRNGKey(0)

  # ---- shardings: params, trainable, frozen trees and state, from the logical axis names --
  init_params = functools.partial(models.init_params, model)
  abstract_params, params_sh = parallel.abstract_state(init_params, mesh, rules, rng,
                                                       param_specs=specs)
  abstract_trainable, abstract_frozen = jax.eval_shape(objective.split, abstract_params, rng)
  tx = optim.make_optimizer(config, abstract_trainable)
  init = lambda trainable, rng: step_lib.init_state(trainable, tx, rng)
  abstract, state_sh = parallel.abstract_state(
      init, mesh, rules, abstract_trainable, rng,
      param_specs=objective.trainable_specs(specs, abstract_trainable))
  frozen_sh = parallel.state_shardings(abstract_frozen, mesh, rules,
                                       objective.frozen_specs(specs, abstract_frozen))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def on_mesh(fn):
    """`fn` traced with the mesh and rules visible to the models' activation constraints."""
    @functools.wraps(fn)
    def wrapped(*args):
      with parallel.step_context(mesh, rules):
        return fn(*args)
    return wrapped

  train_step = step_lib.make_train_step(
      objective.train_loss(model), tx, optim.schedule_from_config(config),
      accum_steps=config.optim.accum_steps, skip_nonfinite=config.skip_nonfinite_steps,
      use_dropout=model_cfg.dropout > 0, passes=objective.passes,
      minibatches=objective.minibatches)
  eval_loss = objective.eval_loss(objective.build_model(train=False))
  return Programs(
      objective=objective, model_cfg=model_cfg, mesh=mesh, rules=rules, tx=tx,
      abstract_params=abstract_params, abstract_state=abstract,
      abstract_frozen=parallel.with_shardings(abstract_frozen, frozen_sh),
      init_params=jax.jit(on_mesh(init_params), out_shardings=params_sh),
      split=jax.jit(on_mesh(objective.split), out_shardings=(state_sh.params, frozen_sh),
                    donate_argnums=(0,)),
      init=jax.jit(on_mesh(init), out_shardings=state_sh, donate_argnums=(0,)),
      train_step=jax.jit(on_mesh(train_step), out_shardings=(state_sh, replicated),
                         donate_argnums=(0,)),
      eval_step=None if eval_loss is None else jax.jit(
          on_mesh(step_lib.make_eval_step(eval_loss)), out_shardings=replicated),
      plain_params=objective.plain_params)


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


# ----------------------------------------------------------------------------- the trainer

def train(config, workdir: str, devices=None, hooks: Sequence[Hook] = ()) -> dict:
  """Trains (or resumes) the run of `config` in `workdir` on a mesh (`config.mesh`) over
  `devices` (default: all); returns a summary dict with `step`, `complete`, `preempted`, the
  last `val_loss` / `val_ppl` (and the objective's and the hooks' eval metrics) and a `sample`.

  Each hook is called at every evaluation, on every process, as `hook(step, plain_params,
  tokenizer)` (`plain_params()`: the model's whole plain params now) and returns metrics
  (or {}) that are logged with the validation metrics. Hooks must not touch the training
  state, RNG or data, so that resumed runs stay exact."""
  with contextlib.ExitStack() as closing:  # checkpoints, iterators, writers: closed on any exit
    # ---- 1. Workdir and config: a workdir with checkpoints only resumes its experiment -----
    config = config_lib.validate(config)
    workdir = rundir.prepare_workdir(workdir)
    is_main = jax.process_index() == 0
    lock_error = None   # one writer per workdir: process 0 holds the lock for the whole run
    if is_main:
      try:
        closing.enter_context(rundir.WorkdirLock(workdir))
      except rundir.RunDirError as e:
        lock_error = e
    if _any_process(lock_error is not None):
      raise lock_error or TrainError(f'process 0 could not lock {workdir}; see its output.')
    checkpoints = rundir.Checkpoints(workdir, keep=config.keep_ckpts)
    closing.callback(checkpoints.close)  # waits for the last asynchronous save
    resuming = bool(checkpoints.steps())
    stored = config_lib.stored_config(workdir)
    if resuming and stored is not None:
      config_lib.check_resume_compatible(stored, config, workdir)

    # ---- 2. Tokenizer (kept in the workdir); the objective's checks that need it ----------
    tokenizer = run_tokenizer(workdir, config, reuse=resuming)
    objectives.from_config(config).check(tokenizer)   # what needs the tokenizer and data

    # ---- 3. Mesh and programs (every sharding checked before compiling) -------------------
    mesh = parallel.make_mesh(config.mesh, devices)
    programs = build_programs(config, mesh)
    objective = programs.objective

    # ---- 4. State: resume or initialise; the frozen trees ---------------------------------
    restored = checkpoints.restore_latest(programs.abstract_state) if resuming else None
    loaded = objective.load_frozen(mesh, programs.rules)
    trainable, frozen = None, {}
    if restored is None or programs.abstract_frozen:  # split's frozen trees are never saved
      trainable, frozen = start_params(config, programs, loaded)
    frozen = {**frozen, **loaded}
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
    del trainable

    def plain_params():
      """The model's plain params now (adapters merged): export, samples, on-policy data."""
      return programs.plain_params(state.params, frozen)

    whole = lambda tree: tree  # whole arrays on every host (PEFT export, samples, decoding)
    if jax.process_count() > 1:
      whole = functools.partial(multihost_utils.process_allgather, tiled=True)

    # ---- 5. Data: this process's rows of the global batch; the iterators resume -----------
    feed = DataFeed(config, programs, tokenizer)
    train_iter = feed.iterator('train')
    closing.callback(train_iter.close)
    if saved_data is not None:
      train_iter.set_state(_data_state_of(saved_data, feed.shard, feed.num_shards, workdir))
    val_iter = feed.iterator('validation')
    closing.callback(val_iter.close)
    val_start = val_iter.get_state()
    token_bytes = tokenizer.token_bytes()
    batch_hook = objective.batch_hook(  # per-step host work of the objective, if any
        tokenizer, feed.rows if jax.process_count() > 1 else slice(None))

    def validate(step: int) -> dict:
      """Validation metrics on the first `eval_batches` batches (the same every time), then
      the hooks' metrics."""
      result = {}
      if programs.eval_step is not None:
        val_iter.set_state(val_start)
        result = evaluate(programs.eval_step, state.params, frozen, feed,
                          (b for _, b in zip(range(config.eval_batches), val_iter)),
                          objective.token_ce, token_bytes)
      result = {**result, **objective.eval_metrics(lambda: whole(plain_params()), tokenizer)}
      for hook in hooks:
        result.update(hook(step, lambda: whole(plain_params()), tokenizer))
      return result

    if is_main:  # everything checked: record the experiment, rewind metrics to the state
      rundir.save_config_json(workdir, config_lib.to_json(config))
      metrics_lib.rewind_metrics(workdir, start_step)

    # ---- 6. The loop --------------------------------------------------------------------
    total = config.total_steps
    tokens_per_step = config.batch_size * config.seq_len
    flops_per_step = models.flops_per_token(programs.model_cfg, config.seq_len) * tokens_per_step
    peak = config.peak_flops
    if not peak and start_step < total:
      # One device's matmul peak times the mesh's devices (CPU devices share the host's cores:
      # one measurement covers them all).
      chips = 1 if mesh.devices.flat[0].platform == 'cpu' else mesh.devices.size
      peak = metrics_lib.measure_peak_flops(programs.model_cfg.dtype) * chips
      print(f'Measured matmul peak: {peak / 1e9:.1f} GFLOP/s ({programs.model_cfg.dtype}, '
            f'{chips} device(s)).', flush=True)
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
      if not bool(rundir.all_finite(state)):
        raise TrainError(f'the train state has NaN/inf values at step {step}; not saving it '
                         f'(last good checkpoint: step {last_saved}); lower optim.lr or set '
                         'skip_nonfinite_steps=True.')
      checkpoints.save(step, state, _data_states(train_iter.get_state(), feed.shard,
                                                 feed.num_shards))
      last_saved = step

    step = start_step
    with _Preemption() as preemption:
      while step < total and not preempted:
        host_batch = feed.local(next(train_iter))
        if batch_hook is not None:
          host_batch = batch_hook(step, host_batch,
                                  objective_base.Policy(state.params, frozen, plain_params))
        state, metrics = programs.train_step(state, feed.shard_batch(host_batch), frozen)
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
          last_eval = validate(step)
          writer.write(step, last_eval, show=('loss', 'val_loss', 'val_bpb', 'val_ppl'))
          window[0] = time.perf_counter()
        if do_ckpt:
          save(step)
          window[0] = time.perf_counter()
    if preempted:
      print(f'\nSIGTERM: saved a checkpoint at step {step} in {checkpoints.directory}; run the '
            'same command to resume.', flush=True)
      return {'step': step, 'complete': False, 'preempted': True}

    # ---- 7. The end: final evaluation, loss curve, exports, sample ---------------------------
    if not last_eval:  # a completed run started again: evaluate once more, log nothing new
      last_eval = validate(step)
    summary = {'step': step, 'complete': True, 'preempted': False, **last_eval}
    if start_step < total or not rundir.has_exported_model(workdir):
      objective.export(workdir, plain_params(), state.params, whole, is_main)
    if is_main:
      metrics_lib.plot_losses(workdir)
    sample = objective.sample(lambda: whole(plain_params()), tokenizer)
    if sample is not None:
      summary['sample'] = sample
    return summary


def run_tokenizer(workdir: str, config, reuse: bool = True) -> tokenizer_lib.Tokenizer:
  """The run's tokenizer (the objective's `load_tokenizer`), checked against
  model.vocab_size."""
  tokenizer = objectives.get(config.objective).load_tokenizer(workdir, config, reuse)
  try:
    tokenizer_lib.check_vocab(tokenizer, config.model.vocab_size)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  return tokenizer


def start_params(config, programs: Programs, loaded: dict):
  """(trainable, frozen) at step 0: the params of `config.init_from` or a random init, made
  ready by the objective (`initial_params`, which may use the frozen trees in `loaded`),
  then split. The frozen trees are the same every time, so checkpoints hold only the
  trainable tree."""
  params_rng = seed_rngs(config)[0]
  if config.init_from:
    params = rundir.load_params(config.init_from, programs.abstract_params, what='init_from')
  else:
    params = programs.init_params(params_rng)
  return programs.split(programs.objective.initial_params(params, loaded), params_rng)


def seed_rngs(config):
  """(params_rng, state_rng) of `config.seed`: the initial params and the dropout stream."""
  return jax.random.split(jax.random.PRNGKey(config.seed))


class DataFeed:
  """This process's rows of the global batch, loaded by the objective's iterators and sharded
  over the mesh.

  `data.process_sharding='global'`: every process reads the whole global batch and keeps its
  rows; 'source': processes holding different rows read different documents."""

  def __init__(self, config, programs: Programs, tokenizer):
    self.config, self.programs, self.tokenizer = config, programs, tokenizer
    self.rows = parallel.local_batch_slice(config.batch_size, programs.mesh, programs.rules)
    n_rows = self.rows.stop - self.rows.start
    if config.data.process_sharding == 'global':
      self.shard, self.num_shards, self.load_rows = 0, 1, config.batch_size
    else:
      self.shard, self.num_shards = self.rows.start // n_rows, config.batch_size // n_rows
      self.load_rows = n_rows
    self.keep = self.rows if self.load_rows != n_rows else slice(None)

  def iterator(self, split: str):
    return self.programs.objective.data_iterator(
        self.tokenizer, split, seq_len=self.config.seq_len, batch_size=self.load_rows,
        process_index=self.shard, process_count=self.num_shards, seed=self.config.seed)

  def local(self, host_batch: dict) -> dict:
    """This process's rows of a loaded batch."""
    return {k: v[self.keep] for k, v in host_batch.items()}

  def shard_batch(self, local_batch: dict):
    return parallel.shard_batch(local_batch, self.programs.mesh, self.programs.rules)

  def to_mesh(self, host_batch: dict):
    return self.shard_batch(self.local(host_batch))


def evaluate(eval_step, params, frozen, feed: 'DataFeed', host_batches, token_ce: bool = True,
             token_bytes: np.ndarray | None = None) -> dict:
  """val_loss (the objective per token), val_tokens, val_ppl and, given the tokenizer's
  `token_bytes`, val_bpb (bits per UTF-8 byte of the predicted text: the summed cross-entropy
  over ln 2 x the bytes of the target tokens, so runs with different tokenizers compare; only
  where the loss is a cross-entropy per token: `token_ce`), and every other sum of the eval
  LossFn per token as val_<metric> (as the train step names them), over `host_batches`."""
  sums, target_bytes = [], 0
  for batch in host_batches:
    sums.append(eval_step(params, feed.to_mesh(batch), frozen))
    if token_ce and token_bytes is not None:
      local = feed.local(batch)
      target_bytes += int(np.sum(token_bytes[local['targets']] * (local['loss_mask'] > 0)))
  sums = jax.device_get(sums)
  total = {k: float(sum(s[k] for s in sums)) for k in sums[0]}
  if not total['tokens']:
    raise TrainError('the validation split has no tokens; raise data.val_fraction or add files.')
  result = {f'val_{k}': float(v) for k, v in step_lib.per_token_metrics(total).items()}
  if token_ce:
    result['val_ppl'] = math.exp(min(result['val_loss'], 700.0))
    if token_bytes is not None:
      if jax.process_count() > 1:
        target_bytes = int(np.sum(multihost_utils.process_allgather(np.array([target_bytes]))))
      result['val_bpb'] = total['ce'] / (math.log(2) * max(target_bytes, 1))
  return {**result, 'val_tokens': int(total['tokens'])}


def evaluate_checkpoint(config, workdir: str, step: int | None = None,
                        batches: int | None = None) -> dict:
  """Validation metrics of a run's checkpoint (the newest by default), with the trainer's own
  programs, frozen trees and data rows (`flaxllm eval`)."""
  tokenizer = run_tokenizer(workdir, config)
  programs = build_programs(config)
  if programs.eval_step is None:
    raise ConfigError(f'objective={config.objective!r} has no validation loss to evaluate; its '
                      f'validation metrics are in {workdir}/{rundir.METRICS_FILE}.')
  checkpoints = rundir.Checkpoints(workdir, read_only=True)
  try:
    steps = checkpoints.steps()
    if not steps:
      raise ConfigError(f'{workdir} has no checkpoints; train first with flaxllm train '
                        f'--workdir={workdir}.')
    step = steps[-1] if step is None else step
    if step not in steps:
      raise ConfigError(f'{workdir} has no checkpoint at step {step}; use one of {steps}.')
    state, _ = checkpoints.restore(step, programs.abstract_state)
  finally:
    checkpoints.close()
  loaded = programs.objective.load_frozen(programs.mesh, programs.rules)
  frozen = {**(start_params(config, programs, loaded)[1] if programs.abstract_frozen else {}),
            **loaded}
  feed = DataFeed(config, programs, tokenizer)
  val_iter = feed.iterator('validation')
  try:
    result = evaluate(programs.eval_step, state.params, frozen, feed,
                      (b for _, b in zip(range(batches or config.eval_batches), val_iter)),
                      programs.objective.token_ce, tokenizer.token_bytes())
  finally:
    val_iter.close()
  return {'step': step, **result}


def _any_process(flag: bool) -> bool:
  """True on every process when `flag` is True on any (a SIGTERM reaches hosts at different
  steps; all of them must save the same step)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


def _data_states(local_state: dict, shard: int, num_shards: int) -> dict:
  """What a checkpoint stores of the data: every shard's iterator state (gathered from all
  processes), so that any process can resume its shard."""
  states = {shard: local_state}
  if jax.process_count() > 1:
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
