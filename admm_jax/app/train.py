"""Train state and the jitted steps: adversarial training (Madry, TRADES, MART) and robust
evaluation.

BatchNorm and the attack. During training the attack runs the model in *train mode* (batch
statistics) without updating the running averages, then the loss runs in train mode on the
adversarial batch and updates them once. The attack thus maximizes exactly the loss that
the step then minimizes (Danskin: the gradient of the inner max is the gradient at the
maximizer of the same function), and the running averages see one batch per step, not
steps+1 of them with half-finished perturbations (the reference code's train-mode PGD
updates them at every attack step). Evaluation attacks the deployed model: eval mode,
running averages.

TRADES and MART also need the clean batch's logits. That pass runs in train mode too, on the
clean batch's own statistics (as the papers' code does with separate forward passes), and its
running-average update is dropped: the averages still move once per step, from the
adversarial batch, as under Madry's loss. The KL attack of TRADES uses the same train-mode
clean logits as its target, so it again maximizes the very term the step minimizes.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from admm_jax import attacks, losses

Metrics = dict[str, jax.Array]

ATTACK_LOSSES = ("ce", "kl")
ATTACK_KINDS = ("pgd", "fgsm", "none", "apgd-ce")
# TRADES starts its KL attack this close to x: at x itself the KL term's gradient is zero.
KL_START_STD = 1e-3


class TrainState(struct.PyTreeNode):
  """Everything a stage needs to continue bit for bit (orbax saves it as one pytree)."""
  step: jax.Array          # int32: optimizer steps taken in this stage
  params: Any
  batch_stats: Any         # {} for models without BatchNorm
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class Attack:
  """An Linf attack: "pgd" (PGD with `steps` steps), "fgsm" (FGSM, random start), "none", or
  "apgd-ce" (`attacks.apgd` on the cross-entropy, `steps` iterations, one restart; it sets its
  own step sizes and always starts at random: model selection only, config.eval.select_by)."""
  kind: str = "pgd"
  eps: float = 0.1
  step_size: float = 0.01
  steps: int = 10
  random_start: bool = True

  def __post_init__(self):
    if self.kind not in ATTACK_KINDS:
      raise ValueError(f"attack kind {self.kind!r} is unknown: use 'pgd', 'fgsm', 'none' or "
                       "'apgd-ce'.")

  def __call__(self, apply_fn, params, x, y, key, loss: str = "ce"):
    """Adversarial inputs for (x, y).

    loss "ce" maximizes the cross-entropy to the labels y; "kl" (TRADES) maximizes the KL
    divergence KL(p(x) || p(x')) from the clean prediction, starting from
    x + KL_START_STD * N(0, 1) whatever `random_start` says (the random start of "ce"
    attacks would move the KL attack's start far from where TRADES puts it).
    """
    if loss not in ATTACK_LOSSES:
      raise ValueError(f"attack loss {loss!r} is unknown: use 'ce' or 'kl'.")
    if self.kind == "none" or self.eps == 0:
      return x
    if self.kind == "apgd-ce":
      if loss != "ce":
        raise ValueError("attack kind 'apgd-ce' maximizes the cross-entropy: use loss 'ce'.")
      return attacks.apgd(apply_fn, params, x, y, key, eps=self.eps, norm="linf", loss="ce",
                          steps=self.steps, restarts=1)
    if loss == "kl":
      # Targets are the clean logits; the attacks detach them.
      target, loss_fn = apply_fn(params, x), _kl_from_clean_sum
      x_init = x + KL_START_STD * jax.random.normal(key, x.shape, x.dtype)
      start = dict(random_start=False, x_init=x_init)
    else:
      target, loss_fn = y, None
      start = dict(random_start=True if self.kind == "fgsm" else self.random_start)
    if self.kind == "fgsm":
      return attacks.fgsm(apply_fn, params, x, target, key, eps=self.eps,
                          step_size=self.step_size, loss_fn=loss_fn, **start)
    return attacks.pgd_linf(apply_fn, params, x, target, key, eps=self.eps,
                            step_size=self.step_size, steps=self.steps, loss_fn=loss_fn,
                            **start)


def _kl_from_clean_sum(logits_adv: jax.Array, logits_clean: jax.Array) -> jax.Array:
  """Sum over the batch of KL(p(x) || p(x')): the TRADES attack's objective."""
  return losses.kl_divergence(logits_clean, logits_adv).sum()


@dataclasses.dataclass(frozen=True)
class Objective:
  """The adversarial training loss (admm_jax.losses): "madry", "trades" or "mart", with the
  weight `beta` of the KL term (madry has none)."""
  name: str = "madry"
  beta: float = 6.0

  def __post_init__(self):
    if self.name not in losses.OBJECTIVES:
      raise ValueError(f"objective {self.name!r} is unknown: use one of "
                       f"{', '.join(losses.OBJECTIVES)}.")
    if (isinstance(self.beta, bool) or not isinstance(self.beta, (int, float))
        or not 0 <= self.beta < float("inf")):
      raise ValueError(f"objective beta {self.beta!r} is invalid: use a finite number >= 0.")

  @property
  def attack_loss(self) -> str:
    """What the training attack maximizes: the KL term for TRADES, else the cross-entropy."""
    return "kl" if self.name == "trades" else "ce"


def init_variables(model: nn.Module, key: jax.Array, input_shape: tuple[int, ...]) -> dict:
  """Initial {'params', 'batch_stats'} of `model` for inputs of `input_shape` (one example).

  One jitted program, which runs once: on CPU without LLVM's optimisations. Run eagerly, the
  init compiled every random initializer per kernel shape and every op of the forward pass
  separately (ResNet-18(1): ~150 small programs, 25 s of compilation on 2 loaded CPU cores,
  more than its train step); jitted at -O2 17 s, at -O0 2 s (its 22 threefry generators).
  """
  x = jnp.zeros((1,) + tuple(input_shape), jnp.float32)
  # compiler_options only at the top level (not under eval_shape or another jit).
  top_level = not isinstance(key, jax.core.Tracer)
  options = ({"xla_backend_optimization_level": 0}
             if top_level and jax.default_backend() == "cpu" else None)
  variables = jax.jit(functools.partial(model.init, train=False), compiler_options=options)(key, x)
  return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def create_train_state(params: Any, batch_stats: Any, tx: optax.GradientTransformation
                       ) -> TrainState:
  """A fresh TrainState at step 0 with tx's initial optimizer state."""
  return TrainState(step=jnp.zeros([], jnp.int32), params=params, batch_stats=batch_stats,
                    opt_state=tx.init(params))


def _apply(model: nn.Module, params: Any, batch_stats: Any, x: jax.Array, train: bool
           ) -> tuple[jax.Array, Any]:
  """(logits, batch_stats after the call): in train mode BatchNorm uses and updates batch stats."""
  if not batch_stats:
    return model.apply({"params": params}, x, train=train), batch_stats
  variables = {"params": params, "batch_stats": batch_stats}
  if not train:
    return model.apply(variables, x, train=False), batch_stats
  logits, updated = model.apply(variables, x, train=True, mutable=["batch_stats"])
  return logits, updated["batch_stats"]


def logits_fn(model: nn.Module, batch_stats: Any, train: bool) -> Callable:
  """The `apply_fn(params, x) -> logits` that the attacks take, for a model with or without
  BatchNorm.

  Args:
    model: the flax module.
    batch_stats: its BatchNorm statistics ({} for a model without BatchNorm).
    train: BatchNorm on batch statistics (train mode; their update is discarded) or on the
      running averages `batch_stats` (eval mode).
  """
  return lambda p, x: _apply(model, p, batch_stats, x, train)[0]


def train_step(state: TrainState, batch: dict[str, jax.Array], key: jax.Array, *,
               model: nn.Module, tx: optax.GradientTransformation, attack: Attack,
               objective: Objective = Objective()) -> tuple[TrainState, Metrics]:
  """One adversarial training step on `objective`'s loss (Madry's: the cross-entropy of the
  attacked batch).

  Args:
    state: the TrainState.
    batch: {"image": (B, H, W, C) float32 in [0, 1], "label": (B,) int32}.
    key: the stage's PRNG key; the step's key is folded in from state.step, so a resumed
      run draws the same random starts as an uninterrupted one.
    model, tx, attack, objective: static (close over them with functools.partial before
      jax.jit); the objective decides what the attack maximizes (Objective.attack_loss).

  Returns:
    (new state, metrics): sums over the batch of "loss" (the objective's per-example loss)
    and "correct" (on the adversarial batch) and "count", to be accumulated on device and
    fetched now and then.
  """
  x, y = batch["image"], batch["label"]
  step_key = jax.random.fold_in(key, state.step)
  x_adv = attack(logits_fn(model, state.batch_stats, train=True), state.params, x, y, step_key,
                 loss=objective.attack_loss)

  def loss_fn(params):
    logits, new_stats = _apply(model, params, state.batch_stats, x_adv, train=True)
    if objective.name == "madry":
      per_example = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    else:
      logits_clean, _ = _apply(model, params, state.batch_stats, x, train=True)
      per_example = losses.objective_losses(objective.name, logits_clean, logits, y,
                                            objective.beta)
    return per_example.mean(), (per_example, logits, new_stats)

  grads, (per_example, logits, new_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                            batch_stats=new_stats, opt_state=opt_state)
  metrics = {"loss": per_example.sum(), "correct": jnp.sum(jnp.argmax(logits, -1) == y),
             "count": jnp.asarray(y.shape[0], jnp.int32)}
  return new_state, metrics


def eval_step(params: Any, batch_stats: Any, batch: dict[str, jax.Array], key: jax.Array, *,
              model: nn.Module, attack: Attack) -> Metrics:
  """Natural and adversarial correct counts on one batch, in eval mode.

  `batch` may carry a boolean "mask" (padding of the last batch): masked-out examples count
  nowhere. Returns sums: "count", "natural_correct", "adversarial_correct".
  """
  x, y = batch["image"], batch["label"]
  mask = batch.get("mask", jnp.ones(y.shape, bool))
  apply_fn = logits_fn(model, batch_stats, train=False)
  natural = jnp.argmax(apply_fn(params, x), -1) == y
  x_adv = attack(apply_fn, params, x, y, key)
  adversarial = jnp.argmax(apply_fn(params, x_adv), -1) == y
  return {"count": jnp.sum(mask, dtype=jnp.int32),
          "natural_correct": jnp.sum(natural & mask, dtype=jnp.int32),
          "adversarial_correct": jnp.sum(adversarial & mask, dtype=jnp.int32)}


def add_metrics(total: Metrics | None, new: Metrics) -> Metrics:
  """Running sums of metric dicts (stays on device: no host round-trip)."""
  return new if total is None else jax.tree.map(jnp.add, total, new)


def jit_train_step(model: nn.Module, tx: optax.GradientTransformation, attack: Attack,
                   objective: Objective = Objective(), **jit_kw):
  """train_step jitted once per stage, with the state donated (updated in place)."""
  return jax.jit(functools.partial(train_step, model=model, tx=tx, attack=attack,
                                   objective=objective),
                 donate_argnums=(0,), **jit_kw)


def jit_eval_step(model: nn.Module, attack: Attack, **jit_kw):
  """eval_step jitted once per (model, attack)."""
  return jax.jit(functools.partial(eval_step, model=model, attack=attack), **jit_kw)


def evaluate(step_fn: Callable, params: Any, batch_stats: Any, batches, key: jax.Array
             ) -> dict[str, float]:
  """Natural and adversarial accuracy over `batches` (one fetch to the host at the end)."""
  total = None
  for i, batch in enumerate(batches):
    total = add_metrics(total, step_fn(params, batch_stats, batch, jax.random.fold_in(key, i)))
  if total is None:
    return {"count": 0, "natural_accuracy": float("nan"), "adversarial_accuracy": float("nan")}
  total = jax.device_get(total)
  count = int(total["count"])
  return {"count": count, "natural_accuracy": int(total["natural_correct"]) / max(count, 1),
          "adversarial_accuracy": int(total["adversarial_correct"]) / max(count, 1)}
