"""Training objectives: the TRADES and MART losses equal the papers' formulas on fixed logits,
the TRADES attack raises the KL term, and one train step per objective trains, keeps masked
weights at zero, leaves Madry's step exactly as it was and moves BatchNorm statistics once,
from the adversarial batch.

Compilations dominate the time: the loss checks run under jit, and one small BatchNorm MLP
serves every train-step check (the objectives only change the loss, whatever the model).
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from admm_jax import attacks, losses, transforms
from admm_jax.app import configlib, train

# Fixed logits (B=3, C=4); the values by hand use plain numpy probabilities in float64.
LOGITS_CLEAN = np.array([[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 0.3, 0.4], [-1.0, 3.0, 0.5, 1.0]])
LOGITS_ADV = np.array([[0.5, 1.5, -0.5, 0.2], [0.0, 1.0, 0.0, -1.0], [1.0, 0.0, 2.0, 0.5]])
LABELS = np.array([0, 3, 1])
BETA = 6.0
ROWS = np.arange(3)

EPS = 0.1
# No uniform random start: the KL attack must then move from its own small TRADES start.
ATTACK = train.Attack("pgd", eps=EPS, step_size=0.05, steps=3, random_start=False)
BATCH_SIZE = 16
IMAGE_SHAPE = (8, 8, 1)


def _softmax(z):
  e = np.exp(z - z.max(axis=1, keepdims=True))
  return e / e.sum(axis=1, keepdims=True)


def _by_hand(objective):
  p, q = _softmax(LOGITS_CLEAN), _softmax(LOGITS_ADV)
  kl = np.sum(p * np.log(p / q), axis=1)
  if objective == "trades":
    return -np.log(p[ROWS, LABELS]) + BETA * kl
  if objective == "madry":
    return -np.log(q[ROWS, LABELS])
  wrong = q.copy()
  wrong[ROWS, LABELS] = 0.0
  boosted_ce = -np.log(q[ROWS, LABELS]) - np.log(1.0 - wrong.max(axis=1))
  return boosted_ce + BETA * kl * (1.0 - p[ROWS, LABELS])


@jax.jit
def _fixed_logit_losses(logits_clean, logits_adv, labels):
  return {"trades": losses.trades_loss(logits_clean, logits_adv, labels, BETA),
          "mart": losses.mart_loss(logits_clean, logits_adv, labels, BETA),
          **{f"{name}_dispatched": losses.objective_losses(name, logits_clean, logits_adv,
                                                           labels, BETA)
             for name in losses.OBJECTIVES}}


@pytest.mark.parametrize("objective", losses.OBJECTIVES)
def test_losses_equal_hand_computed_values(objective):
  got = _fixed_logit_losses(jnp.asarray(LOGITS_CLEAN, jnp.float32),
                            jnp.asarray(LOGITS_ADV, jnp.float32), jnp.asarray(LABELS))
  expected = _by_hand(objective)
  np.testing.assert_allclose(got[f"{objective}_dispatched"], expected, rtol=1e-5)
  if objective != "madry":
    np.testing.assert_allclose(got[objective], expected, rtol=1e-5)


def test_boosted_cross_entropy_stays_finite_when_a_wrong_class_takes_all():
  # p_1 rounds to 1 in float32: -log p_0 = 40 + log(1 + 3e-40) and
  # log(1 - p_1) = logsumexp(0, 0, 0) - logsumexp(0, 40, 0, 0) = log 3 - 40.
  got = jax.jit(losses.boosted_cross_entropy)(jnp.asarray([[0.0, 40.0, 0.0, 0.0]]),
                                              jnp.asarray([0]))
  np.testing.assert_allclose(got, [80.0 - np.log(3.0)], rtol=1e-6)


@pytest.mark.parametrize("name, beta, message", [
    ("hinge", 6.0, "objective 'hinge' is unknown: use one of madry, trades, mart."),
    ("trades", -1.0, "objective beta -1.0 is invalid: use a finite number >= 0."),
])
def test_objective_rejects_unknown_name_and_negative_beta(name, beta, message):
  with pytest.raises(ValueError) as e:
    train.Objective(name, beta)
  assert str(e.value) == message


@pytest.mark.parametrize("field, value, message", [
    ("objective", "hinge",
     "config.attack.objective='hinge' is invalid: use one of madry, trades, mart."),
    ("beta", -1.0, "config.attack.beta=-1.0 is invalid: use a number in [0.0, 1000.0]."),
])
def test_config_validation_rejects_unknown_objective_and_negative_beta(field, value, message):
  config = configlib.base_config()
  config.attack[field] = value
  with pytest.raises(configlib.ConfigError) as e:
    configlib.validate(config)
  assert str(e.value) == message


def test_config_accepts_each_objective():
  for name in losses.OBJECTIVES:
    config = configlib.base_config()
    config.attack.objective, config.attack.beta = name, 1.0
    configlib.validate(config)


# ------------------------------------------------------------------------- x_init (attacks)


def _zero_loss(logits, y):
  del y
  return 0.0 * logits.sum()


@pytest.mark.parametrize("fn, norm", [(attacks.pgd_linf, np.inf), (attacks.pgd_l2, 2)])
def test_attack_starts_at_x_init_projected_onto_ball_and_box(fn, norm):
  # A zero loss gradient leaves the iterate where it starts: the projected x_init.
  x = jnp.full((2, 3), 0.5)
  x_init = x + jnp.asarray([[1.0, -1.0, 0.0], [0.01, 0.0, 0.0]])
  attack = functools.partial(fn, lambda p, v: v, None, eps=EPS, step_size=0.1, steps=1,
                             random_start=False, loss_fn=_zero_loss)
  x_adv = jax.jit(attack)(x, jnp.zeros((2, 3)), None, x_init=x_init)
  np.testing.assert_allclose(x_adv[1], x_init[1], atol=1e-7)   # inside the ball: kept
  assert float(jnp.linalg.norm(x_adv[0] - x[0], ord=norm)) == pytest.approx(EPS, rel=1e-5)
  with pytest.raises(ValueError, match="x_init replaces the random start"):
    fn(lambda p, v: v, None, x, jnp.zeros((2, 3)), jax.random.key(0), eps=EPS, step_size=0.1,
       steps=1, loss_fn=_zero_loss, x_init=x_init)


# ---------------------------------------------------------------- the train step, per objective


class _Net(nn.Module):
  """Small and with BatchNorm: dense, BatchNorm, ReLU, dense."""

  @nn.compact
  def __call__(self, x, train: bool):
    h = nn.BatchNorm(use_running_average=not train, momentum=0.9)(
        nn.Dense(32)(x.reshape(x.shape[0], -1)))
    return nn.Dense(10)(nn.relu(h))


MODEL = _Net()


@pytest.fixture(scope="module")
def setup():
  """Half the dense weights pruned, a masked-retrain optimizer, its state, a random batch."""
  variables = jax.jit(functools.partial(train.init_variables, MODEL,
                                        input_shape=IMAGE_SHAPE))(jax.random.key(0))
  rng = np.random.default_rng(0)
  masks = jax.tree_util.tree_map_with_path(
      lambda path, w: rng.random(w.shape) < 0.5 if path[-1].key == "kernel" else None,
      variables["params"])
  params = jax.tree.map(lambda m, w: w if m is None else jnp.where(m, w, 0.0), masks,
                        variables["params"], is_leaf=lambda m: m is None)
  tx = optax.chain(optax.adam(1e-2), transforms.apply_masks(masks))
  state = train.create_train_state(params, variables["batch_stats"], tx)
  batch = {"image": jnp.asarray(rng.random((BATCH_SIZE,) + IMAGE_SHAPE, np.float32)),
           "label": jnp.asarray(rng.integers(0, 10, BATCH_SIZE), jnp.int32)}
  return tx, masks, state, batch


@pytest.fixture(scope="module")
def stepped(setup):
  """{objective: (new state, metrics)} after one jitted step of each objective (beta 6)."""
  tx, _, state, batch = setup
  out = {}
  for name in losses.OBJECTIVES:
    step = jax.jit(functools.partial(train.train_step, model=MODEL, tx=tx, attack=ATTACK,
                                     objective=train.Objective(name, BETA)))
    out[name] = step(state, batch, jax.random.key(1))
  return out


@functools.partial(jax.jit, static_argnames="loss")
def _attack(params, batch_stats, x, y, key, *, loss):
  """The step's own attack: train-mode BatchNorm on the attacked batch."""
  return ATTACK(train.logits_fn(MODEL, batch_stats, train=True), params, x, y, key, loss=loss)


@jax.jit
def _reference(params, batch_stats, x, x_other, y):
  """Losses, KL and BatchNorm updates the step should see, from train-mode passes."""
  def apply(inputs):
    return MODEL.apply({"params": params, "batch_stats": batch_stats}, inputs, train=True,
                       mutable=["batch_stats"])
  (clean, clean_stats), (other, other_stats) = apply(x), apply(x_other)
  return {"kl": losses.kl_divergence(clean, other).sum(),
          "trades": losses.trades_loss(clean, other, y, BETA).sum(),
          "mart": losses.mart_loss(clean, other, y, BETA).sum(),
          "clean_stats": clean_stats["batch_stats"], "other_stats": other_stats["batch_stats"]}


def _step_key(state):
  return jax.random.fold_in(jax.random.key(1), state.step)


def test_trades_attack_raises_the_kl_term_beyond_random_noise(setup):
  # From x itself the KL gradient is zero: without its small start the attack cannot move.
  _, _, state, batch = setup
  x, y = batch["image"], batch["label"]
  x_adv = _attack(state.params, state.batch_stats, x, y, _step_key(state), loss="kl")
  corners = np.clip(x + EPS * np.sign(np.random.default_rng(1).normal(size=x.shape)), 0, 1)
  kl_attack = _reference(state.params, state.batch_stats, x, x_adv, y)["kl"]
  kl_noise = _reference(state.params, state.batch_stats, x, jnp.asarray(corners, jnp.float32),
                        y)["kl"]
  assert float(jnp.max(jnp.abs(x_adv - x))) <= EPS + 1e-6
  assert 0.0 <= float(x_adv.min()) and float(x_adv.max()) <= 1.0
  assert float(kl_attack) > 2 * float(kl_noise) > 0.0


@pytest.mark.parametrize("name", losses.OBJECTIVES)
def test_each_objective_step_trains_and_keeps_masked_weights_zero(setup, stepped, name):
  _, masks, state, _ = setup
  new, metrics = stepped[name]
  assert int(new.step) == 1 and int(metrics["count"]) == BATCH_SIZE
  assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) > 0
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state.params, new.params)
  assert all(jax.tree.leaves(changed)), changed
  kept = jax.tree.map(lambda m, w: None if m is None else bool(jnp.any(w[~m] != 0)), masks,
                      new.params, is_leaf=lambda m: m is None)
  assert not any(jax.tree.leaves(kept)), f"a masked weight moved off zero: {kept}"


@pytest.mark.parametrize("name, attack_loss", [("trades", "kl"), ("mart", "ce")])
def test_step_logs_the_objective_on_its_own_attack(setup, stepped, name, attack_loss):
  # The step's summed loss is the objective's loss on the attack that objective asks for.
  _, _, state, batch = setup
  x, y = batch["image"], batch["label"]
  x_adv = _attack(state.params, state.batch_stats, x, y, _step_key(state), loss=attack_loss)
  expected = _reference(state.params, state.batch_stats, x, x_adv, y)[name]
  np.testing.assert_allclose(stepped[name][1]["loss"], expected, rtol=1e-4)


def test_trades_moves_batchnorm_statistics_once_from_the_adversarial_batch(setup, stepped):
  _, _, state, batch = setup
  x, y = batch["image"], batch["label"]
  x_adv = _attack(state.params, state.batch_stats, x, y, _step_key(state), loss="kl")
  ref = _reference(state.params, state.batch_stats, x, x_adv, y)
  new_stats = stepped["trades"][0].batch_stats
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7),
               new_stats, ref["other_stats"])
  assert not np.allclose(new_stats["BatchNorm_0"]["mean"],
                         ref["clean_stats"]["BatchNorm_0"]["mean"], rtol=1e-5, atol=1e-7)


def _todays_madry_step(state, batch, key, *, model, tx, attack):
  """train_step as it was before objectives existed: CE on the PGD batch, BatchNorm in train
  mode for the attack (update dropped) and for the loss (update kept)."""
  x, y = batch["image"], batch["label"]
  step_key = jax.random.fold_in(key, state.step)

  def apply(params, inputs):
    logits, updated = model.apply({"params": params, "batch_stats": state.batch_stats}, inputs,
                                  train=True, mutable=["batch_stats"])
    return logits, updated["batch_stats"]

  x_adv = attacks.pgd_linf(lambda p, v: apply(p, v)[0], state.params, x, y, step_key,
                           eps=attack.eps, step_size=attack.step_size, steps=attack.steps,
                           random_start=attack.random_start)

  def loss_fn(params):
    logits, new_stats = apply(params, x_adv)
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return per_example.mean(), (per_example, logits, new_stats)

  grads, (per_example, logits, new_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                      batch_stats=new_stats, opt_state=opt_state)
  return new, {"loss": per_example.sum(), "correct": jnp.sum(jnp.argmax(logits, -1) == y),
               "count": jnp.asarray(y.shape[0], jnp.int32)}


def test_madry_step_is_bit_identical_to_todays(setup, stepped):
  tx, _, state, batch = setup
  today = jax.jit(functools.partial(_todays_madry_step, model=MODEL, tx=tx, attack=ATTACK))
  expected = today(state, batch, jax.random.key(1))
  jax.tree.map(np.testing.assert_array_equal, stepped["madry"], expected)
  # Not vacuous: another objective's step differs.
  assert not np.array_equal(stepped["trades"][1]["loss"], expected[1]["loss"])
