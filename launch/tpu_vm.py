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

Environment of the run: `--env NAME=VALUE` (repeatable) sets a variable on the command line of
the workers' shell (shell-quoted). A secret never appears on a command line or in the output:
an --env variable whose name contains KEY, TOKEN, SECRET or PASSWORD, and every `--secret-env
NAME` (its value read from this environment, so it is not in this launcher's argv either), is
written to ~/.flaxllm-secrets-<name>.env here (mode 600), copied to every worker with `scp -p`
(removed here right after), and sourced and deleted there before the command starts. Printed
commands show a secret only as NAME=***.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys

REMOTE_DIR = 'flaxllm'
LOG = '~/flaxllm-run.log'
REMOTE_SECRETS = '~/.flaxllm-secrets.env'
SECRET_WORDS = ('KEY', 'TOKEN', 'SECRET', 'PASSWORD')   # in a name: its value is a secret
ENV_NAME = re.compile(r'[A-Za-z_][A-Za-z0-9_]*')


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
  env = ' '.join(f'{k}={shlex.quote(v)}' for k, v in args.env.items())
  user_cmd = shlex.join(args.cmd)
  secrets = f'. {REMOTE_SECRETS} && rm -f {REMOTE_SECRETS} && ' if args.secrets else ''
  body = f'{secrets}cd ~/{REMOTE_DIR} && {env + " " if env else ""}{user_cmd}'
  if args.detach:
    remote = f'nohup bash -c {shlex.quote(body)} > {LOG} 2>&1 &'
  else:
    remote = f'set -o pipefail; ({body}) 2>&1 | tee {LOG}'
  copy = [['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', args.secrets_file,
           f'{args.name}:{REMOTE_SECRETS}', *_base(args), '--worker=all', '--scp-flag=-p']]
  return (copy if args.secrets else []) + [_ssh(args, remote)]


def cmd_logs(args) -> list[list[str]]:
  return [_ssh(args, f'tail -n +1 -f {LOG}', worker=str(args.worker))]


def cmd_down(args) -> list[list[str]]:
  return [['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', args.name, *_base(args), '--quiet']]


PLANS = {'up': cmd_up, 'sync': cmd_sync, 'run': cmd_run, 'logs': cmd_logs, 'down': cmd_down}


def plan(args) -> list[list[str]]:
  """The commands a subcommand runs, in order (what --dry-run prints)."""
  if args.action == 'all':
    return cmd_up(args) + cmd_sync(args) + cmd_run(args) + ([] if args.keep else cmd_down(args))
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
  ap.add_argument('--env', action='append', default=[],
                  help='NAME=VALUE for the run (a secret if NAME contains KEY, TOKEN, SECRET or '
                       'PASSWORD)')
  ap.add_argument('--secret-env', action='append', default=[], metavar='NAME',
                  help='pass this variable of the launching environment as a secret')
  ap.add_argument('--detach', action='store_true', help='run in the background (see logs)')
  ap.add_argument('--worker', default='0', help='worker whose log `logs` follows')
  ap.add_argument('--keep', action='store_true', help='`all`: do not delete the VM at the end')
  ap.add_argument('--dry-run', action='store_true', help='print the commands, run nothing')
  return ap


def _environment(ap: argparse.ArgumentParser, pairs: list[str],
                 secret_names: list[str]) -> tuple[dict, dict]:
  """(plain, secret) {NAME: VALUE} of the --env NAME=VALUE `pairs` and the `secret_names`
  (values from this environment); refuses what is not a variable name, never showing a value."""
  plain, secrets = {}, {}
  for pair in pairs:
    name, sep, value = pair.partition('=')
    if not sep:
      ap.error('an --env argument has no "="; pass each variable as --env NAME=VALUE (or '
               '--secret-env NAME to pass one from this environment).')
    if not ENV_NAME.fullmatch(name):
      ap.error(f'--env name {name!r} is not an environment variable name; use letters, digits '
               'and _ (not starting with a digit) before the "=".')
    secret = any(word in name.upper() for word in SECRET_WORDS)
    (secrets if secret else plain)[name] = value
  for name in secret_names:
    if not ENV_NAME.fullmatch(name):
      ap.error(f'--secret-env {name!r} is not an environment variable name; pass the NAME of a '
               'variable set in this environment.')
    if name not in os.environ:
      ap.error(f'--secret-env {name} is not set in this environment; export {name} before '
               'launching.')
    plain.pop(name, None)
    secrets[name] = os.environ[name]
  return plain, secrets


def parse(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  cut = argv.index('--') if '--' in argv else len(argv)
  ap = parser()
  args = ap.parse_args(argv[:cut])
  args.cmd = argv[cut + 1:]
  args.env, args.secrets = _environment(ap, args.env, args.secret_env)
  args.secrets_file = os.path.expanduser(f'~/.flaxllm-secrets-{args.name}.env')
  if args.jax_version is None:
    try:
      from importlib.metadata import version
      args.jax_version = version('jax')
    except Exception:  # noqa: BLE001
      args.jax_version = '0.10.2'
  return args


def _show(command: list[str], args, prefix: str = ''):
  """Prints `command`; before the copy of the secrets file, which names it holds (values as
  ***)."""
  if args.secrets_file in command:
    names = ' '.join(f'{name}=***' for name in args.secrets)
    print(f'# {args.secrets_file} (mode 600, removed after the copy): {names}')
  print(prefix + shlex.join(command), flush=True)


def _call(command: list[str], args) -> int:
  """Prints and runs `command`; the local secrets file exists only while it is being copied."""
  _show(command, args, '+ ')
  if args.secrets_file not in command:
    return subprocess.call(command)
  fd = os.open(args.secrets_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
  try:
    with os.fdopen(fd, 'w') as f:
      os.fchmod(f.fileno(), 0o600)  # os.open's mode only applies to a new file
      f.write(''.join(f'export {k}={shlex.quote(v)}\n' for k, v in args.secrets.items()))
    return subprocess.call(command)
  finally:
    os.remove(args.secrets_file)


def main(argv=None) -> int:
  args = parse(argv)
  commands = plan(args)
  if args.dry_run:
    for c in commands:
      _show(c, args)
    return 0
  down = cmd_down(args) if args.action == 'all' and not args.keep else []
  code = 0
  try:
    for c in commands[:len(commands) - len(down)]:
      code = _call(c, args)
      if code:
        break
  finally:
    for c in down:
      _call(c, args)
  return code


if __name__ == '__main__':
  sys.exit(main())
