r"""The composable parts of Kronecker-factored optimizers.

Every optimizer in this package is a short sequence of *parts* run on one
preconditioned tensor at a time. A part is a pure function over an explicit,
documented per-tensor state:

* :class:`KronState` — the shared preconditioner state of one tensor ``G`` of
  shape ``(d_1, …, d_K)``: one factor ``S_k`` (``d_k × d_k``), one orthonormal
  basis ``Q_k`` and one vector of eigenvalue estimates ``λ_k`` per mode, plus
  named *slots* (momentum and other buffers that individual parts own).
* :class:`TensorStep` — what flows through the sequence during one optimizer
  step: the state, this step's gradient, the running update (the direction
  produced so far; it starts as the gradient) and the step number ``t``.
* :class:`Part` — a pure ``TensorStep -> TensorStep`` function for the steps
  ``t ≥ 1`` (``Part.update``, also reachable by calling the part), an optional
  function for the initialization step ``t = 0`` (``Part.first_update``) and the
  slots the part needs (``Part.init_slots``).

:func:`kl_optax.kron_transform` turns a sequence of parts into an
``optax.GradientTransformationExtraArgs``. It stacks same-shape tensors and runs
the parts under ``jax.vmap``, so a part is always written for a single tensor.

KL-Shampoo (``ALGORITHMS.md`` §1) is::

    kron_transform(
        momentum(b1),                    # m ← b1 m + (1−b1) G
        whiten(eps),                     # U = Pᵀ(P(m) ⊘ (sqrt(∏ λ) + eps))
        kl_factor_update(b2),            # S_k ← b2 S_k + (1−b2)/n_k G_(k) (⊗_{j≠k} Ŝ_j⁻¹) G_(k)ᵀ
        ema_eigenvalues(b2, init_factor=0.1, max_clamp=4000),
        qr_basis_refresh(10),            # Q_k ← qr(S_k Q_k).Q every 10 steps
    )

Order matters: parts read the state left by the previous part. Running
``kl_factor_update`` before ``ema_eigenvalues`` gives the Jacobi order of the
specification (both read the old ``Q`` and ``λ``); ``qr_basis_refresh`` comes
last so that it sees this step's factors.

All parts compute in float32; the wrapper casts stored state up before and
back down after the sequence.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from kl_optax import kron

__all__ = [
    "KronState",
    "Part",
    "TensorStep",
    "clamp_floor",
    "ema_eigenvalues",
    "init_kron_state",
    "kl_factor_update",
    "momentum",
    "qr_basis_refresh",
    "whiten",
]

Shape = tuple[int, ...]


class KronState(NamedTuple):
  """Preconditioner state of one tensor ``G`` of shape ``(d_1, …, d_K)``.

  Inside :func:`kl_optax.kron_transform` every field carries an extra leading
  axis: the stack of all preconditioned tensors that share this shape.

  Attributes:
    factors: ``S_k``, one symmetric ``(d_k, d_k)`` matrix per mode.
    bases: ``Q_k``, one ``(d_k, d_k)`` matrix with orthonormal columns per mode.
    eigvals: ``λ_k``, one ``(d_k,)`` vector per mode: the eigenvalue estimates
      of ``S_k`` in the basis ``Q_k``, as the optimizer currently knows them.
      ``Ŝ_k⁻¹ = Q_k diag(λ_k)⁻¹ Q_kᵀ``.
    slots: named buffers owned by individual parts (``'mu'``: momentum, …).
  """

  factors: tuple[jax.Array, ...]
  bases: tuple[jax.Array, ...]
  eigvals: tuple[jax.Array, ...]
  slots: dict[str, jax.Array]


class TensorStep(NamedTuple):
  """The values a part reads and returns during one step of one tensor.

  Attributes:
    state: the tensor's :class:`KronState` (float32).
    grad: this step's gradient, squeezed to the tensor's shape, float32.
    update: the running output of the sequence; starts equal to ``grad``.
    count: the step number ``t`` (int32 scalar): ``0`` on the initialization
      step, ``1`` on the first real update, and so on.
  """

  state: KronState
  grad: jax.Array
  update: jax.Array
  count: jax.Array


class Part(NamedTuple):
  """One building block of a Kronecker-factored optimizer.

  Attributes:
    update: ``TensorStep -> TensorStep`` for the steps ``t ≥ 1``.
    first_update: ``TensorStep -> TensorStep`` for the initialization step
      ``t = 0`` (``None``: the part does nothing then). The update returned by
      the whole sequence at ``t = 0`` is zero whatever this function does.
    init_slots: ``shape -> {name: array}``, the slots the part owns for a tensor
      of that shape (``None``: no slots).
    name: a short description, used in error messages.
  """

  update: Callable[[TensorStep], TensorStep]
  first_update: Callable[[TensorStep], TensorStep] | None = None
  init_slots: Callable[[Shape], dict[str, jax.Array]] | None = None
  name: str = "part"

  def __call__(self, step: TensorStep) -> TensorStep:
    return self.update(step)


def init_kron_state(
    shape: Shape, slots: Mapping[str, jax.Array] | None = None
) -> KronState:
  """The state of one tensor before its first update.

  Factors are zero, bases the identity and eigenvalue estimates one; the
  initialization step (``Part.first_update`` of the parts) replaces them.

  Example:
    >>> import kl_optax
    >>> st = kl_optax.init_kron_state((3, 4))
    >>> [s.shape for s in st.factors]
    [(3, 3), (4, 4)]
  """
  f32 = jnp.float32
  return KronState(
      factors=tuple(jnp.zeros((d, d), f32) for d in shape),
      bases=tuple(jnp.eye(d, dtype=f32) for d in shape),
      eigvals=tuple(jnp.ones((d,), f32) for d in shape),
      slots=dict(slots or {}),
  )


def _f32(x: Any) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


def _with_slot(state: KronState, name: str, value: jax.Array) -> KronState:
  slots = dict(state.slots)
  slots[name] = value
  return state._replace(slots=slots)


def _others_size(shape: Shape, k: int) -> int:
  """``n_k``: the product of all dims but the k-th."""
  n = 1
  for j, d in enumerate(shape):
    if j != k:
      n *= d
  return n


# ----------------------------------------------------------------------------
# Momentum
# ----------------------------------------------------------------------------


def momentum(b1: Any = 0.9, *, nesterov: bool = False, slot: str = "mu") -> Part:
  r"""Exponential moving average of the running update, kept in original coordinates.

  ``m ← b1 m + (1 − b1) u`` where ``u`` is the running update (the raw
  gradient when this part comes first); the update becomes ``m`` (or
  ``b1 m + (1 − b1) u`` with ``nesterov=True``). No bias correction. ``m``
  stays zero on the initialization step.

  Args:
    b1: keep factor of the average.
    nesterov: use the Nesterov form of the output.
    slot: name of the slot that stores ``m``.

  Returns:
    A :class:`Part` owning the slot ``slot`` (shape of the tensor).
  """

  def init_slots(shape):
    return {slot: jnp.zeros(shape, jnp.float32)}

  def update(step: TensorStep) -> TensorStep:
    beta = _f32(b1)
    mu = beta * step.state.slots[slot] + (1.0 - beta) * step.update
    out = beta * mu + (1.0 - beta) * step.update if nesterov else mu
    return step._replace(state=_with_slot(step.state, slot, mu), update=out)

  return Part(update=update, init_slots=init_slots, name=f"momentum({slot})")


# ----------------------------------------------------------------------------
# Direction
# ----------------------------------------------------------------------------


def whiten(eps: Any = 1e-8) -> Part:
  r"""KL-Shampoo's direction: ``U = Pᵀ( P(u) ⊘ D )`` with the current bases and eigenvalues.

  ``P(x) = x ×_1 Q_1ᵀ ×_2 Q_2ᵀ …`` projects into the Kronecker eigenbasis and
  ``D[i_1, …, i_K] = sqrt(∏_k λ_k[i_k]) + eps``: each factor is applied with
  exponent −1/2, so ``U = (⊗_k Ŝ_k^{-1/2}) u`` up to ``eps``.

  Args:
    eps: added to ``sqrt(∏ λ)`` (outside the square root).

  Returns:
    A :class:`Part` that replaces the running update by its whitened version.
  """

  def update(step: TensorStep) -> TensorStep:
    st = step.state
    d = kron.outer_product([jnp.sqrt(lam) for lam in st.eigvals]) + _f32(eps)
    u = kron.project_back(kron.project(step.update, st.bases) / d, st.bases)
    return step._replace(update=u)

  return Part(update=update, name="whiten")


# ----------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------


def _whitening_halves(state: KronState) -> list[jax.Array]:
  """``Λ_j^{-1/2} Q_jᵀ`` per mode: ``Ŝ_j⁻¹ = halfᵀ half``."""
  return [
      q.T * jax.lax.rsqrt(lam)[:, None] for q, lam in zip(state.bases, state.eigvals)
  ]


def kl_factor_update(b2: Any = 0.98) -> Part:
  r"""The KL factor update (``ALGORITHMS.md`` §1.3).

  For every mode ``k``, with the *current* bases and eigenvalues (Jacobi order):

  .. math::

     S_k \leftarrow b_2 S_k + \frac{1 - b_2}{n_k}
         G_{(k)} \Big(\bigotimes_{j \ne k} \hat S_j^{-1}\Big) G_{(k)}^\top,
     \qquad \hat S_j^{-1} = Q_j \operatorname{diag}(\lambda_j)^{-1} Q_j^\top,

  where ``n_k = N / d_k``. Each factor is whitened by all the others and
  divided by their size: the stationary point of
  ``KL(N(0, E[ggᵀ]) ‖ N(0, ⊗_k S_k))``.

  On the initialization step: ``S_k = (1 − b2)/n_k · G_(k) G_(k)ᵀ``.

  Args:
    b2: keep factor of the factor average.

  Returns:
    A :class:`Part` that writes ``state.factors``.
  """

  def first_update(step: TensorStep) -> TensorStep:
    g, shape = step.grad, step.grad.shape
    scale = 1.0 - _f32(b2)
    factors = tuple(
        scale / _others_size(shape, k) * kron.mode_gram(g, k)
        for k in range(g.ndim)
    )
    return step._replace(state=step.state._replace(factors=factors))

  def update(step: TensorStep) -> TensorStep:
    st, g = step.state, step.grad
    beta = _f32(b2)
    halves = _whitening_halves(st)
    factors = []
    for k, s in enumerate(st.factors):
      w = kron.other_modes_product(g, halves, skip=k)
      inc = kron.mode_gram(w, k) / _others_size(g.shape, k)
      factors.append(beta * s + (1.0 - beta) * inc)
    return step._replace(state=st._replace(factors=tuple(factors)))

  return Part(update=update, first_update=first_update, name="kl_factor_update")


def clamp_floor(dim: int, max_clamp: Any = 4000) -> jax.Array:
  """The eigenvalue floor ``1 / c²`` with ``c = max(10, min(dim, max_clamp))``."""
  c = jnp.maximum(10.0, jnp.minimum(_f32(dim), _f32(max_clamp)))
  return 1.0 / (c * c)


def ema_eigenvalues(
    b2: Any = 0.98, *, init_factor: Any = 0.1, max_clamp: Any = 4000
) -> Part:
  r"""Eigenvalue estimates as an average of the factor increment's diagonal in the current basis.

  With ``G̃ = P(G)`` (this gradient in the current basis) and the current
  ``λ`` (Jacobi order):

  .. math::

     \delta_k[i] = \frac{1}{n_k} \sum_{\text{all indices but } k,\ i_k = i}
         \frac{\tilde G^2}{\prod_{j \ne k} \lambda_j[i_j]},
     \qquad \lambda_k \leftarrow b_2 \lambda_k + (1 - b_2)\, \delta_k,

  then ``λ_k ← max(λ_k, 1/c_k²)`` with ``c_k = max(10, min(d_k, max_clamp))``.
  ``δ_k`` is ``diag(Q_kᵀ · increment_k · Q_k)`` for the increment of
  :func:`kl_factor_update` — not the diagonal of ``Q_kᵀ S_k Q_k``. A
  non-finite estimate is never stored: the entry keeps its previous value.

  On the initialization step: ``λ_k = init_factor``.

  Args:
    b2: keep factor of the average.
    init_factor: the initial eigenvalue estimate.
    max_clamp: upper limit of ``c_k`` in the eigenvalue floor.

  Returns:
    A :class:`Part` that writes ``state.eigvals``.
  """

  def first_update(step: TensorStep) -> TensorStep:
    eigvals = tuple(
        jnp.full_like(lam, _f32(init_factor)) for lam in step.state.eigvals
    )
    return step._replace(state=step.state._replace(eigvals=eigvals))

  def update(step: TensorStep) -> TensorStep:
    st, g = step.state, step.grad
    beta = _f32(b2)
    sq = jnp.square(kron.project(g, st.bases))
    inv = [1.0 / lam for lam in st.eigvals]
    eigvals = []
    for k, lam in enumerate(st.eigvals):
      weights = [v if j != k else jnp.ones_like(v) for j, v in enumerate(inv)]
      others = tuple(j for j in range(g.ndim) if j != k)
      delta = jnp.sum(sq * kron.outer_product(weights), axis=others)
      delta = delta / _others_size(g.shape, k)
      new = beta * lam + (1.0 - beta) * delta
      new = jnp.maximum(new, clamp_floor(g.shape[k], max_clamp))
      eigvals.append(jnp.where(jnp.isfinite(new), new, lam))
    return step._replace(state=st._replace(eigvals=tuple(eigvals)))

  return Part(update=update, first_update=first_update, name="ema_eigenvalues")


# ----------------------------------------------------------------------------
# Bases
# ----------------------------------------------------------------------------


def qr_basis_refresh(precondition_frequency: Any = 10) -> Part:
  r"""Keeps each basis ``Q_k`` close to the eigenvectors of its factor ``S_k``.

  On steps ``t`` with ``t mod precondition_frequency == 0``:
  ``Q_k ← qr(S_k Q_k).Q`` — one warm-started power step followed by a QR
  decomposition, in float32. The eigenvalue estimates are neither recomputed
  nor re-sorted. A basis whose refresh is not finite is kept.

  On the initialization step: ``Q_k`` = eigenvectors of ``S_k`` (``eigh`` in
  float32), columns in descending eigenvalue order.

  Args:
    precondition_frequency: refresh every this many steps (``t ≥ 1``).

  Returns:
    A :class:`Part` that writes ``state.bases``.
  """

  def first_update(step: TensorStep) -> TensorStep:
    bases = tuple(kron.eigh_descending(s)[1] for s in step.state.factors)
    return step._replace(state=step.state._replace(bases=bases))

  def refresh(factors, bases):
    new = []
    for s, q in zip(factors, bases):
      q_new = kron.qr_power_step(s, q)
      new.append(jnp.where(jnp.all(jnp.isfinite(q_new)), q_new, q))
    return tuple(new)

  def update(step: TensorStep) -> TensorStep:
    st = step.state
    due = (step.count % precondition_frequency) == 0
    bases = jax.lax.cond(due, refresh, lambda f, b: tuple(b), st.factors, st.bases)
    return step._replace(state=st._replace(bases=bases))

  return Part(update=update, first_update=first_update, name="qr_basis_refresh")
