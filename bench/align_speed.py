"""Alignment objectives on CPU: (a) the DPO train step over an SFT train step on the same
sequences, flaxllm next to TRL / PyTorch; (b) a GRPO step split into the rollout on the host
(generation, reward scoring, the sampling policy's log-probs) and the compiled train step.

    .venv/bin/python bench/align_speed.py      # writes bench/results/align_speed_cpu.{json,md}
    .venv/bin/python bench/align_speed.py --reps 3 --grpo-steps 2 --out ''   # quick look

Model: a random-init LLaMA of 4 layers, d_model 128, 4 heads, SwiGLU 352, vocabulary 4096
(`configs/default.py:size=tiny` with the model keys overridden; byte tokens, so only ids < 259
occur, but the head is 4096 wide), float32, no remat. Optimizer: the config's AdamW (b2 0.95,
weight decay 0.1), global-norm clipping at 1.0, in both frameworks.

(a) One batch of 8 synthetic (prompt, chosen, rejected) pairs, rows of 128 tokens (prompt ~50,
responses ~63 bytes, right-padded), loaded by the DPO objective's own data iterator. Every
variant is the trainer's own jitted step (`flaxllm.train.trainer.build_programs`):
  sft_B        objective 'lm' on the 8 chosen rows (loss on the response tokens);
  sft_2B       objective 'lm' on the 16 chosen + rejected rows (the tokens DPO runs over);
  dpo          objective 'dpo' (sigmoid, beta 0.1), full fine-tuning: reference = a frozen
               copy of the starting params (a second forward, no gradient);
  dpo_stored   `dpo.reference_logps`: the reference's log-probs come with the batch (computed
               here once by `objective.reference_logps` and put in the batch; the store's host
               read is outside the step): no reference forward;
  lora_sft_2B, lora_dpo   the same with finetune.method=lora (rank 8, all linear layers); the
               DPO reference is the base with the adapters off (`frozen['base']`).
The PyTorch peers start from the same weights (copied into `transformers.LlamaForCausalLM`,
sdpa attention) and see the same token rows and masks:
  torch_sft_B, torch_sft_2B   model(input_ids, attention_mask, labels) with -100 outside the
               responses (the Hugging Face causal-LM loss); backward; clip; AdamW.step;
  trl_dpo      TRL's own `DPOTrainer.training_step` (its `_compute_loss`: policy forward with
               TRL's fused LM head on the concatenated chosen/rejected rows, reference model
               forward under no_grad, sigmoid loss, metrics; backward), then clip and
               the trainer's optimizer (AdamW, fused); the trainer is built offline with a
               local word-level tokenizer and a dummy dataset that is never iterated;
  torch_dpo    the same in plain torch: full logits, log_softmax, gather, masked sums;
  fwd_2B, torch_fwd_2B   the forward pass alone (SFT loss on the 2B rows, no gradient): the
               cost of a reference forward, to read the DPO/SFT ratio against.
All variants take turns step by step (round-robin, `--reps` timed steps each after `--warmup`),
so a change of load on the shared machine hits them alike; the figures are medians.

(b) GRPO (objective 'grpo', group size 8: 8 prompts x 8 completions, prompts left-padded to 32
tokens, completions of up to 64 tokens, temperature 1, reward
`experiments.rlhf.rewards:true_rewards`, loss dapo, beta 0, `--grpo-iterations` optimiser
passes, default 1: then the old log-probs are the current ones and the hook skips their forward). Each step runs the objective's
real batch hook (`objective.batch_hook(...)`, as the trainer does) and then the train step; the
sampler's `rollout`, `score` and `token_logps` are wrapped with timers (wrappers on the
instance, nothing in flaxllm changed), which splits the hook into generation, reward scoring
and the old log-probs. The working directory must be the repository root (the reward module is
imported from there).

`--cpus 1` (default) pins the process to one CPU (both JAX's and torch's thread pools), to keep
the load on the shared machine modest; the ratios are the numbers to read.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import statistics
import sys
import tempfile
import time

import numpy as np

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, ROOT)
sys.path.insert(0, BENCH)
RESULTS = os.path.join(BENCH, 'results')

TINY = os.path.join(ROOT, 'configs', 'default.py') + ':size=tiny'
MODEL = dict(d_model=128, num_layers=4, num_heads=4, num_kv_heads=4, mlp_dim=352,
             vocab_size=4096, max_seq_len=256)
REWARD = 'experiments.rlhf.rewards:true_rewards'
WORDS = ['x', 'y', 'total', 'count', 'name', 'value', 'items', 'result', 'f', 'g', 'key']


# ----------------------------------------------------------------------------- data and configs

def _code(rng: random.Random, n: int) -> str:
  """About `n` bytes of Python-looking text."""
  out = ''
  while len(out) < n:
    a, b = rng.sample(WORDS, 2)
    out += rng.choice([f'{a} = {b} + {rng.randint(1, 99)}\n', f'return {a}({b})\n',
                       f'for {a} in {b}:\n', f'    {a} += 1\n', f'if {a} > {b}:\n'])
  return out[:n]


def write_pairs(path: str, n: int = 64, seed: int = 0) -> None:
  """Synthetic (prompt, chosen, rejected) records: prompt+response fit a 128-token row."""
  rng = random.Random(seed)
  with open(path, 'w') as f:
    for i in range(n):
      prompt = f'# task {i}: ' + _code(rng, rng.randint(34, 44)).replace('\n', ' ') + '\n'
      f.write(json.dumps({'prompt': prompt, 'chosen': _code(rng, rng.randint(56, 70)),
                          'rejected': _code(rng, rng.randint(56, 70))}) + '\n')


def write_prompts(path: str, n: int = 64, seed: int = 0) -> None:
  """Function signatures (the RLHF experiment's prompt kind)."""
  rng = random.Random(seed)
  with open(path, 'w') as f:
    for i in range(n):
      args = ', '.join(rng.sample(WORDS, rng.randint(1, 3)))
      f.write(json.dumps({'prompt': f'def {rng.choice(WORDS)}_{i}({args}):'}) + '\n')


def make_config(objective: str, batch: int, seq: int, *extra: str):
  from flaxllm import config as config_lib
  model = [f'--config.model.{k}={v}' for k, v in MODEL.items()]
  return config_lib.load_config(TINY, [
      *model, f'--config.objective={objective}', f'--config.batch_size={batch}',
      f'--config.seq_len={seq}', '--config.wandb.mode=disabled', '--config.peak_flops=1e11',
      *extra])


# ----------------------------------------------------------------------------- timing

class Variant:
  """One step function, timed step by step: wall and process CPU seconds."""

  def __init__(self, name, step):
    self.name, self.step, self.wall, self.cpu, self.losses = name, step, [], [], []

  def run(self, record: bool):
    w, c = time.perf_counter(), time.process_time()
    loss = self.step()
    w, c = time.perf_counter() - w, time.process_time() - c
    self.losses.append(loss)
    if record:
      self.wall.append(w)
      self.cpu.append(c)

  def summary(self) -> dict:
    return {'ms': 1e3 * statistics.median(self.wall), 'cpu_ms': 1e3 * statistics.median(self.cpu),
            'times_ms': [round(1e3 * t, 1) for t in self.wall],
            'first_loss': self.losses[0], 'last_loss': self.losses[-1]}


def flax_variant(name, config, batch, *, extra_batch=None):
  """The trainer's train step of `config` on `batch` (dict of numpy arrays)."""
  import jax

  from flaxllm import parallel
  from flaxllm.train import trainer
  mesh = parallel.make_mesh(config.mesh, jax.devices()[:1])
  programs = trainer.build_programs(config, mesh)
  key = jax.random.PRNGKey(0)
  trainable, frozen = programs.split(programs.init_params(key), key)
  if extra_batch is not None:
    batch = {**batch, **extra_batch(programs, trainable, frozen, batch)}
  holder = {'state': programs.init(trainable, key)}
  device_batch = parallel.shard_batch(batch, programs.mesh, programs.rules)

  def step():
    holder['state'], metrics = programs.train_step(holder['state'], device_batch, frozen)
    return float(metrics['loss'])     # blocks until the step is done
  return Variant(name, step), programs


def stored_reference(programs, trainable, frozen, batch):
  """The reference log-probs of `batch` as `dpo.reference_logps` would store them: the
  starting params (the reference of full fine-tuning) through `objective.reference_logps`."""
  import jax
  params = programs.plain_params(trainable, frozen)
  out = jax.jit(programs.objective.reference_logps)(params, batch)
  return {k: np.asarray(v, np.float32) for k, v in out.items()}


def torch_rows(batch: dict, side_keys=('chosen', 'rejected')) -> dict:
  """Torch inputs of flaxllm pair rows: the whole token sequence of each row (BOS ... EOS,
  right-padded to seq_len), its attention mask, and the completion mask of the tokens that are
  a target under the loss mask (TRL's `completion_mask` convention: position t+1 is scored
  from t). Rows must leave the last target column as padding (checked)."""
  import torch
  out = {'input_ids': [], 'attention_mask': [], 'completion_mask': []}
  for side in side_keys:
    inputs, targets = batch[f'{side}_inputs'], batch[f'{side}_targets']
    seg, mask = batch[f'{side}_segment_ids'], batch[f'{side}_loss_mask']
    assert not seg[:, -1].any(), 'a row fills seq_len: make the synthetic records shorter'
    full = np.concatenate([inputs[:, :1], targets], axis=1)[:, :-1]
    real = np.concatenate([seg[:, :1], seg], axis=1)[:, :-1] > 0   # token j = target j - 1
    out['input_ids'].append(np.where(real, full, 0))
    out['attention_mask'].append(real)
    out['completion_mask'].append(np.concatenate([np.zeros_like(mask[:, :1]), mask[:, :-1]], 1))
  return {'input_ids': torch.from_numpy(np.concatenate(out['input_ids']).astype(np.int64)),
          'attention_mask': torch.from_numpy(np.concatenate(out['attention_mask'])
                                             .astype(np.int64)),
          'completion_mask': torch.from_numpy(np.concatenate(out['completion_mask'])
                                              .astype(np.int64))}


def torch_optimizer(model, o):
  import torch
  return torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps,
                           weight_decay=o.weight_decay, fused=True)


def torch_sft_variant(name, model, rows, o):
  opt = torch_optimizer(model, o)
  labels = rows['input_ids'].masked_fill(rows['completion_mask'] == 0, -100)

  def step():
    loss = model(input_ids=rows['input_ids'], attention_mask=rows['attention_mask'],
                 labels=labels, use_cache=False).loss
    return torch_update(model, opt, loss, o.grad_clip)
  return Variant(name, step)


def torch_update(model, opt, loss, grad_clip: float) -> float:
  """Backward, clip, AdamW step (the torch twin of the trainer's update); the loss as a float."""
  import torch
  loss.backward()
  torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
  opt.step()
  opt.zero_grad(set_to_none=True)
  return float(loss.detach())


def torch_sequence_logps(model, rows):
  """Summed completion log-probs [N] (plain torch: full logits, log_softmax, gather)."""
  import torch
  logits = model(input_ids=rows['input_ids'], attention_mask=rows['attention_mask'],
                 use_cache=False).logits[:, :-1].float()
  targets = rows['input_ids'][:, 1:]
  logps = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
  return (logps * rows['completion_mask'][:, 1:]).sum(-1)


def torch_dpo_variant(name, model, ref, rows, o, beta):
  import torch
  import torch.nn.functional as F
  opt = torch_optimizer(model, o)

  def step():
    policy = torch_sequence_logps(model, rows)
    with torch.no_grad():
      reference = torch_sequence_logps(ref, rows)
    pc, pr = policy.chunk(2)
    rc, rr = reference.chunk(2)
    loss = -F.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()
    return torch_update(model, opt, loss, o.grad_clip)
  return Variant(name, step)


def trl_dpo_variant(name, model, ref, rows, config, workdir):
  """TRL's DPOTrainer, built offline; each step is its `training_step` (forward, loss,
  backward), clipping and its optimizer."""
  import torch
  from datasets import Dataset
  from tokenizers import Tokenizer, models as tk_models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  from trl import DPOConfig, DPOTrainer
  vocab = {'<pad>': 0, '<bos>': 1, '<eos>': 2, **{chr(97 + i): 3 + i for i in range(26)}}
  tok = Tokenizer(tk_models.WordLevel(vocab, unk_token='<pad>'))
  tok.pre_tokenizer = pre_tokenizers.Split('', 'isolated')
  tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token='<pad>', eos_token='<eos>',
                                      bos_token='<bos>')
  o, d = config.optim, config.dpo
  args = DPOConfig(output_dir=workdir, per_device_train_batch_size=rows['input_ids'].shape[0] // 2,
                   gradient_checkpointing=False, bf16=False, use_cpu=True, report_to='none',
                   learning_rate=o.lr, adam_beta1=o.b1, adam_beta2=o.b2, adam_epsilon=o.eps,
                   weight_decay=o.weight_decay, max_grad_norm=o.grad_clip, max_length=None,
                   beta=d.beta, disable_tqdm=True, save_strategy='no', logging_strategy='no')
  dummy = Dataset.from_list([{'prompt': 'ab', 'chosen': 'cd', 'rejected': 'ef'}] * 2)
  trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=dummy,
                       processing_class=tokenizer)
  trainer.create_optimizer()
  trainer.current_gradient_accumulation_steps = 1   # set by Trainer's loop, which is not run

  def step():
    loss = trainer.training_step(trainer.model, dict(rows))
    torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), o.grad_clip)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return float(loss)
  return Variant(name, step), trainer


# ----------------------------------------------------------------------------- (a) DPO vs SFT

def dpo_vs_sft(args, tmp) -> dict:
  import jax
  import torch

  from flaxllm import parallel
  from flaxllm.data.tokenizer import ByteTokenizer
  from flaxllm.objectives.align import sequences
  from flaxllm.train import trainer
  import model_speed  # bench/model_speed.py: the torch twin of a flaxllm LLaMA

  b, s = args.pairs, args.seq
  pairs = os.path.join(tmp, 'pairs.jsonl')
  write_pairs(pairs)
  data = ['--config.data.source=jsonl', f'--config.data.path={pairs}',
          '--config.data.val_fraction=0.0']
  lora = ['--config.finetune.method=lora', '--config.finetune.rank=8']
  dpo_cfg = make_config('dpo', b, s, *data)
  dpo_programs = trainer.build_programs(dpo_cfg, parallel.make_mesh(dpo_cfg.mesh,
                                                                    jax.devices()[:1]))
  it = dpo_programs.objective.data_iterator(ByteTokenizer(), 'train', seq_len=s, batch_size=b,
                                            seed=0)
  pair_batch = {k: np.asarray(v) for k, v in next(it).items()}
  it.close()
  chosen = {k: pair_batch[f'chosen_{k}'] for k in sequences.ROW_KEYS}
  both = {k: np.concatenate([pair_batch[f'{side}_{k}'] for side in ('chosen', 'rejected')])
          for k in sequences.ROW_KEYS}
  stats = {'real_tokens_per_row': float(both['segment_ids'].sum() / (2 * b)),
           'response_tokens_per_row': float(both['loss_mask'].sum() / (2 * b))}

  print('building the flaxllm steps ...', flush=True)
  variants = [
      flax_variant('sft_B', make_config('lm', b, s), chosen)[0],
      flax_variant('sft_2B', make_config('lm', 2 * b, s), both)[0],
      flax_variant('dpo', dpo_cfg, pair_batch)[0],
      flax_variant('dpo_stored', make_config('dpo', b, s, *data,
                                             f'--config.dpo.reference_logps={tmp}/ref_logps'),
                   pair_batch, extra_batch=stored_reference)[0],
      flax_variant('lora_sft_2B', make_config('lm', 2 * b, s, *lora), both)[0],
      flax_variant('lora_dpo', make_config('dpo', b, s, *data, *lora), pair_batch)[0]]

  print('building the torch steps ...', flush=True)
  key = jax.random.PRNGKey(0)
  params_on_device = dpo_programs.init_params(key)    # the same start as every flax step
  params = jax.device_get(params_on_device)
  cfg = dpo_programs.model_cfg
  twin = lambda: model_speed.torch_model(cfg, params, 'sdpa').train()
  rows = torch_rows(pair_batch)
  rows_chosen = {k: v[:b] for k, v in rows.items()}
  o = dpo_cfg.optim
  # The rows as torch sees them give the same log-probs as flaxllm's (a check of the inputs).
  with torch.no_grad():
    t_logps = torch_sequence_logps(twin().eval(), rows).numpy()
  f_logps = np.asarray(jax.jit(lambda p, r: sequences.token_logps(cfg, p, r).sum(-1))(
      params, both))
  trl_variant, _ = trl_dpo_variant('trl_dpo', twin(), twin().eval(), rows, dpo_cfg,
                                   os.path.join(tmp, 'trl'))
  variants += [
      torch_sft_variant('torch_sft_B', twin(), rows_chosen, o),
      torch_sft_variant('torch_sft_2B', twin(), rows, o),
      trl_variant,
      torch_dpo_variant('torch_dpo', twin(), twin().eval(), rows, o, dpo_cfg.dpo.beta)]

  # The forward pass alone (SFT loss on the 2B rows, no gradient): what a reference costs.
  from flaxllm.objectives import lm
  flax_fwd = jax.jit(lambda p, batch: lm.lm_loss(
      dpo_programs.objective.build_model(train=False))(p, {}, batch)[0])
  variants.append(Variant('fwd_2B', lambda: float(flax_fwd(params_on_device, both))))
  fwd_model = twin().eval()

  def torch_fwd():
    with torch.no_grad():
      return float(fwd_model(input_ids=rows['input_ids'], attention_mask=rows['attention_mask'],
                             labels=rows['input_ids'].masked_fill(rows['completion_mask'] == 0,
                                                                  -100), use_cache=False).loss)
  variants.append(Variant('torch_fwd_2B', torch_fwd))

  print(f'warm-up ({args.warmup} steps each, compiles) ...', flush=True)
  for _ in range(args.warmup):
    for v in variants:
      v.run(record=False)
  print(f'timing: {args.reps} rounds, variants in turns ...', flush=True)
  for r in range(args.reps):
    for v in variants:
      v.run(record=True)
    print(f'  round {r + 1}: ' + ' '.join(f'{v.name} {1e3 * v.wall[-1]:.0f}' for v in variants),
          flush=True)
  steps = {v.name: v.summary() for v in variants}
  ms = lambda n: steps[n]['ms']
  ratios = {
      'flaxllm_dpo_over_sft_2B': ms('dpo') / ms('sft_2B'),
      'flaxllm_dpo_over_sft_B': ms('dpo') / ms('sft_B'),
      'flaxllm_dpo_stored_over_sft_2B': ms('dpo_stored') / ms('sft_2B'),
      'flaxllm_lora_dpo_over_lora_sft_2B': ms('lora_dpo') / ms('lora_sft_2B'),
      'flaxllm_lora_dpo_over_dpo': ms('lora_dpo') / ms('dpo'),
      'trl_dpo_over_torch_sft_2B': ms('trl_dpo') / ms('torch_sft_2B'),
      'trl_dpo_over_torch_sft_B': ms('trl_dpo') / ms('torch_sft_B'),
      'torch_dpo_over_torch_sft_2B': ms('torch_dpo') / ms('torch_sft_2B'),
      'flaxllm_over_torch_sft_2B': ms('sft_2B') / ms('torch_sft_2B'),
      'flaxllm_dpo_over_trl_dpo': ms('dpo') / ms('trl_dpo'),
      # SFT step + one forward over the same rows, over the SFT step: DPO's floor
      'flaxllm_expected_dpo_over_sft_2B': (ms('sft_2B') + ms('fwd_2B')) / ms('sft_2B'),
      'torch_expected_dpo_over_sft_2B': (ms('torch_sft_2B') + ms('torch_fwd_2B'))
                                        / ms('torch_sft_2B'),
      'flaxllm_sft_2B_over_fwd_2B': ms('sft_2B') / ms('fwd_2B'),
      'torch_sft_2B_over_fwd_2B': ms('torch_sft_2B') / ms('torch_fwd_2B'),
  }
  for name, st in steps.items():
    print(f'  {name:14s} {st["ms"]:8.1f} ms/step (cpu {st["cpu_ms"]:.1f} ms)', flush=True)
  return {'pairs': b, 'seq': s, 'rows': stats, 'steps': steps, 'ratios': ratios,
          'param_count': int(sum(x.size for x in jax.tree.leaves(params))),
          'init_logps_max_abs_diff_flaxllm_vs_torch': float(np.max(np.abs(t_logps - f_logps))),
          'init_logps_mean': float(np.mean(f_logps))}


# ----------------------------------------------------------------------------- (b) GRPO split

def grpo_split(args, tmp) -> dict:
  import jax

  from flaxllm import parallel
  from flaxllm.data.tokenizer import ByteTokenizer
  from flaxllm.objectives import base
  from flaxllm.train import trainer

  prompts = os.path.join(tmp, 'prompts.jsonl')
  write_prompts(prompts)
  g, n_prompts = args.group, args.prompts
  prompt_len, completion_len = 32, args.completion
  seq = prompt_len + completion_len - 1          # a rollout row: prompt + completion - 1
  config = make_config('grpo', g * n_prompts, seq, '--config.data.source=jsonl',
                       f'--config.data.path={prompts}', '--config.data.val_fraction=0.0',
                       f'--config.grpo.group_size={g}',
                       f'--config.grpo.max_prompt_len={prompt_len}',
                       f'--config.grpo.reward_funcs={REWARD}',
                       f'--config.grpo.num_iterations={args.grpo_iterations}')
  programs = trainer.build_programs(config, parallel.make_mesh(config.mesh, jax.devices()[:1]))
  objective, sampler = programs.objective, programs.objective.sampler
  assert sampler.completion_len == completion_len, sampler.completion_len
  times: dict[str, list] = {}

  def timed(name, fn, block=False):
    def wrapped(*a, **kw):
      t0 = time.perf_counter()
      out = fn(*a, **kw)
      if block:
        out = jax.block_until_ready(out)
      times.setdefault(name, []).append(time.perf_counter() - t0)
      return out
    return wrapped

  # Timers on the instance: the hook below is the objective's own, unchanged.
  sampler.rollout = timed('rollout', sampler.rollout)
  sampler.score = timed('reward_scoring', sampler.score)
  sampler.__dict__['token_logps'] = timed('old_logps', sampler.token_logps, block=True)

  tokenizer = ByteTokenizer()
  it = objective.data_iterator(tokenizer, 'train', seq_len=seq, batch_size=g * n_prompts, seed=0)
  hook = objective.batch_hook(tokenizer, slice(None))
  key = jax.random.PRNGKey(0)
  trainable, frozen = programs.split(programs.init_params(key), key)
  holder = {'state': programs.init(trainable, key)}
  rows = []
  for step in range(args.grpo_warmup + args.grpo_steps):
    host_batch = next(it)
    state = holder['state']
    policy = base.Policy(state.params, frozen, lambda: programs.plain_params(state.params,
                                                                             frozen))
    t0 = time.perf_counter()
    batch = hook(step, host_batch, policy)
    t1 = time.perf_counter()
    holder['state'], metrics = programs.train_step(
        state, parallel.shard_batch(batch, programs.mesh, programs.rules), frozen)
    metrics = jax.device_get(metrics)
    t2 = time.perf_counter()
    if step >= args.grpo_warmup:
      rows.append({'hook': t1 - t0, 'train_step': t2 - t1, 'rollout': times['rollout'][-1],
                   'reward_scoring': times['reward_scoring'][-1],
                   'old_logps': times['old_logps'][-1] if 'old_logps' in times else 0.0,
                   'reward': float(metrics['reward']),
                   'completion_length': float(metrics['completion_length'])})
      print(f'  step {step}: hook {1e3 * (t1 - t0):.0f} ms (rollout '
            f'{1e3 * rows[-1]["rollout"]:.0f}, old log-probs {1e3 * rows[-1]["old_logps"]:.0f})'
            f', train step {1e3 * (t2 - t1):.0f} ms', flush=True)
  it.close()
  med = lambda k: 1e3 * statistics.median(r[k] for r in rows)
  phases = {
      'generation': statistics.median(1e3 * (r['rollout'] - r['reward_scoring']) for r in rows),
      'reward_scoring': med('reward_scoring'), 'old_logps': med('old_logps'),
      'hook_other': statistics.median(1e3 * (r['hook'] - r['rollout'] - r['old_logps'])
                                      for r in rows),
      'hook_total': med('hook'), 'train_step': med('train_step'),
      'step_total': statistics.median(1e3 * (r['hook'] + r['train_step']) for r in rows)}
  gen_tokens = g * n_prompts * statistics.mean(r['completion_length'] for r in rows)
  return {'group_size': g, 'prompts': n_prompts, 'completions': g * n_prompts,
          'prompt_len': prompt_len, 'completion_len': completion_len, 'seq_len': seq,
          'loss_type': config.grpo.loss_type, 'beta': config.grpo.beta,
          'temperature': config.grpo.temperature, 'reward': REWARD,
          'num_iterations': args.grpo_iterations, 'steps': args.grpo_steps,
          'warmup': args.grpo_warmup, 'phases_ms': phases,
          'generated_tokens_per_step': gen_tokens,
          'generation_tokens_per_s': gen_tokens / (phases['generation'] / 1e3),
          'per_step': rows}


# ----------------------------------------------------------------------------- report

def markdown(r) -> str:
  m, a, g = r['machine'], r['dpo'], r['grpo']
  st, ra = a['steps'], a['ratios']
  row = lambda label, name, base: (
      f'| {label} | {st[name]["ms"]:.0f} | {st[name]["cpu_ms"]:.0f} | '
      f'{st[name]["ms"] / st[base]["ms"]:.2f} | {st[name]["ms"] / st[base.replace("2B", "B")]["ms"]:.2f} |')
  p = g['phases_ms']
  share = lambda k: 100 * p[k] / p['step_total']
  lines = [
      '# Alignment objectives: DPO over SFT, GRPO rollout vs train step (CPU)', '',
      f'`{r["command"]}` on {r["date"]}. Machine: {m["cpu"]} ({m["platform"]}), '
      f'{m["cores"]} cores, pinned to {len(m["cpus_used"])} (torch threads '
      f'{m["torch_threads"]}); 1/5/15-min load average {fmt_load(r["load_avg_before"])} before '
      f'and {fmt_load(r["load_avg_after"])} after (other jobs on the machine included); jax '
      f'{m["jax"]}, torch {m["torch"]}, transformers {m["transformers"]}, trl {m["trl"]}. '
      'Set-up: see the docstring of `bench/align_speed.py`.', '',
      f'Model: random-init LLaMA, {a["param_count"] / 1e6:.2f}M params (4 layers, d_model 128, '
      '4 heads, SwiGLU 352, vocabulary 4096), float32, no remat; AdamW + clipping at 1.0.', '',
      f'## (a) DPO step over SFT step: {a["pairs"]} pairs, rows of {a["seq"]} tokens', '',
      f'Rows hold {a["rows"]["real_tokens_per_row"]:.0f} real tokens on average, '
      f'{a["rows"]["response_tokens_per_row"]:.0f} of them response (loss) tokens. Median of '
      f'{r["reps"]} steps per variant after {r["warmup"]} warm-up steps, all variants in turns '
      '(round-robin). "over SFT" compares with the same framework\'s SFT step (LoRA rows: with '
      'the LoRA SFT step).', '',
      '| step | ms/step | CPU ms/step | over SFT 2B rows | over SFT B rows |',
      '|---|---:|---:|---:|---:|',
      row('flaxllm SFT, B = 8 chosen rows', 'sft_B', 'sft_2B'),
      row('flaxllm SFT, 2B = 16 rows (chosen + rejected)', 'sft_2B', 'sft_2B'),
      row('**flaxllm DPO**, frozen-copy reference', 'dpo', 'sft_2B'),
      row('flaxllm DPO, stored reference log-probs', 'dpo_stored', 'sft_2B'),
      f'| flaxllm LoRA SFT, 2B rows | {st["lora_sft_2B"]["ms"]:.0f} | '
      f'{st["lora_sft_2B"]["cpu_ms"]:.0f} | 1.00 | |',
      f'| flaxllm LoRA DPO, adapters-off reference | {st["lora_dpo"]["ms"]:.0f} | '
      f'{st["lora_dpo"]["cpu_ms"]:.0f} | {ra["flaxllm_lora_dpo_over_lora_sft_2B"]:.2f} | |',
      row('torch SFT, B rows', 'torch_sft_B', 'torch_sft_2B'),
      row('torch SFT, 2B rows', 'torch_sft_2B', 'torch_sft_2B'),
      row('**TRL DPOTrainer** step (frozen reference model)', 'trl_dpo', 'torch_sft_2B'),
      row('plain-torch DPO (full logits)', 'torch_dpo', 'torch_sft_2B'),
      row('flaxllm forward only (SFT loss, 2B rows, no gradient)', 'fwd_2B', 'sft_2B'),
      row('torch forward only (2B rows, no gradient)', 'torch_fwd_2B', 'torch_sft_2B'), '',
      f'**Headline: DPO / SFT on the same 2B rows = {ra["flaxllm_dpo_over_sft_2B"]:.2f}x in '
      f'flaxllm, {ra["trl_dpo_over_torch_sft_2B"]:.2f}x in TRL/PyTorch** (over SFT on the B '
      f'chosen rows: {ra["flaxllm_dpo_over_sft_B"]:.2f}x vs {ra["trl_dpo_over_torch_sft_B"]:.2f}x). '
      f'Absolute: flaxllm DPO {st["dpo"]["ms"]:.0f} ms vs TRL {st["trl_dpo"]["ms"]:.0f} ms per '
      f'step ({ra["flaxllm_dpo_over_trl_dpo"]:.2f}x the time); SFT on 2B rows '
      f'{st["sft_2B"]["ms"]:.0f} ms vs {st["torch_sft_2B"]["ms"]:.0f} ms.', '',
      'Reading: DPO runs the policy\'s forward + backward over the same 2B rows as SFT on 2B '
      'rows, plus one reference forward without gradient, so its floor is (SFT step + forward) '
      f'/ SFT step = {ra["flaxllm_expected_dpo_over_sft_2B"]:.2f}x for flaxllm and '
      f'{ra["torch_expected_dpo_over_sft_2B"]:.2f}x for torch, from the forward-only rows '
      f'above. That floor is low for flaxllm because its SFT step is '
      f'{ra["flaxllm_sft_2B_over_fwd_2B"]:.1f}x its forward on this CPU (torch: '
      f'{ra["torch_sft_2B_over_fwd_2B"]:.1f}x): the backward pass dominates, and the reference '
      'forward is cheap next to it. The stored-log-probs mode removes the reference forward; '
      'LoRA removes most of the weight gradients and the optimizer update. TRL computes the '
      'policy\'s and the reference\'s log-probs with its fused LM head (tiles over the '
      'completion positions only) and keeps per-step metrics; the plain-torch DPO row is the '
      'same loss with full logits. flaxllm runs the head over all positions (at seq 128 = '
      '`dpo.chunk_size` in one piece, no checkpointing) in float32.', '',
      f'Check of the inputs: at the start, the summed response log-probs of the 16 rows agree '
      f'between flaxllm and the torch twin to {a["init_logps_max_abs_diff_flaxllm_vs_torch"]:.1e}'
      f' (mean {a["init_logps_mean"]:.1f}); first DPO losses: flaxllm '
      f'{st["dpo"]["first_loss"]:.4f}, TRL {st["trl_dpo"]["first_loss"]:.4f} (log 2 = 0.6931).',
      '',
      '## (b) GRPO step: rollout on the host vs the compiled train step', '',
      f'{g["prompts"]} prompts x {g["group_size"]} completions = {g["completions"]} rows of '
      f'{g["seq_len"]} tokens (prompts left-padded to {g["prompt_len"]}, completions up to '
      f'{g["completion_len"]} tokens, mean length {g["generated_tokens_per_step"] / g["completions"]:.1f}; '
      f'temperature {g["temperature"]}); reward `{g["reward"]}`; loss {g["loss_type"]}, beta '
      f'{g["beta"]} (no reference model), {g["num_iterations"]} optimiser pass(es) (mu; with one '
      'pass the hook computes no old log-probs). Median over {g["steps"]} steps '
      f'after {g["warmup"]} warm-up steps; each step = the objective\'s batch hook + the train '
      'step, as in the trainer.', '',
      '| phase | ms/step | share of the step |', '|---|---:|---:|',
      f'| generation (prefill + KV-cache sampling, detokenise, rows) | {p["generation"]:.0f} | '
      f'{share("generation"):.0f}% |',
      f'| reward scoring (`true_rewards`, host Python) | {p["reward_scoring"]:.1f} | '
      f'{share("reward_scoring"):.1f}% |',
      f'| old log-probs (`sampler.token_logps`, a jitted forward) | {p["old_logps"]:.0f} | '
      f'{share("old_logps"):.0f}% |',
      f'| rest of the hook (advantages, host copies) | {p["hook_other"]:.1f} | '
      f'{share("hook_other"):.1f}% |',
      f'| **rollout total (the batch hook)** | {p["hook_total"]:.0f} | '
      f'{share("hook_total"):.0f}% |',
      f'| **train step** (compiled; forward + backward + AdamW) | {p["train_step"]:.0f} | '
      f'{share("train_step"):.0f}% |',
      f'| step total | {p["step_total"]:.0f} | 100% |', '',
      f'Generation: {g["generated_tokens_per_step"]:.0f} tokens per step, '
      f'{g["generation_tokens_per_s"]:.0f} tokens/s. The phases are medians of their own, so '
      'they need not add up exactly.']
  return '\n'.join(lines) + '\n'


def fmt_load(load) -> str:
  return '/'.join(f'{x:.2f}' for x in load)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--reps', type=int, default=20, help='timed steps per DPO/SFT variant')
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--pairs', type=int, default=8)
  p.add_argument('--seq', type=int, default=128)
  p.add_argument('--group', type=int, default=8)
  p.add_argument('--prompts', type=int, default=8)
  p.add_argument('--completion', type=int, default=64)
  p.add_argument('--grpo-steps', type=int, default=10)
  p.add_argument('--grpo-iterations', type=int, default=1, help='GRPO mu (optimiser passes)')
  p.add_argument('--grpo-warmup', type=int, default=2)
  p.add_argument('--cpus', type=int, default=1, help='pin to the first N cpus (0: all)')
  p.add_argument('--out', default=os.path.join(RESULTS, 'align_speed_cpu'),
                 help='results path without extension ("" = do not write)')
  args = p.parse_args(argv)
  argv = sys.argv[1:] if argv is None else list(argv)
  if os.path.abspath(os.getcwd()) != ROOT:
    sys.exit(f'run from the repository root ({ROOT}): the GRPO reward {REWARD} is imported '
             'from the working directory')
  os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')   # see bench/model_speed.py
  os.environ.setdefault('HF_HUB_OFFLINE', '1')          # nothing is downloaded
  if args.cpus:
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.cpus])
  import torch   # after pinning: both thread pools see the same cpus
  import trl

  import model_speed
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  torch.manual_seed(0)
  load_before = os.getloadavg()
  with tempfile.TemporaryDirectory() as tmp:
    print('(a) DPO vs SFT', flush=True)
    dpo = dpo_vs_sft(args, tmp)
    print('(b) GRPO rollout vs train step', flush=True)
    grpo = grpo_split(args, tmp)
  info = model_speed.machine_info()
  info.update(platform=platform.platform(), trl=trl.__version__)
  result = dict(benchmark='align_speed', date=info['date'][:10], machine=info,
                load_avg_before=load_before, load_avg_after=os.getloadavg(), reps=args.reps,
                warmup=args.warmup, model=MODEL, dpo=dpo, grpo=grpo,
                command=shlex.join(['.venv/bin/python', 'bench/align_speed.py'] + argv))
  model_speed.write_results(args.out, result, markdown(result))
  return result


if __name__ == '__main__':
  main()
