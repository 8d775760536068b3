"""`flaxllm compile`: the trainer's own train step compiled ahead of time for a config's mesh
(fake CPU devices or a real TPU topology), without running it; per-device memory and FLOPs,
and one sentence when it does not fit a budget (the mechanics: `flaxllm.parallel.aot`).

    report = compile_train_step(config, mesh, target=desc)
    aot.check_memory(report, '16GiB')
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import jax

from flaxllm import cli, models, parallel
from flaxllm import config as config_lib
from flaxllm.parallel import aot
from flaxllm.train import trainer


def compile_train_step(config, mesh, target: str = '') -> aot.MemoryReport:
  """AOT-compiles the trainer's train step (`trainer.build_programs`: the same objective,
  model, optimizer, trainable/frozen split and shardings as `flaxllm train`) of `config` on
  `mesh`, for one global batch of `config.batch_size` x `config.seq_len` positions in the
  objective's batch layout. Frozen models loaded from elsewhere (a teacher) enter as abstract
  arrays: nothing is read or allocated."""
  programs = trainer.build_programs(config, mesh)
  objective = programs.objective
  parallel.check_batch(config.batch_size, mesh, programs.rules)
  batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=parallel.batch_sharding(
      mesh, programs.rules, len(shape)))
           for k, (shape, dtype) in objective.batch_shapes(config.batch_size,
                                                           config.seq_len).items()}
  frozen = {**programs.abstract_frozen,
            **objective.load_frozen(mesh, programs.rules, abstract=True)}
  t0 = time.perf_counter()
  compiled = aot.compile_aot(programs.train_step, programs.abstract_state, batch, frozen)
  report = aot.analyze(compiled, target or str(mesh.devices.flat[0].platform), mesh.devices.size,
                       time.perf_counter() - t0)
  tokens = config.batch_size * config.seq_len
  model_flops = models.flops_per_token(programs.model_cfg, config.seq_len) * tokens
  report.extra.update(mesh=dict(mesh.shape), rules=config.parallel.rules,
                      batch=config.batch_size, seq=config.seq_len,
                      model_flops_per_device=model_flops / mesh.devices.size)
  return report


def main(argv=None) -> int:
  """flaxllm compile --config=SPEC [--config.k=v ...] [--target=cpu|tpu:<topology>]
  [--devices=N] [--budget=16GiB] [--json]

  Lowers and compiles the train step of a config for its mesh (`config.mesh`) without running
  it, prints the per-device memory and FLOPs, and exits 1 with one sentence when the config is
  inconsistent or the step needs more than --budget per device. --devices=N compiles for N
  fake CPU devices (no accelerator needed); --target=tpu:v5e:8x8 for a real TPU topology
  (needs libtpu, no TPU).

    flaxllm compile --config=configs/pretrain.py:size=llama3_8b --devices=64 \\
        --config.batch_size=64 --config.seq_len=2048 --budget=16GiB
"""
  ap = argparse.ArgumentParser(prog='flaxllm compile', description=main.__doc__.split('\n\n')[1],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--config', required=True, help='config file and variant (as flaxllm train)')
  ap.add_argument('--target', default='cpu', help="'cpu' or 'tpu:<topology>' (e.g. tpu:v5e:4x4)")
  ap.add_argument('--devices', type=int, default=0,
                  help='number of fake CPU devices (target cpu; default: as JAX starts)')
  ap.add_argument('--budget', default=None, help='per-device memory budget, e.g. 16GiB')
  ap.add_argument('--json', action='store_true', help='print the report as one JSON line')
  argv = list(sys.argv[1:] if argv is None else argv)
  overrides, rest = cli.split_overrides(argv)
  args = ap.parse_args(rest)
  if args.devices:
    jax.config.update('jax_num_cpu_devices', args.devices)  # before any backend starts
  try:
    config = config_lib.load_config(args.config, overrides)
    devices, desc = aot.target_devices(args.target)
    mesh = parallel.make_mesh(config.mesh, devices)
    report = compile_train_step(config, mesh, desc)
    if args.json:
      print(json.dumps(report.to_dict()))
    else:
      print(f'{config.batch_size} x {config.seq_len} tokens on {parallel.describe_mesh(mesh)}, '
            f'rules {config.parallel.rules}:\n{report.summary()}\nmodel FLOPs per device and '
            f'step: {report.extra["model_flops_per_device"] / 1e12:.3g} TFLOP')
    if args.budget:
      aot.check_memory(report, args.budget)
      print(f'fits the budget of {aot.fmt_bytes(aot.parse_bytes(args.budget))} per device.')
  except (aot.TargetUnavailable, aot.MemoryBudgetError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
