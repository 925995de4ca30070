r"""The composable parts of Kronecker-factored optimizers.

Every optimizer in this package is a short sequence of *parts* run on one
preconditioned tensor at a time. A part is a pure function over an explicit,
documented per-tensor state:

* [`KronState`][kl_optax.state.KronState] — the shared preconditioner state of one tensor ``G`` of
  shape ``(d_1, …, d_K)``: one factor ``S_k`` (``d_k × d_k``), one orthonormal
  basis ``Q_k`` and one vector of eigenvalue estimates ``λ_k`` per mode, plus
  named *slots* (momentum and other buffers that individual parts own).
* [`TensorStep`][kl_optax.state.TensorStep] — what flows through the sequence during one optimizer
  step: the state, this step's gradient, the running update (the direction
  produced so far; it starts as the gradient) and the step number ``t``.
* [`Part`][kl_optax.state.Part] — a pure ``TensorStep -> TensorStep`` function for the steps
  ``t ≥ 1`` (``Part.update``, also reachable by calling the part), an optional
  function for the initialization step ``t = 0`` (``Part.first_update``) and the
  slots the part needs (``Part.init_slots``).

[`kl_optax.kron_transform`][kl_optax.transform.kron_transform] turns a sequence of parts into an
``optax.GradientTransformationExtraArgs``. It stacks same-shape tensors and runs
the parts under ``jax.vmap``, so a part is always written for a single tensor.

KL-Shampoo (``docs/math.md``, "KL-Shampoo") is:

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
back down after the sequence. The state types are in [`kl_optax.state`][kl_optax.state],
with the names of the slots the parts own.
"""

from __future__ import annotations

import functools

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from kl_optax import kron
from kl_optax import validation
from kl_optax.state import (
    INVERSE_ROOT,
    MU,
    MU_EIG,
    NU_EIG,
    NU_GRAFT,
    REFRESH_FAILURES,
    REFRESHES,
    KronState,
    Part,
    Shape,
    TensorStep,
    all_finite,
    declare_finite,
)

__all__ = [
    "adam_grafting",
    "adam_in_eigenbasis",
    "cached_inverse_root",
    "clamp_floor",
    "eigenvalue_corrected_whiten",
    "eigh_basis_refresh",
    "ema_eigenvalues",
    "inverse_root",
    "kl_factor_update",
    "kl_statistics",
    "momentum",
    "off_diagonal_ratio",
    "qr_basis_refresh",
    "rms_normalize",
    "shampoo_factor_update",
    "whiten",
]

def _f32(x: Any) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


def _zero_slots(*names: str) -> Callable[[Shape], dict[str, jax.Array]]:
  """``init_slots`` for parts whose slots are float32 zeros of the tensor's shape."""
  return lambda shape: {name: jnp.zeros(shape, jnp.float32) for name in names}


def _debias(beta: jax.Array, count: jax.Array) -> jax.Array:
  """``1 − beta^t``, the bias correction of an average started at zero."""
  return 1.0 - jnp.power(beta, count.astype(jnp.float32))


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


def momentum(
    b1: float = 0.9, *, nesterov: bool = False, bias_correction: bool = False,
    slot: str = MU,
) -> Part:
  r"""Exponential moving average of the running update, kept in original coordinates.

  ``m ← b1 m + (1 − b1) u`` where ``u`` is the running update (the raw
  gradient when this part comes first); the update becomes ``m`` (or
  ``b1 m + (1 − b1) u`` with ``nesterov=True``), divided by ``1 − b1^t`` with
  ``bias_correction=True``. ``m`` stays zero on the initialization step.

  Args:
    b1: keep factor of the average.
    nesterov: use the Nesterov form of the output.
    bias_correction: divide the output by ``1 − b1^t``.
    slot: name of the slot that stores ``m``.

  Returns:
    A [`Part`][kl_optax.state.Part] owning the slot ``slot`` (shape of the tensor).
  """

  def update(step: TensorStep) -> TensorStep:
    beta = _f32(b1)
    mu = beta * step.state.slots[slot] + (1.0 - beta) * step.update
    out = beta * mu + (1.0 - beta) * step.update if nesterov else mu
    if bias_correction:
      out = out / _debias(beta, step.count)
    return step._replace(state=step.state.with_slots(**{slot: mu}), update=out)

  return Part(update=update, init_slots=_zero_slots(slot), name=f"momentum({slot})")


# ----------------------------------------------------------------------------
# Direction
# ----------------------------------------------------------------------------


def whiten(eps: float = 1e-8) -> Part:
  r"""KL-Shampoo's direction: ``U = Pᵀ( P(u) ⊘ D )`` with the current bases and eigenvalues.

  ``P(x) = x ×_1 Q_1ᵀ ×_2 Q_2ᵀ …`` projects into the Kronecker eigenbasis and
  ``D[i_1, …, i_K] = sqrt(∏_k λ_k[i_k]) + eps``: each factor is applied with
  exponent −1/2, so ``U = (⊗_k Ŝ_k^{-1/2}) u`` up to ``eps``.

  Args:
    eps: added to ``sqrt(∏ λ)`` (outside the square root).

  Returns:
    A [`Part`][kl_optax.state.Part] that replaces the running update by its whitened version.
  """

  def update(step: TensorStep) -> TensorStep:
    st = step.state
    d = kron.outer_product([jnp.sqrt(lam) for lam in st.eigvals]) + _f32(eps)
    u = kron.project_back(kron.project(step.update, st.bases) / d, st.bases)
    return step._replace(update=u)

  return Part(update=update, name="whiten")


def adam_in_eigenbasis(
    b1: float = 0.9,
    b2: float = 0.98,
    eps: float = 1e-8,
    *,
    bias_correction: bool = False,
    mu_slot: str = MU_EIG,
    nu_slot: str = NU_EIG,
) -> Part:
  r"""Adam run in the Kronecker eigenbasis (the direction of SOAP and KL-SOAP).

  With ``G̃ = P(u)`` (the running update in the current basis):

  $$
  \tilde m \leftarrow b_1 \tilde m + (1 - b_1) \tilde G, \qquad
  \tilde v \leftarrow b_2 \tilde v + (1 - b_2) \tilde G^2, \qquad
  U = c_t\, P^\top\big(\tilde m \oslash (\sqrt{\tilde v} + \epsilon)\big),
  $$

  where ``c_t = 1`` or, with ``bias_correction=True``,
  ``c_t = sqrt(1 − b2^t) / (1 − b1^t)`` (the step-size form of SOAP's code, in
  which ``eps`` is not rescaled). Both moments live in the eigenbasis; pair
  with ``qr_basis_refresh(rotate_slots=(mu_slot,))`` to carry ``m̃`` into a new
  basis.

  Args:
    b1: keep factor of the first moment.
    b2: keep factor of the second moment.
    eps: added to ``sqrt(ṽ)``.
    bias_correction: apply Adam's bias corrections.
    mu_slot: slot of ``m̃``.
    nu_slot: slot of ``ṽ``.

  Returns:
    A [`Part`][kl_optax.state.Part] owning the two slots (shape of the tensor).
  """

  def update(step: TensorStep) -> TensorStep:
    st = step.state
    beta1, beta2 = _f32(b1), _f32(b2)
    g = kron.project(step.update, st.bases)
    mu = beta1 * st.slots[mu_slot] + (1.0 - beta1) * g
    nu = beta2 * st.slots[nu_slot] + (1.0 - beta2) * jnp.square(g)
    u = kron.project_back(mu / (jnp.sqrt(nu) + _f32(eps)), st.bases)
    if bias_correction:
      u = u * (jnp.sqrt(_debias(beta2, step.count)) / _debias(beta1, step.count))
    state = st.with_slots(**{mu_slot: mu, nu_slot: nu})
    return step._replace(state=state, update=u)

  return Part(update=update, init_slots=_zero_slots(mu_slot, nu_slot), name="adam_in_eigenbasis")


def eigenvalue_corrected_whiten(
    b2: float = 0.95, eps: float = 1e-8, *, bias_correction: bool = True, slot: str = NU_EIG
) -> Part:
  r"""EShampoo's direction: the running update divided by corrected eigenvalues.

  ``D`` is a per-entry second moment of this step's gradient in the current
  basis, ``D ← b2 D + (1 − b2) P(G)²`` (never rotated when the basis changes),
  and ``U = Pᵀ( P(u) ⊘ (sqrt(D̂) + eps) )`` with ``D̂ = D / (1 − b2^t)`` when
  ``bias_correction`` (else ``D̂ = D``). ``u`` is the running update (the
  momentum, in original coordinates, when a [`momentum`][kl_optax.parts.momentum] part precedes).

  Args:
    b2: keep factor of ``D``.
    eps: added to ``sqrt(D̂)``.
    bias_correction: divide ``D`` by ``1 − b2^t``.
    slot: slot of ``D``.

  Returns:
    A [`Part`][kl_optax.state.Part] owning the slot ``slot`` (shape of the tensor).
  """

  def update(step: TensorStep) -> TensorStep:
    st = step.state
    beta = _f32(b2)
    d = beta * st.slots[slot] + (1.0 - beta) * jnp.square(kron.project(step.grad, st.bases))
    d_hat = d / _debias(beta, step.count) if bias_correction else d
    u = kron.project_back(
        kron.project(step.update, st.bases) / (jnp.sqrt(d_hat) + _f32(eps)), st.bases)
    return step._replace(state=st.with_slots(**{slot: d}), update=u)

  return Part(update=update, init_slots=_zero_slots(slot), name="eigenvalue_corrected_whiten")


def inverse_root(eps: float = 1e-12, *, exponent: Any = None) -> Part:
  r"""Shampoo's direction: ``U = (⊗_k (S_k + eps I)^{-p}) u`` through the eigenbasis.

  Uses the current bases and eigenvalue estimates (an exact eigendecomposition
  when paired with [`eigh_basis_refresh`][kl_optax.parts.eigh_basis_refresh]):
  ``U = Pᵀ( P(u) ⊘ ∏_k (λ_k + eps)^p )`` with ``p = 1/(2K)`` by default, so
  that ``⊗_k S_k`` as a whole is applied with exponent −1/2.

  Args:
    eps: added to every eigenvalue.
    exponent: ``p``; ``None`` means ``1 / (2K)`` for a tensor of order ``K``.

  Returns:
    A [`Part`][kl_optax.state.Part] that replaces the running update.
  """

  def update(step: TensorStep) -> TensorStep:
    st = step.state
    p = 1.0 / (2 * len(st.eigvals)) if exponent is None else _f32(exponent)
    d = kron.outer_product([jnp.power(jnp.maximum(lam, 0.0) + _f32(eps), p) for lam in st.eigvals])
    u = kron.project_back(kron.project(step.update, st.bases) / d, st.bases)
    return step._replace(update=u)

  return Part(update=update, name="inverse_root")


def _inverse_root_slot(mode: int) -> str:
  return f"{INVERSE_ROOT}_{mode}"


def _inverse_root_scale(lam: jax.Array, eps: float, p: float) -> jax.Array:
  """``(max(λ, 0) + eps)^{-p}``."""
  return jnp.power(jnp.maximum(lam, 0.0) + _f32(eps), -_f32(p))


def _inverse_root_matrix(q: jax.Array, lam: jax.Array, eps: float, p: float) -> jax.Array:
  """``Q diag((max(λ, 0) + eps)^{-p}) Qᵀ``, in float32 whatever the compute setting."""
  scale = _inverse_root_scale(lam, eps, p)
  with kron.matmul_settings():  # float32 at HIGHEST: the cache is used for many steps
    return kron.matmul(q * scale, q.T)


def cached_inverse_root() -> Part:
  r"""Shampoo's direction from cached inverse roots: ``U = u ×_1 R_1 ×_2 R_2 …``.

  ``R_k = (S_k + eps I)^{-p}`` as computed by
  [`eigh_basis_refresh`][kl_optax.parts.eigh_basis_refresh] with
  ``inverse_root_eps=eps`` at its last refresh, read from the slots
  ``'inverse_root_k'``. The same direction as
  [`inverse_root`][kl_optax.parts.inverse_root] with the same ``eps`` and
  exponent, for half its matrix products: one product per mode,
  ``2 d_k · size`` FLOPs, instead of a projection into the eigenbasis and
  back. The roots cost one ``d_k × d_k`` product per mode per refresh and
  ``d_k²`` more numbers of state per mode.

  Returns:
    A [`Part`][kl_optax.state.Part] that replaces the running update.

  Raises:
    ValueError: (when traced) if no part of the sequence keeps the roots.

  Examples:
    >>> import jax.numpy as jnp, kl_optax
    >>> tx = kl_optax.kron_transform(
    ...     kl_optax.cached_inverse_root(), kl_optax.shampoo_factor_update(0.99),
    ...     kl_optax.eigh_basis_refresh(10, inverse_root_eps=1e-12))
    >>> g = {"w": jnp.ones((3, 4))}
    >>> state = tx.init(g)
    >>> u, state = tx.update(g, state)  # the initialization step: zero
    >>> u, state = tx.update(g, state)
    >>> u["w"].shape
    (3, 4)
  """

  def update(step: TensorStep) -> TensorStep:
    names = [_inverse_root_slot(k) for k in range(len(step.state.bases))]
    missing = [n for n in names if n not in step.state.slots]
    if missing:
      raise ValueError(
          f"cached_inverse_root: no slot {missing[0]!r}; the sequence needs "
          "eigh_basis_refresh(..., inverse_root_eps=...) to keep the inverse roots.")
    return step._replace(update=kron.project_back(step.update,
                                                  [step.state.slots[n] for n in names]))

  return Part(update=update, name="cached_inverse_root")


def adam_grafting(b2: float = 0.999, eps: float = 1e-8, *, slot: str = NU_GRAFT) -> Part:
  r"""Rescales the running update to the norm of Adam's direction (per tensor).

  ``ν ← b2 ν + (1 − b2) G²``, ``A = G / (sqrt(ν / (1 − b2^t)) + eps)`` and
  ``U ← U · ‖A‖_F / ‖U‖_F`` (``U`` stays zero if it is zero). Grafting takes the
  step size of a diagonal method and the direction of the Kronecker one.

  Args:
    b2: keep factor of ``ν``.
    eps: added to Adam's denominator.
    slot: slot of ``ν``.

  Returns:
    A [`Part`][kl_optax.state.Part] owning the slot ``slot`` (shape of the tensor).
  """

  def update(step: TensorStep) -> TensorStep:
    beta = _f32(b2)
    nu = beta * step.state.slots[slot] + (1.0 - beta) * jnp.square(step.grad)
    adam = step.grad / (jnp.sqrt(nu / _debias(beta, step.count)) + _f32(eps))
    norm_u = jnp.linalg.norm(step.update)
    scale = jnp.where(norm_u > 0, jnp.linalg.norm(adam) / jnp.where(norm_u > 0, norm_u, 1.0), 0.0)
    return step._replace(state=step.state.with_slots(**{slot: nu}), update=step.update * scale)

  return Part(update=update, init_slots=_zero_slots(slot), name="adam_grafting")


def rms_normalize(eps: float = 1e-30) -> Part:
  r"""Divides the running update by its root mean square: ``U ← U / (eps + rms(U))``.

  The authors' ``normalize_grads``, which despite its name normalizes the
  preconditioned update of each tensor (not the gradient) just before the
  learning rate. Here "each tensor" is each preconditioned tensor: a block
  when the leaf is blocked, a slice along batch axes.

  Args:
    eps: added to the root mean square.

  Returns:
    A [`Part`][kl_optax.state.Part] that rescales the running update.
  """

  def update(step: TensorStep) -> TensorStep:
    rms = jnp.sqrt(jnp.mean(jnp.square(step.update)))
    return step._replace(update=step.update / (_f32(eps) + rms))

  return Part(update=update, name="rms_normalize")


# ----------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------


def _whitening_halves(state: KronState) -> list[jax.Array]:
  """``Λ_j^{-1/2} Q_jᵀ`` per mode: ``Ŝ_j⁻¹ = halfᵀ half``."""
  return [
      q.T * jax.lax.rsqrt(lam)[:, None] for q, lam in zip(state.bases, state.eigvals)
  ]


def _factor_increment(g: jax.Array, halves: list[jax.Array], k: int) -> jax.Array:
  """``G_(k) (⊗_{j≠k} Ŝ_j⁻¹) G_(k)ᵀ / n_k`` from the halves of `_whitening_halves`."""
  w = kron.other_modes_product(g, halves, skip=k)
  return kron.mode_gram(w, k) / _others_size(g.shape, k)


def kl_factor_update(b2: float = 0.98) -> Part:
  r"""The KL factor update (``docs/math.md``, "KL-Shampoo").

  For every mode ``k``, with the *current* bases and eigenvalues (Jacobi order):

  $$
  S_k \leftarrow b_2 S_k + \frac{1 - b_2}{n_k}
      G_{(k)} \Big(\bigotimes_{j \ne k} \hat S_j^{-1}\Big) G_{(k)}^\top,
  \qquad \hat S_j^{-1} = Q_j \operatorname{diag}(\lambda_j)^{-1} Q_j^\top,
  $$

  where ``n_k = N / d_k``. Each factor is whitened by all the others and
  divided by their size: the stationary point of
  ``KL(N(0, E[ggᵀ]) ‖ N(0, ⊗_k S_k))``.

  On the initialization step: ``S_k = (1 − b2)/n_k · G_(k) G_(k)ᵀ``.

  Args:
    b2: keep factor of the factor average.

  Returns:
    A [`Part`][kl_optax.state.Part] that writes ``state.factors``.
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
    factors = tuple(beta * s + (1.0 - beta) * _factor_increment(g, halves, k)
                    for k, s in enumerate(st.factors))
    return step._replace(state=st._replace(factors=factors))

  return Part(update=update, first_update=first_update, name="kl_factor_update")


def shampoo_factor_update(b2: float = 0.95) -> Part:
  r"""Shampoo's (and SOAP's) factor average: ``S_k ← b2 S_k + (1 − b2) G_(k) G_(k)ᵀ``.

  No whitening by the other factors and no division by ``n_k``. On the
  initialization step: ``S_k = (1 − b2) G_(k) G_(k)ᵀ``.

  Args:
    b2: keep factor of the factor average.

  Returns:
    A [`Part`][kl_optax.state.Part] that writes ``state.factors``.
  """

  def first_update(step: TensorStep) -> TensorStep:
    scale = 1.0 - _f32(b2)
    factors = tuple(scale * kron.mode_gram(step.grad, k) for k in range(step.grad.ndim))
    return step._replace(state=step.state._replace(factors=factors))

  def update(step: TensorStep) -> TensorStep:
    beta = _f32(b2)
    factors = tuple(
        beta * s + (1.0 - beta) * kron.mode_gram(step.grad, k)
        for k, s in enumerate(step.state.factors)
    )
    return step._replace(state=step.state._replace(factors=factors))

  return Part(update=update, first_update=first_update, name="shampoo_factor_update")


def clamp_floor(dim: int, max_clamp: float | None = 4000) -> jax.Array:
  """The eigenvalue floor ``1 / c²`` with ``c = max(10, min(dim, max_clamp))``.

  ``max_clamp=None`` turns the clamp off (the authors' ``using_clamping=False``):
  the floor is then the smallest normal float32, which only keeps ``1/λ`` finite.
  """
  if max_clamp is None:
    return _f32(jnp.finfo(jnp.float32).tiny)
  c = jnp.maximum(10.0, jnp.minimum(_f32(dim), _f32(max_clamp)))
  return 1.0 / (c * c)


# Data-driven starting eigenvalue estimates (``init_factor=<name>``; docs/math.md,
# "Starting eigenvalue estimates").
EIGENVALUE_STARTS = ("rms", "spectrum")

# The constant used where the first gradient carries no scale (zero or not finite).
_FALLBACK_START = 0.1


def check_init_factor(init_factor: float | str) -> None:
  """Raises ``ValueError`` unless ``init_factor`` is a positive number or a rule name."""
  if isinstance(init_factor, str):
    if init_factor not in EIGENVALUE_STARTS:
      raise ValueError(f"init_factor must be a positive number or one of "
                       f"{EIGENVALUE_STARTS}, got {init_factor!r}.")
    return
  validation.check_range("init_factor", init_factor, 0.0, None, low_open=True)


def initial_eigenvalues(init_factor: float | str, g: jax.Array) -> tuple[jax.Array, ...]:
  r"""Starting eigenvalue estimates ``λ_k`` of a tensor from its first gradient ``G``.

  * a number ``c``: ``λ_k = c`` everywhere (the paper's rule; the second update
    is ``(1 − b1) G / c^{K/2}``, so its size depends on ``G``'s scale and on
    the tensor order ``K``);
  * ``"rms"``: ``λ_k = mean(G²)^{1/K}`` everywhere, so that ``∏_k λ_k`` equals
    the first gradient's mean square whatever ``K``: the second update is
    ``(1 − b1) G / rms(G)``, scale-free like Adam's;
  * ``"spectrum"``: the mode-``k`` marginal second moments, the eigenvalues
    ``w_k`` of ``G_(k) G_(k)ᵀ / n_k`` in descending order (the order of the
    bases that [`qr_basis_refresh`][kl_optax.parts.qr_basis_refresh] starts from), shrunk half way to their
    mean ``μ = mean(G²)`` and rescaled so that ``∏_k mean(λ_k) = μ``:
    ``λ_k = ½ (w_k + μ) · μ^{1/K − 1}``.

  Where ``G`` is zero or not finite the rules fall back to ``0.1``.
  """
  if not isinstance(init_factor, str):
    return tuple(jnp.full((d,), _f32(init_factor)) for d in g.shape)
  moments = None
  if init_factor == "spectrum":
    moments = [kron.eigh_descending(kron.mode_gram(g, k) / _others_size(g.shape, k))[0]
               for k in range(g.ndim)]
  return scaled_start(init_factor, g, moments)


def scaled_start(rule: str, g: jax.Array, moments: list[jax.Array] | None,
                 order: int | None = None) -> tuple[jax.Array, ...]:
  """The rules of [`initial_eigenvalues`][kl_optax.parts.initial_eigenvalues] given the marginal moments ``w_k``.

  ``moments`` (one vector per estimate; ``None``: one per dim of ``g``, for
  ``"rms"`` only) may be any vectors of second moments whose mean
  is ``mean(G²)``; ``order`` is the ``K`` of ``μ^{1/K}`` (default ``g.ndim``).
  """
  order = g.ndim if order is None else order
  ms = jnp.mean(jnp.square(g))
  ok = jnp.isfinite(ms) & (ms > 0)
  ms = jnp.where(ok, ms, 1.0)
  root = jnp.power(ms, 1.0 / order)
  if moments is None:
    out = [(jnp.full((d,), root), ok) for d in g.shape]
  elif rule == "rms":
    out = [(jnp.full(w.shape, root), ok) for w in moments]
  else:
    # λ_k is finite wherever w_k is: the check reads w_k, which is known before
    # λ_k, so that the fallback fuses into λ_k's computation instead of waiting
    # for a reduction over it.
    out = [(0.5 * (jnp.maximum(w, 0.0) + ms) * (root / ms), ok & all_finite(w))
           for w in moments]
  # Finite by construction (the fallback), so the guard need not check them again.
  return tuple(declare_finite(jnp.where(fine & jnp.isfinite(lam), lam, _f32(_FALLBACK_START)))
               for lam, fine in out)


def ema_eigenvalues(
    b2: float = 0.98, *, init_factor: float | str = 0.1, max_clamp: float | None = 4000, damping: float = 0.0
) -> Part:
  r"""Eigenvalue estimates as an average of the factor increment's diagonal in the current basis.

  With ``G̃ = P(G)`` (this gradient in the current basis) and the current
  ``λ`` (Jacobi order):

  $$
  \delta_k[i] = \frac{1}{n_k} \sum_{\text{all indices but } k,\ i_k = i}
      \frac{\tilde G^2}{\prod_{j \ne k} \lambda_j[i_j]},
  \qquad \lambda_k \leftarrow b_2 \lambda_k + (1 - b_2)\, \delta_k,
  $$

  then ``λ_k ← max(λ_k, 1/c_k²)`` with ``c_k = max(10, min(d_k, max_clamp))``
  (``max_clamp=None``: no clamp). With ``damping > 0``, ``δ_k`` gains
  ``damping · ∏_{j≠k} mean(1/λ_j)`` (the authors' ``using_damping``, which
  uses ``eps`` as the damping).
  ``δ_k`` is ``diag(Q_kᵀ · increment_k · Q_k)`` for the increment of
  [`kl_factor_update`][kl_optax.parts.kl_factor_update] — not the diagonal of ``Q_kᵀ S_k Q_k``. A
  non-finite estimate is never stored: the entry keeps its previous value.

  On the initialization step: ``λ_k = init_factor``, or a rule's estimate
  from the first gradient ([`initial_eigenvalues`][kl_optax.parts.initial_eigenvalues]).

  Args:
    b2: keep factor of the average.
    init_factor: the initial eigenvalue estimate: a positive number, ``"rms"``
      or ``"spectrum"`` ([`initial_eigenvalues`][kl_optax.parts.initial_eigenvalues]). Static when a name.
    max_clamp: upper limit of ``c_k`` in the eigenvalue floor; ``None`` turns
      the floor off.
    damping: added to the eigenvalue increments, scaled by the other modes'
      mean inverse eigenvalues.

  Returns:
    A [`Part`][kl_optax.state.Part] that writes ``state.eigvals``.
  """

  check_init_factor(init_factor)

  def first_update(step: TensorStep) -> TensorStep:
    eigvals = initial_eigenvalues(init_factor, step.grad)
    return step._replace(state=step.state._replace(eigvals=eigvals))

  def update(step: TensorStep) -> TensorStep:
    st, g = step.state, step.grad
    sq = jnp.square(kron.project(g, st.bases))
    inv = [1.0 / lam for lam in st.eigvals]
    eigvals = tuple(
        _ema_eigenvalue(b2, lam, _eigen_increment(sq, inv, k, damping, inv), g.shape[k],
                        max_clamp)
        for k, lam in enumerate(st.eigvals))
    return step._replace(state=st._replace(eigvals=eigvals))

  return Part(update=update, first_update=first_update, name="ema_eigenvalues")


def _eigen_increment(sq: jax.Array, inv: list[jax.Array], k: int, damping: float,
                     damping_inv: list[jax.Array]) -> jax.Array:
  """``δ_k``: ``G̃²`` weighted by ``∏_{j≠k} 1/λ_j`` and averaged over all modes but ``k``.

  With ``damping``, ``δ_k += damping · ∏_{j≠k} mean(1/λ_j)`` (the authors'
  ``using_damping``), with the ``1/λ_j`` of ``damping_inv``.
  """
  weights = [v if j != k else jnp.ones_like(v) for j, v in enumerate(inv)]
  others = tuple(j for j in range(sq.ndim) if j != k)
  delta = jnp.sum(sq * kron.outer_product(weights), axis=others) / _others_size(sq.shape, k)
  if damping is not None and not (isinstance(damping, (int, float)) and damping == 0):
    scale = functools.reduce(jnp.multiply,
                             [jnp.mean(v) for j, v in enumerate(damping_inv) if j != k], _f32(1.0))
    delta = delta + _f32(damping) * scale
  return delta


def _ema_eigenvalue(b2: float, lam: jax.Array, delta: jax.Array, dim: int,
                    max_clamp: float | None) -> jax.Array:
  """``max(b2 λ + (1 − b2) δ, floor)``; a non-finite result keeps the old ``λ``."""
  beta = _f32(b2)
  new = jnp.maximum(beta * lam + (1.0 - beta) * delta, clamp_floor(dim, max_clamp))
  return declare_finite(jnp.where(jnp.isfinite(new), new, lam), given=[lam])


UPDATE_ORDERS = ("jacobi", "authors")


def _jacobi_statistics(st: KronState, g: jax.Array, b2: float, max_clamp: float | None,
                       damping: float) -> KronState:
  """Factors and eigenvalue estimates of one step in Jacobi order, sharing products.

  The same statistics as [`kl_factor_update`][kl_optax.parts.kl_factor_update] followed by [`ema_eigenvalues`][kl_optax.parts.ema_eigenvalues]
  (up to float32 rounding), with fewer products: the mode-``k`` increment is the Gram
  matrix of ``A_k = G ×_{j≠k} Q_jᵀ`` scaled by ``∏_{j≠k} λ_j^{-1/2}``, and the
  projected gradient ``G̃ = P(G)`` is ``A_k ×_k Q_kᵀ`` for the smallest mode ``k``
  instead of a projection of its own. For an ``m × n`` matrix (``m ≤ n``) the statistics
  then cost ``4(m²n + mn²) + 2m²n`` FLOPs instead of ``6(m²n + mn²)``.
  """
  beta = _f32(b2)
  inv = [1.0 / lam for lam in st.eigvals]
  rsqrt = [jax.lax.rsqrt(lam) for lam in st.eigvals]
  transposed = [q.T for q in st.bases]
  smallest = min(range(g.ndim), key=lambda k: g.shape[k])
  factors, projected = [], None
  for k in range(g.ndim):
    a = kron.other_modes_product(g, transposed, skip=k)
    weights = [r if j != k else jnp.ones_like(r) for j, r in enumerate(rsqrt)]
    w = a * kron.outer_product(weights)
    factors.append(beta * st.factors[k] + (1.0 - beta) * kron.mode_gram(w, k)
                   / _others_size(g.shape, k))
    if k == smallest:
      projected = kron.mode_product(a, transposed[k], k)
  sq = jnp.square(projected)
  eigvals = tuple(
      _ema_eigenvalue(b2, lam, _eigen_increment(sq, inv, k, damping, inv), g.shape[k], max_clamp)
      for k, lam in enumerate(st.eigvals))
  return st._replace(factors=tuple(factors), eigvals=eigvals)


def kl_statistics(
    b2: float = 0.98, *, order: str = "jacobi", init_factor: float | str = 0.1, max_clamp: float | None = 4000,
    damping: float = 0.0, shared_products: bool = True,
) -> Part:
  r"""The KL factor update and the eigenvalue estimates as one part, in a chosen order.

  ``order="jacobi"`` is [`kl_factor_update`][kl_optax.parts.kl_factor_update] followed by
  [`ema_eigenvalues`][kl_optax.parts.ema_eigenvalues]: every statistic of a step reads the ``λ`` of the
  previous step. ``order="authors"`` is the order of the authors' code, which
  for 3-D tensors is partly Gauss–Seidel (``docs/math.md``, "Update order"):

  1. ``S_3`` and ``S_2`` increments, and ``λ_3``, from the old ``λ_1, λ_2, λ_3``;
  2. ``λ_2`` from the old ``λ_1`` and the new ``λ_3``;
  3. the ``S_1`` increment and ``λ_1`` from the new ``λ_2`` and the old ``λ_3``.

  (modes counted from 1 in tensor order). Matrices are updated in Jacobi order
  either way; the authors' code has no rule for four or more modes, and this
  part raises for them.

  Args:
    b2: keep factor of the factors and eigenvalue estimates.
    order: ``"jacobi"`` or ``"authors"``.
    init_factor: see [`ema_eigenvalues`][kl_optax.parts.ema_eigenvalues].
    max_clamp: see [`ema_eigenvalues`][kl_optax.parts.ema_eigenvalues].
    damping: see [`ema_eigenvalues`][kl_optax.parts.ema_eigenvalues] (always from the old ``λ``).
    shared_products: in Jacobi order (and for matrices), compute the factor
      increments and the projected gradient from one set of mode products
      (``2·mn·max(m, n)`` FLOPs fewer for an ``m × n`` matrix); ``False`` runs
      the two parts as they are. Equal up to float32 rounding.

  Returns:
    A [`Part`][kl_optax.state.Part] that writes ``state.factors`` and ``state.eigvals``.
  """
  if order not in UPDATE_ORDERS:
    raise ValueError(f"order must be one of {UPDATE_ORDERS}, got {order!r}.")
  factor_part = kl_factor_update(b2)
  eig_part = ema_eigenvalues(b2, init_factor=init_factor, max_clamp=max_clamp, damping=damping)

  def first_update(step: TensorStep) -> TensorStep:
    step = factor_part.first_update(step)
    if init_factor != "spectrum":
      return eig_part.first_update(step)
    # The marginal moments are the eigenvalues of S_k / (1 − b2): the factor the
    # basis is started from, so that within kron.shared_decompositions (the
    # initialization step) one eigendecomposition serves both.
    scale = 1.0 - _f32(b2)
    moments = [kron.eigh_descending(s)[0] / scale for s in step.state.factors]
    return step._replace(state=step.state._replace(
        eigvals=scaled_start("spectrum", step.grad, moments)))

  def init_slots(shape: Shape) -> dict[str, jax.Array]:
    if order == "authors" and len(shape) > 3:
      raise ValueError(
          f"kl_statistics(order='authors') is defined for matrices and 3-D tensors; got a "
          f"tensor of shape {tuple(shape)}. Use order='jacobi' for it.")
    return {}

  def update(step: TensorStep) -> TensorStep:
    if order == "jacobi" or step.grad.ndim == 2:
      if not shared_products:
        return eig_part.update(factor_part.update(step))
      return step._replace(state=_jacobi_statistics(step.state, step.grad, b2, max_clamp,
                                                    damping))
    st, g = step.state, step.grad
    beta = _f32(b2)
    old = list(st.eigvals)
    sq = jnp.square(kron.project(g, st.bases))
    inv_old = [1.0 / lam for lam in old]

    def estimate(k, lams):
      inv = [1.0 / lam for lam in lams]
      return _ema_eigenvalue(b2, old[k], _eigen_increment(sq, inv, k, damping, inv_old),
                             g.shape[k], max_clamp)

    def factor(k, lams):
      halves = _whitening_halves(st._replace(eigvals=tuple(lams)))
      return beta * st.factors[k] + (1.0 - beta) * _factor_increment(g, halves, k)

    s3, s2 = factor(2, old), factor(1, old)
    lam3 = estimate(2, old)
    lam2 = estimate(1, [old[0], old[1], lam3])
    mixed = [old[0], lam2, old[2]]
    s1, lam1 = factor(0, mixed), estimate(0, mixed)
    return step._replace(state=st._replace(factors=(s1, s2, s3), eigvals=(lam1, lam2, lam3)))

  return Part(update=update, first_update=first_update, init_slots=init_slots,
              name=f"kl_statistics({order})")


# ----------------------------------------------------------------------------
# Bases
# ----------------------------------------------------------------------------


def _static_tolerance(value: Any) -> Any:
  """``None`` for "always refresh" (``None`` or a Python zero); the value otherwise."""
  if value is None:
    return None
  if not isinstance(value, jax.core.Tracer):
    v = float(value)
    if not 0.0 <= v <= 1.0:
      raise ValueError(f"refresh tolerance must be in [0, 1], got {value!r}.")
    if v == 0.0:
      return None
  return value


def _placeholder(factor: jax.Array) -> bool:
  """Whether a mode keeps no dense factor (a ``(1, d)`` placeholder; see ``Part.init_state``)."""
  return factor.shape[0] != factor.shape[1]


def _refresh_init(shape):
  return {REFRESHES: jnp.zeros((len(shape),), jnp.int32),
          REFRESH_FAILURES: jnp.zeros((len(shape),), jnp.int32)}


def _count(slots, name, flags):
  if name in slots:  # states built by hand may lack a counter
    slots[name] = slots[name] + jnp.stack(flags).astype(jnp.int32)


def off_diagonal_ratio(b: jax.Array) -> jax.Array:
  r"""``off(B) / ‖B‖_F`` with ``off(B) = sqrt(‖B‖_F² − ‖diag B‖²)``.

  For ``B = Qᵀ A Q`` this is ``‖A − Q diag(B) Qᵀ‖_F / ‖A‖_F``: the relative
  error of keeping the basis ``Q`` for ``A``. Zero for a zero matrix.
  """
  total = jnp.sum(jnp.square(b))
  off = jnp.maximum(total - jnp.sum(jnp.square(jnp.diagonal(b))), 0.0)
  return jnp.where(total > 0, jnp.sqrt(off / jnp.where(total > 0, total, 1.0)), 0.0)


def _rotated_basis(s: jax.Array, q: jax.Array) -> jax.Array:
  return jnp.matmul(q.T, jnp.matmul(s, q, precision=kron.HIGHEST), precision=kron.HIGHEST)


def _qr_step(q, b):
  """One QR iteration on ``B = QᵀSQ``: ``Q_i R_i = qr(B); Q ← Q Q_i; B ← Q_iᵀ B Q_i``."""
  qk = kron.qr_orthonormal(b)
  return jnp.matmul(q, qk, precision=kron.HIGHEST), _rotated_basis(b, qk)


def _qr_iterations(s, q, tolerance, max_iters):
  """Warm-started QR iterations on ``B = QᵀSQ``, stopping once ``off(B) ≤ τ‖B‖``.

  Returns the new basis and the number of iterations run (0: ``Q`` was kept).
  Without a tolerance exactly ``max_iters`` iterations run (a loop of fixed
  length); with one, a ``while_loop`` stops early (`_adaptive_iterations`).
  Both can be differentiated in forward and reverse mode.
  """
  if tolerance is None:
    q, _ = jax.lax.fori_loop(0, max_iters, lambda _, c: _qr_step(*c), (q, _rotated_basis(s, q)))
    return q, jnp.int32(max_iters)
  q, n = _adaptive_iterations(s, q, tolerance, max_iters)
  return q, n.astype(jnp.int32)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _adaptive_iterations(s, q, tolerance, max_iters):
  """The adaptive iterations as a ``while_loop``; the count is returned as a float."""

  def keep_going(carry):
    i, _, b = carry
    return (i < max_iters) & (off_diagonal_ratio(b) > tolerance)

  def body(carry):
    i, q, b = carry
    return (i + 1, *_qr_step(q, b))

  i, q, _ = jax.lax.while_loop(keep_going, body, (jnp.int32(0), q, _rotated_basis(s, q)))
  return q, i.astype(jnp.float32)


@_adaptive_iterations.defjvp
def _adaptive_iterations_jvp(max_iters, primals, tangents):
  # The number of iterations is locally constant; the tangent replays that
  # many iterations in a loop of fixed length (later ones masked), which
  # reverse mode can transpose, unlike the while_loop.
  s, q, tolerance = primals
  ds, dq, _ = tangents
  q_out, n = _adaptive_iterations(s, q, tolerance, max_iters)

  def replay(s, q):
    def body(k, carry):
      new = _qr_step(*carry)
      return tuple(jnp.where(k < n, a, b) for a, b in zip(new, carry))
    return jax.lax.fori_loop(0, max_iters, body, (q, _rotated_basis(s, q)))[0]

  _, dq_out = jax.jvp(replay, (s, q), (ds, dq))
  return (q_out, n), (dq_out, jnp.zeros_like(n))


def _finite_bases(state: KronState, old: KronState) -> KronState:
  """``state`` with its bases declared finite given ``old``'s: a refresh keeps
  the old basis wherever the new one is not finite."""
  return state._replace(bases=tuple(declare_finite(q, given=[p])
                                    for q, p in zip(state.bases, old.bases)))


def qr_basis_refresh(
    precondition_frequency: int = 10,
    *,
    tolerance: float | None = None,
    max_iters: int | None = 1,
    sort: bool = False,
    rotate_slots: tuple[str, ...] = (),
    permute_slots: tuple[str, ...] = (),
) -> Part:
  r"""Keeps each basis ``Q_k`` close to the eigenvectors of its factor ``S_k``.

  On steps ``t`` with ``t mod precondition_frequency == 0`` every basis is
  refreshed by one warm-started power step, ``Q_k ← qr(S_k Q_k).Q``, in
  float32. The eigenvalue estimates are neither recomputed nor re-sorted.

  Options:

  * ``tolerance`` (adaptive refresh, ``docs/math.md``, "Adaptive basis refresh"): with
    ``B = Q_kᵀ S_k Q_k``, the basis is kept when
    ``off(B) ≤ tolerance · ‖B‖_F`` ([`off_diagonal_ratio`][kl_optax.parts.off_diagonal_ratio]); otherwise up to
    ``max_iters`` unshifted QR iterations ``Q_i R_i = qr(B); B ← R_i Q_i;
    Q_k ← Q_k Q_i`` run, stopping as soon as the criterion holds. One
    iteration is the power step above (``qr(S Q) = Q · qr(QᵀSQ)``). Each
    factor decides on its own; ``None`` (or 0) refreshes every time.
  * ``sort`` (SOAP): before the power step, the columns of ``Q_k`` are sorted by
    descending ``diag(Q_kᵀ S_k Q_k)`` and the slots in ``permute_slots`` are
    permuted the same way along mode ``k``.
  * ``rotate_slots``: slots holding eigenbasis coordinates (SOAP's first
    moment) are carried into the new basis, ``x ← P_new(Pᵀ_old(x))``.

  A refresh whose result is not finite (a failed QR, or a factor that is
  itself not finite) is discarded: the previous basis is kept and the failure
  is counted in the slot ``'refresh_failures'``. The number of refreshes each
  factor actually performed is counted in the slot ``'refreshes'`` (int32, one
  entry per mode).

  On the initialization step: ``Q_k`` = eigenvectors of ``S_k`` (``eigh`` in
  float32), columns in descending eigenvalue order.

  Args:
    precondition_frequency: refresh every this many steps (``t ≥ 1``).
    tolerance: relative off-diagonal tolerance in [0, 1] of the adaptive refresh.
    max_iters: largest number of QR iterations per refresh (static; ``None``: 1).
    sort: sort the basis columns by estimated eigenvalue before refreshing.
    rotate_slots: slots to rotate into the new basis.
    permute_slots: slots to permute with the sorted columns.

  Returns:
    A [`Part`][kl_optax.state.Part] that writes ``state.bases`` and the slots ``'refreshes'``
    and ``'refresh_failures'``.
  """
  tol = _static_tolerance(tolerance)
  iters = validation.static_int(max_iters, "max_iters", default=1)
  plain = tol is None and iters == 1

  def first_update(step: TensorStep) -> TensorStep:
    slots = dict(step.state.slots)
    bases, failed = [], []
    for s, q in zip(step.state.factors, step.state.bases):
      if _placeholder(s):
        bases.append(q)
        failed.append(jnp.bool_(False))
        continue
      v = kron.eigh_descending(s)[1]
      # A boolean check here: with all_finite's float sum XLA kept a second copy
      # of the eigenvector stack, 7.8 MiB more scratch memory for the update of
      # the d 256 benchmark GPT (tests/test_memory.py).
      ok = jnp.all(jnp.isfinite(v))
      bases.append(jnp.where(ok, v, q))
      failed.append(~ok)
    _count(slots, REFRESH_FAILURES, failed)
    return step._replace(state=_finite_bases(
        step.state._replace(bases=tuple(bases), slots=slots), step.state))

  def refresh(state: KronState) -> KronState:
    slots = dict(state.slots)
    bases, done, failed = [], [], []
    for k, (s, q) in enumerate(zip(state.factors, state.bases)):
      if _placeholder(s):
        bases.append(q)
        done.append(jnp.bool_(False))
        failed.append(jnp.bool_(False))
        continue
      power = None
      if sort:
        # diag(QᵀSQ) from the product S Q the power step needs anyway (column sums
        # of Q ⊙ SQ): one d³ product per mode for sorting and power step together.
        dtype = jnp.promote_types(s.dtype, jnp.float32)
        sq = jnp.matmul(s.astype(dtype), q.astype(dtype), precision=kron.HIGHEST)
        order = jnp.argsort(-jnp.sum(q.astype(dtype) * sq, axis=0))
        q, power = q[:, order], sq[:, order]
        for name in permute_slots:
          slots[name] = jnp.take(slots[name], order, axis=k)
      if plain and power is not None:
        q_new, n = kron.qr_orthonormal(power), jnp.int32(1)
      elif plain:
        q_new, n = kron.qr_power_step(s, q), jnp.int32(1)
      else:
        q_new, n = _qr_iterations(s, q, tol, iters)
      ok = all_finite(q_new)
      bases.append(jnp.where(ok, q_new, q))
      done.append(ok & (n > 0))
      failed.append(~ok)
    if rotate_slots and any(_placeholder(s) for s in state.factors):
      raise ValueError("qr_basis_refresh: rotate_slots needs a dense basis for every mode.")
    for name in rotate_slots:
      slots[name] = kron.project(kron.project_back(slots[name], state.bases), bases)
    _count(slots, REFRESHES, done)
    _count(slots, REFRESH_FAILURES, failed)
    return state._replace(bases=tuple(bases), slots=slots)

  def update(step: TensorStep) -> TensorStep:
    due = (step.count % precondition_frequency) == 0
    state = jax.lax.cond(due, refresh, lambda st: st, step.state)
    return step._replace(state=_finite_bases(state, step.state))

  return Part(update=update, first_update=first_update, init_slots=_refresh_init,
              name="qr_basis_refresh")


def eigh_basis_refresh(
    precondition_frequency: int = 10,
    *,
    tolerance: float | None = None,
    inverse_root_eps: float | None = None,
    inverse_root_exponent: float | None = None,
) -> Part:
  r"""Exact eigendecompositions of the factors: ``λ_k, Q_k = eigh(S_k)`` (Shampoo).

  Runs on the initialization step and on steps with
  ``t mod precondition_frequency == 0``; eigenvalues are sorted in descending
  order and clipped at zero. With ``tolerance``, a factor whose current basis
  still satisfies ``off(Q_kᵀ S_k Q_k) ≤ tolerance · ‖S_k‖_F`` keeps it and only
  refreshes its eigenvalues to ``diag(Q_kᵀ S_k Q_k)``. A non-finite
  decomposition is discarded (basis and eigenvalues are kept) and counted in
  the slot ``'refresh_failures'``. Refreshes performed are counted in the slot
  ``'refreshes'``.

  Args:
    precondition_frequency: refresh every this many steps (``t ≥ 1``).
    tolerance: relative off-diagonal tolerance in [0, 1] (``None``: always).
    inverse_root_eps: if set, the part also keeps Shampoo's inverse roots
      ``R_k = Q_k diag((max(λ_k, 0) + eps)^{-p}) Q_kᵀ`` in the slots
      ``'inverse_root_k'`` (float32 whatever the storage dtype), recomputed
      whenever it writes ``λ_k`` or ``Q_k``, for
      [`cached_inverse_root`][kl_optax.parts.cached_inverse_root].
    inverse_root_exponent: ``p`` of those roots; ``None`` means ``1 / (2K)``
      for a tensor of order ``K``. Only with ``inverse_root_eps``.

  Returns:
    A [`Part`][kl_optax.state.Part] that writes ``state.bases``, ``state.eigvals`` and the
    slots ``'refreshes'``, ``'refresh_failures'`` (and ``'inverse_root_k'``).
  """
  tol = _static_tolerance(tolerance)
  if inverse_root_eps is not None:
    # As in inverse_root, eps = 0 is allowed: an exactly zero eigenvalue then gives an
    # infinite root, and the tensor skips its steps as non-finite until a refresh.
    validation.check_range("inverse_root_eps", inverse_root_eps, 0.0, None)
  elif inverse_root_exponent is not None:
    raise ValueError("eigh_basis_refresh: inverse_root_exponent needs inverse_root_eps.")
  if inverse_root_exponent is not None:
    validation.check_range("inverse_root_exponent", inverse_root_exponent, 0.0, None)

  def exponent(state: KronState) -> float:
    return 1.0 / (2 * len(state.bases)) if inverse_root_exponent is None else inverse_root_exponent

  def with_roots(state: KronState) -> KronState:
    if inverse_root_eps is None:
      return state
    return state.with_slots(**{
        _inverse_root_slot(k): _inverse_root_matrix(q, lam, inverse_root_eps, exponent(state))
        for k, (q, lam) in enumerate(zip(state.bases, state.eigvals))})

  def initial_roots(state: KronState) -> KronState:
    # The initial bases are the identity (init_kron_state), so each root is the
    # diagonal matrix of the scales: Q diag(scale) Qᵀ exactly, without the d³
    # product, which XLA does not fold (and which the initialization step,
    # which rebuilds this state, would otherwise compute as well).
    return state.with_slots(**{
        _inverse_root_slot(k): jnp.diag(_inverse_root_scale(lam, inverse_root_eps, exponent(state)))
        for k, lam in enumerate(state.eigvals)})

  def init_slots(shape):
    slots = _refresh_init(shape)
    if inverse_root_eps is not None:
      slots.update({_inverse_root_slot(k): jnp.zeros((d, d)) for k, d in enumerate(shape)})
    return slots

  def decompose(s, q, lam):
    w, v = kron.eigh_descending(s)
    ok = all_finite(v, w)
    return jnp.where(ok, jnp.maximum(w, 0.0), lam), jnp.where(ok, v, q), ok

  def refresh_one(s, q, lam):
    b = _rotated_basis(s, q)
    keep = off_diagonal_ratio(b) <= tol
    return jax.lax.cond(
        keep, lambda: (jnp.maximum(jnp.diagonal(b), 0.0), q, jnp.bool_(False), jnp.bool_(False)),
        lambda: decompose(s, q, lam) + (jnp.bool_(True),))

  def refresh(state: KronState) -> KronState:
    out = []
    for s, q, lam in zip(state.factors, state.bases, state.eigvals):
      if tol is None:
        out.append(decompose(s, q, lam) + (jnp.bool_(True),))
      else:
        out.append(refresh_one(s, q, lam))
    slots = dict(state.slots)
    _count(slots, REFRESHES, [o[2] for o in out])
    _count(slots, REFRESH_FAILURES, [o[3] & ~o[2] for o in out])
    return with_roots(state._replace(eigvals=tuple(o[0] for o in out),
                                     bases=tuple(o[1] for o in out), slots=slots))

  def first_update(step: TensorStep) -> TensorStep:
    st = step.state
    out = [decompose(s, q, lam) for s, q, lam in zip(st.factors, st.bases, st.eigvals)]
    slots = dict(st.slots)
    _count(slots, REFRESH_FAILURES, [~o[2] for o in out])
    return step._replace(state=_finite_bases(with_roots(st._replace(
        eigvals=tuple(o[0] for o in out), bases=tuple(o[1] for o in out), slots=slots)), st))

  def update(step: TensorStep) -> TensorStep:
    due = (step.count % precondition_frequency) == 0
    return step._replace(state=_finite_bases(
        jax.lax.cond(due, refresh, lambda st: st, step.state), step.state))

  # Shampoo's inverse roots use these eigenvalues: a bfloat16-stored factor would lose
  # its small eigenvalues (its loss on a regression was 7x float32's), so keep it float32.
  # The roots always match the bases and eigenvalues, from the initial state on (so a
  # skipped initialization step leaves the initial roots, not zeros).
  return Part(update=update, first_update=first_update, init_slots=init_slots,
              init_state=initial_roots if inverse_root_eps is not None else None,
              name="eigh_basis_refresh", float32_factors=True,
              float32_slots=(INVERSE_ROOT,) if inverse_root_eps is not None else ())
