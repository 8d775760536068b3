"""Bytes per parameter of the quantised trees QLoRA trains on (shapes only: nothing is
allocated): NF4 (block 64) with and without double quantisation, and int8, for the default
config's model, Llama 3.2 1B and Llama 3 8B; all Linear kernels but the head are quantised.

    .venv/bin/python bench/lora_quant_bytes.py    # writes bench/results/lora_quant_bytes.{json,md}
"""
from __future__ import annotations

import datetime
import os
import sys

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, ROOT)
RESULTS = os.path.join(BENCH, 'results')
VARIANTS = [('float32', None, {}), ('bfloat16', None, {}),
            ('nf4', 'nf4', {'double_quant': False}), ('nf4 + double quant', 'nf4',
                                                       {'double_quant': True}),
            ('int8', 'int8', {'double_quant': False})]


def _model_cfg(name: str, dtype: str):
  from flaxllm import models
  if name == 'default':
    from flaxllm import config as config_lib
    config = config_lib.load_config(os.path.join(ROOT, 'configs', 'default.py'), [])
    return models.ModelConfig.from_dict({**config.model.to_dict(), 'param_dtype': dtype,
                                         'dtype': dtype})
  return models.presets.get(name, scan_layers=True, param_dtype=dtype, dtype=dtype)


def measure(name: str) -> list[dict]:
  import jax
  from flaxllm import models
  from flaxllm.peft import quant
  rows = []
  for label, kind, kw in VARIANTS:
    dtype = 'bfloat16' if label == 'bfloat16' else 'float32'
    model = models.build(_model_cfg(name, dtype))
    abstract = jax.eval_shape(lambda rng, m=model: models.init_params(m, rng), jax.random.key(0))
    tree = abstract if kind is None else jax.eval_shape(
        lambda p, k=kind, kw=kw: quant.quantize_tree(p, kind=k, block_size=64, **kw), abstract)
    b = quant.tree_bytes(tree)
    rows.append({'model': name, 'variant': label, 'params': b['params'], 'bytes': b['bytes'],
                 'bytes_per_param': b['bytes_per_param'],
                 'quantized_params': b['quantized_params'],
                 'quantized_bytes_per_param': b['quantized_bytes_per_param'] or None})
  return rows


def main():
  rows = [r for name in ('default', 'llama3.2_1b', 'llama3_8b') for r in measure(name)]
  meta = {'date': datetime.date.today().isoformat(),
          'command': 'python bench/lora_quant_bytes.py'}
  lines = ['# Bytes per parameter of the quantised base (QLoRA)', '',
           f'`{meta["command"]}` on {meta["date"]}: sizes of the abstract trees from '
           '`flaxllm.peft.quant.quantize_tree` (all Linear kernels but the output head; '
           'embeddings, norms and the head stay float32 in the quantised rows) and '
           '`quant.tree_bytes`. NF4 '
           'and int8 use blocks of 64 weights with a float32 absmax each; double quantisation '
           'stores the absmax values in int8 with a float32 scale per 256 blocks.', '',
           '| model | base weights | params | tree size | bytes/param (whole tree) | '
           'quantised kernels | bytes/param (quantised kernels) |',
           '|---|---|---|---|---|---|---|']
  for r in rows:
    q = r['quantized_bytes_per_param']
    lines.append(f'| {r["model"]} | {r["variant"]} | {r["params"]:,} | '
                 f'{r["bytes"] / 2**30:.3f} GiB | {r["bytes_per_param"]:.3f} | '
                 f'{r["quantized_params"]:,} | {f"{q:.4f}" if q else "-"} |')
  lines.append('')
  import model_speed  # bench/model_speed.py: write_results
  model_speed.write_results(os.path.join(RESULTS, 'lora_quant_bytes'),
                            {'meta': meta, 'rows': rows}, '\n'.join(lines))


if __name__ == '__main__':
  main()
