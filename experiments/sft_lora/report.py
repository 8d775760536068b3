"""Validation loss on responses per fine-tuning method, from the runs' metrics.jsonl.

    python experiments/sft_lora/report.py [--root runs/sft_lora] [--methods lora,qlora,freeze,full]

Prints a markdown table (the validation loss before fine-tuning, at every evaluation, the
first/last train loss and the median tokens/s) to paste into experiments/sft_lora/README.md.
The step-0 column is the base model (`init_from`) on the same validation batches, computed
here from the first run's stored config (with LoRA's zero-initialised B that is the base
exactly, for `full`/`freeze` the base params themselves).
"""
from __future__ import annotations

import argparse
import json
import os


def read(workdir: str) -> dict:
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  evals = {r['step']: r['val_loss'] for r in rows if 'val_loss' in r}
  train = [r for r in rows if 'loss' in r]
  speed = [r['tokens_per_s'] for r in train if 'tokens_per_s' in r]
  return {'evals': evals, 'first_loss': train[0]['loss'] if train else None,
          'last_loss': train[-1]['loss'] if train else None,
          'tokens_per_s': sorted(speed)[len(speed) // 2] if speed else None}


def baseline(workdir: str) -> float:
  """The validation loss of a run's step-0 params (the base model) on the run's validation
  batches, as the trainer computes it."""
  # pylint: disable=import-outside-toplevel
  from flaxllm.train import main as main_lib
  from flaxllm.train import trainer
  workdir = os.path.abspath(workdir)
  config = main_lib.config_for(None, workdir, ())
  tokenizer = trainer.run_tokenizer(workdir, config)
  programs = trainer.build_programs(config)
  trainable, frozen = trainer.start_params(config, programs, {})
  feed = trainer.DataFeed(config, programs, tokenizer)
  val_iter = feed.iterator('validation')
  batches = (feed.to_mesh(b) for _, b in zip(range(config.eval_batches), val_iter))
  result = trainer.evaluate(programs.eval_step, trainable, frozen, batches)
  val_iter.close()
  return result['val_loss']


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--root', default='runs/sft_lora')
  p.add_argument('--methods', default='lora,qlora,freeze,full')
  p.add_argument('--no-baseline', action='store_true', help='skip the step-0 evaluation')
  args = p.parse_args(argv)
  dirs = {m: os.path.join(args.root, m) for m in args.methods.split(',')}
  runs = {m: read(d) for m, d in dirs.items()
          if os.path.exists(os.path.join(d, 'metrics.jsonl'))}
  if not runs:
    raise SystemExit(f'no runs with metrics.jsonl under {args.root}; train them first.')
  start = None if args.no_baseline else baseline(dirs[next(iter(runs))])
  steps = sorted({s for r in runs.values() for s in r['evals']})
  head = ['method'] + (['val loss @ 0 (base)'] if start is not None else [])
  head += [f'val loss @ {s}' for s in steps] + ['train loss first -> last', 'median tokens/s']
  print('| ' + ' | '.join(head) + ' |')
  print('|' + '---|' * len(head))
  for m, r in runs.items():
    cells = [m] + ([f'{start:.3f}'] if start is not None else [])
    cells += [f'{r["evals"][s]:.3f}' if s in r['evals'] else '-' for s in steps]
    cells += [f'{r["first_loss"]:.3f} -> {r["last_loss"]:.3f}',
              f'{r["tokens_per_s"]:.0f}' if r['tokens_per_s'] else '-']
    print('| ' + ' | '.join(cells) + ' |')


if __name__ == '__main__':
  main()
