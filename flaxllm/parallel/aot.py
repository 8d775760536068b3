"""Ahead-of-time check: lower and compile a step for a mesh without running it (nothing is
allocated: inputs are `jax.ShapeDtypeStruct`s carrying their shardings), then report the
per-device memory (arguments, outputs, temporaries, generated code) and FLOPs, and fail with
one sentence when it does not fit a per-device budget.

Targets:
  'cpu'              the host's CPU devices (fake ones via
                     XLA_FLAGS=--xla_force_host_platform_device_count=N set before JAX starts);
                     a stand-in for the accelerator's compiler -- same SPMD partitioning, but
                     CPU buffer assignment and fusion, so temporaries differ from TPU/GPU.
  'tpu:<topology>'   a real TPU topology, e.g. 'tpu:v5e:8x8' (v5litepod-64), 'tpu:v5p:2x2x2',
                     compiled by the TPU compiler from this machine, as MaxText's train_compile
                     does. Needs `libtpu` importable (`pip install libtpu==<the version jax[tpu]
                     pins>`, no TPU required); without it `target_devices` raises
                     TargetUnavailable saying so.

    devices, desc = target_devices('tpu:v5e:4x4')
    mesh = make_mesh(config.mesh, devices)
    report = compile_train_step(config, mesh, target=desc)   # the trainer's step
    check_memory(report, '16GiB')

or from the command line: `flaxllm compile --config=... --budget=16GiB` (see `main`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from typing import Callable

import jax

GiB = 1 << 30


def fmt_bytes(b: float) -> str:
  for unit, size in (('GiB', GiB), ('MiB', 1 << 20), ('KiB', 1 << 10)):
    if abs(b) >= size:
      return f'{b / size:.2f} {unit}'
  return f'{int(b)} B'


class TargetUnavailable(RuntimeError):
  """The requested compile target cannot be used on this machine."""


class MemoryBudgetError(RuntimeError):
  """The compiled step does not fit the per-device memory budget."""


def parse_bytes(x) -> int:
  """16GiB, 16G, 15.5GB, 1e9 -> bytes (GB/G and GiB both mean 2**30: device sizes are GiB)."""
  if isinstance(x, (int, float)):
    return int(x)
  m = re.fullmatch(r'\s*([0-9.eE+]+)\s*([KMGT]?)(i?B)?\s*', str(x))
  if not m:
    raise ValueError(f'cannot read a memory size from {x!r}; write e.g. 16GiB.')
  return int(float(m.group(1)) * 1024 ** ' KMGT'.index(m.group(2) or ' '))


@dataclasses.dataclass
class MemoryReport:
  """Per-device numbers of one compiled program."""
  target: str
  num_devices: int
  argument_bytes: int
  output_bytes: int
  temp_bytes: int
  alias_bytes: int
  generated_code_bytes: int
  flops: float | None = None
  bytes_accessed: float | None = None
  compile_s: float | None = None
  extra: dict = dataclasses.field(default_factory=dict)

  @property
  def total_bytes(self) -> int:
    """Peak estimate: arguments + outputs - donated (aliased) + temporaries + code."""
    return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
            + self.generated_code_bytes)

  def to_dict(self) -> dict:
    return {**dataclasses.asdict(self), 'total_bytes': self.total_bytes}

  def summary(self) -> str:
    g = fmt_bytes
    flops = '' if self.flops is None else f', {self.flops:.3g} FLOPs'
    return (f'{self.target}: {g(self.total_bytes)} per device (arguments {g(self.argument_bytes)}'
            f', outputs {g(self.output_bytes)}, aliased -{g(self.alias_bytes)}, temporaries '
            f'{g(self.temp_bytes)}, code {g(self.generated_code_bytes)}){flops}')


def target_devices(target: str = 'cpu') -> tuple[list, str]:
  """('cpu' | 'tpu:<topology>') -> (devices, description)."""
  if target == 'cpu':
    devs = jax.devices('cpu')
    return devs, f'{len(devs)} fake CPU devices'
  if target.startswith('tpu:'):
    topology = target[4:]
    try:
      import libtpu  # noqa: F401
    except ImportError:
      raise TargetUnavailable(
          f'target {target!r} needs the libtpu package (pip install libtpu; no TPU needed) '
          'to run the TPU compiler; use target=cpu for fake CPU devices instead.') from None
    from jax.experimental import topologies
    try:
      desc = topologies.get_topology_desc(topology, 'tpu')
    except Exception as e:  # noqa: BLE001 -- libtpu's errors vary by version
      raise TargetUnavailable(f'libtpu could not describe TPU topology {topology!r} '
                              f'({str(e).splitlines()[0][:200]}); use names like v5e:4x4, '
                              'v5p:2x2x2, v4:2x2x2.') from None
    devs = list(desc.devices)
    return devs, f'TPU {topology} ({len(devs)} {devs[0].device_kind} devices, compiled ' \
                 f'from a CPU host with libtpu)'
  raise TargetUnavailable(f"unknown compile target {target!r}; use 'cpu' or 'tpu:<topology>'.")


def compile_aot(jitted: Callable, *abstract_args):
  """Lowers and compiles the jitted function `jitted` for abstract (ShapeDtypeStruct) args;
  never runs it. MemoryBudgetError when the compiler refuses it for lack of device memory."""
  lowered = jitted.lower(*abstract_args)
  try:
    return lowered.compile()
  except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses programs over HBM
    text = str(e)
    if 'RESOURCE_EXHAUSTED' not in text:
      raise
    detail = text.split('RESOURCE_EXHAUSTED:', 1)[1].strip().splitlines()[0].rstrip('.')
    raise MemoryBudgetError(
        f'the step does not fit in device memory ({detail[:300]}); shard over more devices '
        '(mesh.fsdp), enable model.remat, or lower the per-device batch.') from None


def _cost(compiled) -> dict:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 -- not every backend implements it
    return {}
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return dict(cost or {})


def analyze(compiled, target: str = '', num_devices: int = 0, compile_s: float | None = None
            ) -> MemoryReport:
  """MemoryReport from `compiled.memory_analysis()` and `compiled.cost_analysis()`.

  Note: XLA's FLOP count covers the body of a while loop once, so with scan_layers=True it
  counts one layer, not all of them (checked: a scanned 8-layer model reports the FLOPs of
  the unrolled 2-layer one); use `flaxllm.models.flops_per_token` for model FLOPs.
  """
  mem = compiled.memory_analysis()
  cost = _cost(compiled)
  return MemoryReport(
      target=target, num_devices=num_devices,
      argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
      temp_bytes=int(mem.temp_size_in_bytes), alias_bytes=int(mem.alias_size_in_bytes),
      generated_code_bytes=int(mem.generated_code_size_in_bytes),
      flops=cost.get('flops'), bytes_accessed=cost.get('bytes accessed'), compile_s=compile_s)


def check_memory(report: MemoryReport, budget) -> None:
  """MemoryBudgetError (one sentence) when the step needs more than `budget` per device."""
  budget = parse_bytes(budget)
  if report.total_bytes > budget:
    g = fmt_bytes
    raise MemoryBudgetError(
        f'the compiled step needs {g(report.total_bytes)} per device on {report.target} '
        f'(arguments {g(report.argument_bytes)}, outputs {g(report.output_bytes)}, temporaries '
        f'{g(report.temp_bytes)}, aliased -{g(report.alias_bytes)}) but the budget is '
        f'{g(budget)}; shard over more devices (mesh.fsdp), enable model.remat, or lower the '
        'per-device batch.')


def compile_train_step(config, mesh, target: str = '') -> MemoryReport:
  """AOT-compiles the trainer's train step (`flaxllm.train.trainer.build_programs`: the same
  model, optimizer, fine-tuning split and shardings as `flaxllm train`) of `config` on `mesh`,
  for one global batch of `config.batch_size` x `config.seq_len` tokens."""
  import jax.numpy as jnp
  from flaxllm import models
  from flaxllm.distill import hooks as distill
  from flaxllm.parallel import rules as rules_lib
  from flaxllm.train import step as step_lib
  from flaxllm.train import trainer

  if distill.enabled(config):
    raise ValueError('flaxllm compile does not cover distillation (the teacher is a second '
                     "model); compile the student alone with --config.distill.teacher=''.")
  programs = trainer.build_programs(config, mesh)
  rules_lib.check_batch(config.batch_size, mesh, programs.rules)
  shape = (config.batch_size, config.seq_len)
  sharding = rules_lib.batch_sharding(mesh, programs.rules, 2)
  batch = {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == 'loss_mask' else jnp.int32,
                                   sharding=sharding) for k in step_lib.BATCH_KEYS}
  frozen = {} if programs.abstract_base is None else {'base': programs.abstract_base}
  t0 = time.perf_counter()
  compiled = compile_aot(programs.train_step, programs.abstract_state, batch, frozen)
  report = analyze(compiled, target or str(mesh.devices.flat[0].platform), mesh.devices.size,
                   time.perf_counter() - t0)
  model_flops = models.flops_per_token(programs.model_cfg, config.seq_len) * shape[0] * shape[1]
  report.extra.update(mesh=dict(mesh.shape), rules=config.parallel.rules, batch=shape[0],
                      seq=shape[1], model_flops_per_device=model_flops / mesh.devices.size)
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
  overrides = [a for a in argv if a.startswith('--config.')]
  args = ap.parse_args([a for a in argv if not a.startswith('--config.')])
  if args.devices:
    jax.config.update('jax_num_cpu_devices', args.devices)  # before any backend starts
  from flaxllm import config as config_lib
  from flaxllm.parallel import mesh as mesh_lib
  try:
    config = config_lib.load_config(args.config, overrides)
    devices, desc = target_devices(args.target)
    mesh = mesh_lib.make_mesh(config.mesh, devices)
    report = compile_train_step(config, mesh, desc)
    if args.json:
      print(json.dumps(report.to_dict()))
    else:
      print(f'{config.batch_size} x {config.seq_len} tokens on {mesh_lib.describe(mesh)}, rules '
            f'{config.parallel.rules}:\n{report.summary()}\nmodel FLOPs per device and step: '
            f'{report.extra["model_flops_per_device"] / 1e12:.3g} TFLOP')
    if args.budget:
      check_memory(report, args.budget)
      print(f'fits the budget of {fmt_bytes(parse_bytes(args.budget))} per device.')
  except (TargetUnavailable, MemoryBudgetError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
