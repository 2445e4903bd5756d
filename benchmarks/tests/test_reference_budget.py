"""benchmarks/reference_budget.py: the budget it sets, its overrides, and the table it prints."""
import os
import statistics
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import reference_budget as rb  # noqa: E402

from admm_jax.app import configlib  # noqa: E402


def test_config_is_the_budget_plus_overrides_and_validates():
  config = rb.make_config(2, rb.parse_overrides(["admm.rho=0.001", "retrain.schedule=cosine"]),
                          stages="admm,retrain", sparsity=rb.SCHEMES["filter"])
  configlib.validate(config)
  assert config.seed == 2 and config.model.width == 4 and config.data.limit_train == 20000
  assert (config.attack.steps, config.attack.step_size, config.attack.eps) == (10, 0.01, 0.1)
  assert (config.attack.eval_steps, config.attack.eval_step_size) == (10, 0.01)
  assert config.pretrain.epochs == config.admm.epochs == config.retrain.epochs == 2
  assert config.admm.rho == 0.001 and config.retrain.schedule == "cosine"
  assert config.sparsity == rb.SCHEMES["filter"]


def test_budget_is_20000_labelled_examples_in_all_and_the_full_test_split():
  config = rb.make_config(0, {})
  assert config.data.validation_in_limit and config.data.limit_train == rb.LABELLED
  sizes = rb.check_data(config)
  assert sizes == {"train": 18000, "validation": 2000, "test": 10000, "labelled_examples": 20000}
  with pytest.raises(SystemExit, match="gives 20000 labelled .* and 500 test"):
    rb.check_data(rb.make_config(0, {"data.limit_test": 500}))
  on_top = rb.check_data(rb.make_config(0, {"data.validation_in_limit": False}))
  assert on_top["labelled_examples"] == 22000 and on_top["train"] == 20000
  with pytest.raises(SystemExit, match="budget is 20000 labelled .* gives 19000 labelled"):
    rb.check_data(rb.make_config(0, {"data.limit_train": 19000}))


def test_a_cell_finished_under_another_config_stops_the_benchmark_before_any_work(tmp_path,
                                                                                capsys):
  from admm_jax.app import workdir
  cell = tmp_path / "s0" / "irregular"
  (cell / "outputs").mkdir(parents=True)
  (cell / "outputs" / "admm.json").write_text("{}")
  workdir.record_config(str(cell), rb.make_config(0, {}, stages="admm,retrain",
                                                  init_from=str(tmp_path / "s0" / "pretrain"),
                                                  sparsity=rb.SCHEMES["irregular"]), {})
  argv = [f"--workdir={tmp_path}", "--seeds=0", "--schemes=irregular", "--no-malloc-tuning"]
  with pytest.raises(SystemExit) as e:
    rb.main([*argv, "--set", "admm.rho=0.5"])
  assert e.value.code == 2
  error = capsys.readouterr().err.strip()
  assert error.startswith("error: the config differs") and "admm.rho 0.03 -> 0.5" in error
  assert sorted(p.name for p in tmp_path.iterdir()) == ["s0"]   # nothing ran, no summary


def test_a_cell_whose_config_is_refused_raises_that_error_and_leaves_no_folder(tmp_path):
  from admm_jax.app.errors import UserError
  config = rb.make_config(0, {"admm.rho": -1.0}, stages="admm,retrain",
                          sparsity=rb.SCHEMES["irregular"])
  cell = tmp_path / "s0" / "irregular"
  with pytest.raises(UserError, match="admm.rho"):
    rb.run_cell(config, str(cell))
  assert not cell.exists()


def test_bad_override_is_one_sentence():
  with pytest.raises(SystemExit, match="not field=value"):
    rb.parse_overrides(["admm.rho"])
  with pytest.raises(SystemExit, match="cannot set config.admm.nope"):
    rb.make_config(0, {"admm.nope": 1})


def _report(nat, adv, pruned, compression=77.0):
  stage = {"natural_accuracy": nat, "adversarial_accuracy": adv,
           "val_natural_accuracy": nat, "val_adversarial_accuracy": adv}
  return {"stages": {"pretrain": stage,
                     "admm": dict(stage, admm={"relative_primal_residual": {"a": 0.2, "b": 0.05}}),
                     "retrain": dict(stage, after_hard_prune_test_natural_accuracy=pruned,
                                     after_hard_prune_test_adversarial_accuracy=pruned,
                                     after_hard_prune_val_natural_accuracy=pruned,
                                     after_hard_prune_val_adversarial_accuracy=pruned)},
          "sparsity": {"compression": compression}, "_wall_time_s": 100.0}


def test_collect_takes_mean_and_spread_over_seeds_and_the_table_shows_the_reference():
  reports = [_report(0.70, 0.60, 0.30), _report(0.72, 0.64, 0.40), _report(0.74, 0.62, 0.50)]
  summary = rb.collect({"irregular": reports}, reports)
  mean, std = summary["irregular"]["retrain"]["adversarial"]
  assert mean == pytest.approx(62.0) and std == pytest.approx(statistics.stdev([60, 64, 62]))
  assert summary["irregular"]["after_hard_prune"]["natural"][0] == pytest.approx(40.0)
  assert summary["irregular"]["admm_max_relative_residual"][0] == pytest.approx(0.2)
  text = rb.table(summary, [0, 1, 2])
  assert "data: unknown" in text  # these fake reports name no dataset
  summary["data"] = {"train": 18000, "validation": 2000, "test": 10000, "labelled_examples": 20000}
  text = rb.table(summary, [0, 1, 2])
  assert "20,000 labelled examples per run (18,000 train + 2,000 validation), 10,000 test" in text
  assert "68.67 +- 0.74" in text and "62.00 +-" in text and "hard-pruned" in text
  assert "32.07" in text  # the reference's accuracy right after hard pruning


def test_apgd_ce_t_is_the_headline_column_with_pgd10_beside_it():
  # The offline default's own evaluation writes APGD-CE+T on the first 1000 into every stage.
  def with_apgd(report, robust, examples=1000, label="apgd-ce+apgd-t"):
    for rec in report["stages"].values():
      rec.update({"final_attack": label, f"{label}_accuracy": robust,
                  f"{label}_examples": examples, "test_examples": 10000})
    return report
  reports = [with_apgd(_report(0.70, 0.60, 0.30), 0.50), with_apgd(_report(0.72, 0.64, 0.40), 0.56)]
  summary = rb.collect({"filter": reports}, reports)
  assert summary["filter"]["retrain"]["apgd_ce_t"][0] == pytest.approx(53.0)
  assert summary["pretrain"]["apgd_ce_t"][0] == pytest.approx(53.0)
  header, *rows = rb.table(summary, [0, 1]).splitlines()[3:]
  assert header.split()[2:5] == ["natural", "APGD-CE+T", "PGD-10"]
  retrain = next(r for r in rows if r.startswith("filter") and "retrain" in r)
  assert retrain.index("53.00 +- 4.24") < retrain.index("62.00 +- 2.83")  # APGD, then PGD-10
  assert "filter 42.2" in rb.table(summary, [0, 1])   # the authors' seed-0 APGD-CE+T
  # Another attack, or another number of examples, is not APGD-CE+T on the first 1000: '-'.
  other = [with_apgd(_report(0.7, 0.6, 0.3), 0.4, examples=500), with_apgd(
      _report(0.7, 0.6, 0.3), 0.4, label="autoattack")]
  assert [rb.apgd_accuracy(r["stages"]["retrain"]) for r in other] == [None, None]
  line = next(r for r in rb.table(rb.collect({"filter": other}, other), [0]).splitlines()
              if r.startswith("filter") and "retrain" in r)
  assert line.split()[5] == "-"   # scheme, stage, natural mean +- std, APGD-CE+T
