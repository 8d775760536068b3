"""An lm-evaluation-harness model backend for flaxllm models, registered as `flaxllm`.

    import lm_eval, flaxllm.evaluation.harness   # the import registers the backend
    lm = flaxllm.evaluation.harness.FlaxLM(pretrained='runs/default')   # or model_args below
    results = lm_eval.simple_evaluate(model=lm, tasks=['hellaswag'], num_fewshot=5)
    # or: simple_evaluate(model='flaxllm', model_args='pretrained=DIR,batch_size=16', ...)

`pretrained` is anything `flaxllm.rundir.model_source` reads: a flaxllm workdir (its newest
checkpoint, or `step=`), a flaxllm model directory or a Hugging Face directory. The tokenizer is
the one stored there: flaxllm's sentencepiece or bytes tokenizer, or a Hugging Face
`tokenizer.json` / `tokenizer_config.json` (loaded with `transformers.AutoTokenizer`, as lm-eval's
`hf` backend does).

Semantics follow lm-eval's `hf` backend (`lm_eval/models/huggingface.py`, v0.4.13) request for
request, so that the two give the same numbers on the same model:

- `loglikelihood`: lm-eval's `TemplateLM.loglikelihood` splits (context, continuation) (trailing
  spaces of the context move to the continuation; context + continuation are encoded whole and
  the continuation is what follows the context's tokens; an empty context becomes the prefix
  token). Each request is scored as the window `(context + continuation)[-(max_length + 1):]`:
  contexts too long for the model are cut from the left (logged once). Result: (sum of the
  continuation's token log-probs, whether every continuation token is the argmax).
- `loglikelihood_rolling`: `lm_eval.utils.get_rolling_token_windows` with context_len=1 and
  `make_disjoint_window`, as the hf backend; the windows' log-likelihoods are summed.
- `generate_until`: lm-eval's `normalize_gen_kwargs` (`until`, `max_gen_toks` and its aliases,
  `do_sample` / `temperature`, optional `top_k` / `top_p`); the context is cut from the left to
  `max_length - max_gen_toks` tokens; decoding runs in `flaxllm.generate.generate_tokens` (one
  jitted prefill + KV-cache loop) and stops at EOS or at a stop string that is a single token;
  the text is cut before the first stop string (the EOS text included), which is never returned.

Tokens (flaxllm tokenizers): `add_bos_token` (default True: flaxllm trains every document after a
BOS) prepends BOS to contexts; empty contexts and rolling windows use the prefix token (BOS, else
EOS) as the hf backend does, with no second BOS. Hugging Face tokenizers behave exactly as in the
hf backend (their own special-token defaults unless `add_bos_token` is given).

Batching: log-likelihood requests are packed side by side into rows (best fit, longest first;
segment ids keep them apart and positions restart at each), the rows as long as the longest
request rounded up to a power of two from 16 (or `max_length`), `batch_size` rows per call: one
compiled shape per task and almost no padding. Generation prompts are padded to those lengths
by bucket, so a few compiled shapes serve a whole task.

Sharding (`mesh='fsdp:8'`, `flaxllm eval --mesh=fsdp:8`): the params are restored straight into
their shards under flaxllm's logical-axis rules (as in training), each batch's rows are split
over the mesh's data axes and the model's activation constraints apply; the numbers equal the
one-device backend's.
"""
from __future__ import annotations

import bisect
import contextlib
import functools
import logging
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from lm_eval.models.utils import postprocess_generated_text
from tqdm import tqdm

from flaxllm import generate as generate_lib
from flaxllm import models, rundir
from flaxllm.data import tokenizer as tokenizer_lib
from flaxllm.models.config import ModelConfig
from flaxllm.parallel import axis_rules
from flaxllm.parallel import mesh as mesh_lib
from flaxllm.parallel import sharding

log = logging.getLogger(__name__)

MIN_BUCKET = 16
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_GEN_TOKS = 256   # as lm-eval's hf backend


# ----------------------------------------------------------------------------- tokenizers

class _Tokens:
  """The one tokenizer interface the backend uses: a flaxllm Tokenizer or a Hugging Face one."""

  def __init__(self, tokenizer: Any, add_bos_token: Optional[bool]):
    self.tok = tokenizer
    self.native = isinstance(tokenizer, tokenizer_lib.Tokenizer)
    self.add_bos_token = add_bos_token
    if self.native:
      self.size = tokenizer.vocab_size
      self.bos_id = tokenizer.bos_id if tokenizer.bos_id >= 0 else None
      self.eos_id = tokenizer.eos_id if tokenizer.eos_id >= 0 else None
      self.pad_id = max(tokenizer.pad_id, 0)
      self.name = repr(tokenizer)
    else:
      self.size = len(tokenizer)
      self.bos_id = tokenizer.bos_token_id
      self.eos_id = tokenizer.eos_token_id
      self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
          self.eos_id if self.eos_id is not None else 0)
      self.name = getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)

  def encode(self, text: str, add_special_tokens: Optional[bool]) -> list[int]:
    """Ids of `text`; add_special_tokens None = the default (as the hf backend's tok_encode)."""
    if self.native:
      add = (self.add_bos_token is not False) if add_special_tokens is None else add_special_tokens
      return ([self.bos_id] if add and self.bos_id is not None else []) + self.tok.encode(text)
    kwargs = {}
    if add_special_tokens is not None:
      kwargs['add_special_tokens'] = add_special_tokens
    elif self.add_bos_token is not None:
      kwargs['add_special_tokens'] = self.add_bos_token
    prefix = self.tok.bos_token_id if self.tok.bos_token_id is not None else self.eos_id
    if add_special_tokens is None and prefix is not None and text.startswith(
        self.tok.decode(prefix)):   # the hf backend: a string that starts with BOS gets no other
      kwargs['add_special_tokens'] = False
    return list(self.tok.encode(text, **kwargs))

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    ids = [int(i) for i in ids]
    if self.native:
      if not skip_special_tokens and len(ids) == 1 and ids[0] == self.eos_id:
        return ''    # flaxllm tokenizers have no text for EOS
      return self.tok.decode(ids)
    return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


# ----------------------------------------------------------------------------- jitted parts

@functools.partial(jax.jit, static_argnames=('model',))
def _score(model, params, inputs, targets, positions, segments):
  """Per position of packed rows (requests side by side, apart by `segments`, 0 = padding):
  (log-prob of the target token, target == argmax)."""
  logits = model.apply({'params': params}, inputs, positions, segments)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  target_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return target_logp, jnp.argmax(logits, axis=-1) == targets


def pack(lengths: Sequence[int], row_length: int) -> list[list[int]]:
  """Best-fit-decreasing packing: rows of indices into `lengths` whose lengths sum to at most
  `row_length` (each length at most `row_length`), longest first."""
  rows: list[list[int]] = []
  free: list[tuple[int, int]] = []   # (room left, row), sorted
  for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
    at = bisect.bisect_left(free, (lengths[i], -1))
    if at == len(free):
      rows.append([i])
      room, row = row_length - lengths[i], len(rows) - 1
    else:
      (room, row) = free.pop(at)
      rows[row].append(i)
      room -= lengths[i]
    if room:
      bisect.insort(free, (room, row))
  return rows


def buckets(max_length: int, smallest: int = MIN_BUCKET) -> list[int]:
  """The padded lengths: powers of two from `smallest` below `max_length`, and `max_length`."""
  out, n = [], smallest
  while n < max_length:
    out.append(n)
    n *= 2
  return out + [max_length]


def _bucket(length: int, sizes: Sequence[int]) -> int:
  return next(b for b in sizes if b >= length)


# ----------------------------------------------------------------------------- the backend

@register_model('flaxllm')
class FlaxLM(TemplateLM):
  """lm-eval's model interface over a flaxllm decoder (see the module docstring).

  Args:
    pretrained: a flaxllm workdir, flaxllm model directory or Hugging Face directory; or leave
      it empty and pass `model_cfg`, `params` and `tokenizer` (e.g. the params in training).
    batch_size: rows per compiled call (lm-eval's 'auto' means the default, 8).
    max_length: the longest window in tokens (default: the model's max_seq_len).
    add_bos_token: see the module docstring.
    dtype: the compute dtype ('' keeps the model's).
    step: a workdir's checkpoint step (default the newest).
    seed: the sampling seed of generate_until.
    mesh: shard the model over a device mesh, for models too big for one device: a dict of
      `config.mesh` sizes or 'fsdp:4,tensor:2' ('fsdp:4/tensor:2' inside lm-eval's model_args);
      params are loaded straight into their shards under `rules`, rows are split over the
      data axes (`batch_size` a multiple of them). Default: one device.
    rules: the logical-axis rules' name or list (default: flaxllm's, or 'fsdp_tp' when the mesh
      has a tensor axis).
  """

  def __init__(self, pretrained: Optional[str] = None, *, batch_size: Any = DEFAULT_BATCH_SIZE,
               max_length: Optional[int] = None, add_bos_token: Optional[bool] = None,
               dtype: str = '', step: Optional[int] = None, seed: int = 0,
               model_cfg: Optional[ModelConfig] = None, params: Any = None,
               tokenizer: Any = None, mesh: Any = None, rules: Any = None,
               max_batch_size: Any = None, device: Any = None, **unused):
    super().__init__()
    del max_batch_size, device   # lm-eval passes them to every backend; jax places the arrays
    if unused:
      log.warning('flaxllm backend: ignoring model_args %s', sorted(unused))
    try:
      self.batch_size = int(batch_size)
    except (TypeError, ValueError):   # 'auto', 'auto:4': a fixed size keeps the shapes few
      self.batch_size = DEFAULT_BATCH_SIZE
    self.mesh = self.rules = None
    if mesh:
      self.mesh = mesh_lib.make_mesh(mesh_lib.parse_spec(mesh) if isinstance(mesh, str)
                                     else mesh)
      if rules is None and self.mesh.shape['tensor'] > 1:
        rules = 'fsdp_tp'   # the rules that use a tensor axis
      self.rules = axis_rules.get_rules(rules)
      axis_rules.check_batch(self.batch_size, self.mesh, self.rules)
    if pretrained:
      source = rundir.model_source(str(pretrained), what='pretrained', dtype=dtype)
      model_cfg = source.model_cfg
      if tokenizer is None:
        tokenizer = rundir.load_model_tokenizer(source.path, what='pretrained')
      _check_vocab(tokenizer, model_cfg, source.path)
      params = rundir.load_params(source.path, self._abstract_params(model_cfg),
                                  what='pretrained', dtype=dtype,
                                  step=None if step is None else int(step))
      self.pretrained = source.path
    elif model_cfg is None or params is None or tokenizer is None:
      raise rundir.RunDirError('the flaxllm backend needs pretrained=DIR (a flaxllm workdir, '
                               'model directory or Hugging Face directory), or model_cfg, params '
                               'and tokenizer.')
    else:
      _check_vocab(tokenizer, model_cfg, 'the given tokenizer')
      if self.mesh is not None:
        params = jax.device_put(params, jax.tree.map(lambda a: a.sharding,
                                                     self._abstract_params(model_cfg)))
      self.pretrained = None
    if model_cfg.arch == 'encoder_decoder':
      raise rundir.RunDirError('the flaxllm lm-eval backend scores decoder-only models; '
                               f'{pretrained or "the model"} is an encoder-decoder.')
    self.model_cfg = model_cfg
    self.params = params
    if isinstance(add_bos_token, str):
      add_bos_token = add_bos_token.lower() in ('1', 'true', 'yes')
    self.tokens = _Tokens(tokenizer, add_bos_token)
    self.tokenizer = tokenizer
    self.model = models.build(model_cfg)
    self.decode_model = generate_lib.decode_model(model_cfg)
    self._max_length = int(max_length) if max_length else int(model_cfg.max_seq_len)
    self.buckets = buckets(self._max_length)
    self.seed = int(seed)
    self._calls = 0
    self._truncation_logged = False

  def _abstract_params(self, model_cfg: ModelConfig):
    """Where the params go: their shards on the mesh, else the first device."""
    shardings = (None if self.mesh is None else
                 axis_rules.param_shardings(models.build(model_cfg), self.mesh, self.rules))
    return rundir.abstract_params(model_cfg, shardings)

  def _on_mesh(self):
    """The mesh and rules for the model's activation constraints (nothing on one device)."""
    return (contextlib.nullcontext() if self.mesh is None
            else sharding.sharding_context(self.mesh, self.rules))

  def _rows(self, array: np.ndarray) -> jax.Array:
    """A [batch, ...] host array on the device(s): rows split over the mesh's data axes."""
    return jnp.asarray(array) if self.mesh is None else jax.device_put(
        array, axis_rules.batch_sharding(self.mesh, self.rules, array.ndim))

  # -- what TemplateLM needs
  @property
  def eot_token_id(self) -> int:
    return self.tokens.eos_id

  @property
  def prefix_token_id(self) -> int:
    return self.tokens.bos_id if self.tokens.bos_id is not None else self.tokens.eos_id

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def max_gen_toks(self) -> int:
    return DEFAULT_MAX_GEN_TOKS

  @property
  def tokenizer_name(self) -> str:
    return str(self.tokens.name).replace('/', '__')

  def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None,
                 left_truncate_len: Optional[int] = None, **kwargs) -> list[int]:
    ids = self.tokens.encode(string, add_special_tokens)
    return ids[-left_truncate_len:] if left_truncate_len else ids

  def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
    return self.tokens.decode(tokens, skip_special_tokens)

  def _log_truncation(self, what: str, length: int, limit: int):
    if not self._truncation_logged:
      log.warning('%s of %d tokens exceeds the window of %d tokens (max_length); such inputs '
                  'are cut from the left, as lm-eval does (logged once).', what, length, limit)
      self._truncation_logged = True

  # -- log-likelihood
  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
    """[(request strings or None, context ids, continuation ids)] -> [(logprob, is_greedy)]."""
    windows = []
    for _, context, continuation in requests:
      if not context or not continuation:
        raise ValueError('a log-likelihood request needs a context and a continuation token.')
      whole = list(context) + list(continuation)
      if len(whole) > self._max_length + 1:
        self._log_truncation('a context + continuation', len(whole), self._max_length)
      whole = whole[-(self._max_length + 1):]
      windows.append((whole, min(len(continuation), len(whole) - 1)))
    results: list[Optional[tuple[float, bool]]] = [None] * len(windows)
    lengths = [len(whole) - 1 for whole, _ in windows]      # scored positions per request
    width = _bucket(max(lengths, default=1), self.buckets)  # one compiled shape per call
    rows = pack(lengths, width)
    bar = tqdm(total=len(windows), disable=disable_tqdm, desc='flaxllm loglikelihood')
    for start in range(0, len(rows), self.batch_size):
      batch = rows[start:start + self.batch_size]
      inputs, targets, positions, segments = (
          np.zeros((self.batch_size, width), np.int32) for _ in range(4))
      spans = []   # (request, row, first position, end)
      for r, members in enumerate(batch):
        at = 0
        for segment, i in enumerate(members, 1):
          whole, n = windows[i][0], lengths[i]
          inputs[r, at:at + n], targets[r, at:at + n] = whole[:-1], whole[1:]
          positions[r, at:at + n], segments[r, at:at + n] = np.arange(n), segment
          spans.append((i, r, at, at + n))
          at += n
      with self._on_mesh():
        scored = _score(self.model, self.params, *map(self._rows, (inputs, targets, positions,
                                                                   segments)))
      logp, greedy = jax.device_get(scored)
      for i, r, _, end in spans:
        first = end - windows[i][1]
        answer = (float(logp[r, first:end].sum(dtype=np.float64)),
                  bool(greedy[r, first:end].all()))
        results[i] = answer
        if requests[i][0] is not None:
          self.cache_hook.add_partial('loglikelihood', requests[i][0], answer)
      bar.update(len(spans))
    bar.close()
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    windows, owner = [], []
    for index, (string,) in enumerate(req.args for req in requests):
      ids = self.tok_encode(string, add_special_tokens=False if self.tokens.native else None)
      for context, continuation in map(lm_utils.make_disjoint_window,
                                       lm_utils.get_rolling_token_windows(
                                           token_list=ids, prefix_token=self.prefix_token_id,
                                           max_seq_len=self._max_length, context_len=1)):
        windows.append((None, context, continuation))
        owner.append(index)
    scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
    totals = [0.0] * len(requests)
    for index, (logprob, _) in zip(owner, scores):
      totals[index] += logprob
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial('loglikelihood_rolling', req.args, total)
    return totals

  # -- generation
  def _generation_settings(self, gen_kwargs: dict) -> tuple[list[str], int, dict]:
    kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
    until = handle_stop_sequences(kwargs.pop('until', None),
                                  eos=self.tok_decode([self.eot_token_id], False))
    max_gen_toks = int(kwargs.pop('max_gen_toks'))
    temperature = float(kwargs.get('temperature') or 0.0)
    if kwargs.get('do_sample') and not temperature:
      temperature = 1.0   # as transformers' generate(do_sample=True) without a temperature
    if not kwargs.get('do_sample'):
      temperature = 0.0
    sampling = dict(temperature=temperature,
                    top_k=int(kwargs['top_k']) if temperature and kwargs.get('top_k') else None,
                    top_p=float(kwargs['top_p']) if temperature and kwargs.get('top_p') else None)
    return until, max_gen_toks, sampling

  def _stop_tokens(self, until: Sequence[str]) -> tuple:
    """EOS and the ids of stop strings that are one token: decoding ends early there (the text
    is cut at every stop string afterwards anyway)."""
    stop = {self.eot_token_id} if self.eot_token_id is not None else set()
    for text in until:
      ids = self.tokens.encode(text, add_special_tokens=False) if text else []
      if len(ids) == 1 and self.tok_decode(ids, False) == text:
        stop.add(ids[0])
    return tuple(sorted(stop))

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    args = [req.args for req in requests]
    results: list[Optional[str]] = [None] * len(args)
    groups: dict[str, list[int]] = {}
    for i, (_, gen_kwargs) in enumerate(args):
      groups.setdefault(repr(sorted(gen_kwargs.items())), []).append(i)
    bar = tqdm(total=len(args), disable=disable_tqdm, desc='flaxllm generate_until')
    for members in groups.values():
      until, max_gen_toks, sampling = self._generation_settings(args[members[0]][1])
      max_ctx = self._max_length - max_gen_toks
      if max_ctx <= 0:
        raise ValueError(f'max_gen_toks={max_gen_toks} leaves no room for a context in the '
                         f'window of {self._max_length} tokens; lower max_gen_toks.')
      stop = self._stop_tokens(until)
      prompts = {}
      for i in members:
        ids = self.tok_encode(args[i][0]) or [self.prefix_token_id]
        if len(ids) > max_ctx:
          self._log_truncation('a generation context', len(ids), max_ctx)
        prompts[i] = ids[-max_ctx:]
      sizes = [b for b in self.buckets if b < max_ctx] + [max_ctx]
      by_bucket: dict[int, list[int]] = {}
      for i in sorted(members, key=lambda i: -len(prompts[i])):
        by_bucket.setdefault(_bucket(len(prompts[i]), sizes), []).append(i)
      for length, rows_all in sorted(by_bucket.items(), reverse=True):
        for start in range(0, len(rows_all), self.batch_size):
          rows = rows_all[start:start + self.batch_size]
          batch = [prompts[i] for i in rows]
          batch += [batch[0]] * (self.batch_size - len(rows))
          tokens, mask = generate_lib.left_pad(batch, self.tokens.pad_id, length=length)
          rng = jax.random.fold_in(jax.random.key(self.seed), self._calls)
          self._calls += 1
          with self._on_mesh():
            out = generate_lib.generate_tokens(
                self.decode_model, self.params, self._rows(tokens), self._rows(mask), rng,
                max_new_tokens=max_gen_toks, stop_tokens=stop, pad_id=int(self.tokens.pad_id),
                **sampling)
          out_tokens, lengths = jax.device_get((out.tokens, out.lengths))
          for r, i in enumerate(rows):
            ids = out_tokens[r, :lengths[r]].tolist()
            text = postprocess_generated_text(self.tok_decode(ids), until, None)
            results[i] = text
            self.cache_hook.add_partial('generate_until', args[i], text)
          bar.update(len(rows))
    bar.close()
    return results


def _check_vocab(tokenizer: Any, cfg: ModelConfig, where: str):
  size = (tokenizer.vocab_size if isinstance(tokenizer, tokenizer_lib.Tokenizer)
          else len(tokenizer))
  if size > cfg.vocab_size:
    raise rundir.RunDirError(f"the tokenizer of {where} has {size} tokens but the model's "
                             f'vocab_size is {cfg.vocab_size}; use the tokenizer the model was '
                             'trained with.')
