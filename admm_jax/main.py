"""Command line: python -m admm_jax.main --config=configs/fashion_mnist_lenet.py --workdir=runs/x

Every config field can be overridden: --config.model.width=8 --config.attack.eps=0.2.
Running the same command again resumes the run in --workdir.

On the CPU backend with the CPU convolutions (`config.model.conv_impl` other than "xla"),
the command line tunes glibc malloc for the whole process before the first step
(`admm_jax.kernels.malloc.tune_malloc_for_cpu`: +3-12 % examples/s, up to ~1 GB of freed
memory kept for reuse); `--notune_malloc` (or any MALLOC_*_ variable) leaves malloc alone.
"""
import os

from absl import app, flags
from ml_collections import config_flags

from admm_jax import cli, compilation

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Where checkpoints, metrics and "
                               "report.json go; rerun with the same workdir to resume.")
_TUNE_MALLOC = flags.DEFINE_bool(
    "tune_malloc", True, "On the CPU backend with CPU convolutions (model.conv_impl other "
    "than xla), keep freed XLA buffers in glibc's heap (faster steps, up to ~1 GB of freed "
    "memory kept); --notune_malloc leaves malloc alone.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = _CONFIG.value
  cli.setup_logging()
  from admm_jax import parallel
  try:
    if config.parallel.distributed:  # before any other jax call
      parallel.initialize_distributed(config.parallel.coordinator_address,
                                      config.parallel.num_processes, config.parallel.process_id)
    compilation.setup_cache()  # a resumed or repeated run loads what it compiled before
    if _TUNE_MALLOC.value:
      cli.tune_malloc(config.model.conv_impl)
    from admm_jax import trainer
    report = trainer.train_and_evaluate(config, _WORKDIR.value)
  except cli.user_errors() as e:
    cli.fail(e)
  except KeyboardInterrupt:  # a second Ctrl-C while the first one's checkpoint was pending
    cli.fail_interrupted_twice()
  if parallel.is_writer():  # one summary, not one per host
    from admm_jax import reports
    print(reports.summary(report))
    print(f"report: {os.path.join(os.path.abspath(_WORKDIR.value), 'report.json')}")


_user_errors = cli.user_errors
_parse_flags = cli.parse_flags


def run():
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
  run()
