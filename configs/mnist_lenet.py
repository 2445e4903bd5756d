"""MNIST, LeNet(w=16): the paper's MNIST recipe (docs/method.md). Needs TFDS with
network.

Run (irregular pruning, the default):
  python -m admm_jax.main --config=configs/mnist_lenet.py --workdir=runs/mnist_irregular
Filter pruning:  --config=configs/mnist_lenet.py:filter
Column pruning:  --config=configs/mnist_lenet.py:column
Offline, from local MNIST IDX files: --config.data.dir=/path/to/mnist
Width study: --config.model.width=1 (2, 4, 8, 16);
pruned-vs-scratch: --config.stages=pretrain,admm,retrain,scratch

Deviations from the reference configs, on purpose: pretrain uses Adam lr 1e-3 (the reference's
lr 0.1 stays at chance), retrain starts its Adam lr 0.01 with a quarter-epoch warmup (a
freshly hard-pruned network can die at that lr without it: docs/method.md section 8),
checkpoints are selected on a held-out validation split (not the test set), and pruning keeps
exactly the asked number of groups (the reference's percentile removes more on ties).
"""
import ml_collections

from admm_jax.app import configlib

SPARSITY = {
    # (ref) conv1 0.8, conv2 0.947, fc1 0.99, fc2 0.93
    "irregular": "conv1/kernel=irregular:0.8,conv2/kernel=irregular:0.947,"
                 "fc1/kernel=irregular:0.99,fc2/kernel=irregular:0.93",
    # (ref) filter pruning: conv1 0.8, conv2 0.947
    "filter": "conv1/kernel=filter:0.8,conv2/kernel=filter:0.947",
    "column": "conv1/kernel=column:0.8,conv2/kernel=column:0.947",
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  kind = arg or "irregular"
  if kind not in SPARSITY:
    raise ValueError(f"unknown config argument {arg!r}: use one of {', '.join(SPARSITY)}.")
  c = configlib.base_config()
  c.data.name = "mnist"
  c.data.dir = ""                       # TFDS
  c.data.validation_size = 5000
  c.model.width = 16
  c.attack.eps = 0.3
  c.attack.steps = 40
  c.attack.step_size = 0.01
  c.attack.eval_steps = 40
  c.attack.eval_step_size = 0.01
  c.batch_size = 64
  c.sparsity = SPARSITY[kind]
  c.pretrain.update(epochs=40, optimizer="adam", lr=1e-3, schedule="constant")
  c.admm.update(epochs=40, optimizer="sgd", lr=0.01, momentum=0.9, schedule="admm",
                rho=1e-3, rho_growth=1.3, update_every_epochs=4)
  c.retrain.update(epochs=40, optimizer="adam", lr=0.01, schedule="constant", warmup_epochs=0.25)
  c.scratch.update(epochs=0, optimizer="adam", lr=1e-3, width=1)
  c.log_every_steps = 200
  c.checkpoint_every_steps = 2000
  return c
