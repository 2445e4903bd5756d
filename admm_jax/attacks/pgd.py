"""Adversarial attacks for training and evaluation: PGD (Linf, L2) and FGSM.

Conventions shared by every attack here:

- `apply_fn(params, x) -> logits` maps a batch `x` of shape (B, ...) to logits of
  shape (B, C). Run the model in inference mode inside `apply_fn` (e.g. BatchNorm
  with running statistics): batch-coupled layers would make one example's
  perturbation depend on the others.
- `y` holds integer labels of shape (B,) for the default loss, the sum over the
  batch of softmax cross-entropy. Summing (not averaging) keeps per-example input
  gradients unscaled by 1/B. A custom `loss_fn(logits, y) -> scalar` replaces it
  (for instance a KL divergence to clean probabilities, with `y` of shape (B, C)).
- Inputs live in the box `box = (lo, hi)` ((0, 1) for unnormalized images; None
  for no box). Linf iterates are clipped once to the intersection of the ball
  and the box (its exact projection); L2 iterates are projected onto the ball,
  then clipped to the box, which keeps them in both when `x` is in the box.
- The attack hyper-parameters (`eps`, `step_size`, `steps`, `random_start`,
  `box`, `loss_fn`) are keyword-only Python values, checked at call time and
  static under `jax.jit`; close over them with `functools.partial`.
- Iterates are kept in at least float32 so that small steps are not rounded away
  for bfloat16 inputs; the model always sees `x.dtype`, and the result is cast
  back to `x.dtype`.
- The result carries no gradient (`lax.stop_gradient`), so it can be fed to a
  training loss; the parameters are also detached on the way in, so an outer
  `jax.grad` never differentiates through the attack loop.
- `key` is a `jax.random` key used only for the random start; it may be None
  when `random_start=False`.
- `x_init` (instead of a random start) gives the first iterate, projected onto
  the ball and the box; TRADES starts its KL attack from x + 0.001 * N(0, 1),
  because the KL to the clean prediction has a zero gradient at x itself.
"""
import math
from typing import Any, Callable

import jax
from jax import lax
import jax.numpy as jnp
import optax

ApplyFn = Callable[[Any, jax.Array], jax.Array]
LossFn = Callable[[jax.Array, jax.Array], jax.Array]
Box = tuple[float, float] | None

# Guards the L2 normalizations against zero gradients / zero perturbations.
_TINY = 1e-12


def _cross_entropy_sum(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Sum over the batch of softmax cross-entropy with integer labels.

  Args:
    logits: (B, C) logits.
    labels: (B,) integer labels.

  Returns:
    Scalar loss, computed in at least float32 so that the sign of small input
    gradients is not lost to low-precision logits.
  """
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  return optax.losses.softmax_cross_entropy_with_integer_labels(
      logits, labels).sum()


def _as_number(fn_name: str, arg: str, value: Any) -> float:
  """Returns `value` as a Python float, or raises a ValueError naming `arg`."""
  if isinstance(value, bool):
    raise ValueError(f"{fn_name}: {arg} must be a number, got {value!r}")
  try:
    number = float(value)
  except TypeError as e:  # Tracers raise ConcretizationTypeError, a TypeError.
    raise ValueError(
        f"{fn_name}: {arg} must be a concrete Python number (static under jit), "
        f"got {value!r}") from e
  if not math.isfinite(number):
    raise ValueError(f"{fn_name}: {arg} must be finite, got {value!r}")
  return number


def _check_common(fn_name: str, x: jax.Array, y: Any, key: Any, eps: Any,
                  random_start: bool, box: Any,
                  loss_fn: LossFn | None) -> tuple[float, Box]:
  """Validates the arguments every attack shares, before any tracing.

  Args:
    fn_name: name of the public attack, used in error messages.
    x: (B, ...) floating inputs.
    y: labels or targets with leading dimension B.
    key: PRNG key (may be None without a random start).
    eps: radius of the threat ball.
    random_start: whether a random start is requested.
    box: (lo, hi) or None.
    loss_fn: custom loss or None for the default cross-entropy.

  Returns:
    (eps, box) as Python floats.

  Raises:
    ValueError: with a sentence naming the offending argument and its value.
  """
  eps = _as_number(fn_name, "eps", eps)
  if eps < 0:
    raise ValueError(f"{fn_name}: eps must be >= 0, got {eps}")
  if box is not None:
    if not isinstance(box, (tuple, list)) or len(box) != 2:
      raise ValueError(f"{fn_name}: box must be a pair (lo, hi) or None, got {box!r}")
    lo = _as_number(fn_name, "box[0]", box[0])
    hi = _as_number(fn_name, "box[1]", box[1])
    if not lo < hi:
      raise ValueError(f"{fn_name}: box must satisfy lo < hi, got {box!r}")
    box = (lo, hi)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(
        f"{fn_name}: x must have a floating dtype (scale integer images to the box "
        f"first), got {x.dtype}")
  y_shape = jnp.shape(y)
  if x.ndim < 1 or len(y_shape) < 1 or x.shape[0] != y_shape[0]:
    raise ValueError(
        f"{fn_name}: x and y must share the leading (batch) dimension, got x.shape="
        f"{x.shape} and y.shape={y_shape}")
  if loss_fn is None:
    y_dtype = jnp.result_type(y)
    if len(y_shape) != 1 or not jnp.issubdtype(y_dtype, jnp.integer):
      raise ValueError(
          f"{fn_name}: the default loss needs integer labels of shape (B,), got "
          f"y.shape={y_shape} with dtype {y_dtype}; pass loss_fn for other targets")
  if random_start and key is None:
    raise ValueError(f"{fn_name}: random_start=True needs a PRNG key, got key=None")
  return eps, box


def _check_init(fn_name: str, x: jax.Array, x_init: Any,
                random_start: bool) -> jax.Array | None:
  """Returns `x_init` as an array shaped like x, or raises a ValueError naming it."""
  if x_init is None:
    return None
  if random_start:
    raise ValueError(
        f"{fn_name}: x_init replaces the random start; pass random_start=False with it")
  x_init = jnp.asarray(x_init)
  if x_init.shape != x.shape:
    raise ValueError(
        f"{fn_name}: x_init must have x's shape {x.shape}, got {x_init.shape}")
  return x_init


def _check_step_size(fn_name: str, step_size: Any) -> float:
  """Returns `step_size` as a float, or raises a ValueError unless it is > 0."""
  step_size = _as_number(fn_name, "step_size", step_size)
  if step_size <= 0:
    raise ValueError(f"{fn_name}: step_size must be > 0, got {step_size}")
  return step_size


def _check_steps(fn_name: str, steps: Any) -> int:
  """Returns `steps` as an int, or raises a ValueError unless it is an int >= 1."""
  if (isinstance(steps, bool) or not isinstance(steps, (int, jnp.integer))
      or steps < 1):
    raise ValueError(f"{fn_name}: steps must be a positive integer, got {steps!r}")
  return int(steps)


def _input_grad_fn(apply_fn: ApplyFn, params: Any, y: jax.Array,
                   loss_fn: LossFn | None, model_dtype: jnp.dtype,
                   fn_name: str) -> Callable[[jax.Array], jax.Array]:
  """Builds x_t -> grad_x loss(apply_fn(params, x_t), y), differentiating x only.

  Args:
    apply_fn: model, (params, (B, ...)) -> (B, C) logits.
    params: model parameters (already detached).
    y: labels or targets for `loss_fn`.
    loss_fn: (logits, y) -> scalar, or None for the summed cross-entropy.
    model_dtype: dtype the model is fed (the dtype of the clean inputs).
    fn_name: name of the public attack, used in error messages.

  Returns:
    A function from an iterate of shape (B, ...) to its input gradient, with
    the iterate's shape and dtype.
  """
  loss_fn = _cross_entropy_sum if loss_fn is None else loss_fn

  def loss_of_x(x_t: jax.Array) -> jax.Array:
    loss = loss_fn(apply_fn(params, x_t.astype(model_dtype)), y)
    if jnp.ndim(loss) != 0:  # Shapes are static: this runs once, at trace time.
      raise ValueError(
          f"{fn_name}: loss_fn must return a scalar, got shape {jnp.shape(loss)}")
    return loss

  return jax.grad(loss_of_x)


def _linf_bounds(x: jax.Array, eps: float,
                 box: Box) -> tuple[jax.Array, jax.Array]:
  """Per-coordinate bounds of the Linf ball around x intersected with the box.

  Clipping once to [lo, hi] equals clip_box(clip_ball(v)) exactly, also when x
  lies outside the box (then the box wins, as in the two-step form).

  Args:
    x: (B, ...) clean inputs in the working dtype.
    eps: ball radius.
    box: (lo, hi) or None.

  Returns:
    (lo, hi), each shaped like x.
  """
  lo, hi = x - eps, x + eps
  if box is not None:
    lo, hi = jnp.clip(lo, *box), jnp.clip(hi, *box)
  return lo, hi


def _clip_box(x: jax.Array, box: Box) -> jax.Array:
  """Clips x to the box, or returns it unchanged if box is None."""
  return x if box is None else jnp.clip(x, *box)


def _work_dtype(dtype: jnp.dtype) -> jnp.dtype:
  """At least float32: bfloat16 iterates would round small steps away."""
  return jnp.promote_types(dtype, jnp.float32)


def _detach(params: Any, x: jax.Array, y: Any) -> tuple[Any, jax.Array, Any]:
  """Stops gradients into the attack so an outer grad skips the whole loop."""
  return (jax.tree.map(lax.stop_gradient, params), lax.stop_gradient(x),
          jax.tree.map(lax.stop_gradient, y))


def _linf_attack(apply_fn: ApplyFn, params: Any, x: jax.Array, y: Any, key: Any,
                 *, eps: float, step_size: float, steps: int, random_start: bool,
                 box: Box, loss_fn: LossFn | None, fn_name: str,
                 x_init: jax.Array | None) -> jax.Array:
  """Signed-gradient ascent in the Linf ball; shared by pgd_linf and fgsm."""
  params, x, y = _detach(params, x, y)
  dtype = x.dtype
  x_clean = x.astype(_work_dtype(dtype))
  lo, hi = _linf_bounds(x_clean, eps, box)
  x_adv = x_clean
  if x_init is not None:
    x_adv = jnp.clip(lax.stop_gradient(x_init).astype(x_clean.dtype), lo, hi)
  elif random_start:
    noise = jax.random.uniform(key, x_clean.shape, x_clean.dtype, -eps, eps)
    x_adv = jnp.clip(x_clean + noise, lo, hi)
  grad_fn = _input_grad_fn(apply_fn, params, y, loss_fn, dtype, fn_name)

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
  eps, box = _check_common(name, x, y, key, eps, random_start, box, loss_fn)
  x_init = _check_init(name, x, x_init, random_start)
  step_size = _check_step_size(name, step_size)
  steps = _check_steps(name, steps)
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
  eps, box = _check_common(name, x, y, key, eps, random_start, box, loss_fn)
  x_init = _check_init(name, x, x_init, random_start)
  if step_size is None:
    step_size = 1.25 * eps if random_start else eps
    if step_size == 0:  # eps == 0: any positive step is projected away.
      step_size = 1.0
  step_size = _check_step_size(name, step_size)
  return _linf_attack(apply_fn, params, x, y, key, eps=eps, step_size=step_size,
                      steps=1, random_start=random_start, box=box,
                      loss_fn=loss_fn, fn_name=name, x_init=x_init)


def _l2_norms(v: jax.Array) -> jax.Array:
  """Per-example L2 norms of v, shape (B, 1, ..., 1) so they broadcast over v."""
  axes = tuple(range(1, v.ndim))
  return jnp.sqrt(jnp.sum(jnp.square(v), axis=axes, keepdims=True))


def _shrink_to_l2_ball(delta: jax.Array, eps: float) -> jax.Array:
  """Projects per-example perturbations onto the L2 ball of radius eps."""
  # Shrinks only deltas longer than eps; the max guards eps == 0.
  return delta * jnp.minimum(1.0, eps / jnp.maximum(_l2_norms(delta), _TINY))


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
  eps, box = _check_common(name, x, y, key, eps, random_start, box, loss_fn)
  x_init = _check_init(name, x, x_init, random_start)
  step_size = _check_step_size(name, step_size)
  steps = _check_steps(name, steps)
  params, x, y = _detach(params, x, y)
  dtype = x.dtype
  x_clean = x.astype(_work_dtype(dtype))
  x_adv = x_clean
  if x_init is not None:
    delta = lax.stop_gradient(x_init).astype(x_clean.dtype) - x_clean
    x_adv = _clip_box(x_clean + _shrink_to_l2_ball(delta, eps), box)
  elif random_start:
    dir_key, radius_key = jax.random.split(key)
    direction = jax.random.normal(dir_key, x_clean.shape, x_clean.dtype)
    direction = direction / jnp.maximum(_l2_norms(direction), _TINY)
    num_features = math.prod(x_clean.shape[1:])
    radius_shape = (x_clean.shape[0],) + (1,) * (x_clean.ndim - 1)
    radius = eps * jax.random.uniform(radius_key, radius_shape, x_clean.dtype) ** (
        1.0 / num_features)
    x_adv = _clip_box(x_clean + radius * direction, box)
  grad_fn = _input_grad_fn(apply_fn, params, y, loss_fn, dtype, name)

  def step(_, x_t):
    g = grad_fn(x_t)
    delta = x_t + step_size * g / jnp.maximum(_l2_norms(g), _TINY) - x_clean
    return _clip_box(x_clean + _shrink_to_l2_ball(delta, eps), box)

  x_adv = lax.fori_loop(0, steps, step, x_adv)
  return lax.stop_gradient(x_adv.astype(dtype))


# AutoAttack's members and their cascade live in admm_jax.autoattack, which builds on the
# helpers above; they are served from here too, imported on first use (an import at the top
# would be circular).
_AUTOATTACK_EXPORTS = ("ATTACK_NAMES", "STANDARD_NAMES", "NORMS", "APGD_LOSSES",
                       "CLEAN_MISCLASSIFIED", "NEVER_BROKEN", "CascadeResult", "apgd",
                       "apgd_checkpoints", "apgd_targeted", "autoattack", "by_name", "cascade",
                       "dlr_loss", "fab", "square", "targeted_dlr_loss")


def __getattr__(name: str) -> Any:
  if name in _AUTOATTACK_EXPORTS:
    from admm_jax import autoattack
    return getattr(autoattack, name)
  raise AttributeError(f"module 'admm_jax.attacks' has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(list(globals()) + list(_AUTOATTACK_EXPORTS))
