"""The package's shape, kept by a test: no import cycle (imports inside functions included),
no private name taken from another module, no module over 500 lines without a stated reason,
and the library never imports the application."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "admm_jax")
MAX_LINES = 500
SIZE_REASON = "Size:"   # a docstring paragraph that says why a module is longer


def _modules() -> dict[str, str]:
  """{dotted module name: path} of every module of the package."""
  out = {}
  for folder, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(folder, f)
        rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
  return out


MODULES = _modules()
TREES = {name: ast.parse(open(path).read(), path) for name, path in MODULES.items()}


def _resolve(module: str, node: ast.ImportFrom) -> str:
  if node.level == 0:
    return node.module or ""
  base = module.split(".")
  if not MODULES[module].endswith("__init__.py"):
    base = base[:-1]
  base = base[:len(base) - node.level + 1]
  return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> list[tuple[str, str, int]]:
  """(imported module, name or '', line) for every import of `module`, at any depth."""
  out = []
  for node in ast.walk(TREES[module]):
    if isinstance(node, ast.Import):
      out += [(a.name, "", node.lineno) for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      src = _resolve(module, node)
      for a in node.names:
        sub = f"{src}.{a.name}"
        out.append((sub, "", node.lineno) if sub in MODULES else (src, a.name, node.lineno))
  return [(m, n, line) for m, n, line in out if m in MODULES]


def _graph() -> dict[str, set[str]]:
  return {m: {dep for dep, _, _ in _imports(m) if dep != m} for m in MODULES}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state: dict[str, int] = {}
  stack: list[str] = []

  def visit(m: str) -> list[str] | None:
    state[m] = 1
    stack.append(m)
    for dep in sorted(graph[m]):
      if state.get(dep) == 1:
        return stack[stack.index(dep):] + [dep]
      if dep not in state and (found := visit(dep)):
        return found
    stack.pop()
    state[m] = 2
    return None

  for m in sorted(graph):
    if m not in state and (found := visit(m)):
      return found
  return None


def test_cycle_finder_finds_a_cycle():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
  cycle = _cycle(_graph())
  assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_no_private_name_is_imported_from_another_module():
  bad = [f"{m}:{line} imports {n} from {src}" for m in MODULES
         for src, n, line in _imports(m) if n.startswith("_")]
  # module._name on an imported module of the package
  for m, tree in TREES.items():
    aliases = {}
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom):
        src = _resolve(m, node)
        for a in node.names:
          if f"{src}.{a.name}" in MODULES:
            aliases[a.asname or a.name] = f"{src}.{a.name}"
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
          and node.value.id in aliases and node.attr.startswith("_")
          and not node.attr.startswith("__")):
        bad.append(f"{m}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
  assert not bad, "private names used across modules:\n" + "\n".join(bad)


def test_the_library_never_imports_the_application():
  entry_points = {f"admm_jax.{n}" for n in ("main", "study", "evaluate", "export", "plot")}
  library = [m for m in MODULES if not m.startswith("admm_jax.app") and m not in entry_points
             and m != "admm_jax"]
  bad = [f"{m}:{line} imports {dep}" for m in library for dep, _, line in _imports(m)
         if dep.startswith("admm_jax.app") or dep in entry_points]
  assert not bad, "\n".join(bad)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_long_modules_say_why(module):
  lines = open(MODULES[module]).read().count("\n")
  if lines > MAX_LINES:
    doc = ast.get_docstring(TREES[module]) or ""
    assert SIZE_REASON in doc, (f"{module} has {lines} lines: split it, or say why it is one "
                                f"module in a '{SIZE_REASON}' paragraph of its docstring")
