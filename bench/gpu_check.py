"""The Python steps of bench/gpu_check.sh (see that script for what the check is and how to run it).

    python bench/gpu_check.py preflight ENV_FILE [--dry-run]
        jax backend and devices, whether flaxllm's GPU kernels would be interpreted, and on a GPU
        one compiled Pallas flash attention (its HLO must call Triton) and one cuDNN attention
        checked against the XLA reference; key=value lines to ENV_FILE (and stdout). Exit 0
        unless Python itself fails; the script decides what counts as a failure.
    python bench/gpu_check.py merge-attention OUT PART...
        one attention result (OUT.json, OUT.md as bench/attention.py writes them) from the runs
        of bench/attention.py per head_dim; PART is a results path without extension whose
        .json is used when it exists, else the rows printed in its .log (a run that timed out).
    python bench/gpu_check.py summary SUMMARY_MD --parts TSV --env ENV_FILE ...
        the summary markdown of the check.

Only `preflight` and `merge-attention` import jax; `summary` uses the standard library.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import traceback

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
IMPLS = ('pallas', 'cudnn', 'blocked', 'xla')   # bench/attention.py's (read from it when merging)


def short_error(e: BaseException) -> str:
  text = str(e).splitlines()[0][:200] if str(e) else ''
  return f'{type(e).__name__}: {text}'


# ----------------------------------------------------------------------------- preflight

def preflight(env_file: str, dry_run: bool) -> None:
  sys.path.insert(0, ROOT)
  import jax
  import jax.numpy as jnp
  import numpy as np

  from flaxllm import kernels
  from flaxllm.kernels import options

  with open(env_file, 'w') as out:
    def put(key, value):
      print(f'{key}={value}', flush=True)
      out.write(f'{key}={value}\n')
      out.flush()

    dev = jax.devices()[0]
    kind = dev.device_kind
    put('jax', jax.__version__)
    put('backend', jax.default_backend())
    put('device_kind', kind)
    put('slug', re.sub(r'[^a-z0-9]+', '_', kind.lower()).strip('_') or 'unknown')
    put('devices', f'{jax.device_count()} x {kind} ({dev.platform})')
    put('gpu_kernels_interpreted', options.resolve_interpret(None, 'gpu'))
    if jax.default_backend() != 'gpu' and not dry_run:
      return
    # Dry run: the same code on tiny shapes (interpreted kernel, no cuDNN on a CPU).
    shape = (1, 64, 2, 64) if jax.default_backend() != 'gpu' else (2, 512, 8, 128)
    put('check_shape', 'x'.join(map(str, shape)))
    ks = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(kk, shape, jnp.bfloat16) for kk in ks)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    want = np.asarray(kernels.reference_attention(*f32, causal=True))

    def max_err(got):
      return f'{float(np.max(np.abs(np.asarray(got, np.float32) - want))):.3g}'

    try:
      lowered = jax.jit(lambda q, k, v: kernels.flash_attention(q, k, v, causal=True)).lower(
          q, k, v)
      compiled = lowered.compile()
      # The Pallas GPU kernel is a Triton custom call (as tests/test_kernels.py checks on the
      # exported module); interpreted, it is plain XLA ops.
      put('flash_triton_in_hlo', any('__gpu$xla.gpu.triton' in x.as_text()
                                     for x in (lowered, compiled)))
      put('flash_max_abs_err', max_err(compiled(q, k, v)))
    except Exception as e:  # noqa: BLE001 - reported
      traceback.print_exc()
      put('flash_error', short_error(e))
    try:
      got = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
          q, k, v, is_causal=True, implementation='cudnn'))(q, k, v)
      put('cudnn_max_abs_err', max_err(got))
    except Exception as e:  # noqa: BLE001 - reported
      if jax.default_backend() == 'gpu':
        traceback.print_exc()
      put('cudnn_error', short_error(e))


# ----------------------------------------------------------------------------- attention

_ROW = re.compile(r'^d=(\d+)\s+seq=(\d+)\s+(full|causal)\s+(fwd\+bwd|fwd)\b(.*)$')
_DEVICE = re.compile(r'^device: (.*) \((\w+)\), jax (\S+)$')


def rows_from_log(text: str, impls=IMPLS) -> tuple[list[dict], dict, dict]:
  """(rows, check-vs-XLA values, device fields) that bench/attention.py printed (its
  `format_row` lines), for a run that was stopped before it wrote its result file."""
  names = '|'.join(map(re.escape, impls))
  err_re = re.compile(rf'\s{{2}}({names}): (.*?)(?=\s{{2}}(?:{names}): |$)')
  rows, checks, device = [], {}, {}
  for line in text.splitlines():
    line = line.rstrip()
    m = _DEVICE.match(line)
    if m:
      device = dict(device_kind=m.group(1), backend=m.group(2), jax=m.group(3))
      continue
    if line.startswith('check vs xla') and ': ' in line:
      name, _, value = line.split(': ', 1)[1].rpartition(': ')
      checks[name] = value
      continue
    m = _ROW.match(line)
    if not m:
      continue
    d, seq, mask, mode, rest = m.groups()
    row = dict(head_dim=int(d), seq=int(seq), causal=mask == 'causal', mode=mode, from_log=True)
    for impl in impls:
      v = re.search(rf'(?:^|\s){re.escape(impl)}=(\S+)', rest)
      if v:
        row[impl] = None if v.group(1) == '-' else float(v.group(1))
    for fast, base, ratio in re.findall(r'(\w+)/(\w+)=([0-9.]+)x', rest):
      row[f'{fast}/{base}'] = float(ratio)
    for impl, err in err_re.findall(rest):
      row[impl + '_error'] = err.strip()
    rows.append(row)
  return rows, checks, device


def merge_attention(out: str, parts: list[str]) -> int:
  """OUT.json / OUT.md from the per-head_dim runs; the number of rows written."""
  sys.path.insert(0, BENCH)
  import attention  # bench/attention.py: its markdown() renders the merged table

  results, notes = [], []
  for part in parts:
    if os.path.exists(part + '.json'):
      with open(part + '.json') as f:
        results.append(json.load(f))
    elif os.path.exists(part + '.log'):
      with open(part + '.log', errors='replace') as f:
        rows, checks, device = rows_from_log(f.read(), attention.IMPLS)
      if rows:
        results.append(dict(device, rows=rows, check_vs_xla=checks, block_sizes={},
                            machine_load_avg_1min=os.getloadavg()[0],
                            command=f'bench/attention.py ({os.path.basename(part)}, stopped)'))
        notes.append(f'{os.path.basename(part)}: stopped before it wrote its results; '
                     f'{len(rows)} rows read back from its printed output (TFLOP/s only).')
  if not results:
    return 0
  result = {k: v for k, v in results[0].items()}
  for r in results[1:]:
    for key in ('device_kind', 'backend', 'jax', 'date', 'quick'):
      result.setdefault(key, r.get(key))
  result.setdefault('device_kind', 'unknown')
  result.setdefault('jax', '?')
  result.setdefault('date', datetime.datetime.now().isoformat(timespec='seconds'))
  result['rows'] = [row for r in results for row in r['rows']]
  result['check_vs_xla'] = {k: v for r in results for k, v in r.get('check_vs_xla', {}).items()}
  result['block_sizes'] = {k: v for r in results for k, v in r.get('block_sizes', {}).items()}
  result['command'] = ' ; '.join(r['command'] for r in results if r.get('command'))
  result['merged_from'] = [os.path.basename(p) for p in parts]
  result['notes'] = notes
  impls = [i for i in attention.IMPLS if any(i in row for row in result['rows'])]
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out + '.json', 'w') as f:
    json.dump(result, f, indent=2)
  head_dims = sorted({row['head_dim'] for row in result['rows']})
  with open(out + '.md', 'w') as f:
    f.write(attention.markdown(result, impls))
    f.write('\nWritten by bench/gpu_check.sh from one bench/attention.py run per head_dim '
            f"(head_dims {', '.join(map(str, head_dims))} present).\n")
    for note in notes:
      f.write(f'\n{note}\n')
  print(f'wrote {out}.json and {out}.md ({len(result["rows"])} rows)')
  return len(result['rows'])


# ----------------------------------------------------------------------------- summary

def _git(*args):
  try:
    return subprocess.run(['git', *args], capture_output=True, text=True, timeout=10,
                          cwd=ROOT).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return ''


def read_env(path):
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return dict(line.rstrip('\n').split('=', 1) for line in f if '=' in line)


def summary(a) -> bool:
  """Writes the summary markdown; True when every part is ok (or skipped)."""
  here = os.path.dirname(os.path.abspath(a.summary))
  kv = read_env(a.env)
  with open(a.parts) as f:
    rows = [line.rstrip('\n').split('\t') for line in f if line.strip()]
  dirty = len(_git('status', '--porcelain', '--untracked-files=no').splitlines())

  def link(path):
    rel = os.path.relpath(path, here)
    return f'[{rel}]({rel})' if os.path.exists(path) else f'{rel} (not written)'

  ok = not a.failed and all(r[1] in ('ok', 'skipped') for r in rows)
  smi = ['(no nvidia-smi output)']
  if os.path.exists(a.nvidia_smi):
    with open(a.nvidia_smi) as f:
      smi = f.read().strip().splitlines() or smi
  lines = [
      f"# GPU check on {kv.get('device_kind', 'an unknown device')}"
      + (' (dry run, tiny shapes)' if a.dry_run else ''),
      '',
      f"{'PASSED' if ok else 'FAILED'}: {a.total} s in all (budget {a.budget} s), "
      f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}, "
      f"commit {_git('rev-parse', '--short', 'HEAD') or '?'}"
      f"{f' with {dirty} modified tracked files' if dirty else ''}; "
      f"command `{a.command}`.",
      '',
      '## Device',
      '',
      '```',
      *smi,
      '```',
      '',
      f"jax {kv.get('jax', '?')}, backend {kv.get('backend', '?')}, {kv.get('devices', '?')}.",
      f"flaxllm's GPU kernels interpreted (`kernels.options.resolve_interpret(None, 'gpu')`): "
      f"{kv.get('gpu_kernels_interpreted', '?')}.",
  ]
  if 'check_shape' in kv:
    on_gpu = kv.get('backend') == 'gpu'
    lines.append(
        f"A compiled `flash_attention` calls Triton: {kv.get('flash_triton_in_hlo', '?')} "
        f"(max abs error vs XLA {kv.get('flash_max_abs_err', kv.get('flash_error'))}); cuDNN "
        f"attention max abs error {kv.get('cudnn_max_abs_err', kv.get('cudnn_error'))} (bf16, "
        f"causal, q/k/v {kv['check_shape']})" +
        ('.' if on_gpu else '; on a CPU the kernel is interpreted and there is no cuDNN, '
         'as expected.'))
  lines += ['', '## Parts', '', '| part | status | wall time | timeout | result |',
            '|---|---|---:|---:|---|']
  for name, status, rc, secs, limit, note in rows:
    shown = status if status in ('ok', 'skipped') else f'**{status}** (exit {rc})'
    lines.append(f'| {name} | {shown} | {secs} s | {limit} s | {note.replace("|", "/")} |')
  lines += ['', '## Files', '',
            f'- train-step MFU: {link(a.mfu + ".md")}, {link(a.mfu + ".json")}',
            f'- attention: {link(a.attention + ".md")}, {link(a.attention + ".json")}',
            f'- logs of every part: {link(a.logs)}']
  for name, status, *_ in rows:
    if status in ('ok', 'skipped'):
      continue
    log = os.path.join(a.logs, name.replace('-', '_') + '.log')
    if os.path.exists(log):
      with open(log, errors='replace') as f:
        tail = f.read().strip().splitlines()[-15:]
      lines += ['', f'### {name}: last lines of {os.path.relpath(log, here)}', '', '```',
                *tail, '```']
  with open(a.summary, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  return ok


def mfu_note(path: str) -> str:
  """One line of a bench/train_mfu.py result for the summary table."""
  with open(path) as f:
    r = json.load(f)
  pct = lambda x: 'n/a' if x is None else f'{x:.1%}'  # noqa: E731
  table = ('no datasheet peak' if r['peak_flops_table'] is None else
           f"{r['peak_flops_table'] / 1e12:.0f} TFLOP/s, {r['peak_flops_table_source']}")
  return (f"{r['param_count'] / 1e6:.1f}M params, batch {r['batch']} x {r['seq_len']}, remat "
          f"{r['remat']}, attention kernels {', '.join(r['attention_kernels_in_step']) or 'xla'}:"
          f" step {r['step_time_s'] * 1e3:.1f} ms, {r['tokens_per_s']:.0f} tokens/s; MFU "
          f"{pct(r['mfu_table'])} of the datasheet peak ({table}), {pct(r['mfu_measured'])} of "
          f"the measured {r['peak_flops_measured'] / 1e12:.1f} TFLOP/s")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  sub = p.add_subparsers(dest='cmd', required=True)
  s = sub.add_parser('preflight')
  s.add_argument('env_file')
  s.add_argument('--dry-run', action='store_true')
  s = sub.add_parser('merge-attention')
  s.add_argument('out')
  s.add_argument('parts', nargs='+')
  s = sub.add_parser('mfu-note')
  s.add_argument('json')
  s = sub.add_parser('summary')
  s.add_argument('summary')
  for name in ('parts', 'env', 'nvidia-smi', 'logs', 'mfu', 'attention', 'command'):
    s.add_argument(f'--{name}', required=True)
  s.add_argument('--total', type=int, required=True)
  s.add_argument('--budget', type=int, required=True)
  s.add_argument('--dry-run', action='store_true')
  s.add_argument('--failed', action='store_true', help='a failure outside the parts table')
  a = p.parse_args(argv)
  if a.cmd == 'preflight':
    preflight(a.env_file, a.dry_run)
  elif a.cmd == 'merge-attention':
    return 0 if merge_attention(a.out, a.parts) else 1
  elif a.cmd == 'mfu-note':
    print(mfu_note(a.json))
  else:
    return 0 if summary(a) else 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
