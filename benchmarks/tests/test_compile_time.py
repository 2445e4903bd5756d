"""A guard on compile time: the train step of every model in the registry compiles in bounded
time on CPU, without the persistent cache (a cold compile).

The bound is on the process's CPU seconds, not wall time (these machines are shared: under a
load average of 16 the wall time of the same compile tripled), and loose: it catches what
makes compile time explode, e.g. a Python-unrolled PGD loop (x steps) or a recompilation per
step. Measured with this test (2 cores, load average 16): LeNet(1) 3.1 CPU s (7.7 s wall),
VGG-16(1) 10.1 (37.1), ResNet-18(1) 12.7 (52.4).
"""
import time

import jax
import jax.numpy as jnp
import optax
import pytest
from jax.experimental.compilation_cache import compilation_cache

from admm_jax import models
from admm_jax.app import compilation, train

BOUND_CPU_S = 60.0


@pytest.fixture
def no_persistent_cache():
  enabled = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()
  yield
  jax.config.update("jax_enable_compilation_cache", enabled)
  compilation_cache.reset_cache()


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_train_step_compiles_in_bounded_time(name, no_persistent_cache):
  shape = models.REGISTRY[name].input_shape
  model = models.get_model(name, 1, conv_impl="auto")
  variables = train.init_variables(model, jax.random.key(0), shape)
  tx = optax.sgd(0.01, momentum=0.9)
  state = train.create_train_state(variables["params"], variables["batch_stats"], tx)
  batch = {"image": jnp.zeros((8,) + shape), "label": jnp.zeros((8,), jnp.int32)}
  step = train.jit_train_step(model, tx, train.Attack("pgd", 0.03, 0.01, 10))
  before = compilation.COUNTER.snapshot()
  t, cpu = time.perf_counter(), time.process_time()
  step.lower(state, batch, jax.random.key(1)).compile()
  seconds, cpu_seconds = time.perf_counter() - t, time.process_time() - cpu
  compiled = compilation.COUNTER.snapshot() - before
  assert compiled.compiled == 1 and compiled.cache_hits == 0  # one cold compile, no cache
  print(f"{name}(1) PGD-10 train step: compiled in {seconds:.1f} s ({cpu_seconds:.1f} CPU s)")
  assert cpu_seconds < BOUND_CPU_S, (
      f"{name}: the train step took {cpu_seconds:.0f} CPU seconds to compile")
