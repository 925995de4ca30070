"""kl_soap, soap, shampoo and eshampoo against float64 NumPy references of ALGORITHMS.md §2–4."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kl_optax
from reference import EShampooReference, KLSOAPReference, ShampooReference, SOAPReference
from test_kl_shampoo_reference import _Problem

RECIPES = {
    "kl_soap": (kl_optax.kl_soap, KLSOAPReference),
    "soap": (kl_optax.soap, SOAPReference),
    "shampoo": (kl_optax.shampoo, ShampooReference),
    "eshampoo": (kl_optax.eshampoo, EShampooReference),
}


def _run(name, shape, *, steps=45, lr=0.02, weight_decay=0.01, freq=10, share=False,
         seed=0, **hparams):
  recipe, reference = RECIPES[name]
  prob = _Problem(shape, steps, seed)
  ref = reference(shape, lr=lr, weight_decay=weight_decay, precondition_frequency=freq,
                  **hparams)
  rename = {"tolerance": "refresh_tolerance", "max_iters": "refresh_max_iters"}
  tx = recipe(lr, weight_decay=weight_decay, precondition_frequency=freq,
              **{rename.get(k, k): v for k, v in hparams.items()})
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
    if t == 0 and share:
      # A rank-deficient factor's null-space basis is not determined by the
      # specification: start the reference from the JAX factors and bases.
      ks = state.inner_states["kron"].inner_state[0].groups[0]
      ref.set_bases([x[0] for x in ks.bases], [x[0] for x in ks.factors])
    out.append((np.asarray(params["w"], np.float64), w.copy()))
  return prob.w0, out, state, ref


def _assert_matches(w0, traj, tol=1e-4):
  for t, (w_jax, w_ref) in enumerate(traj):
    assert np.linalg.norm(w_jax - w_ref) <= tol * np.linalg.norm(w_ref), t
    if t >= 1:
      moved = np.abs(w_ref - w0).max()
      assert np.abs(w_jax - w_ref).max() <= tol * moved, (t, np.abs(w_jax - w_ref).max() / moved)
  assert np.linalg.norm(traj[-1][1] - w0) > 0.05 * np.linalg.norm(w0)


# Shampoo applies negative powers to the factors' eigenvalues, so a rank-deficient
# factor (a rectangular matrix at t = 0) amplifies float32 round-off in its null
# space without bound; it is compared on full-rank shapes only.
SHAPES = {
    "kl_soap": [((6, 6), False), ((5, 9), True), ((3, 4, 5), False)],
    "soap": [((6, 6), False), ((5, 9), True), ((3, 4, 5), False)],
    "shampoo": [((6, 6), False), ((3, 4, 5), False)],
    "eshampoo": [((6, 6), False), ((5, 9), True), ((3, 4, 5), False)],
}
CASES = [(name, shape, share) for name, cases in SHAPES.items() for shape, share in cases]


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("name,shape,share", CASES)
def test_trajectory_matches_reference(name, shape, share, weight_decay):
  w0, traj, _, _ = _run(name, shape, weight_decay=weight_decay, share=share)
  assert len(traj) >= 40
  _assert_matches(w0, traj)


@pytest.mark.parametrize("shape", [(6, 6), (3, 4, 5)])
def test_eshampoo_adaptive_refresh_matches_reference_counts(shape):
  """Several QR iterations and a tolerance that skips some refreshes."""
  w0, traj, state, ref = _run("eshampoo", shape, steps=50, freq=3, tolerance=0.1, max_iters=3)
  _assert_matches(w0, traj)
  counts = np.asarray(state.inner_states["kron"].inner_state[0].groups[0].slots["refreshes"][0])
  np.testing.assert_array_equal(counts, ref.refreshes)
  assert 0 < counts.sum() < len(shape) * (50 // 3)  # some refreshes ran, some were skipped


def test_zero_tolerance_is_the_fixed_refresh():
  """Every recipe accepts the adaptive refresh; τ = 0 is the fixed-frequency refresh."""
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)}
  for recipe in (kl_optax.kl_shampoo, kl_optax.kl_soap, kl_optax.soap, kl_optax.eshampoo):
    fixed = recipe(1e-2, precondition_frequency=2, refresh_tolerance=None)
    zero = recipe(1e-2, precondition_frequency=2, refresh_tolerance=0.0)
    s_f, s_z = fixed.init(params), zero.init(params)
    for _ in range(5):
      g = {"w": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)}
      u_f, s_f = fixed.update(g, s_f, params)
      u_z, s_z = zero.update(g, s_z, params)
      np.testing.assert_array_equal(u_f["w"], u_z["w"])
