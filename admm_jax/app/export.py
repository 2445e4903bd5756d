"""The export command's logic: a finished stage of a workdir -> a compacted `jax.export`
artifact with its weights, checked against the masked model (accuracy, logits, latency).
The compaction itself is the library's `admm_jax.compaction`.

  python -m admm_jax.export --workdir=runs/x [--stage=retrain] --out=runs/x/export
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from admm_jax import deploy, sparsity
from admm_jax import graph as graph_lib
from admm_jax.compaction import (ARTIFACT, PLATFORMS, apply_masks, compact, exported,
                                 flops_per_example, num_params, save_params, serialize,
                                 spec_masks)
from admm_jax.graph import Graph, Params
from admm_jax.app import stages
from admm_jax.app.errors import UserError


class ExportError(UserError, ValueError):
  """The workdir, stage or --out cannot be exported as asked; one sentence for the user."""




def _finished_stages(workdir: str) -> list[str]:
  folder = os.path.join(workdir, "outputs")
  if not os.path.isdir(folder):
    return []
  return sorted(f[:-len(".json")] for f in os.listdir(folder) if f.endswith(".json"))


def _read_stage(workdir: str, stage: str) -> tuple[dict, dict]:
  """(the run's report, the stage's record); ExportError when they are not there."""
  workdir = os.path.abspath(workdir)
  finished = _finished_stages(workdir)
  report_path = os.path.join(workdir, "report.json")
  if not finished or not os.path.exists(report_path):
    raise ExportError(f"workdir {workdir!r} has no finished stage (no outputs/<stage>.json and "
                      "report.json): run python -m admm_jax.main with this --workdir first.")
  if stage not in finished:
    raise ExportError(f"stage {stage!r} is not finished in {workdir} (finished: "
                      f"{', '.join(finished)}): finish it or pass --stage=<one of those>.")
  with open(os.path.join(workdir, "outputs", f"{stage}.json")) as f:
    record = json.load(f)
  if not stages.STAGES[stage].sparse or "sparsity" not in record:
    raise ExportError(f"stage {stage!r} has no sparsity (its model is dense), so there is "
                      f"nothing to compact: export --stage=retrain (or admm, hard-pruned).")
  with open(report_path) as f:
    return json.load(f), record


def _temp_out(out: str) -> tuple[str, str]:
  """(absolute --out, a fresh temporary folder beside it); ExportError if it cannot be."""
  out = os.path.abspath(os.path.expanduser(out))
  if os.path.exists(out) and (not os.path.isdir(out) or (
      os.listdir(out) and not os.path.exists(os.path.join(out, "export.json")))):
    raise ExportError(f"--out={out!r} exists and is not an earlier export: choose a new "
                      "folder (an earlier export there is replaced).")
  try:
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=os.path.dirname(out))
  except OSError as e:
    raise ExportError(f"--out={out!r} is not writable ({e.strerror}): choose another folder "
                      "or fix its permissions.") from None
  return out, tmp


def _publish(tmp: str, out: str) -> None:
  """Moves the finished export into place; an earlier export there is replaced whole."""
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's folder is private; the export is not
  old = None
  if os.path.exists(out):
    old = tmp + ".old"
    os.rename(out, old)
  os.rename(tmp, out)
  if old:
    shutil.rmtree(old, ignore_errors=True)


def _load_variables(workdir: str, stage: str, model, image_shape) -> dict:
  from admm_jax.app import checkpoint, train  # pylint: disable=import-outside-toplevel
  like = jax.eval_shape(lambda: train.init_variables(model, jax.random.key(0), image_shape))
  like = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), like)
  with checkpoint.manager(os.path.join(workdir, "outputs", stage)) as mngr:
    _, variables = checkpoint.restore_latest(mngr, like)
  if variables is None:
    raise ExportError(f"stage {stage!r} is marked finished in {workdir} but outputs/{stage} "
                      "holds no model: rerun that stage.")
  return variables


def _median_latency(fn, x: jax.Array, repeats: int) -> float:
  """Median wall seconds of `fn(x)` over `repeats` calls, after a compiling call."""
  jax.block_until_ready(fn(x))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(x))
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def _evaluate(artifact: jax.export.Exported, masked_fn, dataset, config, stage: str,
              ) -> dict[str, float]:
  """Natural and PGD accuracy of the artifact over the test split (the keys the run used for
  its test numbers), and the largest |logit difference| from the masked model."""
  from admm_jax.app import context, data, train  # pylint: disable=import-outside-toplevel
  a = config.attack
  attack = train.Attack("pgd", a.eps, a.eval_step_size, a.eval_steps, True)
  apply_fn = lambda _, x: artifact.call(x)

  @jax.jit
  def step(batch, key):
    x, y, mask = batch["image"], batch["label"], batch["mask"]
    logits = artifact.call(x)
    diff = jnp.max(jnp.where(mask[:, None], jnp.abs(logits - masked_fn(x)), 0.0))
    x_adv = attack(apply_fn, None, x, y, key)
    return {"count": jnp.sum(mask, dtype=jnp.int32),
            "natural_correct": jnp.sum((jnp.argmax(logits, -1) == y) & mask, dtype=jnp.int32),
            "adversarial_correct": jnp.sum((jnp.argmax(apply_fn(None, x_adv), -1) == y) & mask,
                                           dtype=jnp.int32),
            "max_diff": diff}

  key = context.purpose_key(jax.random.key(config.seed), "test", stage)
  batches = data.epoch_batches(dataset.test, config.eval_batch_size, seed=0, epoch=0,
                               shuffle=False, drop_remainder=False)
  totals = {"count": 0, "natural_correct": 0, "adversarial_correct": 0, "max_diff": 0.0}
  with data.prefetch(batches) as it:
    for i, batch in enumerate(it):
      m = jax.device_get(step(batch, jax.random.fold_in(key, i)))
      for k in ("count", "natural_correct", "adversarial_correct"):
        totals[k] += int(m[k])
      totals["max_diff"] = max(totals["max_diff"], float(m["max_diff"]))
  n = max(totals["count"], 1)
  return {"test_examples": totals["count"],
          "natural_accuracy": totals["natural_correct"] / n,
          "adversarial_accuracy": totals["adversarial_correct"] / n,
          "max_abs_logit_difference": totals["max_diff"]}


def _dense_bytes(variables: dict, tmp: str) -> int:
  """Bytes of the dense variables as an uncompressed .npz (written, measured, removed)."""
  path = os.path.join(tmp, "dense.npz")
  flat = jax.tree_util.tree_leaves_with_path(variables)
  np.savez(path, **{sparsity.path_str(k): np.asarray(v) for k, v in flat})
  size = os.path.getsize(path)
  os.remove(path)
  return size


class _Compacted(NamedTuple):
  config: Any            # the run's config (ml_collections.ConfigDict)
  dataset: Any           # data.Dataset: its test split and image shape
  model: Any             # the flax model
  variables: dict        # the stage's output
  masked: dict           # the same with pruned weights exactly 0
  graph: Graph           # the compact network
  params: Params
  dense_graph: Graph     # the masked model as a graph: its FLOPs, its artifact's size
  dense_params: Params
  bits: dict             # {node: (bits, scale_mode)} of the k-bit layers ({} for float)

  def masked_apply(self, x: jax.Array) -> jax.Array:
    return self.model.apply(self.masked, x, train=False)

  def counts(self) -> dict[str, dict[str, int]]:
    """Parameters (every variable of the dense model) and FLOPs per example, dense vs
    compact."""
    return {"params": {"dense": int(sum(np.size(v) for v in jax.tree.leaves(self.variables))),
                       "compact": num_params(self.params)},
            "flops_per_example": {
                "dense": flops_per_example(self.dense_graph, self.dense_params),
                "compact": flops_per_example(self.graph, self.params)}}


def _compact_stage(workdir: str, stage: str, report: dict) -> _Compacted:
  """Steps 1 and 2 of an export: the stage's output, masked and compacted (writes nothing)."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  from admm_jax import models
  from admm_jax.app import configlib, data  # pylint: disable=import-outside-toplevel
  config = ml_collections.ConfigDict(report["config"])
  logging.info("export 1/7: loading %s's output and the %s test split", stage, config.data.name)
  dataset = data.load_dataset(config.data.name, config.data.dir, config.data.validation_size,
                              config.seed, limit_train=config.data.limit_train,
                              limit_test=config.data.limit_test,
                              tfds_data_dir=config.data.tfds_dir or None)
  model = models.get_model(config.model.name, config.model.width, dataset.num_classes)
  variables = _load_variables(workdir, stage, model, dataset.image_shape)
  the_spec = sparsity.spec(configlib.parse_sparsity(config.sparsity))
  logging.info("export 2/7: compacting %s(w=%d) pruned by %s", config.model.name,
               config.model.width, config.sparsity)
  # k-bit layers are masked by their sparsity set alone: a trained grid weight is in it, and
  # its projection keeps every nonzero (refitting the grid's scale here could move it).
  masks = spec_masks(variables["params"], sparsity.without_bits(the_spec))
  masked = dict(variables, params=apply_masks(variables["params"], masks))
  rules = sparsity.resolve(variables["params"], the_spec)
  kinds = {k: r.kind for k, r in rules.items()}
  g, params = compact(model, masked, masks, dataset.image_shape, kinds=kinds)
  bits = {k.rsplit("/", 1)[0]: (r.bits, r.scale_mode) for k, r in rules.items()
          if r.bits is not None}
  return _Compacted(config, dataset, model, variables, masked, g, params,
                    *graph_lib.from_model(model, masked, dataset.image_shape), bits)


def measure_compaction(workdir: str, stage: str = "retrain", batch: int = 256,
                       repeats: int = 5) -> dict[str, Any]:
  """What compaction buys a run's stage, without writing an export: parameters and FLOPs per
  example dense vs compact, and the median latency of one batch of `batch` random images,
  the masked flax model vs the compact network (both jitted, weights as constants, on
  jax's default device). The study's speed-up row; raises ExportError as export_workdir."""
  workdir = os.path.abspath(workdir)
  report, _ = _read_stage(workdir, stage)
  c = _compact_stage(workdir, stage, report)
  x = jax.random.uniform(jax.random.key(batch), (batch,) + tuple(c.dataset.image_shape))
  compact_fn = jax.jit(lambda x: c.graph.apply(c.params, x))
  return {"stage": stage, "batch": batch, "device": str(jax.devices()[0].device_kind),
          **c.counts(),
          "latency_s": {"dense_masked": _median_latency(jax.jit(c.masked_apply), x, repeats),
                        "compact": _median_latency(compact_fn, x, repeats)}}


ONNX_FILE = "model.onnx"
PACKED_FILE = "quantized.bin"


def _require_onnx() -> None:
  try:
    import onnx, onnxruntime  # noqa: F401,E401  pylint: disable=import-outside-toplevel,multiple-imports
  except ImportError as e:
    raise ExportError(f"the export writes an ONNX model and needs {e.name}: install the onnx "
                      "extra (pip install 'admm_jax[onnx]').") from None


def _deployables(c: _Compacted, tmp: str) -> tuple[dict, Any]:
  """Writes the packed k-bit file (if any layer has bits) and model.onnx into `tmp`; returns
  ({file: bytes}, the ONNX model). ExportError for a layer off its grid or an op ONNX lacks."""
  try:
    quantized = deploy.quantize_graph(c.graph, c.params, c.bits)
    model = deploy.to_onnx(c.graph, c.params, quantized)
  except (deploy.OffGridError, deploy.UnsupportedOpError) as e:
    raise ExportError(f"cannot export: {e}") from None
  sizes = {}
  if quantized:
    blob, meta = deploy.pack(c.graph, c.params, quantized)
    sizes["quantized_params"] = deploy.write_packed(os.path.join(tmp, PACKED_FILE), blob, meta)
  with open(os.path.join(tmp, ONNX_FILE), "wb") as f:
    f.write(model.SerializeToString())
  sizes["onnx"] = os.path.getsize(os.path.join(tmp, ONNX_FILE))
  return sizes, quantized


def _check_onnx(path: str, jax_fn, dataset, batch_size: int, latency_batches, repeats: int
                ) -> dict[str, Any]:
  """onnxruntime on the written file: test accuracy, largest |logit - jax logit| over the
  whole test split, and median latency per batch size."""
  import onnxruntime as ort  # pylint: disable=import-outside-toplevel
  from admm_jax.app import data  # pylint: disable=import-outside-toplevel
  sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
  run = lambda x: sess.run(["logits"], {"images": np.asarray(x, np.float32)})[0]
  correct = count = 0
  diff = 0.0
  for batch in data.epoch_batches(dataset.test, batch_size, seed=0, epoch=0, shuffle=False,
                                  drop_remainder=False):
    m = np.asarray(batch["mask"], bool)
    x, y = np.asarray(batch["image"])[m], np.asarray(batch["label"])[m]
    logits = run(x)
    diff = max(diff, float(np.max(np.abs(logits - np.asarray(jax_fn(x))))))
    correct += int(np.sum(np.argmax(logits, -1) == y))
    count += len(y)
  latency = {}
  for b in latency_batches:
    x = np.asarray(jax.random.uniform(jax.random.key(b), (b,) + tuple(dataset.image_shape)))
    run(x)
    times = []
    for _ in range(repeats):
      t = time.perf_counter()
      run(x)
      times.append(time.perf_counter() - t)
    latency[f"batch_{b}_s"] = float(np.median(times))
  return {"file": os.path.basename(path), "opset": deploy.OPSET,
          "onnxruntime_version": ort.__version__, "test_examples": count,
          "natural_accuracy": correct / max(count, 1), "max_abs_logit_difference": diff,
          "latency": {"provider": "CPUExecutionProvider", "repeats": repeats, **latency}}


def export_workdir(workdir: str, out: str, stage: str = "retrain",
                   latency_batches: tuple[int, ...] = (1, 256), repeats: int = 5) -> dict:
  """Compacts a run's stage output, writes the export to `out` and returns export.json.

  Writes into a temporary folder beside `out` and renames it at the end: `out` never holds
  a half-written export. Raises ExportError (and the data/config/checkpoint errors) on bad
  input, before anything is written to `out`.
  """
  from admm_jax.app import data  # pylint: disable=import-outside-toplevel
  workdir = os.path.abspath(workdir)
  report, record = _read_stage(workdir, stage)
  _require_onnx()
  out, tmp = _temp_out(out)
  try:
    t0 = time.time()
    c = _compact_stage(workdir, stage, report)
    config, dataset, variables, g, params = c.config, c.dataset, c.variables, c.graph, c.params

    logging.info("export 3/7: writing params.npz, graph.json, %s and %s", ARTIFACT, ONNX_FILE)
    deploy_bytes, quantized = _deployables(c, tmp)
    save_params(tmp, g, params)
    compact_export = exported(g, params)
    with open(os.path.join(tmp, ARTIFACT), "wb") as f:
      f.write(compact_export.serialize())
    with open(os.path.join(tmp, ARTIFACT), "rb") as f:
      artifact = jax.export.deserialize(bytearray(f.read()))
    dense_artifact_bytes = len(serialize(c.dense_graph, c.dense_params))

    logging.info("export 4/7: natural and PGD-%d accuracy of the artifact on %d test examples",
                 config.attack.eval_steps, len(dataset.test))
    with_vjp = jax.export.deserialize(compact_export.serialize(vjp_order=1))
    evaluation = _evaluate(with_vjp, c.masked_apply, dataset, config, stage)
    # The file itself: same logits as the in-memory twin used for the attack.
    probe = next(iter(data.epoch_batches(dataset.test, min(64, len(dataset.test)), seed=0,
                                         epoch=0, shuffle=False)))["image"]
    evaluation["artifact_file_matches"] = bool(
        np.array_equal(np.asarray(artifact.call(probe)), np.asarray(with_vjp.call(probe))))

    logging.info("export 5/7: latency at batch %s, dense-masked vs compact (%s)",
                 "/".join(map(str, latency_batches)), jax.devices()[0].platform)
    dense_fn, compact_fn = jax.jit(c.masked_apply), jax.jit(artifact.call)
    latency = {}
    for b in latency_batches:
      x = jax.random.uniform(jax.random.key(b), (b,) + tuple(dataset.image_shape))
      latency[f"batch_{b}"] = {"dense_masked_s": _median_latency(dense_fn, x, repeats),
                               "compact_s": _median_latency(compact_fn, x, repeats)}

    logging.info("export 6/7: onnxruntime on %s: test accuracy, logits, latency", ONNX_FILE)
    onnx_check = _check_onnx(os.path.join(tmp, ONNX_FILE), jax.jit(artifact.call), dataset,
                             config.eval_batch_size, latency_batches, repeats)

    logging.info("export 7/7: export.json")
    counts = c.counts()
    summary = {
        "artifact": ARTIFACT, "params_file": "params.npz", "graph_file": "graph.json",
        "onnx_file": ONNX_FILE,
        "quantized_file": PACKED_FILE if quantized else None,
        "quantization": {k: {"bits": v["bits"], "scale_mode": v["scale_mode"]}
                         for k, v in quantized.items()},
        "workdir": workdir, "stage": stage,
        "model": {"name": config.model.name, "width": config.model.width,
                  "input_shape": list(dataset.image_shape), "sparsity": config.sparsity},
        "params": {"dense": counts["params"]["dense"],
                   "dense_nonzero": record["sparsity"]["nonzero_params"],
                   "compact": counts["params"]["compact"]},
        "bytes": {"dense_params": _dense_bytes(variables, tmp),
                  "compact_params": os.path.getsize(os.path.join(tmp, "params.npz")),
                  "dense_artifact": dense_artifact_bytes,
                  "compact_artifact": os.path.getsize(os.path.join(tmp, ARTIFACT)),
                  **deploy_bytes},
        "onnx": onnx_check,
        "flops_per_example": {**counts["flops_per_example"],
                              "compact_nonzero": flops_per_example(g, params, nonzero=True)},
        "latency": {"device": str(jax.devices()[0].device_kind),
                    "platform": jax.devices()[0].platform, "repeats": repeats,
                    "dense_masked": "flax model, XLA convolutions, pruned weights as zeros",
                    **latency},
        "evaluation": {**evaluation, "attack": {
            "eps": config.attack.eps, "steps": config.attack.eval_steps,
            "step_size": config.attack.eval_step_size, "random_start": True},
            "recorded_natural_accuracy": record["natural_accuracy"],
            "recorded_adversarial_accuracy": record["adversarial_accuracy"]},
        "platforms": list(PLATFORMS), "jax_version": jax.__version__,
        "wall_time_s": round(time.time() - t0, 2),
    }
    with open(os.path.join(tmp, "export.json"), "w") as f:
      json.dump(summary, f, indent=2)
      f.write("\n")
    _publish(tmp, out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return summary


def summary_line(s: dict) -> str:
  """One line: sizes, FLOPs, latency and accuracy of the export against the dense model."""
  lat = s["latency"].get("batch_256") or next(v for k, v in s["latency"].items()
                                              if k.startswith("batch_"))
  ev = s["evaluation"]
  return (f"exported {s['stage']} to {s['artifact']}: {s['params']['compact']} of "
          f"{s['params']['dense']} params, {s['bytes']['compact_artifact']} vs "
          f"{s['bytes']['dense_artifact']} artifact bytes, "
          f"{s['flops_per_example']['compact']} vs {s['flops_per_example']['dense']} FLOPs, "
          f"latency {lat['compact_s'] * 1e3:.2f} vs {lat['dense_masked_s'] * 1e3:.2f} ms, "
          f"natural {ev['natural_accuracy']:.4f} PGD {ev['adversarial_accuracy']:.4f}, "
          f"max |logit diff| {ev['max_abs_logit_difference']:.2e}")
