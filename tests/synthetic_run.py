"""A finished run written directly (no training): the export tests' workdirs."""
import json

from admm_jax import sparsity
from admm_jax.app import checkpoint, configlib


def export_config(sparsity_text: str):
  """LeNet(1), a few dozen examples, a 2-step evaluation PGD: what the export re-measures."""
  config = configlib.base_config()
  config.model.width = 1
  config.data.update(limit_train=64, validation_size=32, limit_test=48)
  config.eval_batch_size = 32
  config.attack.update(eval_steps=2)
  config.sparsity = sparsity_text
  return config


def write_stage(root, stage, params=None, the_spec=None):
  """<root>/outputs/<stage> (the params, if any) and its finished record (with the sparsity
  report when a spec is given)."""
  if params is not None:
    with checkpoint.manager(str(root / "outputs" / stage), 1) as mngr:
      checkpoint.save(mngr, 0, {"params": params, "batch_stats": {}})
  extra = {} if the_spec is None else {"sparsity": sparsity.report(params, the_spec).to_dict()}
  (root / "outputs").mkdir(parents=True, exist_ok=True)
  with open(root / "outputs" / f"{stage}.json", "w") as f:
    json.dump({"natural_accuracy": 0.1, "adversarial_accuracy": 0.05, **extra}, f)


def write_report(root, config):
  with open(root / "report.json", "w") as f:
    json.dump({"config": json.loads(config.to_json_best_effort())}, f)
