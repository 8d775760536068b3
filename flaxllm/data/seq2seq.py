"""Parallel data for encoder-decoder models: (source, target) pairs -> padded batches.

Pairs come from one of two sources (``data.source``):

* ``'jsonl'``: JSON / JSON Lines files at ``data.path`` (``data.glob`` inside a directory)
  whose records hold the source text in ``data.source_key`` (default ``'source'``) and the
  target text in ``data.target_key`` (default ``'target'``);
* ``'stdlib_pairs'``: a built-in task (``data.name``) generated from this interpreter's
  standard library (:mod:`flaxllm.data.tasks`: ``snake_to_camel``, ``signature_to_doc``).

Both are split into train/validation by a hash of each record (``data.val_fraction``), with
:func:`flaxllm.data.instruct.open_split`, so a pair keeps its split when files are added.

Batches (:func:`make_pair_iterator`) hold one pair per row, right-padded, no packing::

  source              s1 .. sm EOS PAD ..     source tokenizer; segment_ids 1 / 0 on padding,
                                              positions 0.. / 0 on padding
  inputs              BOS t1 .. tn PAD ..     target tokenizer; segment_ids, positions as above
  targets             t1 .. tn EOS PAD ..     loss_mask 1.0 on real target positions, else 0.0

Truncation: a source longer than ``source_len - 1`` tokens keeps its first
``source_len - 1`` tokens and still ends with EOS; a target whose tokens plus EOS exceed
``target_len`` keeps its first ``target_len`` targets (so it has no EOS) and inputs
``BOS t1 .. t(target_len-1)``. :func:`truncation_stats` counts the pairs of a split that are
cut, so none is cut silently.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Sequence

import grain
import numpy as np

from flaxllm.data import instruct as instruct_lib
from flaxllm.data import pipeline as pipeline_lib
from flaxllm.data import tasks as tasks_lib
from flaxllm.data.corpus import data_get
from flaxllm.data.tokenizer import Tokenizer

SOURCES = ("jsonl", "stdlib_pairs")  # the data.source values that hold pairs
_text = instruct_lib.text_field


# ----------------------------------------------------------------------------- records


def _keys(data_config: Any) -> tuple[str, str]:
  """(source field, target field) of the records: fixed for built-in tasks."""
  if data_get(data_config, "source") == "stdlib_pairs":
    return "source", "target"
  return data_get(data_config, "source_key"), data_get(data_config, "target_key")


def _records_config(data_config: Any) -> dict[str, Any]:
  """The :func:`instruct.open_split` config of the pair files named by ``data_config``."""
  source = data_get(data_config, "source")
  if source == "stdlib_pairs":
    return tasks_lib.records_config(data_config)
  if source != "jsonl":
    raise ValueError(f"data.source={source!r} holds no (source, target) pairs; use 'jsonl' "
                     "(with data.path) or 'stdlib_pairs' (with data.name).")
  return {"path": data_get(data_config, "path"), "glob": data_get(data_config, "glob"),
          "val_fraction": data_get(data_config, "val_fraction")}


def check_pairs(data_config: Any) -> int:
  """Reads every pair record once (generating a built-in task if needed) and returns their
  number; raises ``InstructionDataError`` naming the file, the missing field and the fix."""
  config = _records_config(data_config)
  names = dict(zip(("source", "target"), _keys(data_config)))
  total = 0
  for f in instruct_lib.record_files(config["path"], config["glob"]):
    for i, record in enumerate(instruct_lib.read_records(f), 1):
      for side, key in names.items():
        if key not in record:
          raise instruct_lib.InstructionDataError(
              f"{f} record {i} has no {key!r} field for the {side} text (its fields are "
              f"{sorted(record)}); set data.{side}_key=<field> to the field that holds it or "
              f"add a {key!r} field to every record.")
      total += 1
  return total


def open_split(data_config: Any, split: str) -> tuple[list[dict], str]:
  """(pair records of ``split`` in stored order, identity string) like ``corpus.open_split``;
  every record has both fields."""
  records, identity = pipeline_lib.open_split(data_config, split)
  keys = _keys(data_config)
  if any(k not in r for r in records for k in keys):
    check_pairs(data_config)  # raises, naming the file and the field
  return records, identity


def pairs(data_config: Any, split: str) -> list[tuple[str, str]]:
  """The (source text, target text) pairs of ``split`` in stored order (for evaluation and for
  training tokenizers on either side)."""
  records, _ = open_split(data_config, split)
  source_key, target_key = _keys(data_config)
  return [(_text(r, source_key), _text(r, target_key)) for r in records]


# ----------------------------------------------------------------------------- tokenizers


class PairTokenizer(Tokenizer):
  """The tokenizers of a parallel corpus with separate vocabularies: it is the target side's
  tokenizer (encode, decode, special ids), and ``source`` encodes the sources."""

  def __init__(self, target: Tokenizer, source: Tokenizer):
    self.target = target
    self.source = source

  def encode(self, text: str) -> list[int]:
    return self.target.encode(text)

  def decode(self, ids: Sequence[int]) -> str:
    return self.target.decode(ids)

  @property
  def vocab_size(self) -> int:
    return self.target.vocab_size

  @property
  def bos_id(self) -> int:
    return self.target.bos_id

  @property
  def eos_id(self) -> int:
    return self.target.eos_id

  @property
  def pad_id(self) -> int:
    return self.target.pad_id


def source_side(tokenizer: Tokenizer) -> Tokenizer:
  """The tokenizer of the source side: ``tokenizer.source`` of a :class:`PairTokenizer`, else
  ``tokenizer`` itself (one shared vocabulary)."""
  return tokenizer.source if isinstance(tokenizer, PairTokenizer) else tokenizer


def side_texts(data_config: Any, side: str) -> Iterator[str]:
  """The texts of one side ('source' | 'target' | 'both') of the train pairs, read lazily
  (what a sentencepiece tokenizer of that side is trained on)."""
  for source, target in pairs(data_config, "train"):
    if side in ("source", "both"):
      yield source
    if side in ("target", "both"):
      yield target


# ----------------------------------------------------------------------------- rows


def _padded(ids: Sequence[int], length: int, pad_id: int) -> tuple[np.ndarray, ...]:
  """(ids right-padded to ``length``, segment ids 1/0, positions 0../0) as int32."""
  tokens = np.full(length, pad_id, np.int32)
  tokens[: len(ids)] = ids
  real = np.arange(length) < len(ids)
  return tokens, real.astype(np.int32), np.where(real, np.arange(length), 0).astype(np.int32)


def pair_example(tokenizer: Tokenizer, source_tokenizer: Tokenizer, source: str, target: str,
                 source_len: int, target_len: int) -> dict[str, np.ndarray]:
  """One batch row of a pair, truncated and padded as in the module docstring."""
  src = [*source_tokenizer.encode(source)[: source_len - 1], source_tokenizer.eos_id]
  tgt = tokenizer.encode(target)
  inputs = [tokenizer.bos_id, *tgt][:target_len]
  targets = [*tgt, tokenizer.eos_id][:target_len]
  source_ids, source_seg, source_pos = _padded(src, source_len, source_tokenizer.pad_id)
  input_ids, seg, pos = _padded(inputs, target_len, tokenizer.pad_id)
  target_ids, _, _ = _padded(targets, target_len, tokenizer.pad_id)
  return {
      "source": source_ids,
      "source_segment_ids": source_seg,
      "source_positions": source_pos,
      "inputs": input_ids,
      "targets": target_ids,
      "segment_ids": seg,
      "positions": pos,
      "loss_mask": seg.astype(np.float32),
  }


@dataclasses.dataclass(frozen=True)
class _PairToExample(grain.transforms.Map):
  """grain transform: a pair record -> one batch row (:func:`pair_example`)."""

  tokenizer: Tokenizer
  source_tokenizer: Tokenizer
  source_key: str
  target_key: str
  source_len: int
  target_len: int

  def map(self, record):
    return pair_example(self.tokenizer, self.source_tokenizer, _text(record, self.source_key),
                        _text(record, self.target_key), self.source_len, self.target_len)


@dataclasses.dataclass(frozen=True)
class _PadPairBatch(pipeline_lib.PadBatch):
  """Pads a final partial batch with empty rows; their source is the source tokenizer's pad."""

  source_pad_id: int = 0

  def map(self, batch):
    n = len(batch["source"])
    batch = super().map(batch)
    batch["source"][n:] = self.source_pad_id
    return batch


def truncation_stats(data_config: Any, tokenizer: Tokenizer, *, split: str, source_len: int,
                     target_len: int, source_tokenizer: Tokenizer | None = None) -> dict[str, int]:
  """How many pairs of ``split`` the batches cut: ``pairs``, ``source_truncated``,
  ``target_truncated``, and the longest ``source_tokens`` / ``target_tokens`` (with EOS), the
  lengths at which nothing would be cut."""
  source_tokenizer = source_tokenizer or source_side(tokenizer)
  longest_source = longest_target = cut_source = cut_target = 0
  split_pairs = pairs(data_config, split)
  for source, target in split_pairs:
    n_source = len(source_tokenizer.encode(source)) + 1
    n_target = len(tokenizer.encode(target)) + 1
    cut_source += n_source > source_len
    cut_target += n_target > target_len
    longest_source, longest_target = max(longest_source, n_source), max(longest_target, n_target)
  return dict(pairs=len(split_pairs), source_truncated=cut_source, target_truncated=cut_target,
              source_tokens=longest_source, target_tokens=longest_target)


# ----------------------------------------------------------------------------- iterator


def make_pair_iterator(
    data_config: Any,
    tokenizer: Tokenizer,
    *,
    split: str,
    source_len: int,
    target_len: int,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    source_tokenizer: Tokenizer | None = None,
) -> pipeline_lib.DataIterator:
  """Batches of padded pairs for this process; see the module docstring for the layout.

  Args:
    data_config: dict/ConfigDict with ``source`` ('jsonl' | 'stdlib_pairs') and its fields
      (``path``, ``glob``, ``source_key``, ``target_key`` | ``name``, ``max_files``), plus
      ``val_fraction`` and ``shuffle`` (True: seeded global shuffle of the train split, reshuffled
      every epoch).
    tokenizer: the target side's :class:`Tokenizer`.
    split: 'train' or 'validation'; validation is read in stored order, once by default.
    source_len, target_len: row lengths of the source and the target arrays.
    batch_size: rows per batch (per process).
    seed: shuffle seed (0 <= seed < 2**32).
    process_index, process_count: this process's share of the global pair stream (every
      ``process_count``-th pair from ``process_index``).
    num_epochs: None repeats forever (train) / 1 (validation).
    source_tokenizer: the source side's tokenizer (default: ``source_side(tokenizer)``).

  Returns:
    A :class:`~flaxllm.data.pipeline.DataIterator` of dicts: ``source``,
    ``source_segment_ids``, ``source_positions`` ``[batch_size, source_len]`` and ``inputs``,
    ``targets``, ``segment_ids``, ``positions`` ``[batch_size, target_len]`` (int32), and
    ``loss_mask`` ``[batch_size, target_len]`` (float32). A finite iterator pads its last
    batch with empty rows (segment ids and loss_mask 0).
  """
  if source_len < 1 or target_len < 1 or batch_size < 1:
    raise ValueError(f"source_len, target_len and batch_size must be positive but are "
                     f"{source_len}, {target_len} and {batch_size}.")
  source_tokenizer = source_tokenizer or source_side(tokenizer)
  records, identity = open_split(data_config, split)
  if not records:
    raise ValueError(f"Split {split!r} of {identity} has no pairs; add records, raise "
                     "data.max_files or change data.val_fraction.")
  ds, shuffle_seed, num_epochs = pipeline_lib.record_stream(
      records, data_config, split, seed=seed, num_epochs=num_epochs,
      process_index=process_index, process_count=process_count)
  source_key, target_key = _keys(data_config)
  ds = ds.map(_PairToExample(tokenizer, source_tokenizer, source_key, target_key, source_len,
                             target_len))
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0))
  it_ds = it_ds.batch(batch_size, drop_remainder=False)
  it_ds = it_ds.map(_PadPairBatch(batch_size, tokenizer.pad_id, source_tokenizer.pad_id))
  fingerprint = dict(
      data=identity,
      keys=[source_key, target_key],
      split=split,
      source_len=source_len,
      target_len=target_len,
      batch_size=batch_size,
      seed=shuffle_seed,
      shuffle=shuffle_seed is not None,
      process_index=process_index,
      process_count=process_count,
      num_epochs=num_epochs,
      vocab_size=tokenizer.vocab_size,
      source_vocab_size=source_tokenizer.vocab_size,
  )
  return pipeline_lib.DataIterator(it_ds, fingerprint)
