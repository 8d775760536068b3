"""`flaxllm train` and `flaxllm eval`: argument parsing, friendly errors, printed results.

    flaxllm train --config=configs/default.py[:variant=...] --workdir=runs/x [--config.k=v ...]
    flaxllm train --workdir=runs/x                  # resume with the workdir's config.json
    flaxllm train --config=... --workdir='runs/x/{wandb_run_id}'   # a W&B sweep agent's run
    flaxllm eval  --workdir=runs/x [--step=N] [--batches=N]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Optional, Sequence

from flaxllm import config as config_lib
from flaxllm.models.config import ConfigError

# Errors whose message is the whole story (one sentence naming the key and the fix); anything
# else is a bug and keeps its traceback. FLAXLLM_DEBUG=1 shows tracebacks for these too.
_USER_ERRORS = (ConfigError, ValueError, FileNotFoundError, PermissionError)


def _quiet_logs():
  logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
  try:
    from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
    absl_logging.set_verbosity(absl_logging.WARNING)
  except ImportError:
    pass


def _enable_compilation_cache():
  """Re-runs and resumes skip XLA compilation: JAX's persistent cache, in
  $JAX_COMPILATION_CACHE_DIR if set, else <flaxllm cache>/jax."""
  import jax  # pylint: disable=import-outside-toplevel
  if not jax.config.jax_compilation_cache_dir:
    from flaxllm.data.corpus import cache_dir  # pylint: disable=import-outside-toplevel
    jax.config.update('jax_compilation_cache_dir', os.path.join(cache_dir(), 'jax'))


def _run(fn, *args) -> int:
  from flaxllm.train.trainer import TrainError  # pylint: disable=import-outside-toplevel
  try:
    return fn(*args)
  except (TrainError, *_USER_ERRORS) as e:
    if os.environ.get('FLAXLLM_DEBUG'):
      raise
    print(f'error: {e}', file=sys.stderr, flush=True)
    return 1
  except KeyboardInterrupt:
    print('\ninterrupted: the checkpoints already written are kept; run the same command to '
          'resume.', file=sys.stderr, flush=True)
    return 130


def parse_train_args(argv: Sequence[str]):
  """(config spec or None, workdir, overrides) from `--config=... --workdir=... --config.k=v`."""
  p = argparse.ArgumentParser(prog='flaxllm train', description=__doc__.strip().splitlines()[0])
  p.add_argument('--config', help='config file and variant, e.g. configs/default.py:size=tiny; '
                                  "default: the workdir's config.json (resume)")
  p.add_argument('--workdir', required=True, help='run directory (checkpoints, metrics, ...)')
  overrides = [a for a in argv if a.startswith('--config.')]
  args = p.parse_args([a for a in argv if not a.startswith('--config.')])
  return args.config, args.workdir, overrides


def config_for(spec: Optional[str], workdir: str, overrides: Sequence[str]):
  """The validated config of a command line: from `spec`, or the workdir's stored config."""
  if spec:
    return config_lib.load_config(spec, overrides)
  from flaxllm.train.trainer import stored_config  # pylint: disable=import-outside-toplevel
  config = stored_config(os.path.abspath(workdir))
  if config is None:
    raise ConfigError(f'{workdir} has no config.json to resume from; pass '
                      '--config=configs/default.py (or another config file).')
  config.lock()
  config_lib.apply_overrides(config, overrides)
  return config_lib.validate(config)


# In --workdir, replaced by $WANDB_RUN_ID: each run of a W&B sweep agent gets its own workdir.
RUN_ID_PLACEHOLDER = '{wandb_run_id}'


def resolve_workdir(workdir: str) -> str:
  """--workdir with `{wandb_run_id}` replaced by $WANDB_RUN_ID. Under a W&B sweep agent
  ($WANDB_SWEEP_ID set) the run also logs to the agent's W&B run id, which the agent waits for
  (a workdir that already has a W&B id keeps it)."""
  run_id = os.environ.get('WANDB_RUN_ID', '')
  if RUN_ID_PLACEHOLDER in workdir:
    if not run_id:
      raise ConfigError(f'--workdir={workdir} contains {RUN_ID_PLACEHOLDER} but $WANDB_RUN_ID is '
                        'not set; run it under wandb agent or give a plain --workdir.')
    workdir = workdir.replace(RUN_ID_PLACEHOLDER, run_id)
  if run_id and os.environ.get('WANDB_SWEEP_ID'):
    from flaxllm.train import metrics  # pylint: disable=import-outside-toplevel
    id_path = os.path.join(workdir, metrics.WANDB_ID_FILE)
    if not os.path.exists(id_path):
      os.makedirs(workdir, exist_ok=True)
      with open(id_path, 'w') as f:
        f.write(run_id + '\n')
  return workdir


def _train(argv) -> int:
  spec, workdir, overrides = parse_train_args(argv)
  from flaxllm.parallel import distributed  # pylint: disable=import-outside-toplevel
  distributed.initialize()  # multi-process runs (TPU VM, SLURM, launch/local.py); else a no-op
  workdir = resolve_workdir(workdir)
  config = config_for(spec, workdir, overrides)
  from flaxllm.train import trainer  # pylint: disable=import-outside-toplevel
  summary = trainer.train(config, workdir)
  if summary['preempted']:
    return 0
  if summary['complete']:
    print(f'\nRun complete: {summary["step"]}/{config.total_steps} steps in {workdir}.')
    if 'sample' in summary:
      print(f'--- sample (prompt {config.sample.prompt!r}) ---\n{summary["sample"]}\n---')
    print(f'validation loss {summary["val_loss"]:.4f}, perplexity {summary["val_ppl"]:.2f} '
          f'({summary["val_tokens"]} tokens)', flush=True)
  return 0


def train_main(argv: Optional[Sequence[str]] = None) -> int:
  """Entry point of `flaxllm train`."""
  _quiet_logs()
  _enable_compilation_cache()
  return _run(_train, list(sys.argv[1:] if argv is None else argv))


def evaluate_workdir(workdir: str, step: Optional[int] = None,
                     batches: Optional[int] = None) -> dict:
  """Validation loss/perplexity of a run's checkpoint (the newest by default)."""
  from flaxllm import parallel  # pylint: disable=import-outside-toplevel
  from flaxllm.data import pipeline  # pylint: disable=import-outside-toplevel
  from flaxllm.train import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  from flaxllm.train import trainer  # pylint: disable=import-outside-toplevel
  workdir = os.path.abspath(workdir)
  config = config_for(None, workdir, ())
  tokenizer = trainer.workdir_tokenizer(workdir, config)
  mesh = parallel.make_mesh(config.mesh)
  rows = parallel.local_batch_slice(config.batch_size, mesh, config.parallel.rules)
  programs = trainer.build_programs(config, mesh)
  checkpoints = ckpt_lib.Checkpoints(workdir, keep=config.keep_ckpts)
  steps = checkpoints.steps()
  if not steps:
    raise ConfigError(f'{workdir} has no checkpoints; train first with flaxllm train '
                      f'--workdir={workdir}.')
  step = steps[-1] if step is None else step
  if step not in steps:
    raise ConfigError(f'{workdir} has no checkpoint at step {step}; use one of {steps}.')
  state, _ = checkpoints.restore(step, programs.abstract_state)
  checkpoints.close()
  frozen = {}
  if programs.abstract_base is not None:  # fine-tuning: the frozen base, rebuilt as the trainer does
    frozen['base'] = trainer.start_params(config, programs)[1]
  # Every process reads the whole validation batch and keeps its rows.
  val_iter = pipeline.make_iterator(config.data, tokenizer, split='validation',
                                    seq_len=config.seq_len, batch_size=config.batch_size,
                                    seed=config.seed, process_index=0, process_count=1)
  batches = (parallel.shard_batch({k: v[rows] for k, v in b.items()}, mesh, programs.rules)
             for _, b in zip(range(batches or config.eval_batches), val_iter))
  result = trainer.evaluate(programs.eval_step, state.params, frozen, batches)
  val_iter.close()
  return {'step': step, **result}


def _eval(argv) -> int:
  p = argparse.ArgumentParser(prog='flaxllm eval',
                              description='Validation loss and perplexity of a checkpoint.')
  p.add_argument('--workdir', required=True)
  p.add_argument('--step', type=int, default=None, help='checkpoint step (default: newest)')
  p.add_argument('--batches', type=int, default=None,
                 help='validation batches (default: config.eval_batches)')
  args = p.parse_args(argv)
  result = evaluate_workdir(args.workdir, args.step, args.batches)
  print(f'step {result["step"]}: validation loss {result["val_loss"]:.4f}, perplexity '
        f'{result["val_ppl"]:.2f} ({result["val_tokens"]} tokens)')
  print(json.dumps(result), flush=True)
  return 0


def eval_main(argv: Optional[Sequence[str]] = None) -> int:
  """Entry point of `flaxllm eval`."""
  _quiet_logs()
  _enable_compilation_cache()
  return _run(_eval, list(sys.argv[1:] if argv is None else argv))
