"""A run's curves as PNG files, drawn from its metrics.jsonl (the same curves as TensorBoard).

Run: python -m admm_jax.plot --workdir=runs/fmnist      (writes runs/fmnist/plots/*.png)

  training.png    adversarial loss and accuracy on the training batches (every
                  `log_every_steps` steps, and the epoch means)
  validation.png  validation accuracy, natural and under the evaluation PGD, per epoch
  admm.png        rho, ||W - Z|| and ||W - Proj(W)|| / ||W|| per layer (runs with an admm stage)
  sparsity.png    per layer, the fraction of weights that are zero (pruned stages)

The x axis counts the steps of all stages in a row; vertical lines mark where a stage starts.
Drawn with matplotlib's object API (no pyplot state, no display needed).
"""
from __future__ import annotations

import json
import os
from typing import Any

from admm_jax.app.errors import UserError


class PlotError(UserError, ValueError):
  """Nothing to plot, or no matplotlib; the message says what to do."""


def require_matplotlib() -> None:
  """Raises PlotError when matplotlib cannot be imported."""
  try:
    import matplotlib  # noqa: F401
  except ImportError:
    raise PlotError("matplotlib is not installed: pip install matplotlib (or reinstall "
                    "admm_jax, which depends on it).") from None


def new_figure(rows: int, cols: int = 1, width: float = 7.0, height: float = 3.0):
  """(figure, flat list of axes) of a figure that nothing displays: save it with savefig."""
  require_matplotlib()
  from matplotlib.figure import Figure
  fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
  axes = fig.subplots(rows, cols, squeeze=False)
  return fig, [ax for row in axes for ax in row]


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The epoch records of `workdir`/metrics.jsonl, in file order."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    raise PlotError(f"{path} does not exist: pass the --workdir of an admm_jax run (it writes "
                    "metrics.jsonl after its first epoch).")
  with open(path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  if not records:
    raise PlotError(f"{path} is empty: plot again after the run's first epoch.")
  return records


def stage_offsets(records: list[dict[str, Any]]) -> dict[str, int]:
  """Steps before each stage when the stages run one after another (in file order)."""
  offsets, total = {}, 0
  for stage in dict.fromkeys(r["stage"] for r in records):
    offsets[stage] = total
    total += max(r["step"] for r in records if r["stage"] == stage)
  return offsets


def _series(records, offsets, key):
  """{stage: (xs, ys)} of a scalar field, on the all-stages step axis."""
  out = {}
  for r in records:
    if r.get(key) is not None:
      xs, ys = out.setdefault(r["stage"], ([], []))
      xs.append(offsets[r["stage"]] + r["step"])
      ys.append(r[key])
  return out


def _layer_series(records, offsets, key):
  """{layer: (xs, ys)} of a per-layer field, on the all-stages step axis."""
  out = {}
  for r in records:
    for layer, value in r.get(key, {}).items():
      xs, ys = out.setdefault(layer, ([], []))
      xs.append(offsets[r["stage"]] + r["step"])
      ys.append(value)
  return out


def _mark_stages(ax, offsets) -> None:
  for stage, x in offsets.items():
    ax.axvline(x, color="0.8", lw=0.8, zorder=0)
    ax.annotate(stage, (x, 1), xycoords=("data", "axes fraction"), xytext=(3, -3),
                textcoords="offset points", va="top", fontsize=8, color="0.4")


def _finish(fig, axes, offsets, path: str) -> str:
  for ax in axes:
    _mark_stages(ax, offsets)
    ax.grid(alpha=0.3)
  axes[-1].set_xlabel("step (all stages in a row)")
  fig.savefig(path, dpi=100)
  return path


def _plot_training(records, offsets, path):
  fig, axes = new_figure(2)
  for ax, i, key, label in ((axes[0], 1, "train_adversarial_loss", "adversarial loss"),
                            (axes[1], 2, "train_adversarial_accuracy", "adversarial accuracy")):
    for stage, (xs, ys) in _series(records, offsets, key).items():
      points = [p for r in records if r["stage"] == stage for p in r.get("train_steps", [])]
      line = ax.plot([offsets[stage] + p[0] for p in points], [p[i] for p in points], lw=1,
                     label=stage)[0]
      ax.plot(xs, ys, "o", color=line.get_color(), ms=4)
    ax.set_ylabel(label)
  axes[0].set_title("training batches (lines: every log_every_steps, dots: epoch means)")
  axes[0].legend(fontsize=8)
  return _finish(fig, axes, offsets, path)


def _plot_validation(records, offsets, path):
  fig, axes = new_figure(1)
  for key, style in (("val_natural_accuracy", "o--"), ("val_adversarial_accuracy", "o-")):
    for stage, (xs, ys) in _series(records, offsets, key).items():
      axes[0].plot(xs, ys, style, ms=4, label=f"{stage}, {key[4:].replace('_', ' ')}")
  axes[0].set_ylabel("validation accuracy")
  axes[0].legend(fontsize=8)
  return _finish(fig, axes, offsets, path)


def _plot_layers(records, offsets, panels, path, title):
  fig, axes = new_figure(len(panels))
  for ax, (key, label, log) in zip(axes, panels):
    series = (_series(records, offsets, key) if key == "admm_rho"
              else _layer_series(records, offsets, key))
    for name, (xs, ys) in series.items():
      ax.plot(xs, ys, "o-", ms=3, label=name)
    ax.set_ylabel(label)
    if log:
      ax.set_yscale("log")
    ax.legend(fontsize=7)
  axes[0].set_title(title)
  return _finish(fig, axes, offsets, path)


def plot_run(workdir: str, out_dir: str | None = None) -> list[str]:
  """Draws a run's curves from its metrics.jsonl into `out_dir` (default `workdir`/plots).

  Returns:
    The paths of the PNG files written (admm.png / sparsity.png only where the run has them).
  """
  records = read_metrics(workdir)
  out_dir = out_dir or os.path.join(workdir, "plots")
  os.makedirs(out_dir, exist_ok=True)
  offsets = stage_offsets(records)
  paths = [_plot_training(records, offsets, os.path.join(out_dir, "training.png")),
           _plot_validation(records, offsets, os.path.join(out_dir, "validation.png"))]
  if any("admm_rho" in r for r in records):
    paths.append(_plot_layers(records, offsets, [
        ("admm_rho", "rho", True), ("admm_primal_residual", "||W - Z||", True),
        ("admm_distance_to_sparse_set", "||W - Proj(W)|| / ||W||", False)],
        os.path.join(out_dir, "admm.png"), "ADMM, per pruned layer"))
  if any("sparsity" in r for r in records):
    paths.append(_plot_layers(records, offsets, [("sparsity", "zero fraction", False)],
                              os.path.join(out_dir, "sparsity.png"), "sparsity per layer"))
  return paths
