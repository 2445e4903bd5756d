"""Compile once: the persistent compilation cache (admm_jax.app.compilation), compile counts in
report.json, and programs that compile once instead of op by op.

A second identical run loads every program it compiled from the cache; the model's init is
one program (run eagerly, ResNet-18's init compiled ~150 small programs).
"""
import os

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache

from admm_jax import models
from admm_jax.app import compilation, configlib, study, train, trainer
from fmnist import needs_fmnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "fashion_mnist_lenet.py")


def test_cache_folder_default_override_and_off():
  assert compilation.default_cache_dir({"XDG_CACHE_HOME": "/x"}) == "/x/admm_jax/jax"
  assert compilation.cache_dir_from_env({"HOME": "/h"}).endswith(
      os.path.join(".cache", "admm_jax", "jax"))
  assert compilation.cache_dir_from_env({compilation.ENV_VAR: "/c"}) == "/c"
  assert compilation.cache_dir_from_env({compilation.ENV_VAR: "OFF"}) is None
  assert compilation.cache_dir_from_env({"JAX_COMPILATION_CACHE_DIR": "/j",
                                         compilation.ENV_VAR: "off"}) == "/j"  # jax's own wins


def test_compile_stats_difference():
  a = compilation.CompileStats(programs=5, cache_hits=2, seconds=3.0)
  b = compilation.CompileStats(programs=9, cache_hits=6, seconds=3.5)
  d = b - a
  assert (d.programs, d.cache_hits, d.compiled) == (4, 4, 0)
  assert d.to_dict() == {"compile_s": 0.5, "programs": 4, "compiled": 0, "cache_hits": 4}


@pytest.fixture
def private_cache(tmp_path):
  """A fresh persistent cache for one test; conftest's settings come back afterwards."""
  names = ("jax_compilation_cache_dir", "jax_enable_compilation_cache",
           "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  saved = {n: getattr(jax.config, n) for n in names}
  yield compilation.setup_cache(str(tmp_path / "jax_cache"))
  for n, v in saved.items():
    jax.config.update(n, v)
  compilation_cache.reset_cache()


def _small_config(**fields):
  # Pretrain only, 4 steps of LeNet(1): the run's programs, not its training, are the point.
  return configlib.override(study.load_config(CONFIG, "tiny"), {
      "stages": "pretrain", "data.limit_train": 256, "data.validation_size": 64,
      "data.limit_test": 64, "model.width": 1, "pretrain.epochs": 1, "parallel.data_axis": 1,
      "eval_batch_size": 64, **fields})


@pytest.mark.slow   # two pretrain runs in process (~23 s on 2 loaded cores)
@needs_fmnist
def test_second_identical_run_compiles_nothing(private_cache, tmp_path):
  first = trainer.train_and_evaluate(_small_config(), str(tmp_path / "a"))["compilation"]
  second = trainer.train_and_evaluate(_small_config(), str(tmp_path / "b"))["compilation"]
  assert first["cache_dir"] == second["cache_dir"] == private_cache
  assert first["compiled"] > 0 and first["compile_s"] > 0
  assert second["compiled"] == 0, second
  # The re-created train and eval steps came from disk (the rest from memory: same process).
  assert second["cache_hits"] == second["programs"] > 0
  assert os.listdir(private_cache)


def test_model_init_is_one_program(private_cache):
  before = compilation.COUNTER.snapshot()
  model = models.get_model("resnet18", 1, conv_impl="auto")
  variables = train.init_variables(model, jax.random.key(7), (32, 32, 3))
  assert len(jax.tree.leaves(variables["params"])) == 62
  assert (compilation.COUNTER.snapshot() - before).programs <= 2  # init (+ the key's seed)
