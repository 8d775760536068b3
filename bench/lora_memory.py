"""Ahead-of-time memory of one fine-tuning step (nothing is run or allocated): full fine-tuning,
LoRA and QLoRA for Llama 3.2 1B and Llama 3 8B, from XLA's compiled memory analysis.

    .venv/bin/python bench/lora_memory.py --dtype=float32   # and --dtype=bfloat16 (the default)

writes bench/results/lora_memory_cpu_<dtype>.{json,md}.

Each variant is the trainer's step (`flaxllm.train.step.make_train_step` with `lm_loss` and the
fine-tuning hooks of `flaxllm.peft.finetune`), compiled by `flaxllm.parallel.aot.compile_step`
for one device (the host CPU compiler: the same program, CPU buffer assignment), with
  model     scan_layers, remat='full', weights and compute in --dtype (bfloat16 or float32);
  optimizer AdamW (state in the trainable params' dtype: bfloat16 for full fine-tuning,
            float32 for the adapters), global-norm clipping;
  LoRA      rank 8, alpha 16, all linear layers except the head (PEFT's 'all-linear');
  QLoRA     the same adapters on an NF4 base (block 64, double quantisation);
  batch     1 x 2048 tokens.
The frozen base is an argument of the step (not donated, returned unchanged); the state is
donated. "optimizer state" counts the AdamW moments exactly from the abstract state.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, ROOT)
RESULTS = os.path.join(BENCH, 'results')


BF16_NOTE = (
    'CPU caveat for bfloat16: the host compiler has no bfloat16 matmul, so it converts the '
    'stacked bfloat16 weights to float32 before the layer loop (`convert(bf16[layers, ...])` in '
    'the compiled HLO); in the LoRA rows that float32 copy of the frozen base is most of the '
    'temporaries (8B: ~30 GiB). A TPU/GPU compile multiplies bfloat16 directly; the float32 '
    'table (`--dtype=float32`) has no such copies.')


def _bytes(tree) -> int:
  import jax
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def compile_variant(model_name: str, method: str, *, batch: int, seq: int, rank: int,
                    dtype: str = 'bfloat16'):
  import jax
  import jax.numpy as jnp
  import optax
  from flaxllm import models, parallel
  from flaxllm.parallel import aot
  from flaxllm.peft import finetune
  from flaxllm.train import step as step_lib

  cfg = models.presets.get(model_name, scan_layers=True, remat='full', dtype=dtype,
                           param_dtype=dtype)
  model = models.build(cfg)
  ft = {'method': method, 'targets': ('all-linear',), 'rank': rank, 'alpha': 2.0 * rank,
        'quant': 'nf4', 'double_quant': True}
  split, model_params = finetune.hooks(ft)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-4, b1=0.9, b2=0.95))
  schedule = lambda step: 1e-4
  train_step = step_lib.make_train_step(
      step_lib.lm_loss(model, model_params=model_params), tx, schedule)

  def init(rng):
    params = models.init_params(model, rng)
    trainable, base = split(params, rng)
    return step_lib.init_state(trainable, tx, rng), ({} if base is None else {'base': base})

  def step(carry, batch):
    state, frozen = carry
    state, metrics = train_step(state, batch, frozen)
    return (state, frozen), metrics

  abstract_state, abstract_frozen = jax.eval_shape(init, jax.random.key(0))
  mesh = parallel.make_mesh({'fsdp': 1}, jax.devices()[:1])
  shapes = {k: ((batch, seq), jnp.float32 if k == 'loss_mask' else jnp.int32)
            for k in step_lib.BATCH_KEYS}
  t0 = time.perf_counter()
  report = aot.compile_step(step, init, (jax.random.key(0),), shapes, mesh, 'fsdp',
                            param_specs=parallel.param_specs(model), target='cpu (1 device)')
  return {
      'model': model_name, 'method': method, 'params': models.param_count(cfg)['total'],
      'trainable': sum(x.size for x in jax.tree.leaves(abstract_state.params)),
      'trainable_bytes': _bytes(abstract_state.params),
      'optimizer_state_bytes': _bytes(abstract_state.opt_state),
      'frozen_bytes': _bytes(abstract_frozen),
      'argument_bytes': report.argument_bytes, 'output_bytes': report.output_bytes,
      'alias_bytes': report.alias_bytes, 'temp_bytes': report.temp_bytes,
      'total_bytes': report.total_bytes, 'compile_s': round(time.perf_counter() - t0, 1),
  }


def write(rows, args, path):
  from flaxllm.parallel.aot import fmt_bytes
  meta = {'date': datetime.date.today().isoformat(), 'machine': platform.processor() or
          platform.machine(), 'cpus': os.cpu_count(), 'batch': args.batch, 'seq': args.seq,
          'rank': args.rank, 'dtype': args.dtype,
          'command': f'python bench/lora_memory.py --dtype={args.dtype}'}
  with open(path + '.json', 'w') as f:
    json.dump({'meta': meta, 'rows': rows}, f, indent=2)
  lines = ['# Fine-tuning step memory (ahead-of-time compile, nothing run)', '',
           f'`{meta["command"]}` on {meta["date"]} ({meta["machine"]}, {meta["cpus"]} CPUs); '
           f'per-device bytes from `compiled.memory_analysis()` of the step compiled for one '
           f'device by the host CPU compiler. Batch {args.batch} x {args.seq} tokens, '
           f'scan_layers + remat=full, {args.dtype} weights and compute, AdamW; LoRA rank '
           f'{args.rank}, alpha {2 * args.rank}, all linear layers but the head; QLoRA = the '
           'same adapters on an NF4 base (block 64, double quantisation). See '
           '`bench/lora_memory.py` for the set-up.', '',
           '| model | method | trainable | optimizer state | frozen base | arguments | '
           'outputs | temporaries | total | opt. state vs full |',
           '|---|---|---|---|---|---|---|---|---|---|']
  full = {r['model']: r for r in rows if r['method'] == 'full'}
  for r in rows:
    ratio = r['optimizer_state_bytes'] / full[r['model']]['optimizer_state_bytes']
    lines.append(
        f'| {r["model"]} | {r["method"]} | {r["trainable"]:,} | '
        f'{fmt_bytes(r["optimizer_state_bytes"])} | {fmt_bytes(r["frozen_bytes"])} | '
        f'{fmt_bytes(r["argument_bytes"])} | {fmt_bytes(r["output_bytes"])} | '
        f'{fmt_bytes(r["temp_bytes"])} | {fmt_bytes(r["total_bytes"])} | {100 * ratio:.2f}% |')
  lines += ['', 'total = arguments + outputs - donated (aliased) + temporaries + code. The '
            'frozen base is an argument that the step returns unchanged (aliased), so it counts '
            'once. CPU buffer assignment differs from TPU/GPU, so temporaries are indicative; '
            'arguments, outputs and optimizer state are exact.', '']
  if args.dtype == 'bfloat16':
    lines += [BF16_NOTE, '']
  with open(path + '.md', 'w') as f:
    f.write('\n'.join(lines))
  print('\n'.join(lines))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--models', default='llama3.2_1b,llama3_8b')
  p.add_argument('--methods', default='full,lora,qlora')
  p.add_argument('--batch', type=int, default=1)
  p.add_argument('--seq', type=int, default=2048)
  p.add_argument('--rank', type=int, default=8)
  p.add_argument('--dtype', default='bfloat16', help='weights and compute dtype')
  p.add_argument('--out', default=None, help='default bench/results/lora_memory_cpu_<dtype>')
  args = p.parse_args(argv)
  rows = []
  for name in args.models.split(','):
    for method in args.methods.split(','):
      row = compile_variant(name, method, batch=args.batch, seq=args.seq, rank=args.rank,
                            dtype=args.dtype)
      print(json.dumps(row), flush=True)
      rows.append(row)
  out = os.path.join(RESULTS, f'lora_memory_cpu_{args.dtype}') if args.out is None else args.out
  if out:
    write(rows, args, out)


if __name__ == '__main__':
  main()
