"""Tokenizers: one small interface, SentencePiece (trained and cached, or loaded) and bytes.

``Tokenizer`` has ``encode(str) -> list[int]``, ``decode(list[int]) -> str``,
``vocab_size``, ``bos_id``, ``eos_id`` and ``pad_id``. ``encode`` adds no
BOS/EOS; the data pipeline adds them around each document.

SentencePiece models trained here are lossless for source code: identity
normalisation, no whitespace folding, no dummy prefix, byte fallback for
characters outside the vocabulary, whitespace-only pieces (indentation) and
digits split. A literal U+2581 (the character SentencePiece uses for a space)
is encoded as its UTF-8 bytes so that it too round-trips. Trained models are
cached under ``<cache>/tokenizers/<key>/tokenizer.model``, keyed by the
corpus identity and every training setting, so the second call loads instead
of retraining.
"""

from __future__ import annotations

import abc
import hashlib
import io
import json
import logging
import os
import tempfile
from typing import Any, Iterable, Iterator, Sequence

from ml_collections import ConfigDict
import numpy as np
import sentencepiece as spm

from flaxllm.data import corpus as corpus_lib
from flaxllm.models.config import ConfigError

log = logging.getLogger(__name__)

_SPM_SPACE = "\u2581"


class Tokenizer(abc.ABC):
  """The interface the data pipeline and the trainer rely on."""

  @abc.abstractmethod
  def encode(self, text: str) -> list[int]:
    """Token ids of ``text`` (no BOS/EOS)."""

  @abc.abstractmethod
  def decode(self, ids: Sequence[int]) -> str:
    """Text of ``ids``; special tokens (BOS/EOS/PAD) decode to nothing."""

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    ...

  @property
  @abc.abstractmethod
  def bos_id(self) -> int:
    ...

  @property
  @abc.abstractmethod
  def eos_id(self) -> int:
    ...

  @property
  @abc.abstractmethod
  def pad_id(self) -> int:
    ...

  def token_bytes(self) -> np.ndarray:
    """UTF-8 bytes of the text each id stands for, int32 [vocab_size] (0 for special ids): the
    bytes a prediction of it encodes, for validation loss in bits per byte."""
    return np.asarray([len(self.decode([i]).encode("utf-8")) for i in range(self.vocab_size)], np.int32)


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes as tokens: ids 0, 1, 2 are PAD, BOS, EOS and byte ``b`` is ``b + 3``.

  ``vocab_size`` is 259. Lossless for any text; meant for tests and tiny runs.
  """

  NUM_SPECIAL = 3

  def encode(self, text: str) -> list[int]:
    return [b + self.NUM_SPECIAL for b in text.encode("utf-8")]

  def decode(self, ids: Sequence[int]) -> str:
    n = self.NUM_SPECIAL
    return bytes(int(i) - n for i in ids if n <= int(i) < 256 + n).decode("utf-8", errors="replace")

  @property
  def vocab_size(self) -> int:
    return 256 + self.NUM_SPECIAL

  @property
  def pad_id(self) -> int:
    return 0

  @property
  def bos_id(self) -> int:
    return 1

  @property
  def eos_id(self) -> int:
    return 2

  def token_bytes(self) -> np.ndarray:
    return np.asarray([0] * self.NUM_SPECIAL + [1] * 256, np.int32)

  def __repr__(self) -> str:
    return "ByteTokenizer(vocab_size=259)"


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model (trained here, or an existing one such as LLaMA's).

  ``pad_id`` is the model's PAD id, or 0 when the model defines none (LLaMA);
  padded positions are masked out anyway. Picklable (for grain worker processes).
  """

  def __init__(self, model_proto: bytes, *, path: str | None = None, cached: bool = False):
    self._proto = bytes(model_proto)
    self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    self.path = path
    self.cached = cached  # True when a cached trained model was loaded instead of training.
    byte_ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in _SPM_SPACE.encode("utf-8")]
    has_bytes = all(i != self._sp.unk_id() and self._sp.is_byte(i) for i in byte_ids)
    self._space_bytes = byte_ids if has_bytes else None

  @classmethod
  def load(cls, path: str) -> "SentencePieceTokenizer":
    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
      raise FileNotFoundError(
          f"SentencePiece model {path!r} does not exist; set tokenizer.model_path to an existing tokenizer.model "
          "or leave it empty to train one on the corpus."
      )
    with open(path, "rb") as f:
      proto = f.read()
    try:
      return cls(proto, path=path)
    except RuntimeError as e:
      raise ValueError(
          f"{path!r} is not a valid SentencePiece model ({e}); point tokenizer.model_path at a tokenizer.model file."
      ) from e

  def encode(self, text: str) -> list[int]:
    if self._space_bytes is None or _SPM_SPACE not in text:
      return self._sp.encode(text)
    ids: list[int] = []
    for i, part in enumerate(text.split(_SPM_SPACE)):
      if i:
        ids.extend(self._space_bytes)
      if part:
        ids.extend(self._sp.encode(part))
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def pad_id(self) -> int:
    return self._sp.pad_id() if self._sp.pad_id() >= 0 else 0

  @property
  def model_proto(self) -> bytes:
    return self._proto

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))

  def token_bytes(self) -> np.ndarray:
    """As `Tokenizer.token_bytes`, from the pieces: a byte piece <0xNN> is one byte, '▁' a space."""
    sp = self._sp
    sizes = [0 if sp.is_control(i) or sp.is_unknown(i) else 1 if sp.is_byte(i)
             else len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8")) for i in range(self.vocab_size)]
    return np.asarray(sizes, np.int32)

  def __getstate__(self):
    return {"proto": self._proto, "path": self.path, "cached": self.cached}

  def __setstate__(self, state):
    self.__init__(state["proto"], path=state["path"], cached=state["cached"])

  def __repr__(self) -> str:
    return f"SentencePieceTokenizer(vocab_size={self.vocab_size}, path={self.path!r})"


# ----------------------------------------------------------------------------- training

KINDS = ("sentencepiece", "bytes")
SPM_KEYS = ("vocab_size", "model_type", "character_coverage", "split_digits", "split_by_whitespace",
            "max_train_bytes")


def config_section() -> ConfigDict:
  """``config.tokenizer`` (read by :func:`get_tokenizer`); the one source of its defaults."""
  c = ConfigDict()
  c.kind = "sentencepiece"     # one of KINDS: 'sentencepiece' (trained on the corpus) | 'bytes'
  c.model_path = ""            # an existing tokenizer.model; '' = train one on the corpus
  c.vocab_size = 4096          # sentencepiece training; <= model.vocab_size
  c.model_type = "bpe"         # 'bpe' | 'unigram'
  c.character_coverage = 0.9995
  c.split_digits = True
  c.split_by_whitespace = True
  c.max_train_bytes = 0        # 0 = the whole train split
  return c


def check_section(tokenizer: Any, model_vocab_size: int) -> None:
  """``ConfigError`` (one sentence) for a ``config.tokenizer`` that cannot work."""
  if tokenizer.kind not in KINDS:
    raise ConfigError(f"tokenizer.kind={tokenizer.kind!r} is not known; use one of {KINDS}.")
  if tokenizer.kind == "sentencepiece" and not tokenizer.model_path and not 0 < tokenizer.vocab_size <= model_vocab_size:
    raise ConfigError(f"tokenizer.vocab_size={tokenizer.vocab_size} does not fit model.vocab_size={model_vocab_size}; "
                      "set tokenizer.vocab_size <= model.vocab_size.")


def _get(config: Any, key: str) -> Any:
  """``config[key]`` of a tokenizer config (dict or ConfigDict); missing or None: the default."""
  value = config.get(key) if config is not None and hasattr(config, "get") else None
  return config_section().get(key) if value is None else value


def spm_settings(config: Any) -> dict[str, Any]:
  """The training settings of a tokenizer config (with defaults); part of the cache key."""
  s = {k: _get(config, k) for k in SPM_KEYS}
  s["vocab_size"] = int(s["vocab_size"])
  s["max_train_bytes"] = int(s["max_train_bytes"] or 0)
  # Fixed settings that make the model lossless for code; recorded so a change invalidates the cache.
  s.update(
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      add_dummy_prefix=False,
      byte_fallback=True,
      allow_whitespace_only_pieces=True,
      unk_id=0,
      bos_id=1,
      eos_id=2,
      pad_id=3,
      sentencepiece_version=spm.__version__,
  )
  return s


def _chunks(texts: Iterable[str], max_chars: int) -> Iterator[str]:
  """Splits long documents at line boundaries: SentencePiece limits sentence length."""
  for text in texts:
    while len(text) > max_chars:
      cut = text.rfind("\n", 0, max_chars) + 1 or max_chars
      yield text[:cut]
      text = text[cut:]
    if text:
      yield text


_CHUNK_CHARS = 8192


def train_sentencepiece(texts: Sequence[str], settings: dict[str, Any]) -> bytes:
  """Trains a SentencePiece model on ``texts`` and returns the serialized model."""
  keys = ("vocab_size", "model_type", "character_coverage", "split_digits", "split_by_whitespace",
          "normalization_rule_name", "remove_extra_whitespaces", "add_dummy_prefix", "byte_fallback",
          "allow_whitespace_only_pieces", "unk_id", "bos_id", "eos_id", "pad_id")
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=_chunks(texts, _CHUNK_CHARS),
        model_writer=model,
        max_sentence_length=4 * _CHUNK_CHARS,
        input_sentence_size=0,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
        **{k: settings[k] for k in keys},
    )
  except RuntimeError as e:
    msg = str(e).strip().splitlines()[-1].split("] ")[-1] if str(e).strip() else "training failed"
    raise ValueError(
        f"Cannot train a {settings['vocab_size']}-token SentencePiece model on this corpus ({msg}); "
        "lower tokenizer.vocab_size or train on more text."
    ) from e
  return model.getvalue()


def _is_data_config(obj: Any) -> bool:
  return obj is not None and not isinstance(obj, (str, bytes, list, tuple)) and (
      hasattr(obj, "get") and obj.get("source") is not None
  )


def _corpus_identity(corpus: Any, max_bytes: int) -> tuple[str, list[str] | None]:
  """``(identity, texts)``: texts are read here only when the identity needs them (lists of strings)."""
  corpus = _as_data_config(corpus)
  if _is_data_config(corpus):
    _, identity = corpus_lib.open_split(corpus, "train")
    return f"data:{identity}:{max_bytes}", None
  texts, h, total = [], hashlib.sha256(), 0
  for t in corpus:
    if not isinstance(t, str):
      raise ValueError(f"Tokenizer corpus items must be str, got {type(t).__name__}; pass a data config or strings.")
    texts.append(t)
    h.update(hashlib.sha256(t.encode("utf-8")).digest())
    total += len(t)
    if max_bytes and total >= max_bytes:
      break
  return f"texts:{h.hexdigest()}", texts


def _as_data_config(corpus: Any) -> Any:
  return {"source": "text", "path": os.fspath(corpus)} if isinstance(corpus, (str, os.PathLike)) else corpus


def tokenizer_cache_root() -> str:
  return os.path.join(corpus_lib.cache_dir(), "tokenizers")


def train_or_load_sentencepiece(config: Any, corpus: Any) -> SentencePieceTokenizer:
  """The SentencePiece model for ``corpus`` and ``config``: from the cache, or trained and cached."""
  settings = spm_settings(config)
  identity, texts = _corpus_identity(corpus, settings["max_train_bytes"])
  key = hashlib.sha256(json.dumps({"corpus": identity, **settings}, sort_keys=True).encode()).hexdigest()[:16]
  root = (config.get("cache_dir") if hasattr(config, "get") else None) or tokenizer_cache_root()
  out_dir = os.path.join(os.path.expanduser(root), f"spm{settings['vocab_size']}_{key}")
  path = os.path.join(out_dir, "tokenizer.model")
  if os.path.isfile(path):
    with open(path, "rb") as f:
      return SentencePieceTokenizer(f.read(), path=path, cached=True)
  if texts is None:
    texts = list(corpus_lib.iter_texts(_as_data_config(corpus), "train", settings["max_train_bytes"] or None))
  if not any(t.strip() for t in texts):
    raise ValueError("The tokenizer corpus is empty; point data.path at UTF-8 text files or pass non-empty texts.")
  log.info("Training a %d-token SentencePiece model on %d documents", settings["vocab_size"], len(texts))
  proto = train_sentencepiece(texts, settings)
  os.makedirs(out_dir, exist_ok=True)
  for name, data in (("settings.json", json.dumps({"corpus": identity, **settings}, indent=1).encode()),
                     ("tokenizer.model", proto)):
    fd, tmp = tempfile.mkstemp(dir=out_dir)
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, os.path.join(out_dir, name))  # atomic: concurrent trainers write the same bytes
  return SentencePieceTokenizer(proto, path=path, cached=False)


def get_tokenizer(config: Any, corpus: Any = None) -> Tokenizer:
  """The tokenizer described by ``config`` (a dict or ``ConfigDict``).

  Fields: ``kind`` ('sentencepiece' | 'bytes'); ``model_path`` (an existing
  ``tokenizer.model``, e.g. LLaMA's; if set, nothing is trained); otherwise
  the training settings ``vocab_size`` (4096), ``model_type`` ('bpe'),
  ``character_coverage``, ``split_digits``, ``split_by_whitespace``,
  ``max_train_bytes`` (0 = all), ``cache_dir``.

  ``corpus`` (for training): a data config (``source`` 'stdlib' | 'text' |
  'tfds', its train split is used), a directory of text files, or a list of
  strings.
  """
  kind = _get(config, "kind")
  if kind == "bytes":
    return ByteTokenizer()
  if kind != "sentencepiece":
    raise ValueError(f"Unknown tokenizer.kind {kind!r}; use one of {KINDS}.")
  model_path = _get(config, "model_path")
  if model_path:
    return SentencePieceTokenizer.load(model_path)
  if corpus is None:
    raise ValueError(
        "tokenizer.kind='sentencepiece' without tokenizer.model_path needs a corpus to train on; "
        "pass corpus=config.data or set tokenizer.model_path."
    )
  return train_or_load_sentencepiece(config, corpus)


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
  """Raises ``ValueError`` if the model's embedding cannot hold every token id."""
  if tokenizer.vocab_size > int(model_vocab_size):
    need = -(-tokenizer.vocab_size // 128) * 128
    raise ValueError(
        f"The tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {model_vocab_size}; "
        f"set model.vocab_size to at least {tokenizer.vocab_size} (e.g. {need}) or use a smaller tokenizer."
    )


def fingerprint(tokenizer: Tokenizer) -> tuple | None:
  """('sentencepiece', sha256 of the model proto) | ('bytes',) of a tokenizer, or None: two
  tokenizers with one fingerprint map text to the same ids."""
  if isinstance(tokenizer, SentencePieceTokenizer):
    return ("sentencepiece", hashlib.sha256(tokenizer.model_proto).hexdigest())
  if isinstance(tokenizer, ByteTokenizer):
    return ("bytes",)
  return None
