"""flaxllm's own lm-eval tasks: YAML configs over JSONL data in `data/`, built from the Python
standard library by `make_tasks.py` (committed; nothing is downloaded).

    flaxllm eval --model=DIR --tasks=flaxllm_stdlib_docname,flaxllm_stdlib_nextline,flaxllm_stdlib_ppl
    flaxllm eval --model=DIR --tasks=flaxllm_stdlib          # the tag: all three

`TASKS_DIR` is this folder; `task_manager` indexes it (with any other include paths and
lm-eval's catalogue) for `flaxllm eval --tasks` and for `eval_tasks` inside training.
"""
import functools
import os
from typing import Sequence

TASKS_DIR = os.path.dirname(os.path.abspath(__file__))


@functools.lru_cache(maxsize=4)
def task_manager(include_paths: tuple[str, ...] = ()):
  """lm-eval's TaskManager over flaxllm's tasks, `include_paths` (absolute) and its catalogue.
  Reads YAML only (a task's data loads when the task runs); indexing the catalogue takes
  seconds, so a process indexes once per set of include paths."""
  from lm_eval.tasks import TaskManager  # pylint: disable=import-outside-toplevel -- heavy, optional: only for harness tasks
  return TaskManager(include_path=[TASKS_DIR, *include_paths], include_defaults=True)


def local_tasks(manager, include_paths: Sequence[str] = ()) -> list[str]:
  """The task, group and tag names defined in flaxllm's folder and `include_paths` (not the
  catalogue's)."""
  folders = tuple(os.path.join(os.path.abspath(f), '') for f in (TASKS_DIR, *include_paths))
  own = {name for name, entry in manager.task_index.items()
         if entry.yaml_path and str(entry.yaml_path).startswith(folders)}
  tags = {name for name, entry in manager.task_index.items()
          if entry.yaml_path is None and entry.tags and entry.tags <= own}
  return sorted(own | tags)
