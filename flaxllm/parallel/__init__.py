"""Scale-out: device meshes, logical-axis sharding rules, sharded state, multi-host start-up,
ahead-of-time compilation reports (`flaxllm.parallel.aot`). Each module's docstring explains it.

    mesh = parallel.make_mesh(cfg.mesh)                       # data x fsdp x tensor
    rules = parallel.get_rules(cfg.parallel.rules)            # 'fsdp' | 'dp' | 'fsdp_tp'
    state, shardings = parallel.create_sharded(init_fn, mesh, rules, rng,
                                               param_specs=parallel.param_specs(model))
    batch = parallel.shard_batch(host_batch, mesh, rules)
"""
from flaxllm.parallel.mesh import AXES, MeshError, describe as describe_mesh, make_mesh, mesh_shape
from flaxllm.parallel.axis_rules import (PRESETS, ShardingError, batch_sharding, check_batch,
                                         check_mesh, get_rules, logical_to_sharding,
                                         param_shardings, param_specs, validate)
from flaxllm.parallel.sharding import (abstract_state, create_sharded, local_batch_slice,
                                       shard_batch, sharding_context, state_shardings,
                                       step_context, state_specs, with_shardings)

__all__ = ['AXES', 'MeshError', 'describe_mesh', 'make_mesh', 'mesh_shape', 'PRESETS',
           'ShardingError', 'batch_sharding', 'check_batch', 'check_mesh',
           'get_rules', 'logical_to_sharding', 'param_shardings', 'param_specs', 'validate',
           'abstract_state', 'create_sharded', 'local_batch_slice', 'shard_batch',
           'sharding_context', 'state_shardings', 'step_context', 'state_specs', 'with_shardings']
