"""Train-step throughput on 1 vs N devices of the "data" mesh (a benchmark, not a test).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/bench_scaling.py

Times the jitted adversarial train step (LeNet, PGD, the same global batch) on meshes of
the given sizes, in one process, alternating the meshes round by round so that a busy
machine slows them alike; prints median examples/s. With forced host CPU devices all
"devices" share the same cores, so this measures the overhead of splitting the step (a
smaller batch per device, the gradient all-reduce), not a speed-up; on GPUs or TPUs the
same command measures scaling. On CPU it tunes glibc malloc first, as the command line
does (`--no-malloc-tuning` not).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import numpy as np
import optax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's admm_jax, installed or not

from admm_jax import models, sparsity, transforms  # noqa: E402
from admm_jax.app import parallel, train  # noqa: E402
from admm_jax.kernels import malloc  # noqa: E402


def _step_setup(rt: parallel.Runtime, width: int, batch: int, pgd_steps: int, stage: str):
  """(jitted step, state, global batch) for one mesh; the state is replicated on it."""
  model = models.get_model("lenet", width, conv_impl="auto")
  variables = train.init_variables(model, jax.random.key(0), (28, 28, 1))
  if stage == "admm":
    spec = sparsity.spec({"conv1/kernel": ("irregular", 0.8), "conv2/kernel": ("irregular", 0.9),
                          "fc1/kernel": ("irregular", 0.98), "fc2/kernel": ("irregular", 0.9)})
    tx = optax.chain(transforms.admm(spec, rho=1e-3, update_every=100), optax.sgd(0.01, 0.9))
  else:
    tx = optax.adam(1e-3)
  state = rt.replicate(train.create_train_state(variables["params"], variables["batch_stats"], tx))
  step = train.jit_train_step(model, tx, train.Attack("pgd", 0.1, 0.025, pgd_steps, True),
                              in_shardings=(rt.replicated, rt.data, rt.replicated),
                              out_shardings=(rt.replicated, rt.replicated))
  rng = np.random.default_rng(0)
  b_local = rt.local_batch_size(batch)
  local = {"image": rng.random((b_local, 28, 28, 1), np.float32),
           "label": rng.integers(0, 10, b_local).astype(np.int32)}
  return step, state, rt.global_batch(local)


def benchmark(device_counts: list[int], width: int = 4, batch: int = 64, pgd_steps: int = 10,
              steps: int = 10, rounds: int = 5, stage: str = "pretrain") -> list[dict]:
  """Median examples/s of the train step per mesh size.

  Args:
    device_counts: mesh sizes to compare (each <= jax.device_count(), dividing `batch`).
    width, batch, pgd_steps: LeNet width, global batch, training PGD steps.
    steps: steps per timed round; rounds: timed rounds per mesh (after one warm-up round).
    stage: "pretrain" (adam) or "admm" (the ADMM transform + sgd: Z, U in the state).

  Returns:
    One dict per mesh size: devices, per_device_batch, compile_s, step_ms, examples_per_s.
  """
  key = jax.random.key(1)
  runs = {}
  for n in device_counts:
    rt = parallel.make_runtime(n)
    rt.check_batch(batch)
    step, state, gbatch = _step_setup(rt, width, batch, pgd_steps, stage)
    t = time.perf_counter()
    state, m = step(state, gbatch, key)   # compiles
    jax.block_until_ready((state, m))
    runs[n] = {"step": step, "state": state, "batch": gbatch, "compile_s": time.perf_counter() - t,
               "times": []}
  for r in range(rounds + 1):
    for n in device_counts:
      run = runs[n]
      t = time.perf_counter()
      state = run["state"]
      for _ in range(steps):
        state, m = run["step"](state, run["batch"], key)
      jax.block_until_ready((state, m))
      run["state"] = state
      if r:   # round 0 warms caches and thread pools
        run["times"].append((time.perf_counter() - t) / steps)
  out = []
  for n in device_counts:
    sec = statistics.median(runs[n]["times"])
    out.append({"devices": n, "per_device_batch": batch // n,
                "compile_s": round(runs[n]["compile_s"], 2), "step_ms": round(sec * 1e3, 1),
                "examples_per_s": round(batch / sec, 1)})
  return out


def format_table(rows: list[dict]) -> str:
  base = rows[0]["examples_per_s"]
  lines = [f"{'devices':>7} {'batch/dev':>9} {'compile s':>9} {'step ms':>8} {'examples/s':>10} "
           f"{'vs first':>8}"]
  for r in rows:
    lines.append(f"{r['devices']:>7} {r['per_device_batch']:>9} {r['compile_s']:>9.2f} "
                 f"{r['step_ms']:>8.1f} {r['examples_per_s']:>10.1f} "
                 f"{r['examples_per_s'] / base:>7.2f}x")
  return "\n".join(lines)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--devices", default="", help="comma-separated mesh sizes (default: 1,all)")
  ap.add_argument("--width", type=int, default=4)
  ap.add_argument("--batch", type=int, default=64, help="global batch")
  ap.add_argument("--pgd-steps", type=int, default=10)
  ap.add_argument("--steps", type=int, default=10, help="steps per timed round")
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--stage", choices=("pretrain", "admm"), default="pretrain")
  ap.add_argument("--no-malloc-tuning", action="store_true", help="leave glibc malloc alone")
  args = ap.parse_args()
  if jax.default_backend() == "cpu" and not args.no_malloc_tuning:
    malloc.tune_malloc_for_cpu()   # as the command line does
  counts = ([int(x) for x in args.devices.split(",")] if args.devices
            else sorted({1, jax.device_count()}))
  rows = benchmark(counts, args.width, args.batch, args.pgd_steps, args.steps, args.rounds,
                   args.stage)
  print(f"LeNet(w={args.width}) {args.stage} step, PGD-{args.pgd_steps}, global batch "
        f"{args.batch}, {jax.device_count()} {jax.default_backend()} device(s) visible "
        f"({jax.devices()[0].device_kind}); median of {args.rounds} rounds x {args.steps} steps")
  print(format_table(rows))


if __name__ == "__main__":
  main()
