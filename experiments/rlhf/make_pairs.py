"""The comparisons of the RLHF experiment: two samples of the SFT model per prompt, ordered by
a noisy rater who follows the true reward (experiments/rlhf/rewards.py).

    python experiments/rlhf/make_pairs.py --sft runs/rlhf/sft --out runs/rlhf/pairs.jsonl

The rater prefers sample a over b with probability sigmoid((true(a) - true(b)) / tau) (the
Bradley-Terry model with noise tau; tau=0.1 flips a 20-character length difference 40% of the
time and a parse / no-parse difference almost never); ties are dropped. Prompts of the RL
stages' training split give `pairs.jsonl` (the reward model and DPO train on it and validate on
its own hashed split); prompts of their validation split give the held-out
`pairs_heldout.jsonl` (rater labels) and `pairs_heldout_true.jsonl` (the true order), which the
RL evaluations also use as their prompts. Each record keeps the two true rewards.
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np

import sampling


def label(samples: dict, repeat: int, tau: float, rng) -> tuple[list[dict], list[dict], dict]:
  """(rater-labelled pairs, truly-ordered pairs, counts) of samples grouped `repeat` per prompt
  (consecutive samples 2j, 2j+1 of a prompt form a pair)."""
  rated, truth, ties, flips = [], [], 0, 0
  assert repeat % 2 == 0, 'samples per prompt must be even'
  for i in range(0, len(samples['completion']), 2):
    a, b = samples['completion'][i], samples['completion'][i + 1]
    ra, rb = samples['true'][i], samples['true'][i + 1]
    if ra == rb:
      ties += 1
      continue
    prompt = [{'role': 'user', 'content': samples['prompt'][i]}]
    better_first = ra > rb
    rater_first = bool(rng.random() < 1.0 / (1.0 + np.exp(-(ra - rb) / tau)))
    flips += int(rater_first != better_first)
    for out, first in ((rated, rater_first), (truth, better_first)):
      c, r = (a, b) if first else (b, a)
      rc, rr = (ra, rb) if first else (rb, ra)
      out.append({'prompt': prompt, 'chosen': c, 'rejected': r,
                  'true_chosen': float(rc), 'true_rejected': float(rr)})
  return rated, truth, {'pairs': len(rated), 'ties_dropped': ties, 'rater_flips': flips}


def write(path: str, records: list[dict]):
  with open(path, 'w') as f:
    for r in records:
      f.write(json.dumps(r) + '\n')


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--sft', default='runs/rlhf/sft')
  p.add_argument('--out', default='runs/rlhf/pairs.jsonl')
  p.add_argument('--samples', type=int, default=4, help='samples per prompt (pairs: half)')
  p.add_argument('--tau', type=float, default=0.1)
  p.add_argument('--seed', type=int, default=0)
  args = p.parse_args(argv)
  data = os.path.dirname(os.path.abspath(args.out))
  s = sampling.sampler(data, reward_model=False)
  params, tokenizer = sampling.load(args.sft)
  rng = np.random.default_rng(args.seed)
  stats = {}
  for split, name in (('train', args.out), ('validation', args.out[:-6] + '_heldout.jsonl')):
    samples = sampling.sample(s, params, tokenizer, sampling.prompt_records(data, split),
                              seed=args.seed + (split == 'validation'), repeat=args.samples)
    rated, truth, counts = label(samples, args.samples, args.tau, rng)
    write(name, rated)
    if split == 'validation':
      write(name[:-6] + '_true.jsonl', truth)
    parses = float(np.mean(np.asarray(samples['true']) > 0.5))
    stats[split] = {**counts, 'samples': len(samples['true']),
                    'mean_true_reward': float(np.mean(samples['true'])), 'parse_rate': parses}
    print(f'{split}: {json.dumps(stats[split])} -> {name}', flush=True)
  write(os.path.join(data, 'pairs_stats.json'), [stats])


if __name__ == '__main__':
  main()
