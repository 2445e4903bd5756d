"""The train step with a BatchNorm model: running statistics move once per step, in train mode."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from admm_jax.app import train


class TinyBatchNormNet(nn.Module):
  """conv -> BatchNorm -> ReLU -> dense: the step's BatchNorm handling, without VGG's compile
  time (the models' own BatchNorm behaviour is test_models')."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(4, (3, 3), use_bias=False, name="conv1")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn1")(x)
    return nn.Dense(10, name="fc")(nn.relu(x).mean(axis=(1, 2)))


def test_batchnorm_train_step_updates_stats_and_params_and_eval_counts():
  model = TinyBatchNormNet()
  variables = train.init_variables(model, jax.random.key(0), (8, 8, 3))
  tx = optax.sgd(0.1)
  state = train.create_train_state(variables["params"], variables["batch_stats"], tx)
  attack = train.Attack("pgd", 8 / 255, 2 / 255, 2, True)
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.random((8, 8, 8, 3), np.float32)),
           "label": jnp.asarray(rng.integers(0, 10, 8), jnp.int32)}
  step = jax.jit(functools.partial(train.train_step, model=model, tx=tx, attack=attack))
  new, metrics = step(state, batch, jax.random.key(1))
  assert int(new.step) == 1 and int(metrics["count"]) == 8
  # One BatchNorm update from the adversarial batch: mean = 0.9 * 0 + 0.1 * batch mean != 0.
  assert float(jnp.abs(new.batch_stats["bn1"]["mean"]).max()) > 0
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state.params, new.params)
  assert all(jax.tree.leaves(changed))
  evaluate = jax.jit(functools.partial(train.eval_step, model=model, attack=attack))
  counts = evaluate(new.params, new.batch_stats, dict(batch, mask=jnp.arange(8) < 6),
                    jax.random.key(2))
  assert int(counts["count"]) == 6
  assert 0 <= int(counts["adversarial_correct"]) <= 6 and 0 <= int(counts["natural_correct"]) <= 6
