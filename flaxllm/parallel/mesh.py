"""Device mesh from config: axes `data`, `fsdp`, `tensor` (+ across-slice factors).

    make_mesh({'data': 2, 'fsdp': -1, 'tensor': 2})          # -1 takes the remaining devices
    make_mesh({'fsdp': -1, 'dcn_data': 2})                     # 2 TPU slices, data parallel over DCN

`data`, `fsdp` and `tensor` are the axes *inside* a slice (ICI); `dcn_data` and `dcn_fsdp` are
the factors *across* slices (multi-slice TPU pods, DCN). The mesh always has the three axes
(size-1 axes included) so that sharding rules can name them unconditionally; its axis sizes
are data * dcn_data, fsdp * dcn_fsdp and tensor. All axes are `AxisType.Auto`, which Linen's
logical partitioning needs (`jax.make_mesh` defaults to Explicit axes).
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh
from ml_collections import ConfigDict

AXES = ('data', 'fsdp', 'tensor')
DCN_AXES = ('dcn_data', 'dcn_fsdp')
DEFAULT = {'data': 1, 'fsdp': -1, 'tensor': 1, 'dcn_data': 1, 'dcn_fsdp': 1}


class MeshError(ValueError):
  """A mesh configuration that cannot be built; the message names the axis and the fix."""


def config_section() -> ConfigDict:
  """`config.mesh`: a mesh over all devices; one in-slice axis may be -1 (the remaining
  devices); the dcn_* factors split multi-slice TPU pods across slices."""
  return ConfigDict(DEFAULT)


def check_section(mesh_cfg) -> None:
  """MeshError (one sentence) for an axis size that is neither positive nor -1."""
  for axis, size in _as_dict(mesh_cfg).items():
    if axis not in DEFAULT:
      raise MeshError(f'mesh.{axis} is not a mesh axis; use {sorted(DEFAULT)}.')
    if not (isinstance(size, int) and not isinstance(size, bool) and (size >= 1 or size == -1)):
      raise MeshError(f'mesh.{axis}={size!r} must be a positive integer or -1 (the remaining '
                      f'devices); set e.g. --config.mesh.{axis}=1.')


def _as_dict(mesh_cfg) -> dict:
  if mesh_cfg is None:
    return {}
  if hasattr(mesh_cfg, 'to_dict'):
    mesh_cfg = mesh_cfg.to_dict()
  return dict(mesh_cfg)


def _fill(sizes: dict, names: Sequence[str], total: int, what: str) -> dict:
  """Replaces the single -1 among `names` so that the product of their sizes is `total`."""
  for name in names:
    v = sizes[name]
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or (v < 1 and v != -1):
      raise MeshError(f'mesh.{name} must be a positive integer or -1, got {v!r}.')
  free = [n for n in names if sizes[n] == -1]
  if len(free) > 1:
    raise MeshError(f'only one of mesh.{"/".join(names)} may be -1, got '
                    f'{", ".join(f"{n}=-1" for n in free)}; give the others explicit sizes.')
  fixed = math.prod(sizes[n] for n in names if sizes[n] != -1)
  desc = ' x '.join(f'{n}={sizes[n]}' for n in names if sizes[n] != -1) or '1'
  if free:
    if total % fixed:
      raise MeshError(f'mesh.{free[0]}=-1 cannot take the remaining {what}: {total} is not '
                      f'divisible by {desc} = {fixed}; choose sizes that divide {total}.')
    sizes = {**sizes, free[0]: total // fixed}
  elif fixed != total:
    raise MeshError(f'the mesh {desc} = {fixed} {what} does not match the {total} {what} '
                    f'available; make the product {total} or set one axis to -1.')
  return sizes


def _num_slices(devices) -> int:
  idx = {getattr(d, 'slice_index', None) for d in devices}
  return 1 if None in idx else len(idx)


def parse_spec(spec: str) -> dict[str, int]:
  """'fsdp:4,tensor:2' (or 'fsdp:4/tensor:2', for lm-eval's comma-separated model_args) ->
  {'fsdp': 4, 'tensor': 2}: the mesh of a command-line flag; MeshError in one sentence."""
  sizes = {}
  for item in filter(None, (s.strip() for s in spec.replace('/', ',').split(','))):
    axis, _, size = item.partition(':')
    if axis not in DEFAULT or not size.lstrip('-').isdigit():
      raise MeshError(f'mesh {spec!r}: {item!r} is not AXIS:SIZE with AXIS one of '
                      f'{", ".join(DEFAULT)}; write e.g. fsdp:4,tensor:2.')
    sizes[axis] = int(size)
  check_section(sizes)
  return sizes


def mesh_shape(mesh_cfg: Mapping[str, Any] | None, num_devices: int,
               num_slices: int | None = None) -> dict[str, int]:
  """Resolves -1 entries: {'data', 'fsdp', 'tensor', 'dcn_data', 'dcn_fsdp'} -> ints.

  The across-slice factors must multiply to the number of slices (`num_slices`, defaulting to
  their product); the in-slice axes then multiply to the devices per slice.
  """
  cfg = _as_dict(mesh_cfg)
  unknown = sorted(set(cfg) - set(DEFAULT))
  if unknown:
    raise MeshError(f'unknown mesh config key(s) {unknown}; known keys are {sorted(DEFAULT)}.')
  sizes = {**DEFAULT, **cfg}
  if any(sizes[n] == -1 for n in AXES if n in cfg) and 'fsdp' not in cfg:
    sizes['fsdp'] = 1   # the default -1 on fsdp yields to an explicit -1 elsewhere
  if num_slices is None:
    if any(sizes[n] == -1 for n in DCN_AXES):
      raise MeshError('mesh.dcn_data/dcn_fsdp=-1 needs the number of slices, which these '
                      'devices do not report; give the across-slice factors explicitly.')
    num_slices = math.prod(sizes[n] for n in DCN_AXES)
  sizes = _fill(sizes, DCN_AXES, num_slices, 'slices')
  if num_devices % num_slices:
    raise MeshError(f'{num_devices} devices cannot be split into {num_slices} slices '
                    f'(dcn_data x dcn_fsdp); check the across-slice factors.')
  return _fill(sizes, AXES, num_devices // num_slices, 'devices')


def make_mesh(mesh_cfg: Mapping[str, Any] | None = None, devices: Sequence[Any] | None = None
              ) -> Mesh:
  """A `jax.sharding.Mesh` with axes ('data', 'fsdp', 'tensor') over `devices` (default: all).

  `mesh_cfg` is a dict or ConfigDict with any of data, fsdp, tensor (one may be -1; fsdp
  defaults to -1, the others to 1) and dcn_data, dcn_fsdp (across-slice factors, default 1).
  """
  devices = list(jax.devices() if devices is None else devices)
  real_slices = _num_slices(devices)
  cfg = _as_dict(mesh_cfg)
  dcn_given = any(n in cfg for n in DCN_AXES)
  sizes = mesh_shape(cfg, len(devices), real_slices if (real_slices > 1 or not dcn_given)
                     else None)
  ici = [sizes[n] for n in AXES]
  dcn = [sizes['dcn_data'], sizes['dcn_fsdp'], 1]
  shape = [i * d for i, d in zip(ici, dcn)]
  types = (AxisType.Auto,) * len(AXES)
  if math.prod(dcn) == 1:
    if devices == list(jax.devices()) or _is_topology(devices):
      try:  # physical-topology-aware device order
        return jax.make_mesh(shape, AXES, axis_types=types, devices=devices)
      except (ValueError, NotImplementedError, AssertionError):
        pass
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), AXES, axis_types=types)
  if real_slices > 1:
    arr = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
  elif jax.process_count() == math.prod(dcn):
    arr = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=True)
  else:
    # No slice information (CPU, GPU within one process): emulate slices as contiguous blocks
    # of devices, so the layout (and the compiled program) matches a real multi-slice run.
    warnings.warn(f'devices report no slices; emulating {math.prod(dcn)} slices as '
                  'contiguous blocks of devices.')
    arr = np.asarray(devices, dtype=object).reshape(dcn + ici)      # [D0 D1 D2 I0 I1 I2]
    arr = arr.transpose(0, 3, 1, 4, 2, 5).reshape(shape)
  return Mesh(arr, AXES, axis_types=types)


def _is_topology(devices) -> bool:
  return bool(devices) and getattr(devices[0], 'platform', '') == 'tpu'


def describe(mesh: Mesh) -> str:
  """'data=2 fsdp=2 tensor=2 (8 cpu devices)'."""
  axes = ' '.join(f'{k}={v}' for k, v in mesh.shape.items())
  return f'{axes} ({mesh.devices.size} {mesh.devices.flat[0].platform} devices)'
