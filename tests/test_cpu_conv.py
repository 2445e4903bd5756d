"""Tests of admm_jax.kernels.cpu_conv: the CPU convolutions equal lax's, values and
gradients; the per-layer rule; the Conv module is a drop-in for flax.linen.Conv."""
import chex
from flax import linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from admm_jax import models
from admm_jax.kernels import CONV_IMPLS, cpu_conv
from model_variables import abstract_variables, leaf_shapes, random_variables

TOL = dict(rtol=1e-5, atol=1e-5)




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
  conv_impl = getattr(cpu_conv, f"conv2d_{impl}")
  rng = np.random.default_rng(0)
  x = rng.standard_normal(x_shape, np.float32)
  kernel = rng.standard_normal(kernel_shape, np.float32)
  y_shape = jax.eval_shape(lambda x, k: cpu_conv.conv2d_xla(x, k, strides, padding), x, kernel)
  cotangent = rng.standard_normal(y_shape.shape, np.float32)

  @jax.jit  # one compilation instead of one per eager op
  def values_and_grads(x, kernel, cotangent):
    out = []
    for conv in (conv_impl, cpu_conv.conv2d_xla):
      y, vjp = jax.vjp(lambda x, k: conv(x, k, strides, padding), x, kernel)
      out.append((y, *vjp(cotangent)))   # y, d/dx, d/dkernel
    return out

  got, want = values_and_grads(x, kernel, cotangent)
  chex.assert_trees_all_equal_shapes(got, want)
  for g, w in zip(got, want):
    _assert_close_at_scale(g, w)


@pytest.mark.parametrize("impl", ["im2col", "hybrid", "fft", "toeplitz"])
def test_conv_forward_mode_and_input_only_gradient(impl):
  # Forward mode works (im2col and hybrid are custom_jvps, not custom_vjps) and equals lax's; a
  # gradient with respect to the input alone (the PGD case: the kernel's tangent is a symbolic
  # zero) too.
  conv_impl = getattr(cpu_conv, f"conv2d_{impl}")
  rng = np.random.default_rng(2)
  x = rng.standard_normal((2, 6, 6, 3), np.float32)
  kernel = rng.standard_normal((3, 3, 3, 4), np.float32)
  tx, tk = rng.standard_normal(x.shape, np.float32), rng.standard_normal(kernel.shape, np.float32)

  @jax.jit
  def derivatives(x, kernel, tx, tk):
    out = []
    for conv in (conv_impl, cpu_conv.conv2d_xla):
      y, ty = jax.jvp(conv, (x, kernel), (tx, tk))
      gx = jax.grad(lambda x: jnp.sum(jnp.sin(conv(x, lax.stop_gradient(kernel)))))(x)
      out.append((y, ty, gx))
    return out

  got, want = derivatives(x, kernel, tx, tk)
  for g, w in zip(got, want):
    _assert_close_at_scale(g, w)


def test_im2col_batch_chunk_rule():
  mb = 1 << 20
  assert cpu_conv.im2col_batch_chunk(128, mb // 64, devices=1) == 128   # 2 MB: whole
  assert cpu_conv.im2col_batch_chunk(128, 590 * 1024, devices=1) == 4   # 74 MB: 4 x 2.3 MB
  assert cpu_conv.im2col_batch_chunk(96, mb, devices=1) == 4            # divisors of 96 only
  assert cpu_conv.im2col_batch_chunk(127, mb, devices=1) == 1           # a prime batch
  assert cpu_conv.im2col_batch_chunk(128, 64 * mb, devices=1) == 1      # one example is too big
  assert cpu_conv.im2col_batch_chunk(128, 590 * 1024, devices=8) == 128  # sharded batch: whole


@pytest.mark.parametrize("impl", ["im2col", "hybrid"])
@pytest.mark.parametrize("strides", [(1, 1), (2, 2)])
def test_kernel_gradient_in_batch_chunks_matches_lax(impl, strides, monkeypatch):
  # The kernel tangent (and so the kernel gradient) loops over batch chunks when the patch
  # matrix is large; forced here to chunks of 2 out of 6 examples.
  monkeypatch.setattr(cpu_conv, "im2col_batch_chunk", lambda batch, *_, **__: 2)
  conv_impl = getattr(cpu_conv, f"conv2d_{impl}")
  rng = np.random.default_rng(5)
  x = rng.standard_normal((6, 8, 8, 3), np.float32)
  kernel = rng.standard_normal((3, 3, 3, 4), np.float32)
  tk = rng.standard_normal(kernel.shape, np.float32)
  loss = lambda conv: lambda x, k: jnp.sum(jnp.sin(conv(x, k, strides, "SAME")))
  derivatives = jax.jit(lambda conv, x, k, tk: (jax.grad(loss(conv), (0, 1))(x, k),
                                                jax.jvp(lambda k: conv(x, k, strides, "SAME"),
                                                        (k,), (tk,))[1]),
                        static_argnums=0)
  got, want = derivatives(conv_impl, x, kernel, tk), derivatives(cpu_conv.conv2d_xla, x, kernel, tk)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    _assert_close_at_scale(g, w)
  jaxpr = str(jax.make_jaxpr(jax.grad(loss(conv_impl), 1))(x, kernel))
  assert "scan" in jaxpr or "while" in jaxpr, "the kernel gradient did not loop over chunks"


@pytest.mark.parametrize("impl", ["im2col", "hybrid", "fft", "toeplitz"])
def test_conv_impls_name_bad_shapes(impl):
  conv = getattr(cpu_conv, f"conv2d_{impl}")
  with pytest.raises(ValueError, match=r"conv input must be \(B, H, W, 3\)"):
    conv(jnp.zeros((1, 8, 8, 2)), jnp.zeros((3, 3, 3, 4)))
  with pytest.raises(ValueError, match="does not fit"):
    conv(jnp.zeros((1, 2, 2, 3)), jnp.zeros((5, 5, 3, 4)), (1, 1), "VALID")


def test_fft_conv_rejects_strides_and_negative_padding():
  x, kernel = jnp.zeros((1, 8, 8, 2)), jnp.zeros((3, 3, 2, 4))
  with pytest.raises(ValueError, match="stride"):
    cpu_conv.conv2d_fft(x, kernel, (2, 2))
  with pytest.raises(ValueError, match="padding"):
    cpu_conv.conv2d_fft(x, kernel, (1, 1), ((-1, 0), (1, 1)))


def test_xla_conv_matches_lax_directly():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 6, 6, 3), np.float32)
  kernel = rng.standard_normal((3, 3, 3, 5), np.float32)
  want = lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_array_equal(cpu_conv.conv2d_xla(x, kernel), want)


@pytest.mark.parametrize("use_bias", [True, False])
def test_conv_module_impls_share_params_and_agree(use_bias):
  x = np.random.default_rng(0).standard_normal((2, 6, 6, 3), np.float32)
  im2col = cpu_conv.Conv(4, (3, 3), use_bias=use_bias, impl="im2col")
  xla = cpu_conv.Conv(4, (3, 3), use_bias=use_bias, impl="xla")
  variables = random_variables(im2col, x.shape)
  want = {"kernel": (3, 3, 3, 4), "bias": (4,)} if use_bias else {"kernel": (3, 3, 3, 4)}
  assert leaf_shapes(variables["params"]) == want
  # Same parameter layout as flax.linen.Conv, so either can load the other's checkpoints.
  flax_conv = nn.Conv(4, (3, 3), use_bias=use_bias)
  assert leaf_shapes(abstract_variables(flax_conv, x.shape)["params"]) == want
  np.testing.assert_allclose(flax_conv.apply(variables, x), xla.apply(variables, x), **TOL)
  np.testing.assert_allclose(im2col.apply(variables, x), xla.apply(variables, x), **TOL)


def test_conv_impl_resolution():
  assert cpu_conv.resolve_conv_impl("xla") == "xla"
  assert cpu_conv.resolve_conv_impl("im2col") == "im2col"
  assert cpu_conv.resolve_conv_impl("hybrid") == "hybrid"
  assert cpu_conv.resolve_conv_impl("fft") == "fft"
  assert cpu_conv.resolve_conv_impl("toeplitz") == "toeplitz"
  expected = "im2col" if jax.default_backend() == "cpu" else "xla"
  assert cpu_conv.resolve_conv_impl("auto") == expected
  with pytest.raises(ValueError, match="impl"):
    cpu_conv.resolve_conv_impl("winograd")


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
  got = cpu_conv.cpu_conv_impl(out_hw, kernel_shape, strides)
  assert got == want


def test_lenet4_auto_impl_uses_hybrid_conv2_and_matches_xla_with_input_gradients():
  # LeNet(4)'s conv2 (14x14, 8 -> 16) is where "auto" picks the hybrid on CPU: the whole
  # model's logits and PGD's input gradient must still match lax's convolutions.
  if jax.default_backend() == "cpu":
    assert cpu_conv.cpu_conv_impl((14, 14), (5, 5, 8, 16), (1, 1)) == "hybrid"
  x = np.random.default_rng(0).random((2, 28, 28, 1), np.float32)
  auto = models.get_model("lenet", 4, conv_impl="auto")
  xla = models.LeNet(width=4)
  variables = random_variables(auto, x.shape)

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


def test_xla_impl_equals_flax_conv_bitwise():
  # conv_impl="xla" now builds models from flax.linen.Conv itself: the same numbers, to the
  # bit, as the module's own "xla" implementation, strided and with a bias included.
  x = np.random.default_rng(4).standard_normal((2, 7, 7, 3), np.float32)
  for strides, kernel_size in (((1, 1), (3, 3)), ((2, 2), (3, 3)), ((2, 2), (1, 1))):
    ours = cpu_conv.Conv(5, kernel_size, strides, impl="xla")
    flax_conv = nn.Conv(5, kernel_size, strides)
    variables = random_variables(ours, x.shape)
    np.testing.assert_array_equal(jax.jit(ours.apply)(variables, x),
                                  jax.jit(flax_conv.apply)(variables, x))


def test_conv_module_maps_every_impl():
  assert models.conv_module("xla") is nn.Conv
  assert models.conv_module() is nn.Conv
  for impl in ("im2col", "hybrid", "fft", "toeplitz"):
    conv = models.conv_module(impl)
    assert conv.func is cpu_conv.Conv and conv.keywords == {"impl": impl}
    assert models.conv_module(impl) is conv   # one object: equal models compare equal
  auto = models.conv_module("auto")
  if jax.default_backend() == "cpu":
    assert auto.func is cpu_conv.Conv and auto.keywords == {"impl": "auto"}
  else:
    assert auto is nn.Conv
  assert set(CONV_IMPLS) == set(cpu_conv.CONV_FNS) | {"auto"}
  with pytest.raises(ValueError, match="conv_impl must be one of"):
    models.conv_module("winograd")
  assert models.get_model("lenet", 2, conv_impl="fft").conv is models.conv_module("fft")
