"""Multi-host start-up: one call before anything touches devices.

    distributed.initialize()                          # TPU VM / SLURM / launch/local.py: automatic
    distributed.initialize('10.0.0.2:1234', num_processes=4, process_id=i)   # explicit

Order of precedence: explicit arguments, then the FLAXLLM_COORDINATOR / FLAXLLM_NUM_PROCESSES /
FLAXLLM_PROCESS_ID variables (set by `launch/local.py`), then JAX's own cluster detection (Cloud
TPU VMs, SLURM, Open MPI, Kubernetes). With none of those it is a single-process run and this
is a no-op.

A coordinator that never answers: JAX itself aborts the process (SIGABRT, "DEADLINE_EXCEEDED")
after `initialization_timeout`; so a non-coordinator process first waits for the coordinator's
port to accept connections and raises `CoordinatorTimeout` with one clear sentence when it does
not within `timeout_s`.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
import time
from typing import Sequence

import jax

ENV_COORDINATOR = 'FLAXLLM_COORDINATOR'
ENV_NUM_PROCESSES = 'FLAXLLM_NUM_PROCESSES'
ENV_PROCESS_ID = 'FLAXLLM_PROCESS_ID'
ENV_CPU_COLLECTIVES = 'FLAXLLM_CPU_COLLECTIVES'
ENV_TIMEOUT = 'FLAXLLM_DIST_TIMEOUT'

log = logging.getLogger(__name__)


class CoordinatorTimeout(TimeoutError):
  """The coordinator did not answer in time."""


def _split(address: str) -> tuple[str, int]:
  host, sep, port = address.rpartition(':')
  if not sep or not port.isdigit():
    raise ValueError(f'coordinator address {address!r} must be host:port, e.g. 10.0.0.2:1234.')
  return host.strip('[]'), int(port)


def wait_for_coordinator(address: str, timeout_s: float, poll_s: float = 0.25) -> None:
  """Blocks until `address` accepts TCP connections; CoordinatorTimeout after `timeout_s`."""
  host, port = _split(address)
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host, port), timeout=max(0.1, min(1.0, timeout_s))):
        return
    except OSError:
      if time.monotonic() >= deadline:
        raise CoordinatorTimeout(
            f'the coordinator at {address} did not answer within {timeout_s:g} s; check that '
            f'process 0 is running and that {host}:{port} is reachable from this host.') from None
      time.sleep(poll_s)


def _already_initialized() -> bool:
  fn = getattr(jax.distributed, 'is_initialized', None)
  if fn is not None:
    return bool(fn())
  from jax._src import distributed as _d  # pylint: disable=import-outside-toplevel -- older JAX
  return _d.global_state.client is not None


def _cluster_detected() -> bool:
  """Whether JAX's automatic cluster detection would find a multi-process environment."""
  try:
    from jax._src import clusters  # pylint: disable=import-outside-toplevel -- private, may move
    for env in clusters.ClusterEnv._cluster_types:
      if env.is_env_present():
        return True
    return False
  except Exception:  # private API moved: fall back to the common variables
    return any(k in os.environ for k in ('SLURM_JOB_ID', 'TPU_WORKER_HOSTNAMES',
                                         'OMPI_COMM_WORLD_SIZE'))


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: Sequence[int] | None = None,
               timeout_s: float | None = None, cpu_collectives: str | None = None) -> bool:
  """Joins the multi-process run; returns True when more than one process takes part.

  `timeout_s` bounds the wait for the coordinator and the other processes (default
  $FLAXLLM_DIST_TIMEOUT or 300 s). `cpu_collectives` ('gloo' | 'mpi') enables cross-process collectives on CPU devices (tests,
  `launch/local.py`); it defaults to $FLAXLLM_CPU_COLLECTIVES.
  """
  if _already_initialized():
    return jax.process_count() > 1
  env = os.environ
  if timeout_s is None:
    timeout_s = float(env.get(ENV_TIMEOUT, 300))
  coordinator_address = coordinator_address or env.get(ENV_COORDINATOR)
  if num_processes is None and env.get(ENV_NUM_PROCESSES):
    num_processes = int(env[ENV_NUM_PROCESSES])
  if process_id is None and env.get(ENV_PROCESS_ID):
    process_id = int(env[ENV_PROCESS_ID])
  cpu_collectives = cpu_collectives or env.get(ENV_CPU_COLLECTIVES)
  if cpu_collectives:
    jax.config.update('jax_cpu_collectives_implementation', cpu_collectives)

  if coordinator_address is None:
    if not _cluster_detected():
      log.info('no coordinator given and no cluster detected: single-process run.')
      return False
    jax.distributed.initialize(initialization_timeout=int(timeout_s))  # TPU VM, SLURM, ...
    return jax.process_count() > 1

  if num_processes is None or process_id is None:
    raise ValueError(f'an explicit coordinator ({coordinator_address}) needs num_processes and '
                     'process_id too (or FLAXLLM_NUM_PROCESSES / FLAXLLM_PROCESS_ID).')
  if not 0 <= process_id < num_processes:
    raise ValueError(f'process_id={process_id} must be in [0, {num_processes}).')
  if num_processes == 1:
    return False
  if process_id != 0:
    wait_for_coordinator(coordinator_address, timeout_s)
  print(f'[flaxllm] process {process_id}/{num_processes} joining {coordinator_address} '
        f'(timeout {timeout_s:g} s; an abort with DEADLINE_EXCEEDED means a process did not '
        'join in time)', file=sys.stderr, flush=True)
  jax.distributed.initialize(coordinator_address, num_processes=num_processes,
                             process_id=process_id, local_device_ids=local_device_ids,
                             initialization_timeout=int(max(1, timeout_s)))
  return True


def shutdown() -> None:
  if _already_initialized():
    jax.distributed.shutdown()
