r"""Ready-made optimizers: short compositions of the parts.

``scale_by_<algo>`` preconditions only (no learning rate, no sign flip, no
weight decay) and accepts only tensors that can carry a Kronecker
preconditioner; ``<algo>`` is the complete optimizer: the preconditioner chained
with decoupled weight decay and the learning rate, and routed with
``optax.partition`` so that every other leaf goes to AdamW.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

import jax
import optax

from kl_optax import parts as P
from kl_optax import routing
from kl_optax import pro
from kl_optax.compose import check_blocking, kron_transform, squeezed_shape
from kl_optax.safety import check_gradients, zero_nonfinite
from kl_optax.validation import check_range

__all__ = [
    "eshampoo",
    "kl_shampoo",
    "kl_soap",
    "pro_kl_shampoo",
    "pro_labels",
    "scale_by_eshampoo",
    "scale_by_kl_shampoo",
    "scale_by_kl_soap",
    "scale_by_pro_kl_shampoo",
    "scale_by_shampoo",
    "scale_by_soap",
    "shampoo",
    "soap",
    "with_adam_fallback",
]


def _blocking(block_size, max_precond_dim) -> dict[str, int | None]:
  """The static blocking options as ``kron_transform`` keywords (validated)."""
  max_dim = routing.resolve_static_int(
      max_precond_dim, "max_precond_dim", routing.DEFAULT_MAX_PRECOND_DIM)
  block_size, max_dim = check_blocking(block_size, max_dim)
  return dict(block_size=block_size, max_precond_dim=max_dim)


def _check_common(b1, b2, eps, precondition_frequency):
  check_range("b1", b1, 0.0, 1.0)
  check_range("b2", b2, 0.0, 1.0)
  check_range("eps", eps, 0.0, None)
  check_range("precondition_frequency", precondition_frequency, 1.0, None)


def scale_by_kl_shampoo(
    b1: Any = 0.9,
    b2: Any = 0.98,
    eps: Any = 1e-8,
    precondition_frequency: Any = 10,
    init_factor: Any = 0.1,
    max_clamp: Any = 4000,
    *,
    refresh_tolerance: Any = None,
    refresh_max_iters: int | None = None,
    state_dtype: Any = None,
    block_size: int | None = None,
    max_precond_dim: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales updates by KL-Shampoo's Kronecker preconditioner.

  For a tensor ``G`` of shape ``(d_1, …, d_K)`` the factors
  ``S = S_1 ⊗ … ⊗ S_K`` are fitted to the gradient second moment by minimizing
  ``KL(N(0, E[ggᵀ]) ‖ N(0, S))``; the update is
  ``Δ = (⊗_k Ŝ_k^{-1/2}) m`` with ``m`` the momentum. Per step ``t ≥ 1``:

  .. math::

     m &\leftarrow b_1 m + (1 - b_1) G \\
     U &= P^\top\!\big(P(m) \oslash (\sqrt{\textstyle\prod_k \lambda_k} + \epsilon)\big) \\
     S_k &\leftarrow b_2 S_k + \tfrac{1 - b_2}{n_k}
           G_{(k)} \big(\textstyle\bigotimes_{j \ne k} \hat S_j^{-1}\big) G_{(k)}^\top \\
     \lambda_k &\leftarrow \max\big(b_2 \lambda_k + (1 - b_2)\,\delta_k,\ 1/c_k^2\big) \\
     Q_k &\leftarrow \operatorname{qr}(S_k Q_k).Q
           \quad\text{if } t \bmod \text{precondition\_frequency} = 0

  The first update initializes ``S_k`` from the gradient, ``Q_k`` from its
  eigenvectors and ``λ_k = init_factor``, and returns zero; the second returns
  exactly ``(1 − b1) G / (init_factor^{K/2} + eps)``.

  Every leaf must have at least two dims larger than one (size-1 dims are
  squeezed). :func:`kl_shampoo` routes other leaves to AdamW.

  Args:
    b1: momentum keep factor.
    b2: keep factor of the factors and eigenvalue estimates.
    eps: added to ``sqrt(∏ λ)`` in the denominator.
    precondition_frequency: refresh the bases every this many steps.
    init_factor: initial eigenvalue estimate. It sets the size of the first
      updates (the second update is ``(1 − b1) G / init_factor^{K/2}``) and
      the estimates need ~1/(1 − b2) steps to forget it. The default follows
      the paper's code; on the character-GPT benchmark (300 steps,
      docs/benchmarks.md) 1e-3 was far better than 0.1.
    max_clamp: eigenvalue estimates are kept ≥ ``1 / c_k²`` with
      ``c_k = max(10, min(d_k, max_clamp))``.
    refresh_tolerance: adaptive basis refresh (see
      :func:`kl_optax.qr_basis_refresh`); ``None`` refreshes every time.
    refresh_max_iters: largest number of QR iterations per refresh (``None``:
      1). Static.
    state_dtype: storage dtype of momentum, factors and bases (``None``:
      float32). Computation is always float32; eigenvalue estimates are
      always stored in float32.
    block_size: cut dims larger than ``max_precond_dim`` into blocks of this
      length, each preconditioned on its own (``None``: no blocking). Static.
    max_precond_dim: the largest dim kept whole when ``block_size`` is set
      (``None``: 10,000). Static.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp, optax, kl_optax
    >>> tx = kl_optax.scale_by_kl_shampoo()
    >>> params = jnp.ones((3, 4))
    >>> state = tx.init(params)
    >>> g = jnp.arange(12.0).reshape(3, 4)
    >>> u, state = tx.update(g, state)           # t = 0: initialization
    >>> u, state = tx.update(g, state)           # t = 1: (1 - b1) g / 0.1
    >>> bool(jnp.allclose(u, g, atol=1e-5))
    True

  References:
    Lin et al., `Understanding and Improving Shampoo and SOAP via
    Kullback-Leibler Minimization <https://arxiv.org/abs/2509.03378>`_, 2025.
  """
  _check_common(b1, b2, eps, precondition_frequency)
  check_range("init_factor", init_factor, 0.0, None, low_open=True)
  check_range("max_clamp", max_clamp, 1.0, None)
  return kron_transform(
      P.momentum(b1),
      P.whiten(eps),
      P.kl_factor_update(b2),
      P.ema_eigenvalues(b2, init_factor=init_factor, max_clamp=max_clamp),
      P.qr_basis_refresh(precondition_frequency, tolerance=refresh_tolerance,
                         max_iters=refresh_max_iters),
      state_dtype=state_dtype,
      **_blocking(block_size, max_precond_dim),
  )


def with_adam_fallback(
    preconditioner: optax.GradientTransformation,
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: Any,
    weight_decay_mask: Any,
    *,
    max_precond_dim: int | None,
    precondition_mask: Any,
    block_size: int | None = None,
    adam_learning_rate: optax.ScalarOrSchedule | None,
    adam_b1: Any,
    adam_b2: Any,
    adam_eps: Any,
    adam_weight_decay: Any,
) -> optax.GradientTransformationExtraArgs:
  """Completes a preconditioner into an optimizer and routes other leaves to AdamW.

  Preconditioned leaves get ``−lr · (U + weight_decay · W)`` (decoupled weight
  decay at every step, the first included); the others get
  ``optax.adamw(adam_learning_rate or learning_rate, adam_b1, adam_b2, adam_eps,
  weight_decay=adam_weight_decay or weight_decay)``. A preconditioned tensor
  whose gradient, statistics or update would not be finite skips the step (see
  :func:`kl_optax.kron_transform`); the AdamW branch zeroes non-finite
  gradient entries (:func:`kl_optax.zero_nonfinite`); gradients that do not
  match the state raise an error naming the leaf
  (:func:`kl_optax.check_gradients`). The split follows
  :func:`kl_optax.kron_labels` (with ``block_size``, leaves with large dims stay
  in the Kronecker branch and are blocked there).
  """
  blocking = _blocking(block_size, max_precond_dim)
  check_range("weight_decay", weight_decay, 0.0, None)

  def labels(params):
    return routing.kron_labels(params, blocking["max_precond_dim"], precondition_mask,
                               block_size=blocking["block_size"])

  kron_branch = optax.chain(
      preconditioner,
      optax.add_decayed_weights(weight_decay, weight_decay_mask),
      optax.scale_by_learning_rate(learning_rate),
  )
  adam_branch = optax.adamw(
      learning_rate=learning_rate if adam_learning_rate is None else adam_learning_rate,
      b1=adam_b1,
      b2=adam_b2,
      eps=adam_eps,
      weight_decay=weight_decay if adam_weight_decay is None else adam_weight_decay,
      mask=weight_decay_mask,
  )
  # The Kronecker branch guards its own state per tensor (kron_transform); the
  # AdamW branch zeroes non-finite gradient entries (elementwise, fused).
  return check_gradients(optax.partition(
      {routing.KRON: kron_branch, routing.FALLBACK: optax.chain(zero_nonfinite(), adam_branch)},
      labels))


_FALLBACK_ARGS_DOC = """weight_decay_mask: pytree of bools (or a function of the params returning
      one): where weight decay applies, in both branches. ``None``: everywhere.
    precondition_mask: pytree of bools, or a function of the params returning
      one (see :func:`kl_optax.exclude`): ``False`` sends a leaf to AdamW.
    max_precond_dim: largest dim preconditioned whole (``None``: 10,000).
      Decides shapes, so it must be static.
    block_size: cut dims larger than ``max_precond_dim`` into blocks of at most
      this length, each block with its own preconditioner (``None``: such
      tensors go to AdamW instead). Static; at most ``max_precond_dim``.
    refresh_tolerance: adaptive basis refresh (``docs/math.md``, "Adaptive basis refresh"): a factor
      keeps its basis while ``off(QᵀSQ) ≤ refresh_tolerance · ‖S‖_F``.
    refresh_max_iters: largest number of QR iterations per refresh (``None``:
      1). Static.
    state_dtype: storage dtype of moments, factors and bases (``None``:
      float32; ``"bfloat16"`` halves their memory).
    adam_learning_rate: AdamW's learning rate (``None``: ``learning_rate``).
    adam_b1: AdamW's first-moment decay.
    adam_b2: AdamW's second-moment decay.
    adam_eps: AdamW's epsilon.
    adam_weight_decay: AdamW's weight decay (``None``: ``weight_decay``)."""

_ROUTING_DOC = """Routing, leaf by leaf: size-1 dims are squeezed; a leaf whose remaining dims
  number at least two and that ``precondition_mask`` does not exclude gets the
  Kronecker preconditioner when its dims are all ≤ ``max_precond_dim``; with
  ``block_size`` set, larger dims are cut into blocks of at most
  ``block_size`` (each block preconditioned on its own), without it such
  tensors go to AdamW. Very thin tensors, whose factors would hold more than
  64 times their own entries (4096 × 2, say), go to AdamW. Scalars, vectors
  (biases, norm scales) and excluded leaves (embeddings and output heads are usually better there) go to AdamW
  with its own hyperparameters. Non-floating leaves raise an error naming the
  leaf."""


def _documented(fn):
  """Fills in the shared argument and routing text, keeping only arguments ``fn`` takes."""
  params = inspect.signature(fn).parameters
  entries = re.split(r"\n    (?=\w+: )", _FALLBACK_ARGS_DOC)
  fallback = "\n    ".join(e for e in entries if e.split(":")[0] in params)
  fn.__doc__ = fn.__doc__.replace("{fallback_args}", fallback).replace("{routing}", _ROUTING_DOC)
  return fn


def _complete(preconditioner, learning_rate, weight_decay, weight_decay_mask, fallback):
  return with_adam_fallback(preconditioner, learning_rate, weight_decay, weight_decay_mask,
                            **fallback)


def _fallback(precondition_mask, max_precond_dim, adam_learning_rate, adam_b1, adam_b2,
              adam_eps, adam_weight_decay, block_size=None):
  return dict(max_precond_dim=max_precond_dim, block_size=block_size,
              precondition_mask=precondition_mask,
              adam_learning_rate=adam_learning_rate, adam_b1=adam_b1, adam_b2=adam_b2,
              adam_eps=adam_eps, adam_weight_decay=adam_weight_decay)


@_documented
def kl_shampoo(
    learning_rate: optax.ScalarOrSchedule,
    b1: Any = 0.9,
    b2: Any = 0.98,
    eps: Any = 1e-8,
    weight_decay: Any = 0.01,
    precondition_frequency: Any = 10,
    init_factor: Any = 0.1,
    max_clamp: Any = 4000,
    *,
    weight_decay_mask: Any = None,
    precondition_mask: Any = None,
    max_precond_dim: int | None = None,
    refresh_tolerance: Any = None,
    refresh_max_iters: int | None = None,
    state_dtype: Any = None,
    block_size: int | None = None,
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
    adam_b1: Any = 0.9,
    adam_b2: Any = 0.999,
    adam_eps: Any = 1e-8,
    adam_weight_decay: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""KL-Shampoo: Shampoo's Kronecker factors fitted by KL minimization.

  Preconditioned leaves get ``−learning_rate · (U + weight_decay · W)`` with
  ``U`` from :func:`scale_by_kl_shampoo` (see there for the math); every other
  leaf gets AdamW.

  {routing}

  Args:
    learning_rate: a float or an ``optax`` schedule.
    b1: momentum keep factor.
    b2: keep factor of the factors and eigenvalue estimates.
    eps: added to ``sqrt(∏ λ)`` in the denominator.
    weight_decay: decoupled weight decay, applied as ``lr · wd · W`` at every
      step including the first.
    precondition_frequency: refresh the eigenbases every this many steps.
    init_factor: initial eigenvalue estimate (see :func:`scale_by_kl_shampoo`).
    max_clamp: bound in the eigenvalue floor ``1/c_k²``.
    {fallback_args}

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, kl_optax
    >>> params = {'w': jnp.zeros((8, 4)), 'b': jnp.zeros((4,))}
    >>> tx = kl_optax.kl_shampoo(learning_rate=3e-3)
    >>> state = tx.init(params)
    >>> loss = lambda p: jnp.sum((jnp.ones((2, 8)) @ p['w'] + p['b'] - 1.0) ** 2)
    >>> for _ in range(3):
    ...   grads = jax.grad(loss)(params)
    ...   updates, state = tx.update(grads, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> bool(loss(params) < 8.0)
    True

  References:
    Lin et al., `Understanding and Improving Shampoo and SOAP via
    Kullback-Leibler Minimization <https://arxiv.org/abs/2509.03378>`_, 2025.
  """
  return _complete(
      scale_by_kl_shampoo(b1, b2, eps, precondition_frequency, init_factor, max_clamp,
                          refresh_tolerance=refresh_tolerance,
                          refresh_max_iters=refresh_max_iters, state_dtype=state_dtype,
          block_size=block_size, max_precond_dim=max_precond_dim),
      learning_rate, weight_decay, weight_decay_mask,
      _fallback(precondition_mask, max_precond_dim, adam_learning_rate, adam_b1, adam_b2,
                adam_eps, adam_weight_decay, block_size))


def scale_by_kl_soap(
    b1: Any = 0.9,
    b2: Any = 0.98,
    eps: Any = 1e-8,
    precondition_frequency: Any = 10,
    init_factor: Any = 0.1,
    max_clamp: Any = 4000,
    *,
    refresh_tolerance: Any = None,
    refresh_max_iters: int | None = None,
    state_dtype: Any = None,
    block_size: int | None = None,
    max_precond_dim: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales updates by KL-SOAP: Adam in the eigenbasis of KL-fitted factors.

  SOAP with its factor average replaced by the KL factor update of
  :func:`scale_by_kl_shampoo` (``docs/math.md``, "KL-SOAP"). The eigenvalue estimates
  ``λ_k`` only whiten the factor updates; they never enter the direction. Per
  step ``t ≥ 1``, with ``G̃ = P(G)`` in the current basis:

  .. math::

     \tilde m &\leftarrow b_1 \tilde m + (1 - b_1) \tilde G, \qquad
     \tilde v \leftarrow b_2 \tilde v + (1 - b_2) \tilde G^2 \\
     U &= P^\top\big(\tilde m \oslash (\sqrt{\tilde v} + \epsilon)\big)
     \quad\text{(no bias correction)}

  then the factor and eigenvalue statistics of KL-Shampoo with this step's
  gradient, and on refresh steps the new basis, into which ``m̃`` is rotated
  (``ṽ`` is not). The first update initializes as KL-Shampoo and returns zero.

  Args:
    b1: first-moment keep factor.
    b2: keep factor of the second moment, the factors and the eigenvalue estimates.
    eps: added to ``sqrt(ṽ)``.
    precondition_frequency: refresh the bases every this many steps.
    init_factor: initial eigenvalue estimate.
    max_clamp: bound in the eigenvalue floor ``1/c_k²``.
    refresh_tolerance: adaptive basis refresh; ``None`` refreshes every time.
    refresh_max_iters: largest number of QR iterations per refresh (``None``:
      1). Static.
    state_dtype: storage dtype of moments, factors and bases.
    block_size: cut dims larger than ``max_precond_dim`` into blocks of this
      length, each preconditioned on its own (``None``: no blocking). Static.
    max_precond_dim: the largest dim kept whole when ``block_size`` is set
      (``None``: 10,000). Static.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp, kl_optax
    >>> tx = kl_optax.scale_by_kl_soap()
    >>> state = tx.init(jnp.zeros((3, 4)))
    >>> sorted(state.groups[0].slots)      # m̃, ṽ and the counters
    ['mu_eig', 'nonfinite_skips', 'nu_eig', 'refresh_failures', 'refreshes']
    >>> u, state = tx.update(jnp.ones((3, 4)), state)   # initialization: zero
    >>> float(jnp.abs(u).max())
    0.0

  References:
    Lin et al., `Understanding and Improving Shampoo and SOAP via
    Kullback-Leibler Minimization <https://arxiv.org/abs/2509.03378>`_, 2025.
  """
  _check_common(b1, b2, eps, precondition_frequency)
  check_range("init_factor", init_factor, 0.0, None, low_open=True)
  check_range("max_clamp", max_clamp, 1.0, None)
  return kron_transform(
      P.adam_in_eigenbasis(b1, b2, eps),
      P.kl_factor_update(b2),
      P.ema_eigenvalues(b2, init_factor=init_factor, max_clamp=max_clamp),
      P.qr_basis_refresh(precondition_frequency, tolerance=refresh_tolerance,
                         max_iters=refresh_max_iters, rotate_slots=("mu_eig",)),
      state_dtype=state_dtype,
      **_blocking(block_size, max_precond_dim),
  )


@_documented
def kl_soap(
    learning_rate: optax.ScalarOrSchedule,
    b1: Any = 0.9,
    b2: Any = 0.98,
    eps: Any = 1e-8,
    weight_decay: Any = 0.01,
    precondition_frequency: Any = 10,
    init_factor: Any = 0.1,
    max_clamp: Any = 4000,
    *,
    weight_decay_mask: Any = None,
    precondition_mask: Any = None,
    max_precond_dim: int | None = None,
    refresh_tolerance: Any = None,
    refresh_max_iters: int | None = None,
    state_dtype: Any = None,
    block_size: int | None = None,
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
    adam_b1: Any = 0.9,
    adam_b2: Any = 0.999,
    adam_eps: Any = 1e-8,
    adam_weight_decay: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""KL-SOAP: Adam in the eigenbasis of Kronecker factors fitted by KL minimization.

  Preconditioned leaves get ``−learning_rate · (U + weight_decay · W)`` with
  ``U`` from :func:`scale_by_kl_soap`; every other leaf gets AdamW.

  {routing}

  Args:
    learning_rate: a float or an ``optax`` schedule.
    b1: first-moment keep factor.
    b2: keep factor of the second moment, factors and eigenvalue estimates.
    eps: added to ``sqrt(ṽ)``.
    weight_decay: decoupled weight decay (every step, the first included).
    precondition_frequency: refresh the eigenbases every this many steps.
    init_factor: initial eigenvalue estimate of the factor updates.
    max_clamp: bound in the eigenvalue floor ``1/c_k²``.
    {fallback_args}

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp, kl_optax
    >>> tx = kl_optax.kl_soap(learning_rate=3e-3)
    >>> params = {'w': jnp.zeros((8, 4)), 'b': jnp.zeros((4,))}
    >>> state = tx.init(params)
    >>> kl_optax.kron_labels(params)
    {'b': 'adam', 'w': 'kron'}

  References:
    Lin et al., `Understanding and Improving Shampoo and SOAP via
    Kullback-Leibler Minimization <https://arxiv.org/abs/2509.03378>`_, 2025.
  """
  return _complete(
      scale_by_kl_soap(b1, b2, eps, precondition_frequency, init_factor, max_clamp,
                       refresh_tolerance=refresh_tolerance,
                       refresh_max_iters=refresh_max_iters, state_dtype=state_dtype,
          block_size=block_size, max_precond_dim=max_precond_dim),
      learning_rate, weight_decay, weight_decay_mask,
      _fallback(precondition_mask, max_precond_dim, adam_learning_rate, adam_b1, adam_b2,
                adam_eps, adam_weight_decay, block_size))


def scale_by_soap(
    b1: Any = 0.95,
    b2: Any = 0.95,
    eps: Any = 1e-8,
    precondition_frequency: Any = 10,
    *,
    refresh_tolerance: Any = None,
    refresh_max_iters: int | None = None,
    state_dtype: Any = None,
    block_size: int | None = None,
    max_precond_dim: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales updates by SOAP: Adam in the eigenbasis of Shampoo's factors.

  Per step ``t ≥ 1`` (``docs/math.md``, "The baselines"), with ``G̃ = P(G)``:
  ``m̃ ← b1 m̃ + (1−b1) G̃``, ``ṽ ← b2 ṽ + (1−b2) G̃²``,
  ``U = sqrt(1 − b2^t)/(1 − b1^t) · Pᵀ(m̃ ⊘ (sqrt(ṽ) + eps))``, then
  ``S_k ← b2 S_k + (1−b2) G_(k) G_(k)ᵀ`` and, every ``precondition_frequency``
  steps, a refresh: the basis columns are sorted by the eigenvalue estimates
  ``diag(Q_kᵀ S_k Q_k)`` (``ṽ`` permuted to match), one power step + QR gives
  the new basis and ``m̃`` is rotated into it. The first update initializes
  ``S_k = (1−b2) G_(k)G_(k)ᵀ`` and ``Q_k`` by ``eigh``, and returns zero.

  Differences from the SOAP authors' code: the gradient is not cast to
  bfloat16 (all statistics are float32); dims larger than ``max_precond_dim``
  route the whole tensor to AdamW instead of leaving that one dim
  unpreconditioned; 1-D tensors are never preconditioned; dimension merging is
  not offered.

  Args:
    b1: first-moment keep factor.
    b2: keep factor of the second moment and the factors.
    eps: added to ``sqrt(ṽ)``.
    precondition_frequency: refresh the bases every this many steps.
    refresh_tolerance: adaptive basis refresh; ``None`` refreshes every time.
    refresh_max_iters: largest number of QR iterations per refresh (``None``:
      1). Static.
    state_dtype: storage dtype of moments, factors and bases.
    block_size: cut dims larger than ``max_precond_dim`` into blocks of this
      length, each preconditioned on its own (``None``: no blocking). Static.
    max_precond_dim: the largest dim kept whole when ``block_size`` is set
      (``None``: 10,000). Static.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp, kl_optax
    >>> tx = kl_optax.scale_by_soap()
    >>> state = tx.init(jnp.zeros((3, 4)))
    >>> sorted(state.groups[0].slots)
    ['mu_eig', 'nonfinite_skips', 'nu_eig', 'refresh_failures', 'refreshes']

  References:
    Vyas et al., `SOAP: Improving and Stabilizing Shampoo using Adam
    <https://arxiv.org/abs/2409.11321>`_, 2024.
  """
  _check_common(b1, b2, eps, precondition_frequency)
  return kron_transform(
      P.adam_in_eigenbasis(b1, b2, eps, bias_correction=True),
      P.shampoo_factor_update(b2),
      P.qr_basis_refresh(precondition_frequency, tolerance=refresh_tolerance,
                         max_iters=refresh_max_iters, sort=True,
                         rotate_slots=("mu_eig",), permute_slots=("nu_eig",)),
      state_dtype=state_dtype,
      **_blocking(block_size, max_precond_dim),
  )


@_documented
def soap(
    learning_rate: optax.ScalarOrSchedule = 3e-3,
    b1: Any = 0.95,
    b2: Any = 0.95,
    eps: Any = 1e-8,
    weight_decay: Any = 0.01,
    precondition_frequency: Any = 10,
    *,
    weight_decay_mask: Any = None,
    precondition_mask: Any = None,
    max_precond_dim: int | None = None,
    refresh_tolerance: Any = None,
    refresh_max_iters: int | None = None,
    state_dtype: Any = None,
    block_size: int | None = None,
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
    adam_b1: Any = 0.9,
    adam_b2: Any = 0.999,
    adam_eps: Any = 1e-8,
    adam_weight_decay: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""SOAP: Adam in the eigenbasis of Shampoo's Kronecker factors (a baseline).

  Preconditioned leaves get ``−learning_rate · (U + weight_decay · W)`` with
  ``U`` from :func:`scale_by_soap` (see there, including where this differs
  from the authors' code); every other leaf gets AdamW.

  {routing}

  Args:
    learning_rate: a float or an ``optax`` schedule.
    b1: first-moment keep factor.
    b2: keep factor of the second moment and the factors.
    eps: added to ``sqrt(ṽ)``.
    weight_decay: decoupled weight decay (every step, the first included).
    precondition_frequency: refresh the eigenbases every this many steps.
    {fallback_args}

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp, kl_optax
    >>> tx = kl_optax.soap()
    >>> state = tx.init({'w': jnp.zeros((8, 4))})

  References:
    Vyas et al., `SOAP: Improving and Stabilizing Shampoo using Adam
    <https://arxiv.org/abs/2409.11321>`_, 2024.
  """
  return _complete(
      scale_by_soap(b1, b2, eps, precondition_frequency, refresh_tolerance=refresh_tolerance,
                    refresh_max_iters=refresh_max_iters, state_dtype=state_dtype,
          block_size=block_size, max_precond_dim=max_precond_dim),
      learning_rate, weight_decay, weight_decay_mask,
      _fallback(precondition_mask, max_precond_dim, adam_learning_rate, adam_b1, adam_b2,
                adam_eps, adam_weight_decay, block_size))


def scale_by_shampoo(
    b1: Any = 0.9,
    b2: Any = 0.99,
    eps: Any = 1e-12,
    precondition_frequency: Any = 10,
    *,
    graft_eps: Any = 1e-8,
    refresh_tolerance: Any = None,
    state_dtype: Any = None,
    block_size: int | None = None,
    max_precond_dim: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales updates by Shampoo with Adam grafting (a baseline).

  Per step ``t ≥ 1`` (``docs/math.md``, "The baselines"):

  1. ``D = (⊗_k (S_k + eps I)^{-1/(2K)}) G``, through the eigendecompositions
     ``S_k = Q_k diag(λ_k) Q_kᵀ`` of the last refresh;
  2. grafting: ``D`` is rescaled to the Frobenius norm of Adam's direction
     ``G / (sqrt(ν̂) + graft_eps)``, ``ν ← b2 ν + (1 − b2) G²`` (bias-corrected);
  3. momentum on the grafted direction, ``m ← b1 m + (1 − b1) D``, bias-corrected;
  4. ``S_k ← b2 S_k + (1 − b2) G_(k) G_(k)ᵀ``;
  5. every ``precondition_frequency`` steps ``λ_k, Q_k = eigh(S_k)``.

  The first update initializes ``S_k = (1−b2) G_(k)G_(k)ᵀ`` and its
  eigendecomposition, and returns zero.

  Args:
    b1: momentum keep factor.
    b2: keep factor of the factors and of the grafting second moment.
    eps: added to the factors' eigenvalues.
    precondition_frequency: recompute the eigendecompositions every this many steps.
    graft_eps: Adam's epsilon in the grafting direction.
    refresh_tolerance: skip a factor's eigendecomposition while its basis still
      satisfies the criterion of :func:`kl_optax.eigh_basis_refresh`.
    state_dtype: storage dtype of moments, factors and bases.
    block_size: cut dims larger than ``max_precond_dim`` into blocks of this
      length, each preconditioned on its own (``None``: no blocking). Static.
    max_precond_dim: the largest dim kept whole when ``block_size`` is set
      (``None``: 10,000). Static.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp, kl_optax
    >>> tx = kl_optax.scale_by_shampoo()
    >>> state = tx.init(jnp.zeros((3, 4)))

  References:
    Gupta, Koren, Singer, `Shampoo: Preconditioned Stochastic Tensor
    Optimization <https://arxiv.org/abs/1802.09568>`_, 2018.
  """
  _check_common(b1, b2, eps, precondition_frequency)
  check_range("graft_eps", graft_eps, 0.0, None)
  return kron_transform(
      P.inverse_root(eps),
      P.adam_grafting(b2, graft_eps),
      P.momentum(b1, bias_correction=True),
      P.shampoo_factor_update(b2),
      P.eigh_basis_refresh(precondition_frequency, tolerance=refresh_tolerance),
      state_dtype=state_dtype,
      **_blocking(block_size, max_precond_dim),
  )


@_documented
def shampoo(
    learning_rate: optax.ScalarOrSchedule,
    b1: Any = 0.9,
    b2: Any = 0.99,
    eps: Any = 1e-12,
    weight_decay: Any = 0.01,
    precondition_frequency: Any = 10,
    *,
    graft_eps: Any = 1e-8,
    weight_decay_mask: Any = None,
    precondition_mask: Any = None,
    max_precond_dim: int | None = None,
    refresh_tolerance: Any = None,
    state_dtype: Any = None,
    block_size: int | None = None,
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
    adam_b1: Any = 0.9,
    adam_b2: Any = 0.999,
    adam_eps: Any = 1e-8,
    adam_weight_decay: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Shampoo with Adam grafting (a baseline).

  Preconditioned leaves get ``−learning_rate · (U + weight_decay · W)`` with
  ``U`` from :func:`scale_by_shampoo`; every other leaf gets AdamW.

  {routing}

  Args:
    learning_rate: a float or an ``optax`` schedule.
    b1: momentum keep factor.
    b2: keep factor of the factors and of the grafting second moment.
    eps: added to the factors' eigenvalues.
    weight_decay: decoupled weight decay (every step, the first included).
    precondition_frequency: recompute the eigendecompositions every this many steps.
    graft_eps: Adam's epsilon in the grafting direction.
    {fallback_args}

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp, kl_optax
    >>> tx = kl_optax.shampoo(learning_rate=1e-3)
    >>> state = tx.init({'w': jnp.zeros((8, 4))})

  References:
    Gupta, Koren, Singer, `Shampoo: Preconditioned Stochastic Tensor
    Optimization <https://arxiv.org/abs/1802.09568>`_, 2018.
  """
  return _complete(
      scale_by_shampoo(b1, b2, eps, precondition_frequency, graft_eps=graft_eps,
                       refresh_tolerance=refresh_tolerance, state_dtype=state_dtype,
          block_size=block_size, max_precond_dim=max_precond_dim),
      learning_rate, weight_decay, weight_decay_mask,
      _fallback(precondition_mask, max_precond_dim, adam_learning_rate, adam_b1, adam_b2,
                adam_eps, adam_weight_decay, block_size))


def scale_by_eshampoo(
    b1: Any = 0.9,
    b2: Any = 0.95,
    eps: Any = 1e-8,
    precondition_frequency: Any = 10,
    *,
    refresh_tolerance: Any = 0.01,
    refresh_max_iters: int | None = None,
    state_dtype: Any = None,
    block_size: int | None = None,
    max_precond_dim: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales updates by eigenvalue-corrected Shampoo (EShampoo, a baseline).

  Per step ``t ≥ 1`` (``docs/math.md``, "The baselines"): momentum in original coordinates
  ``m ← b1 m + (1 − b1) G`` (``m̂ = m/(1 − b1^t)``); corrected eigenvalues
  ``D ← b2 D + (1 − b2) P(G)²`` in the current basis (never rotated);
  ``U = Pᵀ( P(m̂) ⊘ (sqrt(D/(1 − b2^t)) + eps) )``; factors
  ``S_k ← b2 S_k + (1 − b2) G_(k)G_(k)ᵀ``; and every
  ``precondition_frequency`` steps the adaptive refresh
  (``docs/math.md``, "Adaptive basis refresh"; default tolerance 0.01 and one
  QR iteration, the defaults of Meta's ``distributed_shampoo``). The first update initializes the factors and
  ``eigh`` bases and returns zero.

  Args:
    b1: momentum keep factor.
    b2: keep factor of ``D`` and of the factors.
    eps: added to ``sqrt(D̂)``.
    precondition_frequency: check (and refresh) the bases every this many steps.
    refresh_tolerance: relative off-diagonal tolerance; ``None`` or 0 always refreshes.
    refresh_max_iters: largest number of QR iterations per refresh (``None``:
      1). Static.
    state_dtype: storage dtype of moments, factors and bases.
    block_size: cut dims larger than ``max_precond_dim`` into blocks of this
      length, each preconditioned on its own (``None``: no blocking). Static.
    max_precond_dim: the largest dim kept whole when ``block_size`` is set
      (``None``: 10,000). Static.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp, kl_optax
    >>> tx = kl_optax.scale_by_eshampoo()
    >>> state = tx.init(jnp.zeros((3, 4)))

  References:
    Eschenhagen et al., `Purifying Shampoo: Investigating Shampoo's Heuristics
    by Decomposing its Preconditioner <https://arxiv.org/abs/2506.03595>`_, 2025.
  """
  _check_common(b1, b2, eps, precondition_frequency)
  return kron_transform(
      P.momentum(b1, bias_correction=True),
      P.eigenvalue_corrected_whiten(b2, eps),
      P.shampoo_factor_update(b2),
      P.qr_basis_refresh(precondition_frequency, tolerance=refresh_tolerance,
                         max_iters=refresh_max_iters),
      state_dtype=state_dtype,
      **_blocking(block_size, max_precond_dim),
  )


@_documented
def eshampoo(
    learning_rate: optax.ScalarOrSchedule,
    b1: Any = 0.9,
    b2: Any = 0.95,
    eps: Any = 1e-8,
    weight_decay: Any = 0.01,
    precondition_frequency: Any = 10,
    *,
    weight_decay_mask: Any = None,
    precondition_mask: Any = None,
    max_precond_dim: int | None = None,
    refresh_tolerance: Any = 0.01,
    refresh_max_iters: int | None = None,
    state_dtype: Any = None,
    block_size: int | None = None,
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
    adam_b1: Any = 0.9,
    adam_b2: Any = 0.999,
    adam_eps: Any = 1e-8,
    adam_weight_decay: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Eigenvalue-corrected Shampoo with adaptive basis refresh (a baseline).

  Preconditioned leaves get ``−learning_rate · (U + weight_decay · W)`` with
  ``U`` from :func:`scale_by_eshampoo`; every other leaf gets AdamW.

  {routing}

  Args:
    learning_rate: a float or an ``optax`` schedule.
    b1: momentum keep factor.
    b2: keep factor of the corrected eigenvalues and of the factors.
    eps: added to ``sqrt(D̂)``.
    weight_decay: decoupled weight decay (every step, the first included).
    precondition_frequency: check (and refresh) the bases every this many steps.
    {fallback_args}

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp, kl_optax
    >>> tx = kl_optax.eshampoo(learning_rate=1e-3)
    >>> state = tx.init({'w': jnp.zeros((8, 4))})

  References:
    Eschenhagen et al., `Purifying Shampoo: Investigating Shampoo's Heuristics
    by Decomposing its Preconditioner <https://arxiv.org/abs/2506.03595>`_, 2025.
  """
  return _complete(
      scale_by_eshampoo(b1, b2, eps, precondition_frequency,
                        refresh_tolerance=refresh_tolerance,
                        refresh_max_iters=refresh_max_iters, state_dtype=state_dtype,
          block_size=block_size, max_precond_dim=max_precond_dim),
      learning_rate, weight_decay, weight_decay_mask,
      _fallback(precondition_mask, max_precond_dim, adam_learning_rate, adam_b1, adam_b2,
                adam_eps, adam_weight_decay, block_size))


SPIKE_FLAT = "spike_flat"
DENSE = "dense"


def pro_labels(tree, rank: int, restricted_side: str = "larger", *,
               block_size: int | None = None, max_precond_dim: int | None = None):
  """Labels each leaf ``'spike_flat'`` (Pro-KLShampoo factor) or ``'dense'`` (full KL-Shampoo).

  A leaf gets a spike-and-flat factor when its squeezed shape is a matrix
  whose restricted dim is larger than ``rank``; tensors of order three or
  more, matrices with ``rank ≥`` the restricted dim, and (with
  ``block_size``) matrices with a dim larger than ``max_precond_dim``, which are
  blocked, keep full KL-Shampoo factors.

  Examples:
    >>> import jax.numpy as jnp, kl_optax
    >>> tree = {'a': jnp.zeros((8, 64)), 'b': jnp.zeros((8, 16)), 'c': jnp.zeros((4, 4, 4))}
    >>> kl_optax.pro_labels(tree, rank=16)
    {'a': 'spike_flat', 'b': 'dense', 'c': 'dense'}
  """
  def label(leaf):
    sq = squeezed_shape(leaf.shape)
    blocked = block_size is not None and max(sq, default=0) > (max_precond_dim or block_size)
    if len(sq) == 2 and not blocked and sq[pro.restricted_mode(sq, restricted_side)] > rank:
      return SPIKE_FLAT
    return DENSE

  return jax.tree.map(label, tree)


def scale_by_pro_kl_shampoo(
    rank: int = 128,
    b1: Any = 0.9,
    b2: Any = 0.98,
    eps: Any = 1e-8,
    precondition_frequency: Any = 10,
    complement_scale: Any = None,
    ns_steps: int = 5,
    *,
    init_factor: Any = 0.1,
    max_clamp: Any = 4000,
    restricted_side: str = "larger",
    ns_coefficients: Any = "muon",
    ns_dtype: Any = None,
    accumulate: bool = True,
    refresh_tolerance: Any = None,
    refresh_max_iters: int | None = None,
    state_dtype: Any = None,
    block_size: int | None = None,
    max_precond_dim: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales updates by Pro-KLShampoo's preconditioner (``docs/math.md``, "Pro-KLShampoo").

  Each matrix keeps a dense KL-Shampoo factor on one side and a rank-``r``
  spike-and-flat factor ``U diag(λ) Uᵀ + σ (I − UUᵀ)`` on the other (by
  default the larger side). Per step ``t ≥ 1``: momentum
  ``N ← b1 N + (1 − b1) G``; the direction ``Δ∥ + Δ⊥`` of
  :func:`kl_optax.spike_flat_whiten` (KL whitening in the span of ``U``,
  ``κ · NS(X)`` on the complement); the statistics of
  :func:`kl_optax.spike_flat_projection`; the dense basis refresh
  ``Q_a ← qr(S_a Q_a).Q`` every ``precondition_frequency`` steps. The first
  update initializes the statistics and returns zero.

  Tensors whose restricted dim is not larger than ``rank`` and tensors of
  order three or more get the full :func:`scale_by_kl_shampoo` with the same
  hyperparameters (see :func:`pro_labels`), so ``rank ≥ max dim`` is exactly
  KL-Shampoo.

  Args:
    rank: ``r``, tracked directions of the restricted factor (static).
    b1: momentum keep factor.
    b2: keep factor of the factors and eigenvalue estimates.
    eps: added to ``sqrt(λ_a λᵀ)`` (and KL-Shampoo's denominator).
    precondition_frequency: basis and subspace refresh every this many steps.
    complement_scale: ``κ`` of the complement direction (``None``: ``√n``;
      ``"sqrt_complement"``, ``"muon"`` or a number, see
      :func:`kl_optax.spike_flat_whiten`).
    ns_steps: Newton–Schulz iterations.
    init_factor: initial eigenvalue estimate.
    max_clamp: bound in the eigenvalue floors.
    restricted_side: ``"larger"`` (default), ``"smaller"``, ``"rows"`` or
      ``"columns"``: which side of each matrix is restricted.
    ns_coefficients: ``"muon"`` (default), ``"exact"``, a triple or a schedule.
    ns_dtype: Newton–Schulz iteration dtype (``"bfloat16"`` on accelerators).
    accumulate: keep the subspace accumulator ``Y`` (``n × r`` per matrix).
    refresh_tolerance: adaptive refresh of the dense bases (``docs/math.md``,
      "Adaptive basis refresh").
    refresh_max_iters: QR iterations per adaptive refresh (static).
    state_dtype: storage dtype of moments, factors and bases.
    block_size: cut dims larger than ``max_precond_dim`` into blocks of this
      length, each preconditioned on its own (``None``: no blocking). Static.
    max_precond_dim: the largest dim kept whole when ``block_size`` is set
      (``None``: 10,000). Static.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  rank = routing.resolve_static_int(rank, "rank", 128)
  check_range("rank", rank, 1.0, None)
  _check_common(b1, b2, eps, precondition_frequency)
  check_range("ns_steps", ns_steps, 1.0, None)
  pro.restricted_mode((2, 2), restricted_side)
  spike = kron_transform(
      P.momentum(b1),
      pro.spike_flat_whiten(eps, complement_scale=complement_scale, ns_steps=ns_steps,
                            ns_coefficients=ns_coefficients, ns_dtype=ns_dtype,
                            restricted_side=restricted_side),
      pro.spike_flat_projection(rank, b2, precondition_frequency, init_factor=init_factor,
                                max_clamp=max_clamp, restricted_side=restricted_side,
                                accumulate=accumulate),
      P.qr_basis_refresh(precondition_frequency, tolerance=refresh_tolerance,
                         max_iters=refresh_max_iters),
      state_dtype=state_dtype,
  )
  dense = scale_by_kl_shampoo(b1, b2, eps, precondition_frequency, init_factor, max_clamp,
                              refresh_tolerance=refresh_tolerance,
                              refresh_max_iters=refresh_max_iters, state_dtype=state_dtype,
                              block_size=block_size, max_precond_dim=max_precond_dim)
  return optax.partition(
      {SPIKE_FLAT: spike, DENSE: dense},
      lambda tree: pro_labels(tree, rank, restricted_side, **_blocking(block_size, max_precond_dim)))


@_documented
def pro_kl_shampoo(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 128,
    b1: Any = 0.9,
    b2: Any = 0.98,
    eps: Any = 1e-8,
    weight_decay: Any = 0.01,
    precondition_frequency: Any = 10,
    complement_scale: Any = None,
    ns_steps: int = 5,
    *,
    init_factor: Any = 0.1,
    max_clamp: Any = 4000,
    restricted_side: str = "larger",
    ns_coefficients: Any = "muon",
    ns_dtype: Any = None,
    accumulate: bool = True,
    weight_decay_mask: Any = None,
    precondition_mask: Any = None,
    max_precond_dim: int | None = None,
    refresh_tolerance: Any = None,
    refresh_max_iters: int | None = None,
    state_dtype: Any = None,
    block_size: int | None = None,
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
    adam_b1: Any = 0.9,
    adam_b2: Any = 0.999,
    adam_eps: Any = 1e-8,
    adam_weight_decay: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Pro-KLShampoo: KL-Shampoo with a spike-and-flat factor and an orthogonalized complement.

  Preconditioned leaves get ``−learning_rate · (U + weight_decay · W)`` with
  ``U`` from :func:`scale_by_pro_kl_shampoo`; every other leaf gets AdamW.
  Matrices whose restricted side is at most ``rank`` (and tensors of order
  three or more) get full KL-Shampoo.

  The method is reconstructed from the paper's abstract and KL-Shampoo's
  math (``docs/math.md``, "Pro-KLShampoo"); the choices the abstract leaves open are
  options: ``complement_scale``, ``restricted_side``, ``accumulate``,
  ``ns_coefficients``.

  {routing}

  Args:
    learning_rate: a float or an ``optax`` schedule.
    rank: tracked directions of the restricted factor (static).
    b1: momentum keep factor.
    b2: keep factor of the factors and eigenvalue estimates.
    eps: added to the whitening denominator.
    weight_decay: decoupled weight decay (every step, the first included).
    precondition_frequency: basis and subspace refresh every this many steps.
    complement_scale: ``κ`` of the complement direction (``None``: ``√n``).
    ns_steps: Newton–Schulz iterations.
    init_factor: initial eigenvalue estimate.
    max_clamp: bound in the eigenvalue floors.
    restricted_side: which side of each matrix is restricted (``"larger"``).
    ns_coefficients: Newton–Schulz coefficients (``"muon"``, ``"exact"``, …).
    ns_dtype: Newton–Schulz iteration dtype.
    accumulate: keep the subspace accumulator (``n × r`` per matrix).
    {fallback_args}

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, kl_optax
    >>> params = {'w': jnp.zeros((8, 32)), 'b': jnp.zeros((32,))}
    >>> tx = kl_optax.pro_kl_shampoo(learning_rate=3e-3, rank=4)
    >>> state = tx.init(params)
    >>> x = jax.random.normal(jax.random.key(0), (16, 8))
    >>> loss = lambda p: jnp.mean((x @ p['w'] + p['b'] - 1.0) ** 2)
    >>> for _ in range(5):
    ...   updates, state = tx.update(jax.grad(loss)(params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> bool(loss(params) < 1.0)
    True

  References:
    Sun & Wei, `Pro-KLShampoo: Projected KL-Shampoo with Whitening Recovered by
    Orthogonalization <https://arxiv.org/abs/2605.06316>`_, 2026.
  """
  return _complete(
      scale_by_pro_kl_shampoo(
          rank, b1, b2, eps, precondition_frequency, complement_scale, ns_steps,
          init_factor=init_factor, max_clamp=max_clamp, restricted_side=restricted_side,
          ns_coefficients=ns_coefficients, ns_dtype=ns_dtype, accumulate=accumulate,
          refresh_tolerance=refresh_tolerance, refresh_max_iters=refresh_max_iters,
          state_dtype=state_dtype,
          block_size=block_size, max_precond_dim=max_precond_dim),
      learning_rate, weight_decay, weight_decay_mask,
      _fallback(precondition_mask, max_precond_dim, adam_learning_rate, adam_b1, adam_b2,
                adam_eps, adam_weight_decay, block_size))
