"""The Alpaca experiment's local data (no download), from the task universe of families.py:

    python experiments/alpaca/make_data.py --out-dir runs/alpaca

- `experiments/alpaca/words.txt` (with `--tokenizer`): the words tasks are made of, those of
  experiments/sft_lora's set that the tokenizer encodes as one piece.
- `<out-dir>/teacher.jsonl`: what the teacher learns, Self-Instruct's own prompt (flaxllm's
  `encode_prompt`: the header and 3 example tasks) with the next tasks as the response, up to
  the stop sequence: `{'instruction': PROMPT, 'input': '', 'output': ' TASK 4 ... ###\\n9.
  Instruction:'}`; trained with the template '{instruction}' so the loss is on the tasks only.
  The prompt is cut to its last PROMPT_TOKENS tokens: what `flaxllm self-instruct` sends a
  server with a 512-token context (it keeps context - max_tokens = 256 tokens of the prompt).
- `experiments/alpaca/seed_tasks.jsonl`: 26 seed tasks (two per family) in Alpaca's seed
  format, for `flaxllm self-instruct --seed-tasks`.
- `experiments/alpaca/eval_tasks/data/*.jsonl`: the harness's test sets, 100 tasks each:
  `known` (the hand-made set's 7 operations, phrased as the teacher phrases them), `new` (the
  6 operations the hand-made set lacks) and `handmade` (experiments/sft_lora's own format,
  another seed than its training data). None of them is in the teacher's data or the hand-made
  training set.

The seed, example and eval files are deterministic (seed 0); the committed ones are what this
script writes.
"""
from __future__ import annotations

import argparse
import json
import os
import random

import families
from flaxllm.data import self_instruct as si

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPT_TASKS = 3          # example tasks per prompt (Alpaca: 3)
PROMPT_TOKENS = 256       # the teacher's context (512) less the new tokens it may write (256)
NUM_TASKS = 8             # tasks a prompt asks for: the teacher writes the last 5
EVAL_SIZE = 100


def _record(task):
  return {'instruction': task['instruction'], 'input': task['input'], 'output': task['output']}


def teacher_document(tasks: list[dict], tokenizer=None) -> dict:
  """A Self-Instruct prompt with the first PROMPT_TASKS of `tasks` as examples, and the rest
  as what follows it; with a sentencepiece `tokenizer`, the prompt's last PROMPT_TOKENS tokens
  only."""
  tasks = [_record(t) for t in tasks]
  prompt = si.encode_prompt(tasks[:PROMPT_TASKS], NUM_TASKS)
  full = si.encode_prompt(tasks, NUM_TASKS)
  assert full.startswith(prompt)
  tasks_text = full[len(prompt):]
  if tokenizer is not None:
    prompt = tokenizer.decode(tokenizer.encode(prompt)[-PROMPT_TOKENS:])
  return {'instruction': prompt, 'input': '', 'output': tasks_text}


def write_words(tokenizer) -> list[str]:
  """words.txt: the candidate words that are one piece after a space."""
  base = len(tokenizer.encode('x'))
  words = [w for w in families.candidate_words() if len(tokenizer.encode('x ' + w)) == base + 1]
  with open(families.WORDS_FILE, 'w', encoding='utf-8') as f:
    f.write('\n'.join(words) + '\n')
  return words


def seed_tasks() -> list[dict]:
  rng = random.Random(0)
  out = []
  for family in families.FAMILIES:
    for j, in_input in enumerate((False, True)):
      task = families.make_task(rng, family, in_input)
      out.append({'id': f'seed_task_{len(out)}', 'name': f'{family.name}_{j}',
                  'instruction': task['instruction'],
                  'instances': [{'input': task['input'], 'output': task['output']}],
                  'is_classification': False})
  return out


def eval_sets(exclude: set) -> dict[str, list[dict]]:
  rng = random.Random(1)
  sets = {'known': [], 'new': [], 'handmade': []}
  for name, group in (('known', families.KNOWN), ('new', families.NEW)):
    while len(sets[name]) < EVAL_SIZE:
      task = families.make_task(rng, families.BY_NAME[rng.choice(group)], in_input=False)
      if task['instruction'] not in exclude:
        exclude.add(task['instruction'])
        sets[name].append(task)
  handmade_train = {json.dumps(r, sort_keys=True) for r in families.SFT.make(3000, seed=0)}
  for r in families.SFT.make(4 * EVAL_SIZE, seed=1):
    if json.dumps(r, sort_keys=True) not in handmade_train and len(sets['handmade']) < EVAL_SIZE:
      handmade_train.add(json.dumps(r, sort_keys=True))
      sets['handmade'].append(r)
  return sets


def write_jsonl(path: str, records) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in records)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--out-dir', default='runs/alpaca')
  p.add_argument('--n', type=int, default=8000, help='teacher documents')
  p.add_argument('--tokenizer', default='runs/default/tokenizer.model',
                 help="the `make train` run's sentencepiece model ('' = no words.txt, whole prompts)")
  args = p.parse_args(argv)
  tokenizer = None
  if args.tokenizer:
    import sentencepiece  # pylint: disable=import-outside-toplevel -- only with --tokenizer
    tokenizer = sentencepiece.SentencePieceProcessor(model_file=args.tokenizer)
    families.WORDS[:] = write_words(tokenizer)
  seeds = seed_tasks()
  write_jsonl(os.path.join(HERE, 'seed_tasks.jsonl'), seeds)
  held_out = set()
  sets = eval_sets(held_out)
  for name, records in sets.items():
    write_jsonl(os.path.join(HERE, 'eval_tasks', 'data', f'{name}.jsonl'),
                [dict(r, split='test') for r in records])
  rng = random.Random(0)
  docs = []
  while len(docs) < args.n:
    tasks = [families.make_task(rng) for _ in range(NUM_TASKS)]
    if not any(t['instruction'] in held_out for t in tasks):
      docs.append(teacher_document(tasks, tokenizer))
  write_jsonl(os.path.join(args.out_dir, 'teacher.jsonl'), docs)
  print(f'wrote {len(docs)} teacher documents to {args.out_dir}/teacher.jsonl, {len(seeds)} seed '
        f'tasks and the eval sets ({", ".join(f"{k}: {len(v)}" for k, v in sets.items())})')


if __name__ == '__main__':
  main()
