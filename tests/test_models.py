"""Tests of admm_jax.models: fast layers equal their lax references; model shapes and names."""
import re

import chex
from flax import linen as nn
from flax import traverse_util
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from admm_jax import models
from admm_jax.models import layers

TOL = dict(rtol=1e-5, atol=1e-5)


def _paths(tree) -> dict[str, tuple[int, ...]]:
  """'/'-joined leaf paths -> shapes (works on arrays and ShapeDtypeStructs)."""
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


def _abstract_variables(model: nn.Module, shape: tuple[int, ...]):
  """Variables' shapes without running (or compiling) the initialiser."""
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))


def _random_variables(model: nn.Module, shape: tuple[int, ...], seed: int = 0):
  """Variables of the right structure filled by numpy (compiling `model.init` takes seconds).

  Weights ~ N(0, 0.3^2); BatchNorm running variances start at 1 as in `nn.BatchNorm`.
  """
  rng = np.random.default_rng(seed)
  def fill(path, leaf):
    if jax.tree_util.keystr(path).endswith("['var']"):
      return jnp.ones(leaf.shape, leaf.dtype)
    return jnp.asarray(0.3 * rng.standard_normal(leaf.shape), leaf.dtype)
  return jax.tree_util.tree_map_with_path(fill, _abstract_variables(model, shape))


# ---------------------------------------------------------------- layers


_CONV_CASES = [  # x_shape, kernel_shape, strides, padding
    ((2, 8, 8, 1), (5, 5, 1, 3), (1, 1), "SAME"),     # LeNet conv1-like, cin = 1
    ((2, 6, 7, 3), (3, 3, 3, 4), (1, 1), "SAME"),     # odd sizes
    ((2, 8, 8, 2), (3, 3, 2, 4), (2, 2), "SAME"),     # ResNet downsampling conv
    ((2, 7, 7, 2), (3, 3, 2, 4), (2, 2), "SAME"),     # stride 2 on an odd map
    ((2, 8, 8, 3), (1, 1, 3, 4), (2, 2), "SAME"),     # ResNet 1x1 shortcut
    ((2, 6, 5, 2), (3, 2, 2, 3), (1, 2), ((1, 0), (2, 1))),
    ((2, 6, 5, 2), (3, 2, 2, 3), (1, 1), ((1, 0), (2, 1))),  # asymmetric, non-square
    ((2, 7, 6, 3), (3, 3, 3, 2), (1, 1), "VALID"),
    ((2, 14, 14, 16), (5, 5, 16, 32), (1, 1), "SAME"),  # LeNet(8) conv2
]


def _assert_close_at_scale(got, want):
  """allclose with the absolute tolerance scaled by the largest |want|.

  A convolution output sums up to 400 products of size ~1; FFT round-off scales with the
  largest output, not with each entry.
  """
  np.testing.assert_allclose(got, want, rtol=TOL["rtol"], atol=TOL["atol"] * np.abs(want).max())


@pytest.mark.parametrize(
    "impl, x_shape, kernel_shape, strides, padding",
    [(impl, *case) for impl in ("im2col", "hybrid", "fft", "toeplitz") for case in _CONV_CASES
     if impl != "fft" or case[2] == (1, 1)])  # fft convolves at stride 1 only (tested below)
def test_conv_impls_match_lax_values_and_gradients(impl, x_shape, kernel_shape, strides,
                                                   padding):
  conv_impl = getattr(layers, f"conv2d_{impl}")
  rng = np.random.default_rng(0)
  x = rng.standard_normal(x_shape, np.float32)
  kernel = rng.standard_normal(kernel_shape, np.float32)
  y_shape = jax.eval_shape(lambda x, k: layers.conv2d_xla(x, k, strides, padding), x, kernel)
  cotangent = rng.standard_normal(y_shape.shape, np.float32)

  @jax.jit  # one compilation instead of one per eager op
  def values_and_grads(x, kernel, cotangent):
    out = []
    for conv in (conv_impl, layers.conv2d_xla):
      y, vjp = jax.vjp(lambda x, k: conv(x, k, strides, padding), x, kernel)
      out.append((y, *vjp(cotangent)))   # y, d/dx, d/dkernel
    return out

  got, want = values_and_grads(x, kernel, cotangent)
  chex.assert_trees_all_equal_shapes(got, want)
  for g, w in zip(got, want):
    _assert_close_at_scale(g, w)


@pytest.mark.parametrize("impl", ["im2col", "hybrid", "fft", "toeplitz"])
def test_conv_forward_mode_and_input_only_gradient(impl):
  # Forward mode works (im2col and hybrid are custom_jvps, not custom_vjps) and equals lax's; a gradient
  # with respect to the input alone (the PGD case: the kernel's tangent is a symbolic zero) too.
  conv_impl = getattr(layers, f"conv2d_{impl}")
  rng = np.random.default_rng(2)
  x = rng.standard_normal((2, 6, 6, 3), np.float32)
  kernel = rng.standard_normal((3, 3, 3, 4), np.float32)
  tx, tk = rng.standard_normal(x.shape, np.float32), rng.standard_normal(kernel.shape, np.float32)

  @jax.jit
  def derivatives(x, kernel, tx, tk):
    out = []
    for conv in (conv_impl, layers.conv2d_xla):
      y, ty = jax.jvp(conv, (x, kernel), (tx, tk))
      gx = jax.grad(lambda x: jnp.sum(jnp.sin(conv(x, lax.stop_gradient(kernel)))))(x)
      out.append((y, ty, gx))
    return out

  got, want = derivatives(x, kernel, tx, tk)
  for g, w in zip(got, want):
    _assert_close_at_scale(g, w)


def test_im2col_batch_chunk_rule():
  mb = 1 << 20
  assert layers.im2col_batch_chunk(128, mb // 64, devices=1) == 128   # 2 MB: whole
  assert layers.im2col_batch_chunk(128, 590 * 1024, devices=1) == 4   # 74 MB: 4 x 2.3 MB
  assert layers.im2col_batch_chunk(96, mb, devices=1) == 4            # divisors of 96 only
  assert layers.im2col_batch_chunk(127, mb, devices=1) == 1           # a prime batch
  assert layers.im2col_batch_chunk(128, 64 * mb, devices=1) == 1      # one example is too big
  assert layers.im2col_batch_chunk(128, 590 * 1024, devices=8) == 128  # sharded batch: whole


@pytest.mark.parametrize("impl", ["im2col", "hybrid"])
@pytest.mark.parametrize("strides", [(1, 1), (2, 2)])
def test_kernel_gradient_in_batch_chunks_matches_lax(impl, strides, monkeypatch):
  # The kernel tangent (and so the kernel gradient) loops over batch chunks when the patch
  # matrix is large; forced here to chunks of 2 out of 6 examples.
  monkeypatch.setattr(layers, "im2col_batch_chunk", lambda batch, *_, **__: 2)
  conv_impl = getattr(layers, f"conv2d_{impl}")
  rng = np.random.default_rng(5)
  x = rng.standard_normal((6, 8, 8, 3), np.float32)
  kernel = rng.standard_normal((3, 3, 3, 4), np.float32)
  tk = rng.standard_normal(kernel.shape, np.float32)
  loss = lambda conv: lambda x, k: jnp.sum(jnp.sin(conv(x, k, strides, "SAME")))
  derivatives = jax.jit(lambda conv, x, k, tk: (jax.grad(loss(conv), (0, 1))(x, k),
                                                jax.jvp(lambda k: conv(x, k, strides, "SAME"),
                                                        (k,), (tk,))[1]),
                        static_argnums=0)
  got, want = derivatives(conv_impl, x, kernel, tk), derivatives(layers.conv2d_xla, x, kernel, tk)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    _assert_close_at_scale(g, w)
  jaxpr = str(jax.make_jaxpr(jax.grad(loss(conv_impl), 1))(x, kernel))
  assert "scan" in jaxpr or "while" in jaxpr, "the kernel gradient did not loop over chunks"


@pytest.mark.parametrize("impl", ["im2col", "hybrid", "fft", "toeplitz"])
def test_conv_impls_name_bad_shapes(impl):
  conv = getattr(layers, f"conv2d_{impl}")
  with pytest.raises(ValueError, match=r"conv input must be \(B, H, W, 3\)"):
    conv(jnp.zeros((1, 8, 8, 2)), jnp.zeros((3, 3, 3, 4)))
  with pytest.raises(ValueError, match="does not fit"):
    conv(jnp.zeros((1, 2, 2, 3)), jnp.zeros((5, 5, 3, 4)), (1, 1), "VALID")


def test_fft_conv_rejects_strides_and_negative_padding():
  x, kernel = jnp.zeros((1, 8, 8, 2)), jnp.zeros((3, 3, 2, 4))
  with pytest.raises(ValueError, match="stride"):
    layers.conv2d_fft(x, kernel, (2, 2))
  with pytest.raises(ValueError, match="padding"):
    layers.conv2d_fft(x, kernel, (1, 1), ((-1, 0), (1, 1)))


def test_xla_conv_matches_lax_directly():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 6, 6, 3), np.float32)
  kernel = rng.standard_normal((3, 3, 3, 5), np.float32)
  want = lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_array_equal(layers.conv2d_xla(x, kernel), want)


@pytest.mark.parametrize("use_bias", [True, False])
def test_conv_module_impls_share_params_and_agree(use_bias):
  x = np.random.default_rng(0).standard_normal((2, 6, 6, 3), np.float32)
  im2col = layers.Conv(4, (3, 3), use_bias=use_bias, impl="im2col")
  xla = layers.Conv(4, (3, 3), use_bias=use_bias, impl="xla")
  variables = _random_variables(im2col, x.shape)
  want = {"kernel": (3, 3, 3, 4), "bias": (4,)} if use_bias else {"kernel": (3, 3, 3, 4)}
  assert _paths(variables["params"]) == want
  # Same parameter layout as flax.linen.Conv, so either can load the other's checkpoints.
  flax_conv = nn.Conv(4, (3, 3), use_bias=use_bias)
  assert _paths(_abstract_variables(flax_conv, x.shape)["params"]) == want
  np.testing.assert_allclose(flax_conv.apply(variables, x), xla.apply(variables, x), **TOL)
  np.testing.assert_allclose(im2col.apply(variables, x), xla.apply(variables, x), **TOL)


def test_conv_impl_resolution():
  assert layers.resolve_conv_impl("xla") == "xla"
  assert layers.resolve_conv_impl("im2col") == "im2col"
  assert layers.resolve_conv_impl("hybrid") == "hybrid"
  assert layers.resolve_conv_impl("fft") == "fft"
  assert layers.resolve_conv_impl("toeplitz") == "toeplitz"
  expected = "im2col" if jax.default_backend() == "cpu" else "xla"
  assert layers.resolve_conv_impl("auto") == expected
  with pytest.raises(ValueError, match="impl"):
    layers.resolve_conv_impl("winograd")


@pytest.mark.parametrize(
    "out_hw, kernel_shape, strides, want",
    [
        ((14, 14), (5, 5, 32, 64), (1, 1), "fft"),        # LeNet(16) conv2
        ((14, 14), (5, 5, 16, 32), (1, 1), "fft"),        # LeNet(8) conv2
        ((16, 16), (3, 3, 32, 32), (1, 1), "fft"),        # VGG16(4) conv4
        ((8, 8), (3, 3, 64, 64), (1, 1), "fft"),
        ((14, 14), (5, 5, 8, 16), (1, 1), "hybrid"),      # LeNet(4) conv2
        ((32, 32), (3, 3, 16, 16), (1, 1), "hybrid"),     # VGG16(4) conv2
        ((16, 16), (3, 3, 16, 32), (1, 1), "hybrid"),     # too few products for fft
        ((28, 28), (5, 5, 1, 8), (1, 1), "toeplitz"),     # LeNet(4) conv1
        ((28, 28), (5, 5, 1, 2), (1, 1), "toeplitz"),     # LeNet(1) conv1
        ((14, 14), (5, 5, 2, 4), (1, 1), "toeplitz"),     # LeNet(1) conv2
        ((14, 14), (5, 5, 4, 8), (1, 1), "toeplitz"),     # LeNet(2) conv2
        ((28, 28), (5, 5, 1, 16), (1, 1), "im2col"),      # cout > 8: the band gets costly
        ((32, 32), (3, 3, 1, 8), (1, 1), "im2col"),       # 3x3 on a wide map: a sparse band
        ((28, 28), (5, 5, 1, 32), (1, 1), "im2col"),      # cin < 8
        ((4, 4), (3, 3, 128, 128), (1, 1), "im2col"),     # small maps
        ((16, 16), (3, 3, 16, 32), (2, 2), "im2col"),     # strided
        ((32, 32), (1, 1, 16, 16), (1, 1), "im2col"),     # 1x1: im2col is a plain matmul
    ])
def test_auto_conv_impl_per_layer_on_cpu(out_hw, kernel_shape, strides, want):
  got = layers.cpu_conv_impl(out_hw, kernel_shape, strides)
  assert got == want


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
  return model, _random_variables(model, x.shape), x


def test_lenet_output_shape_and_param_paths(lenet1):
  model, variables, x = lenet1
  chex.assert_shape(model.apply(variables, x), (3, 10))
  assert list(variables) == ["params"]
  assert _paths(variables["params"]) == {
      "conv1/kernel": (5, 5, 1, 2), "conv1/bias": (2,),
      "conv2/kernel": (5, 5, 2, 4), "conv2/bias": (4,),
      "fc1/kernel": (7 * 7 * 4, 64), "fc1/bias": (64,),
      "fc2/kernel": (64, 10), "fc2/bias": (10,)}


def test_lenet_ignores_train_flag_and_impls_agree(lenet1):
  model, variables, x = lenet1
  logits = model.apply(variables, x, train=False)
  np.testing.assert_array_equal(model.apply(variables, x, train=True), logits)
  xla_logits = models.LeNet(width=1, conv_impl="xla").apply(variables, x)
  np.testing.assert_allclose(xla_logits, logits, **TOL)


def test_lenet4_auto_impl_uses_hybrid_conv2_and_matches_xla_with_input_gradients():
  # LeNet(4)'s conv2 (14x14, 8 -> 16) is where "auto" picks the hybrid on CPU: the whole
  # model's logits and PGD's input gradient must still match lax's convolutions.
  if jax.default_backend() == "cpu":
    assert layers.cpu_conv_impl((14, 14), (5, 5, 8, 16), (1, 1)) == "hybrid"
  x = np.random.default_rng(0).random((2, 28, 28, 1), np.float32)
  auto, xla = models.LeNet(width=4), models.LeNet(width=4, conv_impl="xla")
  variables = _random_variables(auto, x.shape)

  @jax.jit
  def logits_and_input_grad(x):
    out = []
    for model in (auto, xla):
      f = lambda x, model=model: model.apply(variables, x)
      out.append((f(x), jax.grad(lambda x: jnp.sum(jax.nn.log_softmax(f(x))[:, 3]))(x)))
    return out

  got, want = logits_and_input_grad(x)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


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
  variables = _abstract_variables(models.LeNet(width=w, num_classes=k), (1, 28, 28, c))
  assert sum(int(np.prod(s)) for s in _paths(variables["params"]).values()) == expected


def test_lenet_input_normalisation_is_off_by_default_and_exact_when_on(lenet1):
  model, variables, x = lenet1
  normed = models.LeNet(width=1, input_mean=(0.1307,), input_std=(0.3081,))
  np.testing.assert_allclose(normed.apply(variables, x),
                             model.apply(variables, (x - 0.1307) / 0.3081), **TOL)


# ---------------------------------------------------------------- VGG-16


@pytest.fixture(scope="module")
def vgg1():
  # The xla conv compiles several times faster; im2col is pinned by the layer tests above.
  model = models.VGG16(width=1, conv_impl="xla")
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 32, 32, 3)), jnp.float32)
  return model, _random_variables(model, x.shape), x


def test_vgg16_param_paths_and_channel_scaling(vgg1):
  _, variables, _ = vgg1
  paths = _paths(variables["params"])
  conv_kernels = [p for p in paths if re.fullmatch(r".*conv.*/kernel", p)]
  assert sorted(conv_kernels) == sorted(f"conv{i}/kernel" for i in range(1, 14))
  assert not any(re.fullmatch(r".*conv[^/]*/bias", p) for p in paths)  # BN follows each conv
  cout = [4, 4, 8, 8, 16, 16, 16, 32, 32, 32, 32, 32, 32]   # standard cfg / 16
  cin = [3] + cout[:-1]
  for i in range(13):
    assert paths[f"conv{i + 1}/kernel"] == (3, 3, cin[i], cout[i])
    assert paths[f"bn{i + 1}/scale"] == paths[f"bn{i + 1}/bias"] == (cout[i],)
  assert paths["fc/kernel"] == (32, 10) and paths["fc/bias"] == (10,)
  assert set(_paths(variables["batch_stats"])) == {
      f"bn{i}/{s}" for i in range(1, 14) for s in ("mean", "var")}


def test_vgg16_full_width_classifier_has_512_inputs():
  variables = _abstract_variables(models.VGG16(width=16), (1, 32, 32, 3))
  paths = _paths(variables["params"])
  assert paths["conv1/kernel"] == (3, 3, 3, 64) and paths["conv13/kernel"] == (3, 3, 512, 512)
  assert paths["fc/kernel"] == (512, 10)


# ---------------------------------------------------------------- ResNet-18


@pytest.fixture(scope="module")
def resnet1():
  model = models.ResNet18(width=1, conv_impl="xla")
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 32, 32, 3)), jnp.float32)
  return model, _random_variables(model, x.shape), x


def test_resnet18_param_paths_and_conv_count(resnet1):
  _, variables, _ = resnet1
  paths = _paths(variables["params"])
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
  variables = _abstract_variables(models.ResNet18(width=16), (1, 32, 32, 3))
  paths = _paths(variables["params"])
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
  conv1 = layers.conv2d_xla(x, variables["params"]["conv1"]["kernel"])
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
  model = models.get_model(name, width=2, num_classes=7, conv_impl="xla")
  assert isinstance(model, cls)
  assert (model.width, model.num_classes, model.conv_impl) == (2, 7, "xla")
  assert models.has_batch_norm(name) is bn


@pytest.mark.parametrize("name", ["lenet", "vgg16", "resnet18"])
def test_models_reject_non_positive_width(name):
  with pytest.raises(ValueError, match="width must be >= 1"):
    _abstract_variables(models.get_model(name, width=0), (1, 32, 32, 1))


def test_get_model_rejects_unknown_name():
  with pytest.raises(ValueError, match=r"allowed names: \['lenet', 'resnet18', 'vgg16'\]"):
    models.get_model("alexnet", width=1, num_classes=10)
  with pytest.raises(ValueError, match="allowed names"):
    models.has_batch_norm("alexnet")
