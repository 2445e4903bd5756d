"""Pruning methods side by side at the authors' budget: ADMM, learned masks, one global budget.

Same budget as benchmarks/reference_budget.py (Fashion-MNIST, LeNet(4), 20,000 labelled
examples, PGD-10; its config and cell runner are imported, not copied), irregular pruning of
the four kernels. Per seed, one pretrain cell; then per ratio (the fraction of all kernel
weights removed) and method one cell, whose final model is evaluated on the full test split
(natural, PGD-10) and with APGD-CE+T on the first 1000 test examples (quantized_budget's
evaluation, imported).

Methods (`--methods`, comma-separated; default all):
  admm                     pretrain -> admm -> retrain, per-layer ratios (today's recipe)
  admm-global              the same with one global budget
  scores-magnitude         pretrain -> scores -> finetune (HYDRA's start: magnitudes)
  scores-magnitude-global  the same with one global budget
  scores-admm              admm's output -> scores -> finetune (reuses the admm cell)
  scores-admm-global       the same from the admm-global cell

Ratios (`--ratios`, comma-separated; default authors,0.995): `authors` is the authors' per-layer
ratios (0.8, 0.947, 0.99, 0.93: 98.8406 % of the kernel weights removed); a number is that
total, split over the layers in the authors' proportions for the per-layer methods (every
layer keeps the same fraction of what it keeps at the authors' ratios), or one global ratio.

    python benchmarks/methods.py --workdir=runs/methods --seeds=0,1,2 --json
    python benchmarks/methods.py --workdir=W --seeds=0 --methods=admm,scores-admm \
        --ratios=0.995 --epochs=5

With --json, one line per method, ratio and seed: {"method", "ratio", "seed", "natural",
"pgd10", "apgd_ce_t"} (fractions); else a table of means over the seeds. Cells live under
<workdir>/s<seed>/<method>-<ratio>/ (a rerun skips what has finished); the rows are also in
<workdir>/methods.json. HYDRA's and the authors' own code run outside this script
(benchmarks/README.md).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys

import quantized_budget as qb   # benchmarks/ is on sys.path when this file runs
import reference_budget as rb

METHODS = ("admm", "admm-global", "scores-magnitude", "scores-magnitude-global", "scores-admm",
           "scores-admm-global")
LAYERS = ("conv1", "conv2", "fc1", "fc2")
AUTHORS = (0.8, 0.947, 0.99, 0.93)              # reference_budget.SCHEMES["irregular"]
KERNEL_SIZES = (200, 3200, 200704, 2560)        # LeNet(4)'s kernels, in LAYERS order
EPOCH_FIELDS = ("pretrain", "admm", "retrain", "scores", "finetune")


def _kept(n: int, ratio: float) -> int:
  return n - min(int(math.floor(ratio * n + 0.5)), n - 1)


def authors_total() -> float:
  """The fraction of LeNet(4)'s kernel weights the authors' per-layer ratios remove."""
  kept = sum(_kept(n, r) for n, r in zip(KERNEL_SIZES, AUTHORS))
  return 1 - kept / sum(KERNEL_SIZES)


def sparsity_text(ratio: float | str, shared: bool) -> str:
  """The config.sparsity of a cell: one global entry, or per-layer ratios whose kept
  fractions are the authors' scaled to the total `ratio` ("authors": theirs exactly)."""
  total = authors_total() if ratio == "authors" else float(ratio)
  if shared:
    return f"({'|'.join(LAYERS)})/kernel=irregular:{total:.6f}:global"
  if ratio == "authors":   # reference_budget's text: its cells' configs are these cells'
    return rb.SCHEMES["irregular"]
  scale = (1 - total) / (1 - authors_total())
  ratios = tuple(1 - (1 - r) * scale for r in AUTHORS)
  return ",".join(f"{name}/kernel=irregular:{r:.6f}" for name, r in zip(LAYERS, ratios))


def plan(seed: int, ratio: float | str, method: str, workdir: str, epochs: int
         ) -> tuple[object, str, str]:
  """(config, cell directory, final stage) of one cell; pretrain lives in <workdir>/s<seed>/."""
  shared = method.endswith("-global")
  seed_dir = os.path.join(workdir, f"s{seed}")
  pre_dir = os.path.join(seed_dir, "pretrain")
  name = "authors" if ratio == "authors" else f"{float(ratio):g}"
  cell = os.path.join(seed_dir, f"{method}-{name}")
  fields = {f"{s}.epochs": epochs for s in EPOCH_FIELDS}
  fields.update(qb.NO_FINAL, sparsity=sparsity_text(ratio, shared), init_from=pre_dir)
  if method.startswith("admm"):
    return rb.make_config(seed, {}, stages="admm,retrain", **fields), cell, "retrain"
  if method.startswith("scores-admm"):   # from the admm cell of the same budget
    admm_cell = os.path.join(seed_dir, f"admm{'-global' if shared else ''}-{name}")
    fields.update(init_from=admm_cell, **{"scores.init": "admm"})
  return rb.make_config(seed, {}, stages="scores,finetune", **fields), cell, "finetune"


def row(method: str, ratio: float | str, seed: int, report: dict, attack: dict) -> dict:
  """One JSON line: the final stage's test accuracies and APGD-CE+T, as fractions."""
  final = report["stages"]["retrain" if method.startswith("admm") else "finetune"]
  total = authors_total() if ratio == "authors" else float(ratio)
  return {"method": method, "ratio": round(total, 6), "seed": seed,
          "natural": final["natural_accuracy"], "pgd10": final["adversarial_accuracy"],
          "apgd_ce_t": attack["robust_accuracy"], "apgd_examples": attack["examples"],
          "sanity_failed": attack["sanity_failed"]}


def table(rows: list[dict]) -> str:
  """Means (and spread) over seeds per method and ratio, in percent."""
  lines = [f"{'method':<26}{'ratio':>9}{'natural':>16}{'PGD-10':>16}{'APGD-CE+T':>16}  seeds"]
  keys = sorted({(r["method"], r["ratio"]) for r in rows},
                key=lambda k: (k[1], METHODS.index(k[0])))
  for method, ratio in keys:
    rs = [r for r in rows if (r["method"], r["ratio"]) == (method, ratio)]

    def fmt(k):
      v = [100 * r[k] for r in rs]
      return f"{statistics.fmean(v):6.2f} +- {statistics.stdev(v) if len(v) > 1 else 0:4.2f}"
    lines.append(f"{method:<26}{ratio:>9.6f}{fmt('natural'):>16}{fmt('pgd10'):>16}"
                 f"{fmt('apgd_ce_t'):>16}  {len(rs)}")
  return "\n".join(lines)


def _ratio(text: str) -> float | str:
  if text == "authors":
    return text
  try:
    value = float(text)
  except ValueError:
    value = -1.0
  if not 0 < value < 1:
    raise SystemExit(f"error: --ratios takes 'authors' or fractions in (0, 1), got {text!r}.")
  return value


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument("--ratios", default="authors,0.995")
  parser.add_argument("--epochs", type=int, default=2, help="epochs of every stage")
  parser.add_argument("--json", action="store_true", help="one JSON line per row")
  args = parser.parse_args(argv)
  methods = [m for m in args.methods.split(",") if m]
  if not methods or any(m not in METHODS for m in methods):
    raise SystemExit(f"error: --methods takes {', '.join(METHODS)}, got {args.methods!r}.")
  ratios = [_ratio(r) for r in args.ratios.split(",") if r]
  seeds = [int(s) for s in args.seeds.split(",") if s]
  rb.setup_logging(quiet=args.json)
  workdir = os.path.abspath(args.workdir)
  from admm_jax.app import cli  # pylint: disable=import-outside-toplevel
  from admm_jax.app.errors import UserError  # pylint: disable=import-outside-toplevel
  # scores-admm builds on the admm cell of its budget: that cell runs first.
  needed = {m.replace("scores-", "") for m in methods if m.startswith("scores-admm")}
  cells = sorted(set(methods) | needed,
                 key=lambda m: (m.startswith("scores-admm"), METHODS.index(m)))
  rows = []
  try:
    for seed in seeds:
      pre_dir = os.path.join(workdir, f"s{seed}", "pretrain")
      pre = {f"{s}.epochs": args.epochs for s in EPOCH_FIELDS}
      rb.run_cell(rb.make_config(seed, qb.NO_FINAL, stages="pretrain", **pre), pre_dir)
      for ratio in ratios:
        for method in cells:
          config, cell, final = plan(seed, ratio, method, workdir, args.epochs)
          report, _ = rb.run_cell(config, cell)
          if method not in methods:   # an admm cell run only for scores-admm
            continue
          rows.append(row(method, ratio, seed, report, qb.apgd_ce_t(cell, final)))
          if args.json:
            print(json.dumps({k: rows[-1][k] for k in ("method", "ratio", "seed", "natural",
                                                        "pgd10", "apgd_ce_t")}), flush=True)
          with open(os.path.join(workdir, "methods.json"), "w") as f:
            json.dump({"budget": rb.BUDGET, "epochs": args.epochs, "rows": rows}, f, indent=2)
  except UserError as e:
    cli.fail(e)
  if not args.json:
    print(table(rows), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
