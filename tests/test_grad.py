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
  # (eshampoo's with its default adaptive refresh).
  tx = kl_optax.RECIPES[name].make(1e-2, precondition_frequency=1)
  # The initialization and one update with a refresh.
  grads = jax.jit(jax.grad(lambda p: _unrolled_loss(tx, p, 2)))(_params())
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    assert bool(jnp.all(jnp.isfinite(g))), path
  assert float(jnp.abs(grads["w"]).max()) > 0


def _check_against_finite_differences(tx, steps=3, eps=1e-5, rtol=1e-6):
  params = _params(jnp.float64)
  f = jax.jit(lambda p: _unrolled_loss(tx, p, steps))
  grads = jax.grad(f)(params)
  direction = jax.tree.map(lambda x: jnp.cos(jnp.arange(x.size, dtype=x.dtype)).reshape(x.shape),
                           params)
  plus = f(jax.tree.map(lambda p, d: p + eps * d, params, direction))
  minus = f(jax.tree.map(lambda p, d: p - eps * d, params, direction))
  numeric = float((plus - minus) / (2 * eps))
  analytic = float(sum(jnp.vdot(g, d) for g, d in
                       zip(jax.tree.leaves(grads), jax.tree.leaves(direction))))
  forward = float(jax.jvp(f, (params,), (direction,))[1])
  assert abs(analytic) > 1e-4
  np.testing.assert_allclose(analytic, numeric, rtol=rtol)
  np.testing.assert_allclose(forward, analytic, rtol=1e-9)


def test_grad_through_two_steps_matches_finite_differences():
  with jax.enable_x64(True):
    # init, then two steps, with a refresh at step 2.
    _check_against_finite_differences(kl_optax.kl_shampoo(
        3e-2, precondition_frequency=2, layout=kl_optax.Layout(state_dtype=jnp.float64)))


def test_grad_through_the_adaptive_refresh_matches_finite_differences():
  # The number of QR iterations is decided by the data (a while_loop); it is
  # locally constant, and the derivative replays that many iterations.
  with jax.enable_x64(True):
    tx = kl_optax.kl_shampoo(3e-2, precondition_frequency=1, refresh_tolerance=1e-3,
                             refresh_max_iters=3,
                             layout=kl_optax.Layout(state_dtype=jnp.float64))
    # Three QR iterations per refresh leave float64 rounding noise of ~1e-11
    # in the loss, so a wider difference step: at eps=1e-5 the central
    # difference itself is off by ~7e-6, at 1e-3 by ~1e-7 (measured).
    _check_against_finite_differences(tx, eps=1e-3, rtol=2e-6)
    state = tx.init(_params(jnp.float64))
    counts = []
    p = _params(jnp.float64)
    for t in range(3):
      _, state = tx.update(jax.tree.map(lambda x: jnp.cos(x + t), p), state, p)
      counts.append(kl_optax.kron_states(state)[0].groups[0].slots["refreshes"].sum())
    assert int(counts[-1]) >= 1   # refreshes ran in the differentiated steps


def test_grad_through_rank_deficient_factors_is_finite(name="kl_shampoo"):
  # A LoRA-style pair with b = 0: a's gradient is exactly zero at first, its
  # factors are rank deficient (repeated zero eigenvalues, singular QR inputs),
  # where eigenvector derivatives do not exist. (Recipes with Adam-style
  # sqrt(v) of second moments that are exactly zero here -- kl_soap, soap,
  # eshampoo's grafting -- have no finite derivative there, like optax.adam
  # itself; nor Newton-Schulz's norm of a zero matrix.)
  x = jnp.cos(jnp.arange(32.0)).reshape(8, 4)

  def loss(p):
    return jnp.mean(jnp.tanh(x @ (p["w"] + p["a"] @ p["b"])) ** 2)

  def unrolled(p):
    tx = kl_optax.RECIPES[name].make(1e-2, precondition_frequency=1)
    state = tx.init(p)
    for _ in range(3):
      updates, state = tx.update(jax.grad(loss)(p), state, p)
      p = optax.apply_updates(p, updates)
    return loss(p)

  k = jax.random.split(jax.random.key(0), 2)
  params = {"w": jax.random.normal(k[0], (4, 4)), "a": jax.random.normal(k[1], (4, 3)),
            "b": jnp.zeros((3, 4))}
  grads = jax.jit(jax.grad(unrolled))(params)
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    assert bool(jnp.all(jnp.isfinite(g))), path
  assert float(jnp.abs(grads["w"]).max()) > 0


def test_eigh_and_qr_rules_are_finite_where_the_derivative_does_not_exist():
  s = jnp.diag(jnp.array([2.0, 0.0, 0.0, 0.0]))          # a repeated zero eigenvalue
  ds = jnp.ones((4, 4))
  (w, _), (dw, dv) = jax.jvp(kl_optax.kron.eigh_descending, (s,), (ds,))
  assert bool(jnp.all(jnp.isfinite(dw)) and jnp.all(jnp.isfinite(dv)))
  np.testing.assert_allclose(dw, [1.0, 1.0, 1.0, 1.0], atol=1e-6)   # diag(Vᵀ dS V)
  x = jnp.array([[1.0, 2.0, 0.0], [2.0, 4.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])  # rank 2
  g = jax.grad(lambda m: jnp.sum(kl_optax.kron.qr_orthonormal(m)[:, :2] ** 3))(x)
  assert bool(jnp.all(jnp.isfinite(g)))
  # Where the input is full rank the rules are JAX's (next test).


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
