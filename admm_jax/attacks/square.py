"""Square (Andriushchenko et al., ECCV 2020): the query-only random search of AutoAttack,
Linf and L2 updates on random squares. Conventions: `admm_jax.attacks.geometry`.
"""
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp

from admm_jax.attacks.geometry import (ApplyFn, Best, Box, NORMS, TINY, check_active,
                                       check_choice, check_common, check_in, check_int, clip_box,
                                       count_classes, detach, expand_to, finish_attack, lp_norm,
                                       margin_loss, work_dtype)


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
    return clip_box(x + jnp.where(inside, eps * s, delta), box)

  first = propose(sign)
  unchanged = jnp.all(first == x_best, axis=(1, 2, 3))
  return jnp.where(expand_to(unchanged, x), propose(-sign), first)


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
  old = old / expand_to(jnp.sqrt(jnp.maximum(sq_sum(jnp.where(both, delta, 0.0)), TINY)), x)
  new = bump * sign / expand_to(jnp.sqrt(jnp.maximum(sq_sum(bump * sign), TINY)), x) + old
  new = new * expand_to(jnp.sqrt(energy / jnp.maximum(sq_sum(new), TINY)), x)
  return clip_box(x + jnp.where(one, new, jnp.where(both, 0.0, delta)), box)


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
  eps, box = check_common(name, x, y, key, eps, True, box, None)
  norm = check_choice(name, "norm", norm, NORMS)
  queries = check_int(name, "queries", queries)
  p_init = check_in(name, "p_init", p_init, 0.0, 1.0, True, False)
  active = check_active(name, active, x.shape[0])
  count_classes(name, apply_fn, params, x)
  params, x, y = detach(params, x, y)
  dtype, shape = x.dtype, x.shape
  img = _as_image(x.astype(work_dtype(dtype)), name)
  margin_of = lambda v: margin_loss(apply_fn(params, v.reshape(shape).astype(dtype)), y)
  init_key, loop_key = jax.random.split(key)
  stripes = jax.random.bernoulli(init_key, 0.5, (img.shape[0], 1, img.shape[2], img.shape[3]))
  stripes = jnp.where(stripes, 1.0, -1.0) * jnp.ones_like(img)
  if norm == "linf":
    x_best = clip_box(img + eps * stripes, box)
    candidate = _square_linf_candidate
  else:
    x_best = clip_box(img + eps * stripes / expand_to(lp_norm(stripes, "l2"), img), box)
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
    return (i + 1, jnp.where(expand_to(better, img), x_new, x_best),
            jnp.where(better, margin, margin_best))

  _, x_best, margin_best = lax.while_loop(searching, query, (jnp.int32(0), x_best, margin_best))
  return finish_attack(Best(x_best.reshape(shape), margin_best, margin_best <= 0), x, active)
