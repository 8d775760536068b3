"""Tests for launch/tpu_vm.py's environment of a run: a secret never appears in the printed
commands nor on any command line, --env values stay one shell word, bad names are refused, and
the planned commands, run by bash in a stand-in worker home, give the command its variables."""
import importlib.util
import json
import os
import pathlib
import shlex
import shutil
import stat
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
_SPEC = importlib.util.spec_from_file_location('flaxllm_launch_tpu_vm',
                                               ROOT / 'launch' / 'tpu_vm.py')
tpu_vm = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(tpu_vm)

SECRET = "hf_s3cr3t it's;$(touch pwned) `touch pwned2`"
PLAIN = 'two words; touch f'
BASE = ['--name=run1', '--zone=z', '--jax-version=0.10.2']


@pytest.fixture
def home(monkeypatch, tmp_path):
  """This machine's home (where the secrets file is written), with HF_TOKEN set to SECRET."""
  monkeypatch.setenv('HOME', str(tmp_path / 'here'))
  monkeypatch.setenv('HF_TOKEN', SECRET)
  (tmp_path / 'here').mkdir()
  return tmp_path / 'here'


def test_dry_run_masks_secrets_and_quotes_values(home, capsys):
  argv = ['all', *BASE, '--env', f'WANDB_API_KEY={SECRET}', '--secret-env', 'HF_TOKEN', '--env',
          f'NOTE={PLAIN}', '--dry-run', '--', 'flaxllm', 'train', '--config=configs/llama.py']
  assert tpu_vm.main(argv) == 0
  out = capsys.readouterr()
  assert 's3cr3t' not in out.out + out.err
  lines = out.out.strip().splitlines()
  local = home / '.flaxllm-secrets-run1.env'
  note = lines.index(f'# {local} (mode 600, removed after the copy): WANDB_API_KEY=*** '
                     'HF_TOKEN=***')
  assert lines[note + 1] == (f"gcloud compute tpus tpu-vm scp {local} 'run1:~/.flaxllm-secrets.env'"
                             ' --zone=z --worker=all --scp-flag=-p')
  ssh = shlex.split(lines[note + 2])
  assert ssh[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'run1']
  assert ssh[-1] == ("--command=set -o pipefail; (. ~/.flaxllm-secrets.env && rm -f "
                     "~/.flaxllm-secrets.env && cd ~/flaxllm && NOTE='two words; touch f' flaxllm "
                     'train --config=configs/llama.py) 2>&1 | tee ~/flaxllm-run.log')
  assert lines[-1] == 'gcloud compute tpus tpu-vm delete run1 --zone=z --quiet'
  assert not local.exists()   # a dry run writes nothing


def test_detached_run_quotes_values_and_keep_skips_delete(home, capsys):
  tpu_vm.main(['all', *BASE, '--keep', '--detach', '--env', f'NOTE={PLAIN}', '--dry-run', '--',
               'echo', 'hi'])
  lines = capsys.readouterr().out.strip().splitlines()
  remote = shlex.split(lines[-1])[-1].removeprefix('--command=')
  nohup, bash, dash_c, body, *rest = shlex.split(remote)
  assert (nohup, bash, dash_c) == ('nohup', 'bash', '-c')
  assert shlex.split(body) == ['cd', '~/flaxllm', '&&', f'NOTE={PLAIN}', 'echo', 'hi']
  assert rest == ['>', '~/flaxllm-run.log', '2>&1', '&']
  assert not any('delete' in line for line in lines)   # --keep


@pytest.mark.parametrize('argv, message', [
    (['--env', 'X;touch f;Y=1'], "--env name 'X;touch f;Y' is not an environment variable name"),
    (['--env', '1A=b'], "--env name '1A' is not an environment variable name"),
    (['--env', 'A B=c'], "--env name 'A B' is not an environment variable name"),
    (['--env', '=v'], "--env name '' is not an environment variable name"),
    (['--env', 'hf_s3cr3t'], 'an --env argument has no "="'),
    (['--secret-env', 'NOT_SET_HERE'], '--secret-env NOT_SET_HERE is not set in this environment'),
    (['--secret-env', 'HF TOKEN'], "--secret-env 'HF TOKEN' is not an environment variable name"),
])
def test_bad_environment_is_refused(home, capsys, argv, message):
  with pytest.raises(SystemExit) as exit_info:
    tpu_vm.main(['run', *BASE, *argv, '--dry-run', '--', 'echo'])
  assert exit_info.value.code == 2
  out = capsys.readouterr()
  assert out.out == '' and 's3cr3t' not in out.err
  (error,) = [line for line in out.err.splitlines() if 'error:' in line]
  assert message in error


def test_run_gives_the_command_its_variables_without_any_argv_holding_a_secret(
    home, tmp_path, capsys, monkeypatch):
  """gcloud replaced by: scp = a copy into the worker's home, ssh = bash -c there (a clean
  environment: HOME and PATH only)."""
  worker = tmp_path / 'worker'
  (worker / 'flaxllm').mkdir(parents=True)
  local = home / '.flaxllm-secrets-run1.env'
  calls = []

  def fake_call(command):
    calls.append(command)
    if command[4] == 'scp':
      assert stat.S_IMODE(os.stat(command[5]).st_mode) == 0o600
      shutil.copy(command[5], worker / '.flaxllm-secrets.env')
      return 0
    remote = command[-1].removeprefix('--command=')
    return subprocess.run(['bash', '-c', remote], cwd=worker, check=False,
                          env={'HOME': str(worker), 'PATH': os.environ['PATH']}).returncode

  monkeypatch.setattr(tpu_vm.subprocess, 'call', fake_call)
  dump = ('import json, os; json.dump({k: os.environ.get(k) for k in '
          '("HF_TOKEN", "WANDB_API_KEY", "NOTE")}, open("env.json", "w"))')
  code = tpu_vm.main(['run', *BASE, '--secret-env', 'HF_TOKEN', '--env', f'WANDB_API_KEY={SECRET}2',
                      '--env', f'NOTE={PLAIN}', '--', sys.executable, '-c', dump])
  assert code == 0
  assert [c[4] for c in calls] == ['scp', 'ssh']
  assert not any('s3cr3t' in arg for c in calls for arg in c)
  assert 's3cr3t' not in capsys.readouterr().out
  assert json.loads((worker / 'flaxllm' / 'env.json').read_text()) == {
      'HF_TOKEN': SECRET, 'WANDB_API_KEY': SECRET + '2', 'NOTE': PLAIN}
  assert not local.exists() and not (worker / '.flaxllm-secrets.env').exists()
  leftovers = {p.name for p in worker.rglob('*')}
  assert leftovers == {'flaxllm', 'env.json', 'flaxllm-run.log'}   # nothing was `touch`ed
