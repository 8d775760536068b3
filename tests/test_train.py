"""The trainer end to end on a tiny LLaMA (2 layers, d_model 32, byte tokenizer, seq 32, batch 4)
and a 40-file slice of the standard library: exact resume after SIGKILL/SIGTERM, packing
through data + model, NaN stop, corrupted-checkpoint fallback, config checks on resume, eval,
bad inputs, and the default config's loss falling.

Runs share JAX's persistent compilation cache (in a temporary directory) so that the
subprocesses compile each program once.
"""
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxllm import config as config_lib
from flaxllm import models, rundir
from flaxllm.data import pipeline, tokenizer as tokenizer_lib
from flaxllm.models.config import ConfigError
from flaxllm.train import main as main_lib
from flaxllm.train import metrics as metrics_lib
from flaxllm.train import optim
from flaxllm.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, 'configs', 'default.py') + ':size=tiny'


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  """A 40-file text corpus, a TFDS data_dir and a JAX compilation cache for this module."""
  root = tmp_path_factory.mktemp('train')
  corpus = root / 'corpus'
  corpus.mkdir()
  files = sorted(glob.glob(os.path.join(sysconfig.get_paths()['stdlib'], '*.py')))
  for f in [f for f in files if 2_000 < os.path.getsize(f) < 40_000][:40]:
    shutil.copy(f, corpus)
  return {'root': root, 'corpus': str(corpus), 'data_dir': str(root / 'tfds'),
          'jax_cache': str(root / 'jax_cache')}


def _overrides(env, **kw):
  values = {'data.source': 'text', 'data.path': env['corpus'], 'data.data_dir': env['data_dir'],
            'sample.max_new_tokens': 0, **kw}
  return [f'--config.{k}={v}' for k, v in values.items()]


def _config(env, **kw):
  return config_lib.load_config(TINY, _overrides(env, **kw))


def _losses(workdir):
  rows = metrics_lib.read_metrics(str(workdir))
  return ({r['step']: r['loss'] for r in rows if 'loss' in r},
          {r['step']: r['val_loss'] for r in rows if 'val_loss' in r})


# ----------------------------------------------------------------------------- exact resume

RESUME_STEPS = 150


def _cmd(env, workdir):
  return [sys.executable, '-m', 'flaxllm.cli', 'train', f'--config={TINY}',
          f'--workdir={workdir}', *_overrides(env, total_steps=RESUME_STEPS, ckpt_every=10,
                                               eval_every=50, keep_ckpts=2)]


def _subprocess_env(env):
  return {**os.environ, 'JAX_COMPILATION_CACHE_DIR': env['jax_cache'],
          'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
          'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0', 'WANDB_MODE': 'disabled'}


def _run(env, workdir):
  out = subprocess.run(_cmd(env, workdir), cwd=REPO, env=_subprocess_env(env),
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return out


@pytest.fixture(scope='module')
def reference_run(env):
  workdir = env['root'] / 'reference'
  _run(env, workdir)
  return _losses(workdir)


@pytest.mark.parametrize('sig', [signal.SIGKILL, signal.SIGTERM], ids=['sigkill', 'sigterm'])
def test_interrupted_and_resumed_run_matches_uninterrupted_bitwise(env, reference_run, sig):
  workdir = env['root'] / f'interrupted_{sig.name}'
  proc = subprocess.Popen(_cmd(env, workdir), cwd=REPO, env=_subprocess_env(env),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  first = workdir / 'checkpoints' / '10'
  deadline = time.time() + 300
  while not first.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.01)
  proc.send_signal(sig)
  _, stderr = proc.communicate(timeout=300)
  if sig == signal.SIGKILL:
    assert proc.returncode == -signal.SIGKILL, stderr[-3000:]
  else:
    assert proc.returncode == 0, stderr[-3000:]
  losses, _ = _losses(workdir)
  reached = max(losses)
  assert 10 <= reached < RESUME_STEPS, 'the run was not interrupted mid-way'
  steps = rundir.Checkpoints(str(workdir)).steps()
  if sig == signal.SIGTERM:  # saved at the step it reached, not just the last multiple of 10
    assert steps[-1] == reached

  out = _run(env, workdir)  # resume to the end
  assert f'Resuming {workdir} from step {steps[-1]} on ' in out.stdout
  losses, val_losses = _losses(workdir)
  ref_losses, ref_val = reference_run
  assert sorted(losses) == list(range(1, RESUME_STEPS + 1))
  assert losses == ref_losses           # every step, bitwise (floats compared exactly)
  assert val_losses == ref_val

  again = _run(env, workdir)  # a completed run reports so and changes nothing
  assert f'is already complete ({RESUME_STEPS}/{RESUME_STEPS} steps' in again.stdout
  assert f'Run complete: {RESUME_STEPS}/{RESUME_STEPS}' in again.stdout
  assert _losses(workdir)[0] == ref_losses


# ----------------------------------------------------------------------------- packing

def test_packed_documents_do_not_see_each_other_through_data_and_model(env):
  short = env['root'] / 'short_docs'   # documents of 10-40 bytes: several per 64-token row
  short.mkdir()
  lines = [l for f in sorted(os.listdir(env['corpus']))[:5]
           for l in open(os.path.join(env['corpus'], f)) if 10 <= len(l.strip()) <= 40]
  for i, line in enumerate(lines[:60]):
    (short / f'doc{i:02d}.txt').write_text(line.strip())
  data = config_lib.base_config().data
  data.update(source='text', path=str(short), data_dir=env['data_dir'], val_fraction=0.1)
  tok = tokenizer_lib.ByteTokenizer()
  it = pipeline.make_iterator(data, tok, split='train', seq_len=64, batch_size=4, seed=0)
  batch = next(it)
  row = next(i for i, r in enumerate(batch['segment_ids']) if len(set(r[r > 0])) >= 3)
  seg = batch['segment_ids'][row]
  middle = sorted(set(seg[seg > 0]))[1]       # a document with neighbours on both sides
  cfg = models.ModelConfig.from_dict(dict(vocab_size=tok.vocab_size, d_model=32, num_layers=2,
                                          num_heads=2, mlp_dim=64, max_seq_len=64))
  model = models.build(cfg)
  rng = np.random.default_rng(0)            # random params without compiling an init
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.2, s.shape), s.dtype),
                        jax.eval_shape(lambda: models.init_params(model, jax.random.key(0))))
  apply = jax.jit(lambda t: model.apply({'params': params}, t, batch['positions'],
                                        batch['segment_ids']))
  changed = batch['inputs'].copy()
  where = seg == middle
  changed[row, where] = rng.integers(3, tok.vocab_size, where.sum())
  a, b = np.asarray(apply(batch['inputs'])), np.asarray(apply(changed))
  np.testing.assert_array_equal(a[row, ~where], b[row, ~where])   # other documents: unchanged
  assert np.abs(a[row, where] - b[row, where]).max() > 1e-3       # the changed one: changed
  other_rows = np.arange(len(a)) != row
  np.testing.assert_array_equal(a[other_rows], b[other_rows])
  # The loss never crosses documents: no target is predicted from another document's input
  # (targets are the next token *within* a document), and padding is masked.
  np.testing.assert_array_equal(batch['loss_mask'] > 0, batch['segment_ids'] > 0)


# ----------------------------------------------------------------------------- one shared run

@pytest.fixture(scope='module')
def tiny_run(env):
  workdir = env['root'] / 'tiny'
  summary = trainer.train(_config(env, ckpt_every=10), str(workdir))
  assert summary['complete'] and summary['step'] == 20
  return workdir, summary


def test_run_writes_metrics_checkpoints_and_artifacts(tiny_run):
  workdir, summary = tiny_run
  losses, val = _losses(workdir)
  assert sorted(losses) == list(range(1, 21)) and sorted(val) == [10, 20]
  rows = metrics_lib.read_metrics(str(workdir))
  assert all('val_ppl' in r for r in rows if 'val_loss' in r)
  assert {'lr', 'grad_norm', 'tokens_per_s', 'mfu'} <= set(rows[-3])
  assert np.mean([losses[s] for s in (18, 19, 20)]) < np.mean([losses[s] for s in (1, 2, 3)])
  assert summary['val_loss'] == val[20]
  for name in ('config.json', 'tokenizer.json', 'loss_curve.png', 'model/model_config.json'):
    assert (workdir / name).exists(), name
  assert rundir.Checkpoints(str(workdir)).steps() == [10, 20]


def test_resume_with_incompatible_config_is_an_error_and_safe_keys_are_allowed(env, tiny_run):
  workdir, _ = tiny_run
  before = (workdir / 'config.json').read_text()
  for key, value, name in (('model.d_model', 64, 'model.d_model'),
                           ('data.max_files', 10, 'data.max_files'),
                           ('optim.lr', 1e-2, 'optim.lr')):
    with pytest.raises(ConfigError, match=rf'^{name} is .* but the run in .* was started with '
                                          r'.*; resume with the same value or use a new '
                                          r'--workdir\.$'):
      trainer.train(_config(env, **{key: value}), str(workdir))
  assert (workdir / 'config.json').read_text() == before
  assert rundir.Checkpoints(str(workdir)).steps() == [10, 20]
  # A safe change (logging, more eval batches) on a complete run: reported, nothing retrained.
  summary = trainer.train(_config(env, log_every=5, eval_batches=1), str(workdir))
  assert summary['complete'] and summary['step'] == 20
  assert sorted(_losses(workdir)[0]) == list(range(1, 21))


def test_eval_command_any_checkpoint(tiny_run, capsys):
  workdir, summary = tiny_run
  assert main_lib.eval_main([f'--workdir={workdir}', '--batches=2']) == 0  # as in training
  latest = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert latest['step'] == 20 and latest['val_loss'] == pytest.approx(summary['val_loss'],
                                                                      rel=1e-6)
  assert main_lib.eval_main([f'--workdir={workdir}', '--step=10']) == 0
  at10 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert at10['step'] == 10 and at10['val_loss'] > latest['val_loss']
  assert np.isclose(at10['val_ppl'], np.exp(at10['val_loss']))
  assert main_lib.eval_main([f'--workdir={workdir}', '--step=7']) == 1
  assert capsys.readouterr().err.strip() == (
      f'error: {workdir} has no checkpoint at step 7; use one of [10, 20].')


def test_init_from_a_run_or_an_exported_model(env, tiny_run):
  workdir, _ = tiny_run
  programs = trainer.build_programs(_config(env))
  checkpoints = rundir.Checkpoints(str(workdir))
  final, _ = checkpoints.restore(20, programs.abstract_state)
  at10, _ = checkpoints.restore(10, programs.abstract_state)
  checkpoints.close()
  for source in (workdir, workdir / 'model'):  # a flaxllm workdir, a `flaxllm convert` dir
    params = rundir.load_params(str(source), programs.abstract_params, what='init_from')
    jax.tree.map(np.testing.assert_array_equal, params, final.params['model'])
  # An earlier checkpoint by its step; a step that has none is one sentence.
  params = rundir.load_params(str(workdir), programs.abstract_params, step=10)
  jax.tree.map(np.testing.assert_array_equal, params, at10.params['model'])
  with pytest.raises(rundir.RunDirError, match=r'has no checkpoint of step 7; use one of '
                                               r'\[10, 20\]'):
    rundir.load_params(str(workdir), step=7)
  other = trainer.build_programs(_config(env, **{'model.mlp_dim': 48}))
  with pytest.raises(rundir.RunDirError, match=r'do not match the model config'):
    rundir.load_params(str(workdir), other.abstract_params, what='init_from')


def test_corrupted_latest_checkpoint_falls_back_and_resumes(env, tiny_run, caplog):
  original, _ = tiny_run
  workdir = env['root'] / 'corrupt'
  shutil.copytree(original, workdir)
  for f in glob.glob(str(workdir / 'checkpoints' / '20' / 'state' / '**' / '*'), recursive=True):
    if os.path.isfile(f) and not f.endswith('.txt'):
      with open(f, 'wb') as fh:
        fh.write(b'garbage')
  summary = trainer.train(_config(env, ckpt_every=10), str(workdir))
  assert 'cannot be restored' in caplog.text and 'falling back' in caplog.text
  assert summary['complete'] and summary['step'] == 20
  moved = glob.glob(str(workdir / 'checkpoints_corrupt' / '20-*'))
  assert len(moved) == 1 and os.path.isdir(os.path.join(moved[0], 'state'))  # kept, not deleted
  assert rundir.Checkpoints(str(workdir)).steps() == [10, 20]
  assert _losses(workdir) == _losses(original)  # steps 11-20 retrained identically


# ----------------------------------------------------------------------------- failures

def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(env, monkeypatch):
  workdir = env['root'] / 'nan'
  real = optim.make_schedule

  def exploding(name, **kw):  # a learning rate that becomes infinite at step 13
    base = real(name, **kw)
    return lambda step: jnp.where(jnp.asarray(step) >= 12, jnp.inf, base(step))

  monkeypatch.setattr(optim, 'make_schedule', exploding)
  config = _config(env, ckpt_every=10, **{'optim.lr': 2.5e-3})  # own programs (no cache hit)
  with pytest.raises(trainer.TrainError, match=r'^the loss became nan .* at step 14; stopped '
                     r'without saving \(last good checkpoint: step 10\); lower optim\.lr'):
    trainer.train(config, str(workdir))
  checkpoints = rundir.Checkpoints(str(workdir))
  assert checkpoints.steps() == [10]
  programs = trainer.build_programs(config)
  state, _ = checkpoints.restore(10, programs.abstract_state)
  assert bool(rundir.all_finite(state))
  checkpoints.close()


def _cli_error(argv, capsys) -> str:
  assert main_lib.train_main(argv) == 1
  err = capsys.readouterr().err.strip()
  assert err.count('\n') == 0, err  # one line
  return err


def test_bad_inputs_are_one_sentence_errors(env, tmp_path, capsys):
  base = [f'--config={TINY}']
  empty = tmp_path / 'empty'
  empty.mkdir()
  binary = tmp_path / 'binary'
  binary.mkdir()
  (binary / 'a.bin').write_bytes(b'\x00\x01\x02' * 100)
  (binary / 'b.txt').write_bytes(b'\xff\xfe not utf-8 \xc3\x28')
  blocker = tmp_path / 'a_file'
  blocker.write_text('x')

  def run(workdir, **kw):
    return _cli_error([*base, f'--workdir={workdir}', *_overrides(env, **kw)], capsys)

  err = run(tmp_path / 'w1', **{'data.path': str(empty)})
  assert 'matches no files' in err and 'data.path' in err
  err = run(tmp_path / 'w2', **{'data.path': str(binary)})
  assert 'no usable text' in err and '2 inspected files' in err
  err = run(tmp_path / 'w3', **{'model.vocab_size': 200})
  assert "model's vocab_size is 200" in err and 'set model.vocab_size to at least 259' in err
  err = run(blocker / 'sub')
  assert err.startswith(f'error: workdir {blocker}/sub is not writable') and err.endswith(
      'choose a writable --workdir.')
  err = _cli_error([*base, f'--workdir={tmp_path}/w4', '--config.optim.lrr=1'], capsys)
  assert err == "error: unknown config key 'optim.lrr'; remove it or fix the name (did you " \
                "mean 'optim.lr'?)."
  assert _cli_error([f'--workdir={tmp_path}/none'], capsys).startswith(
      f'error: {tmp_path}/none has no config.json to resume from')


# ----------------------------------------------------------------------------- the default job

def test_default_config_loss_falls_and_prints_sample_and_perplexity(env, capsys):
  workdir = env['root'] / 'default'
  argv = [f'--config={REPO}/configs/default.py', f'--workdir={workdir}',
          '--config.total_steps=10', '--config.schedule.warmup_steps=2',
          '--config.batch_size=8', '--config.seq_len=32', '--config.log_every=1',
          '--config.eval_batches=1', '--config.data.max_files=300',
          f'--config.data.data_dir={env["data_dir"]}', '--config.peak_flops=1e11',
          '--config.wandb.mode=disabled', '--config.sample.max_new_tokens=4']
  assert main_lib.train_main(argv) == 0
  out = capsys.readouterr().out
  assert '--- sample (prompt \'def\') ---\ndef' in out
  assert 'validation loss' in out and 'bits per byte' in out and 'perplexity' in out
  losses, _ = _losses(workdir)
  assert np.mean([losses[s] for s in (8, 9, 10)]) < losses[1] - 0.5
  assert (workdir / 'tokenizer.model').exists()
  assert models.ModelConfig.from_dict(
      json.loads((workdir / 'config.json').read_text())['model']).vocab_size == 4096
