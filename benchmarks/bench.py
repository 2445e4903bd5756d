"""Benchmark: admm_jax's jitted adversarial ADMM train step next to a PyTorch-eager loop.

Run from the repository root: python benchmarks/bench.py [--quick] [--json]
     [--cases lenet:16:10:64,vgg16:16:10:128:bf16,...] [--threads N] [--repeats R]
     [--no-torch] [--torch-compile [BACKEND]] [--no-extras] [--profile [TOP]]
     [--no-malloc-tuning] [--cache DIR] [--table ROWS.json ...]

For each case (model:width:pgd_steps:batch[:dtype]) it times admm_jax's jitted train step (PGD-K
adversarial examples, cross-entropy on them, the ADMM penalty from `transforms.admm`, SGD
with momentum) and `bench_torch.TorchADMMTrainer`, a PyTorch-eager re-statement of the
authors' loop on the same topology, attack, batch and thread count. The two are timed
alternately, A B A B ..., and each pair gives one ratio: these machines are shared, and a
slow minute then slows both sides of a pair. Reported: medians, the median pair ratio, the
achieved FLOP/s against the machine's measured float32 matmul peak (FLOPs from XLA's cost
analysis), compile time, XLA's memory footprint, recompilations after the first step, and
(extras) the cost of `admm` and `apply_masks` over plain SGD (their optimizer update alone as a
share of the step, and a step-level A/B that the noise mostly hides), the Z/U update next to
numpy's percentile on the same weights, the input pipeline's and the PGD evaluation's
examples/s. `--profile` adds, per case, the step's slowest XLA operations (`opprofile`).
On CPU it tunes glibc malloc first, as the command line does (`--no-malloc-tuning` not).
See benchmarks/README.md for the tables and what they mean.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any, Callable

import numpy as np

import jax
import jax.numpy as jnp
import optax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's admm_jax, installed or not

from admm_jax import models, sparsity, transforms  # noqa: E402
from admm_jax.app import compilation, data, train  # noqa: E402
from admm_jax.kernels import malloc  # noqa: E402
import opprofile  # noqa: E402  (benchmarks/opprofile.py)

EPS, STEP_SIZE = 0.3, 0.01        # MNIST-style Linf attack, as in the issue
LR, MOMENTUM, RHO, PRUNE = 0.01, 0.9, 1e-3, 0.8
SPEC = {".*kernel": ("irregular", PRUNE)}   # every conv/dense kernel, as the torch side does
INPUT_SHAPES = {name: e.input_shape for name, e in models.REGISTRY.items()}   # the registry's

DEFAULT_CASES = ("lenet:1:10:64", "lenet:1:40:64", "lenet:4:10:64", "lenet:4:40:64",
                 "lenet:16:10:64", "lenet:16:40:64", "vgg16:4:10:128", "resnet18:4:10:128")
QUICK_CASES = ("lenet:4:10:64", "lenet:16:10:64")
DTYPES = {"float32": "float32", "f32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}


@dataclasses.dataclass(frozen=True)
class Case:
  """One benchmark row: model name, width multiplier, PGD steps, batch size, compute dtype."""
  model: str
  width: int
  steps: int
  batch: int
  dtype: str = "float32"

  @classmethod
  def parse(cls, text: str) -> "Case":
    """Parses "model:width:steps[:batch[:dtype]]" (batch defaults to 64 for lenet, 128
    otherwise; dtype float32 (f32) or bfloat16 (bf16), default float32)."""
    parts = text.strip().split(":")
    dtype = "float32"
    if len(parts) == 5:
      if parts[4] not in DTYPES:
        raise ValueError(f"case {text!r}: dtype {parts[4]!r} is unknown: use float32 or "
                         "bfloat16 (f32, bf16).")
      dtype = DTYPES[parts.pop()]
    if len(parts) not in (3, 4) or parts[0] not in INPUT_SHAPES:
      raise ValueError(f"case {text!r} must be model:width:steps[:batch[:dtype]] with model "
                       f"in {sorted(INPUT_SHAPES)}, e.g. lenet:16:10:64 or vgg16:16:10:128:bf16.")
    try:
      nums = [int(p) for p in parts[1:]]
    except ValueError:
      raise ValueError(f"case {text!r}: width, steps and batch must be integers.") from None
    batch = nums[2] if len(nums) == 3 else (64 if parts[0] == "lenet" else 128)
    if min(nums[0], nums[1], batch) < 1:
      raise ValueError(f"case {text!r}: width, steps and batch must be >= 1.")
    return cls(parts[0], nums[0], nums[1], batch, dtype)


# ----------------------------------------------------------------------------- timing helpers

def _now() -> float:
  return time.perf_counter()


def _calibrate(run_once: Callable[[], None], min_seconds: float) -> int:
  """Number of calls that take about `min_seconds` (after one untimed warm call)."""
  run_once()
  t = _now()
  run_once()
  dt = max(_now() - t, 1e-6)
  return max(1, int(round(min_seconds / dt)))


def _time_calls(run_once: Callable[[], None], n: int) -> float:
  """Seconds for n calls (run_once must block until its work is done on the last call)."""
  t = _now()
  for _ in range(n):
    run_once()
  return _now() - t


def alternate(fns: dict[str, Callable[[], None]], repeats: int, min_seconds: float
              ) -> dict[str, list[float]]:
  """Times each fn in turn, A B C A B C ..., `repeats` rounds; returns seconds per call."""
  counts = {k: _calibrate(f, min_seconds) for k, f in fns.items()}
  out: dict[str, list[float]] = {k: [] for k in fns}
  for _ in range(repeats):
    for k, f in fns.items():
      out[k].append(_time_calls(f, counts[k]) / counts[k])
  return out


def _median(xs: list[float]) -> float:
  return float(statistics.median(xs)) if xs else float("nan")


def _matmul_size() -> int:
  """n of the peak-measuring n x n matmul: large enough to saturate the backend's device."""
  return 1536 if jax.default_backend() == "cpu" else 8192


class Matmul:
  """One n x n XLA matmul in `dtype` (float32: XLA's default precision, TF32 on NVIDIA GPUs);
  timed alongside the steps to give the in-situ peak of that dtype."""

  def __init__(self, n: int | None = None, dtype: str = "float32"):
    n = n or _matmul_size()
    self.flops = 2 * n ** 3
    self.a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32), dtype)
    self.f = jax.jit(lambda a: a @ a)

  def __call__(self) -> None:
    self.f(self.a).block_until_ready()


def matmul_peak_gflops(n: int | None = None, seconds: float = 1.0) -> float:
  """The machine's float32 matmul rate (GFLOP/s): best of a few timed n x n XLA matmuls."""
  matmul = Matmul(n)
  matmul()
  best = 0.0
  t_end = _now() + seconds
  while _now() < t_end or best == 0.0:
    t = _now()
    matmul()
    best = max(best, matmul.flops / (_now() - t) / 1e9)
  return best


# ----------------------------------------------------------------------------- the jax side

def _model(case: Case):
  return models.get_model(case.model, case.width, conv_impl="auto", dtype=case.dtype)


def _batch(case: Case, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {"image": rng.random((case.batch,) + INPUT_SHAPES[case.model], np.float32),
          "label": rng.integers(0, 10, case.batch).astype(np.int32)}


def _attack(case: Case) -> train.Attack:
  return train.Attack("pgd", eps=EPS, step_size=STEP_SIZE, steps=case.steps)


def _tx(kind: str, params: Any) -> optax.GradientTransformation:
  """"admm": admm + SGD momentum (the benchmarked step); "sgd": plain; "masks": SGD + masks."""
  sgd = optax.sgd(LR, momentum=MOMENTUM)
  if kind == "admm":
    # update_every beyond the timed steps: the Z/U update is timed on its own (zu_update).
    return optax.chain(transforms.admm(SPEC, rho=RHO, update_every=10 ** 9), sgd)
  if kind == "masks":
    return optax.chain(sgd, transforms.apply_masks(sparsity.masks(params, sparsity.spec(SPEC))))
  return sgd


class JaxStep:
  """A jitted admm_jax train step on a fixed device batch, state donated between calls."""

  def __init__(self, case: Case, tx_kind: str = "admm"):
    self.case = case
    self.model = _model(case)
    variables = train.init_variables(self.model, jax.random.key(0), INPUT_SHAPES[case.model])
    self.tx = _tx(tx_kind, variables["params"])
    self.state = train.create_train_state(variables["params"], variables["batch_stats"], self.tx)
    self.batch = jax.device_put(_batch(case))
    self.key = jax.random.key(1)
    self.traces = 0
    step_fn = functools.partial(train.train_step, model=self.model, tx=self.tx,
                                attack=_attack(case))

    def traced_step(*args):
      self.traces += 1   # runs when jit traces (a new compilation), not on each call
      return step_fn(*args)

    # As `train.jit_train_step`, with its traces counted.
    self.step = jax.jit(traced_step, donate_argnums=(0,))
    t = _now()
    self.compiled = self.step.lower(self.state, self.batch, self.key).compile()
    self.compile_s = _now() - t
    self.metrics = None

  def __call__(self) -> None:
    self.state, self.metrics = self.step(self.state, self.batch, self.key)
    # Blocking on a tiny output keeps the timing honest without a host round-trip of state.
    jax.block_until_ready(self.metrics)

  def profile(self, top: int) -> dict[str, Any]:
    """Per-XLA-op time of the step (see `opprofile.profile_ops`), on a non-donating twin."""
    step = jax.jit(functools.partial(train.train_step, model=self.model, tx=self.tx,
                                     attack=_attack(self.case)))
    return opprofile.profile_ops(step, (self.state, self.batch, self.key), top=top)

  def recompiles(self) -> int:
    """Traces beyond the first (0 means one compilation served every call)."""
    return max(self.traces - 1, 0)

  def memory_mb(self) -> float:
    """XLA's footprint of the compiled step: arguments + outputs + temporaries - aliased."""
    m = self.compiled.memory_analysis()
    if m is None:
      return float("nan")
    total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)
    return total / 2 ** 20

  def flops(self) -> float:
    """Nominal FLOPs of one step: XLA's cost analysis of the step with direct convolutions.

    The count is the model's, not the implementation's: it is taken with `conv_impl="xla"`
    whatever the timed step runs, so the FFT convolution's fewer flops do not shrink it, and
    both sides of the comparison are measured against one count (as in model-FLOPs
    utilisation). XLA counts a while-loop body once, so the PGD loop is added by hand: the
    step without an attack (forward, backward, update) plus `steps` times one input-gradient
    pass. Both counts come from the lowered programs' cost analysis, which compiles nothing
    (compiling them doubled a row's compile time: ResNet-18 on a GPU ran out of time there).
    """
    case = self.case
    model = self.model.clone(conv=models.conv_module("xla"))
    no_attack = jax.jit(functools.partial(train.train_step, model=model, tx=self.tx,
                                          attack=train.Attack("none")))
    base = no_attack.lower(self.state, self.batch, self.key).cost_analysis()["flops"]
    apply_fn = train.logits_fn(model, self.state.batch_stats, train=True)
    y = self.batch["label"]

    def input_grad(params, x):
      loss = lambda x: optax.softmax_cross_entropy_with_integer_labels(apply_fn(params, x), y)
      return jax.grad(lambda x: loss(x).sum())(x)

    per_iter = jax.jit(input_grad).lower(self.state.params, self.batch["image"]
                                         ).cost_analysis()["flops"]
    return float(base + case.steps * per_iter)


def zu_update_vs_numpy(params: Any, repeats: int) -> dict[str, float]:
  """Seconds of the jitted Z/U update (all pruned leaves) and of numpy's percentile on them."""
  the_spec = sparsity.spec(SPEC)
  rules = sparsity.rules_tree(params, the_spec)
  u = jax.tree.map(lambda w: jnp.full_like(w, 1e-3), params)

  zu = jax.jit(functools.partial(transforms.zu_update, rules))

  leaves = [(np.asarray(w), np.asarray(uu)) for w, uu in
            zip(jax.tree.leaves(params), jax.tree.leaves(u)) if w.ndim >= 2]

  def run_numpy():
    for w, uu in leaves:
      v = w + uu
      a = np.abs(v)
      thresh = np.percentile(a, 100 * PRUNE)
      z = np.where(a > thresh, v, 0)
      _ = uu + w - z

  fns = {"jax": lambda: jax.block_until_ready(zu(params, u)), "numpy": run_numpy}
  times = alternate(fns, repeats, 0.2)
  return {"zu_update_ms": 1e3 * _median(times["jax"]),
          "numpy_percentile_ms": 1e3 * _median(times["numpy"])}


def optimizer_update_ms(params: Any, repeats: int) -> dict[str, float]:
  """ms of one jitted optimizer update + `optax.apply_updates` for each `_tx` chain.

  The step-level A/B (admm vs plain SGD steps) cannot resolve a cost below the machine's
  noise; timing the optimizer update alone measures the work the transforms add, which the
  step then pays at most (inside the step XLA can fuse part of it into the gradient's passes).
  """
  grads = jax.tree.map(lambda w: jnp.full_like(w, 1e-3), params)
  fns = {}
  for kind in ("sgd", "admm", "masks"):
    tx = _tx(kind, params)

    def update(grads, opt_state, params, tx=tx):
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    run = functools.partial(jax.jit(update), grads, tx.init(params), params)
    fns[kind] = lambda run=run: jax.block_until_ready(run())
  times = alternate(fns, repeats, 0.2)
  return {f"{kind}_update_ms": 1e3 * _median(t) for kind, t in times.items()}


def input_pipeline_ex_per_s(case: Case, seconds: float = 1.0) -> float:
  """Examples/s of `data.epoch_batches` (+ `data.prefetch`) over uint8 images of the case."""
  n = case.batch * 64
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (n,) + INPUT_SHAPES[case.model], np.uint8)
  labels = rng.integers(0, 10, n)
  augment = "cifar" if case.model != "lenet" else None
  count, t, epoch = 0, _now(), 0
  while _now() - t < seconds:
    with data.prefetch(data.epoch_batches(data.from_arrays(images, labels), case.batch,
                                          seed=0, epoch=epoch,
                                          augment=augment), size=3) as it:
      for b in it:
        jax.block_until_ready(b["image"]) if isinstance(b["image"], jax.Array) else None
        count += len(b["label"])
    epoch += 1
  return count / (_now() - t)


def eval_ex_per_s(case: Case, state: train.TrainState, repeats: int) -> float:
  """Examples/s of the jitted PGD-K robust evaluation step (natural + adversarial)."""
  model = _model(case)
  step = train.jit_eval_step(model, _attack(case))
  batch = jax.device_put(_batch(case, 1))
  key = jax.random.key(2)
  run = lambda: jax.block_until_ready(step(state.params, state.batch_stats, batch, key))
  return case.batch / _median(alternate({"eval": run}, repeats, 0.5)["eval"])


# ----------------------------------------------------------------------------- the torch side

def torch_device(choice: str, jax_backend: str, cuda_available: bool) -> str:
  """The device the PyTorch side runs on: "auto" follows JAX's backend (cuda with a GPU).

  Raises:
    SystemExit: cuda asked for (or implied by JAX on a GPU) while torch has no CUDA; a GPU
      step timed against a CPU one would be a meaningless ratio.
  """
  if choice not in ("auto", "cpu", "cuda"):
    raise SystemExit(f"--torch-device must be auto, cpu or cuda, got {choice!r}.")
  want = ("cuda" if jax_backend == "gpu" else "cpu") if choice == "auto" else choice
  if want == "cuda" and not cuda_available:
    raise SystemExit("JAX runs on a GPU but this torch has no CUDA: install a CUDA build of "
                     "torch (PyPI's Linux x86_64 wheels are CUDA builds) or pass --no-torch.")
  return want


class TorchStep:
  """The PyTorch-eager re-statement (`bench_torch`) on the same batch, NCHW.

  On cuda, TF32 matmuls are allowed as XLA allows them by default for float32 on GPUs (torch
  allows them in convolutions only), so both sides run the same arithmetic. A bfloat16 case
  runs the forward passes under autocast. `compile_backend` ("inductor": torch.compile's
  default) compiles the model; `first_step_s` is then the first step's seconds, compilation
  included (torch compiles lazily, on the first calls).
  """

  def __init__(self, case: Case, device: str = "cpu", compile_backend: str | None = None):
    import torch  # pylint: disable=import-outside-toplevel
    import bench_torch  # pylint: disable=import-outside-toplevel  (benchmarks/bench_torch.py)
    torch.manual_seed(0)
    shape = INPUT_SHAPES[case.model]
    model = bench_torch.build_model(case.model, case.width, shape[-1]).to(device)
    self.trainer = bench_torch.TorchADMMTrainer(
        model, eps=EPS, step_size=STEP_SIZE, steps=case.steps, lr=LR, momentum=MOMENTUM,
        rho=RHO, prune_ratio=PRUNE, compile_backend=compile_backend,
        compute_dtype=torch.bfloat16 if case.dtype == "bfloat16" else None)
    b = _batch(case)
    self.x = torch.from_numpy(np.ascontiguousarray(b["image"].transpose(0, 3, 1, 2))).to(device)
    self.y = torch.from_numpy(b["label"].astype(np.int64)).to(device)
    on_cuda = torch.device(device).type == "cuda"
    self.sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    if on_cuda:
      torch.backends.cuda.matmul.allow_tf32 = True
    self.first_step_s = None
    if compile_backend is not None:
      t = _now()
      self()
      self.first_step_s = _now() - t

  def __call__(self) -> None:
    self.trainer.step(self.x, self.y)
    self.sync()  # CUDA runs asynchronously: time the work, not its launch


# ----------------------------------------------------------------------------- driver

def _device_peak_mb() -> float | None:
  """Peak memory in use on JAX's first device so far (MB); None where the backend keeps no
  statistics (CPU)."""
  stats = jax.local_devices()[0].memory_stats()
  if not stats or "peak_bytes_in_use" not in stats:
    return None
  return stats["peak_bytes_in_use"] / 2 ** 20


def run_case(case: Case, *, repeats: int, min_seconds: float, use_torch: bool, extras: bool,
             peak_gflops: float, log: Callable[[str], None], profile_top: int = 0,
             torch_device_name: str = "cpu", torch_compile: str | None = None
             ) -> dict[str, Any]:
  """Measures one row (see the module docstring); `torch_compile` (a torch.compile backend)
  adds the torch.compile'd twin as a third contender."""
  log(f"case {case.model}(w={case.width}) PGD-{case.steps} batch {case.batch} {case.dtype}: "
      "compiling")
  cache_before = compilation.COUNTER.snapshot()
  step = JaxStep(case)
  compiled = compilation.COUNTER.snapshot() - cache_before
  flops = step.flops()
  matmul = Matmul(dtype=case.dtype)
  fns: dict[str, Callable[[], None]] = {"jax": step}
  if use_torch:
    fns["torch"] = TorchStep(case, torch_device_name)
  if use_torch and torch_compile:
    log(f"  torch.compile (backend {torch_compile})")
    fns["torch_compile"] = TorchStep(case, torch_device_name, compile_backend=torch_compile)
  fns["matmul"] = matmul
  log("  timing " + " / ".join(fns))
  times = alternate(fns, repeats, min_seconds)
  jax_s = _median(times["jax"])
  # The peak as measured in the same rounds as the steps (same load), and the best ever seen.
  peak = max(matmul.flops / _median(times["matmul"]) / 1e9, 1e-9)
  peak_best = max(peak_gflops, matmul.flops / min(times["matmul"]) / 1e9)
  row: dict[str, Any] = {
      "model": case.model, "width": case.width, "steps": case.steps, "batch": case.batch,
      "dtype": case.dtype,
      "admm_jax_ex_per_s": case.batch / jax_s,
      "torch_ex_per_s": None, "ratio": None, "ratio_min": None, "ratio_max": None,
      "flops_per_step": flops, "admm_jax_gflop_per_s": flops / jax_s / 1e9,
      "admm_jax_pct_of_peak": 100 * flops / jax_s / 1e9 / peak,
      "matmul_peak_gflop_per_s": peak, "matmul_best_gflop_per_s": peak_best,
      "torch_gflop_per_s": None, "torch_pct_of_peak": None,
      "compile_s": step.compile_s, "compile_cache_hits": compiled.cache_hits,
      "xla_memory_mb": step.memory_mb(),
      "recompiles": step.recompiles(), "repeats": repeats, "device_peak_mb": _device_peak_mb(),
      "torch_device": torch_device_name if use_torch else None,
      "load_avg_1m": os.getloadavg()[0],
  }
  if use_torch:
    ratios = [t / j for j, t in zip(times["jax"], times["torch"])]
    torch_s = _median(times["torch"])
    row.update(torch_ex_per_s=case.batch / torch_s, ratio=_median(ratios),
               ratio_min=min(ratios), ratio_max=max(ratios),
               torch_gflop_per_s=flops / torch_s / 1e9,
               torch_pct_of_peak=100 * flops / torch_s / 1e9 / peak)
  if "torch_compile" in fns:
    ratios = [t / j for j, t in zip(times["jax"], times["torch_compile"])]
    compiled_s = _median(times["torch_compile"])
    row.update(torch_compile_backend=torch_compile,
               torch_compile_ex_per_s=case.batch / compiled_s,
               torch_compile_ratio=_median(ratios), torch_compile_ratio_min=min(ratios),
               torch_compile_ratio_max=max(ratios),
               torch_compile_pct_of_peak=100 * flops / compiled_s / 1e9 / peak,
               torch_compile_first_step_s=fns["torch_compile"].first_step_s)
  if use_torch and torch_device_name == "cuda":
    import torch  # pylint: disable=import-outside-toplevel
    row["torch_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
  if extras:
    log("  extras: admm / apply_masks overhead, Z/U update, input pipeline, eval")
    plain, masked = JaxStep(case, "sgd"), JaxStep(case, "masks")
    t = alternate({"admm": step, "sgd": plain, "masks": masked}, repeats, min_seconds)
    admm_r = [a / p for a, p in zip(t["admm"], t["sgd"])]
    mask_r = [m / p for m, p in zip(t["masks"], t["sgd"])]
    row.update(admm_overhead_pct=100 * (_median(admm_r) - 1),
               apply_masks_overhead_pct=100 * (_median(mask_r) - 1),
               plain_sgd_ex_per_s=case.batch / _median(t["sgd"]))
    updates = optimizer_update_ms(step.state.params, repeats)
    row.update(updates,
               admm_update_pct_of_step=(updates["admm_update_ms"] - updates["sgd_update_ms"])
               / 10 / jax_s,
               apply_masks_update_pct_of_step=(updates["masks_update_ms"]
                                               - updates["sgd_update_ms"]) / 10 / jax_s)
    row.update(zu_update_vs_numpy(step.state.params, repeats))
    row["input_pipeline_ex_per_s"] = input_pipeline_ex_per_s(case)
    row["eval_pgd_ex_per_s"] = eval_ex_per_s(case, step.state, repeats)
  if profile_top:
    log("  profiling the step per XLA op")
    row["profile"] = step.profile(profile_top)
  row["recompiles"] = step.recompiles()
  return row


def machine_info(threads: int) -> dict[str, Any]:
  """Where the numbers come from."""
  info = {"cpu_count": os.cpu_count(), "threads": threads, "platform": platform.platform(),
          "python": platform.python_version(), "jax": jax.__version__,
          "backend": jax.default_backend(), "malloc_tuned": malloc.is_tuned()}
  try:
    with open("/proc/cpuinfo") as f:
      info["cpu"] = next(line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name"))
  except (OSError, StopIteration):
    info["cpu"] = platform.processor()
  try:
    import torch  # pylint: disable=import-outside-toplevel
    info["torch"] = torch.__version__
  except ImportError:
    info["torch"] = None
  return info


def format_table(rows: list[dict[str, Any]]) -> str:
  """A markdown table of the rows."""
  f = lambda v, fmt: "-" if v is None else format(v, fmt)
  head = ("| model | w | K | batch | admm_jax ex/s | torch ex/s | ratio (min-max) | jax GFLOP/s "
          "(% peak) | torch % peak | matmul GFLOP/s | compile s | XLA MB | admm / masks cost "
          "(step A/B) | Z/U ms "
          "(numpy) | input ex/s | eval ex/s |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in rows:
    ratio = "-" if r["ratio"] is None else (f"{r['ratio']:.2f}x ({r['ratio_min']:.2f}-"
                                            f"{r['ratio_max']:.2f})")
    over = ("-" if "admm_overhead_pct" not in r else
            f"{r['admm_update_pct_of_step']:+.2f}% / {r['apply_masks_update_pct_of_step']:+.2f}% "
            f"(A/B {r['admm_overhead_pct']:+.1f}% / {r['apply_masks_overhead_pct']:+.1f}%)")
    zu = ("-" if "zu_update_ms" not in r else
          f"{r['zu_update_ms']:.1f} ({r['numpy_percentile_ms']:.1f})")
    lines.append(
        f"| {r['model']} | {r['width']} | {r['steps']} | {r['batch']} | "
        f"{r['admm_jax_ex_per_s']:.1f} | {f(r['torch_ex_per_s'], '.1f')} | {ratio} | "
        f"{r['admm_jax_gflop_per_s']:.1f} ({r['admm_jax_pct_of_peak']:.0f}%) | "
        f"{f(r['torch_pct_of_peak'], '.0f')}{'' if r['torch_pct_of_peak'] is None else '%'} | "
        f"{r['matmul_peak_gflop_per_s']:.0f} | "
        f"{r['compile_s']:.1f} | {r['xla_memory_mb']:.0f} | {over} | {zu} | "
        f"{f(r.get('input_pipeline_ex_per_s'), '.0f')} | {f(r.get('eval_pgd_ex_per_s'), '.0f')} |")
  return "\n".join(lines)


def format_accelerator_table(rows: list[dict[str, Any]]) -> str:
  """The accelerator table: admm_jax against torch eager and torch.compile, per dtype, with
  compile seconds and the share of the measured matmul peak of the row's dtype."""
  f = lambda v, fmt: "-" if v is None else format(v, fmt)
  head = ("| model | w | K | batch | dtype | admm_jax ex/s | torch eager ex/s | torch.compile "
          "ex/s | vs eager | vs torch.compile | admm_jax % peak | torch.compile % peak | "
          "matmul peak GFLOP/s | admm_jax compile s | torch.compile first step s |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in rows:
    warm = " (cached)" if r.get("compile_cache_hits") else ""
    lines.append(
        f"| {r['model']} | {r['width']} | {r['steps']} | {r['batch']} | "
        f"{r.get('dtype', 'float32')} | {r['admm_jax_ex_per_s']:,.0f} | "
        f"{f(r.get('torch_ex_per_s'), ',.0f')} | {f(r.get('torch_compile_ex_per_s'), ',.0f')} | "
        f"{f(r.get('ratio'), '.2f')}x | {f(r.get('torch_compile_ratio'), '.2f')}x | "
        f"{r['admm_jax_pct_of_peak']:.1f}% | {f(r.get('torch_compile_pct_of_peak'), '.1f')}% | "
        f"{r['matmul_peak_gflop_per_s']:,.0f} | {r['compile_s']:.1f}{warm} | "
        f"{f(r.get('torch_compile_first_step_s'), '.1f')} |")
  return "\n".join(lines)


def _set_threads(threads: int | None) -> int:
  """Pins this process to `threads` cores (both XLA and torch size their pools from it)."""
  available = sorted(os.sched_getaffinity(0))
  if threads is None:
    threads = len(available)
  if not 1 <= threads <= len(available):
    raise SystemExit(f"--threads must be in [1, {len(available)}], got {threads}.")
  os.sched_setaffinity(0, available[:threads])
  return threads


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  """Command line entry point; returns the rows."""
  p = argparse.ArgumentParser(prog="python benchmarks/bench.py",
                              description=__doc__.split("\n")[0])
  p.add_argument("--cases", help="comma-separated model:width:steps[:batch] "
                 f"(default: {','.join(DEFAULT_CASES)})")
  p.add_argument("--quick", action="store_true", help=f"cases {','.join(QUICK_CASES)}, fewer "
                 "repeats (under 3 minutes on 2 cores)")
  p.add_argument("--threads", type=int, help="cores for both sides (default: all available)")
  p.add_argument("--repeats", type=int, help="alternating rounds per case (default 5; quick 3)")
  p.add_argument("--min-seconds", type=float, default=None,
                 help="seconds per timed round and side (default 1.0; quick 0.5)")
  p.add_argument("--json", action="store_true", help="print the rows as JSON")
  p.add_argument("--no-torch", action="store_true", help="time admm_jax only")
  p.add_argument("--torch-device", default="auto", help="auto (cuda when JAX runs on a GPU, "
                 "else cpu), cpu or cuda")
  p.add_argument("--no-extras", action="store_true", help="skip overhead / Z/U / input / eval")
  p.add_argument("--profile", type=int, nargs="?", const=15, default=0, metavar="TOP",
                 help="also profile each case's step per XLA op and print the TOP slowest "
                 "ops (default 15)")
  p.add_argument("--no-malloc-tuning", action="store_true", help="leave glibc malloc alone "
                 "(by default, on CPU, it keeps freed buffers as the command line does)")
  p.add_argument("--torch-compile", nargs="?", const="inductor", default=None,
                 metavar="BACKEND", help="also time the torch.compile'd twin (backend default "
                 "inductor; aot_eager compiles fast, for smoke tests)")
  p.add_argument("--cache", metavar="DIR", help="jax's persistent compilation cache for the "
                 "jax side (default: none, so that compile_s is a cold compile)")
  p.add_argument("--table", nargs="+", metavar="JSON", help="print the accelerator table of "
                 "rows saved by --json (one file per run) and exit")
  args = p.parse_args(argv)
  if args.table:
    rows = [r for path in args.table for r in json.load(open(path))]
    print(format_accelerator_table(rows))
    return rows
  if args.cache:
    compilation.setup_cache(args.cache)

  threads = _set_threads(args.threads)
  cases = [Case.parse(c) for c in (args.cases.split(",") if args.cases else
                                   (QUICK_CASES if args.quick else DEFAULT_CASES))]
  repeats = args.repeats or (3 if args.quick else 5)
  min_seconds = args.min_seconds or (0.5 if args.quick else 1.0)
  use_torch = not args.no_torch
  if use_torch:
    try:
      import torch  # pylint: disable=import-outside-toplevel
    except ImportError:
      raise SystemExit("torch is not installed: pip install 'admm_jax[bench]' "
                       "(or pass --no-torch).") from None
    torch.set_num_threads(threads)
    device_name = torch_device(args.torch_device, jax.default_backend(),
                               torch.cuda.is_available())
  else:
    device_name = "cpu"
  log = (lambda s: print(s, file=sys.stderr, flush=True))
  if jax.default_backend() == "cpu" and not args.no_malloc_tuning:
    # What the command line does, done first so that both sides of every pair run under the
    # same malloc settings.
    malloc.tune_malloc_for_cpu()
  peak = matmul_peak_gflops()
  log(f"float32 matmul peak: {peak:.1f} GFLOP/s on {threads} thread(s); "
      f"load average {os.getloadavg()[0]:.2f}")
  rows = []
  for case in cases:
    row = run_case(case, repeats=repeats, min_seconds=min_seconds, use_torch=use_torch,
                   extras=not args.no_extras, peak_gflops=peak, log=log,
                   profile_top=args.profile, torch_device_name=device_name,
                   torch_compile=args.torch_compile)
    rows.append(row)
    log(format_table([row]).splitlines()[-1])
  info = machine_info(threads)
  for row in rows:
    row["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  if args.json:
    for row in rows:
      row["machine"] = info
    print(json.dumps(rows, indent=1))
  else:
    print(f"Machine: {info['cpu']}, {info['cpu_count']} cores ({threads} used), jax "
          f"{info['jax']}, torch {info['torch']}; float32 matmul: best {peak:.1f} GFLOP/s at "
          f"start, median per case in the table (% peak uses it); "
          f"load average {os.getloadavg()[0]:.2f}")
    print(format_table(rows))
    if args.torch_compile or any(r["dtype"] != "float32" for r in rows):
      print(format_accelerator_table(rows))
    for row in rows:
      if "profile" in row:
        print(f"\nProfile of {row['model']}(w={row['width']}) PGD-{row['steps']} batch "
              f"{row['batch']}, per train step:")
        print(opprofile.format_profile(row["profile"]))
  return rows


if __name__ == "__main__":
  main()
