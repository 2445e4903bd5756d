"""One budget shared by several layers ("global" spec entries): the exact projection (brute
force on small trees), equal to the per-layer projection for one leaf, deterministic ties, used
by hard pruning, masks, reports and ADMM; bad input in one sentence."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from admm_jax import projections, sparsity, transforms
from admm_jax.app import configlib

# Small trees, so that every choice of kept groups can be enumerated.
TREES = {
    "irregular": {"a": {"kernel": (2, 3)}, "b": {"kernel": (3,)}, "c": {"kernel": (1, 2)}},
    "filter": {"a": {"kernel": (2, 2, 1, 3)}, "b": {"kernel": (4, 2)}, "c": {"kernel": (3, 4)}},
    "column": {"a": {"kernel": (2, 1, 1, 3)}, "b": {"kernel": (3, 2)}},
}


def _tree(shapes, seed):
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [jax.random.normal(k, s) for k, s in zip(keys, leaves)])


def _brute_force(params, kind, ratio):
  """The best kept set over all subsets of groups with at least one group in every layer."""
  ws = [np.asarray(w) for w in jax.tree.leaves(params)]
  sq = [np.square(w).reshape(-1) if kind == "irregular" else
        np.square(w.reshape(-1, w.shape[-1])).sum(axis=0 if kind == "filter" else 1) for w in ws]
  groups = [(i, g) for i, s in enumerate(sq) for g in range(s.size)]
  norms = [sq[i][g] for i, g in groups]
  n = len(groups)
  kept = n - min(int(np.floor(ratio * n + 0.5)), n - 1)
  best, best_value = None, -np.inf
  for chosen in itertools.combinations(range(n), kept):
    if {groups[c][0] for c in chosen} != set(range(len(ws))):
      continue
    value = sum(norms[c] for c in chosen)
    if value > best_value + 1e-9:
      best, best_value = set(chosen), value
  keep = [np.zeros(projections.num_groups(w.shape, kind), bool) for w in ws]
  for c in best:
    keep[groups[c][0]][groups[c][1]] = True
  return [np.asarray(projections.groups_to_mask(jnp.asarray(k), w.shape, kind))
          for k, w in zip(keep, ws)]


@pytest.mark.parametrize("kind,ratio", [("irregular", 0.5), ("irregular", 0.7),
                                        ("filter", 0.6), ("column", 0.5)])
def test_global_projection_equals_brute_force(kind, ratio):
  params = _tree(TREES[kind], 0)
  spec = sparsity.spec({".*/kernel": (kind, ratio, "global")})
  pruned, masks = sparsity.hard_prune(params, spec)
  for got, want, w, p in zip(jax.tree.leaves(masks), _brute_force(params, kind, ratio),
                             jax.tree.leaves(params), jax.tree.leaves(pruned)):
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(p, np.where(want, w, 0.0))


@pytest.mark.parametrize("kind,ratio", [("irregular", 0.3), ("filter", 0.5), ("column", 0.9)])
def test_one_leaf_global_equals_the_per_layer_projection(kind, ratio):
  # Integers: many ties, which must break the same way (lower index kept).
  w = jnp.round(jax.random.normal(jax.random.key(3), (3, 2, 2, 4)) * 2)
  joint = sparsity.masks({"k": w}, sparsity.spec({"k": (kind, ratio, "global")}))["k"]
  np.testing.assert_array_equal(joint, projections.mask(w, kind, ratio))


def test_ties_keep_each_layers_best_then_the_lower_index_in_tree_order():
  params = {"a": jnp.ones(4), "b": jnp.ones(4)}   # 8 equal weights, keep 4
  masks = sparsity.masks(params, sparsity.spec({"a|b": ("irregular", 0.5, "global")}))
  np.testing.assert_array_equal(masks["a"], [True, True, True, False])
  np.testing.assert_array_equal(masks["b"], [True, False, False, False])


def test_a_layer_keeps_its_best_group_even_when_the_others_are_larger():
  params = {"big": jnp.arange(1.0, 9.0) * 10, "small": jnp.asarray([0.1, 0.3, 0.2])}
  masks = sparsity.masks(params, sparsity.spec({"big|small": ("irregular", 0.5, "global")}))
  # 11 weights, 6 removed, 5 kept: small's best (0.3) and big's 4 largest.
  np.testing.assert_array_equal(masks["small"], [False, True, False])
  np.testing.assert_array_equal(masks["big"], np.arange(8) >= 4)


def test_report_shows_the_per_layer_ratios_found_and_the_shared_total():
  params = {"a": jnp.arange(1.0, 9.0), "b": jnp.arange(1.0, 3.0) * 100, "bias": jnp.ones(2)}
  spec = sparsity.spec({"a|b": ("irregular", 0.5, "global")})
  pruned, _ = sparsity.hard_prune(params, spec)
  rep = sparsity.report(pruned, spec)
  # 10 weights, 5 kept: b's 2 (largest) and a's 3 largest.
  assert rep.layers["a"].achieved == pytest.approx(5 / 8) and rep.layers["b"].achieved == 0.0
  assert rep.layers["a"].shared == "a|b" and rep.layers["a"].target == 0.5
  assert sparsity.shared_budgets(rep) == [("a|b", 0.5, 0.5, 2)]
  text = sparsity.format_report(rep)
  assert "global budget 'a|b': target 0.5000 over 2 layers, achieved 0.5000" in text
  assert rep.to_dict()["layers"]["b"]["shared"] == "a|b"
  assert "'global'" in repr(spec)


def test_admm_projects_a_global_entry_jointly_and_distance_matches_hard_pruning():
  params = _tree(TREES["filter"], 5)
  spec = sparsity.spec({"(a|b)/kernel": ("filter", 0.5, "global"), "c/kernel": ("column", 0.5)})
  pruned, _ = sparsity.hard_prune(params, spec)
  state = transforms.admm(spec, rho=0.1, update_every=1).init(params)
  for z, p in zip(jax.tree.leaves(state.z), [pruned["a"]["kernel"], pruned["b"]["kernel"],
                                             pruned["c"]["kernel"]]):
    np.testing.assert_array_equal(z, p)
  u = jax.tree.map(lambda z: jnp.full_like(z, 0.01), state.z)
  z, _ = transforms.zu_update(sparsity.rules_tree(params, spec), params, u)
  shifted = jax.tree.map(lambda w: w + 0.01, params)
  want, _ = sparsity.hard_prune(shifted, spec)
  np.testing.assert_array_equal(z["a"]["kernel"], want["a"]["kernel"])
  np.testing.assert_array_equal(z["b"]["kernel"], want["b"]["kernel"])
  dist = sparsity.distance_to_set(params, spec)
  np.testing.assert_allclose(dist["b/kernel"], jnp.linalg.norm(params["b"]["kernel"]
                                                               - pruned["b"]["kernel"]))
  # The transform still runs under jit with the global entry.
  tx = transforms.admm(spec, rho=0.1, update_every=1)
  grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  assert jax.tree.structure(updates) == jax.tree.structure(params)


@pytest.mark.parametrize("mapping,match", [
    ({"x": ("irregular", 0.5, 4, "global")}, "without bits"),
    ({"x": ("2:4", None, "global")}, "not the N:M kind"),
])
def test_bad_global_entry_is_one_clear_error(mapping, match):
  with pytest.raises(ValueError, match=match):
    sparsity.spec(mapping)


def test_global_pattern_naming_no_layer_and_a_ratio_emptying_a_layer_raise():
  params = {"a": jnp.ones(4), "b": jnp.ones(2)}
  with pytest.raises(ValueError, match="pattern 'c.*' matches no parameter"):
    sparsity.masks(params, sparsity.spec({"c.*": ("irregular", 0.5, "global")}))
  # 6 weights at 0.9: 5 removed, 1 kept, fewer than the 2 layers.
  with pytest.raises(ValueError, match=r"keeps 1 of 6 groups, fewer than its 2 layers.*at "
                                       r"most 0.666667"):
    sparsity.resolve(params, sparsity.spec({"a|b": ("irregular", 0.9, "global")}))
  with pytest.raises(ValueError, match="project them together"):
    sparsity.project(sparsity.spec({"a": ("irregular", 0.5, "global")}).rules[0][1], params["a"])


def test_config_text_takes_a_global_suffix():
  assert configlib.parse_sparsity("(conv1|fc1)/kernel=irregular:0.98:global,fc2/kernel=filter:0.5"
                                  ) == {"(conv1|fc1)/kernel": ("irregular", 0.98, "global"),
                                        "fc2/kernel": ("filter", 0.5)}
  config = configlib.base_config()
  config.sparsity = "(conv1|fc1)/kernel=irregular:0.98:4b:global"
  with pytest.raises(configlib.ConfigError, match="without bits"):
    configlib.validate(config)


def test_global_masks_keep_pruned_weights_at_zero_through_training():
  params = _tree(TREES["irregular"], 2)
  _, masks = sparsity.hard_prune(params, sparsity.spec({".*": ("irregular", 0.6, "global")}))
  tx = optax.chain(optax.sgd(0.1), transforms.apply_masks(masks))
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  moved = optax.apply_updates(params, updates)
  for m, w in zip(jax.tree.leaves(masks), jax.tree.leaves(moved)):
    assert np.all(np.asarray(w)[~np.asarray(m)] == 0.0)
