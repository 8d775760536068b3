"""lm-eval log-likelihood throughput on CPU: flaxllm's backend (`flaxllm.evaluation.harness.FlaxLM`)
next to lm-eval's own `hf` backend (`lm_eval.models.huggingface.HFLM`), same model, same requests.

    .venv/bin/python bench/harness_speed.py      # writes bench/results/harness_speed_cpu.{json,md}
    .venv/bin/python bench/harness_speed.py --limit 20 --out ''   # quick look

Model: a random-init `transformers.LlamaConfig` (default init) of 4 layers, hidden 256, 4 heads,
SwiGLU 688, max_position_embeddings 512, vocabulary 258 (a byte-level tokenizer.json: <s>, </s>
and one token per byte: `flaxllm.interop.hf.byte_level_tokenizer`), float32, saved with
`save_pretrained` into a temporary directory; both backends load that directory
(`FlaxLM(pretrained=DIR, batch_size=B)`, `HFLM(pretrained=DIR, device='cpu', dtype='float32',
batch_size=B)`).

Requests: the shipped multiple-choice task `flaxllm_stdlib_docname`, N docs x 4 choices = 4N
loglikelihood requests, as `lm_eval.simple_evaluate(model=lm, tasks=[...], limit=N,
task_manager=flaxllm's)` builds them (recorded once through a backend that only collects them).
Two timings per backend:
- **backend**: `lm.loglikelihood(requests)`, the backend's own work (tokenizing, batching, the
  forward passes): the requests-per-second figure;
- **simple_evaluate**: the whole call (lm-eval's task loading and context building included, the
  same for both), for scale.
Cold = the first call in the process for that backend (for flaxllm: the compilation); warm =
the median of `--reps` later calls, the two backends taking turns. Compile share = (cold -
warm) / cold. Threads: torch.set_num_threads(2), JAX's default (the machine has 2 cores).
acc / acc_norm from both show they computed the same thing; the per-request log-likelihoods are
compared too (max abs difference).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time

TASK = 'flaxllm_stdlib_docname'


def build_model_dir(path: str) -> dict:
  import torch
  import transformers

  from flaxllm.interop import hf
  tok = hf.byte_level_tokenizer()
  n_vocab = len(tok)
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=n_vocab, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
      rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
  model = transformers.LlamaForCausalLM(config).to(torch.float32).eval()
  model.save_pretrained(path)
  tok.save_pretrained(path)
  return {'layers': 4, 'hidden': 256, 'heads': 4, 'intermediate': 688, 'vocab': n_vocab,
          'max_position_embeddings': 512, 'dtype': 'float32',
          'params': sum(p.numel() for p in model.parameters())}


def record_requests(limit: int, manager) -> list:
  """The loglikelihood Instances simple_evaluate hands a backend for the task."""
  import lm_eval
  from lm_eval.api.model import LM

  class Recorder(LM):
    def __init__(self):
      super().__init__()
      self.requests = []

    def loglikelihood(self, requests, disable_tqdm=False):
      self.requests += requests
      return [(-1.0, False)] * len(requests)

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
      raise NotImplementedError

    def generate_until(self, requests, disable_tqdm=False):
      raise NotImplementedError

  recorder = Recorder()
  lm_eval.simple_evaluate(model=recorder, tasks=[TASK], limit=limit, task_manager=manager,
                          verbosity='ERROR')
  return recorder.requests


def matmul_gflops(jax, size: int = 2048) -> float:
  """The best of 5 [size, size] float32 matmuls in JAX: what this machine's cores reach on
  one large matmul, for scale."""
  a = jax.numpy.ones((size, size), jax.numpy.float32)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  best = float('inf')
  for _ in range(5):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * size ** 3 / best / 1e9


def time_backend(lm, requests) -> float:
  t0 = time.perf_counter()
  lm.loglikelihood(requests, disable_tqdm=True)
  return time.perf_counter() - t0


def run_eval(lm, limit: int, manager):
  import lm_eval
  t0 = time.perf_counter()
  out = lm_eval.simple_evaluate(model=lm, tasks=[TASK], limit=limit, task_manager=manager,
                                log_samples=True, verbosity='ERROR')
  seconds = time.perf_counter() - t0
  res = out['results'][TASK]
  lls = [float(r[0][0]) for s in out['samples'][TASK] for r in s['resps']]
  return seconds, {'acc': res['acc,none'], 'acc_norm': res['acc_norm,none']}, lls


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--limit', type=int, default=100)
  ap.add_argument('--batch-size', type=int, default=16)
  ap.add_argument('--reps', type=int, default=2)
  ap.add_argument('--out', default='bench/results/harness_speed_cpu')
  args = ap.parse_args()

  import torch
  torch.set_num_threads(2)
  import jax
  import lm_eval
  import transformers
  from lm_eval.models.huggingface import HFLM

  from flaxllm.evaluation import harness
  from flaxllm.evaluation import tasks as flax_tasks

  load_before = os.getloadavg()
  manager = flax_tasks.task_manager()
  with tempfile.TemporaryDirectory() as tmp:
    model_info = build_model_dir(tmp)
    lms = {
        'flaxllm': harness.FlaxLM(pretrained=tmp, batch_size=args.batch_size),
        'hf': HFLM(pretrained=tmp, device='cpu', dtype='float32', batch_size=args.batch_size),
    }
    requests = record_requests(args.limit, manager)
    cold, warm = {}, {k: [] for k in lms}
    eval_cold, eval_warm, metrics, lls = {}, {k: [] for k in lms}, {}, {}
    for name, lm in lms.items():
      cold[name] = time_backend(lm, requests)
      print(f'{name} backend cold {cold[name]:.2f}s', flush=True)
    for _ in range(args.reps):
      for name, lm in lms.items():
        warm[name].append(time_backend(lm, requests))
        print(f'{name} backend warm {warm[name][-1]:.2f}s', flush=True)
    for name, lm in lms.items():
      eval_cold[name], metrics[name], lls[name] = run_eval(lm, args.limit, manager)
    for _ in range(args.reps):
      for name, lm in lms.items():
        seconds, m, _ = run_eval(lm, args.limit, manager)
        assert m == metrics[name], (name, m, metrics[name])
        eval_warm[name].append(seconds)
        print(f'{name} simple_evaluate warm {seconds:.2f}s', flush=True)
  load_after = os.getloadavg()
  peak = matmul_gflops(jax)

  n_req = len(requests)
  assert n_req == len(lls['flaxllm']) == len(lls['hf'])
  # The work itself: every request's tokens through the model once (2 FLOPs per weight and
  # token; the embedding lookup is not a matmul), against the compute rate each backend reached.
  tokens = sum(len(lms['flaxllm'].tok_encode(r.args[0] + r.args[1])) for r in requests)
  weights = model_info['params'] - model_info['vocab'] * model_info['hidden']
  flops = 2 * weights * tokens
  max_diff = max(abs(a - b) for a, b in zip(lls['flaxllm'], lls['hf']))
  rows = {}
  for name in lms:
    w = statistics.median(warm[name])
    rows[name] = {'cold_s': cold[name], 'warm_s': w, 'warm_all_s': warm[name],
                  'requests_per_s_warm': n_req / w, 'compile_share': (cold[name] - w) / cold[name],
                  'simple_evaluate_cold_s': eval_cold[name],
                  'simple_evaluate_warm_s': statistics.median(eval_warm[name]),
                  'gflops_per_s_warm': flops / w / 1e9, **metrics[name]}
  ratio = rows['flaxllm']['requests_per_s_warm'] / rows['hf']['requests_per_s_warm']
  result = {
      'command': ' '.join([sys.executable.split('/')[-1], *sys.argv]),
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'platform': platform.platform(), 'processor': platform.processor(),
      'cpus': os.cpu_count(), 'torch_threads': torch.get_num_threads(),
      'versions': {'python': platform.python_version(), 'jax': jax.__version__,
                   'torch': torch.__version__, 'transformers': transformers.__version__,
                   'lm_eval': getattr(lm_eval, '__version__', 'unknown')},
      'jax_devices': [str(d) for d in jax.devices()],
      'loadavg_before': load_before, 'loadavg_after': load_after,
      'task': TASK, 'limit': args.limit, 'loglikelihood_requests': n_req,
      'request_tokens': tokens, 'matmul_flops': flops, 'jax_2048_matmul_gflops_per_s': peak,
      'batch_size': args.batch_size, 'reps': args.reps, 'model': model_info,
      'backends': rows, 'same_acc': metrics['flaxllm'] == metrics['hf'],
      'max_abs_loglikelihood_diff': max_diff,
      'flaxllm_over_hf_requests_per_s': ratio,
  }
  print(json.dumps(result, indent=1))
  if not args.out:
    return
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out + '.json', 'w') as f:
    json.dump(result, f, indent=1)
    f.write('\n')
  lines = [
      '# lm-eval log-likelihood throughput, CPU: flaxllm backend vs lm-eval `hf`', '',
      f'`{result["command"]}` on {result["date"]}, {result["platform"]}, {result["cpus"]} CPUs '
      f'(torch threads {result["torch_threads"]}, JAX default); load average '
      f'{load_before[0]:.2f} before, {load_after[0]:.2f} after.',
      f'jax {jax.__version__}, torch {torch.__version__}, transformers '
      f'{transformers.__version__}, lm_eval {result["versions"]["lm_eval"]}.', '',
      f'Task `{TASK}`, limit {args.limit} docs = {n_req} loglikelihood requests, batch size '
      f'{args.batch_size}; random-init LLaMA (4 layers, hidden 256, 4 heads, SwiGLU 688, '
      f'vocab {model_info["vocab"]}, float32, {model_info["params"] / 1e6:.2f}M params) from one '
      'HF directory. Backend = `lm.loglikelihood(requests)`; simple_evaluate = the whole call '
      f'(task set-up included); warm = median of {args.reps} later calls (backends '
      'alternating).', '',
      '| backend | backend cold s | backend warm s | requests/s (warm) | GFLOP/s (warm) | '
      'compile share | simple_evaluate cold / warm s | acc | acc_norm |',
      '|---|---|---|---|---|---|---|---|---|',
  ]
  for name, r in rows.items():
    lines.append(f'| {name} | {r["cold_s"]:.2f} | {r["warm_s"]:.2f} | '
                 f'{r["requests_per_s_warm"]:.1f} | {r["gflops_per_s_warm"]:.0f} | '
                 f'{100 * r["compile_share"]:.0f}% | '
                 f'{r["simple_evaluate_cold_s"]:.2f} / {r["simple_evaluate_warm_s"]:.2f} | '
                 f'{r["acc"]:.3f} | {r["acc_norm"]:.3f} |')
  lines += ['', f'**flaxllm / hf requests per second (warm): {ratio:.2f}x** (issue 15 aims at '
            f'>= 2x). Same acc and acc_norm: {result["same_acc"]}; max |log-likelihood '
            f'difference| over the {n_req} requests: {max_diff:.2e}.', '',
            f'GFLOP/s = 2 x {weights / 1e6:.2f}M matmul weights x {tokens} request tokens / '
            'warm backend time: the compute rate reached on the requests themselves (padding '
            f'and attention not counted). For scale, one 2048 x 2048 matmul in JAX reaches '
            f'{peak:.0f} GFLOP/s here. Both backends compute every request in full; what '
            'remains is the efficiency of small (d_model 256) matmuls, and less computation, '
            'e.g. scoring the shared context of a multiple-choice question once for all its '
            'choices (not done).', '']
  with open(args.out + '.md', 'w') as f:
    f.write('\n'.join(lines))


if __name__ == '__main__':
  main()
