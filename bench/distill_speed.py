"""Distillation cost on CPU: step time of a distillation step over a plain training step of the
same student, and the compiled memory of the teacher logits (whole, chunked, offline top-k).

    .venv/bin/python bench/distill_speed.py [--steps 20] [--out bench/results/distill_cpu]

Shapes are those of experiments/distill: student 2 layers x 128 (1.5M params), teacher the
default 6 x 320 model (10.1M), vocabulary 4096, batch 8 x 128 tokens. Memory comes from
`compiled.memory_analysis()` via flaxllm.parallel.aot (no run needed); it is reported also
for a 32k vocabulary, where the [batch, seq, vocab] float32 tensors dominate.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from flaxllm import models  # noqa: E402
from flaxllm.objectives import lm  # noqa: E402
from flaxllm.objectives.distill import objective as loss_lib  # noqa: E402
from flaxllm.parallel import aot  # noqa: E402
from flaxllm.train import step as step_lib  # noqa: E402

BASE = dict(mlp_activation='swiglu', norm='rmsnorm', position='rope', max_seq_len=256)
STUDENT = dict(BASE, d_model=128, num_layers=2, num_heads=2, num_kv_heads=2, mlp_dim=352)
TEACHER = dict(BASE, d_model=320, num_layers=6, num_heads=5, num_kv_heads=5, mlp_dim=864)


def _cfgs(vocab):
  return (models.ModelConfig.from_dict(dict(STUDENT, vocab_size=vocab)),
          models.ModelConfig.from_dict(dict(TEACHER, vocab_size=vocab)))


def _batch(b, s, vocab, k=0, seed=0):
  rng = np.random.default_rng(seed)
  tok = rng.integers(3, vocab, (b, s + 1)).astype(np.int32)
  out = {'inputs': tok[:, :-1], 'targets': tok[:, 1:], 'loss_mask': np.ones((b, s), np.float32),
         'segment_ids': np.ones((b, s), np.int32),
         'positions': np.tile(np.arange(s, dtype=np.int32), (b, 1))}
  if k:
    out['teacher_values'] = rng.standard_normal((b, s, k)).astype(np.float16)
    out['teacher_indices'] = rng.integers(0, vocab, (b, s, k)).astype(np.int32)
  return out


def _step(kind, s_cfg, t_cfg, chunk=0, k=0):
  """(jitted train step, uses teacher) for 'plain' | 'distill' | 'offline'."""
  tx = optax.adamw(1e-3)
  if kind == 'plain':
    loss_fn = lm.lm_loss(models.build(s_cfg))
  else:
    st = loss_lib.Settings(alpha=0.5, temperature=2.0, chunk_size=chunk, top_k=0,
                           offline=kind == 'offline')
    loss_fn = loss_lib.distill_loss(s_cfg, None if kind == 'offline' else t_cfg, st)
  return jax.jit(step_lib.make_train_step(loss_fn, tx, lambda s: 1e-3), donate_argnums=0), tx


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.asarray(x).dtype), tree)


def memory(vocab, b, s, variants):
  s_cfg, t_cfg = _cfgs(vocab)
  sp = jax.eval_shape(lambda: models.init_params(models.build(s_cfg), jax.random.key(0)))
  tp = jax.eval_shape(lambda: models.init_params(models.build(t_cfg), jax.random.key(1)))
  rows = []
  for name, kind, chunk, k in variants:
    step, tx = _step(kind, s_cfg, t_cfg, chunk, k)
    state = jax.eval_shape(lambda p: step_lib.init_state(p, tx, jax.random.key(0)), sp)
    frozen = {'teacher': tp} if kind == 'distill' else {}
    batch = _abstract(_batch(b, s, vocab, k))
    t0 = time.perf_counter()
    compiled = aot.compile_aot(step, state, batch, frozen)
    rep = aot.analyze(compiled, 'cpu', 1, time.perf_counter() - t0)
    rows.append({'variant': name, 'vocab': vocab, 'batch': b, 'seq': s,
                 'temp_bytes': rep.temp_bytes, 'argument_bytes': rep.argument_bytes,
                 'flops': rep.flops,
                 'total_bytes': rep.total_bytes})
    print(f'  vocab {vocab:6d} {name:28s} temporaries {aot.fmt_bytes(rep.temp_bytes):>11s}  '
          f'arguments {aot.fmt_bytes(rep.argument_bytes):>11s}  total '
          f'{aot.fmt_bytes(rep.total_bytes)}', flush=True)
  return rows


def timing(steps, b, s, vocab=4096, chunk=64):
  """Median seconds per step; the variants take turns step by step, so a change in machine
  load hits all of them alike."""
  s_cfg, t_cfg = _cfgs(vocab)
  sp = models.init_params(models.build(s_cfg), jax.random.key(0))
  tp = models.init_params(models.build(t_cfg), jax.random.key(1))
  batches = [_batch(b, s, vocab, seed=i) for i in range(4)]
  runs = {}
  for name, kind, c in (('plain', 'plain', 0), ('distill', 'distill', chunk),
                        ('distill_unchunked', 'distill', 0)):
    step, tx = _step(kind, s_cfg, t_cfg, c)
    state = step_lib.init_state(jax.tree.map(jnp.array, sp), tx, jax.random.key(0))
    frozen = {'teacher': tp} if kind == 'distill' else {}
    state, m = step(state, batches[0], frozen)
    jax.block_until_ready(m)
    runs[name] = [step, state, frozen, []]
  for i in range(steps):
    for run in runs.values():
      step, state, frozen, times = run
      t0 = time.perf_counter()
      state, m = step(state, batches[i % 4], frozen)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t0)
      run[1] = state
  out = {name: statistics.median(run[3]) for name, run in runs.items()}
  for name, t in out.items():
    print(f'  {name:18s} {1e3 * t:8.1f} ms/step (median of {steps}, interleaved)', flush=True)
  return out


def markdown(r) -> str:
  g = aot.fmt_bytes
  t = r['step_s']
  lines = [
      '# Distillation cost (CPU)', '',
      f'Machine: {r["machine"]}; load average during the run {r["load_avg"][0]:.1f} (shared '
      'machine: the three steps were timed in turns, so load hits them alike). Produced by '
      '`python bench/distill_speed.py`.', '',
      f'Student 2 x 128 (1.5M params), teacher 6 x 320 (10.1M), batch {r["batch"]} x '
      f'{r["seq"]} tokens, vocabulary 4096, float32.', '',
      '| step | ms/step | over plain |', '|---|---:|---:|',
      f'| plain student (LM loss) | {1e3 * t["plain"]:.0f} | 1.00 |',
      f'| distillation, chunks of 64 | {1e3 * t["distill"]:.0f} | '
      f'{r["ratio_distill_over_plain"]:.2f} |',
      f'| distillation, logits whole | {1e3 * t["distill_unchunked"]:.0f} | '
      f'{r["ratio_unchunked_over_plain"]:.2f} |', '',
      'Compiled memory per step (`compiled.memory_analysis()` through flaxllm.parallel.aot; '
      'temporaries are where the [batch, seq, vocab] float32 logits live; arguments include '
      'the teacher params, or the stored top-k logits for the offline teacher):', '',
      '| vocab | variant | temporaries | arguments | total | GFLOP |',
      '|---:|---|---:|---:|---:|---:|']
  for m in r['memory']:
    flops = f'{m["flops"] / 1e9:.1f}' if m.get('flops') else ''
    lines.append(f'| {m["vocab"]} | {m["variant"]} | {g(m["temp_bytes"])} | '
                 f'{g(m["argument_bytes"])} | {g(m["total_bytes"])} | {flops} |')
  lines += ['', 'GFLOP is XLA\'s cost analysis of the compiled step, which counts the body of a '
            'loop once: for the chunked variants it leaves out all but one chunk of the output '
            'heads, so compare GFLOP only between unchunked rows.']
  return '\n'.join(lines) + '\n'


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument('--steps', type=int, default=20)
  ap.add_argument('--out', default='bench/results/distill_cpu')
  args = ap.parse_args(argv)
  b, s = 8, 128
  print('step time (CPU):')
  t = timing(args.steps, b, s)
  print('compiled memory (XLA CPU memory_analysis):')
  variants = [('plain student step', 'plain', 0, 0),
              ('distill, logits whole', 'distill', 0, 0),
              ('distill, chunks of 64', 'distill', 64, 0),
              ('distill, chunks of 16', 'distill', 16, 0),
              ('offline top-64, chunks of 64', 'offline', 64, 64)]
  mem = memory(4096, b, s, variants) + memory(32000, b, s, variants)
  result = {'machine': f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores, '
                       f'jax {jax.__version__}, {jax.devices()[0].platform}',
            'load_avg': os.getloadavg(), 'batch': b, 'seq': s,
            'step_s': t, 'ratio_distill_over_plain': t['distill'] / t['plain'],
            'ratio_unchunked_over_plain': t['distill_unchunked'] / t['plain'], 'memory': mem}
  import model_speed  # bench/model_speed.py: write_results
  model_speed.write_results(args.out, result, markdown(result))


if __name__ == '__main__':
  main()
