"""Learned masks (HYDRA's score phase, then masked fine-tuning) at the authors' budget:
Fashion-MNIST, LeNet(4), 20,000 labelled examples (2,000 of them validation), PGD-10 Linf 0.1
for training and evaluation, 2 epochs a stage, APGD-CE+T on the first 1000 test examples
after each stage.

  magnitude          pretrain -> scores -> finetune  (HYDRA: scores from the pretrained |w|)
  admm               pretrain -> admm -> scores -> finetune  (scores from ADMM's output)
  <either>-global    the same with ONE budget over the four kernels, of the authors' total
                     (98.8406 % of the weights removed), instead of their per-layer ratios

Run: python -m admm_jax.main --config=configs/fashion_mnist_learned_masks.py:admm \
         --workdir=runs/learned_admm
Data: Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist); data.dir='' uses TFDS.
"""
import ml_collections

from admm_jax.app import configlib

# The authors' per-layer ratios (benchmarks/reference_budget.py, irregular), and one global
# ratio that keeps the same 2,396 of LeNet(4)'s 206,664 kernel weights.
PER_LAYER = ("conv1/kernel=irregular:0.8,conv2/kernel=irregular:0.947,"
             "fc1/kernel=irregular:0.99,fc2/kernel=irregular:0.93")
GLOBAL = "(conv1|conv2|fc1|fc2)/kernel=irregular:0.988406:global"
ARGS = ("magnitude", "admm", "magnitude-global", "admm-global")


def get_config(arg: str | None = "magnitude") -> ml_collections.ConfigDict:
  arg = arg or "magnitude"
  if arg not in ARGS:
    raise ValueError(f"unknown config argument {arg!r}: use one of {', '.join(ARGS)}.")
  init, _, scope = arg.partition("-")
  c = configlib.base_config()
  c.model.width = 4
  c.data.update(limit_train=20000, validation_in_limit=True, limit_test=0)
  c.batch_size = 64
  c.attack.update(eps=0.1, steps=10, step_size=0.01, eval_steps=10, eval_step_size=0.01)
  c.pretrain.update(epochs=2, optimizer="adam", lr=1e-3)
  c.admm.epochs = 2
  c.scores.update(epochs=2, init=init)
  c.finetune.epochs = 2
  c.stages = "pretrain,admm,scores,finetune" if init == "admm" else "pretrain,scores,finetune"
  c.sparsity = GLOBAL if scope == "global" else PER_LAYER
  c.eval.update(final_attack="apgd-ce,apgd-t", final_limit=1000)
  return c
