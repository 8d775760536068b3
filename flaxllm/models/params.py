"""Pure functions over parameter trees: paths, layer stacking, counting."""
from __future__ import annotations

import re

import flax
import jax
import jax.numpy as jnp

_LAYER = re.compile(r'^layers_(\d+)$')


def flatten(params) -> dict[str, jax.Array]:
  """{'decoder/layers_0/attn/q_proj/kernel': array, ...} (`/`-joined paths)."""
  return {'/'.join(k): v for k, v in flax.traverse_util.flatten_dict(params).items()}


def unflatten(flat: dict[str, jax.Array]):
  return flax.traverse_util.unflatten_dict({tuple(k.split('/')): v for k, v in flat.items()})


def stack_layers(params):
  """Unrolled `layers_{i}` subtrees -> one `layers` subtree with a leading [layers] axis
  (the `scan_layers=True` layout)."""
  if not isinstance(params, dict):
    return params
  layer_keys = sorted((int(m.group(1)), k) for k in params if (m := _LAYER.match(k)))
  out = {k: stack_layers(v) for k, v in params.items() if not _LAYER.match(k)}
  if layer_keys:
    out['layers'] = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[k] for _, k in layer_keys])
  return out


def unstack_layers(params):
  """Inverse of `stack_layers`."""
  if not isinstance(params, dict):
    return params
  out = {k: unstack_layers(v) for k, v in params.items() if k != 'layers'}
  if 'layers' in params:
    n = jax.tree.leaves(params['layers'])[0].shape[0]
    for i in range(n):
      out[f'layers_{i}'] = jax.tree.map(lambda x, i=i: x[i], params['layers'])
  return out


def count(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
