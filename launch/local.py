#!/usr/bin/env python
"""Start N JAX processes on this machine, talking over loopback (a multi-host run in miniature).

    python launch/local.py -n 2 --devices-per-process 4 -- python -m my.script --flag
    python launch/local.py -n 2 -- flaxllm train --config=...

Each process gets FLAXLLM_COORDINATOR=127.0.0.1:<free port>, FLAXLLM_NUM_PROCESSES,
FLAXLLM_PROCESS_ID (read by `flaxllm.parallel.distributed.initialize()`), JAX_PLATFORMS=cpu,
XLA_FLAGS=--xla_force_host_platform_device_count=<devices per process> and
FLAXLLM_CPU_COLLECTIVES=gloo, so the processes form one 2 x 4 = 8-device CPU mesh.
Output lines are prefixed with `[p<i>]`. If any process fails, the others are terminated and
the launcher exits with the first failure's code; `--timeout` bounds the whole run.
"""
from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def process_env(i: int, n: int, port: int, devices: int, base: dict | None = None,
                platform: str = 'cpu', collectives: str = 'gloo') -> dict:
  env = dict(os.environ if base is None else base)
  flags = re.sub(r'--xla_force_host_platform_device_count=\d+', '', env.get('XLA_FLAGS', ''))
  env.update({
      'FLAXLLM_COORDINATOR': f'127.0.0.1:{port}',
      'FLAXLLM_NUM_PROCESSES': str(n),
      'FLAXLLM_PROCESS_ID': str(i),
      'XLA_FLAGS': f'{flags} --xla_force_host_platform_device_count={devices}'.strip(),
      'PYTHONUNBUFFERED': '1',
  })
  if platform:
    env['JAX_PLATFORMS'] = platform
  if collectives and platform == 'cpu':
    env['FLAXLLM_CPU_COLLECTIVES'] = collectives
  return env


def _pump(i: int, stream, out, lock):
  for line in iter(stream.readline, ''):
    with lock:
      out.write(f'[p{i}] {line}')
      out.flush()
  stream.close()


def launch(cmd: list[str], num_processes: int = 2, devices_per_process: int = 4,
           timeout: float | None = None, port: int | None = None, out=None,
           platform: str = 'cpu', collectives: str = 'gloo', cwd: str | None = None) -> int:
  """Runs `cmd` as `num_processes` processes; returns 0 or the first non-zero exit code
  (124 on timeout)."""
  out = out or sys.stdout
  port = port or free_port()
  lock = threading.Lock()
  procs, pumps = [], []
  for i in range(num_processes):
    p = subprocess.Popen(cmd, env=process_env(i, num_processes, port, devices_per_process,
                                              platform=platform, collectives=collectives),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd,
                         start_new_session=True)
    procs.append(p)
    t = threading.Thread(target=_pump, args=(i, p.stdout, out, lock), daemon=True)
    t.start()
    pumps.append(t)
  deadline = None if timeout is None else time.monotonic() + timeout
  code = 0
  try:
    while True:
      codes = [p.poll() for p in procs]
      failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
      if failed:
        i, code = failed[0]
        with lock:
          out.write(f'[launch] process {i} exited with code {code}; stopping the others.\n')
        break
      if all(c == 0 for c in codes):
        break
      if deadline is not None and time.monotonic() > deadline:
        code = 124
        with lock:
          out.write(f'[launch] timed out after {timeout:g} s; stopping all processes.\n')
        break
      time.sleep(0.1)
  finally:
    for p in procs:
      if p.poll() is None:
        p.terminate()
    for p in procs:
      try:
        p.wait(timeout=10)
      except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    for t in pumps:
      t.join(timeout=5)
  return code


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('-n', '--num-processes', type=int, default=2)
  ap.add_argument('--devices-per-process', type=int, default=4,
                  help='fake CPU devices per process (XLA_FLAGS)')
  ap.add_argument('--timeout', type=float, default=None, help='seconds for the whole run')
  ap.add_argument('--port', type=int, default=None, help='coordinator port (default: free)')
  ap.add_argument('--platform', default='cpu', help="JAX_PLATFORMS for the children ('' keeps "
                  'the environment)')
  ap.add_argument('cmd', nargs=argparse.REMAINDER, help='-- command to run')
  args = ap.parse_args(argv)
  cmd = args.cmd[1:] if args.cmd[:1] == ['--'] else args.cmd
  if not cmd:
    ap.error('give the command to run after --')
  return launch(cmd, args.num_processes, args.devices_per_process, args.timeout, args.port,
                platform=args.platform)


if __name__ == '__main__':
  sys.exit(main())
