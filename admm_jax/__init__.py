"""admm_jax: adversarially robust model compression with ADMM pruning, in JAX/Flax.

The library, to compose into your own training (each a module of this package):

  projections   exact Euclidean projections onto sparsity sets (irregular, column, filter, N:M)
  sparsity      regex sparsity specs, masks, hard pruning, per-layer reports
  quantization  exact projections onto k-bit grids, alone or with a sparsity set
  transforms    the optax transforms: admm (Z/U in the optimizer state), apply_masks,
                keep_on_grid (straight-through k-bit retraining)
  scores        learned masks (HYDRA): top-k of trained scores, straight-through gradient
  losses        TRADES / MART training losses
  attacks       PGD, FGSM and AutoAttack (APGD, APGD-T, FAB-T, Square, the cascade)
  models        LeNet, VGG-16, ResNet-18 with a width multiplier, and their registry
  graph, compaction   a pruned network as a smaller graph, exported with jax.export
  deploy        its k-bit codes packed into bytes, and the graph as ONNX (DequantizeLinear)
  kernels       CPU convolutions (opt-in)

The application that runs the whole recipe lives in `admm_jax.app` (configs, stages, the
trainer, data, checkpoints, evaluation, the study, export); its command lines are the thin
modules `admm_jax.main`, `.study`, `.evaluate`, `.export` and `.plot` (`python -m ...`).

Submodules are imported lazily by attribute, so that `import admm_jax` stays cheap.
"""
import importlib

__version__ = "0.1.0"

LIBRARY = ("attacks", "compaction", "deploy", "graph", "kernels", "losses", "models",
           "projections", "quantization", "scores", "sparsity", "transforms")
# The application's modules, reachable here by their names before they moved to admm_jax.app
# (`from admm_jax import configlib` in configs written for the earlier layout).
_APPLICATION = ("checkpoint", "cli", "configlib", "context", "data", "errors", "parallel",
                "reliability", "reports", "stages", "study_report", "tensorboard_log", "train",
                "trainer", "workdir")
_SUBMODULES = LIBRARY + ("app",)


def __getattr__(name):
  if name in _SUBMODULES:
    return importlib.import_module(f"admm_jax.{name}")
  if name in _APPLICATION:
    return importlib.import_module(f"admm_jax.app.{name}")
  raise AttributeError(f"module 'admm_jax' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_SUBMODULES) + list(_APPLICATION))
