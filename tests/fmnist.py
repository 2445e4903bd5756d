"""Debian's Fashion-MNIST for the tests that read real data: present, or a skip with its reason
on a developer machine, and a failure under CI=true (.ci/run installs it)."""
import os

import pytest

FMNIST = "/usr/share/datasets/fashion-mnist"
_MISSING = f"Debian's dataset-fashion-mnist is not installed at {FMNIST}"

# For tests: skipped where the data is missing, except under CI (where `require` then fails).
needs_fmnist = pytest.mark.skipif(not os.path.isdir(FMNIST) and os.environ.get("CI") != "true",
                                  reason=_MISSING)


def require() -> str:
  """The data folder, for fixtures: pytest.fail under CI=true if it is missing, else a skip."""
  if not os.path.isdir(FMNIST):
    if os.environ.get("CI") == "true":
      pytest.fail(f"CI=true but {FMNIST} is missing: .ci/run installs dataset-fashion-mnist.")
    pytest.skip(reason=_MISSING)
  return FMNIST
