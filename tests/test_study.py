"""The study: a micro grid of every cell kind end to end (a failing cell, then a rerun that
resumes), its study.json, report.md, plots and every run's TensorBoard files; the inherited
stage's starting point on values; the per-run plot command; bad input."""
import json
import os
import statistics
import struct
import subprocess
import sys

import jax
import numpy as np
import pytest

from admm_jax import models
from admm_jax.app import (evaluate, plot, stages, study, study_report, tensorboard_log, trainer,
                          workdir)
from tree_digest import tree_digest

pytestmark = pytest.mark.slow  # end to end: run by .ci/run after the default command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST = "/usr/share/datasets/fashion-mnist"


def _require(ok: bool, what: str) -> None:
  if not ok:
    if os.environ.get("CI") == "true":
      raise RuntimeError(f"{what} is missing under CI: .ci/run must install it")
    pytest.skip(allow_module_level=True, reason=f"{what} is not installed")


def _importable(name: str) -> bool:
  try:
    __import__(name)
    return True
  except ImportError:
    return False


_require(os.path.isdir(FMNIST), "Debian's dataset-fashion-mnist")
_require(_importable("matplotlib"), "matplotlib")
_require(_importable("tensorboard"), "tensorboard")


def micro_study(**fields):
  """Capacity, pruned, scratch and inherited cells once each, on the :tiny recipe made smaller
  still (4 steps a stage); scratch/inherited share the pretrain/retrain optimizers, so most
  programs compile once. (A scheme cell is a pruned cell with another sparsity string: the
  planning tests check those strings against the model, and the report's scheme table is
  tested on made-up cells.)"""
  run = study.load_config(os.path.join(ROOT, "configs", "fashion_mnist_lenet.py"), "tiny")
  run.data.update(limit_train=128, validation_size=64, limit_test=128)
  run.update(batch_size=32, eval_batch_size=64, log_every_steps=2, checkpoint_every_steps=100)
  run.parallel.data_axis = 1  # one device: the 8 forced host devices slow compilation down
  run.attack.update(steps=2, eval_steps=2)
  run.pretrain.epochs = run.admm.epochs = run.retrain.epochs = 1
  run.inherited.update(warmup_epochs=run.retrain.warmup_epochs, lr=run.retrain.lr)
  grid = dict(cells="capacity,pruned,scratch,inherited", seeds=(0,), widths=(1, 2),
              wide_width=2, target_widths=(1,), plot_cells=False,
              robust_eval="apgd-ce", robust_eval_limit=64)  # one attack compiles once
  grid.update(fields)
  return study.study_config(run, **grid)


def _cell(workdir, name):
  return os.path.join(workdir, "cells", name)


def _load(path):
  with open(path) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def studied(tmp_path_factory):
  """The micro study run twice: first the seed-0 pruned cell dies in its retrain stage (after
  admm finished), then a rerun picks up what is left."""
  workdir = str(tmp_path_factory.mktemp("study"))
  config = micro_study()
  run_stage, train_and_evaluate = trainer.run_stage, trainer.train_and_evaluate

  def dies_in_retrain(ctx, stage):
    if stage == "retrain" and ctx.workdir.endswith("pruned-w2to1-s0"):
      raise RuntimeError("injected failure")
    return run_stage(ctx, stage)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(trainer, "run_stage", dies_in_retrain)
    first = study.run_study(config, workdir)
  admm_done = os.path.join(_cell(workdir, "pruned-w2to1-s0"), "outputs", "admm.json")
  admm_mtime = os.path.getmtime(admm_done)
  ran, attacked = [], []

  def counted(config, cell_dir):
    ran.append(os.path.basename(cell_dir))
    return train_and_evaluate(config, cell_dir)

  def counted_attack(cell_dir, *args, **kwargs):
    attacked.append(os.path.basename(cell_dir))
    return evaluate_workdir(cell_dir, *args, **kwargs)

  evaluate_workdir = evaluate.evaluate_workdir
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(trainer, "train_and_evaluate", counted)
    mp.setattr(evaluate, "evaluate_workdir", counted_attack)
    second = study.run_study(config, workdir)
  return {"workdir": workdir, "config": config, "first": first, "second": second, "ran": ran,
          "attacked": attacked,
          "admm_rerun": os.path.getmtime(admm_done) != admm_mtime}


def _status(summary):
  return {c["name"]: c["status"] for c in summary["cells"]}


def test_a_failing_cell_is_reported_and_the_study_goes_on(studied):
  status = _status(studied["first"])
  assert status.pop("pruned-w2to1-s0") == "failed"
  assert status.pop("inherited-w2to1-s0") == "skipped"  # it takes its mask from the failed cell
  assert set(status.values()) == {"finished"} and len(status) == 3
  failed = next(c for c in studied["first"]["cells"] if c["name"] == "pruned-w2to1-s0")
  assert "injected failure" in failed["error"] and failed["results"] is None


def test_rerun_skips_finished_cells_and_resumes_the_unfinished_one(studied):
  assert studied["ran"] == ["pruned-w2to1-s0", "inherited-w2to1-s0"]
  assert not studied["admm_rerun"], "the rerun trained the finished admm stage again"
  assert studied["attacked"] == studied["ran"], "the rerun attacked a finished cell again"
  assert set(_status(studied["second"]).values()) == {"finished"}
  assert _load(os.path.join(studied["workdir"], "study.json"))["cells"] == \
      studied["second"]["cells"]


def test_changed_run_config_stops_the_study_before_any_work(studied):
  config = micro_study()
  config.run.pretrain.lr = 0.002   # shaped every finished cell's pretrain
  before = tree_digest(studied["workdir"])
  with pytest.raises(workdir.ConfigMismatch,
                     match=r"^study cell capacity-\S+: the config differs .* pretrain.lr 0.001 "
                           r"-> 0.002"):
    study.run_study(config, studied["workdir"])
  assert tree_digest(studied["workdir"]) == before


def test_study_json_holds_every_cells_overrides_and_report_numbers(studied):
  workdir = studied["workdir"]
  for cell in studied["second"]["cells"]:
    report = _load(os.path.join(workdir, cell["report"]))
    stage = list(report["stages"])[-1]
    assert cell["results"]["pgd_accuracy"] == report["stages"][stage]["adversarial_accuracy"]
    robust = _load(os.path.join(workdir, "cells", cell["name"], "evaluation",
                                f"{stage}_apgd-ce.json"))
    assert robust["examples"] == 64 and robust["eps"] == report["attack"]["eps"]
    assert cell["results"]["adversarial_accuracy"] == robust["robust_accuracy"]
    assert cell["results"]["natural_accuracy"] == report["stages"][stage]["natural_accuracy"]
    assert report["config"]["seed"] == cell["seed"]
    assert report["config"]["stages"] == cell["overrides"]["stages"]
  kinds = {c["kind"] for c in studied["second"]["cells"]}
  assert kinds == {"capacity", "pruned", "scratch", "inherited"}


def _mean(values):
  return f"{100 * statistics.mean(values):.1f} (n={len(values)})"


def test_report_tables_hold_the_cells_numbers(studied):
  workdir, cells = studied["workdir"], studied["second"]["cells"]
  with open(os.path.join(workdir, "report.md")) as f:
    text = f.read()

  def adv(name_prefix):  # the robust evaluation's file, as the cell's folder holds it
    return [_load(os.path.join(workdir, "cells", c["name"], "evaluation",
                               f"{c['results']['stage']}_apgd-ce.json"))["robust_accuracy"]
            for c in cells if c["name"].startswith(name_prefix)]

  assert f"w=2: {_mean(adv('capacity-w2-'))}" in text
  assert (f"pruned {_mean(adv('pruned-w2to1-'))} vs scratch "
          f"{_mean(adv('scratch-w1-'))}") in text
  assert f"vs inherited {_mean(adv('inherited-w2to1-'))}" in text
  assert "apgd-ce (Linf eps 0.1, admm_jax.evaluate) on the first 64 test examples" in text
  for i, title in enumerate(["Capacity", "Pruning against small-from-scratch",
                             "Inherited initialization", "Sparsity schemes"], 1):
    assert f"## {i}. {title}" in text
  assert text.count("| claim | measured here") == 4


def test_plots_exist_and_the_report_shows_them(studied):
  workdir = studied["workdir"]
  text = open(os.path.join(workdir, "report.md")).read()
  for name in ("capacity.png", "pruned_scratch_inherited.png"):
    with open(os.path.join(workdir, "plots", name), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
    assert f"(plots/{name})" in text


def test_pruned_cell_has_exactly_the_narrow_networks_parameter_count(studied):
  report = _load(os.path.join(_cell(studied["workdir"], "pruned-w2to1-s0"), "report.json"))
  layers = report["sparsity"]["layers"]
  kept = report["sparsity"]["total_params"] - sum(x["groups_pruned"] for x in layers.values())
  assert kept == models.lenet_param_count(1)


def _variables(ctx, stage):
  return trainer.stage_setup(ctx, stages.STAGES[stage])[1]


def test_inherited_stage_starts_from_the_wide_networks_initial_weights_masked(studied):
  workdir, config = studied["workdir"], studied["config"]
  cells = {c.name: c for c in study.plan(config)}

  def context(name):
    return trainer.make_context(study.cell_config(config, cells[name], workdir),
                                 _cell(workdir, name))

  initial = _variables(context("capacity-w2-s0"), "pretrain")["params"]  # pretrain's start
  ctx = context("inherited-w2to1-s0")
  start = _variables(ctx, "inherited")["params"]
  like = ctx.fresh_variables(ctx.model(2), "pretrain")
  pruned = trainer.load_output(ctx, "retrain", like)["params"]   # the pruned network
  trained = trainer.load_output(ctx, "inherited", like)["params"]
  for (path, w0), s, p, t in zip(jax.tree_util.tree_leaves_with_path(initial),
                                 jax.tree.leaves(start), jax.tree.leaves(pruned),
                                 jax.tree.leaves(trained)):
    w0, s, p, t = map(np.asarray, (w0, s, p, t))
    if "kernel" in jax.tree_util.keystr(path):
      keep = p != 0
      assert 0 < keep.mean() < 1
      np.testing.assert_array_equal(s, np.where(keep, w0, 0.0))
      assert np.all(t[~keep] == 0.0)  # trained with the mask
    else:
      np.testing.assert_array_equal(s, w0)


def _events(directory):
  """(step, tag, value) of every scalar in a folder of TensorBoard event files."""
  from tensorboard.compat.proto import event_pb2
  out = []
  # events.out.tfevents.<time>.<host>.<pid>.<n>: in the order written, within one second too
  order = lambda name: (int(name.split(".")[3]), int(name.split(".")[-1]))
  for name in sorted(os.listdir(directory), key=order):
    with open(os.path.join(directory, name), "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):  # TFRecord: length, its crc, the record, its crc
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 16 + length
      out += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
      if event.HasField("session_log"):
        out.append((event.step, "session_log", event.session_log.status))
  return out


def test_every_run_writes_tensorboard_events_with_the_metrics_numbers(studied):
  cell = _cell(studied["workdir"], "pruned-w2to1-s0")
  lines = [json.loads(x) for x in open(os.path.join(cell, "metrics.jsonl"))]
  for stage in ("admm", "retrain"):
    events = _events(os.path.join(cell, "tensorboard", stage))
    tags = {tag for _, tag, _ in events}
    assert {"train/adversarial_loss", "train/adversarial_accuracy",
            "validation/natural_accuracy", "validation/adversarial_accuracy",
            "sparsity/fc1/kernel"} <= tags
    record = next(x for x in lines if x["stage"] == stage)
    assert record["train_steps"] and record["sparsity"]
    val = [v for step, tag, v in events if tag == "validation/adversarial_accuracy"]
    assert val == [pytest.approx(record["val_adversarial_accuracy"])]
  assert {"admm/rho", "admm/primal_residual/conv1/kernel",
          "admm/distance_to_sparse_set/conv1/kernel"} <= {
              t for _, t, _ in _events(os.path.join(cell, "tensorboard", "admm"))}
  assert os.listdir(os.path.join(_cell(studied["workdir"], "capacity-w1-s0"), "tensorboard")) \
      == ["pretrain"]


def test_a_resumed_stage_tells_tensorboard_to_drop_later_points(tmp_path):
  writers = tensorboard_log.StageWriters(str(tmp_path))
  writers.start("admm", 0)
  writers.scalars("admm", 10, {"admm/rho": 1.0})
  writers.close()
  writers.start("admm", 6)  # resumed from a checkpoint at step 6
  writers.scalars("admm", 8, {"admm/rho": 2.0})
  writers.close()
  assert _events(str(tmp_path / "admm")) == [
      (10, "admm/rho", 1.0), (6, "session_log", 1), (8, "admm/rho", 2.0)]


def test_plot_draws_a_runs_curves(studied, tmp_path):
  paths = plot.plot_run(_cell(studied["workdir"], "pruned-w2to1-s0"), str(tmp_path))
  assert [os.path.basename(p) for p in paths] == [
      "training.png", "validation.png", "admm.png", "sparsity.png"]
  for path in paths:
    with open(path, "rb") as f:
      assert f.read(4) == b"\x89PNG"


def test_plot_without_metrics_is_one_sentence(tmp_path):
  with pytest.raises(plot.PlotError, match="metrics.jsonl does not exist: pass the --workdir"):
    plot.plot_run(str(tmp_path))


@pytest.mark.parametrize("fields, message", [
    (dict(cells=""), "the study grid is empty: config.cells='' names no cell kind"),
    (dict(seeds=()), "the study grid is empty: config.seeds names nothing"),
    (dict(cells="capacity,speed"), "names an unknown cell kind 'speed'"),
    (dict(widths=(0, 2)), r"config.widths=\(0, 2\) is invalid: use integers >= 1"),
    (dict(target_widths=(2,)), "every target width must be below config.wide_width=2"),
    (dict(cells="schemes", schemes="irregular,rows"),
     "kind 'rows' for config.schemes/scheme_ratios is unknown"),
    (dict(cells="schemes", scheme_layers="conv9/kernel"),
     "cell scheme-irregular-r0.75-s0: config.sparsity: pattern 'conv9/kernel' matches no"),
    (dict(robust_eval="apgd-ce,pgd-9"), "config.robust_eval: .* unknown attack 'pgd-9'"),
    (dict(robust_eval_limit=-1), "config.robust_eval_limit=-1 is invalid"),
])
def test_bad_grid_is_one_sentence(fields, message):
  with pytest.raises(study.StudyError, match=message):
    study.plan(micro_study(**fields))


def test_model_that_cannot_take_a_width_is_one_sentence(monkeypatch):
  def narrow_only(name, width, *args, **kwargs):
    if width > 1:
      raise ValueError("too wide for this input")
    return get_model(name, width, *args, **kwargs)

  get_model = models.get_model
  monkeypatch.setattr(models, "get_model", narrow_only)
  with pytest.raises(study.StudyError, match="model 'lenet' cannot be built at width 2"):
    study.plan(micro_study())


def test_pruning_ratios_match_the_narrow_networks_count_layer_by_layer():
  shapes = {w: study._shapes(study._abstract_params(micro_study().run, w)) for w in (4, 1)}
  ratios = study.matched_ratios(shapes[4], shapes[1])
  assert set(ratios) == {"conv1/kernel", "conv2/kernel", "fc1/kernel", "fc2/kernel"}
  kept = sum(round((1 - r) * np.prod(shapes[4][p])) for p, r in ratios.items())
  biases = sum(np.prod(s) for p, s in shapes[4].items() if p.endswith("bias"))
  assert kept + biases == models.lenet_param_count(1)


@pytest.mark.parametrize("name, arg, count", [
    ("study_fashion_mnist", None, 38), ("study_fashion_mnist", "quick", 30),
    ("study_mnist", None, 60), ("study_cifar10", None, 57)])
def test_shipped_study_configs_plan_valid_cells(name, arg, count):
  config = study.load_config(os.path.join(ROOT, "configs", f"{name}.py"), arg)
  cells = study.plan(config)  # validates every cell's run config
  assert len(cells) == count and {c.kind for c in cells} == set(study.CELL_KINDS)
  assert len(config.seeds) >= (2 if name == "study_fashion_mnist" else 3)


def test_cli_exits_2_with_one_sentence_on_an_unknown_cell_kind(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "admm_jax.study",
       f"--config={os.path.join(ROOT, 'configs', 'study_fashion_mnist.py')}:quick",
       f"--workdir={tmp_path / 'w'}", "--config.cells=capacity,speed"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
  assert len(errors) == 1 and "unknown cell kind 'speed'" in errors[0]
  assert not (tmp_path / "w").exists()


def _made_up(kind, seed, adversarial, **labels):
  return {"name": f"{kind}-{labels}-s{seed}", "kind": kind, "seed": seed, **labels,
          "status": "finished", "error": None,
          "results": {"stage": "retrain", "natural_accuracy": adversarial + 0.2,
                      "adversarial_accuracy": adversarial, "nonzero_params": 1000,
                      "compression": {0.5: 2.0, 0.8: 4.7, 0.95: 15.9}.get(labels.get("ratio"), 1),
                      "wall_time_s": 1.0, "evaluation": "PGD-10 (made up)"}}


def test_scheme_table_and_plot(tmp_path):
  accuracies = {0.5: {"irregular": (0.7, 0.7), "column": (0.6, 0.6), "filter": (0.65, 0.65)},
                0.8: {"irregular": (0.6, 0.62), "column": (0.5, 0.52), "filter": (0.4, 0.41)},
                0.95: {"irregular": (0.55, 0.57), "column": (0.56, 0.5), "filter": (0.3, 0.31)}}
  cells = [_made_up("schemes", seed, acc[seed], width=4, scheme=scheme, ratio=ratio)
           for ratio, by_scheme in accuracies.items() for scheme, acc in by_scheme.items()
           for seed in (0, 1)] + [_made_up("capacity", s, 0.45, width=4) for s in (0, 1)]
  summary = {"config": {"run": {"data": {"name": "fashion_mnist"}, "model": {"name": "lenet"}},
                        "seeds": [0, 1]}, "cells": cells}
  text = open(study_report.write_report(summary, str(tmp_path))).read()
  head = "adversarial accuracy irregular ≥ column ≥ filter |"
  assert (f"| at 0.8 of every pruned layer removed: {head} irregular 61.0 ± 1.4 (n=2), 4.7x · "
          "column 51.0 ± 1.4 (n=2), 4.7x · filter 40.5 ± 0.7 (n=2), 4.7x | yes |") in text
  assert f"| at 0.95 of every pruned layer removed: {head}" in text
  rows = [x for x in text.splitlines() if x.startswith("| at ")]
  assert [x.rsplit("|", 2)[1].strip() for x in rows] == ["no", "yes", "within noise"]
  with open(tmp_path / "plots" / "schemes.png", "rb") as f:
    assert f.read(4) == b"\x89PNG"


def test_speedup_rows_compare_structured_schemes_with_irregular():
  def cell(scheme, ratio, seed, compact_s):
    c = _made_up("schemes", seed, 0.5, width=4, scheme=scheme, ratio=ratio)
    c["compaction"] = {"device": "cpu", "batch": 256, "latency_s": {"dense_masked": 1.0,
                                                                   "compact": compact_s},
                       "flops_per_example": {"dense": 100, "compact": 10}}
    return c
  times = {0.5: {"irregular": (1.0, 0.9), "column": (0.5, 0.45), "filter": (0.25, 0.3)},
           0.9: {"irregular": (0.5, 0.5), "column": (0.25, 0.3), "filter": (1.0, 0.9)}}
  cells = [cell(k, r, seed, t[seed]) for r, by in times.items() for k, t in by.items()
           for seed in (0, 1)]
  rows = study_report.speedup_rows(cells)
  assert [r[2] for r in rows] == ["yes", "no"]
  irregular = statistics.mean([1 / 1.0, 1 / 0.9])
  assert rows[0][1].startswith(f"irregular {irregular:.2f}x ± "
                               f"{statistics.stdev([1 / 1.0, 1 / 0.9]):.2f} (FLOPs 10.0x fewer)")
  assert "latency, batch 256, cpu" in rows[0][0]
  assert study_report.speedup_rows(cells[:0])[0][2] == "not measured"


def test_mean_and_spread_over_seeds():
  values = [0.61, 0.645, 0.7]
  stat = study_report.Stat.of(values)
  assert stat.text() == (f"{100 * statistics.mean(values):.1f} ± "
                         f"{100 * statistics.stdev(values):.1f} (n=3)")
  assert stat.minus(study_report.Stat.of([0.5])).text(sign=True) == (
      f"{100 * (statistics.mean(values) - 0.5):+.1f} ± {100 * statistics.stdev(values):.1f}")


def test_verdict_rule():
  a, b = study_report.Stat(0.70, 0.01, 2), study_report.Stat(0.60, 0.02, 2)
  assert study_report.verdict(a, b) == "yes" and study_report.verdict(b, a) == "no"
  assert study_report.verdict(a, study_report.Stat(0.69, 0.02, 2)) == "within noise"
  assert study_report.verdict(a, None) == "not measured"
