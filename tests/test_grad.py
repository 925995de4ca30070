"""Differentiating through optimizer updates (meta-learning, hyperparameter gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kl_optax

NAMES = list(kl_optax.RECIPES)


def _unrolled_loss(tx, params, steps):
  """The loss after ``steps`` updates of ``tx`` from ``params``, as a function of ``params``."""
  x = jnp.cos(jnp.arange(32.0, dtype=params["w"].dtype)).reshape(8, 4)
  y = jnp.sin(jnp.arange(8.0, dtype=params["w"].dtype))[:, None] * jnp.ones((1, 4), params["w"].dtype)

  def loss(p):
    return jnp.mean((jnp.tanh(x @ p["w"] + p["b"]) @ p["v"] - y) ** 2)

  state = tx.init(params)
  p = params
  for _ in range(steps):
    updates, state = tx.update(jax.grad(loss)(p), state, p)
    p = optax.apply_updates(p, updates)
  return loss(p)


def _params(dtype=jnp.float32):
  k = jax.random.split(jax.random.key(0), 2)
  # Square matrices: the first gradient's factors are full rank, so that the
  # eigenvectors (and their derivatives) are well defined.
  return {"w": jax.random.normal(k[0], (4, 4), dtype), "b": jnp.zeros((4,), dtype),
          "v": jax.random.normal(k[1], (4, 4), dtype)}


@pytest.mark.parametrize("name", NAMES)
def test_grad_through_updates(name):
  # precondition_frequency=1: every differentiated step refreshes the bases
  # (with a fixed refresh: eshampoo's default adaptive one cannot be
  # differentiated, see below).
  tx = kl_optax.RECIPES[name].make(1e-2, precondition_frequency=1, refresh_tolerance=None)
  grads = jax.jit(jax.grad(lambda p: _unrolled_loss(tx, p, 3)))(_params())
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    assert bool(jnp.all(jnp.isfinite(g))), path
  assert float(jnp.abs(grads["w"]).max()) > 0


def test_grad_through_two_steps_matches_finite_differences():
  with jax.enable_x64(True):
    tx = kl_optax.kl_shampoo(3e-2, precondition_frequency=2,
                             layout=kl_optax.Layout(state_dtype=jnp.float64))
    params = _params(jnp.float64)
    f = jax.jit(lambda p: _unrolled_loss(tx, p, 3))   # init, then two steps, a refresh at 2
    grads = jax.grad(f)(params)
    direction = jax.tree.map(lambda x: jnp.cos(jnp.arange(x.size, dtype=x.dtype)).reshape(x.shape),
                             params)
    eps = 1e-5
    plus = f(jax.tree.map(lambda p, d: p + eps * d, params, direction))
    minus = f(jax.tree.map(lambda p, d: p - eps * d, params, direction))
    numeric = float((plus - minus) / (2 * eps))
    analytic = float(sum(jnp.vdot(g, d) for g, d in
                         zip(jax.tree.leaves(grads), jax.tree.leaves(direction))))
  assert abs(analytic) > 1e-4
  np.testing.assert_allclose(analytic, numeric, rtol=1e-6)


def test_adaptive_refresh_says_it_cannot_be_differentiated():
  tx = kl_optax.kl_shampoo(1e-2, precondition_frequency=1, refresh_tolerance=0.1,
                           refresh_max_iters=3)
  with pytest.raises(ValueError, match="refresh_tolerance"):
    jax.grad(lambda p: _unrolled_loss(tx, p, 3))(_params())
  # Without differentiation the adaptive refresh runs as before.
  assert np.isfinite(float(_unrolled_loss(tx, _params(), 3)))


def test_eigh_and_qr_rules_match_jax():
  a = jax.random.normal(jax.random.key(0), (5, 5))
  s = a @ a.T + 0.1 * jnp.eye(5)
  ds = jax.random.normal(jax.random.key(1), (5, 5))
  ds = ds + ds.T
  (w, v), (dw, dv) = jax.jvp(kl_optax.kron.eigh_descending, (s,), (ds,))
  (w0, v0), (dw0, dv0) = jax.jvp(lambda m: jnp.linalg.eigh(0.5 * (m + m.T)), (s,), (ds,))
  np.testing.assert_allclose(dw, dw0[::-1], rtol=1e-4, atol=1e-5)
  # Eigenvector signs are arbitrary: compare dv column by column up to the sign of v.
  signs = jnp.sign(jnp.sum(v * v0[:, ::-1], axis=0))
  np.testing.assert_allclose(dv * signs, dv0[:, ::-1], rtol=1e-3, atol=1e-4)
  x = jax.random.normal(jax.random.key(2), (6, 4))
  dx = jax.random.normal(jax.random.key(3), (6, 4))
  _, dq = jax.jvp(kl_optax.kron.qr_orthonormal, (x,), (dx,))
  _, dq0 = jax.jvp(lambda m: jnp.linalg.qr(m)[0], (x,), (dx,))
  np.testing.assert_allclose(dq, dq0, rtol=1e-4, atol=1e-5)
  # And under vmap (the sequential CPU path), reverse mode.
  g = jax.grad(lambda m: jnp.sum(jax.vmap(kl_optax.kron.qr_orthonormal)(m) ** 3))(
      jnp.stack([x, 2 * x]))
  g0 = jax.grad(lambda m: jnp.sum(jax.vmap(lambda y: jnp.linalg.qr(y)[0])(m) ** 3))(
      jnp.stack([x, 2 * x]))
  np.testing.assert_allclose(g, g0, rtol=1e-4, atol=1e-5)
