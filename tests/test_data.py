"""Tests for flaxllm.data: corpora (TFDS/ArrayRecord), packing, the grain iterator."""

import collections
import json
import logging
import os
import sysconfig

import numpy as np
import pytest
import tensorflow_datasets as tfds

from flaxllm import data
from flaxllm.data import corpus as corpus_lib

BOS, EOS = 1, 2  # ByteTokenizer: PAD 0, BOS 1, EOS 2, byte b -> b + 3


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("FLAXLLM_CACHE", str(tmp_path_factory.mktemp("flaxllm_cache")))
    yield


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
  """Eight short text documents (one per file), a binary file and a Latin-1 file."""
  root = tmp_path_factory.mktemp("corpus")
  texts = {f"doc{i}.txt": f"document {i}: " + "é\tx " * i + "\n" for i in range(6)}
  texts["sub/deep.txt"] = "nested\n  indented line  \n"
  texts["sub/more.md"] = "# heading\n"
  for rel, text in texts.items():
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text(text, encoding="utf-8")
  (root / "image.bin").write_bytes(bytes(range(256)))  # contains NUL: binary
  (root / "latin1.txt").write_bytes("café\n".encode("latin-1"))  # not UTF-8
  (root / "blank.txt").write_text("  \n\n")  # whitespace only
  return root, texts


def _examples(source):
  return {(ex["path"].decode(), ex["text"].decode()) for ex in (source[i] for i in range(len(source)))}


# ----------------------------------------------------------------------------- local text builder


def test_text_builder_skips_bad_files_and_reads_back_by_name(text_dir, tmp_path, caplog):
  root, texts = text_dir
  with caplog.at_level(logging.WARNING, logger="flaxllm.data.corpus"):
    built = data.build_text_corpus(str(root), val_fraction=0.25, data_dir=str(tmp_path))
  assert "Skipped 3 of 11 inspected files" in caplog.text
  assert built.num_skipped == 3
  assert dict(built.metadata["skipped"]) == {"binary": 1, "undecodable": 1, "empty": 1}

  train, val = _examples(built.data_source("train")), _examples(built.data_source("validation"))
  assert not train & val
  assert train | val == set(texts.items())  # every good file exactly once, none of the bad ones
  assert val and train

  # The catalog code path: a dataset name + data_dir, as for c4 in a bucket.
  by_name = tfds.data_source(built.name, data_dir=str(tmp_path), split="train", download=False)
  assert _examples(by_name) == train
  source, identity = data.open_split({"source": "tfds", "name": built.name, "data_dir": str(tmp_path)}, "validation")
  assert _examples(source) == val and identity.startswith(built.name.split(":")[0])

  # Second call: same dataset from the cache, nothing rebuilt.
  again = data.build_text_corpus(str(root), val_fraction=0.25, data_dir=str(tmp_path))
  assert again.name == built.name and _examples(again.data_source("train")) == train


def test_text_builder_glob_and_limits(text_dir, tmp_path):
  root, texts = text_dir
  built = data.build_text_corpus(str(root / "doc*.txt"), val_fraction=0.25, max_files=3, data_dir=str(tmp_path))
  train = _examples(built.data_source("train"))
  assert len(train) == 3 and {p for p, _ in train} <= {f"doc{i}.txt" for i in range(6)}
  assert built.num_examples("validation") == 1  # ceil(3 * 0.25)


def test_bad_corpus_paths(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    data.build_text_corpus(str(tmp_path / "missing"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="matches no files"):
    data.build_text_corpus(str(tmp_path / "empty"))
  (tmp_path / "bin").mkdir()
  (tmp_path / "bin" / "a.bin").write_bytes(b"\x00\x01")
  (tmp_path / "bin" / "b.txt").write_text("")
  with pytest.raises(ValueError, match="no usable text"):
    data.build_text_corpus(str(tmp_path / "bin"))
  with pytest.raises(FileNotFoundError, match="not found"):
    data.open_split({"source": "tfds", "name": "no_such_dataset_xyz", "data_dir": str(tmp_path)}, "train")
  with pytest.raises(ValueError, match="Unknown data.source"):
    data.open_split({"source": "parquet"}, "train")


# ----------------------------------------------------------------------------- stdlib corpus


def test_stdlib_split_is_deterministic_and_disjoint():
  a = data.plan_corpus(sysconfig.get_paths()["stdlib"], "**/*.py", exclude=corpus_lib.STDLIB_EXCLUDE)
  b = data.plan_corpus(sysconfig.get_paths()["stdlib"], "**/*.py", exclude=corpus_lib.STDLIB_EXCLUDE)
  assert a.files == b.files
  train, val = set(a.files["train"]), set(a.files["validation"])
  assert not train & val
  total = len(train) + len(val)
  assert 0.005 * total < len(val) < 0.05 * total  # val_fraction 0.02 of the files, by path hash
  assert all(data.split_of(p, 0.02) == "validation" for p in val)
  assert all(data.split_of(p, 0.02) == "train" for p in train)
  assert "os.py" in train | val and not any("site-packages" in p for p in train | val)
  assert all(p.endswith(".py") for p in train | val)


def test_stdlib_subset_is_built_and_cached(tmp_path):
  built = data.build_stdlib_corpus(max_files=20, data_dir=str(tmp_path))
  assert built.num_examples("train") == 20 and built.num_examples("validation") == 1
  stdlib = sysconfig.get_paths()["stdlib"]
  train = _examples(built.data_source("train"))
  for path, text in train:
    with open(os.path.join(stdlib, path), encoding="utf-8") as f:
      assert f.read() == text
  again = data.build_stdlib_corpus(max_files=20, data_dir=str(tmp_path))
  assert again.name == built.name and _examples(again.data_source("train")) == train
  smaller = data.build_stdlib_corpus(max_files=10, data_dir=str(tmp_path))
  assert smaller.name != built.name and smaller.num_examples("train") == 10


# ----------------------------------------------------------------------------- packing


def _rows(docs, seq_len, **kw):
  return [{k: v.tolist() for k, v in row.items()} for row in data.pack_documents(docs, seq_len, **kw)]


DOCS = [{"tokens": [1, 10, 11, 12, 2]}, {"tokens": [1, 20, 21, 2]}, {"tokens": [1, 30, 2]}]


def test_concat_packing_hand_computed():
  # Pairs: doc A (1>10, 10>11, 11>12, 12>2), doc B (1>20, 20>21, 21>2), doc C (1>30, 30>2).
  rows = _rows(DOCS, 5)
  assert rows == [
      dict(inputs=[1, 10, 11, 12, 1], targets=[10, 11, 12, 2, 20], segment_ids=[1, 1, 1, 1, 2],
           positions=[0, 1, 2, 3, 0], loss_mask=[1, 1, 1, 1, 1]),
      # B continues as a new segment; then C; then one padding slot.
      dict(inputs=[20, 21, 1, 30, 0], targets=[21, 2, 30, 2, 0], segment_ids=[1, 1, 2, 2, 0],
           positions=[0, 1, 0, 1, 0], loss_mask=[1, 1, 1, 1, 0]),
  ]


def test_first_fit_packing_hand_computed():
  rows = _rows(DOCS, 5, method="first_fit", num_bins=2)
  assert rows == [
      dict(inputs=[1, 10, 11, 12, 0], targets=[10, 11, 12, 2, 0], segment_ids=[1, 1, 1, 1, 0],
           positions=[0, 1, 2, 3, 0], loss_mask=[1, 1, 1, 1, 0]),
      dict(inputs=[1, 20, 21, 1, 30], targets=[20, 21, 2, 30, 2], segment_ids=[1, 1, 1, 2, 2],
           positions=[0, 1, 2, 0, 1], loss_mask=[1, 1, 1, 1, 1]),
  ]
  # A document longer than a row is split into row-sized pieces.
  assert _rows([{"tokens": [1, 5, 6, 7, 8, 2]}], 3, method="first_fit", num_bins=1) == [
      dict(inputs=[1, 5, 6], targets=[5, 6, 7], segment_ids=[1, 1, 1], positions=[0, 1, 2], loss_mask=[1, 1, 1]),
      dict(inputs=[7, 8, 0], targets=[8, 2, 0], segment_ids=[1, 1, 0], positions=[0, 1, 0], loss_mask=[1, 1, 0]),
  ]


def test_document_loss_mask_is_carried_through_packing():
  # Instruction-style document: only the response tokens (22, 23, EOS) are trained on.
  doc = {"tokens": [1, 20, 21, 22, 23, 2], "loss_mask": [0, 0, 0, 1, 1, 1]}
  rows = _rows([doc, {"tokens": [1, 30, 2]}], 4)
  assert rows[0] == dict(inputs=[1, 20, 21, 22], targets=[20, 21, 22, 23], segment_ids=[1, 1, 1, 1],
                         positions=[0, 1, 2, 3], loss_mask=[0, 0, 1, 1])
  assert rows[1] == dict(inputs=[23, 1, 30, 0], targets=[2, 30, 2, 0], segment_ids=[1, 2, 2, 0],
                         positions=[0, 0, 1, 0], loss_mask=[1, 1, 1, 0])
  with pytest.raises(ValueError, match="loss_mask"):
    data.document_to_example({"tokens": [1, 2, 3], "loss_mask": [1, 1]})


@pytest.mark.parametrize("method", ["concat", "first_fit"])
def test_packed_targets_never_cross_documents(method):
  rng = np.random.default_rng(0)
  docs = [{"tokens": [BOS, *rng.integers(3, 259, rng.integers(1, 40)), EOS]} for _ in range(50)]
  rows = list(data.pack_documents(docs, 16, method=method))
  real_pairs = 0
  for r in rows:
    seg, m = r["segment_ids"], r["loss_mask"]
    assert r["inputs"].dtype == np.int32 and m.dtype == np.float32
    assert np.all((seg > 0) == (m > 0))
    real_pairs += int((seg > 0).sum())
    same = (seg[:-1] == seg[1:]) & (seg[:-1] > 0)
    np.testing.assert_array_equal(r["targets"][:-1][same], r["inputs"][1:][same])  # next token of the same doc
    assert not np.any(r["targets"][seg > 0] == BOS)  # a target is never the next document's BOS
    for s in set(seg[seg > 0].tolist()):  # positions count 0, 1, 2... within each segment
      np.testing.assert_array_equal(r["positions"][seg == s], np.arange((seg == s).sum()))
  assert real_pairs == sum(len(d["tokens"]) - 1 for d in docs)


# ----------------------------------------------------------------------------- iterator


@pytest.fixture(scope="module")
def small_stdlib():
  return {"source": "stdlib", "max_files": 12, "val_fraction": 0.1}


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("packing", ["concat", "first_fit"])
def test_iterator_batches_and_state_restore(small_stdlib, packing):
  cfg = dict(small_stdlib, packing=packing)
  tok = data.ByteTokenizer()
  kw = dict(split="train", seq_len=32, batch_size=3, seed=7)
  it = data.make_iterator(cfg, tok, **kw)
  first = _take(it, 5)
  for b in first:
    assert set(b) == {"inputs", "targets", "segment_ids", "positions", "loss_mask"}
    for k, v in b.items():
      assert v.shape == (3, 32) and v.dtype == (np.float32 if k == "loss_mask" else np.int32)
  state = json.loads(json.dumps(it.get_state()))  # JSON round trip, as a checkpoint would store it
  expected = _take(it, 6)

  fresh = data.make_iterator(cfg, tok, **kw)
  fresh.set_state(state)
  _assert_same(_take(fresh, 6), expected)

  with pytest.raises(ValueError, match="different pipeline.*seq_len"):
    data.make_iterator(cfg, tok, **dict(kw, seq_len=16)).set_state(state)


def test_seeded_shuffle_is_reproducible_and_differs_by_seed(small_stdlib):
  tok = data.ByteTokenizer()
  kw = dict(split="train", seq_len=64, batch_size=2)
  a = _take(data.make_iterator(small_stdlib, tok, seed=1, **kw), 3)
  b = _take(data.make_iterator(small_stdlib, tok, seed=1, **kw), 3)
  c = _take(data.make_iterator(small_stdlib, tok, seed=2, **kw), 3)
  _assert_same(a, b)
  assert not np.array_equal(a[0]["inputs"], c[0]["inputs"])
  # Validation: stored order, no shuffle, one epoch; the seed does not matter.
  v1 = list(data.make_iterator(small_stdlib, tok, split="validation", seq_len=64, batch_size=2, seed=1))
  v2 = list(data.make_iterator(small_stdlib, tok, split="validation", seq_len=64, batch_size=2, seed=2))
  _assert_same(v1, v2)


def _documents_seen(it, tok):
  """Decodes every packed segment (first-fit with rows longer than any doc: one segment per doc)."""
  docs = []
  for b in it:
    for inputs, targets, seg in zip(b["inputs"], b["targets"], b["segment_ids"]):
      for s in sorted(set(seg[seg > 0].tolist())):
        x, y = inputs[seg == s], targets[seg == s]
        assert x[0] == BOS and y[-1] == EOS
        docs.append(tok.decode(y[:-1]))
  return docs


def test_processes_get_disjoint_shares(text_dir):
  root, texts = text_dir
  cfg = {"source": "text", "path": str(root), "val_fraction": 0.25, "packing": "first_fit"}
  tok = data.ByteTokenizer()
  train_texts = collections.Counter(t for _, t in _examples(data.open_split(cfg, "train")[0]))
  assert len(train_texts) >= 4

  def seen(process_index, num_epochs):
    it = data.make_iterator(cfg, tok, split="train", seq_len=128, batch_size=2, seed=3,
                            process_index=process_index, process_count=2, num_epochs=num_epochs)
    return collections.Counter(_documents_seen(it, tok))

  shares = [seen(0, 1), seen(1, 1)]
  assert shares[0] and shares[1] and not set(shares[0]) & set(shares[1])
  assert shares[0] + shares[1] == train_texts  # one epoch: every document exactly once, on one process
  two_epochs = seen(0, 2) + seen(1, 2)
  assert two_epochs == {t: 2 for t in train_texts}


def test_finite_iterator_covers_every_token(small_stdlib):
  # With bytes, each document of b bytes gives b + 1 (input, target) pairs: BOS..last byte -> ..EOS.
  tok = data.ByteTokenizer()
  source, _ = data.open_split(small_stdlib, "train")
  expected = sum(len(source[i]["text"]) + 1 for i in range(len(source)))
  batches = list(data.make_iterator(small_stdlib, tok, split="train", seq_len=128, batch_size=4, seed=0, num_epochs=1))
  assert sum(int(b["loss_mask"].sum()) for b in batches) == expected
  assert all(b["inputs"].shape == (4, 128) for b in batches)  # the last batch is padded with empty rows


def test_iterator_bad_arguments(small_stdlib):
  tok = data.ByteTokenizer()
  with pytest.raises(ValueError):
    data.make_iterator(small_stdlib, tok, split="train", seq_len=8, batch_size=2, seed=0, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="packing"):
    data.make_iterator(dict(small_stdlib, packing="zip"), tok, split="train", seq_len=8, batch_size=2, seed=0)
  with pytest.raises(ValueError, match="no split"):
    data.make_iterator(small_stdlib, tok, split="test", seq_len=8, batch_size=2, seed=0)
  with pytest.raises(ValueError, match="Unknown data.format"):
    data.make_iterator(dict(small_stdlib, format="no_such_format"), tok, split="train", seq_len=8, batch_size=2, seed=0)


def test_validation_iterator_rewinds_to_its_start(small_stdlib):
  # The trainer evaluates the same batches each time by restoring the state taken at creation.
  tok = data.ByteTokenizer()
  it = data.make_iterator(small_stdlib, tok, split="validation", seq_len=64, batch_size=2, seed=0)
  start = it.get_state()
  everything = list(it)  # runs to the end
  assert everything
  it.set_state(start)
  _assert_same(list(it), everything)
  it.set_state(start)
  _assert_same(_take(it, 1), everything[:1])


@pytest.mark.slow
def test_worker_processes_give_the_same_batches_and_restore(small_stdlib):
  tok = data.ByteTokenizer()
  kw = dict(split="train", seq_len=32, batch_size=3, seed=7)
  expected = _take(data.make_iterator(small_stdlib, tok, **kw), 8)
  it = data.make_iterator(dict(small_stdlib, worker_count=1), tok, **kw)
  try:
    _assert_same(_take(it, 3), expected[:3])
    state = json.loads(json.dumps(it.get_state()))
  finally:
    it.close()
  fresh = data.make_iterator(dict(small_stdlib, worker_count=1), tok, **kw)
  try:
    fresh.set_state(state)
    _assert_same(_take(fresh, 5), expected[3:])
  finally:
    fresh.close()


def test_long_documents_do_not_fill_the_steps(tmp_path):
  """The cause of the default job's train/validation gap, and its guard: documents that pack
  into many rows (source files) filled whole windows of rows with a handful of documents, so a
  short run trained on a few files and its training loss fell on text it had just seen. With
  `data.interleave` the rows of every batch come from as many documents as it allows, and the
  first rows of validation sample its documents rather than the first one."""
  root = tmp_path / "long_docs"
  root.mkdir()
  for i in range(40):  # document i: '<i>\n' over and over, ~94 rows of 32 bytes
    (root / f"doc{i:02d}.txt").write_text(f"{i:03d}\n" * 750)
  tok = data.ByteTokenizer()
  base = {"source": "text", "path": str(root), "data_dir": str(tmp_path / "tfds"), "val_fraction": 0.2,
          "shuffle_window": 16}

  def documents_per_batch(split, interleave, batches=20):
    it = data.make_iterator(dict(base, interleave=interleave), tok, split=split, seq_len=32, batch_size=8, seed=0)
    out = []
    for batch in _take(it, batches):
      docs = set()
      for row, mask in zip(batch["targets"], batch["loss_mask"]):
        text = tok.decode(row[mask > 0])
        docs |= {int(line) for line in text.split("\n")[1:-1] if len(line) == 3}
      out.append(docs)
    return out

  one_at_a_time = documents_per_batch("train", interleave=1)
  assert len(set().union(*one_at_a_time)) <= 3          # 160 rows of training from <= 3 files
  interleaved = documents_per_batch("train", interleave=16)
  assert len(set().union(*interleaved)) >= 16
  assert min(len(d) for d in interleaved) >= 5          # every batch of 8 rows: >= 5 documents
  validation = documents_per_batch("validation", interleave=16, batches=2)
  assert len(set().union(*validation)) >= 5             # the first 2 batches: several documents
