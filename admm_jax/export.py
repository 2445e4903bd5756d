"""Command line: a finished stage of a run -> a compacted, physically smaller `jax.export`
artifact, checked against the masked model (docs/export.md).

  python -m admm_jax.export --workdir=runs/x [--stage=retrain] --out=runs/x/export

The compaction is the library's `admm_jax.compaction`; the command's logic `admm_jax.app.export`.
"""
import os

from absl import flags

from admm_jax.app import cli, stages
from admm_jax.app.export import export_workdir, summary_line
# Served here too: the names the docs used before the compaction became its own module.
from admm_jax.compaction import compact, load_params  # noqa: F401


def _define_flags() -> None:
  flags.DEFINE_string("workdir", None, "A run's workdir (python -m admm_jax.main --workdir).")
  flags.DEFINE_string("out", None, "Folder to write the export to (replaced if it holds one).")
  flags.DEFINE_enum("stage", "retrain", list(stages.STAGES),
                    "Which finished stage to export (retrain: the pruned, retrained model).")
  flags.DEFINE_string("latency_batches", "1,256", "Batch sizes of the latency measurement.")
  flags.DEFINE_integer("latency_repeats", 5, "Timed calls per batch size (median reported).")


def main() -> None:
  f = flags.FLAGS
  batches = tuple(int(b) for b in f.latency_batches.split(",") if b.strip())
  s = export_workdir(f.workdir, f.out, f.stage, batches, f.latency_repeats)
  print(summary_line(s))
  print(f"export: {os.path.join(os.path.abspath(f.out), 'export.json')}")


def run() -> None:
  _define_flags()
  cli.run(main, required=["workdir", "out"])


if __name__ == "__main__":
  run()
