"""Text corpora as TFDS datasets in ArrayRecord format (no TensorFlow needed).

Three kinds of source, all read back as random-access TFDS data sources:

* ``text``: a directory, file or glob of local text files, built by the
  :class:`FlaxllmText` TFDS builder into ``<cache>/tfds``;
* ``stdlib``: the embedded default corpus, the ``*.py`` files of the running
  interpreter's standard library (present on every machine), built the same way;
* ``tfds``: any prepared TFDS dataset by ``name`` and ``data_dir`` (how TPU VM
  users read ``c4`` or ``lm1b`` from a bucket); it must be in ArrayRecord format.

Local corpora are split deterministically into ``train`` and ``validation`` by a
hash of each file's path relative to the corpus root, so a file never changes
split when files are added or limits change. The built dataset is cached under a
config name that fingerprints the corpus (paths, sizes, mtimes) and the settings,
so a second call with an unchanged corpus only opens the files.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob as glob_lib
import hashlib
import json
import logging
import math
import os
import re
import sys
import sysconfig
from typing import Any, Iterator, Mapping, Sequence

from etils import epath
from ml_collections import ConfigDict, config_dict
import tensorflow_datasets as tfds

log = logging.getLogger(__name__)

BUILDER_NAME = "flaxllm_text"
SPLITS = ("train", "validation")
# Directories of the stdlib tree that are not the standard library's own source.
STDLIB_EXCLUDE = ("site-packages", "dist-packages")


# ----------------------------------------------------------------------------- config helpers


def config_section():
  """``config.data``: where documents come from and how they become batches (flaxllm.data).
  The one source of these defaults: readers fill missing keys from it (``data_get``)."""
  c = ConfigDict()
  c.source = "stdlib"        # one of pipeline.SOURCES: 'stdlib' (embedded default) | 'text'
  #                            (data.path) | 'tfds' (data.name) | 'jsonl' (records: instructions,
  #                            chats, pairs) | 'stdlib_pairs' (a built-in pair task, data.name)
  c.path = ""                # text / jsonl: a file, directory or glob
  c.glob = config_dict.placeholder(str)
  c.name = ""                # tfds: dataset name, e.g. 'lm1b'; stdlib_pairs: the task
  c.data_dir = config_dict.placeholder(str)
  c.train_split = "train"    # tfds split names
  c.validation_split = "validation"
  c.text_key = "text"
  c.source_key = "source"    # pairs (objective='seq2seq', jsonl): the source and target fields
  c.target_key = "target"
  c.format = "text"          # how a record becomes a document (pipeline.DOCUMENT_FORMATS)
  c.template = ""            # alpaca/chat prompt template ('' = the format's default)
  c.val_fraction = 0.02      # stdlib/text/jsonl: share of files (records) held out for validation
  c.max_files = 0            # 0 = no limit
  c.max_bytes = 0
  c.shuffle = True           # seeded global shuffle of the train split, every epoch
  c.interleave = 64          # pack this many documents at once, rows taken from each in turn
  c.shuffle_window = 1024    # then shuffle packed rows within windows of this many rows
  c.packing = "concat"       # one of pipeline.PACKING: 'concat' (no padding) | 'first_fit'
  c.packing_bins = 16
  c.worker_count = 0         # grain worker processes for tokenization (0 = in-process)
  c.read_threads = 0
  # How processes share the global batch: 'source' (each reads its own share of the documents;
  # scales to pods) | 'global' (each builds the whole global batch and keeps its rows: the same
  # data, hence the same losses, on any number of processes).
  c.process_sharding = "source"
  return c


def data_get(cfg: Any, key: str) -> Any:
  """``cfg[key]`` of a data config (dict, ``ConfigDict`` or None); a missing or None value is
  the default of :func:`config_section`."""
  value = cfg.get(key) if cfg is not None and hasattr(cfg, "get") else getattr(cfg, key, None)
  return config_section().get(key) if value is None else value


def cache_dir() -> str:
  """The flaxllm cache directory: ``$FLAXLLM_CACHE`` or ``~/.cache/flaxllm``."""
  return os.path.abspath(os.path.expanduser(os.environ.get("FLAXLLM_CACHE") or "~/.cache/flaxllm"))


def stdlib_dir() -> str:
  return sysconfig.get_paths()["stdlib"]


# ----------------------------------------------------------------------------- file scanning


def _fraction(text: str, salt: str) -> float:
  """A deterministic number in [0, 1) from a string (stable across machines)."""
  digest = hashlib.sha256(f"{salt}:{text}".encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of(relpath: str, val_fraction: float) -> str:
  """``'validation'`` for about ``val_fraction`` of all paths, else ``'train'``."""
  return "validation" if _fraction(relpath, "split") < val_fraction else "train"


def _glob_match(rel: str, pattern: str | None) -> bool:
  if not pattern or pattern in ("**", "**/*"):
    return True
  if pattern.startswith("**/") and "/" not in pattern[3:]:
    return fnmatch.fnmatch(rel.rsplit("/", 1)[-1], pattern[3:])
  return fnmatch.fnmatch(rel, pattern)


def _excluded(rel: str, exclude: Sequence[str]) -> bool:
  name = rel.rsplit("/", 1)[-1]
  return name.startswith(".") or name == "__pycache__" or any(
      fnmatch.fnmatch(rel, pat) or fnmatch.fnmatch(name, pat) for pat in exclude
  )


def list_files(path: str, glob: str | None = None, exclude: Sequence[str] = ()) -> tuple[str, list[str]]:
  """Lists the candidate files of a corpus.

  Args:
    path: a directory (walked recursively and filtered with ``glob``), a single
      file, or a glob pattern such as ``/data/books/*.txt``.
    glob: pattern for paths relative to a directory ``path``: ``**/NAME``
      matches ``NAME`` (fnmatch) at any depth, anything else is matched against
      the whole relative path; default: all files.
    exclude: fnmatch patterns; a directory or file whose relative path or name
      matches one is left out (so are hidden ones and ``__pycache__``).

  Returns:
    ``(root, relpaths)``: the corpus root and the sorted paths relative to it.
  """
  if not path:
    raise ValueError("No corpus path was given; set data.path to a directory, file or glob of text files.")
  path = os.path.abspath(os.path.expanduser(str(path)))
  rels = []
  if os.path.isdir(path):
    root = path
    for dirpath, dirnames, filenames in os.walk(root):
      reldir = os.path.relpath(dirpath, root).replace(os.sep, "/")
      prefix = "" if reldir == "." else reldir + "/"
      dirnames[:] = sorted(d for d in dirnames if not _excluded(prefix + d, exclude))
      rels.extend(prefix + f for f in filenames if _glob_match(prefix + f, glob) and not _excluded(prefix + f, exclude))
  elif os.path.isfile(path):
    root, rels = os.path.dirname(path), [os.path.basename(path)]
  elif glob_lib.has_magic(path):
    root = path
    while glob_lib.has_magic(root):
      root = os.path.dirname(root)
    for m in glob_lib.glob(path, recursive=True):
      rel = os.path.relpath(m, root).replace(os.sep, "/")
      if os.path.isfile(m) and not any(_excluded(r, exclude) for r in _prefixes(rel)):
        rels.append(rel)
  else:
    raise FileNotFoundError(
        f"Corpus path {path!r} does not exist; set data.path to an existing directory, file or glob of text files."
    )
  rels.sort()
  if not rels:
    raise ValueError(
        f"Corpus {path!r} (pattern {glob or '**/*'!r}) matches no files; point data.path/data.glob at text files."
    )
  return root, rels


def _prefixes(rel: str) -> list[str]:
  parts = rel.split("/")
  return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def read_text(filename: str) -> tuple[str | None, str]:
  """Reads a file as UTF-8 text: ``(text, 'ok')`` or ``(None, reason)``.

  ``reason`` is ``'binary'`` (contains NUL bytes), ``'undecodable'`` (not valid
  UTF-8) or ``'empty'`` (nothing but whitespace).
  """
  with open(filename, "rb") as f:
    data = f.read()
  if b"\x00" in data:
    return None, "binary"
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError:
    return None, "undecodable"
  if not text.strip():
    return None, "empty"
  return text, "ok"


@dataclasses.dataclass
class CorpusPlan:
  """Which files go into which split, and which were skipped (and why)."""

  root: str
  files: dict[str, list[str]]  # split -> relpaths, in generation order
  num_bytes: dict[str, int]
  skipped: dict[str, int]  # reason -> count
  inspected: int

  @property
  def num_skipped(self) -> int:
    return sum(self.skipped.values())

  def skip_message(self) -> str:
    details = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items()) if v)
    return f"Skipped {self.num_skipped} of {self.inspected} inspected files in {self.root} ({details})."


def plan_corpus(
    path: str,
    glob: str | None = None,
    *,
    exclude: Sequence[str] = (),
    val_fraction: float = 0.02,
    max_files: int | None = None,
    max_bytes: int | None = None,
) -> CorpusPlan:
  """Decides the deterministic train/validation file lists of a local corpus.

  Each file's split is fixed by a hash of its relative path. Within a split,
  files are taken in the order of a second hash (a uniform sample of the corpus,
  not the first directory alphabetically) until the limits are reached: the
  train split takes at most ``max_files`` files / ``max_bytes`` bytes, the
  validation split ``val_fraction`` of those limits (at least one file); taking
  stops at the first file that would exceed the byte limit. Binary,
  undecodable and empty files are skipped and counted. If no usable file hashes
  into validation, the first usable train file is moved there.
  """
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in [0, 1) but is {val_fraction}; use e.g. 0.02.")
  root, rels = list_files(path, glob, exclude)
  limits = {
      "train": (max_files or None, max_bytes or None),
      "validation": (
          max(1, math.ceil(max_files * val_fraction)) if max_files else None,
          max(1, int(max_bytes * val_fraction)) if max_bytes else None,
      ),
  }
  by_split: dict[str, list[str]] = {s: [] for s in SPLITS}
  for rel in rels:
    by_split[split_of(rel, val_fraction)].append(rel)
  skipped = {"binary": 0, "undecodable": 0, "empty": 0}
  inspected = 0
  files: dict[str, list[str]] = {}
  num_bytes: dict[str, int] = {}
  for split in SPLITS:
    max_n, max_b = limits[split]
    chosen, total = [], 0
    for rel in sorted(by_split[split], key=lambda r: _fraction(r, "order")):
      if max_n is not None and len(chosen) >= max_n:
        break
      if max_b is not None and total >= max_b:
        break
      inspected += 1
      text, reason = read_text(os.path.join(root, rel))
      if text is None:
        skipped[reason] += 1
        continue
      size = len(text.encode("utf-8"))
      if max_b is not None and chosen and total + size > max_b:
        break
      chosen.append(rel)
      total += size
    files[split], num_bytes[split] = chosen, total
  if not files["train"] and not files["validation"]:
    raise ValueError(
        f"Corpus {root!r} has no usable text: all {inspected} inspected files were binary, not UTF-8 or empty; "
        "point data.path at UTF-8 text files."
    )
  if not files["validation"] and val_fraction > 0:
    # Tiny corpora: move one train file (the first in hash order) to validation.
    if len(files["train"]) < 2:
      raise ValueError(
          f"Corpus {root!r} has only {len(files['train'])} usable file(s), too few for a train and a validation "
          "split; add more text files or set data.val_fraction=0."
      )
    rel = files["train"].pop(0)
    size = len(read_text(os.path.join(root, rel))[0].encode("utf-8"))
    files["validation"], num_bytes["validation"] = [rel], size
    num_bytes["train"] -= size
  if not files["train"]:
    raise ValueError(f"Corpus {root!r} has no usable text for the train split; add more UTF-8 text files.")
  plan = CorpusPlan(root=root, files=files, num_bytes=num_bytes, skipped=skipped, inspected=inspected)
  if plan.num_skipped:
    log.warning(plan.skip_message())
  return plan


# ----------------------------------------------------------------------------- TFDS builder


@dataclasses.dataclass(eq=False)
class TextCorpusConfig(tfds.core.BuilderConfig):
  """A local text corpus; ``name`` must fingerprint all the other fields."""

  path: str = ""
  glob: str | None = None
  exclude: tuple[str, ...] = ()
  val_fraction: float = 0.02
  max_files: int | None = None
  max_bytes: int | None = None


class FlaxllmText(tfds.core.GeneratorBasedBuilder):
  """TFDS builder for a local corpus of text files: one example per file.

  Features: ``text`` (the file's UTF-8 text) and ``path`` (relative to the
  corpus root). Splits: ``train`` and ``validation`` (see :func:`plan_corpus`).
  The metadata records how many files were skipped. Build with
  ``file_format='array_record'`` and read with ``builder.as_data_source(split)``
  or ``tfds.data_source('flaxllm_text/<config name>', data_dir=...)``.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS: list[TextCorpusConfig] = []

  # TFDS locates a builder's source through `importlib_resources`, which is not
  # installed without TensorFlow's extras; this builder has no checksums file.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Local text files, one example per file.",
        features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "path": tfds.features.Text()}),
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    c = self.builder_config
    plan = plan_corpus(
        c.path,
        c.glob,
        exclude=c.exclude,
        val_fraction=c.val_fraction,
        max_files=c.max_files,
        max_bytes=c.max_bytes,
    )
    self.info.metadata.update(
        root=plan.root,
        skipped=plan.skipped,
        num_skipped=plan.num_skipped,
        inspected=plan.inspected,
        num_bytes=plan.num_bytes,
    )
    return {split: self._generate_examples(plan.root, plan.files[split]) for split in SPLITS if plan.files[split]}

  def _generate_examples(self, root: str, relpaths: list[str]):
    for rel in relpaths:
      text, reason = read_text(os.path.join(root, rel))
      if text is None:  # Changed on disk since planning.
        raise ValueError(f"Corpus file {rel!r} under {root!r} changed while building ({reason}); build again.")
      yield rel, {"text": text, "path": rel}


# ----------------------------------------------------------------------------- building / loading


def _slug(text: str) -> str:
  return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:40] or "corpus"


def fingerprint(root: str, rels: Sequence[str], settings: Mapping[str, Any]) -> str:
  """A cache key of files under ``root`` (paths, sizes, mtimes) and ``settings``."""
  h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
  h.update(FlaxllmText.VERSION.__str__().encode())
  for rel in rels:
    st = os.stat(os.path.join(root, rel))
    h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
  return h.hexdigest()[:16]


class _DropOurCustomConfigWarning(logging.Filter):
  """Drops TFDS warnings that are normal for our builder: every config is generated (not in
  BUILDER_CONFIGS; also logged in grain workers) and a new one has no dataset_info.json yet."""

  def filter(self, record: logging.LogRecord) -> bool:
    msg = record.getMessage()
    ours = "TextCorpusConfig(" in msg or f"/{BUILDER_NAME}/" in msg
    return not (ours and ("Using custom data configuration" in msg or "has no dataset_info.json" in msg))


logging.getLogger("absl").addFilter(_DropOurCustomConfigWarning())


@dataclasses.dataclass
class BuiltCorpus:
  """A prepared local corpus: read it with ``tfds.data_source(name, data_dir=data_dir)``."""

  name: str  # 'flaxllm_text/<config>:<version>'
  data_dir: str
  builder: tfds.core.DatasetBuilder

  @property
  def metadata(self) -> Mapping[str, Any]:
    return self.builder.info.metadata

  @property
  def num_skipped(self) -> int:
    return int(self.metadata.get("num_skipped", 0))

  def num_examples(self, split: str) -> int:
    return self.builder.info.splits[split].num_examples

  def data_source(self, split: str):
    return self.builder.as_data_source(split=split)


def build_text_corpus(
    path: str,
    glob: str | None = None,
    *,
    exclude: Sequence[str] = (),
    val_fraction: float = 0.02,
    max_files: int | None = None,
    max_bytes: int | None = None,
    data_dir: str | None = None,
    name: str | None = None,
) -> BuiltCorpus:
  """Builds (or reuses from the cache) the ArrayRecord TFDS dataset of a text corpus.

  Args:
    path, glob, exclude: which files (see :func:`list_files`).
    val_fraction: share of files (by path hash) in the validation split.
    max_files, max_bytes: optional limits for a fast subset (see :func:`plan_corpus`).
    data_dir: TFDS data_dir; default ``<cache_dir()>/tfds``.
    name: readable prefix of the config name; default from the path.
  """
  root, rels = list_files(path, glob, exclude)
  settings = dict(
      root=root,
      glob=glob,
      exclude=list(exclude),
      val_fraction=float(val_fraction),
      max_files=int(max_files) if max_files else None,
      max_bytes=int(max_bytes) if max_bytes else None,
  )
  config_name = f"{_slug(name or os.path.basename(root.rstrip('/')))}_{fingerprint(root, rels, settings)}"
  config = TextCorpusConfig(
      name=config_name,
      description=f"Text files under {root}",
      # A directory is read from its root; a single file or a glob as given (never the whole
      # directory of a file: that could put held-out files into training).
      path=root if os.path.isdir(os.path.expanduser(str(path))) else os.path.abspath(
          os.path.expanduser(str(path))),
      glob=glob,
      exclude=tuple(exclude),
      val_fraction=float(val_fraction),
      max_files=settings["max_files"],
      max_bytes=settings["max_bytes"],
  )
  data_dir = data_dir or os.path.join(cache_dir(), "tfds")
  builder = FlaxllmText(config=config, data_dir=data_dir)
  if not builder.is_prepared():
    log.info("Building text corpus %s into %s", config_name, data_dir)
    tfds.disable_progress_bar()
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(try_download_gcs=False),
    )
  elif builder.info.metadata.get("num_skipped"):
    log.info("Cached corpus %s: %s files were skipped when it was built.", config_name, builder.info.metadata["num_skipped"])
  return BuiltCorpus(name=f"{BUILDER_NAME}/{config_name}:{FlaxllmText.VERSION}", data_dir=data_dir, builder=builder)


def build_stdlib_corpus(
    *,
    val_fraction: float = 0.02,
    max_files: int | None = None,
    max_bytes: int | None = None,
    data_dir: str | None = None,
) -> BuiltCorpus:
  """The default corpus: the ``*.py`` files of this interpreter's standard library."""
  return build_text_corpus(
      stdlib_dir(),
      "**/*.py",
      exclude=STDLIB_EXCLUDE,
      val_fraction=val_fraction,
      max_files=max_files,
      max_bytes=max_bytes,
      data_dir=data_dir,
      name=f"stdlib_py{sys.version_info[0]}{sys.version_info[1]}",
  )


def tfds_source(name: str, split: str, data_dir: str | None = None):
  """A prepared TFDS dataset (catalog or local) as a random-access data source.

  Never downloads or builds: the dataset must already be prepared in ArrayRecord
  format under ``data_dir`` (e.g. ``gs://my-bucket/tensorflow_datasets``).
  """
  where = f"under data_dir={data_dir!r}" if data_dir else "in the default TFDS data_dir"
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # DatasetNotFoundError and friends
    raise FileNotFoundError(
        f"TFDS dataset {name!r} was not found {where} ({_first_line(e)}); fix data.name/data.data_dir or "
        "prepare it there with `tfds build --file_format=array_record`."
    ) from e
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"TFDS dataset {name!r} is not prepared {where}; prepare it there with "
        "`tfds build --file_format=array_record` or fix data.name/data.data_dir."
    )
  if split not in builder.info.splits:
    raise ValueError(
        f"TFDS dataset {name!r} has no split {split!r}; set data.{{train,validation}}_split to one of "
        f"{sorted(builder.info.splits)}."
    )
  try:
    return builder.as_data_source(split=split)
  except Exception as e:
    raise ValueError(
        f"Cannot read TFDS dataset {name!r} {where} with random access ({_first_line(e)}); "
        "it must be prepared in ArrayRecord format (tfds build --file_format=array_record)."
    ) from e


def _first_line(e: Exception) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__


def build_local(data_config: Any) -> BuiltCorpus:
  """Builds (or reuses) the local corpus named by a ``source: 'stdlib' | 'text'`` data config."""
  source = data_get(data_config, "source")
  common = dict(
      val_fraction=float(data_get(data_config, "val_fraction")),
      max_files=data_get(data_config, "max_files") or None,
      max_bytes=data_get(data_config, "max_bytes") or None,
      data_dir=data_get(data_config, "data_dir") or None,
  )
  if source == "stdlib":
    return build_stdlib_corpus(**common)
  if source == "text":
    return build_text_corpus(data_get(data_config, "path"), data_get(data_config, "glob"), **common)
  raise ValueError(f"build_local needs data.source 'stdlib' or 'text', not {source!r}.")


def open_split(data_config: Any, split: str):
  """Opens one split of the source named by ``data_config`` as a random-access data source.

  Returns ``(source, identity)``: a sequence of examples (dicts with the text
  feature as ``bytes``) and a string identifying the data (for cache keys).
  """
  source = data_get(data_config, "source")
  if source in ("stdlib", "text"):
    corpus = build_local(data_config)
    if split not in corpus.builder.info.splits:
      raise ValueError(f"Corpus {corpus.name} has no split {split!r}; use one of {list(corpus.builder.info.splits)}.")
    return corpus.data_source(split), f"{corpus.name}/{split}"
  if source == "tfds":
    name = data_get(data_config, "name")
    if not name:
      raise ValueError("data.source='tfds' needs data.name, e.g. 'lm1b' or 'c4/en:3.1.0'.")
    tfds_split = data_get(data_config, f"{split}_split") or split
    ds = tfds_source(name, tfds_split, data_get(data_config, "data_dir") or None)
    info = getattr(ds, "dataset_info", None)
    full_name = getattr(info, "full_name", name)
    return ds, f"{full_name}/{tfds_split}/{len(ds)}"
  raise ValueError(f"Unknown data.source {source!r}; use 'stdlib', 'text' or 'tfds'.")


def iter_texts(data_config: Any, split: str = "train", max_bytes: int | None = None) -> Iterator[str]:
  """Yields the documents of a split as ``str`` (in stored order), up to ``max_bytes``."""
  ds, _ = open_split(data_config, split)
  key = data_get(data_config, "text_key")
  total = 0
  for i in range(len(ds)):
    text = ds[i][key]
    text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
    yield text
    total += len(text)
    if max_bytes and total >= max_bytes:
      return
