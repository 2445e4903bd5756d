"""Devices and hosts: the mesh, explicit shardings, global batches, multi-process start.

Data parallelism with jax.sharding: one mesh axis "data" over the devices. Params, batch
statistics and the whole optimizer state (Z, U, masks included) are replicated; batches are
split along their leading axis. The jitted steps are given these shardings, and XLA inserts
the gradient all-reduce itself. Each process holds only its own slice of every global batch
(`jax.make_array_from_process_local_data`), so the same code runs on one CPU, a GPU box and
a multi-host TPU pod. We do not use pmap: jit with shardings is the supported path, needs no
per-device replication of the state, and serves multi-host runs unchanged.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


@dataclasses.dataclass(frozen=True)
class Runtime:
  """The mesh and the two shardings every step uses."""
  mesh: Mesh

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  @property
  def data(self) -> NamedSharding:
    return NamedSharding(self.mesh, P(DATA_AXIS))

  @property
  def num_devices(self) -> int:
    return self.mesh.devices.size

  def check_batch(self, batch_size: int, field: str = "batch_size") -> None:
    """A global batch must split evenly over the devices and over the processes."""
    for count, what in ((self.num_devices, "devices"), (jax.process_count(), "processes")):
      if batch_size % count:
        raise ValueError(f"config.{field}={batch_size} does not divide by the {count} {what} "
                         f"on the data axis: use a multiple of {count}.")

  def replicate(self, tree: Any) -> Any:
    """Places a host or device pytree replicated on every device of the mesh."""
    return jax.device_put(tree, self.replicated)

  def global_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's slice of a global batch -> one global array per key, split on "data"."""
    return {k: jax.make_array_from_process_local_data(self.data, np.asarray(v))
            for k, v in local_batch.items()}


def initialize_distributed(coordinator_address: str = "", num_processes: int = 0,
                           process_id: int = -1) -> None:
  """Starts jax.distributed for a multi-process run (before any other jax call).

  On Cloud TPU VMs (and SLURM/Open MPI clusters) JAX finds the coordinator itself: leave the
  arguments empty. Elsewhere give all three. On CPU the collectives go through gloo.
  """
  kwargs = {}
  if coordinator_address:
    kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                  process_id=process_id)
  if jax.config.jax_platforms in (None, "", "cpu") or "cpu" in str(jax.config.jax_platforms):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


def make_runtime(data_axis: int = 0) -> Runtime:
  """A one-axis ("data") mesh over `data_axis` devices (0 = all devices of all processes)."""
  devices = jax.devices()
  n = data_axis or len(devices)
  if n > len(devices):
    raise ValueError(f"config.parallel.data_axis={data_axis} asks for more devices than the "
                     f"{len(devices)} available: use at most {len(devices)} (0 = all).")
  return Runtime(Mesh(np.asarray(devices[:n]), (DATA_AXIS,)))
