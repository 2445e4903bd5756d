"""Compile once: the persistent compilation cache of every entry point, and compile counters.

Every command line (main, evaluate, study, export) calls `setup_cache()` before its first jax
computation, so that a resumed, repeated or evaluating run loads the programs an earlier run
compiled instead of compiling them again. Where the cache lives:

- `ADMM_JAX_COMPILATION_CACHE` unset: `$XDG_CACHE_HOME/admm_jax/jax` (`~/.cache/admm_jax/jax`);
- `ADMM_JAX_COMPILATION_CACHE=/some/dir`: that folder; `=off`: no persistent cache;
- `JAX_COMPILATION_CACHE_DIR` (jax's own variable) set: jax's choice stands, untouched.

Every program is cached, however quickly it compiled (jax's default skips those under 1 s),
so that a second identical run compiles nothing at all. Entries are keyed by the program, the
jax/XLA version and the device, so a stale entry is never used; the folder can be deleted at
any time.

`CompileCounter` counts, from jax's monitoring events, the programs XLA was asked for, how
many the persistent cache served and the seconds spent; the trainer puts them into
report.json ("compilation").
"""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
from typing import Any

import jax

ENV_VAR = "ADMM_JAX_COMPILATION_CACHE"
OFF = "off"
# jax.monitoring event names (jax/_src/dispatch.py, compiler.py). The backend-compile duration
# wraps both a real compilation and a persistent-cache load.
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


def default_cache_dir(environ: dict[str, str] | None = None) -> str:
  """The per-user default: $XDG_CACHE_HOME/admm_jax/jax, else ~/.cache/admm_jax/jax."""
  environ = os.environ if environ is None else environ
  base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "admm_jax", "jax")


def cache_dir_from_env(environ: dict[str, str] | None = None) -> str | None:
  """The folder `setup_cache` uses under these environment variables; None = no cache.

  `JAX_COMPILATION_CACHE_DIR` wins (jax reads it itself); then `ADMM_JAX_COMPILATION_CACHE`
  ("off", or a folder); then `default_cache_dir()`.
  """
  environ = os.environ if environ is None else environ
  if environ.get("JAX_COMPILATION_CACHE_DIR"):
    return environ["JAX_COMPILATION_CACHE_DIR"]
  value = environ.get(ENV_VAR, "").strip()
  if value.lower() == OFF:
    return None
  return os.path.abspath(os.path.expanduser(value)) if value else default_cache_dir(environ)


def setup_cache(directory: str | None = "", *, min_compile_time_s: float = 0.0) -> str | None:
  """Turns jax's persistent compilation cache on (or off) for this process.

  Args:
    directory: the cache folder; "" (default) = `cache_dir_from_env()`; None = off.
    min_compile_time_s: programs that compiled faster are not written (0: every program,
      so that a repeated run compiles nothing).

  Returns:
    The folder in use, or None when the cache is off (also when the folder cannot be made:
    a cache is an optimisation, never a reason to stop a run).
  """
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=g-import-not-at-top
  if directory == "":
    directory = cache_dir_from_env()
  if directory is not None:
    try:
      os.makedirs(directory, exist_ok=True)
    except OSError as e:
      logging.warning("compilation cache %s unusable (%s): compiling without it", directory, e)
      directory = None
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_enable_compilation_cache", directory is not None)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_time_s)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # no size floor
  compilation_cache.reset_cache()  # re-read the settings, even after earlier compilations
  COUNTER.install()
  return directory


@dataclasses.dataclass(frozen=True)
class CompileStats:
  """Totals since the process started counting (subtract two to get an interval's)."""
  programs: int = 0       # XLA executables requested (compiled or loaded from the cache)
  cache_hits: int = 0     # of those, loaded from the persistent cache
  seconds: float = 0.0    # wall seconds of compiling plus loading them

  @property
  def compiled(self) -> int:
    """Programs XLA actually compiled (not served by the persistent cache)."""
    return self.programs - self.cache_hits

  def __sub__(self, other: "CompileStats") -> "CompileStats":
    return CompileStats(self.programs - other.programs, self.cache_hits - other.cache_hits,
                        self.seconds - other.seconds)

  def to_dict(self) -> dict[str, Any]:
    """The report.json form: compile_s, programs, compiled, cache_hits."""
    return {"compile_s": round(self.seconds, 3), "programs": self.programs,
            "compiled": self.compiled, "cache_hits": self.cache_hits}


class CompileCounter:
  """Process-wide counters fed by jax.monitoring listeners (installed once, never removed)."""

  def __init__(self):
    self._lock = threading.Lock()
    self._installed = False
    self._stats = CompileStats()

  def install(self) -> None:
    """Registers the listeners (idempotent)."""
    with self._lock:
      if self._installed:
        return
      self._installed = True
    jax.monitoring.register_event_listener(self._on_event)
    jax.monitoring.register_event_duration_secs_listener(self._on_duration)

  def _on_event(self, event: str, **_) -> None:
    if event == _CACHE_HIT_EVENT:
      with self._lock:
        s = self._stats
        self._stats = dataclasses.replace(s, cache_hits=s.cache_hits + 1)

  def _on_duration(self, event: str, seconds: float, **_) -> None:
    if event == _COMPILE_EVENT:
      with self._lock:
        s = self._stats
        self._stats = dataclasses.replace(s, programs=s.programs + 1,
                                          seconds=s.seconds + seconds)

  def snapshot(self) -> CompileStats:
    """The totals so far (installs the listeners on first use: counting starts here)."""
    self.install()
    with self._lock:
      return self._stats


COUNTER = CompileCounter()


def cache_in_use() -> str | None:
  """The persistent cache folder jax is configured with now (None: off)."""
  if not jax.config.jax_enable_compilation_cache:
    return None
  return jax.config.jax_compilation_cache_dir or None
