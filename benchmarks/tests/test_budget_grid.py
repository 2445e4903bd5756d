"""benchmarks/budget_grid.py and reference_grid.py: the --cells text, one tiny cell end to end,
and the pieces of the authors'-code harness that need no torch run."""
import json

import pytest

import budget_grid as bg
import reference_budget as rb
import reference_grid as rg

# A cell shrunk to seconds: 256 examples, LeNet(1), one pass per stage, PGD-1.
TINY = {"data.limit_train": 256, "data.validation_size": 64, "data.limit_test": 64,
        "model.width": 1, "attack.steps": 1, "attack.eval_steps": 1, "eval_batch_size": 64,
        "pretrain.epochs": 1, "admm.epochs": 1, "retrain.epochs": 1}
KEYS = {"cell", "seed", "natural", "pgd10", "apgd_ce_t", "wall_s", "stages"}


def test_cells_parse_in_order_without_repeats():
  cells = bg.parse_cells(" 60000x2:filter,20000x5:irregular,60000x2:filter")
  assert [c.name for c in cells] == ["60000x2:filter", "20000x5:irregular"]
  assert cells[0].settings() == {"data.limit_train": 60000, "pretrain.epochs": 2,
                                 "admm.epochs": 2, "retrain.epochs": 2}
  assert len(bg.parse_cells("all")) == 8 == len({c.name for c in bg.GRID})
  assert bg.parse_budget("20000x5") == (20000, 5)
  assert bg.parse_seeds("0,1,2,1") == [0, 1, 2]


@pytest.mark.parametrize("text,bad", [
    ("60000x3:filter", "60000x3:filter"), ("20000x2", "20000x2"), ("20000x2:dense", "dense"),
    ("20000x2:filter,,", "''"), ("", "''"), ("2e4x2:filter", "2e4x2:filter")])
def test_bad_cells_name_the_item_and_the_form(text, bad):
  with pytest.raises(bg.CellsError, match="is not a cell of the grid") as e:
    bg.parse_cells(text)
  assert bad in str(e.value) and "e.g. 60000x2:filter" in str(e.value)


def test_bad_cells_or_seeds_exit_2_with_one_sentence(tmp_path, capsys):
  assert bg.main([f"--workdir={tmp_path}", "--cells=20000x2:filter,10000x2:filter"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: --cells item '10000x2:filter'") and err.count("\n") == 0
  assert bg.main([f"--workdir={tmp_path}", "--seeds=0,x"]) == 2
  assert "--seeds='0,x'" in capsys.readouterr().err
  with pytest.raises(bg.CellsError, match="'20000x3' is not a budget of the grid"):
    bg.parse_budget("20000x3")
  assert list(tmp_path.iterdir()) == []   # nothing ran


def test_plan_shares_the_pretrain_between_schemes_and_lets_overrides_shrink_a_cell(tmp_path):
  runs = bg.plan(bg.parse_cells("20000x5:irregular,20000x5:filter"), [3], str(tmp_path),
                 {"data.limit_train": 512})
  (_, _, pre_a, run_a), (_, _, pre_b, run_b) = runs
  assert pre_a[1] == pre_b[1] == str(tmp_path / "20000x5" / "s3" / "pretrain")
  assert run_a[1].endswith("20000x5/s3/irregular") and run_b[1].endswith("20000x5/s3/filter")
  config = run_a[0]
  assert (config.pretrain.epochs, config.admm.epochs, config.retrain.epochs) == (5, 5, 5)
  assert config.data.limit_train == 512 and config.data.validation_in_limit
  assert config.eval.final_attack == "" and config.init_from == pre_a[1]
  assert config.sparsity == rb.SCHEMES["irregular"] and config.seed == 3


@pytest.fixture(scope="module")
def tiny_line(tmp_path_factory):
  """One tiny cell and seed through budget_grid.measure, run once for the module."""
  workdir = tmp_path_factory.mktemp("grid")
  [(cell, seed, pre, run)] = bg.plan(bg.parse_cells("20000x2:irregular"), [0], str(workdir), TINY)
  line = bg.measure(cell, seed, pre, run, attack_limit=16, sanity=False)
  return workdir, (cell, seed, pre, run), line


def test_tiny_cell_gives_a_json_line_of_fractions(tiny_line):
  workdir, _, line = tiny_line
  assert set(line) == KEYS and line["cell"] == "20000x2:irregular" and line["seed"] == 0
  json.loads(json.dumps(line))
  for stage in bg.STAGES:
    s = line["stages"][stage]
    for k in ("natural", "pgd10", "apgd_ce_t"):
      assert 0.0 <= s[k] <= 1.0, (stage, k, s[k])
    assert s["apgd_examples"] == 16 and s["wall_s"] > 0
    assert s["apgd_ce_t"] <= s["natural"] + 0.25   # 16 vs 64 examples: loose, but not a %
  assert line["apgd_ce_t"] == line["stages"]["retrain"]["apgd_ce_t"]
  assert line["wall_s"] >= line["stages"]["admm"]["wall_s"] + line["stages"]["retrain"]["wall_s"]
  saved = json.loads((workdir / "20000x2" / "s0" / "irregular" / "bench_eval_retrain.json")
                     .read_text())
  assert saved["robust_accuracy"] == line["apgd_ce_t"] and saved["limit"] == 16
  text = bg.table([line, dict(line, seed=1)])
  assert "20000x2:irregular" in text and "+- 0.00" in text and "whole run" in text


def test_a_rerun_skips_the_finished_cell_and_its_attacks(tiny_line):
  _, (cell, seed, pre, run), line = tiny_line
  again = bg.measure(cell, seed, pre, run, attack_limit=16, sanity=False)
  assert again == line


def test_authors_configs_take_the_cells_epochs_and_seed(tmp_path):
  (tmp_path / "fmnist_filter.yaml").write_text(
      "adv:\n random_seed:\n  0\npretrain:\n epochs:\n  1\n lr:\n  0.001\nadmm:\n epochs:\n  1\n"
      "retrain:\n epochs:\n  1\n")
  (tmp_path / "fmnist_irregular.yaml").write_text((tmp_path / "fmnist_filter.yaml").read_text())
  import yaml
  texts = rg.cell_configs(str(tmp_path), epochs=5, seed=2)
  config = yaml.safe_load(texts["fmnist_filter.yaml"])
  assert [config[s]["epochs"] for s in ("pretrain", "admm", "retrain")] == [4, 4, 4]
  assert config["adv"]["random_seed"] == 2 and config["pretrain"]["lr"] == 0.001


def test_authors_logs_parse():
  log = ("\nTest set: Average nat_loss: 0.5, nat_Accuracy: 7000/10000 (70.00%)\n\n"
         "Test set: Average adv_loss: 0.9, adv Accuracy: 6012/10000 (60.12%)\n" * 2)
  assert rg.log_tests(log) == [(0.70, 0.6012), (0.70, 0.6012)]
  assert rg.stage_walls("STAGE_WALL pretrain 101.5s\nSTAGE_WALL admm_filter 99s\n") == {
      "pretrain": 101.5, "admm_filter": 99.0}


def test_authors_run_refuses_a_used_folder_a_missing_export_and_a_bad_budget(tmp_path, capsys):
  (tmp_path / "out").mkdir()
  argv = ["run", "--budget=20000x5", f"--code={tmp_path}", "--harness", str(tmp_path)]
  with pytest.raises(SystemExit, match="exists: their code cannot resume"):
    rg.main([*argv, f"--out={tmp_path / 'out'}"])
  with pytest.raises(SystemExit, match="holds no ADMM_examples/mnist/adv_main.py"):
    rg.main([*argv, f"--out={tmp_path / 'new'}"])
  assert rg.main(["run", "--budget=30000x5", f"--code={tmp_path}",
                  f"--out={tmp_path / 'new'}"]) == 2
  assert "'30000x5' is not a budget of the grid" in capsys.readouterr().err
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]   # nothing copied or run
