"""Step speed of LoRA and QLoRA against full fine-tuning, on CPU, for the default config
(`configs/default.py`: 6-layer LLaMA, d_model 320, batch 8 x 128 tokens, float32).

    .venv/bin/python bench/lora_speed.py      # writes bench/results/lora_speed_cpu.{json,md}

All variants run the trainer's own programs (`flaxllm.train.trainer.build_programs` of the
config with `finetune.method=<method>`: split, init and the donated train step) on the same
batch and the same base weights. LoRA: rank 8, alpha 16, all linear
layers but the head; QLoRA: the same on an NF4 base (block 64, double quantisation),
dequantised on the fly. The variants are timed alternately in one process (`--steps` steps each
per repetition), so load from other processes hits all alike; figures are medians over `--reps`.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import numpy as np

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, ROOT)
RESULTS = os.path.join(BENCH, 'results')


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--config', default=os.path.join(ROOT, 'configs', 'default.py'))
  p.add_argument('--methods', default='full,lora,qlora')
  p.add_argument('--reps', type=int, default=5)
  p.add_argument('--steps', type=int, default=3)
  p.add_argument('--warmup', type=int, default=1)
  p.add_argument('--rank', type=int, default=8)
  p.add_argument('--out', default=os.path.join(RESULTS, 'lora_speed_cpu'))
  args = p.parse_args(argv)

  import jax
  from flaxllm import config as config_lib
  from flaxllm import parallel
  from flaxllm.train import trainer
  import model_speed  # bench/model_speed.py: train_batch, write_results

  base_config = config_lib.load_config(args.config)
  batch, seq = base_config.batch_size, base_config.seq_len
  tokens = np.random.default_rng(0).integers(3, base_config.model.vocab_size, (batch, seq + 1),
                                             dtype=np.int32)
  jbatch = model_speed.train_batch(tokens)
  runs = {}
  for method in args.methods.split(','):
    config = config_lib.load_config(args.config, [
        f'--config.finetune.method={method}', f'--config.finetune.rank={args.rank}',
        f'--config.finetune.alpha={2.0 * args.rank}'])
    programs = trainer.build_programs(config, parallel.make_mesh(config.mesh, jax.devices()[:1]))
    key = jax.random.PRNGKey(0)  # the same base weights for every method
    trainable, frozen = programs.split(programs.init_params(key), key)
    count = int(sum(x.size for x in jax.tree.leaves(trainable)))
    runs[method] = {'step': programs.train_step, 'state': programs.init(trainable, key),
                    'frozen': frozen, 'times': [], 'loss': [],
                    'trainable': count}

  def run(method):
    r = runs[method]
    s = r['state']
    t0 = time.perf_counter()
    for _ in range(args.steps):
      s, m = r['step'](s, jbatch, r['frozen'])
    loss = float(m['loss'])  # blocks
    r['state'] = s
    return time.perf_counter() - t0, loss

  for _ in range(args.warmup):
    for method in runs:
      run(method)
  load_before = os.getloadavg()[0]
  for _ in range(args.reps):
    for method in runs:
      dt, loss = run(method)
      runs[method]['times'].append(dt)
      runs[method]['loss'].append(loss)
  ntok = batch * seq * args.steps
  rows = {m: {'tokens_per_s': ntok / float(np.median(r['times'])),
              'step_s': float(np.median(r['times'])) / args.steps,
              'trainable': r['trainable'], 'last_loss': r['loss'][-1]}
          for m, r in runs.items()}
  full = rows.get('full', {}).get('tokens_per_s')
  for r in rows.values():
    r['vs_full'] = r['tokens_per_s'] / full if full else None
  meta = {'date': datetime.date.today().isoformat(),
          'machine': platform.processor() or platform.machine(), 'cpus': os.cpu_count(),
          'load_before': load_before, 'load_after': os.getloadavg()[0],
          'batch': batch, 'seq': seq, 'reps': args.reps, 'steps': args.steps,
          'rank': args.rank, 'command': 'python bench/lora_speed.py'}
  lines = ['# LoRA / QLoRA vs full fine-tuning: train step speed on CPU', '',
           f'`{meta["command"]}` on {meta["date"]} ({meta["machine"]}, {meta["cpus"]} CPUs '
           f'shared with other jobs; load average {load_before:.1f} before, '
           f'{meta["load_after"]:.1f} after). configs/default.py model and batch '
           f'({batch} x {seq} tokens, float32), medians of {args.reps} repetitions of '
           f'{args.steps} steps, variants interleaved. LoRA rank {args.rank}, alpha '
           f'{2 * args.rank}, all linear layers but the head; QLoRA: NF4 base (block 64, '
           'double quantisation).', '',
           '| method | trainable params | step (s) | tokens/s | vs full |',
           '|---|---|---|---|---|']
  for m, r in rows.items():
    vs = f'{r["vs_full"]:.2f}x' if r['vs_full'] else '-'
    lines.append(f'| {m} | {r["trainable"]:,} | {r["step_s"]:.3f} | '
                 f'{r["tokens_per_s"]:.0f} | {vs} |')
  lines += ['', 'On this small model the frozen base still costs its full forward and the '
            "input-gradient half of the backward pass; LoRA saves the weight gradients and "
            'the optimizer update of the base. QLoRA adds the NF4 dequantisation of every '
            'kernel in the forward pass and again in the backward pass (recomputed, not '
            'stored).', '']
  model_speed.write_results(args.out, {'meta': meta, 'rows': rows}, '\n'.join(lines))


if __name__ == '__main__':
  main()
