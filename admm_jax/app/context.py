"""What every stage and every evaluation of a run shares: the config, the workdir, the data, the
devices, the keys (`Context`, built by `make_context`), and reading a finished stage's output
(`load_output`). The trainer runs stages on it; `admm_jax.app.evaluate` attacks their outputs.
"""
from __future__ import annotations

import logging
import os
import zlib

import jax
import ml_collections

from admm_jax import models, sparsity
from admm_jax.app import checkpoint, configlib, data, parallel, reliability, stages, train
from admm_jax.app.workdir import MetricsLog, prepare_workdir, stage_paths


def purpose_key(root_key: jax.Array, *purpose: str) -> jax.Array:
  """The run's key for a purpose, e.g. ("test", "retrain"): the root key folded with each
  name's CRC (the export recomputes the test split's attacks with the same keys)."""
  key = root_key
  for p in purpose:
    key = jax.random.fold_in(key, zlib.crc32(p.encode()) & 0x7FFFFFFF)
  return key


class Context:
  """What every stage shares: config, data, runtime, keys, files, stop requests."""

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
    # config.eval.select_by="apgd-ce": the attack the best epoch is chosen under (else None).
    self.select_attack = (train.Attack("apgd-ce", a.eps, a.eval_step_size,
                                       config.eval.select_steps)
                          if config.eval.select_by == "apgd-ce" else None)
    self.spec = (sparsity.spec(configlib.parse_sparsity(config.sparsity))
                 if any(stages.STAGES[s].sparse for s in configlib.stages(config)) else None)
    self._eval_steps = {}
    self.stops = reliability.StopRequests()  # inactive; train_and_evaluate installs its own

  def model(self, width: int):
    return models.get_model(self.config.model.name, width, self.dataset.num_classes,
                            conv_impl=self.config.model.conv_impl,
                            dtype=self.config.model.dtype)

  def key(self, *purpose: str) -> jax.Array:
    return purpose_key(self.root_key, *purpose)

  def fresh_variables(self, model, init: str) -> dict:
    """The initial variables of `model` under the init key `init` (a Stage's `init`)."""
    return train.init_variables(model, self.key("init", init), self.dataset.image_shape)

  def steps_per_epoch(self) -> int:
    return data.steps_per_epoch(len(self.dataset.train), self.config.batch_size)

  def eval_step(self, model, attack: train.Attack | None = None):
    """One jitted eval step per (model width, attack) (its compilation is reused across
    stages); `attack` defaults to the eval PGD."""
    attack = attack or self.eval_attack
    key = (model.width, attack)
    if key not in self._eval_steps:
      rt = self.runtime
      self._eval_steps[key] = train.jit_eval_step(
          model, attack, in_shardings=(rt.replicated, rt.replicated, rt.data, rt.replicated),
          out_shardings=rt.replicated)
    return self._eval_steps[key]

  def evaluate(self, model, params, batch_stats, split: str, key: jax.Array, *,
               attack: train.Attack | None = None, limit: int = 0) -> dict[str, float]:
    """Natural and adversarial accuracy on `split` under `attack` (default: the eval PGD),
    on its first `limit` examples (0: all)."""
    examples = getattr(self.dataset, split)
    batch_size = self.config.eval_batch_size
    if 0 < limit < len(examples):
      examples = data.Examples(examples.source, examples.positions[:limit])
      # A subset smaller than a batch in one batch of about its size, not padded to the
      # whole eval batch (one shape per run all the same: one compilation).
      n = self.runtime.batch_multiple
      batch_size = min(batch_size, -(-limit // n) * n)
    if len(examples) == 0:
      return {"count": 0, "natural_accuracy": float("nan"), "adversarial_accuracy": float("nan")}
    batches = data.epoch_batches(examples, batch_size, seed=0, epoch=0,
                                 shuffle=False, drop_remainder=False,
                                 process_index=jax.process_index(),
                                 process_count=jax.process_count())
    with data.prefetch(batches) as it:
      return train.evaluate(self.eval_step(model, attack), params, batch_stats,
                            map(self.runtime.global_batch, it), key)


def load_output(ctx: Context, stage: str, like: dict) -> dict | None:
  """The finished output of `stage` from this workdir, else from config.init_from, else None."""
  for root in (ctx.workdir, ctx.config.init_from):
    if not root:
      continue
    paths = stage_paths(os.path.abspath(root), stage)
    if os.path.exists(paths.done):
      with checkpoint.manager(paths.output) as mngr:
        # A replicated target: every process restores the global arrays (multi-host).
        try:
          _, restored = checkpoint.restore_latest(mngr, ctx.runtime.replicate(like))
        except checkpoint.CheckpointError:
          raise checkpoint.CheckpointError(
              f"the output of stage {stage!r} in {paths.output} is damaged: rerun {stage} by "
              f"moving {paths.output} and {paths.done} aside and running the same command "
              "(with that workdir) again; it resumes from the stage's last checkpoint.") from None
      if restored is None:
        raise checkpoint.CheckpointError(f"stage {stage!r} is marked finished in {root} but "
                                         f"{paths.output} holds no output: rerun that stage.")
      if root != ctx.workdir:
        logging.info("%s: starting from %s's output in %s", stage, stage, root)
      return restored
  return None


def make_context(config: ml_collections.ConfigDict, workdir: str) -> Context:
  """Validates `config`, prepares the workdir, loads the data: everything before the stages."""
  configlib.validate(config)
  workdir = prepare_workdir(workdir)
  runtime = parallel.make_runtime(config.parallel.data_axis)
  runtime.check_batch(config.batch_size)
  runtime.check_batch(config.eval_batch_size, "eval_batch_size")
  dataset = data.load_dataset(config.data.name, config.data.dir, config.data.validation_size,
                              config.seed, limit_train=config.data.limit_train,
                              limit_test=config.data.limit_test,
                              tfds_data_dir=config.data.tfds_dir or None,
                              validation_in_limit=config.data.validation_in_limit)
  if len(dataset.train) < config.batch_size:
    raise configlib.ConfigError(f"config.batch_size={config.batch_size} is larger than the "
                                f"{len(dataset.train)} training examples: lower it.")
  ctx = Context(config, workdir, runtime, dataset)
  if ctx.spec is not None:  # check the patterns against the model's params before any work
    model = ctx.model(config.model.width)
    shapes = jax.eval_shape(lambda: ctx.fresh_variables(model, "check"))
    try:
      sparsity.resolve(shapes["params"], ctx.spec)
    except ValueError as e:
      raise configlib.ConfigError(f"config.sparsity: {e}") from None
  logging.info("workdir %s | %s: %d train, %d validation, %d test | %d %s device(s)",
               workdir, dataset.name, len(dataset.train), len(dataset.validation),
               len(dataset.test), runtime.num_devices, jax.default_backend())
  return ctx
