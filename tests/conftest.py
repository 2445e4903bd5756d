"""Test setup, before jax is imported: 8 forced host devices, the CPU backend, and a persistent
XLA compilation cache.

The cache settings are environment variables rather than `jax.config` calls so that the
command-line runs the tests start as subprocesses share the cache too. It lives in
.cache/jax (git-ignored); JAX_ENABLE_COMPILATION_CACHE=false turns it off, and removing the
folder empties it.
"""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".cache", "jax"))
# Cache every program that took a tenth of a second to compile, whatever its size: the tests'
# programs are small, and most of their time is compilation.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
