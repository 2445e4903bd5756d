"""The admm and apply_masks optax transforms: formulas, exact zeros, composition, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from admm_jax import sparsity, transforms

SPEC = sparsity.spec({"conv/kernel": ("filter", 0.5), "dense/kernel": ("irregular", 0.75)})


def _params(key):
  k = jax.random.split(key, 3)
  return {"conv": {"kernel": jax.random.normal(k[0], (3, 3, 2, 4)), "bias": jnp.zeros(4)},
          "dense": {"kernel": jax.random.normal(k[1], (8, 6)),
                    "bias": jax.random.normal(k[2], (6,))}}


def _np_project(w, kind, ratio):
  """Independent NumPy statement of the projection (stable sort: lower index wins ties)."""
  w = np.asarray(w, np.float64)
  flat = w.reshape(-1, w.shape[-1])
  if kind == "irregular":
    scores, n = np.abs(w).reshape(-1), w.size
  else:
    scores = np.sqrt((flat ** 2).sum(axis=0 if kind == "filter" else 1))
    n = scores.size
  removed = min(int(np.floor(ratio * n + 0.5)), n - 1)
  keep = np.zeros(n, bool)
  keep[np.argsort(-scores, kind="stable")[:n - removed]] = True
  if kind == "filter":
    keep = np.broadcast_to(keep[None, :], flat.shape)
  elif kind == "column":
    keep = np.broadcast_to(keep[:, None], flat.shape)
  return np.where(keep.reshape(w.shape), w, 0.0)


RULES = {("conv", "kernel"): ("filter", 0.5), ("dense", "kernel"): ("irregular", 0.75)}


def _np_admm(params_seq, grads_seq, rho, update_every, growth):
  """The method's formulas, step by step, in NumPy (float64)."""
  w0 = params_seq[0]
  z = {k: _np_project(w0[k[0]][k[1]], *r) for k, r in RULES.items()}
  u = {k: np.zeros_like(z[k]) for k in RULES}
  outs = []
  for count, (w, g) in enumerate(zip(params_seq, grads_seq)):
    if count > 0 and count % update_every == 0:
      rho *= growth
      for k, r in RULES.items():
        wk = np.asarray(w[k[0]][k[1]], np.float64)
        z[k] = _np_project(wk + u[k], *r)
        u[k] = u[k] + wk - z[k]
    out = jax.tree.map(lambda x: np.asarray(x, np.float64), g)
    for k in RULES:
      w_k = np.asarray(w[k[0]][k[1]], np.float64)
      out[k[0]][k[1]] = out[k[0]][k[1]] + rho * (w_k - z[k] + u[k])
    outs.append(out)
  return outs, z, u, rho


def test_zu_update_is_the_projection_and_the_dual_step():
  # The public Z/U step (used by admm and timed by the bench) on its own.
  params, u = _params(jax.random.key(3)), _params(jax.random.key(4))
  z_new, u_new = transforms.zu_update(sparsity.rules_tree(params, SPEC), params, u)
  for k, r in RULES.items():
    w, uu = np.asarray(params[k[0]][k[1]]), np.asarray(u[k[0]][k[1]])
    np.testing.assert_allclose(z_new[k[0]][k[1]], _np_project(w + uu, *r), rtol=1e-6)
    np.testing.assert_allclose(u_new[k[0]][k[1]], uu + w - _np_project(w + uu, *r), atol=1e-6)
  assert isinstance(z_new["dense"]["bias"], optax.MaskedNode)
  assert isinstance(u_new["conv"]["bias"], optax.MaskedNode)


@pytest.mark.parametrize("use_jit", [False, True])
def test_admm_matches_numpy_formulas_over_several_zu_updates(use_jit):
  steps, update_every, rho0, growth = 10, 3, 0.05, 1.3
  keys = jax.random.split(jax.random.key(0), 2 * steps)
  params_seq = [_params(keys[2 * t]) for t in range(steps)]  # an arbitrary W every call
  grads_seq = [_params(keys[2 * t + 1]) for t in range(steps)]
  tx = transforms.admm(SPEC, rho=rho0, update_every=update_every, rho_growth=growth)
  state = tx.init(params_seq[0])
  update = jax.jit(tx.update) if use_jit else tx.update
  expected, z, u, rho = _np_admm(params_seq, grads_seq, rho0, update_every, growth)
  for t in range(steps):
    out, state = update(grads_seq[t], state, params_seq[t])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5),
                 out, expected[t])
  assert int(state.count) == steps
  np.testing.assert_allclose(float(state.rho), rho, rtol=1e-6)  # rho0 * 1.3**3 (t = 3, 6, 9)
  np.testing.assert_allclose(state.z["conv"]["kernel"], z[("conv", "kernel")], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.u["dense"]["kernel"], u[("dense", "kernel")],
                             rtol=1e-5, atol=1e-5)
  # Unpruned leaves carry no Z or U.
  assert isinstance(state.z["conv"]["bias"], optax.MaskedNode)


def test_admm_state_fields_and_init():
  params = _params(jax.random.key(1))
  state = transforms.admm(SPEC, rho=1e-3, update_every=5).init(params)
  assert state._fields == ("count", "rho", "z", "u")
  np.testing.assert_array_equal(state.z["dense"]["kernel"],
                                _np_project(params["dense"]["kernel"], "irregular", 0.75))
  np.testing.assert_array_equal(state.u["dense"]["kernel"], 0.0)
  assert state.count.dtype == jnp.int32


def test_primal_residual_and_penalty():
  params = _params(jax.random.key(2))
  state = transforms.admm(SPEC, rho=0.1, update_every=5).init(params)
  res = transforms.primal_residuals(state, params)
  w = params["conv"]["kernel"]
  assert set(res) == {"conv/kernel", "dense/kernel"}
  np.testing.assert_allclose(res["conv/kernel"],
                             np.linalg.norm(w - _np_project(w, "filter", 0.5)), rtol=1e-5)
  expected = 0.05 * sum(float(r) ** 2 for r in res.values())  # U = 0: 0.5 rho ||W - Z||^2
  np.testing.assert_allclose(transforms.admm_penalty(state, params), expected, rtol=1e-5)
  rel = transforms.primal_residuals(state, params, relative=True)
  np.testing.assert_allclose(rel["conv/kernel"], res["conv/kernel"] / np.linalg.norm(w), rtol=1e-5)
  assert 0 < float(rel["dense/kernel"]) < 1  # removing 75 % of the weights by magnitude
  chain = optax.chain(transforms.admm(SPEC, rho=0.1, update_every=5), optax.sgd(0.1))
  chain_state = chain.init(params)
  assert isinstance(transforms.find_admm_state(chain_state), transforms.ADMMState)


def test_admm_pulls_weights_onto_the_sparsity_set():
  """Many penalty steps with zero loss gradient: W converges to the projection."""
  params = _params(jax.random.key(3))
  tx = optax.chain(transforms.admm(SPEC, rho=1.0, update_every=20), optax.sgd(0.2))
  state = tx.init(params)

  @jax.jit
  def step(p, s):
    g = jax.tree.map(jnp.zeros_like, p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  first = transforms.primal_residuals(transforms.find_admm_state(state), params)
  for _ in range(200):
    params, state = step(params, state)
  last = transforms.primal_residuals(transforms.find_admm_state(state), params)
  for k in first:
    assert float(last[k]) < 1e-3 * float(first[k])


OPTIMIZERS = {
    "adamw_weight_decay": lambda: optax.adamw(1e-2, weight_decay=0.1),
    "sgd_momentum_nesterov": lambda: optax.sgd(1e-2, momentum=0.9, nesterov=True),
    "multi_steps_adam": lambda: optax.MultiSteps(optax.adam(1e-2), every_k_schedule=3),
    "inject_hyperparams": lambda: optax.inject_hyperparams(optax.adamw)(
        learning_rate=optax.cosine_decay_schedule(1e-2, 150), weight_decay=0.5),
    "schedule_and_clip": lambda: optax.chain(optax.clip_by_global_norm(1.0),
                                             optax.add_decayed_weights(0.3),
                                             optax.scale_by_adam(),
                                             optax.scale_by_schedule(
                                                 optax.linear_schedule(-1e-2, -1e-3, 150))),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_masks_hold_exact_zeros_through_optax_chains(name):
  params, masks = sparsity.hard_prune(_params(jax.random.key(4)), SPEC)
  tx = optax.chain(OPTIMIZERS[name](), transforms.apply_masks(masks))
  state = tx.init(params)

  @jax.jit
  def step(p, s, key):
    # A loss whose gradient pushes every weight, pruned or not.
    g = jax.grad(lambda q: sum(jnp.sum((x - 3.0) ** 2) for x in jax.tree.leaves(q)))(p)
    g = jax.tree.map(lambda x: x + jax.random.normal(key, x.shape), g)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  kept_before = jax.tree.map(lambda m, w: None if m is None else w[m], masks, params,
                             is_leaf=lambda x: x is None)
  for i in range(120):
    params, state = step(params, state, jax.random.key(i))
  for path in ("conv", "dense"):
    m = np.asarray(masks[path]["kernel"])
    w = np.asarray(params[path]["kernel"])
    assert (w[~m] == 0.0).all() and not np.signbit(w[~m]).any()
    assert not np.allclose(w[m], kept_before[path]["kernel"])  # kept weights did train
  assert not np.allclose(params["conv"]["bias"], 0.0)


def test_apply_masks_zeroes_pruned_weights_that_were_not_zero():
  params = _params(jax.random.key(5))
  _, masks = sparsity.hard_prune(params, SPEC)
  tx = transforms.apply_masks(masks)
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  new = optax.apply_updates(params, updates)
  m = np.asarray(masks["dense"]["kernel"])
  assert (np.asarray(new["dense"]["kernel"])[~m] == 0.0).all()
  np.testing.assert_allclose(np.asarray(new["dense"]["kernel"])[m],
                             np.asarray(params["dense"]["kernel"])[m] + 1.0)


def test_admm_lr_schedule_restarts_and_drops():
  sched = transforms.admm_lr_schedule(0.01, update_every=30, drops_per_cycle=3, factor=0.1)
  got = [float(sched(c)) for c in (0, 9, 10, 19, 20, 29, 30, 45, 60)]
  np.testing.assert_allclose(got, [0.01, 0.01, 1e-3, 1e-3, 1e-4, 1e-4, 0.01, 1e-3, 0.01], rtol=1e-6)


def test_errors_name_the_argument():
  params = _params(jax.random.key(6))
  tx = transforms.admm(SPEC, rho=1e-3, update_every=2)
  state = tx.init(params)
  with pytest.raises(ValueError, match="params"):
    tx.update(params, state)
  with pytest.raises(ValueError, match="params"):
    tx.init(None)
  with pytest.raises(ValueError, match="rho"):
    transforms.admm(SPEC, rho=-1.0, update_every=2)
  with pytest.raises(ValueError, match="update_every"):
    transforms.admm(SPEC, rho=1e-3, update_every=0)
  with pytest.raises(ValueError, match="rho_growth"):
    transforms.admm(SPEC, rho=1e-3, update_every=2, rho_growth=0.0)
  with pytest.raises(ValueError, match="matches no parameter"):
    transforms.admm(sparsity.spec({"nope/kernel": ("filter", 0.5)}), rho=1e-3,
                    update_every=2).init(params)
  with pytest.raises(ValueError, match="masks"):
    transforms.apply_masks({"conv": {"kernel": jnp.ones((3, 3, 2, 4), bool)}}).init(params)
