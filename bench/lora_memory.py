"""Ahead-of-time memory of one fine-tuning step (nothing is run or allocated): full fine-tuning,
LoRA and QLoRA for Llama 3.2 1B and Llama 3 8B, from XLA's compiled memory analysis.

    .venv/bin/python bench/lora_memory.py --dtype=float32   # and --dtype=bfloat16 (the default)

writes bench/results/lora_memory_cpu_<dtype>.{json,md}.

Each variant is `flaxllm compile` of `configs/pretrain.py:size=<model>` with
`finetune.method=<method>` (`flaxllm.train.compile.compile_train_step`: the trainer's own step)
for one device (the host CPU compiler: the same program, CPU buffer assignment), with
  model     scan_layers, remat='full', weights and compute in --dtype (bfloat16 or float32);
  optimizer the recipe's AdamW (weight decay mask, z-loss; state in the trainable params'
            dtype: --dtype for full fine-tuning, float32 for the adapters), clipping;
  LoRA      rank 8, alpha 16, all linear layers except the head (PEFT's 'all-linear');
  QLoRA     the same adapters on an NF4 base (block 64, double quantisation);
  batch     1 x 2048 tokens.
The frozen base is an argument of the step (not donated, not returned); the state is
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


def variant_config(model_name: str, method: str, *, batch: int, seq: int, rank: int,
                   dtype: str):
  """configs/pretrain.py for the preset `model_name` (scan_layers, remat='full') with the
  fine-tuning `method`, on one device."""
  from flaxllm import config as config_lib
  return config_lib.load_config(f'{ROOT}/configs/pretrain.py:size={model_name}', [
      f'--config.model.dtype={dtype}', f'--config.model.param_dtype={dtype}',
      f'--config.batch_size={batch}', f'--config.seq_len={seq}',
      f'--config.finetune.method={method}', f'--config.finetune.rank={rank}',
      f'--config.finetune.alpha={2.0 * rank}'])


def compile_variant(model_name: str, method: str, *, batch: int, seq: int, rank: int,
                    dtype: str = 'bfloat16'):
  import jax
  from flaxllm import models, parallel
  from flaxllm.train import compile as compile_lib
  from flaxllm.train import trainer

  config = variant_config(model_name, method, batch=batch, seq=seq, rank=rank, dtype=dtype)
  mesh = parallel.make_mesh(config.mesh, jax.devices()[:1])
  t0 = time.perf_counter()
  report = compile_lib.compile_train_step(config, mesh, target='cpu (1 device)')
  programs = trainer.build_programs(config, mesh)  # cached: the programs just compiled
  state, frozen = programs.abstract_state, programs.abstract_frozen
  return {
      'model': model_name, 'method': method,
      'params': models.param_count(models.ModelConfig.from_dict(config.model))['total'],
      'trainable': sum(x.size for x in jax.tree.leaves(state.params)),
      'trainable_bytes': _bytes(state.params),
      'optimizer_state_bytes': _bytes(state.opt_state),
      'frozen_bytes': _bytes(frozen),
      'argument_bytes': report.argument_bytes, 'output_bytes': report.output_bytes,
      'alias_bytes': report.alias_bytes, 'temp_bytes': report.temp_bytes,
      'total_bytes': report.total_bytes, 'compile_s': round(time.perf_counter() - t0, 1),
  }


def write(rows, args, path):
  import model_speed  # bench/model_speed.py: write_results
  from flaxllm.parallel.aot import fmt_bytes
  meta = {'date': datetime.date.today().isoformat(), 'machine': platform.processor() or
          platform.machine(), 'cpus': os.cpu_count(), 'batch': args.batch, 'seq': args.seq,
          'rank': args.rank, 'dtype': args.dtype,
          'command': f'python bench/lora_memory.py --dtype={args.dtype}'}
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
            'frozen base is an argument of the step (neither donated nor returned), so it counts '
            'once. CPU buffer assignment differs from TPU/GPU, so temporaries are indicative; '
            'arguments, outputs and optimizer state are exact.', '']
  if args.dtype == 'bfloat16':
    lines += [BF16_NOTE, '']
  model_speed.write_results(path, {'meta': meta, 'rows': rows}, '\n'.join(lines))


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
