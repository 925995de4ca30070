"""Which leaves are preconditioned, and the errors for leaves that cannot be."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kl_optax


def _params():
  return {
      "embed": jnp.zeros((50, 8)),
      "blocks": [{"w": jnp.zeros((8, 16)), "b": jnp.zeros((16,))},
                 {"w": jnp.zeros((16, 8)), "b": jnp.zeros((8,))}],
      "conv": jnp.zeros((1, 3, 3, 4)),
      "row": jnp.zeros((1, 7)),
      "scalar": jnp.zeros(()),
      "big": jnp.zeros((4, 20_000)),
  }


def test_default_rule():
  labels = kl_optax.kron_labels(_params())
  assert labels["embed"] == "kron"
  assert labels["blocks"][0]["w"] == "kron" and labels["blocks"][1]["w"] == "kron"
  assert labels["blocks"][0]["b"] == "adam"
  assert labels["conv"] == "kron"      # squeezes to (3, 3, 4)
  assert labels["row"] == "adam"       # squeezes to (7,)
  assert labels["scalar"] == "adam"
  assert labels["big"] == "adam"       # 20,000 > max_precond_dim = 10,000


def test_max_precond_dim_and_masks():
  labels = kl_optax.kron_labels(_params(), max_precond_dim=10)
  assert labels["blocks"][0]["w"] == "adam" and labels["conv"] == "kron"
  mask = jax.tree.map(lambda _: True, _params())
  mask["blocks"] = False  # a prefix: the whole subtree
  labels = kl_optax.kron_labels(_params(), precondition_mask=mask)
  assert labels["blocks"][0]["w"] == "adam" and labels["embed"] == "kron"
  labels = kl_optax.kron_labels(_params(), precondition_mask=kl_optax.exclude("embed", r"\[1\]"))
  assert labels["embed"] == "adam"
  assert labels["blocks"][0]["w"] == "kron" and labels["blocks"][1]["w"] == "adam"


def test_recipe_routes_and_updates_every_leaf():
  params = _params()
  tx = kl_optax.kl_shampoo(1e-2, precondition_mask=kl_optax.exclude("embed"))
  state = tx.init(params)
  kron_state = state.inner_states["kron"].inner_state[0]
  # Preconditioned: two (8,16)/(16,8) matrices and the conv kernel -> 3 shape groups.
  assert [g.factors[0].shape[0] for g in kron_state.groups] == [1, 1, 1]
  grads = jax.tree.map(jnp.ones_like, params)
  step = jax.jit(tx.update)
  for _ in range(2):
    updates, state = step(grads, state, params)
  assert jax.tree.map(jnp.shape, updates) == jax.tree.map(jnp.shape, params)
  for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]:
    assert np.all(np.isfinite(np.asarray(u))), path
    assert np.any(np.asarray(u) != 0), jax.tree_util.keystr(path)


def test_non_floating_leaf_error_names_the_leaf():
  params = {"layer": {"w": jnp.zeros((4, 4)), "index": jnp.zeros((3,), jnp.int32)}}
  with pytest.raises(TypeError, match=r"\['layer'\]\['index'\].*int32"):
    kl_optax.kl_shampoo(1e-3).init(params)
  with pytest.raises(TypeError, match=r"\['index'\]"):
    kl_optax.scale_by_kl_shampoo().init({"index": jnp.zeros((3, 3), jnp.int32)})
  with pytest.raises(TypeError, match=r"complex64"):
    kl_optax.kl_shampoo(1e-3).init({"z": jnp.zeros((3, 3), jnp.complex64)})


def test_scale_by_rejects_vectors_naming_the_leaf():
  with pytest.raises(ValueError, match=r"\['bias'\].*\(1, 5\).*kl_shampoo"):
    kl_optax.scale_by_kl_shampoo().init({"w": jnp.zeros((3, 5)), "bias": jnp.zeros((1, 5))})


def test_mismatched_gradients_are_an_error():
  tx = kl_optax.scale_by_kl_shampoo()
  state = tx.init({"w": jnp.zeros((3, 5))})
  with pytest.raises(ValueError, match=r"\['w'\].*\(5, 3\)"):
    tx.update({"w": jnp.zeros((5, 3))}, state)
  with pytest.raises(ValueError, match="2 shape group"):
    tx.update({"w": jnp.zeros((3, 5)), "v": jnp.zeros((2, 2))}, state)


@pytest.mark.parametrize("name,value", [
    ("b1", 1.0), ("b1", -0.1), ("b2", 1.5), ("eps", -1e-3),
    ("precondition_frequency", 0), ("init_factor", 0.0), ("weight_decay", -1.0),
    ("b2", float("nan")),
])
def test_invalid_hyperparameters_name_the_argument(name, value):
  with pytest.raises(ValueError, match=name):
    kl_optax.kl_shampoo(1e-3, **{name: value})


def test_max_precond_dim_must_be_static():
  with pytest.raises(ValueError, match="max_precond_dim"):
    kl_optax.kl_shampoo(1e-3, max_precond_dim=0)
  opt = optax.inject_hyperparams(kl_optax.kl_shampoo)(1e-3, max_precond_dim=64)
  params = {"w": jnp.zeros((3, 4))}
  with pytest.raises(TypeError, match="static_args"):
    jax.jit(opt.init)(params)
  opt = optax.inject_hyperparams(kl_optax.kl_shampoo, static_args=("max_precond_dim",))(
      1e-3, max_precond_dim=64)
  jax.jit(opt.init)(params)


def test_nothing_preconditioned():
  tx = kl_optax.kl_shampoo(1e-2)
  params = {"b": jnp.ones((4,))}
  state = tx.init(params)
  updates, state = tx.update({"b": jnp.ones((4,))}, state, params)
  assert np.all(np.asarray(updates["b"]) < 0)
  tx = kl_optax.scale_by_kl_shampoo()
  state = tx.init({})
  updates, state = tx.update({}, state)
  assert updates == {}
