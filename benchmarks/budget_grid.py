"""admm_jax over the budget grid of issue 22: training examples x epochs per stage x scheme.

The grid is {20000, 60000} training examples x {2, 5} epochs per stage x {irregular, filter}
pruning at the authors' ratios, everything else at the authors' budget of
benchmarks/reference_budget.py (imported, not copied): LeNet(4), PGD-10 eps 0.1 step 0.01,
batch 64, the 2,000 validation examples carved out of the training examples. Per seed and
cell it runs pretrain (shared by the two schemes of the same examples, epochs and seed), then
admm -> retrain, and measures every stage: natural and PGD-10 accuracy on the full test split
(the run's report.json), APGD-CE+T on the first 1000 test examples (admm_jax.evaluate, with
its gradient-masking checks; cached on disk) and the wall time.

    python benchmarks/budget_grid.py --cells=60000x2:filter,20000x5:irregular --seeds=0,1,2 \
        --workdir=runs/budget_grid --json
    python benchmarks/budget_grid.py --workdir=W            # the whole grid, seeds 0,1,2: table

--json prints one line per cell and seed: {"cell": "60000x2:filter", "seed": 0, "natural",
"pgd10", "apgd_ce_t" (fractions, of the final retrain model), "wall_s" (the run's pretrain +
admm + retrain, training and their test evaluations, without the APGD-CE+T attacks), "stages":
{stage: the same numbers per stage, its own wall time and the attack's}}. Without it, a table
of mean +- std over seeds per cell and stage.

Runs live under <workdir>/<examples>x<epochs>/s<seed>/{pretrain,irregular,filter}: a rerun
skips what has finished and resumes what has not, after checking every existing run's config
against the one it runs with now (a run finished under other settings stops the benchmark
before any work). Every line also lands in <workdir>/budget_grid.json (one entry per cell and
seed, kept across invocations). The authors' code in the same cells: reference_grid.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import sys

import reference_budget as rb   # benchmarks/ is on sys.path when this file runs

EXAMPLES = (20000, 60000)
EPOCHS = (2, 5)
STAGES = ("pretrain", "admm", "retrain")
CELL_FORM = ("<examples>x<epochs>:<scheme> with examples in {20000, 60000}, epochs in {2, 5} "
             "and scheme irregular or filter, comma-separated (e.g. 60000x2:filter,"
             "20000x5:irregular), or all")
SUMMARY = "budget_grid.json"


class CellsError(ValueError):
  """Bad --cells text; one sentence naming the bad item and the accepted form."""


@dataclasses.dataclass(frozen=True)
class Cell:
  """One cell of the grid: training examples (validation included), epochs per stage, scheme."""
  examples: int
  epochs: int
  scheme: str

  @property
  def name(self) -> str:
    return f"{self.examples}x{self.epochs}:{self.scheme}"

  @property
  def budget(self) -> str:
    """The cell without its scheme: the folder its pretrain shares with the other scheme."""
    return f"{self.examples}x{self.epochs}"

  def settings(self) -> dict[str, object]:
    """The config fields that make the authors' budget this cell's."""
    return {"data.limit_train": self.examples, "pretrain.epochs": self.epochs,
            "admm.epochs": self.epochs, "retrain.epochs": self.epochs}


GRID = tuple(Cell(n, e, s) for n in EXAMPLES for e in EPOCHS for s in rb.SCHEMES)


def parse_budget(item: str) -> tuple[int, int]:
  """'20000x5' -> (20000, 5), checked against the grid.

  Raises:
    CellsError: naming the item and the accepted form.
  """
  m = re.fullmatch(r"(\d+)x(\d+)", item.strip())
  if not m or int(m[1]) not in EXAMPLES or int(m[2]) not in EPOCHS:
    raise CellsError(f"{item!r} is not a budget of the grid: use <examples>x<epochs> with "
                     f"examples in {{20000, 60000}} and epochs in {{2, 5}} (e.g. 20000x5).")
  return int(m[1]), int(m[2])


def parse_cells(text: str) -> list[Cell]:
  """'60000x2:filter,20000x5:irregular' (or 'all') -> the cells, in order, without repeats.

  Raises:
    CellsError: the first bad item, in one sentence with the accepted form.
  """
  if text.strip() == "all":
    return list(GRID)
  cells = []
  for item in text.split(","):
    m = re.fullmatch(r"(\d+)x(\d+):(\w+)", item.strip())
    cell = m and Cell(int(m[1]), int(m[2]), m[3])
    if not cell or cell not in GRID:
      raise CellsError(f"--cells item {item.strip()!r} is not a cell of the grid: use {CELL_FORM}.")
    if cell not in cells:
      cells.append(cell)
  return cells


def parse_seeds(text: str) -> list[int]:
  """'0,1,2' -> [0, 1, 2]. Raises CellsError on anything but non-negative integers."""
  try:
    seeds = [int(s) for s in text.split(",")]
  except ValueError:
    seeds = []
  if not seeds or min(seeds) < 0:
    raise CellsError(f"--seeds={text!r} is not a comma-separated list of non-negative integers "
                     "(e.g. --seeds=0,1,2).")
  return list(dict.fromkeys(seeds))


def plan(cells: list[Cell], seeds: list[int], workdir: str, overrides: dict[str, object]
         ) -> list[tuple[Cell, int, tuple, tuple]]:
  """(cell, seed, (pretrain config, dir), (admm/retrain config, dir)) per cell and seed.

  `overrides` go on top of the cell's settings (the tests shrink a cell with them); the
  config's own APGD evaluation of every stage is off (NO_FINAL): `measure` attacks each
  stage after the run, so that wall_s times the training alone.
  """
  out = []
  for cell in cells:
    for seed in seeds:
      fields = {**cell.settings(), **rb.NO_FINAL, **overrides}
      base = os.path.join(workdir, cell.budget, f"s{seed}")
      pre_dir = os.path.join(base, "pretrain")
      pre = (rb.make_config(seed, fields, stages="pretrain"), pre_dir)
      run = (rb.make_config(seed, fields, stages="admm,retrain", init_from=pre_dir,
                            sparsity=rb.SCHEMES[cell.scheme]), os.path.join(base, cell.scheme))
      out.append((cell, seed, pre, run))
  return out


def _stage(report_stage: dict, attack: dict) -> dict:
  return {"natural": report_stage["natural_accuracy"],
          "pgd10": report_stage["adversarial_accuracy"],
          "apgd_ce_t": attack["robust_accuracy"], "apgd_examples": attack["examples"],
          "apgd_sanity_failed": attack["sanity_failed"], "wall_s": report_stage["wall_time_s"],
          "attack_wall_s": attack.get("wall_time_s")}


def measure(cell: Cell, seed: int, pre: tuple, run: tuple, *, attack_limit: int = rb.ATTACK_LIMIT,
            sanity: bool = True) -> dict:
  """Runs (or resumes, or skips) one cell and seed and attacks its stages; returns its line."""
  (pre_config, pre_dir), (config, cell_dir) = pre, run
  pre_report, pre_wall = rb.run_cell(pre_config, pre_dir)
  report, wall = rb.run_cell(config, cell_dir)
  attack = lambda where, stage: rb.attack_stage(where, stage, limit=attack_limit, sanity=sanity)
  stages = {"pretrain": _stage(pre_report["stages"]["pretrain"], attack(pre_dir, "pretrain"))}
  for stage in ("admm", "retrain"):
    stages[stage] = _stage(report["stages"][stage], attack(cell_dir, stage))
  final = stages["retrain"]
  return {"cell": cell.name, "seed": seed, "natural": final["natural"], "pgd10": final["pgd10"],
          "apgd_ce_t": final["apgd_ce_t"], "wall_s": round(pre_wall + wall, 1), "stages": stages}


def save(workdir: str, lines: list[dict]) -> str:
  """Merges `lines` into <workdir>/budget_grid.json (one entry per cell and seed)."""
  from admm_jax.app.workdir import write_json_atomic  # pylint: disable=import-outside-toplevel
  path = os.path.join(workdir, SUMMARY)
  old = []
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)["lines"]
  new = {(ln["cell"], ln["seed"]): ln for ln in old + lines}
  write_json_atomic(path, {"budget": rb.BUDGET, "attack": rb.ATTACK,
                           "lines": sorted(new.values(), key=lambda ln: (ln["cell"], ln["seed"]))})
  return path


def table(lines: list[dict]) -> str:
  """Mean +- std over seeds per cell and stage, accuracies in %."""
  groups: dict[str, list[dict]] = {}
  for ln in lines:
    groups.setdefault(ln["cell"], []).append(ln)

  def fmt(values: list[float], scale: float = 100.0) -> str:
    values = [scale * v for v in values]
    if len(values) == 1:
      return f"{values[0]:.2f}"
    return f"{statistics.fmean(values):.2f} +- {statistics.stdev(values):.2f}"

  out = ["admm_jax over the budget grid: test accuracy %, mean +- std over seeds (natural and "
         "PGD-10 on the full test split, APGD-CE+T on the first 1000); wall s of the stage",
         f"{'cell':<18}{'stage':<10}{'seeds':>6}{'natural':>16}{'PGD-10':>16}{'APGD-CE+T':>16}"
         f"{'wall s':>16}"]
  for name, rows in groups.items():
    for stage in STAGES:
      s = [r["stages"][stage] for r in rows]
      out.append(f"{name:<18}{stage:<10}{len(rows):>6}{fmt([x['natural'] for x in s]):>16}"
                 f"{fmt([x['pgd10'] for x in s]):>16}{fmt([x['apgd_ce_t'] for x in s]):>16}"
                 f"{fmt([x['wall_s'] for x in s], 1.0):>16}")
    out.append(f"{'':<18}{'whole run':<10}{len(rows):>6}{'':>48}"
               f"{fmt([r['wall_s'] for r in rows], 1.0):>16}")
    failed = sorted({f for r in rows for st in r["stages"].values()
                     for f in st["apgd_sanity_failed"]})
    if failed:
      out.append(f"{'':<18}APGD sanity checks failed: {', '.join(failed)}")
  return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="where the runs and budget_grid.json go")
  parser.add_argument("--cells", default="all", help=f"cells: {CELL_FORM} (default all)")
  parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="override a config field on top of the cell (repeatable)")
  parser.add_argument("--json", action="store_true", help="one JSON line per cell and seed")
  parser.add_argument("--quiet", action="store_true", help="no per-step training log")
  parser.add_argument("--no-malloc-tuning", action="store_true",
                      help="leave glibc malloc alone (the CLI's --notune_malloc)")
  args = parser.parse_args(argv)
  try:
    cells, seeds = parse_cells(args.cells), parse_seeds(args.seeds)
  except CellsError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  overrides = rb.parse_overrides(args.set)
  rb.setup_logging(quiet=args.quiet)
  workdir = os.path.abspath(args.workdir)
  import jax  # pylint: disable=import-outside-toplevel
  if jax.default_backend() == "cpu" and not args.no_malloc_tuning:
    from admm_jax.kernels import malloc  # pylint: disable=import-outside-toplevel
    malloc.tune_malloc_for_cpu()  # as the command line does, so the wall times compare

  runs = plan(cells, seeds, workdir, overrides)
  from admm_jax.app import cli  # pylint: disable=import-outside-toplevel
  from admm_jax.app.errors import UserError  # pylint: disable=import-outside-toplevel
  lines = []
  try:
    rb.check_cells([(seed, None, *pre) for _, seed, pre, _ in runs]
                   + [(seed, cell.scheme, *run) for cell, seed, _, run in runs])
    budgets = {cell.examples: pre[0] for cell, _, pre, _ in runs}
    for examples, config in budgets.items():  # the data of every cell, before any training
      rb.check_data(config, labelled=examples)
    for cell, seed, pre, run in runs:
      print(f"[{cell.name} seed {seed}] -> {run[1]}", file=sys.stderr, flush=True)
      lines.append(measure(cell, seed, pre, run))
      save(workdir, lines)
      if args.json:
        print(json.dumps(lines[-1]), flush=True)
  except UserError as e:
    cli.fail(e)  # one sentence; exit code 2 (128 + signal after SIGTERM/SIGINT)
  if not args.json:
    print(table(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())
