"""Deployable bytes: packed k-bit codes read back exactly, and the ONNX model computes the
compact graph's logits under onnxruntime (int4/int8 weights behind DequantizeLinear)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from admm_jax import compaction, deploy, graph, models, sparsity
from model_variables import random_variables

if os.environ.get("CI") == "true":   # .ci/run installs the onnx extra: missing is a failure
  import onnxruntime as ort
else:
  ort = pytest.importorskip("onnxruntime", reason="needs the onnx extra (pip install .[onnx])")

LENET_SPEC = {"conv1/kernel": ("filter", 0.5, 4), "conv2/kernel": ("irregular", 0.8, 8, "layer"),
              "fc1/kernel": ("irregular", 0.95, 4), "fc2/kernel": ("irregular", 0.5)}


def _compact(model, shape, spec_map, seed=0):
  variables = random_variables(model, (1,) + shape, seed)
  the_spec = sparsity.spec(spec_map)
  params, masks = sparsity.hard_prune(variables["params"], the_spec)
  rules = sparsity.resolve(params, the_spec)
  kinds = {k: r.kind for k, r in rules.items()}
  g, p = compaction.compact(model, dict(variables, params=params), masks, shape, kinds=kinds)
  bits = {k.rsplit("/", 1)[0]: (r.bits, r.scale_mode) for k, r in rules.items()
          if r.bits is not None}
  return g, p, bits


@pytest.fixture(scope="module")
def lenet():
  g, p, bits = _compact(models.get_model("lenet", 1, 10), (28, 28, 1), LENET_SPEC)
  return g, p, bits, deploy.quantize_graph(g, p, bits)


def _ort_logits(model_proto, x):
  sess = ort.InferenceSession(model_proto.SerializeToString(),
                              providers=["CPUExecutionProvider"])
  return sess.run(["logits"], {"images": np.asarray(x, np.float32)})[0]


def test_int4_packing_and_gap_coding_round_trip():
  codes = np.array([-8, -7, -1, 0, 1, 7, 3], np.int8)
  np.testing.assert_array_equal(deploy.unpack_int4(deploy.pack_int4(codes), 7), codes)
  assert deploy.pack_int4(codes).nbytes == 4
  positions = np.array([0, 3, 300, 301, 1000])
  gaps, c = deploy.gap_encode(positions, np.array([1, 2, 3, 4, 5], np.int8))
  assert gaps.dtype == np.uint8
  decoded = deploy.gap_decode(gaps)
  np.testing.assert_array_equal(decoded[c != 0], positions)
  assert np.all(np.isin(decoded[c == 0], positions, invert=True))   # bridging zeros only


def test_quantize_graph_reads_codes_and_scales(lenet):
  g, p, bits, q = lenet
  assert set(q) == {"conv1", "conv2", "fc1"}
  assert np.max(np.abs(q["conv1"]["codes"])) <= 7 and q["conv2"]["scale"].ndim == 0
  shapes = deploy.node_shapes(g, p)
  for name, entry in q.items():
    n = next(n for n in g.nodes if n.name == name)
    w = deploy.full_weight(n, p[name], shapes[n.inputs[0]][-1])
    np.testing.assert_allclose(entry["codes"] * entry["scale"], w, rtol=1e-6, atol=1e-7)


def test_packed_file_reads_back_the_same_network_in_fewer_bytes(lenet, tmp_path):
  g, p, _, q = lenet
  blob, meta = deploy.pack(g, p, q)
  size = deploy.write_packed(str(tmp_path / "q.bin"), blob, meta)
  assert size == (tmp_path / "q.bin").stat().st_size
  p2 = deploy.unpack(*deploy.read_packed(str(tmp_path / "q.bin")))
  x = jax.random.uniform(jax.random.key(0), (8, 28, 28, 1))
  np.testing.assert_allclose(np.asarray(g.apply(p2, x)), np.asarray(g.apply(p, x)), atol=1e-5)
  assert len(blob) < compaction.num_bytes(p)
  fc1 = {a["field"]: a for a in meta["arrays"] if a["node"] == "fc1"}
  assert fc1["values"]["encoding"] == "int4" and fc1["indices"]["encoding"] == "gaps"
  assert fc1["values"]["nbytes"] == -(-fc1["values"]["size"] // 2)   # two codes per byte
  assert fc1["indices"]["nbytes"] == fc1["values"]["size"]           # one byte per position


def test_onnx_model_matches_the_graph_under_onnxruntime(lenet):
  g, p, _, q = lenet
  model = deploy.to_onnx(g, p, q)
  kinds = {i.op_type for i in model.graph.node}
  assert "DequantizeLinear" in kinds
  int4 = [t for t in model.graph.initializer if t.data_type == 22]   # TensorProto.INT4
  assert int4, "4-bit layers are stored as INT4"
  x = np.asarray(jax.random.uniform(jax.random.key(1), (16, 28, 28, 1)))
  np.testing.assert_allclose(_ort_logits(model, x), np.asarray(g.apply(p, jnp.asarray(x))),
                             atol=1e-4)


@pytest.mark.slow   # ~40 s on 2 loaded cores: ResNet-18's compaction and eager graph
def test_onnx_resnet_with_batch_norm_adds_and_pruned_channels():
  # Weights put on an 8-bit per-channel grid and half the filters removed in numpy (fast):
  # what a quantized filter-pruned run leaves.
  model = models.get_model("resnet18", 1, 10)
  variables = random_variables(model, (1, 32, 32, 3), seed=3)
  rng = np.random.default_rng(3)

  def on_grid(path, w):
    if not path[-1].key == "kernel" or "conv" not in jax.tree_util.keystr(path):
      return w
    codes = rng.integers(-127, 128, w.shape) * (rng.random(w.shape[-1]) < 0.5)
    return jnp.asarray(codes * rng.uniform(0.001, 0.01, w.shape[-1]), jnp.float32)
  params = jax.tree_util.tree_map_with_path(on_grid, variables["params"])
  masks = jax.tree.map(lambda w: None, params)
  g, p = compaction.compact(model, dict(variables, params=params), masks, (32, 32, 3))
  bits = {n.name: (8, "channel") for n in g.nodes if n.op == "conv"}
  q = deploy.quantize_graph(g, p, bits)
  x = np.asarray(jax.random.uniform(jax.random.key(2), (4, 32, 32, 3)))
  np.testing.assert_allclose(_ort_logits(deploy.to_onnx(g, p, q), x),
                             np.asarray(g.apply(p, jnp.asarray(x))), atol=1e-4)


def test_an_op_onnx_cannot_express_is_one_error(lenet):
  g, p, _, _ = lenet
  bad = graph.Graph(g.nodes + (graph.node("soft", "softmax", (g.nodes[-1].name,)),),
                    g.input_shape)
  with pytest.raises(deploy.UnsupportedOpError, match="'softmax'.*cannot write"):
    deploy.to_onnx(bad, p)


def test_a_layer_off_its_grid_is_refused(lenet):
  g, p, bits, _ = lenet
  with pytest.raises(deploy.OffGridError, match="fc2.*not on a 4-bit grid"):
    deploy.quantize_graph(g, p, {**bits, "fc2": (4, "channel")})
