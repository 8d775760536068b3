"""The task universe of the Alpaca experiment: 13 families of string tasks over identifiers of
the Python standard library (the words the `make train` model's tokenizer knows), each with four
phrasings, and a checker that recomputes a task's answer from its text.

Seven families are the operations of experiments/sft_lora's hand-made set (`KNOWN`: reverse, upper
case, count, sort, join with underscores, first letters, repeat); six are new to it (`NEW`: word
order, lower case, last letters, capitals, hyphens, the longest word). The teacher learns all 13
(`make_data.py`); the students learn what the teacher writes (self-instruct) or the hand-made set.

Three phrasings put the words in the instruction (so instructions differ enough for the ROUGE-L
filter to keep them); the fourth puts them in the input, as many Alpaca tasks do (those
instructions are all alike, and the filter keeps only the first few: Self-Instruct's diversity
rule at work).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import random
import re
from typing import Callable, Optional

from flaxllm.data import self_instruct as si

_SFT_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'sft_lora',
                         'make_data.py')


def _sft_make_data():
  spec = importlib.util.spec_from_file_location('sft_lora_make_data', _SFT_DATA)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


SFT = _sft_make_data()   # the hand-made set's generator: its word list and its tasks
WORDS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'words.txt')


def candidate_words() -> list[str]:
  """The hand-made set's lower-case words, less those Self-Instruct's filter drops a task for (file, ...)."""
  return [w for w in SFT._words() if w.isalpha() and w.islower() and w not in si.FORBIDDEN_WORDS]   # pylint: disable=protected-access -- a sibling script's helper


def read_words() -> list[str]:
  """words.txt (make_data.py --tokenizer writes it): the candidate words that the `make train`
  tokenizer encodes as one piece after a space, so that a task's words are single tokens."""
  with open(WORDS_FILE, encoding='utf-8') as f:
    return f.read().split()


WORDS = read_words()


@dataclasses.dataclass(frozen=True)
class Family:
  name: str
  phrasings: tuple[str, ...]     # format strings with {w}; the one without {w} takes the input
  answer: Callable[[list[str]], str]
  known: bool                    # an operation of experiments/sft_lora's hand-made set
  upper_input: bool = False      # the words are shown in capitals (the lower-case task)


def _longest(ws):
  return max(ws, key=len)


FAMILIES = (
    Family('reverse_letters', ('Reverse the letters of each word: {w}',
                               'Write each of these words backwards: {w}',
                               "Spell every word in '{w}' backwards.",
                               'Reverse the letters of each word in the input.'),
           lambda ws: ' '.join(w[::-1] for w in ws), known=True),
    Family('upper', ('Write these words in upper case: {w}',
                     "Convert '{w}' to capital letters.",
                     'Make every letter upper case: {w}',
                     'Write the input in upper case.'),
           lambda ws: ' '.join(w.upper() for w in ws), known=True),
    Family('count', ("How many words are in '{w}'?",
                     'Count the words: {w}',
                     "Tell me how many words '{w}' has.",
                     'How many words does the input have?'),
           lambda ws: str(len(ws)), known=True),
    Family('sort', ('Sort these words alphabetically: {w}',
                    "Put '{w}' in alphabetical order.",
                    'Arrange the words in dictionary order: {w}',
                    'Sort the words of the input alphabetically.'),
           lambda ws: ' '.join(sorted(ws)), known=True),
    Family('underscores', ('Join these words with underscores: {w}',
                           "Connect '{w}' with underscores into one name.",
                           'Write {w} as one snake_case name.',
                           'Join the words of the input with underscores.'),
           '_'.join, known=True),
    Family('first_letters', ('Give the first letter of each word: {w}',
                             "Which letters start the words '{w}'?",
                             "List each word's initial letter: {w}",
                             'Give the first letter of each word of the input.'),
           lambda ws: ' '.join(w[0] for w in ws), known=True),
    Family('repeat', ("Write '{w}' three times.",
                      'Repeat these words three times: {w}',
                      "Say '{w}' three times in a row.",
                      'Repeat the input three times.'),
           lambda ws: ' '.join([' '.join(ws)] * 3), known=True),
    Family('reverse_order', ('Write these words in reverse order: {w}',
                             "List '{w}' from last to first.",
                             'Reverse the order of the words: {w}',
                             'Write the words of the input in reverse order.'),
           lambda ws: ' '.join(reversed(ws)), known=False),
    Family('lower', ('Write these words in lower case: {w}',
                     "Convert '{w}' to small letters.",
                     'Make every letter lower case: {w}',
                     'Write the input in lower case.'),
           lambda ws: ' '.join(w.lower() for w in ws), known=False, upper_input=True),
    Family('last_letters', ('Give the last letter of each word: {w}',
                            "Which letters end the words '{w}'?",
                            "List each word's final letter: {w}",
                            'Give the last letter of each word of the input.'),
           lambda ws: ' '.join(w[-1] for w in ws), known=False),
    Family('capitals', ('Capitalize each word: {w}',
                        "Write '{w}' with capital initials.",
                        'Capitalize the first letter of: {w}',
                        'Capitalize each word of the input.'),
           lambda ws: ' '.join(w.capitalize() for w in ws), known=False),
    Family('hyphens', ('Join these words with hyphens: {w}',
                       "Connect '{w}' with dashes into one name.",
                       'Write {w} as one kebab-case name.',
                       'Join the words of the input with hyphens.'),
           '-'.join, known=False),
    Family('longest', ("Which is the longest word in '{w}'?",
                       'Find the longest of these words: {w}',
                       'Which word has the most letters: {w}',
                       'Which word of the input is the longest?'),
           _longest, known=False),
)
BY_NAME = {f.name: f for f in FAMILIES}
KNOWN = tuple(f.name for f in FAMILIES if f.known)
NEW = tuple(f.name for f in FAMILIES if not f.known)


def _words_for(family: Family, rng: random.Random) -> list[str]:
  while True:
    ws = rng.sample(WORDS, rng.randint(3, 5))
    lengths = sorted(len(w) for w in ws)
    if family.name != 'longest' or lengths[-1] > lengths[-2]:   # one longest word
      return ws


def make_task(rng: random.Random, family: Optional[Family] = None,
              in_input: Optional[bool] = None) -> dict:
  """One task {'instruction', 'input', 'output', 'family'}; the words go into the input with
  probability 1/4 unless `in_input` says."""
  family = family or rng.choice(FAMILIES)
  ws = _words_for(family, rng)
  shown = ' '.join(w.upper() for w in ws) if family.upper_input else ' '.join(ws)
  if in_input is None:
    in_input = rng.random() < 0.25
  inline = [p for p in family.phrasings if '{w}' in p]
  phrasing = next(p for p in family.phrasings if '{w}' not in p) if in_input else rng.choice(inline)
  return {'instruction': phrasing.format(w=shown), 'input': shown if in_input else '',
          'output': family.answer(ws), 'family': family.name}


_WORDS_RE = r'([A-Za-z]+(?: [A-Za-z]+)*)'


def _pattern(phrasing: str) -> re.Pattern:
  return re.compile('^' + re.escape(phrasing).replace(re.escape('{w}'), _WORDS_RE) + '$')


_PATTERNS = [(f, p, _pattern(p)) for f in FAMILIES for p in f.phrasings]


def check(task: dict) -> tuple[Optional[str], bool]:
  """(the family the instruction belongs to or None, whether the output is its answer): the
  words are read back from the instruction (or the input) and the answer recomputed."""
  instruction = task['instruction'].strip()
  for family, phrasing, pattern in _PATTERNS:
    match = pattern.match(instruction)
    if not match:
      continue
    text = match.group(1) if '{w}' in phrasing else (task.get('input') or '').strip()
    ws = text.split()
    if not ws or not all(w.isalpha() for w in ws):
      return family.name, False
    if family.upper_input:
      ws = [w.lower() for w in ws]
    return family.name, task['output'].strip() == family.answer(ws)
  return None, False
