"""AutoAttack's members and cascade: APGD reaches a linear model's closed-form worst case, FAB
breaks exactly what is breakable, APGD beats PGD at the same budget, Square sees through
gradient masking, the cascade is the AND of its members, and it is deterministic and the same
on 8 devices as on 1.

Every jitted function is compiled once per module (module-scoped fixtures); models are tiny.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from admm_jax import attacks

CLASSES = 10


def _jit(fn):
  """jax.jit without LLVM's optimisations: on these tiny models compiling is nearly all the
  time (and -O0 halves it), running is not."""
  return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0})


def _margin(logits, y):
  """(B,) z_y - max_{j != y} z_j in float64 numpy."""
  z = np.asarray(logits, np.float64)
  y = np.asarray(y)
  others = np.where(np.eye(z.shape[1], dtype=bool)[y], -np.inf, z)
  return z[np.arange(len(y)), y] - others.max(1)


def _dist(x_adv, x, norm):
  delta = (np.asarray(x_adv, np.float64) - np.asarray(x, np.float64)).reshape(len(x), -1)
  return np.abs(delta).max(1) if norm == "linf" else np.linalg.norm(delta, axis=1)


@functools.cache
def _predict(apply_fn):
  return _jit(lambda params, x: jnp.argmax(apply_fn(params, x), -1))


def _robust(apply_fn, params, x_adv, y):
  """(B,) bool: still classified as y (one compiled program per model, not one per op)."""
  return np.asarray(_predict(apply_fn)(params, x_adv)) == np.asarray(y)


# --- Losses --------------------------------------------------------------------------------


def test_dlr_losses_equal_hand_computed_values():
  logits = jnp.array([[4.0, 1.0, 3.0, 0.0, -1.0],    # correct: z_y = 4, others max 3
                      [1.0, 5.0, 2.0, 2.0, 0.0]])    # wrong: z_y = 1, top 5
  y = jnp.array([0, 0])
  # -(z_y - max_other) / (z_(1) - z_(3)): -(4 - 3) / (4 - 1), -(1 - 5) / (5 - 2).
  np.testing.assert_allclose(attacks.dlr_loss(logits, y), [-1 / 3, 4 / 3], rtol=1e-6)
  # -(z_y - z_t) / (z_(1) - (z_(3) + z_(4)) / 2): targets 3 and 2.
  got = attacks.targeted_dlr_loss(logits, y, jnp.array([3, 2]))
  np.testing.assert_allclose(got, [-(4 - 0) / (4 - (1 + 0) / 2), -(1 - 2) / (5 - (2 + 1) / 2)],
                             rtol=1e-6)


def test_dlr_is_invariant_to_shifting_and_scaling_the_logits():
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(6, CLASSES)), jnp.float32)
  y = jnp.arange(6) % CLASSES
  np.testing.assert_allclose(attacks.dlr_loss(3 * logits + 7, y), attacks.dlr_loss(logits, y),
                             rtol=1e-5)


def test_dlr_needs_enough_classes():
  with pytest.raises(ValueError, match="dlr_loss needs logits of shape .B, C. with at least 3"):
    attacks.dlr_loss(jnp.zeros((2, 2)), jnp.zeros(2, jnp.int32))
  with pytest.raises(ValueError, match="at least 4 classes"):
    attacks.targeted_dlr_loss(jnp.zeros((2, 3)), jnp.zeros(2, jnp.int32), jnp.ones(2, jnp.int32))


def test_apgd_checkpoints_follow_the_papers_formula():
  assert attacks.apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
  assert attacks.apgd_checkpoints(10) == [3, 5, 6, 7, 8, 9, 10]


# --- Linear models: the worst case in closed form ------------------------------------------


def _two_sided_linear(params, x):
  """A binary linear classifier s = w.x + b inside 10 classes: logits (s, -s, -50, ...).

  Cross-entropy, DLR and targeted DLR all grow as the margin 2 s (or -2 s) falls, so every
  attack's best point is the margin's minimiser: x - eps sign(w) (Linf), x - eps w / ||w||
  (L2) for label 0.
  """
  s = x @ params["w"] + params["b"]
  far = jnp.full((x.shape[0], CLASSES - 2), -50.0)
  return jnp.concatenate([s[:, None], -s[:, None], far], axis=1)


EPS = {"linf": 0.01, "l2": 0.05}


@pytest.fixture(scope="module")
def linear():
  """(params, x, y, {norm: the closed-form worst-case margin}) with inputs far from the box."""
  rng = np.random.default_rng(0)
  w = rng.normal(size=16).astype(np.float32)
  x = rng.uniform(0.4, 0.6, size=(32, 16)).astype(np.float32)
  params = {"w": jnp.asarray(w), "b": jnp.asarray(-0.5 * w.sum())}
  y = jnp.asarray(np.where((x - 0.5) @ w > 0, 0, 1), jnp.int32)
  margin = _margin(_two_sided_linear(params, jnp.asarray(x)), y)
  worst = {"linf": margin - 2 * EPS["linf"] * np.abs(w).sum(),
           "l2": margin - 2 * EPS["l2"] * np.linalg.norm(w)}
  for norm in worst:  # Some examples are breakable, some are not.
    assert 5 <= (worst[norm] < 0).sum() <= 27
  return params, jnp.asarray(x), y, worst


@pytest.fixture(scope="module")
def linear_apgd(linear):
  """norm -> loss -> APGD's points on the linear model (one compiled program)."""
  params, x, y, _ = linear

  @_jit
  def run(params, x, y, key):
    return {norm: {loss: attacks.apgd(_two_sided_linear, params, x, y, key, eps=EPS[norm],
                                      norm=norm, loss=loss, steps=20)
                   for loss in attacks.APGD_LOSSES}
            for norm in attacks.NORMS}

  return run(params, x, y, jax.random.key(0))


@pytest.mark.parametrize("loss", ["ce", "dlr"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_apgd_reaches_the_worst_case_of_a_linear_model(linear, linear_apgd, norm, loss):
  params, x, y, worst = linear
  x_adv = linear_apgd[norm][loss]
  assert _dist(x_adv, x, norm).max() <= EPS[norm] * (1 + 1e-5) + 1e-7
  margin = _margin(_two_sided_linear(params, x_adv), y)
  breakable = worst[norm] < 0
  # Every breakable example is broken, and no other.
  np.testing.assert_array_equal(margin < 0, breakable)
  # Where nothing breaks, APGD's highest-loss point attains the minimal margin.
  np.testing.assert_allclose(margin[~breakable], worst[norm][~breakable], atol=1e-4)


@pytest.fixture(scope="module")
def linear_fab(linear):
  params, x, y, _ = linear

  @_jit
  def run(params, x, y):
    return {norm: attacks.fab(_two_sided_linear, params, x, y, None, eps=EPS[norm], norm=norm,
                              steps=10, num_targets=1)
            for norm in attacks.NORMS}

  return run(params, x, y)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fab_breaks_exactly_the_breakable_examples_within_eps(linear, linear_fab, norm):
  params, x, y, worst = linear
  x_adv = linear_fab[norm]
  dist = _dist(x_adv, x, norm)
  assert dist.max() <= EPS[norm] * (1 + 1e-5) + 1e-7
  assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
  broken = ~_robust(_two_sided_linear, params, x_adv, y)
  np.testing.assert_array_equal(broken, worst[norm] < 0)
  np.testing.assert_array_equal(dist[~broken], 0.0)  # Unbroken examples come back as x.
  # Minimal norm: the boundary is at distance margin / (2 ||w||_dual); FAB lands just past it.
  w = np.asarray(params["w"], np.float64)
  margin = _margin(_two_sided_linear(params, x), y)
  boundary = margin / (2 * (np.abs(w).sum() if norm == "linf" else np.linalg.norm(w)))
  np.testing.assert_array_less(dist[broken], 1.1 * boundary[broken] + 1e-6)


# --- A trained model: APGD at least as strong as PGD ---------------------------------------


def _mlp(params, x):
  h = jax.nn.relu(x @ params["w1"] + params["b1"])
  h = jax.nn.relu(h @ params["w2"] + params["b2"])
  return h @ params["w3"] + params["b3"]


@pytest.fixture(scope="module")
def trained_mlp():
  """A 3-layer MLP that memorised random labels of 256 points in [0, 1]^32: a nonlinear
  boundary, where the attacks' step rules matter."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.uniform(size=(256, 32)), jnp.float32)
  y = jnp.asarray(rng.integers(0, CLASSES, size=256), jnp.int32)
  init = lambda *shape: jnp.asarray(rng.normal(size=shape) / np.sqrt(shape[0]), jnp.float32)
  params = {"w1": init(32, 64), "b1": jnp.zeros(64), "w2": init(64, 64), "b2": jnp.zeros(64),
            "w3": init(64, CLASSES), "b3": jnp.zeros(CLASSES)}
  opt = optax.adam(1e-2)

  @_jit
  def fit(params):
    def step(carry, _):
      params, state = carry
      grads = jax.grad(lambda p: optax.losses.softmax_cross_entropy_with_integer_labels(
          _mlp(p, x), y).mean())(params)
      updates, state = opt.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), None

    (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=500)
    return params

  params = fit(params)
  assert _robust(_mlp, params, x, y).mean() == 1.0
  return params, x, y


def test_apgd_ce_is_at_least_as_strong_as_pgd_with_the_same_budget(trained_mlp):
  params, x, y = trained_mlp
  eps, key = 0.04, jax.random.key(5)
  # Ten gradient steps each: by_name's PGD-10 (step eps / 4) and APGD-CE with 10 steps.
  pgd = _jit(functools.partial(attacks.by_name("pgd"), _mlp, eps=eps, norm="linf"))
  apgd = _jit(functools.partial(attacks.apgd, _mlp, eps=eps, norm="linf", steps=10))
  pgd_robust = _robust(_mlp, params, pgd(params, x, y, key), y).mean()
  apgd_robust = _robust(_mlp, params, apgd(params, x, y, key), y).mean()
  assert 0.1 <= pgd_robust <= 0.9  # The budget leaves PGD something to miss.
  assert apgd_robust <= pgd_robust, (apgd_robust, pgd_robust)


# --- Gradient masking and the cascade ------------------------------------------------------


def _quantized_linear(params, x):
  """A linear model on inputs rounded to multiples of 1/4: its input gradient is zero."""
  q = jnp.round(x * 4) / 4
  return q.reshape(x.shape[0], -1) @ params["w"]


MASKED_EPS = 0.15


@pytest.fixture(scope="module")
def masked():
  """32 8x8 images that the quantised model classifies with a margin > 3, yet some reachable
  quantisation within eps flips (closed form, pixel by pixel)."""
  rng = np.random.default_rng(1)
  w = rng.normal(size=(64, CLASSES)).astype(np.float32)
  x = rng.uniform(size=(512, 8, 8, 1)).astype(np.float32)
  quant = lambda v: (np.round(v * 4) / 4).reshape(len(v), -1)
  z = quant(x) @ w
  y = z.argmax(1)
  lo, hi = quant(np.clip(x - MASKED_EPS, 0, 1)), quant(np.clip(x + MASKED_EPS, 0, 1))
  diff = w[:, y].T[:, :, None] - w[None]  # (N, 64, C): w_y - w_j per pixel
  worst = np.minimum(diff * lo[:, :, None], diff * hi[:, :, None]).sum(1)
  worst[np.arange(len(y)), y] = np.inf
  keep = np.where((_margin(z, y) > 3) & (worst.min(1) < -1))[0][:32]
  assert len(keep) == 32
  return {"w": jnp.asarray(w)}, jnp.asarray(x[keep]), jnp.asarray(y[keep], jnp.int32)


@pytest.fixture(scope="module")
def masked_members(masked):
  """Each standard member (and PGD) run on its own on the masked model, with the key the
  cascade gives it (one compiled program)."""
  params, x, y = masked
  names = attacks.STANDARD_NAMES + ("pgd",)

  @_jit
  def run_alone(params, x, y, key):
    return {name: attacks.by_name(name)(_quantized_linear, params, x, y,
                                        jax.random.fold_in(key, i), eps=MASKED_EPS, norm="linf")
            for i, name in enumerate(names)}

  return run_alone(params, x, y, jax.random.key(7))


@pytest.fixture(scope="module")
def masked_autoattack(masked):
  """(run, result): standard AutoAttack on the masked model, the batch split over 8 devices."""
  params, x, y = masked
  assert jax.device_count() == 8  # tests/conftest.py forces 8 host devices
  mesh = jax.make_mesh((8,), ("data",))
  data, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  params, x, y = (jax.device_put(params, replicated), jax.device_put(x, data),
                  jax.device_put(y, data))
  run = _jit(functools.partial(attacks.autoattack, _quantized_linear, eps=MASKED_EPS,
                               norm="linf"))
  result = run(params, x, y, jax.random.key(7))
  assert result.robust.sharding.spec == P("data")
  return functools.partial(run, params, x, y), result


def test_square_breaks_a_gradient_masked_model_where_pgd_fails(masked, masked_members):
  params, x, y = masked
  for name in ("pgd", "square"):
    assert _dist(masked_members[name], x, "linf").max() <= MASKED_EPS + 1e-6
  pgd_robust = _robust(_quantized_linear, params, masked_members["pgd"], y).mean()
  square_robust = _robust(_quantized_linear, params, masked_members["square"], y).mean()
  assert pgd_robust >= 0.9, pgd_robust  # Zero gradients: PGD never leaves its random start.
  assert square_robust <= 0.25, square_robust


def test_cascade_on_8_devices_is_the_and_of_its_members_alone_on_1_device(
    masked, masked_members, masked_autoattack):
  # One test for two properties (compiling AutoAttack once more would cost seconds): each
  # member run alone decides every example exactly as inside the cascade, and splitting the
  # batch over devices changes nothing.
  params, x, y = masked
  _, result = masked_autoattack
  robust_alone = np.stack([_robust(_quantized_linear, params, masked_members[name], y)
                           for name in attacks.STANDARD_NAMES])
  clean = _robust(_quantized_linear, params, x, y)
  np.testing.assert_array_equal(result.clean_correct, clean)
  np.testing.assert_array_equal(result.robust, clean & robust_alone.all(0))
  first_break = np.where(robust_alone.all(0), attacks.NEVER_BROKEN, np.argmin(robust_alone, 0))
  np.testing.assert_array_equal(result.broken_by, np.where(clean, first_break,
                                                           attacks.CLEAN_MISCLASSIFIED))
  np.testing.assert_allclose(result.robust_after,
                             [np.mean(clean & robust_alone[:i + 1].all(0)) for i in range(4)])
  # Square did the work here: the gradient attacks broke at most a few.
  assert (np.asarray(result.broken_by) == 3).sum() >= 16


def test_cascade_with_the_same_key_gives_the_same_result(masked_autoattack):
  run, first = masked_autoattack
  again = run(jax.random.key(7))
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)


# --- Names and bad input -------------------------------------------------------------------


def test_unknown_attack_name_lists_the_valid_ones():
  with pytest.raises(ValueError, match="unknown attack 'apgd'.*apgd-ce, apgd-dlr, apgd-t"):
    attacks.by_name("apgd")
  with pytest.raises(ValueError, match="unknown attack 'pgd-40'"):
    attacks.cascade(_mlp, {}, jnp.zeros((2, 4)), jnp.zeros(2, jnp.int32), jax.random.key(0),
                    names=("apgd-ce", "pgd-40"), eps=0.1, norm="linf")


@pytest.mark.parametrize("fn, kwargs, message", [
    (attacks.apgd, dict(norm="l1"), "apgd: norm must be one of 'linf', 'l2', got 'l1'"),
    (attacks.apgd, dict(loss="kl"), "apgd: loss must be one of 'ce', 'dlr', got 'kl'"),
    (attacks.apgd, dict(rho=1.5), r"apgd: rho must be in \(0.0, 1.0\), got 1.5"),
    (attacks.apgd, dict(steps=0), "apgd: steps must be an integer >= 1, got 0"),
    (attacks.apgd_targeted, dict(num_targets=10),
     "apgd_targeted: num_targets=10 exceeds the 9 classes other than the label"),
    (attacks.fab, dict(eta=0.5), r"fab: eta must be in \[1.0, inf\), got 0.5"),
    (attacks.square, dict(queries=-1), "square: queries must be an integer >= 1, got -1"),
    (attacks.square, dict(eps=-0.1), "square: eps must be >= 0, got -0.1"),
])
def test_bad_argument_is_one_sentence_naming_it(linear, fn, kwargs, message):
  params, x, y, _ = linear
  kwargs = {"eps": 0.1, **kwargs}
  with pytest.raises(ValueError, match=message):
    fn(_two_sided_linear, params, x, y, jax.random.key(0), **kwargs)
