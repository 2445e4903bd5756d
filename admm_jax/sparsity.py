"""Which parameters are pruned, how, and how sparse the result is.

A spec maps regular expressions to ``(kind, ratio)``, or ``(kind, ratio, bits)`` /
``(kind, ratio, bits, scale_mode)`` for weights that must also lie on a k-bit symmetric grid
(`admm_jax.quantization`: bits in 2..8, a scale per output channel by default or per layer).
A pattern is matched *in full*
against the '/'-joined path of a parameter leaf, e.g. ``"conv1/kernel"`` or
``"Dense_.*/kernel"`` for a flax.linen params dict (the ``.value`` attribute of a flax.nnx
Variable is not part of the path). Every pattern must match at least one leaf and no leaf
may be matched by two patterns: both mistakes are errors, not silent no-ops.

    spec = sparsity.spec({"conv1/kernel": ("filter", 0.8), "fc.*/kernel": ("irregular", 0.99, 4)})
    params, masks = sparsity.hard_prune(params, spec)
    print(sparsity.format_report(sparsity.report(params, spec)))
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from admm_jax import projections, quantization

Params = Any


class Rule(NamedTuple):
  """How one parameter leaf is pruned."""
  kind: str              # "irregular", "filter", "column" or "n:m"
  ratio: float | None    # fraction of groups removed (None for n:m)
  bits: int | None = None     # the weights also lie on this k-bit grid (None: float)
  scale_mode: str = "channel"  # the grid's scale: one per output channel, or per "layer"


@dataclasses.dataclass(frozen=True)
class SparsitySpec:
  """An ordered, validated tuple of (pattern, rule) pairs. Build it with `spec`."""
  rules: tuple[tuple[str, Rule], ...]

  def __repr__(self) -> str:
    inner = ", ".join(f"{p!r}: {tuple(r) if r.bits is not None else tuple(r)[:2]!r}"
                      for p, r in self.rules)
    return f"spec({{{inner}}})"


def spec(mapping: Mapping[str, tuple] | SparsitySpec) -> SparsitySpec:
  """Validates and freezes a {pattern: (kind, ratio[, bits[, scale_mode]])} mapping.

  Raises:
    ValueError: naming the pattern, for a bad regex, an unknown kind, a ratio outside [0, 1),
      bits outside 2..8 or an unknown scale mode.
  """
  if isinstance(mapping, SparsitySpec):
    return mapping
  if not isinstance(mapping, Mapping) or not mapping:
    raise ValueError(f"spec needs a non-empty mapping {{pattern: (kind, ratio)}}, got {mapping!r}.")
  rules = []
  for pattern, value in mapping.items():
    if not isinstance(pattern, str):
      raise ValueError(f"pattern {pattern!r} must be a string (a regex over '/'-joined paths).")
    try:
      re.compile(pattern)
    except re.error as e:
      raise ValueError(f"pattern {pattern!r} is not a valid regular expression: {e}.") from None
    if isinstance(value, str) or not isinstance(value, (tuple, list)) or not 2 <= len(value) <= 4:
      raise ValueError(f"pattern {pattern!r} needs a (kind, ratio) pair or a (kind, ratio, bits"
                       f"[, scale_mode]) tuple, got {value!r}, e.g. ('filter', 0.8), "
                       "('2:4', None) or ('irregular', 0.9, 4).")
    kind, ratio, *rest = value
    projections.validate(kind, ratio, where=f"pattern {pattern!r}")
    if rest and rest[0] is not None:
      quantization.validate(*rest, where=f"pattern {pattern!r}")
    rules.append((pattern, Rule(kind, None if ratio is None else float(ratio), *rest)))
  return SparsitySpec(tuple(rules))


def path_str(path: tuple[Any, ...]) -> str:
  """'/'-joined names of a pytree key path; a trailing nnx ``.value`` attribute is dropped."""
  names = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      names.append(str(key.key))
    elif isinstance(key, jax.tree_util.GetAttrKey):
      names.append(key.name)
    elif isinstance(key, jax.tree_util.SequenceKey):
      names.append(str(key.idx))
    elif isinstance(key, jax.tree_util.FlattenedIndexKey):
      names.append(str(key.key))
    else:
      names.append(str(key))
  if len(path) > 1 and isinstance(path[-1], jax.tree_util.GetAttrKey) and names[-1] == "value":
    names.pop()
  return "/".join(names)


def leaf_paths(params: Params) -> list[str]:
  """The '/'-joined path of every leaf, in tree order."""
  return [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]


def _rule_for(path: str, shape: tuple[int, ...], the_spec: SparsitySpec) -> Rule | None:
  hits = [(p, r) for p, r in the_spec.rules if re.fullmatch(p, path)]
  if len(hits) > 1:
    raise ValueError(f"parameter {path!r} is matched by both {hits[0][0]!r} and {hits[1][0]!r}: "
                     "make the patterns disjoint.")
  if not hits:
    return None
  rule = hits[0][1]
  projections.validate(rule.kind, rule.ratio, shape, where=f"parameter {path!r}")
  if rule.bits is not None:
    quantization.validate(rule.bits, rule.scale_mode, shape, where=f"parameter {path!r}")
  return rule


def rules_tree(params: Params, the_spec: SparsitySpec) -> Params:
  """A pytree like `params` whose leaves are the leaf's `Rule`, or None where it is not pruned.

  Raises:
    ValueError: a pattern matching no leaf (listing the available paths), a leaf matched by
      two patterns, or a kind that does not fit the leaf's shape.
  """
  the_spec = spec(the_spec)
  if params is None:
    raise ValueError("params is None: the sparsity spec needs the parameters to resolve against.")
  paths = leaf_paths(params)
  for pattern, _ in the_spec.rules:
    if not any(re.fullmatch(pattern, p) for p in paths):
      shown = ", ".join(paths[:20]) + (", ..." if len(paths) > 20 else "")
      raise ValueError(f"pattern {pattern!r} matches no parameter; patterns match the whole "
                       f"'/'-joined path, available: {shown}.")
  return jax.tree_util.tree_map_with_path(
      lambda p, x: _rule_for(path_str(p), tuple(np.shape(x)), the_spec), params)


def resolve(params: Params, the_spec: SparsitySpec) -> dict[str, Rule]:
  """{path: Rule} for every pruned leaf of `params` (see `rules_tree` for the errors)."""
  tree = rules_tree(params, the_spec)
  flat = jax.tree_util.tree_leaves_with_path(
      tree, is_leaf=lambda x: x is None or isinstance(x, Rule))
  return {path_str(p): r for p, r in flat if r is not None}


def _is_rule_leaf(x: Any) -> bool:
  return x is None or isinstance(x, Rule)


def map_pruned(fn, rules: Params, *trees: Params, default=None) -> Params:
  """Maps ``fn(rule, *leaves)`` over pruned leaves; others become ``default(*leaves)`` (or None)."""
  def one(rule, *leaves):
    if rule is None:
      return None if default is None else default(*leaves)
    return fn(rule, *leaves)
  return jax.tree.map(one, rules, *trees, is_leaf=_is_rule_leaf)


def project(rule: Rule, w: jax.Array) -> jax.Array:
  """The projection of one leaf onto its rule's set: sparse, or sparse AND on its k-bit grid
  (`quantization.project`: exact for the scale it settles on, a local optimum in the scale)."""
  if rule.bits is None:
    return projections.project(w, rule.kind, rule.ratio)
  return quantization.project(w, rule.bits, rule.scale_mode, rule.kind, rule.ratio)


def project_and_mask(rule: Rule, w: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(`project(rule, w)`, the keep-mask of its groups): for a k-bit rule the groups the
  projection keeps (inside them a weight may still round to 0 and move off 0 later)."""
  if rule.bits is None:
    m = projections.mask(w, rule.kind, rule.ratio)
    return w * m.astype(w.dtype), m   # as hard pruning always did (bit for bit)
  c, s = quantization.fit(w, rule.bits, rule.scale_mode, rule.kind, rule.ratio)
  m = projections.mask_from_scores(quantization.gains(w, s, rule.bits), rule.kind, rule.ratio)
  return (c * s).astype(w.dtype), m


def masks(params: Params, the_spec: SparsitySpec) -> Params:
  """Keep-masks of the projection of every pruned leaf; None for the other leaves."""
  return map_pruned(lambda r, w: project_and_mask(r, w)[1], rules_tree(params, the_spec), params)


def hard_prune(params: Params, the_spec: SparsitySpec) -> tuple[Params, Params]:
  """Projects every pruned leaf onto its set: W = Proj(W) (sparse, and on its grid if k-bit).

  Returns:
    (pruned params, masks): masks has the params' structure, a bool array for every pruned
    leaf and None for the others; pass it to `transforms.apply_masks` for masked retraining.
  """
  both = map_pruned(project_and_mask, rules_tree(params, the_spec), params)
  is_pair = lambda x: x is None or isinstance(x, tuple)
  pruned = jax.tree.map(lambda pm, w: w if pm is None else pm[0], both, params, is_leaf=is_pair)
  the_masks = jax.tree.map(lambda pm: None if pm is None else pm[1], both, is_leaf=is_pair)
  return pruned, the_masks


def without_bits(the_spec: SparsitySpec) -> SparsitySpec:
  """The same spec with every k-bit grid dropped: the sparsity sets alone."""
  return SparsitySpec(tuple((p, Rule(r.kind, r.ratio)) for p, r in spec(the_spec).rules))


def frobenius_norm(x: jax.Array) -> jax.Array:
  """||x||_F in float32 (whatever the dtype of x)."""
  return jnp.linalg.norm(x.astype(jnp.float32).reshape(-1))


def distance_to_set(params: Params, the_spec: SparsitySpec, relative: bool = False
                    ) -> dict[str, jax.Array]:
  """{path: ||W - Proj(W)||_F} per pruned leaf: what hard pruning removes from W right now.

  With relative=True, divided by ||W||_F (0 when W is already in its sparsity set, near 1
  when the kept groups hold almost nothing).
  """
  def one(rule, w):
    d = frobenius_norm(w - project(rule, w))
    return d / frobenius_norm(w) if relative else d
  tree = map_pruned(one, rules_tree(params, the_spec), params)
  flat = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: x is None)
  return {path_str(p): d for p, d in flat if d is not None}


@dataclasses.dataclass(frozen=True)
class LayerReport:
  kind: str
  target: float | None     # ratio asked (None for n:m)
  groups: int
  groups_pruned: int       # groups whose weights are all exactly zero
  achieved: float          # groups_pruned / groups
  params: int
  nonzero: int
  zero_fraction: float
  bits: int | None = None  # the k-bit grid of the rule (None: float weights)


@dataclasses.dataclass(frozen=True)
class Report:
  layers: dict[str, LayerReport]
  total_params: int        # every leaf, pruned or not (biases, BatchNorm, ...)
  nonzero_params: int
  compression: float       # total_params / nonzero_params

  def to_dict(self) -> dict[str, Any]:
    return {"layers": {k: dataclasses.asdict(v) for k, v in self.layers.items()},
            "total_params": self.total_params, "nonzero_params": self.nonzero_params,
            "compression": self.compression}


def _group_count_zero(w: np.ndarray, kind: str) -> tuple[int, int]:
  if projections.parse_n_m(kind) is not None or kind == "irregular":
    return w.size, int((w == 0).sum())
  norms = np.asarray(projections.group_sq_norms(w, kind))
  return norms.size, int((norms == 0).sum())


def report(params: Params, the_spec: SparsitySpec) -> Report:
  """Per-layer and global sparsity of `params` under `the_spec` (computed on the host)."""
  rules = jax.tree.leaves(rules_tree(params, the_spec), is_leaf=_is_rule_leaf)
  layers, total, nonzero_total = {}, 0, 0
  for (path, leaf), rule in zip(jax.tree_util.tree_leaves_with_path(params), rules):
    w = np.asarray(leaf).astype(np.float32)
    nonzero = int(np.count_nonzero(w))
    total, nonzero_total = total + w.size, nonzero_total + nonzero
    if rule is not None:
      groups, pruned = _group_count_zero(w, rule.kind)
      layers[path_str(path)] = LayerReport(rule.kind, rule.ratio, groups, pruned, pruned / groups,
                                           int(w.size), nonzero, 1.0 - nonzero / max(w.size, 1),
                                           rule.bits)
  return Report(layers, int(total), nonzero_total, total / max(nonzero_total, 1))


def format_report(rep: Report) -> str:
  """A fixed-width table of a `Report`, one row per pruned layer and a total line."""
  width = max([len(k) for k in rep.layers] + [5])
  lines = [f"{'layer':<{width}}  {'kind':<9} {'target':>6} {'groups':>14} {'achieved':>8} "
           f"{'zeros':>7} {'params':>10}"]
  for path, r in rep.layers.items():
    target = "-" if r.target is None else f"{r.target:.3f}"
    lines.append(f"{path:<{width}}  {r.kind:<9} {target:>6} "
                 f"{r.groups_pruned:>6}/{r.groups:<7} {r.achieved:>8.3f} {r.zero_fraction:>7.3f} "
                 f"{r.params:>10}")
  lines.append(f"total {rep.total_params} params, {rep.nonzero_params} nonzero: "
               f"compression {rep.compression:.2f}x")
  return "\n".join(lines)
