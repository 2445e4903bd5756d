"""launch/: the printed commands of --dry-run, and one-sentence errors for bad flags.

Nothing here talks to Google Cloud: every call is --dry-run, and the one test of the real
path runs with a PATH that holds no gcloud.
"""
import os
import shlex
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_VM = os.path.join(ROOT, "launch", "tpu_vm.sh")
LOCAL_GPUS = os.path.join(ROOT, "launch", "local_gpus.sh")
BASH = shutil.which("bash")
CONFIG = "configs/fashion_mnist_lenet.py"


def _run(script, *args, env=None):
  return subprocess.run([BASH, script, *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=30, env=env)


def _commands(stdout: str) -> list[list[str]]:
  """The printed commands as argument lists (comment lines and shell operators dropped)."""
  out = []
  for line in stdout.splitlines():
    if line and not line.startswith("#"):
      out.append([w for w in shlex.split(line) if w not in ("&", "2>&1")])
  return out


def _steps(stdout: str) -> dict[str, list[list[str]]]:
  steps, current = {}, None
  for line in stdout.splitlines():
    if line.startswith("# "):
      current = line[2:]
      steps[current] = []
    elif line:
      steps[current].append(shlex.split(line))
  return steps


def _flag(cmd: list[str], name: str) -> str:
  values = [w.split("=", 1)[1] for w in cmd if w.startswith(name + "=")]
  assert len(values) == 1, (name, cmd)
  return values[0]


# ------------------------------------------------------------------------ tpu_vm.sh

TPU_ARGS = ["--name=admm-test", "--zone=us-central2-b", "--accelerator-type=v4-32",
            "--version=tpu-ubuntu2204-base", "--project=my-project", f"--config={CONFIG}:tiny",
            "--workdir=/mnt/shared/run1", "--out=reports/run1", "--dry-run", "--",
            "--config.model.width=8",
            "--config.sparsity=conv1/kernel=filter:0.5,fc1/kernel=irregular:0.9"]


def test_tpu_vm_dry_run_prints_create_install_run_fetch_delete():
  proc = _run(TPU_VM, *TPU_ARGS)
  assert proc.returncode == 0, proc.stderr
  steps = _steps(proc.stdout)
  assert list(steps) == ["create", "install", "run", "fetch", "delete"]
  where = ["--zone=us-central2-b", "--project=my-project"]
  gcloud = ["gcloud", "compute", "tpus", "tpu-vm"]

  (create,) = steps["create"]
  assert create == gcloud + ["create", "admm-test", *where, "--accelerator-type=v4-32",
                             "--version=tpu-ubuntu2204-base"]

  tar, copy, install = steps["install"]
  assert tar[:2] == ["tar", "-czf"] and {"admm_jax", "configs", "pyproject.toml"} <= set(tar)
  assert copy == gcloud + ["scp", tar[2], "admm-test:admm_jax.tar.gz", *where, "--worker=all"]
  assert install[:5] == gcloud + ["ssh"] and install[5] == "admm-test" and "--worker=all" in install
  remote = _flag(install, "--command")
  assert "tar -xzf admm_jax.tar.gz" in remote
  assert "apt-get install -y -q dataset-fashion-mnist" in remote
  assert "pip install -q \"./admm_jax_src[tpu]\"" in remote

  (run,) = steps["run"]
  assert run[:6] == gcloud + ["ssh", "admm-test"] and "--worker=all" in run
  assert all(w in run for w in where)
  remote = shlex.split(_flag(run, "--command"))
  main = remote[remote.index("-m") - 1:]
  assert main == ["../admm_jax_venv/bin/python", "-m", "admm_jax.main", f"--config={CONFIG}:tiny",
                  "--config.parallel.distributed=True", "--workdir=/mnt/shared/run1",
                  "--config.model.width=8",
                  "--config.sparsity=conv1/kernel=filter:0.5,fc1/kernel=irregular:0.9"]
  assert remote[:4] == ["set", "-e;", "cd", "admm_jax_src;"]

  mkdir, fetch = steps["fetch"]
  assert mkdir == ["mkdir", "-p", "reports/run1"]
  assert fetch == gcloud + ["scp", "admm-test:/mnt/shared/run1/report.json",
                            "admm-test:/mnt/shared/run1/metrics.jsonl", "reports/run1/", *where,
                            "--worker=0"]

  assert steps["delete"] == [gcloud + ["delete", "admm-test", *where, "--quiet"]]


def test_tpu_vm_defaults_relative_workdir_and_spot():
  proc = _run(TPU_VM, "--name=t1", "--zone=europe-west4-a", f"--config={CONFIG}", "--spot",
              "--dry-run")
  assert proc.returncode == 0, proc.stderr
  steps = _steps(proc.stdout)
  (create,) = steps["create"]
  assert "--accelerator-type=v4-8" in create and "--spot" in create
  assert not any(w.startswith("--project") for w in create)
  assert "--workdir=runs/t1" in _flag(steps["run"][0], "--command")
  assert "t1:admm_jax_src/runs/t1/report.json" in steps["fetch"][1]
  assert steps["fetch"][0] == ["mkdir", "-p", "tpu_runs/t1"]


@pytest.mark.parametrize("extra,expected", [
    (["--steps=run,fetch"], ["run", "fetch"]),
    (["--steps=create,install"], ["create", "install"]),
    (["--keep"], ["create", "install", "run", "fetch"]),
    (["--steps=delete"], ["delete"]),
])
def test_tpu_vm_steps_and_keep_choose_what_runs(extra, expected):
  proc = _run(TPU_VM, "--name=t2", "--zone=z1-a", f"--config={CONFIG}", "--dry-run", *extra)
  assert proc.returncode == 0, proc.stderr
  assert list(_steps(proc.stdout)) == expected


def test_tpu_vm_multi_host_slice_with_local_workdir_warns():
  proc = _run(TPU_VM, "--name=t3", "--zone=z1-a", f"--config={CONFIG}", "--accelerator-type=v4-32",
              "--dry-run")
  assert proc.returncode == 0 and "several workers" in proc.stderr
  proc = _run(TPU_VM, "--name=t3", "--zone=z1-a", f"--config={CONFIG}", "--dry-run")
  assert proc.returncode == 0 and proc.stderr == ""


@pytest.mark.parametrize("args,message", [
    (["--zone=z", f"--config={CONFIG}"], "--name is required"),
    (["--name=Bad_Name", "--zone=z", f"--config={CONFIG}"],
     "--name='Bad_Name' is not a valid TPU name"),
    (["--name=t", f"--config={CONFIG}"], "--zone is required"),
    (["--name=t", "--zone=z"], "--config is required"),
    (["--name=t", "--zone=z", "--config=configs/nope.py"], "configs/nope.py is not a file"),
    (["--name=t", "--zone=z", f"--config={CONFIG}", "--accelerator-type=v4"],
     "--accelerator-type='v4' is not TYPE-SIZE"),
    (["--name=t", "--zone=z", f"--config={CONFIG}", "--steps=create,launch"],
     "unknown step 'launch'"),
    (["--name=t", "--zone=z", f"--config={CONFIG}", "--zone", "z2"], "unknown argument '--zone'"),
    (["--name=t", "--zone=z", f"--config={CONFIG}", "--", "model.width=3"],
     "override 'model.width=3' after -- is not a --config.FIELD=VALUE flag"),
])
def test_tpu_vm_bad_flags_are_one_sentence_exit_2(args, message):
  proc = _run(TPU_VM, *args, "--dry-run")
  assert proc.returncode == 2 and proc.stdout == ""
  assert proc.stderr.startswith("error: ") and message in proc.stderr, proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1


def test_tpu_vm_without_gcloud_says_so_and_runs_nothing(tmp_path):
  os.symlink(shutil.which("dirname"), tmp_path / "dirname")  # PATH with no gcloud at all
  proc = _run(TPU_VM, "--name=t", "--zone=z", f"--config={CONFIG}", env={"PATH": str(tmp_path)})
  assert proc.returncode == 2 and "gcloud is not installed" in proc.stderr
  assert proc.stdout == ""


@pytest.mark.parametrize("script", [TPU_VM, LOCAL_GPUS])
def test_help_describes_dry_run(script):
  proc = _run(script, "--help")
  assert proc.returncode == 0 and proc.stdout.startswith("Usage: ") and "--dry-run" in proc.stdout


# --------------------------------------------------------------------- local_gpus.sh


def test_local_gpus_one_process_drives_all_gpus():
  proc = _run(LOCAL_GPUS, f"--config={CONFIG}", "--dry-run")
  assert proc.returncode == 0, proc.stderr
  assert _commands(proc.stdout) == [["python3", "-m", "admm_jax.main", f"--config={CONFIG}",
                                     "--workdir=runs/local_gpus"]]
  proc = _run(LOCAL_GPUS, f"--config={CONFIG}", "--gpus=0,1,2,3", "--python=/opt/venv/bin/python",
              "--workdir=/tmp/r", "--dry-run", "--", "--config.batch_size=256")
  assert _commands(proc.stdout) == [["env", "CUDA_VISIBLE_DEVICES=0,1,2,3", "/opt/venv/bin/python",
                                     "-m", "admm_jax.main", f"--config={CONFIG}",
                                     "--workdir=/tmp/r", "--config.batch_size=256"]]


def test_local_gpus_processes_split_gpus_and_share_one_coordinator():
  proc = _run(LOCAL_GPUS, f"--config={CONFIG}", "--gpus=0,1,2,3", "--processes=2", "--port=23456",
              "--workdir=/tmp/r", "--dry-run")
  assert proc.returncode == 0, proc.stderr
  mkdir, *procs, wait = _commands(proc.stdout)
  assert mkdir == ["mkdir", "-p", "/tmp/r"] and wait == ["wait"] and len(procs) == 2
  assert proc.stdout.splitlines()[1].endswith(" &")       # all processes run at once
  for i, (cmd, gpus) in enumerate(zip(procs, ("0,1", "2,3"))):
    assert cmd[:2] == ["env", f"CUDA_VISIBLE_DEVICES={gpus}"]
    assert cmd[2:5] == ["python3", "-m", "admm_jax.main"]
    assert {"--config.parallel.distributed=True",
            "--config.parallel.coordinator_address=127.0.0.1:23456",
            "--config.parallel.num_processes=2", f"--config.parallel.process_id={i}"} <= set(cmd)
  assert procs[1][-2:] == [">", "/tmp/r/process1.log"]


def test_local_gpus_cpu_rehearsal_forces_host_devices():
  proc = _run(LOCAL_GPUS, f"--config={CONFIG}", "--cpu-devices=4", "--processes=2", "--dry-run")
  assert proc.returncode == 0, proc.stderr
  for cmd in _commands(proc.stdout)[1:3]:
    assert cmd[:3] == ["env", "JAX_PLATFORMS=cpu",
                       "XLA_FLAGS=--xla_force_host_platform_device_count=4"]


@pytest.mark.parametrize("args,message", [
    ([], "--config is required"),
    (["--config=configs/nope.py"], "configs/nope.py is not a file"),
    ([f"--config={CONFIG}", "--gpus=0,1,2", "--processes=2"],
     "--processes=2 does not divide the 3 GPUs"),
    ([f"--config={CONFIG}", "--processes=0"], "--processes='0' must be a positive integer"),
    ([f"--config={CONFIG}", "--gpus=a,b"], "--gpus='a,b' is not a comma-separated list"),
    ([f"--config={CONFIG}", "--port=99999"], "--port='99999' must be a port number"),
    ([f"--config={CONFIG}", "--gpus=0", "--cpu-devices=2"], "exclude each other"),
    ([f"--config={CONFIG}", "--frob"], "unknown argument '--frob'"),
    ([f"--config={CONFIG}", "--", "--workdir=x"], "override '--workdir=x' after -- is not"),
])
def test_local_gpus_bad_flags_are_one_sentence_exit_2(args, message):
  proc = _run(LOCAL_GPUS, *args, "--dry-run")
  assert proc.returncode == 2 and proc.stdout == ""
  assert proc.stderr.startswith("error: ") and message in proc.stderr, proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1
