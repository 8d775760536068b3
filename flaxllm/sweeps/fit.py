"""Scaling-law fits (Hoffmann et al. 2022, "Chinchilla") and compute-optimal allocations.

Units: N parameters, D tokens, C FLOPs (C = 6 N D), L validation loss in nats/token.

Approach 3, `fit_law`: L(N, D) = E + A / N^alpha + B / D^beta, fitted as in the paper's
appendix D.2: the Huber loss (delta = 1e-3) between log L and
    log L_hat = logsumexp(a - alpha log N, b - beta log D, e),   A = e^a, B = e^b, E = e^e,
minimised with L-BFGS(-B, in a wide box: `BOUNDS`) from a grid of starting points, keeping the
best. Bootstrap confidence
intervals refit resampled points (with replacement) from the best few solutions. Minimising L
under C = 6 N D gives the closed form (`LawFit.optimal`):
    N_opt(C) = G (C/6)^(beta/(alpha+beta)),  D_opt(C) = G^-1 (C/6)^(alpha/(alpha+beta)),
    G = (alpha A / (beta B))^(1/(alpha+beta)).

Approach 2, `fit_isoflop`: for each compute budget a parabola of L against log N (and against
log D) whose vertex is that budget's N_opt (D_opt); then N_opt = k_N C^a and D_opt = k_D C^b by
least squares in log-log, over the budgets whose vertex lies within their sampled model sizes
(a vertex outside them is an extrapolation: that budget is reported, and left out of the power
law).
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import glob
import itertools
import math
import os
from typing import Sequence

import numpy as np
import scipy
from scipy import optimize, special

from flaxllm.models.config import ConfigError

HUBER_DELTA = 1e-3
# Chinchilla's grid of initialisations: alpha, beta, e, a, b (4500 points); L-BFGS starts from
# the `starts` of them with the lowest objective.
INIT_GRID = (np.arange(0, 2.01, 0.5), np.arange(0, 2.01, 0.5), np.arange(-1, 1.01, 0.5),
             np.arange(0, 26, 5.0), np.arange(0, 26, 5.0))
# L-BFGS-B box for theta = (a, b, e, alpha, beta): wide enough for any sensible law (A, B up to
# e^60, exponents up to 4), it keeps few-point fits from running off to A = inf or alpha < 0.
BOUNDS = ((-10, 60), (-10, 60), (-10, 10), (0, 4), (0, 4))
# The published fit (Hoffmann et al. 2022, eq. 10), used by the tests.
CHINCHILLA = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


# ----------------------------------------------------------------------------- approach 3

@dataclasses.dataclass
class LawFit:
  """L(N, D) = E + A / N^alpha + B / D^beta, with bootstrap intervals in `ci`."""
  E: float
  A: float
  B: float
  alpha: float
  beta: float
  objective: float = 0.0          # the Huber loss at the optimum (sum over points)
  num_points: int = 0
  ci: dict = dataclasses.field(default_factory=dict)   # name -> (low, high), 95% by default

  def loss(self, n, d):
    """Predicted loss at N parameters and D tokens (arrays broadcast)."""
    return self.E + self.A / np.asarray(n, float) ** self.alpha + \
        self.B / np.asarray(d, float) ** self.beta

  @property
  def a(self) -> float:
    """N_opt ∝ C^a."""
    return self.beta / (self.alpha + self.beta)

  @property
  def b(self) -> float:
    """D_opt ∝ C^b."""
    return self.alpha / (self.alpha + self.beta)

  def optimal(self, flops):
    """(N_opt, D_opt) minimising L(N, D) subject to 6 N D = flops (closed form); NaN when an
    exponent is not positive (then L has no interior minimum)."""
    c6 = np.asarray(flops, float) / 6
    if self.alpha <= 0 or self.beta <= 0:
      return np.full_like(c6, np.nan), np.full_like(c6, np.nan)
    g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
    return g * c6 ** self.a, c6 ** self.b / g

  def summary(self) -> dict:
    names = ('E', 'A', 'B', 'alpha', 'beta', 'a', 'b')
    return {n: getattr(self, n) for n in names} | {'ci': self.ci, 'num_points': self.num_points}


def _objective(theta, log_n, log_d, log_l, delta):
  """Huber loss of the log-space law and its gradient; theta = (a, b, e, alpha, beta)."""
  a, b, e, alpha, beta = theta
  terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
  pred = special.logsumexp(terms, axis=0)
  r = pred - log_l
  small = np.abs(r) <= delta
  value = np.sum(np.where(small, 0.5 * r ** 2, delta * (np.abs(r) - 0.5 * delta)))
  w = np.exp(terms - pred) * np.clip(r, -delta, delta)   # d value / d term, [3, points]
  grad = np.array([w[0].sum(), w[1].sum(), w[2].sum(), -(w[0] * log_n).sum(),
                   -(w[1] * log_d).sum()])
  return value, grad


def _huber_at(thetas, log_n, log_d, log_l, delta):
  """The objective at many thetas at once ([K, 5] -> [K])."""
  a, b, e, alpha, beta = (thetas[:, i, None] for i in range(5))
  terms = np.stack([a - alpha * log_n, b - beta * log_d, np.broadcast_to(e, a.shape)
                    * np.ones_like(log_n)])
  r = np.abs(special.logsumexp(terms, axis=0) - log_l)
  return np.sum(np.where(r <= delta, 0.5 * r ** 2, delta * (r - 0.5 * delta)), axis=1)


def _single_threaded_blas():
  """L-BFGS-B's BLAS calls on 5-vectors are ~10x slower when scipy's OpenBLAS wakes its
  threads (on a busy machine); one thread is plenty for these sizes."""
  libs = glob.glob(os.path.join(os.path.dirname(os.path.dirname(scipy.__file__)), 'scipy.libs',
                                'libscipy_openblas*.so'))
  for lib in libs:
    with contextlib.suppress(OSError, AttributeError):
      ctypes.CDLL(lib).scipy_openblas_set_num_threads(1)


def _minimise(starts, log_n, log_d, log_l, delta):
  """All L-BFGS results from `starts`, best first, as (objective, theta)."""
  _single_threaded_blas()
  out = []
  for x0 in starts:
    res = optimize.minimize(_objective, x0, args=(log_n, log_d, log_l, delta), jac=True,
                            method='L-BFGS-B', bounds=BOUNDS,
                            options=dict(maxiter=2000, ftol=1e-15, gtol=1e-12))
    if np.all(np.isfinite(res.x)) and np.isfinite(res.fun):
      out.append((float(res.fun), res.x))
  out.sort(key=lambda t: t[0])
  return out


def _theta_to_fit(theta, objective, num_points) -> LawFit:
  a, b, e, alpha, beta = theta
  return LawFit(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=float(alpha),
                beta=float(beta), objective=objective, num_points=num_points)


def fit_law(n: Sequence[float], d: Sequence[float], loss: Sequence[float], *,
            delta: float = HUBER_DELTA, starts: int = 64, bootstrap: int = 200,
            confidence: float = 0.95,
            target_flops: float | None = None, seed: int = 0,
            init_grid: Sequence[Sequence[float]] = INIT_GRID) -> LawFit:
  """Approach 3 on runs with N params, D tokens and final loss L (1-D arrays of one length).

  `bootstrap` resamples give `ci[name] = (low, high)` at `confidence` for E, A, B, alpha, beta,
  a, b (and N_opt, D_opt, loss_opt at `target_flops` if given).
  """
  n, d, loss = (np.asarray(x, float) for x in (n, d, loss))
  sizes, tokens = len(np.unique(n)), len(np.unique(d))
  if len(n) < 6 or sizes < 2 or tokens < 2:
    raise ConfigError(
        f'fitting L(N, D) = E + A/N^alpha + B/D^beta needs at least 6 finished runs with 2 or more '
        f'model sizes and token counts; found {len(n)} runs ({sizes} sizes, {tokens} token '
        'counts); run more sweep points.')
  if np.any(n <= 0) or np.any(d <= 0) or np.any(~np.isfinite(loss)) or np.any(loss <= 0):
    raise ConfigError('N, D and the loss of every run must be positive and finite; drop the '
                      'runs that diverged.')
  data = (np.log(n), np.log(d), np.log(loss))
  grid = np.array(list(itertools.product(*init_grid)))   # rows: alpha, beta, e, a, b
  grid = grid[:, [3, 4, 2, 0, 1]]                         # as theta: a, b, e, alpha, beta
  starts = grid[np.argsort(_huber_at(grid, *data, delta), kind='stable')[:starts]]
  results = _minimise(starts, *data, delta)
  best_value, best = results[0]
  fit = _theta_to_fit(best, best_value, len(n))
  if bootstrap:
    # Refit each resample from the best solution and the next-best distinct one.
    seeds = [best] + [x for _, x in results[1:] if np.max(np.abs(x - best)) > 1e-3][:1]
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
      idx = rng.integers(0, len(n), len(n))
      if len(np.unique(n[idx])) < 2 or len(np.unique(d[idx])) < 2:
        continue
      value, theta = _minimise(seeds, *(x[idx] for x in data), delta)[0]
      f = _theta_to_fit(theta, value, len(n))
      sample = {k: getattr(f, k) for k in ('E', 'A', 'B', 'alpha', 'beta', 'a', 'b')}
      if target_flops:
        n_opt, d_opt = f.optimal(target_flops)
        sample |= {'N_opt': float(n_opt), 'D_opt': float(d_opt),
                   'loss_opt': float(f.loss(n_opt, d_opt))}
      samples.append(sample)
    tail = 100 * (1 - confidence) / 2
    fit.ci = {k: (float(np.nanpercentile([s[k] for s in samples], tail)),
                  float(np.nanpercentile([s[k] for s in samples], 100 - tail)))
              for k in samples[0]} if samples else {}
  return fit


def numeric_optimum(fit: LawFit, flops: float) -> tuple[float, float]:
  """(N_opt, D_opt) at `flops` by minimising L(N, flops / (6N)) over log N numerically (to
  check the closed form)."""
  res = optimize.minimize_scalar(lambda x: fit.loss(math.exp(x), flops / (6 * math.exp(x))),
                                 bounds=(0, math.log(flops / 6)), method='bounded',
                                 options=dict(xatol=1e-10))
  n_opt = math.exp(res.x)
  return n_opt, flops / (6 * n_opt)


# ----------------------------------------------------------------------------- approach 2

@dataclasses.dataclass
class IsoFlopFit:
  """Per-budget parabola vertices and the power laws N_opt = k_n C^a, D_opt = k_d C^b."""
  budgets: list               # C of each budget (FLOPs)
  n_opt: list                 # vertex N of each budget's parabola in log N
  d_opt: list                 # vertex D of each budget's parabola in log D
  loss_opt: list              # the parabola's loss at its vertex (in log N)
  parabolas: list             # per budget: (c2, c1, c0) of L = c2 x^2 + c1 x + c0, x = ln N
  a: float
  k_n: float
  b: float
  k_d: float
  inside: list = dataclasses.field(default_factory=list)   # per budget: vertex within its sizes

  def optimal(self, flops):
    c = np.asarray(flops, float)
    return self.k_n * c ** self.a, self.k_d * c ** self.b

  def summary(self) -> dict:
    return {k: getattr(self, k) for k in ('a', 'k_n', 'b', 'k_d', 'budgets', 'n_opt', 'd_opt',
                                          'loss_opt', 'inside')}


def _vertex(x, y, what: str, budget: float):
  c2, c1, c0 = np.polyfit(x, y, 2)
  if c2 <= 0:
    raise ConfigError(f'the loss of budget C={budget:.3g} has no minimum in {what} (the '
                      'parabola opens downwards); add model sizes on both sides of the optimum.')
  x_opt = -c1 / (2 * c2)
  return x_opt, c0 - c1 ** 2 / (4 * c2), (c2, c1, c0)


def fit_isoflop(budget: Sequence[float], n: Sequence[float], d: Sequence[float],
                loss: Sequence[float]) -> IsoFlopFit:
  """Approach 2 on runs grouped by their compute budget `budget` (one value per run)."""
  budget, n, d, loss = (np.asarray(x, float) for x in (budget, n, d, loss))
  groups = {c: np.flatnonzero(budget == c) for c in np.unique(budget)}
  small = {c: len(i) for c, i in groups.items() if len(np.unique(n[i])) < 3}
  if len(groups) < 2 or small:
    raise ConfigError(
        f'IsoFLOP fits need at least 3 model sizes in each of at least 2 compute budgets; found '
        f'{len(groups)} budgets' + (f', of which {len(small)} have fewer than 3 sizes' if small
                                    else '') + '; run more sweep points.')
  rows = []
  for c, i in sorted(groups.items()):
    xn, l_opt, parabola = _vertex(np.log(n[i]), loss[i], 'log N', c)
    xd, _, _ = _vertex(np.log(d[i]), loss[i], 'log D', c)
    inside = bool(n[i].min() <= math.exp(xn) <= n[i].max())
    rows.append((c, math.exp(xn), math.exp(xd), l_opt, parabola, inside))
  cs, n_opt, d_opt, l_opt, parabolas, inside = map(list, zip(*rows))
  if sum(inside) < 2:
    outside = ', '.join(f'{c:.3g}' for c, ok in zip(cs, inside) if not ok)
    raise ConfigError(
        f'IsoFLOP fits need the loss minimum inside the model sizes of at least 2 budgets; at C = '
        f'{outside} it lies outside them (extrapolated); add model sizes on the side of the '
        'minimum.')
  use = np.array(inside)
  a, log_kn = np.polyfit(np.log(cs)[use], np.log(n_opt)[use], 1)
  b, log_kd = np.polyfit(np.log(cs)[use], np.log(d_opt)[use], 1)
  return IsoFlopFit(budgets=cs, n_opt=n_opt, d_opt=d_opt, loss_opt=l_opt, parabolas=parabolas,
                    a=float(a), k_n=math.exp(log_kn), b=float(b), k_d=math.exp(log_kd),
                    inside=inside)
