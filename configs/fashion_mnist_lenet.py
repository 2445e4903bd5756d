"""Fashion-MNIST, LeNet: the offline default, robust and small in about 5 minutes on 2 CPU
cores, the APGD evaluation of each stage (config.eval) included.

Run: python -m admm_jax.main --config=configs/fashion_mnist_lenet.py --workdir=runs/fmnist
Tiny smoke run (all stages, a few thousand examples, under a minute):
     python -m admm_jax.main --config=configs/fashion_mnist_lenet.py:tiny --workdir=runs/tiny
Data: Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist); data.dir='' uses TFDS.
"""
import ml_collections

from admm_jax.app import configlib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = configlib.base_config()
  # After each stage, APGD-CE then APGD-T (AutoAttack without FAB-T and Square) on the first
  # 1000 test examples, with the sanity checks on 200: about +100 % on the run's time (each
  # stage's evaluation costs about a third of the whole training, docs/evaluation.md). Full
  # AutoAttack is ~5x slower here (FAB-T, Square): run it with python -m admm_jax.evaluate.
  # 'apgd-ce,apgd-dlr' costs a quarter as much.
  c.eval.update(final_attack="apgd-ce,apgd-t", final_limit=1000)
  if arg == "tiny":
    c.eval.final_attack = ""  # the smoke run stays under a minute
    c.data.limit_train = 2048
    c.data.validation_size = 256
    c.data.limit_test = 512
    c.model.width = 2
    c.attack.steps = 3
    c.attack.step_size = 0.05
    c.attack.eval_steps = 5
    c.attack.eval_step_size = 0.03
    c.eval_batch_size = 256
    c.pretrain.epochs = 2
    c.admm.epochs = 2
    c.admm.update_every_epochs = 1
    c.admm.rho = 0.5
    c.retrain.epochs = 1
    # A few dozen steps: the full recipe's retrain (Adam from 0.05) and constant ADMM lr are
    # tuned for whole epochs and, on a barely trained model, turn rounding differences (1 vs
    # 8 devices) into different runs; the smoke run keeps calm settings.
    c.retrain.update(lr=1e-3, schedule="constant")
    c.admm.schedule = "admm"
    c.log_every_steps = 16
    c.checkpoint_every_steps = 20
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}: use ':tiny' or nothing.")
  return c
