"""The workdir remembers its config: which field shapes which stage, what a rerun may change,
and what config.json records (admm_jax.workdir; the trainer's use in test_trainer.py)."""
import json
import os

import pytest

from admm_jax.app import configlib, workdir


def _begin(root, stage, finished):
  paths = workdir.stage_paths(str(root), stage)
  os.makedirs(os.path.join(paths.checkpoints, "10"), exist_ok=True)
  os.makedirs(os.path.dirname(paths.done), exist_ok=True)
  if finished:
    with open(paths.done, "w") as f:
      json.dump({}, f)


@pytest.mark.parametrize("field,stages", [
    ("seed", ("pretrain", "admm", "retrain", "scratch", "inherited", "scores", "finetune")),
    ("data.limit_train", ("pretrain", "admm", "retrain", "scratch", "inherited", "scores",
                          "finetune")),
    ("admm.rho", ("admm", "retrain", "scratch", "inherited", "scores", "finetune")),
    ("retrain.lr", ("retrain", "scratch", "inherited", "scores", "finetune")),
    ("sparsity", ("admm", "retrain", "scratch", "inherited", "scores", "finetune")),
    ("scores.init", ("scores", "finetune")),
    ("stages", ()), ("log_every_steps", ()), ("eval.final_attack", ()),
    ("eval.final_limit", ()), ("parallel.data_axis", ()), ("checkpoint_every_steps", ()),
    ("eval.select_by", ("pretrain", "admm", "retrain", "scratch", "inherited", "scores",
                        "finetune")),   # chooses each stage's output epoch
])
def test_a_field_shapes_its_stage_and_the_later_ones(field, stages):
  assert workdir.shaped_stages(field) == stages


def test_new_workdir_is_recorded_and_the_same_config_passes(tmp_path):
  config = configlib.base_config()
  assert workdir.check_config(str(tmp_path), config) == {}
  workdir.record_config(str(tmp_path), config, {})
  stored = json.loads((tmp_path / "config.json").read_text())
  assert stored == {"config": json.loads(config.to_json_best_effort()), "history": []}
  assert stored["config"]["admm"]["rho"] == config.admm.rho   # readable: config.to_dict()
  _begin(tmp_path, "pretrain", finished=True)
  assert workdir.check_config(str(tmp_path), configlib.base_config()) == {}


def test_changed_field_of_a_finished_stage_stops_naming_old_new_and_the_ways_out(tmp_path):
  config = configlib.base_config()
  workdir.record_config(str(tmp_path), config, {})
  _begin(tmp_path, "pretrain", finished=True)
  _begin(tmp_path, "admm", finished=False)
  changed = configlib.override(configlib.base_config(), {"admm.rho": 0.5, "seed": 3,
                                                        "retrain.lr": 0.1})
  with pytest.raises(workdir.ConfigMismatch) as e:
    workdir.check_config(str(tmp_path), changed)
  message = str(e.value)
  assert "admm.rho 0.03 -> 0.5" in message and "seed 0 -> 3" in message
  assert "retrain.lr" not in message          # retrain has not begun: it shapes no result
  assert "pretrain finished, admm running" in message
  assert "another --workdir" in message and f"--config.init_from={tmp_path}" in message
  assert "\n" not in message and isinstance(e.value, workdir.WorkdirError)   # exit code 2


def test_changes_that_shape_no_result_are_accepted_and_recorded(tmp_path):
  config = configlib.override(configlib.base_config(), {"stages": "pretrain"})
  workdir.record_config(str(tmp_path), config, {})
  _begin(tmp_path, "pretrain", finished=True)
  later = configlib.override(configlib.base_config(), {
      "stages": "pretrain,admm,retrain", "admm.rho": 0.5, "eval.final_attack": "apgd-ce",
      "log_every_steps": 7})
  changes = workdir.check_config(str(tmp_path), later)
  assert changes == {"admm.rho": [0.03, 0.5], "eval.final_attack": ["", "apgd-ce"],
                     "log_every_steps": [200, 7], "stages": ["pretrain", "pretrain,admm,retrain"]}
  workdir.record_config(str(tmp_path), later, changes)
  stored = json.loads((tmp_path / "config.json").read_text())
  assert stored["config"]["admm"]["rho"] == 0.5 and len(stored["history"]) == 1
  assert stored["history"][0]["changes"] == changes
  # The accepted config is the new reference: admm, once begun, holds rho 0.5.
  _begin(tmp_path, "admm", finished=False)
  with pytest.raises(workdir.ConfigMismatch, match="admm.rho 0.5 -> 0.03"):
    workdir.check_config(str(tmp_path), configlib.base_config())


def test_workdir_from_before_config_json_is_checked_against_its_report(tmp_path):
  old = configlib.base_config()
  saved = json.loads(old.to_json_best_effort())
  del saved["data"]["validation_in_limit"]    # a field added since: today's default applies
  (tmp_path / "report.json").write_text(json.dumps({"config": saved}))
  _begin(tmp_path, "pretrain", finished=True)
  assert workdir.check_config(str(tmp_path), old, configlib.base_config()) == {}
  carved = configlib.override(configlib.base_config(), {"data.validation_in_limit": True})
  with pytest.raises(workdir.ConfigMismatch, match="data.validation_in_limit False -> True"):
    workdir.check_config(str(tmp_path), carved, configlib.base_config())


def test_damaged_config_json_is_one_sentence(tmp_path):
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(workdir.WorkdirError, match="config.json .* is damaged"):
    workdir.check_config(str(tmp_path), configlib.base_config())


@pytest.mark.parametrize("sparsity,blocks", [("fc1/kernel=irregular:0.9:4b", True),
                                             ("fc1/kernel=irregular:0.9", False)])
def test_a_field_added_since_means_what_its_absence_did(tmp_path, sparsity, blocks):
  # Before retrain.grid existed, k-bit layers retrained on their grid ("train"): today's
  # default "end" would give other numbers, so a finished k-bit retrain is not reused.
  config = configlib.override(configlib.base_config(), {"sparsity": sparsity})
  stored = json.loads(config.to_json_best_effort())
  del stored["retrain"]["grid"], stored["inherited"]["grid"]
  (tmp_path / "config.json").write_text(json.dumps({"config": stored, "history": []}))
  for stage in ("pretrain", "admm", "retrain"):
    _begin(tmp_path, stage, finished=True)
  if blocks:
    with pytest.raises(workdir.ConfigMismatch, match="retrain.grid 'train' -> 'end'"):
      workdir.check_config(str(tmp_path), config)
  else:   # float layers: the field changes nothing, the old results stand
    assert workdir.check_config(str(tmp_path), config) == {}
  # Saying what the finished retrain did passes (inherited has not begun: its field is free).
  changes = workdir.check_config(str(tmp_path), configlib.override(
      configlib.base_config(), {"sparsity": sparsity, "retrain.grid": "train"}))
  assert "retrain.grid" not in changes
