"""A small instruction set made locally (no download): Alpaca-format JSONL of simple string
tasks over identifiers from the Python standard library (the `make train` model's corpus).

    python experiments/sft_lora/make_data.py --out runs/sft_lora/data.jsonl [--n 3000]

Tasks (the instruction names the task, the input holds the words, the output is the answer):
reverse a word, upper-case words, count the words, sort words, join words with underscores,
the first letter of each word, repeat a word three times, and a few without input
("Write a Python keyword.").
"""
from __future__ import annotations

import argparse
import json
import keyword
import os
import random
import re
import sysconfig


def _words(limit: int = 3000) -> list[str]:
  """Identifiers from stdlib file names and keywords: words the base tokenizer has seen."""
  stdlib = sysconfig.get_paths()['stdlib']
  names = set(keyword.kwlist)
  for f in sorted(os.listdir(stdlib))[:400]:
    names.update(w for w in re.split(r'[^a-z]+', f.lower()) if 3 <= len(w) <= 10)
  names.update(['print', 'return', 'value', 'string', 'number', 'list', 'index', 'object',
                'class', 'module', 'import', 'result', 'data', 'file', 'path', 'name'])
  return sorted(names)[:limit]


TASKS = [
    ('Reverse the letters of the word.', 1, lambda ws: ws[0][::-1]),
    ('Write the words in upper case.', 2, lambda ws: ' '.join(w.upper() for w in ws)),
    ('How many words are there?', 3, lambda ws: str(len(ws))),
    ('Sort the words alphabetically.', 3, lambda ws: ' '.join(sorted(ws))),
    ('Join the words with underscores.', 3, lambda ws: '_'.join(ws)),
    ('Give the first letter of each word.', 3, lambda ws: ' '.join(w[0] for w in ws)),
    ('Repeat the word three times.', 1, lambda ws: ' '.join([ws[0]] * 3)),
]


def make(n: int, seed: int = 0) -> list[dict]:
  rng = random.Random(seed)
  words = _words()
  out = []
  for _ in range(n):
    if rng.random() < 0.05:
      out.append({'instruction': 'Write a Python keyword.', 'input': '',
                  'output': rng.choice(keyword.kwlist)})
      continue
    instruction, k, fn = rng.choice(TASKS)
    ws = rng.sample(words, rng.randint(2, 5) if k == 3 else k)
    out.append({'instruction': instruction, 'input': ' '.join(ws), 'output': fn(ws)})
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--out', default='runs/sft_lora/data.jsonl')
  p.add_argument('--n', type=int, default=3000)
  p.add_argument('--seed', type=int, default=0)
  args = p.parse_args(argv)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w') as f:
    for r in make(args.n, args.seed):
      f.write(json.dumps(r) + '\n')
  print(f'wrote {args.n} records to {args.out}')


if __name__ == '__main__':
  main()
