"""End to end: all stages on tiny data through the CLI, resume after SIGKILL, bad input."""
import json
import os
import signal
import subprocess
import sys
import time
import types

import pytest

from admm_jax import configlib, models, pipeline
from tree_digest import tree_digest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "fashion_mnist_lenet.py")
FMNIST = "/usr/share/datasets/fashion-mnist"
# The :tiny variant, smaller still: 3 stages in ~30 s; checkpoints every 10 steps.
TINY = [f"--config={CONFIG}:tiny", "--config.data.limit_train=1024",
        "--config.data.limit_test=256", "--config.checkpoint_every_steps=10"]

if not os.path.isdir(FMNIST):
  if os.environ.get("CI") == "true":
    raise RuntimeError(f"{FMNIST} is missing under CI: .ci/run must install dataset-fashion-mnist")
  pytest.skip(allow_module_level=True, reason="Debian's dataset-fashion-mnist is not installed")


def _cmd(workdir, *extra):
  return [sys.executable, "-m", "admm_jax.main", *TINY, f"--workdir={workdir}", *extra]


def _run(workdir, *extra, check=True):
  proc = subprocess.run(_cmd(workdir, *extra), capture_output=True, text=True, timeout=600)
  if check and proc.returncode != 0:
    raise AssertionError(f"run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
  return proc


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  proc = _run(workdir)
  with open(workdir / "report.json") as f:
    return workdir, json.load(f), proc


def test_all_three_stages_run_and_report(finished_run):
  workdir, report, proc = finished_run
  assert list(report["stages"]) == ["pretrain", "admm", "retrain"]
  for rec in report["stages"].values():
    assert 0.0 <= rec["adversarial_accuracy"] <= rec["natural_accuracy"] <= 1.0
    assert rec["test_examples"] == 256 and rec["wall_time_s"] > 0
  assert report["attack"]["eps"] == 0.1 and report["attack"]["steps"] == 5
  layers = report["sparsity"]["layers"]
  assert set(layers) == {"conv1/kernel", "conv2/kernel", "fc1/kernel", "fc2/kernel"}
  for layer in layers.values():
    assert layer["kind"] == "irregular"
    assert abs(layer["achieved"] - layer["target"]) < 0.01  # exact up to rounding of one group
  assert report["sparsity"]["compression"] > 10
  assert report["devices"]["count"] >= 1 and report["devices"]["platform"] == "cpu"
  assert "compression" in proc.stdout and "retrain" in proc.stdout
  lines = [json.loads(x) for x in open(workdir / "metrics.jsonl")]
  assert [(x["stage"], x["epoch"]) for x in lines] == [
      ("pretrain", 1), ("pretrain", 2), ("admm", 1), ("admm", 2), ("retrain", 1)]
  assert "admm_primal_residual" in lines[2]


def _tiny_config():
  import importlib.util
  spec = importlib.util.spec_from_file_location("fmnist_config", CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny")
  config.data.limit_train, config.data.limit_test, config.checkpoint_every_steps = 1024, 256, 10
  return config


def test_diagnostics_equal_the_hard_pruned_and_admm_weights_evaluated_directly(finished_run):
  """report.json's after-hard-prune accuracy is the admm output, hard-pruned, evaluated."""
  import jax

  from admm_jax import sparsity
  workdir, report, proc = finished_run
  ctx = pipeline.make_context(_tiny_config(), str(workdir))
  model = ctx.model(ctx.config.model.width)
  admm_out = pipeline.load_output(ctx, "admm", pipeline._fresh_variables(ctx, model, "pretrain"))
  pruned, _ = sparsity.hard_prune(admm_out["params"], ctx.spec)
  retrain = report["stages"]["retrain"]
  for split in ("validation", "test"):
    direct = ctx.evaluate(model, pruned, admm_out["batch_stats"], split,
                          ctx.key(split, "retrain", "start"))
    prefix = "after_hard_prune_val" if split == "validation" else "after_hard_prune_test"
    for kind in ("natural", "adversarial"):
      assert retrain[f"{prefix}_{kind}_accuracy"] == pytest.approx(direct[f"{kind}_accuracy"],
                                                                    abs=1e-6)
  assert retrain["val_adversarial_accuracy"] is not None
  diag = report["stages"]["admm"]["admm"]
  dist = jax.device_get(sparsity.distance_to_set(admm_out["params"], ctx.spec, relative=True))
  assert set(diag["relative_distance_to_sparse_set"]) == set(dist) == set(
      diag["relative_primal_residual"])
  for layer, value in dist.items():
    assert diag["relative_distance_to_sparse_set"][layer] == pytest.approx(float(value), abs=2e-6)
    assert 0 <= diag["relative_primal_residual"][layer] < 2
  assert diag["rho"] > ctx.config.admm.rho  # grew at the Z/U update
  assert "right after hard pruning" in proc.stdout and "ADMM end" in proc.stdout


def test_rerun_skips_finished_stages(finished_run):
  workdir, report, _ = finished_run
  proc = _run(workdir)
  assert proc.stderr.count("finished earlier") == 3
  with open(workdir / "report.json") as f:
    assert json.load(f)["stages"] == report["stages"]


def _wait_for_checkpoint(workdir, stage, proc, timeout=300):
  ckpt = workdir / "checkpoints" / stage
  deadline = time.time() + timeout
  while time.time() < deadline:
    if ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir()):
      return
    if proc.poll() is not None:
      raise AssertionError(f"run ended before a {stage} checkpoint: {proc.stderr.read()[-2000:]}")
    time.sleep(0.05)
  raise AssertionError(f"no {stage} checkpoint within {timeout}s")


def test_sigkill_mid_stage_then_resume_gives_identical_numbers(finished_run, tmp_path):
  _, report, _ = finished_run
  workdir = tmp_path / "killed"
  proc = subprocess.Popen(_cmd(workdir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    _wait_for_checkpoint(workdir, "admm", proc)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert not (workdir / "outputs" / "admm.json").exists(), "killed too late: admm had finished"
  resumed = _run(workdir)
  assert "resuming from admm step" in resumed.stderr
  with open(workdir / "report.json") as f:
    again = json.load(f)
  for stage in ("pretrain", "admm", "retrain"):
    for key in ("natural_accuracy", "adversarial_accuracy", "steps"):
      assert again["stages"][stage][key] == report["stages"][stage][key], (stage, key)
  assert again["sparsity"]["layers"] == report["sparsity"]["layers"]
  epochs = [(x["stage"], x["epoch"]) for x in map(json.loads, open(workdir / "metrics.jsonl"))]
  assert epochs == [("pretrain", 1), ("pretrain", 2), ("admm", 1), ("admm", 2), ("retrain", 1)]




@pytest.mark.parametrize("flag,expected", [
    ("--config.attack.eps=-0.5", "config.attack.eps=-0.5 is invalid"),
    ("--config.model.name=alexnet", "config.model.name='alexnet' is invalid"),
    ("--config.model.conv_impl=winograd", "config.model.conv_impl='winograd' is invalid"),
    ("--config.stages=retrain,pretrain", "config.stages='retrain,pretrain' is invalid"),
    ("--config.sparsity=conv1/kernel=rows:0.5", "kind 'rows'"),
    ("--config.batch_size=0", "config.batch_size=0 is invalid"),
    ("--config.data.dir=/no/such/dir", "data.dir '/no/such/dir' does not exist"),
    ("--config.model.width=abc", "--config.model.width=abc"),
    ("--config.sparsity=nothing/kernel=filter:0.5",
     "pattern 'nothing/kernel' matches no parameter"),
])
def test_bad_input_is_one_sentence_exit_2_and_loses_nothing(finished_run, flag, expected):
  workdir, _, _ = finished_run
  before = tree_digest(workdir)
  extra = [flag]
  if "sparsity=nothing" in flag:
    extra.append("--config.stages=admm,retrain")
  proc = _run(workdir, *extra, check=False)
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
  assert len(errors) == 1 and expected in errors[0], proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert tree_digest(workdir) == before


def test_unwritable_workdir_is_one_sentence(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  proc = _run(blocker / "run", check=False)
  assert proc.returncode == 2 and "is not writable" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_stage_starts_from_another_runs_output(finished_run, tmp_path):
  workdir, report, _ = finished_run
  _run(tmp_path / "from_other", "--config.stages=retrain", f"--config.init_from={workdir}")
  with open(tmp_path / "from_other" / "report.json") as f:
    again = json.load(f)
  assert list(again["stages"]) == ["retrain"]
  assert again["stages"]["retrain"]["adversarial_accuracy"] == \
      report["stages"]["retrain"]["adversarial_accuracy"]
  missing = _run(tmp_path / "nothing", "--config.stages=retrain", check=False)
  assert missing.returncode == 2 and "init_from" in missing.stderr


def test_tfds_path_end_to_end_under_mock_data(tmp_path):
  """data.dir='' goes through tfds.data_source; mock_data stands in for the download."""
  import importlib.util

  import tensorflow_datasets as tfds

  from admm_jax import pipeline
  spec = importlib.util.spec_from_file_location("fmnist_config", CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny")
  config.data.update(name="mnist", dir="", validation_size=64, limit_train=256, limit_test=64)
  config.update(stages="pretrain", eval_batch_size=64)
  config.pretrain.epochs = 1
  with tfds.testing.mock_data(num_examples=512):
    report = pipeline.train_and_evaluate(config, str(tmp_path / "tfds"))
  assert report["dataset"] == {"name": "mnist", "train": 256, "validation": 64, "test": 64}
  rec = report["stages"]["pretrain"]
  assert rec["test_examples"] == 64 and 0 <= rec["adversarial_accuracy"] <= rec["natural_accuracy"]


def test_model_takes_the_configs_conv_impl():
  config = configlib.base_config()
  config.model.conv_impl = "xla"
  configlib.validate(config)
  ctx = types.SimpleNamespace(config=config, dataset=types.SimpleNamespace(num_classes=10))
  model = pipeline.Context.model(ctx, 3)
  assert (model.width, model.conv) == (3, models.conv_module("xla"))
