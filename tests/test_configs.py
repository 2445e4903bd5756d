"""Every shipped config (and variant) validates and its sparsity patterns fit its model."""
import importlib.util
import os

import jax
import pytest

from admm_jax import configlib, models, sparsity

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = [("fashion_mnist_lenet", None), ("fashion_mnist_lenet", "tiny"),
         ("mnist_lenet", None), ("mnist_lenet", "filter"), ("mnist_lenet", "column"),
         ("cifar10_vgg16", None), ("cifar10_vgg16", "irregular"), ("cifar10_vgg16", "column"),
         ("cifar10_resnet18", None), ("cifar10_resnet18", "irregular")]
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


def test_unknown_variant_is_an_error():
  with pytest.raises(ValueError, match="unknown config argument"):
    _load("mnist_lenet").get_config("rows")


def test_parse_sparsity_forms():
  assert configlib.parse_sparsity("a/kernel=filter:0.5, b.*/kernel=2:4") == {
      "a/kernel": ("filter", 0.5), "b.*/kernel": ("2:4", None)}
  with pytest.raises(configlib.ConfigError, match="not a number"):
    configlib.parse_sparsity("a/kernel=filter:x")
