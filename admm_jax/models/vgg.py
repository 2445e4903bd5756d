"""VGG-16 with BatchNorm for 32x32 inputs (CIFAR-10), channels scaled by w/16 (docs/method.md)."""
from collections.abc import Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn

from admm_jax.models.layers import ConvDef, normalize_input, relu_max_pool_2x2

# Standard VGG-16 configuration: output channels of the 13 convs at w = 16, "M" = 2x2 max-pool.
VGG16_CFG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                                    512, 512, 512, "M", 512, 512, 512, "M")

# He-normal with fan_out, as torchvision initialises convs that feed BatchNorm + ReLU.
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def vgg_channels(c: int, width: int) -> int:
  """Channels of a layer that has `c` channels at w = 16, scaled by width / 16 (at least 1)."""
  return max(1, c * width // 16)


class VGG16(nn.Module):
  """VGG-16: 13 x (conv3x3 SAME, no bias - BatchNorm - ReLU), 5 max-pools, one dense layer.

  Parameter paths ('/'-joined): conv{i}/kernel (3, 3, cin, cout) for i = 1..13,
  bn{i}/scale and bn{i}/bias (batch_stats: bn{i}/mean, bn{i}/var), fc/kernel
  (512*w/16, num_classes), fc/bias. For 32x32 inputs the last feature map is 1x1, so the
  classifier sees 512*w/16 features (other input sizes flatten a larger map).

  Attributes:
    width: width multiplier w; w = 16 is the standard network (64 ... 512 channels).
    num_classes: number of logits.
    conv: the convolution module (`flax.linen.Conv`, or see `layers.conv_module`).
    input_mean: optional per-channel mean subtracted inside the model (off by default).
    input_std: optional per-channel std divided inside the model (off by default).
    dtype: the compute dtype of activations and matmuls (float32 or bfloat16); parameters,
      BatchNorm statistics and the returned logits stay float32.
  """
  width: int = 16
  num_classes: int = 10
  conv: ConvDef = nn.Conv
  input_mean: Sequence[float] | None = None
  input_std: Sequence[float] | None = None
  dtype: jnp.dtype = jnp.float32

  has_batch_norm: ClassVar[bool] = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Returns logits (B, num_classes) for images `x` of shape (B, 32, 32, C) in [0, 1].

    Args:
      x: images, NHWC; H and W must be divisible by 32.
      train: BatchNorm uses batch statistics and updates 'batch_stats' (apply with
        mutable=['batch_stats']) when True, running averages when False.
    """
    if self.width < 1:
      raise ValueError(f"VGG16 width must be >= 1, got {self.width}.")
    dt = self.dtype
    x = normalize_input(x, self.input_mean, self.input_std).astype(dt)
    i = 0
    for c, next_c in zip(VGG16_CFG, VGG16_CFG[1:] + (None,)):
      if c == "M":
        x = relu_max_pool_2x2(x)  # The conv before it left its ReLU to this.
        continue
      i += 1
      x = self.conv(vgg_channels(c, self.width), (3, 3), use_bias=False,
                    kernel_init=_CONV_INIT, dtype=dt, name=f"conv{i}")(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dt,
                       name=f"bn{i}")(x)
      if next_c != "M":
        x = nn.relu(x)
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(self.num_classes, dtype=dt, name="fc")(x).astype(jnp.float32)


def build_graph(b, model: VGG16) -> None:
  """Appends VGG-16's layers to `b`, an `admm_jax.graph.Builder` (compaction and export)."""
  del model
  i = 0
  for c, next_c in zip(VGG16_CFG, VGG16_CFG[1:] + (None,)):
    if c == "M":
      b.simple("relu_max_pool")
      continue
    i += 1
    b.conv(f"conv{i}")
    b.batch_norm(f"bn{i}")
    if next_c != "M":
      b.simple("relu")
  b.simple("flatten")
  b.dense("fc")
