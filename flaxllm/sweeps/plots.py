"""PNG plots of a scaling fit (`flaxllm scaling fit`): written with matplotlib's Agg backend.

    isoflop.png   loss against N for each compute budget, with approach 2's parabolas and
                  approach 3's law along the same budget (D = C / 6N)
    law.png       the fitted L(N, D) against the runs: loss against C for each model size,
                  and predicted against measured loss
    optimal.png   N_opt and D_opt against C: approach 2's per-budget optima and power law,
                  approach 3's closed form, the target budget marked
"""
from __future__ import annotations

import os

import numpy as np

from flaxllm.sweeps.spec import human


def _pyplot():
  import matplotlib  # pylint: disable=import-outside-toplevel -- heavy, only for plots
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel -- heavy
  return plt


def _save(fig, path: str) -> str:
  from matplotlib.ticker import NullFormatter  # pylint: disable=import-outside-toplevel -- heavy
  for ax in fig.axes:   # x axes span over a decade: label the powers of ten only
    if ax.xaxis.get_scale() == 'log':
      ax.xaxis.set_minor_formatter(NullFormatter())
  fig.tight_layout()
  fig.savefig(path + '.tmp.png', dpi=110)
  os.replace(path + '.tmp.png', path)
  return path


def plot_isoflop(result: dict, path: str) -> str:
  plt = _pyplot()
  data, law, iso = result['data'], result['law'], result['isoflop']
  fig, ax = plt.subplots(figsize=(7, 4.5))
  budgets = np.unique(data['budget'])
  colors = plt.cm.viridis(np.linspace(0, 0.85, len(budgets)))
  for c, color in zip(budgets, colors):
    i = data['budget'] == c
    ax.scatter(data['n'][i], data['loss'][i], color=color, zorder=3, label=f'C = {c:.2g}')
    grid = np.geomspace(data['n'][i].min() / 1.5, data['n'][i].max() * 1.5, 100)
    ax.plot(grid, law.loss(grid, c / (6 * grid)), '--', color=color, lw=1)
    if iso is not None:
      k = iso.budgets.index(c)
      c2, c1, c0 = iso.parabolas[k]
      x = np.log(grid)
      ax.plot(grid, c2 * x ** 2 + c1 * x + c0, '-', color=color, lw=1.5)
      if iso.inside[k]:   # a vertex outside the sizes is an extrapolation: not drawn
        ax.scatter([iso.n_opt[k]], [iso.loss_opt[k]], marker='*', s=140, color=color,
                   edgecolor='k', zorder=4)
  ax.set_xscale('log')
  ax.set_xlabel(f'parameters N ({result["settings"]["params"]})')
  ax.set_ylabel(f'{result["settings"]["loss"]} validation loss (nats/token)')
  ax.set_title('IsoFLOP curves: parabolas in log N (solid, * = optimum), law (dashed)')
  ax.grid(alpha=0.3, which='both')
  ax.legend()
  return _save(fig, path)


def plot_law(result: dict, path: str) -> str:
  plt = _pyplot()
  data, law = result['data'], result['law']
  fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
  sizes = np.unique(data['n'])
  colors = plt.cm.plasma(np.linspace(0, 0.85, len(sizes)))
  for n, color in zip(sizes, colors):
    i = data['n'] == n
    flops = 6 * n * data['d'][i]
    ax.scatter(flops, data['loss'][i], color=color, zorder=3, label=f'N = {human(n)}')
    grid = np.geomspace(flops.min() / 3, flops.max() * 3, 100)
    ax.plot(grid, law.loss(n, grid / (6 * n)), '-', color=color, lw=1)
  ax.set_xscale('log')
  ax.set_xlabel('C = 6ND (FLOPs)')
  ax.set_ylabel('validation loss (nats/token)')
  ax.set_title(f'L = {law.E:.2f} + {law.A:.3g}/N^{law.alpha:.2f} + {law.B:.3g}/D^{law.beta:.2f}')
  ax.grid(alpha=0.3, which='both')
  ax.legend(fontsize=8)
  predicted = law.loss(data['n'], data['d'])
  lo, hi = min(predicted.min(), data['loss'].min()), max(predicted.max(), data['loss'].max())
  ax2.plot([lo, hi], [lo, hi], 'k-', lw=0.8)
  ax2.scatter(data['loss'], predicted, c=np.log(data['n']), cmap='plasma')
  ax2.set_xlabel('measured loss')
  ax2.set_ylabel('fitted law')
  rel = np.abs(predicted / data['loss'] - 1)
  ax2.set_title(f'fit vs runs: mean |error| {100 * rel.mean():.2f}%, max {100 * rel.max():.2f}%')
  ax2.grid(alpha=0.3)
  return _save(fig, path)


def plot_optimal(result: dict, path: str) -> str:
  plt = _pyplot()
  law, iso, target = result['law'], result['isoflop'], result['settings']['target_flops']
  lo = min(result['data']['budget'].min(), target) / 3
  grid = np.geomspace(lo, max(result['data']['budget'].max(), target) * 3, 100)
  n3, d3 = law.optimal(grid)
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
  for ax, curve, what, idx in ((axes[0], n3, 'N_opt (parameters)', 0),
                               (axes[1], d3, 'D_opt (tokens)', 1)):
    exp3 = law.a if idx == 0 else law.b
    ax.plot(grid, curve, 'C0-', label=f'approach 3: ∝ C^{exp3:.2f}')
    if iso is not None:
      points = iso.n_opt if idx == 0 else iso.d_opt
      exp2 = iso.a if idx == 0 else iso.b
      ok = np.array(iso.inside)
      ax.scatter(np.array(iso.budgets)[ok], np.array(points)[ok], color='C1', zorder=3,
                 label='IsoFLOP optima (within the sizes)')
      ax.plot(grid, iso.optimal(grid)[idx], 'C1--', label=f'approach 2: ∝ C^{exp2:.2f}')
    ax.axvline(target, color='gray', lw=0.8, ls=':')
    ax.scatter([target], [law.optimal(target)[idx]], marker='*', s=150, color='C0',
               edgecolor='k', zorder=4, label=f'C = {target:.2g}: {human(law.optimal(target)[idx])}')
    ax.set_xscale('log')
    ax.set_yscale('log')
    ax.set_xlabel('compute C (FLOPs)')
    ax.set_ylabel(what)
    ax.grid(alpha=0.3, which='both')
    ax.legend(fontsize=8)
  axes[0].set_title('compute-optimal model size')
  axes[1].set_title('compute-optimal tokens')
  return _save(fig, path)


def plot_all(result: dict, out_dir: str) -> list[str]:
  """isoflop.png, law.png and optimal.png of a `fit_sweep` result, in `out_dir`."""
  paths = [plot_law(result, os.path.join(out_dir, 'law.png')),
           plot_optimal(result, os.path.join(out_dir, 'optimal.png'))]
  if len(np.unique(result['data']['budget'])) < len(result['data']['budget']):
    paths.insert(0, plot_isoflop(result, os.path.join(out_dir, 'isoflop.png')))
  return paths
