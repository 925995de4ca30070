"""The adaptive basis refresh of ALGORITHMS.md §4."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kl_optax


def test_off_diagonal_ratio_is_the_relative_error_of_keeping_the_basis():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(7, 7))
  a = a @ a.T
  q = np.linalg.qr(rng.normal(size=(7, 7)))[0]
  b = q.T @ a @ q
  expected = np.linalg.norm(a - q @ np.diag(np.diag(b)) @ q.T) / np.linalg.norm(a)
  np.testing.assert_allclose(kl_optax.parts.off_diagonal_ratio(jnp.asarray(b)), expected, rtol=1e-5)
  assert float(kl_optax.parts.off_diagonal_ratio(jnp.zeros((3, 3)))) == 0.0
  w, v = np.linalg.eigh(a)
  assert float(kl_optax.parts.off_diagonal_ratio(jnp.asarray(v.T @ a @ v))) < 1e-6


def _refresh_counts(refresh, grads, b2=0.9):
  tx = kl_optax.kron_transform(kl_optax.shampoo_factor_update(b2), refresh)
  state = tx.init(grads[0])
  update = jax.jit(tx.update)
  history = []
  for g in grads:
    _, state = update(g, state)
    history.append(np.asarray(state.groups[0].slots["refreshes"][0]))
  return np.array(history)


def _random_grads(n, shape, seed=0):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(n)]


def test_zero_tolerance_refreshes_every_time_and_large_tolerance_never():
  grads = _random_grads(21, (5, 6))
  always = _refresh_counts(kl_optax.qr_basis_refresh(2, tolerance=0.0), grads)
  np.testing.assert_array_equal(always[-1], [10, 10])  # t = 2, 4, …, 20
  never = _refresh_counts(kl_optax.qr_basis_refresh(2, tolerance=1.0, max_iters=3), grads)
  np.testing.assert_array_equal(never[-1], [0, 0])


def test_a_converged_factor_stops_refreshing_while_its_neighbour_continues():
  """Left statistics are constant (G Gᵀ = L Lᵀ every step); right ones keep moving."""
  rng = np.random.default_rng(1)
  m, n = 4, 9
  l = np.diag([4.0, 2.0, 1.0, 0.5]) @ np.linalg.qr(rng.normal(size=(m, m)))[0]
  grads = []
  for _ in range(60):
    z = np.linalg.qr(rng.normal(size=(n, m)))[0].T  # orthonormal rows: Z Zᵀ = I
    grads.append(jnp.asarray(l @ z, jnp.float32))
  counts = _refresh_counts(kl_optax.qr_basis_refresh(1, tolerance=0.05, max_iters=4),
                           grads, b2=0.5)
  late_left = counts[-1, 0] - counts[30, 0]
  late_right = counts[-1, 1] - counts[30, 1]
  assert late_left == 0, counts[:, 0]
  assert late_right >= 25, counts[:, 1]


def test_adaptive_refresh_under_vmap_decides_per_tensor():
  """Two stacked tensors of one shape group make their own decisions."""
  rng = np.random.default_rng(2)
  tx = kl_optax.kron_transform(kl_optax.shampoo_factor_update(0.5),
                               kl_optax.qr_basis_refresh(1, tolerance=0.05, max_iters=4))
  params = {"still": jnp.zeros((4, 4)), "moving": jnp.zeros((4, 4))}
  state = tx.init(params)
  fixed = jnp.asarray(np.diag([3.0, 2.0, 1.0, 0.5]), jnp.float32)
  update = jax.jit(tx.update)
  for _ in range(40):
    g = {"still": fixed, "moving": jnp.asarray(rng.normal(size=(4, 4)), jnp.float32)}
    _, state = update(g, state)
  counts = np.asarray(state.groups[0].slots["refreshes"])
  # Leaves are flattened in key order: 'moving' then 'still'.
  assert counts[1].sum() == 0
  assert counts[0].min() >= 20


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_invalid_tolerance(bad):
  with pytest.raises(ValueError, match="tolerance"):
    kl_optax.qr_basis_refresh(10, tolerance=bad)
  with pytest.raises(ValueError, match="max_iters"):
    kl_optax.qr_basis_refresh(10, max_iters=0)
