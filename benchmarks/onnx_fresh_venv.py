"""An exported model.onnx in a fresh venv holding only onnxruntime and numpy: test accuracy
against the run's report, and logits against the jax artifact.

    python benchmarks/onnx_fresh_venv.py --export=runs/x/export [--venv=/tmp/ort-venv]

Creates the venv (python -m venv; pip install onnxruntime numpy) unless it exists, runs
onnxruntime there on the whole Fashion-MNIST/MNIST test split read from the run's IDX files
(the child imports nothing but numpy, gzip and onnxruntime, and says so), then compares in
this process with the jax artifact (`model.jaxexport`) on the same images. Prints one JSON.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

CHILD = r"""
import gzip, json, sys
import numpy as np, onnxruntime as ort
model, images_path, out = sys.argv[1:4]
with gzip.open(images_path) if images_path.endswith(".gz") else open(images_path, "rb") as f:
  raw = f.read()
n, h, w = (int.from_bytes(raw[i:i + 4], "big") for i in (4, 8, 12))
x = np.frombuffer(raw, np.uint8, n * h * w, 16).reshape(n, h, w, 1).astype(np.float32) / 255
s = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
logits = np.concatenate([s.run(["logits"], {"images": x[i:i + 500]})[0]
                         for i in range(0, n, 500)])
np.save(out, logits)
print(json.dumps({"onnxruntime": ort.__version__, "foreign_modules": sorted(
    {m.split(".")[0] for m in sys.modules} & {"jax", "onnx", "admm_jax", "flax", "torch"})}))
"""


def _idx(path: str) -> np.ndarray:
  with (gzip.open(path) if path.endswith(".gz") else open(path, "rb")) as f:
    raw = f.read()
  dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(raw[3])]
  return np.frombuffer(raw, np.uint8, int(np.prod(dims)), 4 + 4 * len(dims)).reshape(dims)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--export", required=True,
                      help="an export folder (python -m admm_jax.export)")
  parser.add_argument("--venv", default=os.path.join(tempfile.gettempdir(), "admm_jax_ort_venv"))
  args = parser.parse_args(argv)
  with open(os.path.join(args.export, "export.json")) as f:
    summary = json.load(f)
  with open(os.path.join(summary["workdir"], "report.json")) as f:
    config = json.load(f)["config"]
  data_dir = config["data"]["dir"]
  find = lambda stem: next(os.path.join(data_dir, stem + ext) for ext in ("", ".gz")
                           if os.path.exists(os.path.join(data_dir, stem + ext)))
  images, labels = find("t10k-images-idx3-ubyte"), _idx(find("t10k-labels-idx1-ubyte"))
  py = os.path.join(args.venv, "bin", "python")
  if not os.path.exists(py):
    subprocess.run([sys.executable, "-m", "venv", args.venv], check=True)
    subprocess.run([py, "-m", "pip", "install", "-q", "onnxruntime", "numpy"], check=True)
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "logits.npy")
    proc = subprocess.run([py, "-c", CHILD, os.path.join(args.export, summary["onnx_file"]),
                           images, out], capture_output=True, text=True, env={"PATH": "/usr/bin"})
    if proc.returncode:
      raise SystemExit(proc.stderr[-2000:])
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    onnx_logits = np.load(out)
  import jax  # pylint: disable=import-outside-toplevel
  with open(os.path.join(args.export, summary["artifact"]), "rb") as f:
    artifact = jax.export.deserialize(bytearray(f.read()))
  x = _idx(images)[..., None].astype(np.float32) / np.float32(255)
  jax_logits = np.concatenate([np.asarray(artifact.call(x[i:i + 500]))
                               for i in range(0, len(x), 500)])
  correct = int(np.sum(np.argmax(onnx_logits, -1) == labels))
  recorded = summary["evaluation"]["recorded_natural_accuracy"]
  print(json.dumps({"export": os.path.abspath(args.export), **child, "test_examples": len(x),
                    "onnx_correct": correct, "recorded_correct": round(recorded * len(x)),
                    "difference_in_examples": abs(correct - round(recorded * len(x))),
                    "max_abs_logit_difference_vs_jax": float(np.max(np.abs(
                        onnx_logits - jax_logits)))}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
