"""Runs a recipe and its float64 reference side by side on the same gradient stream."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import kl_optax


def _spd(rng, d, cond=20.0):
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))
  return q @ np.diag(np.geomspace(1.0, 1.0 / cond, d)) @ q.T


class Problem:
  """A noisy quadratic whose gradient is ``(W − W*) ×_1 H_1 ×_2 H_2 … + noise_t``."""

  def __init__(self, shape, steps, seed, grad_scale=1.0):
    rng = np.random.default_rng(seed)
    self.h = [_spd(rng, d) for d in shape]
    self.h[0] = grad_scale * self.h[0]  # the gradient is linear in H_1 and the noise
    self.w_star = rng.normal(size=shape)
    self.w0 = 0.5 * rng.normal(size=shape)
    self.noise = 0.3 * grad_scale * rng.normal(size=(steps,) + tuple(shape))

  def grad_np(self, w, t):
    r = w - self.w_star
    for k, h in enumerate(self.h):
      r = np.moveaxis(np.tensordot(h, r, axes=(1, k)), 0, k)
    return r + self.noise[t]

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


def kron_group(opt_state):
  """The stacked KronState of the single preconditioned leaf in a recipe's state."""
  groups = [g for st in kl_optax.kron_states(opt_state) if isinstance(st.groups, tuple)
            for g in st.groups]
  assert len(groups) == 1, len(groups)
  return groups[0]


def run(tx, ref, shape, *, steps, share_initial_basis=False, seed=0, grad_scale=1.0):
  """Trains ``{'w': W}`` with ``tx`` and with the reference ``ref``.

  ``grad_scale`` multiplies every gradient (the problem stays the same up to
  that scale). With ``share_initial_basis`` the reference adopts the JAX factors and bases
  after the initialization step (see ``KLShampooReference.set_bases``).

  Returns:
    ``(w0, [(w_jax, w_ref) per step], final JAX state)``.
  """
  prob = Problem(shape, steps, seed, grad_scale)
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
    w = ref.step(w, g)
    if t == 0 and share_initial_basis:
      group = kron_group(state)
      ref.set_bases([x[0] for x in group.bases], [x[0] for x in group.factors])
    out.append((np.asarray(params["w"], np.float64), w.copy()))
  return prob.w0, out, state


def assert_matches(w0, traj, tol=1e-4, min_move=0.05):
  """Every step within ``tol`` of the reference, relative to the parameters and to how far they moved."""
  for t, (w_jax, w_ref) in enumerate(traj):
    assert np.linalg.norm(w_jax - w_ref) <= tol * np.linalg.norm(w_ref), t
    if t >= 1:
      moved = np.abs(w_ref - w0).max()
      assert np.abs(w_jax - w_ref).max() <= tol * moved, (t, np.abs(w_jax - w_ref).max() / moved)
  # The comparison is not vacuous: the parameters really moved.
  assert np.linalg.norm(traj[-1][1] - w0) > min_move * np.linalg.norm(w0)
