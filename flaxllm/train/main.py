"""`flaxllm train` and `flaxllm eval`: argument parsing and printed results.

    flaxllm train --config=configs/default.py[:variant=...] --workdir=runs/x [--config.k=v ...]
    flaxllm train --workdir=runs/x                  # resume with the workdir's config.json
    flaxllm train --config=... --workdir='runs/x/{wandb_run_id}'   # a W&B sweep agent's run
    flaxllm eval  --workdir=runs/x [--step=N] [--batches=N]
    flaxllm eval  --model=DIR --tasks=flaxllm_stdlib [--num-fewshot=K --limit=N --output=F.json]
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Optional, Sequence

from flaxllm import cli, rundir
from flaxllm import config as config_lib
from flaxllm.models.config import ConfigError
from flaxllm.parallel import distributed
from flaxllm.train import trainer


def parse_train_args(argv: Sequence[str]):
  """(config spec or None, workdir, overrides) from `--config=... --workdir=... --config.k=v`."""
  p = argparse.ArgumentParser(prog='flaxllm train', description=__doc__.strip().splitlines()[0])
  p.add_argument('--config', help='config file and variant, e.g. configs/default.py:size=tiny; '
                                  "default: the workdir's config.json (resume)")
  p.add_argument('--workdir', required=True, help='run directory (checkpoints, metrics, ...)')
  overrides, rest = cli.split_overrides(argv)
  args = p.parse_args(rest)
  return args.config, args.workdir, overrides


def config_for(spec: Optional[str], workdir: str, overrides: Sequence[str]):
  """The validated config of a command line: from `spec`, or the workdir's stored config."""
  if spec:
    return config_lib.load_config(spec, overrides)
  config = config_lib.stored_config(os.path.abspath(workdir))
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
    id_path = os.path.join(workdir, rundir.WANDB_ID_FILE)
    if not os.path.exists(id_path):
      os.makedirs(workdir, exist_ok=True)
      with open(id_path, 'w') as f:
        f.write(run_id + '\n')
  return workdir


def validation_line(result: dict) -> str:
  """'validation loss L nats (B bits per byte), perplexity P (N tokens)'; a pairwise loss (no
  perplexity) counts examples (pairs)."""
  if 'val_ppl' in result:
    bpb = f' ({result["val_bpb"]:.4f} bits per byte)' if 'val_bpb' in result else ''
    return (f'validation loss {result["val_loss"]:.4f} nats{bpb}, perplexity '
            f'{result["val_ppl"]:.2f} ({result["val_tokens"]} tokens)')
  return f'validation loss {result["val_loss"]:.4f} ({result["val_tokens"]} examples)'


def train_hooks(config) -> tuple:
  """The trainer's evaluation hooks of `config` (checked now, before anything compiles):
  lm-eval tasks when `eval_tasks.tasks` is set (flaxllm.evaluation.in_training)."""
  if not config.eval_tasks.tasks:
    return ()
  from flaxllm.evaluation import in_training  # pylint: disable=import-outside-toplevel -- optional: only with eval_tasks
  return (in_training.hook(config),)


def _train(argv) -> int:
  spec, workdir, overrides = parse_train_args(argv)
  distributed.initialize()  # multi-process runs (TPU VM, SLURM, launch/local.py); else a no-op
  workdir = resolve_workdir(workdir)
  config = config_for(spec, workdir, overrides)
  summary = trainer.train(config, workdir, hooks=train_hooks(config))
  if summary['preempted']:
    return 0
  if summary['complete']:
    print(f'\nRun complete: {summary["step"]}/{config.total_steps} steps in {workdir}.')
    if 'sample' in summary:
      print(f'--- sample (prompt {config.sample.prompt!r}) ---\n{summary["sample"]}\n---')
    extra = {k: v for k, v in summary.items() if k not in (
        'step', 'complete', 'preempted', 'sample', 'val_loss', 'val_ppl', 'val_bpb', 'val_tokens')}
    parts = [f'{k} {v:.4g}' for k, v in extra.items()]
    if 'val_loss' in summary:
      parts.insert(0, validation_line(summary))
    print(', '.join(parts), flush=True)
  return 0


def train_main(argv: Optional[Sequence[str]] = None) -> int:
  """Entry point of `flaxllm train`."""
  cli.enable_compilation_cache()
  return cli.run(_train, argv)


def _limit(value: str):
  """lm-eval's --limit: a document count, or a fraction of each task below 1."""
  number = float(value)
  if number <= 0:
    raise argparse.ArgumentTypeError(f'--limit must be positive, not {value}')
  return int(number) if number >= 1 else number


def _eval(argv) -> int:
  p = argparse.ArgumentParser(
      prog='flaxllm eval', description='Validation loss and perplexity of a checkpoint, or '
      'lm-evaluation-harness tasks with --tasks.')
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument('--workdir', help='a run directory (its newest checkpoint, or --step)')
  source.add_argument('--model', help='with --tasks: a flaxllm model directory or a Hugging Face '
                                      'directory (or a workdir)')
  p.add_argument('--step', type=int, default=None, help='checkpoint step (default: newest)')
  p.add_argument('--batches', type=int, default=None,
                 help='validation batches (default: config.eval_batches; not with --tasks)')
  p.add_argument('--tasks', help='comma-separated lm-eval tasks, groups or tags, e.g. '
                                 'flaxllm_stdlib or hellaswag,arc_easy')
  p.add_argument('--num-fewshot', type=int, default=None,
                 help="in-context examples per prompt (default: each task's own, else 0)")
  p.add_argument('--limit', type=_limit, default=None,
                 help='documents per task (a number, or a fraction below 1)')
  p.add_argument('--batch-size', type=int, default=None, help='rows per compiled call')
  p.add_argument('--mesh', default=None, metavar='AXIS:N,...',
                 help='shard the model over devices, e.g. fsdp:8 or fsdp:4,tensor:2 (default: '
                      'one device)')
  p.add_argument('--include-path', action='append', default=[], metavar='DIR',
                 help="a folder of your own lm-eval task YAMLs (repeatable)")
  p.add_argument('--output', metavar='FILE', help="write lm-eval's results JSON here")
  p.add_argument('--log-samples', action='store_true',
                 help='also write every document, request and answer, one JSONL file per task '
                      'next to --output')
  args = p.parse_args(argv)
  if args.tasks is not None:
    from flaxllm.evaluation import command  # pylint: disable=import-outside-toplevel -- heavy, optional: only with --tasks
    return command.run_tasks(args)
  harness_only = [flag for flag, value in (
      ('--model', args.model), ('--num-fewshot', args.num_fewshot), ('--limit', args.limit),
      ('--batch-size', args.batch_size), ('--mesh', args.mesh),
      ('--include-path', args.include_path),
      ('--output', args.output), ('--log-samples', args.log_samples)) if value]
  if harness_only:
    raise ConfigError(f'{harness_only[0]} needs --tasks (without it flaxllm eval reports the '
                      'validation loss of --workdir).')
  workdir = os.path.abspath(args.workdir)
  result = trainer.evaluate_checkpoint(config_for(None, workdir, ()), workdir, args.step,
                                       args.batches)
  print(f'step {result["step"]}: {validation_line(result)}')
  print(json.dumps(result), flush=True)
  return 0


def eval_main(argv: Optional[Sequence[str]] = None) -> int:
  """Entry point of `flaxllm eval`."""
  cli.enable_compilation_cache()
  return cli.run(_eval, argv)
