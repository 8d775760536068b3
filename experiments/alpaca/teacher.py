r"""The Alpaca experiment's teacher: a LLaMA (6 layers, d_model 320, 10.1M parameters, twice the
student) trained from scratch to answer Self-Instruct's prompt, on the documents of make_data.py
(results: experiments/alpaca/README.md).

    flaxllm train --config=configs/default.py --workdir=runs/default   # its tokenizer
    python experiments/alpaca/make_data.py --out-dir runs/alpaca
    flaxllm train --config=experiments/alpaca/teacher.py --workdir=runs/alpaca/teacher

The loss is on the written tasks only (the prompt is the template '{instruction}' of the
'alpaca' format); a document (the prompt's last 256 tokens, as self-instruct sends them to a
512-token server, and ~240 tokens of tasks) is one 512-token row; the student's
tokenizer (`runs/default/tokenizer.model`) is reused, so the two read the same ids.

Variants: base=DIR (the tokenizer's workdir, default runs/default), data=FILE (default
runs/alpaca/teacher.jsonl), steps (default 700).
"""
import os

from flaxllm.config import load_file, parse_arg

_DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', 'configs',
                        'default.py')


def get_config(arg=None):
  arg = parse_arg(arg, base='runs/default', data='runs/alpaca/teacher.jsonl', steps=700)
  config = load_file(_DEFAULT)   # the `make train` LLaMA recipe; sizes and data below
  config.model.update(d_model=320, num_layers=6, num_heads=5, num_kv_heads=5, mlp_dim=864,
                      max_seq_len=512)
  config.tokenizer.model_path = os.path.join(arg.base, 'tokenizer.model')
  config.data.source = 'jsonl'
  config.data.path = arg.data
  config.data.format = 'alpaca'
  config.data.template = '{instruction}'   # the Self-Instruct prompt as it is; loss on the tasks
  config.data.packing = 'first_fit'        # a document per row, its prompt with it

  config.seq_len = 512
  config.total_steps = arg.steps
  config.optim.lr = 2e-3
  config.schedule.warmup_steps = 15
  config.eval_every = 100
  config.eval_batches = 4
  config.ckpt_every = 100
  config.loss_chunk_size = 128
  config.sample.prompt = 'List of 8 tasks:\n###\n1. Instruction:'
  config.sample.temperature = 0.7
  config.sample.max_new_tokens = 96
  return config
