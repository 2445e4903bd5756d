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
import jax.numpy as jnp
import orbax.checkpoint as ocp

from admm_jax.app import reliability
from admm_jax.app.errors import UserError


class CheckpointError(UserError, RuntimeError):
  """No readable checkpoint where one was expected."""


def manager(directory: str | os.PathLike[str], max_to_keep: int = 2) -> ocp.CheckpointManager:
  """A CheckpointManager on an absolute path, keeping the newest `max_to_keep` steps."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: Any) -> None:
  """Saves `state` at `step` and waits until it is on disk (a resumable point).

  Raises:
    reliability.DiskError: the disk is full or unwritable; the older steps stay as they were
      (orbax writes into a temporary directory and renames it only when complete).
  """
  if step in mngr.all_steps():
    # Only a step restore_latest skipped as unreadable can be ahead of the resumed state.
    logging.warning("replacing the unreadable checkpoint step %d in %s", step, mngr.directory)
    mngr.delete(step)
  with reliability.disk_errors(f"writing checkpoint step {step} to {mngr.directory}"):
    mngr.save(step, args=ocp.args.StandardSave(state), force=True)
    mngr.wait_until_finished()


def save_output(directory: str | os.PathLike[str], tree: Any) -> bool:
  """Saves a stage's result as step 0 of `directory`, whatever an earlier attempt left there.

  A run stopped between this save and the stage's marker left a step 0 behind: reused when
  it restores to exactly `tree`, replaced when it is unreadable or differs (it was never
  marked finished, so it is no result yet). Returns True when it was reused.
  """
  with manager(directory, 1) as mngr:
    if 0 in mngr.all_steps():
      try:
        old = mngr.restore(0, args=ocp.args.StandardRestore(abstract_like(tree)))
        same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b, equal_nan=True)), old, tree)
        if all(jax.tree.leaves(same)):
          return True
        reason = "it differs from this run's result"
      except Exception as e:  # damaged: orbax raises ValueError/FileNotFoundError/...
        reason = f"it is unreadable: {str(e).splitlines()[0][:200]}"
      logging.warning("replacing the unfinished output in %s (%s)", mngr.directory, reason)
      mngr.delete(0)
    save(mngr, 0, tree)
  return False


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
