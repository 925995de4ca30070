"""Sharded optimizer state on 8 host devices (see conftest.py for the device flag)."""

import warnings

import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import kl_optax

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")

RECIPES = {name: dict(spec.test_kwargs) for name, spec in kl_optax.RECIPES.items()}
SHAPES = {"a": (16, 8), "b": (8, 16), "c": (16, 8), "d": (24, 12), "bias": (8,)}
# Sharded along the data axis, the model axis, both, or neither.
SPECS = {"a": P("data", "model"), "b": P("model", None), "c": P(None, "model"),
         "d": P(("data", "model"), None), "bias": P("model")}
STEPS = 20


def _mesh(axis_type):
  return jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type, axis_type))


def _problem(steps=STEPS):
  key = jax.random.key(0)
  params = {k: jax.random.normal(jax.random.fold_in(key, i), s)
            for i, (k, s) in enumerate(SHAPES.items())}
  noise = {k: jax.random.normal(jax.random.fold_in(key, 100 + i), (steps,) + s)
           for i, (k, s) in enumerate(SHAPES.items())}
  return params, noise


def _grad(params, noise):
  # Elementwise, so the gradients are bitwise the same however the params are
  # sharded: any difference below comes from the optimizer.
  scale = {k: 1.0 + 0.1 * i for i, k in enumerate(SHAPES)}
  return {k: scale[k] * (w - 1.0) + noise[k] for k, w in params.items()}


def _train(tx):
  def train(params, state, noise):
    def body(carry, n):
      p, s = carry
      u, s = tx.update(_grad(p, n), s, p)
      return (optax.apply_updates(p, u), s), None
    return jax.lax.scan(body, (params, state), noise)[0]
  return train


def _place(tree, mesh, lead=()):
  return {k: jax.device_put(v, NamedSharding(mesh, P(*lead, *SPECS[k]))) for k, v in tree.items()}


def _tx(name, **extra):
  return getattr(kl_optax, name)(5e-2, precondition_frequency=3, **RECIPES[name], **extra)


CASES = [(name, AxisType.Auto, {}) for name in RECIPES] + [
    ("kl_shampoo", AxisType.Explicit, {}),
    ("pro_kl_shampoo", AxisType.Explicit, {}),
    ("kl_shampoo", AxisType.Auto, dict(layout=kl_optax.Layout(block_size=8, max_precond_dim=12))),
]


@pytest.mark.parametrize("name,axis_type,extra", CASES,
                         ids=[f"{n}-{a.name}{'-blocked' if e else ''}" for n, a, e in CASES])
def test_sharded_training_equals_single_device(name, axis_type, extra):
  tx = _tx(name, **extra)
  params, noise = _problem()
  want, _ = jax.jit(_train(tx))(params, tx.init(params), noise)
  mesh = _mesh(axis_type)
  with jax.set_mesh(mesh):
    p = _place(params, mesh)
    shardings = kl_optax.state_shardings(tx, p)
    state = jax.jit(tx.init, out_shardings=shardings)(p)
    got, state = jax.jit(_train(tx), out_shardings=(jax.tree.map(lambda x: x.sharding, p),
                                                     shardings))(p, state, _place(noise, mesh, (None,)))
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state))
  for k in SHAPES:
    rel = float(jnp.max(jnp.abs(got[k] - want[k])) / jnp.max(jnp.abs(want[k])))
    assert rel <= 1e-5, (k, rel)
    assert got[k].sharding.spec == SPECS[k]


def _layout(x):
  """Mesh and spec of an array's sharding, trailing unsharded dims dropped."""
  spec = list(x.sharding.spec)
  while spec and spec[-1] is None:
    spec.pop()
  return tuple(x.sharding.mesh.shape.items()), tuple(spec)


def _kron_groups(state):
  return [g for st in kl_optax.kron_states(state) if isinstance(st.groups, tuple)
          for g in st.groups]


def test_state_shardings_layout():
  tx = _tx("kl_shampoo")
  params, _ = _problem()
  mesh = _mesh(AxisType.Auto)
  with jax.set_mesh(mesh):
    p = _place(params, mesh)
    shardings = kl_optax.state_shardings(tx, p)
  state_shapes = jax.eval_shape(tx.init, params)
  assert jax.tree.structure(shardings) == jax.tree.structure(jax.eval_shape(
      lambda: jax.tree.map(lambda x: x, state_shapes)))
  kron = kl_optax.kron_states(shardings)[0]
  assert kron.count.spec == P()
  for leaf in jax.tree.leaves(kron.groups):
    assert leaf.spec[0] == ("data", "model") and all(s is None for s in leaf.spec[1:])
  (adam,) = kl_optax.adam_states(shardings)
  assert adam.mu["bias"].spec == SPECS["bias"] and adam.nu["bias"].spec == SPECS["bias"]
  assert adam.count.spec == P()


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto], ids=lambda a: a.name)
def test_state_sharding_is_stable(axis_type):
  """Same type (shape, dtype, sharding) eager and jitted, before and after updates."""
  tx = _tx("kl_shampoo")
  params, noise = _problem(4)
  mesh = _mesh(axis_type)

  def types(tree):
    return jax.tree.map(lambda x: (str(jax.typeof(x)), _layout(x)), tree)

  with jax.set_mesh(mesh):
    p = _place(params, mesh)
    shardings = kl_optax.state_shardings(tx, p)
    jitted = jax.jit(tx.init, out_shardings=shardings)(p)
    if axis_type == AxisType.Explicit:
      assert types(jitted) == types(jax.jit(tx.init)(p))
    else:
      # Under Auto axes the transform constrains its stacks; the rest of the state
      # follows XLA's propagation unless out_shardings says otherwise.
      assert jax.tree.map(_layout, _kron_groups(jitted)) == jax.tree.map(
          _layout, _kron_groups(jax.jit(tx.init)(p)))
    if axis_type == AxisType.Explicit:
      assert types(tx.init(p)) == types(jitted)
    update = jax.jit(tx.update)     # no out_shardings: the layout comes from the transform
    state = jitted
    for t in range(3):
      _, state = update(_grad(p, {k: v[t] for k, v in _place(noise, mesh, (None,)).items()}),
                        state, p)
      for g in _kron_groups(state):
        for leaf in jax.tree.leaves(g):
          assert leaf.sharding.spec[0] == ("data", "model"), leaf.sharding
    if axis_type == AxisType.Explicit:
      assert types(state) == types(jitted)
    else:
      assert jax.tree.map(_layout, _kron_groups(state)) == jax.tree.map(
          _layout, _kron_groups(jitted))


def test_init_accepts_shape_dtype_struct():
  tx = _tx("kl_shampoo")
  params, _ = _problem()
  mesh = _mesh(AxisType.Auto)
  with jax.set_mesh(mesh):
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(mesh, SPECS[k]))
                for k, v in params.items()}
    shardings = kl_optax.state_shardings(tx, abstract)
    concrete = kl_optax.state_shardings(tx, _place(params, mesh))
    assert shardings == concrete
    abstract_state = tx.init(abstract)
    real_state = tx.init(_place(params, mesh))
  assert jax.tree.map(lambda x: (x.shape, x.dtype), abstract_state) == jax.tree.map(
      lambda x: (x.shape, x.dtype), real_state)


def test_per_device_state_bytes_fall_with_devices():
  tx = _tx("kl_shampoo")
  params = {f"w{i}": jnp.zeros((16, 24)) for i in range(8)}
  params["v"] = jnp.zeros((24,))
  full = sum(x.nbytes for x in jax.tree.leaves(tx.init(params)))
  for n in (2, 4, 8):
    mesh = jax.make_mesh((n,), ("data",), devices=jax.devices()[:n])
    with jax.set_mesh(mesh):
      shardings = kl_optax.state_shardings(tx, params)
      state = jax.jit(tx.init, out_shardings=shardings)(params)
    per_device = {}
    replicated = 0
    for leaf in jax.tree.leaves(state):
      if leaf.sharding.is_fully_replicated:
        replicated += leaf.nbytes
      for shard in leaf.addressable_shards:
        per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    assert len(per_device) == n
    assert max(per_device.values()) <= 1.25 * full / n + replicated, (n, per_device, full)


def test_donation_reuses_buffers_without_warnings():
  tx = _tx("kl_shampoo")
  params, noise = _problem(2)
  mesh = _mesh(AxisType.Auto)
  with jax.set_mesh(mesh):
    p = _place(params, mesh)
    shardings = kl_optax.state_shardings(tx, p)
    p_shardings = jax.tree.map(lambda x: x.sharding, p)
    state = jax.jit(tx.init, out_shardings=shardings)(p)

    def step(params, state, g):
      u, state = tx.update(g, state, params)
      return optax.apply_updates(params, u), state

    step = jax.jit(step, donate_argnums=(0, 1), out_shardings=(p_shardings, shardings))
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      for t in range(2):
        old = jax.tree.leaves((p, state))
        p, state = step(p, state, _grad(p, {k: v[t] for k, v in noise.items()}))
        assert all(x.is_deleted() for x in old)


def test_padding_tensors_stay_finite_and_are_not_returned():
  # 3 tensors of one shape on 8 devices: the stack is padded to 8.
  tx = _tx("kl_shampoo")
  params = {f"w{i}": jnp.ones((6, 4)) * (i + 1) for i in range(3)}
  mesh = _mesh(AxisType.Auto)
  with jax.set_mesh(mesh):
    state = tx.init(params)
    (group,) = _kron_groups(state)
    assert group.factors[0].shape[0] == 8
    update = jax.jit(tx.update)
    for t in range(8):
      u, state = update(jax.tree.map(lambda w: w * (t + 1.0), params), state, params)
  assert set(u) == set(params) and all(u[k].shape == (6, 4) for k in u)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state))


def test_inject_hyperparams_and_multisteps_under_a_mesh():
  """Traced hyperparameters and gradient accumulation keep working when sharded."""
  tx = optax.MultiSteps(optax.inject_hyperparams(kl_optax.kl_shampoo)(
      learning_rate=5e-2, precondition_frequency=3, init_factor=1e-3), every_k_schedule=2)
  params, noise = _problem(12)
  want, _ = jax.jit(_train(tx))(params, tx.init(params), noise)
  mesh = _mesh(AxisType.Auto)
  with jax.set_mesh(mesh):
    p = _place(params, mesh)
    shardings = kl_optax.state_shardings(tx, p)
    assert shardings.acc_grads["a"].spec == SPECS["a"]
    state = jax.jit(tx.init, out_shardings=shardings)(p)
    got, state = jax.jit(_train(tx), out_shardings=(jax.tree.map(lambda x: x.sharding, p),
                                                     shardings))(p, state, _place(noise, mesh, (None,)))
  for k in SHAPES:
    rel = float(jnp.max(jnp.abs(got[k] - want[k])) / jnp.max(jnp.abs(want[k])))
    assert rel <= 1e-5, (k, rel)


def test_sharded_params_without_a_mesh_warn_once_with_the_fix(monkeypatch):
  monkeypatch.setattr(kl_optax.sharding, "_warned_without_mesh", False)
  mesh = _mesh(AxisType.Auto)
  params, noise = _problem(steps=2)
  params = _place(params, mesh)
  tx = _tx("kl_shampoo")
  with pytest.warns(UserWarning, match=r"no mesh is set.*jax\.set_mesh\(mesh\)"):
    state = tx.init(params)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    tx.init(params)                      # once per process
    monkeypatch.setattr(kl_optax.sharding, "_warned_without_mesh", False)
    with jax.set_mesh(mesh):
      tx.init(params)                    # the documented path is silent
  # An unpadded state (stacks of 2, 1 and 1 tensors) laid out on the 2 x 4
  # mesh: state= gives shardings that fit it (the stack of 2 over "data", the
  # others replicated).
  shardings = kl_optax.state_shardings(tx, params, mesh, state=state)
  placed = jax.device_put(state, shardings)
  stacks = [g.factors[0] for g in kl_optax.kron_states(placed)[0].groups]
  assert sorted(x.shape[0] for x in stacks) == [1, 1, 2]
  assert {x.shape[0]: x.sharding.spec for x in stacks}[2] == P("data")
  p, s = jax.jit(_train(tx))(params, placed, noise)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves((p, s)))


def test_scanned_leaves_shard_and_train_like_single_device():
  # A (4, 16, 8) scanned leaf: its 4 layer slices join the stacks (padded to
  # the 8 devices under the mesh); the stacked bias goes to AdamW.
  tx = _tx("kl_shampoo", dimension_numbers=kl_optax.scanned("layers"))
  key = jax.random.key(1)
  params = {"layers": jax.random.normal(key, (4, 16, 8)), "layers_bias": jnp.zeros((4, 8))}
  noise = jax.tree.map(lambda x: jax.random.normal(jax.random.fold_in(key, x.ndim), (8,) + x.shape),
                       params)

  def train(params, state, noise):
    def body(carry, n):
      p, s = carry
      u, s = tx.update(jax.tree.map(lambda w, e: (w - 1.0) + e, p, n), s, p)
      return (optax.apply_updates(p, u), s), None
    return jax.lax.scan(body, (params, state), noise)[0]

  want, _ = jax.jit(train)(params, tx.init(params), noise)
  mesh = _mesh(AxisType.Auto)
  specs = {"layers": P(None, "data", "model"), "layers_bias": P(None, "model")}
  with jax.set_mesh(mesh):
    p = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in params.items()}
    shardings = kl_optax.state_shardings(tx, p)
    state = jax.jit(tx.init, out_shardings=shardings)(p)
    stacks = [g.factors[0] for g in _kron_groups(state)]
    assert [x.shape[0] for x in stacks] == [8]            # 4 slices, padded to 8 devices
    got, _ = jax.jit(train)(p, state, noise)
  for k in params:
    rel = float(jnp.max(jnp.abs(got[k] - want[k])) / jnp.max(jnp.abs(want[k])))
    assert rel <= 1e-5, (k, rel)
