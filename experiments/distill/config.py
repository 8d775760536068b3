r"""Knowledge distillation on the default corpus: does a small student gain from a teacher?

The teacher is the default model (configs/default.py: 6 layers, d_model 320, 10.1M params)
trained for 400 steps of 8 x 128 tokens. The students are one small size (2 layers, d_model
128, 1.5M params, the teacher's 4096-token tokenizer), trained for the same 200 steps of 8 x 128
tokens, same data order and optimizer (results in README.md):

    flaxllm train --config=configs/default.py:steps=400 --workdir=runs/distill/teacher400
    flaxllm train --config=experiments/distill/config.py:role=scratch --workdir=runs/distill/scratch
    flaxllm train --config=experiments/distill/config.py:role=distill --workdir=runs/distill/kd
    python experiments/distill/report.py      # table + experiments/distill/val_ppl.png

Another teacher: teacher=DIR after the colon, e.g.
    flaxllm train --config=configs/default.py:steps=600 --workdir=runs/distill/teacher600
    flaxllm train --config=experiments/distill/config.py:role=distill,teacher=runs/distill/teacher600 \
        --workdir=runs/distill/kd600

Other recipes of flaxllm.objectives.distill on the same student:
    ...:role=distill,alpha=0.9,temperature=2     loss weights / temperature
    ...:role=distill,divergence=jsd,beta=0.5     generalised JSD (reverse_kl, forward_kl)
    ...:role=onpolicy                             GKD: 25% of the batches sampled by the student
    flaxllm distill-data --mode=topk --config=experiments/distill/config.py:role=distill \
        --top-k=64 --out=runs/distill/teacher_top64
    ...:role=offline                              trains from those stored top-64 logits

Variants: role=scratch|distill|onpolicy|offline, teacher=DIR (default runs/distill/teacher400),
alpha, temperature, divergence, beta, top_k, steps, layers, width, on_policy, offline=DIR.
"""
import os

from flaxllm.config import load_file, parse_arg

_DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', 'configs',
                        'default.py')


def get_config(arg=None):
  arg = parse_arg(arg, role='distill', teacher='runs/distill/teacher400', alpha=0.5,
                  temperature=1.0, divergence='forward_kl', beta=0.5, top_k=0, steps=200,
                  layers=2, width=128, on_policy=0.25, offline='runs/distill/teacher_top64')
  config = load_file(_DEFAULT)
  config.total_steps = arg.steps
  config.model.update(num_layers=arg.layers, d_model=arg.width, num_heads=arg.width // 64,
                      num_kv_heads=arg.width // 64, mlp_dim=arg.width * 11 // 4)
  # The teacher's tokenizer: logit distillation compares the same token ids.
  config.tokenizer.model_path = os.path.join(arg.teacher, 'tokenizer.model')
  config.sample.max_new_tokens = 0
  config.eval_every = 25          # a validation curve (the same 8 batches every time)
  d = config.distill
  if arg.role == 'scratch':
    return config
  if arg.role not in ('distill', 'onpolicy', 'offline'):
    raise ValueError(f'unknown role {arg.role!r}; use scratch, distill, onpolicy or offline.')
  config.objective = 'distill'
  d.update(alpha=arg.alpha, temperature=arg.temperature, divergence=arg.divergence,
           beta=arg.beta, top_k=arg.top_k, chunk_size=64)
  if arg.role == 'offline':
    d.offline_logits = arg.offline
  else:
    d.teacher = arg.teacher
  if arg.role == 'onpolicy':
    d.on_policy = arg.on_policy
    d.on_policy_prompt_len = 16
  return config
