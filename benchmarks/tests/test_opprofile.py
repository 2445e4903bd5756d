"""The per-XLA-op profiler: it names the operations that really take the time."""
import jax
import jax.numpy as jnp
import numpy as np

import opprofile  # benchmarks/opprofile.py (conftest.py puts benchmarks/ on the path)


def _matmul_then_cheap_elementwise(a, b):
  return jnp.tanh(a @ b) + 1.0


def test_hlo_instructions_reads_names_shapes_and_sources():
  a = jnp.ones((8, 4), jnp.float32)
  text = jax.jit(_matmul_then_cheap_elementwise).lower(a, a.T).compile().as_text()
  instructions = opprofile.hlo_instructions(text)
  assert instructions, text[:2000]
  sources = [v["source"] for v in instructions.values()]
  assert any(s.endswith("dot_general") for s in sources), sources
  assert all(v["shape"] and v["opcode"] for v in instructions.values())


def test_profile_ranks_the_big_matmul_first():
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.standard_normal((768, 768)), jnp.float32)
  fn = jax.jit(_matmul_then_cheap_elementwise)
  prof = opprofile.profile_ops(fn, (a, a), calls=3, top=10)
  rows = prof["rows"]
  assert rows and prof["ms_per_call"] > 0
  # A 768^3 matmul is ~0.9 GFLOP; the tanh and add over its output are ~1 MFLOP.
  assert "dot_general" in rows[0]["source"], opprofile.format_profile(prof)
  assert rows[0]["share"] > 0.5, opprofile.format_profile(prof)
  assert sum(r["share"] for r in rows) <= 1 + 1e-9
  assert all(r["ms_per_call"] >= 0 and r["count_per_call"] > 0 for r in rows)
  table = opprofile.format_profile(prof)
  assert rows[0]["op"] in table and "dot_general" in table
