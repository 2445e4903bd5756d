"""Fault injection: every event ends with the uninterrupted run's numbers or one sentence.

One uninterrupted reference run (in-process, a tiny config: a few dozen steps) is shared by
the module; each fault runs on a copy of its workdir rewound to the stage concerned, so only
the tail of the run is redone. Events: a stop between a stage's output and its marker, a
busy or stale workdir lock, SIGTERM/SIGINT, damaged checkpoints and outputs, NaN weights, a
chance-level stage, a full disk.
"""
import contextlib
import errno
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

from admm_jax.app import checkpoint, configlib, reliability, reports, study, train, trainer
from admm_jax.app.errors import UserError
from tree_digest import tree_digest

pytestmark = pytest.mark.slow  # end to end: run by .ci/run after the default command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "fashion_mnist_lenet.py")
FMNIST = "/usr/share/datasets/fashion-mnist"
STAGES = ("pretrain", "admm", "retrain")
# The :tiny variant, smaller: 6 steps per epoch, plain training (PGD only in evaluation),
# checkpoints every 4 steps, 3 kept, one device (compiles faster). Steps: pretrain 6, admm
# 12, retrain 6.
OVERRIDES = {"data.limit_train": 192, "data.validation_size": 64, "data.limit_test": 64,
             "batch_size": 32, "eval_batch_size": 64, "log_every_steps": 4,
             "checkpoint_every_steps": 4, "max_checkpoints": 3, "parallel.data_axis": 1,
             "model.width": 2,
             "model.conv_impl": "xla", "attack.kind": "none", "attack.eval_steps": 1,
             "pretrain.epochs": 1, "pretrain.lr": 0.01, "admm.epochs": 2, "retrain.epochs": 1,
             "retrain.lr": 0.003, "sparsity": "conv2/kernel=irregular:0.5,fc1/kernel=irregular:0.8"}

if not os.path.isdir(FMNIST):
  if os.environ.get("CI") == "true":
    raise RuntimeError(f"{FMNIST} is missing under CI: .ci/run must install dataset-fashion-mnist")
  pytest.skip(allow_module_level=True, reason="Debian's dataset-fashion-mnist is not installed")


def _config(**extra):
  return configlib.override(study.load_config(CONFIG, "tiny"), {**OVERRIDES, **extra})

def _run(workdir, **extra):
  return trainer.train_and_evaluate(_config(**extra), str(workdir))


def _numbers(report):
  """What must not change: every stage's accuracies and steps, the sparsity, the warnings."""
  keys = ("natural_accuracy", "adversarial_accuracy", "steps", "val_natural_accuracy",
          "val_adversarial_accuracy", "warnings")
  return ({s: {k: rec.get(k) for k in keys} for s, rec in report["stages"].items()},
          report["sparsity"]["layers"], report["warnings"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("reference")
  report = _run(workdir)
  return workdir, report


def _rewound(reference, tmp_path, stage, keep_checkpoints=True):
  """A copy of the reference workdir as it was before `stage` finished (later stages gone)."""
  workdir = tmp_path / "run"
  shutil.copytree(reference[0], workdir)
  for later in STAGES[STAGES.index(stage):]:
    with contextlib.suppress(FileNotFoundError):
      os.remove(workdir / "outputs" / f"{later}.json")
    if later != stage:
      shutil.rmtree(workdir / "outputs" / later)
      shutil.rmtree(workdir / "checkpoints" / later)
  if not keep_checkpoints:
    shutil.rmtree(workdir / "checkpoints" / stage)
    shutil.rmtree(workdir / "outputs" / stage)
  return workdir




def _damage(step_dir, how):
  """Real damage to an orbax step directory."""
  data = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) if os.path.basename(r) == "d"
          for f in fs]
  assert data, step_dir
  if how == "truncated":
    for path in data:
      os.truncate(path, os.path.getsize(path) // 2)
  elif how == "metadata_deleted":  # the OCDBT manifest: the index of every array
    os.remove(os.path.join(step_dir, "default", "manifest.ocdbt"))
  elif how == "tree_metadata_deleted":  # orbax rebuilds it from the restore target
    os.remove(os.path.join(step_dir, "default", "_METADATA"))
    os.remove(os.path.join(step_dir, "_CHECKPOINT_METADATA"))
  else:  # random bytes over every data file
    rng = np.random.default_rng(0)
    for path in data:
      with open(path, "r+b") as f:
        f.write(rng.bytes(os.path.getsize(path)))


@contextlib.contextmanager
def _train_step_hook(hook):
  """Calls hook(call_index, state) -> state after every train step of the stages run."""
  real, calls = train.jit_train_step, [0]

  def patched(*args, **kwargs):
    step_fn = real(*args, **kwargs)

    def wrapped(state, batch, key):
      state, metrics = step_fn(state, batch, key)
      calls[0] += 1
      return hook(calls[0], state), metrics
    return wrapped
  train.jit_train_step = patched
  try:
    yield
  finally:
    train.jit_train_step = real


def test_reference_run_learns_and_leaves_no_lock(reference):
  workdir, report = reference
  assert report["warnings"] == []
  for rec in report["stages"].values():
    assert rec["natural_accuracy"] > 0.3 and rec["warnings"] == []
  assert not (workdir / reliability.LOCK_FILE).exists()


def test_stop_between_output_and_marker_resumes_and_stale_lock_is_taken_over(
    reference, tmp_path, caplog):
  """The issue's case: outputs/admm/0 on disk, outputs/admm.json not; a killed run's lock."""
  workdir = _rewound(reference, tmp_path, "admm")
  assert (workdir / "outputs" / "admm" / "0").is_dir()
  dead = subprocess.Popen(["true"])
  dead.wait()
  (workdir / reliability.LOCK_FILE).write_text(json.dumps(
      {"pid": dead.pid, "host": os.uname().nodename, "started": "earlier"}))
  with caplog.at_level(logging.INFO):
    report = _run(workdir)
  assert _numbers(report) == _numbers(reference[1])
  assert "taking over" in caplog.text and "replacing" not in caplog.text
  assert not (workdir / reliability.LOCK_FILE).exists()


def test_busy_workdir_is_one_sentence_and_touches_nothing(reference, tmp_path):
  workdir = tmp_path / "busy"
  shutil.copytree(reference[0], workdir)
  holder = {"pid": os.getppid(), "host": os.uname().nodename, "started": "now",
            "proc_start": reliability._process_start(os.getppid())}
  (workdir / reliability.LOCK_FILE).write_text(json.dumps(holder))
  before = tree_digest(workdir)
  with pytest.raises(reliability.WorkdirBusy) as e:
    _run(workdir)
  assert f"in use by pid {os.getppid()} on this host" in str(e.value)
  assert "\n" not in str(e.value) and e.value.exit_code == 2
  assert isinstance(e.value, UserError)
  assert tree_digest(workdir) == before


def test_damaged_stage_output_names_the_stage_then_is_rebuilt(reference, tmp_path, caplog):
  workdir = _rewound(reference, tmp_path, "retrain", keep_checkpoints=False)
  _damage(workdir / "outputs" / "admm" / "0", "random")
  with pytest.raises(checkpoint.CheckpointError, match="output of stage 'admm'.* is damaged"):
    _run(workdir)
  assert (workdir / "outputs" / "admm" / "0").is_dir()   # nothing deleted
  os.rename(workdir / "outputs" / "admm.json", tmp_path / "admm.json.aside")  # as told
  with caplog.at_level(logging.WARNING):
    report = _run(workdir)
  assert "replacing the unfinished output" in caplog.text
  assert _numbers(report) == _numbers(reference[1])


def test_damaged_stage_marker_is_one_sentence(reference, tmp_path):
  workdir = tmp_path / "marker"
  shutil.copytree(reference[0], workdir)
  (workdir / "outputs" / "retrain.json").write_text('{"natural_accu')
  with pytest.raises(reliability.RunStopped, match="retrain.json .* is damaged: move it aside"):
    _run(workdir)


@pytest.mark.parametrize("how", ["truncated", "metadata_deleted", "random",
                                 "tree_metadata_deleted"])
def test_corrupt_newest_checkpoint_falls_back_to_the_previous(reference, tmp_path, how):
  directory = tmp_path / "admm"
  shutil.copytree(reference[0] / "checkpoints" / "admm", directory)
  steps = sorted(int(p.name) for p in directory.iterdir())
  _damage(directory / str(steps[-1]), how)
  # The tree metadata is redundant given the restore target: that step still reads exactly.
  expected = steps[-1] if how == "tree_metadata_deleted" else steps[-2]
  with checkpoint.manager(reference[0] / "checkpoints" / "admm") as good:
    like = good.restore(expected)
  with checkpoint.manager(directory) as mngr:
    step, restored = checkpoint.restore_latest(mngr, like)
  assert step == expected
  jax.tree.map(np.testing.assert_array_equal, restored, like)
  assert (directory / str(steps[-1])).is_dir()  # the damaged one is left for inspection


def test_resume_past_a_corrupt_checkpoint_gives_the_same_numbers(reference, tmp_path, caplog):
  workdir = _rewound(reference, tmp_path, "admm")
  shutil.rmtree(workdir / "outputs" / "admm")
  newest = max(int(p.name) for p in (workdir / "checkpoints" / "admm").iterdir())
  _damage(workdir / "checkpoints" / "admm" / str(newest), "random")
  with caplog.at_level(logging.WARNING):
    report = _run(workdir)  # resumes from the step before, saves `newest` afresh
  assert f"checkpoint step {newest} in " in caplog.text and "is unreadable" in caplog.text
  assert _numbers(report) == _numbers(reference[1])


@pytest.mark.parametrize("stage,signum,at_call", [("admm", signal.SIGTERM, 5),
                                                  ("retrain", signal.SIGINT, 3)])
def test_signal_checkpoints_at_the_next_step_and_the_resumed_run_matches(
    reference, tmp_path, stage, signum, at_call):
  workdir = _rewound(reference, tmp_path, stage, keep_checkpoints=False)
  handler_before = signal.getsignal(signum)

  def send(call, state):
    if call == at_call:
      os.kill(os.getpid(), signum)
    return state
  with _train_step_hook(send), pytest.raises(reliability.Interrupted) as e:
    _run(workdir)
  assert e.value.exit_code == 128 + signum
  assert str(e.value) == (f"{signal.Signals(signum).name} received: {stage} stopped at step "
                          f"{at_call} with a checkpoint; run the same command again to resume.")
  assert signal.getsignal(signum) == handler_before
  with checkpoint.manager(workdir / "checkpoints" / stage) as mngr:
    assert mngr.latest_step() == at_call
  assert not (workdir / reliability.LOCK_FILE).exists()
  assert _numbers(_run(workdir)) == _numbers(reference[1])


def test_signal_after_a_stage_stops_before_the_next_stage_starts(reference, tmp_path,
                                                                 monkeypatch):
  workdir = tmp_path / "run"
  shutil.copytree(reference[0], workdir)
  real = trainer.run_stage

  def then_signal(ctx, name):
    record = real(ctx, name)
    if name == "pretrain":
      os.kill(os.getpid(), signal.SIGTERM)
    return record
  monkeypatch.setattr(trainer, "run_stage", then_signal)
  with pytest.raises(reliability.Interrupted) as e:
    _run(workdir)
  assert e.value.exit_code == 143
  assert str(e.value) == ("SIGTERM received: pretrain finished; the next stage had not started; "
                          "run the same command again to resume.")


def test_stop_flag_is_readable_from_any_thread_and_the_wakeup_fd_is_restored():
  """The attack's host callback runs on an XLA thread while the main thread waits in the
  computation: it reads the signal from the wakeup pipe, not from the Python handler."""
  before = signal.getsignal(signal.SIGTERM)
  with reliability.StopRequests().installed() as stops:
    assert reliability.stop_signalled() is None and stops.seen() is None
    seen = []
    os.kill(os.getpid(), signal.SIGTERM)
    thread = threading.Thread(target=lambda: seen.append(reliability.stop_signalled()))
    thread.start()
    thread.join()
    assert seen == [signal.SIGTERM] and stops.seen() == signal.SIGTERM
  assert reliability.stop_signalled() is None and signal.getsignal(signal.SIGTERM) == before
  assert signal.set_wakeup_fd(-1) == -1   # nothing left installed


def test_nan_weights_stop_within_a_logging_interval_and_nothing_nonfinite_is_saved(
    reference, tmp_path):
  workdir = _rewound(reference, tmp_path, "retrain", keep_checkpoints=False)
  poison = lambda call, state: state.replace(params=jax.tree.map(
      lambda x: x * np.nan, state.params)) if call >= 5 else state
  with _train_step_hook(poison), pytest.raises(reliability.Diverged) as e:
    _run(workdir)
  # step 5 went bad; the epoch ends at step 6 (before the next log at 8): stopped there
  assert str(e.value).startswith("retrain diverged at step 6 (the training loss is nan): "
                                 "lower retrain.lr (now 0.003)")
  assert "resumes from the last finite checkpoint (step 4)" in str(e.value)
  with checkpoint.manager(workdir / "checkpoints" / "retrain") as mngr:
    assert mngr.all_steps() == [4]
    saved = mngr.restore(4)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(saved["train"]))


def test_chance_level_stage_warns_in_log_report_and_summary(tmp_path, caplog):
  """The issue's case, in small: Adam at lr 10 learns nothing, and says so."""
  with caplog.at_level(logging.WARNING):
    report = _run(tmp_path / "chance", stages="pretrain", **{"pretrain.optimizer": "adam",
                                                              "pretrain.lr": 10.0})
  assert len(report["warnings"]) == 1
  warning = report["warnings"][0]
  assert warning.startswith("pretrain ended at chance level") and "pretrain.lr=10" in warning
  assert warning in caplog.text and f"warning: {warning}" in reports.summary(report)
  with open(tmp_path / "chance" / "report.json") as f:
    assert json.load(f)["warnings"] == [warning]


def test_chance_level_threshold():
  assert reliability.chance_level(0.11, 10, 2000) and reliability.chance_level(0.2, 10, 64)
  assert not reliability.chance_level(0.3, 10, 64) and not reliability.chance_level(0.14, 10,
                                                                                  10000)


@contextlib.contextmanager
def _full_disk(function, target):
  """os.`function` raises ENOSPC for paths containing `target`."""
  real = getattr(os, function)

  def failing(src, dst, *args, **kwargs):
    if target in str(dst):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
    return real(src, dst, *args, **kwargs)
  setattr(os, function, failing)
  try:
    yield
  finally:
    setattr(os, function, real)


def test_full_disk_during_a_checkpoint_is_one_sentence_and_keeps_the_previous(
    reference, tmp_path):
  workdir = _rewound(reference, tmp_path, "retrain", keep_checkpoints=False)
  with _full_disk("rename", os.path.join("retrain", "6")), \
       pytest.raises(reliability.DiskError) as e:
    _run(workdir)
  assert str(e.value).startswith("writing checkpoint step 6 to ")
  assert "(No space left on device" in str(e.value) and "\n" not in str(e.value)
  with checkpoint.manager(workdir / "checkpoints" / "retrain") as mngr:
    assert mngr.all_steps() == [4] and mngr.restore(4) is not None
  assert _numbers(_run(workdir)) == _numbers(reference[1])


def test_full_disk_writing_the_report_is_one_sentence_and_keeps_the_old_one(
    reference, tmp_path):
  workdir = tmp_path / "full"
  shutil.copytree(reference[0], workdir)
  before = (workdir / "report.json").read_text()
  with _full_disk("replace", "report.json"), pytest.raises(reliability.DiskError) as e:
    _run(workdir)
  assert str(e.value).startswith(f"writing {workdir / 'report.json'} failed (No space left")
  assert (workdir / "report.json").read_text() == before
  assert not [p for p in os.listdir(workdir) if ".tmp" in p]


def test_sigterm_from_outside_saves_says_how_to_resume_and_exits_143(reference, tmp_path):
  """The command line under a real SIGTERM (a preempted VM): one line, exit 143."""
  workdir = tmp_path / "preempted"
  flags = [f"--config.{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
           for k, v in OVERRIDES.items()]
  proc = subprocess.Popen([sys.executable, "-m", "admm_jax.main", f"--config={CONFIG}:tiny",
                           *flags, f"--workdir={workdir}"], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 300
    while not (workdir / "checkpoints" / "pretrain" / "4").is_dir():
      assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
      time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 143, stderr[-2000:]
  lines = [x for x in stderr.splitlines() if "SIGTERM received" in x]
  assert len(lines) == 1 and lines[0].endswith("run the same command again to resume.")
  assert "Traceback" not in stderr and not (workdir / reliability.LOCK_FILE).exists()
