"""Programmatic rewards of the RLHF experiment: the preference known in code.

Each is a GRPO reward function, `f(prompts, completions) -> one float per completion`
(`grpo.reward_funcs='experiments.rlhf.rewards:parses_as_python'`), and `true_reward` labels the
preference pairs the reward model and DPO learn from.
"""
from __future__ import annotations

import ast
import warnings


def _parses(text: str) -> bool:
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')
      ast.parse(text)
    return bool(text.strip())
  except (SyntaxError, ValueError, RecursionError):
    return False


def parses_as_python(prompts: list[str], completions: list[str]) -> list[float]:
  """1 for a completion that parses as Python (and is not empty), else 0."""
  del prompts
  return [float(_parses(c)) for c in completions]


def true_reward(completion: str) -> float:
  """The preference of the experiment: parses as Python (+1), has a docstring (+0.5), shorter
  is better (-0.002 per character)."""
  score = 0.0
  if _parses(completion):
    score += 1.0
    tree = ast.parse(completion)
    if any(ast.get_docstring(n) for n in ast.walk(tree)
           if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.Module))):
      score += 0.5
  return score - 0.002 * len(completion)


def true_rewards(prompts: list[str], completions: list[str]) -> list[float]:
  """`true_reward` of each completion (a GRPO reward function)."""
  del prompts
  return [true_reward(c) for c in completions]
