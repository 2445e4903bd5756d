"""CIFAR-10, VGG-16 with BatchNorm (w=16 is the full network): the paper's CIFAR recipe.

For GPUs/TPUs with network (TFDS downloads cifar10). Run:
  python -m admm_jax.main --config=configs/cifar10_vgg16.py --workdir=runs/vgg16_filter
Variants: :filter (default), :column, :irregular -- 0.9375 of every one of the 13 conv layers.
Smaller width: --config.model.width=8; a quick look: --config.pretrain.epochs=5 ...

Deviations from the reference configs: the reference names type `bn_filter` but lists conv
keys; we prune the conv kernels with the kind named here. Checkpoints are selected on a
held-out validation split.
"""
import ml_collections

from admm_jax import configlib

CONVS = r"conv\d+/kernel"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  kind = arg or "filter"
  if kind not in ("filter", "column", "irregular"):
    raise ValueError(f"unknown config argument {arg!r}: use filter, column or irregular.")
  c = configlib.base_config()
  c.data.name = "cifar10"
  c.data.dir = ""
  c.data.validation_size = 5000
  c.data.augment = "cifar"
  c.model.name = "vgg16"
  c.model.width = 16
  c.attack.eps = 8 / 255
  c.attack.steps = 10
  c.attack.step_size = 2 / 255
  c.attack.eval_steps = 20
  c.attack.eval_step_size = 2 / 255
  c.batch_size = 128
  c.eval_batch_size = 500
  c.sparsity = f"{CONVS}={kind}:0.9375"
  c.pretrain.update(epochs=200, optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4,
                    schedule="cosine")
  c.admm.update(epochs=200, optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4,
                schedule="admm", rho=1e-3, rho_growth=1.3, update_every_epochs=20)
  c.retrain.update(epochs=200, optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4,
                   schedule="steps", lr_drop_epochs=(80, 150))
  c.scratch.update(epochs=0, optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4,
                   schedule="cosine", width=1)
  c.log_every_steps = 100
  c.checkpoint_every_steps = 1000
  return c
