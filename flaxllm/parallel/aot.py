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
    report = analyze(compile_aot(jitted_step, *abstract_args), desc, len(devices))
    check_memory(report, '16GiB')

The trainer's own step is compiled this way by `flaxllm.train.compile` (`flaxllm compile
--config=... --budget=16GiB`).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable

import jax
from jax.experimental import topologies

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
      import libtpu  # noqa: F401  pylint: disable=import-outside-toplevel -- optional (TPU)
    except ImportError:
      raise TargetUnavailable(
          f'target {target!r} needs the libtpu package (pip install libtpu; no TPU needed) '
          'to run the TPU compiler; use target=cpu for fake CPU devices instead.') from None
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
