"""The k-bit grid projections are exact for a fixed scale (brute force over every assignment)."""
import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from admm_jax import projections as P
from admm_jax import quantization as Q


def _all_codes(n, bits):
  L = Q.levels(bits)
  return np.array(list(itertools.product(range(-L, L + 1), repeat=n)), np.float32)


def _feasible(codes, shape, kind, ratio):
  """Which code vectors (rows) lie in the sparsity set (kind, ratio) of `shape`."""
  if kind is None:
    return np.ones(len(codes), bool)
  c = codes.reshape((-1,) + shape) != 0
  n_m = P.parse_n_m(kind)
  if n_m is not None:
    n, m = n_m
    runs = c.reshape((len(codes),) + shape[:-2] + (shape[-2] // m, m, shape[-1]))
    return np.all(runs.sum(axis=-2) <= n, axis=tuple(range(1, runs.ndim - 1)))
  flat = c.reshape(len(codes), -1, shape[-1])
  if kind == "irregular":
    groups = flat.reshape(len(codes), -1)
  else:
    groups = flat.any(axis=1) if kind == "filter" else flat.any(axis=2)
  total = P.num_groups(shape, kind)
  return groups.sum(axis=1) <= total - P.num_removed(total, ratio)


def _brute_force_distance(w, scale, bits, kind, ratio):
  codes = _all_codes(w.size, bits)
  ok = _feasible(codes, w.shape, kind, ratio)
  points = codes[ok].reshape((-1,) + w.shape) * scale
  return np.min(np.sum((points - w) ** 2, axis=tuple(range(1, w.ndim + 1))))


CASES = [  # shape, bits, kind, ratio
    ((3, 2), 2, None, None), ((3, 2), 3, None, None), ((2, 3), 3, None, None),
    ((3, 2), 2, "irregular", 0.5), ((3, 2), 3, "irregular", 0.7),
    ((2, 3), 3, "filter", 0.3), ((2, 3), 2, "filter", 0.7),
    ((3, 2), 3, "column", 0.5), ((4, 2), 2, "2:4", None), ((1, 1, 2, 3), 3, "filter", 0.5),
]


@pytest.mark.parametrize("scale_mode", ["layer", "channel"])
@pytest.mark.parametrize("shape,bits,kind,ratio", CASES)
def test_projection_for_a_fixed_scale_equals_brute_force(shape, bits, kind, ratio, scale_mode):
  rng = np.random.default_rng(hash((shape, bits, kind, scale_mode)) % 2**32)
  w = rng.standard_normal(shape).astype(np.float32)
  cout = shape[-1]
  scale = (rng.uniform(0.2, 0.8, cout) if scale_mode == "channel" else
           np.float32(rng.uniform(0.2, 0.8))).astype(np.float32)
  got = np.asarray(Q.project_with_scale(jnp.asarray(w), jnp.asarray(scale), bits, kind, ratio))
  codes = got / scale
  np.testing.assert_allclose(codes, np.round(codes), atol=1e-5)
  assert np.max(np.abs(codes)) <= Q.levels(bits) + 1e-5
  assert _feasible(np.round(codes).reshape(1, -1), shape, kind, ratio)[0]
  np.testing.assert_allclose(np.sum((got - w) ** 2),
                             _brute_force_distance(w, scale, bits, kind, ratio), rtol=1e-5)


def test_grid_projection_rounds_and_clips():
  w = jnp.array([[-3.0], [-0.26], [0.24], [0.5], [0.76], [9.0]])
  np.testing.assert_array_equal(np.asarray(Q.codes(w, jnp.float32(0.5), 3)).ravel(),
                                [-3, -1, 0, 1, 2, 3])  # 0.5/0.5 = 1; 9/0.5 clipped to L=3


def test_sparse_projection_is_not_magnitude_pruning_then_rounding():
  # Filters [1.8, 0] (norm^2 3.24, gain 2.6) and [1.2, 1.2] (norm^2 2.88, gain 2.8).
  w = jnp.array([[1.8, 1.2], [0.0, 1.2]])
  got = np.asarray(Q.project_with_scale(w, jnp.float32(1.0), 2, "filter", 0.5))
  np.testing.assert_array_equal(got, [[0, 1], [0, 1]])
  magnitude = np.asarray(Q.codes(P.project(w, "filter", 0.5), jnp.float32(1.0), 2))
  np.testing.assert_array_equal(magnitude, [[1, 0], [0, 0]])
  assert np.sum((got - w) ** 2) < np.sum((magnitude - w) ** 2)


@pytest.mark.parametrize("scale_mode", ["layer", "channel"])
def test_best_scale_is_the_least_squares_scale(scale_mode):
  rng = np.random.default_rng(1)
  w = rng.standard_normal((5, 3)).astype(np.float32)
  c = rng.integers(-3, 4, (5, 3)).astype(np.float32)
  s = np.asarray(Q.best_scale(jnp.asarray(w), jnp.asarray(c), scale_mode))
  grid = np.linspace(-3, 3, 60001)
  if scale_mode == "layer":
    errors = [np.sum((w - t * c) ** 2) for t in grid]
    assert abs(grid[int(np.argmin(errors))] - s) < 2e-4
  else:
    for j in range(3):
      errors = np.sum((w[:, j, None] - grid[None] * c[:, j, None]) ** 2, axis=0)
      assert abs(grid[int(np.argmin(errors))] - s[j]) < 2e-4


def test_best_scale_keeps_the_fallback_where_codes_are_zero():
  w = jnp.ones((2, 2))
  c = jnp.array([[1.0, 0.0], [1.0, 0.0]])
  np.testing.assert_allclose(np.asarray(Q.best_scale(w, c, "channel", fallback=7.0)), [1.0, 7.0])


@pytest.mark.parametrize("kind,ratio", [(None, None), ("irregular", 0.6), ("filter", 0.5)])
def test_alternating_fit_never_increases_the_distance(kind, ratio):
  rng = np.random.default_rng(2)
  w = jnp.asarray(rng.standard_normal((6, 4)).astype(np.float32))
  distances = []
  for iterations in range(6):
    c, s = Q.fit(w, 3, "channel", kind, ratio, iterations=iterations)
    distances.append(float(jnp.sum((c * s - w) ** 2)))
  assert all(b <= a + 1e-6 for a, b in zip(distances, distances[1:]))
  assert distances[-1] < distances[0]
  # The end point is a fixed point of the code step: the exact projection for its own scale.
  c, s = Q.fit(w, 3, "channel", kind, ratio)
  p = Q.project_with_scale(w, s, 3, kind, ratio)
  np.testing.assert_allclose(np.asarray(c * s), np.asarray(p), atol=1e-6)


@pytest.mark.parametrize("scale_mode", ["layer", "channel"])
def test_recover_reads_back_codes_and_scales_of_a_grid_weight(scale_mode):
  rng = np.random.default_rng(3)
  w = jnp.asarray(rng.standard_normal((3, 3, 2, 4)).astype(np.float32))
  q = np.asarray(Q.project(w, 4, scale_mode, "irregular", 0.5))
  codes, scale = Q.recover(q, 4, scale_mode)
  assert codes.dtype == np.int8 and np.max(np.abs(codes)) <= 7
  np.testing.assert_allclose(codes * scale, q, rtol=1e-6, atol=1e-7)
  assert Q.recover(np.asarray(w), 4, scale_mode) is None


@pytest.mark.parametrize("bits", [1, 9, 4.0, True, "4"])
def test_bits_outside_2_to_8_are_refused(bits):
  with pytest.raises(ValueError, match="from 2 to 8"):
    Q.validate(bits)


def test_a_grid_on_a_vector_is_refused():
  with pytest.raises(ValueError, match="no weights to quantize"):
    Q.validate(4, "channel", (16,), where="parameter 'bn/scale'")
