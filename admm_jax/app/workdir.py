"""The files of a run's workdir: layout, writability check, atomic JSON, the metrics log.

Layout of a workdir:
  checkpoints/<stage>/<step>/   in-progress state of a stage (orbax), newest `max_checkpoints`
  outputs/<stage>/0/            the stage's result: {"params", "batch_stats"} (orbax)
  outputs/<stage>.json          written last: the stage is finished (its record)
  config.json                   the config the stages were made with, and the accepted changes
  metrics.jsonl                 one line per epoch and stage
  tensorboard/<stage>/          the same curves as TensorBoard event files (tensorboard_log)
  report.json                   the result of the run (rewritten after every stage)
  run.lock                      pid, host and start of the run using the workdir (reliability)

The workdir remembers its config (`check_config`, `record_config`): config.json holds
config.to_dict() as JSON, written atomically before the first stage, and a history of the
changes later runs made. A rerun whose config differs in a field that shaped a finished or
running stage stops before any work (ConfigMismatch, one sentence: the fields, old -> new, and
the ways out), since skipping a finished stage or resuming a running one would otherwise mix
numbers made under the old config into a report labelled with the new one. Which field shapes
which stage:
  * fields in NO_RESULT_FIELDS shape no result: `stages` (a stage's numbers come from its own
    block, the shared fields and its input stage's output, not from the list: appending a
    stage is fine), logging and checkpoint intervals (a resumed run ends with the same
    numbers), `eval.final_*` and `eval.sanity_limit` (the evaluation hook keeps its own
    settings per result), `parallel.*` (the mesh; recorded in report.json's devices) and
    `data.tfds_dir`; `eval.select_by` does shape results (it chooses each stage's output
    epoch), `eval.select_limit` and `eval.select_steps` only under select_by="apgd-ce"
    (ONLY_WHEN);
  * a field of a stage's own block (`admm.rho`) shapes that stage and every stage after it
    in the stage order; `sparsity` shapes the stages from admm on;
  * every other field (seed, data, model, attack, batch sizes, init_from...) shapes every stage.
Changes to fields that shape no existing result are allowed and appended to the history.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import os
import time
from typing import Any

import jax

from admm_jax.app import configlib, reliability, tensorboard_log
from admm_jax.app.errors import UserError
from admm_jax.app.stages import STAGES

CONFIG_FILE = "config.json"
# Fields (fnmatch patterns over dotted names) that shape no result: see the module docstring.
NO_RESULT_FIELDS = ("stages", "log_every_steps", "checkpoint_every_steps", "max_checkpoints",
                    "eval.final_*", "eval.sanity_*", "parallel.*", "data.tfds_dir")
# Fields that shape results only while another field has a value: {field: (that field, value)}.
ONLY_WHEN = {"eval.select_limit": ("eval.select_by", "apgd-ce"),
             "eval.select_steps": ("eval.select_by", "apgd-ce")}
# Shared fields that shape only the stages from the named one on.
FIRST_SHAPED = {"sparsity": "admm"}



def _grid_before_the_field(stored: dict[str, Any]) -> str | None:
  """Before `<stage>.grid` existed, layers with bits stayed on their grid while retraining."""
  try:
    rules = configlib.parse_sparsity(str(stored.get("sparsity", "")))
  except configlib.ConfigError:   # a text that never ran a sparse stage: nothing it shaped
    return None
  # (kind, ratio[, bits, scale_mode][, "global"]): bits are the third field when there
  return "train" if any(len(r) > 2 and isinstance(r[2], int) for r in rules.values()) else None


# Fields added since workdirs were first made: what a stored config without them meant
# (None: nothing that the field changes), so that a default that changed behaviour is a change.
ADDED_FIELDS = {"retrain.grid": _grid_before_the_field,
                "inherited.grid": _grid_before_the_field,
                # Before eval.select_by existed every stage selected on the eval PGD.
                "eval.select_by": lambda stored: "pgd"}

# A crash or a full disk never leaves half a file; the disk's errors are one sentence.
write_json_atomic = reliability.write_json_atomic


class WorkdirError(UserError, RuntimeError):
  """The workdir cannot be used; the message says why and what to do."""


class ConfigMismatch(WorkdirError):
  """The config differs from the workdir's in a field that shaped one of its stages."""


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


# ------------------------------------------------------------------ the workdir's config

def flat_config(config: Any) -> dict[str, Any]:
  """{dotted field: JSON value} of a ConfigDict or of its JSON dict (tuples become lists)."""
  tree = json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort") \
      else config
  out = {}

  def walk(node: dict[str, Any], prefix: str) -> None:
    for key, value in node.items():
      if isinstance(value, dict):
        walk(value, f"{prefix}{key}.")
      else:
        out[f"{prefix}{key}"] = value
  walk(tree, "")
  return out


def shaped_stages(field: str) -> tuple[str, ...]:
  """The stages (in stage order) whose result `field` can change (module docstring)."""
  order = tuple(STAGES)
  if any(fnmatch.fnmatchcase(field, pattern) for pattern in NO_RESULT_FIELDS):
    return ()
  head = field.split(".", 1)[0]
  first = head if head in STAGES and "." in field else FIRST_SHAPED.get(field)
  return order[order.index(first):] if first else order


def begun_stages(workdir: str) -> dict[str, str]:
  """{stage: "finished" | "running"} for the stages with results in `workdir`, in order
  (running: a checkpoint or an output exists, the finished marker not yet)."""
  out = {}
  for stage in STAGES:
    paths = stage_paths(workdir, stage)
    if os.path.exists(paths.done):
      out[stage] = "finished"
    elif os.path.isdir(paths.output) or (os.path.isdir(paths.checkpoints)
                                         and os.listdir(paths.checkpoints)):
      out[stage] = "running"
  return out


def stored_config(workdir: str, defaults: Any = None) -> dict[str, Any] | None:
  """The workdir's config.json ({"config", "history"}); for a workdir made before config.json
  existed, report.json's config with `defaults` (a ConfigDict) under it; None when neither."""
  path = os.path.join(workdir, CONFIG_FILE)
  if os.path.exists(path):
    try:
      with open(path) as f:
        stored = json.load(f)
      stored["config"]  # noqa: B018  # a file without it is damaged
      return stored
    except (ValueError, KeyError, TypeError):
      raise WorkdirError(f"{path} (the config this workdir was started with) is damaged: "
                         "restore it, or choose another --workdir.") from None
  report = os.path.join(workdir, "report.json")
  if os.path.exists(report):
    try:
      with open(report) as f:
        saved = json.load(f)["config"]
    except (OSError, ValueError, KeyError, TypeError):
      return None
    base = flat_config(defaults) if defaults is not None else {}
    return {"config": {**base, **flat_config(saved)}, "history": [], "from": "report.json"}
  return None


def _show(value: Any) -> str:
  return repr(tuple(value) if isinstance(value, list) else value)


def check_config(workdir: str, config: Any, defaults: Any = None) -> dict[str, list]:
  """Checks `config` against the config `workdir` was started with (config.json).

  Args:
    workdir: an existing workdir (maybe new and empty).
    config: the ConfigDict of this run.
    defaults: today's base config, under an old report.json's config (fields added since).

  Returns:
    {field: [old, new]} of the changes to accept: fields that shape no finished or running
    stage ({} for a new workdir or the same config).

  Raises:
    ConfigMismatch: a changed field shaped a finished or running stage, in one sentence.
  """
  stored = stored_config(workdir, defaults)
  if stored is None:
    return {}
  old, new = flat_config(stored["config"]), flat_config(config)
  for field, meaning in ADDED_FIELDS.items():
    if field not in old and meaning(old) is not None:
      old[field] = meaning(old)
  for flat in (old, new):   # a field that shapes nothing under its switch's value: no change
    for field, (switch, value) in ONLY_WHEN.items():
      if flat.get(switch) != value:
        flat.pop(field, None)
  changes = {f: [old.get(f), new.get(f)] for f in sorted(set(old) | set(new))
             if f in old and f in new and old[f] != new[f]}
  begun = begun_stages(workdir)
  blocking = {f: [s for s in shaped_stages(f) if s in begun] for f in changes}
  blocking = {f: s for f, s in blocking.items() if s}
  if blocking:
    fields = ", ".join(f"{f} {_show(changes[f][0])} -> {_show(changes[f][1])}"
                       for f in blocking)
    stages = ", ".join(f"{s} {state}" for s, state in begun.items())
    finished = [s for s, state in begun.items() if state == "finished"]
    build_on = (f", or another --workdir with --config.init_from={workdir} to build on its "
                f"finished stages ({', '.join(finished)})" if finished else "")
    raise ConfigMismatch(
        f"the config differs from the one workdir {workdir} was started with in fields that "
        f"shaped its results ({stages}): {fields}; to keep its numbers run with the old values, "
        f"to get new ones choose another --workdir{build_on}.")
  return changes


def record_config(workdir: str, config: Any, changes: dict[str, list]) -> None:
  """Writes config.json (atomically) for a new workdir, after accepted `changes`, or for a
  workdir from before config.json; a rerun with the same config writes nothing."""
  path = os.path.join(workdir, CONFIG_FILE)
  stored = stored_config(workdir) if os.path.exists(path) else None
  if stored is not None and not changes:
    return
  history = list(stored["history"]) if stored else []
  if changes:
    history.append({"time": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "changes": changes})
    logging.info("config: recorded changes that shape no finished or running stage: %s",
                 ", ".join(f"{f} {_show(o)} -> {_show(n)}" for f, (o, n) in changes.items()))
  write_json_atomic(path, {"config": json.loads(config.to_json_best_effort()),
                           "history": history})
