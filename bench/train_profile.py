"""Where a train step's time goes on CPU: `jax.profiler` over the trainer's own step.

    .venv/bin/python bench/train_profile.py      # writes bench/results/train_profile_cpu.{json,md}

Times the forward (loss only), the gradient and the whole train step of the `configs/default.py`
model (the same `build_programs` as `flaxllm train`), then traces the gradient program and sums
the XLA:CPU ops' time by what they compute (the op_name of each fused op: forward or backward
('transpose(jvp') of the MLP, attention, head, norms) and by kind (ynn_fusion: a matmul through
YNNPACK; dot: a matmul left to Eigen; copy/transpose fusions: layout changes; other loop
fusions: elementwise work). Op times overlap when XLA runs two ops at once on the two cores, so
the per-op sum exceeds the wall time (both are given).
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import shlex
import statistics
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, ROOT)
sys.path.insert(0, BENCH)
RESULTS = os.path.join(BENCH, 'results')
NOT_OPS = ('ThunkExecutor', '$', 'Slinky', 'Pjit', 'Common', 'ThreadpoolListener', 'Wait for',
           'PythonRefManager', 'ParseArguments', 'Handle input', 'AllocateOutput')


def timed(fn, reps):
  import jax
  jax.block_until_ready(fn())
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def op_names(hlo_text: str) -> dict:
  """HLO instruction name -> its op_name metadata."""
  out = {}
  for line in hlo_text.splitlines():
    m = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = .*op_name="([^"]*)"', line)
    if m:
      out.setdefault(m.group(1), m.group(2))
  return out


def part_of(op_name: str) -> str:
  """'bwd mlp/up_proj', 'fwd attn/...', 'fwd head + loss (fused)', ... from an op_name."""
  direction = 'bwd' if 'transpose(' in op_name else 'fwd'
  parts = [p for p in op_name.split('/')
           if not re.match(r'(jit|jvp|transpose|pjit)\(', p) and p != 'decoder'
           and not re.fullmatch(r'layers_\d+', p)]
  if 'while' in parts:  # the chunked head + loss (a scan), forward and its pullback
    return 'head + loss (fused, chunked)'
  if 'p[' in op_name:
    return f'{direction} parameter gathers'
  return f"{direction} {'/'.join(parts[:2]) or '?'}"


def kind_of(name: str) -> str:
  base = re.sub(r'\.\d+$', '', name)
  if base.startswith('ynn_fusion'):
    return 'matmul (YNNPACK fusion)'
  if base == 'dot':
    return 'matmul (Eigen dot)'
  if 'copy' in base or 'transpose' in base:
    return 'layout (copy/transpose fusions)'
  return 'elementwise / reductions'


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--config', default=os.path.join(ROOT, 'configs', 'default.py'))
  p.add_argument('--reps', type=int, default=10)
  p.add_argument('--traced', type=int, default=5, help='gradient calls traced')
  p.add_argument('--out', default=os.path.join(RESULTS, 'train_profile_cpu'))
  args = p.parse_args(argv)

  import jax
  import numpy as np
  from flaxllm import config as config_lib
  from flaxllm.train import trainer
  import model_speed

  config = config_lib.load_config(args.config)
  programs = trainer.build_programs(config)
  key = jax.random.PRNGKey(config.seed)
  full = programs.init_params(key)
  state = programs.init(programs.split(full, key)[0], key)
  params = jax.tree.map(np.asarray, state.params)
  tokens = np.random.default_rng(0).integers(3, programs.model_cfg.vocab_size,
                                             (config.batch_size, config.seq_len + 1), np.int32)
  batch = model_speed.train_batch(tokens)
  loss_fn = programs.objective.train_loss(programs.objective.build_model(train=False))
  forward = jax.jit(lambda p, b: loss_fn(p, {}, b, None)[0])
  grad = jax.jit(lambda p, b: jax.grad(lambda p: loss_fn(p, {}, b, None)[0])(p))
  holder = {'state': state}

  def step():
    holder['state'], metrics = programs.train_step(holder['state'], batch, {})
    return metrics

  times = {'forward_s': timed(lambda: forward(params, batch), args.reps),
           'grad_s': timed(lambda: grad(params, batch), args.reps),
           'train_step_s': timed(step, args.reps)}

  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    for _ in range(args.traced):
      jax.block_until_ready(grad(params, batch))
    jax.profiler.stop_trace()
    trace = sorted(glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'), recursive=True))[-1]
    events = json.load(gzip.open(trace))
  events = events['traceEvents'] if isinstance(events, dict) else events
  names = op_names(grad.lower(params, batch).compile().as_text())
  by_part, by_kind = collections.Counter(), collections.Counter()
  for e in events:
    if e.get('ph') != 'X' or e['name'].startswith(NOT_OPS):
      continue
    ms = e.get('dur', 0) / 1e3 / args.traced
    by_part[part_of(names.get(e['name'], '?'))] += ms
    by_kind[kind_of(e['name'])] += ms
  ops_ms = sum(by_kind.values())
  result = dict(benchmark='train_profile', config=args.config, batch=config.batch_size,
                seq_len=config.seq_len, **times, ops_ms_per_grad=ops_ms,
                by_kind=dict(by_kind.most_common()), by_part=dict(by_part.most_common()),
                machine=model_speed.machine_info(),
                command=shlex.join(['.venv/bin/python', 'bench/train_profile.py'] +
                                   (sys.argv[1:] if argv is None else list(argv))))
  model_speed.write_results(args.out, result, markdown(result))
  return result


def markdown(r):
  m = r['machine']
  lines = [
      '# Where the CPU train step goes (configs/default.py, XLA:CPU ops of the gradient)',
      '',
      f"Machine: {m['cpu']}, {m['cores']} cores; jax {m['jax']}; {m['date']}. Batch "
      f"{r['batch']} x seq {r['seq_len']}, float32.",
      '',
      f"Median wall time: forward (loss) {r['forward_s'] * 1e3:.1f} ms, gradient "
      f"{r['grad_s'] * 1e3:.1f} ms ({r['grad_s'] / r['forward_s']:.1f}x the forward; 3x is "
      f"the matmul FLOP ratio), whole train step {r['train_step_s'] * 1e3:.1f} ms.",
      f"Traced gradient: {r['ops_ms_per_grad']:.1f} ms of op time per call (ops overlap on the "
      'two cores, so this exceeds the wall time).',
      '',
      '| op kind | ms per gradient | share |',
      '|---|---:|---:|',
      *[f'| {k} | {v:.1f} | {v / r["ops_ms_per_grad"]:.0%} |' for k, v in r['by_kind'].items()],
      '',
      '| part of the model (fwd / bwd) | ms per gradient | share |',
      '|---|---:|---:|',
      *[f'| {k} | {v:.1f} | {v / r["ops_ms_per_grad"]:.0%} |'
        for k, v in list(r['by_part'].items())[:25]],
      '',
      f"Reproduce: `{r['command']}`",
  ]
  return '\n'.join(lines) + '\n'


if __name__ == '__main__':
  main()
