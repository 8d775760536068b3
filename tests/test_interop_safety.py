"""Model directories are written without losing a user's files and read with bounded trust:
`flaxllm convert` refuses a destination flaxllm did not write (unless --overwrite, which
replaces it whole), replaces a previous export of its kind whole, and a failure half way
leaves the old destination intact; a Hugging Face checkpoint whose config.json disagrees with
its tensors' headers, whose index points outside its directory, or whose files are truncated
or malformed fails in one sentence naming the file, fast and without big allocations; a
flaxllm model directory whose params do not match model_config.json is refused.

Checkpoints are tiny random models written by flaxllm itself (no torch needed): a Hugging Face
directory "from elsewhere" is a `hf.save` output without flaxllm's marker."""
from __future__ import annotations

import json
import os
import re
import time
import tracemalloc

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import flaxllm.models as M
from flaxllm.interop import hf, native
from flaxllm.interop.hf import HFInteropError
from flaxllm.interop.native import ModelDirError

CFG = M.presets.get('tiny_llama')
# The exceptions `flaxllm.cli.run` prints as one `error:` line.
USER_ERRORS = (ValueError, FileNotFoundError, PermissionError)


@pytest.fixture(scope='module')
def params():
  abstract = jax.eval_shape(lambda: M.init_params(M.build(CFG), jax.random.key(0)))
  rng = np.random.RandomState(0)
  return jax.tree.map(lambda a: (0.1 * rng.standard_normal(a.shape)).astype(a.dtype), abstract)


def _foreign_hf(params, path, **save_kwargs) -> str:
  """A Hugging Face directory as transformers writes it (config.json, weights,
  generation_config.json), not marked as a flaxllm export."""
  hf.save(CFG, params, str(path), **save_kwargs)
  os.remove(path / hf.EXPORT_MARKER)
  (path / 'generation_config.json').write_text('{"do_sample": false}')
  return str(path)


def _tree(path) -> dict:
  """{relative file path: bytes} of everything under `path`."""
  out = {}
  for base, _, files in os.walk(path):
    for f in files:
      full = os.path.join(base, f)
      with open(full, 'rb') as fh:
        out[os.path.relpath(full, path)] = fh.read()
  return out


def _raises_one_sentence(fn, match, cls=HFInteropError):
  with pytest.raises(cls, match=match) as info:
    fn()
  assert isinstance(info.value, USER_ERRORS) and '\n' not in str(info.value)
  return str(info.value)


# ------------------------------------------------------------------------------ destinations

@pytest.mark.parametrize('direction', ['to_flaxllm', 'to_hf'])
def test_convert_refuses_a_directory_it_did_not_write(params, tmp_path, direction):
  src_hf = _foreign_hf(params, tmp_path / 'src_hf')
  native.save_flaxllm(CFG, params, str(tmp_path / 'src_fl'))
  dst = tmp_path / 'dst'
  dst.mkdir()
  (dst / 'notes.txt').write_bytes(b'my notes\x00\xff')
  before = _tree(dst)
  argv = (['--from-hf', src_hf, '--to', str(dst)] if direction == 'to_flaxllm' else
          ['--from', str(tmp_path / 'src_fl'), '--to-hf', str(dst)])
  msg = _raises_one_sentence(lambda: hf.convert_main(argv), r'is not empty \(notes\.txt\) and is '
                             r'not a flaxllm .* export; .*pass --overwrite', ModelDirError)
  assert str(dst) in msg
  assert _tree(dst) == before
  assert sorted(os.listdir(tmp_path)) == ['dst', 'src_fl', 'src_hf']  # nothing staged beside
  # The other kind's export is not "the same kind" either.
  other = tmp_path / 'src_hf' if direction == 'to_flaxllm' else tmp_path / 'src_fl'
  other_before = _tree(other)
  argv[-1] = str(other)
  with pytest.raises(ModelDirError, match='is not a flaxllm'):
    hf.convert_main(argv)
  assert _tree(other) == other_before


def test_overwrite_replaces_the_whole_directory(params, tmp_path):
  src_hf = _foreign_hf(params, tmp_path / 'src_hf')
  # A sharded foreign HF model plus a user file, replaced by a flaxllm model dir ...
  dst = tmp_path / 'dst'
  _foreign_hf(params, dst, max_shard_size='60KB')
  (dst / 'notes.txt').write_text('mine')
  assert hf.INDEX_NAME in os.listdir(dst)
  assert hf.convert_main(['--from-hf', src_hf, '--to', str(dst), '--overwrite']) == 0
  assert sorted(os.listdir(dst)) == [native.CONFIG_NAME, native.PARAMS_DIR]
  # ... and that by an HF export: no old shard, index, generation config or params stay.
  (dst / 'notes.txt').write_text('mine')
  assert hf.convert_main(['--from', str(dst), '--to-hf', str(dst), '--overwrite']) == 0
  assert sorted(os.listdir(dst)) == [hf.CONFIG_NAME, hf.EXPORT_MARKER, hf.WEIGHTS_NAME]
  assert sorted(os.listdir(tmp_path)) == ['dst', 'src_hf']
  cfg, loaded = hf.load(str(dst))
  assert cfg == CFG
  jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_previous_export_of_the_same_kind_is_replaced_without_overwrite(params, tmp_path):
  src_hf = _foreign_hf(params, tmp_path / 'src_hf')
  fl = tmp_path / 'fl'
  for _ in range(2):
    assert hf.convert_main(['--from-hf', src_hf, '--to', str(fl)]) == 0
  # A run's exported model holds its tokenizer too (flaxllm.rundir.export_model).
  (fl / 'tokenizer.json').write_text('{"kind": "bytes"}')
  native.save_flaxllm(CFG, params, str(fl))
  assert sorted(os.listdir(fl)) == [native.CONFIG_NAME, native.PARAMS_DIR]
  out = tmp_path / 'hf_out'
  assert hf.convert_main(['--from', str(fl), '--to-hf', str(out), '--max-shard-size',
                          '60KB']) == 0
  assert hf.INDEX_NAME in os.listdir(out)
  assert hf.convert_main(['--from', str(fl), '--to-hf', str(out)]) == 0
  assert sorted(os.listdir(out)) == [hf.CONFIG_NAME, hf.EXPORT_MARKER, hf.WEIGHTS_NAME]
  # A user's file in a previous export makes it theirs: refused, kept.
  (out / 'README.md').write_text('mine')
  with pytest.raises(ModelDirError, match=r'README\.md'):
    hf.save(CFG, params, str(out))
  assert (out / 'README.md').read_text() == 'mine'


def test_a_failure_half_way_leaves_the_old_destination_intact(params, tmp_path, monkeypatch):
  fl, out = tmp_path / 'fl', tmp_path / 'hf'
  native.save_flaxllm(CFG, params, str(fl))
  hf.save(CFG, params, str(out), max_shard_size='60KB')
  before_fl, before_hf = _tree(fl), _tree(out)
  real_save_file, calls = hf.save_file, []

  def fail_on_second_shard(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
      raise OSError('No space left on device')
    real_save_file(*args, **kwargs)
  monkeypatch.setattr(hf, 'save_file', fail_on_second_shard)
  with pytest.raises(OSError, match='No space left'):
    hf.save(CFG, params, str(out), max_shard_size='60KB')

  def disk_full(*args, **kwargs):
    raise OSError('No space left on device')
  monkeypatch.setattr(ocp.StandardCheckpointer, 'save', disk_full)
  with pytest.raises(OSError, match='No space left'):
    native.save_flaxllm(CFG, params, str(fl))
  assert _tree(fl) == before_fl and _tree(out) == before_hf
  assert sorted(os.listdir(tmp_path)) == ['fl', 'hf']  # no staging directory left behind


# ------------------------------------------------------------------------------ bounded trust

@pytest.fixture(scope='module')
def hf_dir(params, tmp_path_factory):
  return _foreign_hf(params, tmp_path_factory.mktemp('hf_src'))


def _with_config(src, dst, **fields):
  """A copy of the checkpoint `src` (hard links) in `dst` with config.json `fields` changed."""
  os.makedirs(dst)
  for f in os.listdir(src):
    os.link(os.path.join(src, f), os.path.join(dst, f))
  cfg = json.loads((dst / hf.CONFIG_NAME).read_text())
  os.remove(dst / hf.CONFIG_NAME)  # a hard link to the source's
  (dst / hf.CONFIG_NAME).write_text(json.dumps(dict(cfg, **fields)))
  return str(dst)


@pytest.mark.parametrize('fields, match', [
    (dict(num_hidden_layers=2_000_000), r'the config gives 2000000 layers but the weights in '
     r".* hold 2; use the config\.json"),
    (dict(vocab_size=10**12), r"'model\.embed_tokens\.weight' has shape \(256, 64\)"),
    (dict(hidden_size=2**30, head_dim=None), r"'model\.embed_tokens\.weight' has shape"),
    (dict(intermediate_size=10**10), r"'model\.layers\.0\.mlp\.gate_proj\.weight' has shape"),
    (dict(num_attention_heads=2**20, num_key_value_heads=2**20, head_dim=64),
     r"'model\.layers\.0\.self_attn\.q_proj\.weight' has shape"),
])
def test_absurd_config_sizes_are_refused_fast_without_allocating(hf_dir, tmp_path, fields,
                                                                  match):
  path = _with_config(hf_dir, tmp_path / 'bad', **fields)
  for scan in (False, True):
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(HFInteropError, match=match):
      hf.load(path, scan_layers=scan)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert seconds < 1.0, f'{fields}: refused after {seconds:.2f}s'
    assert peak < 5 * 2**20, f'{fields}: {peak / 2**20:.1f} MiB allocated before refusing'


def test_config_fields_of_the_wrong_type(hf_dir, tmp_path):
  path = _with_config(hf_dir, tmp_path / 'bad', hidden_size=None)
  _raises_one_sentence(lambda: hf.load(path), r'config\.json for LlamaForCausalLM has a field of '
                       r'the wrong type or value')
  path = _with_config(hf_dir, tmp_path / 'zero', num_attention_heads=0)
  _raises_one_sentence(lambda: hf.load(path), r'wrong type or value')


@pytest.fixture
def sharded(params, tmp_path):
  path = tmp_path / 'sharded'
  _foreign_hf(params, path, max_shard_size='60KB')
  return path


def _rewrite_index(path, shard, new_name):
  index_path = path / hf.INDEX_NAME
  index = json.loads(index_path.read_text())
  index['weight_map'] = {k: (new_name if v == shard else v)
                         for k, v in index['weight_map'].items()}
  index_path.write_text(json.dumps(index))


def test_index_paths_must_stay_inside_the_directory(sharded, tmp_path):
  shard = json.loads((sharded / hf.INDEX_NAME).read_text())['weight_map']['lm_head.weight']
  os.rename(sharded / shard, tmp_path / 'outside.safetensors')
  outside = r'lies outside that directory .*; keep a checkpoint.s weight files inside'
  for name in ('../outside.safetensors', str(tmp_path / 'outside.safetensors')):
    _rewrite_index(sharded, shard, name)
    _raises_one_sentence(lambda: hf.load(str(sharded)), outside)
    shard = name
  os.symlink(tmp_path / 'outside.safetensors', sharded / 'linked.safetensors')
  _rewrite_index(sharded, shard, 'linked.safetensors')
  _raises_one_sentence(lambda: hf.load(str(sharded)), outside)


def test_hub_cache_snapshot_links_into_its_blobs_are_inside(hf_dir, tmp_path):
  repo = tmp_path / 'models--org--tiny'
  snapshot = repo / 'snapshots' / 'abc123'
  os.makedirs(repo / 'blobs')
  os.makedirs(snapshot)
  for i, f in enumerate(os.listdir(hf_dir)):
    os.link(os.path.join(hf_dir, f), repo / 'blobs' / f'blob{i}')
    os.symlink(f'../../blobs/blob{i}', snapshot / f)
  assert hf.load(str(snapshot))[0] == CFG


def test_missing_truncated_and_malformed_weight_files(sharded, params, tmp_path):
  shards = sorted(f for f in os.listdir(sharded) if f.endswith('.safetensors'))
  last = sharded / shards[-1]
  data = last.read_bytes()
  last.write_bytes(data[:-100])
  msg = _raises_one_sentence(lambda: hf.load(str(sharded)), r'is not a valid safetensors file '
                             r"\(truncated: tensor .* ends at byte")
  assert str(last) in msg
  last.write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00not json' + bytes(100))
  _raises_one_sentence(lambda: hf.load(str(sharded)), rf'{re.escape(str(last))}.*header is not '
                       'JSON')
  last.write_bytes(data[:5])
  _raises_one_sentence(lambda: hf.load(str(sharded)), rf'{re.escape(str(last))}.*shorter than')
  os.remove(last)
  _raises_one_sentence(lambda: hf.load(str(sharded)),
                       rf"weight shard '{shards[-1]}' listed in .* is missing", FileNotFoundError)
  # A header whose shape disagrees with its byte range.
  single = tmp_path / 'single'
  _foreign_hf(params, single)
  raw = (single / hf.WEIGHTS_NAME).read_bytes()
  n = int.from_bytes(raw[:8], 'little')
  header = json.loads(raw[8:8 + n])
  header['model.norm.weight']['shape'] = [10**9]
  blob = json.dumps(header).encode()
  (single / hf.WEIGHTS_NAME).write_bytes(len(blob).to_bytes(8, 'little') + blob + raw[8 + n:])
  _raises_one_sentence(lambda: hf.load(str(single)),
                       r"tensor 'model\.norm\.weight' of shape \(1000000000,\) spans 256 bytes")


def test_malformed_json_names_its_file(sharded, params, tmp_path):
  (sharded / hf.INDEX_NAME).write_text('{"weight_map": ')
  _raises_one_sentence(lambda: hf.load(str(sharded)),
                       rf'{re.escape(str(sharded / hf.INDEX_NAME))} is not valid JSON')
  (sharded / hf.INDEX_NAME).write_text('{"weight_map": {"a": 3}}')
  _raises_one_sentence(lambda: hf.load(str(sharded)), r'has no weight_map of tensor names')
  (sharded / hf.CONFIG_NAME).write_bytes(b'{"x": "\xff"}')
  _raises_one_sentence(lambda: hf.load(str(sharded)),
                       rf'{re.escape(str(sharded / hf.CONFIG_NAME))} is not valid JSON')
  (sharded / hf.CONFIG_NAME).write_text('[1, 2]')
  _raises_one_sentence(lambda: hf.read_hf_config(str(sharded)), r'holds a JSON list, not an '
                       'object')
  fl = tmp_path / 'fl'
  native.save_flaxllm(CFG, params, str(fl))
  (fl / native.CONFIG_NAME).write_text('{"d_model": 64,')
  _raises_one_sentence(lambda: native.load_flaxllm(str(fl)),
                       rf'{re.escape(str(fl / native.CONFIG_NAME))} is not valid JSON',
                       ModelDirError)
  (fl / native.CONFIG_NAME).write_text('{"d_model": "wide"}')
  _raises_one_sentence(lambda: native.load_flaxllm(str(fl)),
                       rf'{re.escape(str(fl / native.CONFIG_NAME))} is not a valid model config',
                       ModelDirError)
  # Through the command: the same sentence.
  _raises_one_sentence(lambda: hf.convert_main(['--from', str(fl), '--to-hf',
                                                str(tmp_path / 'out')]),
                       'is not a valid model config', ModelDirError)


def test_flaxllm_model_dir_params_must_match_its_config(params, tmp_path):
  fl = tmp_path / 'fl'
  native.save_flaxllm(CFG, params, str(fl))
  cfg_path = fl / native.CONFIG_NAME
  stored = json.loads(cfg_path.read_text())
  cfg_path.write_text(json.dumps(dict(stored, mlp_dim=256)))
  _raises_one_sentence(lambda: native.load_flaxllm(str(fl)),
                       rf'{re.escape(str(fl / native.PARAMS_DIR))} does not match '
                       rf"{re.escape(str(cfg_path))}: param "
                       r"'decoder/layers_0/mlp/down_proj/kernel' is \(128, 64\) where the config "
                       r'gives \(256, 64\)', ModelDirError)
  cfg_path.write_text(json.dumps(dict(stored, num_layers=3)))
  _raises_one_sentence(lambda: native.load_flaxllm(str(fl)),
                       r"param 'decoder/layers_2/.*' is missing where the config gives",
                       ModelDirError)
  cfg_path.write_text(json.dumps(stored))
  cfg, loaded = native.load_flaxllm(str(fl))
  assert cfg == CFG
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  # Damaged array data (the largest file orbax wrote, truncated).
  largest = max((os.path.join(base, f) for base, _, files in os.walk(fl / native.PARAMS_DIR)
                 for f in files), key=os.path.getsize)
  os.truncate(largest, 100)
  _raises_one_sentence(lambda: native.load_flaxllm(str(fl)),
                       r'params holds damaged array data; export or convert', ModelDirError)
