"""flaxllm vs Hugging Face transformers (PyTorch) on CPU: forward tokens/s and KV-cache decoding
tokens/s of the same random-init LLaMA (~33M parameters), float32, same weights.

    .venv/bin/python bench/model_speed.py            # writes bench/results/model_speed_cpu.{json,md}
    .venv/bin/python bench/model_speed.py --reps 3 --batch 2 --seq 64 --prompt 16 --new 16  # quick

Both frameworks run in one process and are timed alternately (flaxllm rep, torch rep, ...), so
load from other processes on the machine hits both alike; each number is the median of `--reps`
timed repetitions after warm-up (which includes the jit compilation for flaxllm).

- forward: logits of [batch, seq] tokens (all positions, as a training/scoring forward);
  flaxllm `jax.jit(model.apply)` vs `LlamaForCausalLM(...)` under `torch.inference_mode()`.
- decode: greedy generation of `--new` tokens after a `--prompt`-token prompt, with the KV cache;
  `flaxllm.generate.generate_tokens` (prefill + `lax.while_loop`, one jitted call) vs
  `model.generate(do_sample=False, min_new_tokens=new, max_new_tokens=new)`. tokens/s counts
  generated tokens (batch * new), prefill included in the time.
The weights of the flaxllm model are copied into the torch model; the script checks that the
logits agree and reports how many greedy tokens agree.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')


def model_config(args):
  from flaxllm import models
  return models.ModelConfig(vocab_size=args.vocab, d_model=args.d_model, num_layers=args.layers,
                            num_heads=args.heads, mlp_dim=args.mlp, max_seq_len=1024,
                            norm_eps=1e-5, dtype='float32', param_dtype='float32')


def torch_model(cfg, params, attn_impl):
  """LlamaForCausalLM with the same config and the flaxllm weights copied in."""
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM
  hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
                       intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.num_layers,
                       num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.kv_heads,
                       head_dim=cfg.dim_per_head, max_position_embeddings=cfg.max_seq_len,
                       rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
                       tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
                       torch_dtype='float32', pad_token_id=0, bos_token_id=1, eos_token_id=2)
  hf_cfg._attn_implementation = attn_impl  # pylint: disable=protected-access
  model = LlamaForCausalLM(hf_cfg).eval()
  t = lambda x: torch.from_numpy(np.array(x, np.float32, copy=True))  # noqa: E731
  d = cfg.d_model
  sd = {'model.embed_tokens.weight': t(params['embed']['embedding']),
        'model.norm.weight': t(params['decoder']['final_norm']['scale']),
        'lm_head.weight': t(np.asarray(params['lm_head']['kernel']).T)}
  for i in range(cfg.num_layers):
    lp = params['decoder'][f'layers_{i}']
    pre = f'model.layers.{i}.'
    for name in ('q_proj', 'k_proj', 'v_proj'):
      sd[pre + f'self_attn.{name}.weight'] = t(np.asarray(lp['attn'][name]['kernel'])
                                               .reshape(d, -1).T)
    sd[pre + 'self_attn.o_proj.weight'] = t(np.asarray(lp['attn']['o_proj']['kernel'])
                                            .reshape(-1, d).T)
    for name in ('gate_proj', 'up_proj', 'down_proj'):
      sd[pre + f'mlp.{name}.weight'] = t(np.asarray(lp['mlp'][name]['kernel']).T)
    sd[pre + 'input_layernorm.weight'] = t(lp['attn_norm']['scale'])
    sd[pre + 'post_attention_layernorm.weight'] = t(lp['mlp_norm']['scale'])
  missing, unexpected = model.load_state_dict(sd, strict=False)
  missing = [k for k in missing if 'rotary' not in k]
  if missing or unexpected:
    raise RuntimeError(f'weight copy: missing {missing}, unexpected {unexpected}')
  return model


def timed(fn):
  """(wall seconds, process CPU seconds: all threads) of one call."""
  wall, cpu = time.perf_counter(), time.process_time()
  fn()
  return time.perf_counter() - wall, time.process_time() - cpu


def measure(flax_fn, torch_fn, reps, ntok):
  """Alternating timed repetitions; medians, tokens/s and flaxllm/torch ratios. Each timed call
  follows an untimed call of the same framework, so that neither pays for waking its thread
  pool and refilling the caches after the other one ran (measured here: XLA's step after a
  torch step was up to 1.6x slower, torch's after XLA's up to 1.1x)."""
  runs = {'flaxllm': [], 'torch': []}
  for _ in range(reps):
    flax_fn()
    runs['flaxllm'].append(timed(flax_fn))
    torch_fn()
    runs['torch'].append(timed(torch_fn))
  out = {}
  for name, times in runs.items():
    out[f'{name}_s'] = statistics.median(t[0] for t in times)
    out[f'{name}_cpu_s'] = statistics.median(t[1] for t in times)
    out[f'{name}_times_s'] = [round(t[0], 4) for t in times]
    out[f'{name}_tok_s'] = ntok / out[f'{name}_s']
  out['speedup'] = out['flaxllm_tok_s'] / out['torch_tok_s']
  out['cpu_time_ratio'] = out['torch_cpu_s'] / out['flaxllm_cpu_s']
  # Each rep's torch / flaxllm time, the two timed back to back: the machine's speed drifts by
  # up to 2x over minutes here, which the ratio of two medians does not cancel.
  paired = sorted(t[0] / f[0] for f, t in zip(runs['flaxllm'], runs['torch']))
  out['speedup_paired'] = {'median': statistics.median(paired), 'min': paired[0],
                           'max': paired[-1]}
  return out


def machine_info():
  cpu = platform.processor() or 'unknown'
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          cpu = line.split(':', 1)[1].strip()
          break
  except OSError:
    pass
  import flax
  import jax
  import torch
  import transformers
  return dict(cpu=cpu, cores=os.cpu_count(), cpus_used=sorted(os.sched_getaffinity(0)),
              torch_threads=torch.get_num_threads(),
              jax=jax.__version__, flax=flax.__version__, torch=torch.__version__,
              transformers=transformers.__version__, python=platform.python_version(),
              jax_backend=jax.default_backend(), xla_flags=os.environ.get('XLA_FLAGS', ''),
              omp_wait_policy=os.environ.get('OMP_WAIT_POLICY', ''),
              date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--vocab', type=int, default=8000)
  p.add_argument('--d-model', type=int, default=512)
  p.add_argument('--layers', type=int, default=8)
  p.add_argument('--heads', type=int, default=8)
  p.add_argument('--mlp', type=int, default=1376)
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--seq', type=int, default=256)
  p.add_argument('--prompt', type=int, default=64)
  p.add_argument('--new', type=int, default=128)
  p.add_argument('--reps', type=int, default=5)
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--attn', default='sdpa', choices=('sdpa', 'eager'),
                 help='transformers attention implementation')
  p.add_argument('--out', default=os.path.join(RESULTS, 'model_speed_cpu'),
                 help='results path without extension ("" = do not write)')
  p.add_argument('--cpus', type=int, default=None,
                 help='pin the process to the first N cpus and use N torch threads '
                      '(default: all cpus); XLA sizes its thread pool from the affinity')
  p.add_argument('--omp-wait-policy', default='PASSIVE', choices=('PASSIVE', 'ACTIVE', ''),
                 help="OMP_WAIT_POLICY for torch's OpenMP pool (if not already set). PASSIVE "
                      'keeps torch from collapsing when other processes load the cpus (its '
                      'spinning threads then wait on each other); "" = the OpenMP default')
  args = p.parse_args(argv)
  argv = sys.argv[1:] if argv is None else list(argv)
  if args.omp_wait_policy and 'torch' not in sys.modules:
    os.environ.setdefault('OMP_WAIT_POLICY', args.omp_wait_policy)

  if args.cpus:
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.cpus])
  # Imported after pinning, so both thread pools see the same cpus.
  import jax
  import jax.numpy as jnp
  import torch

  from flaxllm import generate as G
  from flaxllm import models
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  torch.manual_seed(0)
  load_before = os.getloadavg()[0]
  cfg = model_config(args)
  full = models.build(cfg)
  params = models.init_params(full, jax.random.key(0))
  n_params = int(sum(x.size for x in jax.tree.leaves(params)))
  tmodel = torch_model(cfg, params, args.attn)
  info = machine_info()
  print(f'model: {n_params / 1e6:.1f}M params ({cfg.num_layers} layers, d_model {cfg.d_model}, '
        f'{cfg.num_heads} heads, mlp {cfg.mlp_dim}, vocab {cfg.vocab_size}), float32')
  print(f"machine: {info['cpu']}, {info['cores']} cores; jax {info['jax']}, torch "
        f"{info['torch']} ({info['torch_threads']} threads), transformers "
        f"{info['transformers']}", flush=True)

  rng = np.random.default_rng(0)
  # ---------------------------------------------------------------- forward
  tokens_np = rng.integers(3, cfg.vocab_size, (args.batch, args.seq), dtype=np.int32)
  tokens_jx = jnp.asarray(tokens_np)
  tokens_pt = torch.from_numpy(tokens_np.astype(np.int64))
  fwd = jax.jit(lambda p, t: full.apply({'params': p}, t))

  def flax_forward():
    return fwd(params, tokens_jx).block_until_ready()

  def torch_forward():
    with torch.inference_mode():
      return tmodel(input_ids=tokens_pt, use_cache=False).logits

  for _ in range(args.warmup):
    flax_forward()
    torch_forward()
  diff = float(np.max(np.abs(np.asarray(flax_forward()) - torch_forward().numpy())))
  ntok = args.batch * args.seq
  forward = dict(batch=args.batch, seq=args.seq, tokens=ntok, max_abs_logit_diff=diff,
                 **measure(flax_forward, torch_forward, args.reps, ntok))
  print(f"forward  flaxllm {forward['flaxllm_tok_s']:9.0f} tok/s  torch "
        f"{forward['torch_tok_s']:9.0f} tok/s  ratio {forward['speedup']:.2f}x  cpu-time ratio "
        f"{forward['cpu_time_ratio']:.2f}x  "
        f"(max |logit diff| {diff:.1e})", flush=True)

  # ---------------------------------------------------------------- decode
  prompt_np = rng.integers(3, cfg.vocab_size, (args.batch, args.prompt), dtype=np.int32)
  prompt_jx = jnp.asarray(prompt_np)
  mask_jx = jnp.ones_like(prompt_jx, dtype=bool)
  prompt_pt = torch.from_numpy(prompt_np.astype(np.int64))
  dec = G.decode_model(cfg)

  def flax_decode():
    out = G.generate_tokens(dec, params, prompt_jx, mask_jx, max_new_tokens=args.new)
    return out.tokens.block_until_ready()

  def torch_decode():
    with torch.inference_mode():
      out = tmodel.generate(input_ids=prompt_pt, attention_mask=torch.ones_like(prompt_pt),
                            do_sample=False, max_new_tokens=args.new, min_new_tokens=args.new,
                            pad_token_id=0, use_cache=True)
    return out[:, args.prompt:]

  for _ in range(args.warmup):
    flax_decode()
    torch_decode()
  f_out, t_out = np.asarray(flax_decode()), torch_decode().numpy()
  assert f_out.shape == t_out.shape == (args.batch, args.new), (f_out.shape, t_out.shape)
  agree = float(np.mean(np.cumprod(f_out == t_out, axis=1)))  # common greedy prefix fraction
  ntok = args.batch * args.new
  decode = dict(batch=args.batch, prompt=args.prompt, new_tokens=args.new, tokens=ntok,
                greedy_prefix_agreement=agree,
                **measure(flax_decode, torch_decode, args.reps, ntok))
  print(f"decode   flaxllm {decode['flaxllm_tok_s']:9.0f} tok/s  torch "
        f"{decode['torch_tok_s']:9.0f} tok/s  ratio {decode['speedup']:.2f}x  cpu-time ratio "
        f"{decode['cpu_time_ratio']:.2f}x  "
        f"(greedy tokens agreeing: {agree:.0%})", flush=True)

  result = dict(benchmark='model_speed', device='cpu', machine=info,
                model=dict(cfg.to_dict(), param_count=n_params),
                torch_attention=args.attn, reps=args.reps, warmup=args.warmup,
                forward=forward, decode=decode,
                command=shlex.join(['.venv/bin/python', 'bench/model_speed.py'] + argv))
  info['load_avg_1min_before'] = load_before
  info['load_avg_1min_after'] = os.getloadavg()[0]
  print()
  write_results(args.out, result, markdown(result))
  return result


def train_batch(tokens):
  """A train batch (flaxllm.data layout) of token rows [batch, seq + 1]: next-token targets,
  one document per row, every token counted."""
  import jax.numpy as jnp
  b, s = tokens.shape[0], tokens.shape[1] - 1
  return {'inputs': jnp.asarray(tokens[:, :-1]), 'targets': jnp.asarray(tokens[:, 1:]),
          'positions': jnp.asarray(np.tile(np.arange(s, dtype=np.int32), (b, 1))),
          'segment_ids': jnp.ones((b, s), jnp.int32), 'loss_mask': jnp.ones((b, s), jnp.float32)}


def write_results(out, result, table):
  """Prints the markdown table; writes `out`.json and `out`.md unless out is empty."""
  print(table)
  if out:
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + '.json', 'w') as f:
      json.dump(result, f, indent=2)
    with open(out + '.md', 'w') as f:
      f.write(table)
    print(f'wrote {out}.json and {out}.md')


def markdown(r):
  m, f, d = r['machine'], r['forward'], r['decode']
  cfg = r['model']
  lines = [
      '# flaxllm vs transformers (PyTorch), CPU, float32',
      '',
      f"Model: random-init LLaMA, {cfg['param_count'] / 1e6:.1f}M params ({cfg['num_layers']} "
      f"layers, d_model {cfg['d_model']}, {cfg['num_heads']} heads, mlp {cfg['mlp_dim']}, vocab "
      f"{cfg['vocab_size']}); the same weights in both. torch attention: "
      f"{r['torch_attention']}.",
      f"Machine: {m['cpu']}, {m['cores']} cores, {len(m['cpus_used'])} used (torch threads "
      f"{m['torch_threads']}; 1-min load average {m['load_avg_1min_before']:.1f} before, "
      f"{m['load_avg_1min_after']:.1f} after, other processes included); jax "
      f"{m['jax']}, flax {m['flax']}, torch {m['torch']}, transformers {m['transformers']}; "
      f"{m['date']}. XLA_FLAGS={m['xla_flags'] or '(none)'}; "
      f"OMP_WAIT_POLICY={m['omp_wait_policy'] or '(default)'}.",
      f"Median of {r['reps']} repetitions after {r['warmup']} warm-up runs, the two frameworks "
      'timed alternately in one process, each timed run after an untimed one of the same '
      'framework.',
      '',
      '| benchmark | shape | flaxllm tok/s | torch tok/s | flaxllm / torch |',
      '|---|---|---:|---:|---:|',
      f"| forward (logits) | batch {f['batch']} x seq {f['seq']} | {f['flaxllm_tok_s']:.0f} | "
      f"{f['torch_tok_s']:.0f} | {f['speedup']:.2f}x |",
      f"| greedy decode, KV cache | batch {d['batch']}, prompt {d['prompt']}, "
      f"{d['new_tokens']} new | {d['flaxllm_tok_s']:.0f} | {d['torch_tok_s']:.0f} | "
      f"{d['speedup']:.2f}x |",
      '',
      f"Process CPU time (all threads; less sensitive to other load), torch / flaxllm: "
      f"forward {f['cpu_time_ratio']:.2f}x, decode {d['cpu_time_ratio']:.2f}x.",
      '',
      f"Checks: max |logit difference| {f['max_abs_logit_diff']:.1e}; greedy tokens agreeing "
      f"(common prefix) {d['greedy_prefix_agreement']:.0%}.",
      '',
      f"Reproduce: `{r['command'].strip()}`",
      '',
  ]
  return '\n'.join(lines)


if __name__ == '__main__':
  main()
