"""Which leaves are preconditioned, and the errors for leaves that cannot be."""

import warnings

import chex
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
  tx = kl_optax.kl_shampoo(1e-2, layout=kl_optax.Layout(precondition_mask=kl_optax.exclude("embed")))
  state = tx.init(params)
  (kron_state,) = kl_optax.kron_states(state)
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
  with pytest.raises(TypeError, match=r"\['z'\].*complex64"):
    kl_optax.scale_by_kl_shampoo().init({"z": jnp.zeros((3, 3), jnp.complex64)})
  # The complete recipe sends complex leaves to its AdamW fallback.
  assert kl_optax.kron_labels({"z": jnp.zeros((3, 3), jnp.complex64)}) == {"z": "adam"}


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
    kl_optax.kl_shampoo(1e-3, layout=kl_optax.Layout(max_precond_dim=0))
  with pytest.raises(ValueError, match="max_precond_dim"), pytest.warns(DeprecationWarning):
    kl_optax.kl_shampoo(1e-3, max_precond_dim=0)
  params = {"w": jnp.zeros((3, 4))}
  # Layout options are static under inject_hyperparams without static_args:
  # max_precond_dim=3 sends the 3x4 matrix to AdamW, which keeps moments of its shape.
  opt = optax.inject_hyperparams(kl_optax.kl_shampoo)(
      1e-3, layout=kl_optax.Layout(max_precond_dim=3))
  state = jax.jit(opt.init)(params)
  assert not kl_optax.kron_states(state)[0].groups
  # A static int passed as a number is traced; the error says what to do.
  opt = optax.inject_hyperparams(kl_optax.kl_shampoo)(1e-3, refresh_max_iters=2)
  with pytest.raises(TypeError, match="static_args"):
    jax.jit(opt.init)(params)
  opt = optax.inject_hyperparams(kl_optax.kl_shampoo, static_args=("refresh_max_iters",))(
      1e-3, refresh_max_iters=2)
  jax.jit(opt.init)(params)


@pytest.mark.parametrize("how", ["layout", "old keyword"])
def test_callable_mask_is_not_a_schedule_under_inject_hyperparams(how):
  params = {"w": jnp.ones((4, 3)), "head": jnp.ones((3, 5))}
  mask = kl_optax.exclude("head")
  kw = ({"layout": kl_optax.Layout(precondition_mask=mask)} if how == "layout"
        else {"precondition_mask": mask})
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    opt = optax.inject_hyperparams(kl_optax.kl_shampoo)(1e-3, **kw)
    state = opt.init(params)
  (kron,) = kl_optax.kron_states(state)
  assert [kl_optax.inspection.group_name(g) for g in kron.groups] == ["4x3"]
  updates, _ = opt.update(params, state, params)
  assert updates["head"].shape == (3, 5)


def test_array_masks_are_refused_with_a_message():
  with pytest.raises(TypeError, match="precondition_mask.*inject_hyperparams"):
    kl_optax.Layout(precondition_mask={"w": jnp.asarray(True)})


def test_old_keywords_map_to_the_options_and_warn():
  params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
  grads = jax.tree.map(lambda p: 0.1 * p, params)
  new = kl_optax.kl_shampoo(1e-2, layout=kl_optax.Layout(state_dtype="bfloat16"),
                            fallback=kl_optax.Fallback(b1=0.5, learning_rate=1e-1))
  with pytest.warns(DeprecationWarning, match="Layout\\(state_dtype"):
    old = kl_optax.kl_shampoo(1e-2, state_dtype="bfloat16", adam_b1=0.5,
                              adam_learning_rate=1e-1)
  txs = (new, old)
  states = [tx.init(params) for tx in txs]
  for _ in range(3):
    outs = []
    for i, tx in enumerate(txs):
      u, states[i] = tx.update(grads, states[i], params)
      outs.append(u)
    chex.assert_trees_all_equal(*outs)
  chex.assert_trees_all_equal(*states)
  with pytest.raises(TypeError, match="unexpected keyword.*bogus"):
    kl_optax.kl_shampoo(1e-2, bogus=1)
  with pytest.raises(TypeError, match="inside layout="):
    kl_optax.kl_shampoo(1e-2, layout=kl_optax.Layout(), block_size=4)
  with pytest.raises(ValueError, match="takes no masks"):
    kl_optax.scale_by_kl_shampoo(layout=kl_optax.Layout(precondition_mask=kl_optax.exclude("a")))


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
