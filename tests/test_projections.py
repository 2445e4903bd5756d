"""The projections are exact Euclidean projections onto the sparsity sets (brute force)."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from admm_jax import projections as P

# Small tensors, so that every choice of kept groups can be enumerated.
SHAPES = {
    "conv": (2, 2, 2, 3),   # (kh, kw, cin, cout): 3 filters, 8 columns, 24 weights
    "dense": (4, 3),        # (in, out): 3 filters (output neurons), 4 columns (inputs)
}
RATIOS = (0.0, 0.3, 0.5, 0.8)


def _groups_as_masks(shape, kind):
  """Every group of `kind` as a boolean mask of `shape` (the brute-force view)."""
  rows = int(np.prod(shape[:-1]))
  cout = shape[-1]
  masks = []
  if kind == "irregular":
    for i in range(int(np.prod(shape))):
      m = np.zeros(int(np.prod(shape)), bool)
      m[i] = True
      masks.append(m.reshape(shape))
  elif kind == "filter":
    for j in range(cout):
      m = np.zeros((rows, cout), bool)
      m[:, j] = True
      masks.append(m.reshape(shape))
  elif kind == "column":
    for i in range(rows):
      m = np.zeros((rows, cout), bool)
      m[i, :] = True
      masks.append(m.reshape(shape))
  return masks


def _brute_force_projection(w, kind, ratio):
  groups = _groups_as_masks(w.shape, kind)
  n = len(groups)
  removed = min(int(np.floor(ratio * n + 0.5)), n - 1)
  best, best_dist = None, np.inf
  for kept in itertools.combinations(range(n), n - removed):
    keep = np.zeros(w.shape, bool)
    for g in kept:
      keep |= groups[g]
    dist = np.sum((w - np.where(keep, w, 0.0)) ** 2)
    if dist < best_dist - 1e-12:
      best, best_dist = keep, dist
  return best, removed


# Irregular on the 24-weight conv kernel is enumerated only where C(24, kept) stays small.
CASES = [(layout, kind, ratio) for layout in sorted(SHAPES)
         for kind in ("irregular", "filter", "column") for ratio in RATIOS
         if not (kind == "irregular" and layout == "conv" and ratio in (0.3, 0.5))]


@pytest.mark.parametrize("layout,kind,ratio", CASES)
def test_projection_equals_brute_force(layout, kind, ratio):
  shape = SHAPES[layout]
  rng = np.random.default_rng(hash((layout, kind, ratio)) % 2**32)
  w = rng.standard_normal(shape).astype(np.float32)
  expected_mask, removed = _brute_force_projection(w, kind, ratio)
  got_mask = np.asarray(P.mask(jnp.asarray(w), kind, ratio))
  np.testing.assert_array_equal(got_mask, expected_mask)
  np.testing.assert_array_equal(np.asarray(P.project(jnp.asarray(w), kind, ratio)),
                                np.where(expected_mask, w, 0.0))
  assert P.num_groups(shape, kind) - int(P.group_keep(jnp.asarray(w), kind, ratio).sum()) == removed


@pytest.mark.parametrize("kind", ["irregular", "filter", "column"])
def test_projection_keeps_the_exact_count_with_ties(kind):
  # All groups have the same norm: a percentile threshold would drop all or none.
  w = jnp.ones((3, 3, 4, 8), jnp.float32)
  n = P.num_groups(w.shape, kind)
  keep = np.asarray(P.group_keep(w, kind, 0.75))
  assert keep.sum() == n - P.num_removed(n, 0.75)
  # Ties break towards the lower group index: the kept groups come first.
  np.testing.assert_array_equal(keep, np.arange(n) < keep.sum())


def test_irregular_ties_broken_by_lower_index_among_equal_values():
  w = jnp.array([3.0, -1.0, 1.0, 2.0, -1.0, 1.0, 0.5, 1.0])
  # remove round(0.5 * 8) = 4: keep 3, 2 and two of the five 1.0-magnitude weights (lowest index).
  keep = np.asarray(P.mask(w, "irregular", 0.5))
  np.testing.assert_array_equal(keep, [True, True, True, True, False, False, False, False])


@pytest.mark.parametrize("n,ratio,expected", [(10, 0.8, 8), (8, 0.8, 6), (16, 0.947, 15),
                                              (2, 0.8, 1), (5, 0.5, 3), (5, 0.0, 0), (1, 0.9, 0),
                                              (100, 0.99, 99)])
def test_num_removed_rounds_to_nearest_and_keeps_one_group(n, ratio, expected):
  assert P.num_removed(n, ratio) == expected


@pytest.mark.parametrize("kind", ["irregular", "filter", "column", "2:4"])
def test_projection_is_idempotent(kind):
  w = jax.random.normal(jax.random.key(0), (3, 3, 8, 16))
  ratio = None if ":" in kind else 0.7
  once = P.project(w, kind, ratio)
  np.testing.assert_array_equal(P.project(once, kind, ratio), once)


@pytest.mark.parametrize("kind", ["irregular", "filter", "column", "2:4"])
def test_jit_with_static_ratio_matches_eager(kind):
  w = jax.random.normal(jax.random.key(1), (5, 5, 4, 8))
  ratio = None if ":" in kind else 0.6
  jitted = jax.jit(P.project, static_argnames=("kind", "ratio"))
  np.testing.assert_array_equal(jitted(w, kind=kind, ratio=ratio), P.project(w, kind, ratio))


@pytest.mark.parametrize("kind", ["irregular", "filter", "column", "2:4"])
def test_bfloat16_projection_matches_float32_choice(kind):
  w32 = jax.random.normal(jax.random.key(2), (3, 3, 8, 16)).astype(jnp.bfloat16).astype(jnp.float32)
  w16 = w32.astype(jnp.bfloat16)
  ratio = None if ":" in kind else 0.8
  out16 = P.project(w16, kind, ratio)
  assert out16.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(P.mask(w16, kind, ratio)),
                                np.asarray(P.mask(w32, kind, ratio)))
  np.testing.assert_array_equal(out16.astype(jnp.float32), P.project(w32, kind, ratio))


def test_large_irregular_projection_matches_numpy_sort():
  w = np.asarray(jax.random.normal(jax.random.key(3), (200_000,)))
  keep = np.asarray(P.mask(jnp.asarray(w), "irregular", 0.9))
  k = 200_000 - P.num_removed(200_000, 0.9)
  expected = np.zeros_like(keep)
  expected[np.argsort(-np.abs(w), kind="stable")[:k]] = True
  np.testing.assert_array_equal(keep, expected)


def _stable_top_k(scores, k):
  """Reference: the k largest scores, lower index first among equals (numpy stable sort)."""
  keep = np.zeros(scores.shape, bool)
  keep[np.argsort(-scores, kind="stable")[:k]] = True
  return keep


@pytest.mark.parametrize("n", [3 * P._ROW + 17, 4 * P._ROW])
def test_top_k_ties_spanning_many_rows_keep_the_lowest_indices(n):
  # Five levels only: thousands of entries tie at the threshold, across several count rows,
  # and the free slots run out at every position of a row as k varies.
  rng = np.random.default_rng(n)
  scores = rng.integers(0, 5, n).astype(np.float32)
  top_k = jax.jit(P.top_k_mask, static_argnums=1)
  for k in sorted({1, 2, n // 5, n // 3, n // 2 + 1, n - P._ROW + 3, n - 2, n - 1}):
    got = np.asarray(top_k(jnp.asarray(scores), k))
    assert got.sum() == k
    np.testing.assert_array_equal(got, _stable_top_k(scores, k), err_msg=f"k={k}")


def test_top_k_with_zero_scores_and_padding():
  # A threshold of exactly 0.0 (bit pattern 0) must not count the zero padding of the rows.
  scores = np.zeros(P._ROW + 5, np.float32)
  scores[[3, P._ROW // 2, P._ROW + 4]] = [2.0, 1.0, 3.0]
  for k in (2, 3, 4, 10, P._ROW + 4):
    got = np.asarray(P.top_k_mask(jnp.asarray(scores), k))
    np.testing.assert_array_equal(got, _stable_top_k(scores, k), err_msg=f"k={k}")


def _brute_force_nm(w, n, m):
  """Per (row-group of m along axis -2, output): keep the n largest |w|, lower index on ties."""
  w = np.asarray(w)
  cin, cout = w.shape[-2], w.shape[-1]
  x = np.abs(w).reshape(-1, cin // m, m, cout)
  keep = np.zeros_like(x, bool)
  for a, b, c in itertools.product(range(x.shape[0]), range(x.shape[1]), range(cout)):
    order = sorted(range(m), key=lambda i: (-x[a, b, i, c], i))
    keep[a, b, order[:n], c] = True
  return keep.reshape(w.shape)


@pytest.mark.parametrize("shape", [(8, 6), (3, 3, 8, 4)])
@pytest.mark.parametrize("nm", ["2:4", "1:4", "4:8"])
def test_n_m_keeps_n_largest_of_every_m_along_input_axis(shape, nm):
  n, m = map(int, nm.split(":"))
  w = jax.random.normal(jax.random.key(4), shape)
  keep = np.asarray(P.mask(w, nm, None))
  np.testing.assert_array_equal(keep, _brute_force_nm(w, n, m))
  # exactly n of every m
  x = keep.reshape(-1, shape[-2] // m, m, shape[-1]).sum(axis=2)
  assert (x == n).all()


def test_n_m_ties_break_towards_lower_index():
  w = jnp.ones((8, 2))
  keep = np.asarray(P.mask(w, "2:4", None))
  np.testing.assert_array_equal(keep[:, 0], [1, 1, 0, 0, 1, 1, 0, 0])


@pytest.mark.parametrize("kwargs,match", [
    (dict(kind="rows", ratio=0.5), "kind"),
    (dict(kind="filter", ratio=1.0), "ratio"),
    (dict(kind="filter", ratio=-0.1), "ratio"),
    (dict(kind="irregular", ratio=None), "ratio"),
    (dict(kind="2:4", ratio=0.3), "ratio"),
    (dict(kind="4:2", ratio=None), "kind"),
    (dict(kind="3:4x", ratio=None), "kind"),
])
def test_bad_arguments_name_the_argument(kwargs, match):
  with pytest.raises(ValueError, match=match):
    P.project(jnp.ones((4, 4)), **kwargs)


def test_structured_kinds_reject_vectors_and_n_m_needs_divisible_input_axis():
  with pytest.raises(ValueError, match="filter"):
    P.project(jnp.ones((4,)), "filter", 0.5)
  with pytest.raises(ValueError, match="divisible"):
    P.project(jnp.ones((6, 4)), "2:4", None)
