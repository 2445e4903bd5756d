"""The benchmark: its JSON rows, and that the PyTorch re-statement computes the same LeNet."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from admm_jax import models
from admm_jax.app import train
import bench  # benchmarks/bench.py (conftest.py puts benchmarks/ on the path)

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench.py")

ROW_NUMBERS = ("admm_jax_ex_per_s", "flops_per_step", "admm_jax_gflop_per_s",
               "admm_jax_pct_of_peak", "compile_s", "xla_memory_mb", "matmul_peak_gflop_per_s")


def test_case_parse_defaults_and_errors():
  assert bench.Case.parse("lenet:16:10") == bench.Case("lenet", 16, 10, 64)
  assert bench.Case.parse("vgg16:4:10") == bench.Case("vgg16", 4, 10, 128)
  assert bench.Case.parse("resnet18:4:10:32").batch == 32
  for bad in ("lenet:16", "alexnet:1:10", "lenet:x:10", "lenet:0:10"):
    with pytest.raises(ValueError):
      bench.Case.parse(bad)


def test_smallest_case_json_schema_without_torch():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one host device, as a user runs it
  for k in [k for k in env if k.startswith("MALLOC_")]:
    env.pop(k)  # a user's own malloc settings would (rightly) turn the tuning off
  out = subprocess.run(
      [sys.executable, BENCH, "--cases", "lenet:1:2:16", "--no-torch",
       "--no-extras", "--json", "--repeats", "2", "--min-seconds", "0.05", "--profile", "5"],
      capture_output=True, text=True, timeout=300, env=env, check=False,
      cwd=os.path.dirname(os.path.dirname(BENCH)))  # from the repository root, as documented
  assert out.returncode == 0, out.stderr[-3000:]
  rows = json.loads(out.stdout)
  assert isinstance(rows, list) and len(rows) == 1
  row = rows[0]
  assert (row["model"], row["width"], row["steps"], row["batch"]) == ("lenet", 1, 2, 16)
  for k in ROW_NUMBERS:
    assert row[k] > 0, (k, row[k])
  assert row["torch_ex_per_s"] is None and row["ratio"] is None
  assert row["recompiles"] == 0
  assert row["machine"]["backend"] == "cpu"
  assert row["machine"]["malloc_tuned"] == sys.platform.startswith("linux")  # as the CLI does
  # --profile: the step's slowest XLA ops, each traced back to the JAX operation it runs.
  prof = row["profile"]
  assert 0 < len(prof["rows"]) <= 5 and prof["ms_per_call"] > 0
  assert any("dot_general" in r["source"] for r in prof["rows"]), prof["rows"]


def test_flops_are_the_models_nominal_count_whatever_conv_impl_runs():
  # LeNet(8)'s conv2 runs as an FFT convolution on CPU (about 2.6x fewer flops than direct);
  # the count must stay the model's, the same as for a step that runs im2col everywhere, and
  # at least what conv2's direct products alone need: 3 passes in the train step's forward
  # and backward, 2 (forward and input gradient) per PGD step.
  case = bench.Case("lenet", 8, 1, 8)
  step = bench.JaxStep(case)
  nominal = step.flops()
  step.model = step.model.clone(conv=models.conv_module("im2col"))
  assert step.flops() == nominal
  conv2_macs = 14 * 14 * 5 * 5 * 16 * 32
  assert nominal >= 2 * conv2_macs * (3 + 2 * case.steps) * case.batch


def test_full_row_with_torch_and_extras_measures_and_formats():
  # One tiny row through everything, in process: the torch twin on its device, the ratio,
  # the optimizer-update costs, the step A/B, the Z/U update, the input pipeline and eval,
  # and the table line that shows them.
  _torch()
  case = bench.Case.parse("lenet:1:2:16")
  row = bench.run_case(case, repeats=2, min_seconds=0.02, use_torch=True, extras=True,
                       peak_gflops=1.0, log=lambda _: None, torch_device_name="cpu")
  assert row["torch_ex_per_s"] > 0 and row["ratio_min"] <= row["ratio"] <= row["ratio_max"]
  assert row["torch_device"] == "cpu" and row["device_peak_mb"] is None  # CPU keeps no stats
  for k in ("sgd_update_ms", "admm_update_ms", "masks_update_ms", "zu_update_ms",
            "numpy_percentile_ms", "input_pipeline_ex_per_s", "eval_pgd_ex_per_s"):
    assert row[k] > 0, (k, row[k])
  step_ms = 1e3 * case.batch / row["admm_jax_ex_per_s"]
  want = 100 * (row["admm_update_ms"] - row["sgd_update_ms"]) / step_ms
  assert row["admm_update_pct_of_step"] == pytest.approx(want)
  line = bench.format_table([row]).splitlines()[-1]
  assert f"{row['admm_update_pct_of_step']:+.2f}%" in line and "(A/B " in line


def test_torch_device_follows_jax_and_refuses_a_gpu_cpu_comparison():
  assert bench.torch_device("auto", "cpu", cuda_available=True) == "cpu"
  assert bench.torch_device("auto", "gpu", cuda_available=True) == "cuda"
  assert bench.torch_device("cpu", "gpu", cuda_available=False) == "cpu"
  with pytest.raises(SystemExit, match="no CUDA.*--no-torch"):
    bench.torch_device("auto", "gpu", cuda_available=False)
  with pytest.raises(SystemExit, match="--torch-device must be auto, cpu or cuda"):
    bench.torch_device("gpu", "cpu", cuda_available=False)


def _torch():
  """torch, or a skip on a machine without it; CI (CI=true) installs it, so there it must import."""
  if os.environ.get("CI") == "true":
    import torch  # pylint: disable=import-outside-toplevel
    return torch
  return pytest.importorskip("torch", reason="torch is not installed (pip install admm_jax[bench])")


def test_torch_lenet_matches_flax_logits():
  torch = _torch()
  import bench_torch
  width = 2
  model = models.get_model("lenet", width)
  params = train.init_variables(model, jax.random.key(3), (28, 28, 1))["params"]
  # Non-zero biases, so that a bias mix-up would show.
  params = jax.tree.map(lambda p: p + 0.01 * np.arange(p.size).reshape(p.shape) / p.size
                        if p.ndim == 1 else p, params)
  x = np.random.default_rng(0).random((5, 28, 28, 1), np.float32)
  want = np.asarray(model.apply({"params": params}, x))
  tmodel = bench_torch.build_model("lenet", width, 1)
  bench_torch.load_flax_params(tmodel, jax.device_get(params), "lenet")
  with torch.no_grad():
    got = tmodel(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_torch_trainer_step_runs_and_keeps_the_attack_in_the_box():
  torch = _torch()
  import bench_torch
  torch.manual_seed(0)
  tmodel = bench_torch.build_model("lenet", 1, 1)
  x = torch.rand(4, 1, 28, 28)
  y = torch.randint(0, 10, (4,))
  x_adv = bench_torch.pgd_attack(tmodel, x, y, eps=0.3, step_size=0.01, steps=3)
  assert float((x_adv - x).abs().max()) <= 0.3 + 1e-6
  assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
  trainer = bench_torch.TorchADMMTrainer(tmodel, eps=0.3, step_size=0.01, steps=2)
  assert np.isfinite(float(trainer.step(x, y)))


def test_case_parse_dtype():
  assert bench.Case.parse("vgg16:16:10:512:bf16") == bench.Case("vgg16", 16, 10, 512, "bfloat16")
  assert bench.Case.parse("lenet:4:10:128:float32").dtype == "float32"
  with pytest.raises(ValueError, match="dtype 'fp16' is unknown"):
    bench.Case.parse("lenet:4:10:128:fp16")


def test_bfloat16_row_against_torch_compile():
  # The accelerator table's row on CPU at toy size: bfloat16 on both sides (autocast in
  # torch), the torch.compile'd twin timed beside eager (aot_eager: compiles in seconds).
  _torch()
  case = bench.Case.parse("lenet:1:1:8:bf16")
  row = bench.run_case(case, repeats=1, min_seconds=0.01, use_torch=True, extras=False,
                       peak_gflops=1.0, log=lambda _: None, torch_device_name="cpu",
                       torch_compile="aot_eager")
  assert row["dtype"] == "bfloat16" and row["torch_compile_backend"] == "aot_eager"
  for k in ("admm_jax_ex_per_s", "torch_ex_per_s", "torch_compile_ex_per_s",
            "torch_compile_ratio", "torch_compile_pct_of_peak", "torch_compile_first_step_s"):
    assert row[k] > 0, (k, row[k])
  line = bench.format_accelerator_table([row]).splitlines()[-1]
  assert "| bfloat16 |" in line and line.count("x |") == 2


def test_gpu_script_writes_rows_resumes_and_prints_the_table(tmp_path):
  # benchmarks/gpu_bench.sh at toy size on CPU (no torch: the row's torch side is tested
  # above): a row per case, skipped when run again, and the table.
  env = dict(os.environ, CASES="lenet:1:1:8:bf16", TORCH_COMPILE="none", PYTHON=sys.executable,
             BENCH_ARGS="--repeats 1 --min-seconds 0.01 --no-torch")
  env.pop("XLA_FLAGS", None)
  script = os.path.join(os.path.dirname(BENCH), "gpu_bench.sh")
  out = tmp_path / "gpu"
  first = subprocess.run(["bash", script, str(out)], capture_output=True, text=True, env=env,
                         timeout=300, check=False, cwd=os.path.dirname(os.path.dirname(BENCH)))
  assert first.returncode == 0, first.stderr[-3000:]
  assert json.loads((out / "lenet_1_1_8_bf16.json").read_text())[0]["dtype"] == "bfloat16"
  assert "| lenet | 1 | 1 | 8 | bfloat16 |" in first.stdout
  again = subprocess.run(["bash", script, str(out)], capture_output=True, text=True, env=env,
                         timeout=120, check=False)
  assert again.returncode == 0 and "done earlier" in again.stderr
  assert again.stdout == first.stdout


def test_torch_state_dict_converts_back_to_the_same_flax_params():
  # reference_grid.py attacks the authors' saved models with admm_jax.evaluate through this
  # conversion; their AttackPGD wrapper saves the keys under 'basic_model.'.
  _torch()
  import bench_torch
  params = train.init_variables(models.get_model("lenet", 2), jax.random.key(4),
                                (28, 28, 1))["params"]
  tmodel = bench_torch.build_model("lenet", 2, 1)
  bench_torch.load_flax_params(tmodel, jax.device_get(params), "lenet")
  sd = {f"basic_model.{k}": v for k, v in tmodel.state_dict().items()}
  back = bench_torch.flax_params_from_torch(sd, 2)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, back)
