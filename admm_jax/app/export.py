"""Deployable small models: compaction of a pruned network and a `jax.export` artifact.

Library:
  graph, params = compact(model, variables, spec_or_masks)   # the same function, smaller
  logits = graph.apply(params, images)
  data = serialize(graph, params)          # jax.export bytes, weights included, batch symbolic

Command line (exit code 2 and one sentence on bad input; see docs/export.md):
  python -m admm_jax.export --workdir=runs/x [--stage=retrain] --out=runs/x/export

What compaction removes (docs/export.md has the details):
  - a channel is *constant* when no live input reaches it (a pruned filter: its bias, or
    BatchNorm of zero, then ReLU/pooling of that). Constants are not computed: a dense
    consumer folds them into its bias, a conv consumer adds a precomputed kernel over a map
    of ones (exact at zero-padded borders), a residual add adds them as a shift;
  - a channel is *unused* when every consumer's weights on it are zero (e.g. column
    pruning took all of its patch columns): its producer no longer computes it;
  - column pruning and empty rows of irregular kernels: the conv gathers the kept patch
    columns and multiplies by a smaller matrix; a dense layer gathers its kept inputs;
  - irregular layers store values + flat indices; N:M layers values + uint8 offsets.
ResNet residual adds keep the union of the channels any branch still computes; a branch
that lacks a channel contributes its constant (zero or not) there.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from admm_jax import graph as graph_lib
from admm_jax import projections, sparsity
from admm_jax.graph import Graph, Node, Params

_PER_CHANNEL = ("affine", "batch_norm", "relu", "max_pool", "relu_max_pool", "mean_pool")
INDEX_FIELDS = ("indices", "positions")   # index arrays: bytes, not parameters
DEFAULT_INPUT_SHAPES = {"LeNet": (28, 28, 1), "VGG16": (32, 32, 3), "ResNet18": (32, 32, 3)}


@dataclasses.dataclass
class _Channels:
  """What the analysis knows of a tensor's last axis: which entries vary with the input
  (`live`) and the value of the others (`const`; 0 where live)."""
  live: np.ndarray
  const: np.ndarray


# --------------------------------------------------------------------------- analysis

def _np(params: Params) -> dict[str, dict[str, np.ndarray]]:
  return {k: {f: np.asarray(v, np.float32) for f, v in p.items()} for k, p in params.items()}


def _forward(g: Graph, p: dict[str, dict[str, np.ndarray]], shapes: dict[str, tuple]
             ) -> dict[str, _Channels]:
  """Which channels of every tensor are live, and the constant value of the others."""
  out: dict[str, _Channels] = {}
  for n in g.nodes:
    ins = [out[i] for i in n.inputs]
    q = p.get(n.name, {})
    if n.op == "input":
      c = g.input_shape[-1]
      t = _Channels(np.ones(c, bool), np.zeros(c, np.float32))
    elif n.op == "conv":
      w, x = q["kernel"], ins[0]
      reads = x.live | (x.const != 0)  # a constant through zero padding is not constant
      live = np.any(w[:, :, reads, :] != 0, axis=(0, 1, 2))
      t = _Channels(live, _const(q.get("bias", np.zeros(w.shape[-1], np.float32)), live))
    elif n.op == "dense":
      w, x = q["kernel"], ins[0]
      live = np.any(w[x.live] != 0, axis=0)
      if n is g.nodes[-1]:
        live = np.ones_like(live)  # the logits are the interface: all of them stay
      t = _Channels(live, _const(q["bias"] + x.const[~x.live] @ w[~x.live], live))
    elif n.op in _PER_CHANNEL:
      x = ins[0]
      t = _Channels(x.live, _const(_per_channel_value(n, q, x.const), x.live))
    elif n.op == "flatten":
      reps = math.prod(shapes[n.inputs[0]][:-1])
      t = _Channels(np.tile(ins[0].live, reps), np.tile(ins[0].const, reps))
    elif n.op == "add":
      t = _Channels(np.any([x.live for x in ins], axis=0), np.sum([x.const for x in ins], 0))
    else:
      raise ValueError(f"op {n.op!r} of node {n.name!r} is unknown to compaction.")
    out[n.name] = t
  return out


def _const(values: np.ndarray, live: np.ndarray) -> np.ndarray:
  return np.where(live, 0, values).astype(np.float32)


def _per_channel_value(n: Node, q: dict[str, np.ndarray], v: np.ndarray) -> np.ndarray:
  if n.op == "affine":
    return (v - q["mean"]) / q["std"]
  if n.op == "batch_norm":
    mul = (1 / np.sqrt(q["var"] + np.float32(n.attr("epsilon")))) * q["scale"]
    return (v - q["mean"]) * mul + q["bias"]
  if n.op in ("relu", "relu_max_pool"):
    return np.maximum(v, 0)
  return v


def _backward(g: Graph, p: dict[str, dict[str, np.ndarray]], chans: dict[str, _Channels],
              shapes: dict[str, tuple]) -> dict[str, np.ndarray]:
  """Which live channels of every tensor some consumer reads with a nonzero weight."""
  needed = {n.name: np.zeros_like(chans[n.name].live) for n in g.nodes}
  needed[g.nodes[-1].name][:] = True
  for n in reversed(g.nodes):
    nd = needed[n.name] & chans[n.name].live
    for i in n.inputs:
      x = chans[i]
      if n.op == "conv":
        reads = np.any(p[n.name]["kernel"][..., nd] != 0, axis=(0, 1, 3))
      elif n.op == "dense":
        reads = np.any(p[n.name]["kernel"][:, nd] != 0, axis=1)
      elif n.op == "flatten":
        reads = nd.reshape(-1, shapes[i][-1]).any(axis=0)
      else:  # per-channel ops and add
        reads = nd
      needed[i] |= reads & x.live
  needed["input"][:] = True   # the interface: the whole image
  return needed


def _shapes(g: Graph, params: Params) -> dict[str, tuple[int, ...]]:
  """Per node, the shape of one example's output."""
  env = {}
  for n in g.nodes:
    if n.op == "input":
      env[n.name] = jax.ShapeDtypeStruct((1,) + tuple(g.input_shape), jnp.float32)
      continue
    fn = lambda *xs, n=n: graph_lib.OPS[n.op](n, params.get(n.name, {}), *xs)
    env[n.name] = jax.eval_shape(fn, *[env[i] for i in n.inputs])
  return {k: tuple(v.shape[1:]) for k, v in env.items()}


# ------------------------------------------------------------------------ compaction

def _pack_nm(w: np.ndarray, keep: np.ndarray, n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
  """Dense (..., in, out) weight + N:M keep-mask -> values and uint8 offsets (..., in/m*n, out)."""
  *lead, cin, out = w.shape
  runs = keep.reshape(*lead, cin // m, m, out)
  # Offsets of the kept weights first (stable: in order); a run never keeps more than n.
  offsets = np.argsort(~runs, axis=-2, kind="stable")[..., :n, :]
  values = np.take_along_axis(w.reshape(runs.shape), offsets, axis=-2)
  return (values.reshape(*lead, cin // m * n, out),
          offsets.astype(np.uint8).reshape(*lead, cin // m * n, out))


def _index_dtype(size: int) -> np.dtype:
  return np.dtype(np.uint16 if size <= np.iinfo(np.uint16).max + 1 else np.int32)


# A conv that keeps more than this fraction of its patch columns runs as a plain convolution
# (the kept columns put back into a full kernel): gathering strided slices and one matmul is
# slower than XLA's convolution unless most columns are gone (measured on CPU: 25 % kept ran
# 1.4x faster than the dense conv, 88 % kept 3x slower).
GATHER_MAX_KEPT = 1 / 3


def _linear_node(n: Node, w: np.ndarray, keep_mask: np.ndarray | None, kind: str | None,
                 in_idx: np.ndarray, out_idx: np.ndarray) -> tuple[Node, dict[str, Any]]:
  """The storage of a conv/dense weight `w` restricted to the kept inputs and outputs."""
  n_m = projections.parse_n_m(kind) if kind else None
  if n_m is not None:
    values, offsets = _pack_nm(w[..., out_idx], keep_mask[..., out_idx], *n_m)
    return (n.with_attrs(storage="n:m", nm=n_m, take=tuple(int(i) for i in in_idx)),
            {"values": values, "positions": offsets})
  wc = w[..., out_idx].take(in_idx, axis=-2)
  rows = wc.reshape(-1, wc.shape[-1])
  row_kept = np.any(rows != 0, axis=1)
  attrs = {}
  if not row_kept.all():  # store only the patch columns / features that have weights
    attrs["rows"] = tuple(int(i) for i in np.flatnonzero(row_kept))
    wc = rows[row_kept]
    if n.op == "conv" and row_kept.mean() > GATHER_MAX_KEPT:
      attrs["gather"] = False
  if kind == "irregular":
    flat = wc.reshape(-1)
    nz = np.flatnonzero(flat)
    return (n.with_attrs(storage="sparse", shape=tuple(wc.shape), **attrs),
            {"values": flat[nz], "indices": nz.astype(_index_dtype(flat.size))})
  return n.with_attrs(storage="dense", **attrs), {"kernel": wc}


def _compact_node(n: Node, q: dict[str, np.ndarray], chans: dict[str, _Channels],
                  keep: dict[str, np.ndarray], masks: dict[str, np.ndarray],
                  kinds: dict[str, str]) -> tuple[Node, dict[str, Any]]:
  out_idx = np.flatnonzero(keep[n.name])
  if n.op in ("conv", "dense"):
    x = chans[n.inputs[0]]
    in_idx = np.flatnonzero(keep[n.inputs[0]])
    w = q["kernel"]
    new, fields = _linear_node(n, w, masks.get(n.name), kinds.get(n.name), in_idx, out_idx)
    const = ~x.live & (x.const != 0)
    bias = q.get("bias")
    if n.op == "conv" and const.any():
      fields["ones_kernel"] = np.einsum("hwc,hwco->hwo", np.broadcast_to(
          x.const[const], w.shape[:2] + (int(const.sum()),)), w[:, :, const][..., out_idx])
    if n.op == "dense" and const.any():
      bias = bias + x.const[const] @ w[const]
    if bias is not None:
      fields["bias"] = bias[out_idx]
    return new, fields
  if n.op in ("affine", "batch_norm"):
    return n, {k: v[out_idx] for k, v in q.items()}
  if n.op == "add":
    places, fields = [], {}
    for i in n.inputs:
      have = np.flatnonzero(keep[i])
      pos = np.full(len(chans[n.name].live), len(have), np.int64)
      pos[have] = np.arange(len(have))
      places.append(None if np.array_equal(have, out_idx) else tuple(int(k) for k in
                                                                      pos[out_idx]))
    shift = sum(np.where(chans[i].live, 0, chans[i].const) for i in n.inputs)[out_idx]
    if np.any(shift != 0):
      fields["shift"] = shift.astype(np.float32)
    return n.with_attrs(places=tuple(places)), fields
  return n, {}


def compact_graph(g: Graph, params: Params, kinds: Mapping[str, str] | None = None,
                  masks: Mapping[str, Any] | None = None) -> tuple[Graph, Params]:
  """The compact graph computing the same function as `g` with (already masked) `params`.

  Args:
    g, params: a graph and its params; zero weights are what gets removed.
    kinds: node name -> pruning kind of its weight ("irregular" and "n:m" choose the
      sparse storages; the others, and nodes not named, store dense compacted kernels).
    masks: node name -> keep-mask of its weight (needed for "n:m": which weights are kept).

  Returns:
    (compact graph, its params as jax arrays).
  """
  kinds, masks = dict(kinds or {}), {k: np.asarray(v) for k, v in (masks or {}).items()}
  p = _np(params)
  shapes = _shapes(g, params)
  chans = _forward(g, p, shapes)
  needed = _backward(g, p, chans, shapes)
  keep = {k: chans[k].live & needed[k] for k in needed}
  keep["input"][:] = True
  for n in g.nodes:  # a flatten reshapes what its input keeps; it selects nothing itself
    if n.op == "flatten":
      keep[n.name] = np.tile(keep[n.inputs[0]], math.prod(shapes[n.inputs[0]][:-1]))
  nodes, out = [], {}
  for n in g.nodes:
    new, fields = _compact_node(n, p.get(n.name, {}), chans, keep, masks, kinds)
    nodes.append(new)
    if fields:
      out[n.name] = {k: jnp.asarray(v) for k, v in fields.items()}
  return Graph(tuple(nodes), g.input_shape), out


def _flat_masks(masks: Any) -> dict[str, Any]:
  flat = jax.tree_util.tree_leaves_with_path(masks, is_leaf=lambda x: x is None)
  return {sparsity.path_str(path): m for path, m in flat if m is not None}


def compact(model, variables: dict[str, Any], masks_or_spec: Any,
            input_shape: tuple[int, int, int] | None = None,
            kinds: Mapping[str, str] | None = None) -> tuple[Graph, Params]:
  """A smaller network computing the same function as the masked model.

  Args:
    model: an `admm_jax.models` LeNet, VGG16 or ResNet18.
    variables: {"params", "batch_stats"} (pruned or not: the masks are applied here).
    masks_or_spec: a sparsity spec (or its {pattern: (kind, ratio)} mapping), whose masks
      are computed from the params and whose kinds pick the storage; or a masks pytree
      like `sparsity.hard_prune` returns.
    input_shape: (H, W, C) of one image (default: 28x28x1 for LeNet, 32x32x3 otherwise).
    kinds: with masks, {param path: kind} for the storage ("irregular": values + indices,
      "n:m": packed; others and unnamed layers: dense compacted kernels).

  Returns:
    (graph, params): `graph.apply(params, x)` equals `model.apply(masked variables, x)`
    in eval mode up to float rounding, for x of shape (B,) + input_shape.
  """
  input_shape = tuple(input_shape or DEFAULT_INPUT_SHAPES[type(model).__name__])
  if isinstance(masks_or_spec, (sparsity.SparsitySpec, Mapping)) and not _is_masks(
      masks_or_spec):
    the_spec = sparsity.spec(masks_or_spec)
    kinds = {k.rsplit("/", 1)[0]: r.kind
             for k, r in sparsity.resolve(variables["params"], the_spec).items()}
    masks = spec_masks(variables["params"], the_spec)
  else:
    kinds = {k.rsplit("/", 1)[0]: v for k, v in (kinds or {}).items()}
    masks = masks_or_spec
  flat = _flat_masks(masks)
  pruned = apply_masks(variables["params"], masks)
  g, params = graph_lib.from_model(model, dict(variables, params=pruned), input_shape)
  node_masks = {k.rsplit("/", 1)[0]: v for k, v in flat.items() if k.endswith("/kernel")}
  return compact_graph(g, params, kinds, node_masks)


# The masks of a spec, compiled once per (spec, shapes): eager projections dispatch one
# small program per op and leaf.
spec_masks = jax.jit(sparsity.masks, static_argnums=1)


def apply_masks(params: Any, masks: Any) -> Any:
  """params * masks on the host (numpy: no device program per leaf); None masks keep a leaf."""
  return jax.tree.map(lambda m, w: w if m is None else np.asarray(w) * np.asarray(m, bool),
                      masks, params, is_leaf=lambda x: x is None)


def _is_masks(tree: Any) -> bool:
  """A masks pytree (bool arrays / None leaves), as opposed to a {pattern: rule} mapping."""
  leaves = jax.tree.leaves(tree, is_leaf=lambda x: x is None)
  return bool(leaves) and all(x is None or hasattr(x, "dtype") for x in leaves)


# ---------------------------------------------------------------------------- measures

def num_params(params: Params) -> int:
  """Stored parameter values (index arrays excluded: see `num_bytes`)."""
  return int(sum(np.size(v) for q in params.values() for k, v in q.items()
                 if k not in INDEX_FIELDS))


def num_bytes(params: Params) -> int:
  """Bytes of every stored array, index arrays included."""
  return int(sum(np.asarray(v).nbytes for q in params.values() for v in q.values()))


def _nonzero_weights(n: Node, q: dict[str, Any]) -> int:
  """Nonzero weights a conv/dense node multiplies by (on the host, from its storage)."""
  storage = n.attr("storage", "dense")
  if storage == "dense":
    return int(np.count_nonzero(np.asarray(q["kernel"])))
  values = np.asarray(q["values"])
  if storage == "sparse":
    return int(np.count_nonzero(values))
  n_kept, m = n.attr("nm")
  run_row = np.arange(values.shape[-2])[:, None] // n_kept * m
  channel = run_row + np.asarray(q["positions"]).astype(np.int64)  # input channel of each value
  return int(np.count_nonzero((values != 0) & np.isin(channel, n.attr("take"))))


def flops_per_example(g: Graph, params: Params, nonzero: bool = False) -> int:
  """2 x the multiply-adds of the conv and dense layers for one example, as executed
  (a densified sparse kernel runs dense), or with `nonzero` only those by nonzero weights
  (what a sparse kernel would do; border padding ignored)."""
  shapes = _shapes(g, params)
  total = 0
  for n in g.nodes:
    if n.op not in ("conv", "dense"):
      continue
    q = params[n.name]
    positions = math.prod(shapes[n.name][:-1])
    if nonzero:
      total += positions * _nonzero_weights(n, q)
    else:  # the weight as it runs: a conv may run its stored columns as a full kernel
      cin = shapes[n.inputs[0]][-1]
      w = jax.eval_shape(lambda q=q, n=n, cin=cin: graph_lib.conv_weight(n, q, cin)[0]
                         if n.op == "conv" else graph_lib.weight(n, q))
      total += positions * math.prod(w.shape)
  return 2 * total


# ---------------------------------------------------------------------- serialization

ARTIFACT = "model.jaxexport"
PLATFORMS = ("cpu", "cuda", "tpu")


def exported(g: Graph, params: Params, platforms: tuple[str, ...] | None = PLATFORMS
             ) -> jax.export.Exported:
  """`jax.export` of `g.apply` with `params` as constants, for a symbolic batch size."""
  batch, = jax.export.symbolic_shape("batch")
  fn = jax.jit(lambda x: g.apply(params, x))
  return jax.export.export(fn, platforms=platforms)(
      jax.ShapeDtypeStruct((batch,) + tuple(g.input_shape), jnp.float32))


def serialize(g: Graph, params: Params, vjp_order: int = 0,
              platforms: tuple[str, ...] | None = PLATFORMS) -> bytearray:
  """The artifact: `jax.export.deserialize(data).call(images)` returns the logits with
  only jax installed (images float32 (B, H, W, C) in [0, 1], any B). `vjp_order=1` also
  stores the derivative (attacks on the artifact), at about twice the size."""
  return exported(g, params, platforms).serialize(vjp_order=vjp_order)


def save_params(directory: str, g: Graph, params: Params) -> None:
  """`directory`/params.npz (arrays "<node>/<field>", uncompressed) and graph.json."""
  arrays = {f"{name}/{field}": np.asarray(v) for name, q in params.items()
            for field, v in q.items()}
  np.savez(os.path.join(directory, "params.npz"), **arrays)
  with open(os.path.join(directory, "graph.json"), "w") as f:
    json.dump(g.to_json(), f)


def load_params(directory: str) -> tuple[Graph, Params]:
  """What `save_params` wrote: (graph, params), ready for `graph.apply(params, x)`."""
  with open(os.path.join(directory, "graph.json")) as f:
    g = graph_lib.from_json(json.load(f))
  params: Params = {}
  with np.load(os.path.join(directory, "params.npz")) as z:
    for key in z.files:
      name, field = key.rsplit("/", 1)
      params.setdefault(name, {})[field] = jnp.asarray(z[key])
  return g, params


# ---------------------------------------------------------------------- command line

class ExportError(ValueError):
  """The workdir, stage or --out cannot be exported as asked; one sentence for the user."""


STAGES_WITH_SPARSITY = ("admm", "retrain")


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
  if stage not in STAGES_WITH_SPARSITY or "sparsity" not in record:
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
  from admm_jax import checkpoint, train  # pylint: disable=import-outside-toplevel
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
  from admm_jax import data, train, trainer  # pylint: disable=import-outside-toplevel
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

  key = trainer.purpose_key(jax.random.key(config.seed), "test", stage)
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
  from admm_jax import configlib, data, models  # pylint: disable=import-outside-toplevel
  config = ml_collections.ConfigDict(report["config"])
  logging.info("export 1/6: loading %s's output and the %s test split", stage, config.data.name)
  dataset = data.load_dataset(config.data.name, config.data.dir, config.data.validation_size,
                              config.seed, limit_train=config.data.limit_train,
                              limit_test=config.data.limit_test,
                              tfds_data_dir=config.data.tfds_dir or None)
  model = models.get_model(config.model.name, config.model.width, dataset.num_classes)
  variables = _load_variables(workdir, stage, model, dataset.image_shape)
  the_spec = sparsity.spec(configlib.parse_sparsity(config.sparsity))
  logging.info("export 2/6: compacting %s(w=%d) pruned by %s", config.model.name,
               config.model.width, config.sparsity)
  masks = spec_masks(variables["params"], the_spec)
  masked = dict(variables, params=apply_masks(variables["params"], masks))
  kinds = {k: r.kind for k, r in sparsity.resolve(variables["params"], the_spec).items()}
  g, params = compact(model, masked, masks, dataset.image_shape, kinds=kinds)
  return _Compacted(config, dataset, model, variables, masked, g, params,
                    *graph_lib.from_model(model, masked, dataset.image_shape))


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


def export_workdir(workdir: str, out: str, stage: str = "retrain",
                   latency_batches: tuple[int, ...] = (1, 256), repeats: int = 5) -> dict:
  """Compacts a run's stage output, writes the export to `out` and returns export.json.

  Writes into a temporary folder beside `out` and renames it at the end: `out` never holds
  a half-written export. Raises ExportError (and the data/config/checkpoint errors) on bad
  input, before anything is written to `out`.
  """
  from admm_jax import data  # pylint: disable=import-outside-toplevel
  workdir = os.path.abspath(workdir)
  report, record = _read_stage(workdir, stage)
  out, tmp = _temp_out(out)
  try:
    t0 = time.time()
    c = _compact_stage(workdir, stage, report)
    config, dataset, variables, g, params = c.config, c.dataset, c.variables, c.graph, c.params

    logging.info("export 3/6: writing params.npz, graph.json and %s", ARTIFACT)
    save_params(tmp, g, params)
    compact_export = exported(g, params)
    with open(os.path.join(tmp, ARTIFACT), "wb") as f:
      f.write(compact_export.serialize())
    with open(os.path.join(tmp, ARTIFACT), "rb") as f:
      artifact = jax.export.deserialize(bytearray(f.read()))
    dense_artifact_bytes = len(serialize(c.dense_graph, c.dense_params))

    logging.info("export 4/6: natural and PGD-%d accuracy of the artifact on %d test examples",
                 config.attack.eval_steps, len(dataset.test))
    with_vjp = jax.export.deserialize(compact_export.serialize(vjp_order=1))
    evaluation = _evaluate(with_vjp, c.masked_apply, dataset, config, stage)
    # The file itself: same logits as the in-memory twin used for the attack.
    probe = next(iter(data.epoch_batches(dataset.test, min(64, len(dataset.test)), seed=0,
                                         epoch=0, shuffle=False)))["image"]
    evaluation["artifact_file_matches"] = bool(
        np.array_equal(np.asarray(artifact.call(probe)), np.asarray(with_vjp.call(probe))))

    logging.info("export 5/6: latency at batch %s, dense-masked vs compact (%s)",
                 "/".join(map(str, latency_batches)), jax.devices()[0].platform)
    dense_fn, compact_fn = jax.jit(c.masked_apply), jax.jit(artifact.call)
    latency = {}
    for b in latency_batches:
      x = jax.random.uniform(jax.random.key(b), (b,) + tuple(dataset.image_shape))
      latency[f"batch_{b}"] = {"dense_masked_s": _median_latency(dense_fn, x, repeats),
                               "compact_s": _median_latency(compact_fn, x, repeats)}

    logging.info("export 6/6: export.json")
    counts = c.counts()
    summary = {
        "artifact": ARTIFACT, "params_file": "params.npz", "graph_file": "graph.json",
        "workdir": workdir, "stage": stage,
        "model": {"name": config.model.name, "width": config.model.width,
                  "input_shape": list(dataset.image_shape), "sparsity": config.sparsity},
        "params": {"dense": counts["params"]["dense"],
                   "dense_nonzero": record["sparsity"]["nonzero_params"],
                   "compact": counts["params"]["compact"]},
        "bytes": {"dense_params": _dense_bytes(variables, tmp),
                  "compact_params": os.path.getsize(os.path.join(tmp, "params.npz")),
                  "dense_artifact": dense_artifact_bytes,
                  "compact_artifact": os.path.getsize(os.path.join(tmp, ARTIFACT))},
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


def main(argv: list[str]) -> None:
  """The CLI: flags --workdir, --stage, --out; exit code 2 with one sentence on bad input."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from admm_jax import checkpoint, configlib, data  # pylint: disable=import-outside-toplevel
  if len(argv) > 1:
    print(f"error: unexpected arguments {' '.join(argv[1:])}: pass only flags.", file=sys.stderr)
    sys.exit(2)
  f = flags.FLAGS
  logging.getLogger().setLevel(logging.INFO)
  for noisy in ("absl", "jax._src", "orbax", "etils"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  try:
    from admm_jax import compilation  # pylint: disable=import-outside-toplevel
    compilation.setup_cache()  # issue 27: the export's programs, compiled once
    batches = tuple(int(b) for b in f.latency_batches.split(",") if b.strip())
    s = export_workdir(f.workdir, f.out, f.stage, batches, f.latency_repeats)
  except (ExportError, configlib.ConfigError, data.DataError, checkpoint.CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(summary_line(s))
  print(f"export: {os.path.join(os.path.abspath(f.out), 'export.json')}")


def _define_flags() -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string("workdir", None, "A run's workdir (python -m admm_jax.main --workdir).")
  flags.DEFINE_string("out", None, "Folder to write the export to (replaced if it holds one).")
  from admm_jax import configlib  # pylint: disable=import-outside-toplevel
  flags.DEFINE_enum("stage", "retrain", list(configlib.STAGE_ORDER),
                    "Which finished stage to export (retrain: the pruned, retrained model).")
  flags.DEFINE_string("latency_batches", "1,256", "Batch sizes of the latency measurement.")
  flags.DEFINE_integer("latency_repeats", 5, "Timed calls per batch size (median reported).")
  flags.mark_flags_as_required(["workdir", "out"])


if __name__ == "__main__":
  from absl import app  # pylint: disable=import-outside-toplevel

  from admm_jax import cli  # pylint: disable=import-outside-toplevel
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
