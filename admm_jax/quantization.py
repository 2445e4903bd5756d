"""Projections onto k-bit symmetric uniform grids, alone or with a sparsity set.

The grid of `bits` bits with scale s is {s * c : c integer, |c| <= L}, L = 2^(bits-1) - 1
(symmetric: int8 codes in [-127, 127], int4 in [-7, 7], 2 bits is ternary {-s, 0, s}). The
scale is one number per layer (``scale_mode="layer"``) or one per output channel, the last
axis of the Flax layouts (``"channel"``).

For a FIXED scale both projections are exact (tests/test_quantization.py enumerates every
assignment of tiny tensors):

* onto the grid: round w / s to the nearest integer and clip to [-L, L], entry by entry
  (`codes`);
* onto the grid AND a sparsity set of `projections` (at most k groups nonzero): quantize every
  entry to its nearest level q, score it by the gain of keeping it, w^2 - (w - q)^2 >= 0 (what
  keeping it saves over setting it to 0; 0 where the nearest level is 0), and keep the k groups
  whose summed gain is largest (`sparse_codes`). Pruning by magnitude and then rounding is not
  this projection in general: for one weight the gain grows with |w|, so irregular
  pruning with one scale per layer keeps the same weights either way, but a group's summed
  gain is not its norm (filter, column, N:M) and per-channel scales weigh channels differently:
  of the filters [1.8, 0] and [1.2, 1.2] on the ternary grid of scale 1, magnitude keeps the
  first (norm^2 3.24 > 2.88), the projection the second (gain 2.8 > 2.6).

The scale: for fixed codes c, ||w - s c||^2 is smallest at s = <w, c> / <c, c> (per layer, or
per output channel over its slice) (`best_scale`). `project` alternates the two exact steps,
from s = max|w| / L: the distance never grows, so it reaches a LOCAL optimum of the joint
problem in (scale, codes), not necessarily the global one (the joint problem is not convex).

Values are computed in float32 whatever the weight dtype; ``bits``, ``scale_mode``, ``kind``
and ``ratio`` are Python values: static under ``jax.jit``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from admm_jax import projections

MIN_BITS, MAX_BITS = 2, 8
SCALE_MODES = ("channel", "layer")
ITERATIONS = 8   # alternations of `project`; the distance has stopped moving by then in practice


def levels(bits: int) -> int:
  """L, the largest code of the symmetric `bits`-bit grid: 2^(bits-1) - 1."""
  return 2 ** (bits - 1) - 1


def validate(bits: int, scale_mode: str = "channel", shape: tuple[int, ...] | None = None,
             where: str = "") -> None:
  """Checks bits (an integer in [2, 8]), the scale mode and, if given, the weight's shape."""
  at = f" for {where}" if where else ""
  if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
    raise ValueError(f"bits {bits!r}{at} is invalid: use an integer from {MIN_BITS} to "
                     f"{MAX_BITS} (e.g. 4 for int4, 8 for int8).")
  if scale_mode not in SCALE_MODES:
    raise ValueError(f"scale mode {scale_mode!r}{at} is unknown: use 'channel' (a scale per "
                     "output channel) or 'layer' (one scale).")
  if shape is not None and len(shape) < 2:
    raise ValueError(f"a {bits}-bit grid{at} needs a conv or dense kernel, got a weight of "
                     f"shape {tuple(shape)} (a bias or BatchNorm vector): there are no weights "
                     "to quantize there; drop the bits from that entry.")


def _reduce_axes(w: jax.Array, scale_mode: str) -> tuple[int, ...]:
  return tuple(range(w.ndim - 1)) if scale_mode == "channel" else tuple(range(w.ndim))


def initial_scale(w: jax.Array, bits: int, scale_mode: str = "channel") -> jax.Array:
  """max|w| / L (per output channel or per layer): the grid just covers w without clipping.

  Shape (cout,) for "channel", () for "layer"; 1.0 where w is all zero (any scale fits it).
  """
  m = jnp.max(jnp.abs(jnp.asarray(w, jnp.float32)), axis=_reduce_axes(w, scale_mode))
  return jnp.where(m > 0, m / levels(bits), 1.0)


def codes(w: jax.Array, scale: jax.Array, bits: int) -> jax.Array:
  """The exact projection onto the grid as integer codes: clip(round(w / s), -L, L), float32.

  `scale` broadcasts against w's last axis (shape (cout,) or ()); it must be > 0.
  """
  L = levels(bits)
  return jnp.clip(jnp.round(jnp.asarray(w, jnp.float32) / scale), -L, L)


def gains(w: jax.Array, scale: jax.Array, bits: int) -> jax.Array:
  """w^2 - (w - q)^2 >= 0 per entry, q its nearest grid level: what keeping it saves."""
  x = jnp.asarray(w, jnp.float32)
  q = codes(x, scale, bits) * scale
  return jnp.maximum(jnp.square(x) - jnp.square(x - q), 0.0)


def sparse_codes(w: jax.Array, scale: jax.Array, bits: int, kind: str,
                 ratio: float | None) -> jax.Array:
  """Codes of the exact projection onto grid AND sparsity set (kind, ratio), for a fixed scale.

  Every entry goes to its nearest level; the groups kept are those of largest summed gain
  (see the module docstring); the others are 0. Same group counting, rounding and ties as
  `projections.mask`.
  """
  c = codes(w, scale, bits)
  keep = projections.mask_from_scores(gains(w, scale, bits), kind, ratio)
  return jnp.where(keep, c, 0.0)


def best_scale(w: jax.Array, c: jax.Array, scale_mode: str = "channel",
               fallback: jax.Array | float = 1.0) -> jax.Array:
  """The s minimising ||w - s c||^2 for fixed codes c: <w, c> / <c, c> (per channel or layer).

  Where c is all zero any s is as good: `fallback` is returned there.
  """
  axes = _reduce_axes(w, scale_mode)
  x = jnp.asarray(w, jnp.float32)
  cc = jnp.sum(jnp.square(c), axis=axes)
  wc = jnp.sum(x * c, axis=axes)
  # A fitted scale is > 0: rounding gives codes of w's sign, so <w, c> > 0 when c != 0.
  return jnp.where(cc > 0, wc / jnp.where(cc > 0, cc, 1.0), fallback)


def project_with_scale(w: jax.Array, scale: jax.Array, bits: int, kind: str | None = None,
                       ratio: float | None = None) -> jax.Array:
  """The exact projection for a fixed scale, as weights (w's shape and dtype)."""
  c = codes(w, scale, bits) if kind is None else sparse_codes(w, scale, bits, kind, ratio)
  return (c * scale).astype(jnp.asarray(w).dtype)


def fit(w: jax.Array, bits: int, scale_mode: str = "channel", kind: str | None = None,
        ratio: float | None = None, iterations: int = ITERATIONS) -> tuple[jax.Array, jax.Array]:
  """(codes, scale) of a local optimum of min ||w - s c||^2 over scales and (sparse) codes.

  Alternates the exact code step for the current scale and the closed-form scale for those
  codes, `iterations` times from `initial_scale`, then takes the code step once more. The
  distance is non-increasing along the way. `kind`/`ratio` add a sparsity set (None: none).
  """
  validate(bits, scale_mode)
  if kind is not None:
    projections.validate(kind, ratio, tuple(jnp.shape(w)))
  assign = (lambda s: codes(w, s, bits)) if kind is None else (
      lambda s: sparse_codes(w, s, bits, kind, ratio))
  s0 = initial_scale(w, bits, scale_mode)
  scale = lax.fori_loop(0, iterations,
                        lambda _, s: best_scale(w, assign(s), scale_mode, fallback=s), s0)
  return assign(scale), scale


def project(w: jax.Array, bits: int, scale_mode: str = "channel", kind: str | None = None,
            ratio: float | None = None, iterations: int = ITERATIONS) -> jax.Array:
  """`fit`'s point s * c as weights (w's shape and dtype): ADMM's Z-step onto the grid."""
  c, scale = fit(w, bits, scale_mode, kind, ratio, iterations)
  return (c * scale).astype(jnp.asarray(w).dtype)


def recover(w, bits: int, scale_mode: str = "channel", rtol: float = 1e-4):
  """(int8 codes, float32 scale) of a weight already on a `bits`-bit grid, or None if it is not.

  On the host (numpy), for export: per channel or per layer, the largest scale s for which
  every w / s is an integer in [-L, L] (up to `rtol`), among min|w != 0| / m, m = 1..L.
  Exported codes times the scale give back w within float32 rounding.
  """
  import numpy as np  # pylint: disable=import-outside-toplevel
  x = np.asarray(w, np.float32)
  L = levels(bits)
  flat = x.reshape(-1, x.shape[-1]) if scale_mode == "channel" else x.reshape(-1, 1)
  out_c = np.zeros(flat.shape, np.int8)
  scales = np.ones(flat.shape[1], np.float32)
  for j in range(flat.shape[1]):
    col = flat[:, j].astype(np.float64)
    nz = np.abs(col[col != 0])
    if not nz.size:
      continue
    for m in range(1, L + 1):
      s = nz.min() / m
      q = np.round(col / s)
      if np.max(np.abs(q)) <= L and np.all(np.abs(col / s - q) <= rtol * np.maximum(1, np.abs(q))):
        out_c[:, j], scales[j] = q.astype(np.int8), s
        break
    else:
      return None
  codes_out = out_c.reshape(x.shape)
  return codes_out, (scales if scale_mode == "channel" else scales.reshape(()))
