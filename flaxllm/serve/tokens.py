"""Text and tokens for serving: one interface over flaxllm's tokenizers (sentencepiece, bytes)
and Hugging Face ones, and the chat template.

Prompts given as text are encoded the way training saw documents: after BOS with a flaxllm
tokenizer, with the tokenizer's own special tokens with a Hugging Face one. Chat messages are
rendered with the Hugging Face tokenizer's `chat_template` when it has one, else with the
per-turn template of flaxllm's instruction tuning (`flaxllm.data.instruct.chat_turn`, the
run's `data.template` or the default `### {Role}:\\n{content}\\n\\n`), after BOS and followed by
the assistant's header.
"""
from __future__ import annotations

from typing import Any, Sequence

from flaxllm.data import instruct
from flaxllm.data import tokenizer as tokenizer_lib


class Tokens:
  """`tokenizer`: a flaxllm Tokenizer or a Hugging Face tokenizer; `chat_template`: a flaxllm
  per-turn template ('' = the default), used when the tokenizer has no chat template of its
  own."""

  def __init__(self, tokenizer: Any, chat_template: str = ''):
    self.tok = tokenizer
    self.native = isinstance(tokenizer, tokenizer_lib.Tokenizer)
    self.chat_template = chat_template
    if self.native:
      self.vocab_size = tokenizer.vocab_size
      self.bos_id = tokenizer.bos_id if tokenizer.bos_id >= 0 else None
      self.eos_id = tokenizer.eos_id if tokenizer.eos_id >= 0 else None
    else:
      self.vocab_size = len(tokenizer)
      self.bos_id = tokenizer.bos_token_id
      self.eos_id = tokenizer.eos_token_id
    self.stop_ids = frozenset() if self.eos_id is None else frozenset({self.eos_id})

  def encode(self, text: str) -> list[int]:
    """Ids of `text`, no special tokens."""
    if self.native:
      return self.tok.encode(text)
    return list(self.tok.encode(text, add_special_tokens=False))

  def encode_prompt(self, text: str) -> list[int]:
    """Ids of a prompt: BOS + text (flaxllm), or with the tokenizer's special tokens (HF)."""
    if self.native:
      return ([self.bos_id] if self.bos_id is not None else []) + self.tok.encode(text)
    return list(self.tok.encode(text))

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`; special tokens decode to nothing."""
    if self.native:
      return self.tok.decode(ids)
    return self.tok.decode(list(ids), skip_special_tokens=True)

  def token_text(self, token: int) -> str:
    """The text of one token, or 'token_id:N' when it has none of its own (a special token,
    part of a character): every token of a vocabulary gets a distinct name."""
    text = self.decode([token])
    return text if text and '\ufffd' not in text else f'token_id:{token}'

  def render_chat(self, messages: Sequence[dict]) -> list[int]:
    """The prompt of a conversation (messages {'role', 'content'} with roles system / user /
    assistant), ending where the assistant's reply starts."""
    if not self.native and getattr(self.tok, 'chat_template', None):
      text = self.tok.apply_chat_template(list(messages), tokenize=False,
                                          add_generation_prompt=True)
      return self.encode(text)
    ids = [self.bos_id] if self.bos_id is not None else []
    for message in messages:
      header, body, footer = instruct.chat_turn(self, message, self.chat_template)
      ids += header + body + footer
    header, _, _ = instruct.chat_turn(self, {'role': 'assistant', 'content': ''},
                                      self.chat_template)
    return ids + header
