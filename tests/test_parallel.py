"""Data parallelism: mesh and shardings, a sharded step == one device, 2 processes == 1.

The tests run on the 8 host devices forced in conftest.py. The end-to-end test starts
subprocesses: a 2-process jax.distributed run over localhost (tests/multiprocess_worker.py)
against a one-process run of the same batches. The whole trainer on 8 devices against 1
device is test_trainer's.
"""
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from admm_jax import models, sparsity, transforms
from admm_jax.app import parallel, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "multiprocess_worker.py")


def _env(devices: int, **extra: str) -> dict[str, str]:
  """The child's environment: its own device count (conftest's 8 would be inherited)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  env.update(extra)
  return env


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _wait_all(procs: list[subprocess.Popen], timeout: float) -> list[str]:
  """Waits for every process; on a failure or a timeout kills the rest and raises."""
  outputs = []
  try:
    for proc in procs:
      out, _ = proc.communicate(timeout=timeout)
      outputs.append(out)
      if proc.returncode != 0:
        raise AssertionError(f"{proc.args} failed ({proc.returncode}):\n{out[-4000:]}")
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  return outputs


# ------------------------------------------------------------------------ the mesh


@pytest.mark.parametrize("data_axis,size", [(0, 8), (1, 1), (4, 4)])
def test_mesh_has_one_named_data_axis_over_the_requested_devices(data_axis, size):
  rt = parallel.make_runtime(data_axis)
  assert rt.mesh.axis_names == ("data",) and rt.mesh.shape["data"] == size
  assert rt.num_devices == size and rt.describe()["count"] == size
  assert rt.replicated.spec == P() and rt.data.spec == P("data")


def test_data_axis_larger_than_the_devices_is_one_sentence():
  with pytest.raises(ValueError, match=r"data_axis=9 asks for more devices than the 8 available"):
    parallel.make_runtime(9)


@pytest.mark.parametrize("batch", [60, 4, 12])
def test_batch_that_does_not_divide_by_the_devices_names_both_numbers(batch):
  rt = parallel.make_runtime(8)
  with pytest.raises(parallel.ParallelError) as e:
    rt.check_batch(batch)
  assert f"config.batch_size={batch} does not divide by the 8 devices" in str(e.value)
  rt.check_batch(64)
  parallel.make_runtime(4).check_batch(12)


def test_global_batch_gives_each_device_a_contiguous_block_of_rows():
  rt = parallel.make_runtime(8)
  batch = rt.global_batch({"image": np.arange(64 * 2, dtype=np.float32).reshape(64, 2),
                           "label": np.arange(64, dtype=np.int32)})
  assert batch["label"].shape == (64,) and batch["image"].shape == (64, 2)
  assert batch["label"].sharding == rt.data
  for shard in batch["label"].addressable_shards:
    rows = np.asarray(shard.data)
    assert len(rows) == 8 and np.array_equal(rows, np.arange(rows[0], rows[0] + 8))
  assert rt.mesh.devices.flat[0] == batch["label"].addressable_shards[0].device


def test_initialize_distributed_rejects_inconsistent_processes_before_starting(monkeypatch):
  with pytest.raises(ValueError, match=r"process_id=5 must lie in \[0, .*num_processes=2\)"):
    parallel.initialize_distributed("127.0.0.1:1", 2, 5)
  with pytest.raises(ValueError, match="needs config.parallel.num_processes"):
    parallel.initialize_distributed("127.0.0.1:1")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two' is not an integer"):
    parallel.initialize_distributed()
  assert not jax.distributed.is_initialized()


def test_one_process_helpers_are_identity():
  tree = {"a": np.ones(3, np.float32), "b": np.int32(2)}
  assert parallel.broadcast_from_writer(tree) is tree
  parallel.sync("nothing to wait for")
  assert parallel.make_runtime(0).is_writer and parallel.is_writer()


# -------------------------------------------------------------- sharded == single device


def _admm_setup():
  model = models.get_model("lenet", 1, conv_impl="auto")  # the CLI's CPU kernels
  spec = sparsity.spec({"conv2/kernel": ("irregular", 0.5), "fc1/kernel": ("irregular", 0.8)})
  tx = optax.chain(transforms.admm(spec, rho=1e-2, update_every=2, rho_growth=1.5),
                   optax.sgd(0.05, momentum=0.9))
  variables = train.init_variables(model, jax.random.key(0), (28, 28, 1))
  rng = np.random.default_rng(0)
  batches = [{"image": rng.random((16, 28, 28, 1), np.float32),
              "label": rng.integers(0, 10, 16).astype(np.int32)} for _ in range(3)]
  return model, tx, variables, batches


def _train(rt: parallel.Runtime, model, tx, variables, batches):
  variables = jax.tree.map(np.array, variables)   # host copies: the donated state aliases nothing
  state = rt.replicate(train.create_train_state(variables["params"], variables["batch_stats"], tx))
  # Leaf-by-leaf shardings for the state (params, Z, U, rho, momentum), a prefix elsewhere.
  step = train.jit_train_step(model, tx, train.Attack("pgd", 0.1, 0.05, 2, True),
                              in_shardings=(rt.shardings(state), rt.data, rt.replicated),
                              out_shardings=(rt.shardings(state), rt.replicated))
  first = state
  metrics = None
  for batch in batches:
    state, m = step(state, rt.global_batch(batch), jax.random.key(1))
    metrics = train.add_metrics(metrics, m)
  return first, state, metrics


def test_sharded_train_step_equals_single_device_and_keeps_state_replicated():
  model, tx, variables, batches = _admm_setup()
  _, one, m1 = _train(parallel.make_runtime(1), model, tx, variables, batches)
  rt8 = parallel.make_runtime(8)
  first, eight, m8 = _train(rt8, model, tx, variables, batches)
  # Not bitwise: the gradient mean is summed in another order (8 partial sums, all-reduced).
  for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(eight)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  assert int(m8["count"]) == 48 and int(m1["correct"]) == int(m8["correct"])
  np.testing.assert_allclose(float(m1["loss"]), float(m8["loss"]), rtol=1e-5)
  admm_state = transforms.find_admm_state(eight.opt_state)
  assert float(admm_state.rho) == pytest.approx(1.5e-2)   # one Z/U update ran
  for leaf in jax.tree.leaves(eight):                     # params, Z, U, rho, momentum
    assert leaf.sharding.is_equivalent_to(rt8.replicated, leaf.ndim)
  assert jax.tree.leaves(first.params)[0].is_deleted()   # the state was donated


# ------------------------------------------------ end to end: 2 processes == 1 process


@pytest.mark.slow  # two processes: run by .ci/run after the default command
def test_two_processes_read_disjoint_data_and_end_equal_to_one_process(tmp_path):
  port = _free_port()
  # Two processes with 2 devices each (a 4-device mesh across processes), and the
  # one-process, one-device reference; all three at once.
  procs = [subprocess.Popen(
      [sys.executable, WORKER, f"--process-id={i}", "--num-processes=2", f"--port={port}",
       f"--out={tmp_path}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True, env=_env(2, JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{port}"))
      for i in range(2)]
  procs.append(subprocess.Popen([sys.executable, WORKER, "--num-processes=1", f"--out={tmp_path}"],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=_env(1)))
  _wait_all(procs, timeout=240)
  p0, p1, ref = (np.load(tmp_path / f"process{i}_of_{n}.npz") for i, n in ((0, 2), (1, 2), (0, 1)))

  assert int(p0["mesh_size"]) == int(p1["mesh_size"]) == 4 and int(ref["mesh_size"]) == 1
  assert int(p0["process_count"]) == 2 and int(ref["process_count"]) == 1
  # Each process read its own half of every global batch: disjoint, and together the batch.
  assert p0["read"].shape == p1["read"].shape == (4, 16) and ref["read"].shape == (4, 32)
  for step in range(4):
    assert not set(p0["read"][step]) & set(p1["read"][step])
    assert np.array_equal(np.concatenate([p0["read"][step], p1["read"][step]]), ref["read"][step])
  # Metrics are global sums (32 examples a step), the same on both processes.
  for key in ("count", "correct"):
    assert int(p0[key]) == int(p1[key]) == int(ref[key])
  assert int(p0["count"]) == 4 * 32
  np.testing.assert_allclose(p0["loss"], ref["loss"], rtol=1e-5)
  assert float(p0["rho"]) == float(p1["rho"]) == float(ref["rho"]) == pytest.approx(1.5e-2)
  # Identical params on both processes, equal to the one-process run up to summation order.
  names = [k for k in p0.files if k.startswith("param/")]
  assert len(names) == 8
  for name in names:
    assert np.array_equal(p0[name], p1[name]), name
    np.testing.assert_allclose(p0[name], ref[name], rtol=1e-5, atol=1e-6, err_msg=name)
  # orbax saved and restored the replicated state with both processes taking part.
  assert bool(p0["restored_equal"]) and bool(p1["restored_equal"]) and bool(ref["restored_equal"])
  # One lock, held by process 0; a Ctrl-C on process 1 stopped both at the same step (the
  # first agreement point), the lone process at once.
  assert int(p0["lock_pid"]) == int(p1["lock_pid"]) == int(p0["pid"]) != int(p1["pid"])
  assert int(p0["stop_at"]) == int(p1["stop_at"]) == 3 and int(ref["stop_at"]) == 1
