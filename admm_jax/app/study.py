"""The paper's findings in one command: a grid of ordinary runs ("cells"), a report and plots.

Run: python -m admm_jax.study --config=configs/study_fashion_mnist.py --workdir=runs/study

Layout of a study workdir:
  cells/<cell>/   an ordinary admm_jax run (report.json, metrics.jsonl, tensorboard/, plots/)
  study.json      every cell: kind, seed, config overrides, status, results, report path
  report.md       the paper's four findings, each a table "claim | measured here | holds?"
  plots/*.png     the plots the report rests on (study_report)

Cell kinds (one recipe, `config.run`, for all of them; a cell only overrides what defines it):
  capacity    dense adversarial training (pretrain) at every width of `config.widths`;
  pruned      the `config.wide_width` network of the same seed, ADMM-pruned (irregular) to the
              parameter count of each of `config.target_widths`, layer by layer (admm, retrain);
  scratch     each target width trained from scratch for the whole budget
              (pretrain + admm + retrain epochs);
  inherited   the pruned network's mask on the wide network's initial weights, trained with
              the mask for the same budget (the lottery-ticket baseline);
  schemes     the same pretrained wide network pruned with each kind of `config.schemes` at each
              per-layer ratio of `config.scheme_ratios` (the layers of `config.scheme_layers`).
Every cell is repeated for every seed of `config.seeds`. Cells that others start from (the wide
pretrain, the pruned network an inherited cell takes its mask from) join the grid by themselves.

Cells run one after another in this process, each on all devices. A rerun skips finished cells
(their report.json lists all their stages) and resumes an unfinished one from its checkpoints,
after checking every existing cell's config.json against the config the cell runs with now
(`check_cells`: a change that shaped a finished or running cell stops the study at once);
a cell that fails is recorded with its error and the study goes on (cells that start from it
are skipped).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import os
import re
import time
import traceback
from typing import Any

import ml_collections

from admm_jax import projections
from admm_jax.app import configlib

CELL_KINDS = ("capacity", "pruned", "scratch", "inherited", "schemes")


class StudyError(configlib.ConfigError):
  """The study config cannot make a grid; the message is one sentence meant for the user."""


@dataclasses.dataclass(frozen=True)
class Cell:
  """One run of the grid.

  Attributes:
    name: its folder under cells/, e.g. 'pruned-w4to2-s0'.
    kind: one of CELL_KINDS.
    seed: the run's seed.
    overrides: config fields ('/'-free dotted names) set on top of the study's run config;
      init_from names a cell (resolved to its folder when the cell runs).
    labels: what the report groups by (width, target_width, scheme, ratio).
  """
  name: str
  kind: str
  seed: int
  overrides: dict[str, Any]
  labels: dict[str, Any]

  @property
  def depends_on(self) -> str | None:
    return self.overrides.get("init_from")


# ------------------------------------------------------------------------------ the grid

def load_config(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of a config file: a study config builds its run on a recipe file."""
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(f"admm_jax_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def study_config(run: ml_collections.ConfigDict, **fields: Any) -> ml_collections.ConfigDict:
  """A study config: `run` (the one recipe every cell starts from) and the grid's fields,
  with the defaults of the LeNet studies for any field not given."""
  study = ml_collections.ConfigDict(dict(
      cells=",".join(CELL_KINDS),  # which cell kinds to run (their dependencies come along)
      seeds=(0, 1),                # every cell once per seed
      widths=(1, 2, 4, 8),         # capacity: dense widths
      wide_width=4,                # the network that is pruned
      target_widths=(2, 1),        # pruned / scratch / inherited: these widths' parameter counts
      schemes="irregular,column,filter",
      scheme_ratios=(0.75, 0.9, 0.97),   # fraction of every layer in scheme_layers removed
      scheme_layers="(conv1|conv2|fc1)/kernel",  # regex over param paths; the classifier stays
      plot_cells=True,             # python -m admm_jax.plot for every finished cell
      # The report's robust accuracy: admm_jax.evaluate's --attack on each cell's output, on
      # the first robust_eval_limit test examples (0 = all); '' = the run's own PGD numbers.
      robust_eval="apgd-ce,apgd-t",
      robust_eval_limit=500,
      # Scheme cells: parameters, FLOPs and batch-256 latency of the compacted network
      # (admm_jax.export.measure_compaction) against the masked dense one.
      measure_compaction=True,
  ))
  study.update(fields)
  study.run = run
  return study


def _ints(study: ml_collections.ConfigDict, field: str, low: int) -> tuple[int, ...]:
  values = study[field]
  values = tuple(values) if isinstance(values, (tuple, list)) else (values,)
  if any(isinstance(v, bool) or not isinstance(v, int) or v < low for v in values):
    raise StudyError(f"config.{field}={study[field]!r} is invalid: use integers >= {low}, "
                     "e.g. (1, 2).")
  if len(set(values)) != len(values):
    raise StudyError(f"config.{field}={study[field]!r} lists a value twice: list each once.")
  return values


def _names(study: ml_collections.ConfigDict, field: str) -> tuple[str, ...]:
  return tuple(s.strip() for s in str(study[field]).split(",") if s.strip())


def _nonempty(values: tuple, field: str, needed_by: str, example: str) -> None:
  if not values:
    raise StudyError(f"the study grid is empty: config.{field} names nothing, and the "
                     f"{needed_by} cells need it (e.g. --config.{field}={example}).")


def _abstract_params(run: ml_collections.ConfigDict, width: int) -> Any:
  """The run's model parameters at `width` as shapes (no values), or a StudyError saying why
  the model cannot be built there."""
  import jax
  import jax.numpy as jnp

  from admm_jax import models
  name = run.model.name
  if name not in models.REGISTRY:
    raise StudyError(f"config.run.model.name={name!r} is invalid: use one of "
                     f"{', '.join(models.REGISTRY)}.")
  shape = models.REGISTRY[name].input_shape
  try:
    model = models.get_model(name, width)  # flax's conv: the parameters of every conv_impl
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *shape)))
  except Exception as e:  # whatever fails to build, it is this width's doing here
    raise StudyError(f"model {name!r} cannot be built at width {width} ({e}): choose widths "
                     "it supports.") from None
  return variables["params"]


def _shapes(params: Any) -> dict[str, tuple[int, ...]]:
  """{'/'-joined path: shape} of a parameter tree."""
  import jax

  from admm_jax import sparsity
  return {sparsity.path_str(path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


def matched_ratios(wide: dict[str, tuple[int, ...]], small: dict[str, tuple[int, ...]]
                   ) -> dict[str, float]:
  """Per-layer pruning ratios that give the wide model the small model's parameter count.

  For every kernel of `wide` (paths ending in 'kernel'), the kept weights plus the layer's
  unpruned leaves in the wide model (its bias) equal the whole layer in the small model, so
  the pruned wide network has exactly the small one's parameters, layer by layer.

  Args:
    wide, small: {'/'-joined param path: shape} of the same model at two widths.

  Returns:
    {kernel path: fraction of its weights to remove}.
  """
  size = lambda s: math.prod(s)
  ratios = {}
  for path, shape in wide.items():
    if not path.endswith("kernel"):
      continue
    layer = path.rpartition("/")[0]
    in_layer = lambda p, layer=layer: p.rpartition("/")[0] == layer
    keep = (sum(size(s) for p, s in small.items() if in_layer(p))
            - sum(size(s) for p, s in wide.items() if in_layer(p) and p != path))
    if not 1 <= keep <= size(shape):
      raise StudyError(f"layer {layer!r} cannot be pruned to the smaller width's parameter "
                       f"count ({keep} of {size(shape)} weights would stay): choose target "
                       "widths between 1 and config.wide_width.")
    ratios[path] = (size(shape) - keep) / size(shape)
  return ratios


def _sparsity_text(ratios: dict[str, float], kind: str = "irregular") -> str:
  return ",".join(f"{re.escape(path)}={kind}:{ratio!r}" for path, ratio in ratios.items())


def plan(study: ml_collections.ConfigDict) -> list[Cell]:
  """The cells of a study config, in run order; StudyError (one sentence) for a bad grid."""
  kinds = _names(study, "cells")
  unknown = [k for k in kinds if k not in CELL_KINDS]
  if unknown:
    raise StudyError(f"config.cells={study.cells!r} names an unknown cell kind {unknown[0]!r}: "
                     f"use a comma-separated subset of {','.join(CELL_KINDS)}.")
  if not kinds:
    raise StudyError(f"the study grid is empty: config.cells={study.cells!r} names no cell "
                     f"kind (use a comma-separated subset of {','.join(CELL_KINDS)}).")
  seeds = _ints(study, "seeds", 0)
  _nonempty(seeds, "seeds", "every", "'(0, 1)'")
  widths, wide = _ints(study, "widths", 1), _ints(study, "wide_width", 1)[0]
  targets = _ints(study, "target_widths", 1)
  schemes, ratios = _names(study, "schemes"), tuple(study.scheme_ratios)
  if "capacity" in kinds:
    _nonempty(widths, "widths", "capacity", "'(1, 2, 4, 8)'")
  if {"pruned", "scratch", "inherited"} & set(kinds):
    _nonempty(targets, "target_widths", "pruned, scratch and inherited", "'(2, 1)'")
    if any(t >= wide for t in targets):
      raise StudyError(f"config.target_widths={study.target_widths!r} is invalid: pruning "
                       f"matches the parameter count of a narrower network, so every target "
                       f"width must be below config.wide_width={wide}.")
  if "schemes" in kinds:
    _nonempty(schemes, "schemes", "schemes", "irregular,column,filter")
    _nonempty(ratios, "scheme_ratios", "schemes", "'(0.8, 0.95)'")
    for kind in schemes:
      for ratio in ratios:
        try:
          projections.validate(kind, ratio, where="config.schemes/scheme_ratios")
        except ValueError as e:
          raise StudyError(str(e)) from None
  _check_robust_eval(study)
  run = study.run
  abstract = {w: _abstract_params(run, w)
              for w in sorted(set(widths if "capacity" in kinds else ()) | {wide} | set(targets))}
  shapes = {w: _shapes(params) for w, params in abstract.items()}

  cells: dict[str, Cell] = {}

  def add(cell: Cell) -> str:
    cells.setdefault(cell.name, cell)
    return cell.name

  def capacity(width: int, seed: int) -> str:
    return add(Cell(f"capacity-w{width}-s{seed}", "capacity", seed,
                    {"stages": "pretrain", "model.width": width}, {"width": width}))

  def pruned(target: int, seed: int) -> str:
    source = capacity(wide, seed)
    return add(Cell(f"pruned-w{wide}to{target}-s{seed}", "pruned", seed,
                    {"stages": "admm,retrain", "model.width": wide, "init_from": source,
                     "sparsity": _sparsity_text(matched_ratios(shapes[wide], shapes[target]))},
                    {"width": wide, "target_width": target}))

  for seed in seeds:  # run order: by kind, then seed, so early cells feed the later ones
    for w in widths if "capacity" in kinds else ():
      capacity(w, seed)
  for seed in seeds:
    for t in targets if {"pruned", "inherited"} & set(kinds) else ():
      pruned(t, seed)
  for seed in seeds:
    for t in targets if "scratch" in kinds else ():
      add(Cell(f"scratch-w{t}-s{seed}", "scratch", seed,
               {"stages": "scratch", "scratch.width": t, "scratch.epochs": 0},
               {"width": t, "target_width": t}))
  for seed in seeds:
    for t in targets if "inherited" in kinds else ():
      add(Cell(f"inherited-w{wide}to{t}-s{seed}", "inherited", seed,
               {"stages": "inherited", "model.width": wide, "init_from": pruned(t, seed),
                "inherited.epochs": 0,
                "sparsity": _sparsity_text(matched_ratios(shapes[wide], shapes[t]))},
               {"width": wide, "target_width": t}))
  for seed in seeds:
    for kind in schemes if "schemes" in kinds else ():
      for ratio in ratios:
        add(Cell(f"scheme-{kind}-r{ratio:g}-s{seed}", "schemes", seed,
                 {"stages": "admm,retrain", "model.width": wide, "init_from": capacity(wide, seed),
                  "sparsity": f"{study.scheme_layers}={kind}:{ratio!r}"},
                 {"width": wide, "scheme": kind, "ratio": ratio}))
  ordered = sorted(cells.values(), key=lambda c: CELL_KINDS.index(c.kind))  # stable: seeds kept
  for cell in ordered:  # every cell's config is valid, and fits its model, before any work
    config = cell_config(study, cell, "/study")
    if "sparsity" in cell.overrides:
      _check_sparsity(cell, config, abstract[config.model.width])
  return ordered


def _check_robust_eval(study: ml_collections.ConfigDict) -> None:
  limit = study.robust_eval_limit
  if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
    raise StudyError(f"config.robust_eval_limit={limit!r} is invalid: use a non-negative "
                     "integer (0 = the whole test split).")
  if study.robust_eval:
    from admm_jax.app import evaluate
    try:
      evaluate.parse_attack(study.robust_eval)
    except evaluate.EvaluationError as e:
      raise StudyError(f"config.robust_eval: {e}") from None


def _check_sparsity(cell: Cell, config: ml_collections.ConfigDict, params: Any) -> None:
  """The cell's sparsity patterns against its model's parameters (as make_context checks)."""
  from admm_jax import sparsity
  try:
    sparsity.resolve(params, sparsity.spec(configlib.parse_sparsity(config.sparsity)))
  except ValueError as e:
    raise StudyError(f"cell {cell.name}: config.sparsity: {e}") from None


def cell_config(study: ml_collections.ConfigDict, cell: Cell, workdir: str
                ) -> ml_collections.ConfigDict:
  """The study's run config with the cell's seed and overrides (validated)."""
  config = ml_collections.ConfigDict(study.run.to_dict())
  config.seed = cell.seed
  configlib.override(config, {f: os.path.join(workdir, "cells", v) if f == "init_from" else v
                              for f, v in cell.overrides.items()})
  try:
    configlib.validate(config)
  except configlib.ConfigError as e:
    raise StudyError(f"cell {cell.name}: {e}") from None
  return config


# ---------------------------------------------------------------------------- results

def evaluation_of(report: dict[str, Any], robust: dict[str, Any] | None = None
                  ) -> dict[str, Any]:
  """What the study reports of a finished cell: its last stage's test accuracy and its
  parameter counts.

  `robust`, the admm_jax.evaluate record of that stage (robust_evaluation), is the
  adversarial accuracy when given; without it, the PGD numbers the run wrote into its
  report.json (report.json's "attack": the test attack). Natural accuracy and the PGD
  accuracy (`pgd_accuracy`) always come from the report: the whole test split.
  """
  stage = list(report["stages"])[-1]
  rec, attack = report["stages"][stage], report["attack"]
  sparse = report.get("sparsity", {})
  total = sparse.get("total_params", rec["total_params"])
  nonzero = sparse.get("nonzero_params", total)
  pgd = (f"PGD-{attack['steps']} (Linf eps {attack['eps']:g}, step {attack['step_size']:g}, "
         f"random start) on {rec['test_examples']} test examples")
  result = {"stage": stage, "natural_accuracy": rec["natural_accuracy"],
            "adversarial_accuracy": rec["adversarial_accuracy"], "evaluation": pgd,
            "pgd_accuracy": rec["adversarial_accuracy"], "pgd_evaluation": pgd,
            "total_params": total, "nonzero_params": nonzero,
            "compression": sparse.get("compression", 1.0),
            "wall_time_s": round(sum(report["wall_time_s"].values()), 1)}  # all its stages
  if robust:
    result.update(adversarial_accuracy=robust["robust_accuracy"],
                  evaluation=(f"{robust['attack']} ({robust['norm'].capitalize()} eps "
                              f"{robust['eps']:g}, admm_jax.evaluate) on the first "
                              f"{robust['examples']} test examples"),
                  evaluation_wall_time_s=robust["wall_time_s"])
  return result


def robust_evaluation(study: ml_collections.ConfigDict, cell_dir: str, report: dict[str, Any]
                      ) -> dict[str, Any] | None:
  """admm_jax.evaluate's `study.robust_eval` on the cell's last stage (None when off); a
  record it wrote before for the same attack and examples is read instead of recomputed."""
  if not study.robust_eval:
    return None
  from admm_jax.app import evaluate
  stage = list(report["stages"])[-1]
  _, label = evaluate.parse_attack(study.robust_eval)
  examples = report["stages"][stage]["test_examples"]
  examples = min(study.robust_eval_limit or examples, examples)
  path = os.path.join(cell_dir, "evaluation", f"{stage}_{label}.json")
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    if saved.get("examples") == examples and saved.get("eps") == report["attack"]["eps"]:
      return saved
  import jax
  devices = jax.device_count()  # a batch no larger than the examples: padding costs as much
  batch = min(study.run.eval_batch_size, -(-examples // devices) * devices)
  return evaluate.evaluate_workdir(cell_dir, stage, attack=study.robust_eval,
                                   limit=study.robust_eval_limit, batch_size=batch, sanity=False)


def check_cells(study: ml_collections.ConfigDict, cells: list[Cell], workdir: str) -> None:
  """Each existing cell's workdir against the config the cell runs with now
  (workdir.check_config): a study whose change would reuse a finished or running cell made
  under another config stops before any work.

  Raises:
    workdir.ConfigMismatch: naming the cell, the fields (old -> new) and the ways out.
  """
  from admm_jax import workdir as workdirs
  for cell in cells:
    cell_dir = os.path.join(workdir, "cells", cell.name)
    if os.path.isdir(cell_dir):
      try:
        workdirs.check_config(cell_dir, cell_config(study, cell, workdir),
                              configlib.base_config())
      except workdirs.ConfigMismatch as e:
        raise workdirs.ConfigMismatch(f"study cell {cell.name}: {e}") from None


def _finished_report(cell_dir: str, config: ml_collections.ConfigDict) -> dict | None:
  path = os.path.join(cell_dir, "report.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    report = json.load(f)
  return report if list(report["stages"]) == configlib.stages(config) else None


def compaction_of(study: ml_collections.ConfigDict, cell: Cell, cell_dir: str
                  ) -> dict[str, Any] | None:
  """export.measure_compaction of a scheme cell's output (None for other cells or when off),
  kept in the cell's compaction.json so that a rerun reads it back."""
  if cell.kind != "schemes" or not study.measure_compaction:
    return None
  path = os.path.join(cell_dir, "compaction.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  from admm_jax.app import export
  from admm_jax.app.workdir import write_json_atomic
  result = export.measure_compaction(cell_dir)
  write_json_atomic(path, result)
  return result


def _record(cell: Cell, status: str, report: dict | None = None, error: str | None = None,
            robust: dict | None = None, compaction: dict | None = None) -> dict[str, Any]:
  return {"name": cell.name, "kind": cell.kind, "seed": cell.seed, **cell.labels,
          "overrides": cell.overrides, "status": status, "error": error,
          "report": f"cells/{cell.name}/report.json",
          "results": evaluation_of(report, robust) if report else None,
          "compaction": compaction}


def _run_cell(study: ml_collections.ConfigDict, cell: Cell, workdir: str,
              records: dict[str, dict]) -> dict[str, Any]:
  """Runs (or resumes, or skips) one cell; never raises for a failure of the run itself."""
  from admm_jax.app import trainer
  config = cell_config(study, cell, workdir)
  cell_dir = os.path.join(workdir, "cells", cell.name)
  report = _finished_report(cell_dir, config)
  if report is not None:
    logging.info("study: %s finished earlier; skipping its training", cell.name)
  else:
    source = cell.depends_on
    if source and records.get(source, {}).get("status") != "finished":
      logging.warning("study: %s skipped: it starts from %s, which did not finish", cell.name,
                      source)
      return _record(cell, "skipped", error=f"starts from {source}, which did not finish")
    logging.info("study: running %s (%s)", cell.name,
                 ", ".join(f"{k}={v}" for k, v in cell.overrides.items()))
    try:
      report = trainer.train_and_evaluate(config, cell_dir)
    except Exception as e:  # reported in study.json; the study goes on
      logging.error("study: %s failed: %s\n%s", cell.name, e, traceback.format_exc())
      return _record(cell, "failed", error=f"{type(e).__name__}: {e}")
    if study.plot_cells:
      from admm_jax.app import plot
      plot.plot_run(cell_dir)
  try:
    robust = robust_evaluation(study, cell_dir, report)
    compaction = compaction_of(study, cell, cell_dir)
  except Exception as e:  # the training stays; a rerun evaluates again
    logging.error("study: evaluating %s failed: %s\n%s", cell.name, e, traceback.format_exc())
    return _record(cell, "failed", error=f"evaluation: {type(e).__name__}: {e}")
  return _record(cell, "finished", report, robust=robust, compaction=compaction)


def run_study(study: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs every cell of `study` in `workdir` (skipping finished ones), then writes
  study.json, report.md and plots/; returns the study.json content."""
  from admm_jax.app import plot, study_report
  from admm_jax.app.workdir import prepare_workdir, write_json_atomic
  cells = plan(study)
  plot.require_matplotlib()  # fail now, not after an hour of training
  workdir = prepare_workdir(workdir)
  check_cells(study, cells, workdir)  # a changed config stops the study before any work
  t0, records = time.time(), {}
  summary = {"config": json.loads(study.to_json_best_effort()), "cells": []}
  for i, cell in enumerate(cells):
    logging.info("study: cell %d/%d: %s", i + 1, len(cells), cell.name)
    records[cell.name] = _run_cell(study, cell, workdir, records)
    summary["cells"] = list(records.values())
    write_json_atomic(os.path.join(workdir, "study.json"), summary)
  summary["wall_time_s"] = round(time.time() - t0, 1)
  summary["report"] = study_report.write_report(summary, workdir)
  write_json_atomic(os.path.join(workdir, "study.json"), summary)
  failed = [r["name"] for r in records.values() if r["status"] != "finished"]
  logging.info("study: %d of %d cells finished%s; report %s", len(cells) - len(failed),
               len(cells), f" (not finished: {', '.join(failed)})" if failed else "",
               summary["report"])
  return summary
