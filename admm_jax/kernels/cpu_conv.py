"""2-D convolutions that are fast on XLA:CPU, and the per-layer rule that picks one.

On XLA:CPU, `lax.conv_general_dilated` with its gradients is slow inside the PGD loop of
adversarial training. `Conv` (a drop-in for `flax.linen.Conv`: same parameters) instead
picks per layer (`cpu_conv_impl`) one of: im2col, one matmul over kh*kw shifted slices of
the padded input; "hybrid", XLA's forward convolution with an input gradient that XLA also
runs as a forward convolution; "fft", the convolution theorem with the DFTs as small
matmuls, several times fewer flops for wide layers; "toeplitz", one GEMM against a banded
kernel matrix, for narrow layers. The kernel gradients of im2col and hybrid layers loop
over batch chunks when their patch matrix would leave the CPU's caches.
All compute the same mathematics as `lax.conv_general_dilated` (tested to float32
round-off, values and gradients). The rule and the thresholds were measured on one 2-core
AVX2 machine; off CPU, XLA's own convolutions are the better choice, and the models use
`flax.linen.Conv` unless asked for these (`admm_jax.models.conv_module`).
Layouts follow Flax: inputs NHWC, kernels (kh, kw, cin, cout).

Size: one module because the four kernels and the rule that picks among them are tuned
together (the thresholds compare the kernels' measured costs); each kernel is a small section.
"""
from collections.abc import Sequence
import functools
from typing import Any

import jax
from jax import lax
from jax.custom_derivatives import SymbolicZero
import jax.numpy as jnp
from flax import linen as nn
import numpy as np

from admm_jax.kernels import CONV_IMPLS

Padding = str | Sequence[tuple[int, int]]


def cpu_conv_impl(out_hw: Sequence[int], kernel_shape: Sequence[int],
                  strides: Sequence[int]) -> str:
  """The fastest convolution for one layer on XLA:CPU: "toeplitz", "fft", "hybrid" or "im2col".

  Forward plus input gradient (the PGD pass) inside a `fori_loop` on 2 AVX2 cores, ms per
  pass, batch 64 (LeNet layers) / 128 (VGG, ResNet layers), jax 0.10.2, one run:

    ===============================  ======  ======  =====  ==========
    layer (out map, k, cin -> cout)  im2col  hybrid  fft    decision
    ===============================  ======  ======  =====  ==========
    14x14, 5x5, 32 -> 64 (LeNet(16))  41.5    48.6    16.2   fft
    14x14, 5x5, 16 -> 32 (LeNet(8))   15.7    11.6    6.2    fft
    16x16, 3x3, 32 -> 32              25.0    21.7    19.0   fft
    8x8, 3x3, 64 -> 64                14.3    20.0    10.7   fft
    8x8, 3x3, 32 -> 64                8.2     10.7    8.6    fft (a tie)
    14x14, 5x5, 8 -> 16 (LeNet(4))    4.6     2.9     3.2    hybrid
    32x32, 3x3, 16 -> 16 (VGG(4))     49.4    20.1    42.7   hybrid
    16x16, 3x3, 16 -> 32              12.7    12.6    14.7   hybrid
    28x28, 5x5, 1 -> 32 (LeNet(16))   5.3     12.3    15.3   im2col (cin < 8)
    32x32, 3x3, 3 -> 16               11.5    19.7    29.5   im2col
    4x4, 3x3, 64 -> 128               6.4     11.7    9.5    im2col (small map)
    2x2, 3x3, 128 -> 128              3.4     47.5    7.2    im2col
    ===============================  ======  ======  =====  ==========

  and, in another run, with "toeplitz" (`conv2d_toeplitz`):

    ===============================  ======  ======  =====  ========  ========
    layer (out map, k, cin -> cout)  im2col  hybrid  fft    toeplitz  decision
    ===============================  ======  ======  =====  ========  ========
    28x28, 5x5, 1 -> 2 (LeNet(1))     4.6     10.3    2.4    1.4       toeplitz
    28x28, 5x5, 1 -> 8 (LeNet(4))     3.4     8.2     3.6    2.4       toeplitz
    14x14, 5x5, 2 -> 4 (LeNet(1))     1.2     4.3     1.4    0.6       toeplitz
    14x14, 5x5, 4 -> 8 (LeNet(2))     1.7     3.2     1.7    1.5       toeplitz
    28x28, 5x5, 1 -> 16 (LeNet(8))    5.7     11.2    12.0   6.4       im2col
    14x14, 5x5, 8 -> 16 (LeNet(4))    4.6     3.3     3.1    4.9       hybrid
    32x32, 3x3, 3 -> 16 (VGG(4))      11.1    20.0    29.2   30.2      im2col
    ===============================  ======  ======  =====  ========  ========

  Hence, at stride 1 and kernels larger than 1x1: "toeplitz" for narrow layers (cout <= 8,
  cin * cout <= 32) whose padded width is at most 8 kernel widths (its band wastes
  padded_w / kw of the flops); "fft" for cin >= 16, kh * kw * cin * cout >= 9216 (the
  per-frequency channel matmuls dominate its transforms) and maps of at least 8x8; "hybrid"
  for cin >= 8, cin * cout <= 1024 and maps of at least 14x14 (XLA's convolutions fall off
  a cliff below 8 channels and on small maps); "im2col" for the rest and for strided layers.
  Timings vary by 10-20 % between runs; the decisions held in two sweeps. Another XLA or CPU
  may move the boundaries; `Conv(impl=...)` (or `model.conv_impl` in a config) overrides
  this choice for every layer.

  Args:
    out_hw: output (height, width).
    kernel_shape: (kh, kw, cin, cout).
    strides: (sh, sw).
  """
  kh, kw, cin, cout = kernel_shape
  if tuple(strides) != (1, 1) or kh * kw == 1:
    return "im2col"
  if cout <= 8 and cin * cout <= 32 and out_hw[1] + kw - 1 <= 8 * kw:
    return "toeplitz"
  if cin >= 16 and kh * kw * cin * cout >= 9216 and min(out_hw) >= 8:
    return "fft"
  if cin >= 8 and cin * cout <= 1024 and out_hw[0] * out_hw[1] >= 14 * 14:
    return "hybrid"
  return "im2col"


def resolve_conv_impl(impl: str, out_hw: Sequence[int] | None = None,
                      kernel_shape: Sequence[int] | None = None,
                      strides: Sequence[int] = (1, 1)) -> str:
  """Returns the concrete convolution implementation for `impl`.

  Args:
    impl: "im2col", "xla", "hybrid", "fft", "toeplitz" or "auto". "auto" picks "xla" off
      CPU (GPU/TPU have fast native convolutions and their gradients). On CPU it picks
      `cpu_conv_impl` for the layer when its shapes are given, else "im2col": XLA:CPU's
      own convolution gradients are slow (a PGD-10 step of LeNet(16) ran 2.3x, of VGG16(4)
      and ResNet18(4) 3x faster with im2col than with "xla"), and the per-layer choice
      between the four others gains up to 3x more on a layer.
    out_hw: the layer's output (height, width), for "auto" on CPU.
    kernel_shape: the layer's (kh, kw, cin, cout), for "auto" on CPU.
    strides: the layer's strides, for "auto" on CPU.

  Returns:
    "im2col", "xla", "hybrid", "fft" or "toeplitz".
  """
  if impl not in CONV_IMPLS:
    raise ValueError(f"Conv impl must be one of {CONV_IMPLS}, got {impl!r}.")
  if impl == "auto":
    if jax.default_backend() != "cpu":
      impl = "xla"
    elif out_hw is None or kernel_shape is None:
      impl = "im2col"
    else:
      impl = cpu_conv_impl(out_hw, kernel_shape, strides)
  return impl


def _explicit_padding(spatial_shape: Sequence[int], kernel_shape: Sequence[int],
                      strides: Sequence[int], padding: Padding) -> list[tuple[int, int]]:
  """Turns "SAME"/"VALID" or explicit (lo, hi) pairs into explicit pairs, as `lax` does."""
  if isinstance(padding, str):
    return [tuple(p) for p in lax.padtype_to_pads(spatial_shape, kernel_shape, strides,
                                                  padding.upper())]
  pads = [tuple(p) for p in padding]
  if len(pads) != len(spatial_shape):
    raise ValueError(f"padding needs one (lo, hi) pair per spatial axis, got {padding!r}.")
  return pads


def _output_hw(in_hw: Sequence[int], kernel_hw: Sequence[int], strides: Sequence[int],
               padding: Padding) -> list[int]:
  """Output (height, width) of a convolution, as `lax` computes it."""
  pads = _explicit_padding(in_hw, kernel_hw, strides, padding)
  return [(n + lo + hi - k) // s + 1
          for n, (lo, hi), k, s in zip(in_hw, pads, kernel_hw, strides)]


def _checked_geometry(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
                      padding: Padding) -> tuple[list[tuple[int, int]], list[int]]:
  """Explicit (lo, hi) pads and output (height, width) of a convolution; clear errors."""
  kh, kw, cin, _ = kernel.shape
  if x.ndim != 4 or x.shape[-1] != cin:
    raise ValueError(f"conv input must be (B, H, W, {cin}) for kernel {kernel.shape}, "
                     f"got {x.shape}.")
  pads = _explicit_padding(x.shape[1:3], (kh, kw), strides, padding)
  out_hw = _output_hw(x.shape[1:3], (kh, kw), strides, pads)
  if min(out_hw) < 1:
    raise ValueError(f"conv kernel {kernel.shape[:2]} does not fit input {x.shape[1:3]} "
                     f"after padding {pads}.")
  return pads, out_hw


def _lax_padding(padding: Padding) -> str | tuple[tuple[int, int], ...]:
  """`padding` as `lax.conv_general_dilated` takes it; hashable, so it is also the static
  argument of the custom_jvp convolutions."""
  return padding.upper() if isinstance(padding, str) else tuple(map(tuple, padding))


def conv2d_xla(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1),
               padding: Padding = "SAME") -> jax.Array:
  """2-D convolution by `lax.conv_general_dilated` (the reference implementation).

  Args:
    x: input, shape (B, H, W, cin).
    kernel: shape (kh, kw, cin, cout).
    strides: (sh, sw).
    padding: "SAME", "VALID", or ((lo_h, hi_h), (lo_w, hi_w)).

  Returns:
    Output of shape (B, H', W', cout).
  """
  return lax.conv_general_dilated(
      x, kernel, window_strides=tuple(strides),
      padding=_lax_padding(padding),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))


# The kernel gradient of `conv2d_im2col` and of `conv2d_hybrid` (once per training step)
# contracts a patch matrix over the whole batch. Above _PATCH_CHUNK_BYTES it is built and
# contracted in batch chunks of at most that size: on the 2-core test machine a copy of a
# 75 MB array ran at ~3.4 GB/s and one of 19 MB at ~24 GB/s (in the L3 cache). Forward
# passes and input gradients (the PGD loop) stay whole: chunked, they measured slower as
# often as faster (32x32 3->16 at batch 128: 16.3 vs 11.0 ms per pass).
_PATCH_CHUNK_BYTES = 4 << 20


def im2col_batch_chunk(batch: int, patch_bytes_per_example: int,
                       devices: int | None = None) -> int:
  """Examples per chunk of the im2col kernel gradient.

  The largest divisor of `batch` whose patch matrix fits `_PATCH_CHUNK_BYTES` (at least 1);
  `batch` itself when the whole matrix fits, or when the program spans several devices
  (`devices`, default `jax.device_count()`): there the batch axis is sharded, and a loop
  over chunks of it would gather it.
  """
  devices = jax.device_count() if devices is None else devices
  if batch * patch_bytes_per_example <= _PATCH_CHUNK_BYTES or devices > 1:
    return batch
  fit = max(1, _PATCH_CHUNK_BYTES // max(patch_bytes_per_example, 1))
  return max(d for d in range(1, min(fit, batch) + 1) if batch % d == 0)


def _im2col(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
            padding: Padding) -> jax.Array:
  """The convolution as one GEMM over the whole batch's patch matrix (plain JAX autodiff)."""
  kh, kw, cin, cout = kernel.shape
  sh, sw = strides
  pads, (out_h, out_w) = _checked_geometry(x, kernel, strides, padding)
  x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
  cols = [x[:, i:i + (out_h - 1) * sh + 1:sh, j:j + (out_w - 1) * sw + 1:sw, :]
          for i in range(kh) for j in range(kw)]
  patches = cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)
  # An explicit 2-D GEMM: its two gradients are plain 2-D GEMMs too (measured a little faster
  # than contracting the 4-D patch array directly).
  y = patches.reshape(-1, kh * kw * cin) @ kernel.reshape(kh * kw * cin, cout)
  return y.reshape(x.shape[0], out_h, out_w, cout)


def _kernel_tangent(x: jax.Array, tk: jax.Array, strides: Sequence[int],
                    padding: Padding) -> jax.Array:
  """conv(x, tk) for a kernel tangent tk: im2col, in batch chunks when the patch matrix is
  large (`im2col_batch_chunk`).

  Linear in tk; its transpose is the kernel gradient, which accumulates chunk by chunk
  (`lax.map` transposes to a loop). `jax.checkpoint` makes the backward pass rebuild each
  chunk's patches instead of keeping all of them: ResNet-18(4)'s 32x32 16-channel kernel
  gradient at batch 128 took 92 ms whole and 15 ms in chunks of 8.
  """
  kh, kw, cin, _ = tk.shape
  _, out_hw = _checked_geometry(x, tk, strides, padding)
  batch = x.shape[0]
  chunk = im2col_batch_chunk(batch, out_hw[0] * out_hw[1] * kh * kw * cin * x.dtype.itemsize)
  if chunk == batch:
    return _im2col(x, tk, strides, padding)
  one_chunk = jax.checkpoint(lambda xc, k: _im2col(xc, k, strides, padding))
  y = lax.map(lambda xc: one_chunk(xc, tk), x.reshape(batch // chunk, chunk, *x.shape[1:]))
  return y.reshape(batch, *y.shape[2:])


def _conv_jvp(conv, input_tangent, strides, padding, primals, tangents):
  """(y, y's tangent) of a convolution given how to push the input's tangent through it.

  The kernel's tangent goes through `_kernel_tangent`. A tangent that is a symbolic zero
  (the kernel's, when PGD differentiates the input only) costs nothing.
  """
  (x, kernel), (tx, tk) = primals, tangents
  y = conv(x, kernel)
  terms = []
  if not isinstance(tx, SymbolicZero):
    terms.append(input_tangent(tx, kernel))
  if not isinstance(tk, SymbolicZero):
    terms.append(_kernel_tangent(x, tk, strides, padding))
  return y, sum(terms[1:], terms[0]) if terms else jnp.zeros_like(y)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _conv2d_im2col(x: jax.Array, kernel: jax.Array, strides: tuple[int, ...],
                   padding: Any) -> jax.Array:
  return _im2col(x, kernel, strides, padding)


@functools.partial(_conv2d_im2col.defjvp, symbolic_zeros=True)
def _conv2d_im2col_jvp(strides, padding, primals, tangents):
  whole = lambda x, k: _im2col(x, k, strides, padding)
  return _conv_jvp(whole, whole, strides, padding, primals, tangents)


def conv2d_im2col(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1),
                  padding: Padding = "SAME") -> jax.Array:
  """2-D convolution as one matmul over concatenated shifted slices (im2col by slicing).

  Mathematically identical to `conv2d_xla` (cross-correlation, as in `lax`). Column
  (i * kw + j) * cin + c of the patch matrix holds input channel c shifted by (i, j), which
  is the row order of `kernel.reshape(kh * kw * cin, cout)`. Its input gradient is the
  GEMM's transpose; its kernel gradient is built in batch chunks when the patch matrix
  is large (`_kernel_tangent`), through a `jax.custom_jvp` (forward and reverse mode).

  Args:
    x: input, shape (B, H, W, cin).
    kernel: shape (kh, kw, cin, cout).
    strides: (sh, sw).
    padding: "SAME", "VALID", or ((lo_h, hi_h), (lo_w, hi_w)).

  Returns:
    Output of shape (B, H', W', cout).
  """
  _checked_geometry(x, kernel, strides, padding)
  return _conv2d_im2col(x, kernel, tuple(strides), _lax_padding(padding))


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _conv2d_hybrid(x: jax.Array, kernel: jax.Array, strides: tuple[int, ...],
                   padding: Any) -> jax.Array:
  return conv2d_xla(x, kernel, strides, padding)


def _conv2d_oi(x: jax.Array, kernel: jax.Array, padding: Any) -> jax.Array:
  """`conv2d_xla` at stride 1 with the kernel handed to XLA as (kh, kw, cout, cin) ("HWOI").

  The same values. What differs is its transpose: JAX transposes a convolution with
  respect to its input into a convolution of the flipped kernel with input and output
  channels swapped, which turns "HWOI" into the standard "HWIO". XLA:CPU runs that as a
  fast forward convolution (YNNPACK), where the transpose of an "HWIO" convolution lands
  on a slow path (LeNet(4)'s conv2 input gradient: 1.3 vs 20 ms).
  """
  return lax.conv_general_dilated(
      x, jnp.transpose(kernel, (0, 1, 3, 2)), window_strides=(1, 1),
      padding=_lax_padding(padding),
      dimension_numbers=("NHWC", "HWOI", "NHWC"))


@functools.partial(_conv2d_hybrid.defjvp, symbolic_zeros=True)
def _conv2d_hybrid_jvp(strides, padding, primals, tangents):
  """Input tangent by an XLA convolution that transposes well (im2col's when strided)."""
  if tuple(strides) == (1, 1):
    input_tangent = lambda tx, k: _conv2d_oi(tx, k, padding)
  else:
    input_tangent = lambda tx, k: _im2col(tx, k, strides, padding)
  return _conv_jvp(lambda x, k: conv2d_xla(x, k, strides, padding), input_tangent, strides,
                   padding, primals, tangents)


def conv2d_hybrid(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1),
                  padding: Padding = "SAME") -> jax.Array:
  """XLA's convolutions where XLA:CPU is fast, im2col where it is not (a `jax.custom_jvp`).

  On XLA:CPU the forward convolution (YNNPACK) beats im2col for mid-sized layers, and so
  does the input gradient when it is handed to XLA as a forward convolution of the flipped
  kernel (`_conv2d_oi`); the kernel gradient, needed once per training step, stays
  im2col's GEMM (in batch chunks when large). Strided layers take im2col's input gradient
  too. Values equal `conv2d_xla`'s; derivatives equal the convolution's, in forward and
  reverse mode. Arguments and result as `conv2d_im2col`.
  """
  _checked_geometry(x, kernel, strides, padding)
  return _conv2d_hybrid(x, kernel, tuple(strides), _lax_padding(padding))


def _band_selector(out_w: int, padded_w: int, kw: int, sw: int) -> np.ndarray:
  """(kw, padded_w, out_w) 0/1 array: [j, p, w] = 1 where padded column p = w * sw + j."""
  sel = np.zeros((kw, padded_w, out_w), np.float32)
  for j in range(kw):
    sel[j, np.arange(out_w) * sw + j, np.arange(out_w)] = 1
  return sel


def conv2d_toeplitz(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1),
                    padding: Padding = "SAME") -> jax.Array:
  """2-D convolution as one GEMM of kh row-shifted input rows against a banded matrix.

  Mathematically identical to `conv2d_xla`. Each output row is a sum over the kernel rows i
  of (padded input row h * sh + i, all columns and channels) times a block-Toeplitz matrix
  that holds kernel row i on its band; the kh shifted rows are concatenated so that this is
  a single GEMM of (B * H', kh * Wp * cin) by (kh * Wp * cin, W' * cout), Wp the padded
  width. It does about Wp / kw times the flops of a direct convolution, but builds its
  operand from kh contiguous row slices instead of kh * kw single-channel slices: for
  layers with few channels, which are memory-bound, that is the faster trade (LeNet(4)'s
  conv1, 28x28, 1 -> 8: 2.4 vs 3.4 ms per forward + input-gradient pass; LeNet(1)'s conv2:
  0.6 vs 1.2 ms). The banded matrix costs kh * Wp * cin * W' * cout floats: use it for
  narrow layers only. Arguments and result as `conv2d_im2col`.
  """
  kh, kw, cin, cout = kernel.shape
  sh, sw = strides
  pads, (out_h, out_w) = _checked_geometry(x, kernel, strides, padding)
  b = x.shape[0]
  x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
  padded_w = x.shape[2]
  x = x.reshape(b, x.shape[1], padded_w * cin)
  rows = jnp.concatenate([x[:, i:i + (out_h - 1) * sh + 1:sh] for i in range(kh)], axis=-1)
  select = jnp.asarray(_band_selector(out_w, padded_w, kw, sw), kernel.dtype)
  band = jnp.einsum("ijco,jpw->ipcwo", kernel, select)
  y = rows.reshape(b * out_h, kh * padded_w * cin) @ band.reshape(-1, out_w * cout)
  return y.reshape(b, out_h, out_w, cout)


@functools.lru_cache(maxsize=64)
def _fft_conv_matrices(in_hw: tuple[int, int], pads: tuple[tuple[int, int], ...],
                       kernel_hw: tuple[int, int]) -> tuple[np.ndarray, ...]:
  """Real DFT matrices of `conv2d_fft` for one geometry (float64 numpy, cast by the caller).

  The transform sizes are the padded input sizes n_h x n_w: a circular correlation of that
  size equals the padded linear one on the valid outputs, so nothing wraps around. Only the
  H x W input positions are non-zero and only the valid outputs are read, so the matrices
  are cut to those rows and columns: no padding or cropping is ever done on data.

  Returns:
    fwd_w: (2 * nf, W): real rows -> [Re; Im] of the half spectrum along W (nf = n_w//2 + 1).
    fwd_h: (2 * n_h, 2 * H): (h, re/im) -> (frequency f, re/im), the complex DFT along H.
    inv_h: (2 * out_h, 2 * n_h): (f, re/im) -> (h, re/im), the inverse complex DFT along H.
    inv_w: (out_w, 2 * nf): [Re; Im] half spectrum -> real outputs (inverse real DFT along W).
    cos, sin: (n_h, nf, kh, kw): cos and sin of the kernel taps' phases (the kernel's
      spectrum is sum(kernel * cos) - i * sum(kernel * sin)).
  """
  (h, w), ((ph, ph_hi), (pw, pw_hi)), (kh, kw) = in_hw, pads, kernel_hw
  n_h, n_w = h + ph + ph_hi, w + pw + pw_hi
  out_h, out_w = n_h - kh + 1, n_w - kw + 1
  freq_h, freq_w = np.arange(n_h), np.arange(n_w // 2 + 1)
  phase_w = 2 * np.pi * np.outer(np.arange(w) + pw, freq_w) / n_w           # (W, nf)
  fwd_w = np.concatenate([np.cos(phase_w), -np.sin(phase_w)], axis=1).T
  phase_h = 2 * np.pi * np.outer(freq_h, np.arange(h) + ph) / n_h           # (n_h, H)
  fwd_h = _complex_as_real(np.exp(-1j * phase_h))
  inv_h = _complex_as_real(np.exp(2j * np.pi * np.outer(np.arange(out_h), freq_h) / n_h) / n_h)
  # The half spectrum stands for its conjugate mirror too: bins other than 0 and n_w / 2
  # count twice. The sine row drops the imaginary parts of those two, as irfft does.
  twice = np.where((freq_w == 0) | (2 * freq_w == n_w), 1.0, 2.0)
  phase_out = 2 * np.pi * np.outer(np.arange(out_w), freq_w) / n_w        # (out_w, nf)
  inv_w = np.concatenate([twice * np.cos(phase_out), -twice * np.sin(phase_out)], axis=1) / n_w
  taps = (2 * np.pi * np.outer(freq_h, np.arange(kh)) / n_h)[:, None, :, None] + \
      (2 * np.pi * np.outer(freq_w, np.arange(kw)) / n_w)[None, :, None, :]
  return fwd_w, fwd_h, inv_h, inv_w, np.cos(taps), np.sin(taps)


def _complex_as_real(m: np.ndarray) -> np.ndarray:
  """(p, q) complex matrix -> (2p, 2q) real one acting on interleaved (index, re/im) pairs."""
  out = np.empty((m.shape[0], 2, m.shape[1], 2))
  out[:, 0, :, 0], out[:, 0, :, 1] = m.real, -m.imag
  out[:, 1, :, 0], out[:, 1, :, 1] = m.imag, m.real
  return out.reshape(2 * m.shape[0], 2 * m.shape[1])


def conv2d_fft(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1),
               padding: Padding = "SAME") -> jax.Array:
  """2-D convolution by the convolution theorem, with the DFTs done as small real matmuls.

  Mathematically identical to `conv2d_xla` at stride 1; round-off is that of a float32 FFT
  (relative to the largest output, about 1e-6). The input is transformed to a half spectrum
  (a matmul along W, then one along H), each frequency's channels are mixed by the kernel's
  conjugate spectrum (per-frequency complex matmuls, three real ones each by Gauss's trick),
  and the valid outputs are transformed back. Everything is a linear map, so both gradients
  are the same matmuls transposed, and a gradient with respect to the input alone (PGD)
  transforms the kernel once, outside the attack loop (XLA hoists it).

  For LeNet(16)'s conv2 (14x14, 5x5, 32 -> 64, batch 64) this does about 4x fewer
  flops than im2col and never builds a patch matrix: forward plus input gradient inside a
  `fori_loop` took 15 ms against im2col's 39 ms on 2 AVX2 cores. The DFTs are matmuls
  because XLA:CPU's FFT was slower than these small GEMMs at such sizes (2.2 ms for the
  rfft2 alone). Off CPU, XLA's own convolution is the better choice.

  Args:
    x: input, shape (B, H, W, cin).
    kernel: shape (kh, kw, cin, cout).
    strides: must be (1, 1).
    padding: "SAME", "VALID", or non-negative ((lo_h, hi_h), (lo_w, hi_w)).

  Returns:
    Output of shape (B, H', W', cout).
  """
  kh, kw, cin, cout = kernel.shape
  if tuple(strides) != (1, 1):
    raise ValueError(f"conv2d_fft computes stride-1 convolutions only, got strides "
                     f"{tuple(strides)}; use conv2d_im2col or conv2d_xla for strided layers.")
  pads, (out_h, out_w) = _checked_geometry(x, kernel, strides, padding)
  if min(min(p) for p in pads) < 0:
    raise ValueError(f"conv2d_fft needs non-negative padding, got {pads}.")
  b, h, w, _ = x.shape
  mats = _fft_conv_matrices((h, w), _lax_padding(pads), (kh, kw))
  fwd_w, fwd_h, inv_h, inv_w, cos, sin = (jnp.asarray(m, x.dtype) for m in mats)
  n_h, nf = cos.shape[:2]
  # Kernel spectrum: re = sum(k cos), im = -sum(k sin); the correlation multiplies by its
  # conjugate, re + i * im_c with im_c = sum(k sin). Gauss's trick needs re, im_c - re and
  # re + im_c.
  re = jnp.einsum("fkij,ijco->fkco", cos, kernel)
  im_c = jnp.einsum("fkij,ijco->fkco", sin, kernel)
  # Layout (H, W, B * cin) puts the spatial axes in front, so the DFTs are plain GEMMs and
  # the per-frequency products batch over the leading (f, k) axes without transposes.
  xt = jnp.transpose(x, (1, 2, 0, 3)).reshape(h, w, b * cin)
  x1 = jnp.matmul(jnp.broadcast_to(fwd_w, (h,) + fwd_w.shape), xt)      # (H, 2 nf, B cin)
  x2 = (fwd_h @ x1.reshape(2 * h, nf * b * cin)).reshape(n_h, 2, nf, b, cin)
  x_re, x_im = x2[:, 0], x2[:, 1]                                       # (n_h, nf, B, cin)
  k1 = jnp.matmul(x_re + x_im, re)
  k2 = jnp.matmul(x_re, im_c - re)
  k3 = jnp.matmul(x_im, re + im_c)
  y = jnp.stack([k1 - k3, k1 + k2], axis=1)                              # (n_h, 2, nf, B, cout)
  y1 = (inv_h @ y.reshape(2 * n_h, nf * b * cout)).reshape(out_h, 2 * nf, b * cout)
  y2 = jnp.matmul(jnp.broadcast_to(inv_w, (out_h,) + inv_w.shape), y1)  # (out_h, out_w, B cout)
  return jnp.transpose(y2.reshape(out_h, out_w, b, cout), (2, 0, 1, 3))


# Every implementation `resolve_conv_impl` can return, by name.
CONV_FNS = {"im2col": conv2d_im2col, "xla": conv2d_xla, "hybrid": conv2d_hybrid,
            "fft": conv2d_fft, "toeplitz": conv2d_toeplitz}


class Conv(nn.Module):
  """2-D convolution with a selectable implementation; parameters as `flax.linen.Conv`.

  Parameters: `kernel` of shape (kh, kw, cin, cout) and, if `use_bias`, `bias` of shape
  (cout,), so sparsity patterns and checkpoints written for `nn.Conv` apply unchanged (the
  models take either: `admm_jax.models.conv_module`).

  Attributes:
    features: number of output channels cout.
    kernel_size: (kh, kw).
    strides: (sh, sw). Any stride works with every implementation.
    padding: "SAME" (default), "VALID", or ((lo_h, hi_h), (lo_w, hi_w)).
    use_bias: whether to add a bias (off when BatchNorm follows).
    impl: "auto" (per layer on CPU, xla elsewhere), "im2col", "xla", "hybrid", "fft" or
      "toeplitz"; see `resolve_conv_impl` and `cpu_conv_impl`. "fft" needs stride 1.
    kernel_init: initialiser of the kernel.
    bias_init: initialiser of the bias.
    dtype: the compute dtype (None: the input's); the parameters stay float32 and are cast.
      In bfloat16 "auto" never picks "fft": its DFTs would round every transform to
      bfloat16, an error relative to the largest output instead of to each output.
  """
  features: int
  kernel_size: tuple[int, int] = (3, 3)
  strides: tuple[int, int] = (1, 1)
  padding: Padding = "SAME"
  use_bias: bool = True
  impl: str = "auto"
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros_init()
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies the convolution to `x` of shape (B, H, W, cin); returns (B, H', W', features)."""
    kh, kw = self.kernel_size
    kernel = self.param("kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features))
    out_hw = _output_hw(x.shape[1:3], (kh, kw), self.strides, self.padding)
    impl = resolve_conv_impl(self.impl, out_hw, kernel.shape, self.strides)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    if impl == "fft" and self.impl == "auto" and x.dtype != jnp.float32:
      impl = "im2col"
    y = CONV_FNS[impl](x, kernel, self.strides, self.padding)
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,)).astype(y.dtype)
    return y
