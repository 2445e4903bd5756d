"""Deployable bytes of a compact graph: k-bit codes in a packed file, and an ONNX model.

  q = quantize_graph(graph, params, {"conv1": (4, "channel"), ...})  # codes + scales per node
  blob, meta = pack(graph, params, q)      # int4 nibbles / int8, gap-coded sparse positions
  write_packed("quantized.bin", blob, meta)   # one file: compressed layout + the bytes
  params2 = unpack(*read_packed("quantized.bin"))  # the same function (graph.apply)
  model = to_onnx(graph, params, q)        # onnx.ModelProto, opset 21

The packed file stores every quantized conv/dense weight as its codes, two per byte for
bits <= 4 (low nibble first, two's complement: ONNX's INT4 packing) and one int8 per byte
otherwise, with float32 scales (per output channel or per layer). A weight in the graph's
"sparse" storage (irregular pruning) keeps only its nonzero codes and their positions as
uint8 gaps (zeros skipped since the last stored entry); a gap longer than 255 is bridged by
a stored zero (as in Han et al.'s Deep Compression). Every other array is stored as it is.

The ONNX model is the same function on NCHW tensors between an NHWC input and the logits:
conv and dense weights are dense (k-bit layers as int8/int4 initializers behind a
DequantizeLinear with their scales, ONNX's standard form of weight-only quantization), so
onnxruntime needs no custom op. `onnx` is imported only by `to_onnx` (extra `admm_jax[onnx]`).
"""
from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from admm_jax import quantization
from admm_jax import graph as graph_lib
from admm_jax.graph import Graph, Node, Params

OPSET = 21   # INT4 DequantizeLinear
ONNX_OPS = ("input", "affine", "conv", "dense", "batch_norm", "relu", "max_pool",
            "relu_max_pool", "flatten", "mean_pool", "add")


class UnsupportedOpError(ValueError):
  """A graph node that this exporter cannot write as ONNX."""


class OffGridError(ValueError):
  """A layer named as k-bit whose weights are not on a k-bit grid."""


def node_shapes(g: Graph, params: Params) -> dict[str, tuple[int, ...]]:
  """Shape of every node's output for a batch of one."""
  env: dict[str, Any] = {}
  for n in g.nodes:
    if n.op == "input":
      env[n.name] = jax.ShapeDtypeStruct((1,) + tuple(g.input_shape), np.float32)
    elif n.op in graph_lib.OPS:
      fn = lambda *xs, n=n: graph_lib.OPS[n.op](n, params.get(n.name, {}), *xs)
      env[n.name] = jax.eval_shape(fn, *[env[i] for i in n.inputs])
    else:
      raise UnsupportedOpError(f"node {n.name!r} has op {n.op!r}, which admm_jax cannot write "
                               f"as ONNX (it writes {', '.join(ONNX_OPS)}).")
  return {k: tuple(v.shape) for k, v in env.items()}


def full_weight(n: Node, p: Mapping[str, Any], cin: int) -> np.ndarray:
  """A conv's (kh, kw, cin, cout) or a dense node's (cin, cout) weight, zeros where the
  compact storage dropped patch columns / input features."""
  w = np.asarray(graph_lib.weight(n, p), np.float32)
  rows = n.attr("rows")
  if n.op == "conv":
    kh, kw = n.attr("kernel")
    if rows is not None:
      full = np.zeros((kh * kw * cin, w.shape[-1]), np.float32)
      full[np.asarray(rows)] = w
      w = full
    return w.reshape(kh, kw, cin, -1)
  if rows is not None:
    full = np.zeros((cin, w.shape[-1]), np.float32)
    full[np.asarray(rows)] = w
    w = full
  return w


def quantize_graph(g: Graph, params: Params, bits: Mapping[str, tuple[int, str]]
                   ) -> dict[str, dict[str, Any]]:
  """{node: {"bits", "scale_mode", "codes" (int8, full_weight's shape), "scale"}} for the
  conv/dense nodes named in `bits` ({node: (bits, scale_mode)}).

  Raises:
    OffGridError: a named layer whose weights are not on a grid of its bits.
  """
  shapes = node_shapes(g, params)
  out = {}
  for n in g.nodes:
    if n.name not in bits:
      continue
    b, mode = bits[n.name]
    w = full_weight(n, params[n.name], shapes[n.inputs[0]][-1])
    found = quantization.recover(w, b, mode)
    if found is None:
      raise OffGridError(f"layer {n.name!r} is not on a {b}-bit grid: export a stage that "
                         "trained on the grid (retrain), not its ADMM input.")
    out[n.name] = {"bits": b, "scale_mode": mode, "codes": found[0],
                   "scale": np.asarray(found[1], np.float32)}
  return out


# ------------------------------------------------------------------------ packed file

def pack_int4(codes: np.ndarray) -> np.ndarray:
  """int codes in [-8, 7] -> uint8, two per byte, the first in the low nibble."""
  flat = np.asarray(codes, np.int8).reshape(-1)
  if flat.size % 2:
    flat = np.append(flat, np.int8(0))
  nib = flat.astype(np.uint8) & 0x0F
  return (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, size: int) -> np.ndarray:
  """The inverse of `pack_int4`: `size` int8 codes."""
  p = np.asarray(packed, np.uint8)
  nib = np.stack([p & 0x0F, p >> 4], axis=1).reshape(-1)[:size].astype(np.int8)
  return np.where(nib > 7, nib - 16, nib).astype(np.int8)


def gap_encode(positions: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Sorted flat positions and their codes -> (uint8 gaps, codes), zeros bridging gaps > 255."""
  gaps, out, prev = [], [], -1
  for pos, c in zip(np.asarray(positions).tolist(), np.asarray(codes).tolist()):
    while pos - prev - 1 > 255:
      gaps.append(255)
      out.append(0)
      prev += 256
    gaps.append(pos - prev - 1)
    out.append(c)
    prev = pos
  return np.asarray(gaps, np.uint8), np.asarray(out, np.int8)


def gap_decode(gaps: np.ndarray) -> np.ndarray:
  """Flat positions of gap-coded entries."""
  return np.cumsum(np.asarray(gaps, np.int64) + 1) - 1


def _codes_field(codes: np.ndarray, bits: int) -> tuple[np.ndarray, str]:
  return (pack_int4(codes), "int4") if bits <= 4 else (np.asarray(codes, np.int8), "int8")


def _stored_codes(n: Node, p: Mapping[str, Any], q: dict[str, Any]) -> dict[str, np.ndarray]:
  """The codes of a quantized node in its compact storage's layout (what `pack` stores)."""
  storage = n.attr("storage", "dense")
  scale = q["scale"]
  field = "kernel" if storage == "dense" else "values"
  values = np.asarray(p[field], np.float32)
  cout = values.shape[-1] if storage != "sparse" else n.attr("shape")[-1]
  if storage == "sparse":
    idx = np.asarray(p["indices"], np.int64)
    s = scale[idx % cout] if scale.ndim else scale
  else:
    s = scale
  return {field: np.round(values / s).astype(np.int8)}


def pack(g: Graph, params: Params, quantized: Mapping[str, dict[str, Any]]
         ) -> tuple[bytes, dict[str, Any]]:
  """(the packed bytes, their JSON-ready layout); `unpack` reads them back."""
  chunks, layout, offset = [], [], 0

  def put(node, field, arr, encoding, **extra):
    nonlocal offset
    data = np.ascontiguousarray(arr).tobytes()
    layout.append({"node": node, "field": field, "encoding": encoding, "offset": offset,
                   "nbytes": len(data), "dtype": str(np.asarray(arr).dtype),
                   "shape": list(np.shape(arr)), **extra})
    chunks.append(data)
    offset += len(data)

  nodes = {n.name: n for n in g.nodes}
  for name, fields in params.items():
    q = quantized.get(name)
    n = nodes[name]
    for field, v in fields.items():
      arr = np.asarray(v)
      if q is None or field not in ("kernel", "values", "indices"):
        put(name, field, arr, "raw")
      elif field == "indices":
        continue   # stored with the values, gap-coded
      else:
        codes = _stored_codes(n, fields, q)[field]
        put(name, field + "/scale", q["scale"], "raw")
        if n.attr("storage", "dense") == "sparse":
          gaps, codes = gap_encode(np.asarray(fields["indices"]), codes)
          put(name, "indices", gaps, "gaps")
        data, enc = _codes_field(codes, q["bits"])
        put(name, field, data, enc, size=int(codes.size), value_shape=list(codes.shape),
            value_dtype=str(arr.dtype))
  return b"".join(chunks), {"format": "admm_jax.deploy.pack/1", "arrays": layout}


def unpack(blob: bytes, meta: Mapping[str, Any]) -> Params:
  """Params from `pack`'s bytes and layout: codes times scales, gap-coded positions decoded."""
  arrays: dict[str, dict[str, tuple[np.ndarray, dict]]] = {}
  for a in meta["arrays"]:
    buf = np.frombuffer(blob, np.uint8, a["nbytes"], a["offset"])
    if a["encoding"] == "int4":
      arr = unpack_int4(buf, a["size"]).reshape(a["value_shape"])
    else:
      arr = buf.view(np.dtype(a["dtype"])).reshape(a["shape"])
    arrays.setdefault(a["node"], {})[a["field"]] = (arr, a)
  params: Params = {}
  for node, fields in arrays.items():
    out = {}
    for field, (arr, a) in fields.items():
      if field.endswith("/scale"):
        continue
      if a["encoding"] == "gaps":
        out[field] = gap_decode(arr).astype(np.int32)
      elif a["encoding"] in ("int4", "int8"):
        scale = fields[field + "/scale"][0]
        if scale.ndim and "indices" in fields:   # sparse values: each entry's own channel
          scale = scale[gap_decode(fields["indices"][0]) % scale.size]
        out[field] = (arr.astype(np.float32) * scale).astype(a["value_dtype"])
      else:
        out[field] = arr.copy()
    params[node] = {k: jax.numpy.asarray(v) for k, v in out.items()}
  return params


MAGIC = b"AJQ1"


def write_packed(path: str, blob: bytes, meta: Mapping[str, Any]) -> int:
  """One file: MAGIC, the zlib-compressed JSON layout's length (uint32 little-endian), the
  layout, then `blob`. Returns its size in bytes; `read_packed` reads it back."""
  header = zlib.compress(json.dumps(meta, separators=(",", ":")).encode(), 9)
  data = MAGIC + len(header).to_bytes(4, "little") + header + blob
  with open(path, "wb") as f:
    f.write(data)
  return len(data)


def read_packed(path: str) -> tuple[bytes, dict[str, Any]]:
  """(blob, layout) of a file `write_packed` wrote; `unpack(*read_packed(path))` gives params."""
  with open(path, "rb") as f:
    data = f.read()
  if data[:4] != MAGIC:
    raise ValueError(f"{path!r} is not a packed admm_jax weight file (no {MAGIC!r} header).")
  n = int.from_bytes(data[4:8], "little")
  return data[8 + n:], json.loads(zlib.decompress(data[8:8 + n]))


# ------------------------------------------------------------------------------ ONNX

def to_onnx(g: Graph, params: Params, quantized: Mapping[str, dict[str, Any]] | None = None):
  """The graph as an onnx.ModelProto (opset 21): input "images" (N, H, W, C) float32 in
  [0, 1], output "logits"; k-bit layers as int8/int4 initializers + DequantizeLinear.

  Raises:
    UnsupportedOpError: a node whose op is not one of ONNX_OPS.
  """
  import onnx  # pylint: disable=import-outside-toplevel
  from onnx import TensorProto, helper, numpy_helper  # pylint: disable=import-outside-toplevel
  quantized = dict(quantized or {})
  shapes = node_shapes(g, params)   # raises UnsupportedOpError first
  nodes, inits = [], []
  counter = iter(range(10**9))

  def const(arr, name=None):
    name = name or f"c{next(counter)}"
    inits.append(numpy_helper.from_array(np.asarray(arr), name))
    return name

  def op(kind, inputs, **attrs):
    out = f"t{next(counter)}"
    nodes.append(helper.make_node(kind, list(inputs), [out], **attrs))
    return out

  def weight_input(n, w_full, layout_axes, channel_axis):
    """The weight as the op reads it: a float initializer, or int codes -> DequantizeLinear."""
    q = quantized.get(n.name)
    if q is None:
      return const(np.transpose(w_full, layout_axes).astype(np.float32))
    codes = np.transpose(q["codes"], layout_axes)
    scale = np.asarray(q["scale"], np.float32)
    if q["bits"] <= 4:
      t = helper.make_tensor(f"c{next(counter)}", TensorProto.INT4, codes.shape,
                             pack_int4(codes).tobytes(), raw=True)
      z = helper.make_tensor(f"c{next(counter)}", TensorProto.INT4, scale.shape,
                             pack_int4(np.zeros(scale.shape, np.int8)).tobytes(), raw=True)
      inits.extend([t, z])
      names = [t.name, const(scale), z.name]
    else:
      names = [const(codes.astype(np.int8)), const(scale), const(np.zeros(scale.shape, np.int8))]
    attrs = {"axis": channel_axis} if scale.ndim else {}
    return op("DequantizeLinear", names, **attrs)

  env = {}
  for n in g.nodes:
    p = {k: np.asarray(v, np.float32) if k not in ("indices", "positions") else np.asarray(v)
         for k, v in params.get(n.name, {}).items()}
    shape = shapes[n.name]
    ins = [env[i] for i in n.inputs]
    four_d = len(shape) == 4
    bcast = (lambda v: np.asarray(v, np.float32).reshape(1, -1, 1, 1)) if four_d else (
        lambda v: np.asarray(v, np.float32).reshape(1, -1))
    if n.op == "input":
      env[n.name] = op("Transpose", ["images"], perm=[0, 3, 1, 2])
    elif n.op == "affine":
      env[n.name] = op("Div", [op("Sub", [ins[0], const(bcast(p["mean"]))]),
                               const(bcast(p["std"]))])
    elif n.op == "conv":
      cin_shape = shapes[n.inputs[0]]
      kh, kw = n.attr("kernel")
      s = n.attr("strides", 1)
      w = full_weight(n, params[n.name], cin_shape[-1])
      pads_h = graph_lib.same_padding(cin_shape[1], kh, s)
      pads_w = graph_lib.same_padding(cin_shape[2], kw, s)
      y = op("Conv", [ins[0], weight_input(n, w, (3, 2, 0, 1), 0)], kernel_shape=[kh, kw],
             strides=[s, s], pads=[pads_h[0], pads_w[0], pads_h[1], pads_w[1]])
      extra = np.zeros((1,) + shape[1:], np.float32)
      if "ones_kernel" in p:
        ones = np.ones((1,) + cin_shape[1:3] + (1,), np.float32)
        extra = extra + np.asarray(jax.lax.conv_general_dilated(
            ones, p["ones_kernel"][:, :, None, :], (s, s), "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC")))
      if "bias" in p:
        extra = extra + p["bias"]
      if "ones_kernel" in p or "bias" in p:
        y = op("Add", [y, const(np.transpose(extra, (0, 3, 1, 2)))])
      env[n.name] = y
    elif n.op == "dense":
      w = full_weight(n, params[n.name], shapes[n.inputs[0]][-1])
      y = op("MatMul", [ins[0], weight_input(n, w, (0, 1), 1)])
      env[n.name] = op("Add", [y, const(p["bias"].reshape(1, -1))]) if "bias" in p else y
    elif n.op == "batch_norm":
      mul = p["scale"] / np.sqrt(p["var"] + n.attr("epsilon"))
      env[n.name] = op("Add", [op("Mul", [ins[0], const(bcast(mul))]),
                               const(bcast(p["bias"] - p["mean"] * mul))])
    elif n.op == "relu":
      env[n.name] = op("Relu", ins)
    elif n.op in ("max_pool", "relu_max_pool"):
      y = op("MaxPool", ins, kernel_shape=[2, 2], strides=[2, 2])
      env[n.name] = op("Relu", [y]) if n.op == "relu_max_pool" else y
    elif n.op == "flatten":  # H, W, C order, as the jax graph
      env[n.name] = op("Reshape", [op("Transpose", ins, perm=[0, 2, 3, 1]),
                                   const(np.array([0, -1], np.int64))])
    elif n.op == "mean_pool":
      env[n.name] = op("Flatten", [op("GlobalAveragePool", ins)], axis=1)
    elif n.op == "add":
      total = None
      for x, places in zip(ins, n.attr("places", (None,) * len(ins))):
        if places is not None:
          first = op("Slice", [x, const(np.array([0], np.int64)),
                               const(np.array([1], np.int64)), const(np.array([1], np.int64))])
          zero = op("Mul", [first, const(np.float32(0))])   # a zero channel to gather from
          x = op("Gather", [op("Concat", [x, zero], axis=1),
                            const(np.asarray(places, np.int64))], axis=1)
        total = x if total is None else op("Add", [total, x])
      env[n.name] = op("Add", [total, const(bcast(p["shift"]))]) if "shift" in p else total
    else:
      raise UnsupportedOpError(f"node {n.name!r} has op {n.op!r}, which admm_jax cannot write "
                               f"as ONNX (it writes {', '.join(ONNX_OPS)}).")
  h, w_, c = g.input_shape
  out_name = env[g.nodes[-1].name]
  nodes.append(helper.make_node("Identity", [out_name], ["logits"]))
  graph = helper.make_graph(
      nodes, "admm_jax", [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                        ["N", h, w_, c])],
      [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                     ["N", shapes[g.nodes[-1].name][-1]])], inits)
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                            producer_name="admm_jax")
  model.ir_version = 10
  onnx.checker.check_model(model)
  return model


