"""Tests of admm_jax.models: pooling and normalisation layers; model shapes and names.

The CPU convolutions are tested in test_cpu_conv.py."""
import re

import chex
from flax import linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from admm_jax import models
from admm_jax.models import layers
from model_variables import abstract_variables, leaf_shapes, random_variables

TOL = dict(rtol=1e-5, atol=1e-5)




# ---------------------------------------------------------------- layers


def test_max_pool_2x2_matches_flax_max_pool_values_and_gradients():
  # Continuous random values: no ties inside a window, where gradient conventions differ.
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 6, 8, 3), np.float32)
  cotangent = rng.standard_normal((2, 3, 4, 3), np.float32)

  @jax.jit
  def values_and_grads(x, cotangent):
    out = []
    for pool in (layers.max_pool_2x2, lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))):
      y, vjp = jax.vjp(pool, x)
      out.append((y, vjp(cotangent)[0]))
    return out

  (y, dx), (y_ref, dx_ref) = values_and_grads(x, cotangent)
  chex.assert_shape(y, (2, 3, 4, 3))
  np.testing.assert_array_equal(y, y_ref)
  np.testing.assert_allclose(dx, dx_ref, **TOL)


def _jnp_max_pool(x):
  """The reference rule: a reshape and `jnp.max`, whose gradient splits ties evenly."""
  b, h, w, c = x.shape
  return jnp.max(x.reshape(b, h // 2, 2, w // 2, 2, c), axis=(2, 4))


def _tied_inputs(seed: int = 0) -> np.ndarray:
  """Small integers: most windows hold ties (2, 3 or 4 equal maxima), many of them zeros."""
  return np.random.default_rng(seed).integers(-2, 3, (3, 6, 8, 5)).astype(np.float32)


def test_max_pool_2x2_gradients_equal_jnp_max_exactly_on_ties():
  # The hand-written derivative must be the same function as jnp.max's, ties included, in
  # reverse mode (grad) and in forward mode (jvp), to the bit.
  x = _tied_inputs()
  rng = np.random.default_rng(1)
  cotangent = rng.standard_normal((3, 3, 4, 5)).astype(np.float32)
  tangent = rng.standard_normal(x.shape).astype(np.float32)

  @jax.jit
  def derivatives(x, cotangent, tangent):
    out = []
    for pool in (layers.max_pool_2x2, _jnp_max_pool):
      y, vjp = jax.vjp(pool, x)
      out.append((y, vjp(cotangent)[0], jax.jvp(pool, (x,), (tangent,))[1]))
    return out

  (y, dx, dy), (y_ref, dx_ref, dy_ref) = derivatives(x, cotangent, tangent)
  windows = x.reshape(3, 3, 2, 4, 2, 5)
  assert ((windows == y_ref[:, :, None, :, None]).sum(axis=(2, 4)) > 1).mean() > 0.3
  np.testing.assert_array_equal(y, y_ref)
  np.testing.assert_array_equal(dx, dx_ref)
  np.testing.assert_array_equal(dy, dy_ref)


def test_relu_after_max_pool_equals_relu_before_with_gradients():
  # relu_max_pool_2x2 pools first (4x fewer ReLU elements); it must be the same function as
  # ReLU then pool, with the same gradient also where ReLU's zeros tie inside a window.
  x = _tied_inputs(2)
  cotangent = np.random.default_rng(3).standard_normal((3, 3, 4, 5)).astype(np.float32)

  @jax.jit
  def values_and_grads(x, cotangent):
    out = []
    for f in (layers.relu_max_pool_2x2, lambda x: layers.max_pool_2x2(nn.relu(x))):
      y, vjp = jax.vjp(f, x)
      out.append((y, vjp(cotangent)[0]))
    return out

  (y, dx), (y_ref, dx_ref) = values_and_grads(x, cotangent)
  np.testing.assert_array_equal(y, y_ref)
  np.testing.assert_array_equal(dx, dx_ref)


def test_max_pool_2x2_rejects_odd_sizes():
  with pytest.raises(ValueError, match="even"):
    layers.max_pool_2x2(jnp.zeros((1, 5, 4, 1)))


def test_normalize_input_per_channel_and_validation():
  x = jnp.ones((2, 4, 4, 3))
  y = layers.normalize_input(x, (0.5, 0.0, 1.0), (0.5, 2.0, 1.0))
  np.testing.assert_allclose(y[0, 0, 0], [1.0, 0.5, 0.0])
  assert layers.normalize_input(x, None, None) is x
  with pytest.raises(ValueError, match="both"):
    layers.normalize_input(x, (0.5, 0.5, 0.5), None)
  with pytest.raises(ValueError, match="one entry per input channel"):
    layers.normalize_input(x, (0.5,), (1.0,))


# ---------------------------------------------------------------- LeNet


@pytest.fixture(scope="module")
def lenet1():
  model = models.LeNet(width=1)
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(3, 28, 28, 1)), jnp.float32)
  return model, random_variables(model, x.shape), x


def test_lenet_output_shape_and_param_paths(lenet1):
  model, variables, x = lenet1
  chex.assert_shape(model.apply(variables, x), (3, 10))
  assert list(variables) == ["params"]
  assert leaf_shapes(variables["params"]) == {
      "conv1/kernel": (5, 5, 1, 2), "conv1/bias": (2,),
      "conv2/kernel": (5, 5, 2, 4), "conv2/bias": (4,),
      "fc1/kernel": (7 * 7 * 4, 64), "fc1/bias": (64,),
      "fc2/kernel": (64, 10), "fc2/bias": (10,)}


def test_lenet_ignores_train_flag_and_impls_agree(lenet1):
  model, variables, x = lenet1
  logits = model.apply(variables, x, train=False)
  np.testing.assert_array_equal(model.apply(variables, x, train=True), logits)
  # The CPU convolutions ("auto": Toeplitz GEMMs for LeNet(1)) hold the same parameters.
  cpu_logits = models.get_model("lenet", 1, conv_impl="auto").apply(variables, x)
  np.testing.assert_allclose(cpu_logits, logits, **TOL)


@pytest.mark.parametrize("width, in_channels, num_classes, expected", [
    (1, 1, 10, 13514),   # 52 + 204 + 12608 + 650
    (2, 1, 10, 52506),   # 104 + 808 + 50304 + 1290
    (2, 3, 7, 52319),    # 304 + 808 + 50304 + 903
])
def test_lenet_param_count_closed_form(width, in_channels, num_classes, expected):
  w, c, k = width, in_channels, num_classes
  formula = (25 * c * 2 * w + 2 * w) + (25 * 2 * w * 4 * w + 4 * w) \
      + (49 * 4 * w * 64 * w + 64 * w) + (64 * w * k + k)
  assert formula == expected
  assert models.lenet_param_count(w, c, k) == expected
  variables = abstract_variables(models.LeNet(width=w, num_classes=k), (1, 28, 28, c))
  assert sum(int(np.prod(s)) for s in leaf_shapes(variables["params"]).values()) == expected


def test_lenet_input_normalisation_is_off_by_default_and_exact_when_on(lenet1):
  model, variables, x = lenet1
  normed = models.LeNet(width=1, input_mean=(0.1307,), input_std=(0.3081,))
  np.testing.assert_allclose(normed.apply(variables, x),
                             model.apply(variables, (x - 0.1307) / 0.3081), **TOL)


# ---------------------------------------------------------------- VGG-16


@pytest.fixture(scope="module")
def vgg1():
  # flax's conv (the default) compiles several times faster; the CPU kernels are pinned by
  # test_cpu_conv.py.
  model = models.VGG16(width=1)
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 32, 32, 3)), jnp.float32)
  return model, random_variables(model, x.shape), x


def test_vgg16_param_paths_and_channel_scaling(vgg1):
  _, variables, _ = vgg1
  paths = leaf_shapes(variables["params"])
  conv_kernels = [p for p in paths if re.fullmatch(r".*conv.*/kernel", p)]
  assert sorted(conv_kernels) == sorted(f"conv{i}/kernel" for i in range(1, 14))
  assert not any(re.fullmatch(r".*conv[^/]*/bias", p) for p in paths)  # BN follows each conv
  cout = [4, 4, 8, 8, 16, 16, 16, 32, 32, 32, 32, 32, 32]   # standard cfg / 16
  cin = [3] + cout[:-1]
  for i in range(13):
    assert paths[f"conv{i + 1}/kernel"] == (3, 3, cin[i], cout[i])
    assert paths[f"bn{i + 1}/scale"] == paths[f"bn{i + 1}/bias"] == (cout[i],)
  assert paths["fc/kernel"] == (32, 10) and paths["fc/bias"] == (10,)
  assert set(leaf_shapes(variables["batch_stats"])) == {
      f"bn{i}/{s}" for i in range(1, 14) for s in ("mean", "var")}


def test_vgg16_full_width_classifier_has_512_inputs():
  variables = abstract_variables(models.VGG16(width=16), (1, 32, 32, 3))
  paths = leaf_shapes(variables["params"])
  assert paths["conv1/kernel"] == (3, 3, 3, 64) and paths["conv13/kernel"] == (3, 3, 512, 512)
  assert paths["fc/kernel"] == (512, 10)


# ---------------------------------------------------------------- ResNet-18


@pytest.fixture(scope="module")
def resnet1():
  model = models.ResNet18(width=1)
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 32, 32, 3)), jnp.float32)
  return model, random_variables(model, x.shape), x


def test_resnet18_param_paths_and_conv_count(resnet1):
  _, variables, _ = resnet1
  paths = leaf_shapes(variables["params"])
  conv_kernels = [p for p in paths if re.fullmatch(r".*conv.*/kernel", p)]
  # 1 stem + 8 blocks x 2 + 3 shortcut 1x1 convs = the paper's 20 conv layers.
  assert len(conv_kernels) == 20
  shortcuts = sorted(p for p in conv_kernels if "shortcut" in p)
  assert shortcuts == ["layer2_0/shortcut_conv/kernel", "layer3_0/shortcut_conv/kernel",
                       "layer4_0/shortcut_conv/kernel"]
  assert paths["conv1/kernel"] == (3, 3, 3, 4) and paths["bn1/scale"] == (4,)
  for stage, c in zip(range(1, 5), (4, 8, 16, 32)):
    for b in range(2):
      cin = c if b == 1 else max(4, c // 2)
      assert paths[f"layer{stage}_{b}/conv1/kernel"] == (3, 3, cin, c)
      assert paths[f"layer{stage}_{b}/conv2/kernel"] == (3, 3, c, c)
      assert paths[f"layer{stage}_{b}/bn2/scale"] == (c,)
  assert paths["layer2_0/shortcut_conv/kernel"] == (1, 1, 4, 8)
  assert paths["layer4_0/shortcut_bn/scale"] == (32,)
  assert paths["fc/kernel"] == (32, 10)
  assert not any(re.fullmatch(r".*conv[^/]*/bias", p) for p in paths)  # BN follows each conv


def test_resnet18_full_width_is_standard():
  variables = abstract_variables(models.ResNet18(width=16), (1, 32, 32, 3))
  paths = leaf_shapes(variables["params"])
  assert paths["conv1/kernel"] == (3, 3, 3, 64)
  assert paths["layer4_1/conv2/kernel"] == (3, 3, 512, 512)
  assert paths["fc/kernel"] == (512, 10)
  n = sum(int(np.prod(s)) for s in paths.values())
  assert n == 11_173_962   # torchvision-style CIFAR ResNet-18 with 10 classes


# ---------------------------------------------------------------- BatchNorm models


@pytest.mark.parametrize("fixture", ["vgg1", "resnet1"])
def test_batch_norm_models_update_stats_only_in_train_mode(fixture, request):
  model, variables, x = request.getfixturevalue(fixture)

  @jax.jit
  def train_and_eval(variables, x):
    train = model.apply(variables, x, train=True, mutable=["batch_stats"])
    evaluation = model.apply(variables, x, train=False, mutable=["batch_stats"])
    # The uniform convention (no mutable) works in eval mode.
    return train, evaluation, model.apply(variables, x, train=False)

  (logits, updates), (eval_logits, eval_updates), plain_logits = train_and_eval(variables, x)
  chex.assert_shape(logits, (2, 10))
  chex.assert_trees_all_equal_shapes(updates["batch_stats"], variables["batch_stats"])
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), updates["batch_stats"],
                         variables["batch_stats"])
  assert all(jax.tree.leaves(changed))
  # Running mean after one step: momentum 0.9 on the old mean, 0.1 on the batch mean of the
  # stem conv's output (bn1 follows conv1 in both models).
  conv1 = lax.conv_general_dilated(x, variables["params"]["conv1"]["kernel"], (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  want = 0.9 * variables["batch_stats"]["bn1"]["mean"] + 0.1 * conv1.mean(axis=(0, 1, 2))
  np.testing.assert_allclose(updates["batch_stats"]["bn1"]["mean"], want, **TOL)
  chex.assert_trees_all_equal(eval_updates["batch_stats"], variables["batch_stats"])
  np.testing.assert_array_equal(plain_logits, eval_logits)
  assert model.has_batch_norm


# ---------------------------------------------------------------- registry


@pytest.mark.parametrize("name, cls, bn", [("lenet", models.LeNet, False),
                                           ("vgg16", models.VGG16, True),
                                           ("resnet18", models.ResNet18, True)])
def test_get_model_builds_by_name(name, cls, bn):
  model = models.get_model(name, width=2, num_classes=7)
  assert isinstance(model, cls)
  assert (model.width, model.num_classes, model.conv) == (2, 7, nn.Conv)
  assert models.has_batch_norm(name) is bn


@pytest.mark.parametrize("name", ["lenet", "vgg16", "resnet18"])
def test_models_reject_non_positive_width(name):
  with pytest.raises(ValueError, match="width must be >= 1"):
    abstract_variables(models.get_model(name, width=0), (1, 32, 32, 1))


def test_get_model_rejects_unknown_name():
  with pytest.raises(ValueError, match=r"allowed names: \['lenet', 'resnet18', 'vgg16'\]"):
    models.get_model("alexnet", width=1, num_classes=10)
  with pytest.raises(ValueError, match="allowed names"):
    models.has_batch_norm("alexnet")
