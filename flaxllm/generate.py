"""Autoregressive generation with the KV cache: sampling or beam search, for the decoder-only
LM and the encoder-decoder Transformer; each a jitted decode loop.

    from flaxllm import generate, models
    cfg = models.presets.get('tiny_llama')
    params = models.init_params(models.build(cfg), jax.random.key(0))
    out = generate.generate(cfg, params, [[1, 2, 3], [4, 5]], max_new_tokens=16,
                            temperature=0.8, top_p=0.9, stop_tokens=(2,), seed=0)
    # out: one list of generated ids per prompt (no padding; ends with the stop token if hit)
    best = generate.beam_search(cfg, params, [[1, 2, 3]], num_beams=4, max_new_tokens=16,
                                length_penalty=1.0, stop_tokens=(2,))
    # encoder-decoder: generate_seq2seq / beam_search_seq2seq(cfg, params, sources, bos_id=...)

How it works. Prompts of different lengths are LEFT padded to one length P, so every row
decodes at the same cache slot: pad slots get segment id 0 and real tokens segment id 1 (the
attention kernel only lets a query see slots of its own segment), and positions count only
real tokens (cumsum of the mask - 1). `generate_tokens` is a single `jax.jit`: it creates the
empty cache of static length P + max_new_tokens, runs one prefill call over the whole padded
prompt, then a `lax.while_loop` feeds one token per step, sampling with `sample_logits`. The
loop exits early once every row has emitted a stop token; finished rows emit `pad_id`.

An encoder-decoder model encodes its RIGHT padded source once (source segment ids = the mask);
the target starts with `bos_id` at position 0 and its self-attention keys/values go to the
cache one token per step, while cross-attention reads the encoded source.

Beam search (`beam_search_tokens`, `seq2seq_beam_search_tokens`) follows Hugging Face
transformers' `generate(num_beams=N, do_sample=False, early_stopping=False)`: each row keeps
N running beams of summed log-probabilities; every step the best max(2, 1 + #stop tokens) * N
continuations over all beams are ranked, the best N that did not stop keep running, and those
among the best N that ended in a stop token become finished hypotheses scored
sum_logprobs / generated_length ** length_penalty (the length counts generated tokens, the
stop token included, not the prompt or the target's BOS). At `max_new_tokens` every candidate
counts as finished. A row's finished hypotheses stop changing once N are kept and its best
running beam, scored at the current length, is no better than the worst of them; the loop
exits when that holds for every row. The result is the best finished hypothesis. The cache has
batch * num_beams rows and is reordered by beam every step.

Sampling and beam settings, `max_new_tokens`, `stop_tokens` and the model are static (a new
value compiles a new function; the same values reuse it); `length_penalty` is traced. The list
wrappers round the padded prompt (source) length up to a multiple of `pad_to_multiple` so
inputs of similar lengths share one compilation.
"""
from __future__ import annotations

import argparse
import functools
import json
import re
import sys
from typing import Any, Callable, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxllm import models, rundir
from flaxllm.data import tokenizer as tokenizer_lib
from flaxllm.models.config import ModelConfig

__all__ = ['decode_model', 'init_cache', 'cache_slot_axis', 'filter_logits', 'filter_logits_per_row',
           'sample_logits', 'left_pad', 'prefill', 'decoder_logits',
           'right_pad', 'prompt_positions', 'generate_tokens', 'seq2seq_generate_tokens',
           'GenerateOutput', 'generate', 'generate_seq2seq', 'BeamSearchOutput',
           'beam_search_tokens', 'seq2seq_beam_search_tokens', 'beam_search',
           'beam_search_seq2seq', 'generate_main']


# ----------------------------------------------------------------------------- model and cache

def decode_model(model_or_config: Any) -> nn.Module:
  """A Decoder or EncoderDecoder built with `decode=True`, from a ModelConfig / dict /
  ConfigDict, a preset name, or a module built with `flaxllm.models.build` (decode or not)."""
  if isinstance(model_or_config, nn.Module):
    if not isinstance(model_or_config, (models.Decoder, models.EncoderDecoder)):
      raise TypeError(f'generation needs a flaxllm.models.Decoder or EncoderDecoder, got '
                      f'{type(model_or_config).__name__}.')
    if model_or_config.decode and model_or_config.deterministic:
      return model_or_config
    return models.build(model_or_config.cfg, decode=True)
  if isinstance(model_or_config, str):
    return models.build(models.presets.get(model_or_config), decode=True)
  return models.build(model_or_config, decode=True)


def _is_seq2seq(model: nn.Module) -> bool:
  return isinstance(model, models.EncoderDecoder)


def cache_shapes(model: nn.Module, batch: int, max_len: int):
  """ShapeDtypeStructs of the 'cache' collection for `batch` rows of `max_len` slots (of the
  decoder's self-attention; an EncoderDecoder's cross-attention has no cache)."""
  model = decode_model(model)
  tokens = jax.ShapeDtypeStruct((batch, max_len), jnp.int32)
  inputs = (tokens,)
  if _is_seq2seq(model):    # the cache length follows the target; any source length will do
    inputs = (jax.ShapeDtypeStruct((batch, 1), jnp.int32), tokens)
  shapes = jax.eval_shape(model.init, jax.random.key(0), *inputs)
  return shapes['cache']


def init_cache(model: Any, batch: int, max_len: int):
  """An empty KV cache (all zeros: index 0, every slot segment 0) for `batch` rows and
  `max_len` slots. Leaves: `.../attn/{key,value}` [batch, kv_heads, max_len, head_dim]
  (heads-major), `segment_ids` [batch, max_len], `index` [] (with scan_layers a leading layers
  axis on all)."""
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache_shapes(model, batch, max_len))


def cache_slot_axis(path, scan_layers: bool) -> Optional[int]:
  """The slot (length) axis of the cache leaf at `path` (a `tree_map_with_path` path; see
  `init_cache`): 2 for key and value, 1 for segment_ids, None for the shared write index; one
  more with scan_layers."""
  name = getattr(path[-1], 'key', None)
  if name == 'index':
    return None
  return (2 if name in ('key', 'value') else 1) + int(scan_layers)


def _take_cache_rows(cache, rows, scan_layers: bool):
  """The cache whose row i is row rows[i] of `cache` (rows [new_batch]): every leaf but the
  shared write `index` is gathered on its batch axis (after the layers axis with scan_layers)."""
  axis = 1 if scan_layers else 0

  def take(path, leaf):
    return leaf if cache_slot_axis(path, scan_layers) is None else jnp.take(leaf, rows, axis)

  return jax.tree_util.tree_map_with_path(take, cache)


# ----------------------------------------------------------------------------- sampling

def filter_logits(logits, temperature: float = 1.0, top_k: Optional[int] = None,
                  top_p: Optional[float] = None):
  """Logits [..., vocab] divided by `temperature`, with tokens outside the top-k and outside the
  top-p nucleus set to -inf (the order of Hugging Face: temperature, top-k, top-p).

  top-k keeps the k largest logits (ties with the k-th are kept too). top-p keeps the minimal
  nucleus: the most probable tokens, in order, until their probability mass reaches `top_p`
  (a token is kept iff the mass of the tokens strictly more probable than it is < top_p); the
  most probable token is always kept.
  """
  logits = jnp.asarray(logits, jnp.float32)
  if temperature is not None and temperature != 1.0:
    logits = logits / temperature
  neg_inf = jnp.array(-jnp.inf, logits.dtype)
  vocab = logits.shape[-1]
  if top_k is not None and 0 < top_k < vocab:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, neg_inf, logits)
  if top_p is not None and top_p < 1.0:
    logits = _nucleus(logits, -jnp.sort(-logits, axis=-1), top_p)
  return logits


def filter_logits_per_row(logits, temperature, top_k, top_p):
  """`filter_logits` with its own settings in every row, as arrays (traced: one compilation
  serves any mix): logits [rows, vocab]; temperature [rows] (> 0); top_k [rows] (0 keeps every
  token); top_p [rows] (1 keeps every token)."""
  logits = jnp.asarray(logits, jnp.float32) / temperature[:, None]
  vocab = logits.shape[-1]
  sorted_logits = -jnp.sort(-logits, axis=-1)                      # descending
  k = jnp.where((top_k > 0) & (top_k < vocab), top_k, vocab)
  kth = jnp.take_along_axis(sorted_logits, k[:, None] - 1, axis=-1)
  neg_inf = jnp.array(-jnp.inf, logits.dtype)
  logits = jnp.where(logits < kth, neg_inf, logits)
  sorted_logits = jnp.where(sorted_logits < kth, neg_inf, sorted_logits)
  top_p = top_p[:, None]
  return jnp.where(top_p < 1.0, _nucleus(logits, sorted_logits, top_p), logits)


def _nucleus(logits, sorted_logits, top_p):
  """`logits` outside the top-p nucleus set to -inf; `sorted_logits` are them in descending
  order (see `filter_logits`)."""
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep = mass_before < top_p
  keep = keep.at[..., 0].set(True)
  num_kept = jnp.sum(keep, axis=-1, keepdims=True)
  threshold = jnp.take_along_axis(sorted_logits, num_kept - 1, axis=-1)
  return jnp.where(logits < threshold, jnp.array(-jnp.inf, logits.dtype), logits)


def sample_logits(logits, rng, temperature: float = 0.0, top_k: Optional[int] = None,
                  top_p: Optional[float] = None):
  """Next token ids [...] (int32) from logits [..., vocab]. Pure; jit-friendly (the sampling
  settings are Python values). temperature 0 (or None) is greedy argmax and ignores top-k/top-p
  and `rng`; otherwise one categorical draw per row from `filter_logits(...)`."""
  if not temperature:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if temperature < 0:
    raise ValueError(f'temperature must be >= 0, got {temperature}.')
  if top_p is not None and not 0.0 < top_p <= 1.0:
    raise ValueError(f'top_p must be in (0, 1], got {top_p}.')
  if top_k is not None and top_k < 1:
    raise ValueError(f'top_k must be >= 1, got {top_k}.')
  filtered = filter_logits(logits, temperature, top_k, top_p)
  return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------- prompts

def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0, length: Optional[int] = None,
             pad_to_multiple: int = 1):
  """Token lists -> (tokens [batch, P] int32, mask [batch, P] bool), left padded with `pad_id`.

  P is `length` if given, else the longest prompt rounded up to a multiple of
  `pad_to_multiple`. Every prompt must have at least one token."""
  return _pad(prompts, pad_id, length, pad_to_multiple, left=True, what='prompt')


def right_pad(sources: Sequence[Sequence[int]], pad_id: int = 0, length: Optional[int] = None,
              pad_to_multiple: int = 1):
  """Token lists -> (tokens [batch, S] int32, mask [batch, S] bool), RIGHT padded with
  `pad_id` (encoder-decoder sources); S as in `left_pad`. Every source needs a token."""
  return _pad(sources, pad_id, length, pad_to_multiple, left=False, what='source')


def _pad(seqs, pad_id: int, length: Optional[int], pad_to_multiple: int, left: bool,
         what: str):
  """`left_pad` or `right_pad`; `what` names one sequence in the error messages."""
  seqs = [list(map(int, s)) for s in seqs]
  if not seqs:
    raise ValueError(f'no {what}s given.')
  if any(len(s) == 0 for s in seqs):
    raise ValueError(f'every {what} needs at least one token (e.g. a BOS token).')
  longest = max(len(s) for s in seqs)
  if length is None:
    length = -(-longest // pad_to_multiple) * pad_to_multiple
  if length < longest:
    raise ValueError(f'length={length} is shorter than the longest {what} ({longest}).')
  tokens = np.full((len(seqs), length), pad_id, np.int32)
  mask = np.zeros((len(seqs), length), bool)
  for i, s in enumerate(seqs):
    cols = slice(length - len(s), length) if left else slice(0, len(s))
    tokens[i, cols] = s
    mask[i, cols] = True
  return tokens, mask


def prompt_positions(mask):
  """Positions and segment ids [batch, P] of a (left padded) prompt mask: real tokens count
  0, 1, 2, ... and have segment 1; pad slots get position 0 and segment 0."""
  mask = jnp.asarray(mask).astype(jnp.int32)
  positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0).astype(jnp.int32)
  return positions, mask


def _check_settings(model: nn.Module, *, seq2seq: bool, max_new_tokens: int, num_beams: int = 1,
                    bos_id: Optional[int] = None):
  """Raises, before anything compiles, if the model is not of the kind the caller decodes
  (`seq2seq`: an EncoderDecoder) or a setting cannot work with it."""
  if _is_seq2seq(model) != seq2seq:
    use = ('generate_seq2seq / beam_search_seq2seq' if _is_seq2seq(model) else
           'generate / beam_search')
    raise TypeError(f'model.arch={model.cfg.arch!r} is not decoded by this function; use {use}.')
  vocab = model.cfg.vocab_size
  if max_new_tokens < 1:
    raise ValueError(f'max_new_tokens must be >= 1, got {max_new_tokens}.')
  if not isinstance(num_beams, (int, np.integer)) or num_beams < 1:
    raise ValueError(f'num_beams must be a positive integer (1 = one greedy beam), got '
                     f'{num_beams!r}.')
  if num_beams > vocab:
    raise ValueError(f'num_beams={num_beams} exceeds the vocabulary (model.vocab_size={vocab}); '
                     f'use at most {vocab} beams.')
  if bos_id is not None and not 0 <= bos_id < vocab:
    raise ValueError(f'bos_id={bos_id} is outside the vocabulary [0, {vocab}); pass the id of '
                     f'the token that starts every target.')


def _check_positions(cfg: ModelConfig, what: str, length: int):
  """Raises if `length` positions (described by `what`) overflow a learned position table."""
  if cfg.position == 'learned' and length > cfg.max_seq_len:
    raise ValueError(f'{what} exceeds model.max_seq_len={cfg.max_seq_len} (learned positions); '
                     'shorten the input or lower max_new_tokens.')


def _check_lengths(cfg: ModelConfig, seq2seq: bool, longest: int, max_new_tokens: int):
  """Raises if the longest prompt (`seq2seq`: source) of `longest` tokens and `max_new_tokens`
  overflow learned positions. A prompt and its continuation share one sequence; a target has
  its own max_new_tokens positions (the BOS and all but the last token)."""
  if seq2seq:
    _check_positions(cfg, f'the longest source ({longest})', longest)
    _check_positions(cfg, f'max_new_tokens ({max_new_tokens})', max_new_tokens)
  else:
    _check_positions(cfg, f'the longest prompt ({longest}) + max_new_tokens '
                          f'({max_new_tokens})', longest + max_new_tokens)


def _prompt_arrays(model: nn.Module, prompts, max_new_tokens: int, pad_id: int,
                   pad_to_multiple: int):
  """Left padded (tokens, mask) device arrays of `prompts`, checked against learned positions."""
  tokens, mask = left_pad(prompts, pad_id, pad_to_multiple=max(1, pad_to_multiple))
  _check_lengths(model.cfg, False, int(mask.sum(-1).max()), max_new_tokens)
  return jnp.asarray(tokens), jnp.asarray(mask)


def _source_arrays(model: nn.Module, sources, max_new_tokens: int, pad_id: int,
                   pad_to_multiple: int):
  """Right padded (tokens, mask) device arrays of `sources`, checked against learned
  positions."""
  tokens, mask = right_pad(sources, pad_id, pad_to_multiple=max(1, pad_to_multiple))
  _check_lengths(model.cfg, True, int(mask.sum(-1).max()), max_new_tokens)
  return jnp.asarray(tokens), jnp.asarray(mask)


def _stop_tuple(stop_tokens: Sequence[int]) -> tuple:
  """Stop token ids as a sorted tuple of distinct ints (a hashable, static jit argument)."""
  return tuple(sorted({int(s) for s in stop_tokens}))


def _trimmed(tokens, lengths) -> list[list[int]]:
  """Rows of tokens [batch, n] cut to their lengths [batch], as lists."""
  tokens, lengths = jax.device_get((tokens, lengths))
  return [row[:n].tolist() for row, n in zip(tokens, lengths)]


# ----------------------------------------------------------------------------- model steps
# A step function `step(cache, last [rows], t) -> (logits [rows, vocab] float32, cache)` feeds
# the token chosen at step t - 1 (for an encoder-decoder at t = 0: the BOS) through the cached
# model. The decode loops below see the model only through it.

def _last_logits(model: nn.Module, params, cache, *args, **kwargs):
  """One cached model call: (float32 logits of the last position [rows, vocab], new cache)."""
  logits, mutated = model.apply({'params': params, 'cache': cache}, *args, mutable=['cache'],
                                **kwargs)
  return logits[:, -1].astype(jnp.float32), mutated['cache']


def prefill(model: nn.Module, params, tokens, prompt_mask, max_new_tokens: int,
            all_logits: bool = False):
  """The left padded prompt through a fresh Decoder cache of P + max_new_tokens slots:
  (float32 logits after the prompt [batch, vocab] (`all_logits`: after every position
  [batch, P, vocab]), cache, real prompt tokens per row [batch])."""
  batch, prompt_len = tokens.shape
  positions, segment_ids = prompt_positions(prompt_mask)
  cache = init_cache(model, batch, prompt_len + max_new_tokens)
  logits, mutated = model.apply({'params': params, 'cache': cache}, tokens.astype(jnp.int32),
                                positions, segment_ids, mutable=['cache'])
  logits = logits if all_logits else logits[:, -1]
  return logits.astype(jnp.float32), mutated['cache'], jnp.sum(segment_ids, axis=-1)


def decoder_logits(model: nn.Module, params, cache, tokens, positions):
  """One token per row through a Decoder's cache: tokens and positions [rows] ->
  (float32 logits [rows, vocab], new cache); the keys go to the cache's next slot."""
  positions = positions[:, None]
  return _last_logits(model, params, cache, tokens[:, None], positions, jnp.ones_like(positions))


def _decoder_step(model: nn.Module, params, prompt_lengths) -> Callable:
  """The step function of a Decoder whose rows hold `prompt_lengths` [rows] prompt tokens."""
  def step(cache, last, t):
    return decoder_logits(model, params, cache, last, prompt_lengths + t - 1)
  return step


def _seq2seq_step(model: nn.Module, params, encoded, src_segment_ids) -> Callable:
  """The step function of an EncoderDecoder reading `encoded` [rows, S, embed]: the token fed
  at step t sits at target position t."""
  def step(cache, last, t):
    positions = jnp.full((last.shape[0], 1), t, jnp.int32)
    return _last_logits(model, params, cache, last[:, None], encoded, src_segment_ids,
                        jnp.ones_like(positions), positions, method='decode_logits')
  return step


def _seq2seq_start(model: nn.Module, params, src, src_mask, bos_id: int, max_new_tokens: int):
  """Encodes the right padded source once and feeds the BOS through a fresh cache of
  max_new_tokens slots: (logits [batch, vocab], cache, encoded [batch, S, embed], source
  segment ids [batch, S]). Pad slots of the source get segment 0 and position 0."""
  segment_ids = jnp.asarray(src_mask).astype(jnp.int32)
  positions = jnp.arange(src.shape[1], dtype=jnp.int32) * segment_ids
  encoded = model.apply({'params': params}, src.astype(jnp.int32), segment_ids, positions,
                        method='encode')
  cache = init_cache(model, src.shape[0], max_new_tokens)
  bos = jnp.full((src.shape[0],), bos_id, jnp.int32)
  logits, cache = _seq2seq_step(model, params, encoded, segment_ids)(cache, bos, 0)
  return logits, cache, encoded, segment_ids


# ----------------------------------------------------------------------------- generation

class GenerateOutput(NamedTuple):
  tokens: jax.Array             # [batch, max_new_tokens] int32, pad_id after a row stopped
  lengths: jax.Array            # [batch] int32: generated tokens per row (incl. the stop token)
  logits: Optional[jax.Array]   # [batch, max_new_tokens, vocab] float32 model logits (raw, before
  #                               sampling filters) when return_logits=True, else None


def _sample_loop(step: Callable, cache, first_logits, rng, *, max_new_tokens: int,
                 temperature: float, top_k: Optional[int], top_p: Optional[float],
                 stop_tokens: tuple, pad_id: int, return_logits: bool) -> GenerateOutput:
  """Samples token 0 of every row from `first_logits` [batch, vocab], then feeds each token
  through `step` and samples the next, until max_new_tokens or every row has stopped."""
  batch = first_logits.shape[0]
  stop = jnp.asarray(stop_tokens if stop_tokens else (-1,), jnp.int32)

  def choose(logits, t, done):
    nxt = sample_logits(logits, jax.random.fold_in(rng, t), temperature, top_k, top_p)
    nxt = jnp.where(done, pad_id, nxt)
    now_done = done | (jnp.isin(nxt, stop) if stop_tokens else jnp.zeros_like(done))
    return nxt, now_done

  done = jnp.zeros((batch,), bool)
  first, done_after = choose(first_logits, 0, done)
  out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
  gen_len = jnp.ones((batch,), jnp.int32)
  out_logits = None
  if return_logits:
    out_logits = jnp.zeros((batch, max_new_tokens, first_logits.shape[-1]), jnp.float32)
    out_logits = out_logits.at[:, 0].set(first_logits)

  def cond(carry):
    t, _, _, done, *_ = carry
    return (t < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    t, cache, last, done, out, gen_len, out_logits = carry
    logits, cache = step(cache, last, t)
    nxt, now_done = choose(logits, t, done)
    out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, t))
    gen_len = gen_len + (~done).astype(jnp.int32)
    if out_logits is not None:
      out_logits = jax.lax.dynamic_update_slice(out_logits, logits[:, None], (0, t, 0))
    return t + 1, cache, nxt, now_done, out, gen_len, out_logits

  carry = (jnp.array(1, jnp.int32), cache, first, done_after, out, gen_len, out_logits)
  _, _, _, _, out, gen_len, out_logits = jax.lax.while_loop(cond, body, carry)
  return GenerateOutput(out, gen_len, out_logits)


_SAMPLING_STATIC = ('model', 'max_new_tokens', 'temperature', 'top_k', 'top_p', 'stop_tokens',
                    'pad_id', 'return_logits')


@functools.partial(jax.jit, static_argnames=_SAMPLING_STATIC)
def generate_tokens(model: nn.Module, params, tokens, prompt_mask, rng=None, *,
                    max_new_tokens: int, temperature: float = 0.0, top_k: Optional[int] = None,
                    top_p: Optional[float] = None, stop_tokens: tuple = (), pad_id: int = 0,
                    return_logits: bool = False) -> GenerateOutput:
  """Jitted generation on arrays.

  model: a Decoder built with decode=True (see `decode_model`; static, hashable).
  tokens [batch, P] int32 and prompt_mask [batch, P] (True = real token), LEFT padded so the
  last column is a real token of every row (see `left_pad`). rng: a jax PRNG key (unused for
  greedy). The cache (length P + max_new_tokens) is created, filled and discarded inside.
  """
  _check_settings(model, seq2seq=False, max_new_tokens=max_new_tokens)
  logits, cache, prompt_lengths = prefill(model, params, tokens, prompt_mask, max_new_tokens)
  return _sample_loop(
      _decoder_step(model, params, prompt_lengths), cache, logits,
      jax.random.key(0) if rng is None else rng, max_new_tokens=max_new_tokens,
      temperature=temperature, top_k=top_k, top_p=top_p, stop_tokens=stop_tokens, pad_id=pad_id,
      return_logits=return_logits)


@functools.partial(jax.jit, static_argnames=_SAMPLING_STATIC + ('bos_id',))
def seq2seq_generate_tokens(model: nn.Module, params, src, src_mask, rng=None, *,
                            max_new_tokens: int, bos_id: int, temperature: float = 0.0,
                            top_k: Optional[int] = None, top_p: Optional[float] = None,
                            stop_tokens: tuple = (), pad_id: int = 0,
                            return_logits: bool = False) -> GenerateOutput:
  """Jitted encoder-decoder generation on arrays: `generate_tokens` for an EncoderDecoder.

  model: an EncoderDecoder built with decode=True (see `decode_model`). src [batch, S] int32
  and src_mask [batch, S] (True = real token), RIGHT padded (see `right_pad`). Every target
  starts with `bos_id`; the outputs hold the tokens after it.
  """
  _check_settings(model, seq2seq=True, max_new_tokens=max_new_tokens, bos_id=bos_id)
  logits, cache, encoded, src_segment_ids = _seq2seq_start(model, params, src, src_mask, bos_id,
                                                           max_new_tokens)
  return _sample_loop(
      _seq2seq_step(model, params, encoded, src_segment_ids), cache, logits,
      jax.random.key(0) if rng is None else rng, max_new_tokens=max_new_tokens,
      temperature=temperature, top_k=top_k, top_p=top_p, stop_tokens=stop_tokens, pad_id=pad_id,
      return_logits=return_logits)


def generate(model_or_config: Any, params, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int, temperature: float = 0.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, stop_tokens: Sequence[int] = (), seed: int = 0,
             pad_id: int = 0, pad_to_multiple: int = 8) -> list[list[int]]:
  """Generates up to `max_new_tokens` ids after each prompt (a list of token id lists).

  model_or_config: a ModelConfig / dict / preset name, or a Decoder module. Returns one list
  per prompt with the generated ids only (no prompt, no padding); a row that produced one of
  `stop_tokens` ends with that token. temperature 0 is greedy; top_k / top_p filter the
  distribution before sampling; `seed` seeds the jax PRNG.
  """
  model = decode_model(model_or_config)
  tokens, mask = _prompt_arrays(model, prompts, max_new_tokens, pad_id, pad_to_multiple)
  result = generate_tokens(
      model, params, tokens, mask, jax.random.key(seed), max_new_tokens=int(max_new_tokens),
      temperature=float(temperature or 0.0), top_k=None if top_k is None else int(top_k),
      top_p=None if top_p is None else float(top_p), stop_tokens=_stop_tuple(stop_tokens),
      pad_id=int(pad_id))
  return _trimmed(result.tokens, result.lengths)


def generate_seq2seq(model_or_config: Any, params, sources: Sequence[Sequence[int]], *,
                     max_new_tokens: int, bos_id: int, temperature: float = 0.0,
                     top_k: Optional[int] = None, top_p: Optional[float] = None,
                     stop_tokens: Sequence[int] = (), seed: int = 0, pad_id: int = 0,
                     pad_to_multiple: int = 8) -> list[list[int]]:
  """`generate` for an encoder-decoder model: up to `max_new_tokens` target ids (after
  `bos_id`, which is not returned) for each source (a list of token id lists)."""
  model = decode_model(model_or_config)
  src, mask = _source_arrays(model, sources, max_new_tokens, pad_id, pad_to_multiple)
  result = seq2seq_generate_tokens(
      model, params, src, mask, jax.random.key(seed), max_new_tokens=int(max_new_tokens),
      bos_id=int(bos_id), temperature=float(temperature or 0.0),
      top_k=None if top_k is None else int(top_k), top_p=None if top_p is None else float(top_p),
      stop_tokens=_stop_tuple(stop_tokens), pad_id=int(pad_id))
  return _trimmed(result.tokens, result.lengths)


# ----------------------------------------------------------------------------- beam search

_NO_SCORE = -1.0e9   # the score of "no hypothesis" (as in transformers): added, never -inf


class BeamSearchOutput(NamedTuple):
  tokens: jax.Array    # [batch, max_new_tokens] int32: the best hypothesis, pad_id after it
  lengths: jax.Array   # [batch] int32: its generated tokens (incl. its stop token, if any)
  scores: jax.Array    # [batch] float32: its sum of log-probs / lengths ** length_penalty


class _Beams(NamedTuple):
  """Beam search state of `batch` rows with `num_beams` beams each."""
  tokens: jax.Array        # [batch, beams, max_new_tokens] running hypotheses (pad after step t)
  scores: jax.Array        # [batch, beams] their summed log-probs, best first
  done_tokens: jax.Array   # [batch, beams, max_new_tokens] finished hypotheses, best first
  done_lengths: jax.Array  # [batch, beams] int32
  done_scores: jax.Array   # [batch, beams] length-penalised (about _NO_SCORE in empty slots)
  done_mask: jax.Array     # [batch, beams] bool: the slot holds a finished hypothesis
  improvable: jax.Array    # [batch] bool: a running beam may still beat the finished ones


def _gather_beams(x, index):
  """x [batch, n, ...] -> [batch, k, ...] along axis 1 at index [batch, k]."""
  return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def _beam_step(beams: _Beams, log_probs, t, *, stop, num_candidates: int, max_new_tokens: int,
               penalties):
  """One beam search step: token t of every hypothesis, from `log_probs` [batch, beams, vocab]
  of the running beams. Returns (beams, the beam [batch, beams] each new running beam extends).

  `stop`: stop token ids [n] (-1 = none); `num_candidates`: max(2, 1 + n) * beams, so that at
  least `beams` candidates did not stop; `penalties` [max_new_tokens]: length ** penalty.
  """
  batch, num_beams, vocab = log_probs.shape
  totals = (log_probs + beams.scores[:, :, None]).reshape(batch, num_beams * vocab)
  cand_scores, flat = jax.lax.top_k(totals, num_candidates)
  cand_beam, cand_token = flat // vocab, flat % vocab
  cand_tokens = _gather_beams(beams.tokens, cand_beam).at[:, :, t].set(cand_token)
  stopped = jnp.isin(cand_token, stop) | (t + 1 >= max_new_tokens)

  # Running beams: the best candidates that did not stop.
  open_scores = cand_scores + _NO_SCORE * stopped
  keep = jax.lax.top_k(open_scores, num_beams)[1]
  tokens, scores = _gather_beams(cand_tokens, keep), _gather_beams(open_scores, keep)

  # Finished hypotheses: the stopped candidates among the best `num_beams` (only while the row
  # can improve), scored by the generated length t + 1, merged into the best `num_beams`.
  new_done = stopped & (jnp.arange(num_candidates) < num_beams)
  new_scores = (cand_scores / penalties[t] + _NO_SCORE * ~beams.improvable[:, None]
                + _NO_SCORE * ~new_done)
  merged_scores = jnp.concatenate([beams.done_scores, new_scores], axis=1)
  best = jax.lax.top_k(merged_scores, num_beams)[1]

  def merged(done, new):
    return _gather_beams(jnp.concatenate([done, new], axis=1), best)

  done_mask = merged(beams.done_mask, new_done)
  done_scores = _gather_beams(merged_scores, best)
  # A row stays improvable while a slot is empty or its best running beam, scored at the
  # current length, beats its worst finished hypothesis (early_stopping=False heuristic).
  worst = jnp.where(done_mask, jnp.min(done_scores, axis=1, keepdims=True), _NO_SCORE)
  improvable = beams.improvable & jnp.any(scores[:, :1] / penalties[t] > worst, axis=1)
  beams = _Beams(
      tokens=tokens, scores=scores, done_tokens=merged(beams.done_tokens, cand_tokens),
      done_lengths=merged(beams.done_lengths, jnp.full(new_done.shape, t + 1, jnp.int32)),
      done_scores=done_scores, done_mask=done_mask, improvable=improvable)
  return beams, _gather_beams(cand_beam, keep)


def _beam_loop(step: Callable, cache, first_logits, length_penalty, *, num_beams: int,
               max_new_tokens: int, stop_tokens: tuple, pad_id: int,
               scan_layers: bool) -> BeamSearchOutput:
  """Beam search from `first_logits` [batch, vocab] and the cache of `batch` rows after the
  prompt (or BOS): every beam starts as a copy of its row; then each step feeds the last token
  of every beam through `step` (rows batch * num_beams) and reorders the cache by beam."""
  batch, vocab = first_logits.shape
  empty = jnp.full((batch, num_beams, max_new_tokens), pad_id, jnp.int32)
  no_score = jnp.full((batch, num_beams), _NO_SCORE, jnp.float32)
  beams = _Beams(
      tokens=empty, scores=no_score.at[:, 0].set(0.0),   # identical beams: only the first runs
      done_tokens=empty, done_lengths=jnp.zeros((batch, num_beams), jnp.int32),
      done_scores=no_score, done_mask=jnp.zeros((batch, num_beams), bool),
      improvable=jnp.ones((batch,), bool))
  advance = functools.partial(
      _beam_step, stop=jnp.asarray(stop_tokens or (-1,), jnp.int32),
      num_candidates=max(2, 1 + len(stop_tokens)) * num_beams, max_new_tokens=max_new_tokens,
      penalties=jnp.arange(1, max_new_tokens + 1, dtype=jnp.float32) ** length_penalty)

  log_probs = jax.nn.log_softmax(first_logits, axis=-1)
  beams, _ = advance(beams, jnp.broadcast_to(log_probs[:, None], (batch, num_beams, vocab)), 0)
  cache = _take_cache_rows(cache, jnp.repeat(jnp.arange(batch), num_beams), scan_layers)
  row_offset = (jnp.arange(batch) * num_beams)[:, None]

  def cond(carry):
    t, beams, _ = carry
    return (t < max_new_tokens) & jnp.any(beams.improvable)

  def body(carry):
    t, beams, cache = carry
    logits, cache = step(cache, beams.tokens[:, :, t - 1].reshape(-1), t)
    log_probs = jax.nn.log_softmax(logits, axis=-1).reshape(batch, num_beams, vocab)
    beams, source = advance(beams, log_probs, t)
    cache = _take_cache_rows(cache, (source + row_offset).reshape(-1), scan_layers)
    return t + 1, beams, cache

  _, beams, _ = jax.lax.while_loop(cond, body, (jnp.array(1, jnp.int32), beams, cache))
  return BeamSearchOutput(beams.done_tokens[:, 0], beams.done_lengths[:, 0],
                          beams.done_scores[:, 0])


_BEAM_STATIC = ('model', 'num_beams', 'max_new_tokens', 'stop_tokens', 'pad_id')


@functools.partial(jax.jit, static_argnames=_BEAM_STATIC)
def beam_search_tokens(model: nn.Module, params, tokens, prompt_mask, length_penalty=1.0, *,
                       num_beams: int, max_new_tokens: int, stop_tokens: tuple = (),
                       pad_id: int = 0) -> BeamSearchOutput:
  """Jitted beam search on arrays (Hugging Face semantics, see the module docstring).

  model: a Decoder built with decode=True; tokens / prompt_mask [batch, P] LEFT padded as for
  `generate_tokens`. length_penalty: a float (traced: new values reuse the compilation).
  The cache holds batch * num_beams rows of P + max_new_tokens slots.
  """
  _check_settings(model, seq2seq=False, max_new_tokens=max_new_tokens, num_beams=num_beams)
  logits, cache, prompt_lengths = prefill(model, params, tokens, prompt_mask, max_new_tokens)
  step = _decoder_step(model, params, jnp.repeat(prompt_lengths, num_beams))
  return _beam_loop(step, cache, logits, length_penalty, num_beams=num_beams,
                    max_new_tokens=max_new_tokens, stop_tokens=stop_tokens, pad_id=pad_id,
                    scan_layers=model.cfg.scan_layers)


@functools.partial(jax.jit, static_argnames=_BEAM_STATIC + ('bos_id',))
def seq2seq_beam_search_tokens(model: nn.Module, params, src, src_mask, length_penalty=1.0, *,
                               num_beams: int, max_new_tokens: int, bos_id: int,
                               stop_tokens: tuple = (), pad_id: int = 0) -> BeamSearchOutput:
  """`beam_search_tokens` for an EncoderDecoder: src / src_mask [batch, S] RIGHT padded as
  for `seq2seq_generate_tokens`; the source is encoded once and copied to every beam."""
  _check_settings(model, seq2seq=True, max_new_tokens=max_new_tokens, num_beams=num_beams,
                  bos_id=bos_id)
  logits, cache, encoded, src_segment_ids = _seq2seq_start(model, params, src, src_mask, bos_id,
                                                           max_new_tokens)
  step = _seq2seq_step(model, params, jnp.repeat(encoded, num_beams, axis=0),
                       jnp.repeat(src_segment_ids, num_beams, axis=0))
  return _beam_loop(step, cache, logits, length_penalty, num_beams=num_beams,
                    max_new_tokens=max_new_tokens, stop_tokens=stop_tokens, pad_id=pad_id,
                    scan_layers=model.cfg.scan_layers)


def beam_search(model_or_config: Any, params, prompts: Sequence[Sequence[int]], *,
                num_beams: int, max_new_tokens: int, length_penalty: float = 1.0,
                stop_tokens: Sequence[int] = (), pad_id: int = 0,
                pad_to_multiple: int = 8) -> list[list[int]]:
  """The best beam search continuation of each prompt (generated ids only; ends with its stop
  token if it has one), as transformers' `generate(num_beams=..., do_sample=False,
  length_penalty=..., eos_token_id=stop_tokens)`. Arguments as in `generate`."""
  model = decode_model(model_or_config)
  tokens, mask = _prompt_arrays(model, prompts, max_new_tokens, pad_id, pad_to_multiple)
  result = beam_search_tokens(model, params, tokens, mask, float(length_penalty),
                              num_beams=num_beams, max_new_tokens=int(max_new_tokens),
                              stop_tokens=_stop_tuple(stop_tokens), pad_id=int(pad_id))
  return _trimmed(result.tokens, result.lengths)


def beam_search_seq2seq(model_or_config: Any, params, sources: Sequence[Sequence[int]], *,
                        num_beams: int, max_new_tokens: int, bos_id: int,
                        length_penalty: float = 1.0, stop_tokens: Sequence[int] = (),
                        pad_id: int = 0, pad_to_multiple: int = 8) -> list[list[int]]:
  """`beam_search` for an encoder-decoder model: the best target (after `bos_id`, which is
  not returned) for each source."""
  model = decode_model(model_or_config)
  src, mask = _source_arrays(model, sources, max_new_tokens, pad_id, pad_to_multiple)
  result = seq2seq_beam_search_tokens(
      model, params, src, mask, float(length_penalty), num_beams=num_beams,
      max_new_tokens=int(max_new_tokens), bos_id=int(bos_id),
      stop_tokens=_stop_tuple(stop_tokens), pad_id=int(pad_id))
  return _trimmed(result.tokens, result.lengths)


# ----------------------------------------------------------------------------- CLI

def _parse_ids(p: argparse.ArgumentParser, flag: str, text: str,
               allow_empty: bool = False) -> list[int]:
  """The token ids in `text`, the value of `flag` (separated by commas and/or spaces); anything
  else (an empty item, a word, a fraction, or no ids unless `allow_empty`) ends in `p.error`."""
  items = re.split(r'\s*,\s*|\s+', text.strip())
  if items == [''] and allow_empty:
    return []
  ids = []
  for item in items:
    try:
      ids.append(int(item))
    except ValueError:
      what = 'an empty id' if not item else f'{item!r}, which is not an integer'
      p.error(f'{flag}={text!r} holds {what}; give comma-separated token ids, e.g. '
              f'{flag}=1,2,3.')
  return ids


def _check_vocab(p: argparse.ArgumentParser, flag: str, ids: Sequence[int], vocab: int,
                 side: str = 'vocabulary'):
  """`p.error` unless every id (given with `flag`) is in [0, vocab) (the model's `side`)."""
  bad = [i for i in ids if not 0 <= i < vocab]
  if bad:
    p.error(f"{flag} holds the id {bad[0]}, outside the model's {side} [0, {vocab}); use ids "
            f'from 0 to {vocab - 1}.')


def _check_tokenizer(p: argparse.ArgumentParser, tok: tokenizer_lib.Tokenizer, vocab: int,
                     side: str = 'vocab_size'):
  """`p.error` if the tokenizer `tok` makes ids the model's `side` (of size `vocab`) lacks."""
  if tok.vocab_size > vocab:
    p.error(f"the tokenizer has {tok.vocab_size} tokens but the model's {side} is {vocab}; pass "
            f'the --tokenizer the model was trained with.')


def generate_main(argv: Optional[Sequence[str]] = None) -> int:
  """`flaxllm generate --model DIR (--prompt TEXT | --prompt-ids 1,2,3) ...`; for an
  encoder-decoder model `--source TEXT` / `--source-ids` instead of the prompt.

  DIR is a flaxllm workdir (its newest checkpoint), a flaxllm model directory or a Hugging Face
  directory (`flaxllm.rundir`); text is encoded with the tokenizer stored there, or with
  --tokenizer. Prints the completion of each prompt (text with a tokenizer, else ids).

  Every argument is checked against the model's config (token ids against its vocabulary)
  before the params are loaded; a bad one exits with code 2 and one sentence naming the flag."""
  p = argparse.ArgumentParser(prog='flaxllm generate',
                              description='Generate text with a flaxllm or Hugging Face model.')
  p.add_argument('--model', required=True,
                 help='a flaxllm workdir, a flaxllm model directory (model_config.json + params) '
                      'or a Hugging Face model directory (config.json + safetensors).')
  p.add_argument('--prompt', action='append', default=[],
                 help='prompt text (repeat for a batch); needs a tokenizer.')
  p.add_argument('--prompt-ids', action='append', default=[],
                 help='prompt as comma-separated token ids (repeat for a batch).')
  p.add_argument('--source', action='append', default=[],
                 help='source text of an encoder-decoder model (repeat for a batch); needs a '
                      'tokenizer; encoded as in training (tokens + EOS).')
  p.add_argument('--source-ids', action='append', default=[],
                 help='source of an encoder-decoder model as comma-separated token ids.')
  p.add_argument('--bos-id', type=int, default=None,
                 help="the token starting every target of an encoder-decoder model (default: "
                      "the tokenizer's BOS).")
  p.add_argument('--tokenizer', help="a sentencepiece .model file (default: the model "
                                     "directory's tokenizer).")
  p.add_argument('--max-new-tokens', type=int, default=64)
  p.add_argument('--num-beams', type=int, default=1,
                 help='beam search with this many beams (as transformers with do_sample=False); '
                      '1 = greedy or sampling.')
  p.add_argument('--length-penalty', type=float, default=1.0,
                 help='beam search: a finished beam scores sum(log-probs) / length ** this.')
  p.add_argument('--temperature', type=float, default=0.0, help='0 = greedy.')
  p.add_argument('--top-k', type=int, default=None)
  p.add_argument('--top-p', type=float, default=None)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--stop-ids', default='',
                 help='comma-separated stop token ids (the tokenizer EOS is added by default).')
  p.add_argument('--ignore-eos', action='store_true', help="don't stop at the tokenizer's EOS.")
  p.add_argument('--no-bos', action='store_true', help="don't prepend the tokenizer's BOS.")
  p.add_argument('--pad-id', type=int, default=0)
  p.add_argument('--json', action='store_true', help='print one JSON object per prompt.')
  args = p.parse_args(argv)

  # The settings on their own.
  if not (args.prompt or args.prompt_ids or args.source or args.source_ids):
    p.error('give --prompt (with --tokenizer) or --prompt-ids; for an encoder-decoder model '
            '--source (with --tokenizer) or --source-ids.')
  if args.max_new_tokens < 1:
    p.error(f'--max-new-tokens must be >= 1, got {args.max_new_tokens}.')
  if args.num_beams < 1:
    p.error(f'--num-beams must be >= 1, got {args.num_beams}.')
  if not args.temperature >= 0:
    p.error(f'--temperature must be >= 0 (0 = greedy), got {args.temperature}.')
  if args.top_k is not None and args.top_k < 1:
    p.error(f'--top-k must be >= 1 (or left out to keep every token), got {args.top_k}.')
  if args.top_p is not None and not 0 < args.top_p <= 1:
    p.error(f'--top-p must be in (0, 1] (1 keeps every token), got {args.top_p}.')
  if args.num_beams > 1 and args.temperature:
    p.error('beam search does not sample: drop --temperature, or use --num-beams 1 to sample.')
  prompt_ids = [_parse_ids(p, '--prompt-ids', s) for s in args.prompt_ids]
  source_ids = [_parse_ids(p, '--source-ids', s) for s in args.source_ids]
  stop = set(_parse_ids(p, '--stop-ids', args.stop_ids, allow_empty=True))

  # The settings against the model's config and tokenizers: no array is read yet.
  try:
    source = rundir.model_source(args.model, what='--model')
  except rundir.RunDirError as e:
    p.error(str(e))
  except ValueError as e:  # a config file there that is not valid JSON or not a valid model
    p.error(f'--model={args.model!r} cannot be read: {e}')
  cfg = source.model_cfg
  seq2seq = cfg.arch == 'encoder_decoder'
  source_vocab = cfg.source_vocab_size or cfg.vocab_size
  if args.tokenizer:
    try:
      tok = src_tok = tokenizer_lib.SentencePieceTokenizer.load(args.tokenizer)
    except (OSError, ValueError):
      p.error(f'--tokenizer={args.tokenizer!r} is not a readable sentencepiece model; point '
              '--tokenizer at a tokenizer.model file.')
  else:
    tok = rundir.load_tokenizer(source.path)
    # A sequence-to-sequence run with separate vocabularies keeps its source side's tokenizer.
    src_tok = rundir.load_tokenizer(source.path, rundir.SOURCE_TOKENIZER) or tok
  if tok is None and (args.prompt or args.source):
    p.error(f'{args.model} holds no tokenizer for --prompt / --source; pass --tokenizer (a '
            'sentencepiece .model), or --prompt-ids / --source-ids.')
  if tok is not None:
    _check_tokenizer(p, tok, cfg.vocab_size)
  if seq2seq and src_tok is not None and args.source:
    _check_tokenizer(p, src_tok, source_vocab,
                     'source_vocab_size' if cfg.source_vocab_size else 'vocab_size')
  if seq2seq and (args.prompt or args.prompt_ids or not (args.source or args.source_ids)):
    p.error(f'{args.model} is an encoder-decoder model: pass its input with --source or '
            f'--source-ids (not --prompt).')
  if not seq2seq and (args.source or args.source_ids):
    p.error(f'{args.model} is a decoder-only model: pass its input with --prompt or '
            f'--prompt-ids (--source is for encoder-decoder models).')
  source_side = 'source vocabulary' if cfg.source_vocab_size else 'vocabulary'
  for ids in prompt_ids:
    _check_vocab(p, '--prompt-ids', ids, cfg.vocab_size)
  for ids in source_ids:
    _check_vocab(p, '--source-ids', ids, source_vocab, source_side)
  _check_vocab(p, '--stop-ids', stop, cfg.vocab_size)
  if args.bos_id is not None:
    _check_vocab(p, '--bos-id', [args.bos_id], cfg.vocab_size)
  _check_vocab(p, '--pad-id', [args.pad_id], cfg.vocab_size)
  if seq2seq:  # sources are padded with it too
    _check_vocab(p, '--pad-id', [args.pad_id], source_vocab, source_side)

  prompts = []
  for text in args.prompt:
    ids = tok.encode(text)
    if not args.no_bos and tok.bos_id >= 0:
      ids = [tok.bos_id] + ids
    prompts.append(ids)
  prompts += prompt_ids
  sources = [src_tok.encode(text) + [src_tok.eos_id] for text in args.source] + source_ids
  if any(not ids for ids in prompts + sources):
    p.error('a prompt or source encodes to no tokens; add text or drop --no-bos.')
  if tok is not None and not args.ignore_eos and tok.eos_id >= 0:
    stop.add(tok.eos_id)
  bos_id = args.bos_id
  if seq2seq and bos_id is None and tok is not None and tok.bos_id >= 0:
    bos_id = tok.bos_id
  if seq2seq and bos_id is None:
    p.error('an encoder-decoder model needs --bos-id (the first target token) or a '
            '--tokenizer with a BOS.')
  # What the generation functions check first (beams vs. vocabulary, learned positions).
  model = decode_model(cfg)
  inputs, key = (sources, 'source_ids') if seq2seq else (prompts, 'prompt_ids')
  try:
    _check_settings(model, seq2seq=seq2seq, max_new_tokens=args.max_new_tokens,
                    num_beams=args.num_beams, bos_id=bos_id)
    _check_lengths(cfg, seq2seq, max(map(len, inputs)), args.max_new_tokens)
  except ValueError as e:
    p.error(str(e))

  try:
    params = rundir.load_params(source.path, what='--model')
  except rundir.RunDirError as e:
    p.error(str(e))
  except (ValueError, OSError) as e:  # e.g. no params/ there, or params of another shape
    p.error(f'--model={args.model!r} cannot be loaded: {e}')
  beam = dict(num_beams=args.num_beams, length_penalty=args.length_penalty)
  sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                  seed=args.seed)
  common = dict(max_new_tokens=args.max_new_tokens, stop_tokens=tuple(stop), pad_id=args.pad_id)
  if seq2seq and args.num_beams > 1:
    outputs = beam_search_seq2seq(model, params, sources, bos_id=bos_id, **beam, **common)
  elif seq2seq:
    outputs = generate_seq2seq(model, params, sources, bos_id=bos_id, **sampling, **common)
  elif args.num_beams > 1:
    outputs = beam_search(model, params, prompts, **beam, **common)
  else:
    outputs = generate(model, params, prompts, **sampling, **common)
  for ids, out in zip(inputs, outputs):
    text = tok.decode(out) if tok is not None else None
    if args.json:
      print(json.dumps({key: ids, 'ids': out, 'text': text}))
    else:
      print(text if text is not None else ','.join(map(str, out)))
  sys.stdout.flush()
  return 0
