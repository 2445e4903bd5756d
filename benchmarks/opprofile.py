"""Where a jitted function spends its time, per XLA operation, from JAX's own profiler.

`profile_ops` runs a compiled function a few times under `jax.profiler.trace`, reads the
trace back with `jax.profiler.ProfileData`, and sums the duration of every event named after
an instruction of the compiled HLO module. Each row carries what is needed to read it: the
instruction's shape and the JAX operation it came from (its `op_name` metadata, e.g.
`while/body/.../transpose(jvp(LeNet))/conv2/dot_general`: the input gradient of conv2's
matmul inside the PGD loop). `python benchmarks/bench.py --profile` prints these rows.

The durations are wall time of each operation on the thread that ran it; an operation that
fans out over a thread pool (a matmul) is counted once, so the shares are shares of the
step's critical path, which is what a speed-up must shorten.
"""
from __future__ import annotations

import collections
import glob
import os
import re
import tempfile
from typing import Any, Callable

import jax

# `%name = shape opcode(` in XLA's HLO text, with the op_name metadata when present.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = (\S+) ([\w\-]+)\(")
_OP_NAME = re.compile(r'op_name="([^"]+)"')


def hlo_instructions(hlo_text: str) -> dict[str, dict[str, str]]:
  """{instruction name: {"shape", "opcode", "source"}} from a compiled module's HLO text."""
  out = {}
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.match(line)
    if m:
      src = _OP_NAME.search(line)
      out[m.group(1)] = {"shape": m.group(2), "opcode": m.group(3),
                         "source": src.group(1) if src else ""}
  return out


def _trace_events(trace_dir: str) -> list[tuple[str, float]]:
  """(event name, duration in ns) of every event in the trace written to `trace_dir`."""
  files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
  if not files:
    raise RuntimeError(f"jax.profiler.trace wrote no .xplane.pb under {trace_dir}.")
  events = []
  for path in files:
    profile = jax.profiler.ProfileData.from_file(path)
    for plane in profile.planes:
      for line in plane.lines:
        events.extend((ev.name, ev.duration_ns) for ev in line.events)
  return events


def profile_ops(fn: Callable[..., Any], args: tuple, *, calls: int = 3, top: int = 20
                ) -> dict[str, Any]:
  """Profiles `calls` calls of the jitted `fn(*args)`, per XLA operation.

  Args:
    fn: a `jax.jit`-wrapped function that does not donate its arguments (they are reused).
    args: its arguments.
    calls: profiled calls (after one warm-up call).
    top: rows to return, the slowest first.

  Returns:
    {"ms_per_call": summed op time per call, "rows": [{"op", "ms_per_call", "share",
    "count_per_call", "shape", "opcode", "source"}, ...]} where share is the op's fraction of
    all profiled op time.
  """
  compiled = fn.lower(*args).compile()  # Called below too: one compilation, not two.
  instructions = hlo_instructions(compiled.as_text())
  jax.block_until_ready(compiled(*args))
  with tempfile.TemporaryDirectory(prefix="admm_jax_profile_") as trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(calls):
        jax.block_until_ready(compiled(*args))
    events = _trace_events(trace_dir)
  total_ns: collections.Counter = collections.Counter()
  count: collections.Counter = collections.Counter()
  for name, ns in events:
    if name in instructions:
      total_ns[name] += ns
      count[name] += 1
  all_ns = sum(total_ns.values())
  rows = [{"op": name, "ms_per_call": ns / 1e6 / calls, "share": ns / max(all_ns, 1),
           "count_per_call": count[name] / calls, **instructions[name]}
          for name, ns in total_ns.most_common(top)]
  return {"ms_per_call": all_ns / 1e6 / calls, "rows": rows}


def format_profile(profile: dict[str, Any], source_chars: int = 70) -> str:
  """A markdown table of `profile_ops`'s rows."""
  lines = [f"XLA op time per call: {profile['ms_per_call']:.1f} ms",
           "| ms/call | share | n/call | op | shape | from |", "|---|---|---|---|---|---|"]
  for r in profile["rows"]:
    src = r["source"]
    src = src if len(src) <= source_chars else "..." + src[-source_chars:]
    lines.append(f"| {r['ms_per_call']:.2f} | {100 * r['share']:.1f}% | "
                 f"{r['count_per_call']:g} | {r['op']} | {r['shape']} | {src} |")
  return "\n".join(lines)
