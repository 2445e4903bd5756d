"""Every name that README, docs/ and configs/ use stays importable where they import it: the
names of the layout before the library and the application were split (a fixed list, so that
user code written then keeps working), and whatever the documents name today (read from them)."""
import glob
import importlib
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What README.md, docs/*.md, configs/*.py and launch/ named before the restructure.
NAMES_BEFORE = (
    "admm_jax.attacks", "admm_jax.attacks.pgd_linf", "admm_jax.data.load_idx",
    "admm_jax.evaluate", "admm_jax.export", "admm_jax.export.compact",
    "admm_jax.export.load_params", "admm_jax.graph", "admm_jax.kernels.cpu_conv",
    "admm_jax.kernels.malloc.tune_malloc_for_cpu", "admm_jax.losses", "admm_jax.main",
    "admm_jax.models", "admm_jax.models.layers", "admm_jax.plot", "admm_jax.projections",
    "admm_jax.sparsity", "admm_jax.sparsity.spec", "admm_jax.sparsity.hard_prune",
    "admm_jax.sparsity.report", "admm_jax.sparsity.format_report", "admm_jax.stages",
    "admm_jax.stages.STAGES", "admm_jax.study", "admm_jax.trainer", "admm_jax.transforms",
    "admm_jax.transforms.admm", "admm_jax.transforms.apply_masks",
    "admm_jax.transforms.find_admm_state", "admm_jax.transforms.primal_residuals",
    "admm_jax.configlib", "admm_jax.configlib.base_config", "admm_jax.configlib.cifar10_recipe",
    "admm_jax.study.study_config", "admm_jax.study.load_config",
)
IMPORTS_BEFORE = ("from admm_jax import configlib", "from admm_jax import configlib, study",
                  "from admm_jax import study", "import admm_jax as aj")


def resolve(dotted: str):
  """The object a dotted name names: the longest importable module, then attributes."""
  parts = dotted.split(".")
  for cut in range(len(parts), 0, -1):
    try:
      obj = importlib.import_module(".".join(parts[:cut]))
    except ModuleNotFoundError:
      continue
    for attr in parts[cut:]:
      obj = getattr(obj, attr)
    return obj
  raise ModuleNotFoundError(dotted)


def _documents() -> list[str]:
  paths = [os.path.join(ROOT, "README.md"), *glob.glob(os.path.join(ROOT, "docs", "*.md")),
           *glob.glob(os.path.join(ROOT, "configs", "*.py"))]
  return [open(p).read() for p in paths]


def _named_today() -> tuple[set[str], set[str]]:
  dotted, imports = set(), set()
  for text in _documents():
    dotted |= {m.rstrip(".") for m in re.findall(r"\badmm_jax(?:\.[A-Za-z_]\w*)+", text)}
    imports |= {m.strip() for m in re.findall(
        r"^\s*(from admm_jax[\w.]* import [\w, ]+|import admm_jax[\w.]*(?: as \w+)?)\s*$",
        text, flags=re.M)}
  return dotted, imports


def test_the_documents_are_read():
  dotted, imports = _named_today()
  assert "admm_jax.main" in dotted and any("admm_jax" in i for i in imports)


def test_resolve_fails_on_a_missing_name():
  with pytest.raises(AttributeError):
    resolve("admm_jax.sparsity.no_such_function")


@pytest.mark.parametrize("name", sorted(set(NAMES_BEFORE) | _named_today()[0]))
def test_name_resolves(name):
  assert resolve(name) is not None


@pytest.mark.parametrize("statement", sorted(set(IMPORTS_BEFORE) | _named_today()[1]))
def test_import_statement_runs(statement):
  exec(statement, {})
