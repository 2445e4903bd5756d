"""admm_jax.evaluate: files and fields, --limit, resume, cascades, sanity checks, bad input.

One tiny run (pretrain only, LeNet w=1, 256 examples, one epoch) with the trainer's hook on,
then in-process evaluations with cheap members (pgd, fgsm) at batch 8 (8 forced devices).
"""
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from admm_jax import attacks
from admm_jax.app import configlib, evaluate, reliability, reports, train, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "fashion_mnist_lenet.py")
FMNIST = "/usr/share/datasets/fashion-mnist"
BATCH = 8

if not os.path.isdir(FMNIST):
  if os.environ.get("CI") == "true":
    raise RuntimeError(f"{FMNIST} is missing under CI: .ci/run must install dataset-fashion-mnist")
  pytest.skip(allow_module_level=True, reason="Debian's dataset-fashion-mnist is not installed")


def _tiny_config():
  import importlib.util
  spec = importlib.util.spec_from_file_location("fmnist_config", CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("tiny")
  c.stages = "pretrain"
  c.data.update(limit_train=256, validation_size=32, limit_test=40)
  c.model.width = 1
  c.pretrain.epochs = 1
  c.batch_size, c.eval_batch_size = 32, BATCH
  # the attack and batch the tests use: one compilation serves the hook and the tests
  c.eval.update(final_attack="pgd,fgsm", final_limit=24, sanity_limit=0)
  return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(workdir, report, ctx) of a finished tiny run with eval.final_attack='pgd,fgsm'."""
  workdir = str(tmp_path_factory.mktemp("run"))
  report = trainer.train_and_evaluate(_tiny_config(), workdir)
  ctx = trainer.make_context(evaluate.run_config(workdir), workdir)
  return workdir, report, ctx


def _evaluate(ctx, **kw):
  kw = {"attack": "pgd,fgsm", "batch_size": BATCH, "sanity": False, **kw}
  return evaluate.evaluate_stage(ctx, "pretrain", **kw)


def _robust(workdir, label="pgd+fgsm"):
  return np.load(os.path.join(workdir, "evaluation", f"pretrain_{label}_robust.npy"))


def test_pipeline_hook_adds_the_stage_accuracy_to_report_and_summary(run):
  workdir, report, _ = run
  rec = report["stages"]["pretrain"]
  assert rec["final_attack"] == "pgd+fgsm" and rec["pgd+fgsm_examples"] == 24
  with open(os.path.join(workdir, "evaluation", "pretrain_pgd+fgsm.json")) as f:
    saved = json.load(f)
  assert saved["robust_accuracy"] == rec["pgd+fgsm_accuracy"] and saved["examples"] == 24
  assert saved["sanity"] == {} and rec["pgd+fgsm_sanity_failed"] == []
  assert rec["pgd+fgsm_accuracy"] <= saved["clean_accuracy"]
  assert "pgd+fgsm (admm_jax.evaluate): robust" in reports.summary(report)


def test_writes_json_and_robust_vector_with_every_field(run):
  workdir, _, ctx = run
  record = _evaluate(ctx, limit=20, sanity=True, sanity_limit=BATCH)
  with open(os.path.join(workdir, "evaluation", "pretrain_pgd+fgsm.json")) as f:
    saved = json.load(f)
  assert saved == record
  for field in ("stage", "attack", "norm", "eps", "examples", "clean_accuracy",
                "robust_accuracy", "per_attack", "sanity", "wall_time_s"):
    assert field in saved
  assert saved["eps"] == 0.1 and saved["examples"] == 20 and saved["norm"] == "linf"
  assert list(saved["per_attack"]) == ["pgd", "fgsm"]
  assert saved["per_attack"]["pgd"] >= saved["per_attack"]["fgsm"] == saved["robust_accuracy"]
  robust = _robust(workdir)
  assert robust.dtype == bool and robust.shape == (20,)
  assert robust.mean() == pytest.approx(saved["robust_accuracy"])
  assert set(saved["sanity"]) == {"eps_monotone", "large_eps_near_zero",
                                  "pgd_not_weaker_than_fgsm"}
  for check in saved["sanity"].values():
    assert isinstance(check["ok"], bool) and check["meaning"] and check["examples"] == BATCH
  assert saved["sanity"]["eps_monotone"]["eps"] == [0.05, 0.1, 0.2]


def _clean_predictions(ctx, n):
  model, params, batch_stats = evaluate._load_variables(ctx, "pretrain")
  images, labels = ctx.dataset.test.arrays()
  x = images[:n].astype(np.float32) / 255.0
  logits = train.logits_fn(model, batch_stats, train=False)(params, x)
  return np.asarray(np.argmax(logits, -1) == labels[:n])


def test_limit_takes_the_first_examples_in_split_order(run):
  workdir, _, ctx = run
  short = _evaluate(ctx, limit=12)
  robust12 = _robust(workdir)
  long = _evaluate(ctx, limit=20)
  robust20 = _robust(workdir)
  assert short["examples"] == 12 and robust12.shape == (12,) and robust20.shape == (20,)
  # batch 0 is the same, batch 1's first 4 rows are the same (padding changes nothing)
  np.testing.assert_array_equal(robust12, robust20[:12])
  clean = _clean_predictions(ctx, 20)
  assert long["clean_accuracy"] == pytest.approx(clean.mean())
  assert short["clean_accuracy"] == pytest.approx(clean[:12].mean())
  assert not np.any(robust20 & ~clean)  # robust implies correct without attack


def test_resume_after_an_interrupted_evaluation_gives_the_same_result(run):
  workdir, _, ctx = run
  full = _evaluate(ctx, limit=24)
  robust = _robust(workdir)
  folder = os.path.join(workdir, "evaluation", "partial", "pretrain_pgd+fgsm")
  batches = sorted(f for f in os.listdir(folder) if f.startswith("batch_"))
  assert len(batches) == 3
  # killed during batch 2: batches 0 and 1 saved, no result files
  os.remove(os.path.join(folder, batches[2]))
  for suffix in (".json", "_robust.npy"):
    os.remove(os.path.join(workdir, "evaluation", "pretrain_pgd+fgsm" + suffix))
  stamps = [os.stat(os.path.join(folder, b)).st_mtime_ns for b in batches[:2]]
  resumed = _evaluate(ctx, limit=24)
  assert [os.stat(os.path.join(folder, b)).st_mtime_ns for b in batches[:2]] == stamps
  np.testing.assert_array_equal(_robust(workdir), robust)
  for k in ("clean_accuracy", "robust_accuracy", "per_attack"):
    assert resumed[k] == full[k]


def test_cascade_robust_vector_is_the_and_of_its_members(run):
  """Each member run alone on each batch, with the keys the evaluation gives it."""
  workdir, _, ctx = run
  _evaluate(ctx, limit=16)
  cascade = _robust(workdir)
  model, params, batch_stats = evaluate._load_variables(ctx, "pretrain")
  apply_fn = train.logits_fn(model, batch_stats, train=False)
  images, labels = ctx.dataset.test.arrays()
  key = ctx.key("evaluate", "pretrain", "pgd+fgsm")
  members = []
  for j, name in enumerate(("pgd", "fgsm")):
    attack = jax.jit(lambda x, y, k, name=name: attacks.by_name(name)(
        apply_fn, params, x, y, k, eps=0.1, norm="linf"))
    alone = []
    for i in range(2):
      x = images[i * BATCH:(i + 1) * BATCH].astype(np.float32) / 255.0
      y = labels[i * BATCH:(i + 1) * BATCH]
      x_adv = attack(x, y, jax.random.fold_in(jax.random.fold_in(key, i), j))
      alone.append(np.asarray(np.argmax(apply_fn(params, x_adv), -1) == y))
    members.append(np.concatenate(alone))
  np.testing.assert_array_equal(cascade, members[0] & members[1])


def test_square_check_counts_examples_only_square_breaks():
  names = ("apgd-ce", "square")
  # 0: robust, 1: broken by apgd-ce, 2, 3: broken by square, 4: clean misclassified
  result = {"robust": np.array([1, 0, 0, 0, 0], bool),
            "broken_by": np.array([-2, 0, 1, 1, -1], np.int32)}
  check = evaluate.square_check(names, result)
  assert check["square_only_broken"] == 2 and check["attacked_by_square"] == 3
  assert check["ok"] is False
  result["broken_by"][2:4] = 0
  assert evaluate.square_check(names, result)["ok"] is True
  assert evaluate.square_check(("square",), result) is None
  assert evaluate.square_check(("pgd", "fgsm"), result) is None


def test_parse_attack_accepts_autoattack_single_names_and_cascades():
  assert evaluate.parse_attack("autoattack") == (attacks.STANDARD_NAMES, "autoattack")
  assert evaluate.parse_attack("apgd-t") == (("apgd-t",), "apgd-t")
  assert evaluate.parse_attack("apgd-ce,apgd-t") == (("apgd-ce", "apgd-t"), "apgd-ce+apgd-t")


@pytest.mark.parametrize("kwargs, message", [
    ({"attack": "apgd-xx"}, "names an unknown attack 'apgd-xx'"),
    ({"attack": "pgd,,fgsm"}, "names an unknown attack ''"),
    ({"eps": 1.5}, "--eps=1.5 is out of range for the linf norm"),
    ({"eps": 0.0}, "--eps=0.0 is out of range"),
    ({"stage": "retrain"}, "stage 'retrain' has not finished"),
    ({"stage": "bogus"}, "--stage='bogus' is unknown"),
])
def test_bad_input_is_one_sentence(run, kwargs, message):
  workdir = run[0]
  kwargs = {"stage": "pretrain", **kwargs}
  with pytest.raises(evaluate.EvaluationError, match=message.replace("(", r"\(")) as e:
    evaluate.evaluate_workdir(workdir, **kwargs)
  assert "\n" not in str(e.value) and str(e.value).endswith(".")


def test_workdir_without_a_run_is_one_sentence(tmp_path):
  with pytest.raises(evaluate.EvaluationError, match="holds no run"):
    evaluate.evaluate_workdir(str(tmp_path))
  with pytest.raises(evaluate.EvaluationError, match="does not exist"):
    evaluate.evaluate_workdir(str(tmp_path / "missing"))


def test_config_rejects_an_unknown_final_attack():
  config = configlib.base_config()
  config.eval.final_attack = "apgd-ce,bogus"
  with pytest.raises(configlib.ConfigError, match="config.eval.final_attack"):
    configlib.validate(config)
  config.eval.final_attack = "apgd-ce,apgd-t"
  configlib.validate(config)


def test_cli_exits_2_with_one_line_on_a_workdir_without_a_run(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "admm_jax.evaluate", f"--workdir={tmp_path}"],
                        capture_output=True, text=True, timeout=120, cwd=ROOT)
  assert proc.returncode == 2
  lines = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
  assert len(lines) == 1 and "holds no run" in lines[0]



# ------------------------------------------------------------ prompt stops (slow tier)
# APGD-T (9 targets x 100 steps) on 3 batches of 8: long enough per batch that a signal sent
# once batch 1 is saved lands inside batch 2's attack.
STOP_BOUND_S = 30   # the aim on a 2-core CPU (a Cloud TPU preemption gives ~30 s)


def _hook_config():
  c = _tiny_config()
  c.eval.update(final_attack="apgd-t", final_limit=24)  # eval.*: allowed on a finished workdir
  return c


@pytest.fixture(scope="module")
def clean_apgd_t(run, tmp_path_factory):
  """The hook's APGD-T evaluation run to the end on a copy of the run: (record, robust)."""
  workdir = tmp_path_factory.mktemp("clean") / "w"
  shutil.copytree(run[0], workdir)
  report = trainer.train_and_evaluate(_hook_config(), str(workdir))
  return report["stages"]["pretrain"], _robust(str(workdir), "apgd-t")


def _signal_when(path, signum, pid=None, timeout=600):
  """Sends `signum` to `pid` (default: this process) once `path` exists (not at all after
  `timeout` s); returns the thread and {"t": the sending time}."""
  sent = {}

  def watch():
    deadline = time.time() + timeout
    while not os.path.exists(path):
      if time.time() > deadline:
        return  # never a late signal into the test process
      time.sleep(0.01)
    sent["t"] = time.time()
    os.kill(pid or os.getpid(), signum)
  thread = threading.Thread(target=watch, daemon=True)
  thread.start()
  return thread, sent


def _partial(workdir):
  return os.path.join(workdir, "evaluation", "partial", "pretrain_apgd-t")


@pytest.mark.slow
def test_sigterm_during_the_evaluation_hook_stops_within_seconds_and_resumes_to_the_same_numbers(
    run, clean_apgd_t, tmp_path, caplog):
  workdir = str(tmp_path / "w")
  shutil.copytree(run[0], workdir)
  thread, sent = _signal_when(os.path.join(_partial(workdir), "batch_000000.npz"),
                              signal.SIGTERM)
  with pytest.raises(reliability.Interrupted) as e:
    trainer.train_and_evaluate(_hook_config(), workdir)
  stopped = time.time() - sent["t"]
  thread.join()
  print(f"stopped {stopped:.2f} s after SIGTERM")  # shown with -s
  assert stopped < STOP_BOUND_S, stopped
  assert e.value.exit_code == 143
  assert str(e.value) == (f"SIGTERM received: evaluate pretrain apgd-t stopped at batch 2/3, the "
                          f"1 finished batches kept in {_partial(workdir)}; run the same command "
                          "again to resume.")
  assert sorted(f for f in os.listdir(_partial(workdir)) if f.startswith("batch_")) == \
      ["batch_000000.npz"]   # the batch the signal cut short is not kept
  assert not os.path.exists(os.path.join(workdir, reliability.LOCK_FILE))
  caplog.set_level(logging.INFO)
  resumed = trainer.train_and_evaluate(_hook_config(), workdir)["stages"]["pretrain"]
  assert "evaluate pretrain apgd-t: batch 2/3, 16/24 examples" in caplog.text  # 1 read back
  record, robust = clean_apgd_t
  assert resumed["apgd-t_accuracy"] == record["apgd-t_accuracy"]
  np.testing.assert_array_equal(_robust(workdir, "apgd-t"), robust)


@pytest.mark.slow
def test_sigterm_during_python_m_evaluate_exits_143_keeps_batches_and_resumes(run, clean_apgd_t,
                                                                            tmp_path):
  workdir = str(tmp_path / "w")
  shutil.copytree(run[0], workdir)
  command = [sys.executable, "-m", "admm_jax.evaluate", f"--workdir={workdir}",
             "--stage=pretrain", "--attack=apgd-t", "--limit=24", f"--batch_size={BATCH}",
             "--no_sanity"]
  proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  try:
    thread, sent = _signal_when(os.path.join(_partial(workdir), "batch_000000.npz"),
                                signal.SIGTERM, pid=proc.pid)
    _, stderr = proc.communicate(timeout=600)
    stopped = time.time() - sent["t"]
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 143, stderr[-2000:]
  print(f"stopped {stopped:.2f} s after SIGTERM")  # shown with -s
  assert stopped < STOP_BOUND_S, stopped
  lines = [x for x in stderr.splitlines() if "SIGTERM received" in x]
  assert lines == [f"SIGTERM received: evaluate pretrain apgd-t stopped at batch 2/3, the 1 "
                   f"finished batches kept in {_partial(workdir)}; run the same command again "
                   "to resume."], stderr[-2000:]
  assert "Traceback" not in stderr
  # The rerun, in this process (the compiled attack is reused): what the command runs.
  again = evaluate.evaluate_workdir(workdir, "pretrain", attack="apgd-t", limit=24,
                                    batch_size=BATCH, sanity=False)
  record, robust = clean_apgd_t
  assert again["robust_accuracy"] == record["apgd-t_accuracy"]
  np.testing.assert_array_equal(_robust(workdir, "apgd-t"), robust)
