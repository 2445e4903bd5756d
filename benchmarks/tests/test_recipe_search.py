"""benchmarks/recipe_search.py: its rows are the table of docs/method.md section 8, each a valid
config at the budget; bad arguments are one sentence; a row runs reference_budget with its
overrides and prints the table's columns (reference_budget itself is faked: no training)."""
import json
import os
import re

import pytest
import recipe_search as rs
import reference_budget as rb

from admm_jax.app import configlib

METHOD = os.path.join(rb.ROOT, "docs", "method.md")


def _search_table_labels():
  text = open(METHOD).read()
  table = text[text.index("| variant (everything else the previous defaults)"):]
  table = table[:table.index("\n\n")]
  return [re.sub(r"\*\*", "", line.split("|")[1]).strip() for line in table.splitlines()[2:]]


def test_rows_are_the_search_table_in_order():
  assert [label for label, _ in rs.ROWS.values()] == _search_table_labels()


@pytest.mark.parametrize("row", list(rs.ROWS))
def test_every_row_is_a_valid_config_at_the_budget(row):
  config = rb.make_config(0, rs.row_overrides(row), stages="admm,retrain",
                          sparsity=rb.SCHEMES["filter"])
  configlib.validate(config)
  assert config.model.width == 4 and config.data.limit_train == rb.LABELLED


def test_the_chosen_row_is_todays_default_and_the_previous_row_the_old_one():
  base = configlib.base_config()
  chosen = rs.row_overrides("rho0.03x1.4")
  assert (chosen["admm.rho"], chosen["admm.rho_growth"]) == (base.admm.rho, base.admm.rho_growth)
  assert rs.row_overrides("rho0.01x1.5") == rs.PREVIOUS


@pytest.mark.parametrize("argv,message", [
    (["--row=nope", "--workdir=w"], "--row='nope' is not a row of the search table"),
    (["--workdir=w"], "--row=None is not a row"),
    (["--row=rho0.05x1.3"], "--workdir is required"),
])
def test_bad_arguments_are_one_sentence_exit_2(argv, message, capsys):
  with pytest.raises(SystemExit) as e:
    rs.main(argv)
  assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_row_runs_the_benchmark_with_its_overrides_and_prints_its_line(tmp_path, monkeypatch,
                                                                         capsys):
  calls = []
  pair = lambda a, b: {"natural": (a, 1.0), "adversarial": (b, 0.5)}

  def fake_main(argv):
    calls.append(argv)
    row_dir = argv[0].split("=", 1)[1]
    os.makedirs(row_dir)
    scheme = {"retrain_val": pair(78.0, 70.0), "after_hard_prune_val": pair(60.0, 50.0),
              "retrain": pair(77.0, 69.0)}
    with open(os.path.join(row_dir, "summary.json"), "w") as f:
      json.dump({"seeds": [0, 1], "results": {"irregular": scheme,
                                              "filter": dict(scheme, retrain_val=pair(76, 66))}},
                f)
    return 0
  monkeypatch.setattr(rb, "main", fake_main)
  assert rs.main(["--row=retrain-sgd0.05", f"--workdir={tmp_path}", "--seeds=0,1"]) == 0
  argv = calls[0]
  assert argv[:2] == [f"--workdir={tmp_path}/rows/retrain-sgd0.05",
                      f"--pretrained={tmp_path}/pretrained"]
  assert rb.parse_overrides([a for a in argv[4:] if "=" in a and not a.startswith("--")]) == \
      {**rs.PREVIOUS, "retrain.optimizer": "sgd", "retrain.lr": 0.05, "retrain.momentum": 0.9,
       "retrain.schedule": "cosine"}
  assert "--validation-on-top" in argv   # as the search ran; --carved drops it
  line = capsys.readouterr().out.strip().splitlines()[-1]
  assert line == ("| retrain SGD 0.05 (momentum 0.9), cosine | 78.0 +- 1.0 / 70.0 +- 0.5 (2) | "
                  "50.0 +- 0.5 | 76.0 +- 1.0 / 66.0 +- 0.5 (2) | 68.0 | 69.0 +- 0.5 | "
                  "69.0 +- 0.5 |")
