"""Instruction data: Alpaca-style (instruction, input, output) and chat (messages) records,
prompt templates, and documents whose loss mask covers the response tokens only.

    data.source = 'jsonl'; data.path = 'data/alpaca.jsonl'   # JSON list or JSON Lines files
    data.format = 'alpaca'  (or 'chat')                     # registered in DOCUMENT_FORMATS
    data.template = ''      # '' = the format's default template (below)

A document is ``{'tokens': [BOS, *prompt, *response, EOS], 'loss_mask': [0.., 1..]}``: only the
response (and its EOS) is trained on; packing (`flaxllm.data.pipeline`) carries the mask into
every packed row, also when a document is split across rows.

Alpaca template (Taori et al. 2023), the default for ``format='alpaca'``; a custom
``data.template`` is one format string with ``{instruction}`` and ``{input}`` fields::

    Below is an instruction that describes a task[, paired with an input that provides further
    context]. Write a response that appropriately completes the request.

    ### Instruction:
    {instruction}

    [### Input:
    {input}

    ]### Response:
    {output}<EOS>

Chat (``format='chat'``, records ``{'messages': [{'role': 'system'|'user'|'assistant',
'content': ...}, ...]}`` as in GPT4All / ShareGPT-style JSONL): each turn is rendered with a
per-turn template containing ``{role}`` and ``{content}`` (default
``'### {Role}:\\n{content}\\n\\n'``); assistant contents, each followed by EOS, are trained
on; everything else is context.

Records are split into train/validation by a hash of their content (``data.val_fraction``),
so the split is stable when files are appended to.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

from flaxllm.data.corpus import data_get, split_of

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
CHAT_TURN = "### {Role}:\n{content}\n\n"
ROLES = ("system", "user", "assistant")


class InstructionDataError(ValueError):
  """A record or file that is not instruction data; the message names it and the fix."""


# ----------------------------------------------------------------------------- rendering


def text_field(record: Mapping[str, Any], key: str) -> str:
  """``record[key]`` as text ('' when missing or None)."""
  value = record.get(key, "")
  return "" if value is None else str(value)


def alpaca_prompt(record: Mapping[str, Any], template: str = "") -> str:
  """The prompt of an Alpaca record (everything before the response)."""
  if not isinstance(record, Mapping) or "instruction" not in record or "output" not in record:
    keys = sorted(record) if isinstance(record, Mapping) else type(record).__name__
    raise InstructionDataError("an Alpaca record needs 'instruction' and 'output' (and an "
                               f"optional 'input') but has {keys}; fix the data or use "
                               "data.format='chat'.")
  fields = {"instruction": text_field(record, "instruction"), "input": text_field(record, "input")}
  if not template:
    template = ALPACA_PROMPT if fields["input"].strip() else ALPACA_PROMPT_NO_INPUT
  try:
    return template.format(**fields)
  except (KeyError, IndexError, ValueError) as e:
    raise InstructionDataError(f"data.template {template!r} cannot be filled ({e!r}); use only "
                               f"the fields {{instruction}} and {{input}}.") from None


def _encode(tokenizer, text: str) -> list[int]:
  return list(tokenizer.encode(text)) if text else []


def alpaca_document(tokenizer, record: Any,
                    text_key: str = "text", template: str = "") -> dict[str, np.ndarray]:
  """``data.format='alpaca'``: BOS + prompt (mask 0) + output + EOS (mask 1)."""
  del text_key
  record = _as_record(record)
  prompt = _encode(tokenizer, alpaca_prompt(record, template))
  response = _encode(tokenizer, text_field(record, "output")) + [tokenizer.eos_id]
  tokens = [tokenizer.bos_id, *prompt, *response]
  mask = [0.0] * (1 + len(prompt)) + [1.0] * len(response)
  return {"tokens": np.asarray(tokens, np.int32), "loss_mask": np.asarray(mask, np.float32)}


def chat_turn(tokenizer, message: Any,
              template: str = "") -> tuple[list[int], list[int], list[int]]:
  """One chat message as token ids ``(header, body, footer)``: the per-turn template's text
  before ``{content}``, the content (followed by EOS in an assistant message: what training
  teaches the model to write) and the template's text after ``{content}``."""
  template = template or CHAT_TURN
  if template.count("{content}") != 1:
    raise InstructionDataError(f"the chat template {template!r} must contain {{content}} exactly "
                               f"once (and optionally {{role}} / {{Role}}).")
  role = message.get("role") if isinstance(message, Mapping) else None
  if role not in ROLES:
    raise InstructionDataError(f"chat message role {role!r} is not one of {ROLES}; fix the data.")
  head, tail = template.split("{content}")
  names = {"role": role, "Role": role.capitalize()}
  body = _encode(tokenizer, text_field(message, "content"))
  if role == "assistant":
    body.append(tokenizer.eos_id)
  return _encode(tokenizer, head.format(**names)), body, _encode(tokenizer, tail.format(**names))


def chat_document(tokenizer, record: Any,
                  text_key: str = "text", template: str = "") -> dict[str, np.ndarray]:
  """``data.format='chat'``: turns rendered with the per-turn template (:func:`chat_turn`);
  assistant contents (each followed by EOS) have mask 1, everything else 0."""
  del text_key
  record = _as_record(record)
  messages = record.get("messages") if isinstance(record, Mapping) else None
  if not isinstance(messages, Sequence) or not messages:
    raise InstructionDataError("a chat record needs a non-empty 'messages' list of {'role', "
                               "'content'} dicts; fix the data or use data.format='alpaca'.")
  if not any(isinstance(m, Mapping) and m.get("role") == "assistant" for m in messages):
    raise InstructionDataError("a chat record has no 'assistant' message, so nothing would be "
                               "trained on; drop it or add the response.")
  tokens, mask = [tokenizer.bos_id], [0.0]
  for m in messages:
    header, body, footer = chat_turn(tokenizer, m, template)
    trained = float(m["role"] == "assistant")
    tokens += header + body + footer
    mask += [0.0] * len(header) + [trained] * len(body) + [0.0] * len(footer)
  if tokens[-1] != tokenizer.eos_id:
    tokens.append(tokenizer.eos_id)
    mask.append(0.0)
  return {"tokens": np.asarray(tokens, np.int32), "loss_mask": np.asarray(mask, np.float32)}


def _as_record(record: Any) -> Mapping[str, Any]:
  """Records arrive as dicts (the 'jsonl' source) or as a JSON text feature (bytes/str)."""
  if isinstance(record, Mapping) and "json" in record and len(record) == 1:
    record = record["json"]
  if isinstance(record, bytes):
    record = record.decode("utf-8")
  if isinstance(record, str):
    try:
      record = json.loads(record)
    except json.JSONDecodeError as e:
      raise InstructionDataError(f"an instruction record is not valid JSON ({e}); write one JSON "
                                 "object per line.") from None
  return record


FORMATS = {"alpaca": alpaca_document, "chat": chat_document}


# ----------------------------------------------------------------------------- source


def record_files(path: str, pattern: str | None = None) -> list[str]:
  """The JSON / JSON Lines files of ``path`` (a file, a directory searched with ``pattern``, or
  a glob), sorted."""
  if os.path.isdir(path):
    found = sorted(glob.glob(os.path.join(path, pattern or "**/*.json*"), recursive=True))
  else:
    found = sorted(glob.glob(path)) if any(c in path for c in "*?[") else [path]
  found = [f for f in found if os.path.isfile(f)]
  if not found:
    raise InstructionDataError(f"no instruction data files at {path!r}; point data.path at a "
                               ".json or .jsonl file, a directory of them, or a glob.")
  return found


def read_records(path: str, pattern: str | None = None) -> list[dict]:
  """Every record of the JSON (a list of objects) or JSON Lines files at ``path``."""
  records = []
  for f in record_files(path, pattern):
    with open(f, encoding="utf-8") as fh:
      text = fh.read()
    stripped = text.lstrip()
    if stripped.startswith("["):
      try:
        items = json.loads(text)
      except json.JSONDecodeError as e:
        raise InstructionDataError(f"{f} is not valid JSON ({e}); fix the file.") from None
    else:
      items = []
      for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
          try:
            items.append(json.loads(line))
          except json.JSONDecodeError as e:
            raise InstructionDataError(f"{f} line {n} is not valid JSON ({e}); write one JSON "
                                       "object per line.") from None
    for item in items:
      if not isinstance(item, Mapping):
        raise InstructionDataError(f"{f} holds a {type(item).__name__} where a JSON object (one "
                                   "record) was expected.")
      records.append(dict(item))
  return records


def open_split(data_config: Any, split: str):
  """``data.source='jsonl'``: (records of ``split``, identity) like ``corpus.open_split``."""
  path = data_get(data_config, "path")
  if not path:
    raise InstructionDataError("data.source='jsonl' needs data.path (a .json/.jsonl file, a "
                               "directory or a glob).")
  records = read_records(path, data_get(data_config, "glob"))
  val_fraction = float(data_get(data_config, "val_fraction"))
  keyed = [(json.dumps(r, sort_keys=True), r) for r in records]
  chosen = [r for key, r in keyed if split_of(key, val_fraction) == split]
  if split not in ("train", "validation"):
    raise InstructionDataError("instruction data has the splits 'train' and 'validation', not "
                               f"{split!r}.")
  digest = hashlib.sha256("\n".join(k for k, _ in keyed).encode()).hexdigest()[:12]
  return chosen, f"jsonl:{os.path.basename(os.path.normpath(path))}:{digest}/{split}"
