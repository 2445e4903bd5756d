"""TensorBoard event files for a run, written without TensorFlow.

The writer is the `tensorboard` package's own event-file writer (the one PyTorch's
SummaryWriter builds on): numpy and protobuf only, no TensorFlow, and the same package is
what a user opens the files with:

    tensorboard --logdir <workdir>/tensorboard          # one run, a curve per stage
    tensorboard --logdir <study workdir>/cells          # every cell of a study

Each stage writes its own directory, <workdir>/tensorboard/<stage>/, so TensorBoard shows the
stages side by side and a resumed stage can drop the points written after its checkpoint (a
SessionLog START event at the resume step, TensorBoard's purge) without touching the others.
Tags: train/adversarial_loss and train/adversarial_accuracy (every `log_every_steps` steps),
and per epoch validation/*, admm/rho, admm/primal_residual/<layer>,
admm/distance_to_sparse_set/<layer>, sparsity/<layer> (fraction of weights that are zero).
"""
from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

# Per-layer dicts of a metrics.jsonl record -> TensorBoard tag prefix.
LAYER_FIELDS = {"admm_primal_residual": "admm/primal_residual",
                "admm_distance_to_sparse_set": "admm/distance_to_sparse_set",
                "sparsity": "sparsity"}
SCALAR_FIELDS = {"train_adversarial_loss": "epoch/train_adversarial_loss",
                 "train_adversarial_accuracy": "epoch/train_adversarial_accuracy",
                 "val_natural_accuracy": "validation/natural_accuracy",
                 "val_adversarial_accuracy": "validation/adversarial_accuracy",
                 "val_apgd_ce_accuracy": "validation/apgd_ce_accuracy",   # eval.select_by
                 "admm_rho": "admm/rho"}


def epoch_scalars(record: dict[str, Any]) -> dict[str, float]:
  """{tag: value} of one metrics.jsonl epoch record (NaN and missing values left out)."""
  out = {tag: record[key] for key, tag in SCALAR_FIELDS.items() if key in record}
  for key, prefix in LAYER_FIELDS.items():
    out.update({f"{prefix}/{layer}": v for layer, v in record.get(key, {}).items()})
  return {tag: float(v) for tag, v in out.items()
          if v is not None and math.isfinite(float(v))}


class StageWriters:
  """One event-file writer per stage under `logdir`, opened on first use."""

  def __init__(self, logdir: str):
    self.logdir, self._writers, self._unavailable = logdir, {}, False

  def start(self, stage: str, resume_step: int) -> None:
    """Opens `stage`'s writer; after a resume, TensorBoard drops its points from resume_step on."""
    self.close(stage)  # a stage started again in this process gets a fresh file
    writer = self._writer(stage)
    if writer is not None and resume_step > 0:
      from tensorboard.compat.proto import event_pb2
      writer.add_event(event_pb2.Event(
          wall_time=time.time(), step=resume_step,
          session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

  def scalars(self, stage: str, step: int, values: dict[str, float]) -> None:
    writer = self._writer(stage)
    if writer is None or not values:
      return
    from tensorboard.compat.proto import event_pb2, summary_pb2
    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=t, simple_value=v)
                                         for t, v in values.items()])
    writer.add_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

  def flush(self, stage: str) -> None:
    if stage in self._writers:
      self._writers[stage].flush()

  def close(self, stage: str | None = None) -> None:
    """Flushes and closes `stage`'s writer (all writers when None)."""
    for name in [stage] if stage else list(self._writers):
      writer = self._writers.pop(name, None)
      if writer is not None:
        writer.close()

  def _writer(self, stage: str):
    if stage not in self._writers and not self._unavailable:
      try:  # lazy: the library and runs without event files never load it
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
      except ImportError:
        self._unavailable = True
        logging.warning("the tensorboard package is not installed: no TensorBoard event files "
                        "(pip install tensorboard; metrics.jsonl has the same numbers).")
        return None
      path = os.path.join(self.logdir, stage)
      os.makedirs(path, exist_ok=True)
      self._writers[stage] = EventFileWriter(path)
    return self._writers.get(stage)
