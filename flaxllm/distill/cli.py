"""`flaxllm distill-data`: data made by a teacher, once, for students to train on.

  flaxllm distill-data --mode=topk --config=SPEC [--config.k=v ...] [--teacher=DIR] \
      --top-k=64 --out=DIR [--steps=N]
      the teacher's top-k logits of the first N (default total_steps) train batches of the
      student config SPEC (flaxllm.distill.offline); train with distill.offline_logits=DIR.
  flaxllm distill-data --mode=sequences --teacher=DIR --out=DIR [--config=SPEC] \
      [--num=256 --prompt-len=16 --max-new-tokens=128 --temperature=0.8 --top-k=0]
      sequence-level distillation data: teacher continuations of the first tokens of training
      documents, one text file each; train with data.source=text data.path=DIR and the
      teacher's tokenizer (tokenizer.model_path=<teacher>/tokenizer.model).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence


def _main(argv) -> int:
  from flaxllm import config as config_lib  # pylint: disable=import-outside-toplevel
  from flaxllm.data import tokenizer as tok_lib  # pylint: disable=import-outside-toplevel
  from flaxllm.distill import teacher as teacher_lib  # pylint: disable=import-outside-toplevel
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
  overrides = [a for a in argv if a.startswith('--config.')]
  args = p.parse_args([a for a in argv if not a.startswith('--config.')])
  config = config_lib.load_config(args.config, overrides)
  teacher_path = args.teacher or config.distill.teacher
  source = teacher_lib.resolve_teacher(teacher_path, config.distill.teacher_dtype)
  if args.mode == 'topk':
    tokenizer = tok_lib.get_tokenizer(config.tokenizer, corpus=config.data)
    teacher_lib.check_teacher(source, config.model, tokenizer, top_k=args.top_k)
    params = teacher_lib.load_teacher_params(source)
    from flaxllm.distill import offline  # pylint: disable=import-outside-toplevel
    meta = offline.write_topk(config, tokenizer, source.model_cfg, params, args.out,
                              top_k=args.top_k, steps=args.steps or None)
    print(f'wrote the teacher\'s top-{meta["k"]} logits of {meta["steps"]} batches to {args.out}')
    return 0
  tok_path = os.path.join(source.path, teacher_lib.TOKENIZER_FILE)
  tokenizer = (tok_lib.SentencePieceTokenizer.load(tok_path) if os.path.exists(tok_path)
               else tok_lib.ByteTokenizer())
  if tokenizer.vocab_size > source.model_cfg.vocab_size:
    raise ValueError(f'the tokenizer next to the teacher has {tokenizer.vocab_size} tokens, more '
                     f'than its model\'s {source.model_cfg.vocab_size}.')
  params = teacher_lib.load_teacher_params(source)
  from flaxllm.distill import onpolicy  # pylint: disable=import-outside-toplevel
  prompts = onpolicy.document_prompts(config, tokenizer, args.num, args.prompt_len)
  n = onpolicy.write_sequence_data(source.model_cfg, params, tokenizer, prompts, args.out,
                                   max_new_tokens=args.max_new_tokens,
                                   temperature=args.temperature,
                                   top_k=args.top_k or None, seed=args.seed)
  print(f'wrote {n} teacher samples to {args.out}; train with --config.data.source=text '
        f'--config.data.path={args.out} --config.tokenizer.model_path={tok_path}')
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  from flaxllm.train import main as train_main  # pylint: disable=import-outside-toplevel
  train_main._quiet_logs()  # pylint: disable=protected-access
  return train_main._run(_main, list(sys.argv[1:] if argv is None else argv))  # pylint: disable=protected-access
