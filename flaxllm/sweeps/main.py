"""`flaxllm sweep` and `flaxllm scaling`: run a sweep, export it to W&B, fit scaling laws.

    flaxllm sweep --config=experiments/scaling/sweep.py --workdir=runs/scaling [--workers=2]
                  [--retry-failed] [--list] [--config.k=v ...]      # overrides for every point
    flaxllm sweep --config=SWEEP.py --export-wandb=sweep.yaml [--method=grid|random|bayes]
                  [--workdir=runs/NAME]                             # where the agent's runs go
    flaxllm scaling fit   --sweep-dir=runs/scaling [--target-flops=1e15] [--params=total]
                          [--flops=6nd] [--loss=final] [--bootstrap=200] [--plots-dir=DIR]
    flaxllm scaling table --sweep-dir=runs/scaling                  # the runs as a markdown table
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Optional, Sequence

import numpy as np

from flaxllm import cli
from flaxllm import config as config_lib
from flaxllm.models.config import ConfigError
from flaxllm.sweeps import fit as fit_lib
from flaxllm.sweeps import plots
from flaxllm.sweeps import runner as runner_lib
from flaxllm.sweeps import spec as spec_lib
from flaxllm.sweeps import wandb_export
from flaxllm.sweeps.spec import human


# ----------------------------------------------------------------------------- flaxllm sweep

def _sweep(argv) -> int:
  common, argv = cli.split_overrides(argv)
  p = argparse.ArgumentParser(prog='flaxllm sweep', description='Run or export a sweep.')
  p.add_argument('--config', required=True, help='sweep file (get_config + get_sweep)[:variant]')
  p.add_argument('--workdir', help='sweep directory (one workdir per point); with '
                                   '--export-wandb: the directory of the agent runs')
  p.add_argument('--workers', type=int, default=1, help='points trained at the same time')
  p.add_argument('--retry-failed', action='store_true', help='run failed points again')
  p.add_argument('--list', action='store_true', help='print the points (N, D, C), run nothing')
  p.add_argument('--export-wandb', metavar='YAML', help='write a W&B sweep file instead')
  p.add_argument('--method', default='grid', help='W&B sweep method: grid | random | bayes')
  p.add_argument('--name', help='sweep name and W&B group (default: the workdir name)')
  args = p.parse_args(argv)
  sweep = runner_lib.load_sweep(args.config, common)
  stem = os.path.splitext(os.path.basename(args.config.partition(':')[0]))[0]
  name = args.name or (os.path.basename(os.path.abspath(args.workdir)) if args.workdir else stem)
  if args.export_wandb:
    data = wandb_export.export(sweep, args.export_wandb, name=name, method=args.method,
                               workdir_root=args.workdir or os.path.join('runs', name))
    print(f'Wrote {args.export_wandb}: {data["method"]} sweep over '
          f'{", ".join(data["parameters"])}; start it with `wandb sweep {args.export_wandb}` '
          'and `wandb agent <sweep id>` in the repository root.')
    return 0
  if args.list:
    _print_points(sweep)
    return 0
  if not args.workdir:
    raise ConfigError('flaxllm sweep needs --workdir=DIR for the runs (or --export-wandb=FILE or '
                      '--list).')
  statuses = runner_lib.run_sweep(sweep, args.workdir, workers=args.workers,
                                  retry_failed=args.retry_failed, group=args.name)
  return 0 if all(s['status'] == 'complete' for s in statuses) else 1


def _print_points(sweep: runner_lib.Sweep):
  print(f'{"point":<24} {"N":>8} {"N (no emb)":>10} {"D":>8} {"6ND":>8} {"steps":>6}')
  for point in sweep.points:
    config = config_lib.load_config(sweep.spec, [*sweep.common, *runner_lib.point_args(point)])
    counts = spec_lib.model_counts(config, {})
    tokens = config.total_steps * config.batch_size * config.seq_len
    print(f'{point["_name"]:<24} {human(counts["params"]):>8} '
          f'{human(counts["params_non_embedding"]):>10} {human(tokens):>8} '
          f'{6 * counts["params"] * tokens:>8.2g} {config.total_steps:>6}')


def sweep_main(argv: Optional[Sequence[str]] = None) -> int:
  """Entry point of `flaxllm sweep`."""
  return cli.run(_sweep, argv)


# ----------------------------------------------------------------------------- flaxllm scaling

def table(rows: Sequence[dict]) -> str:
  """The runs of a sweep as a markdown table (sorted by budget, then size)."""
  lines = ['| run | N | N (no emb.) | D | C = 6ND | C (exact) | D/N | final val loss | best val loss | wall |',
           '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
  for r in sorted(rows, key=lambda r: (r.get('budget', r['flops_6nd']), r['params'])):
    wall = f'{r["wall_s"]:.0f} s' if r.get('wall_s') is not None else ''
    lines.append(f'| {r["name"]} | {human(r["params"])} | {human(r["params_non_embedding"])} | '
                 f'{human(r["tokens"])} | {r["flops_6nd"]:.2e} | {r["flops"]:.2e} | '
                 f'{r["tokens"] / r["params"]:.3g} | {r["val_loss"]:.4f} | '
                 f'{r["best_val_loss"]:.4f} | {wall} |')
  return '\n'.join(lines)


def fit_sweep(rows: Sequence[dict], *, params: str = 'total', flops: str = '6nd',
              loss: str = 'final', target_flops: float | None = None, bootstrap: int = 200,
              starts: int = 64) -> dict:
  """Approach 3 and (where the sweep has budgets) approach 2 on a sweep's results."""
  n_key = {'total': 'params', 'non_embedding': 'params_non_embedding'}.get(params)
  c_key = {'6nd': 'flops_6nd', 'exact': 'flops'}.get(flops)
  l_key = {'final': 'val_loss', 'best': 'best_val_loss'}.get(loss)
  for value, key, allowed in ((n_key, 'params', 'total, non_embedding'),
                              (c_key, 'flops', '6nd, exact'), (l_key, 'loss', 'final, best')):
    if value is None:
      raise ConfigError(f'--{key} must be one of {allowed}.')
  n = np.array([r[n_key] for r in rows], float)
  d = np.array([r['tokens'] for r in rows], float)
  c = np.array([r[c_key] for r in rows], float)
  l = np.array([r[l_key] for r in rows], float)
  budget = np.array([r.get('budget') or float(f'{r[c_key]:.2g}') for r in rows], float)
  target = target_flops or 10 * float(budget.max() if len(budget) else 0)
  law = fit_lib.fit_law(n, d, l, bootstrap=bootstrap, target_flops=target, starts=starts)
  out = {'settings': dict(params=params, flops=flops, loss=loss, target_flops=target),
         'law': law, 'isoflop': None, 'isoflop_error': None,
         'data': dict(n=n, d=d, c=c, loss=l, budget=budget)}
  try:
    out['isoflop'] = fit_lib.fit_isoflop(budget, n, d, l)
  except ConfigError as e:
    out['isoflop_error'] = str(e)
  return out


def format_fit(result: dict) -> str:
  law, iso, s = result['law'], result['isoflop'], result['settings']
  ci = law.ci

  def val(name, value, fmt='.3g'):
    lo_hi = f'  [{ci[name][0]:{fmt}}, {ci[name][1]:{fmt}}]' if name in ci else ''
    return f'{value:{fmt}}{lo_hi}'

  target = s['target_flops']
  n_opt, d_opt = law.optimal(target)
  lines = [f'Approach 3: L(N, D) = E + A/N^alpha + B/D^beta on {law.num_points} runs '
           f'(N = {s["params"]} params, {s["loss"]} val loss; Huber delta '
           f'{fit_lib.HUBER_DELTA:g} on log L, L-BFGS; 95% bootstrap intervals)',
           f'  E     = {val("E", law.E)}', f'  A     = {val("A", law.A)}',
           f'  B     = {val("B", law.B)}', f'  alpha = {val("alpha", law.alpha)}',
           f'  beta  = {val("beta", law.beta)}',
           f'  N_opt ∝ C^{val("a", law.a)},  D_opt ∝ C^{val("b", law.b)}',
           f'  at C = {target:.3g} FLOPs (6ND): N_opt = {val("N_opt", float(n_opt))}, '
           f'D_opt = {val("D_opt", float(d_opt))} tokens ({float(d_opt / n_opt):.1f} tokens '
           f'per parameter), loss {val("loss_opt", float(law.loss(n_opt, d_opt)), ".4f")}']
  if iso is not None:
    n2, d2 = iso.optimal(target)
    lines += [f'Approach 2: IsoFLOP parabolas ({len(iso.budgets)} budgets, C = {s["flops"]})',
              *[f'  C = {c:.3g}: N_opt = {human(n)}, D_opt = {human(d)}, loss {l:.4f}' +
                ('' if ok else '  (outside the sizes of this budget: not in the power law)')
                for c, n, d, l, ok in zip(iso.budgets, iso.n_opt, iso.d_opt, iso.loss_opt,
                                          iso.inside)],
              f'  N_opt ∝ C^{iso.a:.3f},  D_opt ∝ C^{iso.b:.3f} '
              f'(from {sum(iso.inside)} budgets)',
              f'  at C = {target:.3g}: N_opt = {n2:.3g}, D_opt = {d2:.3g} tokens']
  else:
    lines.append(f'Approach 2: not fitted: {result["isoflop_error"]}')
  return '\n'.join(lines)


def _json_ready(result: dict) -> dict:
  law, iso = result['law'], result['isoflop']
  target = result['settings']['target_flops']
  n_opt, d_opt = law.optimal(target)
  out = {'settings': result['settings'],
         'approach3': {**law.summary(), 'N_opt': float(n_opt), 'D_opt': float(d_opt),
                       'loss_opt': float(law.loss(n_opt, d_opt))}}
  if iso is not None:
    n2, d2 = iso.optimal(target)
    out['approach2'] = {**iso.summary(), 'N_opt': float(n2), 'D_opt': float(d2)}
  else:
    out['approach2_error'] = result['isoflop_error']
  return json.loads(json.dumps(out, default=float))


def _scaling(argv) -> int:
  p = argparse.ArgumentParser(prog='flaxllm scaling', description='Fit a sweep\'s scaling law.')
  p.add_argument('action', choices=['fit', 'table'])
  p.add_argument('--sweep-dir', required=True, help='the --workdir of flaxllm sweep')
  p.add_argument('--target-flops', type=float, default=None,
                 help='budget for the compute-optimal N, D (default: 10x the largest budget)')
  p.add_argument('--params', default='total', help='N: total | non_embedding')
  p.add_argument('--flops', default='6nd', help='C for approach 2: 6nd | exact')
  p.add_argument('--loss', default='final', help='final | best validation loss')
  p.add_argument('--bootstrap', type=int, default=200, help='bootstrap resamples (0: none)')
  p.add_argument('--plots-dir', default=None, help='where the PNGs go (default: --sweep-dir)')
  args = p.parse_args(argv)
  rows = runner_lib.read_results(args.sweep_dir)
  if args.action == 'table':
    print(table(rows))
    return 0
  result = fit_sweep(rows, params=args.params, flops=args.flops, loss=args.loss,
                     target_flops=args.target_flops, bootstrap=args.bootstrap)
  print(format_fit(result))
  out_dir = args.plots_dir or args.sweep_dir
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'fit.json'), 'w') as f:
    json.dump(_json_ready(result), f, indent=2)
  paths = plots.plot_all(result, out_dir)
  print(f'Wrote {os.path.join(out_dir, "fit.json")} and {", ".join(paths)}.')
  return 0


def scaling_main(argv: Optional[Sequence[str]] = None) -> int:
  """Entry point of `flaxllm scaling`."""
  return cli.run(_scaling, argv)


__all__ = ['sweep_main', 'scaling_main', 'fit_sweep', 'format_fit', 'table']
