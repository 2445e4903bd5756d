"""One process of a multi-process data-parallel run (started by tests/test_parallel.py).

    python tests/multiprocess_worker.py --process-id=0 --num-processes=2 --port=12345 --out=DIR

With --num-processes=1 it is the one-process reference run: no jax.distributed, the same
global batches. Each process trains LeNet(1) with PGD and the ADMM transform (so Z, U and
rho are part of the replicated state) for a few steps on synthetic images whose first two
pixels encode the example's index, saves and restores the state with orbax (all processes
take part), and writes DIR/process<i>.npz: the indices it read per step, the final params,
the global metrics, whether the restored state equals the trained one, who held the workdir
lock and at which step a Ctrl-C on the last process stopped this one.
XLA_FLAGS (devices per process) comes from the environment the test sets.
"""
import argparse
import json
import os
import signal
import sys

import numpy as np

NUM_EXAMPLES, GLOBAL_BATCH = 256, 32


def synthetic_data() -> tuple[np.ndarray, np.ndarray]:
  """uint8 images whose pixels (0,0) and (0,1) hold the index mod 256 and the index // 256."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (NUM_EXAMPLES, 28, 28, 1), dtype=np.uint8)
  idx = np.arange(NUM_EXAMPLES)
  images[:, 0, 0, 0], images[:, 0, 1, 0] = idx % 256, idx // 256
  return images, (idx * 7 % 10).astype(np.int64)


def decode_indices(batch_images: np.ndarray) -> np.ndarray:
  pix = np.rint(batch_images[:, 0, :2, 0] * 255).astype(np.int64)
  return pix[:, 0] + 256 * pix[:, 1]


def main() -> int:
  ap = argparse.ArgumentParser()
  ap.add_argument("--process-id", type=int, default=0)
  ap.add_argument("--num-processes", type=int, default=1)
  ap.add_argument("--port", type=int, default=0)
  ap.add_argument("--steps", type=int, default=4)
  ap.add_argument("--out", required=True)
  args = ap.parse_args()

  import jax
  from admm_jax.app import parallel
  if args.num_processes > 1:  # before any other jax call
    parallel.initialize_distributed(f"127.0.0.1:{args.port}", args.num_processes,
                                    args.process_id, timeout_s=60)
  import optax
  from admm_jax import models, sparsity, transforms
  from admm_jax.app import checkpoint, data, train

  rt = parallel.make_runtime(0)
  model = models.get_model("lenet", 1, conv_impl="auto")  # the CLI's CPU kernels
  spec = sparsity.spec({"conv2/kernel": ("irregular", 0.5), "fc1/kernel": ("irregular", 0.8)})
  tx = optax.chain(transforms.admm(spec, rho=1e-2, update_every=2, rho_growth=1.5),
                   optax.sgd(0.05, momentum=0.9))
  variables = train.init_variables(model, jax.random.key(0), (28, 28, 1))
  state = rt.replicate(train.create_train_state(variables["params"], variables["batch_stats"],
                                                tx))
  step_fn = train.jit_train_step(model, tx, train.Attack("pgd", 0.1, 0.05, 2, True),
                                 in_shardings=(rt.replicated, rt.data, rt.replicated),
                                 out_shardings=(rt.replicated, rt.replicated))
  key = jax.random.key(1)
  images, labels = synthetic_data()
  batches = data.epoch_batches(data.from_arrays(images, labels), GLOBAL_BATCH, seed=3, epoch=0,
                               process_index=jax.process_index(),
                               process_count=jax.process_count())
  read, metrics = [], None
  for local in (batches[k] for k in range(args.steps)):  # batch k, read on demand
    read.append(decode_indices(local["image"]))
    state, m = step_fn(state, rt.global_batch(local), key)
    metrics = train.add_metrics(metrics, m)

  # orbax across processes: every process saves and restores the same replicated state.
  ckpt_dir = os.path.join(args.out, f"ckpt_{args.num_processes}")
  with checkpoint.manager(ckpt_dir, 1) as mngr:
    checkpoint.save(mngr, args.steps, state)
    step, restored = checkpoint.restore_latest(mngr, state)
  same = step == args.steps and all(
      np.array_equal(a, b) for a, b in zip(jax.tree.leaves(jax.device_get(restored)),
                                            jax.tree.leaves(jax.device_get(state))))
  admm_state = transforms.find_admm_state(state.opt_state)

  # Stopping together: process 0 alone holds the workdir lock; a Ctrl-C on the last process
  # stops every process at the same agreed step boundary (every 3 steps here).
  from admm_jax.app import reliability
  lock_dir = os.path.join(args.out, f"workdir_{args.num_processes}")
  os.makedirs(lock_dir, exist_ok=True)
  with reliability.workdir_lock(lock_dir):
    parallel.sync("locked")
    with open(os.path.join(lock_dir, reliability.LOCK_FILE)) as f:
      lock_pid = json.load(f)["pid"]
    parallel.sync("lock read")
  stops = reliability.StopRequests(agree_every=3)
  with stops.installed():
    if jax.process_index() == args.num_processes - 1:
      os.kill(os.getpid(), signal.SIGINT)
    stop_at = next(step for step in range(1, 10) if stops.requested(step))

  flat = {"param/" + sparsity.path_str(p): np.asarray(v)
          for p, v in jax.tree_util.tree_leaves_with_path(jax.device_get(state.params))}
  host = jax.device_get(metrics)
  np.savez(os.path.join(args.out, f"process{jax.process_index()}_of_{args.num_processes}.npz"),
           read=np.stack(read), loss=host["loss"], correct=host["correct"], count=host["count"],
           restored_equal=same, rho=np.asarray(admm_state.rho),
           mesh_size=rt.num_devices, process_count=jax.process_count(), pid=os.getpid(),
           lock_pid=lock_pid, stop_at=stop_at, **flat)
  parallel.shutdown_distributed()
  return 0


if __name__ == "__main__":
  sys.exit(main())
