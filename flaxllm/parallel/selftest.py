"""Runs a few reference train steps of a tiny GQA LLaMA on the configured mesh and prints the
losses as JSON -- a smoke test for a (multi-host) set-up, and the worker of the 2-process test.

    python -m flaxllm.parallel.selftest --data=2 --fsdp=2 --tensor=2 --rules=fsdp_tp
    python launch/local.py -n 2 -- python -m flaxllm.parallel.selftest --fsdp=-1
"""
from __future__ import annotations

import argparse
import json
import sys


def data(step: int, batch: int, seq: int):
  """The global token batch of `step` (the same on every process)."""
  import numpy as np
  return np.random.default_rng(step).integers(0, 256, (batch, seq + 1)).astype(np.int32)


def run(mesh, rules='fsdp', *, steps: int = 5, batch: int = 8, seq: int = 16, state=None,
        setup=None, model_cfg=None, start: int = 0, on_step=None):
  """Trains tiny_llama (GQA: 4 heads, 2 kv heads) for `steps` on `mesh`; returns
  {'losses', 'rows', 'state', 'setup'} where setup = (state shardings, jitted step) can be
  passed back in (with a restored `state`) to continue without recompiling."""
  import jax
  from flaxllm import models, parallel
  from flaxllm.parallel import reference_step as rs

  model = models.build(model_cfg or models.presets.get('tiny_llama'))
  tx = rs.make_optimizer()
  rules = parallel.get_rules(rules)
  if setup is None:
    state0, shardings, step = rs.setup(model, tx, mesh, rules, jax.random.key(0))
    state = state0 if state is None else state
    setup = (shardings, step)
  shardings, step = setup
  rows = parallel.local_batch_slice(batch, mesh, rules)
  losses = []
  for i in range(start, start + steps):
    if on_step is not None:
      on_step(i, state)
    b = parallel.shard_batch({'tokens': data(i, batch, seq)[rows]}, mesh, rules)
    state, metrics = step(state, b)
    losses.append(float(metrics['loss']))
  return {'losses': losses, 'rows': rows, 'state': state, 'setup': setup}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser()
  ap.add_argument('--data', type=int, default=1)
  ap.add_argument('--fsdp', type=int, default=-1)
  ap.add_argument('--tensor', type=int, default=1)
  ap.add_argument('--rules', default='fsdp')
  ap.add_argument('--steps', type=int, default=5)
  ap.add_argument('--batch', type=int, default=8)
  ap.add_argument('--seq', type=int, default=16)
  ap.add_argument('--timeout', type=float, default=60.0)
  args = ap.parse_args(argv)

  from flaxllm.parallel import distributed
  distributed.initialize(timeout_s=args.timeout)

  import jax
  jax.config.update('jax_default_matmul_precision', 'highest')
  from flaxllm import parallel
  mesh = parallel.make_mesh({'data': args.data, 'fsdp': args.fsdp, 'tensor': args.tensor})
  out = run(mesh, args.rules, steps=args.steps, batch=args.batch, seq=args.seq)
  losses, rows = out['losses'], out['rows']
  print('LOSSES ' + json.dumps({'process': jax.process_index(), 'processes': jax.process_count(),
                                'devices': jax.device_count(), 'rows': [rows.start, rows.stop],
                                'losses': losses}), flush=True)
  distributed.shutdown()
  return 0


if __name__ == '__main__':
  sys.exit(main())
