"""Compaction and export: the compact network computes the masked model's function with
exactly the kept groups, the artifact runs without admm_jax, and bad input stops cleanly."""
import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from admm_jax import compaction, graph, models, sparsity
from admm_jax.app import configlib, data, export
from model_variables import abstract_variables
import fmnist
import synthetic_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5


def _variables(model, shape, seed=0):
  """Random variables giving logits of order 1: kernels N(0, 1/fan_in), biases and BatchNorm
  shifts of both signs (pruned channels then become constants, zero after ReLU or not)."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if "kernel" in name:
      std = 1 / np.sqrt(np.prod(leaf.shape[:-1]))
    elif "var" in name:
      return rng.uniform(0.5, 1.5, leaf.shape).astype(leaf.dtype)
    elif "scale" in name:
      return (1 + 0.2 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)
    else:
      std = 0.3
    return (std * rng.standard_normal(leaf.shape)).astype(leaf.dtype)
  return jax.tree_util.tree_map_with_path(fill, abstract_variables(model, (1,) + shape))


def _group_mask(shape, kind, ratio, rng):
  """A keep-mask with the groups of `kind` (projections' definitions) chosen at random."""
  if ":" in kind:
    n, m = map(int, kind.split(":"))
    runs = rng.random(shape[:-2] + (shape[-2] // m, m, shape[-1])).argsort(axis=-2) < n
    return runs.reshape(shape)
  groups = {"filter": shape[-1], "column": int(np.prod(shape[:-1])),
            "irregular": int(np.prod(shape))}[kind]
  keep = rng.permutation(groups) >= sparsity.projections.num_removed(groups, ratio)
  if kind == "filter":
    return np.broadcast_to(keep, shape)
  if kind == "column":
    return np.broadcast_to(keep[:, None], (groups, shape[-1])).reshape(shape)
  return keep.reshape(shape)


def _masked(model, shape, rules, seed=0):
  """(masked variables, masks, kinds) for {param path: (kind, ratio)}."""
  rng = np.random.default_rng(seed + 1)
  variables = _variables(model, shape, seed)
  flat = {sparsity.path_str(p): (p, v) for p, v in
          jax.tree_util.tree_leaves_with_path(variables["params"])}
  masks = jax.tree.map(lambda _: None, variables["params"])
  for path, (kind, ratio) in rules.items():
    keys = path.split("/")
    node = masks
    for k in keys[:-1]:
      node = node[k]
    node[keys[-1]] = _group_mask(flat[path][1].shape, kind, ratio, rng)
  variables = dict(variables, params=compaction.apply_masks(variables["params"], masks))
  return variables, masks, {p: k for p, (k, _) in rules.items()}


@functools.partial(jax.jit, static_argnums=0)
def _model_logits(model, variables, x):
  """One compilation per model: the masks are values, the same shapes in every scheme."""
  return model.apply(variables, x, train=False)


def _max_diff(model, variables, g, params, x):
  ref = _model_logits(model, variables, x)
  out = jax.jit(g.apply)(params, x)
  assert ref.shape == out.shape
  ref, out = np.asarray(ref), np.asarray(out)
  return float(np.max(np.abs(ref - out))), float(np.max(np.abs(ref)))


def _fashion_mnist(n):
  images = data.load_local("fashion_mnist", fmnist.require())["test"][0][:n]
  return images.astype(np.float32) / np.float32(255)


# ------------------------------------------------------------------------------ LeNet

LENET_SCHEMES = {
    "filter": {"conv1/kernel": ("filter", 0.5), "conv2/kernel": ("filter", 0.5),
               "fc1/kernel": ("filter", 0.75)},
    "column": {"conv1/kernel": ("column", 0.5), "conv2/kernel": ("column", 0.75),
               "fc1/kernel": ("column", 0.5)},
    "irregular": {"conv1/kernel": ("irregular", 0.6), "conv2/kernel": ("irregular", 0.8),
                  "fc1/kernel": ("irregular", 0.95)},
    "n:m": {"conv2/kernel": ("2:4", None), "fc1/kernel": ("2:4", None)},
}
LENET = models.get_model("lenet", 2)   # fc2 is left dense in every scheme


@pytest.fixture(scope="module")
def lenet_inputs():
  """16 uniform random images and 16 real Fashion-MNIST test images, in one batch."""
  noise = np.random.default_rng(0).random((16, 28, 28, 1), np.float32)
  return np.concatenate([noise, _fashion_mnist(16)])


def _lenet_expected_params(masks, rules):
  """Parameter count from the kept groups (no channel loses all its inputs or consumers)."""
  w = 2
  k1, k2, f = 2 * w, 4 * w, 64 * w
  get = lambda name: np.asarray(masks[name]["kernel"]) if masks[name]["kernel"] is not None \
      else None
  kind = {name: rules.get(f"{name}/kernel", ("dense", None))[0]
          for name in ("conv1", "conv2", "fc1")}
  if kind["conv1"] == "filter":  # pruned filters / neurons have negative biases: dead
    k1 = int(get("conv1")[0, 0, 0].sum())
    k2 = int(get("conv2")[0, 0, 0].sum())
    f = int(get("fc1")[0].sum())
    return (25 * k1 + k1) + (25 * k1 * k2 + k2) + (49 * k2 * f + f) + (f * 10 + 10)
  dense_sizes = {"conv1": 25 * k1, "conv2": 25 * k1 * k2, "fc1": 49 * k2 * f}
  count = 0
  for name, cout in (("conv1", k1), ("conv2", k2), ("fc1", f)):
    mask = get(name)
    if kind[name] == "column":
      count += int(mask.reshape(-1, cout)[:, 0].sum()) * cout
    elif kind[name] in ("irregular", "2:4"):
      count += int(mask.sum())
    else:
      count += dense_sizes[name]
    count += cout
  return count + f * 10 + 10


@pytest.mark.parametrize("scheme", sorted(LENET_SCHEMES))
def test_lenet_compact_equals_masked_model_with_the_kept_groups(scheme, lenet_inputs):
  rules = LENET_SCHEMES[scheme]
  variables, masks, kinds = _masked(LENET, (28, 28, 1), rules)
  if scheme == "filter":  # make pruned channels dead (relu of a negative bias)
    for name in ("conv1", "conv2", "fc1"):
      keep = np.asarray(masks[name]["kernel"]).reshape(-1, variables["params"][name]["bias"]
                                                      .shape[0]).any(axis=0)
      b = np.asarray(variables["params"][name]["bias"])
      variables["params"][name]["bias"] = np.where(keep, b, -np.abs(b) - 0.1)
  else:  # precondition of the count: every channel keeps inputs and consumers
    for name in ("conv1", "conv2", "fc1"):
      if masks[name]["kernel"] is None:
        continue
      k = np.asarray(masks[name]["kernel"])
      assert k.reshape(-1, k.shape[-1]).any(axis=0).all()
      if k.ndim == 4:
        assert k.any(axis=(0, 1, 3)).all()
    if masks["fc1"]["kernel"] is not None:
      assert np.asarray(masks["fc1"]["kernel"]).reshape(7, 7, 8, -1).any(axis=(0, 1, 3)).all()
  g, params = compaction.compact(LENET, variables, masks, (28, 28, 1), kinds=kinds)
  diff, scale = _max_diff(LENET, variables, g, params, lenet_inputs)
  assert diff <= TOL and scale > 0.1
  assert compaction.num_params(params) == _lenet_expected_params(masks, rules)
  storage = {n.name: n.attr("storage") for n in g.nodes if n.op in ("conv", "dense")}
  want = {"irregular": "sparse", "n:m": "n:m"}.get(scheme, "dense")
  assert storage["conv2"] == storage["fc1"] == want and storage["fc2"] == "dense"
  if scheme == "column":  # only the kept patch columns / features are stored; a conv that
    # keeps most of them runs as a plain convolution, one that keeps few gathers them
    assert all(n.attr("rows") for n in g.nodes if n.name in ("conv1", "conv2", "fc1"))
    gathers = {n.name: n.attr("gather", True) for n in g.nodes if n.op == "conv"}
    assert gathers == {"conv1": False, "conv2": True}
  dense_flops = compaction.flops_per_example(
      *graph.from_model(LENET, variables, (28, 28, 1)))
  executed = compaction.flops_per_example(g, params)
  assert compaction.flops_per_example(g, params, nonzero=True) < dense_flops
  # N:M runs densified (CPUs have no N:M units): it saves storage, not executed FLOPs; so do
  # irregular kernels, except for the input features a dense layer no longer reads.
  assert executed == dense_flops if scheme == "n:m" else executed < dense_flops if scheme in (
      "filter", "column") else executed <= dense_flops


def test_compact_from_a_spec_folds_constant_channels(lenet_inputs):
  # Through the spec (masks computed from the weights); positive biases of pruned filters
  # make constant channels that conv2 reads through its ones-kernel and fc1 through its bias.
  variables = _variables(LENET, (28, 28, 1), seed=3)
  variables["params"]["conv1"]["bias"] = np.abs(variables["params"]["conv1"]["bias"]) + 0.1
  the_spec = {"conv1/kernel": ("filter", 0.5), "conv2/kernel": ("filter", 0.5)}
  pruned = compaction.apply_masks(variables["params"],
                              compaction.spec_masks(variables["params"], sparsity.spec(the_spec)))
  g, params = compaction.compact(LENET, variables, the_spec)
  diff, _ = _max_diff(LENET, dict(variables, params=pruned), g, params, lenet_inputs)
  assert diff <= TOL
  assert params["conv2"]["kernel"].shape == (5, 5, 2, 4)
  assert params["conv2"]["ones_kernel"].shape == (5, 5, 4)
  assert params["fc1"]["kernel"].shape == (7 * 7 * 4, 128)


# -------------------------------------------------------------------- VGG and ResNet

def test_vgg16_filter_pruning_keeps_exactly_the_kept_filters():
  model = models.get_model("vgg16", 1)
  rules = {f"conv{i}/kernel": ("filter", 0.5) for i in range(1, 14)}
  variables, masks, kinds = _masked(model, (32, 32, 3), rules, seed=4)
  kept = [3]
  for i in range(1, 14):  # pruned channels: BatchNorm gives -1, ReLU makes them dead
    keep = np.asarray(masks[f"conv{i}"]["kernel"])[0, 0, 0]
    bn = variables["params"][f"bn{i}"]
    bn["bias"] = np.where(keep, bn["bias"], -1.0)
    variables["batch_stats"][f"bn{i}"]["mean"] = np.where(
        keep, variables["batch_stats"][f"bn{i}"]["mean"], 0.0)
    kept.append(int(keep.sum()))
  _, params = compaction.compact(model, variables, masks, (32, 32, 3), kinds=kinds)
  expected = sum(9 * a * b + 4 * b for a, b in zip(kept, kept[1:])) + kept[-1] * 10 + 10
  assert compaction.num_params(params) == expected


def test_vgg16_mixed_schemes_and_dense_layers_compute_the_masked_function():
  model = models.get_model("vgg16", 1)
  rules = {"conv1/kernel": ("filter", 0.5), "conv2/kernel": ("column", 0.5),
           "conv3/kernel": ("2:4", None), "conv5/kernel": ("irregular", 0.8),
           "conv6/kernel": ("filter", 0.5), "conv7/kernel": ("column", 0.7),
           "conv11/kernel": ("filter", 0.75), "fc/kernel": ("irregular", 0.5)}
  variables, masks, kinds = _masked(model, (32, 32, 3), rules, seed=5)
  g, params = compaction.compact(model, variables, masks, (32, 32, 3), kinds=kinds)
  x = np.random.default_rng(1).random((8, 32, 32, 3), np.float32)
  diff, scale = _max_diff(model, variables, g, params, x)
  assert diff <= TOL and scale > 0.1
  assert any("ones_kernel" in q for q in params.values())  # constant channels were folded
  assert params["conv6"]["kernel"].shape[-1] == 8 and params["bn6"]["scale"].shape == (8,)


def test_resnet18_branches_pruned_differently_keep_the_union_of_channels():
  model = models.get_model("resnet18", 1)
  # layer2_0: conv2 and the shortcut conv prune different filters of the 8 channels they
  # add; layer3_1's conv2 prunes half of what its identity shortcut carries.
  rules = {"layer2_0/conv2/kernel": ("filter", 0.5),
           "layer2_0/shortcut_conv/kernel": ("filter", 0.5),
           "layer3_1/conv2/kernel": ("filter", 0.5), "layer1_0/conv1/kernel": ("column", 0.5),
           "layer2_1/conv1/kernel": ("irregular", 0.7), "layer4_0/conv2/kernel": ("2:4", None),
           "conv1/kernel": ("filter", 0.25)}
  variables, masks, kinds = _masked(model, (16, 16, 3), rules, seed=6)
  a = np.asarray(masks["layer2_0"]["conv2"]["kernel"])[0, 0, 0]
  b = np.asarray(masks["layer2_0"]["shortcut_conv"]["kernel"])[0, 0, 0]
  assert (a != b).any()
  g, params = compaction.compact(model, variables, masks, (16, 16, 3), kinds=kinds)
  x = np.random.default_rng(2).random((8, 16, 16, 3), np.float32)
  diff, scale = _max_diff(model, variables, g, params, x)
  assert diff <= TOL and scale > 0.1
  add = next(n for n in g.nodes if n.name == "layer2_0/add")
  # Channels one branch lacks are filled in (its BatchNorm constant, as a shift).
  assert add.attr("places") != (None, None) and "shift" in params["layer2_0/add"]
  assert params["layer2_0/bn2"]["scale"].shape == (int(a.sum()),)


# ------------------------------------------------------------------ the artifact

def test_params_files_round_trip(tmp_path, lenet_inputs):
  variables, masks, kinds = _masked(LENET, (28, 28, 1), LENET_SCHEMES["n:m"])
  g, params = compaction.compact(LENET, variables, masks, (28, 28, 1), kinds=kinds)
  compaction.save_params(str(tmp_path), g, params)
  g2, params2 = compaction.load_params(str(tmp_path))
  assert g2 == g
  assert jax.tree.all(jax.tree.map(
      lambda a, b: a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b)),
      params, params2))


# --------------------------------------------------------------- the command line

@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A finished (synthetic) run: LeNet(1) filter-pruned retrain output, a pretrain marker."""
  _fashion_mnist(1)
  root = tmp_path_factory.mktemp("run")
  config = synthetic_run.export_config("conv1/kernel=filter:0.5,conv2/kernel=filter:0.5")
  model = models.get_model("lenet", 1)
  the_spec = sparsity.spec(configlib.parse_sparsity(config.sparsity))
  variables = _variables(model, (28, 28, 1), seed=7)
  params = compaction.apply_masks(variables["params"], compaction.spec_masks(variables["params"],
                                                                      the_spec))
  synthetic_run.write_stage(root, "retrain", params, the_spec)
  synthetic_run.write_stage(root, "pretrain")
  synthetic_run.write_report(root, config)
  return str(root)


@pytest.fixture(scope="module")
def exported_run(workdir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("exports") / "lenet")
  return out, export.export_workdir(workdir, out, latency_batches=(1, 4), repeats=1)


def test_cli_export_writes_artifact_params_and_measures(exported_run):
  out, summary = exported_run
  assert sorted(os.listdir(out)) == ["export.json", "graph.json", "model.jaxexport",
                                     "model.onnx", "params.npz"]
  assert summary["onnx"]["max_abs_logit_difference"] <= 1e-4 and summary["quantization"] == {}
  with open(os.path.join(out, "export.json")) as f:
    assert json.load(f) == json.loads(json.dumps(summary))
  assert summary["artifact"] == "model.jaxexport"
  ev = summary["evaluation"]
  assert ev["test_examples"] == 48 and ev["max_abs_logit_difference"] <= TOL
  assert ev["artifact_file_matches"] and 0 <= ev["adversarial_accuracy"] <= 1
  assert summary["params"]["compact"] < summary["params"]["dense"]
  assert summary["bytes"]["compact_artifact"] < summary["bytes"]["dense_artifact"]
  assert summary["bytes"]["compact_params"] < summary["bytes"]["dense_params"]
  flops = summary["flops_per_example"]
  assert flops["compact_nonzero"] <= flops["compact"] < flops["dense"]
  assert set(summary["latency"]) >= {"batch_1", "batch_4", "device", "platform"}
  assert "natural" in export.summary_line(summary)


def test_measure_compaction_agrees_with_the_export_and_writes_nothing(workdir, exported_run):
  _, summary = exported_run
  before = sorted(os.listdir(workdir))
  m = export.measure_compaction(workdir, batch=4, repeats=1)
  assert sorted(os.listdir(workdir)) == before
  assert m["params"] == {k: summary["params"][k] for k in ("dense", "compact")}
  assert m["flops_per_example"] == {k: summary["flops_per_example"][k]
                                    for k in ("dense", "compact")}
  assert m["batch"] == 4 and all(t > 0 for t in m["latency_s"].values())


def test_artifact_runs_in_a_process_without_admm_jax(exported_run, tmp_path):
  out, _ = exported_run
  g, params = compaction.load_params(out)
  x = np.concatenate([np.random.default_rng(0).random((4, 28, 28, 1), np.float32),
                      _fashion_mnist(4)])
  np.save(tmp_path / "x.npy", x)
  code = ("import sys, jax, numpy as np\n"
          f"exp = jax.export.deserialize(bytearray(open({os.path.join(out, compaction.ARTIFACT)!r},"
          " 'rb').read()))\n"
          "x = np.load('x.npy')\n"
          "np.save('out.npy', np.asarray(exp.call(x)))\n"
          "np.save('out3.npy', np.asarray(exp.call(x[:3])))  # any batch size\n"
          "assert not any(m.startswith('admm_jax') for m in sys.modules)\n")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
      if p and os.path.abspath(p) != ROOT))
  proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  expected = np.asarray(jax.jit(g.apply)(params, x))
  np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, atol=TOL, rtol=0)
  np.testing.assert_allclose(np.load(tmp_path / "out3.npy"), expected[:3], atol=TOL, rtol=0)


def test_publishing_replaces_an_earlier_export_whole(tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "export.json").write_text("{}")
  (out / "stale.bin").write_text("old")
  out_path, tmp = export._temp_out(str(out))
  with open(os.path.join(tmp, "export.json"), "w") as f:
    f.write("{}")
  export._publish(tmp, out_path)
  assert os.listdir(out) == ["export.json"] and os.listdir(tmp_path) == ["out"]
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "notes.txt").write_text("mine")
  with pytest.raises(export.ExportError, match="is not an earlier export"):
    export._temp_out(str(tmp_path / "other"))


@pytest.mark.parametrize("case, expected", [
    ("no_finished_stage", "has no finished stage"),
    ("dense_stage", "has no sparsity"),
    ("unfinished_stage", "is not finished"),
    ("unwritable_out", "is not writable"),
])
def test_bad_input_is_one_sentence_and_leaves_nothing(case, expected, workdir, tmp_path):
  out = tmp_path / "out"
  kwargs = {"workdir": workdir, "out": str(out), "stage": "retrain"}
  if case == "no_finished_stage":
    kwargs["workdir"] = str(tmp_path)
  elif case == "dense_stage":
    kwargs["stage"] = "pretrain"
  elif case == "unfinished_stage":
    kwargs["stage"] = "admm"
  else:  # a folder under a file: unwritable for root too
    (tmp_path / "a_file").write_text("")
    kwargs["out"] = str(tmp_path / "a_file" / "out")
  with pytest.raises(export.ExportError) as e:
    export.export_workdir(**kwargs)
  message = str(e.value)
  assert expected in message and message.count(". ") == 0 and message.endswith(".")
  assert not out.exists() and not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


def test_cli_exit_code_2_on_a_dense_stage(workdir, tmp_path):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  proc = subprocess.run([sys.executable, "-m", "admm_jax.export", f"--workdir={workdir}",
                         "--stage=pretrain", f"--out={tmp_path / 'out'}"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1].startswith("error: stage 'pretrain' has no")
  assert not (tmp_path / "out").exists()
