"""`flaxllm reward`: a reward model's accuracy on preference pairs.

    flaxllm reward --model=runs/rlhf/reward --data=pairs.jsonl [--seq-len=128 --batch-size=16]

--model is a reward run's workdir or its exported `model/` (the decoder and
`reward_head.npy`); --data a JSON/JSONL file of (prompt, chosen, rejected) records, formatted
and truncated as in training. Prints the number of pairs, the accuracy (the share whose chosen
response scores higher) and the mean margin, and one JSON line with them.
"""
from __future__ import annotations

import argparse
import json
from typing import Optional, Sequence

import jax
import numpy as np
from ml_collections import ConfigDict

from flaxllm import cli, rundir
from flaxllm.data import corpus, preference
from flaxllm.objectives.align import reward, sequences


def score_pairs(model_cfg, params, head_kernel, tokenizer, data_path: str, *,
                seq_len: int, batch_size: int = 16, max_prompt_len: Optional[int] = None) -> dict:
  """{'pairs', 'accuracy', 'margin'} of a reward model over every pair of `data_path`."""
  data = ConfigDict({**corpus.config_section().to_dict(), 'source': 'jsonl', 'path': data_path,
                     'val_fraction': 0.0, 'shuffle': False})
  preference.check_records(data, 'paired')
  it = preference.make_preference_iterator(data, tokenizer, split='train', seq_len=seq_len,
                                           batch_size=batch_size, seed=0, num_epochs=1,
                                           max_prompt_len=max_prompt_len)
  score = jax.jit(lambda p, h, rows: reward.rewards(model_cfg, p, h, rows))
  margins = []
  try:
    for batch in it:
      r = np.asarray(score(params, head_kernel, sequences.stack_pair(batch)))
      real = np.asarray(batch['chosen_loss_mask']).sum(-1) > 0
      half = len(r) // 2
      margins += list((r[:half] - r[half:])[real])
  finally:
    it.close()
  margins = np.asarray(margins)
  return {'pairs': int(margins.size), 'accuracy': float(np.mean(margins > 0)),
          'margin': float(np.mean(margins))}


def _reward(argv) -> int:
  p = argparse.ArgumentParser(prog='flaxllm reward', description=__doc__.splitlines()[0])
  p.add_argument('--model', required=True, help="a reward run's workdir or its model/")
  p.add_argument('--data', required=True, help='JSON/JSONL (prompt, chosen, rejected) records')
  p.add_argument('--seq-len', type=int, default=0, help="default: the model's max_seq_len")
  p.add_argument('--batch-size', type=int, default=16)
  p.add_argument('--max-prompt-len', type=int, default=0, help='default: seq_len // 2')
  args = p.parse_args(argv)
  model_cfg, params, head = reward.load_reward_model(args.model)
  tokenizer = rundir.load_tokenizer(args.model) or rundir.load_tokenizer(
      f'{args.model}/{rundir.MODEL_DIR}')
  if tokenizer is None:
    p.error(f'{args.model} holds no tokenizer; point --model at a reward run or its model/.')
  result = score_pairs(model_cfg, params, head, tokenizer, args.data,
                       seq_len=args.seq_len or model_cfg.max_seq_len, batch_size=args.batch_size,
                       max_prompt_len=args.max_prompt_len or None)
  print(f'{result["pairs"]} pairs: accuracy {result["accuracy"]:.4f}, mean margin '
        f'{result["margin"]:.4f}')
  print(json.dumps(result), flush=True)
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Entry point of `flaxllm reward`."""
  return cli.run(_reward, argv)
