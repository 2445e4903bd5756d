"""Model selection under APGD-CE (config.eval.select_by): the fields' checks, what the workdir's
config check makes of them, and the jitted APGD-CE validation under the runtime's sharding.
The trainer's use of it end to end is in test_trainer.py."""
import json
import os

import pytest

from admm_jax.app import compilation, configlib, context, workdir
from fmnist import needs_fmnist

APGD = {"eval.select_by": "apgd-ce"}


@pytest.mark.parametrize("fields,expected", [
    ({"eval.select_by": "apgd"}, "config.eval.select_by='apgd' is invalid: use 'pgd'"),
    ({"eval.select_by": "PGD"}, "config.eval.select_by='PGD' is invalid: use 'pgd'"),
    ({"eval.select_limit": -1}, "config.eval.select_limit=-1 is invalid: use an integer in [0,"),
    ({"eval.select_steps": 0}, "config.eval.select_steps=0 is invalid: use an integer in [1,"),
    ({"eval.select_steps": 10**6}, "config.eval.select_steps=1000000 is invalid"),
    ({**APGD, "data.validation_size": 0},
     "config.eval.select_by='apgd-ce' is invalid: it selects on validation examples and "
     "data.validation_size=0 holds out none; set data.validation_size > 0 or use 'pgd'."),
])
def test_bad_selection_fields_are_one_sentence_naming_field_and_fix(fields, expected):
  config = configlib.override(configlib.base_config(), fields)
  with pytest.raises(configlib.ConfigError) as e:
    configlib.validate(config)
  message = str(e.value)
  assert expected in message and "\n" not in message and message.endswith(".")


def test_selection_defaults_are_pgd_and_apgd_ce_validates():
  config = configlib.base_config()
  assert (config.eval.select_by, config.eval.select_limit, config.eval.select_steps) == \
      ("pgd", 1000, 100)
  configlib.validate(configlib.override(config, {**APGD, "eval.select_limit": 0}))


def _old_workdir(root, select_by=None, **fields):
  """A workdir whose pretrain finished under base_config + `fields`, its config.json written
  before eval.select_* existed (select_by None) or with them."""
  stored = json.loads(configlib.override(configlib.base_config(), fields).to_json_best_effort())
  for f in ("select_by", "select_limit", "select_steps"):
    del stored["eval"][f]
  if select_by:
    stored["eval"].update(select_by=select_by, select_limit=1000, select_steps=100)
  (root / "config.json").write_text(json.dumps({"config": stored, "history": []}))
  paths = workdir.stage_paths(str(root), "pretrain")
  os.makedirs(os.path.dirname(paths.done))
  (root / "outputs" / "pretrain.json").write_text("{}")


def test_config_from_before_select_by_means_pgd(tmp_path):
  _old_workdir(tmp_path)
  assert workdir.check_config(str(tmp_path), configlib.base_config()) == {}
  # Under "pgd" the APGD-CE budget shapes nothing: free to change.
  assert workdir.check_config(str(tmp_path), configlib.override(
      configlib.base_config(), {"eval.select_limit": 5, "eval.select_steps": 7})) == {}
  with pytest.raises(workdir.ConfigMismatch, match="eval.select_by 'pgd' -> 'apgd-ce'"):
    workdir.check_config(str(tmp_path), configlib.override(configlib.base_config(), APGD))


def test_apgd_ce_budget_shapes_a_run_that_selected_under_it(tmp_path):
  _old_workdir(tmp_path, select_by="apgd-ce")
  same = configlib.override(configlib.base_config(), APGD)
  assert workdir.check_config(str(tmp_path), same) == {}
  with pytest.raises(workdir.ConfigMismatch, match="eval.select_limit 1000 -> 500"):
    workdir.check_config(str(tmp_path), configlib.override(same, {"eval.select_limit": 500}))
  with pytest.raises(workdir.ConfigMismatch, match="eval.select_by 'apgd-ce' -> 'pgd'"):
    workdir.check_config(str(tmp_path), configlib.base_config())


@pytest.mark.slow   # ~12 s on 2 loaded cores: APGD-CE compiled for 1 and for 8 devices
@needs_fmnist
def test_apgd_ce_validation_compiles_once_and_8_devices_match_1(tmp_path):
  """The jitted APGD-CE validation step: one compilation per model width whatever the
  params, and the batch sharded over 8 devices counts what one device counts."""
  results = {}
  for axis in (1, 0):   # one device, then all 8 (conftest)
    config = configlib.override(configlib.base_config(), {
        **APGD, "eval.select_limit": 40, "eval.select_steps": 3, "data.limit_train": 256,
        "data.validation_size": 64, "data.limit_test": 8, "eval_batch_size": 64,
        "model.width": 1, "parallel.data_axis": axis, "stages": "pretrain"})
    ctx = context.make_context(config, str(tmp_path / str(axis)))
    model = ctx.model(1)
    variables = [ctx.fresh_variables(model, init) for init in ("pretrain", "other")]
    key = ctx.key("select", "pretrain")
    first = ctx.evaluate(model, **variables[0], split="validation", key=key,
                         attack=ctx.select_attack, limit=40)
    before = compilation.COUNTER.snapshot()
    second = ctx.evaluate(model, **variables[1], split="validation", key=key,
                          attack=ctx.select_attack, limit=40)
    assert (compilation.COUNTER.snapshot() - before).programs == 0   # compiled once
    assert ctx.eval_step(ctx.model(1), ctx.select_attack) is ctx.eval_step(model,
                                                                            ctx.select_attack)
    assert first["count"] == second["count"] == 40
    results[ctx.runtime.num_devices] = (first, second)
  assert set(results) == {1, 8}
  for one, eight in zip(results[1], results[8]):
    # Per-example attacks on the same keys: at most a rounding-flipped example apart.
    for k in ("natural_accuracy", "adversarial_accuracy"):
      assert abs(one[k] - eight[k]) <= 1 / 40, (k, one, eight)
