"""orbax checkpoints of a stage's whole state, with a fallback past unreadable steps.

A checkpoint holds one pytree (params, batch statistics, optimizer state with Z/U/rho/masks,
step, best-so-far params): everything needed to continue a stage bit for bit. orbax writes
each step into a temporary directory and renames it when complete, so a crash mid-save
leaves the previous steps intact; we never delete a step because a restore failed.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """No readable checkpoint where one was expected."""


def manager(directory: str | os.PathLike[str], max_to_keep: int = 2) -> ocp.CheckpointManager:
  """A CheckpointManager on an absolute path, keeping the newest `max_to_keep` steps."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: Any) -> None:
  """Saves `state` at `step` and waits until it is on disk (a resumable point)."""
  mngr.save(step, args=ocp.args.StandardSave(state), force=True)
  mngr.wait_until_finished()


def abstract_like(state: Any) -> Any:
  """The shape/dtype(/sharding) skeleton of `state`, the target orbax restores into."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def restore_latest(mngr: ocp.CheckpointManager, like: Any) -> tuple[int | None, Any]:
  """Restores the newest readable step into the structure of `like`.

  Returns (None, None) when there is no step. A step that fails to read (truncated files,
  missing metadata) is reported and skipped, and the next older one is tried; if steps exist
  but none can be read, raises CheckpointError naming the directory (nothing is deleted).
  """
  steps = sorted(mngr.all_steps(), reverse=True)
  if not steps:
    return None, None
  target = abstract_like(like)
  errors = []
  for step in steps:
    try:
      return step, mngr.restore(step, args=ocp.args.StandardRestore(target))
    except Exception as e:  # orbax raises ValueError/FileNotFoundError/... for damaged steps
      logging.warning("checkpoint step %d in %s is unreadable (%s); trying an older one",
                      step, mngr.directory, str(e).splitlines()[0][:200])
      errors.append(f"step {step}: {str(e).splitlines()[0][:200]}")
  raise CheckpointError(f"no readable checkpoint in {mngr.directory} ({'; '.join(errors)}): move "
                        "the directory aside to start the stage afresh.")
