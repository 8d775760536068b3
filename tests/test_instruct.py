"""Instruction data (flaxllm.data.instruct): Alpaca and chat documents with response-only loss
masks, templates, the 'jsonl' source, packing that carries the masks, and bad records."""
import json

import numpy as np
import pytest

from flaxllm.data import instruct, pipeline
from flaxllm.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
RECORDS = [
    {'instruction': 'Reverse the word.', 'input': 'abc', 'output': 'cba'},
    {'instruction': 'Say hi.', 'input': '', 'output': 'hi there'},
    {'instruction': 'Add the numbers.', 'input': '12 + 5', 'output': '17'},
]


def _trained_text(doc):
  """The text of the tokens that are trained on (targets with mask 1)."""
  ex = pipeline.document_to_example(doc)
  ids = ex['targets'][ex['loss_mask'] > 0]
  return TOK.decode([int(i) for i in ids if i != TOK.eos_id])


def test_alpaca_masks_only_the_response():
  doc = instruct.alpaca_document(TOK, RECORDS[0])
  assert _trained_text(doc) == 'cba'
  tokens, mask = doc['tokens'], doc['loss_mask']
  assert tokens[0] == TOK.bos_id and tokens[-1] == TOK.eos_id and mask[-1] == 1
  prompt = TOK.decode([int(t) for t in tokens[1:][mask[1:] == 0]])
  assert prompt.endswith('### Input:\nabc\n\n### Response:\n') and 'paired with an input' in prompt
  no_input = instruct.alpaca_document(TOK, RECORDS[1])
  assert 'paired with' not in TOK.decode([int(t) for t in no_input['tokens'][1:-1]])
  custom = instruct.alpaca_document(TOK, RECORDS[2], template='Q: {instruction} {input}\nA: ')
  assert TOK.decode([int(t) for t in custom['tokens'][1:-1]]) == 'Q: Add the numbers. 12 + 5\nA: 17'
  assert _trained_text(custom) == '17'


def test_chat_masks_only_assistant_turns():
  record = {'messages': [{'role': 'system', 'content': 'Be brief.'},
                         {'role': 'user', 'content': 'Capital of France?'},
                         {'role': 'assistant', 'content': 'Paris.'},
                         {'role': 'user', 'content': 'And Italy?'},
                         {'role': 'assistant', 'content': 'Rome.'}]}
  doc = instruct.chat_document(TOK, record)
  assert _trained_text(doc) == 'Paris.Rome.'
  text = TOK.decode([int(t) for t in doc['tokens'][1:] if t != TOK.eos_id])
  assert text.startswith('### System:\nBe brief.\n\n### User:\nCapital of France?')
  mine = instruct.chat_document(TOK, record, template='<{role}>{content}</{role}>')
  assert '<user>And Italy?</user>' in TOK.decode([int(t) for t in mine['tokens'][1:]
                                                  if t != TOK.eos_id])
  assert _trained_text(mine) == 'Paris.Rome.'


@pytest.mark.parametrize('method', ['concat', 'first_fit'])
def test_packing_keeps_response_masks(method):
  docs = [instruct.alpaca_document(TOK, r) for r in RECORDS * 3]
  rows = list(pipeline.pack_documents(docs, 64, method=method, pad_id=TOK.pad_id))
  trained = sum(int(d['loss_mask'][1:].sum()) for d in docs)
  assert sum(int(r['loss_mask'].sum()) for r in rows) == trained
  outputs = []
  for r in rows:   # masked targets are exactly the response bytes (+ EOS), in order
    ids = r['targets'][r['loss_mask'] > 0]
    outputs.append(TOK.decode([int(i) for i in ids if i != TOK.eos_id]))
    assert np.all(r['loss_mask'][r['segment_ids'] == 0] == 0)
  expect = ''.join(r['output'] for r in RECORDS * 3)
  if method == 'concat':  # rows keep the document order
    assert ''.join(outputs) == expect
  else:                   # first_fit places pieces where they fit: same bytes, other order
    assert sorted(''.join(outputs)) == sorted(expect)


def test_jsonl_source_through_the_iterator(tmp_path):
  path = tmp_path / 'data.jsonl'
  many = [dict(r, instruction=f'{r["instruction"]} #{i}') for i in range(40) for r in RECORDS]
  path.write_text('\n'.join(json.dumps(r) for r in many) + '\n')
  # One record at a time, rows in order: the first rows hold whole records (with 64 records
  # interleaved and no row shuffle, the first 64 rows would be the records' prompt halves).
  cfg = {'source': 'jsonl', 'path': str(path), 'format': 'alpaca', 'val_fraction': 0.1,
         'shuffle_window': 0, 'interleave': 1}
  train, _ = instruct.open_split(cfg, 'train')
  val, _ = instruct.open_split(cfg, 'validation')
  assert len(train) + len(val) == len(many) and 0 < len(val) < 30
  it = pipeline.make_iterator(cfg, TOK, split='validation', seq_len=128, batch_size=2, seed=0)
  batch = next(it)
  assert batch['loss_mask'].sum() > 0 and batch['loss_mask'].sum() < 0.2 * batch['inputs'].size
  # A JSON list file and a custom template work the same way.
  (tmp_path / 'list.json').write_text(json.dumps(RECORDS))
  assert len(instruct.read_records(str(tmp_path / 'list.json'))) == 3
  it = pipeline.make_iterator(dict(cfg, path=str(tmp_path / 'list.json'), val_fraction=0.0,
                                   template='{instruction}|{input}|'), TOK, split='train',
                              seq_len=32, batch_size=1, seed=0)
  first = TOK.decode([int(t) for t in next(it)['inputs'][0, 1:] if t > 2])
  assert any(first.startswith(f'{r["instruction"]}|{r["input"]}|{r["output"]}') for r in RECORDS)


def test_bad_records_one_sentence(tmp_path):
  with pytest.raises(instruct.InstructionDataError, match="needs 'instruction' and 'output'"):
    instruct.alpaca_document(TOK, {'prompt': 'x'})
  with pytest.raises(instruct.InstructionDataError, match="no 'assistant' message"):
    instruct.chat_document(TOK, {'messages': [{'role': 'user', 'content': 'hi'}]})
  with pytest.raises(instruct.InstructionDataError, match="role 'bot' is not one of"):
    instruct.chat_document(TOK, {'messages': [{'role': 'bot', 'content': 'hi'},
                                              {'role': 'assistant', 'content': 'x'}]})
  with pytest.raises(instruct.InstructionDataError, match=r'cannot be filled'):
    instruct.alpaca_prompt(RECORDS[0], template='{question}')
  good = tmp_path / 'good.jsonl'
  good.write_text(json.dumps(RECORDS[0]) + '\n')
  bad = tmp_path / 'bad.jsonl'
  bad.write_text('{"instruction": "a", "output": "b"}\n{oops\n')
  with pytest.raises(instruct.InstructionDataError, match='line 2 is not valid JSON'):
    instruct.read_records(str(bad))
  with pytest.raises(instruct.InstructionDataError, match='no instruction data files'):
    instruct.read_records(str(tmp_path / 'missing' / '*.jsonl'))
  with pytest.raises(ValueError, match="takes no template"):
    pipeline.make_iterator({'source': 'jsonl', 'path': str(good), 'format': 'text',
                            'template': 'x'}, TOK, split='train', seq_len=8, batch_size=1, seed=0)
