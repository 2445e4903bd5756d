"""benchmarks/selection_agreement.py: which epoch PGD and APGD-CE pick, on hand-written
metrics.jsonl records, and the command line on a workdir; selection_cost.py on a tiny budget."""
import json

import selection_agreement as sa


def _line(stage, epoch, pgd, apgd=None, **extra):
  line = {"stage": stage, "epoch": epoch, "val_adversarial_accuracy": pgd, **extra}
  return line if apgd is None else {**line, "val_apgd_ce_accuracy": apgd}


RECORDS = [
    _line("pretrain", 1, 0.60, 0.40), _line("pretrain", 2, 0.70, 0.35),
    _line("pretrain", 3, 0.65, 0.45),
    _line("admm", 1, 0.50), _line("admm", 2, 0.55),            # last iterate: no APGD-CE
    _line("retrain", 1, 0.62, 0.41), _line("retrain", 2, 0.62, 0.41),   # ties: the first
]


def test_each_criterion_picks_its_best_epoch_and_ties_go_to_the_first():
  picks = sa.selection_epochs(RECORDS)
  assert list(picks) == ["pretrain", "retrain"]
  assert picks["pretrain"] == {
      "epochs": 3, "pgd_epoch": 2, "apgd_ce_epoch": 3, "agree": False,
      "pgd": {"val_adversarial_accuracy": 0.70, "val_apgd_ce_accuracy": 0.35},
      "apgd_ce": {"val_adversarial_accuracy": 0.65, "val_apgd_ce_accuracy": 0.45}}
  assert (picks["retrain"]["pgd_epoch"], picks["retrain"]["apgd_ce_epoch"]) == (1, 1)
  assert picks["retrain"]["agree"]
  assert sa.selection_epochs([_line("pretrain", 1, 0.5)]) == {}


def test_a_repeated_epoch_counts_once_with_its_later_line():
  records = [_line("pretrain", 1, 0.2, 0.9), _line("pretrain", 2, 0.3, 0.1),
             _line("pretrain", 1, 0.1, 0.05)]
  picks = sa.selection_epochs(records)["pretrain"]
  assert (picks["epochs"], picks["pgd_epoch"], picks["apgd_ce_epoch"]) == (2, 2, 2)


def test_command_line_prints_per_stage_and_the_agreement(tmp_path, capsys):
  run = tmp_path / "run"
  run.mkdir()
  (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
  assert sa.main([str(run), "--json"]) == 0
  lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
  assert [(x.get("stage"), x.get("agree")) for x in lines[:2]] == [("pretrain", False),
                                                                   ("retrain", True)]
  assert lines[-1] == {"agree": 1, "stages": 2}
  assert sa.main([str(run)]) == 0
  text = capsys.readouterr().out
  assert "pretrain (3 epochs): PGD picks epoch 2" in text and "agreement: 1 of 2" in text
  assert sa.main([str(tmp_path / "missing")]) == 2
  assert "metrics.jsonl does not exist" in capsys.readouterr().err



def test_selection_cost_times_both_validation_passes():
  import selection_cost  # pylint: disable=import-outside-toplevel
  out = selection_cost.measure(width=1, limit=8, steps=1, repeats=1, **{
      "data.validation_size": 64, "data.limit_train": 256, "eval_batch_size": 64})
  assert (out["apgd_ce"]["examples"], out["apgd_ce"]["steps"], out["pgd"]["examples"]) == \
      (8, 1, 64)
  # Times only (a benchmark, not a timed test): rounded to 0.01 s, a tiny pass may show 0.0.
  assert all(isinstance(out[k][t], float) and out[k][t] >= 0
             for k in ("apgd_ce", "pgd") for t in ("first_s", "pass_s"))
