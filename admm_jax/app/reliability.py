"""Nothing lost, whatever happens: the pieces the stage loop calls at its few hook points.

Every event ends in one of two states: the run resumes to the same numbers, or it stops
with one sentence saying what to do (a `RunStopped` error; the CLI prints it and exits with
its `exit_code`).

* `workdir_lock`: one run per workdir. The lock file names pid, host and start time; a lock
  whose process is gone (same host) is stale and taken over. Multi-host: process 0 holds it.
* `StopRequests`: SIGTERM / SIGINT set a flag that the loop reads at step boundaries, then
  it checkpoints and stops (exit 128 + signal). Multi-host: JAX's preemption service owns
  SIGTERM (its sync point makes every process stop at the same step); a Ctrl-C on any
  process is agreed on at logging intervals. Evaluations read the same flag between batches,
  and a jitted attack reads it inside its loops (`stop_signalled`, through a host callback:
  admm_jax.evaluate), so a stop during a long attack is prompt too.
* `check_finite`: a NaN/Inf loss or weight stops the stage before anything non-finite is
  saved.
* `chance_warnings`: a stage whose accuracy ends at chance level says so.
* `disk_errors`, `write_json_atomic`: a full or unwritable disk is one sentence.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import signal
import socket
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from admm_jax.app.errors import UserError

LOCK_FILE = "run.lock"
# Errors that mean "the disk, not the program": full, over quota, read-only, no permission.
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)
_DISK_WORDS = ("No space left", "Disk quota", "Read-only file system", "Permission denied",
               "RESOURCE_EXHAUSTED")


class RunStopped(UserError, RuntimeError):
  """The run stopped on purpose; the message is one sentence for the user."""
  exit_code = 2


class WorkdirBusy(RunStopped):
  """Another live run holds the workdir."""


class Diverged(RunStopped):
  """The loss or the weights became NaN/Inf."""


class DiskError(RunStopped):
  """A write failed because the disk is full or unwritable."""


class Interrupted(RunStopped):
  """SIGTERM/SIGINT: a checkpoint was saved at a step boundary; rerun to resume."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.exit_code = 128 + signum   # the shell's convention: 143 SIGTERM, 130 SIGINT


# --------------------------------------------------------------------------- the lock

def _process_start(pid: int) -> str | None:
  """The kernel's start time of `pid` (tells a reused pid apart); None where unknown."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rpartition(")")[2].split()[19]
  except (OSError, IndexError):
    return None


def _alive(pid: int, start: str | None) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:   # exists, another user's
    pass
  now = _process_start(pid)
  return start is None or now is None or now == start


def _holder_info() -> dict[str, Any]:
  return {"pid": os.getpid(), "host": socket.gethostname(), "proc_start": _process_start(
      os.getpid()), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def _write_new(path: str, info: dict[str, Any], replace: bool) -> bool:
  """Writes `info` to `path` complete or not at all; without `replace`, only if absent."""
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "w") as f:
    json.dump(info, f)
  try:
    if replace:
      os.replace(tmp, path)
      return True
    os.link(tmp, path)  # atomic create-if-absent, and the file is whole when it appears
    return True
  except FileExistsError:
    return False
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)


def _read_holder(path: str) -> dict[str, Any] | None:
  try:
    with open(path) as f:
      info = json.load(f)
    return info if isinstance(info, dict) and isinstance(info.get("pid"), int) else None
  except (OSError, ValueError):
    return None


@contextlib.contextmanager
def _exclusive(directory: str) -> Iterator[None]:
  """Serialises lock takeovers among processes on this host (flock on the directory)."""
  fd = os.open(directory, os.O_RDONLY)
  try:
    with contextlib.suppress(OSError):  # a filesystem without flock: best effort
      fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)  # releases the flock


def acquire_lock(workdir: str) -> str:
  """Takes `workdir`'s lock for this process; returns the lock file's path.

  Raises:
    WorkdirBusy: a live process (or one on another host) holds it.
  """
  path = os.path.join(workdir, LOCK_FILE)
  mine = _holder_info()
  with _exclusive(workdir):
    if _write_new(path, mine, replace=False):
      return path
    holder = _read_holder(path)
    here = holder is not None and holder.get("host") == mine["host"]
    if holder is not None and not (here and not _alive(holder["pid"], holder.get("proc_start"))):
      where = "this host" if here else f"host {holder.get('host')!r}"
      raise WorkdirBusy(
          f"workdir {workdir} is in use by pid {holder['pid']} on {where} (since "
          f"{holder.get('started', '?')}): wait for that run to end or choose another "
          f"--workdir; if that run is gone, delete {path}.")
    logging.warning("taking over %s: %s", path, "its process is gone" if holder else
                    "it is unreadable")
    _write_new(path, mine, replace=True)
  return path


def release_lock(path: str) -> None:
  """Removes the lock file if this process still holds it."""
  holder = _read_holder(path)
  if holder is not None and holder["pid"] == os.getpid():
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[None]:
  """Holds `workdir`'s lock for the block (process 0 on behalf of all processes)."""
  path, error = None, ""
  if jax.process_index() == 0:
    try:
      path = acquire_lock(workdir)
    except WorkdirBusy as e:
      error = str(e)
  if jax.process_count() > 1:  # every process stops together, none waits forever
    busy = bool(multihost_utils.broadcast_one_to_all(np.int32(bool(error))))
    error = error or ("process 0 could not lock the workdir: see its log." if busy else "")
  if error:
    raise WorkdirBusy(error)
  try:
    yield
  finally:
    if path:
      release_lock(path)


# ----------------------------------------------------------------- signals, preemption

def _preemption_service() -> bool:
  """JAX's distributed runtime installed its own SIGTERM notifier (multi-host runs)."""
  from jax._src import distributed  # pylint: disable=import-outside-toplevel
  return distributed.global_state.preemption_sync_manager is not None


# The StopRequests installed now (innermost last): what `stop_signalled` reads.
_INSTALLED: list[StopRequests] = []


def stop_signalled() -> int | None:
  """The SIGTERM/SIGINT an installed StopRequests has seen, else None; from any thread, also
  while the main thread is blocked in a computation (`StopRequests.seen`). This process's
  view, no agreement across processes: for host callbacks inside jitted code."""
  for s in _INSTALLED:
    signum = s.seen()
    if signum is not None:
      return signum
  return None


class StopRequests:
  """SIGTERM / SIGINT -> a flag read at step boundaries (`requested`), never mid-step.

  Inactive until `installed()`; a second Ctrl-C stops at once (KeyboardInterrupt).
  """

  def __init__(self, agree_every: int = 1):
    self.signum: int | None = None
    self.agree_every = max(1, agree_every)
    self._calls = 0
    self._wakeup: int | None = None   # read end of the signal wakeup pipe, while installed
    self._seen: int | None = None
    self._signals: tuple[int, ...] = ()

  def seen(self) -> int | None:
    """The stop signal received so far, from any thread (cheap: a non-blocking read).

    Python runs signal handlers in the main thread between bytecodes, so while the main
    thread waits in a computation (on CPU a program with host callbacks runs synchronously)
    `signum` stays unset; the C-level handler writes the signal's number to the wakeup pipe
    at once (signal.set_wakeup_fd), which a callback on an XLA thread can read.
    """
    if self.signum is not None:
      return self.signum
    if self._seen is None and self._wakeup is not None:
      try:
        data = os.read(self._wakeup, 64)
      except OSError:  # empty (EAGAIN) or closed
        data = b""
      self._seen = next((b for b in data if b in self._signals), None)
    return self._seen

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signum = signum

  @contextlib.contextmanager
  def installed(self) -> Iterator[StopRequests]:
    """Handles SIGTERM/SIGINT during the block (main thread only), then restores handlers."""
    signals = [signal.SIGINT] + ([] if _preemption_service() else [signal.SIGTERM])
    previous, pipe, previous_fd = {}, None, -1
    try:
      for s in signals:
        previous[s] = signal.signal(s, self._handle)
      pipe = os.pipe()
      for fd in pipe:
        os.set_blocking(fd, False)
      previous_fd = signal.set_wakeup_fd(pipe[1], warn_on_full_buffer=False)
      self._wakeup, self._signals = pipe[0], tuple(int(s) for s in signals)
    except ValueError:  # not the main thread: leave signals alone
      pass
    _INSTALLED.append(self)
    try:
      yield self
    finally:
      _INSTALLED.remove(self)
      if self._wakeup is not None:
        signal.set_wakeup_fd(previous_fd)
        self._wakeup = None
      for fd in pipe or ():
        os.close(fd)
      for s, handler in previous.items():
        signal.signal(s, handler)

  def requested(self, step: int) -> bool:
    """Should the loop stop after `step`? Every process calls it at every step boundary."""
    if jax.process_count() == 1:
      return self.signum is not None
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
    # JAX's sync point wants increasing ids; stages restart their steps, so count calls.
    self._calls += 1
    if ocp.multihost.reached_preemption(self._calls):  # the same boundary on every process
      self.signum = self.signum or signal.SIGTERM
      return True
    if step % self.agree_every:
      return False
    flags = multihost_utils.process_allgather(np.int32(self.signum or 0))
    self.signum = self.signum or int(np.max(flags)) or None
    return self.signum is not None

  def stop(self, stage: str, step: int) -> None:
    """Raises Interrupted: the loop has just saved `step`."""
    self.stop_where(f"{stage} stopped at step {step} with a checkpoint")

  def stop_where(self, what: str) -> None:
    """Raises Interrupted: "<SIGNAL> received: <what>; run the same command again to resume."."""
    signum = self.seen() or stop_signalled() or signal.SIGTERM
    raise Interrupted(f"{signal.Signals(signum).name} received: {what}; run the same command "
                      "again to resume.", signum)


# ------------------------------------------------------------------ numerical guards

@jax.jit
def _all_finite(tree: Any) -> jax.Array:
  return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def check_finite(stage: str, step: int, loss_sum: Any, params: Any, lr: float,
                 last_good: int | None) -> None:
  """Raises Diverged when the running loss or any weight is NaN/Inf (call before saving).

  Args:
    loss_sum: the epoch's running sum of the training loss (NaN/Inf once any step was).
    last_good: the newest saved step of the stage, which a rerun resumes from (None: none).
  """
  loss = float(jax.device_get(loss_sum))
  if math.isfinite(loss) and bool(_all_finite(params)):
    return
  what = f"the training loss is {loss}" if not math.isfinite(loss) else "a weight is NaN/Inf"
  resume = (f"it resumes from the last finite checkpoint (step {last_good})"
            if last_good is not None else "the stage starts over")
  raise Diverged(f"{stage} diverged at step {step} ({what}): lower {stage}.lr (now {lr:g}) or "
                 f"raise {stage}.warmup_epochs and run the same command again; {resume}.")


def chance_level(accuracy: float, num_classes: int, examples: int) -> bool:
  """Is `accuracy` on `examples` balanced examples indistinguishable from guessing?

  Chance is 1 / num_classes; the margin is three binomial standard deviations (small
  splits) but at least a quarter of chance (large ones).
  """
  chance = 1.0 / num_classes
  margin = max(0.25 * chance, 3 * math.sqrt(chance * (1 - chance) / max(examples, 1)))
  return accuracy <= chance + margin


def chance_warnings(stage: str, accuracy: float | None, num_classes: int, examples: int,
                    lr: float) -> list[str]:
  """[one warning sentence] when `stage` ended at chance level, else []."""
  if accuracy is None or math.isnan(accuracy) or not chance_level(accuracy, num_classes,
                                                                  examples):
    return []
  cause = {"admm": f"admm.lr={lr:g} or admm.rho is too high",
           "retrain": "config.sparsity prunes too much for this model (or retrain.lr="
                      f"{lr:g} is too high)"}.get(stage, f"{stage}.lr={lr:g} is too high")
  return [f"{stage} ended at chance level (natural accuracy {accuracy:.4f}, chance "
          f"{1 / num_classes:.4f}): likely {cause}, or the data is broken; change it and run "
          "again in a new --workdir."]


# ---------------------------------------------------------------------- disk writes

def disk_error_reason(error: BaseException) -> str | None:
  """The OS's words when `error` (or its cause) is a full/unwritable disk, else None."""
  while error is not None:
    if isinstance(error, OSError) and error.errno in DISK_ERRNOS:
      return error.strerror or os.strerror(error.errno)
    text = str(error)
    for words in _DISK_WORDS:
      if words in text:
        return words
    error = error.__cause__ or error.__context__
  return None


@contextlib.contextmanager
def disk_errors(action: str) -> Iterator[None]:
  """Turns a full/unwritable disk inside the block into one DiskError sentence.

  Args:
    action: what the block does, for the sentence ("writing checkpoint step 6 to <dir>").
  """
  try:
    yield
  except RunStopped:
    raise
  except Exception as e:
    reason = disk_error_reason(e)
    if reason is None:
      raise
    path = str(getattr(e, "filename", None) or "")
    detail = f"{reason}: {path}" if path and path not in action else reason
    raise DiskError(f"{action} failed ({detail}): free disk space or fix permissions, then run "
                    "the same command again; it resumes from the last checkpoint.") from None


def write_json_atomic(path: str, obj: Any) -> None:
  """JSON via a temporary file and a rename: a crash or a full disk never leaves half a file."""
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with disk_errors(f"writing {path}"):
      with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
      os.replace(tmp, path)
  finally:
    with contextlib.suppress(OSError):
      os.remove(tmp)


def read_json(path: str, stage: str) -> dict[str, Any]:
  """A stage's finished marker; a damaged one says how to rebuild it."""
  try:
    with open(path) as f:
      return json.load(f)
  except ValueError:
    raise RunStopped(f"{path} (the record of the finished stage {stage!r}) is damaged: move it "
                     "aside and run the same command again; the stage is rebuilt from its last "
                     "checkpoint.") from None
