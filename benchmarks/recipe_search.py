"""Reruns any row of the recipe search behind the defaults (docs/method.md section 8).

Each row of the search table is a named set of config overrides at the authors' budget; every
cell is an ordinary `benchmarks/reference_budget.py` run (admm -> retrain per scheme and seed,
from the seed's pretrained model), so a rerun resumes and the table's columns come from its
summary.json:

    python benchmarks/recipe_search.py --list
    python benchmarks/recipe_search.py --row=rho0.05x1.3 --workdir=runs/search [--seeds=0,1,2]
        [--schemes=irregular,filter] [--carved] [--quiet]

Rows run under <workdir>/rows/<row>/ and share the pretrained models in <workdir>/pretrained/
(the pretrain stage is the same for every row). The search ran with the validation split held
out on top of the 20,000 training examples (22,000 labelled examples), so that is what a rerun
does; --carved runs the row at the exact budget instead (20,000 labelled in all, as
reference_budget.py's default). The search chose on the mean over both schemes of the
validation adversarial accuracy; its seeds were 0-5 for irregular and 0-2 for filter, seeds 3-5
pretrained on a GPU (--seeds picks any).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference_budget  # noqa: E402  # the budget, the cells and their summary

# "Everything else the previous defaults": the defaults before the search, rho 0.01 x1.5.
PREVIOUS = {"admm.rho": 0.01, "admm.rho_growth": 1.5}
# row name -> (the table's label, overrides on top of PREVIOUS), in the table's order.
ROWS = {
    "rho0.03x1.4": ("rho 0.03 x1.4 (the new default)", {"admm.rho": 0.03, "admm.rho_growth": 1.4}),
    "rho0.05x1.3": ("rho 0.05 x1.3", {"admm.rho": 0.05, "admm.rho_growth": 1.3}),
    "rho0.03x1.5": ("rho 0.03 x1.5", {"admm.rho": 0.03}),
    "rho0.03x1.5-retrain0.1": ("rho 0.03 x1.5, retrain peak 0.1",
                               {"admm.rho": 0.03, "retrain.lr": 0.1}),
    "rho0.01x1.5": ("rho 0.01 x1.5 (the previous default)", {}),
    "rho0.02x1.5": ("rho 0.02 x1.5", {"admm.rho": 0.02}),
    "rho0.03x1.3": ("rho 0.03 x1.3", {"admm.rho": 0.03, "admm.rho_growth": 1.3}),
    "retrain0.1": ("retrain Adam peak 0.1", {"retrain.lr": 0.1}),
    "warmup0.5": ("retrain warmup 1/2 epoch", {"retrain.warmup_epochs": 0.5}),
    "rho0.01x2.0": ("rho 0.01 x2.0", {"admm.rho_growth": 2.0}),
    "rho0.01x1.25-zu0.125": ("rho 0.01 x1.25, Z/U every 1/8 epoch",
                           {"admm.rho_growth": 1.25, "admm.update_every_epochs": 0.125}),
    "retrain-wd5e-4": ("retrain weight decay 5e-4", {"retrain.weight_decay": 5e-4}),
    "retrain0.02": ("retrain Adam peak 0.02", {"retrain.lr": 0.02}),
    "rho0.03x1.3-retrain0.02": ("rho 0.03 x1.3, retrain peak 0.02",
                                {"admm.rho": 0.03, "admm.rho_growth": 1.3, "retrain.lr": 0.02}),
    "retrain-sgd0.05": ("retrain SGD 0.05 (momentum 0.9), cosine",
                        {"retrain.optimizer": "sgd", "retrain.lr": 0.05,
                         "retrain.momentum": 0.9, "retrain.schedule": "cosine"}),
    "admm-adam1e-3": ("ADMM W-step Adam 1e-3", {"admm.optimizer": "adam", "admm.lr": 1e-3}),
    "admm-sgd0.005": ("ADMM SGD lr 0.005", {"admm.lr": 0.005}),
}


def row_overrides(row: str) -> dict[str, object]:
  """The config fields a row sets on top of the budget (PREVIOUS, then the row's own)."""
  return {**PREVIOUS, **ROWS[row][1]}


def row_line(row: str, summary: dict) -> str:
  """The row in the search table's columns, from reference_budget's summary["results"]."""
  res = summary["results"]
  cells, val_adv = [ROWS[row][0]], []
  for scheme in ("irregular", "filter"):
    if scheme not in res:
      cells += ["-"] * (2 if scheme == "irregular" else 1)
      continue
    nat, adv = res[scheme]["retrain_val"]["natural"], res[scheme]["retrain_val"]["adversarial"]
    val_adv.append(adv[0])
    cells.append(f"{nat[0]:.1f} +- {nat[1]:.1f} / {adv[0]:.1f} +- {adv[1]:.1f} "
                 f"({len(summary['seeds'])})")
    if scheme == "irregular":
      pruned = res[scheme]["after_hard_prune_val"]["adversarial"]
      cells.append(f"{pruned[0]:.1f} +- {pruned[1]:.1f}")
  cells.append(f"{sum(val_adv) / len(val_adv):.1f}" if len(val_adv) == 2 else "-")
  for scheme in ("irregular", "filter"):
    adv = res.get(scheme, {}).get("retrain", {}).get("adversarial")
    cells.append(f"{adv[0]:.1f} +- {adv[1]:.1f}" if adv else "-")
  return "| " + " | ".join(cells) + " |"


HEADER = ("| variant | irregular: val natural / adversarial (seeds) | irregular: hard-pruned val "
          "adv. | filter: val natural / adversarial (seeds) | mean val adv. of both | irregular "
          "test adv. | filter test adv. |")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--row", help="the row to rerun (--list shows them)")
  parser.add_argument("--list", action="store_true", help="list the rows and their overrides")
  parser.add_argument("--workdir", help="rows/<row>/ and pretrained/ go here")
  parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
  parser.add_argument("--schemes", default="irregular,filter", help="irregular and/or filter")
  parser.add_argument("--carved", action="store_true",
                      help="20,000 labelled examples in all (validation carved out of them) "
                      "instead of the search's 20,000 train + 2,000 validation")
  parser.add_argument("--quiet", action="store_true", help="no per-step training log")
  args = parser.parse_args(argv)
  if not args.list:
    if args.row not in ROWS:
      parser.error(f"--row={args.row!r} is not a row of the search table: use one of "
                   f"{', '.join(ROWS)} (--list shows their overrides).")
    if not args.workdir:
      parser.error("--workdir is required to run a row (e.g. --workdir=runs/search).")
  return args


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  if args.list:
    for row, (label, _) in ROWS.items():
      sets = " ".join(f"--set {k}={v}" for k, v in row_overrides(row).items())
      print(f"{row:<26} {label}\n{'':<26} {sets}")
    return 0
  workdir = os.path.abspath(args.workdir)
  row_dir = os.path.join(workdir, "rows", args.row)
  argv = [f"--workdir={row_dir}", f"--pretrained={os.path.join(workdir, 'pretrained')}",
          f"--seeds={args.seeds}", f"--schemes={args.schemes}",
          *[a for k, v in row_overrides(args.row).items() for a in ("--set", f"{k}={v!r}")]]
  argv += [] if args.carved else ["--validation-on-top"]
  argv += ["--quiet"] if args.quiet else []
  reference_budget.main(argv)
  with open(os.path.join(row_dir, "summary.json")) as f:
    summary = json.load(f)
  print(f"\n{HEADER}\n{'| --- ' * 7}|\n{row_line(args.row, summary)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
