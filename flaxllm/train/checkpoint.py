"""Checkpoints of a run: orbax `CheckpointManager` under `<workdir>/checkpoints/<step>/`.

Each step directory holds two items: `state` (the TrainState: step, params, optimizer state,
rng) and `data` (the data iterator's JSON state), so a resumed run continues with exactly the
batches, updates and random numbers of an uninterrupted one.

Saves are asynchronous (training continues while arrays are written) and atomic: orbax writes
to a temporary directory and renames it when complete, so a crash mid-save leaves the previous
checkpoints untouched. A latest checkpoint that still cannot be read is moved aside to
`<workdir>/checkpoints_corrupt/` (never deleted) and the previous one is used.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

CHECKPOINT_DIR = 'checkpoints'
CORRUPT_DIR = 'checkpoints_corrupt'


class Checkpoints:
  """Save / restore (state, data iterator state) pairs of one workdir."""

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, CHECKPOINT_DIR)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=('state', 'data'))

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict) -> None:
    """Starts an asynchronous save of `state` and `data_state` at `step` (a no-op if a
    checkpoint of this step exists)."""
    if step in self.manager.all_steps():
      return
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    data=ocp.args.JsonSave(data_state)),
                      force=True)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """(state, data_state) of `step`; `abstract_state` gives shapes, dtypes and shardings."""
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return out.state, out.data

  def restore_latest(self, abstract_state: Any) -> Optional[tuple[int, Any, dict]]:
    """(step, state, data_state) of the newest readable checkpoint, or None if there is none.

    A checkpoint that fails to restore is moved to `checkpoints_corrupt/` with a warning and
    the next older one is tried.
    """
    for step in reversed(self.steps()):
      try:
        state, data_state = self.restore(step, abstract_state)
        return step, state, data_state
      except Exception as e:  # orbax/tensorstore raise many types.  pylint: disable=broad-except
        moved = self._move_aside(step)
        log.warning('Checkpoint %d in %s cannot be restored (%s: %s); moved it to %s and '
                    'falling back to the previous checkpoint.', step, self.directory,
                    type(e).__name__, str(e).splitlines()[0][:200] if str(e) else '', moved)
    return None

  def _move_aside(self, step: int) -> str:
    src = os.path.join(self.directory, str(step))
    dst_root = os.path.join(self.workdir, CORRUPT_DIR)
    os.makedirs(dst_root, exist_ok=True)
    dst = os.path.join(dst_root, f'{step}-{time.strftime("%Y%m%d-%H%M%S")}')
    if jax.process_index() == 0 and os.path.exists(src):
      shutil.move(src, dst)
    self.manager.reload()
    return dst

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
