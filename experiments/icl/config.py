r"""In-context learning from bursty data (results: experiments/icl/README.md): byte-level LLaMAs
trained on stdlib text mixed half and half with sequences of a fresh random mapping each
(`make_data.py`), and a control trained on the text alone; then each is scored through
lm-evaluation-harness with 0-16 shots of a mapping it never saw (`evaluate.py`).

    python experiments/icl/make_data.py --out runs/icl
    flaxllm train --config=experiments/icl/config.py:size=s --workdir=runs/icl/s
    flaxllm train --config=experiments/icl/config.py:size=m --workdir=runs/icl/m
    flaxllm train --config=experiments/icl/config.py:size=l --workdir=runs/icl/l
    flaxllm train --config=experiments/icl/config.py:size=m,data=text --workdir=runs/icl/m_text
    flaxllm train --config=experiments/icl/config.py:size=s,steps=8000 --workdir=runs/icl/s_8k
    flaxllm train --config=experiments/icl/config.py:size=l,lr=0.001 --workdir=runs/icl/l_lr1e-3
    python experiments/icl/evaluate.py --runs runs/icl

Variants: size=s|m|l (the model: SIZES), data=icl|text (the documents: mixed, or the text alone
for the control), steps (default 2000), lr (default 3e-3), data_dir (default runs/icl).
"""
import os

from flaxllm.config import base_config, parse_arg

# d_model, layers, heads, MLP width
SIZES = {'s': (64, 2, 2, 192), 'm': (128, 4, 4, 384), 'l': (192, 6, 6, 576)}


def get_config(arg=None):
  arg = parse_arg(arg, size='m', data='icl', steps=2000, lr=3e-3, data_dir='runs/icl')
  if arg.size not in SIZES or arg.data not in ('icl', 'text'):
    raise ValueError(f'unknown size={arg.size!r} or data={arg.data!r}; use size=s|m|l and '
                     'data=icl|text.')
  d_model, layers, heads, mlp = SIZES[arg.size]
  config = base_config()
  config.seed = 0
  config.model.update(arch='decoder', mlp_activation='swiglu', norm='rmsnorm', position='rope',
                      tie_embeddings=False, vocab_size=259, d_model=d_model, num_layers=layers,
                      num_heads=heads, num_kv_heads=heads, mlp_dim=mlp, max_seq_len=256,
                      dtype='float32', param_dtype='float32')
  config.tokenizer.kind = 'bytes'
  config.data.source = 'jsonl'
  config.data.path = os.path.join(os.path.abspath(arg.data_dir), f'{arg.data}.jsonl')
  config.data.val_fraction = 0.02
  config.seq_len = 128
  config.batch_size = 16
  config.total_steps = arg.steps
  config.optim.lr = arg.lr
  config.schedule.warmup_steps = 50
  config.log_every = 25
  config.eval_every = 250
  config.eval_batches = 8
  config.ckpt_every = 250
  config.peak_flops = 1e11           # skip measuring the machine
  config.wandb.mode = 'disabled'
  config.progress_bar = False
  config.sample.max_new_tokens = 0
  return config
