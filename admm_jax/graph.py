"""The networks of `admm_jax.models` as plain jax over a flat params dict: a small graph.

A `Graph` is a static tuple of `Node`s (op name, inputs, static attributes) and its
params are `{node name: {field: array}}`. `Graph.apply(params, x)` runs it with nothing
but jax, so a graph can be compacted (`admm_jax.export.compact`), serialized with
`jax.export` and run where admm_jax is not installed. `from_model` writes the graph of a
LeNet, VGG16 or ResNet18 with its variables: the same function as `model.apply(variables, x)`.

Ops (tensors NHWC; the last axis is the channel or feature axis):
  input; affine (x - mean) / std per channel; conv (SAME padding, optional bias); dense;
  batch_norm (running averages, flax's formula); relu; max_pool, relu_max_pool (2x2, as
  `models.max_pool_2x2`); flatten (H, W, C order); mean_pool (global average); add.

A conv or dense node holds its weight in one of three storages (attr "storage"):
  "dense":  params["kernel"], (kh, kw, cin, cout) / (in, out), or (rows, cout) when the
            node reads only some patch columns / input features (attr "rows");
  "sparse": params["values"] (nnz,) and params["indices"] (nnz,), flat positions in the
            weight of shape attr "shape" (irregular pruning);
  "n:m":    params["values"] and params["positions"] (uint8), both (..., in / m * n, out):
            the n kept weights of every run of m along the input axis and their offsets in
            the run; attr "shape" is the full weight, attr "take" the input channels kept.
Further optional params: "bias"; "ones_kernel" (kh, kw, cout), the contribution of input
channels that are constant (removed upstream), computed as this kernel over a map of ones
(exact at the zero-padded borders); a conv's attr "rows" lists the kept (dy, dx, c)
patch columns: they are gathered and multiplied by a (rows, cout) matrix, or with attr
"gather" False put back into a full kernel (zeros elsewhere) for a plain convolution.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from admm_jax import models
from admm_jax.models.layers import max_pool_2x2

Params = dict[str, dict[str, Any]]
_DIMS = ("NHWC", "HWIO", "NHWC")


@dataclasses.dataclass(frozen=True)
class Node:
  """One op of a graph; `attrs` are static (hashable) values, the arrays live in params."""
  name: str
  op: str
  inputs: tuple[str, ...] = ()
  attrs: tuple[tuple[str, Any], ...] = ()

  def attr(self, key: str, default: Any = None) -> Any:
    return dict(self.attrs).get(key, default)

  def with_attrs(self, **kw: Any) -> Node:
    merged = dict(self.attrs)
    merged.update(kw)
    return dataclasses.replace(self, attrs=tuple(sorted(merged.items())))


def node(name: str, op: str, inputs: tuple[str, ...] = (), **attrs: Any) -> Node:
  return Node(name, op, tuple(inputs), tuple(sorted(attrs.items())))


@dataclasses.dataclass(frozen=True)
class Graph:
  """A network as a topologically ordered tuple of nodes; the last node is the output."""
  nodes: tuple[Node, ...]
  input_shape: tuple[int, int, int]   # (H, W, C) of one example

  def apply(self, params: Params, x: jax.Array) -> jax.Array:
    """Logits for images `x` (B, H, W, C) in [0, 1]; `params` as in the module docstring."""
    env = {}
    for n in self.nodes:
      if n.op == "input":
        env[n.name] = x
      else:
        env[n.name] = OPS[n.op](n, params.get(n.name, {}), *[env[i] for i in n.inputs])
    return env[self.nodes[-1].name]

  def to_json(self) -> dict[str, Any]:
    """The structure as JSON-ready data (`from_json` reads it back)."""
    def plain(v):
      return [plain(x) for x in v] if isinstance(v, (tuple, list)) else v
    return {"input_shape": list(self.input_shape),
            "nodes": [{"name": n.name, "op": n.op, "inputs": list(n.inputs),
                       "attrs": {k: plain(v) for k, v in n.attrs}} for n in self.nodes]}


def from_json(data: dict[str, Any]) -> Graph:
  """The inverse of `Graph.to_json`."""
  def frozen(v):
    return tuple(frozen(x) for x in v) if isinstance(v, list) else v
  return Graph(tuple(node(d["name"], d["op"], tuple(d["inputs"]),
                          **{k: frozen(v) for k, v in d["attrs"].items()})
                     for d in data["nodes"]), tuple(data["input_shape"]))


# ---------------------------------------------------------------------------- weights

def weight(n: Node, p: dict[str, Any]) -> jax.Array:
  """The dense weight of a conv/dense node in the layout its op multiplies by."""
  storage = n.attr("storage", "dense")
  if storage == "dense":
    return p["kernel"]
  shape = n.attr("shape")
  if storage == "sparse":
    flat = jnp.zeros((math.prod(shape),), p["values"].dtype).at[p["indices"]].set(p["values"])
    return flat.reshape(shape)
  nm = n.attr("nm")
  w = unpack_nm(p["values"], p["positions"], nm[0], nm[1])
  return jnp.take(w, np.asarray(n.attr("take"), np.int32), axis=-2)


def unpack_nm(values: jax.Array, positions: jax.Array, n: int, m: int) -> jax.Array:
  """(..., g * n, out) kept values and their offsets (0..m-1) in each run of m along the
  input axis -> the dense weight (..., g * m, out)."""
  *lead, gn, out = values.shape
  g = gn // n
  v = values.reshape(*lead, g, n, 1, out)
  hit = positions.reshape(*lead, g, n, 1, out) == jnp.arange(m, dtype=positions.dtype)[:, None]
  return jnp.sum(jnp.where(hit, v, jnp.zeros((), values.dtype)), axis=-3).reshape(
      *lead, g * m, out)


# -------------------------------------------------------------------------------- ops

def same_padding(size: int, k: int, s: int) -> tuple[int, int]:
  """lax's SAME padding (low, high) of one spatial axis."""
  out = -(-size // s)
  total = max((out - 1) * s + k - size, 0)
  return total // 2, total - total // 2


def _gathered_conv(x: jax.Array, w_rows: jax.Array, rows: tuple[int, ...],
                   kernel: tuple[int, int], s: int) -> jax.Array:
  """A conv that reads only the patch columns `rows` (flat (dy, dx, c) indices): for each
  kernel offset, the strided slice of the padded input at the kept channels, concatenated
  in `rows` order, times the (len(rows), cout) matrix."""
  (kh, kw), cin = kernel, x.shape[-1]
  _, h, w, _ = x.shape
  (ph0, ph1), (pw0, pw1) = same_padding(h, kh, s), same_padding(w, kw, s)
  ho, wo = -(-h // s), -(-w // s)
  xp = jnp.pad(x, ((0, 0), (ph0, ph1), (pw0, pw1), (0, 0)))
  by_offset: dict[int, list[int]] = {}
  for r in rows:
    by_offset.setdefault(r // cin, []).append(r % cin)
  pieces = []
  for offset, chans in by_offset.items():
    dy, dx = divmod(offset, kw)
    piece = xp[:, dy:dy + (ho - 1) * s + 1:s, dx:dx + (wo - 1) * s + 1:s, :]
    if len(chans) < cin:
      piece = jnp.take(piece, np.asarray(chans, np.int32), axis=-1)
    pieces.append(piece)
  return jnp.concatenate(pieces, axis=-1) @ w_rows


def conv_weight(n: Node, p: dict[str, Any], cin: int) -> tuple[jax.Array, tuple | None]:
  """A conv's weight as it runs on `cin` input channels: (kernel (kh, kw, cin, cout), None)
  for XLA's convolution, or ((rows, cout) matrix, rows) for the gathered one."""
  w, rows = weight(n, p), n.attr("rows")
  if rows is not None and not n.attr("gather", True):  # stored gathered, run as a plain conv
    (kh, kw) = n.attr("kernel")
    w = jnp.zeros((kh * kw * cin, w.shape[-1]), w.dtype).at[np.asarray(rows)].set(w)
    return w.reshape(kh, kw, cin, -1), None
  return w, rows


def _conv(n: Node, p: dict[str, Any], x: jax.Array) -> jax.Array:
  s = n.attr("strides", 1)
  w, rows = conv_weight(n, p, x.shape[-1])
  if rows is None:
    y = lax.conv_general_dilated(x, w, (s, s), "SAME", dimension_numbers=_DIMS)
  else:
    y = _gathered_conv(x, w, rows, n.attr("kernel"), s)
  if "ones_kernel" in p:  # constant input channels: the kernel over a map of ones
    ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
    y = y + lax.conv_general_dilated(ones, p["ones_kernel"][:, :, None, :], (s, s), "SAME",
                                     dimension_numbers=_DIMS)
  return y + p["bias"] if "bias" in p else y


def _dense(n: Node, p: dict[str, Any], x: jax.Array) -> jax.Array:
  rows = n.attr("rows")
  if rows is not None:
    x = jnp.take(x, np.asarray(rows, np.int32), axis=-1)
  y = x @ weight(n, p)
  return y + p["bias"] if "bias" in p else y


def _batch_norm(n: Node, p: dict[str, Any], x: jax.Array) -> jax.Array:
  # flax.linen.BatchNorm's formula with running averages, for the same rounding.
  mul = lax.rsqrt(p["var"] + n.attr("epsilon")) * p["scale"]
  return (x - p["mean"]) * mul + p["bias"]


def _add(n: Node, p: dict[str, Any], *xs: jax.Array) -> jax.Array:
  """Sum of branches that may hold different channels: each is placed in the output's
  channels (attr "places": per branch, positions, or None for all), plus a constant."""
  total = None
  for x, places in zip(xs, n.attr("places", (None,) * len(xs))):
    if places is not None:  # a gather from [x, 0]: missing channels read the zero column
      x = jnp.concatenate([x, jnp.zeros(x.shape[:-1] + (1,), x.dtype)], axis=-1)
      x = jnp.take(x, np.asarray(places, np.int32), axis=-1)
    total = x if total is None else total + x
  return total + p["shift"] if "shift" in p else total


OPS = {
    "affine": lambda n, p, x: (x - p["mean"]) / p["std"],
    "conv": _conv,
    "dense": _dense,
    "batch_norm": _batch_norm,
    "relu": lambda n, p, x: jax.nn.relu(x),
    "max_pool": lambda n, p, x: max_pool_2x2(x),
    "relu_max_pool": lambda n, p, x: jax.nn.relu(max_pool_2x2(x)),
    "flatten": lambda n, p, x: x.reshape(x.shape[0], -1),
    "mean_pool": lambda n, p, x: jnp.mean(x, axis=(1, 2)),
    "add": _add,
}


# --------------------------------------------------------------------- from a model

class Builder:
  """Appends nodes and collects their params from flax variables; each model's
  `build_graph(builder, model)` (admm_jax.models.REGISTRY) drives it."""

  def __init__(self, variables: dict[str, Any]):
    self.params = variables["params"]
    self.stats = variables.get("batch_stats", {}) or {}
    self.nodes: list[Node] = []
    self.out: Params = {}
    self.last = "input"

  def _get(self, tree, path: str):
    for k in path.split("/"):
      tree = tree[k]
    return tree

  def add(self, name: str, op: str, inputs: tuple[str, ...] | None = None,
          params: dict[str, Any] | None = None, **attrs) -> str:
    self.nodes.append(node(name, op, (self.last,) if inputs is None else inputs, **attrs))
    if params:
      self.out[name] = params
    self.last = name
    return name

  def conv(self, path: str, strides: int = 1, inputs=None) -> str:
    p = self._get(self.params, path)
    kernel = p["kernel"]
    fields = {"kernel": kernel, **({"bias": p["bias"]} if "bias" in p else {})}
    return self.add(path, "conv", inputs, fields, strides=strides,
                    kernel=tuple(kernel.shape[:2]))

  def dense(self, path: str) -> str:
    p = self._get(self.params, path)
    return self.add(path, "dense", None, {"kernel": p["kernel"], "bias": p["bias"]})

  def batch_norm(self, path: str, epsilon: float = 1e-5) -> str:
    p, s = self._get(self.params, path), self._get(self.stats, path)
    return self.add(path, "batch_norm", None, {"scale": p["scale"], "bias": p["bias"],
                                               "mean": s["mean"], "var": s["var"]},
                    epsilon=epsilon)

  def simple(self, op: str) -> str:
    return self.add(f"{op}_{len(self.nodes)}", op)


def _start(model, variables, input_shape) -> Builder:
  b = Builder(variables)
  b.nodes.append(node("input", "input"))
  if model.input_mean is not None or model.input_std is not None:
    c = input_shape[-1]
    b.add("normalize", "affine", None,
          {"mean": jnp.asarray(model.input_mean, jnp.float32).reshape(c),
           "std": jnp.asarray(model.input_std, jnp.float32).reshape(c)})
  return b


def from_model(model, variables: dict[str, Any], input_shape: tuple[int, int, int]
               ) -> tuple[Graph, Params]:
  """The graph and params of a LeNet, VGG16 or ResNet18 with `variables`.

  Args:
    model: an `admm_jax.models` module (any `conv` implementation: all hold the same
      parameters).
    variables: {"params": ..., "batch_stats": ...} as the trainer keeps them.
    input_shape: (H, W, C) of one image.

  Returns:
    (graph, params) with `graph.apply(params, x) == model.apply(variables, x)` in eval mode.
  """
  entry = models.entry_of(model)
  if entry is None:
    raise ValueError(f"graph.from_model knows the models of admm_jax.models.REGISTRY "
                     f"({', '.join(models.REGISTRY)}), not {type(model).__name__}: build the "
                     "graph by hand from admm_jax.graph nodes.")
  b = _start(model, variables, input_shape)
  entry.build_graph(b, model)
  return Graph(tuple(b.nodes), tuple(input_shape)), b.out
