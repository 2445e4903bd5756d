"""PGD-Linf, FGSM and PGD-L2 stay in the ball and box, are optimal on linear models,
beat random noise, and behave the same under jit."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from admm_jax import attacks

EPS = {"linf": 0.1, "fgsm": 0.1, "l2": 0.5}
KINDS = tuple(EPS)


def _attack(kind, eps=None, steps=5, random_start=True, box=(0.0, 1.0), loss_fn=None,
            step_size=None):
  """One of the three attacks with its hyper-parameters bound (partial of the public API)."""
  eps = EPS[kind] if eps is None else eps
  common = dict(eps=eps, random_start=random_start, box=box, loss_fn=loss_fn)
  if kind == "fgsm":
    return functools.partial(attacks.fgsm, step_size=step_size, **common)
  fn = attacks.pgd_linf if kind == "linf" else attacks.pgd_l2
  return functools.partial(fn, step_size=step_size or eps / 4 or 0.01, steps=steps, **common)


def _distance(kind, x_adv, x):
  """Per-example Linf (linf, fgsm) or L2 distance, in float32."""
  delta = (jnp.asarray(x_adv, jnp.float32) - jnp.asarray(x, jnp.float32)).reshape(len(x), -1)
  return jnp.linalg.norm(delta, ord=2 if kind == "l2" else np.inf, axis=1)


def _ce_sum(logits, y):
  return optax.losses.softmax_cross_entropy_with_integer_labels(logits, y).sum()


def _accuracy(apply_fn, params, x, y):
  return float(jnp.mean(jnp.argmax(apply_fn(params, x), -1) == y))


# --- Small models -------------------------------------------------------------------------


# Test data and weights come from numpy: eager jax.random ops each cost a compile.
def _mlp_init(rng, d, hidden, classes):
  return {"w1": jnp.asarray(rng.normal(size=(d, hidden)) / np.sqrt(d), jnp.float32),
          "b1": jnp.zeros(hidden),
          "w2": jnp.asarray(rng.normal(size=(hidden, classes)) / np.sqrt(hidden), jnp.float32),
          "b2": jnp.zeros(classes)}


def _mlp(params, x):
  h = jax.nn.relu(x.reshape(x.shape[0], -1) @ params["w1"] + params["b1"])
  return h @ params["w2"] + params["b2"]


def _conv_net(params, x):
  """3x3 conv (1 -> 4, SAME) + ReLU + 2x2 max-pool + dense: a LeNet in miniature."""
  h = jax.lax.conv_general_dilated(x, params["conv"], (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  h = jax.nn.relu(h + params["conv_bias"])
  b, height, width, c = h.shape
  h = h.reshape(b, height // 2, 2, width // 2, 2, c).max(axis=(2, 4))
  return h.reshape(b, -1) @ params["dense"] + params["dense_bias"]


@pytest.fixture(scope="module")
def models():
  """name -> (apply_fn, params, x in [0, 1], y) on random weights."""
  rng = np.random.default_rng(0)
  x_img = jnp.asarray(rng.uniform(size=(16, 8, 8, 1)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, size=16), jnp.int32)
  conv_params = {"conv": jnp.asarray(rng.normal(size=(3, 3, 1, 4)) / 3, jnp.float32),
                 "conv_bias": jnp.zeros(4),
                 "dense": jnp.asarray(rng.normal(size=(64, 10)) / 8, jnp.float32),
                 "dense_bias": jnp.zeros(10)}
  return {"mlp": (_mlp, _mlp_init(rng, 64, 16, 10), x_img.reshape(16, -1), y),
          "conv": (_conv_net, conv_params, x_img, y)}


@pytest.fixture(scope="module")
def jitted():
  """(model, kind, random_start, ...) -> jitted attack, compiled once per module."""
  cache = {}

  def get(apply_fn, kind, **kw):
    k = (apply_fn, kind, tuple(sorted(kw.items())))
    if k not in cache:
      cache[k] = jax.jit(functools.partial(_attack(kind, **kw), apply_fn))
    return cache[k]

  return get


# --- 1. Ball and box ----------------------------------------------------------------------


@pytest.mark.parametrize("random_start", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_attack_stays_in_ball_and_box_and_raises_loss(models, jitted, kind, random_start):
  apply_fn, params, x, y = models["conv"]
  x_adv = jitted(apply_fn, kind, random_start=random_start)(params, x, y, jax.random.key(1))
  chex.assert_shape(x_adv, x.shape)
  chex.assert_type(x_adv, jnp.float32)
  dist = _distance(kind, x_adv, x)
  eps = EPS[kind]
  bound = eps * (1 + 1e-5) if kind == "l2" else eps + 1e-6
  assert float(dist.max()) <= bound
  assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
  assert float(dist.mean()) > 0.1 * eps  # It moved...
  # ...uphill: the attacked loss is above the clean one.
  assert float(_ce_sum(apply_fn(params, x_adv), y)) > float(_ce_sum(apply_fn(params, x), y))


def test_fgsm_without_random_start_moves_every_free_coordinate_by_eps(models):
  # x + eps * sign(g): |delta| = eps wherever the box does not cut in (and g != 0).
  apply_fn, params, x, y = models["mlp"]
  eps = EPS["fgsm"]
  x_adv = _attack("fgsm", random_start=False)(apply_fn, params, x, y, None)
  free = (x > eps) & (x < 1 - eps)
  gap = jnp.abs(jnp.abs(x_adv - x) - eps)
  assert float(jnp.where(free, gap, 0.0).max()) <= 1e-6


def test_without_random_start_the_key_is_unused(models, jitted):
  apply_fn, params, x, y = models["conv"]
  for kind in KINDS:
    attack = jitted(apply_fn, kind, random_start=False)
    np.testing.assert_array_equal(attack(params, x, y, jax.random.key(1)),
                                  attack(params, x, y, jax.random.key(2)))


def test_eps_zero_returns_the_clean_input(models):
  apply_fn, params, x, y = models["mlp"]
  key = jax.random.key(1)
  for kind in KINDS:
    attack = jax.jit(functools.partial(_attack(kind, eps=0.0, steps=1), apply_fn))
    np.testing.assert_array_equal(attack(params, x, y, key), x)


# --- 2. PGD beats random noise ------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_mlp():
  """An MLP fitted to a linear teacher on 32-dim inputs in [0, 1], 3 classes."""
  rng = np.random.default_rng(3)
  x = rng.uniform(size=(512, 32)).astype(np.float32)
  y = np.argmax((x - 0.5) @ rng.normal(size=(32, 3)), -1)
  x, y = jnp.asarray(x), jnp.asarray(y, jnp.int32)
  opt = optax.adam(1e-2)

  @jax.jit
  def fit(params):
    def step(carry, _):
      params, state = carry
      grads = jax.grad(lambda p: _ce_sum(_mlp(p, x), y) / len(x))(params)
      updates, state = opt.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), None

    (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=300)
    return params

  params = fit(_mlp_init(rng, 32, 32, 3))
  assert _accuracy(_mlp, params, x, y) >= 0.95
  return params, x, y


@pytest.mark.parametrize("kind,eps", [("linf", 0.05), ("fgsm", 0.05), ("l2", 0.2)])
def test_attack_beats_random_noise_of_the_same_size(trained_mlp, kind, eps):
  params, x, y = trained_mlp
  x_adv = jax.jit(functools.partial(_attack(kind, eps=eps, steps=10), _mlp))(
      params, x, y, jax.random.key(4))
  rng = np.random.default_rng(4)
  if kind == "l2":  # Uniform in the L2 ball.
    direction = rng.normal(size=x.shape)
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    noise = eps * rng.uniform(size=(len(x), 1)) ** (1 / x.shape[1]) * direction
  else:
    noise = rng.uniform(-eps, eps, size=x.shape)
  noise = jnp.asarray(noise, jnp.float32)
  noise_acc = _accuracy(_mlp, params, jnp.clip(x + noise, 0.0, 1.0), y)
  adv_acc = _accuracy(_mlp, params, x_adv, y)
  assert noise_acc >= 0.9
  assert adv_acc <= noise_acc - 0.3, (adv_acc, noise_acc)


# --- 3. Linear classifiers: the worst case in closed form --------------------------------


@pytest.fixture(scope="module")
def linear_problem():
  """A 2-class linear model on Gaussian inputs, labels from it with 10% flipped."""
  rng = np.random.default_rng(5)
  x = rng.normal(size=(2000, 8)).astype(np.float32)
  w = rng.normal(size=(8, 2)).astype(np.float32)
  b = 0.3 * rng.normal(size=2).astype(np.float32)
  y = np.argmax(x @ w + b, -1)
  y = np.where(rng.uniform(size=2000) < 0.1, 1 - y, y)
  return {"w": jnp.asarray(w), "b": jnp.asarray(b)}, jnp.asarray(x), jnp.asarray(y, jnp.int32)


def _linear(params, x):
  return x @ params["w"] + params["b"]


@pytest.mark.parametrize("kind,random_start", [("linf", True), ("linf", False),
                                               ("fgsm", False), ("l2", True), ("l2", False)])
def test_attack_breaks_exactly_the_breakable_points_of_a_linear_model(
    linear_problem, kind, random_start):
  params, x, y = linear_problem
  eps = 0.25
  # Margin of the true class over the other; the worst case in the ball lowers it by
  # eps * ||w_y - w_other||_dual (L1 for Linf, L2 for L2), so a point can be flipped iff
  # margin <= that reach.
  dw = params["w"][:, 1] - params["w"][:, 0]
  sign = jnp.where(y == 1, 1.0, -1.0)
  margin = sign * (x @ dw + params["b"][1] - params["b"][0])
  reach = eps * float(jnp.linalg.norm(dw, ord=2 if kind == "l2" else 1))
  breakable = margin < reach
  clear = jnp.abs(margin - reach) > 1e-3 * reach  # Not on the edge of breakability.
  assert int((breakable & clear).sum()) >= 100 and int((~breakable & clear).sum()) >= 100

  steps = 50 if kind != "fgsm" else None
  step_size = eps / 10 if kind == "linf" else (eps / 4 if kind == "l2" else None)
  attack = _attack(kind, eps=eps, steps=steps, random_start=random_start,
                   box=(-1e6, 1e6), step_size=step_size)
  key = jax.random.key(6) if random_start else None  # No start, no key needed.
  x_adv = jax.jit(functools.partial(attack, _linear))(params, x, y, key)
  broken = jnp.argmax(_linear(params, x_adv), -1) != y
  assert float(broken[breakable & clear].mean()) >= 0.99
  assert int(broken[~breakable & clear].sum()) == 0


# --- 4. jit and eager agree ---------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_jit_and_eager_agree(models, jitted, kind):
  apply_fn, params, x, y = models["mlp"]
  key = jax.random.key(7)
  eager = _attack(kind)(apply_fn, params, x, y, key)
  np.testing.assert_allclose(jitted(apply_fn, kind)(params, x, y, key), eager,
                             rtol=1e-6, atol=1e-6)


# --- 5. Bad arguments ----------------------------------------------------------------------


BAD_ARGS = [("eps", -1.0), ("steps", 0), ("steps", 2.5), ("step_size", 0.0),
            ("box", (1.0, 0.0))]


@pytest.mark.parametrize("kind,arg,value", [(kind, arg, value) for kind in KINDS
                                            for arg, value in BAD_ARGS
                                            if not (kind == "fgsm" and arg == "steps")])
def test_bad_argument_raises_naming_it(models, kind, arg, value):
  apply_fn, params, x, y = models["mlp"]
  kw = {"eps": 0.1, "step_size": 0.01, "steps": 3, arg: value}
  if kind == "fgsm":
    kw.pop("steps")
  fn = {"linf": attacks.pgd_linf, "fgsm": attacks.fgsm, "l2": attacks.pgd_l2}[kind]
  with pytest.raises(ValueError, match=arg):
    fn(apply_fn, params, x, y, jax.random.key(0), **kw)


@pytest.mark.parametrize("kind", KINDS)
def test_shape_and_key_mistakes_raise(models, kind):
  apply_fn, params, x, y = models["mlp"]
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="leading"):
    _attack(kind)(apply_fn, params, x, y[:-1], key)
  with pytest.raises(ValueError, match="key"):
    _attack(kind)(apply_fn, params, x, y, None)
  with pytest.raises(ValueError, match="floating"):
    _attack(kind)(apply_fn, params, (x * 255).astype(jnp.uint8), y, key)
  with pytest.raises(ValueError, match="scalar"):
    _attack(kind, loss_fn=lambda logits, y: logits)(apply_fn, params, x, y, key)


def test_traced_hyper_parameter_raises():
  def attack(eps):
    return attacks.pgd_linf(_linear, {"w": jnp.ones((2, 2)), "b": jnp.zeros(2)},
                            jnp.zeros((1, 2)), jnp.zeros((1,), jnp.int32), None, eps=eps,
                            step_size=0.1, steps=1, random_start=False)

  with pytest.raises(ValueError, match="eps must be a concrete Python number"):
    jax.jit(attack)(0.1)


# --- 6. dtypes -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_input_keeps_dtype_and_stays_in_ball_and_box(models, kind):
  apply_fn, params, x, y = models["mlp"]
  x16 = x.astype(jnp.bfloat16)
  x_adv = jax.jit(functools.partial(_attack(kind), apply_fn))(params, x16, y,
                                                            jax.random.key(8))
  chex.assert_type(x_adv, jnp.bfloat16)
  chex.assert_shape(x_adv, x.shape)
  assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
  # The result is rounded to bfloat16 (spacing <= 2^-8 in [0, 1], more for an L2 sum).
  slack = 2.0**-8 * (np.sqrt(x[0].size) if kind == "l2" else 1.0)
  assert float(_distance(kind, x_adv, x16).max()) <= EPS[kind] + slack
  assert float(_distance(kind, x_adv, x16).mean()) > 0.1 * EPS[kind]


# --- Using the result in a training loss ---------------------------------------------------


def test_gradient_does_not_flow_through_the_attack(models):
  apply_fn, params, x, y = models["mlp"]
  key = jax.random.key(9)
  # L2: its normalized steps depend smoothly on params (Linf's sign() has zero derivative).
  attack = _attack("l2")

  def adversarial_loss(p):
    return _ce_sum(apply_fn(p, attack(apply_fn, p, x, y, key)), y)

  def fixed_input_grad(p):
    x_adv = attack(apply_fn, p, x, y, key)
    return jax.grad(lambda q: _ce_sum(apply_fn(q, x_adv), y))(p)

  got, expected = jax.jit(lambda p: (jax.grad(adversarial_loss)(p), fixed_input_grad(p)))(params)
  chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-6)


def test_custom_loss_fn_is_maximized(models):
  # Maximizing the negated cross-entropy lowers the cross-entropy.
  apply_fn, params, x, y = models["mlp"]
  attack = _attack("linf", loss_fn=lambda logits, y: -_ce_sum(logits, y))
  x_adv = jax.jit(functools.partial(attack, apply_fn))(params, x, y, jax.random.key(10))
  assert float(_ce_sum(apply_fn(params, x_adv), y)) < float(_ce_sum(apply_fn(params, x), y))
