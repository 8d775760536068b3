"""Training speed of the default config (`configs/default.py`) on CPU: flaxllm's train step
vs a Hugging Face transformers `LlamaForCausalLM` PyTorch step, plus tokens/s and MFU.

    .venv/bin/python bench/train_speed.py       # writes bench/results/train_speed_cpu.{json,md}
    .venv/bin/python bench/train_speed.py --reps 2 --steps 2 --out ''   # quick look

Both frameworks train the same model (config.model of configs/default.py, float32, the same
initial weights copied into torch), on the same [batch, seq_len] batch, with the same optimizer:
AdamW (b1 0.9, b2 0.95, eps 1e-8, weight decay 0.1 except norms and embeddings), global-norm
clipping at 1.0 and a per-token mean cross-entropy.

- flaxllm: the trainer's own jitted `train_step` (`flaxllm.train.trainer.build_programs`),
  state donated, metrics included.
- torch: logits = model(inputs); F.cross_entropy; backward; clip_grad_norm_; AdamW.step;
  zero_grad.
Both forward passes (with the loss, no gradients) are timed too, to split the step into
forward and backward + update.

The two are timed alternately in one process (a rep of `--steps` steps each, after an untimed
rep of the same framework), so load from other processes hits both alike; the figures are
medians over `--reps`, with the per-repetition ratios (the two back to back) beside them. MFU = training FLOPs per token
(`flaxllm.models.flops_per_token`: 6N + attention) x tokens/s / peak, with the peak measured in
the same run as the best float32 [1024 x 1024] matmul FLOP/s of this CPU under XLA.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys

import numpy as np

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, ROOT)
sys.path.insert(0, BENCH)
RESULTS = os.path.join(BENCH, 'results')


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--config', default=os.path.join(ROOT, 'configs', 'default.py'))
  p.add_argument('--reps', type=int, default=5)
  p.add_argument('--steps', type=int, default=3, help='train steps per timed repetition')
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--attn', default='sdpa', choices=('sdpa', 'eager'))
  p.add_argument('--out', default=os.path.join(RESULTS, 'train_speed_cpu'),
                 help='results path without extension ("" = do not write)')
  p.add_argument('--omp-wait-policy', default='PASSIVE', choices=('PASSIVE', 'ACTIVE', ''),
                 help='OMP_WAIT_POLICY for torch (see bench/model_speed.py)')
  args = p.parse_args(argv)
  argv = sys.argv[1:] if argv is None else list(argv)
  if args.omp_wait_policy:
    os.environ.setdefault('OMP_WAIT_POLICY', args.omp_wait_policy)

  import jax
  import torch
  import torch.nn.functional as F

  from flaxllm import config as config_lib
  from flaxllm import models
  from flaxllm.train import metrics as metrics_lib
  from flaxllm.objectives import lm
  from flaxllm.train import trainer
  import model_speed  # bench/model_speed.py: the torch twin of a flaxllm LLaMA, machine info

  torch.set_num_threads(len(os.sched_getaffinity(0)))
  torch.manual_seed(0)
  load_before = os.getloadavg()[0]
  config = config_lib.load_config(args.config)
  programs = trainer.build_programs(config)
  cfg = programs.model_cfg
  programs_model = models.build(cfg)
  batch, seq = config.batch_size, config.seq_len
  peak = [metrics_lib.measure_peak_flops('float32')]

  # ---------------------------------------------------------------- the same model and batch
  key = jax.random.PRNGKey(config.seed)
  full = programs.init_params(key)
  params = jax.device_get(full)
  state = programs.init(programs.split(full, key)[0], key)  # full fine-tuning: all params
  n_params = int(sum(x.size for x in jax.tree.leaves(params)))
  tmodel = model_speed.torch_model(cfg, params, args.attn).train()
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, cfg.vocab_size, (batch, seq + 1), dtype=np.int32)
  jbatch = model_speed.train_batch(tokens)
  t_in = torch.from_numpy(tokens[:, :-1].astype(np.int64))
  t_tg = torch.from_numpy(tokens[:, 1:].astype(np.int64))
  no_decay = [p for n, p in tmodel.named_parameters() if 'norm' in n or 'embed' in n]
  decay = [p for n, p in tmodel.named_parameters() if not ('norm' in n or 'embed' in n)]
  o = config.optim
  topt = torch.optim.AdamW([{'params': decay, 'weight_decay': o.weight_decay},
                            {'params': no_decay, 'weight_decay': 0.0}],
                           lr=o.lr, betas=(o.b1, o.b2), eps=o.eps)

  holder = {'state': state}
  losses = {'flaxllm': [], 'torch': []}

  def flax_steps():
    s = holder['state']
    for _ in range(args.steps):
      s, m = programs.train_step(s, jbatch, {})
    holder['state'] = s
    losses['flaxllm'].append(float(m['loss']))  # blocks until done

  def torch_steps():
    for _ in range(args.steps):
      logits = tmodel(input_ids=t_in, use_cache=False).logits
      loss = F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), t_tg.reshape(-1))
      loss.backward()
      torch.nn.utils.clip_grad_norm_(tmodel.parameters(), o.grad_clip)
      topt.step()
      topt.zero_grad(set_to_none=True)
    losses['torch'].append(float(loss.detach()))

  # The forward pass alone (loss, no gradients), to tell forward and backward apart.
  flax_loss = jax.jit(lambda p, b: lm.lm_loss(programs_model)(p, {}, b)[0])

  def flax_forward():
    for _ in range(args.steps):
      out = flax_loss(holder['state'].params['model'], jbatch)
    float(out)

  def torch_forward():
    with torch.no_grad():
      for _ in range(args.steps):
        logits = tmodel(input_ids=t_in, use_cache=False).logits
        out = F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), t_tg.reshape(-1))
    float(out)

  for _ in range(args.warmup):
    flax_steps()
    torch_steps()
    flax_forward()
    torch_forward()
  ntok = batch * seq * args.steps
  result = model_speed.measure(flax_steps, torch_steps, args.reps, ntok)
  forward = model_speed.measure(flax_forward, torch_forward, args.reps, ntok)
  result['forward'] = {k: forward[k] for k in ('flaxllm_s', 'torch_s', 'flaxllm_cpu_s',
                                                 'torch_cpu_s', 'speedup', 'cpu_time_ratio')}
  result['backward_and_update'] = {  # step time minus forward time
      'flaxllm_s': result['flaxllm_s'] - forward['flaxllm_s'],
      'torch_s': result['torch_s'] - forward['torch_s']}
  result['backward_and_update']['speedup'] = (result['backward_and_update']['torch_s'] /
                                              result['backward_and_update']['flaxllm_s'])
  peak.append(metrics_lib.measure_peak_flops('float32'))
  peak_flops = max(peak)
  flops_tok = models.flops_per_token(cfg, seq)
  for name in ('flaxllm', 'torch'):
    result[f'{name}_mfu'] = result[f'{name}_tok_s'] * flops_tok / peak_flops
  info = model_speed.machine_info()
  info['load_avg_1min_before'] = load_before
  info['load_avg_1min_after'] = os.getloadavg()[0]
  out = dict(benchmark='train_speed', device='cpu', machine=info, config=args.config,
             model=dict(cfg.to_dict(), param_count=n_params), batch=batch, seq_len=seq,
             steps_per_rep=args.steps, reps=args.reps, warmup=args.warmup,
             torch_attention=args.attn, flops_per_token=flops_tok,
             peak_flops_measured=peak, peak_flops=peak_flops,
             first_losses={k: v[:1] for k, v in losses.items()}, **result,
             command=shlex.join(['.venv/bin/python', 'bench/train_speed.py'] + argv))
  model_speed.write_results(args.out, out, markdown(out))
  return out


def markdown(r):
  m, cfg = r['machine'], r['model']
  return '\n'.join([
      '# Training speed, CPU: flaxllm train step vs transformers (PyTorch)',
      '',
      f"Model: `{os.path.relpath(r['config'], ROOT)}`, LLaMA {cfg['param_count'] / 1e6:.1f}M params "
      f"({cfg['num_layers']} layers, d_model {cfg['d_model']}, {cfg['num_heads']} heads, mlp "
      f"{cfg['mlp_dim']}, vocab {cfg['vocab_size']}), float32; batch {r['batch']} x seq "
      f"{r['seq_len']}; AdamW + clipping in both; the same initial weights. torch attention: "
      f"{r['torch_attention']}.",
      f"Machine: {m['cpu']}, {m['cores']} cores (torch threads {m['torch_threads']}; 1-min load "
      f"average {m['load_avg_1min_before']:.1f} before, {m['load_avg_1min_after']:.1f} after, "
      f"other processes included); jax {m['jax']}, flax {m['flax']}, torch {m['torch']}, "
      f"transformers {m['transformers']}; {m['date']}. OMP_WAIT_POLICY="
      f"{m['omp_wait_policy'] or '(default)'}.",
      f"Median of {r['reps']} repetitions of {r['steps_per_rep']} steps after {r['warmup']} "
      'warm-up repetitions, the two frameworks timed alternately in one process, each timed '
      'repetition after an untimed one of the same framework.',
      '',
      '| | tokens/s | step time | MFU |',
      '|---|---:|---:|---:|',
      f"| flaxllm | {r['flaxllm_tok_s']:.0f} | {r['flaxllm_s'] / r['steps_per_rep']:.3f} s | "
      f"{r['flaxllm_mfu']:.1%} |",
      f"| transformers (PyTorch) | {r['torch_tok_s']:.0f} | "
      f"{r['torch_s'] / r['steps_per_rep']:.3f} s | {r['torch_mfu']:.1%} |",
      '',
      f"flaxllm / torch tokens/s: **{r['speedup']:.2f}x**; per repetition (the two back to back) "
      f"median {r['speedup_paired']['median']:.2f}x, range {r['speedup_paired']['min']:.2f}-"
      f"{r['speedup_paired']['max']:.2f}x; process CPU time torch / flaxllm: "
      f"{r['cpu_time_ratio']:.2f}x (less sensitive to other load).",
      f"Where the time goes (torch time / flaxllm time, same reps): forward pass with loss "
      f"{r['forward']['speedup']:.2f}x ({r['forward']['flaxllm_s'] / r['steps_per_rep']:.3f} s "
      f"vs {r['forward']['torch_s'] / r['steps_per_rep']:.3f} s per step); backward + update "
      f"(step minus forward) {r['backward_and_update']['speedup']:.2f}x "
      f"({r['backward_and_update']['flaxllm_s'] / r['steps_per_rep']:.3f} s vs "
      f"{r['backward_and_update']['torch_s'] / r['steps_per_rep']:.3f} s).",
      f"MFU: training FLOPs per token {r['flops_per_token'] / 1e6:.1f} MFLOP (6N + attention) "
      f"against this CPU's measured float32 matmul peak {r['peak_flops'] / 1e9:.1f} GFLOP/s "
      f"(best of {len(r['peak_flops_measured'])} measurements in this run).",
      '',
      f"Reproduce: `{r['command'].strip()}`",
      '',
  ])


if __name__ == '__main__':
  main()
