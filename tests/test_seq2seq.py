"""The original Transformer trained from a config (objective='seq2seq', configs/transformer.py):
it learns its task, resumes bit for bit after kill -9, trains sharded as on one device, decodes
from the command line, and refuses bad pair data in one sentence before compiling."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from flaxllm import config as config_lib
from flaxllm import generate, rundir
from flaxllm.models.config import ConfigError
from flaxllm.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, 'configs', 'transformer.py') + ':size=tiny'
QUIET = ['--config.wandb.mode=disabled', '--config.peak_flops=1e11']


def _config(*overrides, variant=''):
  return config_lib.load_config(TINY + variant, [*QUIET, *overrides])


def _losses(workdir) -> dict:
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  return {r['step']: r['loss'] for r in rows if 'loss' in r}


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """The CI-sized run of configs/transformer.py:size=tiny (1000 steps, about a minute)."""
  workdir = tmp_path_factory.mktemp('transformer')
  summary = trainer.train(_config(), str(workdir))
  return workdir, summary


def test_tiny_transformer_learns_its_task(trained):
  workdir, summary = trained
  assert summary['complete'] and summary['step'] == 1000
  assert summary['exact_match'] >= 0.95, summary       # beam search, 256 validation pairs
  assert 'bleu' in summary and summary['val_loss'] < 0.3
  assert summary['sample'] == 'get_config_value -> GetConfigValue'
  rows = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  evals = [r for r in rows if 'exact_match' in r]
  assert [r['step'] for r in evals] == [500, 1000]


def test_generate_command_translates_with_the_exported_model(trained, capsys):
  workdir, _ = trained
  assert generate.generate_main([f'--model={workdir / "model"}', '--source=read_file_lines',
                                 '--source=set_default', '--num-beams=4',
                                 '--length-penalty=0.6', '--max-new-tokens=32']) == 0
  assert capsys.readouterr().out.split() == ['ReadFileLines', 'SetDefault']
  # The workdir itself (its newest checkpoint) decodes the same, greedily as well.
  assert generate.generate_main([f'--model={workdir}', '--source=read_file_lines',
                                 '--max-new-tokens=32']) == 0
  assert capsys.readouterr().out.split() == ['ReadFileLines']


def _cmd(workdir):
  return [sys.executable, '-m', 'flaxllm.cli', 'train', f'--config={TINY},steps=40',
          f'--workdir={workdir}', *QUIET, '--config.ckpt_every=10', '--config.eval_every=20',
          '--config.seq2seq.eval_pairs=16', '--config.keep_ckpts=2']


def _env(cache):
  return {**os.environ, 'JAX_COMPILATION_CACHE_DIR': str(cache),
          'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
          'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0', 'WANDB_MODE': 'disabled'}


def test_killed_and_resumed_run_matches_uninterrupted_bitwise(tmp_path):
  env = _env(tmp_path / 'jax_cache')
  ref = subprocess.run(_cmd(tmp_path / 'ref'), cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
  assert ref.returncode == 0, ref.stderr[-3000:]
  workdir = tmp_path / 'killed'
  proc = subprocess.Popen(_cmd(workdir), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  first = workdir / 'checkpoints' / '10'
  deadline = time.time() + 300
  while not first.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  assert 10 <= max(_losses(workdir)) < 40, 'the run was not interrupted mid-way'
  out = subprocess.run(_cmd(workdir), cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'Resuming' in out.stdout
  assert _losses(workdir) == _losses(tmp_path / 'ref')
  final = lambda w: [json.loads(line) for line in open(w / 'metrics.jsonl')][-1]
  assert final(workdir) == final(tmp_path / 'ref')       # val loss, exact match, BLEU


def test_sharded_training_equals_one_device(tmp_path):
  short = dict(variant=',steps=8')
  flags = ['--config.seq2seq.eval_pairs=0', '--config.log_every=1',
           '--config.sample.max_new_tokens=0']
  mesh = ['--config.mesh.data=2', '--config.mesh.fsdp=4']
  one = trainer.train(_config(*flags, **short), str(tmp_path / 'one'), devices=jax.devices()[:1])
  eight = trainer.train(_config(*flags, *mesh, **short), str(tmp_path / 'eight'))
  programs = trainer.build_programs(_config(*flags, *mesh, **short))
  assert programs.mesh.devices.size == 8
  a, b = _losses(tmp_path / 'one'), _losses(tmp_path / 'eight')
  np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=1e-5)
  np.testing.assert_allclose(eight['val_loss'], one['val_loss'], rtol=1e-5)


def test_pairs_without_a_target_field_fail_before_compiling(tmp_path, monkeypatch):
  data = tmp_path / 'pairs.jsonl'
  data.write_text(''.join(json.dumps({'source': f'a_{i}', 'english': f'A{i}'}) + '\n'
                          for i in range(20)))
  config = _config('--config.data.source=jsonl', f'--config.data.path={data}')
  compiled = []
  monkeypatch.setattr(trainer, 'build_programs', lambda *a: compiled.append(a))
  with pytest.raises(ConfigError, match=r"record 1 has no 'target' field for the target text "
                                        r".*; set data\.target_key=<field>"):
    trainer.train(config, str(tmp_path / 'run'))
  assert not compiled
  assert not os.path.exists(tmp_path / 'run' / rundir.CONFIG_FILE)   # nothing recorded


@pytest.mark.parametrize('override,message', [
    ('--config.seq2seq.num_beams=0', r'seq2seq\.num_beams=0 must be between 1 \(greedy\) and '
                                     r'the vocabulary size 264'),
    ('--config.seq2seq.num_beams=300', r'seq2seq\.num_beams=300 must be between 1'),
    ('--config.data.source=stdlib', r"objective='seq2seq' trains on \(source, target\) pairs "
                                    r"but data\.source='stdlib'"),
    ('--config.model.arch=decoder', r"objective='seq2seq' trains model\.arch='encoder_decoder' "
                                    r"models but model\.arch='decoder'"),
])
def test_bad_seq2seq_settings_are_one_sentence(override, message):
  with pytest.raises(ConfigError, match=message):
    _config(override)


def test_separate_vocabularies(tmp_path, capsys):
  """seq2seq.shared_vocab=False: the source side has its own sentencepiece tokenizer (trained on
  the sources, kept in the workdir and the exported model) and its own embedding."""
  config = _config('--config.seq2seq.shared_vocab=False', '--config.model.source_vocab_size=320',
                   '--config.seq2seq.source_tokenizer.kind=sentencepiece',
                   '--config.seq2seq.source_tokenizer.vocab_size=320',
                   '--config.seq2seq.eval_pairs=8', '--config.seq2seq.num_beams=1',
                   variant=',steps=60')
  summary = trainer.train(config, str(tmp_path / 'run'))
  rows = [json.loads(line) for line in open(tmp_path / 'run' / 'metrics.jsonl')]
  losses = [r['loss'] for r in rows if 'loss' in r]
  assert summary['complete'] and losses[-1] < losses[0] - 1.0
  source_tok = rundir.load_tokenizer(str(tmp_path / 'run'), rundir.SOURCE_TOKENIZER)
  assert source_tok.vocab_size == 320
  assert rundir.load_tokenizer(str(tmp_path / 'run')).vocab_size == 259
  model_dir = tmp_path / 'run' / 'model'
  assert (model_dir / 'source_tokenizer.model').exists()
  params = rundir.load_params(str(model_dir))
  assert params['source_embed']['embedding'].shape == (320, 64)
  assert params['embed']['embedding'].shape == (264, 64)
  with pytest.raises(ConfigError, match=r'shared_vocab=False needs the source embedding'):
    _config('--config.seq2seq.shared_vocab=False')
  capsys.readouterr()   # the training log
  assert generate.generate_main([f'--model={model_dir}', '--source=read_file_lines',
                                 '--max-new-tokens=32', '--json']) == 0
  record = json.loads(capsys.readouterr().out)
  assert record['source_ids'] == source_tok.encode('read_file_lines') + [source_tok.eos_id]


def test_dropout_trains_and_evaluates(tmp_path):
  """With model.dropout the train step draws dropout masks and validation runs without them."""
  config = _config('--config.model.dropout=0.1', '--config.seq2seq.eval_pairs=4',
                   '--config.seq2seq.num_beams=1', '--config.sample.max_new_tokens=0',
                   variant=',steps=4')
  summary = trainer.train(config, str(tmp_path / 'run'))
  assert summary['complete'] and np.isfinite(summary['val_loss'])
  again = trainer.evaluate_checkpoint(config, str(tmp_path / 'run'))
  assert again['val_loss'] == summary['val_loss']       # deterministic evaluation
