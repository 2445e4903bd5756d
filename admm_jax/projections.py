"""Exact Euclidean projections onto sparsity sets, for Flax weight layouts.

Layouts: conv kernels are (kh, kw, cin, cout) and dense kernels (in, out); the last axis is
always the output. A *group* is the unit that is kept or removed:

* ``"irregular"``: one weight.
* ``"filter"``: one output channel / neuron: the slice ``w[..., j]``.
* ``"column"``: one index of the flattened leading axes across all outputs: the row
  ``w.reshape(-1, cout)[i]`` (PyTorch's column of ``weight.reshape(out, -1)``).
* ``"n:m"`` (e.g. ``"2:4"``): in every run of m consecutive weights along the input axis
  (axis -2: ``cin`` for conv, ``in`` for dense), keep the n largest ``|w|``. This is the
  pattern sparse tensor cores accelerate. ``ratio`` must be ``None`` (it is 1 - n/m).

The Euclidean projection onto "at most k groups nonzero" keeps the k groups of largest L2
norm. We keep exactly k (a percentile threshold can drop more when norms tie at it).

Rounding: with ``n`` groups and ratio ``r``, ``num_removed = min(floor(r * n + 0.5), n - 1)``:
the nearest integer, halves rounded up, and at least one group always survives.

Ties: among groups of equal norm, the one with the lower (row-major) index is kept.

A budget shared by several layers (`shared_keep`, a spec entry marked ``"global"`` in
`admm_jax.sparsity`) counts groups: with layers of n_1, ..., n_L groups (all of one kind),
``k = n - num_removed(n, ratio)`` of the n = sum n_i groups are kept, the same rounding, and at
least one group of every layer (a ratio that keeps fewer than L groups is an error). The exact
projection onto "at most k groups nonzero in total, at least one in each layer" keeps every
layer's largest group, then the k - L largest of the remaining groups of all layers: exact
whatever the group sizes, because the set counts groups, not weights. (Counting weights
when groups differ in size, e.g. filters of a 5x5x1 and a 5x5x20 kernel, would make the
projection a knapsack problem; we do not do that.) Ties: the lower index in the layers'
order, then row-major, wins.

Norms are computed in float32 whatever the weight dtype (bfloat16 weights are projected by
the same choice as their float32 values); the result keeps the input dtype. ``kind`` and
``ratio`` are Python values: static under ``jax.jit``.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

STRUCTURED_KINDS = ("irregular", "filter", "column")
_NM_PATTERN = re.compile(r"^(\d+):(\d+)$")


def parse_n_m(kind: str) -> tuple[int, int] | None:
  """Returns (n, m) for an ``"n:m"`` kind, None for other kinds.

  Raises:
    ValueError: a malformed ``n:m`` kind (n must be in [1, m)).
  """
  if not isinstance(kind, str) or ":" not in kind:
    return None
  match = _NM_PATTERN.match(kind)
  if not match or not 1 <= int(match.group(1)) < int(match.group(2)):
    raise ValueError(f"kind {kind!r} is not a valid N:M pattern: write 'n:m' with "
                     "1 <= n < m, e.g. '2:4'.")
  return int(match.group(1)), int(match.group(2))


def validate(kind: str, ratio: float | None, shape: tuple[int, ...] | None = None,
             where: str = "") -> None:
  """Checks a (kind, ratio) pair, and the weight shape if given; raises one clear ValueError."""
  at = f" for {where}" if where else ""
  n_m = parse_n_m(kind)
  if n_m is None:
    if kind not in STRUCTURED_KINDS:
      raise ValueError(f"kind {kind!r}{at} is unknown: use one of "
                       f"{', '.join(STRUCTURED_KINDS)} or an N:M pattern such as '2:4'.")
    if (isinstance(ratio, bool) or not isinstance(ratio, (int, float))
        or not 0.0 <= ratio < 1.0):
      raise ValueError(f"ratio {ratio!r}{at} is invalid: the fraction of groups removed must "
                       "be a number in [0, 1).")
  elif ratio is not None:
    raise ValueError(f"ratio {ratio!r}{at} must be None for the N:M kind {kind!r} "
                     "(the pattern fixes the ratio).")
  if shape is None:
    return
  if kind != "irregular" and len(shape) < 2:
    raise ValueError(f"kind {kind!r}{at} needs a kernel with at least 2 axes, got shape "
                     f"{tuple(shape)}: use 'irregular' for vectors such as BatchNorm scales.")
  if n_m is not None and shape[-2] % n_m[1]:
    raise ValueError(f"kind {kind!r}{at}: the input axis (axis -2, size {shape[-2]}) must be "
                     f"divisible by m={n_m[1]}.")


def num_groups(shape: tuple[int, ...], kind: str) -> int:
  """Number of groups of `kind` in a weight of `shape` (for N:M: number of weights)."""
  if kind == "filter":
    return int(shape[-1])
  if kind == "column":
    return int(math.prod(shape[:-1]))
  return int(math.prod(shape))


def num_removed(n: int, ratio: float) -> int:
  """Groups removed out of n at `ratio`: nearest integer (halves up), at least one group kept."""
  return max(0, min(int(math.floor(ratio * n + 0.5)), n - 1))


def group_sq_norms(w: jax.Array, kind: str) -> jax.Array:
  """Squared L2 norm of every group, float32, shape (num_groups,)."""
  x = jnp.asarray(w).astype(jnp.float32)
  if kind == "irregular":
    return jnp.square(x).reshape(-1)
  x = x.reshape(-1, x.shape[-1])
  return jnp.sum(jnp.square(x), axis=0 if kind == "filter" else 1)


_ROW = 64  # Entries per row in `top_k_mask`'s layout; int8 column counts need _ROW <= 127.


def top_k_mask(scores: jax.Array, k: int) -> jax.Array:
  """Boolean mask of the k largest entries of a non-negative float32 vector; lower index wins ties.

  Bisection on the float bit patterns (their integer order is the order of non-negative
  floats) finds the k-th largest value in 31 counting passes: O(31 n) and no sort, which on
  CPU is far faster than a sort-based top-k for millions of weights. Exactly k entries are
  kept: of the entries equal to the threshold, the lowest-index ones fill the free slots.

  The entries are padded to a multiple of `_ROW`. A count views them as (_ROW, rows) and
  adds the comparisons over the major axis, in int8 (each sum is at most _ROW): that is
  elementwise vector adds, where summing each run of _ROW consecutive entries made XLA:CPU
  reduce row by row (2-3x slower; a count does not care about the order). Ties cost one more
  pass: only the row where the free slots run out needs a prefix count, not the whole vector
  (a full cumsum took as long as the bisection).
  """
  n = scores.shape[0]
  if k >= n:
    return jnp.ones((n,), bool)
  if k <= 0:
    return jnp.zeros((n,), bool)
  bits = lax.bitcast_convert_type(jnp.maximum(scores, 0.0), jnp.uint32)
  rows = -(-n // _ROW)
  pad = rows * _ROW - n
  # Padding entries are 0 and sit after every real entry, so they never win a tie.
  padded = jnp.pad(bits, (0, pad))
  by_column = padded.reshape(_ROW, rows)

  def count_ge(t):
    total = jnp.sum(jnp.sum(by_column >= t, axis=0, dtype=jnp.int8), dtype=jnp.int32)
    return total - jnp.where(t == 0, pad, 0)

  def bisect(_, bounds):
    lo, hi = bounds  # invariant: count(bits >= lo) >= k > count(bits >= hi)
    mid = lo + (hi - lo) // 2
    enough = count_ge(mid) >= k
    return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

  # 31 halvings take hi - lo from 2^31 to 1: lo is then the k-th largest bit pattern.
  lo, _ = lax.fori_loop(0, 31, bisect, (jnp.uint32(0), jnp.uint32(0x80000000)))
  bits2d = padded.reshape(rows, _ROW)
  above = bits2d > lo
  at = bits2d == lo
  slots = k - count_ge(lo + 1)
  # Entries at the threshold, row by row: rows before `last` fit whole; in row `last` the
  # first `slots - before` of them fit; rows after it get none.
  at_per_row = jnp.sum(at, axis=1, dtype=jnp.int32)
  through = jnp.cumsum(at_per_row)
  last = jnp.minimum(jnp.sum(through < slots), rows - 1)
  before = through[last] - at_per_row[last]
  in_last = jnp.cumsum(lax.dynamic_index_in_dim(at, last, keepdims=False), dtype=jnp.int32)
  row = lax.broadcasted_iota(jnp.int32, (rows, _ROW), 0)
  fits = jnp.where(row == last, in_last[None, :] <= slots - before, row < last)
  return (above | (at & fits)).reshape(-1)[:n]


def group_keep(w: jax.Array, kind: str, ratio: float | None) -> jax.Array:
  """Boolean keep-vector over the groups of `w` (for N:M: over all weights, flattened)."""
  if parse_n_m(kind) is not None:
    return mask(w, kind, ratio).reshape(-1)
  validate(kind, ratio, tuple(w.shape))
  n = num_groups(w.shape, kind)
  return top_k_mask(group_sq_norms(w, kind), n - num_removed(n, ratio))


def _n_m_mask(w: jax.Array, n: int, m: int) -> jax.Array:
  x = jnp.abs(jnp.asarray(w).astype(jnp.float32))
  shape = x.shape
  x = x.reshape(shape[:-2] + (shape[-2] // m, m, shape[-1]))
  # Rank of each weight inside its run of m: how many beat it (larger, or equal and earlier).
  a, b = jnp.expand_dims(x, -2), jnp.expand_dims(x, -3)  # a: index i, b: index j
  i = jnp.arange(m)
  earlier = (i[None, :] < i[:, None])[:, :, None]        # [i, j]: j comes before i
  beats = (b > a) | ((b == a) & earlier)
  rank = jnp.sum(beats, axis=-2)
  return (rank < n).reshape(shape)


def mask(w: jax.Array, kind: str, ratio: float | None) -> jax.Array:
  """Boolean keep-mask of the Euclidean projection of `w` onto the sparsity set.

  Args:
    w: weight, conv (kh, kw, cin, cout), dense (in, out) or, for "irregular", any shape.
    kind: "irregular", "filter", "column" or an N:M pattern such as "2:4".
    ratio: fraction of groups removed, in [0, 1); None for N:M kinds.

  Returns:
    bool array of w's shape: True where the weight is kept.
  """
  validate(kind, ratio, tuple(jnp.shape(w)))
  n_m = parse_n_m(kind)
  if n_m is not None:
    return _n_m_mask(w, *n_m)
  keep = group_keep(w, kind, ratio)
  if kind == "irregular":
    return keep.reshape(w.shape)
  cout = w.shape[-1]
  rows = keep[None, :] if kind == "filter" else keep[:, None]
  return jnp.broadcast_to(rows, (num_groups(w.shape, "column"), cout)).reshape(w.shape)


def project(w: jax.Array, kind: str, ratio: float | None) -> jax.Array:
  """Euclidean projection of `w` onto the sparsity set (kind, ratio); same shape and dtype.

  See `mask` for the arguments and the module docstring for rounding and ties.
  """
  return jnp.where(mask(w, kind, ratio), w, jnp.zeros((), jnp.asarray(w).dtype))


def mask_from_scores(scores: jax.Array, kind: str, ratio: float | None) -> jax.Array:
  """Keep-mask of the groups of `kind` with the largest summed non-negative per-weight score.

  With scores = w^2 this is `mask(w, kind, ratio)`; other scores give the exact projection
  onto other sets with the same sparsity structure (`quantization.sparse_codes` scores each
  weight by what keeping its nearest grid level saves). Same rounding and ties as `mask`.
  """
  x = jnp.asarray(scores, jnp.float32)
  validate(kind, ratio, tuple(x.shape))
  n_m = parse_n_m(kind)
  if n_m is not None:
    return _n_m_mask(x, *n_m)
  if kind == "irregular":
    groups = x.reshape(-1)
  else:
    groups = jnp.sum(x.reshape(-1, x.shape[-1]), axis=0 if kind == "filter" else 1)
  n = num_groups(x.shape, kind)
  keep = top_k_mask(groups, n - num_removed(n, ratio))
  if kind == "irregular":
    return keep.reshape(x.shape)
  rows = keep[None, :] if kind == "filter" else keep[:, None]
  return jnp.broadcast_to(rows, (num_groups(x.shape, "column"), x.shape[-1])).reshape(x.shape)


def groups_to_mask(keep: jax.Array, shape: tuple[int, ...], kind: str) -> jax.Array:
  """The weight-shaped keep-mask of a keep-vector over the groups of `kind` (not N:M).

  Args:
    keep: (num_groups(shape, kind),) values, one per group (bool, or a score to broadcast).
    shape: the weight's shape.
    kind: "irregular", "filter" or "column".

  Returns:
    An array of `shape`: every weight gets its group's value.
  """
  if kind == "irregular":
    return keep.reshape(shape)
  rows = keep[None, :] if kind == "filter" else keep[:, None]
  return jnp.broadcast_to(rows, (num_groups(shape, "column"), shape[-1])).reshape(shape)


def num_kept_shared(sizes: Sequence[int], ratio: float, where: str = "") -> int:
  """Groups kept by one budget shared by layers of `sizes` groups (module docstring).

  Raises:
    ValueError: the ratio keeps fewer groups than there are layers (a layer would be empty).
  """
  n = int(sum(sizes))
  kept = n - num_removed(n, ratio)
  if kept < len(sizes):
    at = f" for {where}" if where else ""
    most = (n - len(sizes)) / n
    raise ValueError(f"global ratio {ratio!r}{at} keeps {kept} of {n} groups, fewer than its "
                     f"{len(sizes)} layers, and every layer keeps at least one group: use a "
                     f"ratio of at most {most:.6f}.")
  return kept


def shared_keep(scores: Sequence[jax.Array], ratio: float) -> list[jax.Array]:
  """Keep-vectors of one budget shared by several layers: the exact top-k over all of them.

  Args:
    scores: one non-negative float vector per layer, a score per group (e.g.
      `group_sq_norms(w, kind)`: then this is the Euclidean projection onto the shared set).
    ratio: fraction of all their groups removed, in [0, 1).

  Returns:
    One bool vector per layer: every layer's best group (lowest index among equals), then the
    largest of the rest across all layers, `num_kept_shared` in total; ties keep the lower
    index in the concatenation of the layers.
  """
  sizes = [int(s.shape[0]) for s in scores]
  kept = num_kept_shared(sizes, ratio)
  flat = jnp.concatenate([jnp.maximum(jnp.asarray(s, jnp.float32), 0.0) for s in scores])
  offsets = [0]
  for size in sizes:
    offsets.append(offsets[-1] + size)
  # Each layer's best group is kept whatever the others hold: +inf outranks every score.
  best = jnp.stack([off + jnp.argmax(flat[off:off + size])
                    for off, size in zip(offsets, sizes)])
  keep = top_k_mask(flat.at[best].set(jnp.inf), kept)
  return [keep[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
