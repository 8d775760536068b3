"""The OpenAI-compatible HTTP API (FastAPI) in front of a serving Engine.

    app = create_app(engine, model_name='my-model', api_key=None)
    server = serve_in_thread(app, '127.0.0.1', 8000)   # or uvicorn.run(app, ...)

Routes: `GET /health`, `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`.
Both completion routes take `model`, `max_tokens` (chat also `max_completion_tokens`),
`temperature`, `top_p`, `top_k` (an extension; 0 or -1 keeps every token), `n`, `stop`,
`seed`, `stream`, `stream_options.include_usage`, `ignore_eos` (an extension, as vLLM's: go on
after EOS); completions take `prompt` (a string, a list
of strings, token ids, or a list of token id lists), `echo`, `logprobs` (0-5 alternatives) and
`truncate_prompt_tokens` (an extension: keep the prompt's last k tokens); chat takes `messages`,
`logprobs` (true/false) and `top_logprobs` (0-5). Other OpenAI fields are accepted and ignored.
`max_tokens` defaults to 16 for completions and to the rest of the context for chat. Streams
are server-sent events (`data: {...}`), ending in `data: [DONE]`.

Log-probs are those of the model (log-softmax of its logits, before temperature and filters).
A token's name in them is its text, or 'token_id:N' when it has no text of its own (a special
token, part of a character), so that names never collide.

Every error is OpenAI's JSON `{"error": {"message", "type", "param", "code"}}` with one
sentence: 400 (a bad value, invalid JSON, a prompt longer than the context), 401 (missing or
wrong API key, with `api_key`), 404 (unknown model or route), 413 (a body over `max_body`
bytes), 422 (a field of the wrong type), 503 (the waiting queue is full); the server keeps
serving. A client that disconnects has its requests cancelled (their slots are free before the
next step).
"""
from __future__ import annotations

import asyncio
import functools
import json
import threading
import time
import uuid
from typing import Any, Optional

import fastapi
import uvicorn
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from flaxllm.serve import engine as engine_lib
from flaxllm.serve.engine import Delta, Engine, Failure, PromptLogprobs, Sampling

MAX_BODY = 8 << 20          # bytes of one request body
POLL_S = 0.5                # how often a waiting request checks that its client is still there
COMPLETION_DEFAULT_MAX_TOKENS = 16


class ApiError(Exception):
  """An error answered in OpenAI's shape: status, one sentence, the parameter at fault."""

  def __init__(self, status: int, message: str, param: Optional[str] = None,
               code: Optional[str] = None, kind: str = 'invalid_request_error'):
    super().__init__(message)
    self.status, self.message, self.param, self.code, self.kind = (status, message, param, code,
                                                                   kind)

  def response(self) -> JSONResponse:
    return JSONResponse({'error': {'message': self.message, 'type': self.kind,
                                   'param': self.param, 'code': self.code}}, self.status)


# ----------------------------------------------------------------------------- request fields

_TYPE_NAMES = {int: 'an integer', float: 'a number', bool: 'true or false', str: 'a string',
               list: 'a list', dict: 'an object'}


def _field(body: dict, name: str, kind: type, default: Any = None) -> Any:
  """body[name] if it is of `kind` (a number may be an integer), `default` if absent or null;
  422 naming the field otherwise."""
  value = body.get(name)
  if value is None:
    return default
  ok = isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
  if kind is float and isinstance(value, int) and not isinstance(value, bool):
    ok, value = True, float(value)
  if not ok:
    raise ApiError(422, f'{name} must be {_TYPE_NAMES[kind]}, got {json.dumps(value)[:40]}.',
                   name, 'invalid_type')
  return value


def _bounded(body: dict, name: str, kind: type, default: Any, low: Any, high: Any = None,
             low_open: bool = False) -> Any:
  """`_field`, and 400 unless low <= value <= high (low < value with `low_open`)."""
  value = _field(body, name, kind, default)
  if value is None:
    return None
  too_low = value <= low if low_open else value < low
  if too_low or (high is not None and value > high):
    span = f'{"above" if low_open else "at least"} {low}' + (
        f' and at most {high}' if high is not None else '')
    raise ApiError(400, f'{name} must be {span}, got {value}.', name, 'invalid_value')
  return value


def _stop(body: dict) -> tuple[str, ...]:
  stop = body.get('stop')
  if stop is None:
    return ()
  stops = [stop] if isinstance(stop, str) else stop
  if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
    raise ApiError(422, 'stop must be a string or a list of strings.', 'stop', 'invalid_type')
  return tuple(s for s in stops if s)


class _Options:
  """The sampling fields shared by both routes."""

  def __init__(self, body: dict, engine: Engine):
    self.temperature = _bounded(body, 'temperature', float, 1.0, 0.0)
    self.top_p = _bounded(body, 'top_p', float, 1.0, 0.0, 1.0, low_open=True)
    top_k = _bounded(body, 'top_k', int, 0, -1)
    self.top_k = max(top_k, 0)
    self.n = _bounded(body, 'n', int, 1, 1, engine.num_slots)
    self.seed = _field(body, 'seed', int)
    self.stop = _stop(body)
    self.stream = _field(body, 'stream', bool, False)
    self.ignore_eos = _field(body, 'ignore_eos', bool, False)
    stream_options = _field(body, 'stream_options', dict, {})
    self.include_usage = bool(self.stream and _field(stream_options, 'include_usage', bool,
                                                     False))

  def sampling(self, engine: Engine, prompt: list[int], max_tokens: Optional[int],
               default_max_tokens: Optional[int], logprobs: Optional[int],
               prompt_logprobs: bool = False) -> Sampling:
    """The Sampling of one prompt; 400 when it does not fit the context."""
    room = engine.max_len - len(prompt)
    if max_tokens is None:
      max_tokens = max(1, room if default_max_tokens is None else min(default_max_tokens, room))
    problem = engine.check(prompt, max_tokens)
    if problem:
      raise ApiError(400, problem[0].upper() + problem[1:], 'prompt',
                     'context_length_exceeded' if 'context length' in problem else None)
    return Sampling(max_tokens=max_tokens, temperature=self.temperature, top_k=self.top_k,
                    top_p=self.top_p, seed=self.seed, stop=self.stop, logprobs=logprobs,
                    prompt_logprobs=prompt_logprobs, ignore_eos=self.ignore_eos)


def _prompts(body: dict, engine: Engine) -> tuple[list[list[int]], list[str]]:
  """The token ids and the text of each prompt of a completions request."""
  prompt = body.get('prompt')
  if isinstance(prompt, str):
    prompts = [prompt]
  elif isinstance(prompt, list) and prompt and all(isinstance(p, int) and not isinstance(p, bool)
                                                  for p in prompt):
    prompts = [prompt]
  elif isinstance(prompt, list) and prompt and all(
      isinstance(p, str) or (isinstance(p, list) and all(isinstance(t, int) for t in p))
      for p in prompt):
    prompts = prompt
  else:
    raise ApiError(400 if prompt is None or prompt == [] else 422,
                   'prompt must be a string, a list of strings, a list of token ids or a list '
                   'of token id lists.', 'prompt', 'invalid_prompt')
  keep = _bounded(body, 'truncate_prompt_tokens', int, None, 1)
  ids, texts = [], []
  for p in prompts:
    tokens = engine.tokens.encode_prompt(p) if isinstance(p, str) else list(p)
    ids.append(tokens[-keep:] if keep else tokens)
    texts.append(p if isinstance(p, str) and len(ids[-1]) == len(tokens) else
                 engine.tokens.decode(ids[-1]))
  return ids, texts


def _messages(body: dict) -> list[dict]:
  """The chat messages, each {'role', 'content'} with text content."""
  messages = body.get('messages')
  if not isinstance(messages, list) or not messages:
    raise ApiError(400, 'messages must be a non-empty list of {"role", "content"} objects.',
                   'messages', 'invalid_messages')
  out = []
  for i, m in enumerate(messages):
    role = m.get('role') if isinstance(m, dict) else None
    content = m.get('content') if isinstance(m, dict) else None
    if isinstance(content, list):   # content parts: only text ones
      if not all(isinstance(p, dict) and p.get('type') == 'text' for p in content):
        raise ApiError(400, f'messages[{i}] has a content part that is not text; this model '
                       'reads text only.', 'messages', 'invalid_messages')
      content = ''.join(str(p.get('text', '')) for p in content)
    if role not in ('system', 'user', 'assistant') or not isinstance(content, str):
      raise ApiError(400, f'messages[{i}] must have a role of system, user or assistant and a '
                     'text content.', 'messages', 'invalid_messages')
    out.append({'role': role, 'content': content})
  return out


# ----------------------------------------------------------------------------- running requests

class _Job:
  """The engine requests of one HTTP request, and the queue their events arrive on."""

  def __init__(self, engine: Engine, prompts: list[tuple[list[int], Sampling]], n: int):
    self.engine = engine
    self.queue: asyncio.Queue = asyncio.Queue()
    self.requests = []
    self.unfinished = len(prompts) * n
    loop = asyncio.get_running_loop()
    try:
      for p, (ids, sampling) in enumerate(prompts):
        self.requests.append(engine.submit(ids, sampling, functools.partial(self._post, loop, p),
                                           n))
    except engine_lib.QueueFull as e:
      self.cancel()
      raise ApiError(503, f'The server is busy: {e}', code='queue_full',
                     kind='server_error') from None

  def _post(self, loop, prompt: int, event):
    try:
      loop.call_soon_threadsafe(self.queue.put_nowait, (prompt, event))
    except RuntimeError:   # the event loop is closed: the server stopped, nobody listens
      pass

  def cancel(self):
    for request in self.requests:
      self.engine.cancel(request)

  async def events(self, http_request: fastapi.Request):
    """(prompt index, event) until every choice finished; cancels everything when the client
    disconnects or the caller stops early."""
    try:
      while self.unfinished:
        try:
          prompt, event = await asyncio.wait_for(self.queue.get(), POLL_S)
        except asyncio.TimeoutError:
          if await http_request.is_disconnected():
            return
          continue
        if isinstance(event, Failure):
          raise ApiError(500, event.message, kind='server_error')
        if isinstance(event, Delta) and event.finish_reason is not None:
          self.unfinished -= 1
        yield prompt, event
    finally:
      self.cancel()


class _Choices:
  """Accumulates the output of every choice (index = prompt * n + choice) and formats it for
  one route (`chat` or completions)."""

  def __init__(self, tokens, prompts: list[list[int]], n: int, chat: bool, want_logprobs: bool,
               echo_texts: Optional[list[str]] = None):
    self.tokens, self.prompts, self.n, self.chat = tokens, prompts, n, chat
    self.want_logprobs, self.echo_texts = want_logprobs, echo_texts
    self.prompt_logprobs: dict[int, list] = {}
    self.started: set[int] = set()
    self.text: dict[int, list[str]] = {}
    self.logprobs: dict[int, list] = {}
    self.finish: dict[int, str] = {}
    self.completion_tokens: dict[int, int] = {}

  def add(self, prompt: int, event) -> Optional[tuple[int, str, list, Optional[str]]]:
    """Records an event; for a Delta, (index, new text, new log-prob entries, finish)."""
    if isinstance(event, PromptLogprobs):
      self.prompt_logprobs[prompt] = event.logprobs
      return None
    index = prompt * self.n + event.choice
    text, entries = event.text, list(event.logprobs)
    if index not in self.started:
      self.started.add(index)
      if self.echo_texts is not None:
        text = self.echo_texts[prompt] + text
        entries = [None] + self.prompt_logprobs.get(prompt, []) + entries
    self.text.setdefault(index, []).append(text)
    self.logprobs.setdefault(index, []).extend(entries)
    if event.finish_reason is not None:
      self.finish[index] = event.finish_reason
      self.completion_tokens[index] = event.completion_tokens
    return index, text, entries, event.finish_reason

  def usage(self) -> dict:
    prompt = sum(len(p) for p in self.prompts)
    completion = sum(self.completion_tokens.values())
    return {'prompt_tokens': prompt, 'completion_tokens': completion,
            'total_tokens': prompt + completion}

  def format_logprobs(self, entries: list, first: Optional[int] = None) -> Optional[dict]:
    """OpenAI's log-probs object of `entries` (a None entry: the prompt's first token)."""
    name = self.tokens.token_text
    if self.chat:
      return {'content': [
          {'token': name(e.token), 'logprob': e.logprob, 'bytes': list(name(e.token).encode()),
           'top_logprobs': [{'token': name(t), 'logprob': v, 'bytes': list(name(t).encode())}
                            for t, v in e.top]} for e in entries]}
    tokens, offsets, offset = [], [], 0
    for e in entries:
      token = self.prompts[first][0] if e is None else e.token
      tokens.append(name(token))
      offsets.append(offset)
      offset += len(self.tokens.decode([token]))
    return {'tokens': tokens,
            'token_logprobs': [None if e is None else e.logprob for e in entries],
            'top_logprobs': [None if e is None else {name(t): v for t, v in e.top}
                             for e in entries],
            'text_offset': offsets}


# ----------------------------------------------------------------------------- the app

def create_app(engine: Engine, model_name: str, api_key: Optional[str] = None,
               max_body: int = MAX_BODY) -> fastapi.FastAPI:
  """The FastAPI app serving `engine` as the model `model_name` (see the module docstring)."""
  app = fastapi.FastAPI(title='flaxllm serve', docs_url=None, redoc_url=None, openapi_url=None)
  created = int(time.time())

  @app.exception_handler(ApiError)
  async def api_error(_, e: ApiError):
    return e.response()

  @app.exception_handler(HTTPException)
  async def http_error(request, e: HTTPException):
    what = (f'there is no route {request.method} {request.url.path}; use /v1/completions, '
            '/v1/chat/completions or /v1/models.' if e.status_code in (404, 405) else e.detail)
    return ApiError(e.status_code, what[0].upper() + what[1:], code='not_found').response()

  @app.exception_handler(Exception)
  async def server_error(_, e: Exception):
    return ApiError(500, f'The server failed on this request ({type(e).__name__}: '
                    f'{str(e).splitlines()[0] if str(e) else ""}).', kind='server_error').response()

  def authorise(request: fastapi.Request):
    if api_key is not None and request.headers.get('authorization') != f'Bearer {api_key}':
      raise ApiError(401, 'Missing or wrong API key; send the header "Authorization: Bearer '
                     '<key>" with the key the server was started with.', code='invalid_api_key')

  async def read_body(request: fastapi.Request) -> dict:
    authorise(request)
    length = request.headers.get('content-length')
    if length is not None and length.isdigit() and int(length) > max_body:
      raise ApiError(413, f'The request body has {length} bytes, more than the {max_body} this '
                     'server accepts; send a shorter request.', code='request_too_large')
    raw = await request.body()
    if len(raw) > max_body:
      raise ApiError(413, f'The request body has more than the {max_body} bytes this server '
                     'accepts; send a shorter request.', code='request_too_large')
    try:
      body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ApiError(400, f'The request body is not valid JSON ({e}); send a JSON object.',
                     code='invalid_json') from None
    if not isinstance(body, dict):
      raise ApiError(400, 'The request body must be a JSON object.', code='invalid_json')
    model = body.get('model')
    if model is None:
      raise ApiError(400, f'model is missing; this server serves {model_name!r}.', 'model',
                     'model_not_found')
    if model != model_name:
      raise ApiError(404, f'The model {model!r} does not exist here; this server serves '
                     f'{model_name!r}.', 'model', 'model_not_found')
    return body

  @app.get('/health')
  async def health():
    return {'status': 'ok', 'active': engine.active(), 'waiting': engine.waiting(),
            'slots': engine.num_slots}

  @app.get('/v1/models')
  async def list_models(request: fastapi.Request):
    authorise(request)
    return {'object': 'list', 'data': [{'id': model_name, 'object': 'model', 'created': created,
                                        'owned_by': 'flaxllm', 'max_model_len': engine.max_len}]}

  async def respond(request: fastapi.Request, job: _Job, choices: _Choices, options: _Options):
    kind = 'chat.completion' if choices.chat else 'text_completion'
    head = {'id': f'{"chatcmpl" if choices.chat else "cmpl"}-{uuid.uuid4().hex}',
            'created': int(time.time()), 'model': model_name}
    if options.stream:
      return StreamingResponse(_stream(request, job, choices, options, head, kind),
                               media_type='text/event-stream')
    async for prompt, event in job.events(request):
      choices.add(prompt, event)
    if job.unfinished:   # the client went away
      return JSONResponse({}, 499)
    out = []
    for index in sorted(choices.text):
      text = ''.join(choices.text[index])
      logprobs = (choices.format_logprobs(choices.logprobs[index], index // choices.n)
                  if choices.want_logprobs else None)
      if choices.chat:
        out.append({'index': index, 'message': {'role': 'assistant', 'content': text},
                    'logprobs': logprobs, 'finish_reason': choices.finish[index]})
      else:
        out.append({'index': index, 'text': text, 'logprobs': logprobs,
                    'finish_reason': choices.finish[index]})
    return {**head, 'object': kind, 'choices': out, 'usage': choices.usage()}

  @app.post('/v1/completions')
  async def completions(request: fastapi.Request):
    body = await read_body(request)
    options = _Options(body, engine)
    prompts, texts = _prompts(body, engine)
    max_tokens = _bounded(body, 'max_tokens', int, None, 1)
    logprobs = _bounded(body, 'logprobs', int, None, 0, engine_lib.TOP_LOGPROBS)
    echo = _field(body, 'echo', bool, False)
    jobs = [(p, options.sampling(engine, p, max_tokens, COMPLETION_DEFAULT_MAX_TOKENS, logprobs,
                                 prompt_logprobs=echo and logprobs is not None))
            for p in prompts]
    choices = _Choices(engine.tokens, prompts, options.n, chat=False,
                       want_logprobs=logprobs is not None, echo_texts=texts if echo else None)
    return await respond(request, _Job(engine, jobs, options.n), choices, options)

  @app.post('/v1/chat/completions')
  async def chat_completions(request: fastapi.Request):
    body = await read_body(request)
    options = _Options(body, engine)
    prompt = engine.tokens.render_chat(_messages(body))
    max_tokens = _bounded(body, 'max_completion_tokens', int, None, 1)
    if max_tokens is None:
      max_tokens = _bounded(body, 'max_tokens', int, None, 1)
    want = _field(body, 'logprobs', bool, False)
    top = _bounded(body, 'top_logprobs', int, 0, 0, engine_lib.TOP_LOGPROBS)
    sampling = options.sampling(engine, prompt, max_tokens, None, top if want else None)
    choices = _Choices(engine.tokens, [prompt], options.n, chat=True, want_logprobs=want)
    return await respond(request, _Job(engine, [(prompt, sampling)], options.n), choices, options)

  return app


async def _stream(request, job: _Job, choices: _Choices, options: _Options, head: dict,
                  kind: str):
  """The server-sent events of a streamed response."""
  kind = kind + '.chunk' if choices.chat else kind
  try:
    async for prompt, event in job.events(request):
      delta = choices.add(prompt, event)
      if delta is None:
        continue
      index, text, entries, finish = delta
      logprobs = choices.format_logprobs(entries, prompt) if choices.want_logprobs else None
      if choices.chat:
        message = {'content': text}
        if len(choices.text[index]) == 1:
          message = {'role': 'assistant', 'content': text}
        choice = {'index': index, 'delta': message, 'logprobs': logprobs,
                  'finish_reason': finish}
      else:
        choice = {'index': index, 'text': text, 'logprobs': logprobs, 'finish_reason': finish}
      yield _event({**head, 'object': kind, 'choices': [choice]})
    if options.include_usage and not job.unfinished:
      yield _event({**head, 'object': kind, 'choices': [], 'usage': choices.usage()})
  except ApiError as e:
    yield _event(json.loads(e.response().body))
  yield 'data: [DONE]\n\n'


def _event(data: dict) -> str:
  return f'data: {json.dumps(data)}\n\n'


def serve_in_thread(app: fastapi.FastAPI, host: str, port: int,
                    timeout_s: float = 30.0) -> uvicorn.Server:
  """Runs `app` with uvicorn in a daemon thread, returns once it accepts connections; stop it
  with `server.should_exit = True`."""
  server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level='warning'))
  thread = threading.Thread(target=server.run, name='flaxllm-serve-http', daemon=True)
  thread.start()
  deadline = time.monotonic() + timeout_s
  while not server.started:
    if not thread.is_alive() or time.monotonic() > deadline:
      raise OSError(f'could not listen on {host}:{port} (is the port in use?); choose another '
                    '--port.')
    time.sleep(0.05)
  server.thread = thread
  return server
