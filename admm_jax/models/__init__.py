"""Models of the paper (docs/method.md, Models), each with a width multiplier w, and the one
registry of what the rest of the package knows about them (`REGISTRY`).

All models take NHWC images in [0, 1] and share one calling convention,
`model.apply(variables, x, train=False)`; models with BatchNorm (`has_batch_norm(name)`)
need `variables['batch_stats']` and, when `train=True`, `mutable=['batch_stats']`.
"""
import dataclasses
from typing import Any, Callable

import jax.numpy as jnp
from flax import linen as nn

from admm_jax.models import lenet, resnet, vgg
from admm_jax.models.layers import ConvDef, conv_module, max_pool_2x2, normalize_input
from admm_jax.models.layers import relu_max_pool_2x2
from admm_jax.models.lenet import LeNet, lenet_param_count
from admm_jax.models.resnet import BasicBlock, ResNet18
from admm_jax.models.vgg import VGG16


@dataclasses.dataclass(frozen=True)
class ModelEntry:
  """One model as the configs, the study, the graph and the export know it."""
  name: str                           # the config's model.name
  module: type[nn.Module]             # the flax module class
  input_shape: tuple[int, int, int]   # (H, W, C) of the paper's dataset for this model
  build_graph: Callable[[Any, nn.Module], None]   # appends its layers to a graph.Builder


# Compute dtypes a model runs in (`config.model.dtype`).
COMPUTE_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


REGISTRY: dict[str, ModelEntry] = {e.name: e for e in (
    ModelEntry("lenet", LeNet, (28, 28, 1), lenet.build_graph),
    ModelEntry("vgg16", VGG16, (32, 32, 3), vgg.build_graph),
    ModelEntry("resnet18", ResNet18, (32, 32, 3), resnet.build_graph),
)}
MODELS: dict[str, type[nn.Module]] = {name: e.module for name, e in REGISTRY.items()}


def entry(name: str) -> ModelEntry:
  """The registry's entry for model `name`; ValueError naming the allowed names otherwise."""
  try:
    return REGISTRY[name]
  except KeyError:
    raise ValueError(f"Unknown model {name!r}; allowed names: {sorted(REGISTRY)}.") from None


def entry_of(model: nn.Module) -> ModelEntry | None:
  """The registry's entry for a model instance (None for a module of the user's own)."""
  return next((e for e in REGISTRY.values() if isinstance(model, e.module)), None)


def get_model(name: str, width: int, num_classes: int = 10, conv_impl: str = "xla",
              dtype: str | Any = "float32", **kwargs: Any) -> nn.Module:
  """Builds a model by name.

  Args:
    name: "lenet", "vgg16" or "resnet18" (a key of `REGISTRY`).
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
  return entry(name).module(width=width, num_classes=num_classes, dtype=dtype, **kwargs)


def has_batch_norm(name: str) -> bool:
  """Whether model `name` carries 'batch_stats' that a training loop must thread through."""
  return entry(name).module.has_batch_norm


__all__ = ["BasicBlock", "COMPUTE_DTYPES", "ConvDef", "LeNet", "MODELS", "ModelEntry", "REGISTRY",
           "ResNet18", "VGG16", "conv_module", "entry", "entry_of", "get_model", "has_batch_norm",
           "lenet_param_count", "max_pool_2x2", "normalize_input", "relu_max_pool_2x2"]
