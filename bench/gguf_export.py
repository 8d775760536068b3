"""GGUF export time and file size per type (f32, f16, q8_0), and with llama-cpp-python
installed, llama.cpp against flaxllm on the same file: logits and greedy tokens/s.

    .venv/bin/python bench/gguf_export.py                  # runs/default + a random ~30M LLaMA
    .venv/bin/python bench/gguf_export.py --model=/tmp/after/runs/default --llama-cpp

Each export is the command a user runs, `flaxllm convert --from=DIR --to-gguf=FILE --type=T`,
in a subprocess of its own, --reps times per type: "wall" is the whole command (Python and JAX
start-up, loading the checkpoint, writing), "write" the part inside `flaxllm.interop.gguf.save`
(the layout, quantisation and the file) as the command prints it. The random model is a flaxllm
model directory with a LLaMA of --random-shape (d_model,layers,heads,mlp) and the tokenizer of
--model (its vocab_size). --llama-cpp (needs `pip install 'flaxllm[llamacpp]'`, which builds
llama.cpp from source): for each type of --model's export, llama.cpp's logits for a prompt
against flaxllm's (max relative difference, argmax agreement) and the tokens/s of greedy
generation of --tokens tokens in llama.cpp (llama-cpp-python, --threads threads) and in
`flaxllm.generate` (jitted, after a warm-up), one run each.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
RESULTS = os.path.join(BENCH, 'results')
TYPES = ('f32', 'f16', 'q8_0')
PROMPT = 'def '
LINE = re.compile(r'(\d+) tensors, ([\d.]+) MB \(load ([\d.]+) s, write ([\d.]+) s\)')


def cpu_name() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown'


def loadavg() -> str:
  try:
    with open('/proc/loadavg') as f:
      return ' '.join(f.read().split()[:3])
  except OSError:
    return 'unknown'


def random_llama(path: str, tokenizer_dir: str, shape: str) -> dict:
  """A flaxllm model directory with a random LLaMA of `shape` and `tokenizer_dir`'s tokenizer."""
  import jax

  from flaxllm import models, rundir
  from flaxllm.interop import native
  d, layers, heads, mlp = (int(v) for v in shape.split(','))
  tok = rundir.load_tokenizer(tokenizer_dir)
  cfg = models.ModelConfig.from_dict(dict(vocab_size=tok.vocab_size, d_model=d,
                                          num_layers=layers, num_heads=heads, mlp_dim=mlp,
                                          max_seq_len=256))
  abstract = jax.eval_shape(lambda: models.init_params(models.build(cfg), jax.random.key(0)))
  rng = np.random.RandomState(0)
  params = jax.tree.map(lambda a: (0.02 * rng.standard_normal(a.shape)).astype(a.dtype),
                        abstract)
  native.save_flaxllm(cfg, params, path)
  for name in native.TOKENIZER_FILES:
    src = os.path.join(tokenizer_dir, name)
    if os.path.exists(src):
      with open(src, 'rb') as f, open(os.path.join(path, name), 'wb') as g:
        g.write(f.read())
  return dict(path=path, params=models.param_count(cfg)['total'], config=cfg.to_dict())


def export(src: str, out: str, kind: str) -> dict:
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  cmd = [sys.executable, '-m', 'flaxllm.cli', 'convert', f'--from={src}', f'--to-gguf={out}',
         f'--type={kind}', '--overwrite']
  start = time.perf_counter()
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
  wall = time.perf_counter() - start
  if proc.returncode:
    raise RuntimeError(f'{" ".join(cmd)} failed:\n{proc.stdout}{proc.stderr}')
  m = LINE.search(proc.stdout)
  return dict(wall_s=wall, load_s=float(m.group(3)), write_s=float(m.group(4)),
              tensors=int(m.group(1)), bytes=os.path.getsize(out))


def llama_cpp_compare(src: str, files: dict, tokens: int, threads: int) -> dict:
  """llama.cpp (llama-cpp-python) against flaxllm on `src` and its GGUF `files` by type."""
  from flaxllm import models, rundir
  from flaxllm.interop.gguf import llama_cpp_model
  from flaxllm.generate import generate
  source = rundir.model_source(src, what='--model')
  cfg = source.model_cfg
  tok = rundir.load_tokenizer(source.path)
  params = rundir.load_params(source.path)
  prompt = [tok.bos_id] + tok.encode(PROMPT)
  ref = np.asarray(models.build(cfg).apply({'params': params}, np.asarray([prompt])))[0]
  generate(cfg, params, [prompt], max_new_tokens=tokens, temperature=0.0)   # compile
  start = time.perf_counter()
  want = generate(cfg, params, [prompt], max_new_tokens=tokens, temperature=0.0)[0]
  flax_tps = len(want) / (time.perf_counter() - start)
  out = {'flaxllm_tokens_per_s': flax_tps, 'prompt_tokens': len(prompt), 'new_tokens': tokens}
  for kind, path in files.items():
    llm = llama_cpp_model(path, n_ctx=cfg.max_seq_len, logits_all=True,
                          n_threads=threads, verbose=False)
    llm.eval(prompt)
    got = np.asarray(llm.scores[:len(prompt)])
    rel = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
    agree = float(np.mean(got.argmax(-1) == ref.argmax(-1)))
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    ids = []
    for _ in range(tokens):
      ids.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
      llm.eval([ids[-1]])
    tps = tokens / (time.perf_counter() - start)
    first_diff = next((i for i, (a, b) in enumerate(zip(ids, want)) if a != b), None)
    out[kind] = dict(logits_max_rel_diff=rel, argmax_agreement=agree, tokens_per_s=tps,
                     speedup_vs_flaxllm=tps / flax_tps, greedy_tokens_equal=ids == want,
                     greedy_first_difference=first_diff)
  return out


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--model', default=os.path.join(ROOT, 'runs', 'default'),
                 help='a flaxllm workdir or model directory (default: runs/default, make train).')
  p.add_argument('--random-shape', default='512,8,8,1376',
                 help="d_model,layers,heads,mlp of the random LLaMA ('' to skip).")
  p.add_argument('--reps', type=int, default=3)
  p.add_argument('--llama-cpp', action='store_true',
                 help='also compare llama.cpp with flaxllm on --model (needs llama-cpp-python).')
  p.add_argument('--tokens', type=int, default=128)
  p.add_argument('--threads', type=int, default=os.cpu_count() or 1)
  p.add_argument('--out', default=os.path.join(RESULTS, 'gguf_export_cpu'),
                 help="results path without extension ('' prints only).")
  args = p.parse_args()

  record = dict(date=datetime.date.today().isoformat(), cpu=cpu_name(), cores=os.cpu_count(),
                loadavg_before=loadavg(), python=platform.python_version(),
                command=' '.join(['bench/gguf_export.py'] + sys.argv[1:]), models=[])
  with tempfile.TemporaryDirectory() as tmp:
    sources = [dict(name='model', path=os.path.abspath(args.model))]
    from flaxllm import models, rundir
    sources[0]['params'] = models.param_count(
        rundir.model_source(sources[0]['path']).model_cfg)['total']
    if args.random_shape:
      made = random_llama(os.path.join(tmp, 'random'), sources[0]['path'], args.random_shape)
      sources.append(dict(name=f'random LLaMA {args.random_shape}', **made))
    for source in sources:
      rows = {}
      for kind in TYPES:
        out = os.path.join(tmp, f'{len(record["models"])}-{kind}.gguf')
        runs = [export(source['path'], out, kind) for _ in range(args.reps)]
        rows[kind] = dict(runs[0], file=out)
        for key in ('wall_s', 'load_s', 'write_s'):   # the median, and every run
          rows[kind][key] = float(np.median([r[key] for r in runs]))
          rows[kind][key + '_runs'] = [round(r[key], 3) for r in runs]
        print(f"{source['name']} {kind}: {rows[kind]['bytes'] / 1e6:.2f} MB, wall "
              f"{rows[kind]['wall_s']:.2f} s, write {rows[kind]['write_s']:.2f} s", flush=True)
      entry = dict(name=source['name'], path=source['path'], params=source['params'],
                   types={k: {kk: vv for kk, vv in v.items() if kk != 'file'}
                          for k, v in rows.items()})
      if args.llama_cpp and source is sources[0]:
        entry['llama_cpp'] = llama_cpp_compare(source['path'],
                                               {k: v['file'] for k, v in rows.items()},
                                               args.tokens, args.threads)
      record['models'].append(entry)
  record['loadavg_after'] = loadavg()
  print(json.dumps(record, indent=2))
  if args.out:
    with open(args.out + '.json', 'w') as f:
      json.dump(record, f, indent=2)
      f.write('\n')
  return 0


if __name__ == '__main__':
  sys.exit(main())
