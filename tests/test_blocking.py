"""Blocking: dims larger than ``max_precond_dim`` are cut into blocks of ``block_size``."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kl_optax

# Pro-KLShampoo blocks only its dense (KL-Shampoo) leaves: see
# test_pro_kl_shampoo_blocks_large_leaves_with_full_factors.
RECIPES = [name for name in kl_optax.RECIPES if name != "pro_kl_shampoo"]
LAYOUT = kl_optax.Layout(block_size=4, max_precond_dim=8)
SHAPE = (10, 13)      # rows cut into 4, 4, 2; columns into 4, 4, 4, 1
BLOCK, MAX_DIM = 4, 8


def _blocks(x):
  rows = [(0, 4), (4, 4), (8, 2)]
  cols = [(0, 4), (4, 4), (8, 4), (12, 1)]
  return {f"b{i}{j}": x[r0:r0 + nr, c0:c0 + nc]
          for (i, (r0, nr)), (j, (c0, nc)) in itertools.product(enumerate(rows), enumerate(cols))}


def _grads(steps, seed=0):
  rng = np.random.default_rng(seed)
  scale = rng.uniform(0.2, 2.0, size=SHAPE)
  return [jnp.asarray(scale * rng.normal(size=SHAPE), jnp.float32) for _ in range(steps)]


@pytest.mark.parametrize("name", RECIPES)
def test_blocked_equals_recipe_on_each_block(name):
  """Every block of the blocked update equals the unblocked recipe run on that block alone."""
  factory = getattr(kl_optax, name)
  kwargs = dict(learning_rate=0.1, precondition_frequency=3)
  blocked = factory(**kwargs, layout=kl_optax.Layout(block_size=BLOCK, max_precond_dim=MAX_DIM))
  # The 13-column dim is cut, so a 1-column block (squeezed: a vector) goes to AdamW in
  # the per-block run but is preconditioned as a (2|4)×1 block in the blocked run: skip it.
  plain = factory(**kwargs)
  w = jnp.zeros(SHAPE)
  s_blocked = blocked.init({"w": w})
  s_plain = plain.init(_blocks(w))
  update_b, update_p = jax.jit(blocked.update), jax.jit(plain.update)
  for t, g in enumerate(_grads(12)):
    u_b, s_blocked = update_b({"w": g}, s_blocked, {"w": w})
    u_p, s_plain = update_p(_blocks(g), s_plain, _blocks(w))
    got = _blocks(u_b["w"])
    for key, want in u_p.items():
      if want.shape[1] == 1:
        continue
      np.testing.assert_allclose(got[key], want, rtol=2e-5, atol=1e-7,
                                 err_msg=f"{name} step {t} block {key}")


def test_blocks_are_stacked_by_shape():
  tx = kl_optax.scale_by_kl_shampoo(
      layout=kl_optax.Layout(block_size=BLOCK, max_precond_dim=MAX_DIM))
  state = tx.init({"w": jnp.zeros(SHAPE), "v": jnp.zeros((4, 4))})
  shapes = {tuple(f.shape[-1] for f in g.factors): g.factors[0].shape[0] for g in state.groups}
  # 6 full 4×4 blocks plus the separate (4, 4) leaf share one stack.
  assert shapes == {(4, 4): 7, (4, 1): 2, (2, 4): 3, (2, 1): 1}


def test_dims_up_to_max_precond_dim_are_not_cut():
  tx = kl_optax.scale_by_kl_shampoo(layout=kl_optax.Layout(block_size=4, max_precond_dim=16))
  state = tx.init({"w": jnp.zeros((16, 12))})
  assert [tuple(f.shape[-1] for f in g.factors) for g in state.groups] == [(16, 12)]


def test_routing_without_and_with_blocking():
  params = {"big": jnp.zeros((20, 3)), "small": jnp.zeros((5, 3))}
  assert kl_optax.kron_labels(params, 8) == {"big": "adam", "small": "kron"}
  assert kl_optax.kron_labels(params, 8, block_size=8) == {"big": "kron", "small": "kron"}
  tx = kl_optax.kl_shampoo(1e-2, layout=kl_optax.Layout(max_precond_dim=8))
  state = tx.init(params)
  assert [tuple(f.shape[-1] for f in g.factors)
          for g in kl_optax.kron_states(state)[0].groups] == [(5, 3)]


def test_pro_kl_shampoo_blocks_large_leaves_with_full_factors():
  params = {"big": jnp.zeros((20, 6)), "wide": jnp.zeros((6, 8))}
  labels = kl_optax.pro_labels(params, 2, block_size=4, max_precond_dim=8)
  assert labels == {"big": "dense", "wide": "spike_flat"}
  tx = kl_optax.pro_kl_shampoo(0.1, rank=2, layout=LAYOUT)
  ref = kl_optax.kl_shampoo(0.1, init_factor=0.1, layout=LAYOUT)  # Pro's constant start
  w = {"big": jnp.zeros((20, 6))}
  s, s_ref = tx.init(w), ref.init(w)
  update, update_ref = jax.jit(tx.update), jax.jit(ref.update)
  for g in _grads(6, seed=1):
    g = {"big": jnp.concatenate([g[:, :6], g[:, 6:12]], axis=0)[:20]}
    u, s = update(g, s, w)
    u_ref, s_ref = update_ref(g, s_ref, w)
    np.testing.assert_allclose(u["big"], u_ref["big"], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("kwargs,match", [
    (dict(block_size=0), "block_size"),
    (dict(block_size=2.5), "block_size"),
    (dict(block_size=16, max_precond_dim=8), "block_size"),
    (dict(max_precond_dim=0), "max_precond_dim"),
])
def test_bad_blocking_options_name_the_argument(kwargs, match):
  with pytest.raises(ValueError, match=match):
    kl_optax.kl_shampoo(1e-3, layout=kl_optax.Layout(**kwargs))
