"""grain input pipeline: shuffle, shard, tokenize, pack, batch, checkpoint.

Per process::

  data source (random access, TFDS ArrayRecord)
    -> grain.MapDataset: global shuffle (seeded, reshuffled each epoch), repeat
    -> this process's share of the global stream (every process_count-th document)
    -> data.interleave streams, stream i taking every interleave-th document from i, each:
       -> tokenize each document into BOS + tokens + EOS            (a "document")
       -> (inputs, targets, loss_mask) = (tokens[:-1], tokens[1:], mask[1:])
       -> pack into rows of seq_len with segment_ids / positions   (no pair crosses documents)
    -> rows taken from the streams in turn (`InterleaveRows`)
    -> shuffle packed rows within windows of data.shuffle_window rows
    -> batch, and pad a final partial batch with empty rows
    -> (data.worker_count > 0) all of the above in worker processes, each on its slice of the
       documents, their batches taken in turn
    -> DataIterator with JSON-serialisable get_state / set_state

Why interleave: a document (a source file) packs into many consecutive rows, so a plain
document stream fills whole windows, batches and steps from a few documents. Measured on the
default job (200 steps of 8 x 128 tokens of the stdlib corpus): without it, training read 39
of 1,724 files, its loss fell on text it had just seen, and validation loss ended 1.6 nats
above it. With 256 streams, every row of a window comes from a different document and a
document gives at most one row in 256. Validation is shuffled the same way with a fixed seed,
so that its first `eval_batches` are a sample of every validation document, the same each time.

Documents are dicts ``{'tokens': int32[n], 'loss_mask': float32[n] (optional)}``
where ``loss_mask[i]`` says whether token ``i`` is trained on (predicted from
its prefix). Pretraining text leaves it out (all ones); instruction data (JSONL)
plugs in as a new entry of ``DOCUMENT_FORMATS`` (``data.format``) that returns
documents with a mask over the response tokens (and, if needed, a new source in
:func:`flaxllm.data.corpus.open_split`); packing carries the mask through.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Iterator, Mapping

import grain
import numpy as np
from absl import flags

from flaxllm.data import corpus as corpus_lib
from flaxllm.data import instruct as instruct_lib
from flaxllm.data import tasks as tasks_lib
from flaxllm.data.corpus import data_get
from flaxllm.data.tokenizer import Tokenizer
from flaxllm.models.config import require

FEATURES = ("inputs", "targets", "loss_mask")
STATE_VERSION = 1


# ----------------------------------------------------------------------------- documents


def make_document(tokenizer: Tokenizer, text: str) -> dict[str, np.ndarray]:
  """``{'tokens': [BOS, *encode(text), EOS]}`` as int32."""
  ids = [tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id]
  return {"tokens": np.asarray(ids, dtype=np.int32)}


def document_to_example(doc: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Next-token pairs of one document: inputs ``t[:-1]``, targets ``t[1:]``, loss_mask ``m[1:]``."""
  tokens = np.asarray(doc["tokens"], dtype=np.int32)
  if tokens.ndim != 1 or len(tokens) < 2:
    raise ValueError(f"A document needs at least 2 tokens (BOS and EOS) but has shape {tokens.shape}.")
  mask = doc.get("loss_mask")
  mask = np.ones(len(tokens), np.float32) if mask is None else np.asarray(mask, dtype=np.float32)
  if mask.shape != tokens.shape:
    raise ValueError(f"Document loss_mask has shape {mask.shape} but its tokens have shape {tokens.shape}.")
  return {"inputs": tokens[:-1], "targets": tokens[1:], "loss_mask": mask[1:]}


def text_document(tokenizer: Tokenizer, record: Any, text_key: str = "text") -> dict[str, np.ndarray]:
  """The ``'text'`` format: the record's text feature (bytes or str) as one document."""
  text = record[text_key] if isinstance(record, Mapping) else record
  if isinstance(text, bytes):
    text = text.decode("utf-8", errors="replace")
  return make_document(tokenizer, str(text))


# data.format -> function(tokenizer, record, text_key) -> document. The seam for instruction data:
# a JSONL/chat format returns {'tokens', 'loss_mask'} with the mask on the response tokens, and
# packing carries the mask through. Functions must be importable top-level ones (grain workers).
DOCUMENT_FORMATS = {"text": text_document, **instruct_lib.FORMATS}  # + 'alpaca', 'chat' (data/instruct.py)


# data.source -> function(data_config, split) -> (random-access records, identity string).
SOURCES = {
    "stdlib": corpus_lib.open_split,   # the embedded default corpus
    "text": corpus_lib.open_split,     # local text files (data.path)
    "tfds": corpus_lib.open_split,     # a prepared TFDS dataset (data.name, data.data_dir)
    "jsonl": instruct_lib.open_split,  # JSON/JSONL records (instructions, chats, pairs)
    "stdlib_pairs": tasks_lib.open_split,  # a built-in pair task (data.name), flaxllm.data.tasks
}
PACKING = ("concat", "first_fit")
PROCESS_SHARDING = ("source", "global")


def open_split(data_config: Any, split: str):
  """(records, identity) of ``split`` of the source named by ``data.source``."""
  source = data_get(data_config, "source")
  if source not in SOURCES:
    raise ValueError(f"Unknown data.source {source!r}; use one of {sorted(SOURCES)}.")
  return SOURCES[source](data_config, split)


def check_section(data: Any, tokenizer: Any) -> None:
  """``ConfigError`` (one sentence naming the key and the fix) for a ``config.data`` that
  cannot work with ``config.tokenizer``; run before anything is built."""
  require(data.source in SOURCES, f"data.source={data.source!r} is not known; choose one of {tuple(SOURCES)}.")
  if data.source == "text":
    require(bool(data.path), "data.source='text' needs data.path; set --config.data.path=/path/to/text/files.")
  if data.source == "jsonl":
    require(bool(data.path), "data.source='jsonl' needs data.path; set --config.data.path=/path/to/records.jsonl.")
  if data.source == "jsonl" and data.format in instruct_lib.FORMATS:
    require(tokenizer.kind == "bytes" or bool(tokenizer.model_path),
            "instruction data needs the base model's tokenizer; set --config.tokenizer.model_path=<base workdir>/tokenizer.model.")
  if data.source == "tfds":
    require(bool(data.name), "data.source='tfds' needs data.name; set e.g. --config.data.name=lm1b.")
  if data.source == "stdlib_pairs":
    require(data.name in tasks_lib.TASKS, f"data.source='stdlib_pairs' needs data.name, one of {sorted(tasks_lib.TASKS)}; set e.g. --config.data.name=snake_to_camel.")
  require(data.format in DOCUMENT_FORMATS, f"data.format={data.format!r} is not known; choose one of {sorted(DOCUMENT_FORMATS)}.")
  require(data.packing in PACKING, f"data.packing={data.packing!r} is not known; use {' or '.join(map(repr, PACKING))}.")
  require(0.0 <= data.val_fraction < 1.0, f"data.val_fraction={data.val_fraction} must be in [0, 1); use e.g. 0.02.")
  require(data.process_sharding in PROCESS_SHARDING,
          f"data.process_sharding={data.process_sharding!r} is not known; use one of {PROCESS_SHARDING}.")
  require(isinstance(data.interleave, int) and data.interleave >= 1, f"data.interleave={data.interleave!r} must be a positive integer (1 = one document at a time).")
  for key in ("max_files", "max_bytes", "worker_count", "read_threads"):
    require(isinstance(data[key], int) and data[key] >= 0, f"data.{key}={data[key]!r} must be a non-negative integer.")


@dataclasses.dataclass(frozen=True)
class RecordToExample(grain.transforms.Map):
  """grain transform: a raw record -> document (via ``document_fn``) -> training example."""

  tokenizer: Tokenizer
  document_fn: Any = text_document
  text_key: str = "text"

  def map(self, record):
    return document_to_example(self.document_fn(self.tokenizer, record, self.text_key))


@dataclasses.dataclass(frozen=True)
class _ChunkExample(grain.experimental.FlatMapTransform):
  """Splits an example longer than ``seq_len`` into pieces of at most ``seq_len``."""

  seq_len: int
  max_fan_out: int = 1 << 20

  def flat_map(self, example):
    n = len(example["inputs"])
    return [{k: v[i : i + self.seq_len] for k, v in example.items()} for i in range(0, n, self.seq_len)]


@dataclasses.dataclass(frozen=True)
class _FinalizeRow(grain.transforms.Map):
  """grain's packed features -> inputs/targets/segment_ids/positions/loss_mask."""

  pad_id: int

  def map(self, row):
    seg = np.asarray(row["inputs_segment_ids"], np.int32)
    real = seg > 0
    return {
        "inputs": np.where(real, row["inputs"], self.pad_id).astype(np.int32),
        "targets": np.where(real, row["targets"], self.pad_id).astype(np.int32),
        "segment_ids": seg,
        "positions": np.where(real, row["inputs_positions"], 0).astype(np.int32),
        "loss_mask": np.where(real, row["loss_mask"], 0.0).astype(np.float32),
    }


def pack_examples(
    ds: grain.IterDataset, seq_len: int, *, method: str = "concat", pad_id: int = 0, num_bins: int = 16
) -> grain.IterDataset:
  """Packs examples (from :func:`document_to_example`) into rows of ``seq_len``.

  ``method='concat'`` (default, no padding except at the very end):
  concatenate examples and cut every ``seq_len`` tokens
  (grain's ``ConcatThenSplitIterDataset``); an example cut at a row end
  continues in the next row as a new segment whose positions restart at 0.
  ``method='first_fit'``: split examples longer than ``seq_len`` into
  pieces, then place whole pieces into the first of ``num_bins`` rows with room
  (grain's ``FirstFitPackIterDataset``), padding the rest.

  Each row: ``inputs``, ``targets`` (int32), ``segment_ids`` (1, 2, ... per
  piece, 0 for padding), ``positions`` (restarting at 0 for each segment) and
  ``loss_mask`` (float32, 0 on padding). Targets never cross documents because
  each (input, target) pair comes from one document.
  """
  lengths = {k: seq_len for k in FEATURES}
  if method not in PACKING:
    raise ValueError(f"Unknown data.packing {method!r}; use one of {PACKING}.")
  if method == "concat":
    ds = grain.experimental.ConcatThenSplitIterDataset(ds, length_struct=lengths)
  else:
    ds = grain.experimental.FlatMapIterDataset(ds, _ChunkExample(seq_len))
    ds = grain.experimental.FirstFitPackIterDataset(
        ds, length_struct=lengths, num_packing_bins=num_bins, shuffle_bins=False
    )
  return ds.map(_FinalizeRow(pad_id))


def pack_documents(docs, seq_len: int, **kwargs) -> grain.IterDataset:
  """Packs a sequence or ``MapDataset`` of documents (``{'tokens', 'loss_mask'?}``); see :func:`pack_examples`."""
  ds = docs if isinstance(docs, grain.MapDataset) else grain.MapDataset.source(list(docs))
  ds = ds.map(document_to_example).to_iter_dataset(grain.ReadOptions(num_threads=0))
  return pack_examples(ds, seq_len, **kwargs)


class _InterleaveRowsIterator(grain.DatasetIterator):
  """Takes one element from each of its parents in turn, skipping exhausted ones."""

  def __init__(self, parents: list[grain.DatasetIterator]):
    super().__init__(parents)
    self._next = 0
    self._exhausted = [False] * len(parents)

  def __next__(self):
    for _ in range(len(self._parents)):
      i = self._next
      self._next = (i + 1) % len(self._parents)
      if self._exhausted[i]:
        continue
      try:
        return next(self._parents[i])
      except StopIteration:
        self._exhausted[i] = True
    raise StopIteration

  def get_state(self):
    return {"next": self._next, "exhausted": list(self._exhausted),
            "streams": [p.get_state() for p in self._parents]}

  def set_state(self, state):
    self._next = state["next"]
    self._exhausted = list(state["exhausted"])
    for parent, parent_state in zip(self._parents, state["streams"]):
      parent.set_state(parent_state)


class InterleaveRows(grain.IterDataset):
  """Rows from several packed streams, one from each in turn (round robin; exhausted streams
  are skipped). Deterministic and restorable; grain worker processes slice its sources."""

  def __iter__(self):
    return _InterleaveRowsIterator([iter(p) for p in self.parents])


@dataclasses.dataclass(frozen=True)
class PadBatch(grain.transforms.Map):
  """Pads a final partial batch with empty rows: ``pad_id`` in every ``*inputs`` and
  ``*targets`` array, 0 elsewhere (segment ids, loss masks)."""

  batch_size: int
  pad_id: int

  def map(self, batch):
    n = len(next(iter(batch.values())))
    if n == self.batch_size:
      return batch
    out = {}
    for k, v in batch.items():
      fill = self.pad_id if k.endswith(("inputs", "targets")) else 0
      pad = np.full((self.batch_size - n, *v.shape[1:]), fill, dtype=v.dtype)
      out[k] = np.concatenate([v, pad])
    return out


# ----------------------------------------------------------------------------- iterator


def _tuplify_slices(state: Any) -> Any:
  """JSON turns the tuples in grain's concat-then-split state into lists; undo that."""
  if isinstance(state, dict):
    return {
        k: ({kk: tuple(vv) for kk, vv in v.items()} if k == "remainder_slices" else _tuplify_slices(v))
        for k, v in state.items()
    }
  if isinstance(state, list):
    return [_tuplify_slices(v) for v in state]
  return state


class DataIterator(Iterator[dict[str, np.ndarray]]):
  """Iterator of batches with a JSON-serialisable, restorable state.

  ``get_state()`` returns a dict of plain JSON types; ``set_state(state)`` on a
  fresh iterator built with the same arguments continues with exactly the
  batches the saved iterator would have produced next.
  """

  def __init__(self, dataset: grain.IterDataset, fingerprint: Mapping[str, Any]):
    self._dataset = dataset
    self._it = iter(dataset)
    self.fingerprint = json.loads(json.dumps(dict(fingerprint)))

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._it)

  def get_state(self) -> dict[str, Any]:
    return {
        "version": STATE_VERSION,
        "fingerprint": self.fingerprint,
        "grain": json.loads(json.dumps(self._it.get_state())),
    }

  def set_state(self, state: Mapping[str, Any]) -> None:
    if not isinstance(state, Mapping) or "grain" not in state:
      raise ValueError("Not a data iterator state; pass the dict returned by DataIterator.get_state().")
    if state.get("version") != STATE_VERSION:
      raise ValueError(f"Data iterator state version {state.get('version')} is not {STATE_VERSION}; restart the data.")
    saved = state.get("fingerprint", {})
    diff = sorted(k for k in set(saved) | set(self.fingerprint) if saved.get(k) != self.fingerprint.get(k))
    if diff:
      details = ", ".join(f"{k}: saved {saved.get(k)!r} vs now {self.fingerprint.get(k)!r}" for k in diff)
      raise ValueError(f"The data iterator state was saved for a different pipeline ({details}); use the same data settings to resume.")
    self._it.set_state(_tuplify_slices(json.loads(json.dumps(state["grain"]))))

  def close(self) -> None:
    close = getattr(self._it, "close", None)
    if close is not None:
      close()


def _ensure_absl_flags_parsed() -> None:
  """grain's worker processes read absl flags; outside an absl app, use their defaults."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


# Validation documents and rows are shuffled with this seed, whatever config.seed: every run
# evaluates on the same sample of the validation split.
VALIDATION_SEED = 0


def record_stream(records, data_config: Any, split: str, *, seed: int, num_epochs: int | None, process_index: int,
                  process_count: int, shuffle_validation: bool = False) -> tuple[grain.MapDataset, int | None, int | None]:
  """``(dataset, shuffle_seed, num_epochs)``: the records of ``split`` as this process reads them:
  with ``data.shuffle``, the train split globally shuffled with ``seed`` and reshuffled every epoch,
  the other splits in stored order or, with ``shuffle_validation``, shuffled once with
  ``VALIDATION_SEED`` (``shuffle_seed``: the seed used, None for stored order); repeated ``num_epochs`` times (None: forever for train, once for the other splits), then this
  process's share (every ``process_count``-th record from ``process_index``)."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count}).")
  train = split == "train"
  shuffle_seed = None
  if data_get(data_config, "shuffle") and (train or shuffle_validation):
    shuffle_seed = seed if train else VALIDATION_SEED
  if num_epochs is None and not train:
    num_epochs = 1
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs must be None (forever) or >= 1 but is {num_epochs}.")
  ds = grain.MapDataset.source(records)
  if shuffle_seed is not None:
    ds = ds.shuffle(seed=shuffle_seed)
  return ds.repeat(num_epochs)[process_index::process_count], shuffle_seed, num_epochs


def make_iterator(
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
) -> DataIterator:
  """Batches of packed rows for this process; see the module docstring.

  Args:
    data_config: dict/ConfigDict with ``source`` ('stdlib' | 'text' | 'tfds')
      and its fields (``path``/``glob``, ``name``/``data_dir``, ``max_files``,
      ``max_bytes``, ``val_fraction``, ``text_key``, ``<split>_split``), plus
      ``format`` ('text': one document per record; see ``DOCUMENT_FORMATS``),
      ``shuffle`` (True: seeded global shuffle of the train split, then packed rows
      shuffled within windows of ``shuffle_window`` rows; the other splits the same with
      ``VALIDATION_SEED``), ``interleave`` (documents packed at once, rows taken in turn),
      ``packing`` ('concat' | 'first_fit'), ``worker_count`` (0: tokenize in
      this process), ``read_threads`` (0).
    tokenizer: any :class:`Tokenizer`.
    split: 'train' or 'validation' (or another split of a TFDS dataset).
      Non-train splits are read once by default, in the same order every time.
    seq_len, batch_size: each array is ``[batch_size, seq_len]``
      (``batch_size`` per process).
    seed: shuffle seed (0 <= seed < 2**32); each epoch is reshuffled.
    process_index, process_count: this process's share of the global document
      stream (every ``process_count``-th document from ``process_index``).
    num_epochs: None repeats forever (train) / 1 (other splits).

  Returns:
    A :class:`DataIterator` of dicts: ``inputs``, ``targets``, ``segment_ids``,
    ``positions`` (int32) and ``loss_mask`` (float32), each ``[batch_size, seq_len]``.
    A finite iterator pads its last batch with empty rows (loss_mask 0).
  """
  if seq_len < 1 or batch_size < 1:
    raise ValueError(f"seq_len and batch_size must be positive but are {seq_len} and {batch_size}.")
  source, identity = open_split(data_config, split)
  if len(source) == 0:
    raise ValueError(f"Split {split!r} of {identity} is empty; use a split with documents.")
  ds, shuffle_seed, num_epochs = record_stream(source, data_config, split, seed=seed, num_epochs=num_epochs,
                                               process_index=process_index, process_count=process_count,
                                               shuffle_validation=True)
  packing = data_get(data_config, "packing")
  workers = int(data_get(data_config, "worker_count"))
  pad_id = tokenizer.pad_id
  fmt = data_get(data_config, "format")
  if fmt not in DOCUMENT_FORMATS:
    raise ValueError(f"Unknown data.format {fmt!r}; use one of {sorted(DOCUMENT_FORMATS)}.")
  document_fn = DOCUMENT_FORMATS[fmt]
  template = data_get(data_config, "template")
  if template:  # instruction formats take a prompt template (data.template)
    if fmt not in instruct_lib.FORMATS:
      raise ValueError(f"data.template is set but data.format={fmt!r} takes no template; use 'alpaca' or 'chat', or clear data.template.")
    document_fn = functools.partial(document_fn, template=template)
  to_example = RecordToExample(tokenizer, document_fn, data_get(data_config, "text_key"))
  read_threads = int(data_get(data_config, "read_threads"))
  read = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(1, 4 * read_threads))
  num_bins = int(data_get(data_config, "packing_bins"))
  streams = int(data_get(data_config, "interleave"))
  packed = [pack_examples(part.map(to_example).to_iter_dataset(read), seq_len, method=packing, pad_id=pad_id,
                          num_bins=num_bins)
            for part in ([ds[i::streams] for i in range(streams)] if streams > 1 else [ds])]
  it_ds = InterleaveRows(packed) if streams > 1 else packed[0]
  window = int(data_get(data_config, "shuffle_window")) if shuffle_seed is not None else 0
  if window > 1:  # rows of one long document would otherwise fill whole batches
    it_ds = grain.experimental.WindowShuffleIterDataset(it_ds, window_size=window, seed=shuffle_seed)
  it_ds = it_ds.batch(batch_size, drop_remainder=False).map(PadBatch(batch_size, pad_id))
  if workers > 0:  # each worker runs these steps on its slice of the documents; batches in turn
    _ensure_absl_flags_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  fingerprint = dict(
      data=identity,
      split=split,
      seq_len=seq_len,
      batch_size=batch_size,
      seed=shuffle_seed,
      shuffle=shuffle_seed is not None,
      process_index=process_index,
      process_count=process_count,
      num_epochs=num_epochs,
      packing=packing,
      shuffle_window=window,
      **({"interleave": streams} if streams > 1 else {}),  # 1: the earlier pipeline, its states
      format=fmt,
      worker_count=workers,
      vocab_size=tokenizer.vocab_size,
  )
  return DataIterator(it_ds, fingerprint)
