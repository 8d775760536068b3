"""Ahead-of-time memory of one DPO train step (nothing is run or allocated): full fine-tuning
with a frozen copy of the weights as the reference, LoRA and QLoRA with the adapters-off
reference, next to SFT (objective 'lm') and one model's weights, for Llama 3.2 1B and Llama 3 8B.

    .venv/bin/python bench/align_memory.py     # writes bench/results/align_memory.{json,md}
    .venv/bin/python bench/align_memory.py --models llama3.2_1b --out ''   # quick look

Each point is the trainer's own step (`flaxllm.train.compile.compile_train_step`, what
`flaxllm compile` runs) compiled in a subprocess of its own (`--point`), with
  model     `configs/pretrain.py:size=<preset>`: scan_layers, remat='full', weights AND
            compute in each of --dtypes: bfloat16 (the main table: the frozen reference copy
            is then bfloat16, as a user would keep it; flaxllm copies the policy's params, so
            the reference has the policy's param dtype) and float32 (free of the host
            compiler's bfloat16-to-float32 weight copies, see the caveat in the results);
  optimizer the recipe's AdamW (weight-decay mask, z-loss 1e-4), clipping; state in the
            trainable params' dtype (the dtype for full fine-tuning, float32 for adapters);
  LoRA      rank 8, alpha 16, all linear layers but the head; QLoRA: the same adapters on an
            NF4 base (block 64, double quantisation);
  DPO       sigmoid loss, one batch of --pairs pairs x --seq tokens (2 x pairs rows through the
            decoder), `dpo.chunk_size`=128 (head + log-softmax 128 positions at a time);
  SFT       objective 'lm' on 2 x pairs rows of --seq tokens (the same tokens as DPO),
            `loss_chunk_size`=128 (the same head chunking as DPO);
  mesh      --devices fake CPU devices (default 1: the host CPU compiler's program for one
            device; N > 1: XLA_FLAGS=--xla_force_host_platform_device_count=N, mesh fsdp=N,
            rules 'fsdp'; the batch must be a multiple of N).
"reference weights" is the per-device size of `frozen['reference']`, the bytes the reference
model adds; with LoRA/QLoRA the reference is `frozen['base']` itself (adapters switched off),
which the policy needs anyway.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, ROOT)
sys.path.insert(0, BENCH)
RESULTS = os.path.join(BENCH, 'results')

GiB = 1024 ** 3
# (name, objective, finetune.method)
VARIANTS = {'sft_full': ('lm', 'full'), 'sft_lora': ('lm', 'lora'),
            'dpo_full': ('dpo', 'full'), 'dpo_lora': ('dpo', 'lora'),
            'dpo_qlora': ('dpo', 'qlora')}
LABELS = {'sft_full': 'SFT, full fine-tuning', 'sft_lora': 'SFT, LoRA',
          'dpo_full': 'DPO, full (frozen-copy reference)',
          'dpo_lora': 'DPO, LoRA (adapters-off reference)',
          'dpo_qlora': 'DPO, QLoRA (adapters-off reference)'}


def point_config(p: dict):
  """The config of one point (see the module docstring)."""
  from flaxllm import config as config_lib
  objective, method = VARIANTS[p['variant']]
  rows = p['pairs'] if objective == 'dpo' else 2 * p['pairs']
  overrides = [
      f'--config.objective={objective}', f'--config.model.dtype={p["dtype"]}',
      f'--config.model.param_dtype={p["dtype"]}', f'--config.batch_size={rows}',
      f'--config.seq_len={p["seq"]}', f'--config.finetune.method={method}',
      f'--config.finetune.rank={p["rank"]}', f'--config.finetune.alpha={2.0 * p["rank"]}',
      '--config.loss_chunk_size=128', '--config.dpo.chunk_size=128',
      f'--config.mesh.fsdp={p["devices"]}', '--config.mesh.data=1',
      '--config.parallel.rules=fsdp']
  if objective == 'dpo':
    overrides += ['--config.data.source=jsonl', f'--config.data.path={p["pairs_file"]}']
  return config_lib.load_config(f'{ROOT}/configs/pretrain.py:size={p["model"]}', overrides)


def per_device_bytes(tree) -> int:
  """Bytes of the abstract arrays of `tree` on one device (their shard shapes)."""
  import jax
  import numpy as np
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if getattr(x, 'sharding', None) else x.shape
    total += int(np.prod(shape)) * x.dtype.itemsize
  return total


def compile_point(p: dict) -> dict:
  """Compiles one point in this process (run through `--point`)."""
  import jax
  from flaxllm import models, parallel
  from flaxllm.train import compile as compile_lib
  from flaxllm.train import trainer
  if p['devices'] > 1:
    jax.config.update('jax_num_cpu_devices', p['devices'])
  config = point_config(p)
  mesh = parallel.make_mesh(config.mesh, jax.devices()[:p['devices']])
  t0 = time.perf_counter()
  report = compile_lib.compile_train_step(config, mesh, target=f'cpu ({p["devices"]} device(s))')
  compile_s = time.perf_counter() - t0
  programs = trainer.build_programs(config, mesh)    # cached: the programs just compiled
  state, frozen = programs.abstract_state, programs.abstract_frozen
  return {
      **{k: p[k] for k in ('model', 'variant', 'dtype', 'devices', 'pairs', 'seq', 'rank')},
      'objective': config.objective, 'method': config.finetune.method,
      'rows': config.batch_size,
      'params': models.param_count(models.ModelConfig.from_dict(config.model))['total'],
      'model_weights_bytes': per_device_bytes(programs.abstract_params),
      'trainable_bytes': per_device_bytes(state.params),
      'optimizer_state_bytes': per_device_bytes(state.opt_state),
      'frozen_bytes': {k: per_device_bytes(v) for k, v in frozen.items()},
      'reference_weights_bytes': per_device_bytes(frozen.get('reference', {})),
      'argument_bytes': report.argument_bytes, 'output_bytes': report.output_bytes,
      'alias_bytes': report.alias_bytes, 'temp_bytes': report.temp_bytes,
      'generated_code_bytes': report.generated_code_bytes, 'total_bytes': report.total_bytes,
      'compile_s': round(compile_s, 1)}


def run_point(p: dict, timeout: float) -> dict:
  """`compile_point` in a subprocess (each compile starts from a fresh process and memory)."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  if p['devices'] > 1:
    env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count='
                        f'{p["devices"]}').strip()
  t0 = time.time()
  try:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), '--point', json.dumps(p)],
                          env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
  except subprocess.TimeoutExpired:
    return {**p, 'error': f'did not compile within {timeout:g} s'}
  lines = [l for l in proc.stdout.splitlines() if l.startswith('{')]
  if proc.returncode or not lines:
    tail = (proc.stderr.strip().splitlines() or ['?'])[-1]
    return {**p, 'error': tail, 'wall_s': round(time.time() - t0, 1)}
  return {**json.loads(lines[-1]), 'wall_s': round(time.time() - t0, 1)}


def markdown(r) -> str:
  m = r['meta']
  lines = [
      '# DPO step memory: the reference model (ahead-of-time compile, nothing run)', '',
      f'`{m["command"]}` on {m["date"]} ({m["machine"]}, {m["platform"]}, {m["cpus"]} CPUs; '
      f'1/5/15-min load average {"/".join(f"{x:.2f}" for x in m["load_avg_before"])} before, '
      f'{"/".join(f"{x:.2f}" for x in m["load_avg_after"])} after; the load does not change '
      'compiled sizes). Per-device bytes from `compiled.memory_analysis()` of the trainer\'s '
      f'train step (what `flaxllm compile` reports), compiled for {m["devices"]} CPU '
      f'device(s) ({"mesh fsdp=" + str(m["devices"]) + ", rules fsdp" if m["devices"] > 1 else "no sharding"}). '
      'Settings: `configs/pretrain.py:size=<model>`, scan_layers, remat=full, **weights and '
      'compute in the table\'s dtype** (the full-DPO reference copy too), AdamW; '
      f'DPO: {m["pairs"]} pair(s) x {m["seq"]} tokens (= {2 * m["pairs"]} rows through the '
      f'decoder), sigmoid loss, `dpo.chunk_size`=128; SFT (objective lm): {2 * m["pairs"]} rows '
      f'x {m["seq"]} tokens, `loss_chunk_size`=128; LoRA rank {m["rank"]}, alpha '
      f'{2 * m["rank"]}, all linear layers but the head; QLoRA: NF4 base (block 64, double '
      'quantisation). GiB per device.']
  for dtype in m['dtypes']:
    lines += table([x for x in r['rows'] if x['dtype'] == dtype], dtype)
  lines += [
      '', 'total = arguments + outputs - donated (aliased) + temporaries + generated code. The '
      'frozen trees (LoRA\'s base, full DPO\'s reference) are arguments of the step, neither '
      'donated nor returned, so they count once, under arguments. The DPO batch differs '
      'from the SFT batch in layout only (two [pairs, seq] sides instead of [rows, seq]).', '',
      'CPU caveats: buffer assignment and fusion are the host compiler\'s, so temporaries are '
      'indicative, while arguments, outputs, optimizer state and the reference weights are '
      'exact. With bfloat16 weights the host compiler has no bfloat16 matmul and converts the '
      'stacked bfloat16 weights to float32 ahead of the layer loop (see '
      '`bench/results/lora_memory_cpu_bfloat16.md`); full DPO has two such weight stacks (policy '
      'and reference), so in the bfloat16 table part of its extra temporaries is that CPU-only '
      'float32 copy of the reference; a TPU/GPU compile multiplies bfloat16 directly. The '
      'float32 table has no such copies.', '']
  return '\n'.join(lines)


def table(rows, dtype) -> list:
  g = lambda x: f'{x / GiB:.2f}'
  lines = [
      '', f'## {dtype} weights and compute', '',
      '| model | step | weights of one model | trainable | optimizer state | frozen (base) | '
      '**reference weights** | arguments | outputs | temporaries | **total** | compile s |',
      '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
  for x in rows:
    if 'error' in x:
      lines.append(f'| {x["model"]} | {LABELS[x["variant"]]} | does not compile: {x["error"]} |'
                   + ' |' * 9)
      continue
    lines.append(
        f'| {x["model"]} | {LABELS[x["variant"]]} | {g(x["model_weights_bytes"])} | '
        f'{g(x["trainable_bytes"])} | {g(x["optimizer_state_bytes"])} | '
        f'{g(x["frozen_bytes"].get("base", 0))} | **{g(x["reference_weights_bytes"])}** | '
        f'{g(x["argument_bytes"])} | {g(x["output_bytes"])} | {g(x["temp_bytes"])} | '
        f'**{g(x["total_bytes"])}** | {x["compile_s"]:.0f} |')
  lines += ['']
  by = {(x['model'], x['variant']): x for x in rows if 'error' not in x}
  for model in dict.fromkeys(x['model'] for x in rows):
    full, sft = by.get((model, 'dpo_full')), by.get((model, 'sft_full'))
    lora, sft_lora = by.get((model, 'dpo_lora')), by.get((model, 'sft_lora'))
    if full and sft:
      lines.append(
          f'- {model}: full DPO over full SFT: arguments +{g(full["argument_bytes"] - sft["argument_bytes"])} '
          f'GiB (the reference copy: {g(full["reference_weights_bytes"])} GiB = one model\'s '
          f'weights, {g(full["model_weights_bytes"])} GiB), temporaries '
          f'{"+" if full["temp_bytes"] >= sft["temp_bytes"] else ""}'
          f'{g(full["temp_bytes"] - sft["temp_bytes"])} GiB, total '
          f'{g(sft["total_bytes"])} -> {g(full["total_bytes"])} GiB.')
    if lora and sft_lora:
      lines.append(
          f'- {model}: LoRA DPO over LoRA SFT: arguments '
          f'+{g(lora["argument_bytes"] - sft_lora["argument_bytes"])} GiB (no reference weights: '
          f'the frozen base is the reference), temporaries '
          f'{"+" if lora["temp_bytes"] >= sft_lora["temp_bytes"] else ""}'
          f'{g(lora["temp_bytes"] - sft_lora["temp_bytes"])} GiB, total '
          f'{g(sft_lora["total_bytes"])} -> {g(lora["total_bytes"])} GiB.')
  return lines


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--models', default='llama3.2_1b,llama3_8b')
  p.add_argument('--variants', default=','.join(VARIANTS))
  p.add_argument('--dtypes', default='bfloat16,float32', help='weights and compute dtypes')
  p.add_argument('--pairs', type=int, default=1, help='DPO pairs per step (SFT: twice as many rows)')
  p.add_argument('--seq', type=int, default=2048)
  p.add_argument('--rank', type=int, default=8)
  p.add_argument('--devices', type=int, default=1)
  p.add_argument('--timeout', type=float, default=900)
  p.add_argument('--out', default=os.path.join(RESULTS, 'align_memory'),
                 help='results path without extension ("" = do not write)')
  p.add_argument('--point', default=None, help=argparse.SUPPRESS)   # internal: one compile
  args = p.parse_args(argv)
  if args.point:
    print(json.dumps(compile_point(json.loads(args.point))), flush=True)
    return None
  argv = sys.argv[1:] if argv is None else list(argv)
  load_before = os.getloadavg()
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    pairs_file = os.path.join(tmp, 'pairs.jsonl')   # for the config check; never read
    with open(pairs_file, 'w') as f:
      f.write(json.dumps({'prompt': 'p', 'chosen': 'a', 'rejected': 'b'}) + '\n')
    points = [(d, m, v) for d in args.dtypes.split(',') for m in args.models.split(',')
              for v in args.variants.split(',')]
    for dtype, model, variant in points:
      point = dict(model=model, variant=variant, dtype=dtype, devices=args.devices,
                   pairs=args.pairs, seq=args.seq, rank=args.rank, pairs_file=pairs_file)
      print(f'[align_memory] {dtype} {model} {variant} ...', flush=True)
      row = run_point(point, args.timeout)
      row.pop('pairs_file', None)
      print(json.dumps(row), flush=True)
      rows.append(row)
  meta = {'date': datetime.date.today().isoformat(),
          'machine': platform.processor() or platform.machine(), 'platform': platform.platform(),
          'cpus': os.cpu_count(), 'load_avg_before': load_before,
          'load_avg_after': os.getloadavg(), 'dtypes': args.dtypes.split(','), 'pairs': args.pairs,
          'seq': args.seq, 'rank': args.rank, 'devices': args.devices, 'remat': 'full',
          'scan_layers': True,
          'command': ' '.join(['python', 'bench/align_memory.py'] + argv)}
  result = {'meta': meta, 'rows': rows}
  if args.out:
    import model_speed  # bench/model_speed.py: write_results
    model_speed.write_results(args.out, result, markdown(result))
  else:
    print(markdown(result))
  return result


if __name__ == '__main__':
  main()
