"""A small Flax NNX regression with its ``nnx.Optimizer``, for checkpoint tests."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def nnx_regression(make_tx, out: int = 3):
  """``(build, train_step)``: ``build()`` makes a fresh two-layer MLP (same weights every
  time) and its ``nnx.Optimizer(model, make_tx(), wrt=nnx.Param)``; ``train_step(model,
  optimizer)`` is one jitted step on a fixed batch."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(16, 6)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(16, out)), jnp.float32)

  def build():
    model = nnx.Sequential(nnx.Linear(6, 8, rngs=nnx.Rngs(0)), jax.nn.tanh,
                           nnx.Linear(8, out, rngs=nnx.Rngs(1)))
    return model, nnx.Optimizer(model, make_tx(), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer):
    grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)

  return build, train_step
