"""k-bit rules in the spec, ADMM's Z-step onto sparse grids, and straight-through retraining."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from admm_jax import quantization, sparsity, transforms


def _params(seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {"conv": {"kernel": jax.random.normal(k1, (3, 3, 2, 4)), "bias": jnp.zeros(4)},
          "fc": {"kernel": jax.random.normal(k2, (8, 3)), "bias": jnp.zeros(3)}}


def _on_grid(w, bits, scale_mode="channel"):
  return quantization.recover(np.asarray(w), bits, scale_mode) is not None


def test_two_tuples_still_work_and_bits_are_optional():
  s = sparsity.spec({"conv/kernel": ("filter", 0.5), "fc/kernel": ("irregular", 0.5, 4)})
  rules = dict(s.rules)
  assert rules["conv/kernel"].bits is None
  assert rules["fc/kernel"] == sparsity.Rule("irregular", 0.5, 4, "channel")
  assert "('filter', 0.5)" in repr(s) and "('irregular', 0.5, 4, 'channel')" in repr(s)


@pytest.mark.parametrize("bits", [1, 9])
def test_spec_refuses_bits_outside_2_to_8(bits):
  with pytest.raises(ValueError, match="from 2 to 8"):
    sparsity.spec({"fc/kernel": ("irregular", 0.5, bits)})


def test_spec_refuses_a_grid_on_a_leaf_with_no_weights_to_quantize():
  with pytest.raises(ValueError, match="no weights to quantize"):
    sparsity.rules_tree(_params(), sparsity.spec({"fc/bias": ("irregular", 0.5, 4)}))


def test_hard_prune_puts_k_bit_leaves_on_their_sparse_grid():
  params = _params()
  s = sparsity.spec({"conv/kernel": ("filter", 0.5, 4, "layer"), "fc/kernel": ("irregular", 0.75)})
  pruned, masks = sparsity.hard_prune(params, s)
  conv = np.asarray(pruned["conv"]["kernel"])
  assert _on_grid(conv, 4, "layer")
  assert np.all(conv[~np.asarray(masks["conv"]["kernel"])] == 0)
  assert np.sum(np.any(conv.reshape(-1, 4) != 0, axis=0)) <= 2
  fc = np.asarray(pruned["fc"]["kernel"])
  assert np.count_nonzero(fc) == 6 and not _on_grid(fc, 8)   # float, sparse only
  d = sparsity.distance_to_set(pruned, s)
  assert float(d["conv/kernel"]) < 1e-5 and float(d["fc/kernel"]) == 0.0
  assert sparsity.report(pruned, s).layers["conv/kernel"].bits == 4


def test_admm_z_step_projects_onto_the_sparse_grid():
  params = _params()
  s = sparsity.spec({"fc/kernel": ("irregular", 0.5, 3)})
  state = transforms.admm(s, rho=0.1, update_every=1).init(params)
  z = np.asarray(state.z["fc"]["kernel"])
  assert _on_grid(z, 3) and np.count_nonzero(z) <= 12


def test_keep_on_grid_trains_through_the_grid_and_keeps_masks():
  params = _params(1)
  s = sparsity.spec({"fc/kernel": ("irregular", 0.5, 4)})
  params, masks = sparsity.hard_prune(params, s)
  target = jax.random.normal(jax.random.key(5), (8, 3))
  loss = lambda p: jnp.sum((p["fc"]["kernel"] - target) ** 2)
  tx = optax.chain(optax.sgd(0.05), transforms.apply_masks(masks),
                   transforms.keep_on_grid(s, masks))
  opt = tx.init(params)
  first = float(loss(params))
  for _ in range(30):
    updates, opt = tx.update(jax.grad(loss)(params), opt, params)
    params = optax.apply_updates(params, updates)
    w = np.asarray(params["fc"]["kernel"])
    assert _on_grid(w, 4)
    assert np.all(w[~np.asarray(masks["fc"]["kernel"])] == 0)
  # Straight through: the gradient at the grid point moved the latent weights, the loss fell
  # to what the best 4-bit point on the mask allows.
  floor = float(loss({"fc": {"kernel": jnp.where(masks["fc"]["kernel"], target, 0.0)}}))
  assert float(loss(params)) < floor + 0.01 * first < first - 0.2 * first
  # Unquantized leaves are left to the optimizer.
  assert isinstance(opt[2].latent["conv"]["kernel"], optax.MaskedNode)


def test_config_sparsity_text_takes_a_bits_field():
  from admm_jax.app import configlib
  rules = configlib.parse_sparsity("conv1/kernel=filter:0.5,fc1/kernel=irregular:0.9:4b,"
                                   "fc2/kernel=2:4:8b-layer")
  assert rules == {"conv1/kernel": ("filter", 0.5),
                   "fc1/kernel": ("irregular", 0.9, 4, "channel"),
                   "fc2/kernel": ("2:4", None, 8, "layer")}
  sparsity.spec(rules)   # what the run builds from it


@pytest.mark.parametrize("text,match", [
    ("fc1/kernel=irregular:0.9:9b", "from 2 to 8"),
    ("fc1/kernel=irregular:0.9:1b", "from 2 to 8"),
    ("fc1/kernel=irregular:0.9:4bits", "bits field"),
])
def test_config_refuses_bad_bits_in_one_sentence(text, match):
  from admm_jax.app import configlib
  config = configlib.base_config()
  config.sparsity = text
  with pytest.raises(configlib.ConfigError, match=match) as e:
    configlib.validate(config)
  assert "\n" not in str(e.value) and "config.sparsity" in str(e.value)


@pytest.mark.parametrize("grid", ["train", "end"])
@pytest.mark.parametrize("stage", ["retrain", "inherited", "finetune"])
def test_masked_stages_hold_k_bit_layers_on_their_grid_throughout_or_at_the_end(stage, grid):
  from admm_jax.app import configlib, stages
  s = sparsity.spec({"fc/kernel": ("irregular", 0.5, 3)})
  config = configlib.override(configlib.base_config(), {f"{stage}.grid": grid})
  params = _params(2)
  start = stages.StageStart(config=config, spec=s,
                            variables={"params": params, "batch_stats": {}},
                            fresh={"params": _params(3), "batch_stats": {}},
                            optimizer=optax.sgd(0.1), update_every=1)
  variables, tx = stages.STAGES[stage].build(start)
  p = variables["params"]
  # retrain and finetune start on the sparse k-bit set (the projection); inherited from the
  # masked init
  assert _on_grid(p["fc"]["kernel"], 3) == (stage != "inherited")
  support = np.asarray(p["fc"]["kernel"]) != 0
  state = tx.init(p)
  for _ in range(2):
    updates, state = tx.update(jax.tree.map(jnp.ones_like, p), state, p)
    p = optax.apply_updates(p, updates)
    kernel = np.asarray(p["fc"]["kernel"])
    assert np.count_nonzero(kernel) <= 12 and not np.any(kernel[~support])
    assert _on_grid(kernel, 3) == (grid == "train")   # "end": floats under the masks
  assert not _on_grid(p["conv"]["kernel"], 8)   # unpruned leaves train as floats
  out = stages.STAGES[stage].finish(config, s, p)
  if grid == "train":
    assert out is p   # already on the grid: the output is the trained params as they are
  else:
    kernel = np.asarray(out["fc"]["kernel"])
    assert _on_grid(kernel, 3) and not np.any(kernel[~support])
    np.testing.assert_array_equal(np.asarray(out["fc"]["kernel"]),
                                  np.asarray(sparsity.hard_prune(p, s)[0]["fc"]["kernel"]))
    np.testing.assert_array_equal(np.asarray(out["conv"]["kernel"]), p["conv"]["kernel"])
  float_spec = sparsity.spec({"fc/kernel": ("irregular", 0.5)})
  assert stages.STAGES[stage].finish(config, float_spec, p) is p   # no bits: nothing to do


def test_grid_field_is_checked_in_one_sentence():
  from admm_jax.app import configlib
  config = configlib.override(configlib.base_config(), {"retrain.grid": "ste"})
  with pytest.raises(configlib.ConfigError, match="config.retrain.grid='ste' is invalid") as e:
    configlib.validate(config)
  assert "\n" not in str(e.value)
