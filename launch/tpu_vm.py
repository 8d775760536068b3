#!/usr/bin/env python
"""Run flaxllm on a Cloud TPU VM (single- or multi-host) with gcloud.

    python launch/tpu_vm.py up     --name=run1 --zone=us-west4-a --accelerator=v5litepod-16
    python launch/tpu_vm.py sync   --name=run1 --zone=us-west4-a                # copy this tree
    python launch/tpu_vm.py sync   --name=run1 --zone=us-west4-a --git=https://host/repo.git
    python launch/tpu_vm.py run    --name=run1 --zone=us-west4-a -- flaxllm train --config=...
    python launch/tpu_vm.py logs   --name=run1 --zone=us-west4-a                # tail worker 0
    python launch/tpu_vm.py down   --name=run1 --zone=us-west4-a
    python launch/tpu_vm.py all    --name=run1 ... -- flaxllm train ...   # up, sync, run, down

Every subcommand takes --dry-run, which prints the gcloud commands instead of running them.
`run` executes the command on all workers at once (`--worker=all`), which is what a multi-host
JAX program needs: `jax.distributed.initialize()` (called by `flaxllm.parallel.distributed`)
finds the other workers by itself on TPU VMs. Output of all workers streams to this terminal
and is also written to ~/flaxllm-run.log on each worker (`--detach` leaves it running in the
background; follow it with `logs`). `all` deletes the VM even when the run fails (--keep to
keep it).
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys

REMOTE_DIR = 'flaxllm'
LOG = '~/flaxllm-run.log'


def _base(args) -> list[str]:
  extra = [f'--zone={args.zone}']
  if args.project:
    extra.append(f'--project={args.project}')
  return extra


def _ssh(args, command: str, worker: str = 'all') -> list[str]:
  return ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', args.name, *_base(args),
          f'--worker={worker}', f'--command={command}']


def cmd_up(args) -> list[list[str]]:
  create = ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', args.name, *_base(args),
            f'--accelerator-type={args.accelerator}', f'--version={args.version}']
  if args.spot:
    create.append('--spot')
  return [create]


def cmd_sync(args) -> list[list[str]]:
  """Copy this working tree (git archive of HEAD) or clone/pull a repository, then install."""
  install = (f'cd ~/{REMOTE_DIR} && python3 -m pip install -q -U pip && '
             f'python3 -m pip install -q -e . "jax[tpu]=={args.jax_version}"')
  if args.git:
    fetch = (f'if [ -d ~/{REMOTE_DIR}/.git ]; then cd ~/{REMOTE_DIR} && git fetch -q && '
             f'git checkout -q {shlex.quote(args.branch)} && git pull -q; else git clone -q '
             f'-b {shlex.quote(args.branch)} {shlex.quote(args.git)} ~/{REMOTE_DIR}; fi')
    return [_ssh(args, f'{fetch} && {install}')]
  tarball = args.tarball
  return [
      ['git', 'archive', '--format=tar.gz', '-o', tarball, 'HEAD'],
      ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', tarball, f'{args.name}:~/flaxllm.tar.gz',
       *_base(args), '--worker=all'],
      _ssh(args, f'rm -rf ~/{REMOTE_DIR} && mkdir -p ~/{REMOTE_DIR} && tar xzf ~/flaxllm.tar.gz '
                 f'-C ~/{REMOTE_DIR} && {install}'),
  ]


def cmd_run(args) -> list[list[str]]:
  if not args.cmd:
    raise SystemExit('give the command to run on the workers after --, e.g. -- flaxllm train '
                     '--config=configs/llama.py')
  env = ' '.join(f'{k}={shlex.quote(v)}' for k, v in (kv.split('=', 1) for kv in args.env))
  user_cmd = shlex.join(args.cmd)
  body = f'cd ~/{REMOTE_DIR} && {env + " " if env else ""}{user_cmd}'
  if args.detach:
    remote = f'nohup bash -c {shlex.quote(body)} > {LOG} 2>&1 &'
  else:
    remote = f'set -o pipefail; ({body}) 2>&1 | tee {LOG}'
  return [_ssh(args, remote)]


def cmd_logs(args) -> list[list[str]]:
  return [_ssh(args, f'tail -n +1 -f {LOG}', worker=str(args.worker))]


def cmd_down(args) -> list[list[str]]:
  return [['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', args.name, *_base(args), '--quiet']]


PLANS = {'up': cmd_up, 'sync': cmd_sync, 'run': cmd_run, 'logs': cmd_logs, 'down': cmd_down}


def plan(args) -> list[list[str]]:
  """The commands a subcommand runs, in order (what --dry-run prints)."""
  if args.action == 'all':
    return cmd_up(args) + cmd_sync(args) + cmd_run(args) + cmd_down(args)
  return PLANS[args.action](args)


def parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter,
                               epilog=__doc__.split('\n\n', 1)[1])
  ap.add_argument('action', choices=['up', 'sync', 'run', 'logs', 'down', 'all'])
  ap.add_argument('--name', required=True, help='TPU VM name')
  ap.add_argument('--zone', required=True)
  ap.add_argument('--project', default=None)
  ap.add_argument('--accelerator', default='v5litepod-8', help='e.g. v5litepod-256, v4-32')
  ap.add_argument('--version', default='v2-alpha-tpuv5-lite', help='TPU VM runtime image')
  ap.add_argument('--spot', action='store_true')
  ap.add_argument('--git', default=None, help='clone/pull this repository instead of copying')
  ap.add_argument('--branch', default='main')
  ap.add_argument('--tarball', default='/tmp/flaxllm-src.tar.gz')
  ap.add_argument('--jax-version', default=None, help='default: the local jax version')
  ap.add_argument('--env', action='append', default=[], help='KEY=VALUE for the run')
  ap.add_argument('--detach', action='store_true', help='run in the background (see logs)')
  ap.add_argument('--worker', default='0', help='worker whose log `logs` follows')
  ap.add_argument('--keep', action='store_true', help='`all`: do not delete the VM at the end')
  ap.add_argument('--dry-run', action='store_true', help='print the commands, run nothing')
  return ap


def parse(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  cut = argv.index('--') if '--' in argv else len(argv)
  args = parser().parse_args(argv[:cut])
  args.cmd = argv[cut + 1:]
  if args.jax_version is None:
    try:
      from importlib.metadata import version
      args.jax_version = version('jax')
    except Exception:  # noqa: BLE001
      args.jax_version = '0.10.2'
  return args


def main(argv=None) -> int:
  args = parse(argv)
  commands = plan(args)
  if args.dry_run:
    for c in commands:
      print(shlex.join(c))
    return 0
  if args.action != 'all':
    for c in commands:
      print('+ ' + shlex.join(c), flush=True)
      code = subprocess.call(c)
      if code:
        return code
    return 0
  code = 0
  try:
    for c in cmd_up(args) + cmd_sync(args) + cmd_run(args):
      print('+ ' + shlex.join(c), flush=True)
      code = subprocess.call(c)
      if code:
        break
  finally:
    if not args.keep:
      for c in cmd_down(args):
        print('+ ' + shlex.join(c), flush=True)
        subprocess.call(c)
  return code


if __name__ == '__main__':
  sys.exit(main())
