"""Never lose a user's run or files (flaxllm.rundir and the trainer): one writer per workdir, a
restore that tells a mismatch from damage from a read error, no training into another
program's directory, exports repaired, data.path meaning exactly what it names, and sweeps that
stay inside their directory and leave live runs alone. Every outcome is asserted: the refusal
sentence, files unchanged byte for byte, checkpoints in place, later losses bitwise equal.

Training runs use configs/default.py:size=tiny on a 40-file slice of the standard library.
"""
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxllm import cli
from flaxllm import config as config_lib
from flaxllm import rundir
from flaxllm.data import corpus
from flaxllm.models.config import ConfigError
from flaxllm.train import main as main_lib
from flaxllm.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, 'configs', 'default.py') + ':size=tiny'


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  root = tmp_path_factory.mktemp('reliability')
  corpus_dir = root / 'corpus'
  corpus_dir.mkdir()
  files = sorted(glob.glob(os.path.join(sysconfig.get_paths()['stdlib'], '*.py')))
  for f in [f for f in files if 2_000 < os.path.getsize(f) < 40_000][:40]:
    shutil.copy(f, corpus_dir)
  return {'root': root, 'corpus': str(corpus_dir), 'data_dir': str(root / 'tfds')}


def _config(env, **kw):
  values = {'data.source': 'text', 'data.path': env['corpus'], 'data.data_dir': env['data_dir'],
            'sample.max_new_tokens': 0, 'ckpt_every': 10, 'wandb.mode': 'disabled',
            'peak_flops': 1e11, **kw}
  return config_lib.load_config(TINY, [f'--config.{k}={v}' for k, v in values.items()])


def _losses(workdir) -> dict:
  rows = [json.loads(line) for line in open(os.path.join(workdir, rundir.METRICS_FILE))]
  return {r['step']: r['loss'] for r in rows if 'loss' in r}


def _snapshot(directory) -> dict:
  """{relative path: sha256} of every file under `directory`."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      out[os.path.relpath(path, directory)] = hashlib.sha256(open(path, 'rb').read()).hexdigest()
  return out


@pytest.fixture(scope='module')
def run(env):
  """A complete 20-step run with checkpoints 10 and 20."""
  workdir = env['root'] / 'run'
  summary = trainer.train(_config(env), str(workdir))
  assert summary['complete']
  return workdir


def _copy(run, env, name):
  workdir = env['root'] / name
  shutil.copytree(run, workdir)
  return workdir


# ----------------------------------------------------------------------------- one writer

def test_second_writer_is_refused_and_a_dead_holders_lock_is_taken_over(env, run):
  workdir = _copy(run, env, 'locked')
  before = _snapshot(workdir)
  with rundir.WorkdirLock(str(workdir)):           # another trainer holds the workdir
    with pytest.raises(ConfigError, match=rf'^{workdir} is in use by another flaxllm process '
                                          rf'\(pid {os.getpid()} on .*, since .*\); wait for it'):
      trainer.train(_config(env, total_steps=30), str(workdir))
    assert rundir.lock_holder(str(workdir))['pid'] == os.getpid()
  lockless = {k: v for k, v in _snapshot(workdir).items() if k != rundir.LOCK_FILE}
  assert lockless == before                         # nothing written by the refused run
  # A lock left by a process that is gone (kill -9): taken over, and the run goes on.
  dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                        capture_output=True, text=True, check=True)
  with open(workdir / rundir.LOCK_FILE, 'w') as f:
    json.dump({'host': os.uname().nodename, 'pid': int(dead.stdout), 'started': '1',
               'time': 0, 'token': 'x'}, f)
  assert rundir.lock_holder(str(workdir)) is None
  summary = trainer.train(_config(env, total_steps=30), str(workdir))
  assert summary['complete'] and summary['step'] == 30
  assert not (workdir / rundir.LOCK_FILE).exists()  # released at the end


def test_a_lock_from_another_host_is_stale_only_without_heartbeat(tmp_path):
  path = tmp_path / rundir.LOCK_FILE
  path.write_text(json.dumps({'host': 'elsewhere', 'pid': 1, 'time': 0, 'token': 'y'}))
  assert rundir.lock_holder(str(tmp_path))['host'] == 'elsewhere'   # fresh heartbeat: live
  old = os.path.getmtime(path) - 2 * rundir.WorkdirLock.STALE_S
  os.utime(path, (old, old))
  assert rundir.lock_holder(str(tmp_path)) is None                  # silent for too long


# ----------------------------------------------------------------------------- restore

@pytest.mark.parametrize('with_config', [True, False], ids=['config_json', 'no_config_json'])
def test_resume_with_another_model_moves_nothing(env, run, with_config):
  workdir = _copy(run, env, f'mismatch_{with_config}')
  if not with_config:
    os.remove(workdir / rundir.CONFIG_FILE)
  before = _snapshot(workdir)
  with pytest.raises(ConfigError) as e:
    trainer.train(_config(env, **{'model.d_model': 64}), str(workdir))
  message = str(e.value)
  if with_config:
    assert message.startswith('model.d_model is 64 but the run in')
  else:
    assert message.startswith(f'checkpoint 20 in {workdir}/checkpoints holds a different train '
                              'state than this run (params/model/')
  after = _snapshot(workdir)
  assert {k: v for k, v in after.items() if k != rundir.MARKER_FILE} == {
      k: v for k, v in before.items() if k != rundir.MARKER_FILE}
  assert not (workdir / rundir.CORRUPT_DIR).exists()


def test_a_flipped_byte_is_detected_set_aside_and_the_previous_checkpoint_resumed(env, run):
  workdir = _copy(run, env, 'flipped')
  step20 = workdir / 'checkpoints' / '20'
  recorded = json.loads((step20 / rundir.CHECKSUM_FILE).read_text())
  name = max((n for n in recorded if n.startswith('state/')),
             key=lambda n: os.path.getsize(step20 / n))    # the largest array file
  data = bytearray((step20 / name).read_bytes())
  data[len(data) // 2] ^= 0x10
  (step20 / name).write_bytes(bytes(data))
  summary = trainer.train(_config(env), str(workdir))
  assert summary['complete'] and summary['step'] == 20
  moved = glob.glob(str(workdir / rundir.CORRUPT_DIR / '20-*'))
  assert len(moved) == 1 and os.path.exists(os.path.join(moved[0], name))   # kept
  assert _losses(workdir) == _losses(run)                  # steps 11-20 again, bit for bit


def test_a_read_error_is_retried_and_reported_without_moving_anything(env, run, monkeypatch):
  workdir = _copy(run, env, 'unreadable')
  before = _snapshot(workdir)
  calls = []

  def failing(self, *args, **kw):
    calls.append(args)
    raise OSError('Input/output error')
  monkeypatch.setattr(rundir.ocp.CheckpointManager, 'restore', failing)
  monkeypatch.setattr(rundir.time, 'sleep', lambda s: None)
  with pytest.raises(ConfigError, match=r'checkpoint 20 .* could not be read after 3 attempts '
                                        r'\(Input/output error\); its files match their '
                                        r'checksums, so nothing was moved'):
    trainer.train(_config(env, total_steps=30), str(workdir))
  assert len(calls) == 3
  after = _snapshot(workdir)
  assert {k: v for k, v in after.items() if 'metrics' not in k} == {
      k: v for k, v in before.items() if 'metrics' not in k}


def test_non_finite_state_is_set_aside(tmp_path):
  checkpoints = rundir.Checkpoints(str(tmp_path))
  good = {'w': jnp.ones((4,))}
  checkpoints.save(1, good, {})
  checkpoints.save(2, {'w': jnp.array([1.0, jnp.nan, 1.0, 1.0])}, {})
  checkpoints.close()
  checkpoints = rundir.Checkpoints(str(tmp_path))
  step, state, _ = checkpoints.restore_latest(jax.eval_shape(lambda: good))
  checkpoints.close()
  assert step == 1 and np.all(np.asarray(state['w']) == 1)
  assert glob.glob(str(tmp_path / rundir.CORRUPT_DIR / '2-*'))


def test_eval_of_a_damaged_checkpoint_is_one_sentence(env, run, capsys):
  workdir = _copy(run, env, 'eval_damaged')
  for f in glob.glob(str(workdir / 'checkpoints' / '20' / 'state' / '*')):
    if os.path.isfile(f):
      open(f, 'ab').write(b'x')
  assert main_lib.eval_main([f'--workdir={workdir}']) == 1
  err = capsys.readouterr().err.strip()
  assert err.count('\n') == 0 and err.startswith(f'error: checkpoint 20 in {workdir}/checkpoints '
                                                 'is damaged')
  assert (workdir / 'checkpoints' / '20').exists()       # a read-only command moves nothing


# ----------------------------------------------------------------------------- files

def test_train_refuses_a_directory_that_is_not_a_run(env, tmp_path):
  hf = tmp_path / 'hf_model'
  hf.mkdir()
  (hf / 'config.json').write_text(json.dumps({'model_type': 'llama', 'hidden_size': 8}))
  (hf / 'tokenizer.json').write_text('{"version": "1.0"}')
  (hf / 'model.safetensors').write_bytes(b'\0' * 16)
  before = _snapshot(hf)
  for folder, first in ((hf, 'model.safetensors'), (tmp_path / 'x', 'notes.txt')):
    folder.mkdir(exist_ok=True)
    if first == 'notes.txt':
      (folder / first).write_text('mine')
    with pytest.raises(ConfigError, match=rf'^--workdir {folder} holds files that are not a '
                                          rf'flaxllm run \(e\.g\. {first}\); training would '
                                          r'overwrite them'):
      trainer.train(_config(env), str(folder))
  assert _snapshot(hf) == before


def test_a_missing_export_is_repaired(env, run):
  workdir = _copy(run, env, 'export')
  shutil.rmtree(workdir / rundir.MODEL_DIR)
  summary = trainer.train(_config(env), str(workdir))
  assert summary['complete'] and rundir.has_exported_model(str(workdir))
  assert _losses(workdir) == _losses(run)        # nothing retrained


def test_data_path_of_one_file_reads_only_that_file(tmp_path):
  texts = tmp_path / 'texts'
  texts.mkdir()
  for name in ('a.txt', 'b.txt', 'c.txt'):
    (texts / name).write_text(f'text of {name}\n' * 50)
  data = {'source': 'text', 'path': str(texts / 'b.txt'), 'val_fraction': 0.0,
          'data_dir': str(tmp_path / 'tfds')}
  docs = list(corpus.iter_texts(data, 'train'))
  assert docs == ['text of b.txt\n' * 50]


def _tmpfs(path, size: str) -> bool:
  path.mkdir()
  return subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)],
                        capture_output=True).returncode == 0


def test_closed_loop_callbacks_of_a_failed_save_print_nothing(capsys, monkeypatch):
  """After a failed save, tensorstore finishes its callbacks into orbax's closed event loop;
  each is an unraisable RuntimeError that would print a traceback at exit (seen on CI)."""
  class RaisesWhenCollected:
    def __init__(self, message):
      self.message = message

    def __del__(self):
      raise RuntimeError(self.message)

  monkeypatch.setattr(sys, 'unraisablehook', cli.drop_closed_loop_callbacks)
  RaisesWhenCollected('Event loop is closed')
  assert capsys.readouterr().err == ''
  RaisesWhenCollected('something else')
  assert 'RuntimeError: something else' in capsys.readouterr().err


def test_a_full_disk_is_one_sentence_with_the_safe_step_and_resumes(env, tmp_path):
  """On a 3 MB filesystem (tmpfs; needs root, skipped otherwise) checkpoints fill the disk."""
  disk = tmp_path / 'disk'
  if not _tmpfs(disk, '3m'):
    pytest.skip('cannot mount a tmpfs here (needs root)')
  try:
    workdir = disk / 'run'
    cmd = [sys.executable, '-m', 'flaxllm.cli', 'train', f'--config={TINY},steps=200',
           f'--workdir={workdir}', '--config.keep_ckpts=100', '--config.ckpt_every=10',
           '--config.peak_flops=1e11', '--config.wandb.mode=disabled',
           '--config.sample.max_new_tokens=0', '--config.progress_bar=False',
           '--config.data.source=text', f'--config.data.path={env["corpus"]}',
           f'--config.data.data_dir={env["data_dir"]}']
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 1
    errors = out.stderr.strip().splitlines()
    assert len(errors) == 1, out.stderr[-3000:]          # no orbax thread tracebacks
    step = int(errors[0].split('saving checkpoint ')[1].split()[0])
    assert errors[0] == (f'error: saving checkpoint {step} in {workdir}/checkpoints failed (no '
                         f'space left on device); the newest complete checkpoint is step '
                         f'{step - 10}; free disk space (or fix the storage) and run the same '
                         'command to resume.')
    subprocess.run(['mount', '-o', 'remount,size=64m', str(disk)], check=True)
    cmd[4] = f'--config={TINY},steps={step + 10}'
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f'Resuming {workdir} from step {step - 10}' in again.stdout
  finally:
    subprocess.run(['umount', str(disk)], capture_output=True)


def test_a_malformed_config_json_names_its_file(tmp_path, capsys):
  (tmp_path / rundir.MARKER_FILE).write_text('{}')
  (tmp_path / rundir.CONFIG_FILE).write_text('{oops')
  assert main_lib.train_main([f'--workdir={tmp_path}']) == 1
  err = capsys.readouterr().err.strip()
  assert err.startswith(f'error: {tmp_path}/config.json is not valid JSON (') and '\n' not in err
