"""kl_shampoo against the float64 NumPy reference of ALGORITHMS.md §1."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kl_optax
from reference import KLShampooReference, eigh_descending, unfold


def _spd(rng, d, cond=20.0):
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))
  return q @ np.diag(np.geomspace(1.0, 1.0 / cond, d)) @ q.T


def _mode_apply(x, mats):
  for k, h in enumerate(mats):
    x = np.moveaxis(np.tensordot(h, x, axes=(1, k)), 0, k)
  return x


class _Problem:
  """A noisy quadratic whose gradient is ``(W − W*) ×_1 H_1 ×_2 H_2 … + noise_t``."""

  def __init__(self, shape, steps, seed):
    rng = np.random.default_rng(seed)
    self.h = [_spd(rng, d) for d in shape]
    self.w_star = rng.normal(size=shape)
    self.w0 = 0.5 * rng.normal(size=shape)
    self.noise = 0.3 * rng.normal(size=(steps,) + tuple(shape))

  def grad_np(self, w, t):
    return _mode_apply(w - self.w_star, self.h) + self.noise[t]

  def grad_jax(self):
    h = [jnp.asarray(x, jnp.float32) for x in self.h]
    w_star = jnp.asarray(self.w_star, jnp.float32)
    noise = jnp.asarray(self.noise, jnp.float32)

    def grad(w, t):
      r = w - w_star
      for k, m in enumerate(h):
        r = kl_optax.kron.mode_product(r, m, k)
      return r + noise[t]

    return grad


def _kron_state(opt_state):
  """The KronState group of the single preconditioned leaf inside kl_shampoo's state."""
  chain_state = opt_state.inner_states["kron"].inner_state
  return chain_state[0].groups[0]


def _trajectories(shape, *, steps=45, lr=0.05, weight_decay=0.01, freq=10,
                  share_initial_basis=False, seed=0, **hparams):
  prob = _Problem(shape, steps, seed)
  ref = KLShampooReference(shape, lr=lr, weight_decay=weight_decay,
                           precondition_frequency=freq, **hparams)
  tx = kl_optax.kl_shampoo(lr, weight_decay=weight_decay,
                           precondition_frequency=freq, **hparams)
  grad = prob.grad_jax()

  @jax.jit
  def step(params, state, t):
    updates, state = tx.update({"w": grad(params["w"], t)}, state, params)
    return optax.apply_updates(params, updates), state

  params = {"w": jnp.asarray(prob.w0, jnp.float32)}
  state = tx.init(params)
  w = prob.w0.copy()
  out = []
  for t in range(steps):
    g = prob.grad_np(w, t)
    params, state = step(params, state, t)
    if t == 0 and share_initial_basis:
      # The basis of a factor's null space is not determined by the
      # specification (a rank-deficient S at t = 0); start the reference from
      # the JAX state so that the comparison is about the update rules.
      ks = _kron_state(state)
      ref.initialize(g)
      ref.set_state([x[0] for x in ks.factors], [x[0] for x in ks.bases],
                    [x[0] for x in ks.eigvals], ks.slots["mu"][0], 0)
      w = w - lr * weight_decay * w
    else:
      w = ref.step(w, g)
    out.append((np.asarray(params["w"], np.float64), w.copy()))
  return prob.w0, out


# Square matrices and 3-D tensors whose unfoldings have full row rank: every
# factor is full rank at t = 0 and the whole trajectory is determined by the
# specification. Rectangular matrices share the initial basis (see above).
CASES = [
    ((6, 6), False),
    ((8, 8), False),
    ((5, 9), True),
    ((9, 4), True),
    ((3, 4, 5), False),
    ((4, 3, 2), False),
]


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("shape,share", CASES)
def test_trajectory_matches_reference(shape, share, weight_decay):
  w0, traj = _trajectories(shape, weight_decay=weight_decay,
                           share_initial_basis=share)
  assert len(traj) >= 40  # refreshes at t = 10, 20, 30, 40
  for t, (w_jax, w_ref) in enumerate(traj):
    rel = np.linalg.norm(w_jax - w_ref) / np.linalg.norm(w_ref)
    assert rel <= 1e-4, (t, rel)
    if t >= 1:
      # Stricter: the error relative to how far the parameters have moved.
      moved = np.abs(w_ref - w0).max()
      assert np.abs(w_jax - w_ref).max() <= 1e-4 * moved, t
  # The trajectory really moved (the comparison is not vacuous).
  assert np.linalg.norm(traj[-1][1] - w0) > 0.1 * np.linalg.norm(w0)


@pytest.mark.parametrize("shape", [(6, 6), (3, 4, 5)])
def test_trajectory_matches_reference_frequent_refresh_nondefault(shape):
  """Frequent refreshes, non-default hyperparameters and an active clamp."""
  w0, traj = _trajectories(shape, steps=40, freq=3, b1=0.8, b2=0.9,
                           init_factor=1e-3, max_clamp=12, lr=0.02)
  for t, (w_jax, w_ref) in enumerate(traj):
    if t >= 1:
      moved = np.abs(w_ref - w0).max()
      assert np.abs(w_jax - w_ref).max() <= 1e-4 * moved, t


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
