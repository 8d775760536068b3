"""Autoregressive generation with the KV cache: prefill, then a jitted decode loop.

    from flaxllm import generate, models
    cfg = models.presets.get('tiny_llama')
    params = models.init_params(models.build(cfg), jax.random.key(0))
    out = generate.generate(cfg, params, [[1, 2, 3], [4, 5]], max_new_tokens=16,
                            temperature=0.8, top_p=0.9, stop_tokens=(2,), seed=0)
    # out: one list of generated ids per prompt (no padding; ends with the stop token if hit)

How it works. Prompts of different lengths are LEFT padded to one length P, so every row
decodes at the same cache slot: pad slots get segment id 0 and real tokens segment id 1 (the
attention kernel only lets a query see slots of its own segment), and positions count only
real tokens (cumsum of the mask - 1). `generate_tokens` is a single `jax.jit`: it creates the
empty cache of static length P + max_new_tokens, runs one prefill call over the whole padded
prompt, then a `lax.while_loop` feeds one token per step, sampling with `sample_logits`. The
loop exits early once every row has emitted a stop token; finished rows emit `pad_id`.

Sampling settings, `max_new_tokens`, `stop_tokens` and the model are static (a new value
compiles a new function; the same values reuse it). `generate` rounds the padded prompt length
up to a multiple of `pad_to_multiple` so prompts of similar lengths share one compilation.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from typing import Any, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxllm import models
from flaxllm.models.config import ModelConfig

__all__ = ['decode_model', 'init_cache', 'filter_logits', 'sample_logits', 'left_pad',
           'prompt_positions', 'generate_tokens', 'GenerateOutput', 'generate', 'generate_main']


# ----------------------------------------------------------------------------- model and cache

def decode_model(model_or_config: Any) -> nn.Module:
  """A decoder-only module built with `decode=True`, from a ModelConfig / dict / ConfigDict,
  a preset name, or a module built with `flaxllm.models.build` (decode or not)."""
  if isinstance(model_or_config, nn.Module):
    if not isinstance(model_or_config, models.Decoder):
      raise TypeError(f'generation needs a decoder-only model (flaxllm.models.Decoder), got '
                      f'{type(model_or_config).__name__}.')
    if model_or_config.decode and model_or_config.deterministic:
      return model_or_config
    return models.build(model_or_config.cfg, decode=True)
  if isinstance(model_or_config, str):
    return models.build(models.presets.get(model_or_config), decode=True)
  return models.build(model_or_config, decode=True)


def cache_shapes(model: nn.Module, batch: int, max_len: int):
  """ShapeDtypeStructs of the 'cache' collection for `batch` rows of `max_len` slots."""
  model = decode_model(model)
  tokens = jax.ShapeDtypeStruct((batch, max_len), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), tokens)
  return shapes['cache']


def init_cache(model: Any, batch: int, max_len: int):
  """An empty KV cache (all zeros: index 0, every slot segment 0) for `batch` rows and
  `max_len` slots. Leaves: `.../attn/{key,value}` [batch, max_len, kv_heads, head_dim],
  `segment_ids` [batch, max_len], `index` [] (with scan_layers a leading layers axis on all)."""
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache_shapes(model, batch, max_len))


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
    sorted_logits = -jnp.sort(-logits, axis=-1)                      # descending
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < top_p
    keep = keep.at[..., 0].set(True)
    num_kept = jnp.sum(keep, axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(sorted_logits, num_kept - 1, axis=-1)
    logits = jnp.where(logits < threshold, neg_inf, logits)
  return logits


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
  prompts = [list(map(int, p)) for p in prompts]
  if not prompts:
    raise ValueError('no prompts given.')
  if any(len(p) == 0 for p in prompts):
    raise ValueError('every prompt needs at least one token (e.g. a BOS token).')
  longest = max(len(p) for p in prompts)
  if length is None:
    length = -(-longest // pad_to_multiple) * pad_to_multiple
  if length < longest:
    raise ValueError(f'length={length} is shorter than the longest prompt ({longest}).')
  tokens = np.full((len(prompts), length), pad_id, np.int32)
  mask = np.zeros((len(prompts), length), bool)
  for i, p in enumerate(prompts):
    tokens[i, length - len(p):] = p
    mask[i, length - len(p):] = True
  return tokens, mask


def prompt_positions(mask):
  """Positions and segment ids [batch, P] of a (left padded) prompt mask: real tokens count
  0, 1, 2, ... and have segment 1; pad slots get position 0 and segment 0."""
  mask = jnp.asarray(mask).astype(jnp.int32)
  positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0).astype(jnp.int32)
  return positions, mask


# ----------------------------------------------------------------------------- generation

class GenerateOutput(NamedTuple):
  tokens: jax.Array             # [batch, max_new_tokens] int32, pad_id after a row stopped
  lengths: jax.Array            # [batch] int32: generated tokens per row (incl. the stop token)
  logits: Optional[jax.Array]   # [batch, max_new_tokens, vocab] float32 model logits (raw, before
  #                               sampling filters) when return_logits=True, else None


@functools.partial(jax.jit, static_argnames=(
    'model', 'max_new_tokens', 'temperature', 'top_k', 'top_p', 'stop_tokens', 'pad_id',
    'return_logits'))
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
  if max_new_tokens < 1:
    raise ValueError(f'max_new_tokens must be >= 1, got {max_new_tokens}.')
  batch, prompt_len = tokens.shape
  if rng is None:
    rng = jax.random.key(0)
  tokens = tokens.astype(jnp.int32)
  positions, segment_ids = prompt_positions(prompt_mask)
  lengths = jnp.sum(segment_ids, axis=-1)                        # real prompt tokens per row
  cache = init_cache(model, batch, prompt_len + max_new_tokens)
  stop = jnp.asarray(stop_tokens if stop_tokens else (-1,), jnp.int32)

  def step(params, cache, tok, pos, seg):
    logits, mutated = model.apply({'params': params, 'cache': cache}, tok, pos, seg,
                                  mutable=['cache'])
    return logits[:, -1].astype(jnp.float32), mutated['cache']

  def choose(logits, t, done):
    nxt = sample_logits(logits, jax.random.fold_in(rng, t), temperature, top_k, top_p)
    nxt = jnp.where(done, pad_id, nxt)
    now_done = done | (jnp.isin(nxt, stop) if stop_tokens else jnp.zeros_like(done))
    return nxt, now_done

  # Prefill: the whole padded prompt in one call; the last slot is real in every row.
  logits, cache = step(params, cache, tokens, positions, segment_ids)
  done = jnp.zeros((batch,), bool)
  first, done_after = choose(logits, 0, done)
  out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
  gen_len = jnp.ones((batch,), jnp.int32)
  out_logits = None
  if return_logits:
    out_logits = jnp.zeros((batch, max_new_tokens, logits.shape[-1]), jnp.float32)
    out_logits = out_logits.at[:, 0].set(logits)

  def cond(carry):
    t, _, _, done, *_ = carry
    return (t < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    t, cache, last, done, out, gen_len, out_logits = carry
    pos = (lengths + t - 1)[:, None]                            # position of `last`
    seg = jnp.ones((batch, 1), jnp.int32)
    logits, cache = step(params, cache, last[:, None], pos, seg)
    nxt, now_done = choose(logits, t, done)
    out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, t))
    gen_len = gen_len + (~done).astype(jnp.int32)
    if out_logits is not None:
      out_logits = jax.lax.dynamic_update_slice(out_logits, logits[:, None], (0, t, 0))
    return t + 1, cache, nxt, now_done, out, gen_len, out_logits

  carry = (jnp.array(1, jnp.int32), cache, first, done_after, out, gen_len, out_logits)
  _, _, _, _, out, gen_len, out_logits = jax.lax.while_loop(cond, body, carry)
  return GenerateOutput(out, gen_len, out_logits)


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
  tokens, mask = left_pad(prompts, pad_id, pad_to_multiple=max(1, pad_to_multiple))
  cfg: ModelConfig = model.cfg
  if cfg.position == 'learned':
    longest = int(mask.sum(-1).max())
    if longest + max_new_tokens > cfg.max_seq_len:
      raise ValueError(f'the longest prompt ({longest}) + max_new_tokens ({max_new_tokens}) '
                       f'exceeds model.max_seq_len={cfg.max_seq_len} (learned positions).')
  stop = tuple(sorted({int(s) for s in stop_tokens}))
  result = generate_tokens(
      model, params, jnp.asarray(tokens), jnp.asarray(mask), jax.random.key(seed),
      max_new_tokens=int(max_new_tokens), temperature=float(temperature or 0.0),
      top_k=None if top_k is None else int(top_k), top_p=None if top_p is None else float(top_p),
      stop_tokens=stop, pad_id=int(pad_id))
  out, lengths = jax.device_get((result.tokens, result.lengths))
  return [row[:n].tolist() for row, n in zip(out, lengths)]


# ----------------------------------------------------------------------------- CLI

def _load_model(path: str):
  """(ModelConfig, params) from a flaxllm model directory (model_config.json + params/, via
  `flaxllm.interop.load_flaxllm`) or a Hugging Face model directory (config.json +
  safetensors, via `flaxllm.interop.hf.load`); imported lazily."""
  from flaxllm import interop  # pylint: disable=import-outside-toplevel
  if not os.path.isdir(path):
    raise FileNotFoundError(f'--model={path!r} is not a directory.')
  if os.path.exists(os.path.join(path, 'model_config.json')):
    cfg, params = interop.load_flaxllm(path)
  else:
    cfg, params = interop.hf.load(path)
  return ModelConfig.from_dict(cfg), params


def _parse_ids(text: str) -> list[int]:
  return [int(t) for t in text.replace(' ', ',').split(',') if t.strip()]


def generate_main(argv: Optional[Sequence[str]] = None) -> int:
  """`flaxllm generate --model DIR (--prompt TEXT --tokenizer SPM | --prompt-ids 1,2,3) ...`.

  Prints the completion of each prompt (text with --tokenizer, else comma-separated ids)."""
  p = argparse.ArgumentParser(prog='flaxllm generate',
                              description='Generate text with a flaxllm or Hugging Face model.')
  p.add_argument('--model', required=True,
                 help='flaxllm model directory (model_config.json + params) or a Hugging Face '
                      'model directory (config.json + safetensors).')
  p.add_argument('--prompt', action='append', default=[],
                 help='prompt text (repeat for a batch); needs --tokenizer.')
  p.add_argument('--prompt-ids', action='append', default=[],
                 help='prompt as comma-separated token ids (repeat for a batch).')
  p.add_argument('--tokenizer', help='sentencepiece .model file (for --prompt and decoding).')
  p.add_argument('--max-new-tokens', type=int, default=64)
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

  if not args.prompt and not args.prompt_ids:
    p.error('give --prompt (with --tokenizer) or --prompt-ids.')
  sp = None
  if args.tokenizer:
    import sentencepiece  # pylint: disable=import-outside-toplevel
    sp = sentencepiece.SentencePieceProcessor(model_file=args.tokenizer)
  elif args.prompt:
    p.error('--prompt needs --tokenizer (a sentencepiece .model); or pass --prompt-ids.')

  prompts = []
  for text in args.prompt:
    ids = sp.encode(text)
    if not args.no_bos and sp.bos_id() >= 0:
      ids = [sp.bos_id()] + ids
    prompts.append(ids)
  prompts += [_parse_ids(s) for s in args.prompt_ids]
  if any(not ids for ids in prompts):
    p.error('a prompt encodes to no tokens; add text or drop --no-bos.')
  stop = set(_parse_ids(args.stop_ids))
  if sp is not None and not args.ignore_eos and sp.eos_id() >= 0:
    stop.add(sp.eos_id())

  cfg, params = _load_model(args.model)
  outputs = generate(cfg, params, prompts, max_new_tokens=args.max_new_tokens,
                     temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                     stop_tokens=tuple(stop), seed=args.seed, pad_id=args.pad_id)
  for prompt, out in zip(prompts, outputs):
    text = sp.decode(out) if sp is not None else None
    if args.json:
      print(json.dumps({'prompt_ids': prompt, 'ids': out, 'text': text}))
    else:
      print(text if text is not None else ','.join(map(str, out)))
  sys.stdout.flush()
  return 0
