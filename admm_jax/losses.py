"""Adversarial training objectives: Madry's cross-entropy, TRADES and MART, per example.

Every function takes logits of shape (B, C) and integer labels of shape (B,) and returns
per-example losses of shape (B,): the training loss is their mean, and their sum is what
the trainer logs. Logits are promoted to at least float32 first.

- madry (Madry et al., ICLR 2018): CE(f(x'), y) on adversarial examples x' found by
  maximising that same cross-entropy.
- trades (Zhang et al., ICML 2019): CE(f(x), y) + beta * KL(p(x) || p(x')), where x' maximises
  the KL term (`train.Attack` with loss="kl").
- mart (Wang et al., ICLR 2020): BCE(f(x'), y) + beta * KL(p(x) || p(x')) * (1 - p_y(x)),
  where x' maximises the cross-entropy and BCE is the boosted cross-entropy below.
"""
import jax
import jax.numpy as jnp
import optax

OBJECTIVES = ("madry", "trades", "mart")


def _float(logits: jax.Array) -> jax.Array:
  return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Softmax cross-entropy with integer labels: (B, C), (B,) -> (B,)."""
  return optax.losses.softmax_cross_entropy_with_integer_labels(_float(logits), labels)


def kl_divergence(logits_p: jax.Array, logits_q: jax.Array) -> jax.Array:
  """KL(softmax(logits_p) || softmax(logits_q)) per example: (B, C), (B, C) -> (B,).

  Computed from log-probabilities, so a class with a vanishing probability costs no
  precision (no log of a rounded-to-zero probability).
  """
  log_p = jax.nn.log_softmax(_float(logits_p), axis=-1)
  log_q = jax.nn.log_softmax(_float(logits_q), axis=-1)
  return optax.losses.kl_divergence_with_log_targets(log_q, log_p)


def boosted_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """MART's boosted cross-entropy: -log p_y - log(1 - max_{k != y} p_k), per example.

  The margin term pushes down the strongest wrong class. log(1 - p_k) is computed as
  logsumexp over the classes other than k minus logsumexp over all, which stays finite
  when p_k rounds to 1 (MART's reference adds 1e-4 inside the log instead).

  Args:
    logits: (B, C) logits, C >= 2.
    labels: (B,) integer labels.

  Returns:
    (B,) losses.
  """
  logits = _float(logits)
  classes = jnp.arange(logits.shape[-1])
  is_label = classes == labels[:, None]
  runner_up = jnp.argmax(jnp.where(is_label, -jnp.inf, logits), axis=-1)
  without_runner_up = jnp.where(classes == runner_up[:, None], -jnp.inf, logits)
  log_not_runner_up = (jax.nn.logsumexp(without_runner_up, axis=-1)
                       - jax.nn.logsumexp(logits, axis=-1))
  return cross_entropy(logits, labels) - log_not_runner_up


def trades_loss(logits_clean: jax.Array, logits_adv: jax.Array, labels: jax.Array,
                beta: float) -> jax.Array:
  """TRADES: CE(f(x), y) + beta * KL(p(x) || p(x')), per example.

  Args:
    logits_clean: (B, C) logits of the clean inputs x.
    logits_adv: (B, C) logits of the adversarial inputs x'.
    labels: (B,) integer labels.
    beta: weight of the robustness (KL) term, >= 0 (the paper: 1 to 6; 6 on CIFAR-10).

  Returns:
    (B,) losses; their mean is the paper's batch objective.
  """
  return cross_entropy(logits_clean, labels) + beta * kl_divergence(logits_clean, logits_adv)


def mart_loss(logits_clean: jax.Array, logits_adv: jax.Array, labels: jax.Array,
              beta: float) -> jax.Array:
  """MART: BCE(f(x'), y) + beta * KL(p(x) || p(x')) * (1 - p_y(x)), per example.

  The KL term weighs most the examples the model misclassifies (small p_y(x)); the weight
  is not detached, as in the paper's objective.

  Args:
    logits_clean: (B, C) logits of the clean inputs x.
    logits_adv: (B, C) logits of the adversarial inputs x'.
    labels: (B,) integer labels.
    beta: weight of the robustness (KL) term, >= 0 (the paper: 6 on CIFAR-10).

  Returns:
    (B,) losses; their mean is the paper's batch objective.
  """
  p_true = jnp.take_along_axis(jax.nn.softmax(_float(logits_clean), axis=-1),
                               labels[:, None], axis=-1)[:, 0]
  robust = kl_divergence(logits_clean, logits_adv) * (1.0 - p_true)
  return boosted_cross_entropy(logits_adv, labels) + beta * robust


def objective_losses(objective: str, logits_clean: jax.Array | None, logits_adv: jax.Array,
                     labels: jax.Array, beta: float) -> jax.Array:
  """Per-example losses of `objective` (one of OBJECTIVES); madry ignores logits_clean."""
  if objective == "madry":
    return cross_entropy(logits_adv, labels)
  if objective == "trades":
    return trades_loss(logits_clean, logits_adv, labels, beta)
  if objective == "mart":
    return mart_loss(logits_clean, logits_adv, labels, beta)
  raise ValueError(f"objective {objective!r} is unknown: use one of {', '.join(OBJECTIVES)}.")
