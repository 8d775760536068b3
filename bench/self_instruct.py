"""`flaxllm self-instruct` on CPU: instructions, requests and tokens per minute, and the share
each filter removes, against a served flaxllm model and against a scripted fake server.

    .venv/bin/python bench/self_instruct.py [--model /tmp/after/runs/default]
    # writes bench/results/self_instruct_cpu.{json,md}

1. `flaxllm serve --model=MODEL --slots=8` in its own process on loopback, and
   `flaxllm self-instruct --concurrency=8` against it (completions, Alpaca's prompt). The served
   context is read from /v1/models, so prompts keep their last (context - max_tokens) tokens.
   A small model that never saw instructions writes no parsable task, so the run stops after
   --bad-rounds rounds; requests/min and tokens/min are what it measures, and the per-filter
   shares say what the model wrote.
2. The same command against tests/fake_openai.py (canned replies of 5 well-formed tasks, in
   this process): the pipeline's own overhead (prompting, parsing, ROUGE-L against a growing
   pool, writing), with and without the judge pass.
3. The ROUGE-L filter alone on English text: the first docstring lines of this interpreter's
   standard library (4-40 words, like instructions) as a pool of 1000 and 5000, 200 more as
   new instructions: milliseconds per new instruction, pruned (`RougePool.most_similar`) and
   the plain loop over `rouge_scorer._score_lcs` (as Alpaca's generate_instruction.py).
"""
from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
RESULTS = os.path.join(BENCH, 'results')
sys.path.insert(0, os.path.join(ROOT, 'tests'))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _loadavg() -> str:
  with open('/proc/loadavg', encoding='utf-8') as f:
    return ' '.join(f.read().split()[:3])


def _cpu() -> str:
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _self_instruct(workdir: str, name: str, flags: list[str]) -> dict:
  """Runs the command in its own process; its stats plus wall time, exit code and a sample."""
  out = os.path.join(workdir, f'{name}.jsonl')
  cmd = [sys.executable, '-m', 'flaxllm.cli', 'self-instruct', f'--out={out}', *flags]
  start = time.monotonic()
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                        env={**os.environ, 'PYTHONPATH': ROOT})
  wall = time.monotonic() - start
  with open(out + '.stats.json', encoding='utf-8') as f:
    stats = json.load(f)
  sample = None
  rejected = out + '.rejected.jsonl'
  if os.path.exists(rejected):
    with open(rejected, encoding='utf-8') as f:
      first = json.loads(f.readline() or 'null')
    sample = first and (first.get('raw') or first.get('instruction'))
  stats.pop('history', None)
  return {'command': 'flaxllm self-instruct ' + ' '.join(
      f.replace(workdir, '$TMP') for f in [f'--out={out}', *flags]),
          'exit_code': proc.returncode, 'wall_s': round(wall, 2),
          'last_line': (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1][:400].replace(
              workdir, '$TMP'),
          'first_rejected_sample': (sample or '')[:300], 'stats': stats}


def bench_served(args, workdir: str) -> dict:
  port = _free_port()
  server = subprocess.Popen(
      [sys.executable, '-m', 'flaxllm.cli', 'serve', f'--model={args.model}', '--slots=8',
       f'--port={port}', '--model-name=teacher'],
      cwd=ROOT, env={**os.environ, 'PYTHONPATH': ROOT}, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)
  try:
    deadline = time.monotonic() + 300
    while True:
      try:
        with urllib.request.urlopen(f'http://127.0.0.1:{port}/health', timeout=2):
          break
      except OSError:
        if server.poll() is not None or time.monotonic() > deadline:
          raise RuntimeError(f'flaxllm serve did not start: {server.stdout.read()[-2000:]}')
        time.sleep(0.5)
    result = _self_instruct(workdir, 'served', [
        f'--endpoint=http://127.0.0.1:{port}/v1', '--model=teacher', f'--num={args.num}',
        '--concurrency=8', f'--max-bad-rounds={args.bad_rounds}'])
  finally:
    server.terminate()
    server.wait(timeout=60)
  result['server'] = f'flaxllm serve --model={args.model} --slots=8'
  return result


def bench_fake(args, workdir: str) -> list[dict]:
  import fake_openai  # pylint: disable=import-outside-toplevel -- tests/ helper

  fake = fake_openai.FakeOpenAI().start()
  try:
    results = []
    for name, extra, num in (('fake', [], args.fake_num),
                             ('fake_judge', ['--judge-threshold=5'], args.fake_num // 2)):
      fake.reset()
      results.append(_self_instruct(workdir, name, [
          f'--endpoint={fake.url}', '--model=teacher', f'--num={num}', '--concurrency=4',
          *extra]))
    return results
  finally:
    fake.stop()


def _docstring_sentences(limit: int) -> list[str]:
  """First docstring lines of the standard library with 4-40 words, deduplicated, in a fixed
  order."""
  import sysconfig  # pylint: disable=import-outside-toplevel -- only here
  stdlib = sysconfig.get_paths()['stdlib']
  seen, out = set(), []
  for base, dirs, files in sorted(os.walk(stdlib)):
    dirs[:] = sorted(d for d in dirs if d not in ('test', 'tests', 'site-packages', 'idlelib'))
    for name in sorted(files):
      if not name.endswith('.py'):
        continue
      try:
        with open(os.path.join(base, name), encoding='utf-8') as f:
          tree = ast.parse(f.read())
      except (SyntaxError, UnicodeDecodeError, OSError):
        continue
      for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
          doc = ast.get_docstring(node)
          line = ' '.join((doc or '').strip().split('\n\n')[0].split())
          if 4 <= len(line.split()) <= 40 and line not in seen:
            seen.add(line)
            out.append(line)
            if len(out) >= limit:
              return out
  return out


def bench_rouge(sizes=(1000, 5000), queries=200) -> list[dict]:
  from rouge_score import rouge_scorer  # pylint: disable=import-outside-toplevel -- bench only

  from flaxllm.data import self_instruct as si  # pylint: disable=import-outside-toplevel -- as above
  texts = _docstring_sentences(max(sizes) + queries)
  new, rows = texts[-queries:], []
  for size in sizes:
    pool = si.RougePool(texts[:size])
    start = time.perf_counter()
    pruned = [pool.most_similar(q)[0] for q in new]
    t_pruned = (time.perf_counter() - start) / queries
    tokens = [pool.tokenize(t) for t in texts[:size]]
    start = time.perf_counter()
    plain = [max((rouge_scorer._score_lcs(other, pool.tokenize(q)).fmeasure  # pylint: disable=protected-access
                  for other in tokens), default=0.0) for q in new]
    t_plain = (time.perf_counter() - start) / queries
    assert all(abs(a - b) < 1e-12 for a, b in zip(pruned, plain))
    rows.append({'pool': size, 'queries': queries, 'ms_pruned': round(1e3 * t_pruned, 3),
                 'ms_plain': round(1e3 * t_plain, 3),
                 'near_duplicates': sum(si.is_near_duplicate(x) for x in pruned)})
  return rows


def _row(name: str, r: dict) -> str:
  s = r['stats']
  return (f'| {name} | {s["kept"]} | {s["proposed"]} | {s["requests"]} | {s["elapsed_s"]:.1f} | '
          f'{r["wall_s"]:.1f} | {s["instructions_per_min"]:,.0f} | {s["requests_per_min"]:,.0f} | '
          f'{s["completion_tokens_per_min"]:,.0f} |')


def _shares(r: dict) -> str:
  s = r['stats']
  parts = [f'{reason} {100 * share:.1f}%' for reason, share in s['share_removed'].items()]
  kept = s['share_kept']
  return ', '.join(parts) + (f'; kept {100 * kept:.1f}%' if kept is not None else '')


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--model', default='/tmp/after/runs/default')
  p.add_argument('--num', type=int, default=100)
  p.add_argument('--bad-rounds', type=int, default=5)
  p.add_argument('--fake-num', type=int, default=1000)
  p.add_argument('--out', default=os.path.join(RESULTS, 'self_instruct_cpu'))
  p.add_argument('--render-only', action='store_true',
                 help='rewrite the .md from the .json of an earlier run.')
  args = p.parse_args()
  if args.render_only:
    with open(args.out + '.json', encoding='utf-8') as f:
      text = render(json.load(f))
    with open(args.out + '.md', 'w', encoding='utf-8') as f:
      f.write(text)
    return
  load_before = _loadavg()
  workdir = tempfile.mkdtemp(prefix='self_instruct_bench_')
  try:
    served = bench_served(args, workdir) if os.path.exists(args.model) else None
    fakes = bench_fake(args, workdir)
    rouge = bench_rouge()
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  result = {'date': datetime.date.today().isoformat(), 'machine': f'{_cpu()}, {os.cpu_count()} '
            f'CPUs, {platform.machine()}', 'loadavg_before': load_before,
            'loadavg_after': _loadavg(), 'served': served, 'fake': fakes,
            'rouge_filter': rouge}
  with open(args.out + '.json', 'w', encoding='utf-8') as f:
    json.dump(result, f, indent=1)
    f.write('\n')
  text = render(result)
  with open(args.out + '.md', 'w', encoding='utf-8') as f:
    f.write(text)
  print(text)


def render(result: dict) -> str:
  """The Markdown report of a result (`--render-only` redoes it from the JSON)."""
  served, fakes, rouge = result['served'], result['fake'], result['rouge_filter']
  header = ('| run | kept | proposed | requests | run s | wall s (with start-up) | '
            'instructions/min | requests/min | completion tokens/min |\n'
            '|---|---|---|---|---|---|---|---|---|')
  rows = ([_row('flaxllm serve', served)] if served else []) + [
      _row('fake server', fakes[0]), _row('fake server + judge', fakes[1])]
  lines = [
      '# flaxllm self-instruct on CPU', '',
      f'`.venv/bin/python bench/self_instruct.py` on {result["date"]} ({result["machine"]}; '
      f'load average {result["loadavg_before"]} before, {result["loadavg_after"]} after).', '',
      header, *rows, '',
      '"run s" is the command\'s own clock (from after start-up to the end, `<out>.stats.json`); '
      '"wall s" includes the interpreter, JAX and rouge-score imports (about 5 s here).', '']
  if served:
    s = served['stats']
    lines += [
        '## Against flaxllm serve', '',
        f'Server: `{served["server"]}` (its own process, loopback). Command: '
        f'`{served["command"]}`.', '',
        f'Exit code {served["exit_code"]}: {served["last_line"]}', '',
        f'Share of the {s["proposed"]} proposed chunks removed by each filter: {_shares(served)}.',
        f'Tokens: {s["prompt_tokens"]} prompt, {s["completion_tokens"]} completion.', '',
        f'First rejected answer: `{served["first_rejected_sample"][:200]!r}`', '']
  for name, r in (('the fake server', fakes[0]), ('the fake server with the judge', fakes[1])):
    lines += [f'## Against {name}', '', f'Command: `{r["command"]}` (exit code '
              f'{r["exit_code"]}).', '', f'Removed by each filter (share of '
              f'{r["stats"]["proposed"]} proposed): {_shares(r)}.', '']
  lines += ['## The ROUGE-L filter alone', '',
            'Pool: first docstring lines of the standard library (English, 4-40 words); 200 '
            'more as new instructions; milliseconds per new instruction (same maxima both ways).',
            '', '| pool | pruned (RougePool) ms | plain _score_lcs loop ms | near-duplicates |',
            '|---|---|---|---|'] + [
                f'| {r["pool"]} | {r["ms_pruned"]} | {r["ms_plain"]} | {r["near_duplicates"]} |'
                for r in rouge] + ['']
  return '\n'.join(lines)


if __name__ == '__main__':
  main()
