"""Targeted FAB (Croce & Hein, "Minimally distorted adversarial examples with a fast adaptive
boundary attack", ICML 2020): steps to the linearized decision boundary, biased back to x.
Conventions: `admm_jax.attacks.geometry`.
"""
import math
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp

from admm_jax.attacks.geometry import (ApplyFn, Best, Box, NORMS, TINY, check_active,
                                       check_choice, check_common, check_in, check_int,
                                       check_targets, class_logit, clip_box, count_classes,
                                       detach, expand_to, finish_attack, lp_norm, predicts,
                                       random_start_in_ball, ranked_targets, skip_unless_needed,
                                       work_dtype)


# The distance to the box along a coordinate when there is no box: effectively infinite,
# finite so that products with weights stay finite.
_NO_BOX_ROOM = 1e20
# FAB's projection: bisection steps on log(lam) from exp(_LOG_LAM_MIN) (30 steps narrow a
# range of e^120 to a relative 1e-7, float32's resolution).
_BISECTION_STEPS = 30
_LOG_LAM_MIN = -70.0


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
  breaks = jnp.where(speed > 0, room / jnp.maximum(speed, TINY), jnp.inf)
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
  lam = jnp.clip((target - total) / jnp.maximum(rest, TINY), lam_lo, lam_hi)
  lam = jnp.where(g(largest) < target, jnp.inf, lam)  # the box stops d short of the plane
  return jnp.where(speed > 0, direction * jnp.minimum(lam * speed, room), 0.0)


def _fab_run(apply_fn, params, x: jax.Array, y: jax.Array, target: jax.Array, x_start: jax.Array,
             best: Best, *, norm: str, steps: int, box: Box, model_dtype, alpha_max: float,
             eta: float, beta: float) -> Best:
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
      f = class_logit(logits, target) - class_logit(logits, y)
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
    a1 = jnp.maximum(lp_norm(d1, norm), 1e-8)
    a0 = jnp.maximum(lp_norm(d0, norm), 1e-8)
    alpha = expand_to(jnp.clip(a1 / (a1 + a0), 0.0, alpha_max), x)
    x1 = clip_box((x1 + eta * d1) * (1 - alpha) + (x + eta * d0) * alpha, box)
    mis = ~predicts(apply_fn, params, x1, y, model_dtype)
    dist = lp_norm(x1 - x, norm)
    closer = mis & (dist < best.loss)
    best = Best(jnp.where(expand_to(closer, x), x1, best.x), jnp.where(closer, dist, best.loss),
                 best.broken)
    x1 = jnp.where(expand_to(mis, x), x + beta * (x1 - x), x1)
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
  restarts = check_int(name, "restarts", restarts)
  eps, box = check_common(name, x, y, key, eps, restarts > 1, box, None)
  norm = check_choice(name, "norm", norm, NORMS)
  steps = check_int(name, "steps", steps)
  alpha_max = check_in(name, "alpha_max", alpha_max, 0.0, 1.0, False, False)
  eta = check_in(name, "eta", eta, 1.0, math.inf, False, True)
  beta = check_in(name, "beta", beta, 0.0, 1.0, True, True)
  active = check_active(name, active, x.shape[0])
  num_targets = check_targets(name, num_targets, count_classes(name, apply_fn, params, x))
  params, x, y = detach(params, x, y)
  dtype = x.dtype
  x_work = x.astype(work_dtype(dtype))
  logits = apply_fn(params, x)
  targets = ranked_targets(logits, y, num_targets)
  clean_wrong = jnp.argmax(logits, -1) != y  # already misclassified at distance 0
  best = Best(x_work, jnp.where(clean_wrong, 0.0, jnp.inf).astype(x_work.dtype), ~active)

  def one_run(i, best):
    t, r = i // restarts, i % restarts

    def attack(best):
      x_start = x_work
      if restarts > 1:  # After the first run: a random point at half the closest distance.
        radius = jnp.where(r > 0, 0.5 * jnp.minimum(best.loss, eps), 0.0)
        k = jax.random.fold_in(jax.random.fold_in(key, t), r)
        unit = random_start_in_ball(k, jnp.zeros_like(x_work), 1.0, norm)
        x_start = clip_box(x_work + expand_to(radius, x_work) * unit, box)
      target = lax.dynamic_index_in_dim(targets, t, axis=1, keepdims=False)
      best = _fab_run(apply_fn, params, x_work, y, target, x_start, best, norm=norm,
                      steps=steps, box=box, model_dtype=dtype, alpha_max=alpha_max, eta=eta,
                      beta=beta)
      return best._replace(broken=best.broken | (best.loss <= eps))

    return skip_unless_needed(active & ~best.broken, attack, best)

  best = lax.fori_loop(0, num_targets * restarts, one_run, best)
  broken = active & (best.loss <= eps)
  best = best._replace(x=jnp.where(expand_to(broken, x_work), best.x, x_work))
  return finish_attack(best, x, active)
