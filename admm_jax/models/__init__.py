"""Models of the paper (docs/method.md, Models), each with a width multiplier w.

All models take NHWC images in [0, 1] and share one calling convention,
`model.apply(variables, x, train=False)`; models with BatchNorm (`has_batch_norm(name)`)
need `variables['batch_stats']` and, when `train=True`, `mutable=['batch_stats']`.
"""
from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from admm_jax.models.layers import ConvDef, conv_module, max_pool_2x2, normalize_input
from admm_jax.models.layers import relu_max_pool_2x2
from admm_jax.models.lenet import LeNet, lenet_param_count
from admm_jax.models.resnet import BasicBlock, ResNet18
from admm_jax.models.vgg import VGG16

MODELS: dict[str, type[nn.Module]] = {"lenet": LeNet, "vgg16": VGG16, "resnet18": ResNet18}
# Compute dtypes a model runs in (`config.model.dtype`).
COMPUTE_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def _model_class(name: str) -> type[nn.Module]:
  try:
    return MODELS[name]
  except KeyError:
    raise ValueError(f"Unknown model {name!r}; allowed names: {sorted(MODELS)}.") from None


def get_model(name: str, width: int, num_classes: int = 10, conv_impl: str = "xla",
              dtype: str | Any = "float32", **kwargs: Any) -> nn.Module:
  """Builds a model by name.

  Args:
    name: "lenet", "vgg16" or "resnet18".
    width: width multiplier w (docs/method.md, Models).
    num_classes: number of logits.
    conv_impl: which convolution the model uses (`conv_module`): "xla" (`flax.linen.Conv`),
      "auto" (the CPU kernels on the CPU backend, XLA elsewhere) or one CPU kernel by name.
    dtype: the compute dtype, "float32" or "bfloat16" (`config.model.dtype`): activations
      and matmuls in it; parameters, BatchNorm statistics and the logits stay float32.
    **kwargs: further model attributes (input_mean, input_std, or `conv` itself).

  Returns:
    The (unbound) flax module.
  """
  kwargs.setdefault("conv", conv_module(conv_impl))
  dtype = jnp.dtype(dtype)
  if dtype not in COMPUTE_DTYPES:
    raise ValueError(f"model dtype {dtype.name!r} is not supported: use float32 or bfloat16.")
  return _model_class(name)(width=width, num_classes=num_classes, dtype=dtype, **kwargs)


def has_batch_norm(name: str) -> bool:
  """Whether model `name` carries 'batch_stats' that a training loop must thread through."""
  return _model_class(name).has_batch_norm


__all__ = ["BasicBlock", "COMPUTE_DTYPES", "ConvDef", "LeNet", "MODELS", "ResNet18", "VGG16",
           "conv_module",
           "get_model", "has_batch_norm", "lenet_param_count", "max_pool_2x2",
           "normalize_input", "relu_max_pool_2x2"]
