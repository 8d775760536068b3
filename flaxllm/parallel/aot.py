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
    mesh = make_mesh({'fsdp': -1}, devices)
    report = compile_reference_step(model_cfg, mesh, 'fsdp', batch=16, seq=2048, target=desc)
    check_memory(report, '16GiB')
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from typing import Callable, Sequence

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


def compile_aot(fn: Callable, *abstract_args, in_shardings=None, out_shardings=None,
                donate_argnums: Sequence[int] = (), context=None):
  """jit + lower + compile `fn` for abstract (ShapeDtypeStruct) args; never runs it."""
  if not isinstance(fn, jax.stages.Wrapped) or in_shardings is not None:
    kw = {}
    if in_shardings is not None:
      kw['in_shardings'] = in_shardings
    if out_shardings is not None:
      kw['out_shardings'] = out_shardings
    fn = jax.jit(fn, donate_argnums=tuple(donate_argnums), **kw)
  import contextlib
  with context or contextlib.nullcontext():
    lowered = fn.lower(*abstract_args)
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


def compile_step(step_fn: Callable, init_fn: Callable, init_args: Sequence, batch: dict,
                 mesh, rules='fsdp', *, param_specs=None, target: str = '',
                 donate: bool = True) -> MemoryReport:
  """AOT-compiles any `step_fn(state, batch) -> (state, metrics)` for `mesh`.

  `init_fn(*init_args)` gives the state (only traced with eval_shape); `batch` maps names to
  `(shape, dtype)` of the *global* batch (sharded over the data axes); `param_specs` as in
  `sharding.create_sharded`. The step is traced inside `sharding.step_context` so the models'
  activation constraints apply. This is what `flaxllm compile` runs for the trainer's step.
  """
  from flaxllm.parallel import rules as rules_lib
  from flaxllm.parallel import sharding as sharding_lib

  rules = rules_lib.get_rules(rules)
  state, shardings = sharding_lib.abstract_state(init_fn, mesh, rules, *init_args,
                                                 param_specs=param_specs)
  batch_abs, batch_sh = {}, {}
  for name, (shape, dtype) in batch.items():
    rules_lib.check_batch(shape[0], mesh, rules)
    batch_sh[name] = rules_lib.batch_sharding(mesh, rules, len(shape))
    batch_abs[name] = jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=batch_sh[name])

  def wrapped(state, batch):
    with sharding_lib.step_context(mesh, rules):
      return step_fn(state, batch)

  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  jitted = jax.jit(wrapped, in_shardings=(shardings, batch_sh),
                   out_shardings=(shardings, replicated), donate_argnums=(0,) if donate else ())
  t0 = time.perf_counter()
  compiled = compile_aot(jitted, state, batch_abs,
                         context=sharding_lib.sharding_context(mesh, rules))
  report = analyze(compiled, target or str(mesh.devices.flat[0].platform), mesh.devices.size,
                   time.perf_counter() - t0)
  report.extra.update(mesh=dict(mesh.shape), rules=rules_lib.rules_name(rules),
                      batch={k: list(v[0]) for k, v in batch.items()})
  return report


def compile_reference_step(model_cfg, mesh, rules='fsdp', *, batch: int, seq: int,
                           target: str = '', tx=None) -> MemoryReport:
  """AOT-compiles `reference_step` (forward + backward + AdamW) of `model_cfg` on `mesh`."""
  import jax.numpy as jnp
  from flaxllm import models
  from flaxllm.parallel import reference_step as rs
  from flaxllm.parallel import rules as rules_lib

  model = models.build(model_cfg)
  tx = tx or rs.make_optimizer()
  report = compile_step(rs.make_train_step(model, tx), rs.make_init(model, tx),
                        (jax.random.key(0),), {'tokens': ((batch, seq + 1), jnp.int32)}, mesh,
                        rules, param_specs=rules_lib.param_specs(model), target=target)
  report.extra.update(batch=batch, seq=seq)
  return report


def main(argv=None) -> int:
  """python -m flaxllm.parallel.aot --model=llama3_8b --fsdp=-1 --batch=8 --seq=2048
  [--target=tpu:v5e:2x4] [--budget=16GiB] [--set scan_layers=True --set remat=full ...]"""
  ap = argparse.ArgumentParser(description=main.__doc__)
  ap.add_argument('--model', default='tiny_llama')
  ap.add_argument('--set', action='append', default=[], help='model field override k=v')
  ap.add_argument('--data', type=int, default=1)
  ap.add_argument('--fsdp', type=int, default=-1)
  ap.add_argument('--tensor', type=int, default=1)
  ap.add_argument('--rules', default='fsdp')
  ap.add_argument('--batch', type=int, default=8)
  ap.add_argument('--seq', type=int, default=128)
  ap.add_argument('--target', default='cpu')
  ap.add_argument('--budget', default=None)
  ap.add_argument('--json', action='store_true')
  args = ap.parse_args(argv)
  from flaxllm import models
  from flaxllm.parallel import mesh as mesh_lib
  overrides = {}
  for kv in args.set:
    k, _, v = kv.partition('=')
    try:
      overrides[k] = json.loads(v)
    except json.JSONDecodeError:
      overrides[k] = {'True': True, 'False': False}.get(v, v)
  cfg = models.presets.get(args.model, **overrides)
  try:
    devices, desc = target_devices(args.target)
    mesh = mesh_lib.make_mesh({'data': args.data, 'fsdp': args.fsdp, 'tensor': args.tensor},
                              devices)
    report = compile_reference_step(cfg, mesh, args.rules, batch=args.batch, seq=args.seq,
                                    target=desc)
    print(json.dumps(report.to_dict()) if args.json else report.summary())
    if args.budget:
      check_memory(report, args.budget)
  except (TargetUnavailable, MemoryBudgetError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
