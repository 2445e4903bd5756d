"""The paper's four findings on Fashion-MNIST LeNet, offline: about an hour on 2 CPU cores.

Run:   python -m admm_jax.study --config=configs/study_fashion_mnist.py --workdir=runs/study
Quick: python -m admm_jax.study --config=configs/study_fashion_mnist.py:quick \
         --workdir=runs/study_quick           (the same grid on less data: under 12 minutes)
Rerun the same command to resume; see admm_jax/app/study.py for the cells and docs/study.md for
the report.

One recipe for every cell: the offline default (configs/fashion_mnist_lenet.py: PGD-5 training,
PGD-10 evaluation at eps 0.1; pretrain 3, admm 2, retrain 2 epochs) on 10,000 training
examples; scratch and inherited cells train for the same 7 epochs. Grid: capacity at
w = 1, 2, 4, 8; w = 4 pruned to the size of w = 2 and w = 1, against those widths from scratch
and the inherited initialization; irregular / column / filter pruning of conv1, conv2 and fc1
at 0.75, 0.9 and 0.97 of each layer; seeds 0 and 1: 38 cells. Robust accuracy in the report:
APGD-CE then APGD-T (AutoAttack's two gradient attacks, admm_jax.evaluate) on the first 500
test examples of each cell's output. The quick variant: 30 cells, 2,000 training examples,
pretrain 2, admm 1, retrain 1 epochs, widths 1, 2, 4, ratios 0.8, 0.95, robust accuracy on 100.
"""
import ml_collections

from admm_jax.app import configlib, study


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  run = configlib.base_config()
  run.data.update(limit_train=10000, validation_size=1000, limit_test=2000)
  run.log_every_steps = 40
  if arg == "quick":
    run.data.update(limit_train=2000, validation_size=500, limit_test=500)
    run.pretrain.epochs, run.admm.epochs, run.retrain.epochs = 2, 1, 1
    run.eval_batch_size = 250
    run.log_every_steps = 10
    return study.study_config(run, widths=(1, 2, 4), scheme_ratios=(0.8, 0.95),
                              robust_eval_limit=100)
  if arg:
    raise ValueError(f"unknown config argument {arg!r}: use ':quick' or nothing.")
  return study.study_config(run)
