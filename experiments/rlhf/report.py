"""The RLHF experiment's measurements (experiments/rlhf/README.md).

    python experiments/rlhf/report.py [--data runs/rlhf] [--samples 2]

For the SFT model and every checkpoint of the PPO, GRPO and DPO runs: completions of the
held-out prompts (the RL stages' validation split, `--samples` each, temperature 1, the same
seed for every model), scored by the true reward and the reward model, with the KL to the SFT
model estimated on the same samples. Also the reward model's accuracy on the held-out pairs
(rater labels and true order). Writes `results.json` and `reward_vs_kl.png` next to this file
and prints the README's tables.
"""
from __future__ import annotations

import argparse
import ast
import json
import os

import numpy as np

import rewards
import sampling
from flaxllm import rundir
from flaxllm.objectives.align import reward
from flaxllm.train import reward_cmd

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = ('ppo', 'grpo', 'dpo')


def _has_docstring(signature: str, body: str) -> bool:
  try:
    tree = ast.parse(f'{signature}\n{body}')
  except (SyntaxError, ValueError):
    return False
  return any(isinstance(n, ast.FunctionDef) and ast.get_docstring(n) for n in ast.walk(tree))


def summary(samples: dict) -> dict:
  true = np.asarray(samples['true'])
  return {'true_reward': float(true.mean()), 'rm_score': float(np.mean(samples['model'])),
          'kl_to_sft': float(np.mean(samples['kl_sft'])), 'parse_rate': float(np.mean(true > 0.5)),
          'docstring_rate': float(np.mean([_has_docstring(p, c) for p, c in
                                           zip(samples['prompt'], samples['completion'])])),
          'mean_chars': float(np.mean([len(c) for c in samples['completion']]))}


def reward_model_accuracy(data: str) -> dict:
  cfg, params, head = reward.load_reward_model(os.path.join(data, 'reward'))
  tokenizer = rundir.load_tokenizer(os.path.join(data, 'reward'))
  return {name: reward_cmd.score_pairs(cfg, params, head, tokenizer,
                                       os.path.join(data, f'pairs_heldout{suffix}.jsonl'),
                                       seq_len=cfg.max_seq_len, max_prompt_len=80)
          for name, suffix in (('rater_labels', ''), ('true_order', '_true'))}


def baselines(data: str) -> dict:
  """Accuracy on the held-out pairs of simple rules (ties count half): the true reward
  itself, 'the shorter body wins' and 'the body that parses wins'."""
  out = {}
  for name, suffix in (('rater_labels', ''), ('true_order', '_true')):
    with open(os.path.join(data, f'pairs_heldout{suffix}.jsonl')) as f:
      pairs = [json.loads(line) for line in f]
    parses = lambda r, side: rewards.parses_as_python([r['prompt'][0]['content']], [r[side]])[0]
    rules = {'true_reward': lambda r: np.sign(r['true_chosen'] - r['true_rejected']),
             'shorter_wins': lambda r: np.sign(len(r['rejected']) - len(r['chosen'])),
             'parses_wins': lambda r: np.sign(parses(r, 'chosen') - parses(r, 'rejected'))}
    out[name] = {rule: float(np.mean([(fn(r) + 1) / 2 for r in pairs]))
                 for rule, fn in rules.items()}
  return out


def plot(results: dict, path: str):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for ax, key, title in ((axes[0], 'true_reward', 'true reward'),
                         (axes[1], 'rm_score', 'reward-model score')):
    for run in RUNS:
      curve = results['curves'].get(run)
      if curve:
        points = [results['sft']] + [c for c in curve]
        ax.plot([p['kl_to_sft'] for p in points], [p[key] for p in points], 'o-', label=run)
    ax.set_xlabel('KL(policy || SFT), nats per completion')
    ax.set_ylabel(title)
    ax.set_title(f'{title} against KL (held-out prompts)')
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--data', default='runs/rlhf')
  p.add_argument('--samples', type=int, default=2)
  args = p.parse_args(argv)
  data = os.path.abspath(args.data)
  s = sampling.sampler(data)
  records = sampling.prompt_records(data, 'validation')
  sft, tokenizer = sampling.load(os.path.join(data, 'sft'))
  evaluate = lambda params: sampling.sample(s, params, tokenizer, records, seed=1,
                                            repeat=args.samples, others={'sft': sft})
  results = {'prompts': len(records), 'samples_per_prompt': args.samples,
             'reward_model_accuracy': reward_model_accuracy(data), 'baselines': baselines(data),
             'curves': {}, 'examples': {}}
  before = evaluate(sft)
  results['sft'] = {'step': 0, **summary(before)}
  results['examples']['sft'] = list(zip(before['prompt'], before['completion']))[:6:2]
  for run in RUNS:
    workdir = os.path.join(data, run)
    if not os.path.isdir(workdir):
      continue
    curve = []
    for step in rundir.checkpoint_steps(workdir):
      samples = evaluate(sampling.load(workdir, step)[0])
      curve.append({'step': step, **summary(samples)})
      print(run, json.dumps(curve[-1]), flush=True)
    results['curves'][run] = curve
    results['examples'][run] = list(zip(samples['prompt'], samples['completion']))[:6:2]
  with open(os.path.join(HERE, 'results.json'), 'w') as f:
    json.dump(results, f, indent=1)
  plot(results, os.path.join(HERE, 'reward_vs_kl.png'))
  acc = results['reward_model_accuracy']
  print(f"reward model, held-out pairs: accuracy {acc['rater_labels']['accuracy']:.3f} on "
        f"rater labels, {acc['true_order']['accuracy']:.3f} on the true order "
        f"({acc['true_order']['pairs']} pairs); rules: {json.dumps(results['baselines'])}")
  print('| model | step | true reward | RM score | KL to SFT | parses | docstring | chars |')
  print('|---|---|---|---|---|---|---|---|')
  rows = [('sft', results['sft'])] + [(run, c[-1]) for run, c in results['curves'].items()]
  for name, r in rows:
    print(f"| {name} | {r['step']} | {r['true_reward']:.3f} | {r['rm_score']:.3f} | "
          f"{r['kl_to_sft']:.2f} | {r['parse_rate']:.2f} | {r['docstring_rate']:.2f} | "
          f"{r['mean_chars']:.1f} |")


if __name__ == '__main__':
  main()
