"""Accuracy against the number of shots, through lm-evaluation-harness (experiments/icl/README.md).

    python experiments/icl/evaluate.py --runs runs/icl

For every run in RUNS found under --runs: the `flaxllm` lm-eval backend on its newest
checkpoint, then `lm_eval.simple_evaluate` on the tag `icl_mappings` (this folder's tasks,
4 unseen mappings x 48 scored rows) with 0, 1, 2, 4, 8 and 16 shots, as
`flaxllm eval --workdir=runs/icl/m --tasks=icl_mappings --include-path=experiments/icl/tasks
--num-fewshot=K` does for one point. From the logged samples it also splits the accuracy by
whether the scored code appears among the shots (reading the context is the only way to beat
chance). Writes `results.json` and `accuracy_vs_shots.png` next to this file.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time

os.environ.setdefault('TQDM_DISABLE', '1')   # lm-eval's and the backend's progress bars

import jax
import lm_eval
import numpy as np

from flaxllm.evaluation import harness
from flaxllm.evaluation import tasks as task_lib

HERE = os.path.dirname(os.path.abspath(__file__))
TASKS = os.path.join(HERE, 'tasks')
SHOTS = (0, 1, 2, 4, 8, 16)
RUNS = {'s': 'size s, bursty mix', 's_8k': 'size s, bursty mix, 8000 steps',
        'm': 'size m, bursty mix', 'l': 'size l, bursty mix',
        'l_lr1e-3': 'size l, bursty mix, lr 1e-3', 'm_text': 'size m, text only (control)'}
CHOICES, POOL, POOL_PER_CODE = 10, 64, 16   # as make_data.py writes the tasks


def copier_accuracy(shots: int) -> float:
  """The accuracy of a model that copies the digit when a shot shows the scored code and
  guesses among ten otherwise: shots are drawn without replacement from a pool of 64 rows,
  16 of them of the scored code."""
  unseen = math.comb(POOL - POOL_PER_CODE, shots) / math.comb(POOL, shots)
  return 1 - unseen + unseen / CHOICES


def code_in_shots(sample: dict) -> bool:
  context = sample['arguments'][0][0]
  return any(line[:-1] == sample['doc']['x'] for line in context.split('\n')[:-1])


def evaluate_run(workdir: str) -> dict:
  lm = harness.FlaxLM(pretrained=workdir, batch_size=32)
  manager = task_lib.task_manager((TASKS,))
  points = []
  for shots in SHOTS:
    start = time.time()
    out = lm_eval.simple_evaluate(model=lm, tasks=['icl_mappings'], num_fewshot=shots,
                                  task_manager=manager, log_samples=True)
    samples = [s for rows in out['samples'].values() for s in rows]
    correct = np.array([s['acc'] for s in samples], dtype=float)
    seen = np.array([code_in_shots(s) for s in samples])
    points.append({
        'shots': shots, 'acc': float(correct.mean()),
        'stderr': float(correct.std(ddof=1) / np.sqrt(len(correct))),
        'per_task': {name: float(r['acc,none']) for name, r in out['results'].items()},
        'code_in_shots': float(seen.mean()),
        'acc_code_in_shots': float(correct[seen].mean()) if seen.any() else None,
        'acc_code_not_in_shots': float(correct[~seen].mean()) if (~seen).any() else None,
        'rows': len(samples), 'seconds': round(time.time() - start, 1)})
    print(f'  {shots:2d} shots: acc {points[-1]["acc"]:.3f} ± {points[-1]["stderr"]:.3f} '
          f'(code in shots {seen.mean():.2f}; acc then {points[-1]["acc_code_in_shots"]}, '
          f'else {points[-1]["acc_code_not_in_shots"]})', flush=True)
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    last_eval = [r for r in map(json.loads, f) if 'val_loss' in r][-1]
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(lm.params))
  return {'params': params, 'val_loss': last_eval['val_loss'], 'step': last_eval['step'],
          'points': points}


def plot(results: dict, path: str):
  import matplotlib  # pylint: disable=import-outside-toplevel -- only for the figure
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel -- see above
  x = np.arange(len(SHOTS))
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  for name, run in results['runs'].items():
    acc = [p['acc'] for p in run['points']]
    err = [p['stderr'] for p in run['points']]
    ax.errorbar(x, acc, yerr=err, marker='o', capsize=3,
                label=f'{RUNS[name]} ({run["params"] / 1e6:.2f}M)',
                linestyle='--' if name.endswith('_text') else '-')
  ax.plot(x, [copier_accuracy(k) for k in SHOTS], color='gray', linestyle=':',
          label='copy when the code is in the shots')
  ax.axhline(1 / CHOICES, color='gray', linewidth=0.8)
  ax.set_xticks(x, [str(k) for k in SHOTS])
  ax.set_xlabel('shots (k examples of the unseen mapping in the prompt)')
  ax.set_ylabel('accuracy (10 digits; chance 0.1)')
  ax.set_ylim(0, 1)
  ax.legend(fontsize=8, loc='upper left')
  ax.set_title('In-context learning of a fresh mapping, through lm-eval')
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--runs', default='runs/icl')
  args = parser.parse_args()
  logging.getLogger('lm_eval').setLevel(logging.ERROR)   # its per-task notices
  results = {'shots': list(SHOTS), 'copier': [copier_accuracy(k) for k in SHOTS], 'runs': {}}
  for name in RUNS:
    workdir = os.path.join(args.runs, name)
    if not os.path.isdir(workdir):
      print(f'{workdir}: not found, skipped')
      continue
    print(f'{workdir}:', flush=True)
    results['runs'][name] = evaluate_run(workdir)
  with open(os.path.join(HERE, 'results.json'), 'w', encoding='utf-8') as f:
    json.dump(results, f, indent=2)
  plot(results, os.path.join(HERE, 'accuracy_vs_shots.png'))
  print(f'wrote {HERE}/results.json and {HERE}/accuracy_vs_shots.png')


if __name__ == '__main__':
  main()
