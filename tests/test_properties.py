"""Property-based tests over random shapes, tensor orders, dtypes and hyperparameters."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st

import kl_optax
from kl_optax import compose

NAMES = ["kl_shampoo", "kl_soap", "soap", "shampoo", "eshampoo", "pro_kl_shampoo"]
EXAMPLES = 40
TRIED = {"state_and_updates": 0, "blocks_tile": 0}

shapes = st.lists(st.integers(1, 6), min_size=0, max_size=4).map(tuple)


@st.composite
def problems(draw):
  name = draw(st.sampled_from(NAMES))
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
    hyper["block_size"] = draw(st.integers(1, 4))
    hyper["max_precond_dim"] = max(hyper["block_size"], draw(st.integers(1, 5)))
  seed = draw(st.integers(0, 2**16))
  return name, tree, dtype, hyper, seed


def _signature(tree):
  return jax.tree.map(lambda x: (x.shape, x.dtype), tree)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True)
@given(problems())
def test_state_structure_and_dtypes_are_stable_updates_finite_no_recompilation(problem):
  TRIED["state_and_updates"] += 1
  name, shapes_, dtype, hyper, seed = problem
  rng = np.random.default_rng(seed)
  params = {k: jnp.asarray(rng.normal(size=s), dtype) for k, s in shapes_.items()}
  tx = getattr(kl_optax, name)(1e-2, **hyper)
  state = tx.init(params)
  signature = _signature(state)
  update = jax.jit(tx.update)
  for t in range(4):
    grads = {k: jnp.asarray(rng.normal(size=p.shape), dtype) for k, p in params.items()}
    updates, state = update(grads, state, params)
    assert _signature(state) == signature
    for k, u in updates.items():
      assert u.shape == params[k].shape and u.dtype == dtype
      assert bool(jnp.all(jnp.isfinite(u)))
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state)
               if jnp.issubdtype(x.dtype, jnp.inexact))
  assert update._cache_size() == 1   # one compilation for all four steps


@settings(max_examples=50, deadline=None, derandomize=True)
@given(st.lists(st.integers(2, 9), min_size=2, max_size=4).map(tuple),
       st.integers(1, 5), st.integers(0, 4))
def test_blocks_tile_the_tensor_exactly(shape, block_size, extra):
  TRIED["blocks_tile"] += 1
  max_dim = block_size + extra
  x = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)
  plan = compose.plan_tensors({"x": x}, max_precond_dim=max_dim, block_size=block_size)
  stacks = compose._pack(plan, [x], plan.group_sizes)  # pylint: disable=protected-access
  assert sum(int(np.prod(s.shape)) for s in stacks) == x.size
  for s, shape_ in zip(stacks, plan.group_shapes):
    assert all(d <= max(block_size, max_dim) for d in shape_)
    assert all(d <= block_size for d, full in zip(shape_, shape) if full > max_dim)
  (back,) = compose._unpack(plan, stacks, [x])  # pylint: disable=protected-access
  np.testing.assert_array_equal(back, x)


def test_report_examples_tried():
  # Runs after the property tests in this module; the numbers go to docs/reliability.md.
  print(f"property examples tried: {TRIED}")
