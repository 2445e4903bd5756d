"""Devices and hosts: the mesh, explicit shardings, global batches, multi-process start.

Data parallelism with jax.sharding: one mesh axis, "data", over the devices of every
process. Params, batch statistics and the whole optimizer state (Z, U, rho and masks
included) are replicated; batches are split along their leading axis. The jitted steps are
given these shardings (and donate the train state), and XLA inserts the gradient all-reduce
itself. Each process holds only its own slice of every global batch
(`jax.make_array_from_process_local_data`), so the same code runs on one CPU, a GPU box and
a multi-host TPU pod.

Why not pmap: jit with shardings is JAX's supported path (pmap is in maintenance mode and
re-implemented on jit + shard_map); it needs no per-device copies of the state, no
`pmean` of the gradients (the pmap idiom carried into shard_map silently over-counts: with
check_vma the gradient of a replicated parameter is already summed over devices), the
same step function serves 1 and N devices and N hosts, and orbax saves the sharded arrays
as they are.

Multi-host layout: the mesh lists the devices process by process, so process p owns the
contiguous rows [p * B / P, (p + 1) * B / P) of every global batch of B rows — exactly the
slice `data.epoch_batches(..., process_index=p, process_count=P)` yields.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from admm_jax.app.errors import UserError

DATA_AXIS = "data"


class ParallelError(UserError, ValueError):
  """A device, batch or process setting that cannot work; one sentence naming the field."""


@dataclasses.dataclass(frozen=True)
class Runtime:
  """The mesh and the shardings every step uses.

  Attributes:
    mesh: a one-axis mesh named "data"; its devices are ordered process by process.
  """
  mesh: Mesh

  @property
  def replicated(self) -> NamedSharding:
    """Params, batch statistics, optimizer state (Z, U, masks), metrics: a full copy each."""
    return NamedSharding(self.mesh, P())

  @property
  def data(self) -> NamedSharding:
    """Batches: split along their leading (example) axis over the "data" axis."""
    return NamedSharding(self.mesh, P(DATA_AXIS))

  @property
  def num_devices(self) -> int:
    """Devices in the mesh (all processes), the data-parallel degree."""
    return self.mesh.devices.size

  @property
  def process_index(self) -> int:
    return jax.process_index()

  @property
  def process_count(self) -> int:
    return jax.process_count()

  @property
  def is_writer(self) -> bool:
    """Only process 0 writes reports and metrics files (orbax coordinates checkpoints)."""
    return is_writer()

  @property
  def batch_multiple(self) -> int:
    """The smallest global batch that splits evenly over the devices and the processes."""
    return math.lcm(self.num_devices, jax.process_count())

  def check_batch(self, batch_size: int, field: str = "batch_size") -> None:
    """A global batch must split evenly over the devices and over the processes.

    Raises:
      ParallelError: one sentence naming the config field, the batch size and the count.
    """
    for count, what in ((self.num_devices, "devices"), (jax.process_count(), "processes")):
      if batch_size % count:
        raise ParallelError(f"config.{field}={batch_size} does not divide by the {count} {what} "
                            f"on the data axis: use a multiple of {count}.")

  def local_batch_size(self, batch_size: int) -> int:
    """Rows of a global batch of `batch_size` that this process loads."""
    self.check_batch(batch_size)
    return batch_size // jax.process_count()

  def shardings(self, tree: Any) -> Any:
    """A pytree of NamedShardings matching `tree` leaf for leaf (all replicated).

    Usable as jit in/out_shardings or as an orbax restore target; one place to change if a
    leaf (e.g. a large Z) should ever be split over a "model" axis.
    """
    return jax.tree.map(lambda _: self.replicated, tree)

  def replicate(self, tree: Any) -> Any:
    """Places a host or device pytree replicated on every device of the mesh.

    Multi-process: leaves that are already global arrays are placed as they are; every other
    leaf (numpy, Python numbers, single-device arrays) takes process 0's value. Those are
    equal on every process anyway (pure functions of the seed and the data) except for
    process-local facts such as wall-clock time, where jax.device_put would otherwise stop
    with "not the same on each process".
    """
    if jax.process_count() > 1:
      tree = _from_process_zero(tree)
    return jax.device_put(tree, self.replicated)

  def global_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's slice of a global batch -> one global array per key, split on "data".

    Args:
      local_batch: {key: (b_local, ...) numpy}, b_local = global batch / process count.

    Returns:
      {key: jax.Array of shape (b_local * process_count, ...)} sharded by `self.data`.
    """
    out = {}
    for k, v in local_batch.items():
      v = np.asarray(v)
      shape = (v.shape[0] * jax.process_count(),) + v.shape[1:]
      out[k] = jax.make_array_from_process_local_data(self.data, v, shape)
    return out

  def describe(self) -> dict[str, Any]:
    """What the run used, for report.json: the mesh size (not all visible devices)."""
    return {"count": self.num_devices, "mesh": dict(self.mesh.shape),
            "platform": jax.default_backend(), "processes": jax.process_count(),
            "local_devices": sum(d.process_index == jax.process_index()
                                 for d in self.mesh.devices.flat),
            "kind": self.mesh.devices.flat[0].device_kind}


def _is_global(x: Any) -> bool:
  return isinstance(x, jax.Array) and not x.is_fully_addressable


def _is_key(x: Any) -> bool:
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _from_process_zero(tree: Any) -> Any:
  """`tree` with every process-local leaf replaced by process 0's value (one collective).

  PRNG keys are left alone (they cannot go through numpy; they come from the seed, so
  jax.device_put finds them equal).
  """
  leaves, treedef = jax.tree.flatten(tree)
  local = [i for i, x in enumerate(leaves) if not _is_global(x) and not _is_key(x)]
  if local:
    host = [np.asarray(leaves[i]) for i in local]
    synced = multihost_utils.broadcast_one_to_all(host)
    for i, value, like in zip(local, synced, host):
      leaves[i] = np.asarray(value).astype(like.dtype, copy=False)  # psum widens bools
  return jax.tree.unflatten(treedef, leaves)


def broadcast_from_writer(tree: Any) -> Any:
  """Process 0's value of a host pytree on every process (identity with one process)."""
  return _from_process_zero(tree) if jax.process_count() > 1 else tree


def _env_int(name: str, default: int) -> int:
  value = os.environ.get(name, "")
  try:
    return int(value) if value else default
  except ValueError:
    raise ParallelError(f"environment variable {name}={value!r} is not an integer.") from None


def initialize_distributed(coordinator_address: str = "", num_processes: int = 0,
                           process_id: int = -1, timeout_s: int = 300) -> None:
  """Starts jax.distributed for a multi-process run; call it before any other jax call.

  Where the arguments come from, first found wins: the arguments (config.parallel.*), the
  environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), then JAX's own
  cluster detection (Cloud TPU VMs and pod slices, SLURM, Open MPI, Kubernetes). So on a TPU
  VM leave them empty; on GPU/CPU machines give all three (process 0's host:port). CPU
  collectives go through gloo. Calling it twice is harmless.

  Args:
    coordinator_address: "host:port" of process 0 ("" = environment or auto-detect).
    num_processes: processes in the run (0 = environment or auto-detect).
    process_id: this process, in [0, num_processes) (-1 = environment or auto-detect).
    timeout_s: how long to wait for every process to join the coordinator.

  Raises:
    ParallelError: an inconsistent process count / id, named in one sentence.
  """
  if jax.distributed.is_initialized():
    return
  num_processes = num_processes or _env_int("JAX_NUM_PROCESSES", 0)
  process_id = process_id if process_id >= 0 else _env_int("JAX_PROCESS_ID", -1)
  if num_processes < 0 or (num_processes and not -1 <= process_id < num_processes):
    raise ParallelError(f"config.parallel.process_id={process_id} must lie in [0, "
                        f"config.parallel.num_processes={num_processes}).")
  # An explicit coordinator means no cluster manager: nothing else could fill in the rest.
  if coordinator_address and (num_processes == 0 or process_id < 0):
    raise ParallelError(f"config.parallel.coordinator_address={coordinator_address!r} needs "
                        "config.parallel.num_processes and config.parallel.process_id too "
                        "(or JAX_NUM_PROCESSES / JAX_PROCESS_ID).")
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  kwargs: dict[str, Any] = {"initialization_timeout": timeout_s}
  if coordinator_address:
    kwargs["coordinator_address"] = coordinator_address
  if num_processes:
    kwargs["num_processes"] = num_processes
  if process_id >= 0:
    kwargs["process_id"] = process_id
  # Only the CPU client reads this; gloo is today's default, named so that it stays so.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


def is_writer() -> bool:
  """Process 0 alone writes files and prints summaries (every process may call this)."""
  return jax.process_index() == 0


def shutdown_distributed() -> None:
  """Leaves the distributed run (a no-op when it was never started)."""
  if jax.distributed.is_initialized():
    jax.distributed.shutdown()


def sync(name: str) -> None:
  """A barrier across processes (a no-op with one process).

  Use it after process 0 writes a file that the others read next (a finished stage's
  marker): without it a fast process could look before the file exists.
  """
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def mesh_devices(data_axis: int = 0) -> list[jax.Device]:
  """The devices of the data axis, process by process (`data_axis` = 0: all of them).

  With several processes every process contributes `data_axis / process_count` of its own
  devices, so each one holds a contiguous block of every global batch.

  Raises:
    ParallelError: `data_axis` is negative, exceeds the devices, or does not divide by the
      number of processes.
  """
  devices, pc = jax.devices(), jax.process_count()
  if data_axis < 0:
    raise ParallelError(f"config.parallel.data_axis={data_axis} must be >= 0 (0 = all devices).")
  n = data_axis or len(devices)
  if n > len(devices):
    raise ParallelError(f"config.parallel.data_axis={data_axis} asks for more devices than the "
                        f"{len(devices)} available: use at most {len(devices)} (0 = all).")
  if pc == 1:
    return list(devices[:n])
  if n % pc:
    raise ParallelError(f"config.parallel.data_axis={n} does not divide by the {pc} processes: "
                        f"every process must bring the same number of devices; use a multiple "
                        f"of {pc} (0 = all).")
  per_process = n // pc
  chosen = []
  for p in range(pc):
    local = [d for d in devices if d.process_index == p]
    if len(local) < per_process:
      raise ParallelError(f"config.parallel.data_axis={n} needs {per_process} devices in each "
                          f"process but process {p} has {len(local)}.")
    chosen += local[:per_process]
  return chosen


def make_runtime(data_axis: int = 0) -> Runtime:
  """A one-axis ("data") mesh over `data_axis` devices (0 = all devices of all processes)."""
  return Runtime(Mesh(np.asarray(mesh_devices(data_axis)), (DATA_AXIS,)))
