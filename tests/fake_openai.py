"""A scripted OpenAI-compatible server (FastAPI + uvicorn on loopback) for the tests of
`flaxllm self-instruct` and bench/self_instruct.py: canned completions that hold well-formed
numbered tasks, planted duplicates and near-duplicates, garbage, and judge replies with scores.

    fake = FakeOpenAI(key='sk-...', delay=0.0).start()     # fake.url: http://127.0.0.1:PORT/v1
    ...
    fake.stop()

Models: 'teacher' (tasks), 'garbage' (text without a single task), 'html' (a 200 answer that is
an HTML page, not a completion), 'broken' (400 to every completion request), 'flaky' (every other
request answers 503 first, then the teacher's tasks). The first generation reply of the
teacher after start() or reset() is PLANTED (every filter gets a case); later replies hold
TASKS_PER_REPLY fresh tasks each, from a counter (so a reset() replays the same sequence).
Judge prompts (recognised by their first words) get 'Score: 8', 'Score: 2' for an instruction
with LOW_MARK, and a reply without a number for NOSCORE_MARK.
"""
from __future__ import annotations

import random
import re
import socket
import threading
import time

import fastapi
import uvicorn
from fastapi.responses import HTMLResponse, JSONResponse

MODELS = ('teacher', 'garbage', 'html', 'flaky', 'broken')
TASKS_PER_REPLY = 5
LOW_MARK = 'zqlow'
NOSCORE_MARK = 'zqnoscore'
JUDGE_START = 'You are reviewing training examples'

# The seed task 'Write a haiku about autumn leaves falling in the rain.' (10 tokens) against the
# planted one below (10 tokens): LCS 9 (all but rain/wind), ROUGE-L F = 2*9/(10+10) = 0.9.
SEED_NEAR_DUPLICATE = 'Write a haiku about autumn leaves falling in the wind.'
ROUND_ORIGINAL = 'List three practical ways to reduce food waste at home.'
# 13 tokens against ROUND_ORIGINAL's 10, LCS 10: F = 2*10/23 = 0.87 (a near-duplicate of a task
# of the same reply, caught by the round's own pool).
ROUND_NEAR_DUPLICATE = 'List three practical ways to reduce food waste in the kitchen at home.'
PLANTED = [
    ('Describe how a bicycle gear system lets a rider climb steep hills.', '',
     'Gears change how far the wheel turns for each turn of the pedals; a low gear trades '
     'speed for force, so climbing needs less effort per pedal stroke.'),
    (SEED_NEAR_DUPLICATE, '', 'Leaves drift on the wind\nswirling past the quiet porch\nautumn '
                              'lets them go'),
    ('translate the sentence   into Spanish.', 'Good night.', 'Buenas noches.'),   # a duplicate
    ('Draw a simple picture of a house with a garden.', '', 'A house.'),   # forbidden words
    ('Sort these numbers.', '3, 1, 2', '1, 2, 3'),                         # too short
    None,                                                                  # unparsable
    (ROUND_ORIGINAL, '', 'Plan meals, store food properly, and use leftovers.'),
    (ROUND_NEAR_DUPLICATE, '', 'Plan meals, freeze bread, and compost scraps.'),
    (f'Give a {LOW_MARK} answer about the tallest mountain in Europe.', '', 'Mont Blanc.'),
    (f'Explain the {NOSCORE_MARK} rule for castling in a game of chess.', '',
     'The king moves two squares toward a rook, which jumps over it.'),
]
_FORBIDDEN = {'image', 'graph', 'file', 'map', 'maps', 'draw', 'plot', 'video', 'audio',
              'music', 'files', 'graphs'}
_WORDS = sorted({c1 + v1 + c2 + v2 for c1 in 'bdfgklmnprstvz' for v1 in 'aeiou'
                 for c2 in 'bdfgklmnprstvz' for v2 in 'aeiou'} - _FORBIDDEN)
_VERBS = ('Describe', 'Summarize', 'Classify', 'Rewrite', 'Explain', 'Compare', 'Translate',
          'Outline', 'Evaluate', 'Name')


def fresh_task(n: int) -> tuple[str, str, str]:
  """The n-th generated task: a verb and six random invented words (pairs share ~1 token)."""
  rng = random.Random(n)
  words = rng.sample(_WORDS, 8)
  instruction = f'{rng.choice(_VERBS)} {" ".join(words[:6])}.'
  task_input = '' if n % 2 else f'{words[6]} and {words[7]}'
  return instruction, task_input, f'The answer about {words[0]} is {words[1]}.'


def reply_text(tasks: list, first: int, truncate_last: bool = False) -> str:
  """A completions reply continuing '<first>. Instruction:' (None: a chunk without Input)."""
  out = []
  for i, task in enumerate(tasks):
    n = first + i
    head = '' if i == 0 else f'{n}. Instruction:'
    if task is None:
      out.append(f'{head} Name three rivers of Africa\n{n}. Output:\nNile, Congo, Niger\n')
      continue
    instruction, task_input, output = task
    out.append(f'{head} {instruction}\n{n}. Input:\n{task_input or "<noinput>"}\n'
               f'{n}. Output:\n{output}\n')
  text = '###\n'.join(out) + '###\n'
  return text[:-40] if truncate_last else text


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class FakeOpenAI:
  """The server; counters `generations`, `judge_requests`, `requests` (all routes)."""

  def __init__(self, key: str | None = None, delay: float = 0.0, planted: bool = True):
    self.key = key
    self.delay = delay
    self.planted = planted
    self._lock = threading.Lock()
    self.reset()
    self.requests = 0
    self.app = self._app()
    self.server = None
    self.url = None

  def reset(self) -> None:
    with self._lock:
      self.generations = 0
      self.judge_requests = 0
      self._flaky = 0

  def start(self) -> 'FakeOpenAI':
    port = _free_port()
    self.server = uvicorn.Server(uvicorn.Config(self.app, host='127.0.0.1', port=port,
                                                log_level='warning'))
    thread = threading.Thread(target=self.server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not self.server.started:
      if not thread.is_alive() or time.monotonic() > deadline:
        raise OSError(f'the fake OpenAI server could not listen on 127.0.0.1:{port}')
      time.sleep(0.02)
    self.server.thread = thread
    self.url = f'http://127.0.0.1:{port}/v1'
    return self

  def stop(self) -> None:
    self.server.should_exit = True
    self.server.thread.join(timeout=10)

  # --------------------------------------------------------------------------- answers

  def _answer(self, model: str, prompt: str, chat: bool) -> tuple[str, str]:
    """(text, finish_reason) for one prompt."""
    if prompt.startswith(JUDGE_START):
      with self._lock:
        self.judge_requests += 1
      instruction = prompt.split('### Instruction:\n', 1)[-1].split('\n\n### Input:', 1)[0]
      if NOSCORE_MARK in instruction:
        return 'I would rather not rate this one.', 'stop'
      score = 2 if LOW_MARK in instruction else 8
      return (f'Score: {score}' if chat else f' {score}'), 'stop'
    with self._lock:
      n = self.generations
      self.generations += 1
    if self.delay:
      time.sleep(self.delay)
    if model == 'garbage':
      rng = random.Random(n)
      return ' '.join(rng.choice(['}{', 'lorem', '42', '###', 'zz', 'ipsum', '\n'])
                      for _ in range(30)), 'length'
    match = re.search(r'(\d+)\. Instruction:\s*$', prompt)
    first = int(match.group(1)) if match else 4
    if n == 0 and self.planted:
      tasks = PLANTED
    else:
      tasks = [fresh_task(n * TASKS_PER_REPLY + j) for j in range(TASKS_PER_REPLY)]
    text = reply_text(tasks, first)
    if chat:
      text = f'Here are more tasks.\n{first}. Instruction:{text}'
    return text, 'stop'

  def _app(self) -> fastapi.FastAPI:
    app = fastapi.FastAPI()

    def error(status: int, message: str, headers=None):
      return JSONResponse({'error': {'message': message, 'type': 'error', 'param': None,
                                     'code': None}}, status, headers=headers)

    def refused(request: fastapi.Request):
      with self._lock:
        self.requests += 1
      if self.key and request.headers.get('authorization') != f'Bearer {self.key}':
        return error(401, 'Incorrect API key provided.')
      return None

    def flaky(model: str):
      if model != 'flaky':
        return None
      with self._lock:
        self._flaky += 1
        fail = self._flaky % 2 == 1
      return error(503, 'Overloaded, try again.', {'retry-after': '0'}) if fail else None

    def usage(prompt: str, text: str) -> dict:
      p, c = len(prompt.split()), len(text.split())
      return {'prompt_tokens': p, 'completion_tokens': c, 'total_tokens': p + c}

    def rejection(request: fastapi.Request, model):
      """The error response a generation request for `model` gets, or None."""
      problem = refused(request) or flaky(model)
      if problem:
        return problem
      if model not in MODELS:
        return error(404, f'The model {model!r} does not exist.')
      if model == 'broken':
        return error(400, 'This model cannot complete anything.')
      if model == 'html':
        return HTMLResponse('<html><body>It works!</body></html>')
      return None

    @app.get('/v1/models')
    def models(request: fastapi.Request):
      return refused(request) or {'object': 'list', 'data': [
          {'id': m, 'object': 'model', 'created': 0, 'owned_by': 'fake'} for m in MODELS]}

    @app.post('/v1/completions')
    def completions(request: fastapi.Request, body: dict):
      model = body.get('model')
      problem = rejection(request, model)
      if problem:
        return problem
      text, finish = self._answer(model, body['prompt'], chat=False)
      return {'id': 'cmpl-fake', 'object': 'text_completion', 'created': 0, 'model': model,
              'choices': [{'index': 0, 'text': text, 'logprobs': None, 'finish_reason': finish}],
              'usage': usage(body['prompt'], text)}

    @app.post('/v1/chat/completions')
    def chat(request: fastapi.Request, body: dict):
      model = body.get('model')
      problem = rejection(request, model)
      if problem:
        return problem
      prompt = body['messages'][-1]['content']
      text, finish = self._answer(model, prompt, chat=True)
      return {'id': 'chatcmpl-fake', 'object': 'chat.completion', 'created': 0, 'model': model,
              'choices': [{'index': 0, 'message': {'role': 'assistant', 'content': text},
                           'logprobs': None, 'finish_reason': finish}],
              'usage': usage(prompt, text)}

    return app
