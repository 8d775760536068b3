"""experiments/alpaca's data: the teacher learns exactly what `flaxllm self-instruct` parses, the
checker that grades the teacher's data is right (and says so for wrong answers), and the
committed seed and eval files are what make_data.py writes."""
import importlib.util
import json
import os
import random
import sys

from flaxllm.data import self_instruct as si

EXPERIMENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'experiments',
                          'alpaca')


def _script(name, module_name):
  """The experiment's script `name`.py as the module `module_name`."""
  spec = importlib.util.spec_from_file_location(module_name, os.path.join(EXPERIMENT, f'{name}.py'))
  module = sys.modules[module_name] = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


families = _script('families', 'families')      # the name make_data imports it by
make_data = _script('make_data', 'alpaca_make_data')


def test_teacher_documents_are_what_self_instruct_parses():
  rng = random.Random(3)
  for _ in range(20):
    doc = make_data.teacher_document([families.make_task(rng)
                                      for _ in range(make_data.NUM_TASKS)])
    prompt = doc['instruction']
    assert prompt.endswith(f'###\n{make_data.PROMPT_TASKS + 1}. Instruction:')
    assert doc['output'].endswith(si.stop_sequences(make_data.NUM_TASKS)[0])
    # the server stops before the stop sequence: what the command then parses
    reply = doc['output'][:-len(si.stop_sequences(make_data.NUM_TASKS)[0])]
    tasks, rejects = si.parse_response(reply, make_data.PROMPT_TASKS + 1, 'stop')
    assert not rejects
    assert len(tasks) == make_data.NUM_TASKS - make_data.PROMPT_TASKS
    for task in tasks:
      assert si.filter_reason(task) is None
      assert families.check(task)[1], task


def test_check_recomputes_the_answer():
  assert families.check({'instruction': 'Reverse the letters of each word: abc de',
                         'input': '', 'output': 'cba ed'}) == ('reverse_letters', True)
  assert families.check({'instruction': 'Reverse the letters of each word: abc de',
                         'input': '', 'output': 'abc ed'}) == ('reverse_letters', False)
  assert families.check({'instruction': 'Sort the words of the input alphabetically.',
                         'input': 'pear apple', 'output': 'apple pear'}) == ('sort', True)
  assert families.check({'instruction': "Convert 'ONE TWO' to small letters.",
                         'input': '', 'output': 'one two'}) == ('lower', True)
  assert families.check({'instruction': 'Which word has the most letters: ab abcd abc',
                         'input': '', 'output': 'abcd'}) == ('longest', True)
  assert families.check({'instruction': 'Write a poem.', 'input': '',
                         'output': 'x'}) == (None, False)
  rng = random.Random(0)
  for _ in range(500):
    task = families.make_task(rng)
    assert families.check(task) == (task['family'], True)
    wrong = dict(task, output=task['output'] + 'x')
    assert families.check(wrong) == (task['family'], False)


def test_committed_files_are_what_make_data_writes():
  with open(os.path.join(EXPERIMENT, 'seed_tasks.jsonl')) as f:
    assert [json.loads(line) for line in f] == make_data.seed_tasks()
  assert set(families.WORDS) <= set(families.candidate_words()) and len(families.WORDS) >= 50
  seeds = si.read_seed_tasks(os.path.join(EXPERIMENT, 'seed_tasks.jsonl'))
  assert len(seeds) == 2 * len(families.FAMILIES)
  sets = make_data.eval_sets(set())
  for name, records in sets.items():
    with open(os.path.join(EXPERIMENT, 'eval_tasks', 'data', f'{name}.jsonl')) as f:
      assert [json.loads(line) for line in f] == [dict(r, split='test') for r in records]
  assert {r['family'] for r in sets['known']} == set(families.KNOWN)
  assert {r['family'] for r in sets['new']} == set(families.NEW)
  handmade_train = {json.dumps(r, sort_keys=True) for r in families.SFT.make(3000, seed=0)}
  assert not any(json.dumps(r, sort_keys=True) in handmade_train for r in sets['handmade'])
