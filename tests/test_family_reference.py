"""kl_soap, soap, shampoo and eshampoo against float64 NumPy references of ALGORITHMS.md §2–4."""

import jax.numpy as jnp
import numpy as np
import pytest

import kl_optax
import trajectory
from reference import EShampooReference, KLSOAPReference, ShampooReference, SOAPReference

RECIPES = {
    "kl_soap": (kl_optax.kl_soap, KLSOAPReference),
    "soap": (kl_optax.soap, SOAPReference),
    "shampoo": (kl_optax.shampoo, ShampooReference),
    "eshampoo": (kl_optax.eshampoo, EShampooReference),
}


def _run(name, shape, *, steps=45, lr=0.02, weight_decay=0.01, freq=10, share=False,
         **hparams):
  recipe, reference = RECIPES[name]
  ref = reference(shape, lr=lr, weight_decay=weight_decay, precondition_frequency=freq,
                  **hparams)
  rename = {"tolerance": "refresh_tolerance", "max_iters": "refresh_max_iters"}
  tx = recipe(lr, weight_decay=weight_decay, precondition_frequency=freq,
              **{rename.get(k, k): v for k, v in hparams.items()})
  w0, traj, state = trajectory.run(tx, ref, shape, steps=steps, share_initial_basis=share)
  return w0, traj, state, ref


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
  trajectory.assert_matches(w0, traj)


@pytest.mark.parametrize("shape", [(6, 6), (3, 4, 5)])
def test_eshampoo_adaptive_refresh_matches_reference_counts(shape):
  """Several QR iterations and a tolerance that skips some refreshes."""
  w0, traj, state, ref = _run("eshampoo", shape, steps=50, freq=3, tolerance=0.1, max_iters=3)
  trajectory.assert_matches(w0, traj)
  counts = np.asarray(trajectory.kron_group(state).slots["refreshes"][0])
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
