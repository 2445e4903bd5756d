"""Learned masks (HYDRA, Sehwag et al. 2020): the mask is the top-k of trained scores.

Every pruned leaf gets a score per group of its rule (`projections`): per weight for
"irregular" and N:M kinds (the leaf's shape), per output channel for "filter" ((cout,)), per
row of the flattened leading axes for "column". The mask keeps, for each spec entry, the
groups of largest |score|: per leaf with that leaf's ratio, or across all the leaves of a
global entry (`sparsity.masks_from_group_scores`), with the projections' rounding and ties.
The model runs on W * mask(S); the weights are frozen while the scores train, and the
gradient reaches the scores straight through the top-k:

    d loss / d s_g = sign(s_g) * sum_{i in group g} (d loss / d (masked w_i)) * w_i

(as if the mask were |s| itself: HYDRA's estimator, which ranks |s| too). Then the masked
weights are fine-tuned as after hard pruning (`transforms.apply_masks`).

    s = scores.init(params, spec)                     # HYDRA's scaled magnitude init
    loss_of_scores = lambda s: loss(scores.apply(params, s, spec))   # differentiable in s
    # or inside any optax loop: the weights frozen in the state, the scores trained by `tx`
    tx = scores.train_scores(spec, params, s, optax.adam(1e-2))

Starting from an ADMM run's output (admm -> scores -> retrain) is `init` on that output: its
weights' magnitudes, where ADMM has already pushed the pruned ones towards zero.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from admm_jax import projections, sparsity

Params = Any


def _per_weight(rule: sparsity.Rule) -> bool:
  return rule.kind == "irregular" or projections.parse_n_m(rule.kind) is not None


def score_shape(shape: tuple[int, ...], rule: sparsity.Rule) -> tuple[int, ...]:
  """The shape of a leaf's scores: the leaf's for per-weight kinds, (num_groups,) otherwise."""
  return tuple(shape) if _per_weight(rule) else (projections.num_groups(shape, rule.kind),)


def _magnitudes(rule: sparsity.Rule, w: jax.Array) -> jax.Array:
  if _per_weight(rule):
    return jnp.abs(jnp.asarray(w, jnp.float32))
  return jnp.sqrt(projections.group_sq_norms(w, rule.kind))


def check(rules: Params) -> None:
  """Raises ValueError when the rules cannot give a learned mask: k-bit rules (a learned mask
  is float) or nothing pruned at all (every ratio 0)."""
  flat = [r for r in jax.tree.leaves(rules, is_leaf=lambda x: x is None
                                     or isinstance(x, sparsity.Rule)) if r is not None]
  for r in flat:
    if r.bits is not None:
      raise ValueError(f"learned masks are float: the spec's {r.bits}-bit rule has no learned "
                       "counterpart; drop its bits.")
  if all(r.ratio == 0.0 for r in flat):
    raise ValueError("the sparsity spec prunes nothing (every ratio is 0): learned scores need "
                     "a ratio above 0 to choose what to remove.")


def init(params: Params, spec: sparsity.SparsitySpec | dict) -> Params:
  """HYDRA's scaled init: scores = |group| / max |group| over the rule's scope (the leaf, or
  all the leaves of a global entry), so the first mask is the magnitude projection of
  `params` (`sparsity.masks`). Runs eagerly: it checks the weights.

  Args:
    params: the weights to start from (a pretrained or an ADMM-trained model).
    spec: the sparsity spec.

  Returns:
    A tree like params: float32 scores of `score_shape` for every pruned leaf, None elsewhere.

  Raises:
    ValueError: a pruned leaf with no nonzero weight (nothing to rank), or `check`'s errors.
  """
  rules = sparsity.rules_tree(params, spec)
  check(rules)
  mags = sparsity.map_pruned(_magnitudes, rules, params)
  top: dict[str, float] = {}
  for (path, m), r in zip(jax.tree_util.tree_leaves_with_path(mags),
                          [r for r in jax.tree.leaves(rules, is_leaf=_is_rule_leaf)
                           if r is not None]):
    peak = float(np.max(np.asarray(m), initial=0.0))
    if peak == 0.0:
      raise ValueError(f"parameter {sparsity.path_str(path)!r} has no nonzero weight: learned "
                       "scores start from the weights' magnitudes; prune it with a fixed rule "
                       "or start from trained weights.")
    scope = r.shared or sparsity.path_str(path)
    top[scope] = max(top.get(scope, 0.0), peak)
  flat_rules = jax.tree.structure(params).flatten_up_to(rules)
  flat_mags = jax.tree.structure(params).flatten_up_to(mags)
  paths = sparsity.leaf_paths(params)
  out = [None if r is None else m / top[r.shared or p]
         for r, m, p in zip(flat_rules, flat_mags, paths)]
  return jax.tree.unflatten(jax.tree.structure(params), out)


def _is_rule_leaf(x: Any) -> bool:
  return x is None or isinstance(x, sparsity.Rule)


def masks(params: Params, score_tree: Params, spec: sparsity.SparsitySpec | dict) -> Params:
  """The learned keep-masks: each entry's top-k groups by |score| (None for unpruned leaves)."""
  rules = sparsity.rules_tree(params, spec)
  importance = sparsity.map_pruned(lambda r, s: jnp.abs(jnp.asarray(s, jnp.float32)), rules,
                                   score_tree)
  return sparsity.masks_from_group_scores(rules, params, importance)


def apply(params: Params, score_tree: Params, spec: sparsity.SparsitySpec | dict) -> Params:
  """W * mask(S) on every pruned leaf (W elsewhere), differentiable in S straight through the
  top-k (module docstring): the forward value is exactly the masked weights.

  Args:
    params: the (frozen) weights W.
    score_tree: scores as from `init`.
    spec: the sparsity spec.
  """
  rules = sparsity.rules_tree(params, spec)
  importance = sparsity.map_pruned(lambda r, s: jnp.abs(jnp.asarray(s, jnp.float32)), rules,
                                   score_tree)
  keep = sparsity.masks_from_group_scores(rules, params, lax.stop_gradient(importance))

  def one(rule, w, a, m):
    through = a - lax.stop_gradient(a)   # 0.0 forward, the identity backward
    if not _per_weight(rule):
      through = projections.groups_to_mask(through, tuple(w.shape), rule.kind)
    return w * (m.astype(w.dtype) + through.reshape(w.shape).astype(w.dtype))
  return sparsity.map_pruned(one, rules, params, importance, keep, default=lambda w, *_: w)


class ScoresState(NamedTuple):
  """The frozen weights, the trained scores and the scores' optimizer state."""
  weights: optax.Params     # W: the weights the masks select from (frozen)
  scores: optax.Params      # S: a score per group of every pruned leaf (None elsewhere)
  inner: optax.OptState     # the state of the scores' optimizer


def train_scores(spec: sparsity.SparsitySpec | dict, weights: Params, score_tree: Params,
                 tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """Trains the scores in an ordinary loop over the params: an optax transform whose params
  are W * mask(S), with W and S in its state.

  Start the loop at ``params = apply(weights, score_tree, spec)``. Each update takes the loss
  gradient at those params, turns it into the scores' gradient (`apply`'s straight-through
  vjp), steps S with `tx`, and returns the update that lands the params exactly on
  W * mask(S_new): every weight stays frozen, masked in or out. The last params are the
  hard-masked weights, ready for masked fine-tuning (`sparsity.hard_prune` finds the same
  mask when no kept weight is 0).

  Args:
    spec: the sparsity spec.
    weights: W.
    score_tree: the initial scores (`init`).
    tx: the scores' optimizer (e.g. optax.adam(1e-2), or HYDRA's SGD with a cosine schedule).

  Returns:
    An optax.GradientTransformation with state `ScoresState`; it requires params.
  """
  spec = sparsity.spec(spec)

  def init_fn(params):
    del params  # the params are W * mask(S); W and S come with the transform
    # Copies: a training step donates its state's buffers.
    return ScoresState(jax.tree.map(jnp.copy, weights), jax.tree.map(jnp.copy, score_tree),
                       tx.init(score_tree))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("train_scores.update needs the current params: call update(grads, "
                       "state, params).")
    _, vjp = jax.vjp(lambda s: apply(state.weights, s, spec), state.scores)
    (grads,) = vjp(updates)
    step, inner = tx.update(grads, state.inner, state.scores)
    new_scores = optax.apply_updates(state.scores, step)
    target = apply(state.weights, new_scores, spec)
    # Each weight is w or 0 before and after, so params + (target - params) is exact.
    moves = jax.tree.map(lambda t, p: (t - p).astype(p.dtype), target, params)
    return moves, ScoresState(state.weights, new_scores, inner)

  return optax.GradientTransformation(init_fn, update_fn)
