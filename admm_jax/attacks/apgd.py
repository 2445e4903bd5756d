"""APGD (Croce & Hein, ICML 2020): step-size-free PGD with momentum, on the cross-entropy, the
DLR loss or the targeted DLR loss. Every loop is a `lax` loop, every quantity per example.
Conventions: `admm_jax.attacks.geometry`.
"""
import math
from typing import Any, NamedTuple

import jax
from jax import lax
import jax.numpy as jnp

from admm_jax.attacks.geometry import (ApplyFn, Best, Box, NORMS, TINY, check_active,
                                       check_choice, check_classes, check_common, check_in,
                                       check_int, check_targets, class_logit, count_classes,
                                       cross_entropy, detach, expand_to, finish_attack,
                                       lp_normalize, max_other_logit, merge_best, projector,
                                       random_start_in_ball, ranked_targets, skip_unless_needed,
                                       work_dtype)


APGD_LOSSES = ("ce", "dlr")


def dlr_loss(logits: jax.Array, y: jax.Array) -> jax.Array:
  """Difference of Logits Ratio, per example (Croce & Hein 2020, eq. 7).

  DLR = -(z_y - max_{j != y} z_j) / (z_(1) - z_(3)), with z_(k) the k-th largest logit: the
  margin, made invariant to shifting and rescaling the logits. Larger is more adversarial;
  positive once the example is misclassified.

  Args:
    logits: (B, C) logits, C >= 3.
    y: (B,) integer labels.

  Returns:
    (B,) float32 losses.
  """
  check_classes("dlr_loss", jnp.shape(logits), 3)
  z = logits.astype(work_dtype(logits.dtype))
  top = jnp.sort(z, axis=-1)[:, ::-1]
  margin = class_logit(z, y) - max_other_logit(z, y)
  return -margin / (top[:, 0] - top[:, 2] + TINY)


def targeted_dlr_loss(logits: jax.Array, y: jax.Array, target: jax.Array) -> jax.Array:
  """Targeted DLR, per example (Croce & Hein 2020, eq. 8), the loss of APGD-T.

  DLR_t = -(z_y - z_t) / (z_(1) - (z_(3) + z_(4)) / 2), with z_(k) the k-th largest logit.

  Args:
    logits: (B, C) logits, C >= 4.
    y: (B,) integer labels.
    target: (B,) integer target classes (!= y).

  Returns:
    (B,) float32 losses; larger means closer to (or past) the target.
  """
  check_classes("targeted_dlr_loss", jnp.shape(logits), 4)
  z = logits.astype(work_dtype(logits.dtype))
  top = jnp.sort(z, axis=-1)[:, ::-1]
  gap = class_logit(z, y) - class_logit(z, target)
  return -gap / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + TINY)


# --- APGD ----------------------------------------------------------------------------------


def apgd_checkpoints(steps: int) -> list[int]:
  """The iterations after which APGD may halve its step (Croce & Hein 2020, sec. 3.2).

  w_j = ceil(p_j * steps) with p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03,
  0.06), for the w_j <= steps (100 steps: 22, 41, 57, 70, 80, 87, 93, 99).
  """
  p_prev, p, checks = 0.0, 0.22, []
  while math.ceil(p * steps - 1e-9) <= steps:
    w = math.ceil(p * steps - 1e-9)  # The slack keeps 0.41 * 100 at 41.
    if w >= 1 and (not checks or w > checks[-1]):
      checks.append(w)
    p_prev, p = p, p + max(p - p_prev - 0.03, 0.06)
  return checks


def _apgd_run(value_and_grad, x: jax.Array, y: jax.Array, key: jax.Array, *, eps: float,
              norm: str, steps: int, rho: float, momentum: float, box: Box) -> Best:
  """One APGD run from a random start (Croce & Hein 2020, algorithm 1).

  `value_and_grad(x_t) -> ((B,) losses, (B, C) logits, grad)`. The step starts at 2 eps and is
  halved, per example, at a checkpoint w_j when fewer than rho (w_j - w_{j-1}) of the steps
  since w_{j-1} raised the loss, or when neither the step nor the best loss changed since
  w_{j-1}; a halving restarts from the best point, with its gradient and no momentum.
  """
  project = projector(x, eps, norm, box)
  x0 = project(random_start_in_ball(key, x, eps, norm))
  loss0, logits0, grad0 = value_and_grad(x0)
  broken0 = jnp.argmax(logits0, -1) != y
  checks = apgd_checkpoints(steps)
  is_check, interval, last = [False] * (steps + 1), [1] * (steps + 1), 0
  for w in checks:
    is_check[w], interval[w], last = True, w - last, w
  is_check, interval = jnp.asarray(is_check), jnp.asarray(interval, jnp.float32)
  batch = x.shape[0]

  class Carry(NamedTuple):
    x: jax.Array
    x_prev: jax.Array
    grad: jax.Array
    loss: jax.Array            # loss at x
    step: jax.Array            # (B,) current step size
    increases: jax.Array       # (B,) steps since the last checkpoint that raised the loss
    best_at_check: jax.Array   # (B,) best loss at the last checkpoint
    halved_at_check: jax.Array  # (B,) whether the last checkpoint halved the step
    x_best: jax.Array
    grad_best: jax.Array
    loss_best: jax.Array
    x_broken: jax.Array        # first misclassified point found
    broken: jax.Array

  def body(i, c: Carry) -> Carry:
    a = jnp.where(i == 0, 1.0, momentum)
    z = project(c.x + expand_to(c.step, c.x) * lp_normalize(c.grad, norm))
    x_new = project(c.x + a * (z - c.x) + (1 - a) * (c.x - c.x_prev))
    loss, logits, grad = value_and_grad(x_new)
    mis = jnp.argmax(logits, -1) != y
    x_broken = jnp.where(expand_to(mis & ~c.broken, x_new), x_new, c.x_broken)
    increases = c.increases + (loss > c.loss)
    improved = loss > c.loss_best
    x_best = jnp.where(expand_to(improved, x_new), x_new, c.x_best)
    grad_best = jnp.where(expand_to(improved, grad), grad, c.grad_best)
    loss_best = jnp.where(improved, loss, c.loss_best)
    at_check = is_check[i + 1]
    too_few_increases = increases < rho * interval[i + 1]
    stalled = ~c.halved_at_check & (loss_best <= c.best_at_check)
    halve = at_check & (too_few_increases | stalled)
    h = expand_to(halve, x_new)
    return Carry(
        x=jnp.where(h, x_best, x_new), x_prev=jnp.where(h, x_best, c.x),
        grad=jnp.where(h, grad_best, grad), loss=jnp.where(halve, loss_best, loss),
        step=jnp.where(halve, c.step / 2, c.step),
        increases=jnp.where(at_check, 0, increases),
        best_at_check=jnp.where(at_check, loss_best, c.best_at_check),
        halved_at_check=jnp.where(at_check, halve, c.halved_at_check),
        x_best=x_best, grad_best=grad_best, loss_best=loss_best, x_broken=x_broken,
        broken=c.broken | mis)

  init = Carry(x=x0, x_prev=x0, grad=grad0, loss=loss0,
               step=jnp.full((batch,), 2 * eps, x.dtype), increases=jnp.zeros((batch,), jnp.int32),
               best_at_check=loss0, halved_at_check=jnp.zeros((batch,), bool), x_best=x0,
               grad_best=grad0, loss_best=loss0, x_broken=x0, broken=broken0)
  c = lax.fori_loop(0, steps, body, init)
  return Best(jnp.where(expand_to(c.broken, x), c.x_broken, c.x_best), c.loss_best, c.broken)


def _loss_value_and_grad(apply_fn: ApplyFn, params: Any, loss_of_logits, model_dtype):
  """x_t -> ((B,) losses, logits, grad_x sum(losses)); examples are independent."""
  def total(x_t):
    logits = apply_fn(params, x_t.astype(model_dtype))
    losses = loss_of_logits(logits)
    return losses.sum(), (losses, logits)

  grad_fn = jax.value_and_grad(total, has_aux=True)

  def value_and_grad(x_t):
    (_, (losses, logits)), grad = grad_fn(x_t)
    return losses, logits, grad

  return value_and_grad


def _apgd_search(apply_fn, params, x, y, key, active, targets, *, loss_of_logits, eps, norm,
                 steps, restarts, rho, momentum, box) -> Best:
  """APGD runs for every target (a column of `targets`) and restart, in one lax loop.

  `loss_of_logits(logits, target) -> (B,) losses`. A run attacks only the active examples
  that no earlier run broke (and is skipped when there are none).
  """
  x_work = x.astype(work_dtype(x.dtype))
  best = Best(x_work, jnp.full(y.shape, -jnp.inf, x_work.dtype), ~active)

  def one_run(i, best):
    t, r = i // restarts, i % restarts
    target = lax.dynamic_index_in_dim(targets, t, axis=1, keepdims=False)
    value_and_grad = _loss_value_and_grad(apply_fn, params,
                                          lambda z: loss_of_logits(z, target), x.dtype)
    k = jax.random.fold_in(jax.random.fold_in(key, t), r)
    run = lambda b: merge_best(b, _apgd_run(value_and_grad, x_work, y, k, eps=eps, norm=norm,
                                        steps=steps, rho=rho, momentum=momentum, box=box))
    return skip_unless_needed(active & ~best.broken, run, best)

  return lax.fori_loop(0, targets.shape[1] * restarts, one_run, best)


def _check_apgd(name, apply_fn, params, x, y, key, eps, box, norm, steps, restarts, rho,
                momentum, active):
  """The arguments APGD and APGD-T share, checked in one place (one-sentence ValueErrors)."""
  eps, box = check_common(name, x, y, key, eps, True, box, None)
  norm = check_choice(name, "norm", norm, NORMS)
  steps = check_int(name, "steps", steps)
  restarts = check_int(name, "restarts", restarts)
  rho = check_in(name, "rho", rho, 0.0, 1.0, True, True)
  momentum = check_in(name, "momentum", momentum, 0.0, 1.0, True, False)
  active = check_active(name, active, x.shape[0])
  num_classes = count_classes(name, apply_fn, params, x)
  return eps, box, norm, steps, restarts, rho, momentum, active, num_classes


def apgd(apply_fn: ApplyFn, params: Any, x: jax.typing.ArrayLike, y: jax.typing.ArrayLike,
         key: jax.Array, *, eps: float, norm: str = "linf", loss: str = "ce", steps: int = 100,
         restarts: int = 1, rho: float = 0.75, momentum: float = 0.75,
         box: Box = (0.0, 1.0), active: jax.typing.ArrayLike | None = None) -> jax.Array:
  """Auto-PGD (Croce & Hein 2020): PGD with momentum and a budget-aware step schedule.

  From a random point of the eps-sphere, each step moves 2 eps at first along sign(grad)
  (Linf) or grad / ||grad|| (L2), mixes in momentum, and projects onto the ball and the box.
  At checkpoints (`apgd_checkpoints`) the step is halved where the loss rose in fewer than a
  fraction `rho` of the steps, or where neither step nor best loss changed since the last
  checkpoint; the iterate then restarts from the best point found. Each example keeps the
  first misclassified point found, otherwise its highest-loss point.

  Args:
    apply_fn: (params, x) -> (B, C) logits, in inference mode.
    params: model parameters.
    x: (B, ...) clean inputs, floating dtype, inside the box.
    y: (B,) integer labels.
    key: PRNG key (random starts).
    eps: radius of the threat ball, >= 0.
    norm: "linf" or "l2".
    loss: "ce" (cross-entropy) or "dlr" (`dlr_loss`, needs C >= 3).
    steps: iterations per restart (gradient evaluations: steps + 1).
    restarts: random restarts; a restart attacks only the examples not yet broken.
    rho: fraction of loss-raising steps below which the step is halved, in (0, 1).
    momentum: weight of the new step against the previous one (the paper's alpha), in (0, 1].
    box: (lo, hi) valid input range, or None.
    active: optional (B,) bool; inactive examples are returned unchanged.

  Returns:
    (B, ...) points within eps of x (in `norm`) and inside the box, x's dtype, no gradient.

  Raises:
    ValueError: naming a bad argument.
  """
  name = "apgd"
  x = jnp.asarray(x)
  loss = check_choice(name, "loss", loss, APGD_LOSSES)
  eps, box, norm, steps, restarts, rho, momentum, active, num_classes = _check_apgd(
      name, apply_fn, params, x, y, key, eps, box, norm, steps, restarts, rho, momentum, active)
  if loss == "dlr":
    check_classes("apgd with loss='dlr'", (x.shape[0], num_classes), 3)
  params, x, y = detach(params, x, y)
  loss_fn = cross_entropy if loss == "ce" else dlr_loss
  best = _apgd_search(apply_fn, params, x, y, key, active, y[:, None],
                      loss_of_logits=lambda z, _: loss_fn(z, y), eps=eps, norm=norm, steps=steps,
                      restarts=restarts, rho=rho, momentum=momentum, box=box)
  return finish_attack(best, x, active)


def apgd_targeted(apply_fn: ApplyFn, params: Any, x: jax.typing.ArrayLike,
                  y: jax.typing.ArrayLike, key: jax.Array, *, eps: float, norm: str = "linf",
                  steps: int = 100, num_targets: int = 9, restarts: int = 1, rho: float = 0.75,
                  momentum: float = 0.75, box: Box = (0.0, 1.0),
                  active: jax.typing.ArrayLike | None = None) -> jax.Array:
  """APGD-T: APGD on `targeted_dlr_loss` towards each of the top `num_targets` other classes.

  The targets are the classes other than y ranked by their clean logit, as in AutoAttack; a
  target attacks only the examples no earlier target broke.

  Args:
    apply_fn, params, x, y, key, eps, norm, steps, restarts, rho, momentum, box, active: as
      `apgd`.
    num_targets: number of target classes, 1 <= num_targets <= C - 1 (needs C >= 4).

  Returns:
    (B, ...) points within eps of x and inside the box, x's dtype, no gradient.

  Raises:
    ValueError: naming a bad argument.
  """
  name = "apgd_targeted"
  x = jnp.asarray(x)
  eps, box, norm, steps, restarts, rho, momentum, active, num_classes = _check_apgd(
      name, apply_fn, params, x, y, key, eps, box, norm, steps, restarts, rho, momentum, active)
  check_classes(name, (x.shape[0], num_classes), 4)
  num_targets = check_targets(name, num_targets, num_classes)
  params, x, y = detach(params, x, y)
  targets = ranked_targets(apply_fn(params, x), y, num_targets)
  best = _apgd_search(apply_fn, params, x, y, key, active, targets,
                      loss_of_logits=lambda z, target: targeted_dlr_loss(z, y, target), eps=eps,
                      norm=norm, steps=steps, restarts=restarts, rho=rho, momentum=momentum,
                      box=box)
  return finish_attack(best, x, active)
