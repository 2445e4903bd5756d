"""Sparsity specs: regex patterns over '/'-joined parameter paths, hard pruning and reports."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from admm_jax import projections, sparsity


@pytest.fixture(scope="module")
def params():
  k = jax.random.split(jax.random.key(0), 4)
  return {
      "Conv_0": {"kernel": jax.random.normal(k[0], (3, 3, 1, 8)), "bias": jnp.zeros(8)},
      "Conv_1": {"kernel": jax.random.normal(k[1], (3, 3, 8, 16)), "bias": jnp.zeros(16)},
      "Dense_0": {"kernel": jax.random.normal(k[2], (64, 32)), "bias": jnp.zeros(32)},
      "Dense_1": {"kernel": jax.random.normal(k[3], (32, 10)), "bias": jnp.zeros(10)},
  }


def test_patterns_match_full_paths(params):
  spec = sparsity.spec({"Conv_.*/kernel": ("filter", 0.5), "Dense_0/kernel": ("irregular", 0.9)})
  rules = sparsity.resolve(params, spec)
  assert sorted(rules) == ["Conv_0/kernel", "Conv_1/kernel", "Dense_0/kernel"]
  assert rules["Conv_1/kernel"] == sparsity.Rule("filter", 0.5)  # bits None, scale per channel
  # "Dense_0" alone does not match "Dense_0/kernel": patterns match the whole path.
  with pytest.raises(ValueError, match="Dense_0.*matches no parameter"):
    sparsity.resolve(params, sparsity.spec({"Dense_0": ("irregular", 0.5)}))


def test_hard_prune_equals_projection_and_masks(params):
  spec = sparsity.spec({"Conv_1/kernel": ("column", 0.75), "Dense_.*/kernel": ("irregular", 0.9)})
  pruned, masks = sparsity.hard_prune(params, spec)
  for name, kind, ratio in [("Conv_1", "column", 0.75), ("Dense_0", "irregular", 0.9),
                            ("Dense_1", "irregular", 0.9)]:
    w = params[name]["kernel"]
    np.testing.assert_array_equal(pruned[name]["kernel"], projections.project(w, kind, ratio))
    np.testing.assert_array_equal(masks[name]["kernel"], projections.mask(w, kind, ratio))
  # Unpruned leaves pass through and have no mask.
  np.testing.assert_array_equal(pruned["Conv_0"]["kernel"], params["Conv_0"]["kernel"])
  assert masks["Conv_0"]["kernel"] is None and masks["Dense_0"]["bias"] is None


def test_report_counts_groups_zeros_and_compression(params):
  spec = sparsity.spec({"Conv_1/kernel": ("filter", 0.75), "Dense_0/kernel": ("irregular", 0.5)})
  pruned, _ = sparsity.hard_prune(params, spec)
  rep = sparsity.report(pruned, spec)
  conv = rep.layers["Conv_1/kernel"]
  assert (conv.kind, conv.target, conv.groups, conv.groups_pruned) == ("filter", 0.75, 16, 12)
  assert conv.achieved == pytest.approx(0.75) and conv.zero_fraction == pytest.approx(0.75)
  dense = rep.layers["Dense_0/kernel"]
  assert dense.groups_pruned == 1024 and dense.params == 2048
  total = sum(x.size for x in jax.tree.leaves(params))
  nonzero = total - 12 * 9 * 8 - 1024 - sum(int((x == 0).sum()) for x in jax.tree.leaves(
      {k: v["bias"] for k, v in params.items()}))
  assert rep.total_params == total and rep.nonzero_params == nonzero
  assert rep.compression == pytest.approx(total / nonzero)
  text = sparsity.format_report(rep)
  assert "Conv_1/kernel" in text and "compression" in text


def test_n_m_spec(params):
  spec = sparsity.spec({"Conv_1/kernel": ("2:4", None)})
  pruned, masks = sparsity.hard_prune(params, spec)
  assert float(masks["Conv_1"]["kernel"].mean()) == 0.5


@pytest.mark.parametrize("mapping,match", [
    ({"Conv_0/kernel": ("rows", 0.5)}, "kind 'rows'"),
    ({"Conv_0/kernel": ("filter", 1.5)}, "ratio 1.5"),
    ({"Conv_0/kernel": ("filter", -0.5)}, "ratio -0.5"),
    ({"Conv_[0/kernel": ("filter", 0.5)}, "pattern 'Conv_\\[0/kernel'"),
    ({"Conv_0/kernel": "filter"}, "\\(kind, ratio\\)"),
])
def test_bad_spec_is_one_clear_error(mapping, match):
  with pytest.raises(ValueError, match=match):
    sparsity.spec(mapping)


def test_pattern_errors_at_resolution(params):
  with pytest.raises(ValueError, match="Conv_9/kernel.*matches no parameter.*Conv_0/kernel"):
    sparsity.resolve(params, sparsity.spec({"Conv_9/kernel": ("filter", 0.5)}))
  with pytest.raises(ValueError, match="filter.*Conv_0/bias.*at least 2 axes"):
    sparsity.resolve(params, sparsity.spec({"Conv_0/bias": ("filter", 0.5)}))
  with pytest.raises(ValueError, match="matched by both"):
    sparsity.resolve(params, sparsity.spec({"Conv_.*/kernel": ("filter", 0.5),
                                            "Conv_0/.*": ("irregular", 0.5)}))


def test_path_strings_ignore_nnx_value_attribute():
  tree = {"conv1": {"kernel": [jnp.ones(2)]}}
  paths = []
  jax.tree_util.tree_map_with_path(lambda p, _: paths.append(sparsity.path_str(p)), tree)
  assert paths == ["conv1/kernel/0"]


def test_distance_to_set_is_what_hard_pruning_removes(params):
  the_spec = sparsity.spec({"Conv_1/kernel": ("filter", 0.5),
                            "Dense_0/kernel": ("irregular", 0.75)})
  pruned, _ = sparsity.hard_prune(params, the_spec)
  dist = sparsity.distance_to_set(params, the_spec)
  rel = sparsity.distance_to_set(params, the_spec, relative=True)
  for path, (w, p) in {"Conv_1/kernel": (params["Conv_1"]["kernel"], pruned["Conv_1"]["kernel"]),
                       "Dense_0/kernel": (params["Dense_0"]["kernel"],
                                          pruned["Dense_0"]["kernel"])}.items():
    np.testing.assert_allclose(dist[path], np.linalg.norm(np.asarray(w - p)), rtol=1e-5)
    np.testing.assert_allclose(rel[path], dist[path] / np.linalg.norm(np.asarray(w)), rtol=1e-5)
  assert set(dist) == {"Conv_1/kernel", "Dense_0/kernel"}
  # A point already in the set is at distance 0.
  assert all(float(v) == 0.0 for v in sparsity.distance_to_set(pruned, the_spec).values())
