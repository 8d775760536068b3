"""Regex rules over `/`-joined parameter paths: what LoRA adapts, what is quantised, what is
trained when the rest is frozen. The same rule system as the optimizer's weight-decay mask
(`flaxllm.train.optim.decay_mask`): a path is selected when any regex matches it (re.search).

    select(params, ['q_proj', 'v_proj'])        -> ['decoder/layers/attn/q_proj/kernel', ...]
    select(params, 'all-linear', kernels=True)  -> every Linear kernel except the output head
    mask(params, [r'norm/', r'lm_head/'])       -> pytree of bools like params (optax masks)
"""
from __future__ import annotations

import re
from typing import Any, Sequence, Union

import flax

from flaxllm.models.config import ConfigError

ALL_LINEAR = 'all-linear'
# Linear kernels that 'all-linear' leaves out: the output head (as PEFT does) and embeddings.
_NOT_ALL_LINEAR = re.compile(r'(^|/)(lm_head|embed|pos_embed)/')

Rules = Union[str, Sequence[str]]


class RuleError(ConfigError):
  """Rules that select nothing, or select something that cannot be adapted."""


def flatten(tree) -> dict[str, Any]:
  """{'decoder/layers_0/attn/q_proj/kernel': leaf, ...}; LoRA/quantised kernel objects stay
  leaves (only dicts are descended into)."""
  return {'/'.join(k): v for k, v in flax.traverse_util.flatten_dict(
      flax.core.unfreeze(tree) if isinstance(tree, flax.core.FrozenDict) else tree).items()}


def unflatten(flat: dict[str, Any]):
  return flax.traverse_util.unflatten_dict({tuple(k.split('/')): v for k, v in flat.items()})


def as_list(rules: Rules) -> list[str]:
  if isinstance(rules, str):
    return [r.strip() for r in rules.split(',') if r.strip()] if rules != ALL_LINEAR else [rules]
  return [str(r) for r in rules]


def compile_rules(rules: Rules, what: str = 'rule') -> list[tuple[str, Any]]:
  out = []
  for r in as_list(rules):
    if r == ALL_LINEAR:
      out.append((r, None))
      continue
    try:
      out.append((r, re.compile(r)))
    except re.error as e:
      raise RuleError(f'{what} {r!r} is not a valid regex ({e}); fix or remove it.') from None
  return out


def is_kernel(path: str, leaf) -> bool:
  """A Linear kernel: a `.../kernel` leaf with at least 2 dims (or a kernel object)."""
  return path.endswith('/kernel') and (len(getattr(leaf, 'shape', ())) >= 2 or
                                       hasattr(leaf, 'contract'))


def select(params, rules: Rules, *, kernels: bool = False, what: str = 'rule') -> list[str]:
  """Paths selected by `rules` (regexes, or 'all-linear'), in tree order; with `kernels=True`
  only Linear kernels are candidates. A rule that matches nothing is a RuleError."""
  flat = flatten(params)
  candidates = [p for p, v in flat.items() if not kernels or is_kernel(p, v)]
  compiled = compile_rules(rules, what)
  if not compiled:
    raise RuleError(f'the {what}s are empty; give regexes over parameter paths or '
                    f"'{ALL_LINEAR}'.")
  chosen = set()
  for text, pattern in compiled:
    if pattern is None:
      hits = [p for p in candidates if is_kernel(p, flat[p]) and not _NOT_ALL_LINEAR.search(p)]
    else:
      hits = [p for p in candidates if pattern.search(p)]
    if not hits:
      example = next(iter(candidates), '(none)')
      kind = 'Linear kernel' if kernels else 'parameter'
      raise RuleError(f'{what} {text!r} matches no {kind} of the model (paths look like '
                      f'{example!r}); fix the regex.')
    chosen.update(hits)
  return [p for p in candidates if p in chosen]


def mask(params, rules: Rules, *, what: str = 'rule'):
  """A pytree of bools like `params`: True where a rule selects the path (an optax mask)."""
  chosen = set(select(params, rules, what=what))
  return unflatten({p: p in chosen for p in flatten(params)})


def top_layers(n: int, num_layers: int) -> list[str]:
  """Regexes for the top `n` of `num_layers` unrolled layers (`layers_{i}`), e.g. to train
  only them with finetune.method='freeze'. Scanned layers are one stacked array per weight,
  so they cannot be split by layer: use scan_layers=False for that."""
  if not 0 < n <= num_layers:
    raise RuleError(f'top_layers n={n} must be in [1, {num_layers}]; pick a layer count that '
                    'the model has.')
  return [rf'(^|/)layers_{i}/' for i in range(num_layers - n, num_layers)]
