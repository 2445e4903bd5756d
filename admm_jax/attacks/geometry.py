"""What every attack shares: the calling convention, argument checks, the ball and box
geometry, per-example losses and the keep-the-best bookkeeping.

Conventions shared by every attack of `admm_jax.attacks`:

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
  `norm` is "linf" or "l2".
- The attack hyper-parameters are keyword-only Python values, checked at call time and
  static under `jax.jit`; close over them with `functools.partial`.
- Iterates are kept in at least float32 so that small steps are not rounded away
  for bfloat16 inputs; the model always sees `x.dtype`, and the result is cast
  back to `x.dtype`.
- The result carries no gradient (`lax.stop_gradient`), so it can be fed to a
  training loss; the parameters are also detached on the way in, so an outer
  `jax.grad` never differentiates through the attack loop.
- `key` is a `jax.random` key (the random start and searches): the same key, batch and model
  give the same result; it may be None for PGD/FGSM when `random_start=False`.
- `active` (bool[B], AutoAttack's members): examples that need no attack are returned as `x`.
"""
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
from jax import lax
import jax.numpy as jnp
import optax


ApplyFn = Callable[[Any, jax.Array], jax.Array]
LossFn = Callable[[jax.Array, jax.Array], jax.Array]
Box = tuple[float, float] | None

# Guards the L2 normalizations against zero gradients / zero perturbations.
TINY = 1e-12


def cross_entropy_sum(logits: jax.Array, labels: jax.Array) -> jax.Array:
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


def as_number(fn_name: str, arg: str, value: Any) -> float:
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


def check_common(fn_name: str, x: jax.Array, y: Any, key: Any, eps: Any,
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
  eps = as_number(fn_name, "eps", eps)
  if eps < 0:
    raise ValueError(f"{fn_name}: eps must be >= 0, got {eps}")
  if box is not None:
    if not isinstance(box, (tuple, list)) or len(box) != 2:
      raise ValueError(f"{fn_name}: box must be a pair (lo, hi) or None, got {box!r}")
    lo = as_number(fn_name, "box[0]", box[0])
    hi = as_number(fn_name, "box[1]", box[1])
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


def check_init(fn_name: str, x: jax.Array, x_init: Any,
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


def check_step_size(fn_name: str, step_size: Any) -> float:
  """Returns `step_size` as a float, or raises a ValueError unless it is > 0."""
  step_size = as_number(fn_name, "step_size", step_size)
  if step_size <= 0:
    raise ValueError(f"{fn_name}: step_size must be > 0, got {step_size}")
  return step_size


def check_steps(fn_name: str, steps: Any) -> int:
  """Returns `steps` as an int, or raises a ValueError unless it is an int >= 1."""
  if (isinstance(steps, bool) or not isinstance(steps, (int, jnp.integer))
      or steps < 1):
    raise ValueError(f"{fn_name}: steps must be a positive integer, got {steps!r}")
  return int(steps)


def input_grad_fn(apply_fn: ApplyFn, params: Any, y: jax.Array,
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
  loss_fn = cross_entropy_sum if loss_fn is None else loss_fn

  def loss_of_x(x_t: jax.Array) -> jax.Array:
    loss = loss_fn(apply_fn(params, x_t.astype(model_dtype)), y)
    if jnp.ndim(loss) != 0:  # Shapes are static: this runs once, at trace time.
      raise ValueError(
          f"{fn_name}: loss_fn must return a scalar, got shape {jnp.shape(loss)}")
    return loss

  return jax.grad(loss_of_x)


def linf_bounds(x: jax.Array, eps: float,
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


def clip_box(x: jax.Array, box: Box) -> jax.Array:
  """Clips x to the box, or returns it unchanged if box is None."""
  return x if box is None else jnp.clip(x, *box)


def work_dtype(dtype: jnp.dtype) -> jnp.dtype:
  """At least float32: bfloat16 iterates would round small steps away."""
  return jnp.promote_types(dtype, jnp.float32)


def detach(params: Any, x: jax.Array, y: Any) -> tuple[Any, jax.Array, Any]:
  """Stops gradients into the attack so an outer grad skips the whole loop."""
  return (jax.tree.map(lax.stop_gradient, params), lax.stop_gradient(x),
          jax.tree.map(lax.stop_gradient, y))


def l2_norms(v: jax.Array) -> jax.Array:
  """Per-example L2 norms of v, shape (B, 1, ..., 1) so they broadcast over v."""
  axes = tuple(range(1, v.ndim))
  return jnp.sqrt(jnp.sum(jnp.square(v), axis=axes, keepdims=True))


def shrink_to_l2_ball(delta: jax.Array, eps: float) -> jax.Array:
  """Projects per-example perturbations onto the L2 ball of radius eps."""
  # Shrinks only deltas longer than eps; the max guards eps == 0.
  return delta * jnp.minimum(1.0, eps / jnp.maximum(l2_norms(delta), TINY))

NORMS = ("linf", "l2")
# Points are computed in float32: x + eps, rescaled L2 perturbations and the distance itself
# can land an ulp above eps.
BALL_SLACK = 1e-5


# --- Losses --------------------------------------------------------------------------------


def class_logit(logits: jax.Array, cls: jax.Array) -> jax.Array:
  """logits[b, cls[b]] for every b."""
  return jnp.take_along_axis(logits, cls[:, None].astype(jnp.int32), axis=-1)[:, 0]


def max_other_logit(logits: jax.Array, y: jax.Array) -> jax.Array:
  """max over j != y[b] of logits[b, j] (ties between classes are handled exactly)."""
  is_label = jax.nn.one_hot(y, logits.shape[-1], dtype=bool)
  return jnp.max(jnp.where(is_label, -jnp.inf, logits), axis=-1)


def check_classes(fn_name: str, logits_shape: tuple[int, ...], minimum: int) -> None:
  if len(logits_shape) != 2 or logits_shape[-1] < minimum:
    raise ValueError(f"{fn_name} needs logits of shape (B, C) with at least {minimum} classes, "
                     f"got shape {logits_shape}")


def cross_entropy(logits: jax.Array, y: jax.Array) -> jax.Array:
  """(B,) softmax cross-entropy in at least float32."""
  z = logits.astype(work_dtype(logits.dtype))
  return optax.losses.softmax_cross_entropy_with_integer_labels(z, y)


def margin_loss(logits: jax.Array, y: jax.Array) -> jax.Array:
  """(B,) z_y - max_{j != y} z_j: positive while correctly classified."""
  z = logits.astype(work_dtype(logits.dtype))
  return class_logit(z, y) - max_other_logit(z, y)


# --- Argument checks -----------------------------------------------------------------------


def check_choice(fn_name: str, arg: str, value: Any, choices: Sequence[str]) -> str:
  if value not in choices:
    raise ValueError(f"{fn_name}: {arg} must be one of {', '.join(map(repr, choices))}, "
                     f"got {value!r}")
  return value


def check_int(fn_name: str, arg: str, value: Any, minimum: int = 1) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, jnp.integer)) or value < minimum:
    raise ValueError(f"{fn_name}: {arg} must be an integer >= {minimum}, got {value!r}")
  return int(value)


def check_in(fn_name: str, arg: str, value: Any, lo: float, hi: float,
              lo_open: bool, hi_open: bool) -> float:
  """`value` as a float in the interval (lo or [lo, hi] or hi), or a ValueError naming it."""
  value = as_number(fn_name, arg, value)
  if (value < lo or (lo_open and value == lo)) or (value > hi or (hi_open and value == hi)):
    interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    raise ValueError(f"{fn_name}: {arg} must be in {interval}, got {value}")
  return value


def check_active(fn_name: str, active: Any, batch: int) -> jax.Array:
  if active is None:
    return jnp.ones((batch,), bool)
  if jnp.shape(active) != (batch,) or jnp.result_type(active) != jnp.bool_:
    raise ValueError(f"{fn_name}: active must be a bool array of shape ({batch},), got "
                     f"{jnp.result_type(active)} of shape {jnp.shape(active)}")
  return jnp.asarray(active)


def count_classes(fn_name: str, apply_fn: ApplyFn, params: Any, x: jax.Array) -> int:
  shape = jax.eval_shape(apply_fn, params, x).shape
  check_classes(fn_name, shape, 2)
  return shape[-1]


def check_targets(fn_name: str, num_targets: Any, num_classes: int) -> int:
  num_targets = check_int(fn_name, "num_targets", num_targets)
  if num_targets > num_classes - 1:
    raise ValueError(f"{fn_name}: num_targets={num_targets} exceeds the {num_classes - 1} "
                     f"classes other than the label; use at most {num_classes - 1}")
  return num_targets


# --- Geometry: norms, balls, random starts -------------------------------------------------


def expand_to(v: jax.Array, like: jax.Array) -> jax.Array:
  """Reshapes per-example values (B,) to (B, 1, ..., 1) to broadcast against `like`."""
  return v.reshape(v.shape + (1,) * (like.ndim - 1))


def lp_norm(v: jax.Array, norm: str) -> jax.Array:
  """(B,) per-example Linf or L2 norms."""
  flat = v.reshape(v.shape[0], -1)
  if norm == "linf":
    return jnp.max(jnp.abs(flat), axis=1)
  return jnp.sqrt(jnp.sum(jnp.square(flat), axis=1))


def lp_normalize(v: jax.Array, norm: str) -> jax.Array:
  """The ascent direction of unit norm: sign(v) for Linf, v / ||v||_2 for L2."""
  if norm == "linf":
    return jnp.sign(v)
  return v / expand_to(jnp.maximum(lp_norm(v, "l2"), TINY), v)


def in_ball(x_adv: jax.Array, x: jax.Array, eps: float, norm: str) -> jax.Array:
  """(B,) whether x_adv is within eps of x, up to float32 rounding."""
  dist = lp_norm(x_adv.astype(jnp.float32) - x.astype(jnp.float32), norm)
  return dist <= eps * (1 + BALL_SLACK)


def projector(x: jax.Array, eps: float, norm: str, box: Box) -> Callable[[jax.Array], jax.Array]:
  """v -> its projection onto the eps-ball around x, then onto the box.

  Linf: one clip to the ball-box intersection (exact). L2: rescale the perturbation to norm
  eps when longer, then clip to the box (which only shortens it, x being in the box).
  """
  if norm == "linf":
    lo, hi = linf_bounds(x, eps, box)
    return lambda v: jnp.clip(v, lo, hi)

  def project_l2(v):
    delta = v - x
    scale = jnp.minimum(1.0, eps / jnp.maximum(lp_norm(delta, "l2"), TINY))
    return clip_box(x + delta * expand_to(scale, delta), box)

  return project_l2


def random_start_in_ball(key: jax.Array, x: jax.Array, eps: float, norm: str) -> jax.Array:
  """A random point on the eps-sphere around x (before the box clip), as APGD starts."""
  if norm == "linf":
    t = jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0)
  else:
    t = jax.random.normal(key, x.shape, x.dtype)
  return x + eps * t / expand_to(jnp.maximum(lp_norm(t, norm), TINY), t)


def predicts(apply_fn: ApplyFn, params: Any, x_t: jax.Array, y: jax.Array,
              model_dtype: jnp.dtype) -> jax.Array:
  """(B,) whether the model still predicts y at x_t."""
  return jnp.argmax(apply_fn(params, x_t.astype(model_dtype)), axis=-1) == y


def ranked_targets(logits: jax.Array, y: jax.Array, num_targets: int) -> jax.Array:
  """(B, num_targets) the classes other than y, by decreasing clean logit (APGD-T, FAB-T)."""
  others = jnp.where(jax.nn.one_hot(y, logits.shape[-1], dtype=bool), -jnp.inf,
                     logits.astype(jnp.float32))
  return lax.top_k(others, num_targets)[1]


class Best(NamedTuple):
  """What an attack keeps per example across restarts and targets."""
  x: jax.Array        # (B, ...) the returned point: first misclassified one, else best loss
  loss: jax.Array     # (B,) the loss at x (for FAB: the norm of x - x_clean)
  broken: jax.Array   # (B,) bool, x is misclassified (within eps)


def merge_best(old: Best, new: Best, higher_is_better: bool = True) -> Best:
  """Keeps an old break; else a new break; else the better loss."""
  better = new.loss > old.loss if higher_is_better else new.loss < old.loss
  take = ~old.broken & (new.broken | better)
  return Best(jnp.where(expand_to(take, old.x), new.x, old.x), jnp.where(take, new.loss, old.loss),
               old.broken | new.broken)


def skip_unless_needed(need: jax.Array, run, best: Best) -> Best:
  """Runs `run(best) -> Best` only if some example still needs it (a scalar lax.cond)."""
  return lax.cond(jnp.any(need), run, lambda b: b, best)


def finish_attack(best: Best, x: jax.Array, active: jax.Array) -> jax.Array:
  """The returned batch: the attack's points where active, x elsewhere, in x's dtype."""
  x_out = jnp.where(expand_to(active, x), best.x.astype(x.dtype), x)
  return lax.stop_gradient(x_out)
