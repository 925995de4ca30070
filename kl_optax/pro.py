r"""Pro-KLShampoo: one spike-and-flat factor, whitening recovered by orthogonalization.

``docs/math.md``, "Pro-KLShampoo" (a reconstruction from the paper's abstract and
KL-Shampoo's math). For a matrix ``G`` (``m × n`` once oriented so that the
restricted side is the column side) KL-Shampoo's right factor is restricted to

$$
\hat R = U \operatorname{diag}(\lambda) U^\top + \sigma (I - U U^\top),
\qquad U \in \mathbb{R}^{n \times r},\ U^\top U = I,
$$

a *spike* of ``r`` tracked directions and a *flat* remainder. Every power of
``R̂`` has the same form ([`spike_flat_apply`][kl_optax.pro.spike_flat_apply]), so no ``n × n`` matrix is
ever built. The left factor stays a dense KL-Shampoo factor.

The direction splits the momentum ``N`` into its part in the span of ``U``,
whitened from both sides exactly as KL-Shampoo would, and the complement
``X = N (I − UUᵀ)``, which is orthogonalized: with the one-sample left factor
``L = X Xᵀ / (σ n)``, KL whitening ``L^{-1/2} X σ^{-1/2}`` *is* ``√n · polar(X)``
(σ cancels), and Newton–Schulz computes the polar factor without any
decomposition.

State per restricted tensor, beside the dense left factor's ``S_a``, ``Q_a``,
``λ_a`` and the momentum: ``U`` (slot ``'spike_basis'``, ``n × r``), ``λ``
(``'spike_eigvals'``, ``r``), ``σ`` (``'flat'``, a scalar) and, optionally, the
subspace accumulator ``Y`` (``'spike_sketch'``, ``n × r``). The restricted
mode's dense factor, basis and eigenvalues in [`KronState`][kl_optax.state.KronState] are
one-row placeholders (``(1, n)``, ``(1,)``).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from kl_optax import kron
from kl_optax import parts as P
from kl_optax import validation
from kl_optax.newton_schulz import newton_schulz_coefficients, newton_schulz_orthogonalize
from kl_optax.parts import clamp_floor
from kl_optax.state import (
    FLAT,
    REFRESHES,
    SPIKE_BASIS,
    SPIKE_EIGVALS,
    SPIKE_SKETCH,
    KronState,
    Part,
    TensorStep,
    all_finite,
)

__all__ = [
    "SpikeFlat",
    "restricted_mode",
    "spike_flat_apply",
    "spike_flat_dense",
    "spike_flat_moment_match",
    "spike_flat_projection",
    "spike_flat_reexpress",
    "spike_flat_whiten",
]

_HI = kron.HIGHEST


def _f32(x: Any) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


def _mm(a, b):
  # The spike-and-flat products follow kron.matmul_settings (float32 at HIGHEST by default).
  if a.ndim == 2 and b.ndim == 2:
    return kron.matmul(a, b)
  return jnp.matmul(a, b, precision=_HI)


class SpikeFlat(NamedTuple):
  """``R̂ = U diag(λ) Uᵀ + σ (I − U Uᵀ)`` (``U``: ``n × r`` orthonormal columns)."""

  basis: jax.Array
  eigvals: jax.Array
  flat: jax.Array


def spike_flat_apply(x: jax.Array, sf: SpikeFlat, power: Any = 1.0) -> jax.Array:
  r"""``x R̂^p`` for ``x`` of shape ``(..., n)``, in ``O(n r)`` per row.

  ``R̂^p = U diag(λ^p) Uᵀ + σ^p (I − UUᵀ)``, so
  ``x R̂^p = (xU) diag(λ^p) Uᵀ + σ^p (x − (xU) Uᵀ)``.

  Examples:
    >>> import jax.numpy as jnp, kl_optax
    >>> sf = kl_optax.SpikeFlat(jnp.eye(4)[:, :1], jnp.array([4.0]), jnp.array(1.0))
    >>> kl_optax.spike_flat_apply(jnp.ones((1, 4)), sf, -0.5).tolist()
    [[0.5, 1.0, 1.0, 1.0]]
  """
  p = jnp.asarray(power, jnp.promote_types(sf.eigvals.dtype, jnp.float32))
  xu = _mm(x, sf.basis)
  spike = _mm(xu * jnp.power(sf.eigvals, p), sf.basis.T)
  return spike + jnp.power(sf.flat, p) * (x - _mm(xu, sf.basis.T))


def spike_flat_dense(sf: SpikeFlat) -> jax.Array:
  """The ``n × n`` matrix ``R̂`` (for tests and inspection; the optimizer never builds it)."""
  n = sf.basis.shape[0]
  return spike_flat_apply(jnp.eye(n, dtype=sf.basis.dtype), sf)


def spike_flat_moment_match(a: jax.Array, basis: jax.Array) -> SpikeFlat:
  r"""The member of the family closest to ``A`` in KL for a fixed ``U``.

  Minimizing ``KL(N(0, A) ‖ N(0, R̂))`` over ``λ`` and ``σ`` matches moments:
  ``λ = diag(Uᵀ A U)`` and ``σ = tr((I − UUᵀ) A) / (n − r)``, so that
  ``tr R̂ = tr A``.
  """
  n, r = basis.shape
  au = _mm(a, basis)
  lam = jnp.sum(basis * au, axis=0)
  sigma = (jnp.trace(a) - jnp.sum(lam)) / (n - r)
  return SpikeFlat(basis, lam, sigma)


def spike_flat_reexpress(sf: SpikeFlat, new_basis: jax.Array) -> SpikeFlat:
  r"""``R̂`` moment-matched onto a new basis, keeping the trace.

  With ``c = U_oldᵀ U_new``: ``λ_new,i = Σ_j c_ji² λ_j + σ (1 − Σ_j c_ji²)``
  (``= u_iᵀ R̂ u_i``) and ``σ_new = (tr R̂ − Σ λ_new) / (n − r)``.
  """
  n, r = sf.basis.shape
  c2 = jnp.square(_mm(sf.basis.T, new_basis))
  col = jnp.sum(c2, axis=0)
  lam = jnp.sum(c2 * sf.eigvals[:, None], axis=0) + sf.flat * (1.0 - col)
  trace = jnp.sum(sf.eigvals) + sf.flat * (n - r)
  sigma = (trace - jnp.sum(lam)) / (n - r)
  return SpikeFlat(new_basis, lam, sigma)


# ----------------------------------------------------------------------------
# Orientation
# ----------------------------------------------------------------------------

_SIDES = ("larger", "smaller", "rows", "columns")


def restricted_mode(shape: tuple[int, ...], side: str = "larger") -> int:
  """Which mode of a matrix of this shape carries the spike-and-flat factor.

  ``side``: ``"larger"`` (the default: the larger dim, the columns on a tie),
  ``"smaller"``, ``"rows"`` or ``"columns"``.
  """
  if side not in _SIDES:
    raise ValueError(f"restricted_side must be one of {_SIDES}, got {side!r}.")
  if len(shape) != 2:
    raise ValueError(f"a spike-and-flat factor needs a matrix, got shape {tuple(shape)}.")
  m, n = shape
  if side == "larger":
    return 1 if n >= m else 0
  if side == "smaller":
    return 1 if n < m else 0
  return 0 if side == "rows" else 1


def _orient(x: jax.Array, mode: int) -> jax.Array:
  """The working view ``m × n`` with the restricted side as columns."""
  return x if mode == 1 else x.T


def _spike_flat(state: KronState) -> SpikeFlat:
  s = state.slots
  return SpikeFlat(s[SPIKE_BASIS], s[SPIKE_EIGVALS], s[FLAT])


def _with_spike_flat(state: KronState, sf: SpikeFlat) -> KronState:
  return state.with_slots(**{SPIKE_BASIS: sf.basis, SPIKE_EIGVALS: sf.eigvals, FLAT: sf.flat})


def _check_rank(shape, mode, rank):
  n = shape[mode]
  if not 1 <= rank < n:
    raise ValueError(
        f"spike-and-flat factor of rank {rank} for a dim of size {n} (tensor shape "
        f"{tuple(shape)}): the rank must be ≥ 1 and below the restricted dim. The "
        "recipes give such tensors full KL-Shampoo factors.")


# ----------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------


def spike_flat_projection(
    rank: int = 128,
    b2: float = 0.98,
    precondition_frequency: int = 10,
    *,
    init_factor: float | str = 0.1,
    max_clamp: float | None = 4000,
    restricted_side: str = "larger",
    accumulate: bool = True,
) -> Part:
  r"""Pro-KLShampoo's statistics: a dense left factor and a spike-and-flat right factor.

  In the working orientation (``G`` is ``m × n`` with the restricted side
  as columns; see [`restricted_mode`][kl_optax.pro.restricted_mode]), with the *current* ``Q_a``,
  ``λ_a``, ``U``, ``λ``, ``σ`` (Jacobi order, as in KL-Shampoo):

  1. Left factor, with ``R̂⁻¹`` in closed form and ``Z = G U``:
     ``G R̂⁻¹ Gᵀ = Z diag(λ⁻¹) Zᵀ + σ⁻¹ (G Gᵀ − Z Zᵀ)``;
     ``S_a ← b2 S_a + (1 − b2)/n · G R̂⁻¹ Gᵀ`` and
     ``λ_a ← b2 λ_a + (1 − b2) diag(Q_aᵀ · G R̂⁻¹ Gᵀ/n · Q_a)``.
  2. Right factor by moment matching, ``W = diag(λ_a)^{-1/2} Q_aᵀ G``:
     ``λ ← b2 λ + (1 − b2) colsq(W U)/m`` and
     ``σ ← b2 σ + (1 − b2)(‖W‖_F² − ‖W U‖_F²)/(m (n − r))``.
  3. Subspace: ``Y ← b2 Y + (1 − b2) Wᵀ (W U)/m`` (a power step on the
     right factor's average). On steps with ``t mod precondition_frequency
     == 0``: ``U_new = qr(Y).Q``, ``λ`` and ``σ`` re-expressed in the new
     basis keeping the trace ([`spike_flat_reexpress`][kl_optax.pro.spike_flat_reexpress]), ``Y`` reset to
     ``U_new diag(λ_new)``. With ``accumulate=False`` no ``Y`` is stored and
     the refresh uses ``b2 U diag(λ) + (1 − b2) Wᵀ(WU)/m`` of that step
     (saving ``n r`` floats per tensor).

  Floors: ``λ_a ≥ 1/c_m²``, ``λ, σ ≥ 1/c_n²`` with ``c_d = max(10, min(d,
  max_clamp))``; a non-finite estimate or basis is never stored (the previous
  value is kept). The dense basis ``Q_a`` is refreshed by a following
  [`qr_basis_refresh`][kl_optax.parts.qr_basis_refresh], which skips the restricted mode; this
  part counts its own subspace refreshes in ``'refreshes'``.

  Initialization step: ``S_a = (1 − b2)/n · G Gᵀ``; ``U`` = the top-``r``
  right singular vectors of ``G`` (the top eigenvectors of ``GᵀG/m``, found
  from the ``m × m`` Gram matrix and completed by QR when ``r`` exceeds
  ``G``'s rank); ``λ_a = λ = σ = init_factor`` (or a rule's estimates from
  ``G``'s singular values, [`initial_eigenvalues`][kl_optax.parts.initial_eigenvalues]);
  ``Y = U diag(λ)``.

  Args:
    rank: ``r``, the number of tracked directions (static; ``1 ≤ r < n``).
    b2: keep factor of every average.
    precondition_frequency: subspace refresh every this many steps.
    init_factor: initial eigenvalue estimate of both factors: a positive
      number, ``"rms"`` or ``"spectrum"``.
    max_clamp: bound in the eigenvalue floors.
    restricted_side: which side of each matrix is restricted (see
      [`restricted_mode`][kl_optax.pro.restricted_mode]).
    accumulate: keep the subspace accumulator ``Y``.

  Returns:
    A [`Part`][kl_optax.state.Part] for matrices. It writes the dense mode's
    factor and eigenvalues and owns the slots named in the module docstring.
  """
  rank = validation.static_int(rank, "rank")
  restricted_mode((2, 2), restricted_side)  # validate the option now
  P.check_init_factor(init_factor)
  options = _ProjectionOptions(rank, b2, precondition_frequency, init_factor, max_clamp,
                               restricted_side, accumulate)
  return Part(update=functools.partial(_projection_update, options),
              first_update=functools.partial(_projection_first_update, options),
              init_slots=functools.partial(_projection_slots, options),
              init_state=functools.partial(_without_restricted_factor, options),
              name="spike_flat_projection")


class _ProjectionOptions(NamedTuple):
  rank: int
  b2: float
  precondition_frequency: int
  init_factor: float | str
  max_clamp: float | None
  restricted_side: str
  accumulate: bool

  def modes(self, shape) -> tuple[int, int]:
    """(restricted mode, dense mode) of a matrix of this shape."""
    mode = restricted_mode(tuple(shape), self.restricted_side)
    return mode, 1 - mode


def _projection_slots(options: _ProjectionOptions, shape) -> dict[str, jax.Array]:
  mode, _ = options.modes(shape)
  _check_rank(shape, mode, options.rank)
  n, rank, f32 = shape[mode], options.rank, jnp.float32
  slots = {
      SPIKE_BASIS: jnp.eye(n, rank, dtype=f32),
      SPIKE_EIGVALS: jnp.ones((rank,), f32),
      FLAT: jnp.ones((), f32),
      REFRESHES: jnp.zeros((2,), jnp.int32),
  }
  if options.accumulate:
    slots[SPIKE_SKETCH] = jnp.zeros((n, rank), f32)
  return slots


def _without_restricted_factor(options: _ProjectionOptions, state: KronState) -> KronState:
  """One-row placeholders for the restricted mode's dense factor, basis and eigenvalues.

  ``(1, n)`` (``(1,)`` for the eigenvalues) rather than empty: Orbax refuses
  to save zero-size arrays, and ``n`` floats per tensor cost nothing beside
  the ``n × r`` spike basis.
  """
  shape = tuple(f.shape[-1] for f in state.factors)
  mode, _ = options.modes(shape)
  n = shape[mode]
  factors, bases, eigvals = list(state.factors), list(state.bases), list(state.eigvals)
  factors[mode] = jnp.zeros((1, n), jnp.float32)
  bases[mode] = jnp.zeros((1, n), jnp.float32)
  eigvals[mode] = jnp.zeros((1,), jnp.float32)
  return state._replace(factors=tuple(factors), bases=tuple(bases), eigvals=tuple(eigvals))


def _with_dense_mode(state: KronState, dense: int, factor, eigvals) -> KronState:
  factors, lams = list(state.factors), list(state.eigvals)
  factors[dense], lams[dense] = factor, eigvals
  return state._replace(factors=tuple(factors), eigvals=tuple(lams))


def _top_right_singular_basis(g: jax.Array, gram: jax.Array, rank: int):
  """The top-``rank`` right singular vectors of ``g`` (``m × n``), from its ``m × m`` Gram.

  Completed by QR with unit vectors when ``rank`` exceeds ``m``. Also returns
  the Gram's eigenvalues (descending, the squared singular values).
  """
  m, n = g.shape
  w, v = kron.eigh_descending(gram)
  k = min(rank, m)
  top = _mm(g.T, v[:, :k])
  if k < rank:
    top = jnp.concatenate([top, jnp.eye(n, rank - k, dtype=top.dtype)], axis=1)
  return kron.qr_orthonormal(top), w


def _initial_estimates(init_factor, g, sq_singular, rank):
  """``λ_a`` (m,), ``λ`` (r,) and ``σ`` of the first step (``m × n`` working orientation).

  A number sets all three; the rules of [`kl_optax.parts.initial_eigenvalues`][kl_optax.parts.initial_eigenvalues]
  use the marginal moments: the left factor's ``s²/n``, the spike's top
  ``s²/m`` and the flat part's average of the remaining ``s²/m``.
  """
  m, n = g.shape
  if not isinstance(init_factor, str):
    init = _f32(init_factor)
    return jnp.full((m,), init), jnp.full((rank,), init), init
  s2 = jnp.maximum(sq_singular, 0.0)
  top = s2[:rank] if rank <= m else jnp.concatenate([s2, jnp.zeros((rank - m,), s2.dtype)])
  flat = jnp.maximum(jnp.sum(s2) - jnp.sum(top), 0.0) / (m * (n - rank))
  lam_a, lam, sigma = P.scaled_start(init_factor, g, [s2 / n, top / m, flat[None]], order=2)
  return lam_a, lam, sigma[0]


def _projection_first_update(options: _ProjectionOptions, step: TensorStep) -> TensorStep:
  mode, dense = options.modes(step.grad.shape)
  g = _orient(step.grad, mode)
  m, n = g.shape
  gram = _mm(g, g.T)
  basis, sq_singular = _top_right_singular_basis(g, gram, options.rank)
  lam_a, lam, sigma = _initial_estimates(options.init_factor, g, sq_singular, options.rank)
  sf = SpikeFlat(basis, lam, sigma)
  st = _with_dense_mode(step.state, dense, (1.0 - _f32(options.b2)) / n * gram, lam_a)
  st = _with_spike_flat(st, sf)
  if options.accumulate:
    st = st.with_slots(**{SPIKE_SKETCH: sf.basis * sf.eigvals})
  return step._replace(state=st)


def _left_factor_step(g, sf: SpikeFlat, s_a, qa, lam_a, beta, max_clamp):
  """Step 1: the dense factor and its eigenvalues, with ``R̂⁻¹`` in closed form.

  Returns the new ``S_a``, ``λ_a`` and ``Q_aᵀ G``, ``Q_aᵀ G U`` for step 2.
  """
  m, n = g.shape
  z = _mm(g, sf.basis)
  gram = _mm(g, g.T)
  zz = _mm(z, z.T)
  inc = (_mm(z / sf.eigvals, z.T) + (gram - zz) / sf.flat) / n
  ga = _mm(qa.T, g)
  za = _mm(ga, sf.basis)
  za2 = jnp.square(za)
  delta_a = (jnp.sum(za2 / sf.eigvals, axis=1)
             + (jnp.sum(jnp.square(ga), axis=1) - jnp.sum(za2, axis=1)) / sf.flat) / n
  new_lam_a = jnp.maximum(beta * lam_a + (1.0 - beta) * delta_a, clamp_floor(m, max_clamp))
  new_lam_a = jnp.where(jnp.isfinite(new_lam_a), new_lam_a, lam_a)
  new_s_a = beta * s_a + (1.0 - beta) * inc
  new_s_a = jnp.where(all_finite(new_s_a), new_s_a, s_a)
  return new_s_a, new_lam_a, ga, za


def _right_factor_step(ga, za, lam_a, sf: SpikeFlat, beta, rank, max_clamp):
  """Step 2: the spike-and-flat factor by moment matching, ``W = diag(λ_a)^{-1/2} Q_aᵀ G``.

  Returns the new ``λ``, ``σ`` and ``W``, ``W U`` for step 3.
  """
  m, n = ga.shape
  inv_sqrt = jax.lax.rsqrt(lam_a)[:, None]
  w = ga * inv_sqrt
  wu = za * inv_sqrt
  w_sq = jnp.sum(jnp.square(w))
  wu_col = jnp.sum(jnp.square(wu), axis=0)
  floor_n = clamp_floor(n, max_clamp)
  lam = jnp.maximum(beta * sf.eigvals + (1.0 - beta) * wu_col / m, floor_n)
  sigma = beta * sf.flat + (1.0 - beta) * (w_sq - jnp.sum(wu_col)) / (m * (n - rank))
  sigma = jnp.maximum(sigma, floor_n)
  lam = jnp.where(jnp.isfinite(lam), lam, sf.eigvals)
  sigma = jnp.where(jnp.isfinite(sigma), sigma, sf.flat)
  return lam, sigma, w, wu


def _subspace_step(w, wu, sf: SpikeFlat, sketch, beta):
  """Step 3: the subspace accumulator, a power step ``Wᵀ(WU)/m`` on the current ``U``.

  ``sketch`` is the stored ``Y`` (``None`` without accumulation: the step's own
  ``b2 U diag(λ) + (1 − b2) Wᵀ(WU)/m`` is returned).
  """
  power = _mm(w.T, wu) / w.shape[0]
  if sketch is None:
    return beta * sf.basis * sf.eigvals + (1.0 - beta) * power
  new = beta * sketch + (1.0 - beta) * power
  return jnp.where(all_finite(new), new, sketch)


def _refresh_subspace(options: _ProjectionOptions, st: KronState, sketch) -> KronState:
  """Step 4 (every ``precondition_frequency`` steps): ``U_new = qr(Y).Q``, ``λ``, ``σ`` re-expressed."""
  sf = _spike_flat(st)
  new = spike_flat_reexpress(sf, kron.qr_orthonormal(sketch))
  floor = clamp_floor(sf.basis.shape[0], options.max_clamp)
  new = new._replace(eigvals=jnp.maximum(new.eigvals, floor), flat=jnp.maximum(new.flat, floor))
  ok = all_finite(new.basis, new.eigvals, new.flat)
  new = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, sf)
  st = _with_spike_flat(st, new)
  if options.accumulate:
    st = st.with_slots(**{SPIKE_SKETCH: new.basis * new.eigvals})
  mode, _ = options.modes(tuple(f.shape[-1] for f in st.factors))
  bump = jnp.zeros((2,), jnp.int32).at[mode].set(ok.astype(jnp.int32))
  return st.with_slots(**{REFRESHES: st.slots[REFRESHES] + bump})


def _projection_update(options: _ProjectionOptions, step: TensorStep) -> TensorStep:
  """Steps 1–4 with the current ``Q_a``, ``λ_a``, ``U``, ``λ``, ``σ`` (Jacobi order)."""
  st = step.state
  mode, dense = options.modes(step.grad.shape)
  g = _orient(step.grad, mode)
  beta = _f32(options.b2)
  sf = _spike_flat(st)
  lam_a = st.eigvals[dense]
  s_a, new_lam_a, ga, za = _left_factor_step(
      g, sf, st.factors[dense], st.bases[dense], lam_a, beta, options.max_clamp)
  lam, sigma, w, wu = _right_factor_step(ga, za, lam_a, sf, beta, options.rank,
                                         options.max_clamp)
  sketch = _subspace_step(w, wu, sf, st.slots[SPIKE_SKETCH] if options.accumulate else None,
                          beta)
  st = _with_spike_flat(_with_dense_mode(st, dense, s_a, new_lam_a),
                        SpikeFlat(sf.basis, lam, sigma))
  if options.accumulate:
    st = st.with_slots(**{SPIKE_SKETCH: sketch})
  due = (step.count % options.precondition_frequency) == 0
  st = jax.lax.cond(due, lambda a: _refresh_subspace(options, *a), lambda a: a[0], (st, sketch))
  return step._replace(state=st)


# ----------------------------------------------------------------------------
# Direction
# ----------------------------------------------------------------------------

_COMPLEMENT_SCALES = ("sqrt_n", "sqrt_complement", "muon")


def complement_scale_value(complement_scale: float | None, m: int, n: int, rank: int) -> Any:
  """``κ`` for an ``m × n`` working matrix: ``None``/``"sqrt_n"`` → ``√n``,
  ``"sqrt_complement"`` → ``√(n − r)``, ``"muon"`` → ``√max(1, m/n)``, a number → itself."""
  if complement_scale is None or complement_scale == "sqrt_n":
    return float(n) ** 0.5
  if isinstance(complement_scale, str):
    if complement_scale == "sqrt_complement":
      return float(n - rank) ** 0.5
    if complement_scale == "muon":
      return max(1.0, m / n) ** 0.5
    raise ValueError(
        f"complement_scale must be None, a number or one of {_COMPLEMENT_SCALES}, "
        f"got {complement_scale!r}.")
  return complement_scale


def spike_flat_whiten(
    eps: float = 1e-8,
    *,
    complement_scale: float | None = None,
    ns_steps: int = 5,
    ns_coefficients: str | tuple[float, float, float] = "muon",
    ns_dtype: jax.typing.DTypeLike | None = None,
    restricted_side: str = "larger",
) -> Part:
  r"""Pro-KLShampoo's direction from the running update ``N`` (the momentum).

  In the working orientation (``m × n``, restricted side as columns):

  * split ``C = N U``, ``X = N − C Uᵀ``;
  * subspace part, whitened from both sides as in KL-Shampoo:
    ``Δ∥ = Q_a [ (Q_aᵀ C) ⊘ (sqrt(λ_a λᵀ) + eps) ] Uᵀ``;
  * complement part, orthogonalized: ``Δ⊥ = κ · NS(X)``, re-projected
    ``Δ⊥ ← Δ⊥ − (Δ⊥ U) Uᵀ`` (Newton–Schulz is only approximately
    range-preserving);
  * ``Δ = Δ∥ + Δ⊥``.

  ``κ`` (``complement_scale``): ``None`` or ``"sqrt_n"`` gives ``√n``, the
  scale at which ``κ · polar(X)`` equals KL whitening of ``X`` with a
  one-sample left factor; ``"sqrt_complement"`` gives ``√(n − r)``,
  ``"muon"`` Muon's ``√max(1, m/n)``; a number is used as is.

  Args:
    eps: added to ``sqrt(λ_a λᵀ)``.
    complement_scale: ``κ``, see above.
    ns_steps: Newton–Schulz iterations.
    ns_coefficients: see [`kl_optax.newton_schulz_orthogonalize`][kl_optax.newton_schulz.newton_schulz_orthogonalize].
    ns_dtype: Newton–Schulz iteration dtype (``None``: float32).
    restricted_side: as in [`spike_flat_projection`][kl_optax.pro.spike_flat_projection] (use the same).

  Returns:
    A [`Part`][kl_optax.state.Part] that replaces the running update.
  """
  newton_schulz_coefficients(ns_coefficients, ns_steps)
  if isinstance(complement_scale, str):
    complement_scale_value(complement_scale, 1, 2, 1)  # validate the name now

  def update(step: TensorStep) -> TensorStep:
    st = step.state
    mode = restricted_mode(step.update.shape, restricted_side)
    dense = 1 - mode
    x_full = _orient(step.update, mode)
    m, n = x_full.shape
    sf = _spike_flat(st)
    rank = sf.basis.shape[1]
    qa, lam_a = st.bases[dense], st.eigvals[dense]
    c = _mm(x_full, sf.basis)
    x = x_full - _mm(c, sf.basis.T)
    d = jnp.sqrt(lam_a[:, None] * sf.eigvals[None, :]) + _f32(eps)
    par = _mm(_mm(qa, _mm(qa.T, c) / d), sf.basis.T)
    kappa = _f32(complement_scale_value(complement_scale, m, n, rank))
    perp = kappa * newton_schulz_orthogonalize(
        x, steps=ns_steps, coefficients=ns_coefficients, dtype=ns_dtype).astype(jnp.float32)
    perp = perp - _mm(_mm(perp, sf.basis), sf.basis.T)
    out = par + perp
    return step._replace(update=_orient(out, mode))

  return Part(update=update, name="spike_flat_whiten")
