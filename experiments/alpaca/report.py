"""The Alpaca experiment's numbers from its run directory: what self-instruct made and kept, how
much of the kept data is correct (families.check), the harness results of the base and the two
students, llama.cpp's answer, the wall times. Writes experiments/alpaca/results.json and prints
the README's tables.

    python experiments/alpaca/report.py --run-dir=runs/alpaca
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os

import families

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = (('default', 'base (make train)'), ('student_handmade', 'LoRA on the hand-made set'),
          ('student', 'LoRA on the teacher\'s data'))
TASKS = ('alpaca_known', 'alpaca_new', 'alpaca_handmade')


def _json(path):
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def data_quality(path: str) -> dict:
  """Kept records by family (None: no family of the universe) and the share whose output is
  the family's answer."""
  by_family = collections.defaultdict(lambda: [0, 0])
  with open(path, encoding='utf-8') as f:
    for line in f:
      family, correct = families.check(json.loads(line))
      by_family[family or 'none'][0] += 1
      by_family[family or 'none'][1] += int(correct)
  total = sum(n for n, _ in by_family.values())
  correct = sum(c for _, c in by_family.values())
  return {'records': total, 'correct': correct, 'share_correct': correct / max(total, 1),
          'by_family': {k: {'records': n, 'correct': c} for k, (n, c) in sorted(by_family.items())},
          'known_records': sum(by_family[k][0] for k in families.KNOWN),
          'new_records': sum(by_family[k][0] for k in families.NEW)}


def harness(run_dir: str) -> dict:
  out = {}
  for name, _ in MODELS:
    path = os.path.join(run_dir, f'eval_{name}.json')
    if os.path.exists(path):
      results = _json(path)['results']
      # lm-eval's perplexity is exp(-mean over tasks of the output's log-likelihood): its log
      # is the mean log-likelihood of a reference output in nats, the readable number
      out[name] = {t: {'acc': results[t]['acc,none'], 'acc_stderr': results[t]['acc_stderr,none'],
                       'perplexity': results[t]['perplexity,none'],
                       'output_loglik_nats': -math.log(results[t]['perplexity,none'])}
                   for t in TASKS if t in results}
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--run-dir', default='runs/alpaca')
  args = p.parse_args(argv)
  run = args.run_dir
  stats = _json(os.path.join(run, 'data.jsonl.stats.json'))
  result = {
      'self_instruct': {k: stats[k] for k in (
          'kept_total', 'proposed', 'requests', 'completion_tokens', 'elapsed_s',
          'instructions_per_min', 'requests_per_min', 'completion_tokens_per_min', 'share_kept',
          'share_removed', 'removed', 'stopped')},
      'data_quality': data_quality(os.path.join(run, 'data.jsonl')),
      'harness': harness(run),
      'times_s': {},
  }
  if os.path.exists(os.path.join(run, 'times.tsv')):
    with open(os.path.join(run, 'times.tsv')) as f:
      for line in f:
        name, seconds = line.split('\t')
        result['times_s'][name] = result['times_s'].get(name, 0) + int(seconds)
  if os.path.exists(os.path.join(run, 'llama_cpp.json')):
    result['llama_cpp'] = _json(os.path.join(run, 'llama_cpp.json'))
  with open(os.path.join(HERE, 'results.json'), 'w') as f:
    json.dump(result, f, indent=1)

  s = result['self_instruct']
  print(f"self-instruct: {s['kept_total']} kept of {s['proposed']} proposed in {s['requests']} "
        f"requests, {s['elapsed_s']:.0f} s ({s['instructions_per_min']:.0f} instructions/min, "
        f"{s['requests_per_min']:.0f} requests/min, {s['completion_tokens_per_min']:.0f} "
        f"completion tokens/min); stopped: {s['stopped']}")
  print('removed: ' + ', '.join(f'{r} {100 * v:.1f}%' for r, v in s['share_removed'].items())
        + f"; kept {100 * s['share_kept']:.1f}%")
  q = result['data_quality']
  print(f"\ncorrect outputs: {q['correct']} of {q['records']} ({100 * q['share_correct']:.1f}%); "
        f"known families {q['known_records']}, new {q['new_records']}")
  print('\n| family | kept | correct |\n|---|---:|---:|')
  for name, v in q['by_family'].items():
    print(f"| {name} | {v['records']} | {100 * v['correct'] / max(v['records'], 1):.0f}% |")
  print('\nacc (greedy = reference) and the mean log-likelihood of the reference output (nats):')
  print('\n| model | ' + ' | '.join(TASKS) + ' |\n|---|' + '---:|' * len(TASKS))
  for name, label in MODELS:
    if name in result['harness']:
      h = result['harness'][name]
      print(f'| {label} | ' + ' | '.join(
          f"{h[t]['acc']:.2f}, {h[t]['output_loglik_nats']:.1f}" for t in TASKS if t in h) + ' |')
  if 'llama_cpp' in result:
    c = result['llama_cpp']
    print(f"\nllama.cpp: {c['llama_cpp']!r}; flaxllm: {c['flaxllm']!r}; equal: {c['equal']}")
  print('\nwall times (s): ' + ', '.join(f'{k} {v}' for k, v in result['times_s'].items()))
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
