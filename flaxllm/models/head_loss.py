"""The output head and the cross-entropy fused over sequence chunks, with their own VJP.

    objective, sums = chunked_head_ce(head_fn, head_params, hidden, targets, mask,
                                      z_loss=1e-4, chunk_size=128)

equals `losses.lm_sums(head_fn(head_params, hidden), {'targets': ..., 'loss_mask': ...}, z_loss)`
(the same objective sum and 'ce' / 'z' / 'tokens' sums, and the same gradients), but never holds
more than one chunk's [batch, chunk, vocab] logits, and computes each logit once: the forward
pass of a chunk also computes the gradient of the objective with respect to its logits,

    d objective / d logits = mask * (softmax - onehot(target) + z_loss * 2 * lse * softmax),

and pulls it back through the head (`jax.vjp` of `head_fn`: a plain kernel, a tied embedding,
a LoRA/QLoRA kernel alike) into d hidden [batch, seq, embed] and d head_params, which are kept
as residuals; the backward pass only scales them by the incoming cotangent. Three head matmuls
per chunk in all, against four for a chunk recomputed under `jax.checkpoint`
(`split.chunked_sums`) and against [batch, seq, vocab] float32 logits alive for the plain loss.

Only the objective is differentiable: the returned `sums` are statistics (stop_gradient).
Without a gradient (evaluation) the forward computes the loss alone.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from flaxllm.models import losses, split


def _inexact(x) -> bool:
  return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _chunk_sums(logits, targets, mask):
  """'ce', 'z', 'tokens' sums of one chunk, and the per-token logsumexp they come from."""
  ce, lse = losses.cross_entropy(logits, targets)
  return losses.token_sums(ce, lse, mask), lse


def _head_of_leaves(head_fn, treedef, leaves, hidden):
  return head_fn(jax.tree.unflatten(treedef, leaves), hidden)


def _loss(head_fn, z_loss, chunk, head_params, hidden, targets, mask):
  """(objective, sums), the loss alone, chunk by chunk (no residuals)."""
  def body(total, xs):
    h, t, m = xs
    sums, _ = _chunk_sums(head_fn(head_params, h), t, m)
    return jax.tree.map(jnp.add, total, sums), None

  zero = jnp.zeros((), jnp.float32)
  sums, _ = jax.lax.scan(body, {'ce': zero, 'z': zero, 'tokens': zero},
                         split.chunk_sequence((hidden, targets, mask), chunk)[0])
  return sums['ce'] + z_loss * sums['z'], sums


def _loss_and_grads(head_fn, z_loss, chunk, leaves, trained, hidden, targets, mask):
  """(objective, sums), d objective / d ([leaves[i] for i in trained], hidden)."""
  def head_of(trained_leaves, h):
    full = list(leaves)
    for i, x in zip(trained, trained_leaves):
      full[i] = x
    return head_fn(full, h)

  def body(carry, xs):
    total, d_leaves = carry
    h, t, m = xs
    logits, pullback = jax.vjp(head_of, [leaves[i] for i in trained], h)
    sums, lse = _chunk_sums(logits, t, m)
    probs = jnp.exp(logits.astype(jnp.float32) - lse[..., None])
    d_logits = probs * (1.0 + 2.0 * z_loss * lse)[..., None] if z_loss else probs
    d_logits = d_logits - jax.nn.one_hot(t, logits.shape[-1], dtype=jnp.float32)
    d_chunk_leaves, d_h = pullback((d_logits * m[..., None]).astype(logits.dtype))
    total = jax.tree.map(jnp.add, total, sums)
    d_leaves = [a + d.astype(a.dtype) for a, d in zip(d_leaves, d_chunk_leaves)]
    return (total, d_leaves), d_h

  zero = jnp.zeros((), jnp.float32)
  init = ({'ce': zero, 'z': zero, 'tokens': zero},
          [jnp.zeros(leaves[i].shape, jnp.float32) for i in trained])
  (sums, d_leaves), d_hidden = jax.lax.scan(
      body, init, split.chunk_sequence((hidden, targets, mask), chunk)[0])
  d_hidden = split.unchunk_sequence(d_hidden, hidden.shape[1]).astype(hidden.dtype)
  return (sums['ce'] + z_loss * sums['z'], sums), (d_leaves, d_hidden)


# head_fn(leaves, hidden) takes the head's params as a flat list of leaves, so that the rule
# sees plain arrays (symbolic zeros tell it which leaves are trained: LoRA's frozen base kernel
# gets no d kernel matmul).
@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _fused(head_fn, z_loss, chunk, leaves, hidden, targets, mask):
  return _loss(head_fn, z_loss, chunk, leaves, hidden, targets, mask)


def _fused_fwd(head_fn, z_loss, chunk, leaves, hidden, targets, mask):
  trained = [i for i, x in enumerate(leaves) if x.perturbed and _inexact(x.value)]
  values = [x.value for x in leaves]
  out, (d_leaves, d_hidden) = _loss_and_grads(head_fn, z_loss, chunk, values, trained,
                                              hidden.value, targets.value, mask.value)
  d_params = [None] * len(values)
  for i, d in zip(trained, d_leaves):
    d_params[i] = d.astype(values[i].dtype)
  return out, (d_params, d_hidden)


def _fused_bwd(head_fn, z_loss, chunk, residuals, cotangents):
  d_params, d_hidden = residuals
  g = cotangents[0]                     # the sums are statistics: their cotangent is ignored
  return ([None if d is None else g * d for d in d_params], g * d_hidden, None, None)


_fused.defvjp(_fused_fwd, _fused_bwd, symbolic_zeros=True)


def chunked_head_ce(head_fn: Callable, head_params, hidden, targets, mask, *,
                    z_loss: float = 0.0, chunk_size: int):
  """(objective sum, {'ce', 'z', 'tokens'} sums) of next-token prediction through the head;
  see the module docstring. head_fn(head_params, hidden [batch, chunk, embed]) -> logits;
  targets int [batch, seq]; mask [batch, seq] (float, 1 = trained on); chunk_size > 0 (the
  sequence is zero-padded to a multiple of it, the padding masked)."""
  if chunk_size < 1:
    raise ValueError(f'chunk_size must be positive, got {chunk_size}.')
  leaves, treedef = jax.tree.flatten(head_params)
  head_of_leaves = functools.partial(_head_of_leaves, head_fn, treedef)
  objective, sums = _fused(head_of_leaves, float(z_loss), int(min(chunk_size, hidden.shape[1])),
                           leaves, hidden, targets, mask.astype(jnp.float32))
  return objective, jax.lax.stop_gradient(sums)


__all__ = ['chunked_head_ce']
