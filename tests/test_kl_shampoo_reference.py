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
                grad_scale=1.0, **hparams):
  ref = KLShampooReference(shape, lr=lr, weight_decay=weight_decay,
                           precondition_frequency=freq, **hparams)
  tx = kl_optax.kl_shampoo(lr, weight_decay=weight_decay, precondition_frequency=freq,
                           **hparams)
  return trajectory.run(tx, ref, shape, steps=steps, share_initial_basis=share,
                        grad_scale=grad_scale)


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("shape,share", CASES)
def test_trajectory_matches_reference(shape, share, weight_decay):
  w0, traj, _ = _trajectory(shape, weight_decay=weight_decay, share=share)
  assert len(traj) >= 40  # refreshes at t = 10, 20, 30, 40
  trajectory.assert_matches(w0, traj, min_move=0.1)


@pytest.mark.parametrize("shape,share", CASES)
def test_trajectory_matches_reference_paper_constant_start(shape, share):
  """The paper's λ_k = init_factor = 0.1 start (the default before "spectrum")."""
  w0, traj, _ = _trajectory(shape, share=share, init_factor=0.1)
  assert len(traj) >= 40
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


# ---------------------------------------------------------------------------
# Options beyond the paper's defaults: each against the same float64 reference.

@pytest.mark.parametrize("init_factor", ["rms"])  # "spectrum", the default, is tested above
@pytest.mark.parametrize("shape,share", [((6, 6), False), ((5, 9), True), ((3, 4, 5), False)])
def test_starting_rules_match_reference(shape, share, init_factor):
  w0, traj, _ = _trajectory(shape, share=share, init_factor=init_factor, steps=25)
  trajectory.assert_matches(w0, traj, min_move=0.1)


@pytest.mark.parametrize("shape", [(5, 7), (3, 4, 5), (2, 3, 2, 4)])
def test_rms_start_makes_the_first_real_update_scale_free(shape):
  """With init_factor="rms" the update at t = 1 is (1 − b1) G_1 / (rms(G_0) + eps), any order."""
  b1, eps = 0.9, 1e-8
  rng = np.random.default_rng(1)
  for scale in (1e-4, 1.0):
    g0 = jnp.asarray(scale * rng.normal(size=shape), jnp.float32)
    g1 = jnp.asarray(scale * rng.normal(size=shape), jnp.float32)
    tx = kl_optax.scale_by_kl_shampoo(b1=b1, eps=eps, init_factor="rms")
    state = tx.init(g0)
    _, state = tx.update(g0, state)
    u1, _ = tx.update(g1, state)
    rms = np.sqrt(np.mean(np.asarray(g0, np.float64) ** 2))
    expected = (1 - b1) * np.asarray(g1, np.float64) / (rms + eps)
    np.testing.assert_allclose(np.asarray(u1), expected, rtol=1e-4, atol=1e-6)


def test_spectrum_start_initialization_step():
  """t = 0 with init_factor="spectrum": λ_k from the reference's rule, in the bases' order."""
  from reference import initial_eigenvalues  # pylint: disable=import-outside-toplevel
  shape = (3, 4, 5)
  g = np.random.default_rng(2).normal(size=shape)
  tx = kl_optax.scale_by_kl_shampoo(init_factor="spectrum")
  state = tx.init(jnp.zeros(shape))
  _, state = tx.update(jnp.asarray(g, jnp.float32), state)
  ks = state.groups[0]
  expected = initial_eigenvalues("spectrum", g)
  prod_of_means = 1.0
  for k in range(3):
    np.testing.assert_allclose(np.asarray(ks.eigvals[k][0]), expected[k], rtol=1e-4)
    prod_of_means *= expected[k].mean()
  np.testing.assert_allclose(prod_of_means, np.mean(g**2), rtol=1e-10)


def test_zero_first_gradient_falls_back_to_the_constant():
  tx = kl_optax.scale_by_kl_shampoo(init_factor="rms")
  state = tx.init(jnp.zeros((4, 3)))
  _, state = tx.update(jnp.zeros((4, 3)), state)
  for lam in state.groups[0].eigvals:
    np.testing.assert_allclose(np.asarray(lam), 0.1)


@pytest.mark.parametrize("shape", [(6, 6), (3, 4, 5)])
def test_clamp_off_matches_reference_and_differs_from_clamped(shape):
  """max_clamp=None (the authors' using_clamping=False) where the clamp would be active.

  Gradients of size ~1e-3 put the eigenvalue estimates (~1e-3 per mode) below
  the floor 1/10² of a dim-6 mode.
  """
  hp = dict(steps=30, freq=3, b2=0.9, init_factor=1e-3, lr=0.02, grad_scale=1e-3)
  w0, traj, _ = _trajectory(shape, max_clamp=None, **hp)
  trajectory.assert_matches(w0, traj)
  _, clamped, _ = _trajectory(shape, max_clamp=12, **hp)
  gap = np.max(np.abs(np.asarray(traj[-1][0]) - np.asarray(clamped[-1][0])))
  assert gap > 1e-2, gap  # the clamp was active, so switching it off changes the run


@pytest.mark.parametrize("shape", [(6, 6), (3, 4, 5)])
def test_damping_matches_reference(shape):
  w0, traj, _ = _trajectory(shape, steps=30, damping=1e-2)
  trajectory.assert_matches(w0, traj)


@pytest.mark.parametrize("shape", [(5, 9), (3, 4, 5)])
def test_normalized_update_matches_reference(shape):
  w0, traj, _ = _trajectory(shape, steps=30, normalize_update=True, share=shape == (5, 9),
                            lr=0.01)
  trajectory.assert_matches(w0, traj)


@pytest.mark.parametrize("shape", [(3, 4, 5), (4, 3, 2)])
def test_authors_update_order_matches_reference_and_differs_from_jacobi(shape):
  w0, traj, _ = _trajectory(shape, steps=30, update_order="authors", freq=3)
  trajectory.assert_matches(w0, traj)
  _, jacobi, _ = _trajectory(shape, steps=30, freq=3)
  gap = np.max(np.abs(np.asarray(traj[-1][0]) - np.asarray(jacobi[-1][0])))
  assert gap > 1e-4, gap


def test_authors_update_order_is_jacobi_for_matrices_and_refuses_four_modes():
  w_a, traj_a, _ = _trajectory((6, 5), steps=12, update_order="authors", share=True)
  w_j, traj_j, _ = _trajectory((6, 5), steps=12, share=True)
  np.testing.assert_array_equal(np.asarray(traj_a[-1][0]), np.asarray(traj_j[-1][0]))
  tx = kl_optax.scale_by_kl_shampoo(update_order="authors")
  with pytest.raises(ValueError, match=r"matrices and 3-D tensors.*\(2, 3, 2, 4\)"):
    tx.init(jnp.ones((2, 3, 2, 4)))
