"""The same transforms serve a flax.nnx model through nnx.Optimizer."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from admm_jax import projections as P
from admm_jax import sparsity, transforms


class MLP(nnx.Module):

  def __init__(self, rngs):
    self.fc1 = nnx.Linear(8, 32, rngs=rngs)
    self.fc2 = nnx.Linear(32, 3, rngs=rngs)

  def __call__(self, x):
    return self.fc2(jax.nn.relu(self.fc1(x)))


def _data():
  x = jax.random.normal(jax.random.key(0), (64, 8))
  y = jnp.argmax(x[:, :3], axis=1)
  return x, y


def _loss(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


SPEC = sparsity.spec({"fc1/kernel": ("irregular", 0.8), "fc2/kernel": ("column", 0.5)})


def test_admm_then_masked_retraining_with_nnx_optimizer():
  x, y = _data()
  model = MLP(nnx.Rngs(0))
  tx = optax.chain(transforms.admm(SPEC, rho=1.0, update_every=25, rho_growth=1.3),
                   optax.sgd(0.1, momentum=0.9))
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, opt):
    loss, grads = nnx.value_and_grad(_loss)(model, x, y)
    opt.update(model, grads)
    return loss

  params = nnx.state(model, nnx.Param)
  state0 = transforms.find_admm_state(opt.opt_state)
  first = transforms.primal_residuals(state0, params)
  assert set(first) == {"fc1/kernel", "fc2/kernel"}
  for _ in range(150):
    loss = step(model, opt)
  admm_state = transforms.find_admm_state(opt.opt_state)
  assert int(admm_state.count) == 150
  last = transforms.primal_residuals(admm_state, nnx.state(model, nnx.Param))
  assert all(float(last[k]) < 0.2 * float(first[k]) for k in first)

  # Hard prune the nnx state, write it back, and retrain with masks.
  pruned, masks = sparsity.hard_prune(nnx.state(model, nnx.Param), SPEC)
  nnx.update(model, pruned)
  opt = nnx.Optimizer(model, optax.chain(optax.adamw(1e-2, weight_decay=0.1),
                                         transforms.apply_masks(masks)), wrt=nnx.Param)
  for _ in range(50):
    loss = step(model, opt)
  assert float(loss) < 0.7
  for name in ("fc1", "fc2"):
    w = _array(getattr(model, name).kernel)
    m = _array(masks[name]["kernel"])
    assert (w[~m] == 0).all() and (w[m] != 0).all()
  assert int(np.sum(_array(model.fc1.kernel) == 0)) == P.num_removed(8 * 32, 0.8)


def _array(v):
  return np.asarray(v[...] if isinstance(v, nnx.Variable) else v)
