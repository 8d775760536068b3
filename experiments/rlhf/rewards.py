"""Programmatic rewards of the RLHF experiment: the preference known in code.

A prompt is a function signature (`def name(args):`), a completion its body; the function is
the two joined by a newline. Each `f(prompts, completions) -> one float per completion` here is
a GRPO/PPO reward function (`grpo.reward_funcs='experiments.rlhf.rewards:true_rewards'`), and
`true_reward` labels the comparisons the reward model and DPO learn from (make_pairs.py).
"""
from __future__ import annotations

import ast
import warnings
from typing import Optional

DOCSTRING_BONUS = 0.5
LENGTH_COST = 0.002     # per character of the body


def _function(signature: str, body: str) -> Optional[ast.Module]:
  """The parsed function, or None where it does not parse (or the body is empty)."""
  if not body.strip():
    return None
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')
      return ast.parse(f'{signature}\n{body}')
  except (SyntaxError, ValueError, RecursionError, MemoryError):
    return None


def parses_as_python(prompts: list[str], completions: list[str]) -> list[float]:
  """1 for a body that makes the function parse, else 0."""
  return [float(_function(p, c) is not None) for p, c in zip(prompts, completions)]


def true_reward(signature: str, body: str) -> float:
  """The preference of the experiment: the function parses (+1) and has a docstring (+0.5);
  a shorter body is better (-0.002 per character)."""
  tree = _function(signature, body)
  score = -LENGTH_COST * len(body)
  if tree is not None:
    score += 1.0
    if any(isinstance(n, ast.FunctionDef) and ast.get_docstring(n) for n in ast.walk(tree)):
      score += DOCSTRING_BONUS
  return score


def true_rewards(prompts: list[str], completions: list[str]) -> list[float]:
  """`true_reward` of each (signature, body)."""
  return [true_reward(p, c) for p, c in zip(prompts, completions)]
