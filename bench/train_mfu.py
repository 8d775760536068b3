"""Train-step MFU of a ~1B-parameter LLaMA on one accelerator: the trainer's own jitted train step.

    .venv/bin/python bench/train_mfu.py            # on one GPU: writes
                                                   # bench/results/train_mfu_<device>.{json,md}
    .venv/bin/python bench/train_mfu.py --tiny --out /tmp/mfu   # a 2-step CPU smoke test

Model (default): LLaMA, d_model 2048, 16 layers, 16 heads (head_dim 128), SwiGLU mlp 5632,
vocab 32000, untied embeddings (0.95B parameters), bf16 compute with float32 params, scanned
layers, `attention_impl='auto'` (Pallas flash on a GPU); batch 8 x seq 2048 on one device;
AdamW as in `flaxllm.config.base_config()`. The step is `flaxllm.train.trainer.build_programs
(config).train_step` (as in bench/train_speed.py), compiled ahead of time so that its memory
can be checked first: when the compiled step does not fit the device (or running it is out of
memory), the next setting of --remat is tried (default: none, then dots, then full).

Timing: --warmup steps, then --reps repetitions of --steps steps each (one sync per repetition);
the step time is the median repetition / steps. MFU = `flaxllm.models.flops_per_token(cfg, seq)`
(6N + attention, no rematerialisation counted) x tokens/s / peak, against two peaks:
- the dense bf16 peak of the device from a datasheet table (by `device_kind`: H100 SXM and
  H200 989 TFLOP/s, H100 PCIe 756, H100 NVL 835, A100 312; none on CPU), and
- the best bf16 [n x n] matmul FLOP/s measured in this run
  (`flaxllm.train.metrics.measure_peak_flops`, n = --peak-n, 16384 on a GPU).
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import re
import shlex
import statistics
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, ROOT)
RESULTS = os.path.join(BENCH, 'results')

# Dense (no sparsity) bf16 tensor-core peaks from the NVIDIA datasheets, FLOP/s; the first
# pattern found in the lower-cased device_kind wins (so 'h100 pcie' before 'h100').
PEAK_BF16 = (
    ('h200', 989e12, 'H200 (SXM/NVL and GH200): 989 TFLOP/s dense bf16'),
    ('h100 pcie', 756e12, 'H100 PCIe: 756 TFLOP/s dense bf16'),
    ('h100 nvl', 835e12, 'H100 NVL: 835 TFLOP/s dense bf16'),
    ('h100', 989e12, 'H100 SXM: 989 TFLOP/s dense bf16'),
    ('a100', 312e12, 'A100: 312 TFLOP/s dense bf16'),
)
TINY = dict(d_model=64, layers=2, heads=4, kv_heads=0, mlp=128, vocab=256, seq=64, batch=2,
            steps=2, reps=1, warmup=1, peak_n=256)
OOM_MARKERS = ('RESOURCE_EXHAUSTED', 'Out of memory', 'out of memory', 'OOM')


def slug(kind: str) -> str:
  """bench/attention.py's file-name form of a device_kind ('NVIDIA H100 80GB HBM3' ->
  'nvidia_h100_80gb_hbm3')."""
  return re.sub(r'[^a-z0-9]+', '_', kind.lower()).strip('_') or 'unknown'


def table_peak(kind: str):
  """(FLOP/s, source) of the device's dense bf16 peak, or (None, why not)."""
  low = kind.lower()
  for pattern, flops, source in PEAK_BF16:
    if pattern in low:
      return flops, source
  return None, f'no datasheet peak for device_kind {kind!r}'


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--tiny', action='store_true',
                 help='tiny model, 2 steps: a CPU smoke test of the whole script (seconds)')
  p.add_argument('--d-model', type=int, default=2048)
  p.add_argument('--layers', type=int, default=16)
  p.add_argument('--heads', type=int, default=16)
  p.add_argument('--kv-heads', type=int, default=0, help='0: as many as --heads (MHA)')
  p.add_argument('--mlp', type=int, default=5632)
  p.add_argument('--vocab', type=int, default=32000)
  p.add_argument('--seq', type=int, default=2048)
  p.add_argument('--batch', type=int, default=8, help='sequences per step (one device)')
  p.add_argument('--dtype', default='bfloat16', help='compute dtype (params stay float32)')
  p.add_argument('--remat', default='none,dots,full',
                 help='comma-separated model.remat settings, tried in order until one fits')
  p.add_argument('--no-scan', action='store_true', help='unrolled layers (slower to compile)')
  p.add_argument('--attention-impl', default='auto', choices=('auto', 'xla', 'cudnn', 'pallas'))
  p.add_argument('--steps', type=int, default=5, help='train steps per timed repetition')
  p.add_argument('--reps', type=int, default=3)
  p.add_argument('--warmup', type=int, default=2, help='untimed steps after compilation')
  p.add_argument('--peak-n', type=int, default=0,
                 help='matmul size of the measured peak (0: 16384 on GPU/TPU, 1024 on CPU)')
  p.add_argument('--out', default=None,
                 help='results path without extension (default bench/results/train_mfu_'
                      '<device>; "" = do not write)')
  args = p.parse_args(argv)
  if args.tiny:
    defaults = p.parse_args([])
    for key, value in TINY.items():  # tiny sizes, unless given on the command line
      if getattr(args, key) == getattr(defaults, key):
        setattr(args, key, value)
  return args


def make_config(args, remat):
  """The experiment config: `base_config()` with the model, batch and sequence of `args`."""
  from flaxllm import config as config_lib
  config = config_lib.base_config()
  m = config.model
  m.update(arch='decoder', vocab_size=args.vocab, d_model=args.d_model, num_layers=args.layers,
           num_heads=args.heads, num_kv_heads=args.kv_heads or args.heads, mlp_dim=args.mlp,
           max_seq_len=args.seq, mlp_activation='swiglu', norm='rmsnorm', position='rope',
           tie_embeddings=False, dtype=args.dtype, param_dtype='float32',
           scan_layers=not args.no_scan, remat=remat, attention_impl=args.attention_impl)
  config.objective = 'lm'
  config.seq_len = args.seq
  config.batch_size = args.batch
  config.total_steps = 1000
  config.optim.weight_decay = 0.1
  config.tokenizer.vocab_size = args.vocab   # no tokenizer is built; only checked
  config.wandb.mode = 'disabled'
  config.peak_flops = 1.0   # not measured by the trainer here
  config.lock()
  return config_lib.validate(config)


def train_batch(batch, seq, vocab, seed=0):
  """A packed-row train batch (flaxllm.data layout): one document per row, every token counted
  (as bench/model_speed.train_batch)."""
  import jax.numpy as jnp
  import numpy as np
  tokens = np.random.default_rng(seed).integers(3, vocab, (batch, seq + 1), dtype=np.int32)
  return {'inputs': jnp.asarray(tokens[:, :-1]), 'targets': jnp.asarray(tokens[:, 1:]),
          'positions': jnp.asarray(np.tile(np.arange(seq, dtype=np.int32), (batch, 1))),
          'segment_ids': jnp.ones((batch, seq), jnp.int32),
          'loss_mask': jnp.ones((batch, seq), jnp.float32)}


def memory_of(compiled):
  """Bytes of the compiled step (XLA's memory analysis), or {} where it has none."""
  try:
    ma = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - not every backend has one
    return {}
  if ma is None:
    return {}
  out = {k: int(getattr(ma, k + '_in_bytes', 0) or 0)
         for k in ('argument_size', 'output_size', 'alias_size', 'temp_size',
                   'generated_code_size')}
  out['total'] = (out['argument_size'] + out['output_size'] - out['alias_size'] +
                  out['temp_size'])
  return out


def attention_kernels(*stages):
  """Which attention kernels the step calls: Pallas (Triton on GPU, Mosaic on TPU) and cuDNN
  fused attention custom calls found in its lowered or compiled text ([] = XLA attention)."""
  text = ''
  for stage in stages:
    try:
      text += stage.as_text()
    except Exception:  # noqa: BLE001 - no text: look at the others
      pass
  markers = {'pallas_triton': '__gpu$xla.gpu.triton', 'pallas_mosaic': 'tpu_custom_call',
             'cudnn_fmha': '__cudnn$fmha'}
  return [name for name, marker in markers.items() if marker in text]


def device_limit(device):
  try:
    stats = device.memory_stats() or {}
  except Exception:  # noqa: BLE001 - CPU has none
    stats = {}
  return stats.get('bytes_limit'), stats


def run_one(args, remat, device, log):
  """Builds, compiles, warms up and times the train step with `remat`; a result dict."""
  import jax
  from flaxllm import parallel
  from flaxllm.train import trainer

  config = make_config(args, remat)
  mesh = parallel.make_mesh(config.mesh, [device])
  t0 = time.perf_counter()
  programs = trainer.build_programs(config, mesh)
  cfg = programs.model_cfg
  n_params = int(sum(math.prod(x.shape) for x in jax.tree.leaves(programs.abstract_params)))
  key = jax.random.PRNGKey(config.seed)
  trainable, frozen = programs.split(programs.init_params(key), key)
  state = programs.init(trainable, key)
  batch = train_batch(args.batch, args.seq, args.vocab)
  jax.block_until_ready(state)
  init_s = time.perf_counter() - t0

  t0 = time.perf_counter()
  lowered = programs.train_step.lower(state, batch, frozen)
  step = lowered.compile()
  compile_s = time.perf_counter() - t0
  memory = memory_of(step)
  kernels = attention_kernels(lowered, step)
  limit, _ = device_limit(device)
  log(f'remat={remat}: {_count(n_params)} params, attention kernels {kernels or "xla"}, '
      f'init {init_s:.1f} s, compile {compile_s:.1f} s, step memory '
      f'{memory.get("total", 0) / 2**30:.1f} GiB'
      + (f' of {limit / 2**30:.1f} GiB' if limit else ''))
  if limit and memory.get('total', 0) > limit:
    raise MemoryError(f'RESOURCE_EXHAUSTED (memory analysis): the step needs '
                      f'{memory["total"] / 2**30:.1f} GiB of {limit / 2**30:.1f} GiB')

  losses = []
  for _ in range(args.warmup):
    state, metrics = step(state, batch, frozen)
    losses.append(float(metrics['loss']))
  times = []
  for _ in range(args.reps):
    t = time.perf_counter()
    for _ in range(args.steps):
      state, metrics = step(state, batch, frozen)
    losses.append(float(metrics['loss']))   # blocks until the last step is done
    times.append(time.perf_counter() - t)
  step_s = statistics.median(times) / args.steps
  _, stats = device_limit(device)
  return dict(config=config, cfg=cfg, n_params=n_params, remat=remat, init_s=init_s,
              compile_s=compile_s, memory=memory, attention_kernels=kernels, bytes_limit=limit,
              peak_bytes_in_use=stats.get('peak_bytes_in_use'), rep_times_s=times,
              step_time_s=step_s, losses=losses)


def main(argv=None):
  args = parse_args(argv)
  argv = sys.argv[1:] if argv is None else list(argv)
  import jax

  from flaxllm import models
  from flaxllm.train import metrics as metrics_lib

  def log(msg):
    print(f'[train_mfu] {msg}', flush=True)

  device = jax.devices()[0]
  kind = device.device_kind
  backend = jax.default_backend()
  log(f'device: {kind} ({backend}, {jax.device_count()} device(s), using 1), jax '
      f'{jax.__version__}')
  peak_n = args.peak_n or (1024 if backend == 'cpu' else 16384)
  with jax.default_device(device):
    peak_measured = metrics_lib.measure_peak_flops('bfloat16', n=peak_n, repeats=10)
  peak_table, peak_source = table_peak(kind)
  log(f'bf16 peak: measured {peak_measured / 1e12:.1f} TFLOP/s ([{peak_n}]^2 matmul); table '
      + (f'{peak_table / 1e12:.0f} TFLOP/s ({peak_source})' if peak_table else peak_source))

  tried, run = [], None
  for remat in [r for r in args.remat.split(',') if r]:
    try:
      run = run_one(args, remat, device, log)
      tried.append(dict(remat=remat, ok=True))
      break
    except Exception as e:  # noqa: BLE001 - out of memory: try the next remat setting
      text = f'{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ""}'
      tried.append(dict(remat=remat, ok=False, error=text))
      log(f'remat={remat} failed: {text}')
      if not any(m in str(e) for m in OOM_MARKERS):
        raise
  if run is None:
    raise SystemExit(f'[train_mfu] no --remat setting fits: {tried}')

  cfg, seq = run['cfg'], args.seq
  tokens_s = args.batch * seq / run['step_time_s']
  flops_tok = models.flops_per_token(cfg, seq)
  model_flops_s = flops_tok * tokens_s
  result = dict(
      benchmark='train_mfu', device_kind=kind, device_slug=slug(kind), backend=backend,
      jax=jax.__version__, jaxlib=getattr(jax.lib, '__version__', None) or _version('jaxlib'),
      flax=_version('flax'),
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      command=shlex.join(['.venv/bin/python', 'bench/train_mfu.py'] + argv),
      tiny=args.tiny, model=cfg.to_dict(), param_count=run['n_params'], batch=args.batch,
      seq_len=seq, tokens_per_step=args.batch * seq, remat=run['remat'],
      scan_layers=cfg.scan_layers, attention_impl=cfg.attention_impl, dtype=cfg.dtype,
      param_dtype=cfg.param_dtype, warmup=args.warmup, reps=args.reps,
      steps_per_rep=args.steps, rep_times_s=run['rep_times_s'],
      step_time_s=run['step_time_s'], tokens_per_s=tokens_s, flops_per_token=flops_tok,
      model_flops_per_s=model_flops_s, peak_flops_table=peak_table,
      peak_flops_table_source=peak_source, peak_flops_measured=peak_measured,
      peak_matmul_n=peak_n,
      mfu_table=None if peak_table is None else model_flops_s / peak_table,
      mfu_measured=model_flops_s / peak_measured, init_s=run['init_s'],
      compile_s=run['compile_s'], memory_analysis=run['memory'],
      attention_kernels_in_step=run['attention_kernels'],
      bytes_limit=run['bytes_limit'], peak_bytes_in_use=run['peak_bytes_in_use'],
      losses=run['losses'], remat_tried=tried,
      xla_python_client_mem_fraction=os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION', ''))
  out = args.out
  if out is None:
    out = os.path.join(RESULTS, f'train_mfu_{slug(kind)}{"_tiny" if args.tiny else ""}')
  import model_speed  # bench/model_speed.py: write_results
  model_speed.write_results(out and os.path.abspath(out), result, markdown(result))
  return result


def _version(name):
  try:
    from importlib import metadata
    return metadata.version(name)
  except Exception:  # noqa: BLE001
    return None


def _count(n):
  return f'{n / 1e9:.3f}B' if n >= 1e8 else f'{n / 1e6:.3f}M'


def markdown(r):
  m = r['model']
  pct = lambda x: '-' if x is None else f'{x:.1%}'  # noqa: E731
  gib = lambda x: '-' if not x else f'{x / 2**30:.1f} GiB'  # noqa: E731
  tried = ', '.join(t['remat'] + (' ok' if t['ok'] else ' failed') for t in r['remat_tried'])
  table_peak_text = ('-' if r['peak_flops_table'] is None
                     else f"{r['peak_flops_table'] / 1e12:.0f} TFLOP/s")
  return '\n'.join([
      f"# Train-step MFU on {r['device_kind']}",
      '',
      f"LLaMA {_count(r['param_count'])} params ({m['num_layers']} layers, d_model "
      f"{m['d_model']}, {m['num_heads']} heads / {m['num_kv_heads']} kv heads, mlp "
      f"{m['mlp_dim']}, vocab {m['vocab_size']}, untied), {r['dtype']} compute, "
      f"{r['param_dtype']} params, scan_layers={r['scan_layers']}, remat={r['remat']!r}, "
      f"attention_impl={r['attention_impl']!r}; batch {r['batch']} x seq {r['seq_len']} on one "
      f"device; the trainer's jitted train step (AdamW, clipping), state donated.",
      f"jax {r['jax']}, {r['date']}, backend {r['backend']}. Median of {r['reps']} "
      f"repetitions of {r['steps_per_rep']} steps after {r['warmup']} warm-up steps "
      f"(compile {r['compile_s']:.1f} s, excluded).",
      '',
      '| step time | tokens/s | model TFLOP/s | MFU vs table peak | MFU vs measured peak |',
      '|---:|---:|---:|---:|---:|',
      f"| {r['step_time_s'] * 1e3:.1f} ms | {r['tokens_per_s']:.0f} | "
      f"{r['model_flops_per_s'] / 1e12:.2f} | {pct(r['mfu_table'])} | "
      f"{pct(r['mfu_measured'])} |",
      '',
      f"FLOPs per token {r['flops_per_token'] / 1e9:.4g} GFLOP "
      '(`flaxllm.models.flops_per_token`: 6N + causal attention; recomputation not counted). '
      f"Attention kernels in the compiled step: "
      f"{', '.join(r['attention_kernels_in_step']) or 'none (XLA attention)'}.",
      f"Peaks: table {table_peak_text} ({r['peak_flops_table_source']}); measured "
      f"{r['peak_flops_measured'] / 1e12:.1f} TFLOP/s (best bf16 "
      f"[{r['peak_matmul_n']}]^2 matmul, `measure_peak_flops`).",
      f"Memory: compiled step {gib(r['memory_analysis'].get('total'))} (XLA memory analysis), "
      f"peak in use {gib(r['peak_bytes_in_use'])}, device limit {gib(r['bytes_limit'])}. "
      f"remat tried: {tried}.",
      f"Losses (warm-up, then after each repetition): "
      f"{', '.join(f'{x:.3f}' for x in r['losses'])}.",
      '',
      f"Reproduce: `{r['command']}`",
      '',
  ])


if __name__ == '__main__':
  main()
