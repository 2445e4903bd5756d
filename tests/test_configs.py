"""Every shipped config (and variant) validates and its sparsity patterns fit its model."""
import importlib.util
import os

import jax
import numpy as np
import optax
import pytest

from admm_jax import models, sparsity
from admm_jax.app import configlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = [("fashion_mnist_lenet", None), ("fashion_mnist_lenet", "tiny"),
         ("mnist_lenet", None), ("mnist_lenet", "filter"), ("mnist_lenet", "column"),
         ("cifar10_vgg16", None), ("cifar10_vgg16", "irregular"), ("cifar10_vgg16", "column"),
         ("cifar10_resnet18", None), ("cifar10_resnet18", "irregular"),
         ("fashion_mnist_learned_masks", "admm-global")]
EXPECTED_PRUNED = {"lenet": None, "vgg16": 13, "resnet18": 20}


def _load(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("name,arg", CASES)
def test_config_validates_and_sparsity_matches_model(name, arg):
  config = _load(name).get_config(arg)
  configlib.validate(config)
  shape = {"cifar10": (32, 32, 3)}.get(config.data.name, (28, 28, 1))
  model = models.get_model(config.model.name, config.model.width)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jax.numpy.zeros((1,) + shape)))
  the_spec = sparsity.spec(configlib.parse_sparsity(config.sparsity))
  rules = sparsity.resolve(params["params"], the_spec)
  if EXPECTED_PRUNED[config.model.name]:
    assert len(rules) == EXPECTED_PRUNED[config.model.name]


def test_learned_masks_config_keeps_the_authors_total_in_its_global_variant():
  from admm_jax import projections
  module = _load("fashion_mnist_learned_masks")
  model = models.get_model("lenet", 4)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jax.numpy.zeros((1, 28, 28, 1))))
  kept = []
  for arg in ("magnitude", "magnitude-global"):
    config = module.get_config(arg)
    assert config.stages == "pretrain,scores,finetune"
    rules = sparsity.resolve(params["params"],
                             sparsity.spec(configlib.parse_sparsity(config.sparsity)))
    sizes = {p: int(np.prod(params["params"][p.split("/")[0]]["kernel"].shape)) for p in rules}
    if arg.endswith("global"):
      kept.append(projections.num_kept_shared(list(sizes.values()), rules["fc1/kernel"].ratio))
    else:
      kept.append(sum(n - projections.num_removed(n, rules[p].ratio) for p, n in sizes.items()))
  assert kept == [2396, 2396]
  assert module.get_config("admm").stages == "pretrain,admm,scores,finetune"


def test_unknown_variant_is_an_error():
  with pytest.raises(ValueError, match="unknown config argument"):
    _load("mnist_lenet").get_config("rows")


def test_parse_sparsity_forms():
  assert configlib.parse_sparsity("a/kernel=filter:0.5, b.*/kernel=2:4") == {
      "a/kernel": ("filter", 0.5), "b.*/kernel": ("2:4", None)}
  with pytest.raises(configlib.ConfigError, match="not a number"):
    configlib.parse_sparsity("a/kernel=filter:x")


def test_warmup_ramps_the_stage_schedule_linearly_then_leaves_it_alone():
  from admm_jax.app import stages
  stage = configlib.base_config().retrain
  stage.update(lr=0.1, schedule="cosine", epochs=2, warmup_epochs=0.5)
  sched = stages.lr_schedule(stage, steps_per_epoch=10)
  cosine = optax.cosine_decay_schedule(0.1, 20)
  for count in range(20):
    ramp = min(1.0, (count + 1) / 5)
    np.testing.assert_allclose(float(sched(count)), ramp * float(cosine(count)), rtol=1e-6)
  stage.warmup_epochs = 0.0
  assert float(stages.lr_schedule(stage, steps_per_epoch=10)(0)) == pytest.approx(0.1)
  with pytest.raises(configlib.ConfigError, match="retrain.warmup_epochs"):
    config = configlib.base_config()
    config.retrain.warmup_epochs = 3.0
    configlib.validate(config)


@pytest.mark.parametrize("name,directory,bad_field", [
    ("cifar100", "", None), ("svhn_cropped", "", None), ("mnist:3.0.1", "", None),
    ("mnist", "/some/idx/folder", None),
    ("cifar100", "/some/idx/folder", "data.dir"),   # IDX files exist for (fashion_)mnist only
    ("CIFAR 10", "", "data.name"), ("", "", "data.name")])
def test_data_name_is_a_local_idx_dataset_or_any_tfds_name(name, directory, bad_field):
  config = configlib.base_config()
  config.data.update(name=name, dir=directory)
  if bad_field is None:
    configlib.validate(config)
  else:
    with pytest.raises(configlib.ConfigError, match=f"config.{bad_field}="):
      configlib.validate(config)
