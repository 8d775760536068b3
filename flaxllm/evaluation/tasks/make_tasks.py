"""Writes the JSONL data of flaxllm's own lm-eval tasks from the Python standard library.

    python flaxllm/evaluation/tasks/make_tasks.py      # rewrites data/*.jsonl next to this file

Standard library only and deterministic (fixed seed, files and functions in sorted order); the
output is committed, so evaluation never regenerates it (another Python version's standard
library would give other documents). Each file holds a `split` field: `train` rows are the
few-shot examples, `test` rows are scored.

- stdlib_docname.jsonl: the first line of a public function's docstring, the function's name and
  three other stdlib function names (`choices`, `label` = index of the right one).
- stdlib_nextline.jsonl: the first lines of a short function (`context`, ending with a newline)
  and the line that follows (`target`, without its newline).
- stdlib_ppl.jsonl: short function sources (`text`) for rolling perplexity.
"""
from __future__ import annotations

import ast
import json
import os
import random
import sysconfig
import textwrap

SEED = 0
HERE = os.path.dirname(os.path.abspath(__file__))
DATA_DIR = os.path.join(HERE, 'data')
MAX_FILE_BYTES = 200_000
SKIP_PARTS = {'test', 'tests', 'idlelib', 'lib2to3', 'site-packages', 'dist-packages',
              'turtledemo', 'ensurepip', '__pycache__', 'pydoc_data', 'venv'}
SIZES = {'docname': (50, 350), 'nextline': (50, 300), 'ppl': (0, 300)}   # (train, test)


def stdlib_files(root: str) -> list[str]:
  out = []
  for base, dirs, files in os.walk(root):
    dirs[:] = sorted(d for d in dirs if d not in SKIP_PARTS and not d.startswith('test'))
    out += [os.path.join(base, f) for f in sorted(files)
            if f.endswith('.py') and not f.startswith('test')]
  return sorted(out)


def functions(root: str) -> list[tuple[str, str, str]]:
  """(name, first docstring line or '', dedented source) of every public module-level function
  and method of a module-level class, in file order."""
  found = []
  for path in stdlib_files(root):
    try:
      with open(path, encoding='utf-8') as f:
        source = f.read()
      tree = ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError):
      continue
    nodes = list(tree.body)
    for node in tree.body:
      if isinstance(node, ast.ClassDef):
        nodes += node.body
    for node in nodes:
      if not isinstance(node, ast.FunctionDef) or node.name.startswith('_'):
        continue
      segment = ast.get_source_segment(source, node)
      if not segment or '\t' in segment:
        continue
      indent = ' ' * node.col_offset
      text = textwrap.dedent(indent + segment)
      doc = (ast.get_docstring(node) or '').strip().splitlines()
      found.append((node.name, doc[0].strip() if doc else '', text))
  return found


def docname(funcs, rng: random.Random) -> list[dict]:
  seen_names, seen_lines, pool = set(), set(), []
  for name, line, _ in funcs:
    if (name in seen_names or line in seen_lines or not 20 <= len(line) <= 100
        or len(name) > 30 or name.lower() in line.lower() or not line.isascii()):
      continue
    seen_names.add(name)
    seen_lines.add(line)
    pool.append((name, line))
  names = sorted(seen_names)
  rows = []
  for name, line in rng.sample(pool, sum(SIZES['docname'])):
    choices = [name] + rng.sample([n for n in names if n != name], 3)
    rng.shuffle(choices)
    rows.append(dict(docstring=line, choices=choices, label=choices.index(name)))
  return rows


def nextline(funcs, rng: random.Random) -> list[dict]:
  seen, pool = set(), []
  for _, _, text in funcs:
    lines = text.splitlines()
    if (text in seen or not 4 <= len(lines) <= 12 or len(text) > 500
        or max(map(len, lines)) > 60 or not text.isascii()):
      continue
    seen.add(text)
    pool.append(lines)
  rows = []
  for lines in rng.sample(pool, len(pool)):
    cuts = [k for k in range(2, len(lines)) if len(lines[k].strip()) >= 4]
    if not cuts:
      continue
    k = rng.choice(cuts)
    rows.append(dict(context='\n'.join(lines[:k]) + '\n', target=lines[k].rstrip()))
    if len(rows) == sum(SIZES['nextline']):
      break
  return rows


def ppl(funcs, rng: random.Random) -> list[dict]:
  seen, pool = set(), []
  for _, _, text in funcs:
    if text in seen or not 200 <= len(text) <= 600 or not text.isascii():
      continue
    seen.add(text)
    pool.append(text)
  return [dict(text=t) for t in rng.sample(pool, sum(SIZES['ppl']))]


def write(name: str, rows: list[dict]):
  train, _ = SIZES[name]
  path = os.path.join(DATA_DIR, f'stdlib_{name}.jsonl')
  lines = [json.dumps({'split': 'train' if i < train else 'test', **row}, sort_keys=True) + '\n'
           for i, row in enumerate(rows)]
  data = ''.join(lines).encode('utf-8')
  if len(data) > MAX_FILE_BYTES:
    raise SystemExit(f'{path} would be {len(data)} bytes; lower SIZES[{name!r}].')
  os.makedirs(DATA_DIR, exist_ok=True)
  with open(path, 'wb') as f:
    f.write(data)
  print(f'{path}: {len(rows)} rows ({train} train), {len(data)} bytes')


def main():
  funcs = functions(sysconfig.get_paths()['stdlib'])
  for name, make in (('docname', docname), ('nextline', nextline), ('ppl', ppl)):
    write(name, make(funcs, random.Random(f'{SEED}:{name}')))


if __name__ == '__main__':
  main()
