"""CIFAR-10, ResNet-18, CIFAR variant (w=16 is the standard 64..512 channels): the paper's recipe.

For GPUs/TPUs with network (TFDS downloads cifar10). Run:
  python -m admm_jax.main --config=configs/cifar10_resnet18.py --workdir=runs/resnet18_filter
Variants: :filter (default), :column, :irregular -- 0.9375 of every one of the 20 conv layers
(the stem, 16 in the blocks, 3 1x1 shortcuts). The recipe itself: configlib.cifar10_recipe.
"""
import ml_collections

from admm_jax.app import configlib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return configlib.cifar10_recipe("resnet18", r"(.*/)?(conv\d+|shortcut_conv)/kernel", arg)
