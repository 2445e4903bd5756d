"""The learned-mask stages (scores, then finetune) in the registry: the build, the config's
checks, and a tiny run that resumes to the same numbers (slow tier)."""
import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from admm_jax import scores, sparsity
from admm_jax.app import configlib, stages, study, trainer
from admm_jax.app.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "fashion_mnist_lenet.py")
FMNIST = "/usr/share/datasets/fashion-mnist"


def _start(params, spec, config=None):
  return stages.StageStart(config=config or configlib.base_config(), spec=spec,
                           variables={"params": params, "batch_stats": {}},
                           fresh={"params": params, "batch_stats": {}},
                           optimizer=optax.adam(0.05), update_every=1)


def test_scores_stage_trains_the_mask_with_the_weights_frozen_then_finetune_keeps_it():
  k1, k2 = jax.random.split(jax.random.key(0))
  params = {"conv": {"kernel": jax.random.normal(k1, (3, 3, 1, 4)), "bias": jnp.ones(4)},
            "fc": {"kernel": jax.random.normal(k2, (6, 3))}}
  spec = sparsity.spec({"conv/kernel": ("filter", 0.5), "fc/kernel": ("irregular", 0.5)})
  variables, tx = stages.STAGES["scores"].build(_start(params, spec))
  p = variables["params"]
  pruned, _ = sparsity.hard_prune(params, spec)   # the first mask: the magnitude projection
  np.testing.assert_array_equal(p["fc"]["kernel"], pruned["fc"]["kernel"])
  state = tx.init(p)
  step = jax.jit(tx.update)
  for i in range(3):
    grads = jax.tree.map(lambda w: jax.random.normal(jax.random.key(i), w.shape), p)
    updates, state = step(grads, state, p)
    p = optax.apply_updates(p, updates)
  keep = scores.masks(params, state.scores, spec)
  for name in ("conv", "fc"):   # W * mask(S): every kept weight is the frozen one
    np.testing.assert_array_equal(p[name]["kernel"], params[name]["kernel"] * keep[name]["kernel"])
  np.testing.assert_array_equal(p["conv"]["bias"], params["conv"]["bias"])
  # finetune hard-prunes the scores' output: the learned mask, kept through training.
  tuned, tx2 = stages.STAGES["finetune"].build(_start(p, spec))
  masks = tx2.init(tuned["params"])[1].masks
  np.testing.assert_array_equal(masks["fc"]["kernel"], keep["fc"]["kernel"])
  np.testing.assert_array_equal(tuned["params"]["fc"]["kernel"], p["fc"]["kernel"])


def test_scores_input_follows_config_scores_init():
  config = configlib.base_config()
  assert stages.STAGES["scores"].input_of(config) == "pretrain"
  config.scores.init = "admm"
  assert stages.STAGES["scores"].input_of(config) == "admm"
  assert stages.STAGES["finetune"].input_of(config) == "scores"


@pytest.mark.parametrize("fields,match", [
    ({"scores.init": "random"}, "config.scores.init='random' is invalid"),
    ({"sparsity": "fc1/kernel=irregular:0.0"}, "prunes nothing"),
    ({"sparsity": "fc1/kernel=irregular:0.9:4b"}, "learned masks are float"),
    ({"sparsity": "(conv1|fc1)/kernel=irregular:0.9:4b:global"}, "without bits"),
])
def test_bad_scores_config_is_one_sentence(fields, match):
  config = configlib.override(configlib.base_config(),
                              {"stages": "pretrain,scores,finetune", **fields})
  with pytest.raises(configlib.ConfigError, match=match) as e:
    configlib.validate(config)
  assert "\n" not in str(e.value)


def test_scores_on_a_layer_without_weights_is_a_user_error():
  params = {"fc": {"kernel": jnp.zeros((4, 3))}}
  with pytest.raises(UserError, match="'fc/kernel' has no nonzero weight") as e:
    stages.STAGES["scores"].build(_start(params, sparsity.spec({"fc/kernel": ("irregular", 0.5)})))
  assert e.value.exit_code == 2


# ------------------------------------------------------------- a tiny run, resumed (slow)

# test_faults' tiny run: 6 steps an epoch, plain training, checkpoints every 4 steps.
OVERRIDES = {"data.limit_train": 192, "data.validation_size": 64, "data.limit_test": 64,
             "batch_size": 32, "eval_batch_size": 64, "log_every_steps": 4,
             "checkpoint_every_steps": 4, "max_checkpoints": 3, "parallel.data_axis": 1,
             "model.width": 2, "model.conv_impl": "xla", "attack.kind": "none",
             "attack.eval_steps": 1, "pretrain.epochs": 1, "pretrain.lr": 0.01,
             "scores.epochs": 2, "finetune.epochs": 1, "finetune.lr": 0.003,
             "stages": "pretrain,scores,finetune",
             "sparsity": "(conv2|fc1)/kernel=irregular:0.8:global,fc2/kernel=filter:0.5"}


@pytest.mark.slow
def test_learned_mask_run_resumes_to_the_same_numbers(tmp_path, caplog):
  if not os.path.isdir(FMNIST):
    if os.environ.get("CI") == "true":
      raise RuntimeError(f"{FMNIST} is missing under CI")
    pytest.skip(reason="Debian's dataset-fashion-mnist is not installed")
  config = lambda: configlib.override(study.load_config(CONFIG, "tiny"), dict(OVERRIDES))
  full = trainer.train_and_evaluate(config(), str(tmp_path / "full"))
  assert list(full["stages"]) == ["pretrain", "scores", "finetune"]
  layers = full["sparsity"]["layers"]
  assert layers["conv2/kernel"]["shared"] == "(conv2|fc1)/kernel"
  shared = [v for v in layers.values() if v["shared"]]
  total = sum(v["groups"] for v in shared)
  assert sum(v["groups_pruned"] for v in shared) == round(0.8 * total)
  # Rewind: scores stopped after its step-8 checkpoint, finetune never started.
  run = tmp_path / "resumed"
  shutil.copytree(tmp_path / "full", run, ignore=shutil.ignore_patterns("run.lock"))
  for stage in ("scores", "finetune"):
    (run / "outputs" / f"{stage}.json").unlink()
    shutil.rmtree(run / "outputs" / stage)
  shutil.rmtree(run / "checkpoints" / "finetune")
  for ckpt in (run / "checkpoints" / "scores").iterdir():
    if ckpt.name.isdigit() and int(ckpt.name) > 8:
      shutil.rmtree(ckpt)
  caplog.set_level(logging.INFO)
  again = trainer.train_and_evaluate(config(), str(run))
  assert any("resuming from scores step 8" in r.getMessage() for r in caplog.records)
  for stage in ("scores", "finetune"):
    for key in ("natural_accuracy", "adversarial_accuracy", "steps", "val_natural_accuracy"):
      assert again["stages"][stage][key] == full["stages"][stage][key], (stage, key)
  assert again["sparsity"] == full["sparsity"]
  metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
  assert [(x["stage"], x["epoch"]) for x in metrics] == [("pretrain", 1), ("scores", 1),
                                                          ("scores", 2), ("finetune", 1)]
