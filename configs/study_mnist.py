"""The paper's four findings on MNIST LeNet at the paper's scale (GPU/TPU; TFDS with network).

Run: python -m admm_jax.study --config=configs/study_mnist.py --workdir=runs/study_mnist
Offline, from local MNIST IDX files: --config.run.data.dir=/path/to/mnist

One recipe for every cell: configs/mnist_lenet.py (eps 0.3, PGD-40, 40 + 40 + 40 epochs;
scratch and inherited cells train for the same 120 epochs). Grid: capacity at w = 1 ... 16;
w = 16 pruned to the size of w = 2 and w = 1; irregular / column / filter pruning of conv1,
conv2 and fc1 at 0.8, 0.947 and 0.99 of each layer; seeds 0, 1, 2 (60 cells). Robust accuracy:
standard AutoAttack on the first 1,000 test examples of each cell. Not run here.
"""
import os

import ml_collections

from admm_jax.app import study


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg:
    raise ValueError(f"unknown config argument {arg!r}: this config has no variants.")
  run = study.load_config(os.path.join(os.path.dirname(__file__), "mnist_lenet.py"))
  return study.study_config(run, seeds=(0, 1, 2), widths=(1, 2, 4, 8, 16), wide_width=16,
                            target_widths=(2, 1), scheme_ratios=(0.8, 0.947, 0.99),
                            robust_eval="autoattack", robust_eval_limit=1000)
