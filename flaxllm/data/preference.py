"""Preference data for alignment: paired (reward models, DPO and relatives), unpaired (KTO) and
prompt-only (GRPO, PPO) records -> padded batches.

Records come from JSON / JSON Lines files (``data.source='jsonl'``, ``data.path``, ``data.glob``)
split into train/validation by a hash of each record (``data.val_fraction``) with
:func:`flaxllm.data.instruct.open_split`. Three kinds (:func:`record_kind`)::

  paired     {'prompt': P, 'chosen': R, 'rejected': R}
  unpaired   {'prompt': P, 'completion': R, 'label': true | false}    (true: desirable)
  prompts    {'prompt': P, ...}          (other fields pass through to reward functions)

A prompt ``P`` is a string or a chat message list ``[{'role': 'system'|'user'|'assistant',
'content': ...}, ...]`` (the conversation so far); a response ``R`` is a string or a list of one
assistant message (``[{'role': 'assistant', 'content': ...}]``). Rendering (:func:`prompt_ids`,
:func:`response_ids`):

* a chat prompt is BOS + its messages rendered with the instruction-tuning chat template
  (:func:`flaxllm.data.instruct.chat_turn`; ``data.template``, '' = ``CHAT_TURN``) + the
  assistant header (``'### Assistant:\\n'`` by default); the response is its tokens + EOS. Up to
  that EOS these are the tokens, and the trained ones, of the SFT chat record
  (``data.format='chat'``) of the conversation with this answer;
* a string prompt is BOS + its tokens, and the response's tokens + EOS follow directly (plain
  concatenation: string data carries its own formatting, e.g. ``'\\n\\nHuman: ..\\n\\nAssistant:'``;
  give the prompt as a chat list to get the template).

Batches hold one record per row, right-padded with the tokenizer's PAD, no packing. A
sequence of prompt p1 .. pk and response r1 .. rm (``{side}_`` for side in 'chosen',
'rejected' of a pair; no prefix for an unpaired record)::

  inputs       BOS p1 .. pk r1 .. rm  PAD ..
  targets      p1  .. pk r1 .. rm EOS PAD ..
  loss_mask    0   .. 0  1  .. 1  1   0   ..    float32: 1 on the response targets (and EOS)
  segment_ids  1   ..                 0   ..    int32: 1 real / 0 padding
  positions    0 1 2 ..               0   ..

each ``[batch, seq_len]``; unpaired rows add ``label`` ``[batch]`` float32 (1 desirable, 0
undesirable). Prompt rows (RL) are LEFT-padded as :func:`flaxllm.generate.left_pad` makes them:
``prompt_tokens`` ``[batch, max_prompt_len]`` int32, ``prompt_mask`` (bool, True on real tokens)
and ``prompt_index`` ``[batch]`` int32, the row's index into :func:`prompts` (the split's
records, whose texts and reference fields reward functions read). A finite iterator pads its last
batch with empty rows (segment ids, loss_mask and label 0; prompt rows of only BOS, with
``prompt_index`` -1, so the batch can still be generated from).

Truncation (``max_prompt_len``, a keyword, default ``seq_len // 2``, at most ``seq_len``; it counts
BOS and, for a chat prompt, the assistant header):

* a prompt longer than ``max_prompt_len`` tokens is cut from the LEFT: it keeps BOS and its last
  ``max_prompt_len - 1`` tokens (the end, next to the response);
* the response (its tokens and EOS) is kept, and cut from the right only where prompt and
  response exceed the ``seq_len + 1`` tokens of a row (a cut response has no EOS); as the prompt
  has at most ``seq_len`` tokens, every response keeps at least its first token;
* a record whose response is empty (nothing would be trained on) is refused with an error naming
  the file, the record and the fix;
* :func:`truncation_stats` counts the records cut, so none is cut silently.

A pair whose chosen equals its rejected is kept, counted and warned about (not refused): DPO and
its relatives give it exactly zero gradient (the two log-ratios cancel), so it only dilutes the
batch mean, while losses with an SFT term on the chosen side still learn from it; one duplicate
should not make a data set unusable. Building a paired iterator logs a warning with the number
of pairs whose chosen and rejected texts are equal; ``truncation_stats(...)['identical']`` counts
the pairs whose rows are equal (also those that differ only after the cut).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping, Sequence

import grain
import numpy as np

from flaxllm.data import instruct as instruct_lib
from flaxllm.data import pipeline as pipeline_lib
from flaxllm.data.corpus import data_get
from flaxllm.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# record kind -> the preference fields its records hold (other fields are passed through).
KINDS = {
    "paired": ("prompt", "chosen", "rejected"),
    "unpaired": ("prompt", "completion", "label"),
    "prompts": ("prompt",),
}
_FIELDS = frozenset(f for fields in KINDS.values() for f in fields)
SIDES = ("chosen", "rejected")
_RESPONSES = {"paired": SIDES, "unpaired": ("completion",), "prompts": ()}


class PreferenceDataError(instruct_lib.InstructionDataError):
  """A record or file that is not preference data; the message names it and the fix."""


# ----------------------------------------------------------------------------- records


def _response_text(value: Any) -> str | None:
  """The text of a response: a string, or the content of a list of one assistant message
  (None for anything else)."""
  if isinstance(value, str):
    return value
  if (isinstance(value, list) and len(value) == 1 and isinstance(value[0], Mapping)
      and value[0].get("role") == "assistant"):
    return instruct_lib.text_field(value[0], "content")
  return None


def _is_prompt(value: Any) -> bool:
  """Whether ``value`` is a prompt: a string or a list of chat messages with known roles."""
  return isinstance(value, str) or (isinstance(value, list) and all(
      isinstance(m, Mapping) and m.get("role") in instruct_lib.ROLES for m in value))


def _problem(record: Mapping[str, Any], kind: str) -> str | None:
  """What makes ``record`` unusable as a ``kind`` record, with the fix (None: nothing)."""
  fields = KINDS[kind]
  missing = [f for f in fields if f not in record]
  if missing:
    return (f"has no {missing[0]!r} field (its fields are {sorted(record)}) but {kind} records "
            f"need {list(fields)}; add it or point data.path at {kind} records")
  if not _is_prompt(record["prompt"]):
    return (f"has a 'prompt' that is neither a string nor a list of {{'role', 'content'}} "
            f"messages with roles in {instruct_lib.ROLES}; fix the record")
  for key in _RESPONSES[kind]:
    text = _response_text(record[key])
    if text is None:
      return (f"has a {key!r} that is neither a string nor a list of one assistant message; "
              "fix the record")
    if not text:
      return (f"has an empty {key!r} response, so nothing of it would be trained on; drop the "
              "record or write the response")
  if kind == "unpaired" and not isinstance(record["label"], bool):
    return (f"has label {record['label']!r}; write the label as true (desirable) or false "
            "(undesirable)")
  return None


def _kind_of(record: Mapping[str, Any], where: str) -> str:
  """The kind whose preference fields ``record`` holds; ``where`` names it in the error."""
  present = _FIELDS & set(record)
  for kind, fields in KINDS.items():
    if present == set(fields):
      return kind
  raise PreferenceDataError(
      f"{where} is no preference record (its fields are {sorted(record)}); give it 'prompt', "
      "'chosen' and 'rejected' (paired), 'prompt', 'completion' and 'label' (unpaired, KTO), or "
      "only 'prompt' (prompts for RL).")


def _files(data_config: Any) -> list[str]:
  """The record files named by a ``data.source='jsonl'`` config."""
  source = data_get(data_config, "source")
  if source != "jsonl":
    raise PreferenceDataError(f"data.source={source!r} holds no preference records; use "
                              "data.source='jsonl' with data.path.")
  path = data_get(data_config, "path")
  if not path:
    raise PreferenceDataError("preference data needs data.path; set data.path to a .json/.jsonl "
                              "file, a directory of them or a glob.")
  return instruct_lib.record_files(path, data_get(data_config, "glob"))


def record_kind(data_config: Any) -> str:
  """'paired' | 'unpaired' | 'prompts': the kind of the first record of the data (cheap: reads
  only the first file that holds records); raises ``PreferenceDataError`` for a record that is
  neither."""
  for f in _files(data_config):
    for record in instruct_lib.read_records(f)[:1]:
      return _kind_of(record, f"{f} record 1")
  raise PreferenceDataError(f"no records at data.path={data_get(data_config, 'path')!r}; write "
                            "one JSON object per record.")


def check_records(data_config: Any, kind: str) -> int:
  """Reads every record once and returns their number; raises ``PreferenceDataError`` naming
  the file, the record and the fix for one that is not a ``kind`` record ('prompts': any record
  with a prompt)."""
  total = 0
  for f in _files(data_config):
    for i, record in enumerate(instruct_lib.read_records(f), 1):
      problem = _problem(record, kind)
      if problem:
        raise PreferenceDataError(f"{f} record {i} {problem}.")
      total += 1
  return total


def _open(data_config: Any, split: str, kind: str) -> tuple[list[dict], str]:
  """(valid ``kind`` records of ``split`` in stored order, identity string); 'prompts' takes the
  prompt of any record."""
  _files(data_config)  # the source and path checks
  found = kind if kind == "prompts" else record_kind(data_config)
  if found != kind:
    raise PreferenceDataError(
        f"data.path={data_get(data_config, 'path')!r} holds {found} records "
        f"({', '.join(KINDS[found])}) but {kind} ones ({', '.join(KINDS[kind])}) are needed; "
        f"point data.path at {kind} records or use a loss for {found} data.")
  records, identity = pipeline_lib.open_split(data_config, split)
  if any(_problem(r, kind) for r in records):
    check_records(data_config, kind)  # raises, naming the file and the record
  if not records:
    raise PreferenceDataError(f"split {split!r} of {identity} has no records; add records or "
                              "change data.val_fraction.")
  return records, identity


def prompts(data_config: Any, split: str) -> list[dict]:
  """The records of ``split`` in stored order, unchanged: ``prompt_index`` of a prompt batch
  indexes this list (the prompt and any fields reward functions need, e.g. a reference answer)."""
  return _open(data_config, split, "prompts")[0]


# ----------------------------------------------------------------------------- rendering


def prompt_ids(tokenizer: Tokenizer, prompt: str | Sequence[Mapping[str, Any]],
               template: str = "") -> list[int]:
  """BOS + a prompt: a string's tokens, or a chat list's messages rendered with the chat
  template (``data.template``; '' = the default) followed by the assistant header."""
  if isinstance(prompt, str):
    return [tokenizer.bos_id, *tokenizer.encode(prompt)]
  ids = [tokenizer.bos_id]
  for message in prompt:
    header, body, footer = instruct_lib.chat_turn(tokenizer, message, template)
    ids += header + body + footer
  return ids + instruct_lib.chat_turn(tokenizer, {"role": "assistant"}, template)[0]


def response_ids(tokenizer: Tokenizer, response: str | Sequence[Mapping[str, Any]]) -> list[int]:
  """A response's tokens (a string, or a list of one assistant message) followed by EOS."""
  return [*tokenizer.encode(_response_text(response)), tokenizer.eos_id]


def cut_prompt(ids: list[int], max_prompt_len: int) -> list[int]:
  """BOS and the last ``max_prompt_len - 1`` tokens of a prompt longer than ``max_prompt_len``."""
  return ids if len(ids) <= max_prompt_len else [ids[0], *ids[len(ids) - max_prompt_len + 1 :]]


def _sequence_row(prompt: list[int], response: list[int], seq_len: int,
                  pad_id: int) -> dict[str, np.ndarray]:
  """One right-padded row of a (cut) prompt and its response cut to fit, with the loss mask on
  the response targets (the module docstring's layout)."""
  response = response[: seq_len + 1 - len(prompt)]
  example = pipeline_lib.document_to_example(
      {"tokens": prompt + response, "loss_mask": [0.0] * len(prompt) + [1.0] * len(response)})
  extra = seq_len - len(example["inputs"])
  real = np.arange(seq_len) < len(example["inputs"])
  return {
      "inputs": np.pad(example["inputs"], (0, extra), constant_values=pad_id),
      "targets": np.pad(example["targets"], (0, extra), constant_values=pad_id),
      "positions": np.where(real, np.arange(seq_len), 0).astype(np.int32),
      "segment_ids": real.astype(np.int32),
      "loss_mask": np.pad(example["loss_mask"], (0, extra)),
  }


_ROW_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")


def mismatched_rows(batch: Mapping[str, np.ndarray], pad_id: int) -> dict[str, np.ndarray]:
  """KTO's KL rows of an unpaired batch: row i holds the prompt of row i and the completion of
  row i + 1 (cyclically), laid out and cut like the batch's rows (same seq_len)."""
  seq_len = batch["inputs"].shape[1]
  prompts, completions = [], []
  for inputs, targets, mask, seg in zip(batch["inputs"], batch["targets"], batch["loss_mask"],
                                        batch["segment_ids"]):
    n = int(np.sum(seg > 0))
    tokens = [int(inputs[0]), *map(int, targets[:n])]
    first = int(np.argmax(mask > 0)) + 1 if np.any(mask > 0) else n + 1
    prompts.append(tokens[:first])
    completions.append(tokens[first:])
  empty = {k: np.zeros_like(v[0]) for k, v in batch.items() if k in _ROW_KEYS}
  empty["inputs"] = empty["targets"] = np.full(seq_len, pad_id, np.int32)
  rows = [_sequence_row(p, c, seq_len, pad_id) if c else empty   # a padding row's: none
          for p, c in zip(prompts, completions[1:] + completions[:1])]
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


@dataclasses.dataclass(frozen=True)
class _RecordToRow(grain.transforms.Map):
  """grain transform: an ``(index, record)`` of one kind -> its batch row (a pair's arrays as
  ``{side}_{key}``)."""

  tokenizer: Tokenizer
  kind: str
  seq_len: int
  max_prompt_len: int
  template: str

  def map(self, item):
    index, record = item
    tok = self.tokenizer
    prompt = cut_prompt(prompt_ids(tok, record["prompt"], self.template), self.max_prompt_len)
    if self.kind == "prompts":
      tokens = np.full(self.max_prompt_len, tok.pad_id, np.int32)
      tokens[self.max_prompt_len - len(prompt) :] = prompt
      return {"prompt_tokens": tokens,
              "prompt_mask": np.arange(self.max_prompt_len) >= self.max_prompt_len - len(prompt),
              "prompt_index": np.int32(index)}
    rows = {key: _sequence_row(prompt, response_ids(tok, record[key]), self.seq_len, tok.pad_id)
            for key in _RESPONSES[self.kind]}
    if self.kind == "paired":
      return {f"{side}_{key}": value for side, row in rows.items() for key, value in row.items()}
    return {**rows["completion"], "label": np.float32(record["label"])}


@dataclasses.dataclass(frozen=True)
class _PadPromptBatch(grain.transforms.Map):
  """Pads a final partial batch of prompts with rows of only BOS (in the last column, so the
  batch can be generated from) and ``prompt_index`` -1."""

  batch_size: int
  pad_id: int
  bos_id: int

  def map(self, batch):
    extra = self.batch_size - len(batch["prompt_index"])
    if extra == 0:
      return batch
    tokens = np.full((extra, batch["prompt_tokens"].shape[1]), self.pad_id, np.int32)
    tokens[:, -1] = self.bos_id
    mask = np.zeros(tokens.shape, bool)
    mask[:, -1] = True
    empty = {"prompt_tokens": tokens, "prompt_mask": mask,
             "prompt_index": np.full(extra, -1, np.int32)}
    return {k: np.concatenate([batch[k], empty[k]]) for k in batch}


# ----------------------------------------------------------------------------- iterators


def _prompt_len(seq_len: int, max_prompt_len: int | None) -> int:
  """``max_prompt_len`` (default ``seq_len // 2``), checked to be in [1, seq_len]."""
  if seq_len < 1:
    raise ValueError(f"seq_len must be positive but is {seq_len}.")
  max_prompt_len = max(1, seq_len // 2) if max_prompt_len is None else max_prompt_len
  if not 1 <= max_prompt_len <= seq_len:
    raise ValueError(f"max_prompt_len={max_prompt_len} must be in [1, seq_len={seq_len}] so that "
                     "every response keeps a token; lower max_prompt_len or raise seq_len.")
  return max_prompt_len


def _iterator(kind: str, data_config: Any, tokenizer: Tokenizer, *, split: str, seq_len: int,
              batch_size: int, seed: int, process_index: int, process_count: int,
              num_epochs: int | None, max_prompt_len: int | None) -> pipeline_lib.DataIterator:
  """The iterator of ``kind`` rows; the public ``make_*_iterator`` functions document it."""
  max_prompt_len = _prompt_len(seq_len, max_prompt_len)
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive but is {batch_size}.")
  records, identity = _open(data_config, split, kind)
  if kind == "paired":
    identical = sum(_response_text(r["chosen"]) == _response_text(r["rejected"]) for r in records)
    if identical:
      log.warning("%d of %d pairs of %s have chosen equal to rejected; they are kept but give DPO "
                  "zero gradient (truncation_stats counts them), so drop them from the data to "
                  "use every row.", identical, len(records), identity)
  ds, shuffle_seed, num_epochs = pipeline_lib.record_stream(
      list(enumerate(records)), data_config, split, seed=seed, num_epochs=num_epochs,
      process_index=process_index, process_count=process_count)
  template = data_get(data_config, "template")
  ds = ds.map(_RecordToRow(tokenizer, kind, seq_len, max_prompt_len, template))
  pad = (_PadPromptBatch(batch_size, tokenizer.pad_id, tokenizer.bos_id) if kind == "prompts"
         else pipeline_lib.PadBatch(batch_size, tokenizer.pad_id))
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0))
  it_ds = it_ds.batch(batch_size, drop_remainder=False).map(pad)
  fingerprint = dict(
      data=identity,
      kind=kind,
      split=split,
      seq_len=seq_len,
      max_prompt_len=max_prompt_len,
      template=template,
      batch_size=batch_size,
      seed=shuffle_seed,
      shuffle=shuffle_seed is not None,
      process_index=process_index,
      process_count=process_count,
      num_epochs=num_epochs,
      vocab_size=tokenizer.vocab_size,
  )
  return pipeline_lib.DataIterator(it_ds, fingerprint)


def make_preference_iterator(
    data_config: Any,
    tokenizer: Tokenizer,
    *,
    split: str,
    seq_len: int,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    max_prompt_len: int | None = None,
) -> pipeline_lib.DataIterator:
  """Batches of paired records (reward models, DPO and relatives) for this process.

  Args:
    data_config: dict/ConfigDict with ``source='jsonl'``, ``path`` (``glob``),
      ``val_fraction``, ``shuffle`` (True: seeded global shuffle of the train split, reshuffled
      every epoch) and ``template`` (the chat template; '' = the default).
    tokenizer: any :class:`Tokenizer`.
    split: 'train' or 'validation'; validation is read in stored order, once by default.
    seq_len: length of each sequence row (``seq_len + 1`` tokens: prompt, response, EOS).
    batch_size: rows (pairs) per batch (per process).
    seed: shuffle seed (0 <= seed < 2**32).
    process_index, process_count: this process's share of the global record stream (every
      ``process_count``-th record from ``process_index``).
    num_epochs: None repeats forever (train) / 1 (validation).
    max_prompt_len: prompt tokens kept (with BOS), in [1, seq_len]; default ``seq_len // 2``.

  Returns:
    A :class:`~flaxllm.data.pipeline.DataIterator` of dicts: for side in 'chosen', 'rejected':
    ``{side}_inputs``, ``{side}_targets``, ``{side}_positions``, ``{side}_segment_ids``
    (int32) and ``{side}_loss_mask`` (float32, response only), each ``[batch_size, seq_len]``.
  """
  return _iterator("paired", data_config, tokenizer, split=split, seq_len=seq_len,
                   batch_size=batch_size, seed=seed, process_index=process_index,
                   process_count=process_count, num_epochs=num_epochs,
                   max_prompt_len=max_prompt_len)


def make_unpaired_iterator(
    data_config: Any,
    tokenizer: Tokenizer,
    *,
    split: str,
    seq_len: int,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    max_prompt_len: int | None = None,
) -> pipeline_lib.DataIterator:
  """Batches of unpaired records (KTO) for this process; the arguments are those of
  :func:`make_preference_iterator`.

  Returns:
    A :class:`~flaxllm.data.pipeline.DataIterator` of dicts: ``inputs``, ``targets``,
    ``positions``, ``segment_ids`` (int32) and ``loss_mask`` (float32, response only), each
    ``[batch_size, seq_len]``, and ``label`` ``[batch_size]`` (float32: 1 desirable, 0 not).
  """
  return _iterator("unpaired", data_config, tokenizer, split=split, seq_len=seq_len,
                   batch_size=batch_size, seed=seed, process_index=process_index,
                   process_count=process_count, num_epochs=num_epochs,
                   max_prompt_len=max_prompt_len)


def make_prompt_iterator(
    data_config: Any,
    tokenizer: Tokenizer,
    *,
    split: str,
    seq_len: int,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    max_prompt_len: int | None = None,
) -> pipeline_lib.DataIterator:
  """Batches of prompts to generate from (GRPO, PPO) for this process; the prompt of any record
  kind is read. The arguments are those of :func:`make_preference_iterator`; ``seq_len`` is the
  length of a prompt and its completion, so generation may add ``seq_len - max_prompt_len``
  tokens.

  Returns:
    A :class:`~flaxllm.data.pipeline.DataIterator` of dicts: ``prompt_tokens``
    ``[batch_size, max_prompt_len]`` int32 and ``prompt_mask`` (bool), LEFT-padded as
    :func:`flaxllm.generate.left_pad` makes them, and ``prompt_index`` ``[batch_size]`` int32,
    each row's index into ``prompts(data_config, split)`` (-1 on padding rows).
  """
  return _iterator("prompts", data_config, tokenizer, split=split, seq_len=seq_len,
                   batch_size=batch_size, seed=seed, process_index=process_index,
                   process_count=process_count, num_epochs=num_epochs,
                   max_prompt_len=max_prompt_len)


def truncation_stats(data_config: Any, tokenizer: Tokenizer, *, split: str, seq_len: int,
                     max_prompt_len: int | None = None) -> dict[str, int]:
  """How the batches of ``split`` cut its records (of the data's kind): ``records``,
  ``prompt_truncated``, ``response_truncated`` (records with a response cut), the longest
  ``prompt_tokens`` (with BOS) and ``response_tokens`` (with EOS), and ``identical`` (pairs
  whose chosen and rejected rows are equal, also after a cut)."""
  max_prompt_len = _prompt_len(seq_len, max_prompt_len)
  kind = record_kind(data_config)
  records, _ = _open(data_config, split, kind)
  template = data_get(data_config, "template")
  stats = dict(records=len(records), prompt_truncated=0, response_truncated=0, prompt_tokens=0,
               response_tokens=0, identical=0)
  for record in records:
    prompt = prompt_ids(tokenizer, record["prompt"], template)
    responses = [response_ids(tokenizer, record[key]) for key in _RESPONSES[kind]]
    room = seq_len + 1 - len(cut_prompt(prompt, max_prompt_len))
    stats["prompt_truncated"] += len(prompt) > max_prompt_len
    stats["response_truncated"] += any(len(r) > room for r in responses)
    stats["prompt_tokens"] = max(stats["prompt_tokens"], len(prompt))
    stats["response_tokens"] = max([stats["response_tokens"], *map(len, responses)])
    stats["identical"] += kind == "paired" and responses[0][:room] == responses[1][:room]
  return stats
