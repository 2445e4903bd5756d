"""What eval.select_by="apgd-ce" adds to every epoch: one validation APGD-CE pass, timed.

    python benchmarks/selection_cost.py [--width=4] [--limit=1000] [--steps=100] [--repeats=2]

Builds a run's context from configlib.base_config() (Fashion-MNIST, 2000 validation examples,
eps 0.1, eval_batch_size 500) with LeNet(width), freshly initialised: APGD runs all its
iterations whatever the weights, so the time is the trained model's. It times the trainer's
selection pass (ctx.evaluate with the APGD-CE attack on the first `limit` validation
examples, `steps` iterations, one restart) and, for scale, the PGD validation pass every epoch
already makes (attack.eval_steps, the whole validation split): the first call of each
(compilation included), then the best of `repeats` further calls. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
import tempfile
import time

from admm_jax.app import configlib, context


def _timed(fn) -> tuple[float, dict]:
  t0 = time.perf_counter()
  result = fn()
  return time.perf_counter() - t0, result


def measure(width: int, limit: int, steps: int, repeats: int, **fields) -> dict:
  """{"apgd_ce": {"first_s", "pass_s", "examples", "steps"}, "pgd": the same but steps,
  "devices", "width"}; `fields` ({"data.validation_size": 64}) go on top of the config."""
  config = configlib.override(configlib.base_config(), {
      "model.width": width, "eval.select_by": "apgd-ce", "eval.select_limit": limit,
      "eval.select_steps": steps, "stages": "pretrain", **fields})
  workdir = tempfile.mkdtemp(prefix="selection_cost_")
  try:
    ctx = context.make_context(config, workdir)
    model = ctx.model(width)
    v = ctx.fresh_variables(model, "pretrain")
    key = ctx.key("select", "pretrain")
    out = {"devices": ctx.runtime.num_devices, "width": width}
    for name, kw in (("apgd_ce", {"attack": ctx.select_attack, "limit": limit}),
                     ("pgd", {})):
      run = functools.partial(ctx.evaluate, model, v["params"], v["batch_stats"], "validation",
                              key, **kw)
      first, result = _timed(run)
      out[name] = {"first_s": round(first, 2),
                   "pass_s": round(min(_timed(run)[0] for _ in range(repeats)), 2),
                   "examples": result["count"]}
    out["apgd_ce"]["steps"] = steps
    return out
  finally:
    shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--width", type=int, default=4)
  parser.add_argument("--limit", type=int, default=1000)
  parser.add_argument("--steps", type=int, default=100)
  parser.add_argument("--repeats", type=int, default=2)
  args = parser.parse_args(argv)
  print(json.dumps(measure(args.width, args.limit, args.steps, args.repeats)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
