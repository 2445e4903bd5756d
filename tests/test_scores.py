"""Learned masks: the mask is exactly each entry's top-k of |score|, the gradient reaches the
scores straight through it, HYDRA's init starts at the magnitude projection, and the optax
transform keeps the weights frozen and the params exactly masked."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from admm_jax import projections, scores, sparsity

# Jitted once per spec: one compilation instead of many eager ones.
masks_fn = jax.jit(scores.masks, static_argnums=2)
apply_fn = jax.jit(scores.apply, static_argnums=2)
mask_fn = jax.jit(projections.mask, static_argnums=(1, 2))

SPEC = sparsity.spec({"conv/kernel": ("filter", 0.5), "dense/kernel": ("irregular", 0.6),
                      "col/kernel": ("column", 0.5)})


def _params(seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  return {"conv": {"kernel": jax.random.normal(k[0], (2, 2, 2, 4)), "bias": jnp.ones(4)},
          "dense": {"kernel": jax.random.normal(k[1], (6, 4))},
          "col": {"kernel": jax.random.normal(k[2], (3, 5))}}


def _random_scores(params, spec, seed=1):
  rules = sparsity.rules_tree(params, spec)
  return sparsity.map_pruned(
      lambda r, w: jax.random.normal(jax.random.key(seed + w.size),
                                     scores.score_shape(w.shape, r)), rules, params)


@pytest.fixture(scope="module")
def case():
  params = _params()
  return params, _random_scores(params, SPEC)


def test_mask_is_exactly_each_rules_top_k_of_the_scores(case):
  params, s = case
  got = masks_fn(params, s, SPEC)
  for name, kind, ratio in [("conv", "filter", 0.5), ("dense", "irregular", 0.6),
                            ("col", "column", 0.5)]:
    w = params[name]["kernel"]
    # The scores as weights: every weight of a group carries the group's score.
    as_weights = projections.groups_to_mask(jnp.abs(s[name]["kernel"]).reshape(-1), w.shape, kind)
    np.testing.assert_array_equal(got[name]["kernel"], mask_fn(as_weights, kind, ratio))
    kept = int(np.asarray(projections.group_sq_norms(got[name]["kernel"], kind) > 0).sum())
    n = projections.num_groups(w.shape, kind)
    assert kept == n - projections.num_removed(n, ratio)
  assert got["conv"]["bias"] is None


def test_global_entry_keeps_the_top_k_across_its_leaves(case):
  params, _ = case
  spec = sparsity.spec({"(dense|col)/kernel": ("irregular", 0.7, "global")})
  s = _random_scores(params, spec, seed=7)
  got = scores.masks(params, s, spec)
  want = sparsity.masks(jax.tree.map(jnp.abs, s), spec)  # the scores as weights, jointly
  for name in ("dense", "col"):
    np.testing.assert_array_equal(got[name]["kernel"], want[name]["kernel"])


def test_apply_is_the_masked_weights_and_its_gradient_is_straight_through(case):
  params, s = case
  keep = masks_fn(params, s, SPEC)
  out = apply_fn(params, s, SPEC)
  for name in ("conv", "dense", "col"):
    np.testing.assert_array_equal(out[name]["kernel"],
                                  params[name]["kernel"] * keep[name]["kernel"])
  np.testing.assert_array_equal(out["conv"]["bias"], params["conv"]["bias"])
  c = jax.tree.map(lambda w: jax.random.normal(jax.random.key(9), w.shape), params)
  loss = lambda p: sum(jnp.sum(jnp.tanh(x) * y) for x, y in zip(jax.tree.leaves(p),
                                                                jax.tree.leaves(c)))
  grads = jax.jit(jax.grad(lambda t: loss(scores.apply(params, t, SPEC))))(s)
  g_masked = jax.grad(loss)(out)   # d loss / d (masked weights)
  for name, kind in [("conv", "filter"), ("dense", "irregular"), ("col", "column")]:
    gw = np.asarray(g_masked[name]["kernel"] * params[name]["kernel"])
    if kind == "irregular":
      per_group = gw
    else:
      per_group = gw.reshape(-1, gw.shape[-1]).sum(axis=0 if kind == "filter" else 1)
    np.testing.assert_allclose(grads[name]["kernel"],
                               np.sign(s[name]["kernel"]) * per_group, rtol=1e-5, atol=1e-6)


def test_hydra_init_starts_at_the_magnitude_projection_scaled_to_one():
  params = _params(3)
  spec = sparsity.spec({"conv/kernel": ("filter", 0.5),
                        "(dense|col)/kernel": ("irregular", 0.8, "global")})
  s = scores.init(params, spec)
  for got, want in zip(jax.tree.leaves(scores.masks(params, s, spec)),
                       jax.tree.leaves(sparsity.masks(params, spec))):
    np.testing.assert_array_equal(got, want)
  assert float(jnp.max(s["conv"]["kernel"])) == 1.0
  # One scale for a global entry: its largest weight over both leaves scores 1.
  assert max(float(jnp.max(s["dense"]["kernel"])), float(jnp.max(s["col"]["kernel"]))) == 1.0
  assert s["conv"]["bias"] is None and s["conv"]["kernel"].shape == (4,)


def test_train_scores_freezes_the_weights_and_lands_exactly_on_the_new_mask(case):
  params, s = case
  tx = scores.train_scores(SPEC, params, s, optax.sgd(0.5))
  p0 = apply_fn(params, s, SPEC)
  state = tx.init(p0)
  grads = jax.tree.map(lambda w: jax.random.normal(jax.random.key(4), w.shape), p0)
  updates, state = jax.jit(tx.update)(grads, state, p0)
  p1 = optax.apply_updates(p0, updates)
  _, vjp = jax.vjp(lambda t: scores.apply(params, t, SPEC), s)
  want_scores = jax.tree.map(lambda a, g: a - 0.5 * g, s, vjp(grads)[0])
  for got, want in zip(jax.tree.leaves(state.scores), jax.tree.leaves(want_scores)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  keep = masks_fn(params, state.scores, SPEC)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(keep),
                                                      jax.tree.leaves(scores.masks(params, s,
                                                                                   SPEC))))
  for name in ("conv", "dense", "col"):
    np.testing.assert_array_equal(p1[name]["kernel"],
                                  params[name]["kernel"] * keep[name]["kernel"])
  np.testing.assert_array_equal(p1["conv"]["bias"], params["conv"]["bias"])   # frozen too
  for a, b in zip(jax.tree.leaves(state.weights), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("mapping,zero,match", [
    ({"dense/kernel": ("irregular", 0.5)}, True, "'dense/kernel' has no nonzero weight"),
    ({"dense/kernel": ("irregular", 0.0), "conv/kernel": ("filter", 0.0)}, False,
     "prunes nothing"),
    ({"dense/kernel": ("irregular", 0.5, 4)}, False, "learned masks are float"),
])
def test_bad_input_is_one_sentence(mapping, zero, match):
  params = _params()
  if zero:
    params["dense"]["kernel"] = jnp.zeros((6, 4))
  with pytest.raises(ValueError, match=match):
    scores.init(params, sparsity.spec(mapping))
