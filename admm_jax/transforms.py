"""optax transforms for ADMM pruning and masked retraining.

Compose them with any optax optimizer, model and training loop:

    tx = optax.chain(admm(spec, rho=1e-3, update_every=steps_per_admm_epoch, rho_growth=1.3),
                     optax.sgd(admm_lr_schedule(0.01, steps_per_admm_epoch), momentum=0.9))
    ...                                              # train; ADMM lives in the optimizer state
    params, masks = sparsity.hard_prune(params, spec)
    tx = optax.chain(optax.adamw(1e-3), apply_masks(masks))

`admm` goes FIRST in the chain: it edits the loss gradient (adds the penalty's gradient), so
the optimizer that follows sees the gradient of the augmented Lagrangian. `apply_masks` goes
LAST: it edits the final update, so nothing placed before it (momentum, weight decay,
schedules, MultiSteps) can move a pruned weight. For k-bit rules `keep_on_grid` follows it
and keeps the weights on their grids (a straight-through estimator):

    tx = optax.chain(optax.adam(1e-3), apply_masks(masks), keep_on_grid(spec, masks))
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from admm_jax import quantization, sparsity

Params = Any


class ADMMState(NamedTuple):
  """ADMM variables kept in the optimizer state, so that checkpoints and sharding get them free."""
  count: jax.Array   # int32: update calls seen
  rho: jax.Array     # float32: current penalty weight (grows by rho_growth at each Z/U update)
  z: optax.Params    # projected copy of each pruned leaf (optax.MaskedNode for unpruned leaves)
  u: optax.Params    # scaled dual variable of each pruned leaf (MaskedNode for unpruned leaves)


class ApplyMasksState(NamedTuple):
  """The keep-masks, kept in the optimizer state so that they are saved and sharded like params."""
  masks: optax.Params  # bool array per pruned leaf, optax.MaskedNode elsewhere


def _is_node_leaf(x: Any) -> bool:
  return x is None or isinstance(x, (sparsity.Rule, optax.MaskedNode))


def _check_params(params: Params, where: str) -> None:
  if params is None:
    raise ValueError(f"{where} needs the current params: call update(grads, state, params) "
                     "(optax.chain passes them through; pass params= to the chain's update).")


def admm(spec: sparsity.SparsitySpec | dict, *, rho: float, update_every: int,
         rho_growth: float = 1.0) -> optax.GradientTransformation:
  """ADMM for pruning: adds rho (W - Z + U) to the gradient of every pruned leaf.

  The augmented Lagrangian is f(W) + sum_i rho/2 ||W_i - Z_i + U_i||^2 with Z_i constrained
  to the sparsity set of leaf i. This transform adds the penalty's gradient to the incoming
  (loss) gradient and performs the Z- and U-steps itself.

  init(params): Z = Proj(W), U = 0, count = 0. A global spec entry's leaves are projected
  jointly (`sparsity.project_all`): Z holds their largest weights across all of them.
  update(grads, state, params): if the incoming count is a positive multiple of
  `update_every`, first rho *= rho_growth, Z = Proj(W + U), U = U + W - Z with W = params
  (the latest weights); then grads += rho (W - Z + U) on pruned leaves; count += 1.
  The scaled dual U is not rescaled when rho grows (as in the reference recipe).

  Args:
    spec: a `sparsity.spec` (or the mapping it takes) naming the pruned leaves.
    rho: initial penalty weight, > 0.
    update_every: Z/U update period in update calls (e.g. steps per ADMM epoch times epochs).
    rho_growth: factor applied to rho at each Z/U update (the reference "multi rho": 1.3).

  Returns:
    An optax.GradientTransformation whose state is `ADMMState`; it requires params.
  """
  spec = sparsity.spec(spec)
  if not rho > 0:
    raise ValueError(f"admm: rho must be > 0, got {rho!r}.")
  if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
    raise ValueError(f"admm: update_every must be a positive integer (update calls between "
                     f"Z/U updates), got {update_every!r}.")
  if not rho_growth > 0:
    raise ValueError(f"admm: rho_growth must be > 0 (1.0 keeps rho fixed), got {rho_growth!r}.")

  def init_fn(params):
    _check_params(params, "admm.init")
    rules = sparsity.rules_tree(params, spec)
    z = sparsity.project_all(rules, params, default=lambda _: optax.MaskedNode())
    u = sparsity.map_pruned(lambda r, w: jnp.zeros_like(w), rules, params,
                            default=lambda _: optax.MaskedNode())
    return ADMMState(count=jnp.zeros([], jnp.int32), rho=jnp.asarray(rho, jnp.float32), z=z, u=u)

  def update_fn(updates, state, params=None):
    _check_params(params, "admm.update")
    rules = sparsity.rules_tree(params, spec)

    do_zu = (state.count > 0) & (state.count % update_every == 0)
    # lax.cond: the projections (the costly part) run only on Z/U steps.
    z, u = jax.lax.cond(do_zu, lambda zu: zu_update(rules, params, zu[1]), lambda zu: zu,
                        (state.z, state.u))
    new_rho = jnp.where(do_zu, state.rho * rho_growth, state.rho)

    def add_penalty(zz, g, w, uu):
      if isinstance(zz, optax.MaskedNode):
        return g
      return (g + new_rho * (w - zz + uu)).astype(g.dtype)

    updates = jax.tree.map(add_penalty, z, updates, params, u, is_leaf=_is_node_leaf)
    return updates, ADMMState(optax.safe_int32_increment(state.count), new_rho, z, u)

  return optax.GradientTransformation(init_fn, update_fn)


def zu_update(rules: Params, params: Params, u: Params) -> tuple[Params, Params]:
  """The ADMM Z- and U-steps: Z = Proj(W + U), U = U + W - Z, on every pruned leaf.

  Args:
    rules: `sparsity.rules_tree(params, spec)`: a `sparsity.Rule` per pruned leaf, else None.
    params: the weights W.
    u: the scaled duals U (any value on unpruned leaves, e.g. optax.MaskedNode).

  Returns:
    (Z, U): new pytrees like params, with optax.MaskedNode on the unpruned leaves.
  """
  masked = lambda *_: optax.MaskedNode()
  # W + U on the pruned leaves, W elsewhere: one tree, so that global rules project jointly.
  wu = sparsity.map_pruned(lambda r, w, uu: w + uu, rules, params, u, default=lambda w, _: w)
  z = sparsity.project_all(rules, wu, default=masked)
  u = sparsity.map_pruned(lambda r, w, uu, zz: uu + w - zz, rules, params, u, z, default=masked)
  return z, u


def _pruned_pairs(state: ADMMState, params: Params):
  """(path, W, Z, U) for every pruned leaf."""
  out = []
  flat_z = jax.tree_util.tree_leaves_with_path(state.z, is_leaf=_is_node_leaf)
  flat_w = jax.tree.leaves(params)
  flat_u = jax.tree.leaves(state.u, is_leaf=_is_node_leaf)
  for (path, z), w, u in zip(flat_z, flat_w, flat_u):
    if not isinstance(z, optax.MaskedNode):
      out.append((sparsity.path_str(path), w, z, u))
  return out


def primal_residuals(state: ADMMState, params: Params, relative: bool = False
                     ) -> dict[str, jax.Array]:
  """{path: ||W - Z||_F} per pruned leaf: goes to 0 as ADMM converges onto the sparsity set.

  With relative=True, ||W - Z||_F / ||W||_F: comparable across layers and models.
  """
  norm = sparsity.frobenius_norm
  return {p: norm(w - z) / norm(w) if relative else norm(w - z)
          for p, w, z, _ in _pruned_pairs(state, params)}


def admm_penalty(state: ADMMState, params: Params) -> jax.Array:
  """sum_i rho/2 ||W_i - Z_i + U_i||^2: the augmented-Lagrangian term, for logging."""
  total = sum(jnp.sum(jnp.square((w - z + u).astype(jnp.float32)))
              for _, w, z, u in _pruned_pairs(state, params))
  return 0.5 * state.rho * total


def find_admm_state(opt_state: Any) -> ADMMState | None:
  """The first `ADMMState` inside an optimizer state (e.g. of an optax.chain), or None."""
  found = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, ADMMState))
  return next((x for x in found if isinstance(x, ADMMState)), None)


def apply_masks(masks: Params) -> optax.GradientTransformation:
  """Keeps pruned weights exactly 0.0: place it last in an optax chain.

  Args:
    masks: the params' structure with a bool keep-mask for every pruned leaf and None for the
      others (as returned by `sparsity.hard_prune`).

  Returns:
    A transform that sets the update of every pruned weight to -W (0 when W is already 0), so
    that ``optax.apply_updates`` lands exactly on 0.0 whatever came before in the chain.
    Without params it zeroes those updates (already-zero weights stay zero).
  """
  stored = jax.tree.map(lambda m: optax.MaskedNode() if m is None else jnp.asarray(m, bool),
                        masks, is_leaf=lambda x: x is None)

  def init_fn(params):
    if params is not None:
      _check_mask_structure(stored, params)
    return ApplyMasksState(stored)

  def update_fn(updates, state, params=None):
    def one(m, u, *w):
      if isinstance(m, optax.MaskedNode):
        return u
      return jnp.where(m, u, -w[0] if w else jnp.zeros_like(u)).astype(u.dtype)
    trees = (updates,) if params is None else (updates, params)
    return jax.tree.map(one, state.masks, *trees, is_leaf=_is_node_leaf), state

  return optax.GradientTransformation(init_fn, update_fn)


class KeepOnGridState(NamedTuple):
  """The float weights behind the quantized ones (straight-through training)."""
  latent: optax.Params  # float copy of every k-bit leaf (optax.MaskedNode for the others)


def keep_on_grid(spec: sparsity.SparsitySpec | dict, masks: Params | None = None
                 ) -> optax.GradientTransformation:
  """Keeps every leaf with a k-bit rule on its grid: quantization-aware training with a
  straight-through estimator, as an optax transform; place it last (after `apply_masks`).

  The state holds float "latent" weights L (init: the params). Each update adds the incoming
  update to L and returns the update that lands the params exactly on Q(L): its grid point,
  `quantization.fit(L)` with the rule's bits and scale mode, the scale refitted each step
  (a local optimum, see `quantization`). The loss is evaluated at Q(L), and its gradient
  moves L as if Q were the identity: that is the straight-through estimator, with no custom
  gradient in the model. With `masks` (as from `sparsity.hard_prune`) L is kept 0 outside
  them, so pruned weights stay exactly 0; inside them a weight may round to 0 and back.

  Args:
    spec: the sparsity spec; its rules with bits name the quantized leaves.
    masks: optional keep-masks (params structure, None for leaves without one).

  Returns:
    An optax.GradientTransformation whose state is `KeepOnGridState`; it requires params.
  """
  spec = sparsity.spec(spec)

  def quantized_rules(params):
    rules = sparsity.rules_tree(params, spec)
    return jax.tree.map(lambda r: r if r is not None and r.bits is not None else None, rules,
                        is_leaf=_is_node_leaf)

  def masks_like(params):
    if masks is None:
      return jax.tree.map(lambda _: None, params)
    return masks

  def init_fn(params):
    _check_params(params, "keep_on_grid.init")
    # A copy: the params' own buffer would be donated twice by a training step.
    latent = sparsity.map_pruned(lambda r, w: jnp.copy(w), quantized_rules(params), params,
                                 default=lambda _: optax.MaskedNode())
    return KeepOnGridState(latent)

  def update_fn(updates, state, params=None):
    _check_params(params, "keep_on_grid.update")
    rules = quantized_rules(params)

    def one(rule, u, w, lat, m):
      lat = lat + u.astype(lat.dtype)
      if m is not None:
        lat = jnp.where(m, lat, jnp.zeros((), lat.dtype))
      c, s = quantization.fit(lat, rule.bits, rule.scale_mode)
      return ((c * s).astype(w.dtype) - w).astype(u.dtype), lat

    pairs = jax.tree.map(
        lambda r, u, w, lat, m: (u, lat) if r is None else one(r, u, w, lat, m),
        rules, updates, params, state.latent, masks_like(params),
        is_leaf=lambda x: x is None or isinstance(x, (sparsity.Rule, optax.MaskedNode)))
    is_pair = lambda x: isinstance(x, tuple)
    new_updates = jax.tree.map(lambda p: p[0], pairs, is_leaf=is_pair)
    latent = jax.tree.map(lambda p: p[1], pairs, is_leaf=is_pair)
    return new_updates, KeepOnGridState(latent)

  return optax.GradientTransformation(init_fn, update_fn)


def _check_mask_structure(stored: Params, params: Params) -> None:
  hint = ("apply_masks: masks must have the params' structure, a bool mask of the leaf's shape "
          "per pruned leaf and None elsewhere (as returned by sparsity.hard_prune)")
  try:
    pairs = jax.tree.leaves(
        jax.tree.map(lambda m, w: (m, w), stored, params, is_leaf=_is_node_leaf),
        is_leaf=lambda x: isinstance(x, tuple))
  except ValueError as e:
    raise ValueError(f"{hint}; structure differs: {e}") from None
  for m, w in pairs:
    if not isinstance(m, optax.MaskedNode) and m.shape != w.shape:
      raise ValueError(f"{hint}; a mask of shape {m.shape} stands for a leaf of shape {w.shape}.")


def admm_lr_schedule(base_lr: float, update_every: int, drops_per_cycle: int = 3,
                     factor: float = 0.1) -> optax.Schedule:
  """The reference ADMM learning rate: restart at `base_lr` at each Z/U update, then multiply
  by `factor` every update_every // drops_per_cycle steps (10x drops every admm_epoch/3 epochs).
  """
  if update_every < 1 or drops_per_cycle < 1:
    raise ValueError("admm_lr_schedule: update_every and drops_per_cycle must be >= 1, got "
                     f"{update_every} and {drops_per_cycle}.")
  period = max(update_every // drops_per_cycle, 1)

  def schedule(count):
    drops = (jnp.asarray(count) % update_every) // period
    return base_lr * jnp.power(factor, drops.astype(jnp.float32))

  return schedule
