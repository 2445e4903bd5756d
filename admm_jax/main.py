"""Command line: python -m admm_jax.main --config=configs/fashion_mnist_lenet.py --workdir=runs/x

Every config field can be overridden: --config.model.width=8 --config.attack.eps=0.2.
Running the same command again resumes the run in --workdir.

On the CPU backend with the CPU convolutions (`config.model.conv_impl` other than "xla"),
the command line tunes glibc malloc for the whole process before the first step
(`admm_jax.kernels.malloc.tune_malloc_for_cpu`: +3-12 % examples/s, up to ~1 GB of freed
memory kept for reuse); `--notune_malloc` (or any MALLOC_*_ variable) leaves malloc alone.
"""
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Where checkpoints, metrics and "
                               "report.json go; rerun with the same workdir to resume.")
_TUNE_MALLOC = flags.DEFINE_bool(
    "tune_malloc", True, "On the CPU backend with CPU convolutions (model.conv_impl other "
    "than xla), keep freed XLA buffers in glibc's heap (faster steps, up to ~1 GB of freed "
    "memory kept); --notune_malloc leaves malloc alone.")


def _user_errors():
  """Errors that are the user's to fix: one sentence, exit code 2, no traceback."""
  from admm_jax import checkpoint, configlib, data, parallel, pipeline, reliability
  return (configlib.ConfigError, data.DataError, pipeline.WorkdirError,
          checkpoint.CheckpointError, parallel.ParallelError, reliability.RunStopped)


def _tune_malloc(config) -> None:
  """The CLI's explicit opt-in to `kernels.malloc.tune_malloc_for_cpu` (see the docstring)."""
  import jax  # pylint: disable=import-outside-toplevel
  if config.model.conv_impl != "xla" and jax.default_backend() == "cpu":
    from admm_jax.kernels import malloc  # pylint: disable=import-outside-toplevel
    if malloc.tune_malloc_for_cpu():
      logging.info("glibc malloc tuned for the CPU convolutions (--notune_malloc to skip)")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = _CONFIG.value
  logging.getLogger().setLevel(logging.INFO)
  for noisy in ("absl", "jax._src", "orbax", "etils"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  from admm_jax import parallel
  try:
    if config.parallel.distributed:  # before any other jax call
      parallel.initialize_distributed(config.parallel.coordinator_address,
                                      config.parallel.num_processes, config.parallel.process_id)
    if _TUNE_MALLOC.value:
      _tune_malloc(config)
    from admm_jax import pipeline
    report = pipeline.train_and_evaluate(config, _WORKDIR.value)
  except _user_errors() as e:
    # A stop on purpose (reliability.RunStopped) carries its own code: 128 + signal after
    # SIGTERM/SIGINT, 2 otherwise.
    interrupted = type(e).__name__ == "Interrupted"
    print(str(e) if interrupted else f"error: {e}", file=sys.stderr)
    sys.exit(getattr(e, "exit_code", 2))
  except KeyboardInterrupt:  # a second Ctrl-C while the first one's checkpoint was pending
    print("error: interrupted twice: stopped without a new checkpoint; run the same command "
          "again to resume from the last one.", file=sys.stderr)
    sys.exit(130)
  if parallel.is_writer():  # one summary, not one per host
    print(pipeline.summary(report))
    print(f"report: {os.path.join(os.path.abspath(_WORKDIR.value), 'report.json')}")


def _parse_flags(argv):
  """absl's parser, but a bad flag or config value is one sentence and exit code 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    # A config file that raised carries its traceback in the message: keep the last line.
    lines = [x for x in str(e).splitlines() if x.strip()]
    detail = lines[-1] if len(lines) > 1 else str(e)
    print(f"error: {detail}" if detail == str(e) else f"error: {lines[0]} {detail}",
          file=sys.stderr)
  except (AttributeError, KeyError) as e:  # ml_collections: an override of an unknown field
    print(f"error: a --config.* flag names a field the config does not have ({e}): see the "
          "config file and admm_jax/configlib.py for the fields.", file=sys.stderr)
  sys.exit(2)


def run():
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
