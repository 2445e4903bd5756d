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

A trailing ``"global"`` shares ONE budget over every leaf the pattern matches:
``{"(conv.*|fc.*)/kernel": ("irregular", 0.99, "global")}`` removes 99 % of all their weights
together, keeping the largest across the layers (at least one group in each), and the report
shows the per-layer ratios it found (`projections.shared_keep` says what "exact" means).
Global entries are float: no bits, no N:M kind. Everything that projects (`hard_prune`,
`masks`, `distance_to_set`, `project_tree`, `transforms.admm`, `admm_jax.scores`) projects a
global entry's leaves jointly; the per-leaf `project` / `project_and_mask` refuse them.
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
  shared: str | None = None   # the pattern of a global budget this leaf shares; None: its own


@dataclasses.dataclass(frozen=True)
class SparsitySpec:
  """An ordered, validated tuple of (pattern, rule) pairs. Build it with `spec`."""
  rules: tuple[tuple[str, Rule], ...]

  def __repr__(self) -> str:
    inner = ", ".join(f"{p!r}: {_rule_tuple(r)!r}" for p, r in self.rules)
    return f"spec({{{inner}}})"


def _rule_tuple(r: Rule) -> tuple:
  """The mapping value that `spec` turns into `r`."""
  head = tuple(r)[:4] if r.bits is not None else tuple(r)[:2]
  return head + ("global",) if r.shared is not None else head


def spec(mapping: Mapping[str, tuple] | SparsitySpec) -> SparsitySpec:
  """Validates and freezes a {pattern: (kind, ratio[, bits[, scale_mode]])} mapping.

  A value ``(kind, ratio, "global")`` shares one budget over all the leaves the pattern
  matches (module docstring); kind is then irregular, filter or column, without bits.

  Raises:
    ValueError: naming the pattern, for a bad regex, an unknown kind, a ratio outside [0, 1),
      bits outside 2..8, an unknown scale mode, or a global entry with bits or an N:M kind.
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
    shared = None
    if isinstance(value, (tuple, list)) and len(value) > 2 and value[-1] == "global":
      if len(value) != 3:
        raise ValueError(f"pattern {pattern!r}: a global budget shares a ratio of float weights, "
                         f"got {value!r}: write (kind, ratio, 'global') without bits.")
      shared, value = pattern, tuple(value[:2])
      if isinstance(value[0], str) and projections.parse_n_m(value[0]) is not None:
        raise ValueError(f"pattern {pattern!r}: a global budget needs a ratio to share, not the "
                         f"N:M kind {value[0]!r}: use irregular, filter or column.")
    if isinstance(value, str) or not isinstance(value, (tuple, list)) or not 2 <= len(value) <= 4:
      raise ValueError(f"pattern {pattern!r} needs a (kind, ratio) pair or a (kind, ratio, bits"
                       f"[, scale_mode]) tuple, got {value!r}, e.g. ('filter', 0.8), "
                       "('2:4', None) or ('irregular', 0.9, 4).")
    kind, ratio, *rest = value
    projections.validate(kind, ratio, where=f"pattern {pattern!r}")
    if rest and rest[0] is not None:
      quantization.validate(*rest, where=f"pattern {pattern!r}")
    rule = Rule(kind, None if ratio is None else float(ratio), *rest)
    rules.append((pattern, rule._replace(shared=shared) if shared else rule))
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
  tree = jax.tree_util.tree_map_with_path(
      lambda p, x: _rule_for(path_str(p), tuple(np.shape(x)), the_spec), params)
  _check_shared(tree, params)
  return tree


def _check_shared(rules: Params, params: Params) -> None:
  """Every global budget keeps at least one group in each of its layers (else ValueError)."""
  sizes: dict[str, list[int]] = {}
  ratios: dict[str, float] = {}
  treedef = jax.tree.structure(params)
  for r, w in zip(treedef.flatten_up_to(rules), jax.tree.leaves(params)):
    if r is not None and r.shared is not None:
      sizes.setdefault(r.shared, []).append(projections.num_groups(tuple(np.shape(w)), r.kind))
      ratios[r.shared] = r.ratio
  for pattern, group_sizes in sizes.items():
    projections.num_kept_shared(group_sizes, ratios[pattern], where=f"pattern {pattern!r}")


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


def _per_leaf(rule: Rule) -> None:
  if rule.shared is not None:
    raise ValueError(f"the rule of pattern {rule.shared!r} is a global budget, shared by all the "
                     "leaves it matches: project them together with sparsity.project_tree or "
                     "sparsity.hard_prune.")


def project(rule: Rule, w: jax.Array) -> jax.Array:
  """The projection of one leaf onto its rule's set: sparse, or sparse AND on its k-bit grid
  (`quantization.project`: exact for the scale it settles on, a local optimum in the scale).
  A global rule raises ValueError: its leaves are projected together (`project_tree`)."""
  _per_leaf(rule)
  if rule.bits is None:
    return projections.project(w, rule.kind, rule.ratio)
  return quantization.project(w, rule.bits, rule.scale_mode, rule.kind, rule.ratio)


def project_and_mask(rule: Rule, w: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(`project(rule, w)`, the keep-mask of its groups): for a k-bit rule the groups the
  projection keeps (inside them a weight may still round to 0 and move off 0 later)."""
  _per_leaf(rule)
  if rule.bits is None:
    m = projections.mask(w, rule.kind, rule.ratio)
    return w * m.astype(w.dtype), m   # as hard pruning always did (bit for bit)
  c, s = quantization.fit(w, rule.bits, rule.scale_mode, rule.kind, rule.ratio)
  m = projections.mask_from_scores(quantization.gains(w, s, rule.bits), rule.kind, rule.ratio)
  return (c * s).astype(w.dtype), m


def masks_from_group_scores(rules: Params, params: Params, group_scores: Params) -> Params:
  """Keep-masks that keep, for every rule, the groups of largest score: per leaf, or across
  all the leaves of a global rule (`projections.shared_keep`); None for unpruned leaves.

  Args:
    rules: `rules_tree(params, spec)`.
    params: the weights (only their shapes are read).
    group_scores: like params: for every pruned leaf a non-negative float vector with one
      score per group (`projections.num_groups`); for an N:M rule, one per weight, any shape.

  Returns:
    bool masks of the weights' shapes, with each rule's rounding and ties (`projections`).
  """
  treedef = jax.tree.structure(params)
  rs, ws = treedef.flatten_up_to(rules), treedef.flatten_up_to(params)
  ss = treedef.flatten_up_to(group_scores)
  out: list[Any] = [None] * len(ws)
  shared: dict[str, list[int]] = {}
  for i, (r, w, sc) in enumerate(zip(rs, ws, ss)):
    if r is None:
      continue
    shape = tuple(np.shape(w))
    if r.shared is not None:
      shared.setdefault(r.shared, []).append(i)
    elif projections.parse_n_m(r.kind) is not None:
      out[i] = projections.mask_from_scores(jnp.reshape(sc, shape), r.kind, None)
    else:
      n = projections.num_groups(shape, r.kind)
      keep = projections.top_k_mask(jnp.asarray(sc, jnp.float32).reshape(-1),
                                    n - projections.num_removed(n, r.ratio))
      out[i] = projections.groups_to_mask(keep, shape, r.kind)
  for members in shared.values():
    keeps = projections.shared_keep([jnp.reshape(ss[i], -1) for i in members], rs[members[0]].ratio)
    for i, keep in zip(members, keeps):
      out[i] = projections.groups_to_mask(keep, tuple(np.shape(ws[i])), rs[i].kind)
  return jax.tree.unflatten(treedef, out)


def _joint_masks(rules: Params, params: Params) -> Params:
  """Keep-masks of the Euclidean projection for the leaves of global rules; None elsewhere."""
  shared = jax.tree.map(lambda r: r if r is not None and r.shared is not None else None,
                        rules, is_leaf=_is_rule_leaf)
  if all(r is None for r in jax.tree.leaves(shared, is_leaf=_is_rule_leaf)):
    return jax.tree.map(lambda _: None, params)
  norms = map_pruned(lambda r, w: projections.group_sq_norms(w, r.kind), shared, params)
  return masks_from_group_scores(shared, params, norms)


def project_all(rules: Params, params: Params, default=None) -> Params:
  """Proj(W) of every pruned leaf: `project` per leaf, a global rule's leaves jointly (their
  largest groups across all of them); the other leaves become ``default(w)`` (or None).

  Args:
    rules: `rules_tree(params, spec)`.
    params: the weights W.
  """
  joint = _joint_masks(rules, params)

  def one(rule, w, m):
    return project(rule, w) if m is None else jnp.where(m, w, jnp.zeros((), w.dtype))
  return map_pruned(one, rules, params, joint,
                    default=None if default is None else lambda w, _: default(w))


def project_tree(rules: Params, params: Params) -> tuple[Params, Params]:
  """(Proj(params), keep-masks) as hard pruning does it (`project_and_mask` per leaf, a global
  rule's leaves jointly); unpruned leaves pass through and have the mask None.

  Args:
    rules: `rules_tree(params, spec)`.
    params: the weights.
  """
  joint = _joint_masks(rules, params)

  def one(rule, w, m):
    return project_and_mask(rule, w) if m is None else (w * m.astype(w.dtype), m)
  both = map_pruned(one, rules, params, joint)
  is_pair = lambda x: x is None or isinstance(x, tuple)
  pruned = jax.tree.map(lambda pm, w: w if pm is None else pm[0], both, params, is_leaf=is_pair)
  the_masks = jax.tree.map(lambda pm: None if pm is None else pm[1], both, is_leaf=is_pair)
  return pruned, the_masks


def masks(params: Params, the_spec: SparsitySpec) -> Params:
  """Keep-masks of the projection of every pruned leaf; None for the other leaves."""
  return project_tree(rules_tree(params, the_spec), params)[1]


def hard_prune(params: Params, the_spec: SparsitySpec) -> tuple[Params, Params]:
  """Projects every pruned leaf onto its set: W = Proj(W) (sparse, and on its grid if k-bit;
  the leaves of a global rule jointly).

  Returns:
    (pruned params, masks): masks has the params' structure, a bool array for every pruned
    leaf and None for the others; pass it to `transforms.apply_masks` for masked retraining.
  """
  return project_tree(rules_tree(params, the_spec), params)


def without_bits(the_spec: SparsitySpec) -> SparsitySpec:
  """The same spec with every k-bit grid dropped: the sparsity sets alone."""
  return SparsitySpec(tuple((p, r._replace(bits=None, scale_mode="channel"))
                            for p, r in spec(the_spec).rules))


def frobenius_norm(x: jax.Array) -> jax.Array:
  """||x||_F in float32 (whatever the dtype of x)."""
  return jnp.linalg.norm(x.astype(jnp.float32).reshape(-1))


def distance_to_set(params: Params, the_spec: SparsitySpec, relative: bool = False
                    ) -> dict[str, jax.Array]:
  """{path: ||W - Proj(W)||_F} per pruned leaf: what hard pruning removes from W right now.

  With relative=True, divided by ||W||_F (0 when W is already in its sparsity set, near 1
  when the kept groups hold almost nothing).
  """
  rules = rules_tree(params, the_spec)
  projected = project_all(rules, params, default=lambda w: w)

  def one(rule, w, p):
    d = frobenius_norm(w - p)
    return d / frobenius_norm(w) if relative else d
  tree = map_pruned(one, rules, params, projected)
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
  shared: str | None = None  # the global budget's pattern (target is then that budget's)


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
                                           rule.bits, rule.shared)
  return Report(layers, int(total), nonzero_total, total / max(nonzero_total, 1))


def shared_budgets(rep: Report) -> list[tuple[str, float, float, int]]:
  """(pattern, target, achieved, layers) of every global budget: achieved over all its groups."""
  out = {}
  for r in rep.layers.values():
    if r.shared is not None:
      _, pruned, groups, count = out.get(r.shared, (None, 0, 0, 0))
      out[r.shared] = (r.target, pruned + r.groups_pruned, groups + r.groups, count + 1)
  return [(p, t, pruned / groups, count) for p, (t, pruned, groups, count) in out.items()]


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
  for pattern, ratio, achieved, count in shared_budgets(rep):
    lines.append(f"global budget {pattern!r}: target {ratio:.4f} over {count} layers, achieved "
                 f"{achieved:.4f} (per layer: the rows above)")
  lines.append(f"total {rep.total_params} params, {rep.nonzero_params} nonzero: "
               f"compression {rep.compression:.2f}x")
  return "\n".join(lines)
