"""The one command-line runner of every entry point (main, study, evaluate, export, plot):
absl flags where a bad flag or config value is one sentence and exit code 2, logging set up
the same way, jax's persistent compilation cache (`compilation.setup_cache`: a resumed or
repeated command compiles nothing it compiled before), a `UserError` printed as one sentence
with its exit code, and the explicit malloc opt-in on CPU.

An entry point defines its flags, then calls `run(main, required=[...])`:

    _WORKDIR = flags.DEFINE_string("workdir", None, "...")
    def main() -> None: ...            # raises UserError subclasses on bad input
    if __name__ == "__main__":
      cli.run(main, required=["workdir"])
"""
from __future__ import annotations

import functools
import logging
import sys
from typing import Callable, Sequence

from absl import app, flags

from admm_jax.app import compilation
from admm_jax.app.errors import UserError


def run(main: Callable[[], None], required: Sequence[str] = ()) -> None:
  """Parses the flags the caller defined, sets up logging and runs `main()`: a UserError is
  one sentence and its exit code, positional arguments are one sentence and exit code 2."""
  flags.mark_flags_as_required(list(required))
  app.run(functools.partial(_run_main, main), flags_parser=parse_flags)


def _run_main(main: Callable[[], None], argv: list[str]) -> None:
  if len(argv) > 1:
    print(f"error: unexpected arguments {' '.join(argv[1:])}: pass only flags "
          "(--name=value).", file=sys.stderr)
    sys.exit(2)
  setup_logging()
  compilation.setup_cache()   # before the first computation (a config update, no backend)
  try:
    main()
  except UserError as e:
    fail(e)
  except KeyboardInterrupt:  # a second Ctrl-C while the first one's checkpoint was pending
    fail_interrupted_twice()


def fail(error: UserError) -> None:
  """Prints `error` as one line and exits with its code (2, or a stop's own code:
  128 + signal after SIGTERM/SIGINT)."""
  interrupted = type(error).__name__ == "Interrupted"
  print(str(error) if interrupted else f"error: {error}", file=sys.stderr)
  sys.exit(error.exit_code)


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
          "config file and admm_jax/app/configlib.py for the fields.", file=sys.stderr)
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
