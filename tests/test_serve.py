"""`flaxllm serve` (flaxllm/serve/): the OpenAI API through the official `openai` client against
a server started here on a free loopback port (one per module), on a random-init tiny LLaMA
with the bytes tokenizer. References are independent of the server: flaxllm.generate and the
uncached model's log-softmax."""
from __future__ import annotations

import concurrent.futures
import json
import queue
import socket
import time

import httpx
import jax
import numpy as np
import pytest

openai = pytest.importorskip('openai')

from flaxllm import cli  # noqa: E402
from flaxllm import generate as G  # noqa: E402
from flaxllm import models as M  # noqa: E402
from flaxllm.data.tokenizer import ByteTokenizer  # noqa: E402
from flaxllm.interop import native  # noqa: E402
from flaxllm.interop import peft as peft_io  # noqa: E402
from flaxllm.peft import lora, path_rules  # noqa: E402
from flaxllm.serve import api, command  # noqa: E402
from flaxllm.serve.engine import Delta, Sampling  # noqa: E402

SLOTS = 4
MAX_LEN = 64
KEY = 'test-key'
NAME = 'tiny'
TOL = 1e-4
BYTES = ByteTokenizer()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp('serve') / 'model'
  cfg = M.presets.get('tiny_llama').replace(vocab_size=259)
  params = M.init_params(M.build(cfg), jax.random.key(0))
  native.save_flaxllm(cfg, params, str(path))
  (path / 'tokenizer.json').write_text(json.dumps({'kind': 'bytes'}))
  return str(path)


@pytest.fixture(scope='module')
def server(model_dir):
  engine = command.load_engine(model_dir, slots=SLOTS, max_len=MAX_LEN)
  engine.start()
  port = _free_port()
  http = api.serve_in_thread(api.create_app(engine, NAME, api_key=KEY), '127.0.0.1', port)
  yield engine, f'http://127.0.0.1:{port}/v1'
  http.should_exit = True
  http.thread.join(timeout=10)
  engine.stop()


@pytest.fixture(scope='module')
def client(server):
  return openai.OpenAI(base_url=server[1], api_key=KEY, max_retries=0, timeout=60)


def _prompt_ids(text: str) -> list[int]:
  return [BYTES.bos_id] + BYTES.encode(text)


def _reference(engine, prompt_ids, max_tokens):
  """flaxllm.generate's greedy ids (ending with EOS if it stopped) and their text."""
  ids, = G.generate(engine.model.cfg, engine.params, [prompt_ids], max_new_tokens=max_tokens,
                    stop_tokens=(BYTES.eos_id,))
  return ids, BYTES.decode(ids)


def _log_softmax(engine, ids):
  """log p(token | before) [len(ids), vocab] of the uncached model, in float64."""
  logits = np.asarray(M.build(engine.model.cfg).apply({'params': engine.params},
                                                      np.asarray([ids], np.int32))[0], np.float64)
  return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)


def _sse(base, payload, read_chunks=None):
  """The `data:` lines of a streamed completion, read with plain httpx."""
  lines = []
  with httpx.stream('POST', f'{base}/completions', json=payload, timeout=60,
                    headers={'Authorization': f'Bearer {KEY}'}) as r:
    for line in r.iter_lines():
      if line.startswith('data: '):
        lines.append(line[len('data: '):])
  return lines


# ----------------------------------------------------------------------------- completions, chat

def test_completion_streamed_and_not_equal_flaxllm_generate(server, client):
  engine, base = server
  prompt = 'def add(a, b):'
  ref_ids, ref_text = _reference(engine, _prompt_ids(prompt), 12)
  out = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0)
  assert out.choices[0].text == ref_text
  assert out.choices[0].finish_reason == ('stop' if ref_ids[-1] == BYTES.eos_id else 'length')
  assert out.usage.prompt_tokens == len(_prompt_ids(prompt))
  assert out.usage.completion_tokens == len(ref_ids)
  assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
  chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=12,
                                          temperature=0, stream=True,
                                          stream_options={'include_usage': True}))
  assert ''.join(c.choices[0].text for c in chunks if c.choices) == ref_text
  assert chunks[-1].usage.completion_tokens == len(ref_ids)
  lines = _sse(base, {'model': NAME, 'prompt': prompt, 'max_tokens': 4, 'temperature': 0,
                      'stream': True})
  assert lines[-1] == '[DONE]' and all(json.loads(x)['object'] == 'text_completion'
                                       for x in lines[:-1])


def test_token_id_prompts_and_several_prompts(server, client):
  engine, _ = server
  prompts = [_prompt_ids('x = 1'), _prompt_ids('print(')]
  out = client.completions.create(model=NAME, prompt=prompts, max_tokens=6, temperature=0)
  assert [c.index for c in out.choices] == [0, 1]
  for choice, ids in zip(out.choices, prompts):
    assert choice.text == _reference(engine, ids, 6)[1]
  assert out.usage.prompt_tokens == sum(map(len, prompts))


def test_long_prompts_are_truncated_only_when_asked(server, client):
  engine, _ = server
  prompt = 'abcdefghij' * 7     # 71 tokens with BOS: longer than the context
  with pytest.raises(openai.BadRequestError, match='maximum context length'):
    client.completions.create(model=NAME, prompt=prompt, max_tokens=4)
  out = client.completions.create(model=NAME, prompt=prompt, max_tokens=4, temperature=0,
                                  extra_body={'truncate_prompt_tokens': 20})
  assert out.usage.prompt_tokens == 20
  assert out.choices[0].text == _reference(engine, _prompt_ids(prompt)[-20:], 4)[1]


def test_chat_streamed_and_not(server, client):
  engine, _ = server
  messages = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi!'}]
  prompt = engine.tokens.render_chat(messages)
  assert BYTES.decode(prompt) == '### System:\nBe brief.\n\n### User:\nHi!\n\n### Assistant:\n'
  ref_ids, ref_text = _reference(engine, prompt, 10)
  out = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10,
                                       temperature=0)
  assert out.choices[0].message.content == ref_text
  assert out.choices[0].message.role == 'assistant'
  assert out.usage.prompt_tokens == len(prompt) and out.usage.completion_tokens == len(ref_ids)
  chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=10,
                                               temperature=0, stream=True))
  assert chunks[0].choices[0].delta.role == 'assistant'
  assert ''.join(c.choices[0].delta.content or '' for c in chunks) == ref_text
  assert chunks[-1].choices[0].finish_reason in ('stop', 'length')


def test_n_choices_and_seeds(client):
  kwargs = dict(model=NAME, prompt='import ', max_tokens=8, temperature=1.5, top_p=0.95, n=3,
                extra_body={'top_k': 50})
  out = client.completions.create(seed=7, **kwargs)
  assert [c.index for c in out.choices] == [0, 1, 2]
  texts = [c.text for c in out.choices]
  assert len(set(texts)) > 1                      # every choice draws its own tokens
  again = client.completions.create(seed=7, **kwargs)
  assert [c.text for c in again.choices] == texts  # the seed makes sampling reproducible
  other = client.completions.create(seed=8, **kwargs)
  assert [c.text for c in other.choices] != texts
  chat = client.chat.completions.create(model=NAME, messages=[{'role': 'user', 'content': 'a'}],
                                        max_tokens=5, temperature=1.0, n=3, seed=1)
  assert len(chat.choices) == 3


def test_stop_strings_end_the_text_without_them(server, client):
  engine, _ = server
  prompt = 'def add(a, b):'
  full = _reference(engine, _prompt_ids(prompt), 16)[1]
  stops = [full[k:k + 2] for k in range(1, len(full) - 2) if '\ufffd' not in full[k:k + 2]]
  assert stops
  for stop in stops[:3]:
    for stream in (False, True):
      out = client.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0,
                                      stop=[stop, 'never appears'], stream=stream)
      chunks = list(out) if stream else [out]
      text = ''.join(c.choices[0].text for c in chunks)
      assert text == full[:full.index(stop)]
      assert chunks[-1].choices[0].finish_reason == 'stop'


def test_logprobs_equal_the_models_log_softmax(server, client):
  engine, _ = server
  prompt = _prompt_ids('x = [1, 2')
  out = client.completions.create(model=NAME, prompt=prompt, max_tokens=5, temperature=0,
                                  echo=True, logprobs=3)
  lp = out.choices[0].logprobs
  generated, = G.generate(engine.model.cfg, engine.params, [prompt], max_new_tokens=5)
  ids = prompt + generated
  logp = _log_softmax(engine, ids)
  assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids)
  expected = logp[np.arange(len(ids) - 1), ids[1:]]
  np.testing.assert_allclose(lp.token_logprobs[1:], expected, atol=TOL)
  for row, top in zip(logp[:-1], lp.top_logprobs[1:]):
    best = np.sort(row)[::-1][:3]
    np.testing.assert_allclose(sorted(top.values(), reverse=True), best, atol=TOL)
  assert out.choices[0].text == BYTES.decode(prompt) + BYTES.decode(generated)
  chat = client.chat.completions.create(model=NAME, messages=[{'role': 'user', 'content': 'q'}],
                                        max_tokens=3, temperature=0, logprobs=True,
                                        top_logprobs=2)
  entries = chat.choices[0].logprobs.content
  assert len(entries) == 3 and all(len(e.top_logprobs) == 2 for e in entries)
  assert entries[0].logprob == pytest.approx(entries[0].top_logprobs[0].logprob, abs=1e-6)


# ----------------------------------------------------------------------------- batching

def test_concurrent_requests_give_their_one_at_a_time_outputs(server, client, monkeypatch):
  engine, _ = server
  requests = [(('abcdefghij' * 5)[:3 + 3 * i], 4 + (i * 5) % 11) for i in range(16)]

  def complete(args):
    prompt, max_tokens = args
    return client.completions.create(model=NAME, prompt=prompt, max_tokens=max_tokens,
                                     temperature=0).choices[0].text

  alone = [complete(r) for r in requests]
  before = engine.peak_active
  step = engine._step   # 30 ms per step: the 16 requests surely arrive while others still run
  monkeypatch.setattr(engine, '_step', lambda: (time.sleep(0.03), step()))
  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    together = list(pool.map(complete, requests))
  assert together == alone
  assert before <= engine.peak_active <= SLOTS
  assert engine.peak_active == SLOTS   # 16 clients filled every slot


def test_a_disconnected_stream_frees_its_slot_and_others_continue(server, client, monkeypatch):
  engine, base = server
  step = engine._step   # 20 ms per step, so that both streams are surely still running
  monkeypatch.setattr(engine, '_step', lambda: (time.sleep(0.02), step()))
  other_ref = _reference(engine, _prompt_ids('while True:'), 50)[1]
  other = client.completions.create(model=NAME, prompt='while True:', max_tokens=50,
                                    temperature=0, stream=True)
  first = next(other)
  with httpx.stream('POST', f'{base}/completions', timeout=60,
                    headers={'Authorization': f'Bearer {KEY}'},
                    json={'model': NAME, 'prompt': 'for i in', 'max_tokens': 55,
                          'temperature': 0, 'stream': True}) as r:
    lines = r.iter_lines()
    for _ in range(3):
      next(lines)
    assert engine.active() == 2
  closed, at_close = time.monotonic(), engine.steps
  while engine.active() > 1 and time.monotonic() < closed + 5:
    time.sleep(0.005)
  assert engine.active() == 1
  # Freed as soon as the server saw the disconnect: long before the ~50 steps its 55 tokens
  # still needed (counted in steps, not seconds, so a slow machine does not flake it; the
  # engine-level test below bounds a cancel to one step).
  assert engine.steps - at_close < 20
  text = first.choices[0].text + ''.join(c.choices[0].text for c in other)
  assert text == other_ref                 # the other stream went on undisturbed


def test_a_cancelled_request_leaves_its_slot_within_one_step(server):
  engine, _ = server
  events = queue.Queue()
  request = engine.submit(_prompt_ids('abc'), Sampling(max_tokens=50), events.put)
  assert isinstance(events.get(timeout=30), Delta)   # it is decoding
  engine.cancel(request)
  at_cancel = engine.steps
  deadline = time.monotonic() + 5
  while engine.active() and time.monotonic() < deadline:
    time.sleep(0.001)
  assert engine.active() == 0 and engine.steps - at_cancel <= 1


# ----------------------------------------------------------------------------- errors

def _post(base, path, body, key=KEY, raw=None):
  headers = {'Authorization': f'Bearer {key}'} if key else {}
  content = raw if raw is not None else json.dumps(body)
  return httpx.post(f'{base}{path}', content=content, timeout=30,
                    headers={**headers, 'Content-Type': 'application/json'})


BAD_REQUESTS = [
    ('unknown model', {'model': 'gpt-9', 'prompt': 'x'}, None, 404, 'model'),
    ('max_tokens 0', {'prompt': 'x', 'max_tokens': 0}, None, 400, 'max_tokens'),
    ('max_tokens -3', {'prompt': 'x', 'max_tokens': -3}, None, 400, 'max_tokens'),
    ('prompt too long', {'prompt': 'x' * MAX_LEN, 'max_tokens': 4}, None, 400, 'prompt'),
    ('invalid JSON', None, b'{"model": "tiny", "prompt": ', 400, None),
    ('negative temperature', {'prompt': 'x', 'temperature': -0.5}, None, 400, 'temperature'),
    ('n above the slots', {'prompt': 'x', 'n': SLOTS + 1}, None, 400, 'n'),
    ('max_tokens of the wrong type', {'prompt': 'x', 'max_tokens': 'ten'}, None, 422,
     'max_tokens'),
    ('no prompt', {}, None, 400, 'prompt'),
]


@pytest.mark.parametrize('what,body,raw,status,param', BAD_REQUESTS,
                         ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_openai_errors_and_the_server_stays_up(server, client, what, body, raw,
                                                               status, param):
  _, base = server
  r = _post(base, '/completions', {'model': NAME, **(body or {})}, raw=raw)
  assert r.status_code == status, r.text
  error = r.json()['error']
  assert set(error) == {'message', 'type', 'param', 'code'}
  assert error['param'] == param
  assert error['message'].endswith('.') and 'Traceback' not in error['message']
  assert client.completions.create(model=NAME, prompt='ok', max_tokens=2).choices[0].text


def test_api_keys_unknown_routes_and_a_full_queue(server, client):
  engine, base = server
  for key in (None, 'wrong'):
    r = _post(base, '/completions', {'model': NAME, 'prompt': 'x'}, key=key)
    assert r.status_code == 401 and r.json()['error']['code'] == 'invalid_api_key'
  with pytest.raises(openai.AuthenticationError):
    openai.OpenAI(base_url=base, api_key='wrong', max_retries=0).models.list()
  assert [m.id for m in client.models.list()] == [NAME]
  r = _post(base, '/nowhere', {})
  assert r.status_code == 404 and 'no route' in r.json()['error']['message']
  too_long = client.chat.completions.with_raw_response
  with pytest.raises(openai.BadRequestError, match='maximum context length'):
    too_long.create(model=NAME, messages=[{'role': 'user', 'content': 'y' * MAX_LEN}])
  r = _post(base, '/completions', None, raw=b' ' * (api.MAX_BODY + 1))
  assert r.status_code == 413 and r.json()['error']['code'] == 'request_too_large'
  engine.max_waiting = 0
  try:
    r = _post(base, '/completions', {'model': NAME, 'prompt': 'x'})
    assert r.status_code == 503 and r.json()['error']['code'] == 'queue_full'
  finally:
    engine.max_waiting = 256
  assert httpx.get(f'{base[:-3]}/health').json()['status'] == 'ok'


# ----------------------------------------------------------------------------- adapters, CLI

def _collect(engine, prompt, max_tokens):
  """The text of one greedy request run on `engine` directly."""
  events = queue.Queue()
  engine.submit(prompt, Sampling(max_tokens=max_tokens), events.put)
  text = ''
  while True:
    event = events.get(timeout=60)
    text += event.text
    if event.finish_reason:
      return text


def test_a_lora_adapter_is_merged_into_its_base(model_dir, tmp_path):
  cfg, params = native.load_flaxllm(model_dir)
  adapters = lora.init(params, ['q_proj', 'v_proj'], jax.random.key(5), rank=4)
  adapters = path_rules.unflatten({   # B starts at zero: make the adapter change something
      p: ad.replace(b=0.5 * jax.random.normal(jax.random.key(i), ad.b.shape))
      for i, (p, ad) in enumerate(path_rules.flatten(adapters).items())})
  workdir = tmp_path / 'lora_run'
  peft_io.save_adapter(cfg, adapters, str(workdir / 'adapter'))
  merged = lora.merge(params, peft_io.load_adapter(str(workdir / 'adapter'), cfg))
  prompt = _prompt_ids('def f(x):')
  expected = BYTES.decode(G.generate(cfg, merged, [prompt], max_new_tokens=10,
                                     stop_tokens=(BYTES.eos_id,))[0])
  base_text = BYTES.decode(G.generate(cfg, params, [prompt], max_new_tokens=10,
                                      stop_tokens=(BYTES.eos_id,))[0])
  assert expected != base_text
  for adapter in (str(workdir / 'adapter'), str(workdir)):   # PEFT dir, flaxllm LoRA workdir
    engine = command.load_engine(model_dir, adapter, slots=2, max_len=32)
    engine.start()
    try:
      assert _collect(engine, prompt, 10) == expected
    finally:
      engine.stop()


@pytest.mark.parametrize('args,message', [
    (['--model', '/nonexistent/model'], "does not exist"),
    (['--slots', '0'], '--slots must be >= 1'),
    (['--max-len', '100000'], '--max-len=100000 must be between 2'),
    (['--adapter', '/nonexistent/adapter'], 'neither a PEFT adapter directory'),
])
def test_bad_command_lines_are_one_sentence(model_dir, capsys, args, message):
  argv = ['serve', '--model', model_dir, *args]
  assert cli.main(argv) == 1
  err = capsys.readouterr().err.strip()
  assert err.startswith('error: ') and message in err and 'Traceback' not in err
  assert len(err.splitlines()) == 1
