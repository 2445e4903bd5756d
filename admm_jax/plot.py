"""Command line: a run's curves as PNG files, drawn from its metrics.jsonl.

  python -m admm_jax.plot --workdir=runs/fmnist [--out=<workdir>/plots]

The plots themselves: `admm_jax.app.plot`.
"""
from absl import flags

from admm_jax.app import cli
from admm_jax.app.plot import plot_run


def _define_flags() -> None:
  flags.DEFINE_string("workdir", None, "The run's --workdir (holds metrics.jsonl).")
  flags.DEFINE_string("out", "", "Folder for the PNG files (default: <workdir>/plots).")


def main() -> None:
  print("\n".join(plot_run(flags.FLAGS.workdir, flags.FLAGS.out or None)))


def run() -> None:
  _define_flags()
  cli.run(main, required=["workdir"])


if __name__ == "__main__":
  run()
