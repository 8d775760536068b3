"""`flaxllm self-instruct`: Self-Instruct data (as Alpaca made it) from any OpenAI-compatible
endpoint, with optional judge filtering (GPT4All's step). The pure parts are in
`flaxllm.data.self_instruct`.

    flaxllm self-instruct --endpoint=http://127.0.0.1:8000/v1 --model=NAME --num=1000 \\
        --out=data/self_instruct.jsonl [--seed-tasks=FILE] [--api=completions|chat] \\
        [--judge-threshold=6] [--concurrency=4] [--api-key-env=OPENAI_API_KEY]
    flaxllm self-instruct --judge-only --in=FILE --out=FILE2 --judge-threshold=6 --endpoint=...

Each round sends --concurrency generation requests at once (each prompt: the header, k example
tasks and `k+1. Instruction:`), parses the proposed tasks, filters them in order (unparsable,
truncated, empty, too short/long, forbidden words, "Write a program", bad first character,
exact duplicates, ROUGE-L >= --rouge-threshold against the seed and kept instructions and the
round's earlier survivors), optionally asks the endpoint to score each survivor (1-10, kept at
>= --judge-threshold), and appends the kept ones to --out. Everything not kept goes to
`<out>.rejected.jsonl` with its reason; counts and rates go to `<out>.stats.json`.

Running the same command again continues up to --num records in --out (the file is read, a torn
last line of a killed run cut, and its instructions seed the duplicate filters). Requests are
retried with exponential backoff on connection errors, timeouts, 408/409/429 and 5xx; after
--max-bad-rounds rounds in a row in which no answer held a parsable task (or every request
failed), the command stops with one sentence. The API key is read from the environment variable
--api-key-env and never printed or written; without one, a placeholder is sent (local servers).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import random
import threading
import time
from typing import Any, Callable, Optional, Sequence

from flaxllm.data import self_instruct as si
from flaxllm.data.self_instruct import SelfInstructError

KEY_PLACEHOLDER = 'EMPTY'    # what a server without keys gets (vLLM's convention)
JUDGE_MAX_TOKENS = 16
RETRY_STATUS = (408, 409, 429)


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog='flaxllm self-instruct',
      description='Generate Alpaca-format instruction data with Self-Instruct from an '
                  'OpenAI-compatible endpoint (optionally filtered by a judge).')
  p.add_argument('--endpoint', required=True,
                 help='the base URL of the API, as the openai client takes it '
                      '(e.g. http://127.0.0.1:8000/v1).')
  p.add_argument('--model', required=True, help='the model name sent with every request.')
  p.add_argument('--out', required=True,
                 help='the Alpaca JSONL output (appended to; <out>.rejected.jsonl and '
                      '<out>.stats.json are written next to it).')
  p.add_argument('--num', type=int, help='records wanted in --out in total.')
  p.add_argument('--seed-tasks', default=si.SEED_TASKS,
                 help="Alpaca's seed_tasks.jsonl format (default: flaxllm's own 32 tasks).")
  p.add_argument('--api', choices=('completions', 'chat'), default='completions',
                 help='the route (Alpaca used completions; chat models need chat).')
  p.add_argument('--api-key-env', default='OPENAI_API_KEY',
                 help='the environment variable holding the API key.')
  p.add_argument('--concurrency', type=int, default=4, help='requests in flight at once.')
  p.add_argument('--prompt-tasks', type=int, default=3,
                 help='example tasks per prompt (Alpaca: 3).')
  p.add_argument('--prompt-generated', type=int, default=1,
                 help='how many of them come from the kept generated records once there are '
                      'some (Alpaca: 0, only seed tasks; Self-Instruct: 2 of 8).')
  p.add_argument('--num-tasks', type=int, default=si.NUM_TASKS,
                 help='tasks each prompt asks for (Alpaca: 20).')
  p.add_argument('--max-tokens', type=int, default=3072,
                 help='new tokens per generation request (Alpaca: 3072); clipped to half the '
                      'context when the endpoint reports max_model_len.')
  p.add_argument('--temperature', type=float, default=1.0)
  p.add_argument('--top-p', type=float, default=1.0)
  p.add_argument('--rouge-threshold', type=float, default=si.ROUGE_THRESHOLD,
                 help='ROUGE-L F at or above which an instruction is a near-duplicate.')
  p.add_argument('--judge-threshold', type=float, default=None,
                 help='score each kept task 1-10 with the endpoint and keep those >= this '
                      '(off by default).')
  p.add_argument('--judge-model', default=None, help='the judge model (default: --model).')
  p.add_argument('--judge-only', action='store_true',
                 help='only judge the records of --in into --out.')
  p.add_argument('--in', dest='input', default=None, help='with --judge-only: the records.')
  p.add_argument('--retries', type=int, default=4, help='retries of a failed request.')
  p.add_argument('--retry-wait', type=float, default=1.0,
                 help='seconds before the first retry (doubling after each).')
  p.add_argument('--timeout', type=float, default=600.0, help='seconds per request.')
  p.add_argument('--max-bad-rounds', type=int, default=3,
                 help='stop after this many rounds in a row without a parsable task.')
  p.add_argument('--max-idle-rounds', type=int, default=20,
                 help='stop after this many rounds in a row that keep nothing.')
  p.add_argument('--seed', type=int, default=0, help='the sampling of example tasks.')
  return p


def _check(args) -> None:
  """One sentence for each bad flag value, before anything is read or sent."""
  if not args.endpoint.startswith(('http://', 'https://')):
    raise SelfInstructError(f'--endpoint={args.endpoint} is not an http(s) URL; pass the API '
                            'base URL, e.g. http://127.0.0.1:8000/v1.')
  if args.judge_only:
    if not args.input:
      raise SelfInstructError('--judge-only needs --in=FILE (the Alpaca JSONL records to judge).')
    if args.judge_threshold is None:
      raise SelfInstructError('--judge-only needs --judge-threshold=S (1-10).')
    if os.path.abspath(args.input) == os.path.abspath(args.out):
      raise SelfInstructError('--in and --out are the same file; write the judged records to '
                              'a new --out.')
  elif args.num is None or args.num < 1:
    raise SelfInstructError(f'--num must be >= 1 (the records wanted in --out), got {args.num}.')
  checks = [
      (args.concurrency >= 1, f'--concurrency must be >= 1, got {args.concurrency}.'),
      (args.prompt_tasks >= 1, f'--prompt-tasks must be >= 1, got {args.prompt_tasks}.'),
      (0 <= args.prompt_generated <= args.prompt_tasks,
       f'--prompt-generated must be between 0 and --prompt-tasks={args.prompt_tasks}, got '
       f'{args.prompt_generated}.'),
      (args.num_tasks > args.prompt_tasks,
       f'--num-tasks={args.num_tasks} must be more than --prompt-tasks={args.prompt_tasks} '
       '(the prompt asks the model to continue the list).'),
      (args.max_tokens >= 1, f'--max-tokens must be >= 1, got {args.max_tokens}.'),
      (0 < args.rouge_threshold <= 1,
       f'--rouge-threshold must be in (0, 1], got {args.rouge_threshold}.'),
      (args.judge_threshold is None or 1 <= args.judge_threshold <= 10,
       f'--judge-threshold must be between 1 and 10 (the rubric scale), got '
       f'{args.judge_threshold}.'),
      (args.retries >= 0, f'--retries must be >= 0, got {args.retries}.'),
      (args.retry_wait >= 0, f'--retry-wait must be >= 0, got {args.retry_wait}.'),
      (args.timeout > 0, f'--timeout must be > 0, got {args.timeout}.'),
      (args.max_bad_rounds >= 1, f'--max-bad-rounds must be >= 1, got {args.max_bad_rounds}.'),
      (args.max_idle_rounds >= 1, f'--max-idle-rounds must be >= 1, got {args.max_idle_rounds}.'),
      (args.temperature >= 0, f'--temperature must be >= 0, got {args.temperature}.'),
      (0 < args.top_p <= 1, f'--top-p must be in (0, 1], got {args.top_p}.'),
  ]
  for ok, message in checks:
    if not ok:
      raise SelfInstructError(message)


# ----------------------------------------------------------------------------- the endpoint

@dataclasses.dataclass
class Reply:
  text: str
  finish_reason: Optional[str] = None


@dataclasses.dataclass
class Failed:
  message: str


@dataclasses.dataclass
class Verdict:
  score: Optional[float]
  text: str


class Stats:
  """Counters of one invocation (thread-safe) and the rates and shares derived from them."""

  def __init__(self, **info):
    self.info = info
    self.counts = {'rounds': 0, 'requests': 0, 'requests_failed': 0, 'retries': 0,
                   'judge_requests': 0, 'prompt_tokens': 0, 'completion_tokens': 0,
                   'proposed': 0, 'kept': 0, 'surplus': 0}
    self.removed = {reason: 0 for reason in si.REASONS}
    self.start = time.monotonic()
    self.started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')
    self._lock = threading.Lock()

  def add(self, name: str, n: int = 1) -> None:
    with self._lock:
      if name in self.removed:
        self.removed[name] += n
      else:
        self.counts[name] += n

  def as_dict(self, **extra) -> dict:
    elapsed = time.monotonic() - self.start
    minutes = max(elapsed, 1e-9) / 60
    proposed = self.counts['proposed']
    share = lambda n: round(n / proposed, 4) if proposed else None
    return {
        **self.info, **self.counts, **extra, 'started': self.started,
        'elapsed_s': round(elapsed, 3), 'removed': dict(self.removed),
        'instructions_per_min': round(self.counts['kept'] / minutes, 2),
        'requests_per_min': round(self.counts['requests'] / minutes, 2),
        'completion_tokens_per_min': round(self.counts['completion_tokens'] / minutes, 1),
        'share_kept': share(self.counts['kept']),
        'share_removed': {r: share(n) for r, n in self.removed.items() if n},
    }

  def removed_line(self) -> str:
    parts = [f'{r} {n}' for r, n in self.removed.items() if n]
    return ', '.join(parts) if parts else 'nothing'


class Endpoint:
  """The openai client with bounded retries; every request returns a Reply or a Failed (never
  raises for the endpoint's sake), and every message is free of the API key."""

  def __init__(self, openai, args, key: str, stats: Stats):
    self.openai = openai
    self.args = args
    self.key = key
    self.stats = stats
    self.chat = args.api == 'chat'
    self.judge_model = args.judge_model or args.model
    self.client = openai.OpenAI(base_url=args.endpoint, api_key=key or KEY_PLACEHOLDER,
                                max_retries=0, timeout=args.timeout)
    self.max_tokens = args.max_tokens
    self.truncate: dict[str, Optional[int]] = {}   # model -> truncate_prompt_tokens
    self.notes: list[str] = []

  def redact(self, text: str) -> str:
    return text.replace(self.key, '***') if self.key and len(self.key) >= 4 else text

  def retryable(self, e: BaseException) -> Optional[float]:
    """None: raise at once; else seconds the server asked to wait (0: none)."""
    if isinstance(e, self.openai.APIConnectionError):   # also timeouts
      return 0.0
    if isinstance(e, self.openai.APIStatusError) and (e.status_code in RETRY_STATUS
                                                      or e.status_code >= 500):
      try:
        return float(e.response.headers.get('retry-after') or 0)
      except (ValueError, AttributeError):
        return 0.0
    return None

  def describe(self, e: BaseException) -> str:
    if isinstance(e, self.openai.APITimeoutError):
      return f'no answer within --timeout={self.args.timeout:g} s'
    if isinstance(e, self.openai.APIConnectionError):
      cause = e.__cause__ or e.__context__
      return f'cannot connect ({type(cause).__name__ if cause else type(e).__name__})'
    if isinstance(e, self.openai.APIStatusError):
      message, body = None, e.body
      if isinstance(body, dict):
        inner = body.get('error')
        message = body.get('message') or (inner.get('message') if isinstance(inner, dict) else None)
      return f'HTTP {e.status_code}: {str(message or e.message)[:300]}'
    return f'{type(e).__name__}: {str(e)[:300]}'

  def _retrying(self, call: Callable[[], Any]) -> Any:
    return si.with_retries(call, self.retryable, self.args.retries, self.args.retry_wait,
                           on_retry=lambda e: self.stats.add('retries'))

  def preflight(self) -> None:
    """GET /models: an unreachable endpoint or a refused key is one sentence before any
    generation request; a listed context length (`max_model_len`, vLLM and flaxllm serve)
    fits max_tokens and truncate_prompt_tokens to it."""
    env = self.args.api_key_env
    try:
      models = self._retrying(lambda: list(self.client.models.list()))
    except self.openai.APIConnectionError as e:
      raise SelfInstructError(
          f'cannot reach the endpoint {self.args.endpoint} ({self.describe(e)}, also after '
          f'{self.args.retries} retries); start the server or fix --endpoint (the base URL, '
          'with /v1), then run the same command again.') from None
    except (self.openai.AuthenticationError, self.openai.PermissionDeniedError) as e:
      which = f'in ${env}' if self.key else f'(none: ${env} is not set)'
      raise SelfInstructError(f'the endpoint refused the API key {which} (HTTP '
                              f'{e.status_code}); set ${env} (or --api-key-env=NAME) to a valid '
                              'key.') from None
    except self.openai.APIStatusError as e:
      if e.status_code >= 500 or e.status_code in RETRY_STATUS:
        raise SelfInstructError(self.redact(
            f'the endpoint {self.args.endpoint} answers {self.describe(e)} after '
            f'{self.args.retries} retries; wait for it or fix the server, then run the same '
            'command again.')) from None
      return   # no model list here (404, ...): the requests will tell
    except Exception:  # pylint: disable=broad-except -- a listing that does not parse: go on
      return
    ids = [getattr(m, 'id', None) for m in models]
    for flag, name in (('--model', self.args.model), ('--judge-model', self.judge_model)):
      if ids and name not in ids:
        shown = ', '.join(repr(i) for i in ids[:8]) + (', ...' if len(ids) > 8 else '')
        raise SelfInstructError(f'the endpoint serves {shown}, not {flag}={name}; pass one of '
                                'those.')
    for m in models:
      context = getattr(m, 'max_model_len', None)
      if not isinstance(context, int) or context < 2:
        continue
      if m.id == self.args.model and self.max_tokens > context // 2:
        self.max_tokens = context // 2
        self.notes.append(f'the endpoint reports a context of {context} tokens: generating at '
                          f'most {self.max_tokens} new tokens per request')
      if not self.chat and m.id in (self.args.model, self.judge_model):
        room = self.max_tokens if m.id == self.args.model else JUDGE_MAX_TOKENS
        self.truncate[m.id] = context - room
    if self.truncate:
      self.notes.append('completion prompts keep their last (context - max_tokens) tokens '
                        '(truncate_prompt_tokens)')

  def _request(self, prompt: str, model: str, max_tokens: int, temperature: float,
               stop: Optional[list]) -> Reply:
    if self.chat:
      kwargs = {'stop': stop} if stop else {}
      r = self.client.chat.completions.create(
          model=model, messages=[{'role': 'user', 'content': prompt}], max_tokens=max_tokens,
          temperature=temperature, top_p=self.args.top_p, **kwargs)
    else:
      kwargs = {'stop': stop} if stop else {}
      if self.truncate.get(model):
        kwargs['extra_body'] = {'truncate_prompt_tokens': self.truncate[model]}
      r = self.client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                         temperature=temperature, top_p=self.args.top_p,
                                         **kwargs)
    usage = getattr(r, 'usage', None)
    if usage is not None:
      self.stats.add('prompt_tokens', int(getattr(usage, 'prompt_tokens', 0) or 0))
      self.stats.add('completion_tokens', int(getattr(usage, 'completion_tokens', 0) or 0))
    try:
      choice = r.choices[0]
      text = choice.message.content if self.chat else choice.text
      return Reply(text if isinstance(text, str) else '', choice.finish_reason)
    except (AttributeError, IndexError, TypeError):   # an answer that is no completion
      return Reply(str(r)[:500])

  def _call(self, counter: str, prompt: str, model: str, max_tokens: int, temperature: float,
            stop: Optional[list]):
    self.stats.add(counter)
    try:
      return self._retrying(lambda: self._request(prompt, model, max_tokens, temperature, stop))
    except Exception as e:  # pylint: disable=broad-except -- counted; the round decides
      if counter == 'requests':
        self.stats.add('requests_failed')
      return Failed(self.redact(self.describe(e)))

  def generate(self, prompt: str):
    """A Reply (or Failed) for one generation prompt."""
    return self._call('requests', prompt, self.args.model, self.max_tokens,
                      self.args.temperature, si.stop_sequences(self.args.num_tasks))

  def judge(self, task: dict):
    """A Verdict (or Failed) for one task."""
    reply = self._call('judge_requests', si.judge_prompt(task, cue=not self.chat),
                       self.judge_model, JUDGE_MAX_TOKENS, 0.0, None)
    return reply if isinstance(reply, Failed) else Verdict(si.parse_score(reply.text),
                                                           reply.text)


def parallel_map(fn: Callable[[Any], Any], items: Sequence[Any], workers: int) -> list:
  """[fn(x) for x in items] on up to `workers` daemon threads (Ctrl-C does not wait for them)."""
  items = list(items)
  results: list = [None] * len(items)
  errors: list = []
  lock = threading.Lock()
  order = iter(range(len(items)))

  def work():
    while True:
      with lock:
        i = next(order, None)
      if i is None or errors:
        return
      try:
        results[i] = fn(items[i])
      except BaseException as e:  # pylint: disable=broad-except -- re-raised below
        errors.append(e)
        return

  threads = [threading.Thread(target=work, daemon=True) for _ in range(min(workers, len(items)))]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  if errors:
    raise errors[0]
  return results


# ----------------------------------------------------------------------------- the run

class Run:
  """The files of one invocation: --out (kept), <out>.rejected.jsonl, <out>.stats.json."""

  def __init__(self, args, endpoint: Endpoint, stats: Stats, kept_before: int):
    self.args = args
    self.endpoint = endpoint
    self.stats = stats
    self.kept_before = kept_before
    self.rejected_path = args.out + '.rejected.jsonl'
    self.stats_path = args.out + '.stats.json'
    self.out = self.rejected = None

  def open(self, out: si.Output, rejected: si.Output) -> None:
    parent = os.path.dirname(os.path.abspath(self.args.out))
    os.makedirs(parent, exist_ok=True)
    torn = si.repair_tail(self.args.out, out) if os.path.exists(self.args.out) else None
    if os.path.exists(self.rejected_path):
      si.repair_tail(self.rejected_path, rejected)
    self.out = si.JsonlAppender(self.args.out)
    self.rejected = si.JsonlAppender(self.rejected_path)
    if torn:
      self.reject({'raw': torn.decode('utf-8', 'replace')}, 'torn_line', count=False)
      print(f'self-instruct: cut a torn last line ({len(torn)} bytes, kept in '
            f'{self.rejected_path}) from {self.args.out}.', flush=True)

  def reject(self, record: dict, reason: str, count: bool = True) -> None:
    if count:
      self.stats.add(reason)
    self.rejected.write({**record, 'reason': reason})

  def keep(self, record: dict) -> None:
    self.out.write(record)
    self.stats.add('kept')

  def flush(self, stopped: str) -> dict:
    for f in (self.out, self.rejected):
      if f is not None:
        f.flush()
    history = []
    if os.path.exists(self.stats_path):
      try:
        with open(self.stats_path, encoding='utf-8') as f:
          previous = json.load(f)
        history = previous.pop('history', [])
        if previous.get('started') != self.stats.started:
          history.append(previous)
      except (OSError, ValueError, AttributeError):
        history = []
    stats = self.stats.as_dict(stopped=stopped, kept_before=self.kept_before,
                               kept_total=self.kept_before + self.stats.counts['kept'],
                               history=history)
    si.write_json_atomic(self.stats_path, stats)
    return stats

  def close(self) -> None:
    for f in (self.out, self.rejected):
      if f is not None:
        f.close()

  def summary(self, stats: dict) -> str:
    shares = ', '.join(f'{r} {100 * s:.1f}%' for r, s in stats['share_removed'].items())
    return (f'self-instruct: {stats["kept_total"]} records in {self.args.out} (+{stats["kept"]} '
            f'of {stats["proposed"]} proposed in {stats["elapsed_s"]:.1f} s: '
            f'{stats["instructions_per_min"]:g} instructions/min, {stats["requests"]} requests '
            f'({stats["requests_failed"]} failed, {stats["retries"]} retries), '
            f'{stats["completion_tokens_per_min"]:g} completion tokens/min); removed: '
            f'{shares or "nothing"}; rejected records in {self.rejected_path}, stats in '
            f'{self.stats_path}.')


def _bad_rounds_message(args, endpoint: Endpoint, replies: list, kept: int) -> str:
  failures = [r for r in replies if isinstance(r, Failed)]
  answers = [r for r in replies if isinstance(r, Reply)]
  where = f'the {kept} records kept so far are in {args.out}'
  if not answers:
    return endpoint.redact(
        f'every request of the last {args.max_bad_rounds} round(s) failed (last error: '
        f'{failures[-1].message}); fix the endpoint or the request flags and run the same '
        f'command again; {where}.')
  sample = ' '.join((answers[-1].text or '').split())[:40]
  return endpoint.redact(
      f'the endpoint answered no parsable task in {args.max_bad_rounds} round(s) in a row '
      f'(the last answer starts {sample!r}); use an instruction-following model, with '
      f'--api=chat for a chat model; {where}.')


def _generate(args, endpoint: Endpoint, run: Run, seeds: list, existing: list) -> None:
  """Rounds until --num records are in --out; SelfInstructError on bad or idle rounds."""
  generated = [{'instruction': r['instruction'], 'input': r.get('input') or '',
                'output': r['output']} for r in existing]
  pool = si.RougePool([t['instruction'] for t in seeds] + [r['instruction'] for r in generated])
  seen = {si.dedup_key(t) for t in pool.texts}
  rng = random.Random(f'{args.seed}:{len(existing)}')
  total, bad, idle = len(existing), 0, 0
  judge = args.judge_threshold is not None
  while total < args.num:
    run.stats.add('rounds')
    prompts = []
    for _ in range(args.concurrency):
      tasks = si.sample_prompt_tasks(rng, seeds, generated, args.prompt_tasks,
                                     args.prompt_generated)
      prompts.append((si.encode_prompt(tasks, args.num_tasks), len(tasks) + 1))
    replies = parallel_map(lambda p: endpoint.generate(p[0]), prompts, args.concurrency)
    candidates, parsed = [], 0
    for (_, first), reply in zip(prompts, replies):
      if isinstance(reply, Failed):
        continue
      tasks, rejects = si.parse_response(reply.text, first, reply.finish_reason,
                                         chat=endpoint.chat)
      run.stats.add('proposed', len(tasks) + len(rejects))
      for r in rejects:
        run.reject({'raw': r['raw']}, r['reason'])
      parsed += len(tasks)
      candidates += tasks

    survivors, round_pool, round_seen = [], si.RougePool(), set()
    for task in candidates:
      reason = si.filter_reason(task)
      key = si.dedup_key(task['instruction'])
      if reason is None and (key in seen or key in round_seen):
        reason = 'duplicate'
      if reason:
        run.reject(task, reason)
        continue
      score, similar = max(pool.most_similar(task['instruction']),
                           round_pool.most_similar(task['instruction']), key=lambda x: x[0])
      if si.is_near_duplicate(score, args.rouge_threshold):
        run.reject({**task, 'rouge_l': round(score, 4), 'similar_to': similar}, 'rouge')
        continue
      survivors.append({**task, 'max_rouge_l': round(score, 4)})
      round_pool.add(task['instruction'])
      round_seen.add(key)

    if judge and survivors:
      verdicts = parallel_map(endpoint.judge, survivors, args.concurrency)
      survivors = _judged(run, survivors, verdicts, args.judge_threshold)

    added = 0
    for task in survivors:
      if total >= args.num:
        run.reject(task, 'surplus', count=False)
        run.stats.add('surplus')
        continue
      run.keep(task)
      total += 1
      added += 1
      pool.add(task['instruction'])
      seen.add(si.dedup_key(task['instruction']))
      generated.append(task)
    run.flush('running')
    failed = sum(isinstance(r, Failed) for r in replies)
    print(f'round {run.stats.counts["rounds"]}: kept {total}/{args.num} (+{added}); '
          f'{len(replies)} requests ({failed} failed), {parsed} tasks parsed; removed so far: '
          f'{run.stats.removed_line()}', flush=True)
    bad = bad + 1 if parsed == 0 else 0
    idle = idle + 1 if added == 0 else 0
    if bad >= args.max_bad_rounds:
      run.flush('bad_rounds')
      raise SelfInstructError(_bad_rounds_message(args, endpoint, replies, total))
    if idle >= args.max_idle_rounds:
      run.flush('idle_rounds')
      raise SelfInstructError(
          f'{args.max_idle_rounds} rounds in a row kept no new task (see the reasons in '
          f'{run.rejected_path}); the {total} records kept so far are in {args.out}: raise '
          '--rouge-threshold, add seed tasks or use a stronger model.')


def _judged(run: Run, tasks: list, verdicts: list, threshold: float) -> list:
  """The tasks whose judge score reaches `threshold`, with it as 'judge_score'; the others go to
  the rejected file with their reason (judge_failed, judge_unscored, judge_low)."""
  passed = []
  for task, verdict in zip(tasks, verdicts):
    if isinstance(verdict, Failed):
      run.reject({**task, 'error': verdict.message}, 'judge_failed')
    elif verdict.score is None:
      run.reject({**task, 'judge_reply': verdict.text[:200]}, 'judge_unscored')
    elif verdict.score < threshold:
      run.reject({**task, 'judge_score': verdict.score}, 'judge_low')
    else:
      passed.append({**task, 'judge_score': verdict.score})
  return passed


def _judge_only(args, endpoint: Endpoint, run: Run, records: list, done: set) -> None:
  """Scores every record of --in not judged yet (in --out or the rejected file)."""
  todo = [r for r in records if _record_key(r) not in done]
  run.stats.add('proposed', len(todo))
  batch, bad = 4 * args.concurrency, 0
  for start in range(0, len(todo), batch):
    run.stats.add('rounds')
    chunk = todo[start:start + batch]
    verdicts = parallel_map(endpoint.judge, chunk, args.concurrency)
    for record in _judged(run, chunk, verdicts, args.judge_threshold):
      run.keep(record)
    run.flush('running')
    print(f'judged {min(start + batch, len(todo))}/{len(todo)}: kept {run.stats.counts["kept"]}; '
          f'removed: {run.stats.removed_line()}', flush=True)
    failed = [v for v in verdicts if isinstance(v, Failed)]
    bad = bad + 1 if len(failed) == len(verdicts) else 0
    if bad >= args.max_bad_rounds:
      run.flush('bad_rounds')
      raise SelfInstructError(endpoint.redact(
          f'every judge request of the last {args.max_bad_rounds} batch(es) failed (last error: '
          f'{failed[-1].message}); fix the endpoint and run the same command again (judged '
          f'records are in {args.out}).'))


def _record_key(record: dict) -> str:
  return json.dumps([record.get('instruction'), record.get('input') or '', record.get('output')])


def self_instruct_main(argv: Optional[Sequence[str]] = None) -> int:
  """`flaxllm self-instruct ...` (see the module docstring)."""
  args = _parser().parse_args(argv)
  _check(args)
  try:
    import openai  # pylint: disable=import-outside-toplevel -- optional: in the dev extra
  except ImportError:
    raise SelfInstructError('flaxllm self-instruct needs the openai client; install it with '
                            '`pip install openai` (or flaxllm[dev]).') from None
  key = os.environ.get(args.api_key_env, '')
  rejected_path = args.out + '.rejected.jsonl'
  if args.judge_only:
    if not os.path.isfile(args.input):
      raise SelfInstructError(f'--in={args.input} does not exist; pass the Alpaca JSONL records '
                              'to judge.')
    records = si.read_output(args.input, flag='--in').records
    seeds = None
  else:
    seeds = si.read_seed_tasks(args.seed_tasks)
  out = si.read_output(args.out)
  rejected = si.read_output(rejected_path, flag='the rejected file', strict=False)
  if not args.judge_only and len(out.records) >= args.num:
    print(f'self-instruct: {args.out} already holds {len(out.records)} records (--num='
          f'{args.num}); nothing to do.', flush=True)
    return 0
  stats = Stats(endpoint=args.endpoint, model=args.model, api=args.api, out=args.out,
                num=args.num, judge_threshold=args.judge_threshold,
                judge_only=bool(args.judge_only), concurrency=args.concurrency)
  endpoint = Endpoint(openai, args, key, stats)
  endpoint.preflight()
  for note in endpoint.notes:
    print(f'self-instruct: {note}.', flush=True)
  run = Run(args, endpoint, stats, kept_before=len(out.records))
  run.open(out, rejected)
  try:
    if args.judge_only:
      done = {_record_key(r) for r in out.records} | {
          _record_key(r) for r in rejected.records
          if str(r.get('reason', '')).startswith('judge')}
      _judge_only(args, endpoint, run, records, done)
    else:
      print(f'self-instruct: {len(out.records)} records in {args.out}, {len(seeds)} seed tasks; '
            f'generating up to {args.num} with {args.model} at {args.endpoint} '
            f'({args.api}, {args.concurrency} at once).', flush=True)
      _generate(args, endpoint, run, seeds, out.records)
    print(run.summary(run.flush('done')), flush=True)
  except KeyboardInterrupt:
    stats_now = run.flush('interrupted')
    print(f'\ninterrupted: the {stats_now["kept_total"]} records kept so far are in {args.out}; '
          'run the same command to continue.', flush=True)
    return 130
  finally:
    run.close()
  return 0
