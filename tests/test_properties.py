"""Property-based tests over random shapes, tensor orders, dtypes and hyperparameters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import kl_optax
from kl_optax import plan as plan_lib

NAMES = list(kl_optax.RECIPES)
EXAMPLES_PER_RECIPE = 7   # 42 examples in all, every recipe drawn
BLOCK_EXAMPLES = 50

shapes = st.lists(st.integers(1, 6), min_size=0, max_size=4).map(tuple)


@st.composite
def problems(draw, name):
  tree = {f"p{i}": draw(shapes) for i in range(draw(st.integers(1, 3)))}
  dtype = draw(st.sampled_from([jnp.float32, jnp.bfloat16]))
  hyper = dict(
      b1=draw(st.floats(0.0, 0.99)), b2=draw(st.floats(0.5, 0.999)),
      eps=draw(st.sampled_from([0.0, 1e-12, 1e-8, 1e-6])),
      precondition_frequency=draw(st.integers(1, 4)),
      weight_decay=draw(st.floats(0.0, 0.1)))
  if name == "pro_kl_shampoo":
    hyper["rank"] = draw(st.integers(1, 3))
  if draw(st.booleans()):
    block_size = draw(st.integers(1, 4))
    hyper["layout"] = kl_optax.Layout(block_size=block_size,
                                      max_precond_dim=max(block_size, draw(st.integers(1, 5))))
  seed = draw(st.integers(0, 2**16))
  return name, tree, dtype, hyper, seed


def _signature(tree):
  return jax.tree.map(lambda x: (x.shape, x.dtype), tree)


def _check_problem(problem):
  name, shapes_, dtype, hyper, seed = problem
  rng = np.random.default_rng(seed)
  params = {k: jnp.asarray(rng.normal(size=s), dtype) for k, s in shapes_.items()}
  tx = getattr(kl_optax, name)(1e-2, **hyper)
  state = tx.init(params)
  signature = _signature(state)
  traces = []

  def traced_update(grads, state, params):
    traces.append(1)   # runs once per trace, i.e. per compilation
    return tx.update(grads, state, params)

  update = jax.jit(traced_update)
  for t in range(4):
    grads = {k: jnp.asarray(rng.normal(size=p.shape), dtype) for k, p in params.items()}
    updates, state = update(grads, state, params)
    assert _signature(state) == signature
    for k, u in updates.items():
      assert u.shape == params[k].shape and u.dtype == dtype
      assert bool(jnp.all(jnp.isfinite(u)))
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state)
               if jnp.issubdtype(x.dtype, jnp.inexact))
  assert len(traces) == 1   # one compilation for all four steps


@pytest.mark.parametrize("name", NAMES)
def test_state_structure_and_dtypes_are_stable_updates_finite_no_recompilation(name):
  tried = []

  @settings(max_examples=EXAMPLES_PER_RECIPE, deadline=None, derandomize=True)
  @given(problems(name))
  def check(problem):
    tried.append(problem)
    _check_problem(problem)

  check()   # runs every example here, so the count below is this test's
  assert len(tried) >= EXAMPLES_PER_RECIPE
  assert len({repr(p[1:]) for p in tried}) == len(tried)   # all different problems


@settings(max_examples=BLOCK_EXAMPLES, deadline=None, derandomize=True)
@given(st.lists(st.integers(2, 9), min_size=2, max_size=4).map(tuple),
       st.integers(1, 5), st.integers(0, 4))
def test_blocks_tile_the_tensor_exactly(shape, block_size, extra):
  max_dim = block_size + extra
  x = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)
  plan = plan_lib.plan_tensors({"x": x}, max_precond_dim=max_dim, block_size=block_size)
  stacks = plan_lib.pack(plan, [x], plan.group_sizes)
  assert sum(int(np.prod(s.shape)) for s in stacks) == x.size
  for s, shape_ in zip(stacks, plan.group_shapes):
    assert all(d <= max(block_size, max_dim) for d in shape_)
    assert all(d <= block_size for d, full in zip(shape_, shape) if full > max_dim)
  (back,) = plan_lib.unpack(plan, stacks, [x])
  np.testing.assert_array_equal(back, x)
