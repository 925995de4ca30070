"""The checks every row of ``kl_optax.RECIPES`` must pass (shared by the tests).

``check_recipe(spec)`` runs a recipe through what its users do with it: init and
jitted updates on a tree with a matrix, a 3-D tensor and a bias; routing (the
bias to AdamW); ``optax.inject_hyperparams`` with the row's static arguments;
``optax.MultiSteps``; ``optax.chain``; a non-finite gradient (skipped, state
finite); the deprecated keywords (same result, with a warning); and
``state_shardings`` on a one-device mesh.
"""

from __future__ import annotations

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

import kl_optax


def _params():
  rng = np.random.default_rng(0)
  return {"w": jnp.asarray(rng.normal(size=(4, 5)), jnp.float32),
          "t": jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32),
          "b": jnp.zeros((5,), jnp.float32)}


def _grads(params, t):
  return jax.tree.map(lambda p: jnp.cos(p + t) + 0.1 * t, params)


def _run(tx, params, steps=4, jit=True):
  state = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  out = []
  for t in range(steps):
    u, state = update(_grads(params, t), state, params)
    out.append(u)
  return out, state


def check_recipe(spec: kl_optax.RecipeSpec) -> None:
  params = _params()
  tx = spec.make(1e-2)
  updates, state = _run(tx, params)
  for u in updates:
    chex.assert_trees_all_equal_shapes_and_dtypes(u, params)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))
  assert any(float(jnp.abs(u["w"]).max()) > 0 for u in updates[1:])

  # Routing: the matrix and the tensor are preconditioned, the bias is not.
  assert all(int(k.count) == 4 for k in kl_optax.kron_states(state))
  assert kl_optax.kron_labels(params) == {"b": "adam", "t": "kron", "w": "kron"}

  # Un-jitted equals jitted.
  eager, _ = _run(tx, params, steps=2, jit=False)
  chex.assert_trees_all_close(eager, updates[:2], rtol=1e-5, atol=1e-7)

  # inject_hyperparams: a scheduled learning rate equals the constant one.
  injected = optax.inject_hyperparams(spec.constructor, static_args=spec.static_args)(
      learning_rate=optax.constant_schedule(1e-2), **spec.test_kwargs)
  chex.assert_trees_all_close(_run(injected, params)[0], updates, rtol=1e-5, atol=1e-7)

  # MultiSteps (every 2 microbatches) and chain.
  multi = optax.MultiSteps(spec.make(1e-2), every_k_schedule=2)
  _run(multi, params)
  chained = optax.chain(optax.clip_by_global_norm(1e3), spec.make(1e-2))
  chex.assert_trees_all_close(_run(chained, params)[0], updates, rtol=1e-5, atol=1e-7)

  # A NaN in the matrix's gradient: the matrix skips, nothing non-finite is stored.
  state = tx.init(params)
  bad = dict(_grads(params, 0.0), w=jnp.full((4, 5), jnp.nan))
  _, state = tx.update(_grads(params, 0.0), state, params)
  u, state = tx.update(bad, state, params)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state)
             if jnp.issubdtype(x.dtype, jnp.inexact))
  assert bool(jnp.all(jnp.isfinite(u["w"])))
  assert int(np.sum([np.sum(v) for v in kl_optax.nonfinite_skips(state).values()])) >= 1

  # The deprecated keywords give the same optimizer, with a warning.
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    old = spec.make(1e-2, state_dtype=None, adam_b1=0.9)
  assert any(issubclass(w.category, DeprecationWarning) for w in caught)
  chex.assert_trees_all_close(_run(old, params)[0], updates, rtol=1e-6, atol=0)

  # state_shardings covers the whole state.
  mesh = jax.make_mesh((1,), ("data",))
  with jax.set_mesh(mesh):
    shardings = kl_optax.state_shardings(tx, params)
  assert jax.tree.structure(shardings) == jax.tree.structure(tx.init(params))
