"""The optax conformance checks (modelled on optax's contrib test suite) for every recipe."""

import contextlib
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kl_optax

# (factory name, kwargs) from the table of recipes. Pro-KLShampoo's rank 2 < 4: the
# (3, 4) leaf gets a spike-and-flat factor, the 3-D leaf full KL-Shampoo.
RECIPES = [(spec.name, {"learning_rate": 1e-2, **spec.test_kwargs})
           for spec in kl_optax.RECIPES.values()]
# Arguments that decide shapes and must stay static under optax.inject_hyperparams.
STATIC_ARGS = {spec.name: spec.static_args for spec in kl_optax.RECIPES.values()}
IDS = [r[0] for r in RECIPES]


def _factory(name):
  return getattr(kl_optax, name)


@contextlib.contextmanager
def _count_compilations():
  records = []

  class Handler(logging.Handler):
    def emit(self, record):
      if re.search(r"Finished .* compilation", record.getMessage()):
        records.append(record)

  handler = Handler(level=logging.DEBUG)
  logger = logging.getLogger("jax")
  logger.addHandler(handler)
  try:
    with jax.log_compiles(True):
      yield records
  finally:
    logger.removeHandler(handler)


def _mixed_params(dtype=jnp.float32):
  return {
      "w": jnp.full((3, 4), 0.5, dtype),
      "t": jnp.full((2, 3, 2), -0.5, dtype),
      "b": jnp.ones((4,), dtype),
  }


def _mixed_loss(params):
  target_w = jnp.arange(12.0).reshape(3, 4) / 12.0
  target_t = jnp.linspace(-1.0, 1.0, 12).reshape(2, 3, 2)
  return (jnp.sum((params["w"] - target_w) ** 2)
          + jnp.sum((params["t"] - target_t) ** 2)
          + jnp.sum((params["b"] - 2.0) ** 2))


@pytest.mark.parametrize("name,kwargs", RECIPES, ids=IDS)
def test_accepts_extra_args_and_does_not_recompile(name, kwargs):
  opt = _factory(name)(**kwargs)

  @jax.jit
  def step(params, state):
    grads = jax.grad(_mixed_loss)(params)
    updates, state = opt.update(grads, state, params, unexpected_extra_arg=1)
    return optax.apply_updates(params, updates), state

  params = _mixed_params()
  state = opt.init(params)
  params, state = step(params, state)
  with _count_compilations() as logs:
    params, state = step(params, state)
    params, state = step(params, state)
  assert not logs, "update recompiled on a later call"


@pytest.mark.parametrize("name,kwargs", RECIPES, ids=IDS)
def test_converges_on_small_problems(name, kwargs):
  opt = _factory(name)(**kwargs)

  def target(dtype):
    return {
        "w": jnp.arange(12.0, dtype=dtype).reshape(3, 4) / 12.0,
        "t": jnp.linspace(-1.0, 1.0, 12, dtype=dtype).reshape(2, 3, 2),
        "b": jnp.full((4,), 2.0, dtype),
    }

  params = _mixed_params()
  state = opt.init(params)
  state = optax.tree.map_params(opt, lambda v: v, state)  # a no-op that must work

  def body(carry, _):
    params, state = carry
    grads = jax.grad(_mixed_loss)(params)
    updates, state = opt.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), None

  (params, state), _ = jax.jit(lambda c: jax.lax.scan(body, c, length=3000))((params, state))
  for k, v in target(jnp.float32).items():
    np.testing.assert_allclose(params[k], v, rtol=3e-2, atol=3e-2, err_msg=k)


@pytest.mark.parametrize("name,kwargs", RECIPES, ids=IDS)
def test_inject_hyperparams_gives_identical_updates(name, kwargs):
  factory = _factory(name)
  opt = factory(**kwargs)
  opt_inject = optax.inject_hyperparams(
      factory, static_args=STATIC_ARGS.get(name, ()))(**kwargs)
  params = _mixed_params()
  grads = jax.grad(_mixed_loss)(params)
  state, state_inject = jax.jit(opt.init)(params), jax.jit(opt_inject.init)(params)
  for _ in range(3):  # the initialization step and two real updates
    updates, state = jax.jit(opt.update)(grads, state, params)
    updates_inject, state_inject = jax.jit(opt_inject.update)(grads, state_inject, params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 updates_inject, updates)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 state_inject.inner_state, state)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("name,kwargs", RECIPES, ids=IDS)
def test_update_dtype_equals_param_dtype(name, kwargs, dtype):
  opt = _factory(name)(**kwargs)
  params = _mixed_params(jnp.dtype(dtype))
  grads = jax.grad(_mixed_loss)(params)
  state = jax.jit(opt.init)(params)
  for _ in range(2):
    updates, state = jax.jit(opt.update)(grads, state, params)
    for k in params:
      assert updates[k].dtype == params[k].dtype, k


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("name,kwargs", RECIPES, ids=IDS)
def test_multisteps_gives_zeros_on_non_final_micro_steps(name, kwargs, dtype):
  opt = optax.MultiSteps(_factory(name)(**kwargs), every_k_schedule=4)
  params = _mixed_params(jnp.dtype(dtype))
  grads = jax.grad(_mixed_loss)(params)
  state = jax.jit(opt.init)(params)
  update = jax.jit(opt.update)
  for micro in range(7):
    updates, state = update(grads, state, params)
    if micro % 4 != 3:
      for k in params:
        np.testing.assert_array_equal(np.asarray(updates[k], np.float32), 0.0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("name,kwargs", RECIPES, ids=IDS)
def test_state_shape_dtype_stable_inside_cond(name, kwargs, dtype):
  ctx = jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext()
  with ctx:
    opt = _factory(name)(**kwargs)
    params = _mixed_params(jnp.dtype(dtype))

    @jax.jit
    def step(params, state, take):
      grads = jax.grad(_mixed_loss)(params)
      zero = jax.tree.map(jnp.zeros_like, params)
      updates, state = jax.lax.cond(
          take, lambda: opt.update(grads, state, params), lambda: (zero, state))
      return optax.apply_updates(params, updates), state

    state = opt.init(params)
    signature = jax.tree.map(lambda x: (x.shape, x.dtype), state)
    for i in range(4):   # the branch is traced: update, skip, update, skip
      take = i % 2 == 0
      new_params, state = step(params, state, jnp.asarray(take))
      assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == signature
      assert all(new_params[k].dtype == jnp.dtype(dtype) for k in params)
      moved = any(not np.array_equal(new_params[k], params[k]) for k in params)
      assert moved == take, (i, moved)
      params = new_params
    assert [int(s.count) for s in kl_optax.kron_states(state)] == [2] * len(
        kl_optax.kron_states(state))


@pytest.mark.parametrize("name,kwargs", RECIPES, ids=IDS)
def test_schedule_equals_constant_learning_rate(name, kwargs):
  factory = _factory(name)
  opt_s = factory(**dict(kwargs, learning_rate=optax.constant_schedule(1e-3)))
  opt_c = factory(**dict(kwargs, learning_rate=1e-3))
  params = _mixed_params()
  p_s, p_c = params, params
  s_s, s_c = opt_s.init(params), opt_c.init(params)
  for _ in range(4):
    u_s, s_s = opt_s.update(jax.grad(_mixed_loss)(p_s), s_s, p_s)
    u_c, s_c = opt_c.update(jax.grad(_mixed_loss)(p_c), s_c, p_c)
    p_s, p_c = optax.apply_updates(p_s, u_s), optax.apply_updates(p_c, u_c)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), p_s, p_c)


@pytest.mark.parametrize("name,kwargs", RECIPES, ids=IDS)
def test_init_accepts_shape_dtype_structs(name, kwargs):
  opt = _factory(name)(**kwargs)
  params = _mixed_params()
  structs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  real = opt.init(params)
  direct = opt.init(structs)
  abstract = jax.eval_shape(opt.init, structs)
  as_shape = lambda t: jax.tree.map(lambda x: (x.shape, jnp.dtype(x.dtype)), t)
  assert as_shape(direct) == as_shape(real)
  assert as_shape(abstract) == as_shape(real)
  assert jax.tree.structure(direct) == jax.tree.structure(real)
