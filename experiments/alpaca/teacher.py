r"""The Alpaca experiment's teacher: a LLaMA (6 layers, d_model 320, 10.1M parameters, twice the
student) trained from scratch to answer Self-Instruct's prompt, on the documents of make_data.py
(results: experiments/alpaca/README.md).

    flaxllm train --config=configs/default.py --workdir=runs/default   # its tokenizer
    python experiments/alpaca/make_data.py --out-dir runs/alpaca
    flaxllm train --config=experiments/alpaca/teacher.py --workdir=runs/alpaca/teacher

The loss is on the written tasks only (the prompt is the template '{instruction}' of the
'alpaca' format); a document (the prompt's ~500 tokens and ~270 of tasks) fits a 1024-token
row, and served with the same context the teacher reads the whole prompt; the student's
tokenizer (`runs/default/tokenizer.model`) is reused, so the two read the same ids.

Variants: base=DIR (the tokenizer's workdir, default runs/default), data=FILE (default
runs/alpaca/teacher.jsonl), steps (default 160).
"""
import os

from flaxllm.config import base_config, parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, base='runs/default', data='runs/alpaca/teacher.jsonl', steps=160)
  config = base_config()
  config.seed = 0
  m = config.model
  m.arch = 'decoder'
  m.mlp_activation = 'swiglu'
  m.norm = 'rmsnorm'
  m.position = 'rope'
  m.tie_embeddings = False
  m.dtype = 'float32'
  m.param_dtype = 'float32'
  m.update(vocab_size=4096, d_model=320, num_layers=6, num_heads=5, num_kv_heads=5,
           mlp_dim=864, max_seq_len=1024)

  config.tokenizer.kind = 'sentencepiece'
  config.tokenizer.vocab_size = 4096
  config.tokenizer.model_path = os.path.join(arg.base, 'tokenizer.model')
  config.data.source = 'jsonl'
  config.data.path = arg.data
  config.data.format = 'alpaca'
  config.data.template = '{instruction}'   # the Self-Instruct prompt as it is; loss on the tasks
  config.data.val_fraction = 0.02

  config.seq_len = 1024
  config.batch_size = 4
  config.total_steps = arg.steps
  config.optim.lr = 2e-3
  config.schedule.warmup_steps = 15
  config.log_every = 20
  config.eval_every = 80
  config.eval_batches = 4
  config.ckpt_every = 40
  config.loss_chunk_size = 128
  config.sample.prompt = 'List of 8 tasks:\n###\n1. Instruction:'
  config.sample.temperature = 0.7
  config.sample.max_new_tokens = 96
  return config
