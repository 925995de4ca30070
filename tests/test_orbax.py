"""Plain Orbax checkpointing (the path most users take) of every recipe's state.

The raw state of every recipe goes through ``ocp.CheckpointManager`` in
``test_reliability.test_resume_from_checkpoint_is_bit_identical`` (which
shares its compiled step with the ``kl_optax.checkpoint`` round trip).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import kl_optax
from nnx_problem import nnx_regression

NAMES = list(kl_optax.RECIPES)


def make(name):
  return kl_optax.RECIPES[name].make(1e-2, precondition_frequency=3)


def _params():
  k = jax.random.split(jax.random.key(0), 3)
  return {"w": jax.random.normal(k[0], (6, 5)), "b": jnp.zeros((5,)),
          "t": jax.random.normal(k[1], (2, 3, 4))}


def _grads(t):
  return jax.tree.map(lambda x: jnp.cos(x * (t + 1.0)) + 0.1 * t, _params())


@functools.lru_cache(maxsize=None)
def _step(tx):
  """One jitted step of ``tx`` (compiled once per optimizer)."""
  return jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(
      *tx.update(g, s, p)))


@pytest.mark.parametrize("name", NAMES)
def test_no_zero_size_arrays_in_state(name):
  for params in (_params(), {"bias": jnp.zeros((5,)), "scale": jnp.ones((5,))}):
    state = make(name).init(params)
    empty = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_flatten_with_path(state)[0]
             if np.size(x) == 0]
    assert not empty, empty


def _steps(tx, params, state, start, n):
  step = _step(tx)
  for t in range(start, start + n):
    params, state = step(params, state, _grads(t))
  return params, state


@pytest.mark.parametrize("name", NAMES)
def test_nnx_optimizer_state_through_checkpoint_manager(name, tmp_path):
  build, train_step = nnx_regression(lambda: make(name), out=5)

  model, optimizer = build()
  for _ in range(4):
    train_step(model, optimizer)
  with ocp.CheckpointManager(tmp_path / "run") as mngr:
    mngr.save(4, args=ocp.args.StandardSave(
        {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}))
    mngr.wait_until_finished()
  for _ in range(4):
    train_step(model, optimizer)

  model2, optimizer2 = build()
  target = {"model": nnx.state(model2), "optimizer": nnx.state(optimizer2)}
  with ocp.CheckpointManager(tmp_path / "run") as mngr:
    restored = mngr.restore(4, args=ocp.args.StandardRestore(target))
  nnx.update(model2, restored["model"])
  nnx.update(optimizer2, restored["optimizer"])
  for _ in range(4):
    train_step(model2, optimizer2)
  jax.tree.map(np.testing.assert_array_equal, nnx.state(model2), nnx.state(model))
  jax.tree.map(np.testing.assert_array_equal, nnx.state(optimizer2), nnx.state(optimizer))


def test_pro_checkpoint_without_placeholders_restores(tmp_path):
  # Pro-KLShampoo checkpoints written while the restricted-mode placeholders
  # were empty (and so left out) hold no such leaves; they restore, and resume
  # exactly: the placeholders are never read.
  tx = make("pro_kl_shampoo")
  params = _params()
  p, s = _steps(tx, params, tx.init(params), 0, 4)
  flat = jax.tree_util.tree_flatten_with_path(s)[0]
  names = [kl_optax.checkpoint._name(path) for path, _ in flat]
  placeholders = {n for n, (_, x) in zip(names, flat) if kl_optax.checkpoint._is_pro_placeholder(n, x)}
  assert len(placeholders) == 3        # the restricted mode's S, Q and λ of the (6, 5) matrix
  old = kl_optax.checkpoint._strip_empty(s, frozenset(placeholders))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / "old", old)
  restored = kl_optax.checkpoint.restore(tmp_path / "old", jax.eval_shape(tx.init, params))
  want = _steps(tx, p, s, 4, 4)
  got = _steps(tx, p, restored, 4, 4)
  jax.tree.map(np.testing.assert_array_equal, got, want)


def test_scanned_state_through_checkpoint_manager(tmp_path):
  tx = kl_optax.kl_shampoo(1e-2, precondition_frequency=3,
                           dimension_numbers=kl_optax.scanned("blocks"))
  params = {"blocks": {"w": jax.random.normal(jax.random.key(0), (3, 6, 5)),
                       "b": jnp.zeros((3, 5))}}
  grads = lambda t: jax.tree.map(lambda x: jnp.sin(x * (t + 1.0)) + 0.1, params)
  step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, s, p)))
  p, s = params, tx.init(params)
  for t in range(4):
    p, s = step(p, s, grads(t))
  with ocp.CheckpointManager(tmp_path / "run") as mngr:
    mngr.save(4, args=ocp.args.StandardSave({"params": p, "opt_state": s}))
    mngr.wait_until_finished()
    restored = mngr.restore(4, args=ocp.args.StandardRestore(
        jax.eval_shape(lambda: {"params": params, "opt_state": tx.init(params)})))
  a, b = (p, s), (restored["params"], restored["opt_state"])
  for t in range(4, 8):
    a = step(*a, grads(t))
    b = step(*b, grads(t))
  jax.tree.map(np.testing.assert_array_equal, a, b)
