"""`flaxllm reference-logps`: a DPO reference model's log-probs of every train batch, computed
once, so the DPO run needs no reference model (`dpo.reference_logps=DIR`).

    flaxllm reference-logps --config=SPEC [--config.k=v ...] --out=DIR [--steps=N]
        [--reference=MODEL]

The reference is --reference, else the config's dpo.reference, else its init_from (the model
DPO starts from): a flaxllm workdir, model directory or Hugging Face directory. The batches are
those the DPO run of the same config reads (`flaxllm.objectives.step_store`); train with
--config.dpo.reference_logps=DIR.
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

import jax

from flaxllm import cli, rundir
from flaxllm import config as config_lib
from flaxllm.data import tokenizer as tokenizer_lib
from flaxllm.models.config import ConfigError
from flaxllm.objectives import registry, step_store


def _main(argv) -> int:
  p = argparse.ArgumentParser(prog='flaxllm reference-logps',
                              description=__doc__.splitlines()[0])
  p.add_argument('--config', required=True, help="the DPO run's config file and variant")
  p.add_argument('--out', required=True)
  p.add_argument('--steps', type=int, default=0, help='default: total_steps')
  p.add_argument('--reference', default='', help='default: dpo.reference, else init_from')
  overrides, rest = cli.split_overrides(argv)
  args = p.parse_args(rest)
  config = config_lib.load_config(args.config, overrides)
  if config.objective != 'dpo' or config.dpo.reference_logps:
    raise ConfigError("flaxllm reference-logps needs a config with objective='dpo' and "
                      "dpo.reference_logps='' (the log-probs it would write).")
  path = args.reference or config.dpo.reference or config.init_from
  if not path:
    raise ConfigError('no reference model: pass --reference=MODEL or set dpo.reference or '
                      'init_from in the config.')
  objective = registry.from_config(config)
  tokenizer = tokenizer_lib.get_tokenizer(config.tokenizer, corpus=config.data)
  objective.check(tokenizer)
  params = rundir.load_params(path, what='--reference')
  compute = jax.jit(lambda batch: objective.reference_logps(params, batch))
  it = objective.data_iterator(tokenizer, 'train', seq_len=config.seq_len,
                               batch_size=config.batch_size, seed=config.seed)
  hook = objective.batch_hook(tokenizer, slice(None))   # KTO's KL rows
  batches = (hook(step, b, None) if hook else b for step, b in enumerate(it))
  shapes = objective.batch_shapes(config.batch_size, config.seq_len)
  names = jax.eval_shape(compute, {k: jax.ShapeDtypeStruct(shape, dtype)
                                   for k, (shape, dtype) in shapes.items()})
  try:
    meta = step_store.write_steps(
        config, batches, args.out, compute, steps=args.steps or config.total_steps,
        crc_key='inputs' if config.dpo.loss_type == 'kto' else 'chosen_inputs',
        arrays={name: ((), 'float32') for name in names}, what='reference log-probs')
  finally:
    it.close()
  print(f'wrote the reference log-probs of {meta["steps"]} batches to {args.out}; train with '
        f'--config.dpo.reference_logps={args.out}')
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Entry point of `flaxllm reference-logps`."""
  return cli.run(_main, argv)
