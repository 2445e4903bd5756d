"""bfloat16 compute (config.model.dtype).

Fast tests: every model computes in bfloat16 while its parameters and logits stay float32;
the CPU convolutions agree with float32; a bad dtype is one sentence.
Slow tier: the :tiny recipe in float32 and in bfloat16, stage by stage within 2 points, the
pruned weights exactly zero, and the projections fed float32.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from admm_jax import models, projections, sparsity
from admm_jax.app import configlib, study, train, trainer
from admm_jax.kernels import cpu_conv
from fmnist import needs_fmnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "fashion_mnist_lenet.py")


def _jit(fn):
  """jax.jit without LLVM's optimisations: compiling is nearly all these tests' time."""
  return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0})


@pytest.mark.parametrize("name", sorted(models.REGISTRY))
def test_bfloat16_model_computes_in_bfloat16_with_float32_params_and_logits(name):
  m16 = models.get_model(name, 1, conv_impl="auto", dtype="bfloat16")
  m32 = models.get_model(name, 1, conv_impl="auto")
  v = train.init_variables(m16, jax.random.key(0), models.REGISTRY[name].input_shape)
  assert {leaf.dtype for leaf in jax.tree.leaves(v)} == {jnp.dtype(jnp.float32)}
  x = jax.random.uniform(jax.random.key(1), (4,) + models.REGISTRY[name].input_shape)
  f16 = train.logits_fn(m16, v["batch_stats"], train=False)
  jaxpr = str(jax.make_jaxpr(f16)(v["params"], x))
  assert "dot_general" in jaxpr and "bf16[" in jaxpr  # the matmuls run in bfloat16
  y16 = _jit(f16)(v["params"], x)
  y32 = _jit(train.logits_fn(m32, v["batch_stats"], train=False))(v["params"], x)
  assert y16.dtype == jnp.float32
  # bfloat16 keeps 8 bits: a few percent of the logits' scale, no more.
  np.testing.assert_allclose(y16, y32, atol=0.05 * float(jnp.abs(y32).max()) + 1e-3)


@pytest.mark.parametrize("impl", ["im2col", "hybrid", "toeplitz", "auto", "xla"])
def test_cpu_convolutions_in_bfloat16_match_float32(impl):
  x = jax.random.uniform(jax.random.key(0), (2, 14, 14, 16))
  conv16 = cpu_conv.Conv(32, (5, 5), impl=impl, dtype=jnp.bfloat16)
  conv32 = cpu_conv.Conv(32, (5, 5), impl=impl)
  params = conv32.init(jax.random.key(1), x)
  y16, y32 = conv16.apply(params, x), conv32.apply(params, x)
  assert y16.dtype == jnp.bfloat16 and y32.dtype == jnp.float32
  assert jax.tree.leaves(params)[0].dtype == jnp.float32
  rel = float(jnp.abs(y16.astype(jnp.float32) - y32).max() / jnp.abs(y32).max())
  assert rel < 0.02, rel


def test_bfloat16_step_feeds_float32_to_projections_losses_and_attack(monkeypatch):
  # Traced only (eval_shape): which dtypes reach ADMM's projections, the attack's iterate and
  # the new params / optimizer state when the model computes in bfloat16.
  import optax  # pylint: disable=import-outside-toplevel
  from admm_jax import transforms  # pylint: disable=import-outside-toplevel
  seen = []
  project = projections.project
  monkeypatch.setattr(projections, "project",
                      lambda w, *a, **k: seen.append(jnp.result_type(w)) or project(w, *a, **k))
  model = models.get_model("lenet", 1, conv_impl="auto", dtype="bfloat16")
  v = train.init_variables(model, jax.random.key(0), models.REGISTRY["lenet"].input_shape)
  spec = {"conv2/kernel": ("filter", 0.5), "fc1/kernel": ("irregular", 0.9)}
  tx = optax.chain(transforms.admm(spec, rho=1e-3, update_every=2), optax.sgd(0.01))
  state = train.create_train_state(v["params"], v["batch_stats"], tx)
  batch = {"image": jnp.zeros((4, 28, 28, 1)), "label": jnp.zeros((4,), jnp.int32)}
  attack = train.Attack("pgd", 0.1, 0.02, 2)
  new, metrics = jax.eval_shape(
      lambda s, b, k: train.train_step(s, b, k, model=model, tx=tx, attack=attack),
      state, batch, jax.random.key(1))
  assert seen and set(seen) == {jnp.dtype(jnp.float32)}  # init's and the Z/U update's
  assert {x.dtype for x in jax.tree.leaves((new.params, new.opt_state))
          if jnp.issubdtype(x.dtype, jnp.floating)} == {jnp.dtype(jnp.float32)}
  assert metrics["loss"].dtype == jnp.float32
  apply_fn = train.logits_fn(model, {}, train=False)
  x_adv = jax.eval_shape(lambda p, x, y, k: attack(apply_fn, p, x, y, k), v["params"],
                         batch["image"], batch["label"], jax.random.key(2))
  assert x_adv.dtype == jnp.float32  # the attack's iterate stays float32


def test_bad_dtype_is_one_sentence_naming_the_field():
  c = configlib.base_config()
  c.model.dtype = "float16"
  with pytest.raises(configlib.ConfigError, match=r"config\.model\.dtype='float16'.*bfloat16"):
    configlib.validate(c)
  with pytest.raises(ValueError, match="float32 or bfloat16"):
    models.get_model("lenet", 1, dtype="float16")


# ----------------------------------------------------------- slow: :tiny, float32 vs bfloat16

@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
  """The :tiny recipe in float32 and in bfloat16 (one device), with the dtypes that reached
  the projections while the bfloat16 run traced."""
  seen = []
  project = projections.project

  def recording_project(w, *args, **kwargs):
    seen.append(jnp.result_type(w))
    return project(w, *args, **kwargs)

  reports = {}
  for dtype in ("float32", "bfloat16"):
    workdir = str(tmp_path_factory.mktemp(dtype))
    config = configlib.override(study.load_config(CONFIG, "tiny"),
                                {"model.dtype": dtype, "parallel.data_axis": 1})
    with pytest.MonkeyPatch.context() as mp:
      if dtype == "bfloat16":
        mp.setattr(projections, "project", recording_project)
      reports[dtype] = (trainer.train_and_evaluate(config, workdir), workdir, config)
  return reports, seen


@pytest.mark.slow
@needs_fmnist
def test_bfloat16_tiny_run_within_two_points_of_float32(tiny_runs):
  reports, _ = tiny_runs
  f32, b16 = reports["float32"][0], reports["bfloat16"][0]
  assert list(f32["stages"]) == list(b16["stages"]) == ["pretrain", "admm", "retrain"]
  for stage in f32["stages"]:
    for k in ("natural_accuracy", "adversarial_accuracy"):
      a, b = f32["stages"][stage][k], b16["stages"][stage][k]
      assert abs(a - b) <= 0.02, (stage, k, a, b)


@pytest.mark.slow
@needs_fmnist
def test_bfloat16_run_masks_exact_and_projections_see_float32(tiny_runs):
  reports, seen = tiny_runs
  report, workdir, config = reports["bfloat16"]
  assert seen and set(seen) == {jnp.dtype(jnp.float32)}, set(seen)
  ctx = trainer.make_context(config, workdir)
  model = ctx.model(config.model.width)
  assert model.dtype == jnp.bfloat16
  out = trainer.load_output(ctx, "retrain", ctx.fresh_variables(model, "check"))
  params = jax.device_get(out["params"])
  assert {w.dtype for w in jax.tree.leaves(params)} == {np.dtype(np.float32)}
  masks = sparsity.masks(params, ctx.spec)
  pruned = []

  def check(mask, w):
    if mask is not None:
      assert np.all(w[~np.asarray(mask, bool)] == 0.0)  # pruned weights exactly zero
      pruned.append(float(np.mean(w == 0.0)))

  jax.tree.map(check, masks, params, is_leaf=lambda x: x is None)
  targets = [layer["target"] for layer in report["sparsity"]["layers"].values()]
  assert sorted(pruned) == pytest.approx(sorted(targets), abs=0.01)
