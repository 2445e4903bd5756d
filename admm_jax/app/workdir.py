"""The files of a run's workdir: layout, writability check, atomic JSON, the metrics log.

Layout of a workdir:
  checkpoints/<stage>/<step>/   in-progress state of a stage (orbax), newest `max_checkpoints`
  outputs/<stage>/0/            the stage's result: {"params", "batch_stats"} (orbax)
  outputs/<stage>.json          written last: the stage is finished (its record)
  metrics.jsonl                 one line per epoch and stage
  tensorboard/<stage>/          the same curves as TensorBoard event files (tensorboard_log)
  report.json                   the result of the run (rewritten after every stage)
  run.lock                      pid, host and start of the run using the workdir (reliability)
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax

from admm_jax.app import reliability, tensorboard_log
from admm_jax.app.errors import UserError

# A crash or a full disk never leaves half a file; the disk's errors are one sentence.
write_json_atomic = reliability.write_json_atomic


class WorkdirError(UserError, RuntimeError):
  """The workdir cannot be used; the message says why and what to do."""


def prepare_workdir(workdir: str) -> str:
  """Absolute, existing, writable workdir (checked with a probe file before any work)."""
  path = os.path.abspath(os.path.expanduser(workdir))
  try:
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, f".write_probe_{jax.process_index()}_{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(f"workdir {path!r} is not writable ({e.strerror}): choose another "
                       "--workdir or fix its permissions.") from None
  return path


@dataclasses.dataclass(frozen=True)
class StagePaths:
  """Where one stage keeps its files inside a workdir."""
  checkpoints: str   # in-progress states
  output: str        # the finished stage's {"params", "batch_stats"}
  done: str          # its record; exists only once the stage has finished


def stage_paths(workdir: str, stage: str) -> StagePaths:
  return StagePaths(os.path.join(workdir, "checkpoints", stage),
                    os.path.join(workdir, "outputs", stage),
                    os.path.join(workdir, "outputs", f"{stage}.json"))


class MetricsLog:
  """metrics.jsonl: one JSON line per (stage, epoch); a resumed stage replaces its later lines.

  Every line, and the training points logged during its epoch (`log_step`, kept in the line as
  `train_steps`: [step, adversarial loss, adversarial accuracy]), also go to TensorBoard event
  files under `tensorboard_dir` (admm_jax.tensorboard_log).
  """

  def __init__(self, path: str, enabled: bool = True, tensorboard_dir: str | None = None):
    self.path, self.enabled = path, enabled
    self.events = (tensorboard_log.StageWriters(tensorboard_dir)
                   if enabled and tensorboard_dir else None)
    self._steps, self._sums = [], None

  def truncate(self, stage: str, completed_epochs: int, resume_step: int = 0) -> None:
    """Drops `stage`'s lines past its `completed_epochs` (written after the resumed checkpoint)
    and starts its event file, where TensorBoard drops the points from `resume_step` on."""
    self._steps, self._sums = [], None
    if self.events is not None:
      self.events.start(stage, resume_step)
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = [json.loads(x) for x in f if x.strip()]
    keep = [x for x in lines
            if not (x.get("stage") == stage and x.get("epoch", 0) > completed_epochs)]
    if len(keep) != len(lines):
      tmp = self.path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(json.dumps(x, sort_keys=True) + "\n" for x in keep)
      os.replace(tmp, self.path)

  def log_step(self, stage: str, step: int, sums: dict[str, Any]) -> None:
    """Training adversarial loss/accuracy over the steps since the previous call, from the
    epoch's running sums (`loss`, `correct`, `count`)."""
    if not self.enabled:
      return
    now = [float(sums["loss"]), float(sums["correct"]), float(sums["count"])]
    last = self._sums if self._sums and self._sums[2] <= now[2] else [0.0, 0.0, 0.0]
    self._sums = now
    count = now[2] - last[2]
    if count > 0:
      point = [int(step), (now[0] - last[0]) / count, (now[1] - last[1]) / count]
      self._steps.append([point[0], round(point[1], 6), round(point[2], 6)])
      if self.events is not None:
        self.events.scalars(stage, step, {"train/adversarial_loss": point[1],
                                          "train/adversarial_accuracy": point[2]})

  def write(self, record: dict[str, Any]) -> None:
    """Appends an epoch line (with the epoch's training points) and writes its event file."""
    if not self.enabled:
      return
    record = dict(record, train_steps=self._steps) if self._steps else record
    self._steps, self._sums = [], None
    with open(self.path, "a") as f:
      f.write(json.dumps(record, sort_keys=True) + "\n")
    if self.events is not None:
      self.events.scalars(record["stage"], record["step"], tensorboard_log.epoch_scalars(record))
      self.events.flush(record["stage"])

  def close(self) -> None:
    if self.events is not None:
      self.events.close()
