"""Each part on its own, against float64 formulas written from ALGORITHMS.md."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kl_optax
from reference import kron_all, kron_vec, unfold

SHAPES = [(4, 6), (3, 4, 5)]


def _random_state(shape, seed=0):
  """A state with random orthonormal bases, positive λ and SPD factors (float64)."""
  rng = np.random.default_rng(seed)
  q = [np.linalg.qr(rng.normal(size=(d, d)))[0] for d in shape]
  lam = [rng.uniform(0.05, 2.0, size=d) for d in shape]
  s = []
  for d in shape:
    a = rng.normal(size=(d, d))
    s.append(a @ a.T / d)
  mu = rng.normal(size=shape)
  return s, q, lam, mu


def _jax_state(s, q, lam, mu):
  f = lambda x: jnp.asarray(x, jnp.float32)
  return kl_optax.KronState(
      factors=tuple(map(f, s)), bases=tuple(map(f, q)), eigvals=tuple(map(f, lam)),
      slots={"mu": f(mu), "refreshes": jnp.zeros((len(s),), jnp.int32)})


def _step(state, g, count=1):
  g = jnp.asarray(g, jnp.float32)
  return kl_optax.TensorStep(state, g, g, jnp.asarray(count, jnp.int32))


def _increment(g, q, lam, k):
  """G_(k) (⊗_{j≠k} Q_j diag(λ_j)⁻¹ Q_jᵀ) G_(k)ᵀ / n_k, dense."""
  inv = [qq @ np.diag(1 / ll) @ qq.T for qq, ll in zip(q, lam)]
  others = kron_all([inv[j] for j in range(len(q)) if j != k])
  gk = unfold(g, k)
  return gk @ others @ gk.T / (g.size // g.shape[k])


@pytest.mark.parametrize("shape", SHAPES)
def test_momentum(shape):
  s, q, lam, mu = _random_state(shape)
  g = np.random.default_rng(5).normal(size=shape)
  for nesterov in (False, True):
    out = kl_optax.momentum(0.8, nesterov=nesterov)(_step(_jax_state(s, q, lam, mu), g))
    m = 0.8 * mu + 0.2 * g
    np.testing.assert_allclose(out.state.slots["mu"], m, rtol=1e-5, atol=1e-6)
    expected = 0.8 * m + 0.2 * g if nesterov else m
    np.testing.assert_allclose(out.update, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_whiten_is_inverse_sqrt_of_kronecker_factor(shape):
  s, q, lam, mu = _random_state(shape)
  eps = 1e-3
  out = kl_optax.whiten(eps)(_step(_jax_state(s, q, lam, mu), mu))
  # (⊗ Q) diag(1 / (sqrt(⊗ λ) + eps)) (⊗ Q)ᵀ vec(m)
  qk = kron_all(q)
  expected = qk @ ((qk.T @ mu.reshape(-1)) / (np.sqrt(kron_vec(lam)) + eps))
  np.testing.assert_allclose(np.asarray(out.update).reshape(-1), expected, rtol=1e-4, atol=1e-5)
  # With eps = 0 it is (⊗ Ŝ_k^{-1/2}) m exactly.
  out0 = kl_optax.whiten(0.0)(_step(_jax_state(s, q, lam, mu), mu))
  roots = kron_all([qq @ np.diag(ll ** -0.5) @ qq.T for qq, ll in zip(q, lam)])
  np.testing.assert_allclose(np.asarray(out0.update).reshape(-1), roots @ mu.reshape(-1),
                             rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_kl_factor_update(shape):
  s, q, lam, mu = _random_state(shape)
  g = np.random.default_rng(6).normal(size=shape)
  b2 = 0.9
  out = kl_optax.kl_factor_update(b2)(_step(_jax_state(s, q, lam, mu), g))
  for k in range(len(shape)):
    expected = b2 * s[k] + (1 - b2) * _increment(g, q, lam, k)
    np.testing.assert_allclose(out.state.factors[k], expected, rtol=1e-4, atol=1e-5)
  # Only the factors change.
  for a, b in zip(out.state.bases + out.state.eigvals, _jax_state(s, q, lam, mu).bases
                  + _jax_state(s, q, lam, mu).eigvals):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("shape", SHAPES)
def test_kl_factor_update_first_step(shape):
  g = np.random.default_rng(7).normal(size=shape)
  b2 = 0.9
  st = kl_optax.init_kron_state(shape)
  out = kl_optax.kl_factor_update(b2).first_update(_step(st, g, 0))
  for k in range(len(shape)):
    expected = (1 - b2) / (g.size // shape[k]) * unfold(g, k) @ unfold(g, k).T
    np.testing.assert_allclose(out.state.factors[k], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_ema_eigenvalues_uses_increment_diagonal_in_current_basis(shape):
  s, q, lam, mu = _random_state(shape)
  g = np.random.default_rng(8).normal(size=shape)
  b2 = 0.9
  out = kl_optax.ema_eigenvalues(b2, max_clamp=4000)(_step(_jax_state(s, q, lam, mu), g))
  for k, d in enumerate(shape):
    delta = np.diag(q[k].T @ _increment(g, q, lam, k) @ q[k])
    c = max(10, min(d, 4000))
    expected = np.maximum(b2 * lam[k] + (1 - b2) * delta, 1 / c**2)
    np.testing.assert_allclose(out.state.eigvals[k], expected, rtol=1e-4)
    # It is not the diagonal of QᵀSQ.
    assert not np.allclose(expected, b2 * lam[k] + (1 - b2) * np.diag(q[k].T @ s[k] @ q[k]))


def test_ema_eigenvalues_clamp_and_non_finite():
  shape = (12, 30)
  s, q, lam, mu = _random_state(shape)
  st = _jax_state(s, q, lam, mu)
  part = kl_optax.ema_eigenvalues(0.0, max_clamp=20)  # b2 = 0: λ is this step's δ
  out = part(_step(st, np.zeros(shape)))  # δ = 0: every λ sits on the floor
  np.testing.assert_allclose(out.state.eigvals[0], 1 / 12**2, rtol=1e-6)  # c = min(12, 20)
  np.testing.assert_allclose(out.state.eigvals[1], 1 / 20**2, rtol=1e-6)  # c = min(30, 20)
  g = np.ones(shape)
  g[0, 0] = np.nan
  out = part(_step(st, g))
  for new, old in zip(out.state.eigvals, st.eigvals):
    assert np.all(np.isfinite(new))
    # Entries touched by the NaN keep their previous value.
    np.testing.assert_array_equal(new, old)


def test_qr_basis_refresh_runs_only_on_refresh_steps():
  shape = (5, 7)
  s, q, lam, mu = _random_state(shape)
  st = _jax_state(s, q, lam, mu)
  part = kl_optax.qr_basis_refresh(4)
  for count in (1, 2, 3, 5):
    out = part(_step(st, np.zeros(shape), count))
    for a, b in zip(out.state.bases, st.bases):
      np.testing.assert_array_equal(a, b)
  out = part(_step(st, np.zeros(shape), 8))
  for k in range(2):
    expected = np.linalg.qr(s[k] @ q[k])[0]
    got = np.asarray(out.state.bases[k], np.float64)
    # Equal up to the signs of the columns.
    signs = np.sign(np.sum(got * expected, axis=0))
    np.testing.assert_allclose(got * signs, expected, atol=1e-4)
  np.testing.assert_array_equal(out.state.eigvals[0], st.eigvals[0])


def test_qr_basis_refresh_first_step_is_descending_eigh():
  shape = (5, 7)
  s, _, _, _ = _random_state(shape)
  st = kl_optax.init_kron_state(shape)._replace(
      factors=tuple(jnp.asarray(x, jnp.float32) for x in s))
  out = kl_optax.qr_basis_refresh(10).first_update(_step(st, np.zeros(shape), 0))
  for k in range(2):
    qk = np.asarray(out.state.bases[k], np.float64)
    w = np.diag(qk.T @ s[k] @ qk)
    assert np.all(np.diff(w) <= 1e-5)
    np.testing.assert_allclose(qk.T @ s[k] @ qk, np.diag(w), atol=1e-4)


def test_qr_basis_refresh_keeps_basis_when_not_finite():
  shape = (4, 4)
  s, q, lam, mu = _random_state(shape)
  s[0][1, 1] = np.inf
  st = _jax_state(s, q, lam, mu)
  out = kl_optax.qr_basis_refresh(1)(_step(st, np.zeros(shape), 1))
  np.testing.assert_array_equal(out.state.bases[0], st.bases[0])
  assert not np.array_equal(out.state.bases[1], st.bases[1])


def _hand_built(lr, wd, b1=0.9, b2=0.98, eps=1e-8, freq=10, init_factor="spectrum",
                max_clamp=4000):
  return optax.chain(
      kl_optax.kron_transform(
          kl_optax.momentum(b1),
          kl_optax.whiten(eps),
          kl_optax.kl_factor_update(b2),
          kl_optax.ema_eigenvalues(b2, init_factor=init_factor, max_clamp=max_clamp),
          kl_optax.qr_basis_refresh(freq),
      ),
      optax.add_decayed_weights(wd),
      optax.scale_by_learning_rate(lr),
  )


def test_hand_built_from_parts_equals_recipe():
  rng = np.random.default_rng(3)
  params = {"a": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(3, 1, 4, 5)), jnp.float32),
            "c": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)}
  recipe = kl_optax.kl_shampoo(0.03, weight_decay=0.01, precondition_frequency=3)
  hand = _hand_built(0.03, 0.01, freq=3)
  s_r, s_h = recipe.init(params), hand.init(params)
  p_r = p_h = params
  step_r, step_h = jax.jit(recipe.update), jax.jit(hand.update)
  for t in range(12):
    g = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32) + x, p_r)
    u_r, s_r = step_r(g, s_r, p_r)
    u_h, s_h = step_h(g, s_h, p_h)
    for k in params:
      np.testing.assert_allclose(u_r[k], u_h[k], rtol=1e-6, atol=1e-7)
    p_r, p_h = optax.apply_updates(p_r, u_r), optax.apply_updates(p_h, u_h)


def test_stacked_tensors_match_separate_runs():
  """Same-shape leaves are stacked; the result equals running each leaf alone."""
  rng = np.random.default_rng(4)
  tx = kl_optax.scale_by_kl_shampoo(precondition_frequency=2)
  tree = {"x": jnp.zeros((5, 3)), "y": jnp.zeros((5, 3)), "z": jnp.zeros((2, 3, 4))}
  state = tx.init(tree)
  assert len(state.groups) == 2 and state.groups[0].factors[0].shape == (2, 5, 5)
  singles = {k: tx.init(v) for k, v in tree.items()}
  for _ in range(6):
    g = {k: jnp.asarray(rng.normal(size=v.shape), jnp.float32) for k, v in tree.items()}
    u, state = tx.update(g, state)
    for k in tree:
      u_k, singles[k] = tx.update(g[k], singles[k])
      np.testing.assert_allclose(u[k], u_k, rtol=1e-5, atol=1e-6)


def test_slot_shape_conflict_is_an_error():
  bad = kl_optax.Part(update=lambda s: s, init_slots=lambda shape: {"mu": jnp.zeros(())})
  tx = kl_optax.kron_transform(kl_optax.momentum(0.9), bad)
  with pytest.raises(ValueError, match="slot 'mu'"):
    tx.init(jnp.zeros((3, 3)))


def test_non_part_argument_is_an_error():
  with pytest.raises(TypeError, match="argument 1"):
    kl_optax.kron_transform(kl_optax.momentum(0.9), lambda s: s)


def test_bfloat16_state_storage():
  """state_dtype stores momentum, factors and bases in bfloat16; λ and the math stay float32."""
  rng = np.random.default_rng(9)
  params = {"w": jnp.zeros((6, 5)), "t": jnp.zeros((2, 3, 4))}
  tx16 = kl_optax.scale_by_kl_shampoo(
      precondition_frequency=2, layout=kl_optax.Layout(state_dtype="bfloat16"))
  tx32 = kl_optax.scale_by_kl_shampoo(precondition_frequency=2)
  s16, s32 = tx16.init(params), tx32.init(params)
  update16, update32 = jax.jit(tx16.update), jax.jit(tx32.update)
  for t in range(7):
    g = {k: jnp.asarray(rng.normal(size=v.shape), jnp.float32) for k, v in params.items()}
    u16, s16 = update16(g, s16)
    u32, s32 = update32(g, s32)
    for k in params:
      assert u16[k].dtype == jnp.float32
      if t == 0:  # the initialization step returns zeros
        continue
      rel = float(jnp.linalg.norm(u16[k] - u32[k]) / jnp.linalg.norm(u32[k]))
      assert rel < 0.1, (k, rel)
  for group in s16.groups:
    assert all(x.dtype == jnp.bfloat16 for x in group.factors + group.bases)
    assert group.slots["mu"].dtype == jnp.bfloat16
    assert all(x.dtype == jnp.float32 for x in group.eigvals)
  with pytest.raises(ValueError, match="state_dtype"):
    kl_optax.Layout(state_dtype="int8")


@pytest.mark.parametrize("shape", SHAPES)
def test_adam_in_eigenbasis(shape):
  s, q, lam, mu = _random_state(shape)
  rng = np.random.default_rng(10)
  g = rng.normal(size=shape)
  m0, v0 = rng.normal(size=shape), rng.uniform(0.1, 1.0, size=shape)
  st = _jax_state(s, q, lam, mu)
  st = st._replace(slots=dict(st.slots, mu_eig=jnp.asarray(m0, jnp.float32),
                              nu_eig=jnp.asarray(v0, jnp.float32)))
  qk = kron_all(q)
  gt = (qk.T @ g.reshape(-1)).reshape(shape)
  m = 0.9 * m0 + 0.1 * gt
  v = 0.8 * v0 + 0.2 * gt**2
  for bias in (False, True):
    out = kl_optax.adam_in_eigenbasis(0.9, 0.8, 1e-3, bias_correction=bias)(_step(st, g, 3))
    np.testing.assert_allclose(out.state.slots["mu_eig"], m, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.state.slots["nu_eig"], v, rtol=1e-4, atol=1e-5)
    scale = np.sqrt(1 - 0.8**3) / (1 - 0.9**3) if bias else 1.0
    expected = scale * qk @ (m / (np.sqrt(v) + 1e-3)).reshape(-1)
    np.testing.assert_allclose(np.asarray(out.update).reshape(-1), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_shampoo_factor_update(shape):
  s, q, lam, mu = _random_state(shape)
  g = np.random.default_rng(11).normal(size=shape)
  out = kl_optax.shampoo_factor_update(0.9)(_step(_jax_state(s, q, lam, mu), g))
  first = kl_optax.shampoo_factor_update(0.9).first_update(_step(_jax_state(s, q, lam, mu), g, 0))
  for k in range(len(shape)):
    gram = unfold(g, k) @ unfold(g, k).T
    np.testing.assert_allclose(out.state.factors[k], 0.9 * s[k] + 0.1 * gram, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(first.state.factors[k], 0.1 * gram, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_inverse_root_with_exact_eigendecomposition(shape):
  s, _, _, mu = _random_state(shape)
  eig = [np.linalg.eigh(x) for x in s]
  st = _jax_state(s, [v for _, v in eig], [w for w, _ in eig], mu)
  out = kl_optax.inverse_root(1e-3)(_step(st, mu))
  p = 1 / (2 * len(shape))
  roots = kron_all([v @ np.diag((w + 1e-3) ** -p) @ v.T for w, v in eig])
  np.testing.assert_allclose(np.asarray(out.update).reshape(-1), roots @ mu.reshape(-1),
                             rtol=1e-4, atol=1e-5)


def test_adam_grafting_takes_adams_norm_and_keeps_the_direction():
  shape = (4, 6)
  s, q, lam, mu = _random_state(shape)
  rng = np.random.default_rng(12)
  g, u, nu0 = rng.normal(size=shape), rng.normal(size=shape), rng.uniform(0.5, 1, size=shape)
  st = _jax_state(s, q, lam, mu)
  st = st._replace(slots=dict(st.slots, nu_graft=jnp.asarray(nu0, jnp.float32)))
  step = kl_optax.TensorStep(st, jnp.asarray(g, jnp.float32), jnp.asarray(u, jnp.float32),
                             jnp.int32(4))
  out = kl_optax.adam_grafting(0.9, 1e-8)(step)
  nu = 0.9 * nu0 + 0.1 * g**2
  adam = g / (np.sqrt(nu / (1 - 0.9**4)) + 1e-8)
  np.testing.assert_allclose(out.update, u * np.linalg.norm(adam) / np.linalg.norm(u), rtol=1e-5)
  np.testing.assert_allclose(out.state.slots["nu_graft"], nu, rtol=1e-5)
  zero = kl_optax.adam_grafting(0.9)(step._replace(update=jnp.zeros(shape)))
  np.testing.assert_array_equal(zero.update, 0.0)


def test_eigenvalue_corrected_whiten():
  shape = (3, 4, 5)
  s, q, lam, mu = _random_state(shape)
  rng = np.random.default_rng(13)
  g, d0 = rng.normal(size=shape), rng.uniform(0.5, 1, size=shape)
  st = _jax_state(s, q, lam, mu)
  st = st._replace(slots=dict(st.slots, nu_eig=jnp.asarray(d0, jnp.float32)))
  step = kl_optax.TensorStep(st, jnp.asarray(g, jnp.float32), jnp.asarray(mu, jnp.float32),
                             jnp.int32(2))
  out = kl_optax.eigenvalue_corrected_whiten(0.9, 1e-3)(step)
  qk = kron_all(q)
  d = 0.9 * d0.reshape(-1) + 0.1 * (qk.T @ g.reshape(-1)) ** 2
  expected = qk @ ((qk.T @ mu.reshape(-1)) / (np.sqrt(d / (1 - 0.9**2)) + 1e-3))
  np.testing.assert_allclose(np.asarray(out.update).reshape(-1), expected, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out.state.slots["nu_eig"]).reshape(-1), d, rtol=1e-5)


def test_eigh_basis_refresh():
  shape = (5, 4)
  s, q, lam, mu = _random_state(shape)
  st = _jax_state(s, q, lam, mu)
  part = kl_optax.eigh_basis_refresh(3)
  same = part(_step(st, np.zeros(shape), 2))
  np.testing.assert_array_equal(same.state.bases[0], st.bases[0])
  out = part(_step(st, np.zeros(shape), 3))
  for k in range(2):
    w = np.linalg.eigvalsh(s[k])[::-1]
    np.testing.assert_allclose(out.state.eigvals[k], w, rtol=1e-4, atol=1e-5)
    qk = np.asarray(out.state.bases[k], np.float64)
    np.testing.assert_allclose(qk.T @ s[k] @ qk, np.diag(w), atol=1e-4)
  np.testing.assert_array_equal(out.state.slots["refreshes"], [1, 1])


def test_sorted_refresh_permutes_and_rotates_slots():
  """SOAP's refresh: columns sorted by diag(QᵀSQ), ṽ permuted, m̃ rotated into the new basis."""
  shape = (4, 5)
  s, q, lam, mu = _random_state(shape)
  rng = np.random.default_rng(14)
  m0, v0 = rng.normal(size=shape), rng.uniform(size=shape)
  st = _jax_state(s, q, lam, mu)
  st = st._replace(slots=dict(st.slots, mu_eig=jnp.asarray(m0, jnp.float32),
                              nu_eig=jnp.asarray(v0, jnp.float32)))
  part = kl_optax.qr_basis_refresh(1, sort=True, rotate_slots=("mu_eig",),
                                   permute_slots=("nu_eig",))
  out = part(_step(st, np.zeros(shape), 1))
  v = v0
  new_q = []
  for k in range(2):
    order = np.argsort(-np.diag(q[k].T @ s[k] @ q[k]))
    v = np.take(v, order, axis=k)
    new_q.append(np.linalg.qr(s[k] @ q[k][:, order])[0])
  np.testing.assert_allclose(out.state.slots["nu_eig"], v, rtol=1e-6)
  got = [np.asarray(b, np.float64) for b in out.state.bases]
  signs = [np.sign(np.sum(a * b, axis=0)) for a, b in zip(got, new_q)]
  for a, b, sg in zip(got, new_q, signs):
    np.testing.assert_allclose(a * sg, b, atol=1e-4)
  # m̃ rotated: P_new(Pᵀ_old(m̃)).
  m_orig = kron_all(q) @ m0.reshape(-1)
  expected = kron_all(got).T @ m_orig
  np.testing.assert_allclose(np.asarray(out.state.slots["mu_eig"]).reshape(-1), expected,
                             rtol=1e-4, atol=1e-5)


def _random_kl_state(shape, seed):
  rng = np.random.default_rng(seed)
  bases = tuple(np.linalg.qr(rng.normal(size=(d, d)))[0].astype(np.float32) for d in shape)
  factors = tuple((lambda a: (a @ a.T / d).astype(np.float32))(rng.normal(size=(d, d)))
                  for d in shape)
  eigvals = tuple(rng.uniform(0.05, 2.0, size=d).astype(np.float32) for d in shape)
  state = kl_optax.KronState(factors=tuple(map(jnp.asarray, factors)),
                             bases=tuple(map(jnp.asarray, bases)),
                             eigvals=tuple(map(jnp.asarray, eigvals)), slots={})
  return state, jnp.asarray(rng.normal(size=shape).astype(np.float32))


@pytest.mark.parametrize("shape", [(6, 9), (9, 6), (4, 3, 5)])
@pytest.mark.parametrize("damping, max_clamp", [(0.0, 4000), (1e-3, None)])
def test_kl_statistics_shares_products_and_equals_the_two_parts(shape, damping, max_clamp):
  state, g = _random_kl_state(shape, 0)
  step = kl_optax.TensorStep(state=state, grad=g, update=g, count=jnp.asarray(3))
  fused = kl_optax.kl_statistics(0.9, max_clamp=max_clamp, damping=damping).update(step).state
  apart = kl_optax.ema_eigenvalues(0.9, max_clamp=max_clamp, damping=damping).update(
      kl_optax.kl_factor_update(0.9).update(step)).state
  for a, b in zip(fused.factors + fused.eigvals, apart.factors + apart.eigvals):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-6)
  # Without shared products it is the two parts, exactly.
  plain = kl_optax.kl_statistics(0.9, max_clamp=max_clamp, damping=damping,
                                 shared_products=False).update(step).state
  for a, b in zip(plain.factors + plain.eigvals, apart.factors + apart.eigvals):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_kl_statistics_saves_one_projection_in_xla_flops():
  m, n = 64, 256

  def flops(*parts):
    tx = kl_optax.kron_transform(*parts)
    params = {"w": jnp.zeros((m, n))}
    state = tx.init(params)
    cost = jax.jit(tx.update).lower(params, state, params).compile().cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]

  apart = flops(kl_optax.kl_factor_update(0.9), kl_optax.ema_eigenvalues(0.9))
  fused = flops(kl_optax.kl_statistics(0.9))
  # Analytic: 6(m²n + mn²) apart, 4(m²n + mn²) + 2m²n fused: the saving is 2mn².
  assert apart - fused == pytest.approx(2 * m * n * n, rel=0.05), (apart, fused)


def test_cached_inverse_roots_give_the_eigenbasis_direction():
  # Shampoo's direction from the cached roots R_k equals the projection through the
  # eigenbasis (the part it replaces), through refreshes, for a matrix and a 3-tensor.
  def shampoo(direction, refresh):
    return kl_optax.kron_transform(direction, kl_optax.adam_grafting(0.99, 1e-8),
                                   kl_optax.momentum(0.9, bias_correction=True),
                                   kl_optax.shampoo_factor_update(0.99), refresh)

  old = shampoo(kl_optax.inverse_root(1e-6), kl_optax.eigh_basis_refresh(3))
  new = shampoo(kl_optax.cached_inverse_root(),
                kl_optax.eigh_basis_refresh(3, inverse_root_eps=1e-6))
  params = {"w": jnp.zeros((6, 5)), "t": jnp.zeros((4, 3, 2))}
  s_old, s_new = old.init(params), new.init(params)
  key = jax.random.PRNGKey(0)
  for t in range(13):   # t = 12 refreshes after its factor update
    g = jax.tree.map(lambda x, t=t: jax.random.normal(jax.random.fold_in(key, t), x.shape), params)
    u_old, s_old = old.update(g, s_old)
    u_new, s_new = new.update(g, s_new)
    for a, b in zip(jax.tree.leaves(u_old), jax.tree.leaves(u_new)):
      np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(a))))
  # The roots are (S + eps I)^{-1/4} of the refreshed factors, for a matrix.
  group = next(g for g in s_new.groups if g.factors[0].shape[1:] == (6, 6))
  s, root = np.asarray(group.factors[0][0], np.float64), np.asarray(group.slots["inverse_root_0"][0])
  w, v = np.linalg.eigh(s)
  np.testing.assert_allclose(root, (v * (np.maximum(w, 0) + 1e-6) ** -0.25) @ v.T, rtol=1e-3,
                             atol=1e-3 * np.abs(root).max())


def test_cached_inverse_roots_stay_float32_and_need_their_refresh():
  tx = kl_optax.kron_transform(
      kl_optax.cached_inverse_root(), kl_optax.shampoo_factor_update(0.99),
      kl_optax.eigh_basis_refresh(10, inverse_root_eps=1e-12), state_dtype=jnp.bfloat16)
  state = tx.init({"w": jnp.zeros((4, 3))})
  slots = state.groups[0].slots
  assert slots["inverse_root_0"].dtype == jnp.float32 and slots["inverse_root_1"].shape[1:] == (3, 3)
  assert state.groups[0].bases[0].dtype == jnp.bfloat16   # the rest follows the storage dtype
  lonely = kl_optax.kron_transform(kl_optax.cached_inverse_root(),
                                   kl_optax.shampoo_factor_update(0.99))
  g = {"w": jnp.ones((4, 3))}
  with pytest.raises(ValueError, match="inverse_root_0.*eigh_basis_refresh"):
    lonely.update(g, lonely.init(g))  # traced with the first update
  with pytest.raises(ValueError, match="inverse_root_exponent needs inverse_root_eps"):
    kl_optax.eigh_basis_refresh(10, inverse_root_exponent=0.25)
  with pytest.raises(ValueError, match="inverse_root_eps"):
    kl_optax.eigh_basis_refresh(10, inverse_root_eps=-1.0)
  # The initial roots match the initial Q = I, λ = 1; an initialization step skipped for an
  # overflowing gradient keeps them, so the next step still has a direction.
  np.testing.assert_allclose(slots["inverse_root_0"][0], np.eye(4) * (1 + 1e-12) ** -0.25)
  tx = kl_optax.scale_by_shampoo()
  huge = {"w": jnp.full((4, 3), 1e25)}
  s = tx.init(huge)
  _, s = tx.update(huge, s)                       # overflowing statistics: skipped
  u, _ = tx.update({"w": jnp.ones((4, 3))}, s)
  assert float(jnp.max(jnp.abs(u["w"]))) > 0


def test_spectrum_start_shares_the_bases_eigendecomposition():
  """On the initialization step the "spectrum" start and the starting basis decompose the
  same factor: one eigh per mode is compiled, and the start is still the rule's."""
  import re
  g = jax.random.normal(jax.random.PRNGKey(3), (6, 5))
  tx = kl_optax.scale_by_kl_shampoo()   # init_factor="spectrum"
  state = tx.init(g)
  hlo = jax.jit(tx.update).lower(g, state).compile().as_text()
  assert len(re.findall(r'custom_call_target="[a-z_]*syevd[a-z_]*"', hlo)) == 2   # one per mode
  _, state = tx.update(g, state)
  expected = kl_optax.initial_eigenvalues("spectrum", g)
  for got, want in zip(state.groups[0].eigvals, expected):
    np.testing.assert_allclose(got[0], want, rtol=1e-5)
  # Outside the initialization step nothing is shared: two calls, two decompositions.
  s = jnp.diag(jnp.array([2.0, 1.0]))
  assert kl_optax.kron.eigh_descending(s) is not kl_optax.kron.eigh_descending(s)


@pytest.mark.parametrize("rule", ["rms", "spectrum"])
def test_starting_estimates_fall_back_where_they_would_not_be_finite(rule):
  """A mode whose marginal moments are not finite (a failed eigh) starts at 0.1 while the
  other keeps the rule; a zero or non-finite gradient starts at 0.1 everywhere. The
  estimates are then finite by construction and declared so (the guard skips them)."""
  g = jax.random.normal(jax.random.PRNGKey(0), (4, 3))
  moments = [jnp.array([3.0, 2.0, 1.0, 0.5]), jnp.array([2.0, jnp.nan, 1.0])]
  good = kl_optax.parts.scaled_start(rule, g, [moments[0], jnp.array([2.0, 1.5, 1.0])])
  with kl_optax.state.declared_finite() as notes:
    lam = jax.jit(lambda g, m: kl_optax.parts.scaled_start(rule, g, m))(g, moments)
    traced = kl_optax.parts.scaled_start(rule, g, moments)
  np.testing.assert_array_equal(lam[0], good[0])
  want = good[1] if rule == "rms" else jnp.full(3, 0.1)   # "rms" does not read the moments
  np.testing.assert_array_equal(lam[1], want)
  assert [any(x is n for n, _ in notes) for x in traced] == [True, True]
  for bad in (jnp.zeros((4, 3)), g.at[0, 0].set(jnp.inf)):
    for x in kl_optax.parts.scaled_start(rule, bad, moments):
      np.testing.assert_array_equal(x, jnp.full(x.shape, 0.1))
