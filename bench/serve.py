"""`flaxllm serve` on CPU: single-stream decode speed against transformers' `generate`,
aggregate throughput and time to first token under concurrent clients, and a bounded load test
with the server's memory before and after.

    .venv/bin/python bench/serve.py          # writes bench/results/serve_cpu.{json,md}

The model is a random-init LLaMA built here with transformers (saved as a Hugging Face
directory with a byte-level tokenizer; nothing is downloaded). The server is the real command,
`python -m flaxllm.cli serve --model=<that dir> --slots=8`, in its own process on loopback;
clients use the `openai` package with streaming and `ignore_eos` (every request generates
exactly max_tokens tokens).

- single stream: one greedy request of `--tokens` tokens after a short prompt: tokens / time
  from sending to the last token (and the decode rate after the first token); transformers:
  `generate(max_new_tokens=min_new_tokens=tokens, do_sample=False)` on the same weights and
  prompt, in this process (torch threads = the CPU count).
- concurrency: C clients (1, 4, 8, 16) each send `--rounds` requests one after the other;
  aggregate generated tokens / wall time, p50 / p99 time to first token.
- load test: `--load-requests` requests (8 clients; prompt lengths 4-200 characters, 8-64
  tokens, a third streamed, a quarter with a stop string, every 25th a bad request that must
  get its error), then the server's resident memory (VmRSS) is compared with its value after
  a warm-up of the same mix.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import time

import numpy as np

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
RESULTS = os.path.join(BENCH, 'results')
NAME = 'bench-llama'
LOAD_ROUNDS = 5   # memory readings during the load test
PROMPT = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'


def build_model(path: str, args):
  """A random-init LlamaForCausalLM and a byte-level tokenizer saved in `path`."""
  import torch
  import transformers

  from flaxllm.interop import hf
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=264, hidden_size=args.d_model, intermediate_size=args.d_model * 8 // 3 // 8 * 8,
      num_hidden_layers=args.layers, num_attention_heads=args.d_model // 64,
      num_key_value_heads=args.d_model // 64, max_position_embeddings=args.max_len,
      bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
  model = transformers.LlamaForCausalLM(config).to(torch.float32).eval()
  model.save_pretrained(path)
  fast = hf.byte_level_tokenizer()
  fast.save_pretrained(path)
  return model, fast


def transformers_speed(model, tokenizer, tokens: int, reps: int) -> float:
  import torch
  ids = tokenizer(PROMPT, return_tensors='pt').input_ids
  with torch.no_grad():
    model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)   # warm-up
    times = []
    for _ in range(reps):
      start = time.perf_counter()
      out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                           pad_token_id=tokenizer.eos_token_id)
      times.append(time.perf_counter() - start)
      assert out.shape[1] - ids.shape[1] == tokens
  return tokens / float(np.median(times))


def start_server(model_dir: str, port: int, slots: int):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.Popen(
      [sys.executable, '-m', 'flaxllm.cli', 'serve', f'--model={model_dir}', f'--port={port}',
       f'--slots={slots}', f'--model-name={NAME}'], cwd=ROOT, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)
  import httpx
  deadline = time.monotonic() + 300
  while time.monotonic() < deadline:
    if proc.poll() is not None:
      raise RuntimeError(f'the server exited: {proc.stdout.read()}')
    try:
      if httpx.get(f'http://127.0.0.1:{port}/health', timeout=1).status_code == 200:
        return proc
    except httpx.HTTPError:
      time.sleep(0.5)
  proc.kill()
  raise RuntimeError('the server did not start within 300 s')


def rss_mib(pid: int) -> float:
  with open(f'/proc/{pid}/status') as f:
    for line in f:
      if line.startswith('VmRSS:'):
        return int(line.split()[1]) / 1024
  raise RuntimeError('no VmRSS')


def stream_one(client, prompt: str, max_tokens: int, **kwargs) -> dict:
  """One streamed completion: time to first token, total time, generated tokens."""
  start = time.perf_counter()
  first = None
  chunks = client.completions.create(model=NAME, prompt=prompt, max_tokens=max_tokens,
                                     temperature=0, stream=True, extra_body={'ignore_eos': True},
                                     stream_options={'include_usage': True}, **kwargs)
  usage = None
  for chunk in chunks:
    if chunk.choices and first is None:
      first = time.perf_counter() - start
    usage = chunk.usage or usage
  return {'ttft': first, 'time': time.perf_counter() - start,
          'tokens': usage.completion_tokens}


def concurrency(client, clients: int, rounds: int, tokens: int) -> dict:
  def run(i):
    return [stream_one(client, PROMPT[:20 + 7 * ((i + r) % 8)], tokens) for r in range(rounds)]
  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    results = [x for rs in pool.map(run, range(clients)) for x in rs]
  wall = time.perf_counter() - start
  ttft = np.asarray([r['ttft'] for r in results])
  generated = sum(r['tokens'] for r in results)
  return {'clients': clients, 'requests': len(results), 'tokens': generated, 'wall_s': wall,
          'tokens_per_s': generated / wall, 'ttft_p50_s': float(np.percentile(ttft, 50)),
          'ttft_p99_s': float(np.percentile(ttft, 99))}


def load_test(client, base: str, requests: int, clients: int = 8, first: int = 0) -> dict:
  """A fixed mix of requests (numbered from `first`); returns counts of good answers and of
  errors."""
  import httpx
  import openai

  def one(i):
    rng = np.random.default_rng(i)
    prompt = ''.join(chr(c) for c in rng.integers(32, 127, int(rng.integers(4, 200))))
    tokens = int(rng.integers(8, 65))
    if i % 25 == 24:   # a bad request: must get its OpenAI error, the server must go on
      r = httpx.post(f'{base}/completions', json={'model': NAME, 'prompt': 'x', 'max_tokens': 0},
                     timeout=60)
      return 'expected_error' if r.status_code == 400 and 'error' in r.json() else 'error'
    try:
      if i % 3 == 0:
        stream_one(client, prompt, tokens)
      else:
        client.completions.create(model=NAME, prompt=prompt, max_tokens=tokens,
                                  temperature=0.8 if i % 2 else 0, seed=i,
                                  stop=['\n\n'] if i % 4 == 1 else None)
      return 'served'
    except openai.OpenAIError:
      return 'error'

  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    outcomes = list(pool.map(one, range(first, first + requests)))
  return {'requests': requests, 'clients': clients, 'wall_s': time.perf_counter() - start,
          **{k: outcomes.count(k) for k in ('served', 'expected_error', 'error')}}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--d-model', type=int, default=256)
  p.add_argument('--layers', type=int, default=4)
  p.add_argument('--max-len', type=int, default=512)
  p.add_argument('--tokens', type=int, default=128, help='tokens per single-stream request.')
  p.add_argument('--reps', type=int, default=3)
  p.add_argument('--clients', default='1,4,8,16')
  p.add_argument('--rounds', type=int, default=3)
  p.add_argument('--concurrency-tokens', type=int, default=64)
  p.add_argument('--load-requests', type=int, default=2500)
  p.add_argument('--slots', type=int, default=8)
  p.add_argument('--out', default=os.path.join(RESULTS, 'serve_cpu'))
  args = p.parse_args(argv)

  import tempfile
  import openai
  import torch
  torch.set_num_threads(os.cpu_count())
  load_before = os.getloadavg()
  work = tempfile.mkdtemp(prefix='flaxllm_bench_serve_')
  model_dir = os.path.join(work, 'hf')
  model, tokenizer = build_model(model_dir, args)
  hf_tps = transformers_speed(model, tokenizer, args.tokens, args.reps)
  del model
  print(f'transformers generate: {hf_tps:.1f} tokens/s', flush=True)

  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  base = f'http://127.0.0.1:{port}/v1'
  proc = start_server(model_dir, port, args.slots)
  try:
    client = openai.OpenAI(base_url=base, api_key='none', max_retries=0, timeout=600)
    stream_one(client, PROMPT, 4)                        # compile the prompt's bucket
    single = [stream_one(client, PROMPT, args.tokens) for _ in range(args.reps)]
    med = sorted(single, key=lambda r: r['time'])[len(single) // 2]
    single_stream = {'tokens': args.tokens, 'tokens_per_s': args.tokens / med['time'],
                     'decode_tokens_per_s': (args.tokens - 1) / (med['time'] - med['ttft']),
                     'ttft_s': med['ttft']}
    print('single stream', single_stream, flush=True)
    concurrency(client, args.slots, 1, 8)                # compile every bucket used below
    levels = []
    for clients in map(int, args.clients.split(',')):
      levels.append(concurrency(client, clients, args.rounds, args.concurrency_tokens))
      print(levels[-1], flush=True)
    load_test(client, base, 50)                          # warm-up: every compiled shape
    # The load test in LOAD_ROUNDS parts with the server's memory after each: a plateau or
    # a slope, not only two readings.
    rss = [rss_mib(proc.pid)]
    parts = []
    for part in range(LOAD_ROUNDS):
      size = args.load_requests // LOAD_ROUNDS
      parts.append(load_test(client, base, size, first=part * size))
      rss.append(rss_mib(proc.pid))
    load = {'requests': sum(p['requests'] for p in parts), 'clients': parts[0]['clients'],
            **{k: sum(p[k] for p in parts) for k in ('wall_s', 'served', 'expected_error',
                                                     'error')},
            'rss_before_mib': rss[0], 'rss_after_mib': rss[-1], 'rss_after_each_part_mib': rss}
    print('load', load, flush=True)
  finally:
    proc.terminate()
    proc.wait(timeout=30)
  load_after = os.getloadavg()

  one = levels[0]['tokens_per_s']
  result = {
      'date': datetime.date.today().isoformat(), 'machine': platform.machine(),
      'cpus': os.cpu_count(), 'load_before': load_before, 'load_after': load_after,
      'model': {'d_model': args.d_model, 'layers': args.layers, 'vocab': 264,
                'max_len': args.max_len, 'slots': args.slots},
      'transformers_tokens_per_s': hf_tps, 'single_stream': single_stream,
      'speedup_vs_transformers': single_stream['tokens_per_s'] / hf_tps,
      'concurrency': levels, 'load_test': load}
  with open(args.out + '.json', 'w') as f:
    json.dump(result, f, indent=2)
  rows = '\n'.join(
      f"| {lv['clients']} | {lv['requests']} | {lv['tokens_per_s']:.0f} | "
      f"{lv['tokens_per_s'] / one:.2f}x | {lv['ttft_p50_s'] * 1000:.0f} | "
      f"{lv['ttft_p99_s'] * 1000:.0f} |" for lv in levels)
  s = single_stream
  md = f"""# flaxllm serve on CPU

`python bench/serve.py` on {result['date']} ({result['machine']}, {result['cpus']} CPUs shared with other jobs; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after). Random-init LLaMA (d_model {args.d_model}, {args.layers} layers, vocabulary 264, float32), served by `flaxllm serve --slots={args.slots}` (max_len {args.max_len}) in its own process; clients: the `openai` package over loopback, streaming, `ignore_eos`.

## Single stream ({args.tokens} tokens, greedy, median of {args.reps})

| | tokens/s |
|---|---|
| transformers `generate` (same weights and prompt) | {hf_tps:.1f} |
| flaxllm serve, end to end (request to last token) | {s['tokens_per_s']:.1f} ({result['speedup_vs_transformers']:.2f}x) |
| flaxllm serve, decode after the first token | {s['decode_tokens_per_s']:.1f} |

Time to first token: {s['ttft_s'] * 1000:.0f} ms.

## Concurrent clients ({args.concurrency_tokens} tokens per request, {args.rounds} requests per client)

| clients | requests | aggregate tokens/s | vs 1 client | TTFT p50 (ms) | TTFT p99 (ms) |
|---|---|---|---|---|---|
{rows}

## Load test

{load['requests']} requests from {load['clients']} clients in {load['wall_s']:.0f} s: {load['served']} served, {load['expected_error']} bad requests answered with their error, {load['error']} errors. Server memory (VmRSS) after a warm-up of the same mix: {load['rss_before_mib']:.0f} MiB; after the load test: {load['rss_after_mib']:.0f} MiB; after each fifth of it: {' / '.join(f'{m:.0f}' for m in load['rss_after_each_part_mib'][1:])} MiB.
"""
  with open(args.out + '.md', 'w') as f:
    f.write(md)
  print(md)


if __name__ == '__main__':
  main()
