"""The README's library example runs as written."""
import os
import re

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
