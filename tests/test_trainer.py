"""The trainer end to end on tiny data: all stages, report fields, 8 devices == 1 device (every
stage), resume after SIGKILL, bad input; the stage registry.

The tests share one finished run, made in this process on one of conftest's 8 host devices;
subprocesses only where the process itself is the point: the SIGKILLed run and the command
line's exit code 2.
"""
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from admm_jax import models, sparsity
from admm_jax.app import configlib, reports, stages, study, trainer, workdir
from admm_jax.app.errors import UserError
from tree_digest import tree_digest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "fashion_mnist_lenet.py")
FMNIST = "/usr/share/datasets/fashion-mnist"
# The :tiny variant, smaller still: 16 steps an epoch, epochs 1 + 2 + 1; checkpoints every 10
# steps; one device.
OVERRIDES = {"data.limit_train": 1024, "data.limit_test": 256, "pretrain.epochs": 1,
             "checkpoint_every_steps": 10, "parallel.data_axis": 1}
STAGE_EPOCHS = [("pretrain", 1), ("admm", 1), ("admm", 2), ("retrain", 1)]

if not os.path.isdir(FMNIST):
  if os.environ.get("CI") == "true":
    raise RuntimeError(f"{FMNIST} is missing under CI: .ci/run must install dataset-fashion-mnist")
  pytest.skip(allow_module_level=True, reason="Debian's dataset-fashion-mnist is not installed")


def tiny_config(**fields):
  """The config the command line builds from _cli's flags, with `fields` ("a.b": value) set on
  top."""
  return configlib.override(study.load_config(CONFIG, "tiny"), {**OVERRIDES, **fields})


def _cli(workdir, *extra):
  flags = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  return [sys.executable, "-m", "admm_jax.main", f"--config={CONFIG}:tiny", *flags,
          f"--workdir={workdir}", *extra]


def _log_lines(caplog, text):
  return [r for r in caplog.records if text in r.getMessage()]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  report = trainer.train_and_evaluate(tiny_config(), str(workdir))
  assert json.loads((workdir / "report.json").read_text()) == report
  return workdir, report


def test_all_three_stages_run_and_report(finished_run):
  workdir, report = finished_run
  assert list(report["stages"]) == ["pretrain", "admm", "retrain"]
  for rec in report["stages"].values():
    assert 0.0 <= rec["adversarial_accuracy"] <= rec["natural_accuracy"] <= 1.0
    assert rec["test_examples"] == 256 and rec["wall_time_s"] > 0
  assert report["stages"]["admm"]["selected"] == "last epoch"
  assert report["stages"]["pretrain"]["selected"].startswith("epoch ")
  assert report["attack"]["eps"] == 0.1 and report["attack"]["steps"] == 5
  layers = report["sparsity"]["layers"]
  assert report["sparsity"]["stage"] == "retrain"
  assert set(layers) == {"conv1/kernel", "conv2/kernel", "fc1/kernel", "fc2/kernel"}
  for layer in layers.values():
    assert layer["kind"] == "irregular"
    assert abs(layer["achieved"] - layer["target"]) < 0.01  # exact up to rounding of one group
  assert report["sparsity"]["compression"] > 10
  assert report["devices"]["count"] == 1 and report["devices"]["platform"] == "cpu"
  lines = [json.loads(x) for x in open(workdir / "metrics.jsonl")]
  assert [(x["stage"], x["epoch"]) for x in lines] == STAGE_EPOCHS
  assert "admm_primal_residual" in lines[1]
  text = reports.summary(report)
  assert "compression" in text and "retrain" in text
  assert report["dataset"]["labelled_examples"] == 1024 + 256   # train + validation
  assert "1280 labelled examples (1024 train + 256 validation), 256 test" in text
  assert "right after hard pruning" in text and "ADMM end" in text


def test_diagnostics_equal_the_hard_pruned_and_admm_weights_evaluated_directly(finished_run):
  """report.json's after-hard-prune accuracy is the admm output, hard-pruned, evaluated."""
  workdir, report = finished_run
  ctx = trainer.make_context(tiny_config(), str(workdir))
  model = ctx.model(ctx.config.model.width)
  admm_out = trainer.load_output(ctx, "admm", ctx.fresh_variables(model, "pretrain"))
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


# Accuracies may differ by some of the 256 test examples: the 8-device step sums the
# gradient in another order (8 partial sums + an all-reduce) and runs its matmuls on 8-example
# shards, 1e-7 relative differences that 48 steps of training and PGD's sign() steps can turn
# into flipped predictions of this barely trained model (natural accuracy 14-40 %, so many
# examples sit near a decision boundary). With im2col convolutions no prediction flipped;
# with LeNet(2)'s convolutions as Toeplitz GEMMs (conv_impl "auto" since they are faster)
# 3, 3 and 10 of 256 flipped in the three stages of a shorter run, while the training loss
# still agreed to 1.3e-4. 16/256 bounds that; the exact example counts, the training loss
# (1e-3, below) and the exact sparsity are what a real device-count bug would break.
ACCURACY_TOLERANCE = 16 / 256


def test_all_stages_on_8_devices_match_1_device(finished_run, tmp_path):
  # The same config on all 8 devices (data_axis 0): every stage, so every optimizer chain
  # (plain, with the ADMM transform, with the masks) runs sharded.
  workdir, one = finished_run
  eight = trainer.train_and_evaluate(tiny_config(**{"parallel.data_axis": 0}),
                                     str(tmp_path / "eight"))
  assert one["devices"]["count"] == 1 and one["devices"]["mesh"] == {"data": 1}
  assert eight["devices"]["count"] == 8 and eight["devices"]["mesh"] == {"data": 8}
  assert eight["devices"]["processes"] == 1

  assert list(eight["stages"]) == list(one["stages"])
  for stage in eight["stages"]:
    a, b = one["stages"][stage], eight["stages"][stage]
    assert a["test_examples"] == b["test_examples"] == 256 and a["steps"] == b["steps"]
    for key in ("natural_accuracy", "adversarial_accuracy"):
      assert abs(a[key] - b[key]) <= ACCURACY_TOLERANCE, (stage, key, a[key], b[key])
  # The per-epoch training loss is a sum over all 1024 examples: it sees the reduction order
  # only as rounding (1e-7 relative after 16 steps), so it is held much tighter.
  lines = [[json.loads(x) for x in (w / "metrics.jsonl").read_text().splitlines()]
           for w in (workdir, tmp_path / "eight")]
  assert [(x["stage"], x["epoch"]) for x in lines[1]] == STAGE_EPOCHS
  for a, b in zip(lines[0], lines[1]):
    assert a["train_adversarial_loss"] == pytest.approx(b["train_adversarial_loss"], rel=1e-3)
    assert abs(a["train_adversarial_accuracy"] - b["train_adversarial_accuracy"]) <= 8 / 1024
  # The pruning is exact: each projection removes a fixed count of groups, whatever their
  # values. The count of nonzero parameters is not: it also counts what training left at
  # exactly 0, e.g. the bias of a ReLU unit that died on one side only (on some CPUs:
  # 1378 vs 1376), so it is bounded.
  for path, layer in one["sparsity"]["layers"].items():
    other = eight["sparsity"]["layers"][path]
    assert (layer["groups"], layer["groups_pruned"]) == (other["groups"], other["groups_pruned"]), \
        path
    assert layer["achieved"] == other["achieved"], path
    assert abs(layer["achieved"] - layer["target"]) < 0.01
  nonzero = one["sparsity"]["nonzero_params"], eight["sparsity"]["nonzero_params"]
  assert abs(nonzero[0] - nonzero[1]) <= 0.01 * max(nonzero), nonzero


def test_rerun_skips_finished_stages(finished_run, caplog):
  workdir, report = finished_run
  caplog.set_level(logging.INFO)
  again = trainer.train_and_evaluate(tiny_config(), str(workdir))
  assert len(_log_lines(caplog, "finished earlier")) == 3
  assert again["stages"] == report["stages"]
  assert json.loads((workdir / "report.json").read_text())["stages"] == report["stages"]


def _copy_without(src, dst, *stages_to_drop):
  """A copy of the finished workdir `src` in which `stages_to_drop` never finished (their
  markers and outputs gone; their checkpoints kept: such a stage is running)."""
  shutil.copytree(src, dst, ignore=shutil.ignore_patterns("run.lock"))
  for stage in stages_to_drop:
    shutil.rmtree(dst / "outputs" / stage)
    (dst / "outputs" / f"{stage}.json").unlink()
  return dst


def test_changed_training_field_on_a_finished_workdir_stops_before_any_work(finished_run):
  run_dir, _ = finished_run
  before = tree_digest(run_dir)
  message = _user_error(tiny_config(**{"admm.rho": 0.7}), run_dir)  # exit code 2 in main
  assert "admm.rho 0.5 -> 0.7" in message and "admm finished" in message, message
  assert f"--config.init_from={run_dir}" in message and "another --workdir" in message
  assert "\n" not in message
  assert tree_digest(run_dir) == before


def test_changed_field_on_a_half_finished_workdir_stops_naming_the_running_stage(finished_run,
                                                                                 tmp_path):
  half = _copy_without(finished_run[0], tmp_path / "half", "admm", "retrain")
  shutil.rmtree(half / "checkpoints" / "retrain")
  before = tree_digest(half)
  message = _user_error(tiny_config(**{"admm.lr": 0.02}), half)
  assert "admm.lr 0.01 -> 0.02" in message, message
  assert "pretrain finished, admm running" in message
  assert tree_digest(half) == before


def test_appended_stage_is_allowed_recorded_and_gives_the_clean_numbers(finished_run, tmp_path,
                                                                       caplog):
  run_dir, report = finished_run
  part = _copy_without(run_dir, tmp_path / "appended", "retrain")
  shutil.rmtree(part / "checkpoints" / "retrain")
  # As a run started with stages=pretrain,admm would have left it.
  stored = json.loads((part / "config.json").read_text())
  stored["config"]["stages"] = "pretrain,admm"
  (part / "config.json").write_text(json.dumps(stored))
  caplog.set_level(logging.INFO)
  again = trainer.train_and_evaluate(tiny_config(**{"eval.final_limit": 7}), str(part))
  assert len(_log_lines(caplog, "finished earlier")) == 2
  for key in ("natural_accuracy", "adversarial_accuracy", "steps"):
    assert again["stages"]["retrain"][key] == report["stages"]["retrain"][key], key
  history = json.loads((part / "config.json").read_text())["history"]
  assert history[-1]["changes"] == {"eval.final_limit": [1000, 7],
                                    "stages": ["pretrain,admm", "pretrain,admm,retrain"]}
  assert workdir.check_config(str(part), tiny_config(**{"eval.final_limit": 7})) == {}


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


def test_sigkill_mid_stage_then_resume_gives_identical_numbers(finished_run, tmp_path, caplog):
  _, report = finished_run
  workdir = tmp_path / "killed"
  proc = subprocess.Popen(_cli(workdir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    _wait_for_checkpoint(workdir, "admm", proc)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert not (workdir / "outputs" / "admm.json").exists(), "killed too late: admm had finished"
  caplog.set_level(logging.INFO)
  again = trainer.train_and_evaluate(tiny_config(), str(workdir))  # the killed run's lock is stale
  assert _log_lines(caplog, "resuming from admm step")
  for stage in ("pretrain", "admm", "retrain"):
    for key in ("natural_accuracy", "adversarial_accuracy", "steps"):
      assert again["stages"][stage][key] == report["stages"][stage][key], (stage, key)
  assert again["sparsity"]["layers"] == report["sparsity"]["layers"]
  epochs = [(x["stage"], x["epoch"]) for x in map(json.loads, open(workdir / "metrics.jsonl"))]
  assert epochs == STAGE_EPOCHS


def _user_error(config, workdir) -> str:
  """The message main prints for a run of `config` (as "error: <message>", exit code 2)."""
  with pytest.raises(UserError) as e:
    trainer.train_and_evaluate(config, str(workdir))
  return str(e.value)


@pytest.mark.parametrize("fields,expected", [
    ({"attack.eps": -0.5}, "config.attack.eps=-0.5 is invalid"),
    ({"model.name": "alexnet"}, "config.model.name='alexnet' is invalid"),
    ({"model.conv_impl": "winograd"}, "config.model.conv_impl='winograd' is invalid"),
    ({"stages": "retrain,pretrain"}, "config.stages='retrain,pretrain' is invalid"),
    ({"sparsity": "conv1/kernel=rows:0.5"}, "kind 'rows'"),
    ({"batch_size": 0}, "config.batch_size=0 is invalid"),
    ({"data.dir": "/no/such/dir"}, "data.dir '/no/such/dir' does not exist"),
    ({"sparsity": "nothing/kernel=filter:0.5", "stages": "admm,retrain"},
     "pattern 'nothing/kernel' matches no parameter"),
    ({"sparsity": "nothing.*/kernel=irregular:0.9:global", "stages": "admm,retrain"},
     "pattern 'nothing.*/kernel' matches no parameter"),
    ({"sparsity": "(conv1|fc2)/kernel=irregular:0.9999:global", "stages": "admm,retrain"},
     "fewer than its 2 layers, and every layer keeps at least one group"),
])
def test_bad_input_is_one_sentence_and_loses_nothing(finished_run, fields, expected):
  workdir, _ = finished_run
  before = tree_digest(workdir)
  message = _user_error(tiny_config(**fields), workdir)
  assert expected in message and "\n" not in message
  assert tree_digest(workdir) == before


@pytest.mark.parametrize("flag,expected", [
    ("--config.model.width=abc", "--config.model.width=abc"),   # absl's flag parser
    ("--config.attack.eps=-0.5", "config.attack.eps=-0.5 is invalid"),   # main's user errors
    ("--config.admm.rho=0.7", "admm.rho 0.5 -> 0.7"),   # a field that shaped finished stages
])
def test_bad_input_is_one_sentence_exit_2_and_loses_nothing(finished_run, flag, expected):
  """The command line: exit code 2, one "error:" line, no traceback, the workdir untouched."""
  workdir, _ = finished_run
  before = tree_digest(workdir)
  proc = subprocess.run(_cli(workdir, flag), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
  assert len(errors) == 1 and expected in errors[0], proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert tree_digest(workdir) == before


def test_unwritable_workdir_is_one_sentence(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  assert "is not writable" in _user_error(tiny_config(), blocker / "run")


def test_stage_starts_from_another_runs_output(finished_run, tmp_path):
  workdir, report = finished_run
  again = trainer.train_and_evaluate(tiny_config(stages="retrain", init_from=str(workdir)),
                                     str(tmp_path / "from_other"))
  assert list(again["stages"]) == ["retrain"]
  assert again["stages"]["retrain"]["adversarial_accuracy"] == \
      report["stages"]["retrain"]["adversarial_accuracy"]
  assert "init_from" in _user_error(tiny_config(stages="retrain"), tmp_path / "nothing")
  message = _user_error(tiny_config(stages="inherited"), tmp_path / "nothing")
  assert "'inherited' takes its mask from the output of 'admm'" in message


def test_tfds_path_end_to_end_under_mock_data(tmp_path):
  """data.dir='' goes through tfds.data_source; mock_data stands in for the download."""
  import tensorflow_datasets as tfds

  config = tiny_config(**{"data.limit_train": 256, "data.limit_test": 64})
  config.data.update(name="mnist", dir="", validation_size=64)
  config.update(stages="pretrain", eval_batch_size=64)
  config.pretrain.epochs = 1
  with tfds.testing.mock_data(num_examples=512):
    report = trainer.train_and_evaluate(config, str(tmp_path / "tfds"))
  assert report["dataset"] == {"name": "mnist", "train": 256, "validation": 64, "test": 64,
                               "labelled_examples": 320}
  rec = report["stages"]["pretrain"]
  assert rec["test_examples"] == 64 and 0 <= rec["adversarial_accuracy"] <= rec["natural_accuracy"]


def test_model_takes_the_configs_conv_impl():
  config = configlib.base_config()
  config.model.conv_impl = "xla"
  configlib.validate(config)
  ctx = types.SimpleNamespace(config=config, dataset=types.SimpleNamespace(num_classes=10))
  model = trainer.Context.model(ctx, 3)
  assert (model.width, model.conv) == (3, models.conv_module("xla"))


# ------------------------------------------------------------------- the stage registry

def test_every_stage_has_a_config_section_and_starts_after_its_input():
  config = configlib.base_config()
  order = list(stages.STAGES)
  assert tuple(order) == configlib.STAGE_ORDER
  for name, stage in stages.STAGES.items():
    assert stage.name == name and stage.num_epochs(config) >= 1
    assert {"epochs", "optimizer", "lr", "schedule"} <= set(config[name])
    for init in configlib.SCORE_INITS:   # the scores stage's input depends on the config
      config.scores.init = init
      if stage.input_of(config) is not None:
        assert order.index(stage.input_of(config)) < order.index(name)
  budget = sum(config[s].epochs for s in ("pretrain", "admm", "retrain"))
  assert stages.STAGES["scratch"].num_epochs(config) == budget
  assert stages.STAGES["inherited"].num_epochs(config) == budget
  config.inherited.epochs = 3
  assert stages.STAGES["inherited"].num_epochs(config) == 3
  # The registry's rules are configlib's: epochs 0 allowed only where it means the budget.
  config.retrain.epochs = 0
  with pytest.raises(configlib.ConfigError, match="config.retrain.epochs=0 is invalid"):
    configlib.validate(config)


def _start(variables, fresh, spec):
  return stages.StageStart(config=configlib.base_config(), spec=spec, variables=variables,
                           fresh=fresh, optimizer=optax.sgd(0.1), update_every=1)


def test_inherited_build_masks_the_fresh_init_with_the_pruned_pattern_and_keeps_it():
  spec = sparsity.spec({"dense/kernel": ("irregular", 0.5)})
  pruned = {"dense": {"kernel": jnp.asarray([[3.0, -0.1], [0.2, -4.0]]),
                      "bias": jnp.asarray([1.0, 1.0])}}
  fresh = {"params": {"dense": {"kernel": jnp.asarray([[0.5, 0.6], [0.7, 0.8]]),
                                "bias": jnp.asarray([0.1, 0.2])}},
           "batch_stats": {}}
  variables, tx = stages.STAGES["inherited"].build(
      _start({"params": pruned, "batch_stats": {}}, fresh, spec))
  start = variables["params"]
  keep = np.asarray([[True, False], [False, True]])  # the pruned weights' largest half
  np.testing.assert_array_equal(start["dense"]["kernel"],
                                np.where(keep, fresh["params"]["dense"]["kernel"], 0.0))
  np.testing.assert_array_equal(start["dense"]["bias"], fresh["params"]["dense"]["bias"])
  grads = jax.tree.map(jnp.ones_like, start)  # the mask keeps the pruned weights at 0.0
  updates, _ = tx.update(grads, tx.init(start), start)
  moved = optax.apply_updates(start, updates)
  np.testing.assert_array_equal(moved["dense"]["kernel"] == 0.0, ~keep)
  # retrain's build hard-prunes its input instead: the same pattern on the pruned weights.
  retrained, _ = stages.STAGES["retrain"].build(
      _start({"params": pruned, "batch_stats": {}}, fresh, spec))
  np.testing.assert_array_equal(retrained["params"]["dense"]["kernel"],
                                np.where(keep, pruned["dense"]["kernel"], 0.0))


def test_k_bit_retrain_ends_on_its_grid_and_reports_the_projected_model(finished_run, tmp_path):
  """retrain.grid="end": float training under the masks, then the chosen epoch projected onto
  the sparse k-bit sets; validation, test and the saved output are of the projected model."""
  from admm_jax import quantization  # pylint: disable=import-outside-toplevel
  source, _ = finished_run
  config = tiny_config(stages="retrain", init_from=str(source), sparsity=(
      "conv1/kernel=irregular:0.8:4b,conv2/kernel=irregular:0.947,"
      "fc1/kernel=irregular:0.99:3b,fc2/kernel=irregular:0.93"))
  report = trainer.train_and_evaluate(config, str(tmp_path))
  rec = report["stages"]["retrain"]
  assert rec["selected"].endswith("then projected onto its sparse k-bit sets")
  assert rec["before_grid_val_adversarial_accuracy"] is not None
  ctx = trainer.make_context(config, str(tmp_path))
  model = ctx.model(config.model.width)
  out = trainer.load_output(ctx, "retrain", ctx.fresh_variables(model, "pretrain"))
  for layer, bits in (("conv1", 4), ("fc1", 3)):
    assert quantization.recover(np.asarray(out["params"][layer]["kernel"]), bits) is not None
  assert quantization.recover(np.asarray(out["params"]["fc2"]["kernel"]), 8) is None  # float
  val = ctx.evaluate(model, out["params"], out["batch_stats"], "validation",
                     ctx.key("validation", "retrain", "finish"))
  assert rec["val_adversarial_accuracy"] == pytest.approx(val["adversarial_accuracy"], abs=1e-6)
  test = ctx.evaluate(model, out["params"], out["batch_stats"], "test", ctx.key("test", "retrain"))
  assert rec["adversarial_accuracy"] == pytest.approx(test["adversarial_accuracy"], abs=1e-6)


# ------------------------------------------ model selection under APGD-CE (eval.select_by)

APGD_SELECTION = {"eval.select_by": "apgd-ce", "eval.select_limit": 64, "eval.select_steps": 3}


def _metrics_lines(workdir, stage):
  return [x for x in map(json.loads, open(workdir / "metrics.jsonl")) if x["stage"] == stage]


def test_default_selection_is_pgd_and_measures_no_apgd_ce(finished_run):
  workdir, report = finished_run
  assert report["config"]["eval"]["select_by"] == "pgd"
  assert report["stages"]["pretrain"]["selected"] == \
      "epoch 1 (best validation adversarial accuracy)"
  lines = [json.loads(x) for x in open(workdir / "metrics.jsonl")]
  assert not any("val_apgd_ce_accuracy" in x for x in lines)
  assert not any("val_apgd_ce_accuracy" in r for r in report["stages"].values())


def test_apgd_ce_selection_outputs_the_epoch_best_under_apgd_ce(tmp_path, monkeypatch):
  """A stubbed APGD-CE number per epoch (the PGD validation stays real): the stage outputs the
  epoch the stub ranks first (a tie keeps the earlier epoch, also where the number is not a
  float32: 0.7 is stored as 0.69999999), and its record and metrics lines carry the numbers."""
  scripted, asked = iter([0.25, 0.7, 0.7]), []
  real_evaluate = trainer.Context.evaluate

  def evaluate(self, model, params, batch_stats, split, key, *, attack=None, limit=0):
    if attack is None:
      return real_evaluate(self, model, params, batch_stats, split, key)
    asked.append((split, attack.kind, attack.steps, limit))
    return {"count": 64, "natural_accuracy": 1.0, "adversarial_accuracy": next(scripted)}

  monkeypatch.setattr(trainer.Context, "evaluate", evaluate)
  config = tiny_config(stages="pretrain", **{"pretrain.epochs": 3, "data.limit_train": 256,
                                             **APGD_SELECTION})
  rec = trainer.train_and_evaluate(config, str(tmp_path))["stages"]["pretrain"]
  monkeypatch.undo()
  assert asked == [("validation", "apgd-ce", 3, 64)] * 3
  lines = _metrics_lines(tmp_path, "pretrain")
  assert [x["val_apgd_ce_accuracy"] for x in lines] == [0.25, 0.7, 0.7]
  assert rec["selected"] == "epoch 2 (best validation APGD-CE accuracy)"
  assert (rec["val_apgd_ce_accuracy"], rec["val_apgd_ce_examples"]) == (0.7, 64)
  assert rec["val_adversarial_accuracy"] == pytest.approx(lines[1]["val_adversarial_accuracy"],
                                                          abs=1e-6)
  # The saved output is epoch 2's model: its validation PGD, measured again, is epoch 2's line.
  ctx = trainer.make_context(config, str(tmp_path))
  model = ctx.model(config.model.width)
  out = trainer.load_output(ctx, "pretrain", ctx.fresh_variables(model, "pretrain"))
  val = ctx.evaluate(model, out["params"], out["batch_stats"], "validation",
                     jax.random.fold_in(ctx.key("validation", "pretrain"), 1))
  assert val["adversarial_accuracy"] == lines[1]["val_adversarial_accuracy"]
  assert val["natural_accuracy"] == lines[1]["val_natural_accuracy"]


@pytest.mark.slow   # ~15 s on 2 loaded cores: APGD-CE's compilation and a 2-epoch retrain
def test_apgd_ce_selection_measures_the_k_bit_projected_output_again(finished_run, tmp_path):
  """Real APGD-CE: each epoch's number in metrics.jsonl, the best one chosen, and the stage's
  number re-measured on what is saved (the chosen epoch projected onto its k-bit sets)."""
  source, _ = finished_run
  config = tiny_config(stages="retrain", init_from=str(source), sparsity=(
      "conv1/kernel=irregular:0.8:4b,conv2/kernel=irregular:0.947,"
      "fc1/kernel=irregular:0.99:3b,fc2/kernel=irregular:0.93"),
      **{"retrain.epochs": 2, **APGD_SELECTION})
  rec = trainer.train_and_evaluate(config, str(tmp_path))["stages"]["retrain"]
  apgd = [x["val_apgd_ce_accuracy"] for x in _metrics_lines(tmp_path, "retrain")]
  assert len(apgd) == 2 and all(0 <= a <= 1 for a in apgd)
  best = apgd.index(max(apgd))   # the first of equals, as the trainer's strict >
  assert rec["selected"] == (f"epoch {best + 1} (best validation APGD-CE accuracy), then "
                             "projected onto its sparse k-bit sets")
  assert rec["before_grid_val_apgd_ce_accuracy"] == pytest.approx(apgd[best], abs=1e-6)
  ctx = trainer.make_context(config, str(tmp_path))
  model = ctx.model(config.model.width)
  out = trainer.load_output(ctx, "retrain", ctx.fresh_variables(model, "pretrain"))
  again = ctx.evaluate(model, out["params"], out["batch_stats"], "validation",
                       ctx.key("select", "retrain", "finish"), attack=ctx.select_attack,
                       limit=64)
  assert again["count"] == 64
  assert rec["val_apgd_ce_accuracy"] == pytest.approx(again["adversarial_accuracy"], abs=1e-6)


def test_workdir_from_before_select_by_resumes_as_pgd(finished_run, tmp_path, caplog):
  """config.json without eval.select_* (written before the fields existed): the default
  config skips its finished stages; select_by="apgd-ce" would have chosen other epochs."""
  old = _copy_without(finished_run[0], tmp_path / "old")
  stored = json.loads((old / "config.json").read_text())
  for field in ("select_by", "select_limit", "select_steps"):
    del stored["config"]["eval"][field]
  (old / "config.json").write_text(json.dumps(stored))
  caplog.set_level(logging.INFO)
  again = trainer.train_and_evaluate(tiny_config(), str(old))
  assert len(_log_lines(caplog, "finished earlier")) == 3
  assert again["stages"] == finished_run[1]["stages"]
  message = _user_error(tiny_config(**{"eval.select_by": "apgd-ce"}), old)
  assert "eval.select_by 'pgd' -> 'apgd-ce'" in message and "\n" not in message
