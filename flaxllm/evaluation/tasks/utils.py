"""Loads the JSONL data of flaxllm's tasks (`custom_dataset: !function utils.load_jsonl`).

lm-eval hands `dataset_kwargs` to `datasets.load_dataset`, which resolves a relative
`data_files` path against the working directory, not the YAML file; this loader resolves
`data_file` against this folder instead, so the tasks run from any directory (and from an
installed package), without a download or a Hugging Face cache entry.

Your own task folder (`--include-path=DIR`) can do the same with a `DIR/utils.py` of

    import os
    from flaxllm.evaluation.tasks.utils import jsonl_loader
    load_jsonl = jsonl_loader(os.path.dirname(os.path.abspath(__file__)))
"""
from __future__ import annotations

import json
import os

import datasets

HERE = os.path.dirname(os.path.abspath(__file__))


def jsonl_loader(folder: str):
  """A `custom_dataset` function for the tasks of `folder`: it reads `data_file` (relative to
  `folder`) as a DatasetDict split by the rows' `split` field (e.g. train: few-shot examples,
  test: scored); lm-eval passes its metadata too (ignored)."""
  def load_jsonl(data_file: str, **unused) -> datasets.DatasetDict:
    del unused
    splits: dict[str, list[dict]] = {}
    with open(os.path.join(folder, data_file), encoding='utf-8') as f:
      for line in f:
        row = json.loads(line)
        splits.setdefault(row.pop('split'), []).append(row)
    return datasets.DatasetDict({name: datasets.Dataset.from_list(rows)
                                 for name, rows in splits.items()})
  return load_jsonl


load_jsonl = jsonl_loader(HERE)
