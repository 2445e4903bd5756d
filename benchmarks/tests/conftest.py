"""Benchmark tests: run with `python -m pytest -q benchmarks/tests` from the repository root
(not part of the README's default `pytest -q`, whose testpaths are tests/)."""
import os
import sys

BENCHMARKS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(BENCHMARKS)
os.environ.setdefault("JAX_PLATFORMS", "cpu")   # the rows' schema test expects the CPU backend
for path in (BENCHMARKS, ROOT):   # bench.py & co. are scripts, not a package
  if path not in sys.path:
    sys.path.insert(0, path)
