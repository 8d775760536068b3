"""The serving engine: continuous batching over a KV cache of a fixed number of slots.

    engine = Engine(model_cfg, params, tokens, slots=8, max_len=512)   # tokens: serve.Tokens
    engine.start()                                                    # the scheduler thread
    request = engine.submit(prompt_ids, Sampling(max_tokens=32), on_event=callback)
    engine.cancel(request)                                            # e.g. the client left
    engine.stop()

The design is JetStream's (prefill, insert, generate) on flaxllm's own decoder cache
(`flaxllm.generate`: Linen 'cache' variables written at one shared `index`):

- The cache has `slots` rows of C = 2 * max_len columns. Every row writes its next key at the
  same column, `index`; a row attends only to its own tokens (segment id 1, every other column
  of the row is segment 0), and each row has its own position counter (RoPE and learned
  positions follow it, not the column).
- prefill: a request's prompt without its last token, left padded to a bucket B (powers of
  two from 16, and max_len), runs through a fresh cache of B columns: one compilation per
  bucket. Its log-probabilities of the prompt tokens come along (for `echo` + `logprobs`).
- insert: that cache row goes to columns [index - B, index) of a free slot, whose other
  columns are zeroed (jitted, the cache donated). `n` choices insert one prefill n times.
- decode: one jitted step feeds every slot its last token (for a new request: its prompt's
  last token) and samples every row with its own settings (temperature, top-k, top-p and a
  key of its own: `seed` makes a request reproducible whatever else runs). Free slots compute
  too and are ignored, so the step has one shape.
- shift: `index` starts at max_len (room for any prompt on its left); when it reaches C, every
  row moves max_len columns left. A live request spans fewer than max_len columns, so nothing
  live falls off.

The scheduler thread admits waiting requests (first come, first served; a request needs `n`
free slots) before every step, runs the step and hands every request its new text through
its `on_event` callback, from that thread. The text is the decoded tokens, cut before the
first stop string; text that may still become a stop string, or is part of a character, is
held back until it is decided. A cancelled request frees its slots before the next step. The
waiting queue is bounded: `submit` raises QueueFull instead of growing it.

Greedy outputs do not depend on what else runs: a row's numbers never mix with other rows'
and the step always has the same shape.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import logging
import os
import threading
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flaxllm import generate
from flaxllm.models.config import ModelConfig
from flaxllm.serve.tokens import Tokens

log = logging.getLogger(__name__)

TOP_LOGPROBS = 5       # the most alternatives a token's log-probs list
MIN_BUCKET = 16


class QueueFull(Exception):
  """The waiting queue is full: the caller should answer 503 and let the client retry."""


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How one request samples. temperature 0 is greedy; top_k 0 and top_p 1 keep every token;
  seed None draws a fresh one; `stop`: strings that end the text (not included in it);
  `logprobs`: send each token's log-prob and its top `logprobs` alternatives (None: none);
  `prompt_logprobs`: the same for the prompt's tokens (`echo`; needs `logprobs`);
  `ignore_eos`: go on after the tokenizer's EOS (benchmarks)."""
  max_tokens: int
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: Optional[int] = None
  stop: tuple[str, ...] = ()
  logprobs: Optional[int] = None
  prompt_logprobs: bool = False
  ignore_eos: bool = False


@dataclasses.dataclass
class TokenLogprob:
  """A token, its log-prob under the model (log-softmax of the logits, before temperature and
  filters) and the top alternatives [(token, log-prob)], most probable first."""
  token: int
  logprob: float
  top: list[tuple[int, float]]


@dataclasses.dataclass
class Delta:
  """New output of one choice: text, the log-probs of the tokens since the last Delta (with
  `logprobs`), and at the end its finish reason ('stop' | 'length') and token count."""
  choice: int
  text: str
  logprobs: list[TokenLogprob]
  finish_reason: Optional[str] = None
  completion_tokens: int = 0


@dataclasses.dataclass
class PromptLogprobs:
  """The log-probs of prompt tokens 1.. (token 0 has none), sent before the first Delta."""
  logprobs: list[TokenLogprob]


@dataclasses.dataclass
class Failure:
  """The engine could not serve the request; `message` is one sentence."""
  message: str


class Request:
  """One prompt with `n` choices, as submitted; `on_event` gets its PromptLogprobs, Deltas and
  Failures (from the scheduler thread)."""
  _ids = itertools.count()

  def __init__(self, prompt: Sequence[int], sampling: Sampling, n: int,
               on_event: Callable[[object], None]):
    self.id = next(self._ids)
    self.prompt = [int(t) for t in prompt]
    self.sampling = sampling
    self.n = n
    self.on_event = on_event
    self.cancelled = False
    seed = sampling.seed if sampling.seed is not None else int.from_bytes(os.urandom(4), 'little')
    self.key = jax.random.key(seed % 2**32)


class _Choice:
  """The host-side state of one choice in a slot."""

  def __init__(self, request: Request, index: int, key_data):
    self.request = request
    self.index = index
    self.key_data = key_data
    self.ids: list[int] = []           # generated, without a final stop token
    self.generated = 0                 # tokens generated, a final stop token included
    self.sent = 0                      # characters of the text already sent
    self.pending: list[TokenLogprob] = []


# ----------------------------------------------------------------------------- jitted parts

@functools.partial(jax.jit, static_argnames=('model',))
def _prefill(model, params, tokens, mask, targets):
  """Prompt tokens [1, B] (left padded) through a fresh cache of B columns: (that cache, the
  log-prob of each target [B] (the next prompt token), top log-probs and ids [B, TOP])."""
  logits, cache, _ = generate.prefill(model, params, tokens, mask, 0, all_logits=True)
  logp = jax.nn.log_softmax(logits[0], axis=-1)
  target_logp = jnp.take_along_axis(logp, targets[0][:, None], axis=-1)[:, 0]
  top_logp, top_ids = jax.lax.top_k(logp, TOP_LOGPROBS)
  return cache, target_logp, top_logp, top_ids


@functools.partial(jax.jit, static_argnames=('scan_layers',), donate_argnames=('cache',))
def _insert(cache, prefilled, slot, column, scan_layers: bool):
  """`cache` with row `slot` emptied and the prefilled row (B slots) at columns
  [column - B, column)."""
  axis = 1 if scan_layers else 0

  def put(path, leaf, new):
    slots = generate.cache_slot_axis(path, scan_layers)
    if slots is None:
      return leaf
    empty = jnp.zeros(leaf.shape[:axis] + (1,) + leaf.shape[axis + 1:], leaf.dtype)
    leaf = jax.lax.dynamic_update_slice_in_dim(leaf, empty, slot, axis)
    start = [0] * leaf.ndim
    start[axis], start[slots] = slot, column - new.shape[slots]
    return jax.lax.dynamic_update_slice(leaf, new.astype(leaf.dtype), start)

  return jax.tree_util.tree_map_with_path(put, cache, prefilled)


@functools.partial(jax.jit, static_argnames=('shift', 'scan_layers'), donate_argnames=('cache',))
def _shift(cache, shift: int, scan_layers: bool):
  """Every row's columns moved `shift` to the left (and the write index with them)."""
  def move(path, leaf):
    slots = generate.cache_slot_axis(path, scan_layers)
    return leaf - shift if slots is None else jnp.roll(leaf, -shift, slots)
  return jax.tree_util.tree_map_with_path(move, cache)


@functools.partial(jax.jit, static_argnames=('model', 'sample'), donate_argnames=('cache',))
def _decode(model, params, cache, tokens, positions, temperature, top_k, top_p, keys, steps,
            sample: bool):
  """One token for every row [slots]: (cache, chosen tokens, their log-probs, top log-probs
  and ids [slots, TOP]). Rows with temperature 0 take the argmax; with `sample`, the others
  draw from their filtered logits with key `keys[row]` folded with `steps[row]`."""
  logits, cache = generate.decoder_logits(model, params, cache, tokens, positions)
  logp = jax.nn.log_softmax(logits, axis=-1)
  chosen = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if sample:
    sampled = temperature > 0
    filtered = generate.filter_logits_per_row(logits, jnp.where(sampled, temperature, 1.0),
                                              top_k, top_p)
    row_keys = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(keys), steps)
    drawn = jax.vmap(jax.random.categorical)(row_keys, filtered).astype(jnp.int32)
    chosen = jnp.where(sampled, drawn, chosen)
  chosen_logp = jnp.take_along_axis(logp, chosen[:, None], axis=-1)[:, 0]
  top_logp, top_ids = jax.lax.top_k(logp, TOP_LOGPROBS)
  return cache, chosen, chosen_logp, top_logp, top_ids


# ----------------------------------------------------------------------------- the engine

class Engine:
  """Continuous batching of a decoder-only model over `slots` slots of `max_len` tokens
  (prompt + completion; default and upper bound: the model's max_seq_len)."""

  def __init__(self, model_cfg: ModelConfig, params, tokens: Tokens, *, slots: int = 8,
               max_len: Optional[int] = None, max_waiting: int = 256):
    if model_cfg.arch != 'decoder':
      raise ValueError(f'serving needs a decoder-only model, got model.arch='
                       f'{model_cfg.arch!r}; serve a decoder-only (GPT-2 / LLaMA) model.')
    max_len = model_cfg.max_seq_len if max_len is None else max_len
    if not 2 <= max_len <= model_cfg.max_seq_len:
      raise ValueError(f'--max-len={max_len} must be between 2 and the model.max_seq_len='
                       f'{model_cfg.max_seq_len}; pick a length in that range.')
    if slots < 1:
      raise ValueError(f'--slots must be >= 1, got {slots}.')
    if tokens.vocab_size > model_cfg.vocab_size:
      raise ValueError(f"the tokenizer has {tokens.vocab_size} tokens but the model's "
                       f'vocab_size is {model_cfg.vocab_size}; serve the model with the '
                       'tokenizer it was trained with.')
    self.model = generate.decode_model(model_cfg)
    self.params = params
    self.tokens = tokens
    self.num_slots = slots
    self.max_len = max_len
    self.max_waiting = max_waiting
    self.buckets = [b for b in (MIN_BUCKET << i for i in range(32)) if b < max_len] + [max_len]
    self._scan = model_cfg.scan_layers
    self._columns = 2 * max_len
    self._index = max_len
    cache = generate.init_cache(self.model, slots, self._columns)
    self._cache = jax.tree_util.tree_map_with_path(
        lambda path, leaf: leaf if generate.cache_slot_axis(path, self._scan) is not None
        else leaf + max_len, cache)
    key_shape = jax.random.key_data(jax.random.key(0)).shape
    self._slots: list[Optional[_Choice]] = [None] * slots
    self._last = np.zeros(slots, np.int32)
    self._positions = np.zeros(slots, np.int32)
    self._temperature = np.zeros(slots, np.float32)
    self._top_k = np.zeros(slots, np.int32)
    self._top_p = np.ones(slots, np.float32)
    self._keys = np.zeros((slots,) + key_shape, np.uint32)
    self._steps = np.zeros(slots, np.int32)
    self._waiting: collections.deque[Request] = collections.deque()
    self._lock = threading.Condition()
    self._running = False
    self._thread: Optional[threading.Thread] = None
    self.steps = 0          # decode steps run
    self.peak_active = 0    # the most slots ever in use at once

  # --------------------------------------------------------------------------- the interface

  def start(self):
    """Starts the scheduler thread."""
    self._running = True
    self._thread = threading.Thread(target=self._loop, name='flaxllm-serve-engine', daemon=True)
    self._thread.start()

  def stop(self):
    """Stops the scheduler thread (requests in flight get no more events)."""
    with self._lock:
      self._running = False
      self._lock.notify_all()
    if self._thread is not None:
      self._thread.join()

  def check(self, prompt: Sequence[int], max_tokens: int) -> Optional[str]:
    """Why this prompt and max_tokens cannot be served (one sentence), or None."""
    if not prompt:
      return 'the prompt is empty; give at least one token.'
    bad = [t for t in prompt if not 0 <= t < self.model.cfg.vocab_size]
    if bad:
      return (f"the prompt holds the token id {bad[0]}, outside the model's vocabulary "
              f'[0, {self.model.cfg.vocab_size}); use ids from that range.')
    if len(prompt) + max_tokens > self.max_len:
      return (f"this model's maximum context length is {self.max_len} tokens, but the prompt "
              f'has {len(prompt)} tokens and max_tokens is {max_tokens}; shorten the prompt or '
              'lower max_tokens.')
    return None

  def submit(self, prompt: Sequence[int], sampling: Sampling, on_event: Callable[[object], None],
             n: int = 1) -> Request:
    """Queues a request (checked with `check` first); QueueFull when the queue is full."""
    problem = self.check(prompt, sampling.max_tokens)
    if problem:
      raise ValueError(problem)
    if not 1 <= n <= self.num_slots:
      raise ValueError(f'n={n} must be between 1 and the number of slots ({self.num_slots}).')
    request = Request(prompt, sampling, n, on_event)
    with self._lock:
      if len(self._waiting) >= self.max_waiting:
        raise QueueFull(f'the server has {self.max_waiting} requests waiting; retry later.')
      self._waiting.append(request)
      self._lock.notify_all()
    return request

  def cancel(self, request: Request):
    """Frees the request's slots before the next step (a finished request: nothing to do)."""
    with self._lock:
      request.cancelled = True
      self._lock.notify_all()

  def active(self) -> int:
    """Slots in use now."""
    return sum(s is not None for s in self._slots)

  def waiting(self) -> int:
    return len(self._waiting)

  # --------------------------------------------------------------------------- the scheduler

  def _loop(self):
    while True:
      with self._lock:
        while self._running and not self._waiting and not self.active():
          self._lock.wait()
        if not self._running:
          return
      self._free_cancelled()
      self._admit()
      if self.active():
        try:
          self._step()
        except Exception as e:  # pylint: disable=broad-except -- keep serving the next requests
          log.exception('decode step failed')
          self._fail_all(f'the decode step failed ({type(e).__name__}: {e}).')

  def _free_cancelled(self):
    for s, choice in enumerate(self._slots):
      if choice is not None and choice.request.cancelled:
        self._slots[s] = None
    with self._lock:
      self._waiting = collections.deque(r for r in self._waiting if not r.cancelled)

  def _admit(self):
    while True:
      free = [s for s, c in enumerate(self._slots) if c is None]
      with self._lock:
        if not self._waiting or len(free) < self._waiting[0].n:
          return
        request = self._waiting.popleft()
      try:
        self._insert(request, free[:request.n])
      except Exception as e:  # pylint: disable=broad-except -- fail this request, serve others
        log.exception('prefill failed')
        request.on_event(Failure(f'the prefill failed ({type(e).__name__}: {e}).'))

  def _insert(self, request: Request, slots: list[int]):
    prompt, sampling = request.prompt, request.sampling
    context = prompt[:-1]
    bucket = next(b for b in self.buckets if b >= len(context))
    tokens, mask = generate.left_pad([context or [0]], length=bucket)
    mask[:, :bucket - len(context)] = False
    targets, _ = generate.left_pad([prompt[1:] or [0]], length=bucket)
    prefilled, target_logp, top_logp, top_ids = _prefill(self.model, self.params, tokens, mask,
                                                         targets)
    if sampling.prompt_logprobs:
      k = len(context)
      values = jax.device_get((target_logp, top_logp, top_ids))
      entries = _logprobs(prompt[1:], *(v[bucket - k:] for v in values), sampling.logprobs or 0)
      request.on_event(PromptLogprobs(entries))
    for index, s in enumerate(slots):
      self._cache = _insert(self._cache, prefilled, s, self._index, scan_layers=self._scan)
      key = jax.random.key_data(jax.random.fold_in(request.key, index))
      self._slots[s] = _Choice(request, index, key)
      self._last[s] = prompt[-1]
      self._positions[s] = len(prompt) - 1
      self._temperature[s] = sampling.temperature
      self._top_k[s] = sampling.top_k
      self._top_p[s] = sampling.top_p
      self._keys[s] = key
      self._steps[s] = 0
    self.peak_active = max(self.peak_active, self.active())

  def _step(self):
    if self._index == self._columns:
      self._cache = _shift(self._cache, shift=self.max_len, scan_layers=self._scan)
      self._index -= self.max_len
    active = [s for s, c in enumerate(self._slots) if c is not None]
    sample = bool((self._temperature[active] > 0).any())
    self._cache, *outputs = _decode(
        self.model, self.params, self._cache, self._last, self._positions, self._temperature,
        self._top_k, self._top_p, self._keys, self._steps, sample=sample)
    self._index += 1
    self.steps += 1
    chosen, chosen_logp, top_logp, top_ids = jax.device_get(outputs)
    self._last[:] = chosen
    self._positions[active] += 1
    self._steps[active] += 1
    for s in active:
      choice = self._slots[s]
      entry = None
      if choice.request.sampling.logprobs is not None:
        entry, = _logprobs([chosen[s]], chosen_logp[s:s + 1], top_logp[s:s + 1],
                           top_ids[s:s + 1], choice.request.sampling.logprobs)
      if self._advance(choice, int(chosen[s]), entry):
        self._slots[s] = None

  def _advance(self, choice: _Choice, token: int, entry: Optional[TokenLogprob]) -> bool:
    """Takes one generated token; sends what is decided; True when the choice is finished."""
    sampling = choice.request.sampling
    choice.generated += 1
    finish = None
    if token in self.tokens.stop_ids and not sampling.ignore_eos:
      finish = 'stop'
    else:
      choice.ids.append(token)
    if entry is not None:
      choice.pending.append(entry)
    if finish is None and choice.generated >= sampling.max_tokens:
      finish = 'length'
    text = self.tokens.decode(choice.ids)
    end, stopped = _decided_text(text, choice.sent, sampling.stop, finish is not None)
    finish = 'stop' if stopped else finish
    if end > choice.sent or finish is not None:
      choice.request.on_event(Delta(choice.index, text[choice.sent:end], choice.pending,
                                    finish, choice.generated))
      choice.sent, choice.pending = end, []
    return finish is not None

  def _fail_all(self, message: str):
    failed = {id(c.request): c.request for c in self._slots if c is not None}
    self._slots = [None] * self.num_slots
    for request in failed.values():
      request.on_event(Failure(message))


def _decided_text(text: str, sent: int, stops: Sequence[str], finished: bool) -> tuple[int, bool]:
  """(end, stopped): `text[:end]` can be sent. With a stop string in the unsent part, the text
  ends before the first one (stopped); otherwise, unless `finished`, a tail that may still
  become a stop string or is part of a character (U+FFFD) is held back."""
  hits = [i for i in (text.find(s, max(0, sent - len(s) + 1)) for s in stops) if i >= 0]
  if hits:
    return max(min(hits), sent), True
  if finished:
    return len(text), False
  end = len(text)
  while end > sent and text[end - 1] == '\ufffd':
    end -= 1
  hold = max((k for s in stops for k in range(1, len(s)) if text[:end].endswith(s[:k])),
             default=0)
  return max(end - hold, sent), False


def _logprobs(tokens, token_logp, top_logp, top_ids, k: int) -> list[TokenLogprob]:
  """TokenLogprob entries of `tokens` [n] from their log-probs [n] and top [n, TOP]."""
  return [TokenLogprob(int(t), float(lp), [(int(i), float(v)) for i, v in zip(ids[:k], vals[:k])])
          for t, lp, vals, ids in zip(tokens, token_logp, top_logp, top_ids)]
