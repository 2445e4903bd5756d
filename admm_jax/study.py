"""Command line: the paper's findings in one command (a grid of runs, a report and plots).

  python -m admm_jax.study --config=configs/study_fashion_mnist.py --workdir=runs/study

The cells, the layout of the study's workdir and the report: `admm_jax.app.study`.
"""
from absl import flags
from ml_collections import config_flags

from admm_jax.app import cli
# Served here too: the study configs written before the move import them from this module.
from admm_jax.app.study import load_config, run_study, study_config  # noqa: F401


def _define_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "Study config file (configs/study_*.py[:arg]).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", "runs/study", "Where cells/, study.json, report.md and plots/ "
                      "go; rerun with the same workdir to resume.")
  flags.DEFINE_bool("tune_malloc", True, "As admm_jax.main's --tune_malloc.")


def main() -> None:
  # Seeds and schemes repeat the same programs: the runner's persistent compilation cache
  # compiles each once, for this and later studies.
  study, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  if flags.FLAGS.tune_malloc:
    cli.tune_malloc(study.run.model.conv_impl)
  summary = run_study(study, workdir)
  print(f"study: {sum(c['status'] == 'finished' for c in summary['cells'])} of "
        f"{len(summary['cells'])} cells finished in {summary['wall_time_s']:.0f} s")
  print(f"report: {summary['report']}")


def run() -> None:
  _define_flags()
  cli.run(main, required=["config"])


if __name__ == "__main__":
  run()
