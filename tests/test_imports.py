"""The library's core imports only what jax and optax bring, not the trainer's stack."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What someone who only wants the optax transforms must not pay for: the trainer's input
# pipeline, checkpoints, configs and plots, the benchmarks' torch, and our own application
# modules (models pull flax, data pulls tfds).
APPLICATION_MODULES = ("tensorflow_datasets", "orbax", "ml_collections", "grain", "matplotlib",
                       "torch", "flax", "admm_jax.models", "admm_jax.data", "admm_jax.kernels",
                       "admm_jax.pipeline", "admm_jax.train", "admm_jax.checkpoint")

_PROBE = """
import sys
import admm_jax.transforms, admm_jax.attacks, admm_jax.projections, admm_jax.sparsity
print("\\n".join(sorted(sys.modules)))
"""


def test_core_library_imports_no_application_modules():
  # A fresh interpreter: this test process has long since imported everything.
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  out = subprocess.run([sys.executable, "-c", _PROBE], env=env, cwd=ROOT, check=True,
                       capture_output=True, text=True).stdout.split()
  loaded = [name for name in APPLICATION_MODULES
            if any(m == name or m.startswith(name + ".") for m in out)]
  assert not loaded, f"importing the core library loaded {loaded}"
  assert "admm_jax.transforms" in out and "optax" in out


def test_package_lists_only_existing_submodules():
  import admm_jax
  for name in admm_jax._SUBMODULES:
    assert os.path.exists(os.path.join(ROOT, "admm_jax", name + ".py")) or os.path.isdir(
        os.path.join(ROOT, "admm_jax", name)), f"admm_jax lists a missing submodule {name!r}"
