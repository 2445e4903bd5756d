"""A guard on compile time: the train step of every model in the registry compiles in bounded
time on CPU, without the persistent cache (a cold compile).

The bound is loose (these machines are shared: the same compile takes 2-3x longer under load)
and catches what made compile time explode before: a Python-unrolled PGD loop (x steps), an
init compiled op by op, a recompilation per step. Measured (2 loaded cores, load 6-12):
ResNet-18(1) PGD-10 batch 32 compiled in 8.9 s with XLA's convolution.
"""
import time

import jax
import jax.numpy as jnp
import optax
import pytest
from jax.experimental.compilation_cache import compilation_cache

from admm_jax import compilation, models, train

BOUND_S = 90.0
SHAPES = {"lenet": (28, 28, 1), "vgg16": (32, 32, 3), "resnet18": (32, 32, 3)}


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
  assert set(models.MODELS) == set(SHAPES)  # a new model needs its input shape here
  model = models.get_model(name, 1, conv_impl="auto")
  variables = train.init_variables(model, jax.random.key(0), SHAPES[name])
  tx = optax.sgd(0.01, momentum=0.9)
  state = train.create_train_state(variables["params"], variables["batch_stats"], tx)
  batch = {"image": jnp.zeros((8,) + SHAPES[name]), "label": jnp.zeros((8,), jnp.int32)}
  step = train.jit_train_step(model, tx, train.Attack("pgd", 0.03, 0.01, 10))
  before = compilation.COUNTER.snapshot()
  t = time.perf_counter()
  step.lower(state, batch, jax.random.key(1)).compile()
  seconds = time.perf_counter() - t
  compiled = compilation.COUNTER.snapshot() - before
  assert compiled.compiled == 1 and compiled.cache_hits == 0  # one cold compile, no cache
  print(f"{name}(1) PGD-10 train step: compiled in {seconds:.1f} s")
  assert seconds < BOUND_S, f"{name}: the train step took {seconds:.0f} s to compile"
