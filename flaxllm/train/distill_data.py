"""`flaxllm distill-data`: data made by a teacher, once, for students to train on.

  flaxllm distill-data --mode=topk --config=SPEC [--config.k=v ...] [--teacher=DIR] \
      --top-k=64 --out=DIR [--steps=N]
      the teacher's top-k logits of the first N (default total_steps) train batches of the
      student config SPEC (flaxllm.objectives.distill.offline); train with
      distill.offline_logits=DIR.
  flaxllm distill-data --mode=sequences --teacher=DIR --out=DIR [--config=SPEC] \
      [--num=256 --prompt-len=16 --max-new-tokens=128 --temperature=0.8 --top-k=0]
      sequence-level distillation data: teacher continuations of the first tokens of training
      documents, one text file each; train with data.source=text data.path=DIR and the
      teacher's tokenizer (tokenizer.model_path=<teacher>/tokenizer.model).
"""
from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

from flaxllm import cli, rundir
from flaxllm import config as config_lib
from flaxllm.data import tokenizer as tok_lib
from flaxllm.objectives.distill import offline, onpolicy
from flaxllm.objectives.distill import teacher as teacher_lib


def _main(argv) -> int:
  p = argparse.ArgumentParser(prog='flaxllm distill-data', description=__doc__.splitlines()[0])
  p.add_argument('--mode', choices=('topk', 'sequences'), required=True)
  p.add_argument('--config', default='configs/default.py',
                 help='the student config whose data the teacher sees')
  p.add_argument('--teacher', default='', help='default: the config\'s distill.teacher')
  p.add_argument('--out', required=True)
  p.add_argument('--top-k', type=int, default=64)
  p.add_argument('--steps', type=int, default=0)
  p.add_argument('--num', type=int, default=256)
  p.add_argument('--prompt-len', type=int, default=16)
  p.add_argument('--max-new-tokens', type=int, default=128)
  p.add_argument('--temperature', type=float, default=0.8)
  p.add_argument('--seed', type=int, default=0)
  overrides, rest = cli.split_overrides(argv)
  args = p.parse_args(rest)
  config = config_lib.load_config(args.config, overrides)
  teacher_path = args.teacher or config.distill.teacher
  dtype = config.distill.teacher_dtype
  source = rundir.model_source(teacher_path, what='--teacher', dtype=dtype)
  params = lambda: rundir.load_params(source.path, what='--teacher', dtype=dtype)
  if args.mode == 'topk':
    tokenizer = tok_lib.get_tokenizer(config.tokenizer, corpus=config.data)
    teacher_lib.check_teacher(source, config.model, tokenizer, top_k=args.top_k)
    meta = offline.write_topk(config, tokenizer, source.model_cfg, params(), args.out,
                              top_k=args.top_k, steps=args.steps or None)
    print(f'wrote the teacher\'s top-{meta["k"]} logits of {meta["steps"]} batches to {args.out}')
    return 0
  tokenizer = rundir.load_tokenizer(source.path) or tok_lib.ByteTokenizer()
  if tokenizer.vocab_size > source.model_cfg.vocab_size:
    raise ValueError(f'the tokenizer next to the teacher has {tokenizer.vocab_size} tokens, more '
                     f'than its model\'s {source.model_cfg.vocab_size}.')
  prompts = onpolicy.document_prompts(config, tokenizer, args.num, args.prompt_len)
  n = onpolicy.write_sequence_data(source.model_cfg, params(), tokenizer, prompts, args.out,
                                   max_new_tokens=args.max_new_tokens,
                                   temperature=args.temperature,
                                   top_k=args.top_k or None, seed=args.seed)
  tok_path = os.path.join(source.path, rundir.TOKENIZER_FILE)
  print(f'wrote {n} teacher samples to {args.out}; train with --config.data.source=text '
        f'--config.data.path={args.out} --config.tokenizer.model_path={tok_path}')
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Entry point of `flaxllm distill-data`."""
  return cli.run(_main, argv)
