"""The README's library example runs as written, and so does every other Python block of
README.md and docs/ (a block that needs files of a finished run says so in a comment
`<!-- not run: <why> -->` right above it)."""
import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python_blocks():
  with open(os.path.join(ROOT, "README.md")) as f:
    return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def test_readme_example_composes_admm_and_masks(capsys):
  blocks = _python_blocks()
  assert blocks, "README.md has no python example"
  namespace = {}
  exec(compile(blocks[0], "README.md", "exec"), namespace)
  params, masks, spec = namespace["params"], namespace["masks"], namespace["spec"]
  aj = namespace["aj"]
  rep = aj.sparsity.report(params, spec)
  dense0 = rep.layers["Dense_0/kernel"]
  assert dense0.params - dense0.nonzero == aj.projections.num_removed(64 * 64, 0.9)
  assert rep.layers["Dense_1/kernel"].groups_pruned == 32  # column: half of the 64 inputs
  # Retraining moved the kept weights but left every pruned one at exactly zero.
  w = params["Dense_0"]["kernel"]
  assert bool((w[~masks["Dense_0"]["kernel"]] == 0).all())
  assert bool((w[masks["Dense_0"]["kernel"]] != 0).all())
  out = capsys.readouterr().out
  assert "Dense_0/kernel" in out and "compression" in out


NOT_RUN = re.compile(r"<!-- not run: (?P<why>[^>]*\w[^>]*) -->\n$")


def _blocks_of(path: str) -> list[tuple[str, str | None]]:
  """(code, reason it is not run or None) for each python block of a markdown file."""
  text = open(path).read()
  out = []
  for m in re.finditer(r"```python\n(.*?)```", text, flags=re.S):
    skip = NOT_RUN.search(text[:m.start()][-200:])
    out.append((m.group(1), skip["why"] if skip else None))
  return out


def _other_blocks():
  """Every python block of docs/*.md, and README's after its first (run above)."""
  cases = [(f"README.md#{i}", code, why)
           for i, (code, why) in enumerate(_blocks_of(os.path.join(ROOT, "README.md"))) if i]
  for path in sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))):
    cases += [(f"docs/{os.path.basename(path)}#{i}", code, why)
              for i, (code, why) in enumerate(_blocks_of(path))]
  return cases


def test_the_docs_have_python_blocks_and_only_named_ones_are_not_run():
  cases = _other_blocks()
  assert any(name.startswith("docs/library.md") for name, _, _ in cases)
  # The blocks not run, each with its reason (an export needs a finished run).
  assert [(n, why) for n, _, why in cases if why] == [
      ("docs/export.md#0", "needs a finished export in runs/fmnist/export")]
  assert _blocks_of(os.path.join(ROOT, "README.md"))[0][1] is None   # the example is run
  assert NOT_RUN.search("<!-- not run: needs a finished run -->\n")
  assert not NOT_RUN.search("<!-- not run:  -->\n")


RUN = [(name, code) for name, code, why in _other_blocks() if why is None]


@pytest.mark.parametrize("name, code", RUN, ids=[name for name, _ in RUN])
def test_docs_python_block_runs(name, code):
  exec(compile(code, name, "exec"), {})
