"""Opt-in glibc malloc settings for the CPU convolutions (a process-wide change).

Nothing in the library calls this: the command line (`python -m admm_jax.main`, flag
`--tune_malloc`, on by default there) and the benchmarks (`benchmarks/bench.py`,
`benchmarks/bench_scaling.py`; `--no-malloc-tuning` turns it off) do, before the first step.
"""
import ctypes
import ctypes.util
import os
import sys

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
# The user's own malloc settings win: any of these set leaves malloc alone.
_MALLOC_ENV = ("MALLOC_TOP_PAD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_",
               "MALLOC_MMAP_THRESHOLD_")
_malloc_tuned: bool | None = None


def tune_malloc_for_cpu() -> bool:
  """Keeps freed XLA:CPU buffers in the glibc heap instead of returning them to the OS.

  im2col allocates large patch buffers (40 MB per call for LeNet(16)) on every call; by
  default glibc serves them with mmap and unmaps them on free, so every PGD step page-faults
  (and zeroes) them afresh. Serving them from the heap (no mmap, 512 MB top pad, trim only
  above 1 GB) removed that: +10% examples/s for a LeNet(4) PGD-10 step, +3% at LeNet(16)
  (2-core AVX2 machine, alternating in one process). The cost: the whole process keeps up
  to ~1 GB of freed memory for reuse, which is why it is the caller's explicit choice.

  Runs once per process; does nothing off Linux/glibc, or when any MALLOC_*_ variable is
  set (the user's choice wins).

  Returns:
    Whether the tuning is in effect.
  """
  global _malloc_tuned
  if _malloc_tuned is None:
    _malloc_tuned = False
    if sys.platform.startswith("linux") and not any(v in os.environ for v in _MALLOC_ENV):
      try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _malloc_tuned = bool(libc.mallopt(_M_MMAP_MAX, 0) and
                             libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) and
                             libc.mallopt(_M_TOP_PAD, 512 << 20))
      except (OSError, AttributeError):  # Not glibc (musl, ...): leave malloc alone.
        _malloc_tuned = False
  return _malloc_tuned


def is_tuned() -> bool:
  """Whether `tune_malloc_for_cpu` has changed malloc's settings in this process."""
  return bool(_malloc_tuned)
