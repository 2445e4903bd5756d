"""CIFAR ResNet-18 (basic blocks [2, 2, 2, 2]) with width multiplier w (docs/method.md)."""
from collections.abc import Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn

from admm_jax.models.layers import ConvDef, normalize_input

# He-normal with fan_out, as torchvision initialises convs that feed BatchNorm + ReLU.
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# (channels at w = 1, stride of the first block) of the four stages.
_STAGES: tuple[tuple[int, int], ...] = ((4, 1), (8, 2), (16, 2), (32, 2))
_BLOCKS_PER_STAGE = 2


def _batch_norm(train: bool, name: str, dtype: jnp.dtype = jnp.float32) -> nn.BatchNorm:
  # Flax computes the batch statistics in float32 whatever `dtype` is.
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                      name=name)


class BasicBlock(nn.Module):
  """conv3x3 - BN - ReLU - conv3x3 - BN, plus a shortcut, then ReLU.

  The shortcut is the identity, or conv1x1 (`shortcut_conv`) + BN (`shortcut_bn`) when the
  stride or the channel count changes. Strided convs use SAME padding (Flax convention:
  (0, 1) for a 3x3 stride-2 conv on an even map, where PyTorch pads (1, 1)).

  Attributes:
    features: output channels.
    strides: stride of conv1 and of the shortcut conv.
    conv: the convolution module (`flax.linen.Conv`, or see `layers.conv_module`).
    dtype: the compute dtype (float32 or bfloat16); parameters stay float32.
  """
  features: int
  strides: int = 1
  conv: ConvDef = nn.Conv
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Applies the block to `x` (B, H, W, cin); returns (B, H / strides, W / strides, features)."""
    s, dt = (self.strides, self.strides), self.dtype
    y = self.conv(self.features, (3, 3), strides=s, use_bias=False, kernel_init=_CONV_INIT,
                  dtype=dt, name="conv1")(x)
    y = nn.relu(_batch_norm(train, "bn1", dt)(y))
    y = self.conv(self.features, (3, 3), use_bias=False, kernel_init=_CONV_INIT, dtype=dt,
                  name="conv2")(y)
    y = _batch_norm(train, "bn2", dt)(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = self.conv(self.features, (1, 1), strides=s, use_bias=False, kernel_init=_CONV_INIT,
                    dtype=dt, name="shortcut_conv")(x)
      x = _batch_norm(train, "shortcut_bn", dt)(x)
    return nn.relu(y + x)


class ResNet18(nn.Module):
  """CIFAR ResNet-18: 3x3 stem (4w, stride 1), 4 stages of 2 basic blocks, avg-pool, dense.

  Stages have 4w, 8w, 16w, 32w channels (w = 16: 64 ... 512) and strides 1, 2, 2, 2.
  Parameter paths ('/'-joined): stem conv1/kernel, bn1/{scale,bias}; blocks
  layer{s}_{b}/{conv1,bn1,conv2,bn2} for s = 1..4, b = 0..1, plus
  layer{2,3,4}_0/{shortcut_conv,shortcut_bn}; classifier fc/{kernel,bias}. Conv kernels
  (regex `.*conv.*/kernel`): 20 = 1 stem + 16 in blocks + 3 shortcut 1x1 convs; none has a
  bias.

  Attributes:
    width: width multiplier w; w = 16 is the standard network.
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
    """Returns logits (B, num_classes) for images `x` of shape (B, H, W, C) in [0, 1].

    Args:
      x: images, NHWC (32x32 for CIFAR; any size works thanks to global average pooling).
      train: BatchNorm uses batch statistics and updates 'batch_stats' (apply with
        mutable=['batch_stats']) when True, running averages when False.
    """
    if self.width < 1:
      raise ValueError(f"ResNet18 width must be >= 1, got {self.width}.")
    dt = self.dtype
    x = normalize_input(x, self.input_mean, self.input_std).astype(dt)
    x = self.conv(4 * self.width, (3, 3), use_bias=False, kernel_init=_CONV_INIT, dtype=dt,
                  name="conv1")(x)
    x = nn.relu(_batch_norm(train, "bn1", dt)(x))
    for stage, (channels, first_stride) in enumerate(_STAGES, start=1):
      for b in range(_BLOCKS_PER_STAGE):
        x = BasicBlock(channels * self.width, first_stride if b == 0 else 1,
                       conv=self.conv, dtype=dt, name=f"layer{stage}_{b}")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=dt, name="fc")(x).astype(jnp.float32)


def build_graph(b, model: ResNet18) -> None:
  """Appends ResNet-18's layers to `b`, an `admm_jax.graph.Builder` (compaction and export)."""
  del model
  b.conv("conv1")
  b.batch_norm("bn1")
  b.simple("relu")
  for stage, (_, first_stride) in enumerate(_STAGES, start=1):
    for i in range(_BLOCKS_PER_STAGE):
      block, s = f"layer{stage}_{i}", first_stride if i == 0 else 1
      x = b.last
      b.conv(f"{block}/conv1", s)
      b.batch_norm(f"{block}/bn1")
      b.simple("relu")
      b.conv(f"{block}/conv2")
      y = b.batch_norm(f"{block}/bn2")
      if "shortcut_conv" in b.params[block]:
        b.conv(f"{block}/shortcut_conv", s, inputs=(x,))
        x = b.batch_norm(f"{block}/shortcut_bn")
      b.add(f"{block}/add", "add", (y, x))
      b.simple("relu")
  b.simple("mean_pool")
  b.dense("fc")
