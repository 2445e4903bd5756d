"""The trainer: runs the configured stages (`admm_jax.stages`) with resume, metrics and a report.

Each stage trains epoch by epoch with the jitted adversarial step, evaluates on validation
after every epoch, checkpoints its whole `LoopState`, and when done saves its output model and
record (files: `admm_jax.workdir`). Running the same command again skips finished stages and
resumes an unfinished one from its newest readable checkpoint ("resuming from <stage> step
<n>"). The data order, the augmentation and every PRNG key are pure functions of (seed, stage,
step), and the epoch's running metrics and best-so-far model are in the checkpoint, so a
resumed run ends with the same numbers as an uninterrupted one.

SIGTERM/SIGINT, NaN/Inf, damaged files and a full disk end the same way or in one sentence
(admm_jax.reliability). Where a run's events happen, for code that hooks into them: run start
(`train_and_evaluate`: lock, signals), stage start (`_initial_state`, after a restore or the
start's evaluation), each logging interval (`Progress.log`, the stop flag, the finite check),
each checkpoint (finite check), each epoch end (`_end_epoch`), stage end (`_finish_stage`:
output, warnings) and the stage's evaluation hook (config.eval, `train_and_evaluate`).
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct

from admm_jax import sparsity, transforms
from admm_jax.app import (checkpoint, compilation, configlib, data, evaluate, parallel,
                          reliability, reports, stages, train)
from admm_jax.app.context import Context, load_output, make_context
from admm_jax.app.workdir import (StagePaths, WorkdirError, check_config, prepare_workdir,
                                  record_config, stage_paths, write_json_atomic)


def stage_setup(ctx: Context, stage: stages.Stage
                ) -> tuple[Any, dict, optax.GradientTransformation]:
  """(model, initial variables, optimizer chain) of a stage."""
  cfg, spe = ctx.config[stage.name], ctx.steps_per_epoch()
  model = ctx.model(stage.width(ctx.config))
  fresh = ctx.fresh_variables(model, stage.init)
  variables = fresh
  source = stage.input_of(ctx.config)
  if source is not None:
    variables = load_output(ctx, source, fresh)
    if variables is None:
      raise WorkdirError(
          f"stage {stage.name!r} {stage.input_use} the output of {source!r}, which is "
          f"neither in {ctx.workdir} nor in config.init_from={ctx.config.init_from!r}: add "
          f"{source} to config.stages or point config.init_from at a run that finished it.")
  update_every = stages.admm_update_every(ctx.config, spe)
  base = stages.optimizer(cfg, stages.lr_schedule(cfg, spe, update_every))
  variables, tx = stage.build(stages.StageStart(ctx.config, ctx.spec, variables, fresh, base,
                                                update_every))
  return model, variables, tx


# ------------------------------------------------------------------ the loop's state

class Best(struct.PyTreeNode):
  """The best epoch so far on the selection metric (config.eval.select_by)."""
  params: Any
  batch_stats: Any
  # float32 its validation accuracy under the selection attack (PGD's adversarial accuracy, or
  # APGD-CE's with select_by="apgd-ce"); -1 before the first epoch
  metric: jax.Array
  epoch: jax.Array    # int32 0-based; -1: none yet
  val: jax.Array      # (2,) float32 its validation (natural, adversarial) accuracy


class LoopState(struct.PyTreeNode):
  """Everything a stage carries from step to step; a checkpoint holds it whole."""
  train: train.TrainState
  epoch_metrics: train.Metrics   # running sums of the current epoch ("loss", "correct", "count")
  best: Best
  last_val: jax.Array    # (2,) float32 validation (natural, adversarial) of the last epoch
  start_val: jax.Array   # (2,) the same for the starting point (stages with a start_label)
  start_test: jax.Array  # (2,) its test accuracies: reported only, never used to select
  elapsed: jax.Array     # float32 seconds this stage has trained, over all resumes


def _copy(tree: Any) -> Any:
  """New buffers: the train state is donated to the step, so nothing kept may alias it."""
  return jax.tree.map(jnp.copy, tree)


def _zero_metrics() -> train.Metrics:
  return {"loss": jnp.zeros([], jnp.float32), "correct": jnp.zeros([], jnp.int32),
          "count": jnp.zeros([], jnp.int32)}


def _accuracy_pair(m: dict[str, float]) -> jax.Array:
  return jnp.asarray([m["natural_accuracy"], m["adversarial_accuracy"]], jnp.float32)


def _fresh_loop_state(state: train.TrainState) -> LoopState:
  nan2 = jnp.full([2], jnp.nan, jnp.float32)
  best = Best(params=_copy(state.params), batch_stats=_copy(state.batch_stats),
              metric=jnp.asarray(-1.0, jnp.float32), epoch=jnp.asarray(-1, jnp.int32), val=nan2)
  return LoopState(train=state, epoch_metrics=_zero_metrics(), best=best, last_val=nan2,
                   start_val=nan2, start_test=nan2, elapsed=jnp.zeros([], jnp.float32))


def _initial_state(ctx: Context, stage: stages.Stage, model, state: train.TrainState,
                   mngr) -> LoopState:
  """The newest readable checkpoint of the stage, else its start (evaluated if it says so)."""
  loop = ctx.runtime.replicate(_fresh_loop_state(state))  # orbax restores into these shardings
  step, restored = checkpoint.restore_latest(mngr, loop)
  if restored is not None:
    logging.info("resuming from %s step %d", stage.name, step)
    return restored
  if stage.start_label is None:
    return loop
  measured = {}
  for split in ("validation", "test"):  # test: reported only, never used to select
    m = ctx.evaluate(model, state.params, state.batch_stats, split,
                     ctx.key(split, stage.name, "start"))
    measured[split] = _accuracy_pair(m)
    logging.info("%s: %s, before training: %s natural %.4f adversarial %.4f", stage.name,
                 stage.start_label.replace("_", " "), split, m["natural_accuracy"],
                 m["adversarial_accuracy"])
  return ctx.runtime.replicate(loop.replace(start_val=measured["validation"],
                                            start_test=measured["test"]))


class Progress:
  """The periodic progress line: examples/s since the last line, ETA since the (re)start."""

  def __init__(self, stage: str, epochs: int, total_steps: int, batch_size: int, step: int):
    self.stage, self.epochs, self.total_steps, self.batch_size = (stage, epochs, total_steps,
                                                                  batch_size)
    self.t_resume = self.t_log = time.time()
    self.step_resume = self.step_log = step

  def seconds(self) -> float:
    """Seconds since this process (re)started the stage."""
    return time.time() - self.t_resume

  def log(self, epoch: int, step: int, host: dict[str, Any]) -> None:
    """The progress line from the epoch's running sums, fetched to the host."""
    now = time.time()
    rate = (step - self.step_log) * self.batch_size / max(now - self.t_log, 1e-9)
    eta = (self.total_steps - step) * (now - self.t_resume) / max(step - self.step_resume, 1)
    logging.info("%s epoch %d/%d step %d/%d | %.0f ex/s | ETA %s | adv loss %.4f acc %.4f",
                 self.stage, epoch + 1, self.epochs, step, self.total_steps, rate,
                 reports.format_duration(eta), host["loss"] / max(host["count"], 1),
                 host["correct"] / max(host["count"], 1))
    self.t_log, self.step_log = now, step


# ------------------------------------------------------------------------ one stage

def run_stage(ctx: Context, name: str) -> dict[str, Any]:
  """Trains one stage to the end (resuming if it can) and returns its record."""
  stage, paths = stages.STAGES[name], stage_paths(ctx.workdir, name)
  if os.path.exists(paths.done):
    record = reliability.read_json(paths.done, name)
    logging.info("%s: finished earlier (natural %.4f, adversarial %.4f); skipping", name,
                 record["natural_accuracy"], record["adversarial_accuracy"])
    return record

  t_start = time.time()
  rt, cfg = ctx.runtime, ctx.config
  model, variables, tx = stage_setup(ctx, stage)
  epochs, spe = stage.num_epochs(cfg), ctx.steps_per_epoch()
  total_steps = epochs * spe
  state = train.create_train_state(variables["params"], variables["batch_stats"], tx)
  mngr = checkpoint.manager(paths.checkpoints, cfg.max_checkpoints)
  loop = _initial_state(ctx, stage, model, state, mngr)
  step = int(loop.train.step)
  ctx.metrics.truncate(name, step // spe, resume_step=step)

  train_step = train.jit_train_step(
      model, tx, ctx.train_attack, ctx.objective,
      in_shardings=(rt.replicated, rt.data, rt.replicated),
      out_shardings=(rt.replicated, rt.replicated))
  stage_key = ctx.key("train", name)
  logging.info("%s: %d epochs x %d steps of batch %d (%d examples), model %s(w=%d), attack %s, "
               "%s", name, epochs, spe, cfg.batch_size, len(ctx.dataset.train), cfg.model.name,
               model.width, ctx.train_attack, ctx.objective)
  elapsed0 = float(loop.elapsed)
  progress = Progress(name, epochs, total_steps, cfg.batch_size, step)
  stop = False

  while step < total_steps:
    epoch, start = divmod(step, spe)
    batches = data.epoch_batches(
        ctx.dataset.train, cfg.batch_size, seed=stages.data_seed(cfg, name), epoch=epoch,
        augment=cfg.data.augment, start_batch=start, process_index=jax.process_index(),
        process_count=jax.process_count())
    state, metrics = loop.train, loop.epoch_metrics
    with data.prefetch(batches, size=3) as it:
      for local_batch in it:
        state, m = train_step(state, rt.global_batch(local_batch), stage_key)
        metrics = train.add_metrics(metrics, m)
        step += 1
        if step % cfg.log_every_steps == 0 or step == total_steps:
          host = jax.device_get(metrics)
          progress.log(epoch, step, host)
          ctx.metrics.log_step(name, step, host)
          _check_finite(ctx, name, step, metrics, state, mngr)
        stop = ctx.stops.requested(step)  # SIGTERM/SIGINT: checkpoint here, then stop
        if step % spe and (step % cfg.checkpoint_every_steps == 0 or stop):
          _check_finite(ctx, name, step, metrics, state, mngr)  # never save NaN/Inf
          # replicate: elapsed is a host value (process 0's wins); orbax saves global arrays.
          loop = rt.replicate(loop.replace(
              train=state, epoch_metrics=metrics,
              elapsed=jnp.asarray(elapsed0 + progress.seconds(), jnp.float32)))
          checkpoint.save(mngr, step, loop)
          if stop:
            ctx.stops.stop(name, step)
    _check_finite(ctx, name, step, metrics, state, mngr)
    loop = _end_epoch(ctx, stage, model, loop.replace(train=state, epoch_metrics=metrics),
                      epoch, elapsed0 + progress.seconds())
    checkpoint.save(mngr, step, loop)
    if stop:
      ctx.stops.stop(name, step)

  record = _finish_stage(ctx, stage, model, loop, paths, t_start)
  mngr.close()
  return record


def _check_finite(ctx: Context, stage: str, step: int, metrics: train.Metrics, state,
                  mngr) -> None:
  reliability.check_finite(stage, step, metrics["loss"], state.params, ctx.config[stage].lr,
                           mngr.latest_step())


def _chance_warnings(ctx: Context, stage: str, val: np.ndarray, test: dict) -> list[str]:
  """A warning when the stage's model is no better than guessing (validation, else test)."""
  acc, n = float(val[0]), len(ctx.dataset.validation)
  if np.isnan(acc):
    acc, n = test["natural_accuracy"], test["count"]
  return reliability.chance_warnings(stage, acc, ctx.dataset.num_classes, n, ctx.config[stage].lr)


# config.eval.select_by -> what the stage record's `selected` says the epoch was best on.
SELECTED_ON = {"pgd": "best validation adversarial accuracy",
               "apgd-ce": "best validation APGD-CE accuracy"}


def _selects_on_apgd(ctx: Context, stage: stages.Stage) -> bool:
  """Whether `stage` measures validation APGD-CE to choose its epoch (stages that output
  their last iterate, and runs without validation examples, never select on it)."""
  return (stage.selects_best and ctx.select_attack is not None
          and len(ctx.dataset.validation) > 0)


def _apgd_ce_validation(ctx: Context, model, params, batch_stats, key: jax.Array
                        ) -> dict[str, float]:
  """APGD-CE on the first config.eval.select_limit validation examples (its
  adversarial_accuracy is the selection metric)."""
  return ctx.evaluate(model, params, batch_stats, "validation", key, attack=ctx.select_attack,
                      limit=ctx.config.eval.select_limit)


def _end_epoch(ctx: Context, stage: stages.Stage, model, loop: LoopState, epoch: int,
               elapsed: float) -> LoopState:
  """Validation, model selection and the epoch's metrics line; resets the running sums."""
  state = loop.train
  host = jax.device_get(loop.epoch_metrics)
  record = {"stage": stage.name, "epoch": epoch + 1, "step": int(state.step),
            "train_adversarial_loss": float(host["loss"]) / max(int(host["count"]), 1),
            "train_adversarial_accuracy": float(host["correct"]) / max(int(host["count"]), 1)}
  val = ctx.evaluate(model, state.params, state.batch_stats, "validation",
                     jax.random.fold_in(ctx.key("validation", stage.name), epoch))
  record.update({f"val_{k}": v for k, v in val.items() if k != "count"})
  best = loop.best
  metric = val["adversarial_accuracy"] if val["count"] else float(epoch)  # no validation: last
  if _selects_on_apgd(ctx, stage):
    apgd = _apgd_ce_validation(ctx, model, state.params, state.batch_stats,
                               jax.random.fold_in(ctx.key("select", stage.name), epoch))
    metric = record["val_apgd_ce_accuracy"] = apgd["adversarial_accuracy"]
  # Compared in float32, as stored: a tie keeps the earlier epoch, whatever the rounding.
  if stage.selects_best and np.float32(metric) > np.float32(best.metric):
    best = Best(params=_copy(state.params), batch_stats=_copy(state.batch_stats),
                metric=jnp.asarray(metric, jnp.float32), epoch=jnp.asarray(epoch, jnp.int32),
                val=_accuracy_pair(val))
  admm_state = transforms.find_admm_state(state.opt_state)
  if admm_state is not None:
    res = jax.device_get(transforms.primal_residuals(admm_state, state.params))
    record["admm_rho"] = float(admm_state.rho)
    record["admm_primal_residual"] = {k: float(v) for k, v in res.items()}
    dist = jax.device_get(sparsity.distance_to_set(state.params, ctx.spec, relative=True))
    record["admm_distance_to_sparse_set"] = {k: float(v) for k, v in dist.items()}
  if stage.sparse:
    layers = sparsity.report(jax.device_get(state.params), ctx.spec).layers
    record["sparsity"] = {k: layer.zero_fraction for k, layer in layers.items()}
  record["elapsed_s"] = round(elapsed, 2)
  ctx.metrics.write(record)
  logging.info("%s epoch %d: train adv acc %.4f | val natural %.4f adversarial %.4f%s%s",
               stage.name, epoch + 1, record["train_adversarial_accuracy"],
               val["natural_accuracy"], val["adversarial_accuracy"],
               f" APGD-CE {record['val_apgd_ce_accuracy']:.4f}"
               if "val_apgd_ce_accuracy" in record else "",
               f" | rho {record['admm_rho']:.3g} max ||W-Z|| "
               f"{max(record['admm_primal_residual'].values()):.4g}" if admm_state else "")
  return ctx.runtime.replicate(loop.replace(best=best, epoch_metrics=_zero_metrics(),
                                            last_val=_accuracy_pair(val),
                                            elapsed=jnp.asarray(elapsed, jnp.float32)))


def _output(stage: stages.Stage, loop: LoopState, select_by: str = "pgd"
            ) -> tuple[Any, Any, str, np.ndarray]:
  """(params, batch_stats, which epoch, its validation accuracies) of the stage's output."""
  if stage.selects_best and int(loop.best.epoch) >= 0:
    chosen = f"epoch {int(loop.best.epoch) + 1} ({SELECTED_ON[select_by]})"
    return loop.best.params, loop.best.batch_stats, chosen, jax.device_get(loop.best.val)
  state = loop.train
  return state.params, state.batch_stats, "last epoch", jax.device_get(loop.last_val)


def _finish_stage(ctx: Context, stage: stages.Stage, model, loop: LoopState,
                  paths: StagePaths, t_start: float) -> dict[str, Any]:
  """Tests and saves the stage's output, then writes its record (the stage is finished)."""
  state = loop.train
  params, batch_stats, chosen, val = _output(stage, loop, ctx.config.eval.select_by)
  # The chosen epoch's APGD-CE validation accuracy: its selection metric.
  apgd = ({"val_apgd_ce_accuracy": float(loop.best.metric)}
          if _selects_on_apgd(ctx, stage) and int(loop.best.epoch) >= 0 else {})
  before_finish = None
  if stage.finish is not None:
    finished = stage.finish(ctx.config, ctx.spec, params)
    if finished is not params:   # e.g. projected onto the k-bit grid: measure what is saved
      before_finish, params = val, finished
      val = _accuracy_pair(ctx.evaluate(model, params, batch_stats, "validation",
                                        ctx.key("validation", stage.name, "finish")))
      chosen += ", then projected onto its sparse k-bit sets"
      if apgd:   # the APGD-CE number too is of the projected model
        apgd = {"before_grid_val_apgd_ce_accuracy": apgd["val_apgd_ce_accuracy"],
                "val_apgd_ce_accuracy": _apgd_ce_validation(
                    ctx, model, params, batch_stats,
                    ctx.key("select", stage.name, "finish"))["adversarial_accuracy"]}
  test = ctx.evaluate(model, params, batch_stats, "test", ctx.key("test", stage.name))
  # Reuses or replaces what a run stopped before the marker left behind (crash-consistent).
  checkpoint.save_output(paths.output, {"params": params, "batch_stats": batch_stats})
  record = {"natural_accuracy": test["natural_accuracy"],
            "adversarial_accuracy": test["adversarial_accuracy"], "test_examples": test["count"],
            "selected": chosen, "epochs": stage.num_epochs(ctx.config), "steps": int(state.step),
            "model": {"name": ctx.config.model.name, "width": model.width},
            "wall_time_s": round(float(loop.elapsed), 2),
            "total_params": int(sum(np.size(x) for x in jax.tree.leaves(params))),
            **reports.accuracy_fields("val", val)}
  if before_finish is not None:
    record.update(reports.accuracy_fields("before_grid_val", before_finish))
  if apgd:
    record.update({k: round(v, 6) for k, v in apgd.items()})
    record["val_apgd_ce_examples"] = min(ctx.config.eval.select_limit or len(
        ctx.dataset.validation), len(ctx.dataset.validation))
  if stage.start_label is not None:
    record.update(reports.accuracy_fields(f"{stage.start_label}_val",
                                          jax.device_get(loop.start_val)))
    record.update(reports.accuracy_fields(f"{stage.start_label}_test",
                                          jax.device_get(loop.start_test)))
  admm_state = transforms.find_admm_state(state.opt_state)
  if admm_state is not None:
    record["admm"] = reports.admm_diagnostics(admm_state, state.params, ctx.spec)
    _log_if_not_converged(stage.name, record["admm"])
  if stage.sparse:
    record["sparsity"] = sparsity.report(jax.device_get(params), ctx.spec).to_dict()
  record["warnings"] = _chance_warnings(ctx, stage.name, val, test)
  for warning in record["warnings"]:
    logging.warning(warning)
  if ctx.is_writer:
    write_json_atomic(paths.done, record)
  parallel.sync(f"{stage.name} finished")  # the next stage's load_output reads paths.done
  logging.info("%s finished: test natural %.4f adversarial %.4f (%s, %d examples) in %s",
               stage.name, record["natural_accuracy"], record["adversarial_accuracy"], chosen,
               test["count"], reports.format_duration(time.time() - t_start))
  return record


def _log_if_not_converged(stage: str, diagnostics: dict[str, Any]) -> None:
  if diagnostics["converged"]:
    return
  layer, value = max(diagnostics["relative_primal_residual"].items(), key=lambda kv: kv[1])
  # Info, not a warning: at short budgets W keeps many small pruned weights whose norm
  # dominates ||W - Z|| while hard pruning costs little; the retrain stage's
  # after_hard_prune accuracy is the functional check.
  logging.info("%s: ADMM has not converged (||W-Z||/||W|| = %.3f at %s, threshold %.2f): "
               "if hard pruning costs much accuracy, raise admm.rho or admm.rho_growth, or "
               "update Z/U more often (admm.update_every_epochs).", stage, value, layer,
               reports.CONVERGED_RESIDUAL)


# ------------------------------------------------------------------------------ the run

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs the configured stages in `workdir` and returns (and writes) the report.

  One run per workdir (a lock); the workdir keeps the config it was started with, and a
  config that differs in a field that shaped a finished or running stage stops before any
  work (workdir.check_config); SIGTERM/SIGINT checkpoint and stop at the next step, or between
  batches of the evaluation hook; a full disk is one sentence (reliability.RunStopped and its
  exit code).
  """
  configlib.validate(config)  # a bad config touches nothing, not even the lock
  compiled_before = compilation.COUNTER.snapshot()
  workdir, stops = prepare_workdir(workdir), reliability.StopRequests(config.log_every_steps)
  with (reliability.workdir_lock(workdir), stops.installed(),
        reliability.disk_errors(f"writing to the workdir {workdir}")):
    ctx = make_context(config, workdir)  # bad data or patterns: their own sentence first
    ctx.stops, records = stops, {}
    try:
      # Before the first stage: a changed field that shaped a result stops here (every
      # process); config.json is written before any stage starts.
      changes = check_config(workdir, config, configlib.base_config())
      parallel.sync("config checked")  # before process 0 rewrites config.json
      if ctx.is_writer:
        record_config(workdir, config, changes)
      for name in configlib.stages(config):
        records[name] = run_stage(ctx, name)
        if config.eval.final_attack:  # AutoAttack-grade evaluation of the stage's output
          if stops.requested(0):  # a signal during the stage's test: don't start the attack
            stops.stop_where(f"{name} finished; its evaluation ({config.eval.final_attack}) "
                             "had not started")
          records[name] = {**records[name], **evaluate.final_evaluation(ctx, name)}
        report = reports.run_report(config, ctx.dataset, ctx.runtime.describe(), records)
        # This process's compilations (a warm persistent cache: compiled 0, all cache hits).
        report["compilation"] = {
            **(compilation.COUNTER.snapshot() - compiled_before).to_dict(),
            "cache_dir": compilation.cache_in_use()}
        if ctx.is_writer:
          write_json_atomic(os.path.join(workdir, "report.json"), report)
        if name != configlib.stages(config)[-1] and stops.requested(0):
          stops.stop_where(f"{name} finished; the next stage had not started")
    finally:
      ctx.metrics.close()
  return report
