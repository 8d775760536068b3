"""`flaxllm self-instruct` (flaxllm/data/self_instruct.py and self_instruct_command.py).

Unit tests of the prompt, the parser on a hand-written completion, the ROUGE-L, length and
forbidden-word filters (ROUGE-L computed by hand in the comments), the judge-score parser, the
retry backoff and the files; then the command end to end against a scripted OpenAI-compatible
server on loopback (tests/fake_openai.py: planted duplicates, garbage, judge scores, 503s), a
killed run resumed, an endpoint that is down, and a live `flaxllm serve` on a tiny random model.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

openai = pytest.importorskip('openai')

import fake_openai  # noqa: E402  (tests/ is on sys.path)

from flaxllm import cli  # noqa: E402
from flaxllm.data import instruct  # noqa: E402
from flaxllm.data import self_instruct as si  # noqa: E402
from flaxllm.data.tokenizer import ByteTokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = 'sk-test-secret-5f2c9a7e'     # must never show up in output or files
KEY_ENV = 'FLAXLLM_TEST_SI_KEY'


# ----------------------------------------------------------------------------- prompt, parser

def test_encode_prompt_is_alpacas_layout():
  tasks = [{'instruction': 'Sort the  list\nin ascending order:', 'input': '3, 1, 2',
            'output': '1, 2, 3'},
           {'instruction': 'Name a primary colour.', 'input': '', 'output': 'Red.'}]
  prompt = si.encode_prompt(tasks, num_tasks=20)
  header = si.PROMPT_HEADER.format(num_tasks=20, no_input='<noinput>')
  assert prompt == header + (
      '###\n1. Instruction: Sort the list in ascending order\n1. Input:\n3, 1, 2\n'
      '1. Output:\n1, 2, 3\n'
      '###\n2. Instruction: Name a primary colour.\n2. Input:\n<noinput>\n2. Output:\nRed.\n'
      '###\n3. Instruction:')
  assert 'write 20 new' in header and header.endswith('List of 20 tasks:\n')
  assert si.stop_sequences(20) == ['21. Instruction:']


# A completions reply to a prompt with 3 examples: it continues after '4. Instruction:'.
COMPLETION = (
    ' Name the capital city of Australia.\n4. Input:\n<noinput>\n4. Output:\nCanberra.\n'
    '###\n'
    '5. Instruction: Convert the temperature from Celsius to Fahrenheit.\n'
    '5. Input:\n25 degrees Celsius\n5. Output:\n77 degrees Fahrenheit.\n'
    '###\n'
    '6. Instruction: Give an example of a prime number greater than 50.\n'
    '6. Output:\n53\n'                                    # malformed: no Input
    '###\n'
    '7. Instruction: Rewrite the sentence in the passive voice.\n'
    '8. Input:\nThe cat chased the mouse.\n'               # malformed: 7 / 8 / 7
    '7. Output:\nThe mouse was chased by the cat.\n'
    '###\n'
    '8. Instruction: Explain why the sky looks blue during the day.\n'
    '8. Input:\n<noinput>\n8. Output:\nSunlight is scattered by air molecules, and blue')


def test_parse_response_on_a_hand_written_completion():
  tasks, rejects = si.parse_response(COMPLETION, 4, finish_reason='length')
  assert tasks == [
      {'instruction': 'Name the capital city of Australia.', 'input': '', 'output': 'Canberra.'},
      {'instruction': 'Convert the temperature from Celsius to Fahrenheit.',
       'input': '25 degrees Celsius', 'output': '77 degrees Fahrenheit.'}]
  assert [r['reason'] for r in rejects] == ['unparsable', 'unparsable', 'truncated']
  assert rejects[0]['raw'].startswith('6. Instruction: Give an example')
  assert rejects[2]['raw'].endswith('and blue')
  # Stopped by a stop sequence instead: the last task is whole and kept.
  tasks, rejects = si.parse_response(COMPLETION, 4, finish_reason='stop')
  assert len(tasks) == 3 and tasks[2]['output'].endswith('and blue')
  assert [r['reason'] for r in rejects] == ['unparsable', 'unparsable']
  # Garbage, or an empty answer: one unparsable chunk each (the reply proposed nothing usable).
  assert si.parse_response('}{ lorem ipsum 42', 4) == ([], [
      {'reason': 'unparsable', 'raw': '4. Instruction:}{ lorem ipsum 42'}])
  assert si.parse_response('  \n###\n  ', 4) == ([], [
      {'reason': 'unparsable', 'raw': '4. Instruction:'}])


def test_parse_a_chat_reply_with_a_preamble_and_its_own_numbers():
  reply = ('Sure! Here are more tasks:\n\n4. Instruction: Name the largest planet.\n4. Input:\n'
           '<noinput>\n4. Output:\nJupiter.\n###\n5. Instruction: Add the two numbers.\n'
           '5. Input:\n2 and 3\n5. Output:\n5\n')
  tasks, rejects = si.parse_response(reply, 4, 'stop', chat=True)
  assert [t['instruction'] for t in tasks] == ['Name the largest planet.', 'Add the two numbers.']
  assert rejects == []
  # The completions reading of the same text: the preamble spoils the first chunk only.
  tasks, rejects = si.parse_response(reply, 4, 'stop')
  assert [t['instruction'] for t in tasks] == ['Add the two numbers.']
  assert [r['reason'] for r in rejects] == ['unparsable']


# ----------------------------------------------------------------------------- filters

def test_rouge_l_filter_on_a_hand_computed_example():
  pool = si.RougePool(['Explain the difference between a list and a tuple in Python.'])
  # rouge_score lowercases and splits on non-alphanumerics:
  #   pool: explain the difference between a list and a tuple in python        (m = 11)
  #   new:  explain the main difference between a python list and a tuple      (n = 11)
  #   LCS:  explain the difference between a list and a tuple                  (L = 9)
  #   P = 9/11, R = 9/11, F = 2PR/(P+R) = 2L/(m+n) = 18/22 = 0.8182 >= 0.7: removed.
  near = 'Explain the main difference between a Python list and a tuple.'
  score, similar = pool.most_similar(near)
  assert score == pytest.approx(18 / 22, abs=1e-12)
  assert similar == pool.texts[0]
  assert si.is_near_duplicate(score)
  assert si.rouge_l(near, pool.texts[0]) == pytest.approx(18 / 22, abs=1e-12)
  #   new: explain what a tuple is (n = 5); LCS with the pool: explain a tuple (L = 3)
  #   F = 2*3/(11+5) = 0.375: kept.
  score, _ = pool.most_similar('Explain what a tuple is.')
  assert score == pytest.approx(6 / 16, abs=1e-12) and not si.is_near_duplicate(score)
  # The boundary: 10 tokens each, LCS 7, F = 14/20 = 0.7 (0.6999... in floating point) counts.
  boundary = si.RougePool(['one two three four five six seven eight nine ten'])
  score, _ = boundary.most_similar('one two three four five six seven alpha beta gamma')
  assert score == pytest.approx(0.7) and si.is_near_duplicate(score, 0.7)
  # The pruned search gives the exact maximum of the plain scorer over a bigger pool.
  texts = [t['instruction'] for t in si.read_seed_tasks(si.SEED_TASKS)]
  big = si.RougePool(texts)
  for query in ('Write a haiku about autumn leaves falling in the wind.',
                'Summarize the paragraph in two sentences.', 'What does this code print?'):
    want = max(si.rouge_l(query, t) for t in texts)
    assert big.most_similar(query)[0] == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize('instruction,output,reason', [
    ('Draw a simple house with a garden.', 'x', 'forbidden_word'),
    ('Describe the IMAGE below in one sentence.', 'x', 'forbidden_word'),
    ('Plot the monthly sales numbers.', 'x', 'forbidden_word'),
    ('Tell me how to go to the station.', 'x', 'forbidden_word'),
    ('Compose some music for a birthday.', 'x', 'forbidden_word'),
    ('Explain the mapping between keys and values.', 'x', None),      # 'map' is a whole word only
    ('Profile the function and name its slowest line.', 'x', None),   # 'file' inside a word
    ('Sort this list.', 'x', 'too_short'),                             # 3 words
    ('Sort this list please.', 'x', None),                             # 4 words
    ('Explain ' + 'very ' * 148 + 'much.', 'x', None),                 # 150 words
    ('Explain ' + 'very ' * 149 + 'much.', 'x', 'too_long'),           # 151 words
    ('Name three rivers of Africa.', '   ', 'empty'),
    ('', 'x', 'empty'),
    ('Write a program that adds two numbers.', 'x', 'write_a_program'),
    ('- Name three rivers of Africa.', 'x', 'bad_start'),
    ('Érigez une liste de trois fleuves.', 'x', 'bad_start'),
])
def test_forbidden_word_and_length_filters(instruction, output, reason):
  assert si.filter_reason({'instruction': instruction, 'input': '', 'output': output}) == reason


@pytest.mark.parametrize('reply,score', [
    (' 8', 8.0), ('Score: 7', 7.0), ('score = 10/10', 10.0), ('**Score:** 3', 3.0),
    ('7.5 out of 10', 7.5), ('I would rate it 6.', 6.0), ('Score: 42', None), ('0', None),
    ('No number here.', None), ('', None)])
def test_parse_score(reply, score):
  assert si.parse_score(reply) == score


def test_judge_prompt_has_the_task_and_the_cue():
  task = {'instruction': 'Name a colour.', 'input': '', 'output': 'Blue.'}
  text = si.judge_prompt(task)
  assert text.startswith(fake_openai.JUDGE_START)
  assert '### Instruction:\nName a colour.\n\n### Input:\n<noinput>\n\n### Output:\nBlue.' in text
  assert text.endswith('Score:') and not si.judge_prompt(task, cue=False).endswith('Score:')


def test_retries_back_off_exponentially_and_are_bounded():
  class Busy(Exception):
    pass

  slept, calls = [], []

  def call():
    calls.append(1)
    raise Busy()

  rng = __import__('random').Random(0)
  with pytest.raises(Busy):
    si.with_retries(call, lambda e: 0.0 if isinstance(e, Busy) else None, retries=4, wait=1.0,
                    sleep=slept.append, rng=rng, max_wait=5.0)
  assert len(calls) == 5 and len(slept) == 4
  for attempt, delay in enumerate(slept):   # 1, 2, 4, min(8, 5): jittered to 50-100%
    top = min(5.0, 2.0 ** attempt)
    assert top / 2 <= delay <= top
  calls.clear()
  with pytest.raises(KeyError):             # not retryable: raised at once
    si.with_retries(lambda: calls.append(1) or {}['x'], lambda e: None, retries=4, wait=1.0,
                    sleep=slept.append)
  assert len(calls) == 1
  outcomes = iter([Busy(), Busy(), 'ok'])

  def flaky():
    item = next(outcomes)
    if isinstance(item, Exception):
      raise item
    return item

  assert si.with_retries(flaky, lambda e: 0.0, retries=2, wait=0.0, sleep=lambda s: None) == 'ok'


# ----------------------------------------------------------------------------- files

def test_packaged_seed_tasks_are_alpaca_format_and_pass_the_filters():
  lines = open(si.SEED_TASKS, encoding='utf-8').read().splitlines()
  raw = [json.loads(line) for line in lines]
  assert len(raw) >= 30
  assert len({r['id'] for r in raw}) == len(raw) and len({r['name'] for r in raw}) == len(raw)
  for r in raw:
    assert set(r) >= {'id', 'name', 'instruction', 'instances', 'is_classification'}
    assert r['instances'] and set(r['instances'][0]) == {'input', 'output'}
  tasks = si.read_seed_tasks(si.SEED_TASKS)
  assert [si.filter_reason(t) for t in tasks] == [None] * len(tasks)
  assert len({si.dedup_key(t['instruction']) for t in tasks}) == len(tasks)


def test_seed_file_errors_name_the_line(tmp_path):
  missing = tmp_path / 'missing.jsonl'
  with pytest.raises(si.SelfInstructError, match='does not exist'):
    si.read_seed_tasks(str(missing))
  empty = tmp_path / 'empty.jsonl'
  empty.write_text('\n\n')
  with pytest.raises(si.SelfInstructError, match='holds no seed tasks'):
    si.read_seed_tasks(str(empty))
  good = json.dumps({'instruction': 'Name a colour.', 'instances': [{'input': '',
                                                                    'output': 'Red.'}]})
  bad = tmp_path / 'bad.jsonl'
  bad.write_text(good + '\n{"instruction": \n')
  with pytest.raises(si.SelfInstructError, match='line 2 is not valid JSON'):
    si.read_seed_tasks(str(bad))
  bad.write_text(good + '\n' + json.dumps({'instruction': 'x', 'instances': []}) + '\n')
  with pytest.raises(si.SelfInstructError, match='line 2 is not a seed task'):
    si.read_seed_tasks(str(bad))


def test_read_output_skips_a_torn_last_line_only(tmp_path):
  path = tmp_path / 'out.jsonl'
  rec = {'instruction': 'Name a colour.', 'input': '', 'output': 'Red.'}
  whole = (json.dumps(rec) + '\n') * 2
  path.write_bytes(whole.encode() + b'{"instruction": "Na')
  out = si.read_output(str(path))
  assert len(out.records) == 2 and out.torn_at == len(whole) and not out.needs_newline
  assert si.repair_tail(str(path), out) == b'{"instruction": "Na'
  assert path.read_bytes() == whole.encode()
  path.write_text(json.dumps(rec))                # complete but without its newline
  out = si.read_output(str(path))
  assert len(out.records) == 1 and out.needs_newline and out.torn_at is None
  si.repair_tail(str(path), out)
  assert path.read_text() == json.dumps(rec) + '\n'
  path.write_text(json.dumps(rec) + '\n{bad\n' + json.dumps(rec) + '\n')
  with pytest.raises(si.SelfInstructError, match='line 2 is not valid JSON'):
    si.read_output(str(path))
  assert len(si.read_output(str(path), strict=False).records) == 2


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope='module')
def fake():
  server = fake_openai.FakeOpenAI(key=KEY).start()
  yield server
  server.stop()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _run(capsys, *flags):
  """`flaxllm self-instruct FLAGS` in this process: (exit code, stdout, stderr)."""
  code = cli.main(['self-instruct', *flags])
  captured = capsys.readouterr()
  return code, captured.out, captured.err


def _records(path) -> list[dict]:
  return [json.loads(line) for line in open(path, encoding='utf-8')]


def _no_key_anywhere(*texts_and_paths):
  for item in texts_and_paths:
    if isinstance(item, str) and os.path.exists(item):
      item = open(item, encoding='utf-8').read()
    assert KEY not in str(item)


def test_generates_alpaca_jsonl_filtered_and_judged(fake, tmp_path, capsys, monkeypatch):
  monkeypatch.setenv(KEY_ENV, KEY)
  fake.reset()
  out = str(tmp_path / 'data.jsonl')
  code, stdout, stderr = _run(capsys, f'--endpoint={fake.url}', '--model=teacher', '--num=12',
                              f'--out={out}', f'--api-key-env={KEY_ENV}', '--concurrency=2',
                              '--judge-threshold=5')
  assert code == 0, stderr
  records = _records(out)
  assert len(records) == 12
  # Valid Alpaca JSONL for instruction tuning: the reader and the renderer ignore the metadata.
  read = instruct.read_records(out)
  assert read == records
  for r in read:
    doc = instruct.alpaca_document(ByteTokenizer(), r)
    assert doc['loss_mask'].sum() == len(r['output'].encode()) + 1
    assert r['judge_score'] >= 5 and 0 <= r['max_rouge_l'] < 0.7
  kept = {r['instruction'] for r in records}
  assert len(kept) == 12
  rejected = _records(out + '.rejected.jsonl')
  reasons = {}
  for r in rejected:
    reasons.setdefault(r['reason'], []).append(r)
  # The planted near-duplicate of a seed task (ROUGE-L 0.9, see fake_openai) and the one of a
  # task of the same reply (0.87) are removed, with the instruction they resemble.
  assert fake_openai.SEED_NEAR_DUPLICATE not in kept
  assert fake_openai.ROUND_NEAR_DUPLICATE not in kept and fake_openai.ROUND_ORIGINAL not in {
      r.get('instruction') for r in rejected}
  near = {r['instruction']: r for r in reasons['rouge']}
  assert near[fake_openai.SEED_NEAR_DUPLICATE]['rouge_l'] == pytest.approx(0.9)
  assert near[fake_openai.SEED_NEAR_DUPLICATE]['similar_to'] == (
      'Write a haiku about autumn leaves falling in the rain.')
  assert near[fake_openai.ROUND_NEAR_DUPLICATE]['rouge_l'] == pytest.approx(20 / 23, abs=1e-4)
  assert [r['instruction'] for r in reasons['duplicate']] == [
      'translate the sentence   into Spanish.']
  assert len(reasons['forbidden_word']) == len(reasons['too_short']) == 1
  assert len(reasons['unparsable']) == 1
  # The judge: the low-scored task is dropped with its score, the unscored one with the reply.
  assert [(fake_openai.LOW_MARK in r['instruction'], r['judge_score'])
          for r in reasons['judge_low']] == [(True, 2.0)]
  assert fake_openai.NOSCORE_MARK in reasons['judge_unscored'][0]['instruction']
  assert 'judge_score' not in reasons['judge_unscored'][0]
  stats = json.load(open(out + '.stats.json'))
  assert stats['kept'] == 12 and stats['stopped'] == 'done' and stats['requests_failed'] == 0
  assert stats['removed']['rouge'] == 2 and stats['removed']['judge_low'] == 1
  assert stats['proposed'] == stats['kept'] + sum(stats['removed'].values()) + stats['surplus']
  assert stats['share_removed']['rouge'] == pytest.approx(2 / stats['proposed'], abs=1e-4)
  assert stats['instructions_per_min'] > 0
  assert 'instructions/min' in stdout and 'removed:' in stdout
  _no_key_anywhere(stdout, stderr, out, out + '.rejected.jsonl', out + '.stats.json')
  # Asked again for as many: nothing to do, no request, nothing rewritten.
  before, requests = open(out, 'rb').read(), fake.requests
  code, stdout, _ = _run(capsys, f'--endpoint={fake.url}', '--model=teacher', '--num=12',
                         f'--out={out}', f'--api-key-env={KEY_ENV}')
  assert code == 0 and 'nothing to do' in stdout
  assert open(out, 'rb').read() == before and fake.requests == requests


def test_chat_route_and_retries_after_503(fake, tmp_path, capsys, monkeypatch):
  monkeypatch.setenv(KEY_ENV, KEY)
  fake.reset()
  out = str(tmp_path / 'chat.jsonl')
  code, _, stderr = _run(capsys, f'--endpoint={fake.url}', '--model=teacher', '--api=chat',
                         '--num=5', f'--out={out}', f'--api-key-env={KEY_ENV}',
                         '--judge-threshold=5', '--concurrency=1')
  assert code == 0, stderr
  records = _records(out)
  assert len(records) == 5 and all(r['judge_score'] == 8.0 for r in records)
  assert fake_openai.SEED_NEAR_DUPLICATE not in {r['instruction'] for r in records}
  # 'flaky' answers every other request with 503 (retry-after 0): retried, nothing lost.
  fake.reset()
  out = str(tmp_path / 'flaky.jsonl')
  code, _, stderr = _run(capsys, f'--endpoint={fake.url}', '--model=flaky', '--num=8',
                         f'--out={out}', f'--api-key-env={KEY_ENV}', '--retry-wait=0.01')
  assert code == 0, stderr
  stats = json.load(open(out + '.stats.json'))
  assert len(_records(out)) == 8 and stats['retries'] >= 1 and stats['requests_failed'] == 0


def test_judge_only_pass_over_an_existing_file(fake, tmp_path, capsys, monkeypatch):
  monkeypatch.setenv(KEY_ENV, KEY)
  fake.reset()
  src, out = tmp_path / 'in.jsonl', str(tmp_path / 'judged.jsonl')
  rows = [{'instruction': 'Name a colour.', 'input': '', 'output': 'Red.', 'extra': 1},
          {'instruction': f'Give a {fake_openai.LOW_MARK} answer.', 'input': '', 'output': 'x'},
          {'instruction': f'The {fake_openai.NOSCORE_MARK} one.', 'input': '', 'output': 'y'},
          {'instruction': 'Name a fruit.', 'input': 'sweet', 'output': 'Mango.'}]
  src.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  flags = [f'--endpoint={fake.url}', '--model=teacher', '--judge-only', f'--in={src}',
           f'--out={out}', f'--api-key-env={KEY_ENV}', '--judge-threshold=5']
  code, _, stderr = _run(capsys, *flags)
  assert code == 0, stderr
  assert _records(out) == [{**rows[0], 'judge_score': 8.0}, {**rows[3], 'judge_score': 8.0}]
  assert sorted(r['reason'] for r in _records(out + '.rejected.jsonl')) == [
      'judge_low', 'judge_unscored']
  judged = fake.judge_requests
  code, _, _ = _run(capsys, *flags)                  # again: everything is judged already
  assert code == 0 and fake.judge_requests == judged and len(_records(out)) == 2


@pytest.mark.parametrize('case', ['num', 'missing_seed', 'empty_seed', 'bad_seed', 'bad_out',
                                  'model', 'judge_threshold'])
def test_bad_input_is_one_sentence_before_any_request(fake, tmp_path, capsys, monkeypatch, case):
  monkeypatch.setenv(KEY_ENV, KEY)
  out = tmp_path / 'out.jsonl'
  seeds = tmp_path / 'seeds.jsonl'
  good = json.dumps({'instruction': 'Name a colour.', 'instances': [{'input': '',
                                                                    'output': 'Red.'}]})
  seeds.write_text(good + '\n')
  flags = {'--num': '5', '--seed-tasks': str(seeds), '--model': 'teacher'}
  expected = {'num': '--num must be >= 1', 'missing_seed': 'does not exist',
              'empty_seed': 'holds no seed tasks', 'bad_seed': 'line 2 is not valid JSON',
              'bad_out': 'line 1 is not valid JSON', 'model': 'not --model=nosuch',
              'judge_threshold': '--judge-threshold must be between 1 and 10'}[case]
  if case == 'num':
    flags['--num'] = '0'
  elif case == 'missing_seed':
    flags['--seed-tasks'] = str(tmp_path / 'nope.jsonl')
  elif case == 'empty_seed':
    seeds.write_text('')
  elif case == 'bad_seed':
    seeds.write_text(good + '\n{"instruction": "x", "instances": [\n')
  elif case == 'bad_out':
    out.write_text('not json\n{}\n')
  elif case == 'model':
    flags['--model'] = 'nosuch'
  elif case == 'judge_threshold':
    flags['--judge-threshold'] = '11'
  before = out.read_bytes() if out.exists() else None
  generations = fake.generations + fake.judge_requests
  code, stdout, stderr = _run(capsys, f'--endpoint={fake.url}', f'--out={out}',
                              f'--api-key-env={KEY_ENV}', *(f'{k}={v}' for k, v in flags.items()))
  assert code == 1
  assert stderr.startswith('error: ') and expected in stderr and stderr.count('\n') == 1
  assert fake.generations + fake.judge_requests == generations      # no generation request
  assert (out.read_bytes() if out.exists() else None) == before
  assert not os.path.exists(f'{out}.rejected.jsonl') and not os.path.exists(f'{out}.stats.json')


def test_down_endpoint_and_refused_key_keep_the_file_byte_identical(fake, tmp_path, capsys,
                                                                   monkeypatch):
  out = tmp_path / 'out.jsonl'
  rec = {'instruction': 'Name a colour.', 'input': '', 'output': 'Red.'}
  out.write_bytes(((json.dumps(rec) + '\n') * 2).encode() + b'{"instruction": "torn')
  before = out.read_bytes()
  monkeypatch.setenv(KEY_ENV, KEY)
  down = f'http://127.0.0.1:{_free_port()}/v1'
  start = time.monotonic()
  code, stdout, stderr = _run(capsys, f'--endpoint={down}', '--model=teacher', '--num=5',
                              f'--out={out}', f'--api-key-env={KEY_ENV}', '--retries=2',
                              '--retry-wait=0.01')
  assert code == 1 and time.monotonic() - start < 10
  assert stderr.startswith('error: cannot reach the endpoint') and stderr.count('\n') == 1
  assert out.read_bytes() == before and sorted(os.listdir(tmp_path)) == ['out.jsonl']
  # A wrong key: refused in one sentence that names the variable, never the value.
  wrong = 'sk-wrong-value-0123456789'
  monkeypatch.setenv(KEY_ENV, wrong)
  code, stdout, stderr = _run(capsys, f'--endpoint={fake.url}', '--model=teacher', '--num=5',
                              f'--out={out}', f'--api-key-env={KEY_ENV}')
  assert code == 1 and 'refused the API key' in stderr and KEY_ENV in stderr
  assert wrong not in stdout + stderr and KEY not in stdout + stderr
  assert out.read_bytes() == before


@pytest.mark.parametrize('model', ['garbage', 'html'])
def test_garbage_answers_stop_after_bounded_rounds(fake, tmp_path, capsys, monkeypatch, model):
  monkeypatch.setenv(KEY_ENV, KEY)
  out = tmp_path / 'out.jsonl'
  rec = {'instruction': 'Name a colour.', 'input': '', 'output': 'Red.'}
  out.write_text(json.dumps(rec) + '\n')
  before = out.read_bytes()
  code, stdout, stderr = _run(capsys, f'--endpoint={fake.url}', f'--model={model}', '--num=5',
                              f'--out={out}', f'--api-key-env={KEY_ENV}', '--concurrency=2',
                              '--max-bad-rounds=2')
  assert code == 1 and stderr.count('\n') == 1
  assert 'no parsable task in 2 round(s) in a row' in stderr and '1 records kept' in stderr
  assert ('It works' in stderr) == (model == 'html')
  assert out.read_bytes() == before
  stats = json.load(open(f'{out}.stats.json'))
  assert stats['requests'] == 4 and stats['rounds'] == 2 and stats['stopped'] == 'bad_rounds'
  assert stats['kept'] == 0 and stats['removed']['unparsable'] >= 4
  assert all(r['reason'] in ('unparsable', 'truncated') for r in _records(f'{out}.rejected.jsonl'))


def test_failing_requests_stop_after_bounded_rounds(fake, tmp_path, capsys, monkeypatch):
  """A 400 is not retried; rounds in which every request failed stop the run like garbage."""
  monkeypatch.setenv(KEY_ENV, KEY)
  out = tmp_path / 'out.jsonl'
  code, _, stderr = _run(capsys, f'--endpoint={fake.url}', '--model=broken', '--num=5',
                         f'--out={out}', f'--api-key-env={KEY_ENV}', '--concurrency=2',
                         '--max-bad-rounds=2')
  assert code == 1 and stderr.count('\n') == 1
  assert ('every request of the last 2 round(s) failed (last error: HTTP 400: This model cannot '
          'complete anything.)') in stderr
  stats = json.load(open(f'{out}.stats.json'))
  assert stats['requests'] == stats['requests_failed'] == 4 and stats['retries'] == 0
  assert out.read_text() == ''


@pytest.mark.timeout(120)
def test_a_killed_run_resumes_without_duplicates(fake, tmp_path):
  """kill -9 after the first round is written; the rerun gets the same answers again from the
  start (the fake is reset) and must drop them as duplicates of what the file holds."""
  out = str(tmp_path / 'out.jsonl')
  env = {**os.environ, KEY_ENV: KEY, 'PYTHONPATH': ROOT}
  cmd = [sys.executable, '-m', 'flaxllm.cli', 'self-instruct', f'--endpoint={fake.url}',
         '--model=teacher', '--num=30', f'--out={out}', f'--api-key-env={KEY_ENV}',
         '--concurrency=2']
  fake.reset()
  fake.delay = 1.0
  try:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (os.path.exists(out) and os.path.getsize(out) > 0):
      assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
      time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    first_out, first_err = proc.communicate()
  finally:
    fake.delay = 0.0
  assert proc.returncode == -signal.SIGKILL
  first = _records(out)
  assert 0 < len(first) < 30
  fake.reset()
  second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=90)
  assert second.returncode == 0, second.stderr
  assert f'{len(first)} records in {out}' in second.stdout
  records = _records(out)
  assert len(records) == 30 and records[:len(first)] == first
  instructions = [si.dedup_key(r['instruction']) for r in records]
  assert len(set(instructions)) == 30
  assert 'duplicate' in {r['reason'] for r in _records(out + '.rejected.jsonl')}
  _no_key_anywhere(first_out.decode(), first_err.decode(), second.stdout, second.stderr, out,
                   out + '.rejected.jsonl', out + '.stats.json')


# ----------------------------------------------------------------------------- flaxllm serve

@pytest.mark.timeout(180)
def test_against_flaxllm_serve_on_a_tiny_random_model(tmp_path, capsys):
  """The command runs end to end against the real server: a random model writes no task, so
  it stops with the garbage sentence after one round and leaves its stats."""
  import jax  # pylint: disable=import-outside-toplevel -- only this test needs a model

  from flaxllm import models as M  # pylint: disable=import-outside-toplevel -- as above
  from flaxllm.interop import native  # pylint: disable=import-outside-toplevel -- as above
  from flaxllm.serve import api, command  # pylint: disable=import-outside-toplevel -- as above

  path = tmp_path / 'model'
  cfg = M.presets.get('tiny_llama').replace(vocab_size=259)
  native.save_flaxllm(cfg, M.init_params(M.build(cfg), jax.random.key(0)), str(path))
  (path / 'tokenizer.json').write_text(json.dumps({'kind': 'bytes'}))
  engine = command.load_engine(str(path), slots=2, max_len=128)
  engine.start()
  port = _free_port()
  http = api.serve_in_thread(api.create_app(engine, 'tiny', api_key=KEY), '127.0.0.1', port)
  try:
    out = str(tmp_path / 'out.jsonl')
    os.environ[KEY_ENV] = KEY
    code, stdout, stderr = _run(capsys, f'--endpoint=http://127.0.0.1:{port}/v1',
                                '--model=tiny', '--num=3', f'--out={out}',
                                f'--api-key-env={KEY_ENV}', '--concurrency=2',
                                '--max-bad-rounds=1', '--max-tokens=32')
  finally:
    os.environ.pop(KEY_ENV, None)
    http.should_exit = True
    http.thread.join(timeout=10)
    engine.stop()
  stats = json.load(open(out + '.stats.json'))
  assert stats['requests'] == 2 and stats['requests_failed'] == 0
  assert stats['completion_tokens'] > 0 and stats['prompt_tokens'] > 0
  if code == 0:       # a random model that wrote 3 good tasks: possible, never seen
    assert len(_records(out)) == 3
  else:
    assert code == 1 and 'no parsable task in 1 round(s)' in stderr
    assert stderr.count('\n') == 1 and stats['stopped'] == 'bad_rounds'
  # The 128-token context is read from /v1/models: the prompts (about 1700 bytes here) are cut
  # to their last 128 - 32 tokens instead of being refused.
  assert 'truncate_prompt_tokens' in stdout
  assert stats['prompt_tokens'] == 2 * (128 - 32)
  _no_key_anywhere(stdout, stderr, out + '.stats.json')
