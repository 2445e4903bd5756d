"""Quantized sparse models at the authors' budget: float vs 8-bit vs 4-bit, irregular and filter.

Same budget and pruning schemes as benchmarks/reference_budget.py (imported, not copied); the
k-bit rows add ':<k>b' (a scale per output channel) to every pruned layer, so that ADMM
projects onto the sparse k-bit set and the retrain stage keeps the weights on the grid
(straight-through) inside its own 2 epochs. Every retrain output is then attacked with
APGD-CE+T (with the gradient-masking sanity checks) on the first 1000 test examples and
exported (python -m admm_jax.export: compact storage, int8/int4 codes, ONNX checked by
onnxruntime).

    python benchmarks/quantized_budget.py --workdir=runs/quantized_budget --seeds=0,1,2

Cells live under <workdir>/s<seed>/<scheme>-<bits>/ (export in .../export): a rerun skips
what has finished. Results: <workdir>/quantized_summary.json and the printed table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import reference_budget as rb   # benchmarks/ is on sys.path when this file runs

ATTACK, ATTACK_LIMIT, NO_FINAL = rb.ATTACK, rb.ATTACK_LIMIT, rb.NO_FINAL  # NO_FINAL: `_evaluate`
# attacks the retrain output alone.


def with_bits(scheme_text: str, bits: int | None) -> str:
  """A scheme's sparsity text with ':<bits>b' on every entry (unchanged for float)."""
  if bits is None:
    return scheme_text
  return ",".join(f"{item}:{bits}b" for item in scheme_text.split(","))


def _evaluate(cell_dir: str) -> dict:
  """APGD-CE+T on the first 1000 test examples of the retrain output (cached on disk)."""
  return apgd_ce_t(cell_dir, "retrain")


def apgd_ce_t(cell_dir: str, stage: str) -> dict:
  """APGD-CE+T on the first 1000 test examples of `stage`'s output in `cell_dir`, with the
  gradient-masking sanity checks: {"robust_accuracy" (a fraction), "examples",
  "sanity_failed", ...}; cached on disk beside the cell's runs (`reference_budget.attack_stage`)."""
  name = "quantized_bench_eval.json" if stage == "retrain" else f"apgd_ce_t_{stage}.json"
  return rb.attack_stage(cell_dir, stage, cache_name=name)


def _export(cell_dir: str) -> dict:
  from admm_jax.app import export  # pylint: disable=import-outside-toplevel
  out = os.path.join(cell_dir, "export")
  if os.path.exists(os.path.join(out, "export.json")):
    with open(os.path.join(out, "export.json")) as f:
      return json.load(f)
  return export.export_workdir(cell_dir, out, latency_batches=(1, 256))


def row(scheme: str, bits: int | None, report: dict, attack: dict, exp: dict) -> dict:
  stage = report["stages"]["retrain"]
  b = exp.get("bytes", {})
  return {"scheme": scheme, "bits": bits or 32,
          "file_bytes": b.get("quantized_params", b.get("compact_params")),
          "onnx_bytes": b.get("onnx"), "dense_float32_bytes": b.get("dense_params"),
          "float_compact_bytes": b.get("compact_params"),
          "natural": 100 * stage["natural_accuracy"],
          "pgd10": 100 * stage["adversarial_accuracy"],
          "apgd_ce_t": 100 * attack["robust_accuracy"], "apgd_examples": attack["examples"],
          "sanity_failed": attack["sanity_failed"],
          "onnx_max_abs_logit_difference": exp.get("onnx", {}).get("max_abs_logit_difference"),
          "onnx_test_accuracy": exp.get("onnx", {}).get("natural_accuracy"),
          "onnx_latency_batch_1_s": exp.get("onnx", {}).get("latency", {}).get("batch_1_s"),
          "test_examples": exp.get("onnx", {}).get("test_examples")}


def table(rows: list[dict]) -> str:
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    groups.setdefault((r["scheme"], r["bits"]), []).append(r)
  fmt = lambda vs: (f"{statistics.fmean(vs):6.2f} +- {statistics.stdev(vs):4.2f}" if len(vs) > 1
                    else f"{vs[0]:6.2f}")
  mean = lambda rs, k: (int(statistics.fmean([r[k] for r in rs])) if all(
      r.get(k) is not None for r in rs) else "-")
  lines = [f"{'scheme':<10}{'bits':>5}{'file bytes':>12}{'onnx bytes':>12}{'natural':>16}"
           f"{'PGD-10':>16}{'APGD-CE+T':>16}  seeds  onnx: |acc - run| examples, max|dlogit|"]
  for (scheme, bits), rs in groups.items():
    onnx = "-"
    if all(r.get("onnx_test_accuracy") is not None for r in rs):
      worst = max(abs(r["onnx_test_accuracy"] * 100 - r["natural"]) for r in rs)
      onnx = (f"{worst / 100 * rs[0]['test_examples']:.0f}, "
              f"{max(r['onnx_max_abs_logit_difference'] for r in rs):.1e}")
    lines.append(f"{scheme:<10}{bits:>5}{mean(rs, 'file_bytes'):>12}{mean(rs, 'onnx_bytes'):>12}"
                 f"{fmt([r['natural'] for r in rs]):>16}{fmt([r['pgd10'] for r in rs]):>16}"
                 f"{fmt([r['apgd_ce_t'] for r in rs]):>16}  {len(rs):>5}  {onnx}")
  dense = [r["dense_float32_bytes"] for r in rows if r.get("dense_float32_bytes")]
  if dense:
    lines.append(f"dense float32 model: {int(statistics.fmean(dense))} bytes (uncompressed .npz)")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--schemes", default="irregular,filter")
  parser.add_argument("--bits", default="32,8,4", help="32 = float")
  parser.add_argument("--no-export", action="store_true", help="train and attack only")
  args = parser.parse_args(argv)
  rb.setup_logging()
  workdir = os.path.abspath(args.workdir)
  seeds = [int(s) for s in args.seeds.split(",")]
  bits_list = [None if int(b) == 32 else int(b) for b in args.bits.split(",")]
  rows = []
  for seed in seeds:
    pre_dir = os.path.join(workdir, f"s{seed}", "pretrain")
    print(f"[seed {seed}] pretrain -> {pre_dir}", flush=True)
    rb.run_cell(rb.make_config(seed, NO_FINAL, stages="pretrain"), pre_dir)
    for scheme in args.schemes.split(","):
      for bits in bits_list:
        cell_dir = os.path.join(workdir, f"s{seed}", f"{scheme}-{bits or 32}")
        print(f"[seed {seed}] {scheme} {bits or 32} bits -> {cell_dir}", flush=True)
        report, _ = rb.run_cell(rb.make_config(
            seed, NO_FINAL, stages="admm,retrain", init_from=pre_dir,
            sparsity=with_bits(rb.SCHEMES[scheme], bits)), cell_dir)
        attack = _evaluate(cell_dir)
        exp = {} if args.no_export else _export(cell_dir)
        rows.append({"seed": seed, **row(scheme, bits, report, attack, exp)})
        with open(os.path.join(workdir, "quantized_summary.json"), "w") as f:
          json.dump({"budget": rb.BUDGET, "attack": ATTACK, "attack_limit": ATTACK_LIMIT,
                     "rows": rows}, f, indent=2)
        print(table(rows), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
