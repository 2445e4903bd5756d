"""AutoAttack in JAX: APGD (CE, DLR, targeted DLR), targeted FAB, Square, and their cascade.

The attacks of F. Croce and M. Hein, "Reliable evaluation of adversarial robustness with an
ensemble of diverse parameter-free attacks" (ICML 2020) and "Minimally distorted adversarial
examples with a fast adaptive boundary attack" (ICML 2020), and of M. Andriushchenko et al.,
"Square Attack: a query-efficient black-box adversarial attack via random search" (ECCV 2020),
written from the papers for jit, batches and `jax.sharding`: every loop is a `lax` loop, every
quantity is per example (leading batch axis), and no host callback runs.

Conventions (as `admm_jax.attacks`, which re-exports everything here):

- `apply_fn(params, x) -> logits` of shape (B, C), in inference mode; `y` holds (B,) integer
  labels; `box=(lo, hi)` is the valid input range (None: no box); `norm` is "linf" or "l2".
- Hyper-parameters are keyword-only Python values, checked at call time, static under jit.
- `key` drives the random starts and searches: the same key, batch and model give the same
  result. Random numbers are drawn for the whole batch, so an example's attack depends on its
  position in the batch and on the batch size, never on the other examples' values.
- `active` (bool[B], optional): examples that need no attack (already broken, misclassified)
  are returned as `x`, and the loops over restarts, targets and queries stop early once every
  active example is broken. The others' results are exactly those of a run without `active`.
- An example is *broken* when its returned point is misclassified (`argmax != y`) and within
  eps of `x`; every returned point is within eps of `x` and inside the box.
"""
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
from jax import lax
import jax.numpy as jnp
import optax

from admm_jax.attacks import (ApplyFn, Box, _as_number, _check_common, _clip_box, _detach,
                              _linf_bounds, _work_dtype, fgsm, pgd_l2, pgd_linf)

NORMS = ("linf", "l2")
APGD_LOSSES = ("ce", "dlr")
ATTACK_NAMES = ("pgd", "fgsm", "apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square")
STANDARD_NAMES = ("apgd-ce", "apgd-t", "fab-t", "square")
# broken_by codes of examples that no member broke.
CLEAN_MISCLASSIFIED = -1
NEVER_BROKEN = -2

# Guards divisions by norms and by DLR's logit gaps (the papers' 1e-12).
_TINY = 1e-12
# The distance to the box along a coordinate when there is no box: effectively infinite,
# finite so that products with weights stay finite.
_NO_BOX_ROOM = 1e20
# FAB's projection: bisection steps on log(lam) from exp(_LOG_LAM_MIN) (30 steps narrow a
# range of e^120 to a relative 1e-7, float32's resolution).
_BISECTION_STEPS = 30
_LOG_LAM_MIN = -70.0
# Points are computed in float32: x + eps, rescaled L2 perturbations and the distance itself
# can land an ulp above eps.
_BALL_SLACK = 1e-5


# --- Losses --------------------------------------------------------------------------------


def _class_logit(logits: jax.Array, cls: jax.Array) -> jax.Array:
  """logits[b, cls[b]] for every b."""
  return jnp.take_along_axis(logits, cls[:, None].astype(jnp.int32), axis=-1)[:, 0]


def _max_other_logit(logits: jax.Array, y: jax.Array) -> jax.Array:
  """max over j != y[b] of logits[b, j] (ties between classes are handled exactly)."""
  is_label = jax.nn.one_hot(y, logits.shape[-1], dtype=bool)
  return jnp.max(jnp.where(is_label, -jnp.inf, logits), axis=-1)


def _check_classes(fn_name: str, logits_shape: tuple[int, ...], minimum: int) -> None:
  if len(logits_shape) != 2 or logits_shape[-1] < minimum:
    raise ValueError(f"{fn_name} needs logits of shape (B, C) with at least {minimum} classes, "
                     f"got shape {logits_shape}")


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
  _check_classes("dlr_loss", jnp.shape(logits), 3)
  z = logits.astype(_work_dtype(logits.dtype))
  top = jnp.sort(z, axis=-1)[:, ::-1]
  margin = _class_logit(z, y) - _max_other_logit(z, y)
  return -margin / (top[:, 0] - top[:, 2] + _TINY)


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
  _check_classes("targeted_dlr_loss", jnp.shape(logits), 4)
  z = logits.astype(_work_dtype(logits.dtype))
  top = jnp.sort(z, axis=-1)[:, ::-1]
  gap = _class_logit(z, y) - _class_logit(z, target)
  return -gap / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + _TINY)


def _cross_entropy(logits: jax.Array, y: jax.Array) -> jax.Array:
  """(B,) softmax cross-entropy in at least float32."""
  z = logits.astype(_work_dtype(logits.dtype))
  return optax.losses.softmax_cross_entropy_with_integer_labels(z, y)


def _margin(logits: jax.Array, y: jax.Array) -> jax.Array:
  """(B,) z_y - max_{j != y} z_j: positive while correctly classified."""
  z = logits.astype(_work_dtype(logits.dtype))
  return _class_logit(z, y) - _max_other_logit(z, y)


# --- Argument checks -----------------------------------------------------------------------


def _check_choice(fn_name: str, arg: str, value: Any, choices: Sequence[str]) -> str:
  if value not in choices:
    raise ValueError(f"{fn_name}: {arg} must be one of {', '.join(map(repr, choices))}, "
                     f"got {value!r}")
  return value


def _check_int(fn_name: str, arg: str, value: Any, minimum: int = 1) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, jnp.integer)) or value < minimum:
    raise ValueError(f"{fn_name}: {arg} must be an integer >= {minimum}, got {value!r}")
  return int(value)


def _check_in(fn_name: str, arg: str, value: Any, lo: float, hi: float,
              lo_open: bool, hi_open: bool) -> float:
  """`value` as a float in the interval (lo or [lo, hi] or hi), or a ValueError naming it."""
  value = _as_number(fn_name, arg, value)
  if (value < lo or (lo_open and value == lo)) or (value > hi or (hi_open and value == hi)):
    interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    raise ValueError(f"{fn_name}: {arg} must be in {interval}, got {value}")
  return value


def _check_active(fn_name: str, active: Any, batch: int) -> jax.Array:
  if active is None:
    return jnp.ones((batch,), bool)
  if jnp.shape(active) != (batch,) or jnp.result_type(active) != jnp.bool_:
    raise ValueError(f"{fn_name}: active must be a bool array of shape ({batch},), got "
                     f"{jnp.result_type(active)} of shape {jnp.shape(active)}")
  return jnp.asarray(active)


def _num_classes(fn_name: str, apply_fn: ApplyFn, params: Any, x: jax.Array) -> int:
  shape = jax.eval_shape(apply_fn, params, x).shape
  _check_classes(fn_name, shape, 2)
  return shape[-1]


def _check_targets(fn_name: str, num_targets: Any, num_classes: int) -> int:
  num_targets = _check_int(fn_name, "num_targets", num_targets)
  if num_targets > num_classes - 1:
    raise ValueError(f"{fn_name}: num_targets={num_targets} exceeds the {num_classes - 1} "
                     f"classes other than the label; use at most {num_classes - 1}")
  return num_targets


# --- Geometry: norms, balls, random starts -------------------------------------------------


def _expand(v: jax.Array, like: jax.Array) -> jax.Array:
  """Reshapes per-example values (B,) to (B, 1, ..., 1) to broadcast against `like`."""
  return v.reshape(v.shape + (1,) * (like.ndim - 1))


def _norm(v: jax.Array, norm: str) -> jax.Array:
  """(B,) per-example Linf or L2 norms."""
  flat = v.reshape(v.shape[0], -1)
  if norm == "linf":
    return jnp.max(jnp.abs(flat), axis=1)
  return jnp.sqrt(jnp.sum(jnp.square(flat), axis=1))


def _normalize(v: jax.Array, norm: str) -> jax.Array:
  """The ascent direction of unit norm: sign(v) for Linf, v / ||v||_2 for L2."""
  if norm == "linf":
    return jnp.sign(v)
  return v / _expand(jnp.maximum(_norm(v, "l2"), _TINY), v)


def _in_ball(x_adv: jax.Array, x: jax.Array, eps: float, norm: str) -> jax.Array:
  """(B,) whether x_adv is within eps of x, up to float32 rounding."""
  dist = _norm(x_adv.astype(jnp.float32) - x.astype(jnp.float32), norm)
  return dist <= eps * (1 + _BALL_SLACK)


def _projector(x: jax.Array, eps: float, norm: str, box: Box) -> Callable[[jax.Array], jax.Array]:
  """v -> its projection onto the eps-ball around x, then onto the box.

  Linf: one clip to the ball-box intersection (exact). L2: rescale the perturbation to norm
  eps when longer, then clip to the box (which only shortens it, x being in the box).
  """
  if norm == "linf":
    lo, hi = _linf_bounds(x, eps, box)
    return lambda v: jnp.clip(v, lo, hi)

  def project_l2(v):
    delta = v - x
    scale = jnp.minimum(1.0, eps / jnp.maximum(_norm(delta, "l2"), _TINY))
    return _clip_box(x + delta * _expand(scale, delta), box)

  return project_l2


def _random_start(key: jax.Array, x: jax.Array, eps: float, norm: str) -> jax.Array:
  """A random point on the eps-sphere around x (before the box clip), as APGD starts."""
  if norm == "linf":
    t = jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0)
  else:
    t = jax.random.normal(key, x.shape, x.dtype)
  return x + eps * t / _expand(jnp.maximum(_norm(t, norm), _TINY), t)


def _predicts(apply_fn: ApplyFn, params: Any, x_t: jax.Array, y: jax.Array,
              model_dtype: jnp.dtype) -> jax.Array:
  """(B,) whether the model still predicts y at x_t."""
  return jnp.argmax(apply_fn(params, x_t.astype(model_dtype)), axis=-1) == y


def _ranked_targets(logits: jax.Array, y: jax.Array, num_targets: int) -> jax.Array:
  """(B, num_targets) the classes other than y, by decreasing clean logit (APGD-T, FAB-T)."""
  others = jnp.where(jax.nn.one_hot(y, logits.shape[-1], dtype=bool), -jnp.inf,
                     logits.astype(jnp.float32))
  return lax.top_k(others, num_targets)[1]


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


class _Best(NamedTuple):
  """What an attack keeps per example across restarts and targets."""
  x: jax.Array        # (B, ...) the returned point: first misclassified one, else best loss
  loss: jax.Array     # (B,) the loss at x (for FAB: the norm of x - x_clean)
  broken: jax.Array   # (B,) bool, x is misclassified (within eps)


def _merge(old: _Best, new: _Best, higher_is_better: bool = True) -> _Best:
  """Keeps an old break; else a new break; else the better loss."""
  better = new.loss > old.loss if higher_is_better else new.loss < old.loss
  take = ~old.broken & (new.broken | better)
  return _Best(jnp.where(_expand(take, old.x), new.x, old.x), jnp.where(take, new.loss, old.loss),
               old.broken | new.broken)


def _apgd_run(value_and_grad, x: jax.Array, y: jax.Array, key: jax.Array, *, eps: float,
              norm: str, steps: int, rho: float, momentum: float, box: Box) -> _Best:
  """One APGD run from a random start (Croce & Hein 2020, algorithm 1).

  `value_and_grad(x_t) -> ((B,) losses, (B, C) logits, grad)`. The step starts at 2 eps and is
  halved, per example, at a checkpoint w_j when fewer than rho (w_j - w_{j-1}) of the steps
  since w_{j-1} raised the loss, or when neither the step nor the best loss changed since
  w_{j-1}; a halving restarts from the best point, with its gradient and no momentum.
  """
  project = _projector(x, eps, norm, box)
  x0 = project(_random_start(key, x, eps, norm))
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
    z = project(c.x + _expand(c.step, c.x) * _normalize(c.grad, norm))
    x_new = project(c.x + a * (z - c.x) + (1 - a) * (c.x - c.x_prev))
    loss, logits, grad = value_and_grad(x_new)
    mis = jnp.argmax(logits, -1) != y
    x_broken = jnp.where(_expand(mis & ~c.broken, x_new), x_new, c.x_broken)
    increases = c.increases + (loss > c.loss)
    improved = loss > c.loss_best
    x_best = jnp.where(_expand(improved, x_new), x_new, c.x_best)
    grad_best = jnp.where(_expand(improved, grad), grad, c.grad_best)
    loss_best = jnp.where(improved, loss, c.loss_best)
    at_check = is_check[i + 1]
    too_few_increases = increases < rho * interval[i + 1]
    stalled = ~c.halved_at_check & (loss_best <= c.best_at_check)
    halve = at_check & (too_few_increases | stalled)
    h = _expand(halve, x_new)
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
  return _Best(jnp.where(_expand(c.broken, x), c.x_broken, c.x_best), c.loss_best, c.broken)


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


def _skip_unless_needed(need: jax.Array, run, best: _Best) -> _Best:
  """Runs `run(best) -> _Best` only if some example still needs it (a scalar lax.cond)."""
  return lax.cond(jnp.any(need), run, lambda b: b, best)


def _apgd_search(apply_fn, params, x, y, key, active, targets, *, loss_of_logits, eps, norm,
                 steps, restarts, rho, momentum, box) -> _Best:
  """APGD runs for every target (a column of `targets`) and restart, in one lax loop.

  `loss_of_logits(logits, target) -> (B,) losses`. A run attacks only the active examples
  that no earlier run broke (and is skipped when there are none).
  """
  x_work = x.astype(_work_dtype(x.dtype))
  best = _Best(x_work, jnp.full(y.shape, -jnp.inf, x_work.dtype), ~active)

  def one_run(i, best):
    t, r = i // restarts, i % restarts
    target = lax.dynamic_index_in_dim(targets, t, axis=1, keepdims=False)
    value_and_grad = _loss_value_and_grad(apply_fn, params,
                                          lambda z: loss_of_logits(z, target), x.dtype)
    k = jax.random.fold_in(jax.random.fold_in(key, t), r)
    run = lambda b: _merge(b, _apgd_run(value_and_grad, x_work, y, k, eps=eps, norm=norm,
                                        steps=steps, rho=rho, momentum=momentum, box=box))
    return _skip_unless_needed(active & ~best.broken, run, best)

  return lax.fori_loop(0, targets.shape[1] * restarts, one_run, best)


def _finish(best: _Best, x: jax.Array, active: jax.Array) -> jax.Array:
  """The returned batch: the attack's points where active, x elsewhere, in x's dtype."""
  x_out = jnp.where(_expand(active, x), best.x.astype(x.dtype), x)
  return lax.stop_gradient(x_out)


def _check_apgd(name, apply_fn, params, x, y, key, eps, box, norm, steps, restarts, rho,
                momentum, active):
  """The arguments APGD and APGD-T share, checked in one place (one-sentence ValueErrors)."""
  eps, box = _check_common(name, x, y, key, eps, True, box, None)
  norm = _check_choice(name, "norm", norm, NORMS)
  steps = _check_int(name, "steps", steps)
  restarts = _check_int(name, "restarts", restarts)
  rho = _check_in(name, "rho", rho, 0.0, 1.0, True, True)
  momentum = _check_in(name, "momentum", momentum, 0.0, 1.0, True, False)
  active = _check_active(name, active, x.shape[0])
  num_classes = _num_classes(name, apply_fn, params, x)
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
  loss = _check_choice(name, "loss", loss, APGD_LOSSES)
  eps, box, norm, steps, restarts, rho, momentum, active, num_classes = _check_apgd(
      name, apply_fn, params, x, y, key, eps, box, norm, steps, restarts, rho, momentum, active)
  if loss == "dlr":
    _check_classes("apgd with loss='dlr'", (x.shape[0], num_classes), 3)
  params, x, y = _detach(params, x, y)
  loss_fn = _cross_entropy if loss == "ce" else dlr_loss
  best = _apgd_search(apply_fn, params, x, y, key, active, y[:, None],
                      loss_of_logits=lambda z, _: loss_fn(z, y), eps=eps, norm=norm, steps=steps,
                      restarts=restarts, rho=rho, momentum=momentum, box=box)
  return _finish(best, x, active)


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
  _check_classes(name, (x.shape[0], num_classes), 4)
  num_targets = _check_targets(name, num_targets, num_classes)
  params, x, y = _detach(params, x, y)
  targets = _ranked_targets(apply_fn(params, x), y, num_targets)
  best = _apgd_search(apply_fn, params, x, y, key, active, targets,
                      loss_of_logits=lambda z, target: targeted_dlr_loss(z, y, target), eps=eps,
                      norm=norm, steps=steps, restarts=restarts, rho=rho, momentum=momentum,
                      box=box)
  return _finish(best, x, active)


# --- FAB -----------------------------------------------------------------------------------


def _min_norm_to_hyperplane(p: jax.Array, w: jax.Array, r: jax.Array, norm: str,
                            box: Box) -> jax.Array:
  """The smallest d (Linf or L2) with <w, d> = r and p + d in the box, per example.

  p, w: (B, D); r: (B,). With s = sign(r), d_i = s sign(w_i) min(lam c_i, room_i), where
  room_i is the distance from p_i to the box edge in direction s sign(w_i), c_i = 1 (Linf) or
  |w_i| (L2), and lam >= 0 is the smallest value with g(lam) = sum_i |w_i| min(lam c_i,
  room_i) = |r|. g is piecewise linear and nondecreasing, with breakpoints room_i / c_i: a
  bisection on log(lam) finds the piece that holds the solution (sorting the breakpoints is
  exact too, but XLA's CPU sort made it 10x slower), and solving on that piece gives lam.
  When even g(inf) < |r| the box forbids reaching the hyperplane and d goes as far as the
  box allows.
  """
  direction = jnp.sign(r)[:, None] * jnp.sign(w)
  abs_w = jnp.abs(w)
  if box is None:
    room = jnp.full_like(p, _NO_BOX_ROOM)
  else:
    room = jnp.maximum(jnp.where(direction > 0, box[1] - p, p - box[0]), 0.0)
  speed = jnp.ones_like(w) if norm == "linf" else abs_w  # |d_i| = lam * speed_i, unsaturated
  slope = abs_w * speed                                  # d g / d lam while unsaturated
  saturated = abs_w * room                               # the term of g once saturated
  breaks = jnp.where(speed > 0, room / jnp.maximum(speed, _TINY), jnp.inf)
  target = jnp.abs(r)[:, None]

  def g_parts(lam):
    """(sum of the saturated terms, slope of the rest) at lam: g(lam) = S + lam A."""
    below = breaks <= lam
    return (jnp.sum(jnp.where(below, saturated, 0.0), axis=1, keepdims=True),
            jnp.sum(jnp.where(below, 0.0, slope), axis=1, keepdims=True))

  def g(lam):
    total, rest = g_parts(lam)
    return total + lam * rest

  largest = jnp.max(jnp.where(jnp.isfinite(breaks), breaks, 0.0), axis=1, keepdims=True)
  log_lo = jnp.full_like(target, _LOG_LAM_MIN)
  log_hi = jnp.log(jnp.maximum(largest, math.exp(_LOG_LAM_MIN))) + 1.0

  def halve(_, bounds):
    log_lo, log_hi = bounds
    mid = 0.5 * (log_lo + log_hi)
    short = g(jnp.exp(mid)) < target
    return jnp.where(short, mid, log_lo), jnp.where(short, log_hi, mid)

  log_lo, log_hi = lax.fori_loop(0, _BISECTION_STEPS, halve, (log_lo, log_hi))
  lam_lo, lam_hi = jnp.exp(log_lo), jnp.exp(log_hi)
  total, rest = g_parts(lam_lo)
  lam = jnp.clip((target - total) / jnp.maximum(rest, _TINY), lam_lo, lam_hi)
  lam = jnp.where(g(largest) < target, jnp.inf, lam)  # the box stops d short of the plane
  return jnp.where(speed > 0, direction * jnp.minimum(lam * speed, room), 0.0)


def _fab_run(apply_fn, params, x: jax.Array, y: jax.Array, target: jax.Array, x_start: jax.Array,
             best: _Best, *, norm: str, steps: int, box: Box, model_dtype, alpha_max: float,
             eta: float, beta: float) -> _Best:
  """One targeted FAB run (Croce & Hein, ICML 2020, algorithm 1) from x_start.

  Each step linearises f = z_t - z_y at the iterate, projects both the iterate and x onto
  the hyperplane f = 0 (minimal norm, inside the box), moves to a convex combination of the
  two overshot by eta (weight on x's projection: a1 / (a1 + a2) capped at alpha_max), and,
  where that point is misclassified, records it if it is the closest found and steps back
  towards x by the factor beta. `best.loss` is the norm of the closest misclassified point.
  """
  batch = x.shape[0]
  flat = lambda v: v.reshape(batch, -1)

  def diff_and_grad(x_t):
    def total(v):
      logits = apply_fn(params, v.astype(model_dtype)).astype(jnp.float32)
      f = _class_logit(logits, target) - _class_logit(logits, y)
      return f.sum(), f
    (_, f), g = jax.value_and_grad(total, has_aux=True)(x_t)
    return f, g

  def body(_, carry):
    x1, best = carry
    f, g = diff_and_grad(x1)
    g_flat = flat(g)
    r1 = -f
    r0 = -f - jnp.sum(g_flat * flat(x - x1), axis=1)
    d1 = _min_norm_to_hyperplane(flat(x1), g_flat, r1, norm, box).reshape(x.shape)
    d0 = _min_norm_to_hyperplane(flat(x), g_flat, r0, norm, box).reshape(x.shape)
    a1 = jnp.maximum(_norm(d1, norm), 1e-8)
    a0 = jnp.maximum(_norm(d0, norm), 1e-8)
    alpha = _expand(jnp.clip(a1 / (a1 + a0), 0.0, alpha_max), x)
    x1 = _clip_box((x1 + eta * d1) * (1 - alpha) + (x + eta * d0) * alpha, box)
    mis = ~_predicts(apply_fn, params, x1, y, model_dtype)
    dist = _norm(x1 - x, norm)
    closer = mis & (dist < best.loss)
    best = _Best(jnp.where(_expand(closer, x), x1, best.x), jnp.where(closer, dist, best.loss),
                 best.broken)
    x1 = jnp.where(_expand(mis, x), x + beta * (x1 - x), x1)
    return x1, best

  _, best = lax.fori_loop(0, steps, body, (x_start, best))
  return best


def fab(apply_fn: ApplyFn, params: Any, x: jax.typing.ArrayLike, y: jax.typing.ArrayLike,
        key: jax.Array | None, *, eps: float, norm: str = "linf", steps: int = 100,
        num_targets: int = 9, restarts: int = 1, alpha_max: float = 0.1, eta: float = 1.05,
        beta: float = 0.9, box: Box = (0.0, 1.0),
        active: jax.typing.ArrayLike | None = None) -> jax.Array:
  """Targeted FAB (Croce & Hein, ICML 2020): the closest misclassified point it can find.

  For each of the top `num_targets` other classes (ranked by clean logit), `steps` FAB
  iterations towards the decision boundary with that class; the first restart starts at x,
  later ones at a random point between x and the closest point found so far. FAB minimises
  the norm rather than working inside the ball: an example counts as broken only if its
  closest misclassified point is within eps, and then that point is returned; otherwise x.

  Args:
    apply_fn, params, x, y, eps, norm, box, active: as `apgd`.
    key: PRNG key for the restarts after the first; may be None when restarts == 1.
    steps: iterations per target and restart.
    num_targets: number of target classes, 1 <= num_targets <= C - 1.
    restarts: runs per target.
    alpha_max: largest weight on the projection of x, in [0, 1].
    eta: overshoot of the projection step, >= 1.
    beta: backward step towards x after a success, in (0, 1).

  Returns:
    (B, ...) points within eps of x (in `norm`) and inside the box, x's dtype, no gradient.

  Raises:
    ValueError: naming a bad argument.
  """
  name = "fab"
  x = jnp.asarray(x)
  restarts = _check_int(name, "restarts", restarts)
  eps, box = _check_common(name, x, y, key, eps, restarts > 1, box, None)
  norm = _check_choice(name, "norm", norm, NORMS)
  steps = _check_int(name, "steps", steps)
  alpha_max = _check_in(name, "alpha_max", alpha_max, 0.0, 1.0, False, False)
  eta = _check_in(name, "eta", eta, 1.0, math.inf, False, True)
  beta = _check_in(name, "beta", beta, 0.0, 1.0, True, True)
  active = _check_active(name, active, x.shape[0])
  num_targets = _check_targets(name, num_targets, _num_classes(name, apply_fn, params, x))
  params, x, y = _detach(params, x, y)
  dtype = x.dtype
  x_work = x.astype(_work_dtype(dtype))
  logits = apply_fn(params, x)
  targets = _ranked_targets(logits, y, num_targets)
  clean_wrong = jnp.argmax(logits, -1) != y  # already misclassified at distance 0
  best = _Best(x_work, jnp.where(clean_wrong, 0.0, jnp.inf).astype(x_work.dtype), ~active)

  def one_run(i, best):
    t, r = i // restarts, i % restarts

    def attack(best):
      x_start = x_work
      if restarts > 1:  # After the first run: a random point at half the closest distance.
        radius = jnp.where(r > 0, 0.5 * jnp.minimum(best.loss, eps), 0.0)
        k = jax.random.fold_in(jax.random.fold_in(key, t), r)
        unit = _random_start(k, jnp.zeros_like(x_work), 1.0, norm)
        x_start = _clip_box(x_work + _expand(radius, x_work) * unit, box)
      target = lax.dynamic_index_in_dim(targets, t, axis=1, keepdims=False)
      best = _fab_run(apply_fn, params, x_work, y, target, x_start, best, norm=norm,
                      steps=steps, box=box, model_dtype=dtype, alpha_max=alpha_max, eta=eta,
                      beta=beta)
      return best._replace(broken=best.broken | (best.loss <= eps))

    return _skip_unless_needed(active & ~best.broken, attack, best)

  best = lax.fori_loop(0, num_targets * restarts, one_run, best)
  broken = active & (best.loss <= eps)
  return _finish(best._replace(x=jnp.where(_expand(broken, x_work), best.x, x_work)), x, active)


# --- Square --------------------------------------------------------------------------------


# Iterations (out of 10,000) after which Square halves its square's area fraction p.
_SQUARE_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def _square_fraction(i: jax.Array, queries: int, p_init: float) -> jax.Array:
  """The fraction p of pixels a square covers at query i (the paper's schedule, rescaled)."""
  progress = (i * 10000) // queries
  halvings = sum((progress > t).astype(jnp.int32) for t in _SQUARE_HALVINGS)
  return p_init / (2.0 ** halvings)


def _as_image(x: jax.Array, fn_name: str) -> jax.Array:
  """Views x as (B, H, W, C): NHWC images as they are, (B, H, W) with C = 1, and flat
  (B, D) inputs as one row of D pixels."""
  if x.ndim == 4:
    return x
  if x.ndim == 3:
    return x[..., None]
  if x.ndim == 2:
    return x[:, None, :, None]
  raise ValueError(f"square needs inputs of shape (B, H, W, C), (B, H, W) or (B, D), got "
                   f"x.shape={x.shape}")


def _window(key: jax.Array, shape: tuple[int, ...], p: jax.Array) -> jax.Array:
  """(B, H, W, 1) bool: a random square (a segment for one-row inputs) of area about p H W."""
  batch, height, width, _ = shape
  if height == 1:
    side_h = jnp.ones((), jnp.int32)
    side_w = jnp.clip(jnp.round(p * width), 1, max(width - 1, 1)).astype(jnp.int32)
  else:
    side = jnp.round(jnp.sqrt(p * height * width))
    side_h = side_w = jnp.clip(side, 1, max(min(height, width) - 1, 1)).astype(jnp.int32)
  kh, kw = jax.random.split(key)
  top = jnp.floor(jax.random.uniform(kh, (batch,)) * (height - side_h + 1)).astype(jnp.int32)
  left = jnp.floor(jax.random.uniform(kw, (batch,)) * (width - side_w + 1)).astype(jnp.int32)
  rows = jnp.arange(height)[None, :, None, None]
  cols = jnp.arange(width)[None, None, :, None]
  top, left = top[:, None, None, None], left[:, None, None, None]
  return (rows >= top) & (rows < top + side_h) & (cols >= left) & (cols < left + side_w)


def _square_linf_candidate(key, x, x_best, eps, p, box):
  """Square's Linf proposal: one random square of x_best's perturbation set to +-eps per
  channel (the other sign when the first would change nothing)."""
  k_window, k_sign = jax.random.split(key)
  inside = _window(k_window, x.shape, p)
  sign = jnp.where(jax.random.bernoulli(k_sign, 0.5, (x.shape[0], 1, 1, x.shape[3])), 1.0, -1.0)
  delta = x_best - x

  def propose(s):
    return _clip_box(x + jnp.where(inside, eps * s, delta), box)

  first = propose(sign)
  unchanged = jnp.all(first == x_best, axis=(1, 2, 3))
  return jnp.where(_expand(unchanged, x), propose(-sign), first)


def _square_l2_candidate(key, x, x_best, eps, p, box):
  """Square's L2 proposal: move the perturbation's energy in two random squares into the
  first one, as a centred bump of random sign per channel plus its old content, keeping
  ||delta||_2 = eps (before the box clip, which only shortens it)."""
  k_one, k_two, k_sign = jax.random.split(key, 3)
  one = _window(k_one, x.shape, p)
  two = _window(k_two, x.shape, p)
  delta = x_best - x
  sq_sum = lambda v: jnp.sum(jnp.square(v), axis=(1, 2, 3))
  both = one | two
  spare = jnp.maximum(eps ** 2 - sq_sum(delta), 0.0)
  energy = sq_sum(jnp.where(both, delta, 0.0)) + spare
  # Concentric rings around the square's centre, weight 1 / (ring + 1)^2.
  rows = jnp.arange(x.shape[1])[None, :, None, None].astype(x.dtype)
  cols = jnp.arange(x.shape[2])[None, None, :, None].astype(x.dtype)
  count = jnp.maximum(jnp.sum(one, axis=(1, 2, 3), keepdims=True), 1)
  centre_r = jnp.sum(jnp.where(one, rows, 0), axis=(1, 2, 3), keepdims=True) / count
  centre_c = jnp.sum(jnp.where(one, cols, 0), axis=(1, 2, 3), keepdims=True) / count
  ring = jnp.floor(jnp.maximum(jnp.abs(rows - centre_r), jnp.abs(cols - centre_c)))
  bump = jnp.where(one, 1.0 / jnp.square(ring + 1.0), 0.0)
  sign = jnp.where(jax.random.bernoulli(k_sign, 0.5, (x.shape[0], 1, 1, x.shape[3])), 1.0, -1.0)
  old = jnp.where(one, delta, 0.0)
  old = old / _expand(jnp.sqrt(jnp.maximum(sq_sum(jnp.where(both, delta, 0.0)), _TINY)), x)
  new = bump * sign / _expand(jnp.sqrt(jnp.maximum(sq_sum(bump * sign), _TINY)), x) + old
  new = new * _expand(jnp.sqrt(energy / jnp.maximum(sq_sum(new), _TINY)), x)
  return _clip_box(x + jnp.where(one, new, jnp.where(both, 0.0, delta)), box)


def square(apply_fn: ApplyFn, params: Any, x: jax.typing.ArrayLike, y: jax.typing.ArrayLike,
           key: jax.Array, *, eps: float, norm: str = "linf", queries: int = 5000,
           p_init: float = 0.8, box: Box = (0.0, 1.0),
           active: jax.typing.ArrayLike | None = None) -> jax.Array:
  """Square Attack (Andriushchenko et al. 2020): random search on the margin, no gradients.

  Starts from vertical stripes of +-eps (Linf) or their rescaling to norm eps (L2); each
  query changes the perturbation inside one random square whose area shrinks on the paper's
  schedule from `p_init` of the image, and keeps the change when the margin z_y - max_{j!=y}
  z_j drops. It stops at `queries` queries, or once every active example is misclassified.
  Gradient masking cannot stop it: it only reads the logits.

  Args:
    apply_fn, params, x, y, key, eps, norm, box, active: as `apgd`; x of shape (B, H, W, C),
      (B, H, W) or (B, D) (a row of D pixels: the squares become segments).
    queries: model evaluations per example after the first, >= 1.
    p_init: initial fraction of the image one square covers, in (0, 1].

  Returns:
    (B, ...) points within eps of x (in `norm`) and inside the box, x's dtype, no gradient:
    the lowest-margin point found.

  Raises:
    ValueError: naming a bad argument.
  """
  name = "square"
  x = jnp.asarray(x)
  eps, box = _check_common(name, x, y, key, eps, True, box, None)
  norm = _check_choice(name, "norm", norm, NORMS)
  queries = _check_int(name, "queries", queries)
  p_init = _check_in(name, "p_init", p_init, 0.0, 1.0, True, False)
  active = _check_active(name, active, x.shape[0])
  _num_classes(name, apply_fn, params, x)
  params, x, y = _detach(params, x, y)
  dtype, shape = x.dtype, x.shape
  img = _as_image(x.astype(_work_dtype(dtype)), name)
  margin_of = lambda v: _margin(apply_fn(params, v.reshape(shape).astype(dtype)), y)
  init_key, loop_key = jax.random.split(key)
  stripes = jax.random.bernoulli(init_key, 0.5, (img.shape[0], 1, img.shape[2], img.shape[3]))
  stripes = jnp.where(stripes, 1.0, -1.0) * jnp.ones_like(img)
  if norm == "linf":
    x_best = _clip_box(img + eps * stripes, box)
    candidate = _square_linf_candidate
  else:
    x_best = _clip_box(img + eps * stripes / _expand(_norm(stripes, "l2"), img), box)
    candidate = _square_l2_candidate
  margin_best = margin_of(x_best)

  def searching(carry):
    i, _, margin = carry
    return (i < queries) & jnp.any(active & (margin > 0))

  def query(carry):
    i, x_best, margin_best = carry
    p = _square_fraction(i, queries, p_init)
    x_new = candidate(jax.random.fold_in(loop_key, i), img, x_best, eps, p, box)
    margin = margin_of(x_new)
    better = (margin_best > 0) & (margin < margin_best)
    return (i + 1, jnp.where(_expand(better, img), x_new, x_best),
            jnp.where(better, margin, margin_best))

  _, x_best, margin_best = lax.while_loop(searching, query, (jnp.int32(0), x_best, margin_best))
  return _finish(_Best(x_best.reshape(shape), margin_best, margin_best <= 0), x, active)


# --- Names and the cascade -----------------------------------------------------------------


AttackFn = Callable[..., jax.Array]


def _fgsm_any_norm(apply_fn, params, x, y, key, *, eps, norm, box, active):
  """FGSM from x (Linf, step eps) or its L2 twin (one normalised-gradient step of length eps)."""
  del key
  if norm == "linf":
    x_adv = fgsm(apply_fn, params, x, y, None, eps=eps, random_start=False, box=box)
  else:
    x_adv = pgd_l2(apply_fn, params, x, y, None, eps=eps, step_size=max(eps, _TINY), steps=1,
                   random_start=False, box=box)
  return jnp.where(_expand(active, x_adv), x_adv, x)


def _pgd_any_norm(apply_fn, params, x, y, key, *, eps, norm, box, active):
  """PGD-10 with a random start and step eps / 4 (2.5 eps of travel), Linf or L2."""
  fn = pgd_linf if norm == "linf" else pgd_l2
  x_adv = fn(apply_fn, params, x, y, key, eps=eps, step_size=max(eps / 4, _TINY), steps=10,
             box=box)
  return jnp.where(_expand(active, x_adv), x_adv, x)


def _standard(name: str) -> AttackFn:
  """The member `name` with AutoAttack's standard budget, as fn(..., eps, norm, box, active)."""
  if name == "pgd":
    return _pgd_any_norm
  if name == "fgsm":
    return _fgsm_any_norm
  if name in ("apgd-ce", "apgd-dlr"):
    return lambda *a, **kw: apgd(*a, loss=name[5:], steps=100, restarts=1, **kw)

  def capped_targets(fn, **budget):
    def attack(apply_fn, params, x, y, key, **kw):
      classes = _num_classes(name, apply_fn, params, jnp.asarray(x))
      return fn(apply_fn, params, x, y, key, num_targets=min(9, classes - 1), **budget, **kw)
    return attack

  if name == "apgd-t":
    return capped_targets(apgd_targeted, steps=100, restarts=1)
  if name == "fab-t":
    return capped_targets(fab, steps=100, restarts=1)
  return lambda *a, **kw: square(*a, queries=5000, p_init=0.8, **kw)


def by_name(name: str) -> AttackFn:
  """The attack `name` with AutoAttack's standard budget.

  fn(apply_fn, params, x, y, key, *, eps, norm, box=(0., 1.), active=None) -> x_adv, where
  `name` is one of ATTACK_NAMES:

  - "pgd": `pgd_linf` / `pgd_l2`, 10 steps of eps / 4 from a random start;
  - "fgsm": one step of eps from x (`fgsm` for Linf, one `pgd_l2` step for L2);
  - "apgd-ce", "apgd-dlr": `apgd`, 100 steps, 1 restart;
  - "apgd-t": `apgd_targeted`, 100 steps, 9 targets (C - 1 if fewer classes);
  - "fab-t": `fab`, 100 steps, 9 targets (C - 1 if fewer);
  - "square": `square`, 5000 queries, p_init 0.8.

  Raises:
    ValueError: for an unknown name, listing the valid ones.
  """
  if name not in ATTACK_NAMES:
    raise ValueError(f"unknown attack {name!r}: use one of {', '.join(ATTACK_NAMES)}")
  member = _standard(name)

  def attack(apply_fn: ApplyFn, params: Any, x: jax.typing.ArrayLike, y: jax.typing.ArrayLike,
             key: jax.Array, *, eps: float, norm: str, box: Box = (0.0, 1.0),
             active: jax.typing.ArrayLike | None = None) -> jax.Array:
    x = jnp.asarray(x)
    eps = _check_in(name, "eps", eps, 0.0, math.inf, False, True)
    norm = _check_choice(name, "norm", norm, NORMS)
    active = _check_active(name, active, x.shape[0])
    return member(apply_fn, params, x, y, key, eps=eps, norm=norm, box=box, active=active)

  attack.__name__ = name
  return attack


class CascadeResult(NamedTuple):
  """Per-example outcome of a cascade of attacks (AutoAttack's evaluation)."""
  robust: jax.Array         # (N,) bool: correctly classified and unbroken by every member
  broken_by: jax.Array      # (N,) int32: index in names of the member that broke it first;
  #                           CLEAN_MISCLASSIFIED (-1) if wrong without attack, NEVER_BROKEN (-2)
  clean_correct: jax.Array  # (N,) bool: correctly classified without attack
  robust_after: jax.Array   # (len(names),) float32: robust accuracy after each member, in order


def cascade(apply_fn: ApplyFn, params: Any, x: jax.typing.ArrayLike, y: jax.typing.ArrayLike,
            key: jax.Array, *, names: Sequence[str], eps: float, norm: str,
            box: Box = (0.0, 1.0)) -> CascadeResult:
  """Runs the attacks `names` in order, each only on the examples still robust.

  As AutoAttack's standard and custom versions: member i (`by_name(names[i])`, key
  `jax.random.fold_in(key, i)`) attacks the correctly classified examples that no earlier
  member broke; an example is broken when the member's point is misclassified within eps. So
  an example is robust exactly when it is robust against every member run on its own with
  the same key. Jittable with `names`, `eps`, `norm` and `box` static.

  Args:
    apply_fn, params, x, y, key, box: as `apgd`.
    names: attack names from ATTACK_NAMES, in order (duplicates allowed).
    eps: radius of the threat ball.
    norm: "linf" or "l2".

  Returns:
    A CascadeResult.

  Raises:
    ValueError: for an unknown name or a bad argument.
  """
  if isinstance(names, str) or not names:
    raise ValueError(f"cascade: names must be a non-empty sequence of attack names from "
                     f"{', '.join(ATTACK_NAMES)}, got {names!r}")
  members = [by_name(n) for n in names]
  x = jnp.asarray(x)
  eps, box = _check_common("cascade", x, y, key, eps, True, box, None)
  norm = _check_choice("cascade", "norm", norm, NORMS)
  params, x, y = _detach(params, x, y)
  clean_correct = _predicts(apply_fn, params, x, y, x.dtype)
  robust = clean_correct
  broken_by = jnp.where(clean_correct, NEVER_BROKEN, CLEAN_MISCLASSIFIED).astype(jnp.int32)
  robust_after = []
  for i, member in enumerate(members):
    k = jax.random.fold_in(key, i)
    x_adv = lax.cond(jnp.any(robust),
                     lambda r, k=k, member=member: member(apply_fn, params, x, y, k, eps=eps,
                                                          norm=norm, box=box, active=r),
                     lambda r: x, robust)
    broken = robust & ~_predicts(apply_fn, params, x_adv, y, x.dtype) & _in_ball(
        x_adv, x, eps, norm)
    broken_by = jnp.where(broken, i, broken_by)
    robust = robust & ~broken
    robust_after.append(jnp.mean(robust.astype(jnp.float32)))
  return CascadeResult(robust, broken_by, clean_correct, jnp.stack(robust_after))


def autoattack(apply_fn: ApplyFn, params: Any, x: jax.typing.ArrayLike,
               y: jax.typing.ArrayLike, key: jax.Array, *, eps: float, norm: str = "linf",
               box: Box = (0.0, 1.0)) -> CascadeResult:
  """Standard AutoAttack: `cascade` over APGD-CE, APGD-T, FAB-T and Square (STANDARD_NAMES)."""
  return cascade(apply_fn, params, x, y, key, names=STANDARD_NAMES, eps=eps, norm=norm, box=box)
