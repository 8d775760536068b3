#!/usr/bin/env python
"""Per-device memory of a LLaMA-3 8B train step under FSDP, from the ahead-of-time compile
(nothing is allocated or run), next to an analytic estimate.

    python bench/aot_memory.py --target=tpu   # TPU v5e topologies 2x4, 4x4, 8x8 (needs libtpu)
    python bench/aot_memory.py --target=cpu   # 8, 16, 64 fake CPU devices

Each point is one `flaxllm compile --config=configs/pretrain.py:size=llama3_8b` run: the
trainer's own train step (next-token cross-entropy + z-loss, gradient clipping, AdamW with the
weight-decay mask), model preset 'llama3_8b' with scan_layers=True, remat='full',
dtype=bfloat16 (params and AdamW state in float32), XLA attention, rules 'fsdp' on a mesh
data=1 x fsdp=N, one 2048-token sequence per device (global batch N). Each device count
compiles in its own subprocess. Results: bench/results/aot_memory_<target>.{json,md}.

libtpu: `pip install libtpu==0.0.42.*` (the version jax[tpu]==0.10.2 pins; ~700 MB, no TPU
needed) into the environment, or point --libtpu-path at a directory holding the package.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GiB = 1 << 30
TPU_TOPOLOGIES = {
    'v5e': {8: 'v5e:2x4', 16: 'v5e:4x4', 64: 'v5e:8x8'},       # v5litepod-8/16/64, 16 GiB HBM
    'v5p': {8: 'v5p:2x2x2', 16: 'v5p:2x2x4', 64: 'v5p:4x4x4'},  # 95 GiB HBM per chip
}
CONFIG = 'configs/pretrain.py:size=llama3_8b'  # scan_layers, remat=full, bf16 compute
SEQ = 2048


def analytic(n: int, seq: int = SEQ, per_device_batch: int = 1) -> dict:
  """Per-device bytes: state from the parameter count; activations from the shapes.

  Remat assumption (model.remat='full' in a scanned stack): only each layer's input [b, s, d]
  (bf16) is kept for the backward pass; one layer is recomputed at a time, so its working set
  counts once. Attention is XLA's (materialised [b, h, s, s] float32 scores and their
  gradient); the output head keeps float32 logits, log-softmax and their gradient. FSDP
  all-gathers one layer's weights (bf16, forward and backward copies) and the output head.
  """
  from flaxllm import models
  cfg = models.presets.get('llama3_8b')
  p = models.param_count(cfg)['total']
  b, s, d, L = per_device_batch, seq, cfg.d_model, cfg.num_layers
  h, f, v = cfg.num_heads, cfg.mlp_dim, cfg.vocab_size
  layer_params = (p - 2 * v * d - d) / L
  parts = {
      'params_f32': 4 * p / n,
      'grads_f32': 4 * p / n,
      'adamw_mu_nu_f32': 8 * p / n,
      'act_saved_layer_inputs_bf16': L * b * s * d * 2,
      'act_attention_scores_f32_x2': 2 * b * h * s * s * 4,
      'act_mlp_one_layer_bf16_x3': 3 * b * s * f * 2,
      'act_logits_f32_x3': 3 * b * s * v * 4,
      'gathered_weights_bf16': 2 * layer_params * 2 + v * d * 2,
  }
  parts['state_total'] = parts['params_f32'] + parts['grads_f32'] + parts['adamw_mu_nu_f32']
  parts['activations_total'] = sum(v for k, v in parts.items() if k.startswith(('act_', 'gath')))
  parts['total'] = parts['state_total'] + parts['activations_total']
  # Model FLOPs of one step per device (6N + attention per token, Kaplan/PaLM convention);
  # remat='full' adds one more forward pass of the layers on top (not counted here).
  parts['model_flops'] = models.flops_per_token(cfg, seq) * seq * per_device_batch
  return {k: int(v) for k, v in parts.items()}


def compile_one(target: str, n: int, libtpu_path: str | None, timeout: float,
                tpu_kind: str = 'v5e') -> dict:
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(ROOT), libtpu_path,
                                                    env.get('PYTHONPATH')]))
  if target == 'cpu':
    env['JAX_PLATFORMS'] = 'cpu'
    tgt = 'cpu'
  else:
    tgt = f'tpu:{TPU_TOPOLOGIES[tpu_kind][n]}'
    env.setdefault('TPU_ACCELERATOR_TYPE', 'v5litepod-8')  # silences libtpu's host probing
    env.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
    env.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')  # several compiles may share the host
  cmd = [sys.executable, '-m', 'flaxllm.cli', 'compile', f'--config={CONFIG}',
         f'--target={tgt}', '--json', f'--config.batch_size={n}', f'--config.seq_len={SEQ}',
         '--config.mesh.fsdp=-1', '--config.parallel.rules=fsdp']
  cmd += [f'--devices={n}'] if target == 'cpu' else []
  t0 = time.time()
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                        cwd=str(ROOT))
  wall = time.time() - t0
  lines = [l for l in proc.stdout.splitlines() if l.startswith('{')]
  if proc.returncode or not lines:
    err = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
    msg = (err or proc.stderr.splitlines()[-3:] or ['?'])[-1]
    return {'num_devices': n, 'target': tgt, 'error': msg.removeprefix('error: '),
            'wall_s': wall}
  out = json.loads(lines[-1])
  out['wall_s'] = wall
  return out


def render(results: list[dict], target: str, note: str) -> str:
  g = lambda x: f'{x / GiB:.2f}'
  lines = [f'# AOT per-device memory: LLaMA-3 8B train step, FSDP ({target})', '',
           f'Generated by `bench/aot_memory.py --target={target}` on '
           f'{datetime.date.today().isoformat()} ({platform.machine()}, {os.cpu_count()} CPUs).',
           '', note, '',
           f'`flaxllm compile --config={CONFIG}`: the trainer\'s train step; '
           'model `llama3_8b` (8.03 B params) with scan_layers=True, remat=full, bf16 compute, '
           'float32 params and AdamW state; XLA attention; rules `fsdp` on mesh data=1 x '
           f'fsdp=N; one {SEQ}-token sequence per device. Compiled = XLA `memory_analysis()` of '
           'the per-device program: total = arguments + outputs - aliased (donated state) + '
           'temporaries + generated code. Analytic = params + grads + AdamW mu/nu (16 B/param '
           '/ N) + activations (see `analytic()` for the remat assumption). GiB.', '',
           '| devices | target | arguments | outputs | aliased | temporaries | code | '
           '**compiled total** | analytic state (16P/N) | analytic activations | '
           '**analytic total** | XLA TFLOP/device | model TFLOP/device | compile s |',
           '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|']
  for r in results:
    a = analytic(r['num_devices'])
    if 'error' in r:
      err = r['error'].removeprefix('error: ')
      lines.append(f"| {r['num_devices']} | {r.get('target', target)} | does not compile: {err} |"
                   + ' |' * 5 + f" {g(a['state_total'])} | {g(a['activations_total'])} | "
                   f"**{g(a['total'])}** | | {a['model_flops'] / 1e12:.1f} | |")
      continue
    flops = r.get('flops')
    lines.append(
        f"| {r['num_devices']} | {r['target']} | {g(r['argument_bytes'])} | "
        f"{g(r['output_bytes'])} | -{g(r['alias_bytes'])} | {g(r['temp_bytes'])} | "
        f"{g(r['generated_code_bytes'])} | **{g(r['total_bytes'])}** | {g(a['state_total'])} | "
        f"{g(a['activations_total'])} | **{g(a['total'])}** | "
        f"{'' if flops is None else f'{flops / 1e12:.1f}'} | {a['model_flops'] / 1e12:.1f} | "
        f"{r.get('compile_s', 0):.0f} |")
  a = analytic(8)
  lines += ['', 'Analytic activation terms (per device, independent of N): ' + ', '.join(
      f'{k} {g(v)}' for k, v in a.items() if k.startswith(('act_', 'gath'))) + ' GiB.', '',
      "XLA TFLOP/device is `cost_analysis()['flops']`, which counts the body of the scanned "
      "layer loop once, not 32 times; model TFLOP/device is `flops_per_token(cfg, 2048) * "
      "2048` (6N + attention, without the remat recompute).", '']
  return '\n'.join(lines)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--target', choices=['cpu', 'tpu'], default='cpu')
  ap.add_argument('--devices', default='8,16,64')
  ap.add_argument('--tpu-kind', choices=sorted(TPU_TOPOLOGIES), default='v5e')
  ap.add_argument('--libtpu-path', default=os.environ.get('FLAXLLM_LIBTPU_PATH'))
  ap.add_argument('--timeout', type=float, default=3600)
  ap.add_argument('--out', default=str(ROOT / 'bench' / 'results'))
  ap.add_argument('--render', action='store_true', help='only rewrite the .md from the .json')
  args = ap.parse_args(argv)
  if args.render:
    name = args.target if args.target == 'cpu' or args.tpu_kind == 'v5e' else f'tpu_{args.tpu_kind}'
    stem = pathlib.Path(args.out) / f'aot_memory_{name}'
    data = json.loads(stem.with_suffix('.json').read_text())
    stem.with_suffix('.md').write_text(render(data['results'], args.target, data['note']))
    return 0
  if args.target == 'tpu':
    note = ('Target: real TPU v5e topologies (v5litepod-8/16/64, 16 GiB HBM per chip) compiled '
            'by the TPU compiler in libtpu from a CPU-only host via '
            '`jax.experimental.topologies.get_topology_desc`; no TPU was used.')
  else:
    note = ('Target: fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N). The '
            'SPMD partitioning is the same as on an accelerator, but buffer assignment, fusion '
            'and the bf16 handling are the CPU compiler\'s, so temporaries differ from TPU/GPU.')
  results = []
  name = args.target if args.target == 'cpu' or args.tpu_kind == 'v5e' else f'tpu_{args.tpu_kind}'
  stem = pathlib.Path(args.out) / f'aot_memory_{name}'
  if args.target == 'tpu' and args.tpu_kind != 'v5e':
    note = note.replace('v5e topologies (v5litepod-8/16/64, 16 GiB HBM per chip)',
                        f'{args.tpu_kind} topologies {list(TPU_TOPOLOGIES[args.tpu_kind].values())}')
  for n in [int(x) for x in args.devices.split(',')]:
    print(f'[aot_memory] {args.target}: {n} devices ...', flush=True)
    try:
      r = compile_one(args.target, n, args.libtpu_path, args.timeout, args.tpu_kind)
    except subprocess.TimeoutExpired:
      r = {'num_devices': n, 'error': f'compile did not finish within {args.timeout:g} s'}
    r['analytic'] = analytic(n)
    results.append(r)
    print(json.dumps(r), flush=True)
    stem.with_suffix('.json').write_text(json.dumps(
        {'target': args.target, 'note': note, 'seq': SEQ, 'config': CONFIG,
         'results': results}, indent=1) + '\n')
    stem.with_suffix('.md').write_text(render(results, args.target, note))
  return 0


if __name__ == '__main__':
  sys.exit(main())
