"""Building blocks shared by the models on every backend: the choice of convolution, a 2x2
max-pool and an optional per-channel input normalisation.

The models take their convolution as a module attribute (`conv`, a flax module class or
partial with `flax.linen.Conv`'s arguments); `conv_module(impl)` turns a config's
`model.conv_impl` into one. The default is `flax.linen.Conv`, i.e. XLA's convolution; the
CPU kernels of `admm_jax.kernels.cpu_conv` are imported only when asked for.
`max_pool_2x2` is a reshape plus a max (no `reduce_window`), the same function as
`jnp.max` over the windows, values and gradients.
Layouts follow Flax: inputs NHWC, kernels (kh, kw, cin, cout).
"""
from collections.abc import Callable, Sequence
import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

from admm_jax.kernels import CONV_IMPLS

# A convolution module factory with `flax.linen.Conv`'s arguments (features, kernel_size,
# strides=, padding=, use_bias=, kernel_init=, bias_init=, name=).
ConvDef = Callable[..., nn.Module]


@functools.lru_cache(maxsize=None)  # one object per impl: equal models compare equal
def conv_module(impl: str = "xla") -> ConvDef:
  """The convolution module a model should use for `impl` (a `config.model.conv_impl`).

  Args:
    impl: "xla" -> `flax.linen.Conv`. "auto" -> on the CPU backend, `cpu_conv.Conv` choosing
      per layer (`cpu_conv.cpu_conv_impl`): XLA:CPU's own convolution gradients are slow (a
      PGD-10 step of LeNet(16) ran 2.3x, of VGG16(4) and ResNet18(4) 3x faster without
      them); on any other backend `flax.linen.Conv`. "im2col", "hybrid", "fft",
      "toeplitz" -> `cpu_conv.Conv` with that implementation in every layer (on any
      backend; "fft" needs stride 1).

  Returns:
    A module factory taking `flax.linen.Conv`'s arguments; both kinds hold the same
    parameters (`kernel` (kh, kw, cin, cout), `bias` (cout,)).
  """
  if impl not in CONV_IMPLS:
    raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {impl!r}.")
  if impl == "xla" or (impl == "auto" and jax.default_backend() != "cpu"):
    return nn.Conv
  from admm_jax.kernels import cpu_conv  # pylint: disable=import-outside-toplevel
  return functools.partial(cpu_conv.Conv, impl=impl)


def _windows(x: jax.Array) -> jax.Array:
  """(B, H, W, C) -> (B, H/2, 2, W/2, 2, C): the 2x2 windows on axes 2 and 4."""
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c)


@jax.custom_jvp
def _max_pool_2x2(x: jax.Array) -> jax.Array:
  return jnp.max(_windows(x), axis=(2, 4))


@_max_pool_2x2.defjvp
def _max_pool_2x2_jvp(primals, tangents):
  """jnp.max's derivative rule (ties share the tangent evenly), counted without a reduce.

  Bit-identical to differentiating `jnp.max`, but the number of maxima per window is a sum of
  four slices instead of a `reduce_sum`: XLA:CPU ran that reduction at about 1.5 GB/s, 7%
  of a LeNet(16) PGD step. Under `grad` the tangent sum below transposes to a broadcast.
  """
  (x,), (t,) = primals, tangents
  y = _max_pool_2x2(x)
  hit = (_windows(x) == y[:, :, None, :, None, :]).astype(x.dtype)
  count = hit[:, :, 0, :, 0] + hit[:, :, 0, :, 1] + hit[:, :, 1, :, 0] + hit[:, :, 1, :, 1]
  return y, jnp.sum(hit * _windows(t), axis=(2, 4)) / count


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max-pool with stride 2, as a reshape and a max (no `reduce_window`).

  Same values as `nn.max_pool(x, (2, 2), strides=(2, 2))`. Gradients agree except on exact
  ties inside a window, where this splits the gradient evenly (the rule of `jnp.max`, which
  this reproduces bit for bit, in forward and reverse mode) and `reduce_window` sends it all
  to one element.

  Args:
    x: shape (B, H, W, C) with H and W even.

  Returns:
    Shape (B, H // 2, W // 2, C).
  """
  if x.ndim != 4 or x.shape[1] % 2 or x.shape[2] % 2:
    raise ValueError(f"max_pool_2x2 needs a (B, H, W, C) input with even height and width, "
                     f"got shape {x.shape}.")
  return _max_pool_2x2(x)


def relu_max_pool_2x2(x: jax.Array) -> jax.Array:
  """ReLU then 2x2 max-pool, computed as pool then ReLU on 4x fewer elements.

  The same function and the same gradient, ties included: ReLU is monotone, and the all-zero
  windows it would create as ties get no gradient through it either way.
  """
  return nn.relu(max_pool_2x2(x))


def normalize_input(x: jax.Array, mean: Sequence[float] | None,
                    std: Sequence[float] | None) -> jax.Array:
  """Returns (x - mean) / std per channel, or `x` unchanged when both are None.

  Lives inside the model so that attacks keep working in [0, 1] input space.

  Args:
    x: shape (..., C).
    mean: C per-channel means, or None.
    std: C per-channel standard deviations, or None.
  """
  if mean is None and std is None:
    return x
  if mean is None or std is None:
    raise ValueError("input normalisation needs both mean and std (or neither).")
  mean = jnp.asarray(mean, x.dtype)
  std = jnp.asarray(std, x.dtype)
  if mean.shape != (x.shape[-1],) or std.shape != (x.shape[-1],):
    raise ValueError(f"mean/std must have one entry per input channel ({x.shape[-1]}), "
                     f"got {mean.shape} and {std.shape}.")
  return (x - mean) / std
