"""kl_shampoo against the float64 NumPy reference of ALGORITHMS.md §1."""

import jax.numpy as jnp
import numpy as np
import pytest

import kl_optax
import trajectory
from reference import KLShampooReference, eigh_descending, unfold


# Square matrices and 3-D tensors whose unfoldings have full row rank: every
# factor is full rank at t = 0 and the whole trajectory is determined by the
# specification. Rectangular matrices share the initial basis (see
# KLShampooReference.set_bases).
CASES = [
    ((6, 6), False),
    ((8, 8), False),
    ((5, 9), True),
    ((9, 4), True),
    ((3, 4, 5), False),
    ((4, 3, 2), False),
]


def _trajectory(shape, *, steps=45, lr=0.05, weight_decay=0.01, freq=10, share=False,
                **hparams):
  ref = KLShampooReference(shape, lr=lr, weight_decay=weight_decay,
                           precondition_frequency=freq, **hparams)
  tx = kl_optax.kl_shampoo(lr, weight_decay=weight_decay, precondition_frequency=freq,
                           **hparams)
  return trajectory.run(tx, ref, shape, steps=steps, share_initial_basis=share)


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("shape,share", CASES)
def test_trajectory_matches_reference(shape, share, weight_decay):
  w0, traj, _ = _trajectory(shape, weight_decay=weight_decay, share=share)
  assert len(traj) >= 40  # refreshes at t = 10, 20, 30, 40
  trajectory.assert_matches(w0, traj, min_move=0.1)


@pytest.mark.parametrize("shape", [(6, 6), (3, 4, 5)])
def test_trajectory_matches_reference_frequent_refresh_nondefault(shape):
  """Frequent refreshes, non-default hyperparameters and an active clamp."""
  w0, traj, _ = _trajectory(shape, steps=40, freq=3, b1=0.8, b2=0.9, init_factor=1e-3,
                            max_clamp=12, lr=0.02)
  trajectory.assert_matches(w0, traj)


@pytest.mark.parametrize("shape", [(5, 7), (3, 4, 5), (2, 3, 2, 4)])
@pytest.mark.parametrize("b1,init_factor", [(0.9, 0.1), (0.5, 0.02)])
def test_first_real_update_identity(shape, b1, init_factor):
  """At t = 1 the update is exactly (1 − b1) G_1 / (init_factor^{K/2} + eps)."""
  eps = 1e-8
  tx = kl_optax.scale_by_kl_shampoo(b1=b1, init_factor=init_factor, eps=eps)
  rng = np.random.default_rng(1)
  g0 = jnp.asarray(rng.normal(size=shape), jnp.float32)
  g1 = jnp.asarray(rng.normal(size=shape), jnp.float32)
  state = tx.init(g0)
  u0, state = tx.update(g0, state)
  np.testing.assert_array_equal(np.asarray(u0), 0.0)
  u1, _ = tx.update(g1, state)
  expected = (1 - b1) * np.asarray(g1, np.float64) / (init_factor ** (len(shape) / 2) + eps)
  np.testing.assert_allclose(np.asarray(u1), expected, rtol=2e-5, atol=1e-6 * np.abs(expected).max())


@pytest.mark.parametrize("shape", [(6, 6), (3, 4, 5)])
def test_initialization_step(shape):
  """t = 0: S_k = (1−b2)/n_k G_(k)G_(k)ᵀ; Q_k its eigenvectors, descending; λ = init_factor."""
  b2, init_factor = 0.95, 0.3
  rng = np.random.default_rng(2)
  g = rng.normal(size=shape)
  tx = kl_optax.scale_by_kl_shampoo(b2=b2, init_factor=init_factor)
  state = tx.init(jnp.zeros(shape))
  _, state = tx.update(jnp.asarray(g, jnp.float32), state)
  ks = state.groups[0]
  n = int(np.prod(shape))
  for k, d in enumerate(shape):
    s_ref = (1 - b2) / (n // d) * unfold(g, k) @ unfold(g, k).T
    s = np.asarray(ks.factors[k][0], np.float64)
    np.testing.assert_allclose(s, s_ref, rtol=1e-5, atol=1e-6 * np.abs(s_ref).max())
    q = np.asarray(ks.bases[k][0], np.float64)
    np.testing.assert_allclose(q.T @ q, np.eye(d), atol=1e-5)
    w_ref, _ = eigh_descending(s_ref)
    # Q diagonalizes S with the eigenvalues in descending order.
    np.testing.assert_allclose(np.diag(q.T @ s_ref @ q), w_ref, rtol=1e-4, atol=1e-5 * w_ref[0])
    np.testing.assert_allclose(np.asarray(ks.eigvals[k][0]), init_factor, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(ks.slots["mu"]), 0.0)
  assert int(state.count) == 1
