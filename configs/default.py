r"""The `make train` job: a small LLaMA trained on the Python standard library, on CPU.

    flaxllm train --config=configs/default.py --workdir=runs/default

A 4-layer LLaMA (d_model 256, SwiGLU, RoPE, RMSNorm; 5.3M parameters) with a 4096-token
SentencePiece vocabulary trained on the corpus: 800 steps of 8 x 128 tokens (0.8M tokens from
64 files at a time, bench/results/make_train_cpu.md), about 4 minutes on 2 CPU cores. Afterwards
it prints a sample continuing `def` and the validation loss (nats and bits per byte) and
perplexity; running the command again resumes, or reports that the run is complete (and prints
both again). Why this size: in the same few minutes a 6-layer d_model 320 model (2x slower per
token) trained on 200 or 500 steps ended at 4.92 / 4.39 nats, this one at 4.05.

Variants (after the colon, comma-separated):
    size=tiny     2 layers, d_model 32, byte tokenizer, seq 32, batch 8: seconds (tests, debugging)
    steps=N       total steps (default: 800 for size=default, 20 for size=tiny)
e.g.
    flaxllm train --config=configs/default.py:size=tiny,steps=50 --workdir=runs/tiny
Any key can be overridden: --config.optim.lr=3e-4 --config.model.num_layers=4 ...
"""
from flaxllm.config import base_config, parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, size='default', steps=0)
  config = base_config()
  config.seed = 0

  # Model: LLaMA-style decoder.
  m = config.model
  m.arch = 'decoder'
  m.mlp_activation = 'swiglu'
  m.norm = 'rmsnorm'
  m.position = 'rope'
  m.tie_embeddings = False
  m.dtype = 'float32'        # bf16 matmuls are slower on most CPUs; use 'bfloat16' on TPU/GPU
  m.param_dtype = 'float32'

  # Data: the embedded stdlib corpus, packed rows.
  config.data.source = 'stdlib'
  config.data.val_fraction = 0.02

  if arg.size == 'default':
    m.update(vocab_size=4096, d_model=256, num_layers=4, num_heads=4, num_kv_heads=4,
             mlp_dim=688, max_seq_len=256)
    config.tokenizer.kind = 'sentencepiece'
    config.tokenizer.vocab_size = 4096
    config.tokenizer.max_train_bytes = 4_000_000
    config.seq_len = 128
    config.batch_size = 8
    config.total_steps = arg.steps or 800
    config.optim.lr = 3e-3
    config.schedule.warmup_steps = 25
    config.log_every = 20
    config.eval_every = 400
    config.eval_batches = 8
    config.ckpt_every = 200
    config.loss_chunk_size = 64   # the fused head + loss: ~10% faster train steps here
    config.sample.temperature = 0.6
    config.sample.prompt = 'def'    # not 'def ': a trailing space is a SentencePiece token of its own,
    #                                 rare in training text ('def 1():' follows it)
  elif arg.size == 'tiny':
    m.update(vocab_size=259, d_model=32, num_layers=2, num_heads=2, num_kv_heads=2, mlp_dim=64,
             max_seq_len=64)
    config.tokenizer.kind = 'bytes'
    config.data.max_files = 40
    config.seq_len = 32
    config.batch_size = 8
    config.total_steps = arg.steps or 20
    config.optim.lr = 3e-3
    config.schedule.warmup_steps = 2
    config.log_every = 1
    config.eval_every = 10
    config.eval_batches = 2
    config.ckpt_every = 10
    config.peak_flops = 1e11   # skip measuring the machine (saves a second per run)
    config.wandb.mode = 'disabled'
    config.sample.max_new_tokens = 16
  else:
    raise ValueError(f"unknown size {arg.size!r}; use size=default or size=tiny.")
  return config
