"""Pair data for encoder-decoder models (flaxllm.data.seq2seq): the row layout, truncation,
exact resume, process shards, missing fields and the built-in stdlib tasks."""
import json

import numpy as np
import pytest

from flaxllm.data import instruct, seq2seq, tasks
from flaxllm.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()  # PAD 0, BOS 1, EOS 2, byte b -> b + 3
PAD, BOS, EOS = 0, 1, 2


class ShiftedSpecials(ByteTokenizer):
  """A byte tokenizer whose specials differ from TOK's, to tell the two sides apart."""

  @property
  def pad_id(self):
    return 7

  @property
  def eos_id(self):
    return 8


def _ids(text):
  return TOK.encode(text)


def _write(path, records):
  path.write_text(''.join(json.dumps(r) + '\n' for r in records), encoding='utf-8')
  return path


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
  monkeypatch.setenv('FLAXLLM_CACHE', str(tmp_path / 'cache'))


@pytest.fixture
def numbered(tmp_path):
  """A JSONL file of 30 pairs 'src i' -> 'tgt i', all in the train split."""
  path = _write(tmp_path / 'pairs.jsonl', [{'source': f'src {i}', 'target': f'tgt {i}'}
                                           for i in range(30)])
  return {'source': 'jsonl', 'path': str(path), 'val_fraction': 0.0}


def _source_texts(batch, tok=TOK):
  """Decoded sources of the real rows of a batch."""
  real = batch['source_segment_ids'][:, 0] > 0
  return [tok.decode([int(t) for t in row]) for row in batch['source'][real]]


def test_row_layout_by_hand(tmp_path):
  path = _write(tmp_path / 'p.jsonl', [{'source': 'ab', 'target': 'xyz'}])
  cfg = {'source': 'jsonl', 'path': str(path), 'val_fraction': 0.0}
  it = seq2seq.make_pair_iterator(cfg, TOK, split='train', source_len=5, target_len=6,
                                  batch_size=2, seed=0, num_epochs=1)
  batch = next(it)
  a, b, x, y, z = _ids('abxyz')
  want = {
      'source': [[a, b, EOS, PAD, PAD], [PAD] * 5],
      'source_segment_ids': [[1, 1, 1, 0, 0], [0] * 5],
      'source_positions': [[0, 1, 2, 0, 0], [0] * 5],
      'inputs': [[BOS, x, y, z, PAD, PAD], [PAD] * 6],
      'targets': [[x, y, z, EOS, PAD, PAD], [PAD] * 6],
      'segment_ids': [[1, 1, 1, 1, 0, 0], [0] * 6],
      'positions': [[0, 1, 2, 3, 0, 0], [0] * 6],
      'loss_mask': [[1, 1, 1, 1, 0, 0], [0] * 6],
  }
  assert sorted(batch) == sorted(want)
  for key, value in want.items():
    assert batch[key].dtype == (np.float32 if key == 'loss_mask' else np.int32), key
    np.testing.assert_array_equal(batch[key], value, err_msg=key)
  with pytest.raises(StopIteration):
    next(it)


def test_source_tokenizer_encodes_the_source_and_pads_empty_rows(tmp_path):
  path = _write(tmp_path / 'p.jsonl', [{'source': 'a', 'target': 'b'}])
  cfg = {'source': 'jsonl', 'path': str(path), 'val_fraction': 0.0}
  batch = next(seq2seq.make_pair_iterator(cfg, TOK, split='train', source_len=3, target_len=3,
                                          batch_size=2, seed=0, num_epochs=1,
                                          source_tokenizer=ShiftedSpecials()))
  np.testing.assert_array_equal(batch['source'], [[_ids('a')[0], 8, 7], [7, 7, 7]])
  np.testing.assert_array_equal(batch['targets'], [[_ids('b')[0], EOS, PAD], [PAD] * 3])


def test_truncation_as_stated(tmp_path):
  records = [{'source': 'abcdef', 'target': 'xyz'},  # both cut
             {'source': 'abc', 'target': 'xy'}]      # both fit exactly
  path = _write(tmp_path / 'p.jsonl', records)
  cfg = {'source': 'jsonl', 'path': str(path), 'val_fraction': 0.0, 'shuffle': False}
  batch = next(seq2seq.make_pair_iterator(cfg, TOK, split='train', source_len=4, target_len=3,
                                          batch_size=2, seed=0))
  a, b, c, x, y, z = _ids('abcxyz')
  np.testing.assert_array_equal(batch['source'], [[a, b, c, EOS], [a, b, c, EOS]])
  np.testing.assert_array_equal(batch['inputs'], [[BOS, x, y], [BOS, x, y]])
  np.testing.assert_array_equal(batch['targets'], [[x, y, z], [x, y, EOS]])
  np.testing.assert_array_equal(batch['loss_mask'], np.ones((2, 3)))
  stats = seq2seq.truncation_stats(cfg, TOK, split='train', source_len=4, target_len=3)
  assert stats == dict(pairs=2, source_truncated=1, target_truncated=1, source_tokens=7,
                       target_tokens=4)


def test_exact_resume_across_epochs(numbered):
  kw = dict(split='train', source_len=8, target_len=8, batch_size=4, seed=3)
  full = seq2seq.make_pair_iterator(numbered, TOK, **kw)
  expected = [next(full) for _ in range(20)]  # 80 rows: crosses two epoch boundaries of 30
  rows = sum((_source_texts(b) for b in expected), [])
  assert sorted(rows[:30]) == sorted(rows[30:60]) and rows[:30] != rows[30:60]  # reshuffled
  it = seq2seq.make_pair_iterator(numbered, TOK, **kw)
  for _ in range(7):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  resumed = seq2seq.make_pair_iterator(numbered, TOK, **kw)
  resumed.set_state(state)
  for want in expected[7:]:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  other = seq2seq.make_pair_iterator(numbered, TOK, **{**kw, 'target_len': 9})
  with pytest.raises(ValueError, match='target_len'):
    other.set_state(state)


def test_process_shards_are_disjoint_and_cover_the_global_stream(numbered):
  kw = dict(split='train', source_len=8, target_len=8, batch_size=4, seed=5, num_epochs=1)
  stream = sum((_source_texts(b) for b in seq2seq.make_pair_iterator(numbered, TOK, **kw)), [])
  assert sorted(stream) == sorted(f'src {i}' for i in range(30))
  shards = [sum((_source_texts(b) for b in seq2seq.make_pair_iterator(
      numbered, TOK, process_index=p, process_count=3, **kw)), []) for p in range(3)]
  for p, rows in enumerate(shards):
    assert rows == stream[p::3]
  assert sorted(sum(shards, [])) == sorted(stream)


def test_missing_target_field_names_the_file_and_the_fix(tmp_path):
  path = _write(tmp_path / 'de_en.jsonl', [{'source': 'Hallo', 'en': 'Hello'}])
  cfg = {'source': 'jsonl', 'path': str(path), 'val_fraction': 0.0}
  for call in (lambda: seq2seq.check_pairs(cfg),
               lambda: seq2seq.make_pair_iterator(cfg, TOK, split='train', source_len=8,
                                                  target_len=8, batch_size=2, seed=0)):
    with pytest.raises(instruct.InstructionDataError) as e:
      call()
    msg = str(e.value)
    assert str(path) in msg and "'target'" in msg and 'data.target_key=<field>' in msg
  fixed = {**cfg, 'target_key': 'en'}
  assert seq2seq.check_pairs(fixed) == 1
  assert seq2seq.pairs(fixed, 'train') == [('Hallo', 'Hello')]


@pytest.mark.parametrize('task', sorted(tasks.TASKS))
def test_builtin_tasks_are_deterministic_with_disjoint_splits(task, tmp_path, monkeypatch):
  cfg = {'source': 'stdlib_pairs', 'name': task, 'max_files': 12, 'val_fraction': 0.2}
  records = tasks.generate_task(task, 12)
  assert records == tasks.generate_task(task, 12) and len(records) > 20
  first = open(tasks.task_file(task, 12), encoding='utf-8').read()
  monkeypatch.setenv('FLAXLLM_CACHE', str(tmp_path / 'other_cache'))
  assert open(tasks.task_file(task, 12), encoding='utf-8').read() == first
  assert [json.loads(line) for line in first.splitlines()] == records
  train, val = seq2seq.pairs(cfg, 'train'), seq2seq.pairs(cfg, 'validation')
  assert val and not set(train) & set(val)
  assert sorted(train + val) == sorted((r['source'], r['target']) for r in records)
  assert seq2seq.check_pairs(cfg) == len(records)
  if task == 'snake_to_camel':
    assert ('all_feature_names', 'AllFeatureNames') in train + val
    assert all(s.replace('_', '').lower() == t.lower() for s, t in train + val)


def test_unknown_task_lists_the_tasks():
  with pytest.raises(ValueError, match='snake_to_camel'):
    seq2seq.check_pairs({'source': 'stdlib_pairs', 'name': 'nope'})
