"""Scale-out: meshes, sharding rules (golden PartitionSpecs), sharded training equals
single-device training, 2 processes equal 1, checkpoint resharding, AOT memory, launchers.

Regenerate the golden sharding files (then review the diff by hand):
    FLAXLLM_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_parallel.py -k golden
"""
from __future__ import annotations

import io
import json
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from flaxllm import models, parallel
from flaxllm.parallel import aot, distributed, axis_rules as rules_lib
from flaxllm.train import compile as compile_lib
from flaxllm.parallel.mesh import MeshError, mesh_shape

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = ROOT / 'tests' / 'golden'


def _load_launcher(name):
  import importlib.util
  spec = importlib.util.spec_from_file_location(f'flaxllm_launch_{name}',
                                                ROOT / 'launch' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


local_launch = _load_launcher('local')
tpu_vm = _load_launcher('tpu_vm')

RTOL = 1e-5


def tiny(**kw):
  return models.presets.get('tiny_llama', **kw)  # GQA: 4 heads, 2 kv heads, d=64, mlp=128


def one_device_mesh():
  return parallel.make_mesh({'fsdp': 1}, jax.devices()[:1])


# ----------------------------------------------------------------------------- meshes

@pytest.mark.parametrize('cfg,expected', [
    ({}, (1, 8, 1)),
    ({'data': 8}, (8, 1, 1)),
    ({'data': 2, 'fsdp': 4}, (2, 4, 1)),
    ({'data': 2, 'fsdp': 2, 'tensor': 2}, (2, 2, 2)),
    ({'data': -1, 'tensor': 2}, (4, 1, 2)),
    ({'data': 2, 'tensor': 2}, (2, 2, 2)),       # fsdp defaults to -1
    ({'tensor': -1, 'fsdp': 2}, (1, 2, 4)),
])
def test_mesh_shape(cfg, expected):
  mesh = parallel.make_mesh(cfg)
  assert mesh.axis_names == ('data', 'fsdp', 'tensor')
  assert tuple(mesh.shape.values()) == expected
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_mesh_from_configdict_and_subset_of_devices():
  import ml_collections
  mesh = parallel.make_mesh(ml_collections.ConfigDict({'data': 2, 'fsdp': -1, 'tensor': 1}),
                            jax.devices()[:4])
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 2, 'tensor': 1}
  assert one_device_mesh().devices.size == 1


def test_multislice_factors():
  # 2 emulated slices of 4 devices: the data axis spans slices (DCN), fsdp stays inside one.
  with pytest.warns(UserWarning, match='emulating 2 slices'):
    mesh = parallel.make_mesh({'dcn_data': 2, 'fsdp': -1})
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 4, 'tensor': 1}
  ids = np.vectorize(lambda d: d.id)(mesh.devices)
  assert sorted(ids[0].ravel()) == [0, 1, 2, 3] and sorted(ids[1].ravel()) == [4, 5, 6, 7]
  assert mesh_shape({'dcn_fsdp': 2, 'data': 2, 'fsdp': -1}, 16) == {
      'data': 2, 'fsdp': 4, 'tensor': 1, 'dcn_data': 1, 'dcn_fsdp': 2}


@pytest.mark.parametrize('cfg,message', [
    ({'data': 2, 'fsdp': 2, 'tensor': 4}, 'the mesh data=2 x fsdp=2 x tensor=4 = 16 devices '
     'does not match the 8 devices available; make the product 8 or set one axis to -1.'),
    ({'data': 3, 'fsdp': -1}, 'mesh.fsdp=-1 cannot take the remaining devices: 8 is not '
     'divisible by data=3 x tensor=1 = 3; choose sizes that divide 8.'),
    ({'data': -1, 'fsdp': -1}, 'only one of mesh.data/fsdp/tensor may be -1'),
    ({'tensor': 0}, 'mesh.tensor must be a positive integer or -1, got 0.'),
    ({'model': 2}, "unknown mesh config key(s) ['model']"),
])
def test_mesh_errors(cfg, message):
  with pytest.raises(MeshError) as e:
    parallel.make_mesh(cfg)
  assert message in str(e.value)
  assert str(e.value).endswith('.') and '. ' not in str(e.value)  # one sentence


# ----------------------------------------------------------------------------- golden specs

def _spec_list(spec):
  return [list(a) if isinstance(a, tuple) else a for a in spec]


def sharding_table(preset: str) -> dict:
  """{model variant: {param path: {'logical': [...], 'mesh': [...]}}} for `preset`."""
  out = {}
  for variant, cfg in (('tiny_llama', tiny()), ('tiny_llama_scan', tiny(scan_layers=True))):
    specs = rules_lib.param_specs(models.build(cfg))
    flat = {'/'.join(k): v for k, v in
            __import__('flax').traverse_util.flatten_dict(specs, keep_empty_nodes=False).items()}
    out[variant] = {
        path: {'logical': list(spec),
               'mesh': _spec_list(rules_lib.logical_to_mesh_spec(spec, preset))}
        for path, spec in sorted(flat.items())}
  return out


@pytest.mark.parametrize('preset', sorted(rules_lib.PRESETS))
def test_golden_sharding(preset):
  path = GOLDEN / f'sharding_{preset}.json'
  table = {'rules': [[k, list(v) if isinstance(v, tuple) else v]
                     for k, v in rules_lib.PRESETS[preset]], 'params': sharding_table(preset)}
  if os.environ.get('FLAXLLM_UPDATE_GOLDEN'):
    path.write_text(json.dumps(table, indent=1) + '\n')
  golden = json.loads(path.read_text())
  assert golden == table, f'sharding for {preset!r} changed; review and regenerate {path.name}'


def test_golden_spot_checks():
  """Hand-checked entries of the golden files (the files themselves are the full reference)."""
  g = {p: json.loads((GOLDEN / f'sharding_{p}.json').read_text())['params']
       for p in rules_lib.PRESETS}
  layer = 'decoder/layers_0/'
  tp = g['fsdp_tp']['tiny_llama']
  assert tp[layer + 'attn/q_proj/kernel']['mesh'] == ['fsdp', 'tensor', None]
  assert tp[layer + 'attn/k_proj/kernel']['mesh'] == ['fsdp', 'tensor', None]
  assert tp[layer + 'attn/o_proj/kernel']['mesh'] == ['tensor', None, 'fsdp']
  assert tp[layer + 'mlp/gate_proj/kernel']['mesh'] == ['fsdp', 'tensor']
  assert tp[layer + 'mlp/down_proj/kernel']['mesh'] == ['tensor', 'fsdp']
  assert tp['embed/embedding']['mesh'] == ['tensor', 'fsdp']
  assert tp['lm_head/kernel']['mesh'] == ['fsdp', 'tensor']
  assert tp[layer + 'attn_norm/scale']['mesh'] == ['fsdp']
  scan = g['fsdp_tp']['tiny_llama_scan']
  assert scan['decoder/layers/attn/q_proj/kernel'] == {
      'logical': ['layers', 'embed', 'heads', 'head_dim'], 'mesh': [None, 'fsdp', 'tensor', None]}
  fsdp = g['fsdp']['tiny_llama']
  assert fsdp[layer + 'attn/q_proj/kernel']['mesh'] == ['fsdp', None, None]
  assert fsdp[layer + 'attn/o_proj/kernel']['mesh'] == [None, None, 'fsdp']
  assert fsdp['embed/embedding']['mesh'] == [None, 'fsdp']
  assert all(all(a is None for a in e['mesh']) for e in g['dp']['tiny_llama'].values())
  assert len(fsdp) == 2 * 9 + 3  # 9 params per layer, embed, final norm, lm_head


def test_activation_rules():
  # batch takes ('data', 'fsdp') first, so embed stays replicated on activations.
  r = rules_lib.get_rules('fsdp_tp')
  assert nn.logical_to_mesh_axes(('batch', 'length', 'embed'), r) == P(('data', 'fsdp'), None,
                                                                        None)
  assert nn.logical_to_mesh_axes(('batch', 'length', 'heads', 'head_dim'), r) == P(
      ('data', 'fsdp'), None, 'tensor', None)
  assert nn.logical_to_mesh_axes(('batch', 'length', 'vocab'), r) == P(('data', 'fsdp'), None,
                                                                        'tensor')


# ----------------------------------------------------------------------------- bad input

def test_tensor_axis_must_divide_kv_heads():
  mesh = parallel.make_mesh({'data': 2, 'fsdp': 1, 'tensor': 4})
  with pytest.raises(parallel.ShardingError) as e:
    parallel.param_shardings(models.build(tiny()), mesh, 'fsdp_tp')
  assert str(e.value) == (
      'decoder/layers_0/attn/k_proj/kernel dim 1 (kv_heads=2) cannot be split over mesh '
      'tensor=4 = 4 devices; make mesh.tensor a divisor of 2, change model.num_kv_heads, or use '
      "rules that do not shard 'kv_heads'.")


def test_tensor_axis_must_divide_mlp():
  mesh = parallel.make_mesh({'data': 2, 'fsdp': 1, 'tensor': 4})
  cfg = tiny(num_kv_heads=4, mlp_dim=96 + 2)
  with pytest.raises(parallel.ShardingError, match=r'mlp/down_proj/kernel dim 0 \(mlp=98\)'):
    parallel.param_shardings(models.build(cfg), mesh, 'fsdp_tp')


def test_fsdp_axis_must_divide_embed():
  mesh = parallel.make_mesh({'fsdp': 8})
  cfg = tiny(d_model=36, head_dim=8)
  with pytest.raises(parallel.ShardingError, match=r'embed=36\) cannot be split over mesh '
                     r'fsdp=8 = 8 devices; make mesh.fsdp a divisor of 36, change model.d_model'):
    parallel.param_shardings(models.build(cfg), mesh, 'fsdp')


def test_unused_mesh_axis_is_an_error():
  mesh = parallel.make_mesh({'data': 4, 'fsdp': 1, 'tensor': 2})
  with pytest.raises(parallel.ShardingError, match="mesh axis 'tensor' has size 2 but sharding "
                     "rules 'fsdp' do not use it"):
    parallel.param_shardings(models.build(tiny()), mesh, 'fsdp')
  with pytest.raises(parallel.ShardingError, match="unknown sharding rules 'zero3'"):
    parallel.get_rules('zero3')


def test_batch_must_divide_data_axes():
  mesh = parallel.make_mesh({'data': 2, 'fsdp': 4})
  parallel.check_batch(16, mesh)
  with pytest.raises(parallel.ShardingError) as e:
    parallel.check_batch(12, mesh)
  assert str(e.value) == ('the global batch size 12 is not divisible by the data-parallel mesh '
                          'axes data=2 x fsdp=4 = 8; use a multiple of 8.')
  with pytest.raises(parallel.ShardingError, match='not divisible'):
    parallel.shard_batch({'tokens': np.zeros((6, 9), np.int32)}, mesh)


def test_coordinator_that_never_answers_times_out():
  port = local_launch.free_port()  # nothing listens there
  with pytest.raises(distributed.CoordinatorTimeout) as e:
    distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=1, timeout_s=1)
  assert str(e.value) == (f'the coordinator at 127.0.0.1:{port} did not answer within 1 s; check '
                          f'that process 0 is running and that 127.0.0.1:{port} is reachable '
                          'from this host.')
  assert distributed.initialize() is False  # no coordinator, no cluster: single process


# ----------------------------------------------------------------------------- equivalence
# The trainer itself (flaxllm.train.trainer.train) on each mesh: a GQA LLaMA (4 heads, 2 kv
# heads, d_model 64) on the stdlib corpus, 5 steps of 8 x 16 tokens; every process reads the
# whole global batch (data.process_sharding='global'), so the data is the same everywhere.

MESHES = [({'data': 8}, 'dp'), ({'data': 2, 'fsdp': 4}, 'fsdp'),
          ({'data': 2, 'fsdp': 2, 'tensor': 2}, 'fsdp_tp')]
TRAIN = ['--config.model.vocab_size=264', '--config.model.num_heads=4',
         '--config.model.num_kv_heads=2', '--config.model.d_model=64', '--config.model.mlp_dim=128',
         '--config.seq_len=16', '--config.eval_every=0', '--config.ckpt_every=2',
         '--config.sample.max_new_tokens=0', '--config.data.process_sharding=global',
         '--config.eval_batches=1']
TRAIN_SPEC = f'{ROOT}/configs/default.py:size=tiny,steps=5'


def _mesh_flags(mesh_cfg, preset):
  sizes = {'data': 1, 'fsdp': 1, 'tensor': 1, **mesh_cfg}
  return [f'--config.mesh.{k}={v}' for k, v in sizes.items()] + [
      f'--config.parallel.rules={preset}']


def _train(workdir, mesh_cfg, preset, devices=None):
  from flaxllm import config as config_lib
  from flaxllm.train import trainer
  config = config_lib.load_config(TRAIN_SPEC, TRAIN + _mesh_flags(mesh_cfg, preset))
  summary = trainer.train(config, str(workdir), devices=devices)
  return _losses(workdir), summary


def _losses(workdir):
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  return [r['loss'] for r in rows if 'loss' in r]


@pytest.fixture(scope='module')
def reference_run(tmp_path_factory):
  """The run on one device."""
  workdir = tmp_path_factory.mktemp('one_device')
  losses, summary = _train(workdir, {'fsdp': 1}, 'fsdp', devices=jax.devices()[:1])
  assert len(losses) == 5
  return {'losses': losses, 'summary': summary}


@pytest.fixture(scope='module')
def run_222(tmp_path_factory):
  """The run on (data=2, fsdp=2, tensor=2) under fsdp_tp; checkpoints at steps 2, 4, 5."""
  workdir = tmp_path_factory.mktemp('mesh_222')
  losses, summary = _train(workdir, *MESHES[2])
  return {'losses': losses, 'summary': summary, 'workdir': workdir}


def _check_sharded_state(programs, preset):
  state, mesh = programs.abstract_state, programs.mesh
  q = state.params['model']['decoder']['layers_0']['attn']['q_proj']['kernel']
  mus = [x for x in jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, 'mu'))
         if hasattr(x, 'mu')]
  mu = mus[0].mu['model']['decoder']['layers_0']['attn']['q_proj']['kernel']
  expected = rules_lib.logical_to_mesh_spec(('embed', 'heads', 'head_dim'), preset)
  assert q.sharding.spec == expected and mu.sharding.spec == expected
  assert state.step.sharding.spec == P()
  split = lambda axis: mesh.shape[axis] if axis in expected else 1
  assert q.sharding.shard_shape(q.shape) == (64 // split('fsdp'), 4 // split('tensor'), 16)


@pytest.mark.parametrize('mesh_cfg,preset', MESHES[:2], ids=lambda x: str(x))
def test_sharded_training_matches_one_device(reference_run, mesh_cfg, preset, tmp_path):
  losses, summary = _train(tmp_path, mesh_cfg, preset)
  np.testing.assert_allclose(losses, reference_run['losses'], rtol=RTOL)
  np.testing.assert_allclose(summary['val_loss'], reference_run['summary']['val_loss'],
                             rtol=RTOL)


def test_fsdp_tp_training_matches_one_device(reference_run, run_222):
  from flaxllm import config as config_lib
  from flaxllm.train import trainer
  np.testing.assert_allclose(run_222['losses'], reference_run['losses'], rtol=RTOL)
  config = config_lib.load_config(TRAIN_SPEC, TRAIN + _mesh_flags(*MESHES[2]))
  _check_sharded_state(trainer.build_programs(config, parallel.make_mesh(config.mesh)),
                       'fsdp_tp')


def test_step_shards_activations():
  """The trainer's jitted step carries the models' activation constraints (not dropped for
  lack of a mesh context): e.g. [batch, length, heads, head_dim] over
  (('data', 'fsdp'), -, 'tensor')."""
  import jax.numpy as jnp
  from flaxllm import config as config_lib
  from flaxllm.train import trainer
  config = config_lib.load_config(TRAIN_SPEC, TRAIN + _mesh_flags(*MESHES[2]))
  programs = trainer.build_programs(config, parallel.make_mesh(config.mesh))
  sh = parallel.batch_sharding(programs.mesh, 'fsdp_tp')
  batch = {k: jax.ShapeDtypeStruct((8, 16), jnp.int32, sharding=sh)
           for k in programs.objective.batch_shapes(8, 16)}
  text = programs.train_step.lower(programs.abstract_state, batch, {}).as_text()
  constraints = [l for l in text.splitlines() if 'sharding_constraint' in l]
  assert len(constraints) >= 10
  assert any('{"data", "fsdp"}, {}, {"tensor"}, {}' in l for l in constraints)


def test_create_sharded_with_boxed_params():
  """init_fn may return Linen's boxed params straight from model.init."""
  import optax
  model = models.build(tiny(scan_layers=True))
  mesh = parallel.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  tx = optax.adamw(1e-3)

  def init(rng):
    params = model.init(rng, np.zeros((1, 8), np.int32))['params']  # boxed
    return {'params': params, 'opt': tx.init(params)}

  state, shardings = parallel.create_sharded(init, mesh, 'fsdp_tp', jax.random.key(0))
  k = state['params']['decoder']['layers']['attn']['k_proj']['kernel']
  assert k.shape == (2, 64, 2, 16) and k.sharding.spec == P(None, 'fsdp', 'tensor', None)
  mu = state['opt'][0].mu['decoder']['layers']['attn']['k_proj']['kernel']
  assert mu.sharding.spec == P(None, 'fsdp', 'tensor', None)
  assert k.addressable_shards[0].data.shape == (2, 32, 1, 16)


def test_optimizer_state_follows_params_through_optax_wrappers():
  """mu / nu inside chain + masked (norm scales masked out) get their param's sharding; the
  step counter, counts and rng stay replicated. Abstract only: nothing is compiled."""
  import optax
  model = models.build(tiny())
  mesh = parallel.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  specs = parallel.param_specs(model)
  mask = jax.tree.map(lambda s: len(s) > 1, specs, is_leaf=lambda x: isinstance(x, P))
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.masked(optax.adamw(1e-3), mask))

  def init(rng):
    params = models.init_params(model, rng)
    return {'params': params, 'opt_state': tx.init(params), 'step': 0,
            'rng': jax.random.key_data(rng)}

  _, sh = parallel.abstract_state(init, mesh, 'fsdp_tp', jax.random.key(0), param_specs=specs)
  inner = sh['opt_state'][1].inner_state[0]
  q = ('decoder', 'layers_1', 'attn', 'q_proj', 'kernel')
  get = lambda tree: __import__('functools').reduce(lambda t, k: t[k], q, tree)
  assert get(inner.mu).spec == get(inner.nu).spec == P('fsdp', 'tensor', None)
  assert get(sh['params']).spec == P('fsdp', 'tensor', None)
  assert inner.count.spec == P() and sh['step'].spec == P() and sh['rng'].spec == P()


def test_shard_batch_and_local_rows():
  mesh = parallel.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  assert parallel.local_batch_slice(8, mesh) == slice(0, 8)  # one process loads everything
  x = np.arange(8 * 5, dtype=np.int32).reshape(8, 5)
  arr = parallel.shard_batch({'tokens': x}, mesh)['tokens']
  assert arr.sharding.spec == P(('data', 'fsdp'), None)
  np.testing.assert_array_equal(np.asarray(arr), x)
  assert {s.data.shape for s in arr.addressable_shards} == {(2, 5)}


def test_two_processes_match_one(reference_run, run_222, tmp_path):
  """launch/local.py: `flaxllm train` in 2 processes x 4 CPU devices (gloo) == 1 process x 8
  devices == 1 device; the processes agree on checkpoints and export the model together."""
  buf = io.StringIO()
  workdir = tmp_path / 'two_processes'
  code = local_launch.launch(
      [sys.executable, '-m', 'flaxllm.cli', 'train', f'--config={TRAIN_SPEC}',
       f'--workdir={workdir}', *TRAIN, *_mesh_flags(*MESHES[2])],
      num_processes=2, devices_per_process=4, timeout=420, cwd=str(ROOT), out=buf)
  log = buf.getvalue()
  assert code == 0, log[-3000:]
  assert all(f'[p{i}] Run complete: 5/5 steps' in log for i in (0, 1)), log[-3000:]
  losses = _losses(workdir)
  np.testing.assert_allclose(losses, run_222['losses'], rtol=RTOL)        # 1 process x 8
  np.testing.assert_allclose(losses, reference_run['losses'], rtol=RTOL)  # 1 device
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4', '5']
  assert (workdir / 'model' / 'model_config.json').exists()


def test_launcher_propagates_failure():
  buf = io.StringIO()
  code = local_launch.launch(
      [sys.executable, '-c', 'import os, sys, time\n'
       'if os.environ["FLAXLLM_PROCESS_ID"] == "1": print("boom"); sys.exit(3)\n'
       'time.sleep(60)'], num_processes=2, timeout=30, out=buf, platform='')
  assert code == 3
  assert '[p1] boom' in buf.getvalue()
  assert 'process 1 exited with code 3; stopping the others.' in buf.getvalue()


# ----------------------------------------------------------------------------- checkpoints

def test_checkpoint_saved_on_8_devices_restores_on_one(reference_run, run_222, tmp_path):
  """The trainer's checkpoint of step 2 on (data=2, fsdp=2, tensor=2) resumes on one device
  (another mesh and rule preset: safe to change) and continues with the same losses."""
  import shutil
  workdir = tmp_path / 'resumed'
  shutil.copytree(run_222['workdir'], workdir)
  for step in ('4', '5'):
    shutil.rmtree(workdir / 'checkpoints' / step)
  losses, summary = _train(workdir, {'fsdp': 1}, 'fsdp', devices=jax.devices()[:1])
  np.testing.assert_allclose(losses, reference_run['losses'], rtol=RTOL)
  np.testing.assert_allclose(losses[2:], run_222['losses'][2:], rtol=RTOL)
  assert summary['step'] == 5


# ----------------------------------------------------------------------------- AOT

def _compile_config(*overrides):
  from flaxllm import config as config_lib
  return config_lib.load_config(TRAIN_SPEC, TRAIN + _mesh_flags(*MESHES[2]) + list(overrides))


def test_aot_compile_reports_memory_and_flops():
  config = _compile_config()
  report = compile_lib.compile_train_step(config, parallel.make_mesh(config.mesh), target='cpu')
  n_params = models.param_count(models.ModelConfig.from_dict(config.model))['total']
  state_bytes = 3 * 4 * n_params  # params + AdamW mu + nu, float32
  # Weights are split over fsdp x tensor = 4 devices (the data axis replicates them); the norm
  # scales only over fsdp, the batch adds one [1, 16] row of 5 arrays per device.
  assert state_bytes / 4 <= report.argument_bytes <= state_bytes / 4 + 8192
  assert report.output_bytes >= state_bytes / 4
  assert report.temp_bytes > 0 and report.flops and report.flops > 0
  assert report.total_bytes > 0 and 'per device' in report.summary()
  aot.check_memory(report, '1GiB')
  with pytest.raises(aot.MemoryBudgetError, match=r'needs .* per device on cpu .* but the '
                     r'budget is 1.00 KiB; shard over more devices'):
    aot.check_memory(report, '1KiB')


def test_flaxllm_compile_command(capsys):
  """`flaxllm compile`: the per-device report, a budget that fits, one that does not, and a
  config that cannot work, each before anything runs."""
  argv = ['compile', f'--config={TRAIN_SPEC}', *TRAIN, *_mesh_flags(*MESHES[2])]
  from flaxllm import cli
  assert cli.main(argv + ['--budget=1GiB']) == 0
  out = capsys.readouterr().out
  assert '8 x 16 tokens on data=2 fsdp=2 tensor=2 (8 cpu devices), rules fsdp_tp' in out
  assert 'per device (arguments' in out and 'fits the budget of 1.00 GiB' in out
  assert cli.main(argv + ['--budget=1KiB']) == 1
  assert 'but the budget is 1.00 KiB' in capsys.readouterr().err
  assert cli.main(argv + ['--config.mesh.tensor=4']) == 1
  assert 'does not match the 8 devices' in capsys.readouterr().err


def test_aot_targets():
  devices, desc = aot.target_devices('cpu')
  assert len(devices) == 8 and desc == '8 fake CPU devices'
  with pytest.raises(aot.TargetUnavailable, match="unknown compile target 'gpu:h100'"):
    aot.target_devices('gpu:h100')
  try:
    import libtpu  # noqa: F401
  except ImportError:
    with pytest.raises(aot.TargetUnavailable, match='needs the libtpu package'):
      aot.target_devices('tpu:v5e:2x2')
    return
  devices, desc = aot.target_devices('tpu:v5e:2x4')
  assert len(devices) == 8 and 'TPU v5e:2x4' in desc


def _has_libtpu() -> bool:
  try:
    import libtpu  # noqa: F401
    return True
  except ImportError:
    return False


@pytest.mark.skipif(not _has_libtpu(), reason='libtpu not installed (optional, ~700 MB)')
def test_tpu_topology_multislice_mesh_and_aot():
  """Real TPU devices from libtpu's topology description (no TPU needed): 2 slices of v5e 2x2
  laid out by create_hybrid_device_mesh; the tiny step compiles for them."""
  from jax.experimental import topologies
  devices = topologies.get_topology_desc('v5e:2x2', 'tpu', num_slices=2).devices
  mesh = parallel.make_mesh({'dcn_data': 2, 'fsdp': -1}, devices)
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 4, 'tensor': 1}
  assert [{d.slice_index for d in row.ravel()} for row in mesh.devices] == [{0}, {1}]
  config = _compile_config('--config.mesh.data=1', '--config.mesh.fsdp=-1',
                           '--config.mesh.tensor=1', '--config.parallel.rules=fsdp')
  report = compile_lib.compile_train_step(config, mesh, target='v5e')
  assert report.argument_bytes > 0 and report.flops > 0


# ----------------------------------------------------------------------------- launchers

def test_tpu_vm_dry_run(capsys):
  argv = ['all', '--name=run1', '--zone=us-west4-a', '--accelerator=v5litepod-16',
          '--jax-version=0.10.2', '--env', 'WANDB_MODE=offline', '--dry-run', '--',
          'flaxllm', 'train', '--config=configs/llama.py', '--config.mesh.fsdp=-1']
  assert tpu_vm.main(argv) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[0] == ('gcloud compute tpus tpu-vm create run1 --zone=us-west4-a '
                      '--accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite')
  assert lines[1] == 'git archive --format=tar.gz -o /tmp/flaxllm-src.tar.gz HEAD'
  assert lines[2] == ("gcloud compute tpus tpu-vm scp /tmp/flaxllm-src.tar.gz "
                      "'run1:~/flaxllm.tar.gz' --zone=us-west4-a --worker=all")
  assert lines[3].startswith('gcloud compute tpus tpu-vm ssh run1 --zone=us-west4-a '
                             "--worker=all '--command=rm -rf ~/flaxllm")
  assert '"jax[tpu]==0.10.2"' in lines[3]
  assert lines[4] == ("gcloud compute tpus tpu-vm ssh run1 --zone=us-west4-a --worker=all "
                      "'--command=set -o pipefail; (cd ~/flaxllm && WANDB_MODE=offline flaxllm "
                      "train --config=configs/llama.py --config.mesh.fsdp=-1) 2>&1 | tee "
                      "~/flaxllm-run.log'")
  assert lines[5] == 'gcloud compute tpus tpu-vm delete run1 --zone=us-west4-a --quiet'
  assert len(lines) == 6


def test_tpu_vm_git_sync_and_logs_dry_run(capsys):
  tpu_vm.main(['sync', '--name=r', '--zone=z', '--project=p', '--git=https://x/y.git',
               '--branch=dev', '--jax-version=0.10.2', '--dry-run'])
  tpu_vm.main(['logs', '--name=r', '--zone=z', '--worker=3', '--dry-run'])
  tpu_vm.main(['run', '--name=r', '--zone=z', '--detach', '--dry-run', '--', 'echo', 'hi there'])
  sync, logs, run = capsys.readouterr().out.strip().splitlines()
  assert 'git clone -q -b dev https://x/y.git ~/flaxllm' in sync and '--project=p' in sync
  assert logs == ("gcloud compute tpus tpu-vm ssh r --zone=z --worker=3 "
                  "'--command=tail -n +1 -f ~/flaxllm-run.log'")
  assert 'nohup bash -c' in run and "'hi there'" in run and '--worker=all' in run


def test_slurm_template_is_valid_bash():
  path = ROOT / 'launch' / 'slurm.sbatch'
  assert subprocess.run(['bash', '-n', str(path)]).returncode == 0
  text = path.read_text()
  assert '#SBATCH --ntasks-per-node=1' in text and 'srun' in text
