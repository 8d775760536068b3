"""Tests for `flaxllm generate`'s argument checks: every bad argument exits with code 2 and one
error line naming its flag, before any param is loaded (rundir.load_params is replaced by a
function that raises `Loaded`, so reaching it means every check passed)."""
import json
import shutil

import jax
import pytest

from flaxllm import generate as G
from flaxllm import models, rundir
from flaxllm.interop import native


class Loaded(Exception):
  """rundir.load_params was called: every check before it passed."""


@pytest.fixture(scope='module')
def llama_dir(tmp_path_factory):
  """A flaxllm model directory of a random tiny_llama (vocab_size 256, no tokenizer)."""
  cfg = models.presets.get('tiny_llama')
  path = tmp_path_factory.mktemp('llama') / 'model'
  native.save_flaxllm(cfg, models.init_params(models.build(cfg), jax.random.key(0)), str(path))
  return path


def config_dir(path, cfg, **files):
  """A model directory holding only model_config.json for `cfg` (no params) and `files`."""
  path.mkdir()
  (path / native.CONFIG_NAME).write_text(json.dumps(cfg.to_dict()))
  for name, data in files.items():
    (path / name.replace('_json', '.json')).write_text(json.dumps(data))
  return path


@pytest.fixture
def no_load(monkeypatch):
  def load(*args, **kwargs):
    raise Loaded
  monkeypatch.setattr(rundir, 'load_params', load)


def refused(capsys, argv) -> str:
  """The error line of `flaxllm generate argv`, which must exit with code 2 and print argparse's
  usage and that one line on stderr, nothing on stdout."""
  with pytest.raises(SystemExit) as exit_info:
    G.generate_main(argv)
  assert exit_info.value.code == 2
  out = capsys.readouterr()
  assert out.out == '' and 'Traceback' not in out.err
  *usage, error = out.err.strip().splitlines()
  assert usage[0].startswith('usage: flaxllm generate') and 'error:' not in ''.join(usage)
  assert error.startswith('flaxllm generate: error: ')
  return error


@pytest.mark.parametrize('args, message', [
    (['--max-new-tokens', '0'], '--max-new-tokens must be >= 1, got 0.'),
    (['--max-new-tokens=-3'], '--max-new-tokens must be >= 1, got -3.'),
    (['--top-k', '0'], '--top-k must be >= 1'),
    (['--top-k=-2'], '--top-k must be >= 1'),
    (['--top-p', '0'], '--top-p must be in (0, 1]'),
    (['--top-p', '1.5'], '--top-p must be in (0, 1]'),
    (['--top-p=-0.1'], '--top-p must be in (0, 1]'),
    (['--top-p', 'nan'], '--top-p must be in (0, 1]'),
    (['--temperature=-0.5'], '--temperature must be >= 0'),
    (['--temperature', 'nan'], '--temperature must be >= 0'),
    (['--num-beams', '0'], '--num-beams must be >= 1, got 0.'),
    (['--num-beams', '300'], 'num_beams=300 exceeds the vocabulary (model.vocab_size=256)'),
    (['--prompt-ids', '1,x'], "--prompt-ids='1,x' holds 'x', which is not an integer"),
    (['--prompt-ids', '1.5'], "--prompt-ids='1.5' holds '1.5', which is not an integer"),
    (['--prompt-ids', '1,,2'], "--prompt-ids='1,,2' holds an empty id"),
    (['--prompt-ids', ''], "--prompt-ids='' holds an empty id"),
    (['--prompt-ids', ','], "--prompt-ids=',' holds an empty id"),
    (['--stop-ids', 'eos'], "--stop-ids='eos' holds 'eos', which is not an integer"),
    (['--stop-ids', '2,,3'], "--stop-ids='2,,3' holds an empty id"),
    (['--prompt-ids', '1,256'],
     "--prompt-ids holds the id 256, outside the model's vocabulary [0, 256); use ids from 0 to "
     '255.'),
    (['--prompt-ids=-1,2'], "--prompt-ids holds the id -1, outside the model's vocabulary"),
    (['--stop-ids', '2,999'], "--stop-ids holds the id 999, outside the model's vocabulary"),
    (['--pad-id', '256'], "--pad-id holds the id 256, outside the model's vocabulary"),
    (['--pad-id=-1'], "--pad-id holds the id -1, outside the model's vocabulary"),
    (['--bos-id', '256'], "--bos-id holds the id 256, outside the model's vocabulary"),
    (['--source-ids', '1,2'], 'is a decoder-only model: pass its input with --prompt'),
    (['--tokenizer', '/no/such/sp.model'],
     "--tokenizer='/no/such/sp.model' is not a readable sentencepiece model"),
])
def test_a_bad_argument_is_refused_before_loading(llama_dir, no_load, capsys, args, message):
  argv = ['--model', str(llama_dir), *args]
  if not any(a.startswith(('--prompt-ids', '--source-ids')) for a in args):
    argv += ['--prompt-ids', '1,2']
  assert message in refused(capsys, argv)


def test_good_arguments_reach_the_params(llama_dir, no_load):
  with pytest.raises(Loaded):
    G.generate_main(['--model', str(llama_dir), '--prompt-ids', '0, 255', '--prompt-ids', '7',
                     '--stop-ids', '255', '--pad-id', '255', '--top-k', '256', '--top-p', '1',
                     '--temperature', '0.7', '--max-new-tokens', '1'])


def test_no_input_and_a_missing_model(tmp_path, capsys):
  assert '--prompt-ids' in refused(capsys, ['--model', str(tmp_path)])
  error = refused(capsys, ['--model', str(tmp_path / 'none'), '--prompt-ids', '1'])
  assert f"--model='{tmp_path / 'none'}' does not exist" in error


def test_a_tokenizer_larger_than_the_vocabulary(tmp_path, no_load, capsys):
  path = config_dir(tmp_path / 'model', models.presets.get('tiny_llama'),
                    tokenizer_json={'kind': 'bytes'})
  error = refused(capsys, ['--model', str(path), '--prompt', 'hi'])
  assert "the tokenizer has 259 tokens but the model's vocab_size is 256" in error
  assert '--tokenizer' in error


def test_learned_positions(tmp_path, no_load, capsys):
  path = config_dir(tmp_path / 'model', models.presets.get('tiny_gpt2'))   # max_seq_len 128
  error = refused(capsys, ['--model', str(path), '--prompt-ids', '1,2,3',
                           '--max-new-tokens', '126'])
  assert 'the longest prompt (3) + max_new_tokens (126) exceeds model.max_seq_len=128' in error
  with pytest.raises(Loaded):
    G.generate_main(['--model', str(path), '--prompt-ids', '1,2,3', '--max-new-tokens', '125'])


@pytest.mark.parametrize('args, message', [
    (['--source-ids', '1,40', '--bos-id', '1'],
     "--source-ids holds the id 40, outside the model's source vocabulary [0, 40)"),
    (['--source-ids', '1,2', '--bos-id', '32'],
     "--bos-id holds the id 32, outside the model's vocabulary [0, 32)"),
    (['--source-ids', '1,2', '--bos-id', '1', '--stop-ids', '32'],
     "--stop-ids holds the id 32, outside the model's vocabulary [0, 32)"),
    (['--source-ids', '1,2', '--bos-id', '1', '--pad-id', '35'],
     "--pad-id holds the id 35, outside the model's vocabulary [0, 32)"),
    (['--source-ids', '1,2'], 'an encoder-decoder model needs --bos-id'),
    (['--prompt-ids', '1,2', '--bos-id', '1'], 'is an encoder-decoder model: pass its input with '
                                               '--source'),
    (['--source-ids', '1,2', '--bos-id', '1', '--num-beams', '33'], 'num_beams=33 exceeds'),
])
def test_encoder_decoder_arguments(tmp_path, no_load, capsys, args, message):
  cfg = models.presets.get('tiny_transformer', source_vocab_size=40)   # target vocab_size 32
  path = config_dir(tmp_path / 'model', cfg)
  assert message in refused(capsys, ['--model', str(path), *args])
  with pytest.raises(Loaded):   # source ids up to 39
    G.generate_main(['--model', str(path), '--source-ids', '39,35', '--bos-id', '31'])


def test_params_that_do_not_match_the_config(llama_dir, tmp_path, capsys):
  """The real rundir.load_params: a directory without params/, and params of 2 layers under a
  config of 3."""
  cfg = models.presets.get('tiny_llama', num_layers=3)
  bare = config_dir(tmp_path / 'bare', cfg)
  assert f"--model='{bare}' cannot be loaded" in refused(
      capsys, ['--model', str(bare), '--prompt-ids', '1,2'])
  mismatched = config_dir(tmp_path / 'mismatched', cfg)
  shutil.copytree(llama_dir / native.PARAMS_DIR, mismatched / native.PARAMS_DIR)
  assert '--model' in refused(capsys, ['--model', str(mismatched), '--prompt-ids', '1,2'])
