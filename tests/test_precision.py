"""Compute precision: bfloat16 operands for the preconditioner's products, float32 elsewhere."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kl_optax
from kl_optax import kron
from kl_optax import transform

RECIPES = ["kl_shampoo", "kl_soap", "soap", "shampoo", "eshampoo", "pro_kl_shampoo"]


def _params():
  return {"w": jnp.zeros((12, 8)), "t": jnp.zeros((4, 3, 5)), "b": jnp.zeros(8)}


_TARGET = {k: jax.random.normal(jax.random.PRNGKey(i), v.shape)
           for i, (k, v) in enumerate(sorted(_params().items()))}


def _loss(params):
  return sum(jnp.mean(jnp.square(params[k] - _TARGET[k])) for k in params)


def _grads(params, i):
  """A noisy least-squares gradient (the noise changes with the step)."""
  grads = jax.grad(_loss)(params)
  keys = jax.random.split(jax.random.PRNGKey(100 + i), len(grads))
  return {k: g + 0.1 * jax.random.normal(kk, g.shape)
          for (k, g), kk in zip(sorted(grads.items()), keys)}


def _trajectory(name, layout, steps=60):
  spec = kl_optax.RECIPES[name]
  tx = spec.make(3e-2, layout=layout, precondition_frequency=5)
  params = _params()
  state = tx.init(params)
  update = jax.jit(tx.update)
  for i in range(steps):
    updates, state = update(_grads(params, i), state, params)
    params = optax.apply_updates(params, updates)
  return params, state


@pytest.mark.parametrize("name", RECIPES)
def test_bfloat16_compute_stays_close_to_float32_and_is_not_ignored(name):
  ref, ref_state = _trajectory(name, None)
  low, low_state = _trajectory(name, kl_optax.Layout(compute_dtype=jnp.bfloat16))
  start = float(_loss(_params()))
  ref_loss, low_loss = float(_loss(ref)), float(_loss(low))
  assert ref_loss < 0.9 * start  # the problem is being solved
  # bfloat16 operands change the trajectory (the option is not ignored) ...
  assert max(float(jnp.abs(ref[k] - low[k]).max()) for k in ("w", "t")) > 0
  # ... but not the progress: within 10% of float32's loss reduction.
  assert abs(low_loss - ref_loss) < 0.1 * (start - ref_loss), (start, ref_loss, low_loss)
  # Storage is unchanged: only the operands of the products were rounded.
  assert jax.tree.map(lambda x: x.dtype, ref_state) == jax.tree.map(lambda x: x.dtype, low_state)


def _initialized(layout):
  """The per-group states after kl_shampoo's first (initialization) update."""
  params = _params()
  tx = kl_optax.kl_shampoo(1e-2, layout=layout)
  _, state = jax.jit(tx.update)(_grads(params, 0), tx.init(params), params)
  return [g for ks in kl_optax.kron_states(state) for g in ks.groups]


def _largest_relative_gap(a, b):
  return max(float(jnp.abs(x - y).max() / jnp.maximum(jnp.abs(x).max(), 1e-30))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
             if jnp.issubdtype(x.dtype, jnp.floating))


def test_the_initialization_step_computes_in_float32_under_bfloat16(monkeypatch):
  # The first update's statistics feed eigendecompositions (the bases, the "spectrum"
  # start): they are computed at float32 whatever compute_dtype says. The two
  # programs differ in their regular step, so the eigendecompositions of the
  # same factors may differ in their last bits (1e-6 seen on an x86_64 CPU);
  # statistics in bfloat16 would be off by about 1e-3, as the second half shows.
  reference = _initialized(None)
  low = _initialized(kl_optax.Layout(compute_dtype=jnp.bfloat16))
  assert _largest_relative_gap(reference, low) <= 1e-5
  for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(low)):   # the counters
    if not jnp.issubdtype(a.dtype, jnp.floating):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Without the float32 settings around the initialization the same check fails.
  monkeypatch.setattr(transform, "_float32_products", lambda fn, *args: fn(*args))
  rounded = _initialized(kl_optax.Layout(compute_dtype=jnp.bfloat16))
  assert _largest_relative_gap([g.factors for g in reference],
                               [g.factors for g in rounded]) > 1e-4


def test_default_settings_are_float32_at_highest_precision():
  assert kron.current_matmul_settings() == kron.MatmulSettings(None, jax.lax.Precision.HIGHEST)
  ref, _ = _trajectory("kl_shampoo", None)
  same, _ = _trajectory("kl_shampoo", kl_optax.Layout(compute_dtype=jnp.float32,
                                                      matmul_precision="highest"))
  for key in ref:
    np.testing.assert_array_equal(np.asarray(ref[key]), np.asarray(same[key]))


def _dot_operand_types(tx, params):
  grads = _grads(params, 0)
  state = tx.init(params)
  _, state = jax.jit(tx.update)(grads, state, params)
  text = jax.jit(tx.update).lower(grads, state, params).as_text()
  return set(re.findall(r"stablehlo\.dot_general[^\n]*?:\s*\((tensor<[^>]*>)", text))


def test_bfloat16_compute_compiles_bfloat16_products():
  params = {"w": jnp.ones((12, 8))}
  f32 = _dot_operand_types(kl_optax.kl_shampoo(1e-2), params)
  bf16 = _dot_operand_types(
      kl_optax.kl_shampoo(1e-2, layout=kl_optax.Layout(compute_dtype=jnp.bfloat16)), params)
  assert f32 and not any("bf16" in t for t in f32), f32
  assert any("bf16" in t for t in bf16), bf16
  # The decompositions' inputs stay float32: some products remain float32.
  assert any("f32" in t for t in bf16), bf16


def test_matmul_settings_nest_and_restore():
  with kron.matmul_settings(jnp.bfloat16, "high") as outer:
    assert outer.compute_dtype == jnp.bfloat16
    assert outer.precision == jax.lax.Precision.HIGH
    with kron.matmul_settings() as inner:
      assert inner == kron.MatmulSettings(None, jax.lax.Precision.HIGHEST)
    assert kron.current_matmul_settings() == outer
  assert kron.current_matmul_settings().compute_dtype is None


@pytest.mark.parametrize("kwargs, match", [
    ({"compute_dtype": jnp.int8}, "compute_dtype"),
    ({"compute_dtype": "complex64"}, "compute_dtype"),
    ({"compute_dtype": jnp.float16}, "compute_dtype"),
    ({"matmul_precision": "fastest"}, "matmul_precision"),
    ({"matmul_precision": jax.lax.Precision.HIGH}, "matmul_precision"),
])
def test_bad_settings_name_the_argument(kwargs, match):
  with pytest.raises(ValueError, match=match):
    kl_optax.Layout(**kwargs)
  with pytest.raises(ValueError, match=match):
    kl_optax.kron_transform(kl_optax.momentum(0.9), **kwargs)


def test_compute_dtype_works_under_inject_hyperparams():
  tx = optax.inject_hyperparams(kl_optax.kl_shampoo, static_args=("layout",))(
      learning_rate=1e-2, layout=kl_optax.Layout(compute_dtype=jnp.bfloat16))
  params = _params()
  state = tx.init(params)
  updates, state = jax.jit(tx.update)(_grads(params, 0), state, params)
  updates, state = jax.jit(tx.update)(_grads(params, 1), state, params)
  assert all(np.all(np.isfinite(np.asarray(u))) for u in jax.tree.leaves(updates))


def _regression_error(name, state_dtype, seed, steps=300):
  """Squared error of W after ``steps`` noisy least-squares steps with correlated inputs."""
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  target = jax.random.normal(k1, (24, 16))
  mix = jax.random.normal(k2, (24, 24)) / 5 + jnp.eye(24)
  tx = kl_optax.RECIPES[name].make(1e-2, layout=kl_optax.Layout(state_dtype=state_dtype))
  params = {"w": jnp.zeros((24, 16))}
  state = tx.init(params)

  @jax.jit
  def step(params, state, key):
    x = jax.random.normal(key, (64, 24)) @ mix
    y = x @ target + 0.1 * jax.random.normal(key, (64, 16))
    grads = jax.grad(lambda p: jnp.mean((x @ p["w"] - y) ** 2))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for i in range(steps):
    params, state = step(params, state, jax.random.fold_in(k3, i))
  return float(jnp.mean((params["w"] - target) ** 2))


@pytest.mark.parametrize("name", ["shampoo", "kl_shampoo"])
def test_bfloat16_storage_trains_like_float32(name):
  # Shampoo reads the eigenvalues of its stored factors; rounded to bfloat16 they
  # lost their small end and the error ended 7x float32's. Its factors now stay float32.
  for seed in range(2):
    full = _regression_error(name, None, seed)
    half = _regression_error(name, jnp.bfloat16, seed)
    assert half < 1.1 * full, (seed, full, half)


def test_factors_whose_eigenvalues_are_read_stay_float32_under_bfloat16_storage():
  params = {"w": jnp.zeros((24, 16))}
  layout = kl_optax.Layout(state_dtype=jnp.bfloat16)
  for name, factor_dtype in (("shampoo", jnp.float32), ("kl_shampoo", jnp.bfloat16),
                             ("soap", jnp.bfloat16)):
    group = kl_optax.kron_states(kl_optax.RECIPES[name].make(1e-2, layout=layout).init(params))
    group = group[0].groups[0]
    assert {f.dtype for f in group.factors} == {jnp.dtype(factor_dtype)}, name
    assert {b.dtype for b in group.bases} == {jnp.dtype(jnp.bfloat16)}, name


def test_the_initialization_step_starts_from_the_stored_initial_state():
  # The initialization step rebuilds the initial state instead of reading it
  # (so that a donated state is updated in place); in bfloat16 storage it must
  # see the values init stored, rounded to bfloat16, not the exact ones.
  def first_update(step):
    return step._replace(state=step.state.with_slots(seen=step.state.slots["start"] * 1.0))

  part = kl_optax.Part(
      update=lambda step: step, first_update=first_update, name="reads its start",
      init_slots=lambda shape: {"start": jnp.full((), 0.1), "seen": jnp.zeros(())},
      float32_slots=("seen",))
  tx = kl_optax.kron_transform(part, state_dtype=jnp.bfloat16)
  params = {"w": jnp.ones((4, 3))}
  _, state = jax.jit(tx.update)(params, tx.init(params))
  slots = state.groups[0].slots
  assert slots["start"].dtype == jnp.bfloat16 and slots["seen"].dtype == jnp.float32
  assert float(slots["seen"][0]) == float(jnp.bfloat16(0.1)) != 0.1
