"""`flaxllm <command> [flags]`: the command-line entry point.

  flaxllm train     --config=configs/default.py --workdir=runs/default [--config.x.y=v ...]
  flaxllm eval      --workdir=runs/default [--step=N]
  flaxllm generate  --model=DIR --prompt="def " [--max-new-tokens=64 --temperature=0.8 ...]
  flaxllm convert   --from-hf=DIR --to=DIR   |   --from=DIR --to-hf=DIR
  flaxllm compile   --config=SPEC [--devices=64 | --target=tpu:v5e:8x8] [--budget=16GiB]
  flaxllm sweep     --config=experiments/scaling/sweep.py --workdir=runs/scaling [--workers=2]
                    | --config=SWEEP.py --export-wandb=sweep.yaml [--method=grid|random|bayes]
  flaxllm scaling   fit --sweep-dir=runs/scaling [--target-flops=1e15]  |  table --sweep-dir=...
  flaxllm distill-data --mode=topk|sequences --teacher=DIR --out=DIR [--config=SPEC ...]
"""
from __future__ import annotations

import importlib
import sys

# command -> (module, function taking argv); imported lazily so `--help` is instant.
COMMANDS = {
    'train': ('flaxllm.train', 'train_main'),
    'eval': ('flaxllm.train', 'eval_main'),
    'generate': ('flaxllm.generate', 'generate_main'),
    'convert': ('flaxllm.interop.hf', 'convert_main'),
    'compile': ('flaxllm.parallel.aot', 'main'),
    'sweep': ('flaxllm.sweeps.main', 'sweep_main'),
    'scaling': ('flaxllm.sweeps.main', 'scaling_main'),
    'distill-data': ('flaxllm.distill.cli', 'main'),
}


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
  result = getattr(importlib.import_module(module), function)(argv[1:])
  return int(result or 0)


if __name__ == '__main__':
  sys.exit(main())
