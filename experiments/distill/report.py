"""Table and plot of the distillation experiment from the runs' metrics.jsonl.

    python experiments/distill/report.py [--runs runs/distill] [name=workdir ...]

Writes experiments/distill/val_ppl.png and prints a markdown table (validation loss and
perplexity at every evaluation, the last one in bold) to paste into README.md.
"""
import argparse
import json
import math
import os

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_RUNS = [('teacher (6x320, 10.1M, 400 steps)', 'teacher400'),
                ('student from scratch (2x128, 1.5M)', 'scratch'),
                ('student distilled (2x128, 1.5M)', 'kd')]


def evals(workdir):
  rows = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      r = json.loads(line)
      if 'val_loss' in r:
        rows[r['step']] = r['val_loss']
  return sorted(rows.items())


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--runs', default='runs/distill')
  ap.add_argument('named', nargs='*', help='label=workdir (relative to --runs)')
  args = ap.parse_args()
  runs = [tuple(x.split('=', 1)) for x in args.named] or DEFAULT_RUNS
  data = {}
  for label, wd in runs:
    path = os.path.join(args.runs, wd)
    if os.path.exists(os.path.join(path, 'metrics.jsonl')):
      data[label] = evals(path)
  print('| run | val loss | val ppl | (step) |\n|---|---:|---:|---:|')
  for label, rows in data.items():
    step, loss = rows[-1]
    print(f'| {label} | {loss:.4f} | {math.exp(loss):.1f} | {step} |')
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for label, rows in data.items():
    ax.plot([s for s, _ in rows], [math.exp(v) for _, v in rows], marker='o', label=label)
  ax.set_xlabel('step (8 x 128 tokens each)')
  ax.set_ylabel('validation perplexity')
  ax.set_yscale('log')
  ax.grid(alpha=0.3)
  ax.legend()
  ax.set_title('Distillation on the stdlib corpus (same steps and tokens)')
  fig.tight_layout()
  fig.savefig(os.path.join(HERE, 'val_ppl.png'), dpi=100)
  print(f'wrote {os.path.join(HERE, "val_ppl.png")}')


if __name__ == '__main__':
  main()
