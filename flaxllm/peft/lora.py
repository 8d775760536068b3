"""LoRA as pure functions over parameter trees (Hu et al. 2021): the model is not rewritten.

    adapters = lora.init(params, ['q_proj', 'v_proj'], rng, rank=8, alpha=16)   # or 'all-linear'
    tree = lora.combine(params, adapters)    # kernels -> LoRAKernel(w0, a, b): model.apply(tree)
    merged = lora.merge(params, adapters)    # plain params with W = W0 + scale * A B
    params = lora.unmerge(merged, adapters)  # W0 again (up to rounding)
    params, adapters = lora.split(tree)      # inverse of combine

`adapters` mirrors the params tree, holding only the targeted kernels, each a `LoRAWeights`
(a [*lead, *in, r], b [*lead, r, *out], static scale): `lead` is a scanned model's [layers]
axis, `in`/`out` are the kernel's input and output dims in flaxllm's Linear convention
(q/k/v_proj [embed | heads, head_dim], o_proj [heads, head_dim | embed], MLP [in | out]).
Scale is alpha / r, or alpha / sqrt(r) with rslora (Kalajdzievski 2023).

`combine` puts a `LoRAKernel` where the kernel was; `flaxllm.models.layers.Linear` computes
x·W0 + scale·((x·A)·B) with it, so W0 + BA is never formed and, when only the adapters are
differentiated (the trainer's `params`, with the base in `frozen`), no full-size weight
gradient exists either. W0 may be a `flaxllm.peft.quant.QuantizedTensor` (QLoRA).

Initialisation (`init=`): 'kaiming' (PEFT's default: A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
B = 0), 'gaussian' (A ~ N(0, 1/r), B = 0), 'pissa' (A, B from the top-r singular vectors of W0,
Meng et al. 2024; then train on `unmerge(params, adapters)` as the base so that the model
is unchanged at step 0). With B = 0 the LoRA model equals the base model at step 0.
"""
from __future__ import annotations

import functools
import math
import re
from typing import Any, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from flaxllm.peft import quant as quant_lib
from flaxllm.peft import path_rules as rules_lib
from flaxllm.peft.path_rules import ALL_LINEAR, RuleError

__all__ = ['init', 'merge', 'unmerge', 'combine', 'split', 'LoRAWeights', 'LoRAKernel',
           'LoRAError', 'RuleError', 'ALL_LINEAR', 'scale_of', 'trainable_count',
           'adapter_specs', 'kernel_dims', 'INITS', 'describe', 'targets']

INITS = ('kaiming', 'gaussian', 'pissa')
_QKV = re.compile(r'(^|/)(q|k|v)_proj/kernel$')


class LoRAError(ValueError):
  """An adapter that does not fit the base model, or LoRA settings that cannot work."""


# ----------------------------------------------------------------------------- tree leaves

@flax.struct.dataclass
class LoRAWeights:
  """The trainable adapter of one kernel (a leaf of the adapters tree)."""
  a: jax.Array                                                    # [*lead, *in, r]
  b: jax.Array                                                    # [*lead, r, *out]
  scale: float = flax.struct.field(pytree_node=False, default=1.0)
  n_in: int = flax.struct.field(pytree_node=False, default=1)    # number of `in` dims
  dropout: float = flax.struct.field(pytree_node=False, default=0.0)

  @property
  def rank(self) -> int:
    return self.b.shape[self.b.ndim - self.n_out - 1]

  @property
  def n_lead(self) -> int:
    return self.a.ndim - self.n_in - 1

  @property
  def n_out(self) -> int:
    return self.b.ndim - (self.a.ndim - self.n_in - 1) - 1

  def delta(self, dtype=jnp.float32) -> jax.Array:
    """scale · A B in the kernel's shape [*lead, *in, *out] (for merging; never in training)."""
    lead = self.a.shape[:self.n_lead]
    in_shape = self.a.shape[self.n_lead:-1]
    out_shape = self.b.shape[self.n_lead + 1:]
    a = self.a.astype(jnp.float32).reshape(*lead, math.prod(in_shape), self.rank)
    b = self.b.astype(jnp.float32).reshape(*lead, self.rank, math.prod(out_shape))
    d = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST) * self.scale
    return d.reshape(*lead, *in_shape, *out_shape).astype(dtype)


@flax.struct.dataclass
class LoRAKernel:
  """What Linear sees in place of its kernel: the frozen W0 (array or QuantizedTensor) and the
  adapter; `contract` computes x·W0 + scale·((dropout(x)·A)·B)."""
  w0: Any
  a: jax.Array
  b: jax.Array
  scale: float = flax.struct.field(pytree_node=False, default=1.0)
  n_in: int = flax.struct.field(pytree_node=False, default=1)
  dropout: float = flax.struct.field(pytree_node=False, default=0.0)

  @property
  def needs_rng(self) -> bool:
    return self.dropout > 0

  @property
  def shape(self) -> tuple:
    return tuple(self.w0.shape) if not quant_lib.is_quantized(self.w0) else (
        self.w0.lead + tuple(self.w0.shape))

  def contract(self, x, n_in: int, dtype, rng=None):
    x = x.astype(dtype)
    if quant_lib.is_quantized(self.w0):
      y = self.w0.contract(x, n_in, dtype)
    else:
      y = jnp.tensordot(x, self.w0.astype(dtype), axes=n_in)
    h = x
    if self.dropout > 0 and rng is not None:
      keep = jax.random.bernoulli(rng, 1.0 - self.dropout, x.shape)
      h = jnp.where(keep, x / (1.0 - self.dropout), jnp.zeros_like(x))
    h = jnp.tensordot(h, self.a.astype(dtype), axes=n_in) * jnp.asarray(self.scale, dtype)
    return y + jnp.tensordot(h, self.b.astype(dtype), axes=1)


def _is_lora(x) -> bool:
  return isinstance(x, (LoRAWeights, LoRAKernel))


# ----------------------------------------------------------------------------- helpers

def scale_of(rank: int, alpha: float, rslora: bool = False) -> float:
  """alpha / r, or alpha / sqrt(r) (rsLoRA)."""
  return float(alpha) / (math.sqrt(rank) if rslora else rank)


def kernel_dims(path: str, shape: Sequence[int]) -> tuple[int, tuple, tuple]:
  """(n_lead, in dims, out dims) of a Linear kernel at `path` (flaxllm's conventions: a
  scanned `layers` path has a leading [layers] dim; q/k/v_proj have two output dims, o_proj
  two input dims, everything else one of each)."""
  shape = tuple(shape)
  lead = 1 if '/layers/' in f'/{path}/' else 0
  n_out = 2 if _QKV.search(path) else 1
  per = shape[lead:]
  if len(per) < n_out + 1:
    raise LoRAError(f'{path!r} has shape {shape}, which is not a Linear kernel; target Linear '
                    'kernels only.')
  return lead, per[:len(per) - n_out], per[len(per) - n_out:]


def _shape_of(x) -> tuple:
  if quant_lib.is_quantized(x):
    return x.lead + tuple(x.shape)
  return tuple(x.shape)


# ----------------------------------------------------------------------------- init

def init(params, rules, rng, *, rank: int = 8, alpha: Optional[float] = None,
         rslora: bool = False, dropout: float = 0.0, init: str = 'kaiming',
         dtype=jnp.float32):
  """The adapters tree for the Linear kernels of `params` selected by `rules`.

  Args:
    params: the base parameter tree (plain arrays, or QuantizedTensors for 'kaiming' and
      'gaussian' inits).
    rules: regexes over `/`-joined paths (re.search, e.g. ['q_proj', 'v_proj'] or
      r'layers_(6|7)/mlp/'), or 'all-linear' (every Linear kernel except the output head).
    rng: a jax PRNG key.
    rank: r; must not exceed min(prod(in dims), prod(out dims)) of any target.
    alpha: LoRA alpha (default: rank, i.e. scale 1).
    rslora: scale alpha / sqrt(r) instead of alpha / r.
    dropout: dropout rate on the adapter's input (applied when the model gets a dropout rng).
    init: 'kaiming' | 'gaussian' | 'pissa'.
    dtype: dtype of A and B.
  """
  if not isinstance(rank, (int, np.integer)) or isinstance(rank, bool) or rank < 1:
    raise LoRAError(f'LoRA rank={rank!r} must be a positive integer (e.g. 8).')
  if init not in INITS:
    raise LoRAError(f'LoRA init={init!r} is not known; use one of {INITS}.')
  if not 0.0 <= dropout < 1.0:
    raise LoRAError(f'LoRA dropout={dropout} must be in [0, 1).')
  alpha = float(rank if alpha is None else alpha)
  scale = scale_of(rank, alpha, rslora)
  flat = rules_lib.flatten(params)
  targets = rules_lib.select(params, rules, kernels=True, what='LoRA rule')
  out = {}
  specs, bases = [], []
  for path in targets:
    w = flat[path]
    if _is_lora(w):
      raise LoRAError(f'{path!r} already carries a LoRA adapter; pass the base params '
                      '(lora.split gives them).')
    lead, in_shape, out_shape = kernel_dims(path, _shape_of(w))
    d_in, d_out = math.prod(in_shape), math.prod(out_shape)
    if rank > min(d_in, d_out):
      raise LoRAError(f'LoRA rank {rank} exceeds the dimensions of {path!r} (d_in={d_in}, '
                      f'd_out={d_out}); use rank <= {min(d_in, d_out)}.')
    if init == 'pissa' and quant_lib.is_quantized(w):
      raise LoRAError("init='pissa' needs the unquantised base weights; initialise the "
                      'adapters before quantising.')
    specs.append((tuple(_shape_of(w)[:lead]), tuple(in_shape), tuple(out_shape)))
    bases.append(w if init == 'pissa' else None)
  drawn = _draw(rng, bases, tuple(specs), init=init, rank=rank, scale=scale,
                dtype=jnp.dtype(dtype))
  out = {path: LoRAWeights(a=a, b=b, scale=scale, n_in=len(spec[1]), dropout=float(dropout))
         for path, spec, (a, b) in zip(targets, specs, drawn)}
  return rules_lib.unflatten(out)


@functools.partial(jax.jit, static_argnames=('specs', 'init', 'rank', 'scale', 'dtype'))
def _draw(rng, bases, specs, *, init, rank, scale, dtype):
  """All A and B matrices in one compiled program (eager per-shape random ops are slow)."""
  out = []
  for i, ((lead_shape, in_shape, out_shape), w) in enumerate(zip(specs, bases)):
    d_in, d_out = math.prod(in_shape), math.prod(out_shape)
    shape = (*lead_shape, d_in, rank)
    if init == 'pissa':
      a, b = _pissa(w, lead_shape, d_in, d_out, rank, scale)
    elif init == 'kaiming':
      bound = 1.0 / math.sqrt(d_in)
      a = (2.0 * _uniform(rng, shape, 2 * i) - 1.0) * bound
      b = jnp.zeros((*lead_shape, rank, d_out), jnp.float32)
    else:  # Box-Muller
      u1, u2 = _uniform(rng, shape, 2 * i), _uniform(rng, shape, 2 * i + 1)
      a = jnp.sqrt(-2.0 * jnp.log1p(-u1)) * jnp.cos(2.0 * math.pi * u2) / rank
      b = jnp.zeros((*lead_shape, rank, d_out), jnp.float32)
    out.append((a.reshape(*lead_shape, *in_shape, rank).astype(dtype),
                b.reshape(*lead_shape, rank, *out_shape).astype(dtype)))
  return out


def _mix(x):
  """murmur3's 32-bit finaliser: a bijective integer hash."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def _uniform(rng, shape, stream: int):
  """U[0, 1) float32 of `shape` from `rng` and a stream number: a counter-based hash, which
  compiles in a fraction of the time of jax.random's threefry (one per adapter adds up)."""
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.key_data(rng)
  k = jnp.asarray(rng).astype(jnp.uint32).reshape(-1)
  x = jnp.arange(math.prod(shape), dtype=jnp.uint32)
  x = _mix(x ^ _mix(k[0] + jnp.uint32(stream) * jnp.uint32(0x9E3779B9)))
  x = _mix(x ^ k[-1])
  return ((x >> 8).astype(jnp.float32) * (1.0 / (1 << 24))).reshape(shape)


def _pissa(w, lead_shape, d_in, d_out, rank, scale):
  """A [*, d_in, r], B [*, r, d_out] with scale·AB = the rank-r truncated SVD of W."""
  m = jnp.asarray(w, jnp.float32).reshape(*lead_shape, d_in, d_out)
  u, s, vt = jnp.linalg.svd(m, full_matrices=False)
  root = jnp.sqrt(s[..., :rank] / scale)
  a = u[..., :, :rank] * root[..., None, :]
  b = root[..., :, None] * vt[..., :rank, :]
  return a, b


# ----------------------------------------------------------------------------- tree transforms

def _adapter_items(adapters) -> dict[str, LoRAWeights]:
  flat = rules_lib.flatten(adapters)
  for path, leaf in flat.items():
    if not isinstance(leaf, LoRAWeights):
      raise LoRAError(f'adapters entry {path!r} is a {type(leaf).__name__}, not LoRAWeights; '
                      'pass the tree that lora.init returns.')
  return flat


def _check_fits(path: str, w, ad: LoRAWeights):
  """One sentence naming the tensor when `ad` was made for another base model."""
  shape = _shape_of(w)
  lead = ad.n_lead
  expect_a = shape[:lead + ad.n_in] + (ad.rank,)
  expect_b = shape[:lead] + (ad.rank,) + shape[lead + ad.n_in:]
  if tuple(ad.a.shape) != expect_a or tuple(ad.b.shape) != expect_b:
    bad, got, want = (('lora_a', ad.a.shape, expect_a) if tuple(ad.a.shape) != expect_a
                      else ('lora_b', ad.b.shape, expect_b))
    raise LoRAError(f'adapter tensor {path}/{bad} has shape {tuple(got)} but the base kernel '
                    f'{path!r} of shape {shape} needs {want}: the adapter was made for a '
                    'different base model.')


def _apply(params, adapters, fn):
  flat = rules_lib.flatten(params)
  for path, ad in _adapter_items(adapters).items():
    if path not in flat:
      raise LoRAError(f'adapter tensor {path!r} has no counterpart in the base model: the '
                      'adapter was made for a different base model.')
    _check_fits(path, flat[path], ad)
    flat[path] = fn(path, flat[path], ad)
  return rules_lib.unflatten(flat)


def combine(params, adapters):
  """The tree the model applies: each adapted kernel becomes LoRAKernel(w0, a, b)."""
  def fn(path, w, ad):
    if _is_lora(w):
      raise LoRAError(f'{path!r} already carries a LoRA adapter; combine base params only.')
    return LoRAKernel(w0=w, a=ad.a, b=ad.b, scale=ad.scale, n_in=ad.n_in, dropout=ad.dropout)
  return _apply(params, adapters, fn)


def split(tree):
  """Inverse of `combine`: (base params, adapters)."""
  flat = rules_lib.flatten(tree)
  base, ads = {}, {}
  for path, leaf in flat.items():
    if isinstance(leaf, LoRAKernel):
      base[path] = leaf.w0
      ads[path] = LoRAWeights(a=leaf.a, b=leaf.b, scale=leaf.scale, n_in=leaf.n_in,
                              dropout=leaf.dropout)
    else:
      base[path] = leaf
  return rules_lib.unflatten(base), rules_lib.unflatten(ads)


def merge(params, adapters):
  """Plain params with W = W0 + scale·A B for every adapted kernel (in W0's dtype; a
  quantised W0 is dequantised first)."""
  def fn(path, w, ad):
    if quant_lib.is_quantized(w):
      w = w.dequantize()
    return (w.astype(jnp.float32) + ad.delta()).astype(w.dtype)
  return _apply(params, adapters, fn)


def unmerge(params, adapters):
  """W - scale·A B for every adapted kernel: undoes `merge` (and gives PiSSA's residual)."""
  def fn(path, w, ad):
    if quant_lib.is_quantized(w):
      raise LoRAError(f'{path!r} is quantised; unmerge needs plain weights.')
    return (w.astype(jnp.float32) - ad.delta()).astype(w.dtype)
  return _apply(params, adapters, fn)


# ----------------------------------------------------------------------------- facts

def trainable_count(adapters) -> int:
  """Number of adapter weights: sum of r·(d_in + d_out) over targets (times layers)."""
  return sum(x.size for x in jax.tree.leaves(adapters))


def adapter_specs(base_specs, adapters):
  """Logical PartitionSpecs for `adapters` from the base params' specs (e.g.
  `flaxllm.parallel.axis_rules.param_specs(model)`): A keeps the kernel's input axes, B its
  output axes, the rank dim is replicated; a scanned kernel's `layers` axis leads both."""
  specs = rules_lib.flatten(base_specs) if base_specs is not None else {}
  out = {}
  for path, ad in _adapter_items(adapters).items():
    spec = specs.get(path)
    names = tuple(spec) if spec is not None else (None,) * (ad.n_lead + ad.n_in + ad.n_out)
    lead, ins, outs = (names[:ad.n_lead], names[ad.n_lead:ad.n_lead + ad.n_in],
                       names[ad.n_lead + ad.n_in:])
    out[path] = LoRAWeights(a=P(*lead, *ins, None), b=P(*lead, None, *outs), scale=ad.scale,
                            n_in=ad.n_in, dropout=ad.dropout)
  return rules_lib.unflatten(out)


def describe(adapters) -> str:
  flat = _adapter_items(adapters)
  if not flat:
    return 'no adapters'
  first = next(iter(flat.values()))
  return (f'{len(flat)} LoRA targets, rank {first.rank}, scale {first.scale:g}, '
          f'{trainable_count(adapters):,} trainable weights')


def targets(adapters) -> list[str]:
  return list(_adapter_items(adapters))

