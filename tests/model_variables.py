"""Helpers shared by the model and convolution tests: variables without compiling init."""
from flax import linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np


def leaf_shapes(tree) -> dict[str, tuple[int, ...]]:
  """'/'-joined leaf paths -> shapes (works on arrays and ShapeDtypeStructs)."""
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


def abstract_variables(model: nn.Module, shape: tuple[int, ...]):
  """Variables' shapes without running (or compiling) the initialiser."""
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))


def random_variables(model: nn.Module, shape: tuple[int, ...], seed: int = 0):
  """Variables of the right structure filled by numpy (compiling `model.init` takes seconds).

  Weights ~ N(0, 0.3^2); BatchNorm running variances start at 1 as in `nn.BatchNorm`.
  """
  rng = np.random.default_rng(seed)
  def fill(path, leaf):
    if jax.tree_util.keystr(path).endswith("['var']"):
      return jnp.ones(leaf.shape, leaf.dtype)
    return jnp.asarray(0.3 * rng.standard_normal(leaf.shape), leaf.dtype)
  return jax.tree_util.tree_map_with_path(fill, abstract_variables(model, shape))
