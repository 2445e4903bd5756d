"""What the command lines (main, study, plot) share: a user error is one sentence and exit
code 2, logging set up the same way, and the explicit malloc opt-in on CPU."""
from __future__ import annotations

import logging
import sys

from absl import flags


def user_errors() -> tuple[type[Exception], ...]:
  """Errors that are the user's to fix: one sentence, exit code 2, no traceback."""
  from admm_jax import checkpoint, configlib, data, parallel, plot, reliability, workdir
  return (configlib.ConfigError, data.DataError, workdir.WorkdirError,
          checkpoint.CheckpointError, parallel.ParallelError, plot.PlotError,
          reliability.RunStopped)


def fail(error: Exception) -> None:
  """Prints `error` as one line and exits: code 2, or a stop's own code (reliability.RunStopped:
  128 + signal after SIGTERM/SIGINT, 2 otherwise)."""
  interrupted = type(error).__name__ == "Interrupted"
  print(str(error) if interrupted else f"error: {error}", file=sys.stderr)
  sys.exit(getattr(error, "exit_code", 2))


def fail_interrupted_twice() -> None:
  print("error: interrupted twice: stopped without a new checkpoint; run the same command "
        "again to resume from the last one.", file=sys.stderr)
  sys.exit(130)


def parse_flags(argv: list[str]) -> list[str]:
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


def setup_logging() -> None:
  """Progress at INFO on stderr; the libraries' chatter at WARNING."""
  logging.getLogger().setLevel(logging.INFO)
  for noisy in ("absl", "jax._src", "orbax", "etils"):
    logging.getLogger(noisy).setLevel(logging.WARNING)


def tune_malloc(conv_impl: str) -> None:
  """The command lines' explicit opt-in to `kernels.malloc.tune_malloc_for_cpu`: on the CPU
  backend with the CPU convolutions, freed XLA buffers stay in glibc's heap."""
  import jax
  if conv_impl != "xla" and jax.default_backend() == "cpu":
    from admm_jax.kernels import malloc
    if malloc.tune_malloc_for_cpu():
      logging.info("glibc malloc tuned for the CPU convolutions (--notune_malloc to skip)")
