"""`flaxllm <command> [flags]`: the command-line entry point.

  flaxllm train     --config=configs/default.py --workdir=runs/default [--config.x.y=v ...]
  flaxllm eval      --workdir=runs/default [--step=N]
  flaxllm generate  --model=DIR --prompt="def " [--max-new-tokens=64 --temperature=0.8 ...]
  flaxllm serve     --model=DIR [--adapter=DIR --port=8000 --slots=8 --api-key=KEY]  # OpenAI API
  flaxllm convert   --from-hf=DIR --to=DIR   |   --from=DIR --to-hf=DIR
                    | --from=DIR --to-gguf=FILE [--type=f32|f16|q8_0]   # llama.cpp
  flaxllm compile   --config=SPEC [--devices=64 | --target=tpu:v5e:8x8] [--budget=16GiB]
  flaxllm sweep     --config=experiments/scaling/sweep.py --workdir=runs/scaling [--workers=2]
                    | --config=SWEEP.py --export-wandb=sweep.yaml [--method=grid|random|bayes]
  flaxllm scaling   fit --sweep-dir=runs/scaling [--target-flops=1e15]  |  table --sweep-dir=...
  flaxllm distill-data --mode=topk|sequences --teacher=DIR --out=DIR [--config=SPEC ...]
  flaxllm reward    --model=REWARD_RUN --data=pairs.jsonl         # a reward model's accuracy
  flaxllm reference-logps --config=DPO_SPEC --out=DIR            # DPO without a reference model
  flaxllm self-instruct --endpoint=URL --model=NAME --num=N --out=FILE [--judge-threshold=S]
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Callable, Sequence

from absl import logging as absl_logging

# command -> (module, function taking argv); imported lazily so `--help` is instant.
COMMANDS = {
    'train': ('flaxllm.train.main', 'train_main'),
    'eval': ('flaxllm.train.main', 'eval_main'),
    'generate': ('flaxllm.generate', 'generate_main'),
    'serve': ('flaxllm.serve.command', 'serve_main'),
    'convert': ('flaxllm.interop.convert', 'convert_main'),
    'compile': ('flaxllm.train.compile', 'main'),
    'sweep': ('flaxllm.sweeps.main', 'sweep_main'),
    'scaling': ('flaxllm.sweeps.main', 'scaling_main'),
    'distill-data': ('flaxllm.train.distill_data', 'main'),
    'reward': ('flaxllm.train.reward_cmd', 'main'),
    'reference-logps': ('flaxllm.train.reference_logps', 'main'),
    'self-instruct': ('flaxllm.data.self_instruct_command', 'self_instruct_main'),
}


# ----------------------------------------------------------------------------- shared helpers

class _CheckpointThreadErrors(logging.Filter):
  """Drops the error logs of orbax's background save threads (and the asyncio futures they
  leave): flaxllm.rundir reports a failed save once, as one sentence with the step that is
  safe, instead of hundreds of lines of thread tracebacks."""

  def filter(self, record: logging.LogRecord) -> bool:
    from_orbax = f'{os.sep}orbax{os.sep}' in record.pathname
    unretrieved = record.name == 'asyncio' and 'exception was never retrieved' in record.msg
    return not (record.levelno >= logging.ERROR and (from_orbax or unretrieved))


def drop_closed_loop_callbacks(unraisable) -> None:
  """A `sys.unraisablehook`: drops the "Event loop is closed" errors of checkpoint-save
  callbacks that finish after a failed save's event loop was shut down (tensorstore calls them
  from C++, so they arrive here, one traceback each); anything else goes to Python's hook."""
  if not (isinstance(unraisable.exc_value, RuntimeError)
          and str(unraisable.exc_value) == 'Event loop is closed'):
    sys.__unraisablehook__(unraisable)


def quiet_logs():
  """Warnings and errors only, from Python and absl logging (FLAXLLM_DEBUG=1: everything orbax
  logs too, and every unraisable error)."""
  logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
  absl_logging.set_verbosity(absl_logging.WARNING)
  if not os.environ.get('FLAXLLM_DEBUG'):
    for handler in logging.getLogger().handlers:
      handler.addFilter(_CheckpointThreadErrors())
    sys.unraisablehook = drop_closed_loop_callbacks


def enable_compilation_cache():
  """Re-runs and resumes skip XLA compilation: JAX's persistent cache, in
  $JAX_COMPILATION_CACHE_DIR if set, else <flaxllm cache>/jax."""
  import jax  # pylint: disable=import-outside-toplevel -- heavy: see run
  from flaxllm.data.corpus import cache_dir  # pylint: disable=import-outside-toplevel -- heavy
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir', os.path.join(cache_dir(), 'jax'))


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """(--config.k=v overrides, the other arguments) of a command line."""
  overrides = [a for a in argv if a.startswith('--config.')]
  return overrides, [a for a in argv if not a.startswith('--config.')]


def run(fn: Callable[[list[str]], int], argv: Sequence[str] | None = None) -> int:
  """Runs a command's `fn(argv)` the way every flaxllm command runs: quiet logs, and a user
  error (bad config, path, checkpoint, ...) printed as its one sentence with exit code 1
  instead of a traceback (FLAXLLM_DEBUG=1 shows it); Ctrl-C keeps what was written.

  The heavy modules (JAX, the trainer) are imported here and in the helpers above, inside the
  functions, so that `flaxllm --help` answers instantly."""
  from flaxllm.train.trainer import TrainError  # pylint: disable=import-outside-toplevel -- heavy
  quiet_logs()
  try:
    return fn(list(sys.argv[2:] if argv is None else argv))
  except (TrainError, ValueError, OSError) as e:   # OSError: a full disk, a missing file, ...
    if os.environ.get('FLAXLLM_DEBUG'):
      raise
    print(f'error: {e}', file=sys.stderr, flush=True)
    return 1
  except KeyboardInterrupt:
    print('\ninterrupted: the checkpoints already written are kept; run the same command to '
          'resume.', file=sys.stderr, flush=True)
    return 130


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if not argv or argv[0] in ('-h', '--help') or argv[0] not in COMMANDS:
    print(__doc__.strip())
    if argv and argv[0] not in ('-h', '--help'):
      print(f'\nerror: unknown command {argv[0]!r}; choose one of {", ".join(COMMANDS)}.',
            file=sys.stderr)
      return 2
    return 0
  module, function = COMMANDS[argv[0]]
  command = getattr(importlib.import_module(module), function)
  return int(run(command, argv[1:]) or 0)   # every command: one sentence, not a traceback


if __name__ == '__main__':
  sys.exit(main())
