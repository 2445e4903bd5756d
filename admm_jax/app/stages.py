"""The stages of a run as data: one `Stage` entry each, in `STAGES`.

An entry says where the stage starts (a fresh init or another stage's output), how it turns
that start into its initial variables and optimizer chain (its `build` function), how many
epochs it trains, and what it outputs (its best epoch on validation or its last iterate).
The trainer (`admm_jax.trainer`) runs every entry the same way. Adding a stage is one entry
here plus its build function, and its `config.<name>` section (optimizer, lr, epochs) in
`configlib.base_config`; append it: a stage's position seeds its data order.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from admm_jax import scores, sparsity, transforms
from admm_jax.app.errors import UserError

Variables = dict  # {"params": ..., "batch_stats": ...}
# The pruned model's training budget: scratch and inherited train as long (epochs 0).
BUDGET_STAGES = ("pretrain", "admm", "retrain")


class StageStart(NamedTuple):
  """What a stage's build function starts from."""
  config: ml_collections.ConfigDict      # the run's config
  spec: sparsity.SparsitySpec | None     # config.sparsity, parsed (None when no stage is sparse)
  variables: Variables                   # the input stage's output (the fresh init if no input)
  fresh: Variables                       # the freshly initialised variables of the stage's model
  optimizer: optax.GradientTransformation  # the stage's own optimizer, with its lr schedule
  update_every: int                      # ADMM's Z/U period in steps


Build = Callable[[StageStart], tuple[Variables, optax.GradientTransformation]]
# (config, spec, chosen params) -> the stage's output params (a last step after training).
Finish = Callable[[ml_collections.ConfigDict, sparsity.SparsitySpec | None, Any], Any]
GRIDS = ("end", "train")   # `<masked stage>.grid`: where layers with bits hold their grid


def _model_width(config: ml_collections.ConfigDict) -> int:
  return config.model.width


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage of a run.

  Attributes:
    name: also the config section (`config.<name>`) with its optimizer and epochs.
    build: StageStart -> (initial variables, optimizer chain).
    input: the stage whose output it needs (from this workdir or config.init_from), or a
      function config -> that stage (`input_of`); None starts from a fresh init only.
    input_use: how it uses that output, for the error when the output is missing.
    selects_best: its output is the epoch with the best validation adversarial accuracy
      (under the eval PGD, or APGD-CE with config.eval.select_by="apgd-ce"); otherwise its
      last iterate.
    start_label: evaluate the starting point on validation and test before the first step
      and report it as `<start_label>_{val,test}_{natural,adversarial}_accuracy`.
    sparse: trains toward or within `config.sparsity`: needs the spec, reports sparsity.
    masked: its pruned weights stay exactly zero (a mask in its chain): its output is the
      run's pruned model, whose sparsity report.json shows before that of an unmasked stage.
    init: the key of its fresh init: stages with the same init start from the same weights.
    width: config -> the model's width.
    budget_at_zero: `config.<name>.epochs` = 0 trains as many epochs as BUDGET_STAGES.
    finish: applied to the chosen output before it is tested and saved (None: nothing); when
      it changes the params, the output's validation accuracies are measured again.
  """
  name: str
  build: Build
  input: str | Callable[[ml_collections.ConfigDict], str] | None = None
  input_use: str = "starts from"
  selects_best: bool = True
  start_label: str | None = None
  sparse: bool = False
  masked: bool = False
  init: str = "pretrain"
  width: Callable[[ml_collections.ConfigDict], int] = _model_width
  budget_at_zero: bool = False
  finish: Finish | None = None

  def input_of(self, config: ml_collections.ConfigDict) -> str | None:
    """The stage whose output this one starts from under `config`."""
    return self.input(config) if callable(self.input) else self.input

  def num_epochs(self, config: ml_collections.ConfigDict) -> int:
    """The passes over the training split this stage trains."""
    epochs = config[self.name].epochs
    if epochs == 0 and self.budget_at_zero:
      return sum(config[s].epochs for s in BUDGET_STAGES)
    return epochs


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


def admm_update_every(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  """ADMM's Z/U period in steps; fractions of an epoch allowed (several updates per epoch)."""
  return max(1, round(config.admm.update_every_epochs * steps_per_epoch))


# ---------------------------------------------------------------- the build functions

def plain(start: StageStart) -> tuple[Variables, optax.GradientTransformation]:
  """Its start as it is, trained with the stage's optimizer."""
  return start.variables, start.optimizer


def admm(start: StageStart) -> tuple[Variables, optax.GradientTransformation]:
  """The ADMM penalty (Z, U, rho in the optimizer state) ahead of the stage's optimizer."""
  cfg = start.config.admm
  penalty = transforms.admm(start.spec, rho=cfg.rho, update_every=start.update_every,
                            rho_growth=cfg.rho_growth)
  return start.variables, optax.chain(penalty, start.optimizer)


def hard_prune_then_mask(start: StageStart, name: str = "retrain"
                         ) -> tuple[Variables, optax.GradientTransformation]:
  """Hard prune the projection of W (not Z), then keep the zero pattern through training.

  Layers with bits in the spec start projected onto their sparse k-bit set; `<name>.grid`
  says where the grid holds after that (see `_masked_chain` and `onto_grid_at_end`).
  """
  params, masks = sparsity.hard_prune(start.variables["params"], start.spec)
  return dict(start.variables, params=params), _masked_chain(start, masks, name)


def _has_bits(spec: sparsity.SparsitySpec | None) -> bool:
  return spec is not None and any(r.bits is not None for _, r in spec.rules)


def _masked_chain(start: StageStart, masks, name: str) -> optax.GradientTransformation:
  """The stage's optimizer, then the masks; with `<name>.grid` = "train" the layers with bits
  then stay on their k-bit grids at every step (`transforms.keep_on_grid`, straight-through).
  With "end" they train as floats under the masks and `onto_grid_at_end` projects the output."""
  chain = [start.optimizer, transforms.apply_masks(masks)]
  if _has_bits(start.spec) and start.config[name].grid == "train":
    chain.append(transforms.keep_on_grid(start.spec, masks))
  return optax.chain(*chain)


def onto_grid_at_end(name: str) -> Finish:
  """The finish of masked stage `name`: with `<name>.grid` = "end", its chosen output projected
  onto the spec's sets (`sparsity.hard_prune`: the exact sparse k-bit projection for layers
  with bits; masked float layers are already in their sets and stay as they are). The support
  can only shrink (a kept weight nearer 0 than to any level goes to 0), never move."""
  def finish(config: ml_collections.ConfigDict, spec: sparsity.SparsitySpec | None,
             params: Any) -> Any:
    if not _has_bits(spec) or config[name].grid != "end":
      return params
    return sparsity.hard_prune(params, spec)[0]
  return finish


def inherited(start: StageStart) -> tuple[Variables, optax.GradientTransformation]:
  """The inherited-initialization baseline (lottery ticket): the pruned network's mask on the
  wide network's initial weights, kept through training.

  `start.fresh` is the init the pretrain stage started from (same model, seed and key); the
  mask is admm's output hard-pruned, i.e. exactly the mask retrain trains under.
  """
  masks = sparsity.masks(start.variables["params"], start.spec)
  params = jax.tree.map(lambda m, w: w if m is None else w * m.astype(w.dtype),
                        masks, start.fresh["params"], is_leaf=lambda x: x is None)
  return dict(start.fresh, params=params), _masked_chain(start, masks, "inherited")


class StageInputError(UserError, ValueError):
  """A stage cannot start from its input (one sentence: what and how to fix it)."""


def learned_masks(start: StageStart) -> tuple[Variables, optax.GradientTransformation]:
  """HYDRA's score phase: a score per weight (per group for filter and column) from the
  input's magnitudes (`scores.init`), the mask each rule's top-k scores; the weights frozen
  and the scores trained by the stage's optimizer through the straight-through gradient
  (`scores.train_scores`). The params are always the hard-masked weights, so the output is
  the pruned model that finetune trains under its mask.
  """
  params = start.variables["params"]
  try:
    init = scores.init(params, start.spec)
  except ValueError as e:
    raise StageInputError(f"config.sparsity: {e}") from None
  return (dict(start.variables, params=scores.apply(params, init, start.spec)),
          scores.train_scores(start.spec, params, init, start.optimizer))


def _scores_input(config: ml_collections.ConfigDict) -> str:
  return "admm" if config.scores.init == "admm" else "pretrain"


# In run order; append new stages (the position seeds the stage's data order).
STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("pretrain", plain),
    # Its output is the last iterate (the point ADMM converged to), which retrain hard-prunes.
    Stage("admm", admm, input="pretrain", selects_best=False, sparse=True),
    # Its start is measured: what hard pruning cost before any retraining.
    Stage("retrain", hard_prune_then_mask, input="admm", start_label="after_hard_prune",
          sparse=True, masked=True, finish=onto_grid_at_end("retrain")),
    Stage("scratch", plain, init="scratch", width=lambda config: config.scratch.width,
          budget_at_zero=True),
    Stage("inherited", inherited, input="admm", input_use="takes its mask from", sparse=True,
          masked=True, budget_at_zero=True, finish=onto_grid_at_end("inherited")),
    # Learned masks: scores trained with the weights frozen, on pretrain's output (HYDRA's
    # start, scores.init="magnitude") or admm's (scores.init="admm"); finetune then trains
    # the masked weights, as retrain does after admm.
    Stage("scores", learned_masks, input=_scores_input, input_use="learns its mask on",
          start_label="initial_mask", sparse=True, masked=True),
    Stage("finetune", functools.partial(hard_prune_then_mask, name="finetune"), input="scores",
          sparse=True, masked=True, finish=onto_grid_at_end("finetune")),
)}


def data_seed(config: ml_collections.ConfigDict, name: str) -> int:
  """The seed of a stage's data order and augmentation."""
  return config.seed * 1000 + list(STAGES).index(name)
