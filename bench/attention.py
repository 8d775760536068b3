"""Attention kernels: forward and forward+backward TFLOP/s of the Pallas flash kernels against
the XLA reference and cuDNN (`jax.nn.dot_product_attention(implementation='cudnn')`), and of
the blocked XLA path (`flaxllm.kernels.blocked_attention`, what CPUs run).

    .venv/bin/python bench/attention.py            # on a GPU (or TPU, without cuDNN)
    .venv/bin/python bench/attention.py --quick    # tiny shapes; runs on CPU in interpret mode
    .venv/bin/python bench/attention.py --cpu      # CPU: blocked vs reference, float32

Shapes follow the FlashAttention benchmarks: bf16, batch * seq = --tokens (16k) and
heads * head_dim = --width (2048), for seq 1k..16k, head_dim 64 and 128, causal and not.
FLOPs: forward 4 * batch * heads * seq^2 * head_dim (halved when causal), backward 2.5x the
forward (so forward+backward is 3.5x). Each number is the median of --reps timed calls after
warm-up (compilation excluded); all implementations are measured in the same process, so the
printed ratios compare like with like. Before timing, each implementation's output is checked
against the XLA reference on the smallest shape. A failing implementation (e.g. cuDNN on a
machine without it, or XLA out of memory at 16k) is recorded with its error and skipped.

Writes bench/results/attention_<device kind>.{json,md} (--out to change, "" to skip).
"""
from __future__ import annotations

import argparse
import datetime
import functools
import os
import re
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import model_speed  # noqa: E402  (bench/model_speed.py: write_results)
from flaxllm import kernels  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')
IMPLS = ('pallas', 'cudnn', 'blocked', 'xla')
DTYPES = {'bfloat16': jnp.bfloat16, 'float32': jnp.float32}
RATIOS = ('pallas/cudnn', 'pallas/xla', 'blocked/xla')


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--quick', action='store_true',
                 help='tiny shapes (seq 64/128, 2 reps); interpret mode on CPU')
  p.add_argument('--seqs', default='1024,2048,4096,8192,16384')
  p.add_argument('--head-dims', default='64,128')
  p.add_argument('--tokens', type=int, default=16384, help='batch * seq')
  p.add_argument('--width', type=int, default=2048, help='heads * head_dim')
  p.add_argument('--kv-heads', type=int, default=0, help='0: as many as query heads (MHA)')
  p.add_argument('--impls', default=','.join(IMPLS))
  p.add_argument('--reps', type=int, default=10)
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--dtype', default='bfloat16', choices=tuple(DTYPES))
  p.add_argument('--cpu', action='store_true',
                 help='the CPU comparison: blocked vs xla, float32, seq 128..2048, 8k tokens, '
                      'width 512 (writes attention_cpu)')
  p.add_argument('--out', default=None, help='results path without extension ("" = skip)')
  args = p.parse_args(argv)
  if args.quick:
    args.seqs, args.tokens, args.width, args.reps, args.warmup = '64,128', 256, 128, 2, 1
  if args.cpu:
    args.seqs, args.tokens, args.width, args.head_dims = '128,256,512,1024,2048', 8192, 512, '64'
    args.impls, args.dtype, args.reps = 'blocked,xla', 'float32', 5
  return args


def attention_fn(impl, causal):
  """f(q, k, v) for one implementation."""
  if impl == 'pallas':
    return functools.partial(kernels.flash_attention, causal=causal)
  if impl == 'cudnn':
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                        implementation='cudnn')
  if impl == 'blocked':
    return functools.partial(kernels.blocked_attention, causal=causal)
  return functools.partial(kernels.reference_attention, causal=causal)


def compiled(impl, causal, mode, q, k, v, do):
  """A compiled callable of (q, k, v, do): the forward, or forward+backward (the vjp)."""
  f = attention_fn(impl, causal)
  if mode == 'fwd':
    fn = lambda q, k, v, do: f(q, k, v)  # noqa: E731
  else:
    def fn(q, k, v, do):
      out, vjp = jax.vjp(f, q, k, v)
      return out, *vjp(do)
  return jax.jit(fn).lower(q, k, v, do).compile()


def time_call(call, args, reps, warmup):
  for _ in range(warmup):
    jax.block_until_ready(call(*args))
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(call(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def flops(batch, seq, heads, head_dim, causal, mode):
  f = 4 * batch * heads * seq * seq * head_dim * (0.5 if causal else 1.0)
  return f if mode == 'fwd' else 3.5 * f


def inputs(batch, seq, heads, kv_heads, head_dim, seed=0, dtype=jnp.bfloat16):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (batch, seq, heads, head_dim), dtype)
  k = jax.random.normal(ks[1], (batch, seq, kv_heads, head_dim), dtype)
  v = jax.random.normal(ks[2], (batch, seq, kv_heads, head_dim), dtype)
  do = jax.random.normal(ks[3], (batch, seq, heads, head_dim), dtype)
  return q, k, v, do


def short_error(e):
  return f'{type(e).__name__}: {str(e).splitlines()[0][:160]}' if str(e) else type(e).__name__


def check_outputs(impls, head_dims, args):
  """Max |impl - xla| of the forward and the gradients on the smallest shape."""
  seq = min(int(s) for s in args.seqs.split(','))
  errors = {}
  for d in head_dims:
    heads = args.width // d
    q, k, v, do = inputs(max(1, args.tokens // seq), seq, heads, args.kv_heads or heads, d,
                         dtype=DTYPES[args.dtype])
    want = [np.asarray(x, np.float32)
            for x in compiled('xla', True, 'fwd+bwd', q, k, v, do)(q, k, v, do)]
    for impl in impls:
      if impl == 'xla':
        continue
      try:
        got = compiled(impl, True, 'fwd+bwd', q, k, v, do)(q, k, v, do)
        errors[f'{impl} d={d}'] = max(float(np.max(np.abs(np.asarray(g, np.float32) - w)))
                                      for g, w in zip(got, want))
      except Exception as e:  # noqa: BLE001 - reported, not fatal
        errors[f'{impl} d={d}'] = short_error(e)
  return errors


def main(argv=None):
  args = parse_args(argv)
  impls = [i for i in args.impls.split(',') if i]
  if jax.default_backend() not in ('gpu', 'cuda', 'rocm'):
    impls = [i for i in impls if i != 'cudnn']  # cuDNN needs an NVIDIA GPU
  head_dims = [int(d) for d in args.head_dims.split(',')]
  device = jax.devices()[0]
  kind = device.device_kind
  print(f'device: {kind} ({jax.default_backend()}), jax {jax.__version__}')

  errors = check_outputs(impls, head_dims, args)
  for name, err in errors.items():
    print(f'check vs xla (causal, fwd+bwd, smallest seq): {name}: {err}')

  rows = []
  for d, seq, causal, mode in [(d, int(s), c, m) for d in head_dims
                               for s in args.seqs.split(',') for c in (False, True)
                               for m in ('fwd', 'fwd+bwd')]:
    heads = args.width // d
    batch = max(1, args.tokens // seq)
    q, k, v, do = inputs(batch, seq, heads, args.kv_heads or heads, d, dtype=DTYPES[args.dtype])
    row = dict(head_dim=d, seq=seq, batch=batch, heads=heads, causal=causal, mode=mode)
    for impl in impls:
      try:
        t = time_call(compiled(impl, causal, mode, q, k, v, do), (q, k, v, do), args.reps,
                      args.warmup)
        row[impl] = flops(batch, seq, heads, d, causal, mode) / t / 1e12
        row[impl + '_ms'] = t * 1e3
      except Exception as e:  # noqa: BLE001 - e.g. out of memory; recorded, not fatal
        row[impl] = None
        row[impl + '_error'] = short_error(e)
    for fast, base in (('pallas', 'cudnn'), ('pallas', 'xla'), ('blocked', 'xla')):
      if row.get(fast) and row.get(base):
        row[f'{fast}/{base}'] = row[fast] / row[base]
    rows.append(row)
    print(format_row(row, impls), flush=True)

  result = dict(device_kind=kind, backend=jax.default_backend(), jax=jax.__version__,
                date=datetime.datetime.now().isoformat(timespec='seconds'),
                command=' '.join(sys.argv), quick=args.quick, dtype=args.dtype,
                machine_load_avg_1min=os.getloadavg()[0], check_vs_xla=errors,
                block_sizes={str(d): kernels.default_block_sizes(None, d).__dict__
                             for d in head_dims},
                rows=rows)
  out = args.out
  if out is None:
    slug = 'cpu' if args.cpu else re.sub(r'[^a-z0-9]+', '_', kind.lower()).strip('_') or 'unknown'
    out = os.path.join(RESULTS, f'attention_{slug}{"_quick" if args.quick else ""}')
  model_speed.write_results(out and os.path.abspath(out), result, markdown(result, impls))
  return result


def _fmt(x, spec='.3g'):
  return '-' if x is None else format(x, spec)


def format_row(row, impls):
  cells = [f"d={row['head_dim']:<4}", f"seq={row['seq']:<6}",
           f"{'causal' if row['causal'] else 'full':<6}", f"{row['mode']:<8}"]
  cells += [f'{impl}={_fmt(row.get(impl))}' for impl in impls]
  cells += [f'{k}={row[k]:.2f}x' for k in RATIOS if k in row]
  cells += [f"{impl}: {row[impl + '_error']}" for impl in impls if impl + '_error' in row]
  return '  '.join(cells)


def markdown(result, impls):
  ratios = [k for k in RATIOS if any(k in r for r in result['rows'])]
  head = ['head_dim', 'seq', 'mask', 'pass', *[f'{i} TFLOP/s' for i in impls], *ratios]
  lines = [f"# Attention kernels on {result['device_kind']}",
           '',
           f"jax {result['jax']}, {result['date']}, `{result['command']}`. "
           f"{result.get('dtype', 'bfloat16')}, batch * seq = const, causal FLOPs halved, "
           'backward = 2.5x forward FLOPs (the same count for every implementation, so a '
           'blocked path that skips work shows it as more FLOP/s). 1-min load average at the '
           f"end: {result.get('machine_load_avg_1min', float('nan')):.1f}.",
           '',
           '| ' + ' | '.join(head) + ' |',
           '|' + '---|' * len(head)]
  for r in result['rows']:
    cells = [str(r['head_dim']), str(r['seq']), 'causal' if r['causal'] else 'full', r['mode']]
    cells += [_fmt(r.get(i)) for i in impls]
    cells += [_fmt(r.get(k), '.2f') + ('x' if k in r else '') for k in ratios]
    lines.append('| ' + ' | '.join(cells) + ' |')
  failures = [f"- {i} at d={r['head_dim']} seq={r['seq']} {r['mode']}: {r[i + '_error']}"
              for r in result['rows'] for i in impls if i + '_error' in r]
  if failures:
    lines += ['', 'Failures:', *failures]
  lines += ['', 'Check vs XLA (max abs difference, causal fwd+bwd, smallest seq): ' +
            ', '.join(f'{k}: {v}' for k, v in result['check_vs_xla'].items())]
  return '\n'.join(lines) + '\n'


if __name__ == '__main__':
  main()
