"""Runs a few reference train steps of a tiny GQA LLaMA on the configured mesh and prints the
losses as JSON -- a smoke test for a (multi-host) set-up, and the worker of the 2-process test.

    python -m flaxllm.parallel.selftest --data=2 --fsdp=2 --tensor=2 --rules=fsdp_tp
    python launch/local.py -n 2 -- python -m flaxllm.parallel.selftest --fsdp=-1
"""
from __future__ import annotations

import argparse
import json
import sys


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
  import numpy as np
  jax.config.update('jax_default_matmul_precision', 'highest')
  from flaxllm import models, parallel
  from flaxllm.parallel import reference_step as rs

  model = models.build(models.presets.get('tiny_llama'))
  tx = rs.make_optimizer()
  rules = parallel.get_rules(args.rules)
  mesh = parallel.make_mesh({'data': args.data, 'fsdp': args.fsdp, 'tensor': args.tensor})
  state, _, step = rs.setup(model, tx, mesh, rules, jax.random.key(0))
  data = np.random.default_rng(0).integers(0, 256, (args.steps, args.batch, args.seq + 1))
  rows = parallel.local_batch_slice(args.batch, mesh, rules)
  losses = []
  for i in range(args.steps):
    batch = parallel.shard_batch({'tokens': data[i, rows].astype(np.int32)}, mesh, rules)
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  print('LOSSES ' + json.dumps({'process': jax.process_index(), 'processes': jax.process_count(),
                                'devices': jax.device_count(), 'rows': [rows.start, rows.stop],
                                'losses': losses}), flush=True)
  distributed.shutdown()
  return 0


if __name__ == '__main__':
  sys.exit(main())
