"""The demonstrations and prompts of the RLHF experiment, made locally from the Python standard
library (no download).

    python experiments/rlhf/make_data.py --out runs/rlhf

Every undecorated function of the stdlib (tests and demos left out) whose signature fits on one
line of at most 48 characters and whose body has at most 100 characters and no comment becomes a
chat record: the user gives the signature, the assistant writes the body
(`sft.jsonl`, {'messages': [user, assistant]}). Each distinct signature is also an RL prompt
(`prompts.jsonl`, {'prompt': [user]}): the SFT model continues it, the reward model or a
reward function scores the result.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import sysconfig
import textwrap

SKIP_DIRS = ('test', 'tests', 'idlelib', 'site-packages', 'lib2to3', 'turtledemo')
MAX_SIGNATURE = 48
MAX_BODY = 100


def functions() -> list[tuple[str, str]]:
  """(signature line, body) of every short stdlib function, in a fixed order."""
  stdlib = sysconfig.get_paths()['stdlib']
  out = []
  for root, dirs, files in os.walk(stdlib):
    dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
    for name in sorted(files):
      if not name.endswith('.py'):
        continue
      try:
        with open(os.path.join(root, name), encoding='utf-8') as f:
          source = f.read()
        tree = ast.parse(source)
      except (SyntaxError, UnicodeDecodeError, ValueError):
        continue
      lines = source.splitlines()
      for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef) or node.decorator_list:
          continue
        text = textwrap.dedent('\n'.join(lines[node.lineno - 1:node.end_lineno]))
        signature, _, body = text.partition('\n')
        if (signature.startswith('def ') and signature.endswith(':')
            and len(signature) <= MAX_SIGNATURE and body.strip() and len(body) <= MAX_BODY
            and '#' not in body):
          out.append((signature, body))
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--out', default='runs/rlhf')
  args = p.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  pairs = functions()
  with open(os.path.join(args.out, 'sft.jsonl'), 'w') as f:
    for signature, body in pairs:
      f.write(json.dumps({'messages': [{'role': 'user', 'content': signature},
                                       {'role': 'assistant', 'content': body}]}) + '\n')
  signatures = sorted({s for s, _ in pairs})
  with open(os.path.join(args.out, 'prompts.jsonl'), 'w') as f:
    for signature in signatures:
      f.write(json.dumps({'prompt': [{'role': 'user', 'content': signature}]}) + '\n')
  print(f'wrote {len(pairs)} demonstrations and {len(signatures)} prompts to {args.out}')


if __name__ == '__main__':
  main()
