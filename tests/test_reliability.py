"""Reliability: checkpoints, non-finite and extreme gradients, odd shapes, failed refreshes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import kl_optax
from kl_optax import kron

RECIPES = {name: dict(spec.test_kwargs) for name, spec in kl_optax.RECIPES.items()}
NAMES = list(RECIPES)
RECIPES_PRECONDITIONERS = {n: s.preconditioner for n, s in kl_optax.RECIPES.items()}


def make(name, learning_rate=1e-2, **kwargs):
  return getattr(kl_optax, name)(learning_rate,
                                 **{"precondition_frequency": 3, **RECIPES[name], **kwargs})


def _problem(dtype=jnp.float32):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(32, 6)), jnp.float32)
  w_star = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
  t_star = jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32)
  y = x @ w_star + 0.5
  params = {"w": jnp.zeros((6, 5), dtype), "b": jnp.zeros((5,), dtype),
            "t": jnp.zeros((2, 3, 4), dtype)}

  def loss(p):
    p = jax.tree.map(lambda v: v.astype(jnp.float32), p)
    return jnp.mean((x @ p["w"] + p["b"] - y) ** 2) + jnp.mean((p["t"] - t_star) ** 2)

  return params, loss


@jax.jit
def _finite(tree):
  # One compiled check per tree structure instead of two eager ops per leaf.
  return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
                            if jnp.issubdtype(x.dtype, jnp.inexact)] or [True]))


def _all_finite(tree):
  return bool(_finite(tree))


def _stepper(tx, loss):
  @jax.jit
  def step(params, state, scale, poison):
    grads = jax.grad(loss)(params)
    grads = jax.tree.map(lambda g: (g.astype(jnp.float32) * scale).astype(g.dtype), grads)
    grads = {k: jnp.where(poison[k], jnp.nan, g) for k, g in grads.items()}
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, updates, loss(params)
  return step


NO_POISON = {"w": False, "b": False, "t": False}


# ---------------------------------------------------------------- checkpoints


def _run(step, params, state, n, start=0):
  for t in range(start, start + n):
    params, state, _, _ = step(params, state, jnp.float32(1.0 + 0.1 * (t % 3)), NO_POISON)
  return params, state


@pytest.mark.parametrize("name", NAMES)
def test_resume_from_checkpoint_is_bit_identical(name, tmp_path):
  tx = make(name)
  params, loss = _problem()
  step = _stepper(tx, loss)
  p, s = _run(step, params, tx.init(params), 8)      # refreshes at 3, 6 ...
  kl_optax.checkpoint.save(tmp_path / "ckpt", {"params": p, "opt_state": s})
  want_p, want_s = _run(step, p, s, 7, start=8)       # ... and at 9, 12 after the restore
  target = jax.eval_shape(lambda: {"params": params, "opt_state": tx.init(params)})
  restored = kl_optax.checkpoint.restore(tmp_path / "ckpt", target)
  got_p, got_s = _run(step, restored["params"], restored["opt_state"], 7, start=8)
  jax.tree.map(np.testing.assert_array_equal, got_p, want_p)
  jax.tree.map(np.testing.assert_array_equal, got_s, want_s)
  assert jax.tree.structure(got_s) == jax.tree.structure(want_s)
  # Plain Orbax, the path most users take, saves and restores the same state.
  with ocp.CheckpointManager(tmp_path / "run") as mngr:
    mngr.save(8, args=ocp.args.StandardSave({"params": p, "opt_state": s}))
    mngr.wait_until_finished()
    restored = mngr.restore(8, args=ocp.args.StandardRestore(target))
  got_p, got_s = _run(step, restored["params"], restored["opt_state"], 7, start=8)
  jax.tree.map(np.testing.assert_array_equal, got_p, want_p)
  jax.tree.map(np.testing.assert_array_equal, got_s, want_s)


def test_restore_into_a_mismatched_model_names_the_leaves(tmp_path):
  tx = make("kl_shampoo")
  params, _ = _problem()
  kl_optax.checkpoint.save(tmp_path / "ckpt", tx.init(params))
  other = dict(params, w=jnp.zeros((6, 7)))
  with pytest.raises(ValueError, match=r"does not match the restore target") as err:
    kl_optax.checkpoint.restore(tmp_path / "ckpt", jax.eval_shape(tx.init, other))
  # The stacked state of the (6, 5) leaf is named, with both shapes.
  assert "checkpoint has float32[1, 6, 5], target has float32[1, 6, 7]" in str(err.value)
  assert "slots/mu: checkpoint has" in str(err.value)


def test_nnx_optimizer_checkpoint_resumes_bit_identically(tmp_path):
  from flax import nnx
  from nnx_problem import nnx_regression
  build, train_step = nnx_regression(lambda: make("kl_shampoo"))

  model, optimizer = build()
  for _ in range(5):
    train_step(model, optimizer)
  kl_optax.checkpoint.save(tmp_path / "ckpt", {"model": nnx.state(model),
                                               "optimizer": nnx.state(optimizer)})
  for _ in range(6):
    train_step(model, optimizer)
  want = nnx.state(model)

  model2, optimizer2 = build()
  target = {"model": nnx.state(model2), "optimizer": nnx.state(optimizer2)}
  restored = kl_optax.checkpoint.restore(tmp_path / "ckpt", target)
  nnx.update(model2, restored["model"])
  nnx.update(optimizer2, restored["optimizer"])
  for _ in range(6):
    train_step(model2, optimizer2)
  jax.tree.map(np.testing.assert_array_equal, nnx.state(model2), want)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")
def test_sharded_checkpoint_resumes_bit_identically(tmp_path):
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
  tx = make("kl_shampoo")
  params, loss = _problem()
  specs = {"w": P("data", None), "b": P(None), "t": P(None, None, "model")}
  with jax.set_mesh(mesh):
    params = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in params.items()}
    shardings = kl_optax.state_shardings(tx, params)
    state = jax.jit(tx.init, out_shardings=shardings)(params)
    step = _stepper(tx, loss)
    p, s = _run(step, params, state, 8)
    kl_optax.checkpoint.save(tmp_path / "ckpt", {"params": p, "opt_state": s})
    want_p, want_s = _run(step, p, s, 7, start=8)
    target = kl_optax.checkpoint.abstract_like(
        {"params": params, "opt_state": state},
        {"params": jax.tree.map(lambda v: v.sharding, params), "opt_state": shardings})
    restored = kl_optax.checkpoint.restore(tmp_path / "ckpt", target)
    assert jax.tree.map(lambda v: v.sharding, restored["opt_state"]) == shardings
    got_p, got_s = _run(step, restored["params"], restored["opt_state"], 7, start=8)
  jax.tree.map(np.testing.assert_array_equal, got_p, want_p)
  jax.tree.map(np.testing.assert_array_equal, got_s, want_s)


# ---------------------------------------------------------------- non-finite gradients


def _kron_groups(state):
  return [g for st in kl_optax.kron_states(state) if isinstance(st.groups, tuple)
          for g in st.groups]


@pytest.mark.parametrize("name", NAMES)
def test_nonfinite_gradient_never_reaches_the_state(name):
  tx = make(name)
  params0, loss = _problem()
  step = _stepper(tx, loss)          # compiled once; the bad leaf is a traced argument
  for bad in ["w", "b", "t"]:        # a matrix, a bias (AdamW) and a 3-D tensor
    params, state = params0, tx.init(params0)
    for _ in range(4):
      params, state, _, _ = step(params, state, jnp.float32(1.0), NO_POISON)
    before = state
    for _ in range(3):   # the same leaf is bad three times, one of them a refresh step
      poison = dict(NO_POISON, **{bad: True})
      old_params, old_state = params, state
      params, state, updates, _ = step(params, state, jnp.float32(1.0), poison)
      assert _all_finite(state) and _all_finite(updates), bad
      if bad == "b":   # AdamW leaf: the gradient's entries are zeroed, so m ← b1 · m
        mu = lambda st: kl_optax.adam_states(st)[0].mu["b"]
        np.testing.assert_allclose(mu(state), 0.9 * mu(old_state), rtol=1e-6)
      else:            # Kronecker leaf: only the decoupled weight decay, −lr · wd · W
        np.testing.assert_allclose(updates[bad], -1e-2 * 0.01 * old_params[bad], rtol=1e-6)
      for k in updates:
        if k != bad:
          assert float(jnp.abs(updates[k]).max()) > 0.0, (bad, k)
    # Counted per leaf for AdamW leaves, per stacked tensor for Kronecker ones.
    skips = kl_optax.nonfinite_skips(state)
    key = {"w": "6x5", "t": "2x3x4", "b": "['b']"}[bad]
    assert int(np.sum(skips[key])) == 3, skips
    assert all(int(np.sum(v)) == 0 for k, v in skips.items() if k != key), skips
    if bad != "b":   # the bad tensor's Kronecker state is exactly what it was
      sq = kl_optax.trees.squeezed_shape(params[bad].shape)
      for old, new in zip(_kron_groups(before), _kron_groups(state)):
        if tuple(f.shape[-1] for f in new.factors) == sq:
          for a, b in zip(old.factors + old.bases + old.eigvals,
                          new.factors + new.bases + new.eigvals):
            np.testing.assert_array_equal(a, b)
    # Training goes on: the bad leaf resumes when its gradient is finite again.
    params, state, updates, _ = step(params, state, jnp.float32(1.0), NO_POISON)
    assert float(jnp.abs(updates[bad]).max()) > 0.0, bad


def test_nonfinite_gradient_at_initialization():
  tx = make("kl_shampoo")
  params, loss = _problem()
  step = _stepper(tx, loss)
  state = tx.init(params)
  params, state, updates, _ = step(params, state, jnp.float32(1.0), dict(NO_POISON, w=True))
  assert _all_finite(state)
  for _ in range(10):
    params, state, updates, _ = step(params, state, jnp.float32(1.0), NO_POISON)
    assert _all_finite(state) and _all_finite(updates)


def test_apply_if_finite_still_composes():
  tx = optax.apply_if_finite(make("kl_shampoo"), max_consecutive_errors=2)
  params, loss = _problem()
  step = _stepper(tx, loss)
  state = tx.init(params)
  for _ in range(3):
    params, state, _, _ = step(params, state, jnp.float32(1.0), NO_POISON)
  before = state
  params, state, updates, _ = step(params, state, jnp.float32(1.0), dict(NO_POISON, b=True))
  assert int(state.notfinite_count) == 1 and not bool(state.last_finite)
  jax.tree.map(np.testing.assert_array_equal, state.inner_state, before.inner_state)
  jax.tree.map(lambda u: np.testing.assert_array_equal(u, 0.0), updates)


# ---------------------------------------------------------------- extreme gradients

SCENARIOS = {
    # name: (scale per step (steps not listed: 1), steps)
    "zeros": ({t: 0.0 for t in range(5, 45)}, 90),
    "tiny_1e-30": ({t: 1e-30 for t in range(10, 30)}, 80),
    "huge_1e30": ({t: 1e30 for t in range(10, 15)}, 80),
    "spike_1e6": ({10: 1e6}, 80),
}


# KL-Shampoo and Pro-KLShampoo whiten the momentum with the statistics of the
# previous step (ALGORITHMS.md §1, §5), so a sudden 1e6× gradient would make
# one step about 1e5× too long and enter the factor averages. The recipes'
# spike guard (kl_optax.spike_guard, on by default) scales such a gradient
# back to a few times its running norm before anything sees it.


def _episode(tx, step, params0, scales, steps):
  params, state = params0, tx.init(params0)
  losses = []
  for t in range(steps):
    params, state, updates, value = step(params, state, jnp.float32(scales.get(t, 1.0)),
                                         NO_POISON)
    assert _all_finite(state) and _all_finite(updates), t
    losses.append(float(value))
  # Recovered: within 50 steps of the episode's start the loss is back below
  # where it stood then, and it ends there.
  t0 = min(scales)
  back = [t - t0 for t in range(t0 + 1, steps) if losses[t] < losses[t0]]
  return bool(back) and back[0] <= 50 and losses[-1] < losses[t0], losses, state


@pytest.mark.parametrize("name", NAMES)
def test_extreme_gradients_keep_state_finite_and_training_recovers(name):
  params0, loss = _problem()
  # Each episode starts from a fresh state; the step is compiled once for all of them.
  tx = make(name)
  step = _stepper(tx, loss)
  for scenario, (scales, steps) in SCENARIOS.items():
    recovered, losses, state = _episode(tx, step, params0, scales, steps)
    assert recovered, (scenario, losses[min(scales)], losses[-1])
    clips = kl_optax.spike_clips(state, params0)
    if scenario in ("spike_1e6", "huge_1e30"):
      assert all(c >= 1 for c in clips.values()), (scenario, clips)
    else:
      assert not any(clips.values()), (scenario, clips)


def test_without_the_spike_guard_a_spike_derails_kl_shampoo():
  # What the guard is for: the same 1e6× spike with spike_threshold=None.
  params0, loss = _problem()
  tx = make("kl_shampoo", spike_threshold=None)
  recovered, losses, state = _episode(tx, _stepper(tx, loss), params0, *SCENARIOS["spike_1e6"])
  assert not recovered and losses[-1] > 100 * losses[10], losses[-1]
  assert kl_optax.spike_clips(state, params0) == {}


def test_spike_guard_passes_ordinary_gradients_bit_for_bit():
  tx = kl_optax.spike_guard()
  rng = np.random.default_rng(0)
  state = tx.init({"w": jnp.zeros((4, 3))})
  # A large first gradient (warm-up), then ordinary ones that vary by 3x.
  for t, scale in enumerate([50.0, 1.0, 1.0, 3.0, 1.0, 0.5, 2.0, 1.0, 3.0, 0.3]):
    g = {"w": jnp.asarray(scale * rng.normal(size=(4, 3)), jnp.float32)}
    out, state = tx.update(g, state)
    np.testing.assert_array_equal(out["w"], g["w"])
  assert state.clips.tolist() == [0]
  spike = {"w": jnp.full((4, 3), 1e6)}
  mean = float(state.sizes[0] / state.weight[0])     # the running (bias-corrected) max |g|
  out, state = tx.update(spike, state)
  assert kl_optax.spike_clips(state, spike) == {"['w']": 1}
  assert float(jnp.max(jnp.abs(out["w"]))) == pytest.approx(10.0 * mean, rel=1e-5)
  with pytest.raises(ValueError, match="spike threshold"):
    kl_optax.spike_guard(threshold=0.5)


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_params_and_gradients(name):
  final = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    params, loss = _problem(dtype)
    tx = make(name)
    step = _stepper(tx, loss)
    state = tx.init(params)
    for _ in range(40):
      params, state, updates, value = step(params, state, jnp.float32(1.0), NO_POISON)
      assert all(u.dtype == dtype for u in jax.tree.leaves(updates))
      assert _all_finite(state) and _all_finite(updates)
    assert all(p.dtype == dtype for p in jax.tree.leaves(params))
    final[dtype] = float(value)
  # bfloat16 training makes at least half the progress of float32 training.
  start = float(loss(_problem()[0]))
  assert start - final[jnp.bfloat16] >= 0.5 * (start - final[jnp.float32]), (start, final)


# ---------------------------------------------------------------- odd shapes

ODD = {
    "row": (1, 9), "column": (9, 1), "tall_thin": (4096, 2), "wide_thin": (2, 4096),
    "ones_inside": (1, 5, 1, 3), "order4": (3, 4, 2, 5), "scalar": (), "size1": (1,),
}
EXPECTED = {"row": "adam", "column": "adam", "tall_thin": "adam", "wide_thin": "adam",
            "ones_inside": "kron", "order4": "kron", "scalar": "adam", "size1": "adam"}


def test_odd_shapes_are_routed_as_documented():
  params = {k: jnp.zeros(s) for k, s in ODD.items()}
  assert kl_optax.kron_labels(params) == EXPECTED


@pytest.mark.parametrize("name", NAMES)
def test_odd_shapes_train(name):
  rng = np.random.default_rng(2)
  params = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in ODD.items()}
  tx = make(name)
  update = jax.jit(tx.update)
  state = tx.init(params)
  for t in range(7):
    grads = jax.tree.map(lambda p: p * (1.0 + t), params)
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    assert jax.tree.map(jnp.shape, updates) == jax.tree.map(jnp.shape, params)
    assert _all_finite(state) and _all_finite(updates)
  assert float(jnp.abs(updates["order4"]).max()) > 0.0


@pytest.mark.parametrize("name", NAMES)
def test_empty_pytree(name):
  tx = make(name)
  state = tx.init({})
  updates, state = jax.jit(tx.update)({}, state, {})
  assert updates == {}


# ---------------------------------------------------------------- failed refreshes


def _state_with_nan_factor():
  g = jnp.asarray(np.random.default_rng(3).normal(size=(4, 3)), jnp.float32)
  st = kl_optax.init_kron_state((4, 3), {"refreshes": jnp.zeros((2,), jnp.int32),
                                         "refresh_failures": jnp.zeros((2,), jnp.int32)})
  factors = (g @ g.T, jnp.full((3, 3), jnp.nan))
  bases = (jnp.eye(4), jnp.eye(3)[:, ::-1])
  return g, st._replace(factors=factors, bases=bases)


@pytest.mark.parametrize("part", [kl_optax.qr_basis_refresh(5), kl_optax.eigh_basis_refresh(5)],
                         ids=["qr", "eigh"])
def test_failed_refresh_keeps_the_basis_and_counts(part):
  g, st = _state_with_nan_factor()
  out = part.update(kl_optax.TensorStep(st, g, g, jnp.int32(5))).state
  np.testing.assert_array_equal(out.bases[1], st.bases[1])
  assert out.slots["refresh_failures"].tolist() == [0, 1]
  assert out.slots["refreshes"].tolist() == [1, 0]
  assert bool(jnp.all(jnp.isfinite(out.bases[0])))


def test_failed_qr_inside_a_recipe_keeps_training(monkeypatch):
  real = kron.qr_power_step
  monkeypatch.setattr(kron, "qr_power_step", lambda s, q: real(s, q) * jnp.nan)
  tx = make("kl_shampoo")
  params, loss = _problem()
  step = _stepper(tx, loss)
  state = tx.init(params)
  params, state, _, _ = step(params, state, jnp.float32(1.0), NO_POISON)
  bases = [b for g in _kron_groups(state) for b in g.bases]
  for _ in range(6):    # refreshes at t = 3 and 6 all fail
    params, state, updates, _ = step(params, state, jnp.float32(1.0), NO_POISON)
    assert _all_finite(state) and _all_finite(updates)
  for a, b in zip(bases, [b for g in _kron_groups(state) for b in g.bases]):
    np.testing.assert_array_equal(a, b)
  for g in _kron_groups(state):
    assert (np.asarray(g.slots["refresh_failures"]) == 2).all()
    assert (np.asarray(g.slots["refreshes"]) == 0).all()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_all_finite_agrees_with_isfinite(dtype):
  # The guard's check sums x·0; under jit, vmap and for values near the largest
  # float (whose sum would overflow) it answers as jnp.all(jnp.isfinite(x)).
  big = float(jnp.finfo(dtype).max)
  cases = [[1.0, 2.0], [1.0, jnp.nan], [jnp.inf, 1.0], [-jnp.inf, jnp.inf], [-jnp.inf, 0.0],
           [big, big], [-big, big]]
  xs = jnp.asarray(cases, dtype)
  want = [bool(jnp.all(jnp.isfinite(x))) for x in xs]
  assert want == [True, False, False, False, False, True, True]
  assert [bool(kl_optax.all_finite(x)) for x in xs] == want
  assert [bool(b) for b in jax.jit(jax.vmap(kl_optax.all_finite))(xs)] == want
  # Several arrays at once; integer arrays count as finite.
  check = jax.jit(kl_optax.all_finite)
  assert bool(check(xs[0], jnp.arange(3), xs[5]))
  assert not bool(check(xs[0], jnp.arange(3), xs[1]))
  assert bool(kl_optax.all_finite()) and bool(kl_optax.all_finite(jnp.arange(2)))


def test_values_parts_declare_finite_are_not_checked_again(monkeypatch):
  # Eigenvalue estimates and refreshed bases keep their previous values wherever
  # a new one is not finite, and say so (kl_optax.declare_finite): the guard
  # leaves them out of its check. Without the declarations every slot is checked.
  # Counted: the arrays the guard's check receives while the update is traced.
  params, grads = {"w": jnp.zeros((6, 5))}, {"w": jnp.ones((6, 5))}
  check = kl_optax.transform.all_finite

  def checked():
    seen = []
    monkeypatch.setattr(kl_optax.transform, "all_finite",
                        lambda *xs: seen.extend(xs) or check(*xs))
    tx = kl_optax.kl_shampoo(1e-2)
    jax.jit(tx.update).lower(grads, tx.init(params), params)
    return [x.shape for x in seen if jnp.issubdtype(x.dtype, jnp.inexact)]

  declared = checked()
  monkeypatch.setattr(kl_optax.parts, "declare_finite", lambda x, given=(): x)
  undeclared = checked()
  # Both modes' bases and both eigenvalue vectors, on both steps (the default
  # "spectrum" start falls back to a constant where its estimate is not finite).
  assert len(undeclared) - len(declared) >= 8, (declared, undeclared)


def test_only_the_declared_array_itself_escapes_the_check():
  # A part declares its slot finite given the stored slot. A later part turning
  # the slot into NaN makes a new array, which the guard checks; so is a value
  # declared finite given an array that is neither stored nor declared. Either
  # way the tensor skips the step and the slot keeps its value.
  def declare(step):
    v = step.state.slots["v"]
    return step._replace(state=step.state.with_slots(
        v=kl_optax.declare_finite(v + 1.0, given=[v])))

  def poison(step):
    return step._replace(state=step.state.with_slots(v=step.state.slots["v"] * jnp.nan))

  def declare_given_unchecked(step):
    bad = step.state.slots["v"] * jnp.nan
    return step._replace(state=step.state.with_slots(
        v=kl_optax.declare_finite(bad + 1.0, given=[bad])))

  slots = lambda shape: {"v": jnp.zeros(shape)}
  params = {"w": jnp.ones((4, 3))}
  for fns, skipped in [((declare,), 0), ((declare, poison), 1), ((declare_given_unchecked,), 1)]:
    tx = kl_optax.kron_transform(*[kl_optax.Part(update=f, init_slots=slots) for f in fns])
    state = tx.init(params)
    for _ in range(2):   # the initialization step, then a regular one
      _, state = jax.jit(tx.update)(params, state, params)
    (group,) = state.groups
    assert int(group.slots["nonfinite_skips"][0]) == skipped, fns
    assert bool(jnp.all(jnp.isfinite(group.slots["v"])))
    assert float(group.slots["v"][0, 0, 0]) == (0.0 if skipped else 1.0)


# ---------------------------------------------------------------- input validation

BAD_ARGS = [("b1", 1.0), ("b1", -0.1), ("b2", 1.0), ("b2", -0.5), ("eps", -1e-8),
            ("precondition_frequency", 0), ("block_size", 0)]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("arg,value", BAD_ARGS, ids=[f"{a}={v}" for a, v in BAD_ARGS])
def test_invalid_hyperparameters_name_the_argument(name, arg, value):
  with pytest.raises(ValueError, match=arg):
    kwargs = {"layout": kl_optax.Layout(**{arg: value})} if arg == "block_size" else {arg: value}
    make(name, **kwargs)


def test_invalid_rank_names_the_argument():
  with pytest.raises(ValueError, match="rank"):
    kl_optax.pro_kl_shampoo(1e-2, rank=0)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_], ids=["int32", "bool"])
def test_non_floating_leaves_name_the_path(name, dtype):
  params = {"layer": {"w": jnp.zeros((4, 3)), "bad": jnp.zeros((4, 3), dtype)}}
  with pytest.raises(TypeError, match=r"\['layer'\]\['bad'\]"):
    make(name).init(params)


@pytest.mark.parametrize("name", NAMES)
def test_complex_leaves_go_to_adamw(name):
  # A complex leaf cannot carry a (real) Kronecker factor; it is routed to the
  # AdamW fallback, which handles complex numbers, and trains as optax.adamw.
  z0 = (jnp.arange(12.0) - 5.0).reshape(4, 3) * (1 + 0.5j)
  params = {"w": jnp.ones((4, 3)), "z": z0.astype(jnp.complex64)}
  tx = make(name)
  ref = optax.adamw(1e-2, weight_decay=0.01)
  state, ref_state = tx.init(params), ref.init(params["z"])
  z = params["z"]
  for t in range(3):
    g = {"w": jnp.full((4, 3), 0.1 * (t + 1)),
         "z": (jnp.cos(jnp.arange(12.0) + t) + 1j * jnp.sin(2.0 * jnp.arange(12.0))).reshape(4, 3)
         .astype(jnp.complex64)}
    updates, state = tx.update(g, state, params)
    params = optax.apply_updates(params, updates)
    ref_u, ref_state = ref.update(g["z"], ref_state, z)
    z = optax.apply_updates(z, ref_u)
  assert params["z"].dtype == jnp.complex64
  np.testing.assert_allclose(params["z"], z, rtol=1e-6, atol=1e-7)
  assert float(jnp.abs(params["z"] - z0).max()) > 1e-3
  with pytest.raises(TypeError, match=r"\['z'\].*complex64"):
    RECIPES_PRECONDITIONERS[name]().init({"z": params["z"]})


@pytest.mark.parametrize("name", NAMES)
def test_mismatched_gradients_name_the_leaf(name):
  tx = make(name)
  params, _ = _problem()
  state = tx.init(params)
  with pytest.raises(ValueError, match=r"\['b'\]"):
    tx.update(dict(params, b=jnp.zeros((7,))), state, params)
  with pytest.raises(ValueError, match=r"\['w'\]"):
    tx.update(dict(params, w=jnp.zeros((6, 7))), state, params)
  with pytest.raises(ValueError, match=r"\['extra'\]"):
    tx.update(dict(params, extra=jnp.zeros((3,))), state, params)
