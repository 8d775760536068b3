"""Tests for flaxllm.data tokenizers: SentencePiece (trained, cached, loaded) and bytes."""

import pickle

import pytest

from flaxllm import data
from flaxllm.data import tokenizer as tokenizer_lib

TRICKY = (
    "def f(x):\n\tif x:\t# tab\n\t\treturn  x   \n    pass    \n\n\n"  # tabs, trailing spaces, blank lines
    "s = 'café naïve 日本語 🐍 Ωμέγα'\r\nz = '\u2581 literal lower-one-eighth block\u2581\u2581'\n"
    "  leading spaces\x0bvt\x0cff\u00a0nbsp 12345678901234567890\n"
)


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("FLAXLLM_CACHE", str(tmp_path_factory.mktemp("flaxllm_cache")))
    yield


# Trained on 40 stdlib files; held-out files are the validation split of a larger subset,
# i.e. files the tokenizer never saw.
TRAIN_CORPUS = {"source": "stdlib", "max_files": 40}
SPM = {"kind": "sentencepiece", "vocab_size": 1024}


@pytest.fixture(scope="module")
def spm_tok():
  return data.get_tokenizer(SPM, corpus=TRAIN_CORPUS)


def test_sentencepiece_round_trips_held_out_stdlib_exactly(spm_tok):
  assert isinstance(spm_tok, data.SentencePieceTokenizer) and spm_tok.vocab_size == 1024
  assert not spm_tok.cached
  trained_on = {p for p, _ in _paths_texts(TRAIN_CORPUS, "train")}
  held_out = [(p, t) for p, t in _paths_texts({"source": "stdlib", "max_files": 600}, "validation")]
  held_out = [(p, t) for p, t in held_out if p not in trained_on][:8]
  assert len(held_out) >= 5
  for path, text in held_out + [("tricky", TRICKY)]:
    ids = spm_tok.encode(text)
    assert all(0 <= i < spm_tok.vocab_size for i in ids)
    assert spm_tok.decode(ids) == text, path
  # Code-friendly vocabulary: indentation pieces and single digits only.
  pieces = [spm_tok.id_to_piece(i) for i in range(spm_tok.vocab_size)]
  assert "\u2581" * 4 in pieces and "\u2581" * 8 in pieces
  assert not any(len(p) > 1 and p.isdigit() for p in pieces)
  assert [spm_tok.id_to_piece(i) for i in spm_tok.encode("2024")] == ["2", "0", "2", "4"]
  assert (spm_tok.bos_id, spm_tok.eos_id, spm_tok.pad_id) == (1, 2, 3)
  assert spm_tok.decode([spm_tok.bos_id, *spm_tok.encode("x = 1"), spm_tok.eos_id, spm_tok.pad_id]) == "x = 1"


def _paths_texts(cfg, split):
  source, _ = data.open_split(cfg, split)
  return [(source[i]["path"].decode(), source[i]["text"].decode()) for i in range(len(source))]


def test_sentencepiece_cache_hit_does_not_retrain(spm_tok, monkeypatch):
  def fail(*a, **k):
    raise AssertionError("retrained although a cached model exists")

  monkeypatch.setattr(tokenizer_lib, "train_sentencepiece", fail)
  again = data.get_tokenizer(SPM, corpus=TRAIN_CORPUS)
  assert again.cached and again.path == spm_tok.path and again.model_proto == spm_tok.model_proto
  # A different setting or corpus is a different cache entry (so it would train).
  with pytest.raises(AssertionError, match="retrained"):
    data.get_tokenizer(dict(SPM, vocab_size=1000), corpus=TRAIN_CORPUS)
  with pytest.raises(AssertionError, match="retrained"):
    data.get_tokenizer(SPM, corpus=dict(TRAIN_CORPUS, max_files=41))


def test_load_existing_model_path(spm_tok):
  loaded = data.get_tokenizer({"kind": "sentencepiece", "model_path": spm_tok.path})
  assert loaded.vocab_size == spm_tok.vocab_size
  assert loaded.encode(TRICKY) == spm_tok.encode(TRICKY)
  clone = pickle.loads(pickle.dumps(loaded))  # grain worker processes receive a pickled tokenizer
  assert clone.encode(TRICKY) == loaded.encode(TRICKY) and clone.decode(clone.encode(TRICKY)) == TRICKY


def test_train_on_list_of_strings_and_directory(tmp_path):
  texts = [f"def function_{i}(arg):\n    return arg * {i}\n" for i in range(200)]
  tok = data.get_tokenizer({"kind": "sentencepiece", "vocab_size": 300}, corpus=texts)
  assert tok.vocab_size == 300 and tok.decode(tok.encode(texts[7])) == texts[7]
  for i, t in enumerate(texts[:20]):
    (tmp_path / f"f{i}.py").write_text(t)
  tok2 = data.get_tokenizer({"kind": "sentencepiece", "vocab_size": 290}, corpus=str(tmp_path))
  assert tok2.vocab_size == 290 and tok2.decode(tok2.encode(TRICKY)) == TRICKY


def test_byte_tokenizer():
  tok = data.get_tokenizer({"kind": "bytes"})
  assert isinstance(tok, data.ByteTokenizer)
  assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 0, 1, 2)
  assert tok.encode("A\té") == [ord("A") + 3, 9 + 3, 0xC3 + 3, 0xA9 + 3]  # UTF-8 of é is C3 A9
  assert tok.decode([1, ord("A") + 3, 2, 0]) == "A"
  assert tok.decode(tok.encode(TRICKY)) == TRICKY
  assert tok.encode("") == [] and tok.decode([]) == ""


def test_check_vocab():
  tok = data.ByteTokenizer()
  data.check_vocab(tok, 259)
  data.check_vocab(tok, 384)  # a padded embedding is fine
  with pytest.raises(ValueError, match=r"tokenizer has 259 tokens but the model's vocab_size is 256; "
                                       r"set model.vocab_size to at least 259 \(e.g. 384\)"):
    data.check_vocab(tok, 256)


def test_tokenizer_bad_inputs(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    data.get_tokenizer({"kind": "sentencepiece", "model_path": str(tmp_path / "nope.model")})
  (tmp_path / "garbage.model").write_bytes(b"not a model")
  with pytest.raises(ValueError, match="not a valid SentencePiece model"):
    data.get_tokenizer({"kind": "sentencepiece", "model_path": str(tmp_path / "garbage.model")})
  with pytest.raises(ValueError, match="needs a corpus"):
    data.get_tokenizer({"kind": "sentencepiece"})
  with pytest.raises(ValueError, match="Unknown tokenizer.kind"):
    data.get_tokenizer({"kind": "wordpiece"})
  with pytest.raises(FileNotFoundError, match="does not exist"):
    data.get_tokenizer({"kind": "sentencepiece"}, corpus={"source": "text", "path": str(tmp_path / "missing")})
  with pytest.raises(ValueError, match="corpus is empty"):
    data.get_tokenizer({"kind": "sentencepiece"}, corpus=["", "  \n"])
  empty_dir = tmp_path / "empty"
  empty_dir.mkdir()
  with pytest.raises(ValueError, match="matches no files"):
    data.get_tokenizer({"kind": "sentencepiece"}, corpus=str(empty_dir))
  with pytest.raises(ValueError, match="lower tokenizer.vocab_size"):
    data.get_tokenizer({"kind": "sentencepiece", "vocab_size": 50000}, corpus=["tiny corpus\n"] * 3)
