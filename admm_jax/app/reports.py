"""What a run reports: the fields of a stage's record, report.json, and the closing summary."""
from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np

from admm_jax import sparsity, transforms
from admm_jax.app import stages

# ADMM counts as converged when every pruned layer has ||W - Z|| / ||W|| below this.
CONVERGED_RESIDUAL = 0.1
# The stages whose model's sparsity the run reports, first finished first: the masked stages
# (exactly sparse: retrain, inherited), then the others that prune (admm), in run order.
SPARSITY_FROM = tuple(s.name for s in sorted((s for s in stages.STAGES.values() if s.sparse),
                                             key=lambda s: not s.masked))


def accuracy_fields(prefix: str, pair: np.ndarray) -> dict[str, float | None]:
  """{prefix_natural_accuracy, prefix_adversarial_accuracy}; None where nothing was measured."""
  return {f"{prefix}_{name}_accuracy": None if np.isnan(v) else round(float(v), 6)
          for name, v in zip(("natural", "adversarial"), pair)}


def admm_diagnostics(admm_state: transforms.ADMMState, params: Any,
                     spec: sparsity.SparsitySpec) -> dict[str, Any]:
  """Did ADMM converge? Per pruned layer, ||W - Z|| / ||W|| (the primal residual, relative)
  and ||W - Proj(W)|| / ||W|| (the share of W that hard pruning is about to remove)."""
  rel = jax.device_get(transforms.primal_residuals(admm_state, params, relative=True))
  dist = jax.device_get(sparsity.distance_to_set(params, spec, relative=True))
  return {"rho": float(admm_state.rho),
          "converged": bool(max(rel.values()) < CONVERGED_RESIDUAL),
          "relative_primal_residual": {k: round(float(v), 6) for k, v in rel.items()},
          "relative_distance_to_sparse_set": {k: round(float(v), 6) for k, v in dist.items()}}


def run_report(config, dataset, devices: dict[str, Any], records: dict[str, dict]
               ) -> dict[str, Any]:
  """report.json: the config, data, attack and devices, and every finished stage's record.

  Args:
    config: the run's ConfigDict.
    dataset: the `data.Dataset` it trained on.
    devices: `parallel.Runtime.describe()`, the mesh actually used.
    records: stage name -> its record, in run order.
  """
  a = config.attack
  report = {
      "config": json.loads(config.to_json_best_effort()),
      "dataset": {"name": dataset.name, "train": len(dataset.train),
                  "validation": len(dataset.validation), "test": len(dataset.test),
                  # train + validation: the labelled examples the run learnt or selected from
                  "labelled_examples": len(dataset.train) + len(dataset.validation)},
      "attack": {"eps": a.eps, "steps": a.eval_steps, "step_size": a.eval_step_size,
                 "norm": "linf", "random_start": True,
                 "train": {"kind": a.kind, "steps": a.steps, "step_size": a.step_size,
                           "objective": a.objective, "beta": a.beta}},
      "devices": devices,
      "stages": {}, "wall_time_s": {},
      # every stage's warnings (chance-level accuracy), repeated in the summary
      "warnings": [w for rec in records.values() for w in rec.get("warnings", [])],
  }
  for stage, rec in records.items():
    report["stages"][stage] = {k: v for k, v in rec.items() if k != "sparsity"}
    report["wall_time_s"][stage] = rec["wall_time_s"]
  for stage in SPARSITY_FROM:
    if stage in records and "sparsity" in records[stage]:
      sp = records[stage]["sparsity"]
      report["sparsity"] = {
          "stage": stage, "compression": sp["compression"], "total_params": sp["total_params"],
          "nonzero_params": sp["nonzero_params"],
          "layers": {path: {k: layer[k] for k in ("kind", "target", "achieved", "groups",
                                                  "groups_pruned", "zero_fraction", "params",
                                                  "shared")}
                     for path, layer in sp["layers"].items()}}
      break
  return report


def summary(report: dict[str, Any]) -> str:
  """The few lines a user reads at the end of a run."""
  a = report["attack"]
  lines = [f"{report['dataset']['name']}: test accuracy, natural / under PGD-{a['steps']} "
           f"(Linf eps {a['eps']}, step {a['step_size']}), {report['devices']['count']} "
           f"{report['devices']['platform']} device(s)"]
  d = report["dataset"]
  if "labelled_examples" in d:  # how much labelled data the numbers cost, said every time
    lines.append(f"  {d['labelled_examples']} labelled examples ({d['train']} train + "
                 f"{d['validation']} validation), {d['test']} test")
  trained = a["train"]
  if trained["objective"] != "madry":  # Madry's loss is the default the header implies
    lines.append(f"  trained with the {trained['objective']} objective (beta {trained['beta']}), "
                 "evaluated with the same PGD as any run")
  for stage, rec in report["stages"].items():
    lines.append(f"  {stage:<9} w={rec['model']['width']:<3} natural {rec['natural_accuracy']:.4f}"
                 f"  adversarial {rec['adversarial_accuracy']:.4f}  params {rec['total_params']}"
                 f"  {rec['wall_time_s']:.0f}s")
    if rec.get("admm"):
      worst = max(rec["admm"]["relative_primal_residual"].items(), key=lambda kv: kv[1])
      verdict = "" if rec["admm"]["converged"] else ": not converged"
      lines.append(f"            ADMM end: rho {rec['admm']['rho']:.3g}, largest ||W-Z||/||W|| "
                   f"{worst[1]:.3f} ({worst[0]}){verdict}")
    if rec.get("final_attack"):
      label = rec["final_attack"]
      lines.append(f"            {label} (admm_jax.evaluate): robust {rec[label + '_accuracy']:.4f}"
                   f" on the first {rec[label + '_examples']} test examples")
    if rec.get("after_hard_prune_val_adversarial_accuracy") is not None:
      lines.append(f"            right after hard pruning: val natural "
                   f"{rec['after_hard_prune_val_natural_accuracy']:.4f}  adversarial "
                   f"{rec['after_hard_prune_val_adversarial_accuracy']:.4f}")
  if "sparsity" in report:
    sp = report["sparsity"]
    lines.append(f"  {sp['stage']} model: {sp['nonzero_params']} of {sp['total_params']} weights "
                 f"nonzero, compression {sp['compression']:.1f}x")
  lines += [f"warning: {w}" for w in report.get("warnings", [])]
  return "\n".join(lines)


def format_duration(seconds: float) -> str:
  """1m05s, or 2h03m past an hour."""
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else \
      f"{seconds // 60}m{seconds % 60:02d}s"
