"""benchmarks/methods.py: the cells it plans (budgets, stages, inputs) and the JSON lines it
prints, with the runs and the attack replaced by stand-ins."""
import json

import pytest

import methods
import reference_budget as rb

from admm_jax.app import configlib


def _ratios(text):
  return [r for _, (_, r, *_) in configlib.parse_sparsity(text).items()]


def test_authors_ratios_and_scaled_totals():
  assert methods.authors_total() == pytest.approx(0.988406, abs=1e-6)
  assert methods.sparsity_text("authors", False) == rb.SCHEMES["irregular"]
  assert _ratios(rb.SCHEMES["irregular"]) == list(methods.AUTHORS)
  scaled = _ratios(methods.sparsity_text(0.995, False))
  kept = sum(methods._kept(n, r) for n, r in zip(methods.KERNEL_SIZES, scaled))
  assert abs(kept - 0.005 * sum(methods.KERNEL_SIZES)) <= 2
  assert methods.sparsity_text(0.995, True) == \
      "(conv1|conv2|fc1|fc2)/kernel=irregular:0.995000:global"


def test_plan_builds_valid_cells_and_scores_admm_starts_from_the_admm_cell(tmp_path):
  for method in methods.METHODS:
    config, cell, final = methods.plan(1, 0.995, method, str(tmp_path), 5)
    configlib.validate(config)
    assert cell == str(tmp_path / "s1" / f"{method}-0.995") and config.seed == 1
    assert config.finetune.epochs == config.admm.epochs == config.scores.epochs == 5
    assert config.eval.final_attack == ""
  config, _, final = methods.plan(0, "authors", "scores-admm-global", str(tmp_path), 2)
  assert (config.stages, config.scores.init, final) == ("scores,finetune", "admm", "finetune")
  assert config.init_from == str(tmp_path / "s0" / "admm-global-authors")
  assert config.sparsity.endswith(":global")
  config, _, final = methods.plan(0, "authors", "scores-magnitude", str(tmp_path), 2)
  assert (config.init_from, config.scores.init) == (str(tmp_path / "s0" / "pretrain"),
                                                    "magnitude")


def test_json_lines_one_per_method_ratio_seed(tmp_path, monkeypatch, capsys):
  ran = []

  def fake_run(config, cell):
    ran.append(cell.rsplit("/", 1)[-1])
    stage = {"natural_accuracy": 0.8, "adversarial_accuracy": 0.6}
    return {"stages": {"retrain": stage, "finetune": stage}}, 1.0
  monkeypatch.setattr(methods.rb, "run_cell", fake_run)
  monkeypatch.setattr(methods.qb, "apgd_ce_t", lambda cell, stage: {
      "robust_accuracy": 0.5, "examples": 1000, "sanity_failed": []})
  methods.main([f"--workdir={tmp_path}", "--seeds=0", "--methods=scores-admm",
                "--ratios=authors,0.995", "--json"])
  lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
  assert ran == ["pretrain", "admm-authors", "scores-admm-authors", "admm-0.995",
                 "scores-admm-0.995"]   # the admm cells run, but only the asked rows print
  assert [(x["method"], x["ratio"]) for x in lines] == [("scores-admm", 0.988406),
                                                        ("scores-admm", 0.995)]
  assert set(lines[0]) == {"method", "ratio", "seed", "natural", "pgd10", "apgd_ce_t"}
  assert (lines[0]["natural"], lines[0]["pgd10"], lines[0]["apgd_ce_t"]) == (0.8, 0.6, 0.5)
  with pytest.raises(SystemExit, match="--methods takes"):
    methods.main([f"--workdir={tmp_path}", "--methods=hydra"])
