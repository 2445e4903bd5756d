"""The export of a k-bit run: packed codes, model.onnx checked by onnxruntime, and bad input
(a layer off its grid) stopped in one sentence with nothing in --out."""
import os
import subprocess
import sys

import numpy as np
import pytest

from admm_jax import compaction, deploy, models, sparsity
from admm_jax.app import configlib, export
from model_variables import random_variables
import fmnist
import synthetic_run

if os.environ.get("CI") == "true":   # .ci/run installs the onnx extra: missing is a failure
  import onnxruntime as ort
else:
  ort = pytest.importorskip("onnxruntime", reason="needs the onnx extra (pip install .[onnx])")
SPARSITY = ("conv1/kernel=filter:0.5:4b,conv2/kernel=irregular:0.8:8b-layer,"
            "fc1/kernel=irregular:0.95:4b")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A synthetic finished run: LeNet(1) on its sparse k-bit grids (retrain), and the same
  weights off the grid as the admm stage."""
  fmnist.require()
  root = tmp_path_factory.mktemp("qrun")
  config = synthetic_run.export_config(SPARSITY)
  the_spec = sparsity.spec(configlib.parse_sparsity(SPARSITY))
  variables = random_variables(models.get_model("lenet", 1), (1, 28, 28, 1), seed=4)
  on_grid, masks = sparsity.hard_prune(variables["params"], the_spec)
  synthetic_run.write_stage(root, "retrain", on_grid, the_spec)
  off_grid = compaction.apply_masks(variables["params"], masks)
  synthetic_run.write_stage(root, "admm", off_grid, the_spec)
  synthetic_run.write_report(root, config)
  return str(root)


@pytest.fixture(scope="module")
def exported(workdir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("qexports") / "lenet")
  return out, export.export_workdir(workdir, out, latency_batches=(1, 4), repeats=1)


def test_export_writes_packed_codes_and_an_onnx_model_onnxruntime_agrees_with(exported):
  out, s = exported
  assert sorted(os.listdir(out)) == ["export.json", "graph.json", "model.jaxexport",
                                     "model.onnx", "params.npz", "quantized.bin"]
  assert s["onnx_file"] == "model.onnx" and s["quantized_file"] == "quantized.bin"
  assert s["quantization"] == {"conv1": {"bits": 4, "scale_mode": "channel"},
                               "conv2": {"bits": 8, "scale_mode": "layer"},
                               "fc1": {"bits": 4, "scale_mode": "channel"}}
  b = s["bytes"]
  assert b["quantized_params"] == os.path.getsize(os.path.join(out, "quantized.bin"))
  # The packed file alone gives back the compact network.
  g, params = compaction.load_params(out)
  unpacked = deploy.unpack(*deploy.read_packed(os.path.join(out, "quantized.bin")))
  x = np.random.default_rng(1).random((3, 28, 28, 1), np.float32)
  np.testing.assert_allclose(np.asarray(g.apply(unpacked, x)), np.asarray(g.apply(params, x)),
                             atol=1e-5)
  assert b["onnx"] == os.path.getsize(os.path.join(out, "model.onnx"))
  o = s["onnx"]
  assert o["test_examples"] == 48 and o["max_abs_logit_difference"] <= 1e-4
  assert o["natural_accuracy"] == s["evaluation"]["natural_accuracy"]
  assert set(o["latency"]) >= {"batch_1_s", "batch_4_s"}


def test_a_layer_off_its_grid_is_one_sentence_and_leaves_nothing(workdir, tmp_path):
  out = tmp_path / "out"
  with pytest.raises(export.ExportError, match="conv1.*not on a 4-bit grid") as e:
    export.export_workdir(workdir, str(out), stage="admm")
  assert "\n" not in str(e.value) and str(e.value).endswith(".")
  assert not out.exists() and not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


@pytest.mark.slow
def test_onnx_model_runs_in_a_fresh_venv_with_only_onnxruntime_and_numpy(exported, tmp_path):
  out, _ = exported
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
  pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "onnxruntime", "numpy"],
                       capture_output=True, text=True, timeout=600)
  assert pip.returncode == 0, pip.stderr[-2000:]
  x = np.random.default_rng(0).random((5, 28, 28, 1), np.float32)
  np.save(tmp_path / "x.npy", x)
  code = ("import sys, numpy as np, onnxruntime as ort\n"
          f"s = ort.InferenceSession({os.path.join(out, 'model.onnx')!r})\n"
          "np.save('y.npy', s.run(['logits'], {'images': np.load('x.npy')})[0])\n"
          "print(sorted(m.split('.')[0] for m in sys.modules if m.split('.')[0] in "
          "('jax', 'onnx', 'admm_jax', 'flax')))\n")
  proc = subprocess.run([str(venv / "bin" / "python"), "-c", code], cwd=tmp_path,
                        capture_output=True, text=True, timeout=300, env={"PATH": "/usr/bin"})
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip() == "[]"
  g, params = compaction.load_params(out)
  np.testing.assert_allclose(np.load(tmp_path / "y.npy"), np.asarray(g.apply(params, x)),
                             atol=1e-4, rtol=0)
