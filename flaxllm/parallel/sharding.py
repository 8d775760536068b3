"""Sharded state creation and batch placement: what a trainer calls to run on a mesh.

    mesh = make_mesh(cfg.mesh); rules = get_rules(cfg.parallel.rules)
    init = functools.partial(init_state, model, tx)
    state, state_sh = create_sharded(init, mesh, rules, rng, param_specs=param_specs(model))

    def sharded_step(state, batch):
      with step_context(mesh, rules):          # activation constraints while tracing
        return train_step(state, batch)

    step = jax.jit(sharded_step, in_shardings=(state_sh, batch_sharding(mesh, rules)),
                   out_shardings=(state_sh, None), donate_argnums=0)
    state, metrics = step(state, shard_batch(host_batch, mesh, rules))

`create_sharded` jits `init_fn` with `out_shardings` derived from the logical axis names, so
every array is created directly in its shards (the full model never sits on one host).
`abstract_state` gives the same shardings on ShapeDtypeStructs without allocating: the target
for restoring an orbax checkpoint onto this mesh (`ocp.args.StandardRestore(abstract)`), and
the inputs of an ahead-of-time compile (`aot.compile_train_step`).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from flaxllm.parallel import axis_rules as rules_lib


@contextlib.contextmanager
def sharding_context(mesh: Mesh, rules=None):
  """Sets `mesh` as the current mesh and `rules` for Linen's logical activation constraints."""
  with jax.set_mesh(mesh), rules_lib.rules_context(rules):
    yield


@contextlib.contextmanager
def step_context(mesh: Mesh, rules=None):
  """For use *inside* a jitted step (where `jax.set_mesh` is not allowed): makes the mesh and
  `rules` visible to Linen's `with_logical_constraint`, so activations are sharded too.
  Without it (and outside `sharding_context`) the models' activation annotations are no-ops."""
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), rules_lib.rules_context(rules):
    yield


def _is_box(x) -> bool:
  return isinstance(x, nn.meta.AxisMetadata)


def _is_spec(x) -> bool:
  return isinstance(x, P)


def unbox(tree: Any) -> Any:
  """Removes Linen's logical-partitioning boxes without applying sharding constraints."""
  return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if _is_box(x) else x, tree,
                      is_leaf=_is_box)


def _key_str(k) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def state_specs(abstract_state: Any, param_specs: Any = None) -> Any:
  """Logical PartitionSpecs for every leaf of `abstract_state` (boxes removed).

  * a leaf boxed with logical names (`nn.Partitioned`, `nn.LogicallyPartitioned`): its names;
  * a leaf whose key path *ends with* a parameter's path (given by `param_specs`) and whose
    rank matches it: that parameter's spec -- this covers the params, gradients and optax's
    per-parameter state (AdamW mu / nu, inside `optax.chain`, `masked`, `MultiSteps`, ...);
  * anything else (step counters, rng keys, scalars, factored statistics): replicated, P().
  """
  boxed_specs = jax.tree.map(
      lambda x: x.get_partition_spec() if _is_box(x) else P(), abstract_state, is_leaf=_is_box)
  if param_specs is None:
    return boxed_specs
  by_path = {tuple(_key_str(k) for k in path): spec for path, spec in
             jax.tree_util.tree_flatten_with_path(param_specs, is_leaf=_is_spec)[0]}
  lengths = sorted({len(p) for p in by_path}, reverse=True)

  def match(path, leaf):
    keys = tuple(_key_str(k) for k in path)
    for n in lengths:
      spec = by_path.get(keys[-n:]) if len(keys) >= n else None
      if spec is not None and len(getattr(leaf, 'shape', ())) == len(spec):
        return spec
    return P()

  unboxed = unbox(abstract_state)
  matched = jax.tree_util.tree_map_with_path(match, unboxed)
  boxed_leaves, out_def = jax.tree.flatten(boxed_specs, is_leaf=_is_spec)
  matched_leaves = jax.tree.leaves(matched, is_leaf=_is_spec)
  leaves = [b if len(b) else m for b, m in zip(boxed_leaves, matched_leaves)]
  return jax.tree.unflatten(out_def, leaves)


def state_shardings(abstract_state: Any, mesh: Mesh, rules=None, param_specs: Any = None,
                    validate: bool = True) -> Any:
  """NamedShardings for an (abstract) state; validates divisibility first."""
  rules = rules_lib.get_rules(rules)
  rules_lib.check_mesh(mesh, rules)
  specs = state_specs(abstract_state, param_specs)
  if validate:
    rules_lib.validate(unbox(abstract_state), specs, mesh, rules)
  return rules_lib.logical_to_sharding(specs, mesh, rules)


def create_sharded(init_fn: Callable[..., Any], mesh: Mesh, rules=None, *args,
                   param_specs: Any = None, donate_argnums=(), **kwargs):
  """Runs `init_fn(*args, **kwargs)` under `jax.jit` with `out_shardings` from logical names.

  `init_fn` may return boxed params (straight from `model.init`) or unboxed ones; pass
  `param_specs` (e.g. `rules.param_specs(model)`) so that unboxed param-shaped subtrees (the
  optimizer state) are sharded like the params. Returns `(state, shardings)`, both unboxed.
  """
  rules = rules_lib.get_rules(rules)
  fn = lambda *a, **k: unbox(init_fn(*a, **k))
  with sharding_context(mesh, rules):
    abstract = jax.eval_shape(init_fn, *args, **kwargs)
    shardings = state_shardings(abstract, mesh, rules, param_specs)
    state = jax.jit(fn, out_shardings=shardings, donate_argnums=donate_argnums)(*args, **kwargs)
  return state, shardings


def abstract_state(init_fn: Callable[..., Any], mesh: Mesh, rules=None, *args,
                   param_specs: Any = None, **kwargs):
  """Like `create_sharded`, without allocating: ShapeDtypeStructs carrying their shardings
  (for ahead-of-time compilation and for restoring checkpoints onto a mesh)."""
  rules = rules_lib.get_rules(rules)
  with sharding_context(mesh, rules):
    abstract = jax.eval_shape(init_fn, *args, **kwargs)
    shardings = state_shardings(abstract, mesh, rules, param_specs)
  unboxed = unbox(abstract)
  return with_shardings(unboxed, shardings), shardings


def with_shardings(abstract: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def local_batch_slice(global_batch_size: int, mesh: Mesh, rules=None) -> slice:
  """Rows of the global batch that this process must load (contiguous under the default
  device order). Two processes that share a batch shard (e.g. a tensor axis that spans
  processes) get the same rows."""
  rules_lib.check_batch(global_batch_size, mesh, rules)
  sharding = rules_lib.batch_sharding(mesh, rules, ndim=1)
  idx = sharding.addressable_devices_indices_map((global_batch_size,))
  starts = sorted({(s[0].start or 0) for s in idx.values()})
  stops = sorted({(s[0].stop if s[0].stop is not None else global_batch_size)
                  for s in idx.values()})
  lo, hi = starts[0], stops[-1]
  rows = hi - lo
  covered = sum(b - a for a, b in zip(starts, stops))
  if covered != rows:
    raise rules_lib.ShardingError('this process holds a non-contiguous part of the batch; '
                                  'load with `jax.make_array_from_callback` instead.')
  return slice(lo, hi)


def _local_shards(mesh: Mesh, rules) -> tuple[int, int]:
  """(data-parallel shards in the mesh, distinct ones on this process's devices)."""
  n = rules_lib.data_parallel_size(mesh, rules)
  idx = rules_lib.batch_sharding(mesh, rules, ndim=1).addressable_devices_indices_map((n,))
  return n, len({s[0].start for s in idx.values()})


def shard_batch(batch: Any, mesh: Mesh, rules=None) -> Any:
  """Host-local numpy batch (this process's rows, see `local_batch_slice`) -> global
  jax.Arrays sharded over the data axes; scalars are replicated."""
  n, k = _local_shards(mesh, rules)

  def put(x):
    x = np.asarray(x)
    if x.ndim == 0:
      return jax.device_put(x, NamedSharding(mesh, P()))
    if x.shape[0] % k:
      if k == n:
        rules_lib.check_batch(x.shape[0], mesh, rules)
      raise rules_lib.ShardingError(
          f"this process's batch of {x.shape[0]} rows is not divisible by its {k} data-parallel "
          f'shards; load a multiple of {k} rows per process.')
    global_shape = (x.shape[0] // k * n,) + x.shape[1:]
    rules_lib.check_batch(global_shape[0], mesh, rules)
    sharding = rules_lib.batch_sharding(mesh, rules, ndim=x.ndim)
    return jax.make_array_from_process_local_data(sharding, x, global_shape)

  return jax.tree.map(put, batch)
