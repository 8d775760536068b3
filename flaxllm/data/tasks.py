"""Built-in parallel corpora generated from this interpreter's standard library (the default
corpus, so nothing is downloaded): ``data.source='stdlib_pairs'``, ``data.name=<task>``.

Each task is generated once, in a fixed order, from the sorted ``*.py`` files of the standard
library (the first ``data.max_files`` if set) and cached as ``{'source', 'target'}`` JSON Lines
under ``<cache_dir()>/seq2seq/``, keyed by the task, its version, the settings and the files'
paths, sizes and mtimes. Tasks (sizes for the whole CPython 3.11.7 standard library, before the
train/validation split):

- ``'snake_to_camel'`` (easy, 26,863 pairs): the distinct snake_case identifiers of 2 to 4
  lowercase parts and at most 24 characters in the stdlib's code (names, arguments, attributes,
  definitions) -> CamelCase: ``get_config_value`` -> ``GetConfigValue``. With bytes,
  source_len = target_len = 32 cut nothing.
- ``'signature_to_doc'`` (translation-like, 8,492 pairs; score it with BLEU): every function
  with a docstring, as ``module.Class.name(args)`` -> the first line of its docstring:
  ``json.decoder.JSONDecoder.decode(self, s, _w=WHITESPACE.match)`` -> ``Return the Python
  representation of ``s`` (a ``str`` instance``. Sources are 47 / 78 / 132 bytes long at the
  median / 90th / 99th percentile, targets 49 / 65 / 73.

Both are split into train/validation by a hash of each record (``data.val_fraction``) with
:func:`flaxllm.data.instruct.open_split`, so a pair keeps its split when files are added.
"""
from __future__ import annotations

import ast
import json
import logging
import os
import re
import sys
import tempfile
import warnings
from typing import Any, Callable, Iterator

from flaxllm.data import corpus as corpus_lib
from flaxllm.data import instruct as instruct_lib
from flaxllm.data.corpus import data_get

log = logging.getLogger(__name__)

TASK_VERSION = 1  # bump when a task's generation changes: it invalidates the cached pairs
_SNAKE = re.compile(r"[a-z][a-z0-9]*(?:_[a-z][a-z0-9]*){1,3}")
_SNAKE_MAX_CHARS = 24


def _module_name(rel: str) -> str:
  """``json/decoder.py`` -> ``json.decoder``; ``json/__init__.py`` -> ``json``."""
  parts = rel[: -len(".py")].split("/")
  return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def snake_to_camel_pairs(tree: ast.Module, module: str) -> Iterator[tuple[str, str]]:
  """The ``'snake_to_camel'`` task: each snake_case identifier of 2-4 parts -> CamelCase."""
  del module
  for node in ast.walk(tree):
    if isinstance(node, ast.Name):
      name = node.id
    elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      name = node.name
    elif isinstance(node, ast.arg):
      name = node.arg
    elif isinstance(node, ast.Attribute):
      name = node.attr
    else:
      continue
    if len(name) <= _SNAKE_MAX_CHARS and _SNAKE.fullmatch(name):
      yield name, "".join(part.capitalize() for part in name.split("_"))


def signature_to_doc_pairs(tree: ast.Module, module: str) -> Iterator[tuple[str, str]]:
  """The ``'signature_to_doc'`` task: ``module.Qual.name(args)`` -> its docstring's first line."""

  def visit(node: ast.AST, prefix: str) -> Iterator[tuple[str, str]]:
    for child in ast.iter_child_nodes(node):
      if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
        doc = (ast.get_docstring(child) or "").strip()
        if doc:
          yield f"{prefix}{child.name}({ast.unparse(child.args)})", doc.splitlines()[0].strip()
        yield from visit(child, f"{prefix}{child.name}.")
      elif isinstance(child, ast.ClassDef):
        yield from visit(child, f"{prefix}{child.name}.")
      elif isinstance(child, (ast.stmt, ast.excepthandler)):  # defs inside if/try/with blocks
        yield from visit(child, prefix)

  yield from visit(tree, f"{module}.")


# data.name -> function(parsed module, dotted module name) -> (source, target) pairs.
TASKS: dict[str, Callable[[ast.Module, str], Iterator[tuple[str, str]]]] = {
    "snake_to_camel": snake_to_camel_pairs,
    "signature_to_doc": signature_to_doc_pairs,
}


def generate_task(name: str, max_files: int | None = None) -> list[dict[str, str]]:
  """The distinct ``{'source', 'target'}`` records of a task, in generation order.

  Reads the sorted ``*.py`` files of the standard library (the first ``max_files`` if set);
  files that are not UTF-8 or do not parse are skipped.
  """
  task = _task(name)
  root, rels = _stdlib_files(max_files)
  seen: dict[tuple[str, str], None] = {}
  for rel in rels:
    text, _ = corpus_lib.read_text(os.path.join(root, rel))
    if text is None:
      continue
    try:
      with warnings.catch_warnings():  # invalid escapes in old test files
        warnings.simplefilter("ignore")
        tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError):
      continue
    seen.update(dict.fromkeys(task(tree, _module_name(rel))))
  return [{"source": s, "target": t} for s, t in seen]


def _stdlib_files(max_files: int | None) -> tuple[str, list[str]]:
  """(stdlib root, its sorted ``*.py`` paths: the first ``max_files`` if set)."""
  root, rels = corpus_lib.list_files(corpus_lib.stdlib_dir(), "**/*.py", corpus_lib.STDLIB_EXCLUDE)
  return root, rels[: max_files or None]


def _task(name: str):
  if name not in TASKS:
    raise ValueError(f"data.name={name!r} is not a built-in pair task; set data.name to one of "
                     f"{sorted(TASKS)} (data.source='stdlib_pairs').")
  return TASKS[name]


def task_file(name: str, max_files: int | None = None) -> str:
  """The cached JSON Lines file of a built-in task, generated on the first call."""
  _task(name)
  max_files = int(max_files) if max_files else None
  root, rels = _stdlib_files(max_files)
  settings = dict(task=name, task_version=TASK_VERSION, max_files=max_files, root=root,
                  python=sys.version)
  key = corpus_lib.fingerprint(root, rels, settings)
  out_dir = os.path.join(corpus_lib.cache_dir(), "seq2seq")
  path = os.path.join(out_dir, f"{name}_py{sys.version_info[0]}{sys.version_info[1]}_{key}.jsonl")
  if os.path.isfile(path):
    return path
  log.info("Generating the %s pairs from %s into %s", name, root, path)
  records = generate_task(name, max_files)
  os.makedirs(out_dir, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=out_dir)
  with os.fdopen(fd, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
  os.replace(tmp, path)  # atomic: concurrent processes write the same bytes
  return path


def records_config(data_config: Any) -> dict[str, Any]:
  """The :func:`flaxllm.data.instruct.open_split` config of a task's cached records."""
  path = task_file(data_get(data_config, "name"), data_get(data_config, "max_files") or None)
  return {"path": path, "glob": None, "val_fraction": data_get(data_config, "val_fraction")}


def open_split(data_config: Any, split: str):
  """(records of ``split``, identity) of the task ``data.name``, like ``corpus.open_split``."""
  return instruct_lib.open_split(records_config(data_config), split)
