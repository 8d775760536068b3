r"""The InstructGPT pipeline at CPU scale: supervised fine-tuning on demonstrations, a reward
model on noisy comparisons, then PPO (and GRPO) against the reward model with a KL penalty to
the SFT model; DPO on the same comparisons for contrast (results: experiments/rlhf/README.md).

    python experiments/rlhf/make_data.py --out runs/rlhf
    flaxllm train --config=experiments/rlhf/config.py:stage=sft --workdir=runs/rlhf/sft
    python experiments/rlhf/make_pairs.py --sft runs/rlhf/sft --out runs/rlhf/pairs.jsonl
    flaxllm train --config=experiments/rlhf/config.py:stage=reward --workdir=runs/rlhf/reward
    flaxllm reward --model=runs/rlhf/reward --data=runs/rlhf/pairs.jsonl
    flaxllm train --config=experiments/rlhf/config.py:stage=ppo --workdir=runs/rlhf/ppo
    flaxllm train --config=experiments/rlhf/config.py:stage=grpo --workdir=runs/rlhf/grpo
    flaxllm train --config=experiments/rlhf/config.py:stage=dpo --workdir=runs/rlhf/dpo
    python experiments/rlhf/report.py

The model: a byte-level LLaMA (4 layers, d_model 128, 0.8M parameters) that sees a function
signature as a chat turn and writes the body. The preference, known in code
(experiments/rlhf/rewards.py), is a body that makes the function parse, has a docstring and is
short. Every stage after SFT starts from the SFT run; RL rewards come from the reward model only
(the true reward is computed alongside with weight 0, so it is logged and never optimised).

Variants: stage=sft|reward|ppo|grpo|dpo, data=DIR (default runs/rlhf), steps (0 = the stage's
default), beta (the KL strength of ppo / grpo / dpo; 0 = the stage's default).
"""
import os

from flaxllm.config import base_config, parse_arg

STAGE_STEPS = {'sft': 1200, 'reward': 120, 'ppo': 300, 'grpo': 200, 'dpo': 300}
TRUE_REWARD = 'experiments.rlhf.rewards:true_rewards'


def get_config(arg=None):
  arg = parse_arg(arg, stage='sft', data='runs/rlhf', steps=0, beta=0.0)
  if arg.stage not in STAGE_STEPS:
    raise ValueError(f'unknown stage {arg.stage!r}; use one of {sorted(STAGE_STEPS)}.')
  data = os.path.abspath(arg.data)
  config = base_config()
  config.seed = 0
  m = config.model
  m.update(arch='decoder', mlp_activation='swiglu', norm='rmsnorm', position='rope',
           tie_embeddings=False, vocab_size=259, d_model=128, num_layers=4, num_heads=4,
           num_kv_heads=4, mlp_dim=384, max_seq_len=192, dtype='float32', param_dtype='float32')
  config.tokenizer.kind = 'bytes'
  config.seq_len = 192
  config.peak_flops = 1e11           # skip measuring the machine
  config.wandb.mode = 'disabled'
  config.progress_bar = False
  config.data.source = 'jsonl'
  config.data.val_fraction = 0.1
  config.total_steps = arg.steps or STAGE_STEPS[arg.stage]
  config.schedule.warmup_steps = 10
  config.log_every = 10
  config.keep_ckpts = 20
  config.sample.max_new_tokens = 0
  if arg.stage != 'sft':
    config.init_from = os.path.join(data, 'sft')
    config.objective = arg.stage

  if arg.stage == 'sft':             # demonstrations: the body after the signature
    config.data.path = os.path.join(data, 'sft.jsonl')
    config.data.format = 'chat'
    config.data.packing = 'first_fit'
    config.data.val_fraction = 0.05
    config.batch_size = 32
    config.optim.lr = 3e-3
    config.schedule.warmup_steps = 50
    config.eval_every = 300
    config.ckpt_every = 300
  elif arg.stage in ('reward', 'dpo'):   # the comparisons
    config.data.path = os.path.join(data, 'pairs.jsonl')
    config.batch_size = 32
    config.eval_every = 50
    config.ckpt_every = 50
    config.eval_batches = 8
    if arg.stage == 'reward':
      config.optim.lr = 3e-4
      config.reward.max_prompt_len = 80
    else:
      config.optim.lr = 1e-4
      config.dpo.beta = arg.beta or 0.1
      config.dpo.max_prompt_len = 80
  else:                              # on-policy RL from the reward model
    config.data.path = os.path.join(data, 'prompts.jsonl')
    config.optim.lr = 1e-4
    config.eval_every = 50 if arg.stage == 'ppo' else 40
    config.ckpt_every = config.eval_every
    s = config[arg.stage]
    s.max_prompt_len = 80
    s.reward_model = os.path.join(data, 'reward')
    s.reward_funcs = (TRUE_REWARD,)
    s.reward_weights = (0.0, 1.0)    # the true reward is logged, never optimised
    s.eval_prompts = 64
    if arg.stage == 'ppo':
      config.batch_size = 32
      s.kl_coef = arg.beta or 0.05
      s.epochs = 4
      s.minibatches = 2
    else:
      config.batch_size = 64
      s.group_size = 8
      s.beta = arg.beta or 0.04
      s.num_iterations = 2
  return config
