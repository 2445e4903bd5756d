"""AutoAttack's cascade: each member attacks what the earlier ones left standing, and the
registry of attacks by name (`by_name`, `ATTACK_NAMES`) that the configs, the trainer and
`python -m admm_jax.evaluate` read. Conventions: `admm_jax.attacks.geometry`.

An example is *broken* when its returned point is misclassified (`argmax != y`) and within
eps of `x`; every returned point is within eps of `x` and inside the box.
"""
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
from jax import lax
import jax.numpy as jnp

from admm_jax.attacks.apgd import apgd, apgd_targeted
from admm_jax.attacks.fab import fab
from admm_jax.attacks.geometry import (ApplyFn, Box, NORMS, TINY, check_active, check_choice,
                                       check_common, check_in, count_classes, detach, expand_to,
                                       in_ball, predicts)
from admm_jax.attacks.pgd import fgsm, pgd_l2, pgd_linf
from admm_jax.attacks.square import square


ATTACK_NAMES = ("pgd", "fgsm", "apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square")
STANDARD_NAMES = ("apgd-ce", "apgd-t", "fab-t", "square")
# broken_by codes of examples that no member broke.
CLEAN_MISCLASSIFIED = -1
NEVER_BROKEN = -2


# --- Names and the cascade -----------------------------------------------------------------


AttackFn = Callable[..., jax.Array]


def _fgsm_any_norm(apply_fn, params, x, y, key, *, eps, norm, box, active):
  """FGSM from x (Linf, step eps) or its L2 twin (one normalised-gradient step of length eps)."""
  del key
  if norm == "linf":
    x_adv = fgsm(apply_fn, params, x, y, None, eps=eps, random_start=False, box=box)
  else:
    x_adv = pgd_l2(apply_fn, params, x, y, None, eps=eps, step_size=max(eps, TINY), steps=1,
                   random_start=False, box=box)
  return jnp.where(expand_to(active, x_adv), x_adv, x)


def _pgd_any_norm(apply_fn, params, x, y, key, *, eps, norm, box, active):
  """PGD-10 with a random start and step eps / 4 (2.5 eps of travel), Linf or L2."""
  fn = pgd_linf if norm == "linf" else pgd_l2
  x_adv = fn(apply_fn, params, x, y, key, eps=eps, step_size=max(eps / 4, TINY), steps=10,
             box=box)
  return jnp.where(expand_to(active, x_adv), x_adv, x)


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
      classes = count_classes(name, apply_fn, params, jnp.asarray(x))
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
    eps = check_in(name, "eps", eps, 0.0, math.inf, False, True)
    norm = check_choice(name, "norm", norm, NORMS)
    active = check_active(name, active, x.shape[0])
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
  eps, box = check_common("cascade", x, y, key, eps, True, box, None)
  norm = check_choice("cascade", "norm", norm, NORMS)
  params, x, y = detach(params, x, y)
  clean_correct = predicts(apply_fn, params, x, y, x.dtype)
  robust = clean_correct
  broken_by = jnp.where(clean_correct, NEVER_BROKEN, CLEAN_MISCLASSIFIED).astype(jnp.int32)
  robust_after = []
  for i, member in enumerate(members):
    k = jax.random.fold_in(key, i)
    x_adv = lax.cond(jnp.any(robust),
                     lambda r, k=k, member=member: member(apply_fn, params, x, y, k, eps=eps,
                                                          norm=norm, box=box, active=r),
                     lambda r: x, robust)
    broken = robust & ~predicts(apply_fn, params, x_adv, y, x.dtype) & in_ball(
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
