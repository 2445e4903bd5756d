"""AutoAttack-grade evaluation of a finished stage of any run, with gradient-masking checks.

Run: python -m admm_jax.evaluate --workdir=runs/fmnist [--stage=retrain] [--attack=autoattack]
     [--eps=<the run's attack.eps>] [--norm=linf] [--limit=N] [--batch_size=B]

The run's config (report.json's "config") rebuilds the model and the test split exactly as
the trainer did (context.make_context / load_output). The first N test examples are attacked
in order, batch by batch, sharded over all devices as in training; every finished batch is
saved atomically under W/evaluation/partial/, so an interrupted evaluation resumes where it
stopped (same batches, same keys, same result). It writes

  W/evaluation/<stage>_<label>.json        accuracies, per-member accuracies, sanity checks
  W/evaluation/<stage>_<label>_robust.npy  one bool per evaluated test example, in split order

where <label> is `autoattack`, a member name, or the members of a cascade joined by '+'.
The sanity checks (docs/evaluation.md) look for signs of gradient masking.

SIGTERM/SIGINT (reliability.StopRequests, here and in the trainer's hook) stop promptly: the
flag is read between batches and, inside a batch, by the model itself (`_stoppable`: a host
callback before every forward pass; once it reads True the model returns zero logits without
running, so the attack's remaining iterations cost next to nothing). A batch cut short is
never saved; the finished ones are kept, the run exits with 128 + signal and the resume
message, and the rerun attacks the cut batch again with the same key: the same numbers.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import io_callback

from admm_jax import attacks
from admm_jax.app import configlib, context, data, parallel, reliability, reports, stages, train
from admm_jax.app.errors import UserError
from admm_jax.app.workdir import write_json_atomic

SANITY_LIMIT = 200
# Tolerances of the sanity checks, as accuracies (fractions of the examples checked).
MONOTONE_SLACK = 0.01     # a larger eps may not give more than this much higher accuracy
NEAR_ZERO = 0.05          # robust accuracy at the large eps counted as "near 0"
SQUARE_EXTRA = 0.01       # examples only Square breaks, allowed as a fraction of those attacked
FGSM_SLACK = 0.01         # PGD may not leave more than this much more accuracy than FGSM


class EvaluationError(UserError, ValueError):
  """Bad evaluation input (attack, eps, stage, workdir); one sentence meant for the user."""


def parse_attack(text: str) -> tuple[tuple[str, ...], str]:
  """'autoattack', one of attacks.ATTACK_NAMES, or a comma-separated cascade of them.

  Returns:
    (member names in order, the label used in file names and report keys).
  """
  if text == "autoattack":
    return tuple(attacks.STANDARD_NAMES), "autoattack"
  names = tuple(n.strip() for n in str(text).split(","))
  bad = [n for n in names if n not in attacks.ATTACK_NAMES]
  if bad or not names:
    raise EvaluationError(f"--attack={text!r} names an unknown attack {bad[0]!r}: use "
                          f"autoattack, one of {', '.join(attacks.ATTACK_NAMES)}, or a "
                          "comma-separated list of them (e.g. apgd-ce,apgd-t).")
  return names, "+".join(names)


def check_eps(eps: float, norm: str) -> float:
  """eps must lie in (0, 1] for Linf on [0, 1] images, and be positive and finite for L2."""
  if norm not in attacks.NORMS:
    raise EvaluationError(f"--norm={norm!r} is unknown: use {' or '.join(attacks.NORMS)}.")
  hi = 1.0 if norm == "linf" else math.inf
  if not isinstance(eps, (int, float)) or not (0.0 < eps <= hi and math.isfinite(eps)):
    raise EvaluationError(f"--eps={eps!r} is out of range for the {norm} norm: use a number "
                          f"in (0, {hi:g}] (inputs are in [0, 1]).")
  return float(eps)


def run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config of the run in `workdir` (report.json's "config" over today's defaults)."""
  path = os.path.join(workdir, "report.json")
  try:
    with open(path) as f:
      saved = json.load(f)["config"]
  except FileNotFoundError:
    raise EvaluationError(f"{workdir} holds no run ({path} is missing): point --workdir at the "
                          "workdir of a run that finished at least one stage.") from None
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise EvaluationError(f"{path} is unreadable or has no 'config' ({e}): point --workdir at "
                          "a run's workdir.") from None
  config = configlib.base_config()
  config.update(saved)  # fields added since the run keep their defaults
  return config


# Jitted programs per (kind, runtime, model, settings): the sanity checks and repeated
# evaluations in one process (tests, the trainer's hook) reuse the compilation.
_JITTED: dict[tuple, Any] = {}


def _jit_per_batch(rt: parallel.Runtime, per_batch, cache_key: tuple):
  """per_batch(params, batch_stats, x, y, key) -> {name: (B,) array}, jitted with variables
  and key replicated and the batch split on "data" (as the training step)."""
  if cache_key not in _JITTED:
    _JITTED[cache_key] = jax.jit(
        per_batch, in_shardings=(rt.replicated, rt.replicated, rt.data, rt.data, rt.replicated),
        out_shardings=rt.replicated)
  return _JITTED[cache_key]


def _stop_flag(*_) -> np.ndarray:
  return np.asarray(reliability.stop_signalled() is not None)


def _read_stop(after: jax.Array | None = None) -> jax.Array:
  """The host's stop flag as a traced bool. With `after`, read once `after` is computed (a
  data dependency through one scalar: an unordered callback may otherwise run at any point of
  the program); without, wherever it stands (in a loop body: every iteration, as a callback
  has side effects and is never hoisted out of a loop)."""
  if jax.process_count() > 1:  # processes would disagree: they stop between batches only
    return jnp.zeros([], bool)
  shape = jax.ShapeDtypeStruct((), jnp.bool_)
  if after is None:  # no operand: a sharded one would be gathered to one device every call
    return io_callback(_stop_flag, shape)
  return io_callback(_stop_flag, shape, jax.lax.stop_gradient(jnp.any(after)))


def _stoppable(apply_fn):
  """apply_fn that returns zero logits without running the model once a stop is signalled,
  so that a long attack's remaining iterations are nearly free (see the module docstring)."""
  def apply(params, x):
    shape = jax.eval_shape(apply_fn, params, x)
    return jax.lax.cond(_read_stop(), lambda p, x: jnp.zeros(shape.shape, shape.dtype),
                        apply_fn, params, x)
  return apply


def _cascade_fn(rt: parallel.Runtime, model, names: Sequence[str], eps: float, norm: str):
  """One batch through `attacks.cascade`: robust, broken_by, clean_correct per example, and
  `stopped`: whether a stop signal cut the batch short (its numbers are then meaningless)."""
  def per_batch(params, batch_stats, x, y, key):
    apply_fn = _stoppable(train.logits_fn(model, batch_stats, train=False))
    r = attacks.cascade(apply_fn, params, x, y, key, names=tuple(names), eps=eps, norm=norm)
    return {"robust": r.robust, "broken_by": r.broken_by, "clean_correct": r.clean_correct,
            "stopped": _read_stop(r.robust)}
  return _jit_per_batch(rt, per_batch, ("cascade", rt, model, tuple(names), eps, norm))


def _single_attacks_fn(rt: parallel.Runtime, model, runs: Sequence[tuple[str, float]],
                       norm: str):
  """One batch through each (attack name, eps) of `runs` alone, in one program (one
  compilation for all the sanity checks): robust per example, keyed by the run's index."""
  def per_batch(params, batch_stats, x, y, key):
    apply_fn = _stoppable(train.logits_fn(model, batch_stats, train=False))
    out = {str(i): attacks.cascade(apply_fn, params, x, y, jax.random.fold_in(key, i),
                                   names=(name, ), eps=e, norm=norm).robust
           for i, (name, e) in enumerate(runs)}
    return {**out, "stopped": _read_stop(jnp.stack(list(out.values())))}
  return _jit_per_batch(rt, per_batch, ("single", rt, model, tuple(runs), norm))


def _partial_dir(ctx: context.Context, stage: str, label: str, meta: dict) -> str:
  """W/evaluation/partial/<stage>_<label>/: per-batch results of an evaluation in progress;
  cleared when its settings (meta) differ from the ones it was started with.

  Multi-host: process 0 writes, every process reads (the workdir is on a shared filesystem,
  as for checkpoints), so all of them skip the same batches.
  """
  folder = os.path.join(ctx.workdir, "evaluation", "partial", f"{stage}_{label}")
  meta_path = os.path.join(folder, "meta.json")
  if ctx.is_writer:
    same = False
    if os.path.exists(meta_path):
      with open(meta_path) as f:
        same = json.load(f) == meta
      if not same:
        logging.info("evaluate: settings changed since %s was started; starting over", folder)
        for name in os.listdir(folder):
          os.remove(os.path.join(folder, name))
    if not same:
      os.makedirs(folder, exist_ok=True)
      write_json_atomic(meta_path, meta)
  parallel.sync(f"evaluation folder {folder}")
  return folder


def _save_batch(path: str, arrays: dict[str, np.ndarray]) -> None:
  tmp = path + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def _load_variables(ctx: context.Context, stage: str):
  """(model, params, batch_stats) of the finished `stage` of ctx.workdir."""
  check_finished(ctx.workdir, stage)
  model = ctx.model(stages.STAGES[stage].width(ctx.config))
  like = train.init_variables(model, ctx.key("init", stage), ctx.dataset.image_shape)
  variables = context.load_output(ctx, stage, like)
  return model, variables["params"], variables["batch_stats"]


def finished_stages(workdir: str) -> list[str]:
  return [s for s in configlib.STAGE_ORDER
          if os.path.exists(os.path.join(workdir, "outputs", f"{s}.json"))]


def check_finished(workdir: str, stage: str) -> None:
  if stage not in configlib.STAGE_ORDER:
    raise EvaluationError(f"--stage={stage!r} is unknown: use one of "
                          f"{', '.join(configlib.STAGE_ORDER)}.")
  done = finished_stages(workdir)
  if stage not in done:
    raise EvaluationError(f"stage {stage!r} has not finished in {workdir}: evaluate one of its "
                          f"finished stages ({', '.join(done) or 'none'}) or finish the run "
                          "first.")


def _await(tree: Any) -> Any:
  """device_get of a dispatched computation, waiting in short sleeps: Python runs signal
  handlers only in the main thread between bytecodes, so where dispatch is asynchronous
  (GPU, TPU) the handler runs during the batch. (On CPU a program with host callbacks runs
  synchronously inside the call; there the callback reads the signal from the wakeup pipe,
  reliability.StopRequests.seen.)"""
  leaves = jax.tree.leaves(tree)
  while not all(x.is_ready() for x in leaves):
    time.sleep(0.02)
  return jax.device_get(tree)


def _stop(ctx: context.Context, what: str, where: str, finished: int, folder: str | None):
  """Raises reliability.Interrupted for an evaluation stopped `where` ("at batch 3/10")."""
  kept = f", the {finished} finished batches kept in {folder}" if folder and finished else ""
  ctx.stops.stop_where(f"{what or 'the evaluation'} stopped {where}{kept}")


def _run_batches(ctx: context.Context, fn, params, batch_stats, examples: data.Examples,
                 batch_size: int, key: jax.Array, folder: str | None = None, what: str = ""
                 ) -> dict[str, np.ndarray]:
  """fn (see _jit_per_batch) over `examples` in order, batch i with key fold_in(key, i).

  With `folder`, finished batches are read back from folder/batch_<i>.npz and new ones are
  saved there atomically (resume); with `what`, a progress line with ETA per batch.

  Raises:
    reliability.Interrupted: SIGTERM/SIGINT (ctx.stops) during or between batches; the
      finished batches are saved, a batch the signal cut short is not.
  """
  batches = data.epoch_batches(examples, batch_size, seed=0, epoch=0, shuffle=False,
                               drop_remainder=False, process_index=jax.process_index(),
                               process_count=jax.process_count())
  n, done, out = len(examples), 0, []
  t0, n_new = time.time(), 0
  for i in range(len(batches)):
    path = folder and os.path.join(folder, f"batch_{i:06d}.npz")
    if path and os.path.exists(path):
      with np.load(path) as f:
        out.append({k: f[k] for k in f.files})
      done += min(batch_size, n - i * batch_size)
      continue
    batch = batches[i]
    del batch["mask"]  # the padding is at the end of the last global batch: sliced off below
    g = ctx.runtime.global_batch(batch)
    result = _await(fn(params, batch_stats, g["image"], g["label"], jax.random.fold_in(key, i)))
    if bool(result.pop("stopped")):  # cut short: never saved, recomputed on resume
      _stop(ctx, what, f"at batch {i + 1}/{len(batches)}", i, folder)
    real = min(batch_size, n - i * batch_size)
    result = {k: np.asarray(v)[:real] for k, v in result.items()}
    if path and ctx.is_writer:
      _save_batch(path, result)
    out.append(result)
    done, n_new = done + real, n_new + real
    if i + 1 < len(batches) and ctx.stops.requested(i):  # the same batch on every process
      _stop(ctx, what, f"after batch {i + 1}/{len(batches)}", i + 1, folder)
    if what:
      rate = n_new / max(time.time() - t0, 1e-9)
      robust = np.mean(np.concatenate([o["robust"] for o in out]))
      logging.info("%s: batch %d/%d, %d/%d examples | robust so far %.4f | %.1f ex/s | ETA %s",
                   what, i + 1, len(batches), done, n, robust, rate,
                   reports.format_duration((n - done) / max(rate, 1e-9)))
  return {k: np.concatenate([o[k] for o in out]) for k in out[0]}


def _check(ok: bool, meaning: str, **numbers) -> dict[str, Any]:
  return {"ok": bool(ok), **numbers, "meaning": meaning}


def square_check(names: Sequence[str], result: dict[str, np.ndarray]) -> dict[str, Any] | None:
  """Examples that Square breaks after the white-box members before it failed (None when the
  cascade has no Square after a white-box member)."""
  if "square" not in names or not any(m != "square" for m in names[:names.index("square")]):
    return None
  i = names.index("square")
  attacked = int(np.sum(result["robust"] | (result["broken_by"] >= i)))
  extra = int(np.sum(result["broken_by"] == i))
  return _check(
      extra <= SQUARE_EXTRA * max(attacked, 1),
      "the black-box Square must add (almost) nothing after the white-box members; examples "
      "only it breaks point to masked gradients",
      square_only_broken=extra, attacked_by_square=attacked, examples=len(result["robust"]))


def sanity_checks(ctx, model, params, batch_stats, examples: data.Examples, eps: float,
                  norm: str, names: Sequence[str], result: dict[str, np.ndarray],
                  batch_size: int, key: jax.Array) -> dict[str, dict[str, Any]]:
  """Gradient-masking checks on `examples` (a subset), with the cheap PGD-10 and FGSM.

  Each check: {"ok", its numbers, "meaning"}; docs/evaluation.md explains
  what a failed one suggests.
  """
  n = len(examples)
  scales = (0.5, 1.0, 2.0)
  large = min(max(4 * eps, 0.5), 1.0) if norm == "linf" else 4 * eps
  runs = [("pgd", s * eps) for s in scales] + [("pgd", large), ("fgsm", eps)]
  fn = _single_attacks_fn(ctx.runtime, model, runs, norm)
  robust = _run_batches(ctx, fn, params, batch_stats, examples, batch_size, key)
  acc = [round(float(np.mean(robust[str(i)])), 6) for i in range(len(runs))]
  by_eps, at_large, fgsm_acc = acc[:3], acc[3], acc[4]
  checks = {
      "eps_monotone": _check(
          all(b <= a + MONOTONE_SLACK for a, b in zip(by_eps, by_eps[1:])),
          "PGD-10 robust accuracy must fall as eps grows; if not, gradients mislead the attack",
          eps=[s * eps for s in scales], robust_accuracy=by_eps, examples=n),
      "large_eps_near_zero": _check(
          at_large <= NEAR_ZERO,
          f"at a large eps any input can be changed beyond recognition, so PGD-10 must leave "
          f"at most {NEAR_ZERO} robust accuracy; more means the attack, not the model, fails",
          eps=large, robust_accuracy=at_large, examples=n),
      "pgd_not_weaker_than_fgsm": _check(
          by_eps[1] <= fgsm_acc + FGSM_SLACK,
          "iterated PGD-10 must break at least what its single step (FGSM) breaks; if not, the "
          "loss surface is locally misleading (masking)",
          pgd_accuracy=by_eps[1], fgsm_accuracy=fgsm_acc, examples=n),
  }
  square = square_check(names, result)
  if square is not None:
    checks["square_not_stronger"] = square
  return checks


def evaluate_stage(ctx: context.Context, stage: str, *, attack: str = "autoattack",
                   eps: float | None = None, norm: str = "linf", limit: int = 0,
                   batch_size: int = 0, sanity: bool = True, sanity_limit: int = SANITY_LIMIT
                   ) -> dict[str, Any]:
  """Evaluates `stage`'s output in ctx.workdir; writes and returns the evaluation record.

  Args:
    ctx: a context.Context of the run (make_context(run_config(workdir), workdir)).
    stage: a finished stage of the run.
    attack: see parse_attack.
    eps: threat radius (None: the run's attack.eps).
    norm: "linf" or "l2".
    limit: evaluate the first `limit` test examples (0: all).
    batch_size: global batch (0: the run's eval_batch_size); a multiple of the device count.
    sanity, sanity_limit: run the gradient-masking checks on the first `sanity_limit`.

  Raises:
    EvaluationError: bad input, in one sentence.
  """
  names, label = parse_attack(attack)
  eps = check_eps(ctx.config.attack.eps if eps is None else eps, norm)
  test = ctx.dataset.test
  if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
    raise EvaluationError(f"--limit={limit!r} must be a non-negative integer (0 = all).")
  n = min(limit or len(test), len(test))
  if n == 0:
    raise EvaluationError(f"the run's test split is empty (config.data.limit_test="
                          f"{ctx.config.data.limit_test}): nothing to evaluate.")
  batch_size = batch_size or ctx.config.eval_batch_size
  if batch_size <= 0 or batch_size % ctx.runtime.num_devices or batch_size % jax.process_count():
    raise EvaluationError(f"--batch_size={batch_size} must be a positive multiple of the "
                          f"{ctx.runtime.num_devices} devices.")
  t0 = time.time()
  model, params, batch_stats = _load_variables(ctx, stage)
  examples = data.Examples(test.source, test.positions[:n])
  meta = {"names": list(names), "eps": eps, "norm": norm, "examples": n,
          "batch_size": batch_size, "seed": ctx.config.seed}
  folder = _partial_dir(ctx, stage, label, meta)
  key = ctx.key("evaluate", stage, label)
  logging.info("evaluate %s of %s: %s, %s eps %g, %d test examples, batch %d, %d device(s)",
               stage, ctx.workdir, label, norm, eps, n, batch_size, ctx.runtime.num_devices)
  result = _run_batches(ctx, _cascade_fn(ctx.runtime, model, names, eps, norm), params,
                        batch_stats, examples, batch_size, key, folder,
                        what=f"evaluate {stage} {label}")
  robust_after = [round(float(np.mean(result["robust"] | (result["broken_by"] > i))), 6)
                  for i in range(len(names))]
  record = {"stage": stage, "attack": label, "members": list(names), "norm": norm, "eps": eps,
            "examples": n, "clean_accuracy": round(float(np.mean(result["clean_correct"])), 6),
            "robust_accuracy": round(float(np.mean(result["robust"])), 6),
            "per_attack": dict(zip(names, robust_after)) if len(set(names)) == len(names)
            else robust_after,
            "batch_size": batch_size, "devices": ctx.runtime.num_devices}
  checks = {}
  if sanity and sanity_limit > 0:
    m = min(sanity_limit, n)
    subset = data.Examples(test.source, test.positions[:m])
    checks = sanity_checks(ctx, model, params, batch_stats, subset, eps, norm, names, result,
                           min(batch_size, -(-m // ctx.runtime.num_devices)
                               * ctx.runtime.num_devices),
                           ctx.key("sanity", stage, label))
    for name, c in checks.items():
      if not c["ok"]:
        logging.warning("sanity check %s failed on %s: %s (%s)", name, stage, c["meaning"],
                        {k: v for k, v in c.items() if k not in ("ok", "meaning")})
  record["sanity"] = checks
  record["wall_time_s"] = round(time.time() - t0, 2)
  if ctx.is_writer:
    out = os.path.join(ctx.workdir, "evaluation", f"{stage}_{label}")
    np.save(out + "_robust.npy", result["robust"].astype(bool))
    write_json_atomic(out + ".json", record)
  parallel.sync(f"evaluation of {stage} written")
  logging.info("evaluate %s: clean %.4f | %s", stage, record["clean_accuracy"],
               " -> ".join(f"{a} {v:.4f}" for a, v in zip(names, robust_after)))
  return record


def evaluate_workdir(workdir: str, stage: str = "retrain", **kwargs) -> dict[str, Any]:
  """evaluate_stage on the run in `workdir`, rebuilt from its report.json (the CLI's work)."""
  path = os.path.abspath(os.path.expanduser(workdir))
  if not os.path.isdir(path):
    raise EvaluationError(f"--workdir={workdir!r} does not exist: point it at a run's workdir.")
  config = run_config(path)
  parse_attack(kwargs.get("attack", "autoattack"))  # bad input fails before the data loads
  if kwargs.get("eps") is not None:
    check_eps(kwargs["eps"], kwargs.get("norm", "linf"))
  check_finished(path, stage)
  ctx = context.make_context(config, path)
  with reliability.StopRequests().installed() as stops:  # SIGTERM/SIGINT: see the docstring
    ctx.stops = stops
    return evaluate_stage(ctx, stage, **kwargs)


def final_evaluation(ctx: context.Context, stage: str) -> dict[str, Any]:
  """The trainer's hook (config.eval): the stage's `<label>_accuracy` and `<label>_examples`."""
  e = ctx.config.eval
  record = evaluate_stage(ctx, stage, attack=e.final_attack, limit=e.final_limit,
                          sanity_limit=e.sanity_limit, sanity=e.sanity_limit > 0)
  label = record["attack"]
  return {"final_attack": label, f"{label}_accuracy": record["robust_accuracy"],
          f"{label}_examples": record["examples"],
          f"{label}_sanity_failed": [k for k, c in record["sanity"].items() if not c["ok"]]}
