"""Do PGD and APGD-CE pick the same epoch? Per stage of finished runs (issue 22).

A run made with config.eval.select_by="apgd-ce" measures every selecting stage's validation
split each epoch under the eval PGD (`val_adversarial_accuracy`, all of it) and under APGD-CE
(`val_apgd_ce_accuracy`, its first eval.select_limit examples), both in metrics.jsonl. This
script reads them and prints, per workdir and stage, the epoch each criterion picks (the
highest value; a tie goes to the first epoch, as the trainer's strict `>`), their validation
numbers, and how many stages agree.

    python benchmarks/selection_agreement.py runs/a runs/b [--json]

--json prints one line per workdir and stage: {"workdir", "stage", "epochs", "pgd_epoch",
"apgd_ce_epoch", "agree", "pgd": {"val_adversarial_accuracy", "val_apgd_ce_accuracy"} of the
epoch PGD picks, "apgd_ce": the same of the epoch APGD-CE picks}, then {"agree": n, "stages": m}.
Stages without APGD-CE numbers (select_by="pgd", or stages that output their last epoch) are
left out.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Iterable

from admm_jax.app import plot

PGD = "val_adversarial_accuracy"
APGD_CE = "val_apgd_ce_accuracy"


def selection_epochs(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
  """The epoch each criterion picks, per stage, from a run's metrics.jsonl records.

  Args:
    records: metrics.jsonl's epoch lines ({"stage", "epoch", "val_adversarial_accuracy",
      "val_apgd_ce_accuracy", ...}), in file order. A stage resumed after a crash has its
      later lines replaced (MetricsLog.truncate), so an epoch appears once; if it appears
      twice, the later line counts.

  Returns:
    {stage: {"epochs": epochs with both numbers, "pgd_epoch", "apgd_ce_epoch" (1-based),
    "agree", "pgd" and "apgd_ce": {PGD: ..., APGD_CE: ...} of the epoch that criterion picks}},
    stages in order of first appearance; stages without APGD-CE numbers are left out.
  """
  by_stage: dict[str, dict[int, dict[str, Any]]] = {}
  for r in records:
    if r.get(PGD) is None or r.get(APGD_CE) is None:
      continue
    by_stage.setdefault(r["stage"], {})[int(r["epoch"])] = r
  out = {}
  for stage, epochs in by_stage.items():
    lines = [epochs[e] for e in sorted(epochs)]
    # max keeps the first of equals, as the trainer keeps the earlier epoch on a tie.
    picks = {name: max(lines, key=lambda line, k=key: line[k])
             for name, key in (("pgd", PGD), ("apgd_ce", APGD_CE))}
    out[stage] = {"epochs": len(lines), "pgd_epoch": picks["pgd"]["epoch"],
                  "apgd_ce_epoch": picks["apgd_ce"]["epoch"],
                  "agree": picks["pgd"]["epoch"] == picks["apgd_ce"]["epoch"],
                  **{name: {PGD: line[PGD], APGD_CE: line[APGD_CE]}
                     for name, line in picks.items()}}
  return out


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("workdirs", nargs="+", metavar="WORKDIR")
  parser.add_argument("--json", action="store_true", help="one JSON line per workdir and stage")
  args = parser.parse_args(argv)
  try:
    runs = {w: selection_epochs(plot.read_metrics(w)) for w in args.workdirs}
  except plot.PlotError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  agree = total = 0
  for workdir, stages in runs.items():
    if not stages and not args.json:
      print(f"{workdir}: no APGD-CE validation numbers (run with eval.select_by=apgd-ce)")
    for stage, s in stages.items():
      agree, total = agree + s["agree"], total + 1
      if args.json:
        print(json.dumps({"workdir": workdir, "stage": stage, **s}))
        continue
      print(f"{workdir} {stage} ({s['epochs']} epochs): PGD picks epoch {s['pgd_epoch']} "
            f"(PGD {s['pgd'][PGD]:.4f}, APGD-CE {s['pgd'][APGD_CE]:.4f}), APGD-CE picks epoch "
            f"{s['apgd_ce_epoch']} (PGD {s['apgd_ce'][PGD]:.4f}, APGD-CE "
            f"{s['apgd_ce'][APGD_CE]:.4f}){'' if s['agree'] else '  DIFFERENT'}")
  print(json.dumps({"agree": agree, "stages": total}) if args.json
        else f"agreement: {agree} of {total} stages")
  return 0


if __name__ == "__main__":
  sys.exit(main())
