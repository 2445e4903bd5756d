"""admm_jax: adversarially robust model compression with ADMM pruning, in JAX/Flax.

Submodules are imported lazily by attribute so that `import admm_jax` stays cheap.
"""
import importlib

__version__ = "0.1.0"

_SUBMODULES = ("attacks", "autoattack", "losses", "projections", "sparsity", "transforms",
               "models", "data", "train", "stages", "trainer", "reports", "workdir",
               "checkpoint", "parallel", "configlib", "kernels", "graph", "export", "reliability",
               "study", "plot")


def __getattr__(name):
  if name in _SUBMODULES:
    return importlib.import_module(f"admm_jax.{name}")
  raise AttributeError(f"module 'admm_jax' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_SUBMODULES))
