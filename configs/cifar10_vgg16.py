"""CIFAR-10, VGG-16 with BatchNorm (w=16 is the full network): the paper's CIFAR recipe.

For GPUs/TPUs with network (TFDS downloads cifar10). Run:
  python -m admm_jax.main --config=configs/cifar10_vgg16.py --workdir=runs/vgg16_filter
Variants: :filter (default), :column, :irregular -- 0.9375 of every one of the 13 conv layers.
Smaller width: --config.model.width=8. The recipe itself: configlib.cifar10_recipe.

Deviations from the reference configs: the reference names type `bn_filter` but lists conv
keys; we prune the conv kernels with the kind named here. Checkpoints are selected on a
held-out validation split, not the test set.
"""
import ml_collections

from admm_jax.app import configlib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return configlib.cifar10_recipe("vgg16", r"conv\d+/kernel", arg)
