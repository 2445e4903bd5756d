"""The stages: pretrain -> admm -> retrain (and scratch), with resume, metrics and a report.

Layout of a workdir:
  checkpoints/<stage>/<step>/   in-progress state of a stage (orbax), newest `max_checkpoints`
  outputs/<stage>/0/            the stage's result: {"params", "batch_stats"} (orbax)
  outputs/<stage>.json          written last: the stage is finished (its test metrics)
  metrics.jsonl                 one line per epoch and stage
  tensorboard/<stage>/          the same curves as TensorBoard event files (tensorboard_log)
  report.json                   the result of the run (rewritten after every stage)
  run.lock                      pid, host and start of the run using the workdir (reliability)

Running the same command again skips finished stages and resumes an unfinished one from its
newest readable checkpoint ("resuming from <stage> step <n>"). The data order, the augmentation
and every PRNG key are pure functions of (seed, stage, step), and the epoch's running metrics
and best-so-far model are in the checkpoint, so a resumed run ends with the same numbers as
an uninterrupted one. SIGTERM/SIGINT, NaN/Inf, damaged files and a full disk end the same
way or in one sentence: admm_jax/reliability.py, called at run start (lock, signals), at each
logging interval and checkpoint (stop flag, finite check) and at stage end (output, warnings).
"""
from __future__ import annotations

import json
import logging
import os
import time
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from admm_jax import (checkpoint, configlib, data, models, parallel, reliability, sparsity,
                      tensorboard_log, train, transforms)

# Stage -> the stage whose output it starts from.
INPUT_OF = {"admm": "pretrain", "retrain": "admm"}
# Stages that train a pruned network (they need config.sparsity).
PRUNED_STAGES = ("admm", "retrain", "inherited")
# Stages whose output is the best epoch on validation; admm's output is its last iterate
# (the point ADMM converged to), which retrain then hard-prunes.
SELECTS_BEST = ("pretrain", "retrain", "scratch", "inherited")
# Stages whose starting point is evaluated on validation before the first step (retrain: the
# accuracy right after hard pruning, which shows what the projection of W cost).
MEASURES_START = ("retrain",)
# ADMM counts as converged when every pruned layer has ||W - Z|| / ||W|| below this.
CONVERGED_RESIDUAL = 0.1


class WorkdirError(RuntimeError):
  """The workdir cannot be used; the message says why and what to do."""


# ------------------------------------------------------------------------------ files

def prepare_workdir(workdir: str) -> str:
  """Absolute, existing, writable workdir (checked with a probe file before any work)."""
  path = os.path.abspath(os.path.expanduser(workdir))
  try:
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, f".write_probe_{jax.process_index()}_{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(f"workdir {path!r} is not writable ({e.strerror}): choose another "
                       "--workdir or fix its permissions.") from None
  return path


write_json_atomic = reliability.write_json_atomic


class MetricsLog:
  """metrics.jsonl: one JSON line per (stage, epoch); a resumed stage replaces its later lines.

  Every line, and the training points logged during its epoch (`log_step`, kept in the line as
  `train_steps`: [step, adversarial loss, adversarial accuracy]), also go to TensorBoard event
  files under `tensorboard_dir` (admm_jax.tensorboard_log).
  """

  def __init__(self, path: str, enabled: bool = True, tensorboard_dir: str | None = None):
    self.path, self.enabled = path, enabled
    self.events = (tensorboard_log.StageWriters(tensorboard_dir)
                   if enabled and tensorboard_dir else None)
    self._steps, self._sums = [], None

  def truncate(self, stage: str, completed_epochs: int, resume_step: int = 0) -> None:
    """Drops `stage`'s lines past its `completed_epochs` (written after the resumed checkpoint)
    and starts its event file, where TensorBoard drops the points from `resume_step` on."""
    self._steps, self._sums = [], None
    if self.events is not None:
      self.events.start(stage, resume_step)
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = [json.loads(x) for x in f if x.strip()]
    keep = [x for x in lines
            if not (x.get("stage") == stage and x.get("epoch", 0) > completed_epochs)]
    if len(keep) != len(lines):
      tmp = self.path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(json.dumps(x, sort_keys=True) + "\n" for x in keep)
      os.replace(tmp, self.path)

  def log_step(self, stage: str, step: int, sums: dict[str, Any]) -> None:
    """Training adversarial loss/accuracy over the steps since the previous call, from the
    epoch's running sums (`loss`, `correct`, `count`)."""
    if not self.enabled:
      return
    now = [float(sums["loss"]), float(sums["correct"]), float(sums["count"])]
    last = self._sums if self._sums and self._sums[2] <= now[2] else [0.0, 0.0, 0.0]
    self._sums = now
    count = now[2] - last[2]
    if count > 0:
      point = [int(step), (now[0] - last[0]) / count, (now[1] - last[1]) / count]
      self._steps.append([point[0], round(point[1], 6), round(point[2], 6)])
      if self.events is not None:
        self.events.scalars(stage, step, {"train/adversarial_loss": point[1],
                                          "train/adversarial_accuracy": point[2]})

  def write(self, record: dict[str, Any]) -> None:
    """Appends an epoch line (with the epoch's training points) and writes its event file."""
    if not self.enabled:
      return
    record = dict(record, train_steps=self._steps) if self._steps else record
    self._steps, self._sums = [], None
    with open(self.path, "a") as f:
      f.write(json.dumps(record, sort_keys=True) + "\n")
    if self.events is not None:
      self.events.scalars(record["stage"], record["step"], tensorboard_log.epoch_scalars(record))
      self.events.flush(record["stage"])

  def close(self) -> None:
    if self.events is not None:
      self.events.close()


# ------------------------------------------------------------------------- optimizers

def lr_schedule(stage_cfg: ml_collections.ConfigDict, steps_per_epoch: int,
                update_every: int = 0) -> optax.Schedule:
  """The stage's learning-rate schedule, in optimizer steps, with its linear warmup."""
  base = _base_schedule(stage_cfg, steps_per_epoch, update_every)
  warmup = round(stage_cfg.warmup_epochs * steps_per_epoch)
  if warmup < 1:
    return base
  # A ramp multiplying the schedule (not joined before it), so that drops and cosine keep
  # their positions in the stage; step 0 already moves (lr / warmup).
  return lambda count: base(count) * jnp.minimum(1.0, (count + 1) / warmup)


def _base_schedule(stage_cfg: ml_collections.ConfigDict, steps_per_epoch: int,
                   update_every: int) -> optax.Schedule:
  lr, total = stage_cfg.lr, max(stage_cfg.epochs * steps_per_epoch, 1)
  if stage_cfg.schedule == "cosine":
    return optax.cosine_decay_schedule(lr, total)
  if stage_cfg.schedule == "steps":
    return optax.piecewise_constant_schedule(
        lr, {int(e) * steps_per_epoch: 0.1 for e in stage_cfg.lr_drop_epochs})
  if stage_cfg.schedule == "admm":
    return transforms.admm_lr_schedule(lr, update_every)
  return optax.constant_schedule(lr)


def optimizer(stage_cfg: ml_collections.ConfigDict, schedule: optax.Schedule
              ) -> optax.GradientTransformation:
  """sgd (momentum, coupled weight decay), adam, or adamw (decoupled weight decay)."""
  if stage_cfg.optimizer == "sgd":
    return optax.chain(optax.add_decayed_weights(stage_cfg.weight_decay),
                       optax.sgd(schedule, momentum=stage_cfg.momentum or None))
  if stage_cfg.optimizer == "adamw":
    return optax.adamw(schedule, weight_decay=stage_cfg.weight_decay)
  return optax.chain(optax.add_decayed_weights(stage_cfg.weight_decay), optax.adam(schedule))


# ------------------------------------------------------------------------------ stages

def purpose_key(root_key: jax.Array, *purpose: str) -> jax.Array:
  """The run's key for a purpose, e.g. ("test", "retrain"): the root key folded with each
  name's CRC (the export recomputes the test split's attacks with the same keys)."""
  key = root_key
  for p in purpose:
    key = jax.random.fold_in(key, zlib.crc32(p.encode()) & 0x7FFFFFFF)
  return key


class Context:
  """What every stage shares: config, data, runtime, keys, files."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str,
               runtime: parallel.Runtime, dataset: data.Dataset):
    self.config, self.workdir, self.runtime, self.dataset = config, workdir, runtime, dataset
    self.is_writer = jax.process_index() == 0
    self.metrics = MetricsLog(os.path.join(workdir, "metrics.jsonl"), self.is_writer,
                              tensorboard_dir=os.path.join(workdir, "tensorboard"))
    self.root_key = jax.random.key(config.seed)
    a = config.attack
    self.train_attack = train.Attack(a.kind, a.eps, a.step_size, a.steps, a.random_start)
    self.eval_attack = train.Attack("pgd", a.eps, a.eval_step_size, a.eval_steps, True)
    self.objective = train.Objective(a.objective, a.beta)
    self.spec = (sparsity.spec(configlib.parse_sparsity(config.sparsity))
                 if any(s in configlib.stages(config) for s in PRUNED_STAGES) else None)
    self._eval_steps = {}
    self.stops = reliability.StopRequests()  # inactive; train_and_evaluate installs its own

  def model(self, width: int):
    return models.get_model(self.config.model.name, width, self.dataset.num_classes,
                            conv_impl=self.config.model.conv_impl)

  def key(self, *purpose: str) -> jax.Array:
    return purpose_key(self.root_key, *purpose)

  def steps_per_epoch(self) -> int:
    return data.steps_per_epoch(len(self.dataset.train), self.config.batch_size)

  def eval_step(self, model):
    """One jitted eval step per model (its compilation is reused across stages)."""
    key = (model.width,)
    if key not in self._eval_steps:
      rt = self.runtime
      self._eval_steps[key] = train.jit_eval_step(
          model, self.eval_attack, in_shardings=(rt.replicated, rt.replicated, rt.data,
                                                 rt.replicated),
          out_shardings=rt.replicated)
    return self._eval_steps[key]

  def evaluate(self, model, params, batch_stats, split: str, key: jax.Array) -> dict[str, float]:
    examples = getattr(self.dataset, split)
    if len(examples) == 0:
      return {"count": 0, "natural_accuracy": float("nan"), "adversarial_accuracy": float("nan")}
    batches = data.epoch_batches(examples, self.config.eval_batch_size, seed=0, epoch=0,
                                 shuffle=False, drop_remainder=False,
                                 process_index=jax.process_index(),
                                 process_count=jax.process_count())
    with data.prefetch(batches) as it:
      return train.evaluate(self.eval_step(model), params, batch_stats,
                            map(self.runtime.global_batch, it), key)


def _stage_dirs(workdir: str, stage: str) -> tuple[str, str, str]:
  return (os.path.join(workdir, "checkpoints", stage), os.path.join(workdir, "outputs", stage),
          os.path.join(workdir, "outputs", f"{stage}.json"))


def load_output(ctx: Context, stage: str, like: dict) -> dict | None:
  """The finished output of `stage` from this workdir, else from config.init_from, else None."""
  for root in (ctx.workdir, ctx.config.init_from):
    if not root:
      continue
    _, out_dir, done = _stage_dirs(os.path.abspath(root), stage)
    if os.path.exists(done):
      with checkpoint.manager(out_dir) as mngr:
        # A replicated target: every process restores the global arrays (multi-host).
        try:
          step, restored = checkpoint.restore_latest(mngr, ctx.runtime.replicate(like))
        except checkpoint.CheckpointError:
          raise checkpoint.CheckpointError(
              f"the output of stage {stage!r} in {out_dir} is damaged: rerun {stage} by moving "
              f"{out_dir} and {done} aside and running the same command (with that workdir) "
              "again; it resumes from the stage's last checkpoint.") from None
      if restored is None:
        raise checkpoint.CheckpointError(f"stage {stage!r} is marked finished in {root} but "
                                         f"{out_dir} holds no output: rerun that stage.")
      if root != ctx.workdir:
        logging.info("%s: starting from %s's output in %s", stage, stage, root)
      return restored
  return None


def _fresh_variables(ctx: Context, model, stage: str) -> dict:
  return train.init_variables(model, ctx.key("init", stage), ctx.dataset.image_shape)


def stage_setup(ctx: Context, stage: str) -> tuple[Any, dict, optax.GradientTransformation]:
  """(model, initial variables, optimizer chain) of a stage."""
  cfg, spe = ctx.config[stage], ctx.steps_per_epoch()
  width = ctx.config.scratch.width if stage == "scratch" else ctx.config.model.width
  model = ctx.model(width)
  fresh = _fresh_variables(ctx, model, "pretrain" if stage != "scratch" else "scratch")
  masks = None
  if stage in INPUT_OF:
    source = INPUT_OF[stage]
    variables = load_output(ctx, source, fresh)
    if variables is None:
      raise WorkdirError(f"stage {stage!r} starts from the output of {source!r}, which is neither "
                         f"in {ctx.workdir} nor in config.init_from={ctx.config.init_from!r}: "
                         f"add {source} to config.stages or point config.init_from at a run "
                         "that finished it.")
  elif stage == "inherited":
    variables, masks = inherited_start(ctx, fresh)
  else:
    variables = fresh
  # Z/U period in steps; fractions of an epoch allowed (several Z/U updates per epoch).
  update_every = max(1, round(ctx.config.admm.update_every_epochs * spe))
  base = optimizer(cfg, lr_schedule(cfg, spe, update_every))
  if stage == "retrain":
    # Hard prune the projection of W (not Z), then freeze the zero pattern.
    params, masks = sparsity.hard_prune(variables["params"], ctx.spec)
    variables = dict(variables, params=params)
  if stage == "admm":
    tx = optax.chain(transforms.admm(ctx.spec, rho=cfg.rho, update_every=update_every,
                                     rho_growth=cfg.rho_growth), base)
  elif masks is not None:  # retrain, inherited: pruned weights stay exactly zero
    tx = optax.chain(base, transforms.apply_masks(masks))
  else:
    tx = base
  return model, variables, tx


def inherited_start(ctx: Context, fresh: dict) -> tuple[dict, Any]:
  """The inherited-initialization baseline (lottery ticket): the pruned network's mask applied
  to the wide network's initial weights.

  `fresh` is the init the pretrain stage started from (same model, seed and key); the mask is
  admm's output hard-pruned, i.e. exactly the mask retrain trains under. Returns (variables,
  masks) for a stage trained with `apply_masks(masks)`.
  """
  admm_out = load_output(ctx, "admm", fresh)
  if admm_out is None:
    raise WorkdirError(f"stage 'inherited' takes its mask from the output of 'admm', which is "
                       f"neither in {ctx.workdir} nor in config.init_from="
                       f"{ctx.config.init_from!r}: point config.init_from at a pruned run.")
  masks = sparsity.masks(admm_out["params"], ctx.spec)
  params = jax.tree.map(lambda m, w: w if m is None else w * m.astype(w.dtype),
                        masks, fresh["params"], is_leaf=lambda x: x is None)
  return dict(fresh, params=params), masks


def _copy(tree: Any) -> Any:
  """New buffers: the train state is donated to the step, so nothing kept may alias it."""
  return jax.tree.map(jnp.copy, tree)


def _zero_metrics() -> dict[str, jax.Array]:
  return {"loss": jnp.zeros([], jnp.float32), "correct": jnp.zeros([], jnp.int32),
          "count": jnp.zeros([], jnp.int32)}


def _epochs(ctx: Context, stage: str) -> int:
  if stage in ("scratch", "inherited") and ctx.config[stage].epochs == 0:
    return sum(ctx.config[s].epochs for s in ("pretrain", "admm", "retrain"))
  return ctx.config[stage].epochs


def _fmt_time(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else \
      f"{seconds // 60}m{seconds % 60:02d}s"


def run_stage(ctx: Context, stage: str) -> dict[str, Any]:
  """Trains one stage to the end (resuming if it can) and returns its record."""
  ckpt_dir, out_dir, done_path = _stage_dirs(ctx.workdir, stage)
  if os.path.exists(done_path):
    record = reliability.read_json(done_path, stage)
    logging.info("%s: finished earlier (natural %.4f, adversarial %.4f); skipping", stage,
                 record["natural_accuracy"], record["adversarial_accuracy"])
    return record

  t_start = time.time()
  rt, cfg = ctx.runtime, ctx.config
  model, variables, tx = stage_setup(ctx, stage)
  epochs, spe = _epochs(ctx, stage), ctx.steps_per_epoch()
  total_steps = epochs * spe
  state = train.create_train_state(variables["params"], variables["batch_stats"], tx)
  nan2 = jnp.full([2], jnp.nan, jnp.float32)
  carry = {"train": state, "epoch_metrics": _zero_metrics(),
           "best": {"params": _copy(state.params), "batch_stats": _copy(state.batch_stats),
                    "metric": jnp.asarray(-1.0, jnp.float32), "epoch": jnp.asarray(-1, jnp.int32),
                    "val": nan2},
           # validation (natural, adversarial) of the last epoch, and of the stage's starting
           # point (measured for retrain only: what hard pruning cost before any retraining)
           "last_val": nan2, "start_val": nan2, "start_test": nan2,
           "elapsed": jnp.zeros([], jnp.float32)}

  carry = rt.replicate(carry)  # before restoring: orbax restores into these shardings
  mngr = checkpoint.manager(ckpt_dir, cfg.max_checkpoints)
  step, restored = checkpoint.restore_latest(mngr, carry)
  if restored is not None:
    carry = restored
    logging.info("resuming from %s step %d", stage, step)
  elif stage in MEASURES_START:
    for split in ("validation", "test"):  # test: reported only, never used to select
      m = ctx.evaluate(model, state.params, state.batch_stats, split,
                       ctx.key(split, stage, "start"))
      carry["start_val" if split == "validation" else "start_test"] = jnp.asarray(
          [m["natural_accuracy"], m["adversarial_accuracy"]], jnp.float32)
      logging.info("%s: after hard pruning, before training: %s natural %.4f adversarial %.4f",
                   stage, split, m["natural_accuracy"], m["adversarial_accuracy"])
    carry = rt.replicate(carry)
  step = int(carry["train"].step)
  ctx.metrics.truncate(stage, step // spe, resume_step=step)

  train_step = train.jit_train_step(
      model, tx, ctx.train_attack, ctx.objective,
      in_shardings=(rt.replicated, rt.data, rt.replicated),
      out_shardings=(rt.replicated, rt.replicated))
  stage_key = ctx.key("train", stage)
  n_train = len(ctx.dataset.train)
  logging.info("%s: %d epochs x %d steps of batch %d (%d examples), model %s(w=%d), attack %s, "
               "%s", stage, epochs, spe, cfg.batch_size, n_train, cfg.model.name, model.width,
               ctx.train_attack, ctx.objective)
  elapsed0 = float(carry["elapsed"])
  t_resume, step_resume = time.time(), step
  t_log, step_log = t_resume, step
  stop = False

  while step < total_steps:
    epoch, start = divmod(step, spe)
    batches = data.epoch_batches(
        ctx.dataset.train, cfg.batch_size,
        seed=cfg.seed * 1000 + configlib.STAGE_ORDER.index(stage),
        epoch=epoch, augment=cfg.data.augment, start_batch=start,
        process_index=jax.process_index(), process_count=jax.process_count())
    state, metrics = carry["train"], carry["epoch_metrics"]
    with data.prefetch(batches, size=3) as it:
      for local_batch in it:
        state, m = train_step(state, rt.global_batch(local_batch), stage_key)
        metrics = train.add_metrics(metrics, m)
        step += 1
        if step % cfg.log_every_steps == 0 or step == total_steps:
          host = jax.device_get(metrics)
          now = time.time()
          rate = (step - step_log) * cfg.batch_size / max(now - t_log, 1e-9)
          eta = (total_steps - step) * (now - t_resume) / max(step - step_resume, 1)
          logging.info("%s epoch %d/%d step %d/%d | %.0f ex/s | ETA %s | adv loss %.4f acc %.4f",
                       stage, epoch + 1, epochs, step, total_steps, rate, _fmt_time(eta),
                       host["loss"] / max(host["count"], 1),
                       host["correct"] / max(host["count"], 1))
          ctx.metrics.log_step(stage, step, host)
          t_log, step_log = now, step
          _check_finite(ctx, stage, step, metrics, state, mngr)
        stop = ctx.stops.requested(step)  # SIGTERM/SIGINT: checkpoint here, then stop
        if step % spe and (step % cfg.checkpoint_every_steps == 0 or stop):
          _check_finite(ctx, stage, step, metrics, state, mngr)  # never save NaN/Inf
          # replicate: elapsed is a host value (process 0's wins); orbax saves global arrays.
          carry = rt.replicate(dict(
              carry, train=state, epoch_metrics=metrics,
              elapsed=jnp.asarray(elapsed0 + time.time() - t_resume, jnp.float32)))
          checkpoint.save(mngr, step, carry)
          if stop:
            ctx.stops.stop(stage, step)
    _check_finite(ctx, stage, step, metrics, state, mngr)
    carry = _end_epoch(ctx, stage, model, dict(carry, train=state, epoch_metrics=metrics),
                       epoch, elapsed0 + time.time() - t_resume)
    checkpoint.save(mngr, step, carry)
    if stop:
      ctx.stops.stop(stage, step)

  return _finish_stage(ctx, stage, model, carry, out_dir, done_path, t_start, mngr)


def _check_finite(ctx: Context, stage: str, step: int, metrics: dict, state, mngr) -> None:
  reliability.check_finite(stage, step, metrics["loss"], state.params, ctx.config[stage].lr,
                           mngr.latest_step())


def _chance_warnings(ctx: Context, stage: str, val: np.ndarray, test: dict) -> list[str]:
  """A warning when the stage's model is no better than guessing (validation, else test)."""
  acc, n = float(val[0]), len(ctx.dataset.validation)
  if np.isnan(acc):
    acc, n = test["natural_accuracy"], test["count"]
  return reliability.chance_warnings(stage, acc, ctx.dataset.num_classes, n, ctx.config[stage].lr)


def _end_epoch(ctx: Context, stage: str, model, carry: dict, epoch: int, elapsed: float) -> dict:
  """Validation, model selection and the epoch's metrics line; resets the running sums."""
  state = carry["train"]
  host = jax.device_get(carry["epoch_metrics"])
  record = {"stage": stage, "epoch": epoch + 1, "step": int(state.step),
            "train_adversarial_loss": float(host["loss"]) / max(int(host["count"]), 1),
            "train_adversarial_accuracy": float(host["correct"]) / max(int(host["count"]), 1)}
  val = ctx.evaluate(model, state.params, state.batch_stats, "validation",
                     jax.random.fold_in(ctx.key("validation", stage), epoch))
  record.update({f"val_{k}": v for k, v in val.items() if k != "count"})
  best = carry["best"]
  metric = val["adversarial_accuracy"] if val["count"] else float(epoch)  # no validation: last
  val_pair = jnp.asarray([val["natural_accuracy"], val["adversarial_accuracy"]], jnp.float32)
  if stage in SELECTS_BEST and metric > float(best["metric"]):
    best = {"params": _copy(state.params), "batch_stats": _copy(state.batch_stats),
            "metric": jnp.asarray(metric, jnp.float32), "epoch": jnp.asarray(epoch, jnp.int32),
            "val": val_pair}
  admm_state = transforms.find_admm_state(state.opt_state)
  if admm_state is not None:
    res = jax.device_get(transforms.primal_residuals(admm_state, state.params))
    record["admm_rho"] = float(admm_state.rho)
    record["admm_primal_residual"] = {k: float(v) for k, v in res.items()}
    dist = jax.device_get(sparsity.distance_to_set(state.params, ctx.spec, relative=True))
    record["admm_distance_to_sparse_set"] = {k: float(v) for k, v in dist.items()}
  if ctx.spec is not None and stage in PRUNED_STAGES:
    layers = sparsity.report(jax.device_get(state.params), ctx.spec).layers
    record["sparsity"] = {k: layer.zero_fraction for k, layer in layers.items()}
  record["elapsed_s"] = round(elapsed, 2)
  ctx.metrics.write(record)
  logging.info("%s epoch %d: train adv acc %.4f | val natural %.4f adversarial %.4f%s", stage,
               epoch + 1, record["train_adversarial_accuracy"], val["natural_accuracy"],
               val["adversarial_accuracy"],
               f" | rho {record['admm_rho']:.3g} max ||W-Z|| "
               f"{max(record['admm_primal_residual'].values()):.4g}" if admm_state else "")
  return ctx.runtime.replicate(dict(carry, best=best, epoch_metrics=_zero_metrics(),
                                    last_val=val_pair, elapsed=jnp.asarray(elapsed, jnp.float32)))


def _accuracy_fields(prefix: str, pair: np.ndarray) -> dict[str, float | None]:
  """{prefix_natural_accuracy, prefix_adversarial_accuracy}; None where nothing was measured."""
  return {f"{prefix}_{name}_accuracy": None if np.isnan(v) else round(float(v), 6)
          for name, v in zip(("natural", "adversarial"), pair)}


def _admm_diagnostics(admm_state: transforms.ADMMState, params: Any,
                      spec: sparsity.SparsitySpec) -> dict[str, Any]:
  """Did ADMM converge? Per pruned layer, ||W - Z|| / ||W|| (the primal residual, relative)
  and ||W - Proj(W)|| / ||W|| (the share of W that hard pruning is about to remove)."""
  rel = jax.device_get(transforms.primal_residuals(admm_state, params, relative=True))
  dist = jax.device_get(sparsity.distance_to_set(params, spec, relative=True))
  return {"rho": float(admm_state.rho),
          "converged": bool(max(rel.values()) < CONVERGED_RESIDUAL),
          "relative_primal_residual": {k: round(float(v), 6) for k, v in rel.items()},
          "relative_distance_to_sparse_set": {k: round(float(v), 6) for k, v in dist.items()}}


def _finish_stage(ctx: Context, stage: str, model, carry: dict, out_dir: str, done_path: str,
                  t_start: float, mngr) -> dict[str, Any]:
  state = carry["train"]
  if stage in SELECTS_BEST and int(carry["best"]["epoch"]) >= 0:
    params, batch_stats = carry["best"]["params"], carry["best"]["batch_stats"]
    chosen = f"epoch {int(carry['best']['epoch']) + 1} (best validation adversarial accuracy)"
    val = jax.device_get(carry["best"]["val"])
  else:
    params, batch_stats, chosen = state.params, state.batch_stats, "last epoch"
    val = jax.device_get(carry["last_val"])
  test = ctx.evaluate(model, params, batch_stats, "test", ctx.key("test", stage))
  # Reuses or replaces what a run stopped before the marker left behind (crash-consistent).
  checkpoint.save_output(out_dir, {"params": params, "batch_stats": batch_stats})
  record = {"natural_accuracy": test["natural_accuracy"],
            "adversarial_accuracy": test["adversarial_accuracy"], "test_examples": test["count"],
            "selected": chosen, "epochs": _epochs(ctx, stage), "steps": int(state.step),
            "model": {"name": ctx.config.model.name, "width": model.width},
            "wall_time_s": round(float(carry["elapsed"]), 2),
            "total_params": int(sum(np.size(x) for x in jax.tree.leaves(params))),
            **_accuracy_fields("val", val)}
  if stage in MEASURES_START:
    record.update(_accuracy_fields("after_hard_prune_val", jax.device_get(carry["start_val"])))
    record.update(_accuracy_fields("after_hard_prune_test", jax.device_get(carry["start_test"])))
  admm_state = transforms.find_admm_state(state.opt_state)
  if admm_state is not None:
    record["admm"] = diag = _admm_diagnostics(admm_state, state.params, ctx.spec)
    if not diag["converged"]:
      layer, value = max(diag["relative_primal_residual"].items(), key=lambda kv: kv[1])
      # Info, not a warning: at short budgets W keeps many small pruned weights whose norm
      # dominates ||W - Z|| while hard pruning costs little; the retrain stage's
      # after_hard_prune accuracy is the functional check.
      logging.info("%s: ADMM has not converged (||W-Z||/||W|| = %.3f at %s, threshold %.2f): "
                   "if hard pruning costs much accuracy, raise admm.rho or admm.rho_growth, or "
                   "update Z/U more often (admm.update_every_epochs).", stage, value, layer,
                   CONVERGED_RESIDUAL)
  if ctx.spec is not None and stage in PRUNED_STAGES:
    rep = sparsity.report(jax.device_get(params), ctx.spec)
    record["sparsity"] = rep.to_dict()
  record["warnings"] = _chance_warnings(ctx, stage, val, test)
  for warning in record["warnings"]:
    logging.warning(warning)
  if ctx.is_writer:
    write_json_atomic(done_path, record)
  parallel.sync(f"{stage} finished")  # the next stage's load_output reads done_path
  mngr.close()
  logging.info("%s finished: test natural %.4f adversarial %.4f (%s, %d examples) in %s", stage,
               record["natural_accuracy"], record["adversarial_accuracy"], chosen, test["count"],
               _fmt_time(time.time() - t_start))
  return record


# ------------------------------------------------------------------------------ the run

def _report(ctx: Context, records: dict[str, dict]) -> dict[str, Any]:
  a = ctx.config.attack
  report = {
      "config": json.loads(ctx.config.to_json_best_effort()),
      "dataset": {"name": ctx.dataset.name, "train": len(ctx.dataset.train),
                  "validation": len(ctx.dataset.validation), "test": len(ctx.dataset.test)},
      "attack": {"eps": a.eps, "steps": a.eval_steps, "step_size": a.eval_step_size,
                 "norm": "linf", "random_start": True,
                 "train": {"kind": a.kind, "steps": a.steps, "step_size": a.step_size,
                           "objective": a.objective, "beta": a.beta}},
      "devices": ctx.runtime.describe(),   # the mesh actually used, not all visible devices
      "stages": {}, "wall_time_s": {},
      # every stage's warnings (chance-level accuracy), repeated in the summary
      "warnings": [w for rec in records.values() for w in rec.get("warnings", [])],
  }
  for stage, rec in records.items():
    report["stages"][stage] = {k: v for k, v in rec.items() if k != "sparsity"}
    report["wall_time_s"][stage] = rec["wall_time_s"]
  for stage in ("retrain", "inherited", "admm"):
    if stage in records and "sparsity" in records[stage]:
      sp = records[stage]["sparsity"]
      report["sparsity"] = {
          "stage": stage, "compression": sp["compression"], "total_params": sp["total_params"],
          "nonzero_params": sp["nonzero_params"],
          "layers": {path: {k: layer[k] for k in ("kind", "target", "achieved", "groups",
                                                  "groups_pruned", "zero_fraction", "params")}
                     for path, layer in sp["layers"].items()}}
      break
  return report


def summary(report: dict[str, Any]) -> str:
  """The few lines a user reads at the end of a run."""
  a = report["attack"]
  lines = [f"{report['dataset']['name']}: test accuracy, natural / under PGD-{a['steps']} "
           f"(Linf eps {a['eps']}, step {a['step_size']}), {report['devices']['count']} "
           f"{report['devices']['platform']} device(s)"]
  trained = a["train"]
  if trained["objective"] != "madry":  # Madry's loss is the default the header implies
    lines.append(f"  trained with the {trained['objective']} objective (beta {trained['beta']}), "
                 "evaluated with the same PGD as any run")
  for stage, rec in report["stages"].items():
    lines.append(f"  {stage:<9} w={rec['model']['width']:<3} natural {rec['natural_accuracy']:.4f}"
                 f"  adversarial {rec['adversarial_accuracy']:.4f}  params {rec['total_params']}"
                 f"  {rec['wall_time_s']:.0f}s")
    if rec.get("admm"):
      worst = max(rec["admm"]["relative_primal_residual"].items(), key=lambda kv: kv[1])
      verdict = "" if rec["admm"]["converged"] else ": not converged"
      lines.append(f"            ADMM end: rho {rec['admm']['rho']:.3g}, largest ||W-Z||/||W|| "
                   f"{worst[1]:.3f} ({worst[0]}){verdict}")
    if rec.get("final_attack"):
      label = rec["final_attack"]
      lines.append(f"            {label} (admm_jax.evaluate): robust {rec[label + '_accuracy']:.4f}"
                   f" on the first {rec[label + '_examples']} test examples")
    if rec.get("after_hard_prune_val_adversarial_accuracy") is not None:
      lines.append(f"            right after hard pruning: val natural "
                   f"{rec['after_hard_prune_val_natural_accuracy']:.4f}  adversarial "
                   f"{rec['after_hard_prune_val_adversarial_accuracy']:.4f}")
  if "sparsity" in report:
    sp = report["sparsity"]
    lines.append(f"  {sp['stage']} model: {sp['nonzero_params']} of {sp['total_params']} weights "
                 f"nonzero, compression {sp['compression']:.1f}x")
  lines += [f"warning: {w}" for w in report.get("warnings", [])]
  return "\n".join(lines)


def make_context(config: ml_collections.ConfigDict, workdir: str) -> Context:
  """Validates `config`, prepares `workdir`, loads the data: everything before the stages."""
  configlib.validate(config)
  workdir = prepare_workdir(workdir)
  runtime = parallel.make_runtime(config.parallel.data_axis)
  runtime.check_batch(config.batch_size)
  runtime.check_batch(config.eval_batch_size, "eval_batch_size")
  dataset = data.load_dataset(config.data.name, config.data.dir, config.data.validation_size,
                              config.seed, limit_train=config.data.limit_train,
                              limit_test=config.data.limit_test,
                              tfds_data_dir=config.data.tfds_dir or None)
  if len(dataset.train) < config.batch_size:
    raise configlib.ConfigError(f"config.batch_size={config.batch_size} is larger than the "
                                f"{len(dataset.train)} training examples: lower it.")
  ctx = Context(config, workdir, runtime, dataset)
  if ctx.spec is not None:  # check the patterns against the model's params before any work
    shapes = jax.eval_shape(lambda: _fresh_variables(ctx, ctx.model(config.model.width), "check"))
    try:
      sparsity.resolve(shapes["params"], ctx.spec)
    except ValueError as e:
      raise configlib.ConfigError(f"config.sparsity: {e}") from None
  logging.info("workdir %s | %s: %d train, %d validation, %d test | %d %s device(s)", workdir,
               dataset.name, len(dataset.train), len(dataset.validation),
               len(dataset.test), runtime.num_devices, jax.default_backend())
  return ctx


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs the configured stages in `workdir` and returns (and writes) the report.

  One run per workdir (a lock); SIGTERM/SIGINT checkpoint and stop at the next step; a full
  disk is one sentence (reliability.RunStopped and its exit code).
  """
  configlib.validate(config)  # a bad config touches nothing, not even the lock
  workdir, stops = prepare_workdir(workdir), reliability.StopRequests(config.log_every_steps)
  with (reliability.workdir_lock(workdir), stops.installed(),
        reliability.disk_errors(f"writing to the workdir {workdir}")):
    ctx = make_context(config, workdir)
    ctx.stops, records = stops, {}
    try:
      for stage in configlib.stages(config):
        records[stage] = run_stage(ctx, stage)
        if config.eval.final_attack:  # AutoAttack-grade evaluation of the stage's output
          from admm_jax import evaluate  # pylint: disable=import-outside-toplevel
          records[stage] = {**records[stage], **evaluate.final_evaluation(ctx, stage)}
        report = _report(ctx, records)
        if ctx.is_writer:
          write_json_atomic(os.path.join(workdir, "report.json"), report)
    finally:
      ctx.metrics.close()
  return report
