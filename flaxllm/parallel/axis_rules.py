"""Logical-axis rules: how the models' logical axis names map onto the mesh axes.

A rule set is a tuple of `(logical_name, mesh_axes)` pairs, as `flax.linen.logical_axis_rules`
expects: earlier rules win and a mesh axis is used at most once per array, so `batch` (listed
first) takes ('data', 'fsdp') on activations and `embed` falls back to replicated there, while
on parameters (which have no batch dim) `embed` is sharded over 'fsdp'. Presets:

  fsdp     (default) ZeRO-3 style: every weight sharded over 'fsdp' along its embed dim, the
           batch over ('data', 'fsdp').
  dp       pure data parallel: weights replicated, the batch over ('data', 'fsdp').
  fsdp_tp  FSDP plus Megatron-style tensor parallelism: heads / kv_heads / mlp / vocab over
           'tensor', embed over 'fsdp', the batch over ('data', 'fsdp').

Rules are plain data: pass a preset name or your own tuple anywhere a `rules` argument is taken.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

LOGICAL_AXES = ('batch', 'length', 'embed', 'heads', 'kv_heads', 'head_dim', 'mlp', 'vocab',
                'layers')
BATCH_AXES = ('data', 'fsdp')

Rules = tuple[tuple[str, Union[str, tuple[str, ...], None]], ...]

_COMMON_TAIL = (('length', None), ('head_dim', None), ('layers', None))

PRESETS: dict[str, Rules] = {
    'fsdp': (('batch', BATCH_AXES), ('embed', 'fsdp'),
             ('heads', None), ('kv_heads', None), ('mlp', None), ('vocab', None)) + _COMMON_TAIL,
    'dp': (('batch', BATCH_AXES), ('embed', None),
           ('heads', None), ('kv_heads', None), ('mlp', None), ('vocab', None)) + _COMMON_TAIL,
    'fsdp_tp': (('batch', BATCH_AXES), ('heads', 'tensor'), ('kv_heads', 'tensor'),
                ('mlp', 'tensor'), ('vocab', 'tensor'), ('embed', 'fsdp')) + _COMMON_TAIL,
}

# The knob to turn when a logical axis does not divide its mesh axes.
_FIX = {'heads': 'model.num_heads', 'kv_heads': 'model.num_kv_heads', 'mlp': 'model.mlp_dim',
        'embed': 'model.d_model', 'vocab': 'model.vocab_size', 'head_dim': 'model.head_dim',
        'layers': 'model.num_layers', 'length': 'the sequence length',
        'batch': 'the batch size'}


class ShardingError(ValueError):
  """Sharding that cannot work; the message names the array, the axis and the fix."""


def config_section() -> ConfigDict:
  """`config.parallel`: which logical-axis rules map the model onto the mesh."""
  return ConfigDict({'rules': 'fsdp'})   # a preset of PRESETS: 'fsdp' | 'dp' | 'fsdp_tp'


def check_section(section) -> None:
  if section.rules not in PRESETS:
    raise ShardingError(f'parallel.rules={section.rules!r} is not a rule preset; choose one of '
                        f'{sorted(PRESETS)}.')


def get_rules(rules: Union[str, Sequence, None] = None) -> Rules:
  """A preset name ('fsdp', 'dp', 'fsdp_tp'), a ConfigDict/tuple of pairs, or None ('fsdp')."""
  if rules is None:
    rules = 'fsdp'
  if isinstance(rules, str):
    if rules not in PRESETS:
      raise ShardingError(f'unknown sharding rules {rules!r}; choose one of '
                          f'{sorted(PRESETS)} or pass a tuple of (logical, mesh axes) pairs.')
    return PRESETS[rules]
  out = []
  for pair in rules:
    name, axes = pair
    out.append((str(name), tuple(axes) if isinstance(axes, list) else axes))
  return tuple(out)


def rules_name(rules) -> str:
  rules = get_rules(rules)
  return next((k for k, v in PRESETS.items() if v == rules), 'custom')


def _mesh_axes_of(rules: Rules) -> set[str]:
  used = set()
  for _, axes in rules:
    used.update(a for a in jax.tree.leaves(axes) if a is not None)
  return used


def check_mesh(mesh: Mesh, rules) -> None:
  """Every mesh axis of size > 1 must be used by the rules (else work is silently duplicated)."""
  rules = get_rules(rules)
  used = _mesh_axes_of(rules)
  unknown = sorted(used - set(mesh.axis_names))
  if unknown:
    raise ShardingError(f'sharding rules {rules_name(rules)!r} name mesh axes {unknown} that '
                        f'the mesh {dict(mesh.shape)} does not have.')
  for axis, size in mesh.shape.items():
    if size > 1 and axis not in used:
      hint = " use rules='fsdp_tp' or" if axis == 'tensor' else ''
      raise ShardingError(f'mesh axis {axis!r} has size {size} but sharding rules '
                          f'{rules_name(rules)!r} do not use it, so every device along it would '
                          f'repeat the same work;{hint} set mesh.{axis}=1.')


def logical_to_mesh_spec(logical: Sequence | None, rules) -> P:
  """Logical PartitionSpec (e.g. P('embed', 'heads', 'head_dim')) -> mesh PartitionSpec."""
  if logical is None:
    return P()
  return nn.logical_to_mesh_axes(tuple(logical), get_rules(rules))


def _is_spec(x) -> bool:
  return isinstance(x, P)


def logical_to_sharding(specs: Any, mesh: Mesh, rules) -> Any:
  """Pytree of logical PartitionSpecs -> pytree of NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(specs, mesh, get_rules(rules))


def _path_str(path) -> str:
  parts = []
  for k in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return '/'.join(parts)


def validate(shapes: Any, specs: Any, mesh: Mesh, rules) -> None:
  """Checks that every sharded dim is divisible by the product of its mesh axes.

  `shapes`: pytree of arrays / ShapeDtypeStructs; `specs`: matching logical PartitionSpecs.
  Raises ShardingError naming the first offending parameter, its logical axis and the fix.
  """
  rules = get_rules(rules)
  flat_shapes = jax.tree_util.tree_flatten_with_path(shapes)[0]
  flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: _is_spec(x) or x is None)
  if len(flat_shapes) != len(flat_specs):
    raise ValueError(f'{len(flat_shapes)} arrays but {len(flat_specs)} partition specs.')
  for (path, leaf), logical in zip(flat_shapes, flat_specs):
    if logical is None or not hasattr(leaf, 'shape'):
      continue
    mesh_spec = logical_to_mesh_spec(logical, rules)
    for dim, (name, axes) in enumerate(zip(tuple(logical), tuple(mesh_spec))):
      if axes is None:
        continue
      axes = (axes,) if isinstance(axes, str) else tuple(axes)
      n = math.prod(mesh.shape[a] for a in axes)
      size = leaf.shape[dim]
      if size % n:
        where = ' x '.join(f'{a}={mesh.shape[a]}' for a in axes)
        knob = _FIX.get(name, f'the {name} size')
        raise ShardingError(
            f'{_path_str(path)} dim {dim} ({name}={size}) cannot be split over mesh {where} '
            f'= {n} devices; make mesh.{axes[-1]} a divisor of {size}, change {knob}, or use '
            f'rules that do not shard {name!r}.')


def param_specs(model: nn.Module, *example_inputs, rng=None) -> Any:
  """Logical PartitionSpecs of `model`'s params (no arrays allocated).

  `example_inputs` default to a [1, 8] int32 token batch (two for encoder-decoders).
  """
  example_inputs = example_inputs or _example_inputs(model)
  rng = jax.random.key(0) if rng is None else rng
  abstract = jax.eval_shape(lambda: model.init(rng, *example_inputs))
  return nn.get_partition_spec(abstract)['params']


def _example_inputs(model: nn.Module) -> tuple:
  """A [1, 8] int32 token batch for each input of `model` (two for encoder-decoders)."""
  tokens = jnp.zeros((1, 8), jnp.int32)
  return (tokens, tokens) if type(model).__name__ == 'EncoderDecoder' else (tokens,)


def param_shapes(model: nn.Module, *example_inputs, rng=None) -> Any:
  example_inputs = example_inputs or _example_inputs(model)
  rng = jax.random.key(0) if rng is None else rng
  abstract = jax.eval_shape(lambda: model.init(rng, *example_inputs))
  return jax.tree.map(lambda x: x.unbox(apply_constraint=False)
                      if isinstance(x, nn.meta.AxisMetadata) else x, abstract['params'],
                      is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def param_shardings(model: nn.Module, mesh: Mesh, rules=None, *example_inputs) -> Any:
  """NamedShardings of `model`'s params on `mesh` under `rules`, validated for divisibility."""
  rules = get_rules(rules)
  check_mesh(mesh, rules)
  specs = param_specs(model, *example_inputs)
  validate(param_shapes(model, *example_inputs), specs, mesh, rules)
  return logical_to_sharding(specs, mesh, rules)


def batch_axes(rules=None) -> Union[str, tuple[str, ...], None]:
  """The mesh axes the batch dim is sharded over under `rules`."""
  return dict(get_rules(rules)).get('batch')


def batch_sharding(mesh: Mesh, rules=None, ndim: int = 2) -> NamedSharding:
  """Sharding of a [batch, ...] array: the batch dim over the data axes, the rest replicated."""
  return NamedSharding(mesh, P(batch_axes(rules), *([None] * (ndim - 1))))


def data_parallel_size(mesh: Mesh, rules=None) -> int:
  axes = batch_axes(rules)
  axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def check_batch(batch_size: int, mesh: Mesh, rules=None) -> None:
  """The global batch must split evenly over the data-parallel axes and over processes."""
  axes = batch_axes(rules)
  axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
  n = data_parallel_size(mesh, rules)
  if batch_size % n:
    where = ' x '.join(f'{a}={mesh.shape[a]}' for a in axes)
    raise ShardingError(f'the global batch size {batch_size} is not divisible by the '
                        f'data-parallel mesh axes {where} = {n}; use a multiple of {n}.')
  if batch_size % jax.process_count():
    raise ShardingError(f'the global batch size {batch_size} is not divisible by the '
                        f'{jax.process_count()} processes; use a multiple of '
                        f'{jax.process_count()}.')


def rules_context(rules=None):
  """Context manager activating `rules` for `nn.with_logical_constraint` on activations."""
  return nn.logical_axis_rules(get_rules(rules))


def describe(rules) -> Iterable[str]:
  return [f'{k} -> {v}' for k, v in get_rules(rules)]
