"""benchmarks/quantized_budget.py: the k-bit schemes it runs and the table it prints."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import quantized_budget as qb  # noqa: E402
import reference_budget as rb  # noqa: E402

from admm_jax import sparsity  # noqa: E402
from admm_jax.app import configlib  # noqa: E402


def test_bits_go_on_every_pruned_layer_of_the_reference_schemes():
  assert qb.with_bits(rb.SCHEMES["filter"], None) == rb.SCHEMES["filter"]
  text = qb.with_bits(rb.SCHEMES["irregular"], 4)
  rules = configlib.parse_sparsity(text)
  assert set(rules) == set(configlib.parse_sparsity(rb.SCHEMES["irregular"]))
  assert all(r.bits == 4 and r.scale_mode == "channel"
             for _, r in sparsity.spec(rules).rules)
  config = rb.make_config(0, qb.NO_FINAL, stages="admm,retrain", sparsity=text)
  configlib.validate(config)
  assert config.eval.final_attack == "" and config.model.width == 4


def test_table_shows_bytes_accuracies_and_the_onnx_check():
  base = {"scheme": "irregular", "bits": 4, "file_bytes": 1000, "onnx_bytes": 3000,
          "dense_float32_bytes": 90000, "natural": 80.0, "pgd10": 70.0, "apgd_ce_t": 65.0,
          "onnx_test_accuracy": 0.8001, "onnx_max_abs_logit_difference": 2e-6,
          "test_examples": 10000}
  text = qb.table([dict(base, seed=0), dict(base, seed=1, natural=81.0, onnx_test_accuracy=0.81)])
  line = next(ln for ln in text.splitlines() if ln.startswith("irregular"))
  assert "1000" in line and "80.50 +- 0.71" in line and "1, 2.0e-06" in line
  assert "dense float32 model: 90000 bytes" in text
