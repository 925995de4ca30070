"""kl_soap, soap, shampoo and eshampoo against float64 NumPy references of ALGORITHMS.md §2–4."""

import jax
import jax.numpy as jnp
import optax
import numpy as np
import pytest

import kl_optax
import trajectory
from reference import REFERENCES

# kl_shampoo and pro_kl_shampoo have their own reference tests (test_kl_shampoo_reference.py,
# test_pro.py).
RECIPES = {name: (kl_optax.RECIPES[name].constructor, REFERENCES[name])
           for name in ("kl_soap", "soap", "shampoo", "eshampoo")}


def test_every_recipe_has_a_float64_reference():
  assert set(REFERENCES) == set(kl_optax.RECIPES)


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


@pytest.mark.parametrize("name", ["kl_shampoo", "kl_soap", "soap", "eshampoo"])
def test_zero_tolerance_is_the_fixed_refresh(name):
  """τ = 0 run through the adaptive refresh (one QR iteration on QᵀSQ) is the fixed refresh.

  A traced τ (inject_hyperparams under jit) takes the adaptive code path; a
  Python 0 is short-cut to the fixed refresh at construction, so it is the
  traced one that tests the math.
  """
  recipe = kl_optax.RECIPES[name].constructor
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)}
  fixed = recipe(1e-2, precondition_frequency=2, refresh_tolerance=None)
  zero = optax.inject_hyperparams(recipe)(1e-2, precondition_frequency=2, refresh_tolerance=0.0)
  s_f, s_z = fixed.init(params), zero.init(params)
  update_f, update_z = jax.jit(fixed.update), jax.jit(zero.update)
  for _ in range(7):
    g = {"w": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)}
    u_f, s_f = update_f(g, s_f, params)
    u_z, s_z = update_z(g, s_z, params)
    np.testing.assert_allclose(u_f["w"], u_z["w"], rtol=2e-4, atol=1e-7)
  # Three refreshes (t = 2, 4, 6) ran on both factors along the adaptive path.
  np.testing.assert_array_equal(kl_optax.refresh_counts(s_z)["6x5"], [[3, 3]])


@pytest.mark.parametrize("options", [
    {"init_factor": "rms"},
    {"init_factor": "spectrum", "damping": 1e-2},
    {"max_clamp": None, "normalize_update": True},
    {"update_order": "authors", "freq": 3},
], ids=["rms", "spectrum-damping", "noclamp-normalized", "authors-order"])
def test_kl_soap_options_match_reference(options):
  """KL-SOAP's statistics options (the authors' switches and the starting rules)."""
  w0, traj, _, _ = _run("kl_soap", (3, 4, 5), steps=25, **options)
  trajectory.assert_matches(w0, traj)
