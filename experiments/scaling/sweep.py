r"""A Chinchilla-style IsoFLOP sweep of tiny LLaMAs on the embedded corpus (2 CPU cores).

    flaxllm sweep --config=experiments/scaling/sweep.py --workdir=runs/scaling --workers=2 \
        --config.wandb.mode=disabled
    flaxllm scaling fit --sweep-dir=runs/scaling --target-flops=1e13 \
        --plots-dir=experiments/scaling
    flaxllm scaling table --sweep-dir=runs/scaling

3 compute budgets x 4 model sizes (the largest model gets only 41 steps of the smallest budget):
LLaMA decoders (RMSNorm, SwiGLU, RoPE, untied head) of 3.4k-155k non-embedding parameters
(12k-197k with the 259-token byte vocabulary's embedding and head), shaped by `shape_for_params` at width/depth ~32 with 16-dim heads, trained on the Python
standard library's source (byte tokens, 128-token rows, 16 rows a step) for D = C / (6N)
tokens each, with a cosine schedule that ends at that token count. Results and the fit are in
experiments/scaling/README.md.

Variants (after the colon):
    budgets=1e11/3e11/1e12     compute budgets C in FLOPs (C = 6 N D, N with embeddings)
    sizes=5e3/1.5e4/5e4/1.5e5  target non-embedding parameter counts
    quick                      2 budgets x 3 sizes of a few seconds each (smoke test)
"""
from flaxllm.config import base_config, parse_arg
from flaxllm.models.config import ConfigError
from flaxllm.sweeps import spec

BUDGETS = (1e11, 3e11, 1e12)
SIZES = (5e3, 1.5e4, 5e4, 1.5e5)


def _numbers(text: str, default, what: str):
  """'1e11/3e11' -> (1e11, 3e11) ('/' since ',' separates variants)."""
  try:
    return tuple(float(x) for x in text.split('/')) if text else default
  except ValueError as e:
    raise ConfigError(f'{what}={text!r} is not a list of numbers; write e.g. {what}=1e11/3e11.') \
        from e


def _arg(arg):
  a = parse_arg(arg, budgets='', sizes='', quick=False)
  return dict(budgets=_numbers(a.budgets, BUDGETS, 'budgets'),
              sizes=_numbers(a.sizes, SIZES, 'sizes'), quick=a.quick)


def get_config(arg=None):
  """The base run of every point: what the sweep does not change."""
  _arg(arg)  # rejects unknown variants
  config = base_config()
  m = config.model
  m.update(arch='decoder', vocab_size=259, d_model=32, num_layers=1, num_heads=2, mlp_dim=88,
           mlp_activation='swiglu', norm='rmsnorm', position='rope', tie_embeddings=False,
           max_seq_len=128, dtype='float32', param_dtype='float32')
  config.tokenizer.kind = 'bytes'
  config.data.source = 'stdlib'      # the whole standard library: ~31 MB, ~30M byte tokens
  config.seq_len = 128
  config.batch_size = 16             # 2048 tokens a step
  config.optim.lr = 3e-3
  config.optim.weight_decay = 0.1
  config.schedule.name = 'cosine'
  config.schedule.end_lr_frac = 0.1
  config.total_steps = 100           # set per point by the sweep
  config.log_every = 50
  config.eval_batches = 16           # 32k validation tokens per evaluation
  config.progress_bar = False
  config.wandb.mode = 'offline'
  config.sample.max_new_tokens = 0
  return config


def get_sweep(arg=None):
  """Overrides of the 12 points: model shape, steps, warmup, eval and checkpoint cadence."""
  a = _arg(arg)
  config = get_config(arg)
  if a['quick']:
    return spec.isoflop(config, budgets=(4e10, 8e10), sizes=(1.5e4, 5e4, 1.5e5), min_steps=10)
  return spec.isoflop(config, budgets=a['budgets'], sizes=a['sizes'], min_steps=40)
