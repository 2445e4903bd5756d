"""The paper's four findings on CIFAR-10 VGG-16 at the paper's scale (GPU/TPU; TFDS downloads
cifar10).

Run: python -m admm_jax.study --config=configs/study_cifar10.py --workdir=runs/study_cifar10

One recipe for every cell: configs/cifar10_vgg16.py (eps 8/255, PGD-10 training, PGD-20
evaluation, 200 + 200 + 200 epochs; scratch and inherited cells train for the same 600
epochs). Grid: capacity at w = 2, 4, 8, 16 (w = 16 is the full VGG-16); w = 16 pruned to the
size of w = 4 and w = 2 (every conv and the classifier, layer by layer); irregular / column /
filter pruning of the 13 conv layers at 0.75, 0.9 and 0.9375 (the paper's ratio); seeds
0, 1, 2 (57 cells). Robust accuracy: standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square)
on the first 1,000 test examples of each cell. Not run here.
"""
import ml_collections

from admm_jax.app import configlib, study


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg:
    raise ValueError(f"unknown config argument {arg!r}: this config has no variants.")
  run = configlib.cifar10_recipe("vgg16", r"conv\d+/kernel", "irregular")
  return study.study_config(run, seeds=(0, 1, 2), widths=(2, 4, 8, 16), wide_width=16,
                            target_widths=(4, 2), scheme_ratios=(0.75, 0.9, 0.9375),
                            scheme_layers=r"conv\d+/kernel",
                            robust_eval="autoattack", robust_eval_limit=1000)
