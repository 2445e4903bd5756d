"""Backend-specific kernels, apart from the models that may use them.

`cpu_conv`: 2-D convolutions that are fast on XLA:CPU (im2col, hybrid, fft, toeplitz) and
the per-layer rule that picks one; `malloc`: the opt-in glibc malloc tuning that helps
them. Nothing here runs unless asked for: models use `flax.linen.Conv` by default, and this
package's import loads no jax (configlib reads `CONV_IMPLS` from it).
"""

# Values of `config.model.conv_impl` / `cpu_conv.Conv(impl=...)`: "auto" picks per layer on
# the CPU backend (`cpu_conv.cpu_conv_impl`) and XLA's convolution elsewhere; "xla" is
# `flax.linen.Conv`; the others force one CPU implementation for every layer.
CONV_IMPLS = ("auto", "im2col", "xla", "hybrid", "fft", "toeplitz")
