"""The training documents and the evaluation tasks of the in-context-learning experiment, made
locally (no download).

    python experiments/icl/make_data.py --out runs/icl

Training (`<out>/icl.jsonl` and `<out>/text.jsonl`, {'text': ...} records):
- **Bursty mapping sequences**: each draws a *fresh* random mapping from a few codes (2 to 8 of
  the 52 letters `a`..`z`, `A`..`Z`) to digits, then lists ~40 pairs `q7` (code, then its
  digit) of that mapping, one per line, the codes drawn uniformly from the few (so each recurs:
  bursty, in the spirit of Chan et al. 2022). A code's digit is unpredictable from anything but
  an earlier line of the same sequence: the only way to lower the loss on it is to read the
  context. (A first version wrote `qx = 7` with two-letter codes; no model learned to match
  the code across the ` = ` in 2,000 steps: experiments/icl/README.md.)
- **Ordinary text**: the Python standard library's source, in chunks of at most 2,000 bytes.
`icl.jsonl` mixes the two half and half by bytes; `text.jsonl` (the control) is the text alone.

Evaluation (`experiments/icl/tasks/data/icl_map<i>.jsonl`, committed; the YAML next to them):
each task is one fixed mapping of 4 codes to 4 distinct digits (a training sequence shows the
same 4 codes with the same digits with probability below 1e-9). Its `fewshot` split (16 rows
per code) is what lm-eval draws the shots from, its `test` split (12 rows per code) is scored:
the model sees k shots `q7` of the task's mapping and then `q`, and picks a digit among ten by
log-likelihood. Without a shot of the same code, nothing beats chance (10%).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import string
import sysconfig

CODES = list(string.ascii_letters)
DIGITS = list(string.digits)
SEQUENCE_BYTES = 120          # ~40 pairs: a packed 128-token row holds one sequence
CHUNK_BYTES = 2000
TEXT_BYTES = 3_000_000
TASKS = 4                     # evaluation mappings (tasks icl_map0..3)
TASK_CODES = 4
FEWSHOT_ROWS, TEST_ROWS = 16, 12   # per code
TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'tasks')


def pair(code: str, digit: str) -> str:
  """One line of a mapping sequence; the tasks' YAML builds the same text ("{{x}}", "", y)."""
  return f'{code}{digit}'


def mapping_sequence(rng: random.Random) -> str:
  """A fresh mapping of 2 to 8 codes to digits, and lines of it until SEQUENCE_BYTES."""
  codes = rng.sample(CODES, rng.randint(2, 8))
  mapping = {c: rng.choice(DIGITS) for c in codes}
  lines, size = [], 0
  while size < SEQUENCE_BYTES:
    code = rng.choice(codes)
    lines.append(pair(code, mapping[code]))
    size += len(lines[-1]) + 1
  return '\n'.join(lines) + '\n'


def text_chunks(limit: int) -> list[str]:
  """The stdlib's .py files, in a fixed order, cut at line ends into chunks of at most
  CHUNK_BYTES, until `limit` bytes."""
  stdlib = sysconfig.get_paths()['stdlib']
  chunks, total = [], 0
  for root, dirs, files in os.walk(stdlib):
    dirs[:] = sorted(d for d in dirs if d not in ('test', 'tests', 'site-packages'))
    for name in sorted(f for f in files if f.endswith('.py')):
      try:
        with open(os.path.join(root, name), encoding='utf-8') as f:
          text = f.read()
      except (UnicodeDecodeError, OSError):
        continue
      chunk = ''
      for line in text.splitlines(keepends=True):
        if len(chunk) + len(line) > CHUNK_BYTES and chunk:
          chunks.append(chunk)
          total += len(chunk)
          chunk = ''
        chunk += line[:CHUNK_BYTES]
      if chunk:
        chunks.append(chunk)
        total += len(chunk)
      if total >= limit:
        return chunks
  return chunks


def write_jsonl(path: str, rows) -> int:
  with open(path, 'w', encoding='utf-8') as f:
    count = 0
    for row in rows:
      f.write(json.dumps(row) + '\n')
      count += 1
  return count


def training_data(out: str, seed: int):
  rng = random.Random(seed)
  text = text_chunks(TEXT_BYTES)
  text_bytes = sum(map(len, text))
  sequences, size = [], 0
  while size < text_bytes:
    sequences.append(mapping_sequence(rng))
    size += len(sequences[-1])
  mixed = [{'text': t} for t in text] + [{'text': s} for s in sequences]
  rng.shuffle(mixed)
  os.makedirs(out, exist_ok=True)
  n_mix = write_jsonl(os.path.join(out, 'icl.jsonl'), mixed)
  n_text = write_jsonl(os.path.join(out, 'text.jsonl'), ({'text': t} for t in text))
  print(f'{out}/icl.jsonl: {n_mix} documents ({len(sequences)} mapping sequences, '
        f'{size / 1e6:.2f} MB; {len(text)} text chunks, {text_bytes / 1e6:.2f} MB); '
        f'{out}/text.jsonl: {n_text} documents')


def task_data(seed: int):
  """One JSONL per evaluation mapping: rows {split, id, x, y, label}; `id` keeps rows of the
  same code distinct, since lm-eval leaves out of the shots every row equal to the scored one."""
  rng = random.Random(seed)
  os.makedirs(os.path.join(TASKS_DIR, 'data'), exist_ok=True)
  for task in range(TASKS):
    codes = rng.sample(CODES, TASK_CODES)
    mapping = dict(zip(codes, rng.sample(DIGITS, TASK_CODES)))
    rows = [{'split': split, 'x': code, 'y': mapping[code], 'label': int(mapping[code])}
            for split, count in (('fewshot', FEWSHOT_ROWS), ('test', TEST_ROWS))
            for code in codes for _ in range(count)]
    rng.shuffle(rows)
    for i, row in enumerate(rows):
      row['id'] = i
    path = os.path.join(TASKS_DIR, 'data', f'icl_map{task}.jsonl')
    write_jsonl(path, rows)
    print(f'{path}: {mapping}')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--out', default='runs/icl')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--tasks', action='store_true', help='(re)write the committed task data')
  args = parser.parse_args()
  training_data(args.out, args.seed)
  if args.tasks:
    task_data(args.seed + 1000)


if __name__ == '__main__':
  main()
