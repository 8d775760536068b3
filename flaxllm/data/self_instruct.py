"""Self-Instruct data generation as Alpaca ran it (Wang et al. 2022; Taori et al. 2023), and
GPT4All-style judge filtering: the pure parts (prompting, parsing, filters, files).

The command around them (requests, threads, retries, resuming) is
`flaxllm.data.self_instruct_command` (`flaxllm self-instruct`).

One round of the pipeline:

1. `encode_prompt(tasks)`: a fixed header asking for `num_tasks` (20) new tasks, then k example
   tasks (Alpaca: 3 seed tasks), each as `N. Instruction:` / `N. Input:` / `N. Output:`
   separated by `###`, ending with `k+1. Instruction:` for the model to continue.
2. `parse_response(text, k + 1, finish_reason)`: the proposed tasks of a completion, and the
   chunks that do not parse (a last chunk cut by max_tokens is 'truncated', as Alpaca drops it).
3. `filter_reason(task)`: Alpaca's filters: empty fields, instructions of <= 3 or > 150 words,
   forbidden words (`FORBIDDEN_WORDS`: things a text-only model cannot do), "Write a program"
   openings, a leading punctuation mark or non-ASCII character.
4. `RougePool.most_similar`: the ROUGE-L F-measure (`rouge_score`, no stemming) against every
   instruction already in the pool (seed tasks and kept ones); >= 0.7 is a near-duplicate.
5. Judge (optional): `judge_prompt(task)` asks for a 1-10 score with a fixed rubric;
   `parse_score(reply)` reads it (None: unscored).

Files: seed tasks are Alpaca's `seed_tasks.jsonl` format (`read_seed_tasks`; this package ships
its own, `SEED_TASKS`); the output is Alpaca JSONL (`instruction`, `input`, `output`, plus
metadata keys that `data.format='alpaca'` ignores), appended one record per line so that a
killed run loses at most a torn last line (`read_output`, `repair_tail`).
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import random
import re
import string
import time
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from rouge_score import rouge_scorer

SEED_TASKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'seed_tasks.jsonl')

NUM_TASKS = 20          # tasks one prompt asks for (Alpaca: 20)
MIN_WORDS = 4           # Alpaca drops instructions of <= 3 words ...
MAX_WORDS = 150         # ... and of more than 150
ROUGE_THRESHOLD = 0.7   # ROUGE-L F against the pool at or above this: a near-duplicate
NO_INPUT = '<noinput>'

# Alpaca's list: requests a text-only model cannot fulfil (whole words, any case).
FORBIDDEN_WORDS = ('image', 'images', 'graph', 'graphs', 'picture', 'pictures', 'file', 'files',
                   'map', 'maps', 'draw', 'plot', 'go to', 'video', 'audio', 'music', 'flowchart',
                   'diagram')
_FORBIDDEN = re.compile(r'\b(' + '|'.join(re.escape(w) for w in FORBIDDEN_WORDS) + r')\b',
                        re.IGNORECASE)

# Why a generated task was not kept; the order is the order the filters run in.
REASONS = ('unparsable', 'truncated', 'empty', 'too_short', 'too_long',
           'forbidden_word', 'write_a_program', 'bad_start', 'duplicate', 'rouge',
           'judge_failed', 'judge_unscored', 'judge_low')

PROMPT_HEADER = """\
You are asked to write {num_tasks} new, diverse tasks for training a text-only AI assistant. \
Each task has an instruction, an input (which may be empty) and the output the assistant \
should give.

Requirements:
1. Vary the verbs and the phrasing: mix imperative instructions with questions.
2. Vary the kind of task: writing, rewriting, classification, extraction, reasoning, \
explanation, and programming (writing, fixing or explaining short pieces of code).
3. A text-only assistant must be able to do the task: nothing visual or audible, and no \
actions in the world such as setting reminders or browsing.
4. Write in English. An instruction is one or two sentences.
5. When the task needs an input, give a concrete, realistic one of at most 100 words (or a \
short code snippet). When it needs none, write "{no_input}" as the input.
6. The output is a correct and complete answer to the instruction and the input, in at most \
100 words.

List of {num_tasks} tasks:
"""

JUDGE_PROMPT = """\
You are reviewing training examples for a text-only AI assistant. Rate the example below \
from 1 to 10:
10 = the instruction is clear and doable by a text-only assistant, the input (if any) fits it, \
and the output is correct, complete and concise;
7 = good, with small flaws;
4 = the output is partly wrong or incomplete, or the instruction is vague;
1 = the output is wrong or unrelated, or the instruction is impossible for a text-only \
assistant.
Reply with "Score: N" (N from 1 to 10) and nothing else.

### Instruction:
{instruction}

### Input:
{input}

### Output:
{output}

"""
JUDGE_CUE = 'Score:'   # the completions prompt ends with it; the reply is the number


class SelfInstructError(ValueError):
  """Bad input or an endpoint that cannot be used; the message is one sentence with the fix."""


# ----------------------------------------------------------------------------- prompting

def _one_line(text: str) -> str:
  return re.sub(r'\s+', ' ', text).strip()


def encode_prompt(tasks: Sequence[Mapping[str, str]], num_tasks: int = NUM_TASKS) -> str:
  """The generation prompt: the header, `tasks` as examples 1..k, and `k+1. Instruction:`."""
  prompt = PROMPT_HEADER.format(num_tasks=num_tasks, no_input=NO_INPUT)
  for i, task in enumerate(tasks, 1):
    instruction = _one_line(task['instruction']).rstrip(':')
    task_input = task.get('input') or ''
    prompt += (f'###\n{i}. Instruction: {instruction}\n{i}. Input:\n'
               f'{task_input if task_input.strip() else NO_INPUT}\n{i}. Output:\n'
               f'{task["output"]}\n')
  return prompt + f'###\n{len(tasks) + 1}. Instruction:'


def stop_sequences(num_tasks: int = NUM_TASKS) -> list[str]:
  """Stop before task num_tasks + 1 (the prompt asked for num_tasks in all)."""
  return [f'{num_tasks + 1}. Instruction:']


def sample_prompt_tasks(rng: random.Random, seeds: Sequence[Mapping], generated: Sequence[Mapping],
                        k: int, from_generated: int) -> list[dict]:
  """k example tasks: min(from_generated, len(generated)) of the generated ones, the rest from
  the seeds, in random order (Alpaca: k=3 from the seeds only)."""
  g = min(from_generated, len(generated), k)
  picked = rng.sample(list(seeds), min(k - g, len(seeds))) + rng.sample(list(generated), g)
  rng.shuffle(picked)
  return [{'instruction': t['instruction'], 'input': t.get('input') or '', 'output': t['output']}
          for t in picked]


# ----------------------------------------------------------------------------- parsing

_LABEL = re.compile(r'(\d+)\.\s*(Instruction|Input|Output)\s*:')
_STARTS_NUMBERED = re.compile(r'\s*(?:###\s*)?\d+\.\s*Instruction\s*:')


def parse_response(text: str, first_index: int, finish_reason: Optional[str] = None,
                   chat: bool = False) -> tuple[list[dict], list[dict]]:
  """(tasks, rejects) of one completion of `encode_prompt`'s prompt.

  `text` continues the prompt after `first_index. Instruction:` (a completions reply), or
  repeats that label itself (a chat reply, `chat`: a preamble before the first numbered
  `Instruction:` is dropped); tasks are separated by `###`. A task is
  `{'instruction', 'input', 'output'}` (a `<noinput>` input is ''); a chunk that is not exactly
  one `N. Instruction:` / `N. Input:` / `N. Output:` triple with one number N is a reject
  `{'reason': 'unparsable', 'raw': chunk}`, and the last chunk of a reply cut by max_tokens
  (`finish_reason='length'`) is `{'reason': 'truncated', ...}`. Blank chunks are ignored."""
  text = text or ''
  first = _LABEL.search(text)
  if chat and first and first.group(2) == 'Instruction':
    text = text[first.start():]
  elif not _STARTS_NUMBERED.match(text):
    text = f'{first_index}. Instruction:' + text
  chunks = text.split('###')
  while chunks and not chunks[-1].strip():
    chunks.pop()
  tasks, rejects = [], []
  for i, chunk in enumerate(chunks):
    if not chunk.strip():
      continue
    if i == len(chunks) - 1 and finish_reason == 'length':
      rejects.append({'reason': 'truncated', 'raw': chunk.strip()})
      continue
    parts = _LABEL.split(chunk)   # [before, n, label, body, n, label, body, ...]
    numbers, labels = parts[1::3], parts[2::3]
    if (labels != ['Instruction', 'Input', 'Output'] or len(set(numbers)) != 1
        or parts[0].strip()):
      rejects.append({'reason': 'unparsable', 'raw': chunk.strip()})
      continue
    instruction, task_input, output = (p.strip() for p in parts[3::3])
    if task_input.lower() == NO_INPUT:
      task_input = ''
    tasks.append({'instruction': instruction, 'input': task_input, 'output': output})
  return tasks, rejects


# ----------------------------------------------------------------------------- filters

def filter_reason(task: Mapping[str, str], min_words: int = MIN_WORDS,
                  max_words: int = MAX_WORDS) -> Optional[str]:
  """Why Alpaca's filters drop `task` (a REASONS entry), or None to keep it."""
  instruction = (task.get('instruction') or '').strip()
  if not instruction or not (task.get('output') or '').strip():
    return 'empty'
  words = len(instruction.split())
  if words < min_words:
    return 'too_short'
  if words > max_words:
    return 'too_long'
  if _FORBIDDEN.search(instruction):
    return 'forbidden_word'
  if instruction.startswith('Write a program'):
    return 'write_a_program'
  if instruction[0] in string.punctuation or not instruction[0].isascii():
    return 'bad_start'
  return None


def dedup_key(instruction: str) -> str:
  """Instructions equal up to case and white space are exact duplicates."""
  return ' '.join(instruction.split()).casefold()


def rouge_l(a: str, b: str) -> float:
  """ROUGE-L F-measure of two texts (`rouge_score`, no stemming; symmetric: 2 LCS / (m + n))."""
  return rouge_scorer.RougeScorer(['rougeL'], use_stemmer=False).score(a, b)['rougeL'].fmeasure


class RougePool:
  """The instructions a new one is compared with, pre-tokenized as Alpaca does.

  `most_similar(text)` is the exact maximum ROUGE-L F over the pool; pool entries whose bag of
  tokens cannot reach the best score so far (LCS <= the multiset intersection) are skipped
  without the quadratic LCS."""

  def __init__(self, instructions: Iterable[str] = ()):
    self._scorer = rouge_scorer.RougeScorer(['rougeL'], use_stemmer=False)
    self.texts: list[str] = []
    self._tokens: list[list[str]] = []
    self._bags: list[collections.Counter] = []
    for text in instructions:
      self.add(text)

  def __len__(self) -> int:
    return len(self.texts)

  def tokenize(self, text: str) -> list[str]:
    return self._scorer._tokenizer.tokenize(text)  # pylint: disable=protected-access

  def add(self, text: str) -> None:
    tokens = self.tokenize(text)
    self.texts.append(text)
    self._tokens.append(tokens)
    self._bags.append(collections.Counter(tokens))

  def most_similar(self, text: str) -> tuple[float, Optional[str]]:
    """(the highest ROUGE-L F against the pool, that pool instruction); (0, None) if empty."""
    tokens = self.tokenize(text)
    bag = collections.Counter(tokens)
    best, best_text = 0.0, None
    for other_text, other, other_bag in zip(self.texts, self._tokens, self._bags):
      if not tokens or not other:
        continue
      bound = 2 * sum((bag & other_bag).values()) / (len(tokens) + len(other))
      if bound <= best:
        continue
      score = rouge_scorer._score_lcs(other, tokens).fmeasure  # pylint: disable=protected-access
      if score > best:
        best, best_text = score, other_text
    return best, best_text


def is_near_duplicate(score: float, threshold: float = ROUGE_THRESHOLD) -> bool:
  """ROUGE-L >= threshold (with a float tolerance: 2*7/20 is 0.7 up to rounding)."""
  return score >= threshold - 1e-9


# ----------------------------------------------------------------------------- judge

def judge_prompt(task: Mapping[str, str], cue: bool = True) -> str:
  """The rubric prompt for one task; with `cue` (completions) it ends with 'Score:'."""
  text = JUDGE_PROMPT.format(instruction=task['instruction'].strip(),
                             input=(task.get('input') or '').strip() or NO_INPUT,
                             output=task['output'].strip())
  return text + JUDGE_CUE if cue else text.rstrip() + '\n'


_SCORE = re.compile(r'score\s*(?:is|of|[:=])?\s*\**\s*(\d+(?:\.\d+)?)', re.IGNORECASE)
_NUMBER = re.compile(r'(?<![\d.])(\d+(?:\.\d+)?)')


def parse_score(reply: str) -> Optional[float]:
  """The 1-10 score in a judge's reply ('Score: 8', ' 8', '7.5/10', 'I rate it 6'), or None
  when it holds no number in 1..10 (then the task is 'judge_unscored')."""
  reply = reply or ''
  match = _SCORE.search(reply) or _NUMBER.search(reply)
  if not match:
    return None
  value = float(match.group(1))
  return value if 1 <= value <= 10 else None


# ----------------------------------------------------------------------------- retries

def with_retries(call: Callable[[], Any], retryable: Callable[[BaseException], Optional[float]],
                 retries: int, wait: float, *, sleep: Callable[[float], None] = time.sleep,
                 on_retry: Optional[Callable[[BaseException], None]] = None,
                 max_wait: float = 60.0, rng: Optional[random.Random] = None) -> Any:
  """`call()`, tried again up to `retries` times while it raises an error that `retryable`
  accepts (it returns None for an error to raise at once, else a delay the server asked for,
  or 0): exponential backoff wait * 2**attempt (jittered to 50-100%, at most max_wait)."""
  rng = rng or random.Random()
  for attempt in range(retries + 1):
    try:
      return call()
    except Exception as e:  # pylint: disable=broad-except -- `retryable` decides
      asked = retryable(e)
      if asked is None or attempt == retries:
        raise
      if on_retry:
        on_retry(e)
      delay = min(max_wait, wait * 2 ** attempt) * rng.uniform(0.5, 1.0)
      sleep(min(max_wait, max(delay, asked)))
  raise AssertionError('unreachable')


# ----------------------------------------------------------------------------- files

def read_seed_tasks(path: str, flag: str = '--seed-tasks') -> list[dict]:
  """The seed tasks of an Alpaca `seed_tasks.jsonl` ({"instruction", "instances": [{"input",
  "output"}], ...} per line) as {'instruction', 'input', 'output'} (the first instance)."""
  if not os.path.isfile(path):
    raise SelfInstructError(f'{flag}={path} does not exist; pass a JSONL file of seed tasks (one '
                            '{"instruction", "instances": [{"input", "output"}]} object per line)'
                            ' or leave the flag out for the packaged ones.')
  tasks = []
  with open(path, encoding='utf-8') as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        item = json.loads(line)
      except json.JSONDecodeError as e:
        raise SelfInstructError(f'{flag}={path} line {n} is not valid JSON ({e}); write one JSON '
                                'object per line.') from None
      instances = item.get('instances') if isinstance(item, dict) else None
      first = instances[0] if isinstance(instances, list) and instances else None
      if not (isinstance(item, dict) and isinstance(item.get('instruction'), str)
              and item['instruction'].strip() and isinstance(first, dict)
              and isinstance(first.get('output'), str) and isinstance(first.get('input', ''), str)):
        raise SelfInstructError(f'{flag}={path} line {n} is not a seed task; each line needs a '
                                'non-empty "instruction" and "instances": [{"input": "...", '
                                '"output": "..."}].')
      tasks.append({'instruction': item['instruction'].strip(), 'input': first.get('input', ''),
                    'output': first['output']})
  if not tasks:
    raise SelfInstructError(f'{flag}={path} holds no seed tasks; add one JSON object per line '
                            '({"instruction", "instances": [{"input", "output"}]}).')
  return tasks


@dataclasses.dataclass
class Output:
  """What an output file already holds: its records, and the byte offset of a torn last line
  (None: none) or whether a complete last line lacks its newline."""
  records: list
  size: int = 0
  torn_at: Optional[int] = None
  needs_newline: bool = False


def read_output(path: str, flag: str = '--out', strict: bool = True) -> Output:
  """The JSONL records of `path` ([] when it does not exist). A last line without a newline that
  is not valid JSON is torn (a killed writer) and skipped; any other bad line is an error
  naming it (`strict`) or skipped (not strict: the rejected-records file)."""
  if not os.path.exists(path):
    return Output([])
  if os.path.isdir(path):
    raise SelfInstructError(f'{flag}={path} is a directory; pass a .jsonl file path.')
  with open(path, 'rb') as f:
    data = f.read()
  out = Output([], size=len(data))
  offset = 0
  lines = data.split(b'\n')
  for n, raw in enumerate(lines, 1):
    start, offset = offset, offset + len(raw) + 1
    if not raw.strip():
      continue
    last = n == len(lines)   # no newline after it
    try:
      item = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      if last:
        out.torn_at = start
        break
      if not strict:
        continue
      raise SelfInstructError(f'{flag}={path} line {n} is not valid JSON ({e}); only a torn last '
                              'line is skipped: fix or remove that line, or write to a new '
                              f'{flag}.') from None
    if strict and not (isinstance(item, dict) and isinstance(item.get('instruction'), str)
                       and isinstance(item.get('output'), str)):
      raise SelfInstructError(f'{flag}={path} line {n} is not an Alpaca record (it needs string '
                              '"instruction" and "output"); write to a new file.')
    if isinstance(item, dict):
      out.records.append(item)
    if last:
      out.needs_newline = True
  return out


def repair_tail(path: str, existing: Output) -> Optional[bytes]:
  """Makes `path` end at a line boundary before appending: cuts a torn last line (returned, so
  that the caller can keep it elsewhere) or adds a missing final newline."""
  if existing.torn_at is not None:
    with open(path, 'rb') as f:
      f.seek(existing.torn_at)
      torn = f.read()
    os.truncate(path, existing.torn_at)
    return torn
  if existing.needs_newline:
    with open(path, 'ab') as f:
      f.write(b'\n')
  return None


class JsonlAppender:
  """Appends one JSON record per line: each line is one write(2) of the whole line to an
  O_APPEND descriptor (a kill leaves whole lines, at worst a torn last one), fsync on flush()."""

  def __init__(self, path: str):
    self.path = path
    self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

  def write(self, record: Mapping[str, Any]) -> None:
    data = (json.dumps(record, ensure_ascii=False) + '\n').encode('utf-8')
    while data:
      data = data[os.write(self._fd, data):]

  def flush(self) -> None:
    os.fsync(self._fd)

  def close(self) -> None:
    if self._fd is not None:
      os.fsync(self._fd)
      os.close(self._fd)
      self._fd = None


def write_json_atomic(path: str, value: Any) -> None:
  """`path` replaced by `value` as indented JSON (written to a temporary file, then renamed)."""
  tmp = f'{path}.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(value, f, indent=1, sort_keys=True)
    f.write('\n')
  os.replace(tmp, path)
