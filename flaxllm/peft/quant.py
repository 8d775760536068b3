"""Weight quantisation as a parameter-tree transform: NF4 (QLoRA) and int8, blockwise.

    q = quantize(kernel, 'nf4', block_size=64, double_quant=True)   # a QuantizedTensor
    w = q.dequantize(jnp.bfloat16)                                   # [..., *kernel.shape]
    tree = quantize_tree(params, 'all-linear', kind='nf4')          # kernels -> QuantizedTensor

NF4 (Dettmers et al. 2023): each block of `block_size` consecutive weights (row-major over the
kernel, per layer) is divided by its absolute maximum and rounded to the nearest of the 16
NormalFloat levels (quantiles of N(0, 1), rescaled to [-1, 1], with an exact 0); two 4-bit codes
share a byte. Double quantisation stores the per-block absmax in 8 bits as well:
absmax ~= offset + scale * q, with one float32 offset per tensor (the mean absmax) and one
float32 scale per 256 absmax values. int8: round(127 * w / absmax) per block.

Bytes per weight: NF4 0.5 + 4/64 = 0.5625 (4.5 bits), with double quantisation
0.5 + 1/64 + 4/(64*256) ~= 0.516 (4.13 bits); int8 1 + 4/64 = 1.0625.

A QuantizedTensor is a pytree (flax.struct dataclass) that `flaxllm.models.layers.Linear`
accepts in place of its kernel: it dequantises on the fly inside a `jax.checkpoint`, so the
backward pass recomputes the dequantised weight instead of keeping it. Every array has the
leading dims of the original (a scanned model's [layers] axis), so `nn.scan` slices it per layer.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

from flaxllm.peft import path_rules as rules_lib

# The 16 NF4 levels (bitsandbytes' table, the QLoRA paper's Appendix E).
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)
# Largest rounding error of a normalised weight: half the widest gap between levels.
NF4_MAX_ERROR = float(np.max(np.diff(NF4_LEVELS)) / 2)
KINDS = ('nf4', 'int8')
DQ_BLOCK = 256  # absmax values per double-quantisation scale


class QuantError(ValueError):
  """A quantisation setting that cannot work."""


@flax.struct.dataclass
class QuantizedTensor:
  """A blockwise-quantised weight; arrays keep the original leading dims (`lead`)."""
  codes: jax.Array                  # nf4: uint8 [*lead, padded / 2]; int8: int8 [*lead, padded]
  absmax: jax.Array                 # float32 [*lead, blocks]; double quant: int8 [*lead, blocks']
  absmax_scale: Optional[jax.Array] = None   # double quant: float32 [*lead, blocks' / 256]
  absmax_offset: Optional[jax.Array] = None  # double quant: float32 [*lead]
  shape: tuple = flax.struct.field(pytree_node=False, default=())   # per-layer weight shape
  dtype: str = flax.struct.field(pytree_node=False, default='float32')  # of the original
  kind: str = flax.struct.field(pytree_node=False, default='nf4')
  block_size: int = flax.struct.field(pytree_node=False, default=64)

  @property
  def size(self) -> int:
    """Number of weights represented (all leading dims included)."""
    return math.prod(self.lead) * math.prod(self.shape)

  @property
  def lead(self) -> tuple:
    return tuple(self.codes.shape[:-1])

  @property
  def nbytes(self) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self))

  def dequantize(self, dtype=None) -> jax.Array:
    """The weight [*lead, *shape] in `dtype` (default: the original dtype)."""
    return _dequantize(self, jnp.dtype(dtype or self.dtype))

  def contract(self, x, n_in: int, dtype, rng=None):
    """x · W over the last `n_in` dims of x (what Linear computes), dequantising on the fly."""
    del rng
    return _dequant_dot(x.astype(dtype), self, n_in, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnames=('dtype',))
def _dequantize(q: QuantizedTensor, dtype) -> jax.Array:
  lead, n = q.lead, math.prod(q.shape)
  if q.kind == 'nf4':
    hi = (q.codes >> 4).astype(jnp.int32)
    lo = (q.codes & 0x0F).astype(jnp.int32)
    idx = jnp.stack([hi, lo], axis=-1).reshape(*lead, -1)
    values = jnp.asarray(NF4_LEVELS)[idx]
  else:
    values = q.codes.astype(jnp.float32) / 127.0
  absmax = _absmax(q)
  values = values.reshape(*lead, absmax.shape[-1], q.block_size) * absmax[..., None]
  w = values.reshape(*lead, -1)[..., :n].reshape(*lead, *q.shape)
  return w.astype(dtype)


def _absmax(q: QuantizedTensor) -> jax.Array:
  if q.absmax_scale is None:
    return q.absmax
  nb = q.absmax.shape[-1]
  scale = jnp.repeat(q.absmax_scale, DQ_BLOCK, axis=-1)[..., :nb]
  return q.absmax_offset[..., None] + scale * q.absmax.astype(jnp.float32)


def _dequant_dot_impl(x, q, n_in, dtype):
  return jnp.tensordot(x, q.dequantize(dtype), axes=n_in)


# Recompute the dequantised weight in the backward pass instead of saving it: the residuals
# are the input and the 4-bit codes, never a full-size weight.
_dequant_dot = jax.checkpoint(_dequant_dot_impl, static_argnums=(2, 3))


def _pad_last(x, multiple: int, value=0.0):
  n = x.shape[-1]
  pad = -n % multiple
  if not pad:
    return x
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)], constant_values=value)


def quantize(w, kind: str = 'nf4', *, block_size: int = 64, double_quant: bool = False,
             lead: int = 0) -> QuantizedTensor:
  """Blockwise quantisation of `w`; its first `lead` dims (e.g. a scanned [layers] axis) are
  kept on every array, each layer's weights are blocked separately. Jittable."""
  if kind not in KINDS:
    raise QuantError(f'quantisation kind {kind!r} is not known; use one of {KINDS}.')
  if block_size < 2 or block_size % 2:
    raise QuantError(f'block_size={block_size} must be an even number >= 2 (e.g. 64).')
  return _quantize(jnp.asarray(w), kind, block_size, double_quant, lead)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _quantize(w, kind, block_size, double_quant, lead):
  lead_shape, shape = tuple(w.shape[:lead]), tuple(w.shape[lead:])
  flat = _pad_last(w.reshape(*lead_shape, -1).astype(jnp.float32), block_size)
  blocks = flat.reshape(*lead_shape, -1, block_size)
  absmax = jnp.max(jnp.abs(blocks), axis=-1)
  safe = jnp.where(absmax > 0, absmax, 1.0)
  normed = blocks / safe[..., None]
  if kind == 'nf4':
    levels = jnp.asarray(NF4_LEVELS)
    idx = jnp.argmin(jnp.abs(normed[..., None] - levels), axis=-1).astype(jnp.uint8)
    idx = idx.reshape(*lead_shape, -1, 2)
    codes = (idx[..., 0] << 4) | idx[..., 1]
  else:
    codes = jnp.clip(jnp.round(normed * 127.0), -127, 127).astype(jnp.int8)
    codes = codes.reshape(*lead_shape, -1)
  out = dict(codes=codes, absmax=absmax, shape=shape, dtype=jnp.dtype(w.dtype).name, kind=kind,
             block_size=block_size)
  if double_quant:
    offset = jnp.mean(absmax, axis=-1)
    centred = _pad_last(absmax - offset[..., None], DQ_BLOCK)
    groups = centred.reshape(*lead_shape, -1, DQ_BLOCK)
    scale = jnp.max(jnp.abs(groups), axis=-1) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(groups / scale[..., None]), -127, 127).astype(jnp.int8)
    n_blocks = absmax.shape[-1]
    out.update(absmax=q.reshape(*lead_shape, -1)[..., :n_blocks], absmax_scale=scale,
               absmax_offset=offset)
  return QuantizedTensor(**out)


def error_bound(q: QuantizedTensor) -> jax.Array:
  """Per-weight bound on |w - dequantize(q)| [*lead, *shape]: half the widest level gap
  times the block's absmax (NF4), or half a step (int8), plus the absmax's own error."""
  absmax = _absmax(q)
  step = NF4_MAX_ERROR if q.kind == 'nf4' else 0.5 / 127.0
  per_block = absmax * step
  if q.absmax_scale is not None:  # the stored absmax is off by at most half its step s
    nb = q.absmax.shape[-1]
    half = jnp.repeat(q.absmax_scale, DQ_BLOCK, axis=-1)[..., :nb] * 0.5
    per_block = (absmax + half) * step + half
  lead, n = q.lead, math.prod(q.shape)
  b = jnp.repeat(per_block, q.block_size, axis=-1)[..., :n]
  return b.reshape(*lead, *q.shape)


def is_quantized(x) -> bool:
  return isinstance(x, QuantizedTensor)


def _lead(path: str) -> int:
  return 1 if '/layers/' in f'/{path}/' else 0


def quantize_tree(params, rules: rules_lib.Rules = rules_lib.ALL_LINEAR, *, kind: str = 'nf4',
                  block_size: int = 64, double_quant: bool = True):
  """`params` with the Linear kernels selected by `rules` replaced by QuantizedTensors (a
  scanned model's stacked kernels keep their leading [layers] axis). Jittable; under
  `jax.eval_shape` it gives the abstract quantised tree for ahead-of-time compilation."""
  flat = rules_lib.flatten(params)
  chosen = rules_lib.select(params, rules, kernels=True, what='quantisation rule')
  for p in chosen:
    flat[p] = quantize(flat[p], kind, block_size=block_size, double_quant=double_quant,
                       lead=_lead(p))
  return rules_lib.unflatten(flat)


def dequantize_tree(tree, dtype=None):
  """Inverse of `quantize_tree` (up to the quantisation error)."""
  return jax.tree.map(lambda x: x.dequantize(dtype) if is_quantized(x) else x, tree,
                      is_leaf=is_quantized)


def tree_bytes(tree) -> dict[str, Any]:
  """{'bytes', 'params', 'bytes_per_param', 'quantized_bytes', 'quantized_params'} of a tree
  (quantised tensors count the weights they represent)."""
  total_b = total_n = qb = qn = 0
  for leaf in jax.tree.leaves(tree, is_leaf=is_quantized):
    if is_quantized(leaf):
      qb += leaf.nbytes
      qn += leaf.size
    else:
      total_b += leaf.size * jnp.dtype(leaf.dtype).itemsize
      total_n += leaf.size
  return {'bytes': total_b + qb, 'params': total_n + qn,
          'bytes_per_param': (total_b + qb) / max(total_n + qn, 1),
          'quantized_bytes': qb, 'quantized_params': qn,
          'quantized_bytes_per_param': qb / max(qn, 1)}
