"""What importing admm_jax loads, and who changes process-wide settings.

The core library (transforms, attacks, projections, sparsity, losses) loads only what jax and optax
bring, not the trainer's stack; models load the CPU kernels only when asked for them; malloc
tuning is the CLI's explicit choice, never a side effect of tracing.
"""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What someone who only wants the optax transforms must not pay for: the trainer's input
# pipeline, checkpoints, configs and plots, the benchmarks' torch, and our own application
# modules (models pull flax, data pulls tfds).
APPLICATION_MODULES = ("tensorflow_datasets", "orbax", "ml_collections", "grain", "matplotlib",
                       "tensorboard", "torch", "flax", "admm_jax.models", "admm_jax.app",
                       "admm_jax.kernels")


def _modules_after(code: str) -> list[str]:
  """The modules loaded after running `code` in a fresh interpreter."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  probe = code + '\nimport sys\nprint("\\n".join(sorted(sys.modules)))\n'
  return subprocess.run([sys.executable, "-c", probe], env=env, cwd=ROOT, check=True,
                        capture_output=True, text=True).stdout.split()


def test_core_library_imports_no_application_modules():
  # A fresh interpreter: this test process has long since imported everything.
  out = _modules_after(
      "import admm_jax.transforms, admm_jax.attacks, admm_jax.projections, admm_jax.sparsity, "
      "admm_jax.losses")
  loaded = [name for name in APPLICATION_MODULES
            if any(m == name or m.startswith(name + ".") for m in out)]
  assert not loaded, f"importing the core library loaded {loaded}"
  assert "admm_jax.transforms" in out and "optax" in out


def test_package_lists_only_existing_submodules():
  import admm_jax
  for name in admm_jax._SUBMODULES:
    assert os.path.exists(os.path.join(ROOT, "admm_jax", name + ".py")) or os.path.isdir(
        os.path.join(ROOT, "admm_jax", name)), f"admm_jax lists a missing submodule {name!r}"


def test_config_and_default_models_load_no_cpu_kernels():
  # configlib reads CONV_IMPLS from the light kernels package; a model on flax's nn.Conv (the
  # default) never imports the CPU convolutions.
  out = _modules_after("import jax, jax.numpy as jnp\n"
                       "from admm_jax import configlib, models\n"
                       "m = models.get_model('lenet', 1)\n"
                       "jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))\n")
  assert "admm_jax.kernels" in out and "admm_jax.models" in out
  assert "admm_jax.kernels.cpu_conv" not in out
  assert "admm_jax.kernels.malloc" not in out


def test_tracing_cpu_kernels_changes_no_process_settings():
  # The CPU convolutions used to tune glibc malloc when first traced; that is now the caller's
  # explicit choice (the CLI's --tune_malloc, the benchmarks), never a side effect.
  out = _modules_after("import jax, jax.numpy as jnp\n"
                       "from admm_jax import models\n"
                       "m = models.get_model('lenet', 4, conv_impl='im2col')\n"
                       "x = jnp.zeros((2, 28, 28, 1))\n"
                       "jax.jit(m.init).lower(jax.random.key(0), x)\n")  # traced, not run
  assert "admm_jax.kernels.cpu_conv" in out
  assert "admm_jax.kernels.malloc" not in out


@pytest.mark.parametrize("flag, tuned", [(None, True), ("--notune_malloc", False)])
def test_cli_tunes_malloc_explicitly_and_can_be_told_not_to(tmp_path, flag, tuned):
  # The run stops at the missing data folder, after the tuning decision and before any work.
  cmd = [sys.executable, "-m", "admm_jax.main",
         f"--config={os.path.join(ROOT, 'configs', 'fashion_mnist_lenet.py')}",
         f"--workdir={tmp_path / 'run'}", "--config.data.dir=/no/such/dir"]
  env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
  env["PYTHONPATH"] = os.pathsep.join(
      [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
  proc = subprocess.run(cmd + ([flag] if flag else []), env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert ("glibc malloc tuned" in proc.stderr) == (tuned and sys.platform.startswith("linux"))
