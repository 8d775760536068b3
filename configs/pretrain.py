r"""Pretraining a LLaMA on a prepared TFDS text dataset, sized from a CPU smoke test to 1B.

    flaxllm train --config=configs/pretrain.py:size=125m,data=c4 --workdir=runs/c4_125m \
        --config.data.data_dir=/path/to/tensorflow_datasets

The dataset must already be prepared in ArrayRecord format under data.data_dir (nothing is
downloaded). The SentencePiece vocabulary (32000) is trained on the first
tokenizer.max_train_bytes of the train split, or taken from --config.tokenizer.model_path.
bf16 compute with float32 params, scanned and rematerialised layers, cosine decay, z-loss.

Variants (after the colon, comma-separated):
    size=tiny|125m|350m|1b   model size (tiny: 2 layers, the stdlib corpus, runs on CPU)
    size=<preset>            a published architecture of flaxllm.models.presets with its own
                             vocabulary (e.g. llama3_8b, llama3.2_1b): seq 2048, batch 256;
                             bring its tokenizer with --config.tokenizer.model_path
    data=c4|lm1b|stdlib      c4 = 'c4/en:3.1.0', lm1b = 'lm1b' (TFDS), stdlib = embedded corpus
    steps=N                  total steps (default by size)
    batch=N                  global batch in sequences (default by size)
e.g. a CPU smoke test of the whole recipe:
    flaxllm train --config=configs/pretrain.py:size=tiny,data=stdlib --workdir=runs/pretrain_tiny
and whether Llama 3 8B fits 64 chips of 16 GiB, compiled (not run) for 64 fake CPU devices:
    flaxllm compile --config=configs/pretrain.py:size=llama3_8b --devices=64 \
        --config.batch_size=64 --budget=16GiB
"""
from flaxllm.config import base_config, parse_arg
from flaxllm.models import presets

#            d_model layers heads kv  mlp    seq   batch  steps   lr
SIZES = {
    'tiny': (64, 2, 4, 2, 172, 128, 8, 50, 3e-3),
    '125m': (768, 12, 12, 12, 2048, 1024, 256, 20_000, 6e-4),
    '350m': (1024, 24, 16, 16, 2816, 1024, 256, 40_000, 3e-4),
    '1b': (2048, 16, 32, 8, 8192, 2048, 512, 60_000, 3e-4),  # Llama-3.2-1B shape, 32k vocab
}
DATA = {'c4': 'c4/en:3.1.0', 'lm1b': 'lm1b'}


def get_config(arg=None):
  arg = parse_arg(arg, size='tiny', data='stdlib', steps=0, batch=0)
  if arg.size not in SIZES and arg.size not in presets.PRESETS:
    raise ValueError(f'unknown size {arg.size!r}; use one of {sorted(SIZES)} or a model preset '
                     f'({", ".join(sorted(presets.PRESETS))}).')
  if arg.data not in (*DATA, 'stdlib'):
    raise ValueError(f"unknown data {arg.data!r}; use one of {sorted(DATA) + ['stdlib']}.")
  tiny = arg.size == 'tiny'
  config = base_config()
  m = config.model
  if arg.size in SIZES:
    d, layers, heads, kv, mlp, seq, batch, steps, lr = SIZES[arg.size]
    m.update(arch='decoder', vocab_size=4096 if tiny else 32000, d_model=d, num_layers=layers,
             num_heads=heads, num_kv_heads=kv, mlp_dim=mlp, max_seq_len=seq,
             mlp_activation='swiglu', norm='rmsnorm', position='rope', tie_embeddings=False)
  else:
    seq, batch, steps, lr = 2048, 256, 60_000, 3e-4
    m.update(presets.get(arg.size, max_seq_len=seq).to_dict())
  m.dtype = 'float32' if tiny else 'bfloat16'   # compute; params stay float32
  m.scan_layers = not tiny
  m.remat = 'none' if tiny else 'full'

  if arg.data == 'stdlib':
    config.data.source = 'stdlib'
  else:
    config.data.source = 'tfds'
    config.data.name = DATA[arg.data]
    config.data.validation_split = 'validation'
    config.data.worker_count = 4
  config.tokenizer.kind = 'sentencepiece'
  config.tokenizer.vocab_size = m.vocab_size
  config.tokenizer.max_train_bytes = 20_000_000 if tiny else 200_000_000

  config.seq_len = seq
  config.batch_size = arg.batch or batch
  config.total_steps = arg.steps or steps
  config.optim.lr = lr
  config.optim.weight_decay = 0.1
  config.schedule.name = 'cosine'
  config.schedule.warmup_steps = min(2000, config.total_steps // 10)
  config.z_loss = 1e-4
  config.log_every = 10 if tiny else 50
  config.eval_every = 25 if tiny else 1000
  config.eval_batches = 4 if tiny else 50
  config.ckpt_every = 25 if tiny else 1000
  config.wandb.project = 'flaxllm-pretrain'
  config.wandb.group = f'{arg.size}_{arg.data}'
  return config
