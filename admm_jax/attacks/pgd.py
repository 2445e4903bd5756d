"""Attacks for training and evaluation: PGD in the Linf and L2 balls (Madry et al., 2018) and
FGSM. Conventions: `admm_jax.attacks.geometry`.

`x_init` (instead of a random start) gives the first iterate, projected onto the ball and the
box; TRADES starts its KL attack from x + 0.001 * N(0, 1), because the KL to the clean
prediction has a zero gradient at x itself.
"""
import math
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp

from admm_jax.attacks.geometry import (ApplyFn, Box, LossFn, TINY, check_common, check_init,
                                       check_step_size, check_steps, clip_box, detach,
                                       input_grad_fn, l2_norms, linf_bounds, shrink_to_l2_ball,
                                       work_dtype)


def _linf_attack(apply_fn: ApplyFn, params: Any, x: jax.Array, y: Any, key: Any,
                 *, eps: float, step_size: float, steps: int, random_start: bool,
                 box: Box, loss_fn: LossFn | None, fn_name: str,
                 x_init: jax.Array | None) -> jax.Array:
  """Signed-gradient ascent in the Linf ball; shared by pgd_linf and fgsm."""
  params, x, y = detach(params, x, y)
  dtype = x.dtype
  x_clean = x.astype(work_dtype(dtype))
  lo, hi = linf_bounds(x_clean, eps, box)
  x_adv = x_clean
  if x_init is not None:
    x_adv = jnp.clip(lax.stop_gradient(x_init).astype(x_clean.dtype), lo, hi)
  elif random_start:
    noise = jax.random.uniform(key, x_clean.shape, x_clean.dtype, -eps, eps)
    x_adv = jnp.clip(x_clean + noise, lo, hi)
  grad_fn = input_grad_fn(apply_fn, params, y, loss_fn, dtype, fn_name)

  def step(_, x_t):
    # Ball and box projections fused into one clip.
    return jnp.clip(x_t + step_size * jnp.sign(grad_fn(x_t)), lo, hi)

  x_adv = lax.fori_loop(0, steps, step, x_adv)
  return lax.stop_gradient(x_adv.astype(dtype))


def pgd_linf(apply_fn: ApplyFn, params: Any, x: jax.typing.ArrayLike,
             y: jax.typing.ArrayLike, key: jax.Array | None, *, eps: float,
             step_size: float, steps: int, random_start: bool = True,
             box: Box = (0.0, 1.0), loss_fn: LossFn | None = None,
             x_init: jax.typing.ArrayLike | None = None) -> jax.Array:
  """Projected gradient ascent in the Linf ball (Madry et al., 2018).

  x_0 = clip_box(x + U(-eps, eps)) with a random start (x otherwise), then
  x_{t+1} = clip_box(clip_ball(x_t + step_size * sign(grad_x L(x_t)))).

  Args:
    apply_fn: (params, x) -> (B, C) logits, in inference mode.
    params: model parameters, passed unchanged to `apply_fn`.
    x: (B, ...) clean inputs, floating dtype, inside the box.
    y: (B,) integer labels (or targets for `loss_fn`).
    key: PRNG key for the random start; may be None if random_start=False.
    eps: Linf radius, >= 0.
    step_size: size of each signed step, > 0.
    steps: number of ascent steps, a positive Python int.
    random_start: start from a uniform point of the ball (clipped to the box).
    box: (lo, hi) valid input range, or None for no box.
    loss_fn: (logits, y) -> scalar to maximize; default is the summed softmax
      cross-entropy with integer labels.
    x_init: first iterate instead of x or a random start (needs
      random_start=False), shaped like x; projected onto the ball and the box.

  Returns:
    (B, ...) adversarial inputs with x's dtype, within eps of x in Linf and
    inside the box, with gradients stopped.

  Raises:
    ValueError: on a bad hyper-parameter or mismatched shapes, naming it.
  """
  name = "pgd_linf"
  x = jnp.asarray(x)
  eps, box = check_common(name, x, y, key, eps, random_start, box, loss_fn)
  x_init = check_init(name, x, x_init, random_start)
  step_size = check_step_size(name, step_size)
  steps = check_steps(name, steps)
  return _linf_attack(apply_fn, params, x, y, key, eps=eps, step_size=step_size,
                      steps=steps, random_start=random_start, box=box,
                      loss_fn=loss_fn, fn_name=name, x_init=x_init)


def fgsm(apply_fn: ApplyFn, params: Any, x: jax.typing.ArrayLike,
         y: jax.typing.ArrayLike, key: jax.Array | None, *, eps: float,
         step_size: float | None = None, random_start: bool = True,
         box: Box = (0.0, 1.0), loss_fn: LossFn | None = None,
         x_init: jax.typing.ArrayLike | None = None) -> jax.Array:
  """One signed-gradient step (Goodfellow et al., 2015), projected to ball and box.

  With random_start this is the FGSM-RS of "fast adversarial training" (Wong et
  al., 2020): start uniformly in the ball, step 1.25 * eps by default, project.
  Without it, the default step is eps from x itself (classic FGSM).

  Args:
    apply_fn: (params, x) -> (B, C) logits, in inference mode.
    params: model parameters, passed unchanged to `apply_fn`.
    x: (B, ...) clean inputs, floating dtype, inside the box.
    y: (B,) integer labels (or targets for `loss_fn`).
    key: PRNG key for the random start; may be None if random_start=False.
    eps: Linf radius, >= 0.
    step_size: size of the signed step, > 0; None for 1.25 * eps with a random
      start and eps without one.
    random_start: start from a uniform point of the ball (clipped to the box).
    box: (lo, hi) valid input range, or None for no box.
    loss_fn: (logits, y) -> scalar to maximize; default is the summed softmax
      cross-entropy with integer labels.
    x_init: first iterate instead of x or a random start (needs
      random_start=False), shaped like x; projected onto the ball and the box.

  Returns:
    (B, ...) adversarial inputs with x's dtype, within eps of x in Linf and
    inside the box, with gradients stopped.

  Raises:
    ValueError: on a bad hyper-parameter or mismatched shapes, naming it.
  """
  name = "fgsm"
  x = jnp.asarray(x)
  eps, box = check_common(name, x, y, key, eps, random_start, box, loss_fn)
  x_init = check_init(name, x, x_init, random_start)
  if step_size is None:
    step_size = 1.25 * eps if random_start else eps
    if step_size == 0:  # eps == 0: any positive step is projected away.
      step_size = 1.0
  step_size = check_step_size(name, step_size)
  return _linf_attack(apply_fn, params, x, y, key, eps=eps, step_size=step_size,
                      steps=1, random_start=random_start, box=box,
                      loss_fn=loss_fn, fn_name=name, x_init=x_init)


def pgd_l2(apply_fn: ApplyFn, params: Any, x: jax.typing.ArrayLike,
           y: jax.typing.ArrayLike, key: jax.Array | None, *, eps: float,
           step_size: float, steps: int, random_start: bool = True,
           box: Box = (0.0, 1.0), loss_fn: LossFn | None = None,
           x_init: jax.typing.ArrayLike | None = None) -> jax.Array:
  """Projected gradient ascent in the per-example L2 ball.

  x_0 = clip_box(x + delta_0) with delta_0 uniform in the ball (a Gaussian
  direction, normalized, times radius eps * U^(1/d), d = features per example)
  with a random start (x otherwise), then
  x_{t+1} = clip_box(proj_ball(x_t + step_size * g / ||g||)), g = grad_x L(x_t),
  where proj_ball rescales delta = x' - x to norm eps when it is longer.

  Args:
    apply_fn: (params, x) -> (B, C) logits, in inference mode.
    params: model parameters, passed unchanged to `apply_fn`.
    x: (B, ...) clean inputs, floating dtype, inside the box.
    y: (B,) integer labels (or targets for `loss_fn`).
    key: PRNG key for the random start; may be None if random_start=False.
    eps: L2 radius per example, >= 0.
    step_size: L2 length of each step, > 0.
    steps: number of ascent steps, a positive Python int.
    random_start: start from a uniform point of the ball (clipped to the box).
    box: (lo, hi) valid input range, or None for no box.
    loss_fn: (logits, y) -> scalar to maximize; default is the summed softmax
      cross-entropy with integer labels.
    x_init: first iterate instead of x or a random start (needs
      random_start=False), shaped like x; projected onto the ball and the box.

  Returns:
    (B, ...) adversarial inputs with x's dtype, each within L2 distance eps of
    its clean input and inside the box, with gradients stopped.

  Raises:
    ValueError: on a bad hyper-parameter or mismatched shapes, naming it.
  """
  name = "pgd_l2"
  x = jnp.asarray(x)
  eps, box = check_common(name, x, y, key, eps, random_start, box, loss_fn)
  x_init = check_init(name, x, x_init, random_start)
  step_size = check_step_size(name, step_size)
  steps = check_steps(name, steps)
  params, x, y = detach(params, x, y)
  dtype = x.dtype
  x_clean = x.astype(work_dtype(dtype))
  x_adv = x_clean
  if x_init is not None:
    delta = lax.stop_gradient(x_init).astype(x_clean.dtype) - x_clean
    x_adv = clip_box(x_clean + shrink_to_l2_ball(delta, eps), box)
  elif random_start:
    dir_key, radius_key = jax.random.split(key)
    direction = jax.random.normal(dir_key, x_clean.shape, x_clean.dtype)
    direction = direction / jnp.maximum(l2_norms(direction), TINY)
    num_features = math.prod(x_clean.shape[1:])
    radius_shape = (x_clean.shape[0],) + (1,) * (x_clean.ndim - 1)
    radius = eps * jax.random.uniform(radius_key, radius_shape, x_clean.dtype) ** (
        1.0 / num_features)
    x_adv = clip_box(x_clean + radius * direction, box)
  grad_fn = input_grad_fn(apply_fn, params, y, loss_fn, dtype, name)

  def step(_, x_t):
    g = grad_fn(x_t)
    delta = x_t + step_size * g / jnp.maximum(l2_norms(g), TINY) - x_clean
    return clip_box(x_clean + shrink_to_l2_ball(delta, eps), box)

  x_adv = lax.fori_loop(0, steps, step, x_adv)
  return lax.stop_gradient(x_adv.astype(dtype))
