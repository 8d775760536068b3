"""Preference data (flaxllm.data.preference): paired, unpaired (KTO) and prompt rows laid out by
hand, chat prompts formatted as SFT chat data, the truncation policy, refused records,
chosen == rejected pairs, exact resume, process shards and record kinds."""
import json
import logging

import numpy as np
import pytest

from flaxllm.data import instruct, pipeline, preference
from flaxllm.data.tokenizer import ByteTokenizer
from flaxllm.generate import left_pad

TOK = ByteTokenizer()  # PAD 0, BOS 1, EOS 2, byte b -> b + 3
PAD, BOS, EOS = 0, 1, 2
ITERATORS = {'paired': preference.make_preference_iterator,
             'unpaired': preference.make_unpaired_iterator,
             'prompts': preference.make_prompt_iterator}
NUMBERED = {
    'paired': lambda i: {'prompt': f'p{i}', 'chosen': f'c{i}', 'rejected': f'r{i}'},
    'unpaired': lambda i: {'prompt': f'p{i}', 'completion': f'c{i}', 'label': i % 3 == 0},
    'prompts': lambda i: {'prompt': f'p{i}', 'answer': str(i)},
}


def _ids(text):
  return TOK.encode(text)


def _write(path, records):
  path.write_text(''.join(json.dumps(r) + '\n' for r in records), encoding='utf-8')
  return {'source': 'jsonl', 'path': str(path), 'val_fraction': 0.0, 'shuffle': False}


def _check(batch, want):
  assert sorted(batch) == sorted(want)
  for key, value in want.items():
    np.testing.assert_array_equal(batch[key], value, err_msg=key)


def _row_texts(batch):
  """The decoded first sequence of every real row of a batch of any kind."""
  if 'prompt_index' in batch:
    rows = batch['prompt_tokens'][batch['prompt_index'] >= 0]
  else:
    key = 'chosen_inputs' if 'chosen_inputs' in batch else 'inputs'
    rows = batch[key][batch[key.replace('inputs', 'segment_ids')][:, 0] > 0]
  return [TOK.decode([int(t) for t in row]) for row in rows]


def test_string_pair_layout_by_hand(tmp_path):
  cfg = _write(tmp_path / 'p.jsonl', [{'prompt': 'ab', 'chosen': 'xy', 'rejected': 'z'}])
  it = preference.make_preference_iterator(cfg, TOK, split='train', seq_len=6, batch_size=2,
                                           seed=0, num_epochs=1)
  batch = next(it)
  a, b, x, y, z = _ids('abxyz')
  _check(batch, {
      'chosen_inputs': [[BOS, a, b, x, y, PAD], [PAD] * 6],
      'chosen_targets': [[a, b, x, y, EOS, PAD], [PAD] * 6],
      'chosen_loss_mask': [[0, 0, 1, 1, 1, 0], [0] * 6],
      'chosen_segment_ids': [[1, 1, 1, 1, 1, 0], [0] * 6],
      'chosen_positions': [[0, 1, 2, 3, 4, 0], [0] * 6],
      'rejected_inputs': [[BOS, a, b, z, PAD, PAD], [PAD] * 6],
      'rejected_targets': [[a, b, z, EOS, PAD, PAD], [PAD] * 6],
      'rejected_loss_mask': [[0, 0, 1, 1, 0, 0], [0] * 6],
      'rejected_segment_ids': [[1, 1, 1, 1, 0, 0], [0] * 6],
      'rejected_positions': [[0, 1, 2, 3, 0, 0], [0] * 6],
  })
  for key, value in batch.items():
    assert value.dtype == (np.float32 if key.endswith('loss_mask') else np.int32), key
  with pytest.raises(StopIteration):
    next(it)


def test_chat_pair_is_formatted_as_sft_chat_data(tmp_path):
  prompt = [{'role': 'system', 'content': 'S'}, {'role': 'user', 'content': 'hi'}]
  cfg = _write(tmp_path / 'p.jsonl', [{'prompt': prompt,
                                       'chosen': [{'role': 'assistant', 'content': 'yo'}],
                                       'rejected': 'no'}])
  batch = next(preference.make_preference_iterator(cfg, TOK, split='train', seq_len=64,
                                                   batch_size=1, seed=0, max_prompt_len=48))
  for side, answer in (('chosen', 'yo'), ('rejected', 'no')):
    sft = pipeline.document_to_example(instruct.chat_document(
        TOK, {'messages': [*prompt, {'role': 'assistant', 'content': answer}]}))
    n = int(batch[f'{side}_segment_ids'].sum())
    for key in ('inputs', 'targets', 'loss_mask'):  # SFT's untrained footer after EOS is left out
      np.testing.assert_array_equal(batch[f'{side}_{key}'][0, :n], sft[key][:n], err_msg=key)
    assert sft['loss_mask'][n:].sum() == 0
    assert batch[f'{side}_targets'][0, n - 1] == EOS
    trained = batch[f'{side}_targets'][0][batch[f'{side}_loss_mask'][0] > 0]
    assert TOK.decode([int(t) for t in trained]) == answer
  context = batch['chosen_inputs'][0, :np.argmax(batch['chosen_loss_mask'][0]) + 1]
  assert context[0] == BOS and TOK.decode([int(t) for t in context]) == (
      '### System:\nS\n\n### User:\nhi\n\n### Assistant:\n')
  mine = next(preference.make_prompt_iterator({**cfg, 'template': '<{role}>{content}</{role}>'},
                                              TOK, split='train', seq_len=64, batch_size=1,
                                              seed=0, max_prompt_len=48))  # data.template
  assert TOK.decode([int(t) for t in mine['prompt_tokens'][0]]) == (
      '<system>S</system><user>hi</user><assistant>')


def test_truncation_as_stated(tmp_path):
  cfg = _write(tmp_path / 'p.jsonl', [{'prompt': 'abcdefgh', 'chosen': 'xyz',
                                       'rejected': 'uvwxyz'}])
  kw = dict(split='train', seq_len=8, batch_size=1, seed=0)
  batch = next(preference.make_preference_iterator(cfg, TOK, **kw))  # max_prompt_len 8 // 2
  f, g, h, u, v, w, x, y, z = _ids('fghuvwxyz')
  _check({k: v for k, v in batch.items() if 'inputs' in k or 'targets' in k or 'mask' in k}, {
      # the prompt keeps BOS and its last 3 tokens; the chosen response fits with its EOS
      'chosen_inputs': [[BOS, f, g, h, x, y, z, PAD]],
      'chosen_targets': [[f, g, h, x, y, z, EOS, PAD]],
      'chosen_loss_mask': [[0, 0, 0, 1, 1, 1, 1, 0]],
      # the rejected response is cut from the right to the 5 tokens left: no EOS
      'rejected_inputs': [[BOS, f, g, h, u, v, w, x]],
      'rejected_targets': [[f, g, h, u, v, w, x, y]],
      'rejected_loss_mask': [[0, 0, 0, 1, 1, 1, 1, 1]],
  })
  assert preference.truncation_stats(cfg, TOK, split='train', seq_len=8) == dict(
      records=1, prompt_truncated=1, response_truncated=1, prompt_tokens=9, response_tokens=7,
      identical=0)
  chat = [{'role': 'user', 'content': 'a long question'}]
  cut = next(preference.make_prompt_iterator(_write(tmp_path / 'c.jsonl', [{'prompt': chat}]),
                                             TOK, **{**kw, 'seq_len': 24}))['prompt_tokens'][0]
  assert cut[0] == BOS and TOK.decode([int(t) for t in cut[1:]]) == 'Assistant:\n'
  with pytest.raises(ValueError, match=r'max_prompt_len=9 must be in \[1, seq_len=8\]'):
    preference.make_preference_iterator(cfg, TOK, max_prompt_len=9, **kw)


@pytest.mark.parametrize('empty', ['', [{'role': 'assistant', 'content': ''}]])
def test_empty_response_is_refused_naming_the_file_record_and_fix(tmp_path, empty):
  path = tmp_path / 'prefs.jsonl'
  cfg = _write(path, [{'prompt': 'p', 'chosen': 'a', 'rejected': 'b'},
                      {'prompt': 'p', 'chosen': 'a', 'rejected': empty}])
  for call in (lambda: preference.check_records(cfg, 'paired'),
               lambda: preference.make_preference_iterator(cfg, TOK, split='train', seq_len=8,
                                                           batch_size=1, seed=0)):
    with pytest.raises(preference.PreferenceDataError) as e:
      call()
    assert str(e.value) == (f"{path} record 2 has an empty 'rejected' response, so nothing of it "
                            "would be trained on; drop the record or write the response.")


def test_identical_pairs_are_kept_warned_about_and_counted(tmp_path, caplog):
  cfg = _write(tmp_path / 'p.jsonl', [{'prompt': 'p', 'chosen': 'same', 'rejected': 'same'},
                                      {'prompt': 'p', 'chosen': 'abcX', 'rejected': 'abcY'},
                                      {'prompt': 'p', 'chosen': 'a', 'rejected': 'b'}])
  with caplog.at_level(logging.WARNING, logger='flaxllm.data.preference'):
    batch = next(preference.make_preference_iterator(cfg, TOK, split='train', seq_len=4,
                                                     batch_size=3, seed=0))
  assert '1 of 3 pairs' in caplog.text and 'chosen equal to rejected' in caplog.text
  for key in ('inputs', 'targets', 'loss_mask'):
    np.testing.assert_array_equal(batch[f'chosen_{key}'][0], batch[f'rejected_{key}'][0])
  # 'abcX' and 'abcY' differ only after the cut at seq_len=4, so their rows are equal too.
  assert preference.truncation_stats(cfg, TOK, split='train', seq_len=4)['identical'] == 2
  assert preference.truncation_stats(cfg, TOK, split='train', seq_len=8)['identical'] == 1


def test_unpaired_rows_carry_labels(tmp_path):
  path = tmp_path / 'kto.jsonl'
  cfg = _write(path, [{'prompt': 'ab', 'completion': 'x', 'label': True},
                      {'prompt': 'c', 'completion': [{'role': 'assistant', 'content': 'yz'}],
                       'label': False}])
  batch = next(preference.make_unpaired_iterator(cfg, TOK, split='train', seq_len=5,
                                                 batch_size=3, seed=0, num_epochs=1,
                                                 max_prompt_len=3))
  a, b, c, x, y, z = _ids('abcxyz')
  _check(batch, {
      'inputs': [[BOS, a, b, x, PAD], [BOS, c, y, z, PAD], [PAD] * 5],
      'targets': [[a, b, x, EOS, PAD], [c, y, z, EOS, PAD], [PAD] * 5],
      'loss_mask': [[0, 0, 1, 1, 0], [0, 1, 1, 1, 0], [0] * 5],
      'segment_ids': [[1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [0] * 5],
      'positions': [[0, 1, 2, 3, 0], [0, 1, 2, 3, 0], [0] * 5],
      'label': [1.0, 0.0, 0.0],
  })
  assert batch['label'].dtype == np.float32 and batch['loss_mask'].dtype == np.float32
  _write(path, [{'prompt': 'ab', 'completion': 'x', 'label': 'yes'}])
  with pytest.raises(preference.PreferenceDataError,
                     match=r"kto.jsonl record 1 has label 'yes'; write the label as true"):
    preference.make_unpaired_iterator(cfg, TOK, split='train', seq_len=5, batch_size=1, seed=0)


def test_prompt_rows_are_left_padded_for_generate_and_index_the_records(tmp_path):
  chat = [{'role': 'user', 'content': 'q'}]
  cfg = _write(tmp_path / 'rl.jsonl', [{'prompt': 'abc', 'answer': '1'},
                                       {'prompt': chat, 'answer': '2'}])
  batch = next(preference.make_prompt_iterator(cfg, TOK, split='train', seq_len=80,
                                               batch_size=3, seed=0, num_epochs=1))
  rows = [[BOS, *_ids('abc')], [BOS, *_ids('### User:\nq\n\n### Assistant:\n')],
          [BOS]]  # the padding row: only BOS, in the last column
  tokens, mask = left_pad(rows, PAD, length=40)
  _check(batch, {'prompt_tokens': tokens, 'prompt_mask': mask, 'prompt_index': [0, 1, -1]})
  assert batch['prompt_mask'].dtype == bool and batch['prompt_tokens'].dtype == np.int32
  records = preference.prompts(cfg, 'train')
  assert [records[i]['answer'] for i in batch['prompt_index'][:2]] == ['1', '2']
  paired = _write(tmp_path / 'pairs.jsonl', [NUMBERED['paired'](7)])  # any kind has prompts
  assert _row_texts(next(preference.make_prompt_iterator(
      paired, TOK, split='train', seq_len=8, batch_size=1, seed=0))) == ['p7']


@pytest.mark.parametrize('kind', sorted(ITERATORS))
def test_exact_resume_across_epochs(tmp_path, kind):
  cfg = {**_write(tmp_path / 'd.jsonl', [NUMBERED[kind](i) for i in range(30)]), 'shuffle': True}
  kw = dict(split='train', seq_len=8, batch_size=4, seed=3)
  make = ITERATORS[kind]
  full = make(cfg, TOK, **kw)
  expected = [next(full) for _ in range(20)]  # 80 rows: crosses two epoch boundaries of 30
  rows = sum((_row_texts(b) for b in expected), [])
  assert sorted(rows[:30]) == sorted(rows[30:60]) and rows[:30] != rows[30:60]  # reshuffled
  it = make(cfg, TOK, **kw)
  for _ in range(7):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  resumed = make(cfg, TOK, **kw)
  resumed.set_state(state)
  for want in expected[7:]:
    _check(next(resumed), want)
  with pytest.raises(ValueError, match='max_prompt_len'):
    make(cfg, TOK, max_prompt_len=3, **kw).set_state(state)


@pytest.mark.parametrize('kind', sorted(ITERATORS))
def test_process_shards_are_disjoint_and_cover_the_global_stream(tmp_path, kind):
  cfg = {**_write(tmp_path / 'd.jsonl', [NUMBERED[kind](i) for i in range(30)]), 'shuffle': True}
  kw = dict(split='train', seq_len=8, batch_size=4, seed=5, num_epochs=1)
  make = ITERATORS[kind]
  stream = sum((_row_texts(b) for b in make(cfg, TOK, **kw)), [])
  assert sorted(stream) == sorted(f'p{i}' + ('' if kind == 'prompts' else f'c{i}')
                                  for i in range(30))
  shards = [sum((_row_texts(b) for b in make(cfg, TOK, process_index=p, process_count=3, **kw)),
                []) for p in range(3)]
  for p, rows in enumerate(shards):
    assert rows == stream[p::3]
  assert sorted(sum(shards, [])) == sorted(stream)


def test_record_kind_of_each_kind_and_its_refusals(tmp_path):
  for kind, make in NUMBERED.items():
    assert preference.record_kind(_write(tmp_path / f'{kind}.jsonl', [make(0)])) == kind
  path = tmp_path / 'sft.jsonl'
  cfg = _write(path, [{'prompt': 'p', 'completion': 'c'}])  # no label: neither kind
  with pytest.raises(preference.PreferenceDataError) as e:
    preference.record_kind(cfg)
  assert str(e.value).startswith(f"{path} record 1 is no preference record (its fields are "
                                 "['completion', 'prompt']); give it 'prompt', 'chosen' and")
  unpaired = _write(tmp_path / 'kto.jsonl', [NUMBERED['unpaired'](0)])
  with pytest.raises(preference.PreferenceDataError,
                     match=r"holds unpaired records \(prompt, completion, label\) but paired ones"):
    preference.make_preference_iterator(unpaired, TOK, split='train', seq_len=8, batch_size=1,
                                        seed=0)
  with pytest.raises(preference.PreferenceDataError, match=r"data.source='stdlib' holds no"):
    preference.record_kind({'source': 'stdlib'})
