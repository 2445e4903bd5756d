"""LeNet for 28x28 inputs (MNIST / Fashion-MNIST) with width multiplier w (docs/method.md)."""
from collections.abc import Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn

from admm_jax.models.layers import ConvDef, normalize_input, relu_max_pool_2x2


class LeNet(nn.Module):
  """conv5x5(2w) - ReLU - pool - conv5x5(4w) - ReLU - pool - dense(64w) - ReLU - dense.

  Parameter paths ('/'-joined, under 'params'): conv1/kernel (5, 5, C, 2w), conv1/bias,
  conv2/kernel (5, 5, 2w, 4w), conv2/bias, fc1/kernel (7*7*4w, 64w), fc1/bias,
  fc2/kernel (64w, num_classes), fc2/bias. The flatten order is (H, W, C), NHWC.

  Attributes:
    width: width multiplier w (the paper uses 1, 2, 4, 8, 16).
    num_classes: number of logits.
    conv: the convolution module (`flax.linen.Conv`, or see `layers.conv_module`).
    input_mean: optional per-channel mean subtracted inside the model (off by default).
    input_std: optional per-channel std divided inside the model (off by default).
    dtype: the compute dtype of activations and matmuls (float32 or bfloat16); parameters
      stay float32 and the logits are returned in float32.
  """
  width: int = 1
  num_classes: int = 10
  conv: ConvDef = nn.Conv
  input_mean: Sequence[float] | None = None
  input_std: Sequence[float] | None = None
  dtype: jnp.dtype = jnp.float32

  has_batch_norm: ClassVar[bool] = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Returns logits (B, num_classes) for images `x` of shape (B, 28, 28, C) in [0, 1].

    `train` is accepted for a uniform calling convention and ignored (no BatchNorm/dropout).
    """
    del train
    if self.width < 1:
      raise ValueError(f"LeNet width must be >= 1, got {self.width}.")
    w = self.width
    dt = self.dtype
    x = normalize_input(x, self.input_mean, self.input_std).astype(dt)
    x = relu_max_pool_2x2(self.conv(2 * w, (5, 5), dtype=dt, name="conv1")(x))
    x = relu_max_pool_2x2(self.conv(4 * w, (5, 5), dtype=dt, name="conv2")(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(64 * w, dtype=dt, name="fc1")(x))
    return nn.Dense(self.num_classes, dtype=dt, name="fc2")(x).astype(jnp.float32)


def lenet_param_count(width: int, in_channels: int = 1, num_classes: int = 10) -> int:
  """Closed-form number of parameters of `LeNet(width, num_classes)` on 28x28xC inputs."""
  w = width
  conv1 = 5 * 5 * in_channels * 2 * w + 2 * w
  conv2 = 5 * 5 * 2 * w * 4 * w + 4 * w
  fc1 = 7 * 7 * 4 * w * 64 * w + 64 * w
  fc2 = 64 * w * num_classes + num_classes
  return conv1 + conv2 + fc1 + fc2


def build_graph(b, model: LeNet) -> None:
  """Appends LeNet's layers to `b`, an `admm_jax.graph.Builder` (compaction and export)."""
  del model
  for name in ("conv1", "conv2"):
    b.conv(name)
    b.simple("relu_max_pool")
  b.simple("flatten")
  b.dense("fc1")
  b.simple("relu")
  b.dense("fc2")
