r"""Ready-made optimizers: short compositions of the parts.

``scale_by_<algo>`` preconditions only (no learning rate, no sign flip, no
weight decay) and accepts only tensors that can carry a Kronecker
preconditioner; ``<algo>`` is the complete optimizer: the preconditioner chained
with decoupled weight decay and the learning rate, and routed with
``optax.partition`` so that every other leaf goes to AdamW
(``with_adam_fallback``).

Numeric hyperparameters are flat keywords (schedulable with
``optax.inject_hyperparams``); the static choices are two objects,
``layout=kl_optax.Layout(...)`` (routing, blocking, storage dtype) and
``fallback=kl_optax.Fallback(...)`` (AdamW's settings). Every recipe is
listed, with what its tests and benchmarks need, in ``RECIPES``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import optax

from kl_optax import parts as P
from kl_optax import pro
from kl_optax import routing
from kl_optax import options
from kl_optax import safety
from kl_optax import validation
from kl_optax import state as state_lib
from kl_optax import transform



def _check_common(b1, b2, eps, precondition_frequency):
  validation.check_range("b1", b1, 0.0, 1.0)
  validation.check_range("b2", b2, 0.0, 1.0)
  validation.check_range("eps", eps, 0.0, None)
  validation.check_range("precondition_frequency", precondition_frequency, 1.0, None)


def scale_by_kl_shampoo(
    b1: float = 0.9,
    b2: float = 0.98,
    eps: float = 1e-8,
    precondition_frequency: int = 10,
    init_factor: float | str = "spectrum",
    max_clamp: float | None = 4000,
    *,
    refresh_tolerance: float | None = None,
    refresh_max_iters: int | None = None,
    damping: float = 0.0,
    normalize_update: bool = False,
    update_order: str = "jacobi",
    dimension_numbers: Any = None,
    layout: options.Layout | None = None,
    **legacy: Any,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales updates by KL-Shampoo's Kronecker preconditioner.

  For a tensor ``G`` of shape ``(d_1, …, d_K)`` the factors
  ``S = S_1 ⊗ … ⊗ S_K`` are fitted to the gradient second moment by minimizing
  ``KL(N(0, E[ggᵀ]) ‖ N(0, S))``; the update is
  ``Δ = (⊗_k Ŝ_k^{-1/2}) m`` with ``m`` the momentum. Per step ``t ≥ 1``:

  $$
  \begin{aligned}
  m &\leftarrow b_1 m + (1 - b_1) G \\
  U &= P^\top\!\big(P(m) \oslash (\sqrt{\textstyle\prod_k \lambda_k} + \epsilon)\big) \\
  S_k &\leftarrow b_2 S_k + \tfrac{1 - b_2}{n_k}
        G_{(k)} \big(\textstyle\bigotimes_{j \ne k} \hat S_j^{-1}\big) G_{(k)}^\top \\
  \lambda_k &\leftarrow \max\big(b_2 \lambda_k + (1 - b_2)\,\delta_k,\ 1/c_k^2\big) \\
  Q_k &\leftarrow \operatorname{qr}(S_k Q_k).Q
        \quad\text{if } t \bmod \text{precondition\_frequency} = 0
  \end{aligned}
  $$

  The first update initializes ``S_k`` from the gradient, ``Q_k`` from its
  eigenvectors and ``λ_k`` from the gradient's marginal second moments
  (``init_factor="spectrum"``, [`kl_optax.initial_eigenvalues`][kl_optax.parts.initial_eigenvalues]), and
  returns zero. With a constant ``init_factor=c`` (the paper's rule, ``c =
  0.1``) ``λ_k = c`` and the second update is exactly
  ``(1 − b1) G / (c^{K/2} + eps)``.

  Every leaf must have at least two dims larger than one (size-1 dims are
  squeezed). [`kl_shampoo`][kl_optax.recipes.kl_shampoo] routes other leaves to AdamW.

  Args:
    b1: momentum keep factor.
    b2: keep factor of the factors and eigenvalue estimates.
    eps: added to ``sqrt(∏ λ)`` in the denominator.
    precondition_frequency: refresh the bases every this many steps.
    init_factor: the starting eigenvalue estimates: ``"spectrum"`` (from the
      first gradient's marginal second moments, scale-free), ``"rms"`` (its
      mean square split over the modes) or a positive constant (the paper's
      0.1; the second update is then ``(1 − b1) G / init_factor^{K/2}``, and
      the estimates need ~1/(1 − b2) steps to forget it). On the
      character-GPT benchmark (300 steps, docs/benchmarks.md) "spectrum"
      reached 2.043 against 2.070 ("rms"), 2.090 (1e-3) and 2.300 (0.1).
    max_clamp: eigenvalue estimates are kept ≥ ``1 / c_k²`` with
      ``c_k = max(10, min(d_k, max_clamp))``; ``None`` turns the clamp off
      (the authors' ``using_clamping=False``).
    refresh_tolerance: adaptive basis refresh (see
      [`kl_optax.qr_basis_refresh`][kl_optax.parts.qr_basis_refresh]); ``None`` refreshes every time.
    refresh_max_iters: largest number of QR iterations per refresh (``None``:
      1). Static.
    damping: added to the eigenvalue increments, scaled by the other modes'
      mean inverse eigenvalues ([`kl_optax.ema_eigenvalues`][kl_optax.parts.ema_eigenvalues]; the authors'
      ``using_damping`` is ``damping=eps``). 0: none.
    normalize_update: divide each tensor's update by its root mean square
      ([`kl_optax.rms_normalize`][kl_optax.parts.rms_normalize]; the authors' ``normalize_grads``). Static.
    update_order: ``"jacobi"`` (every statistic reads the previous step's
      eigenvalues) or ``"authors"`` (the partly Gauss–Seidel order of the
      authors' code for 3-D tensors; [`kl_optax.kl_statistics`][kl_optax.parts.kl_statistics]). Static.
    dimension_numbers: batch axes (scanned layers, experts) and mode groups
      per leaf ([`kl_optax.dims`][kl_optax.dims]: [`kl_optax.scanned`][kl_optax.dims.scanned], ...); the same
      as ``Layout(dimension_numbers=...)``. Static.
    layout: blocking and storage dtype ([`kl_optax.Layout`][kl_optax.options.Layout]; its masks
      must be unset: a preconditioner routes nothing).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp, optax, kl_optax
    >>> tx = kl_optax.scale_by_kl_shampoo()
    >>> params = jnp.ones((3, 4))
    >>> state = tx.init(params)
    >>> g = jnp.arange(12.0).reshape(3, 4)
    >>> u, state = tx.update(g, state)           # t = 0: initialization
    >>> float(jnp.abs(u).max())
    0.0
    >>> paper = kl_optax.scale_by_kl_shampoo(init_factor=0.1)
    >>> state = paper.init(params)
    >>> u, state = paper.update(g, state)        # t = 0
    >>> u, state = paper.update(g, state)        # t = 1: (1 - b1) g / 0.1
    >>> bool(jnp.allclose(u, g, atol=1e-5))
    True

  References:
    Lin et al., [Understanding and Improving Shampoo and SOAP via
    Kullback-Leibler Minimization](https://arxiv.org/abs/2509.03378), 2025.
  """
  layout, _ = options.resolve("scale_by_kl_shampoo", layout, None, legacy,
                                 dimension_numbers=dimension_numbers, takes_fallback=False)
  _check_common(b1, b2, eps, precondition_frequency)
  return transform.kron_transform(
      P.momentum(b1),
      P.whiten(eps),
      *_kl_statistics(b2, init_factor, max_clamp, damping, update_order),
      P.qr_basis_refresh(precondition_frequency, tolerance=refresh_tolerance,
                         max_iters=refresh_max_iters),
      *([P.rms_normalize()] if normalize_update else []),
      **layout.transform_options(),
  )


def _kl_statistics(b2, init_factor, max_clamp, damping, update_order,
                   shared_products=True) -> list:
  """The statistics parts of KL-Shampoo and KL-SOAP (validated here)."""
  P.check_init_factor(init_factor)
  if max_clamp is not None:
    validation.check_range("max_clamp", max_clamp, 1.0, None)
  validation.check_range("damping", damping, 0.0, None)
  if update_order not in P.UPDATE_ORDERS:
    raise ValueError(f"update_order must be one of {P.UPDATE_ORDERS}, got {update_order!r}.")
  # One part for both statistics: it shares the products of the factor update and
  # the projected gradient (kl_statistics; the same as kl_factor_update + ema_eigenvalues).
  return [P.kl_statistics(b2, order=update_order, init_factor=init_factor, max_clamp=max_clamp,
                          damping=damping, shared_products=shared_products)]


def with_adam_fallback(
    preconditioner: optax.GradientTransformation,
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: float = 0.0,
    *,
    layout: options.Layout | None = None,
    fallback: options.Fallback | None = None,
    spike_threshold: float | None = 10.0,
    **legacy: Any,
) -> optax.GradientTransformationExtraArgs:
  """Completes a preconditioner into an optimizer and routes other leaves to AdamW.

  Preconditioned leaves get ``−lr · (U + weight_decay · W)`` (decoupled weight
  decay at every step, the first included); the others get
  ``optax.adamw`` with the settings of ``fallback`` (its learning rate and
  weight decay default to ``learning_rate`` and ``weight_decay``). The split
  follows ``layout.labels`` ([`kl_optax.kron_labels`][kl_optax.routing.kron_labels]); with
  ``layout.block_size``, leaves with large dims stay in the Kronecker branch
  and are blocked there, so the preconditioner must be built with the same
  layout.

  A leaf's gradient whose norm jumps above ``spike_threshold`` times its
  running average is first scaled back to that ([`kl_optax.spike_guard`][kl_optax.safety.spike_guard]),
  so that a gradient spike enters neither the step nor the statistics. A
  preconditioned tensor whose gradient, statistics or update would not be
  finite skips the step (see [`kl_optax.kron_transform`][kl_optax.transform.kron_transform]); the AdamW
  branch zeroes non-finite gradient entries ([`kl_optax.zero_nonfinite`][kl_optax.safety.zero_nonfinite]);
  gradients that do not match the state raise an error naming the leaf
  ([`kl_optax.check_gradients`][kl_optax.safety.check_gradients]).

  Args:
    preconditioner: the Kronecker branch's preconditioner (a ``scale_by_*``).
    learning_rate: a float or an optax schedule.
    weight_decay: decoupled weight decay of both branches.
    layout: the routing ([`kl_optax.Layout`][kl_optax.options.Layout]).
    fallback: AdamW's settings ([`kl_optax.Fallback`][kl_optax.options.Fallback]).
    spike_threshold: the spike guard's threshold (``None``: no guard).
    **legacy: the keywords ``layout`` and ``fallback`` replaced
      (``precondition_mask=``, ``adam_b1=``, …), accepted with a
      ``DeprecationWarning``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp, kl_optax
    >>> tx = kl_optax.with_adam_fallback(kl_optax.scale_by_kl_shampoo(), 1e-3, 0.01)
    >>> state = tx.init({'w': jnp.zeros((8, 4)), 'b': jnp.zeros(4)})
  """
  layout, fallback = options.resolve("with_adam_fallback", layout, fallback, legacy)
  validation.check_range("weight_decay", weight_decay, 0.0, None)
  kron_branch = optax.chain(
      preconditioner,
      optax.add_decayed_weights(weight_decay, layout.weight_decay_mask),
      optax.scale_by_learning_rate(learning_rate),
  )
  adam_branch = optax.adamw(
      learning_rate=learning_rate if fallback.learning_rate is None else fallback.learning_rate,
      b1=fallback.b1,
      b2=fallback.b2,
      eps=fallback.eps,
      weight_decay=weight_decay if fallback.weight_decay is None else fallback.weight_decay,
      mask=layout.weight_decay_mask,
  )
  # The Kronecker branch guards its own state per tensor (kron_transform); the
  # AdamW branch zeroes non-finite gradient entries (elementwise, fused).
  routed = optax.partition(
      {routing.KRON: kron_branch, routing.FALLBACK: optax.chain(safety.zero_nonfinite(), adam_branch)},
      layout.labels)
  if spike_threshold is not None:
    routed = optax.chain(safety.spike_guard(spike_threshold), routed)
  return safety.check_gradients(routed)


def kl_shampoo(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.98,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    precondition_frequency: int = 10,
    init_factor: float | str = "spectrum",
    max_clamp: float | None = 4000,
    *,
    refresh_tolerance: float | None = None,
    refresh_max_iters: int | None = None,
    damping: float = 0.0,
    normalize_update: bool = False,
    update_order: str = "jacobi",
    dimension_numbers: Any = None,
    layout: options.Layout | None = None,
    fallback: options.Fallback | None = None,
    spike_threshold: float | None = 10.0,
    **legacy: Any,
) -> optax.GradientTransformationExtraArgs:
  r"""KL-Shampoo: Shampoo's Kronecker factors fitted by KL minimization.

  Preconditioned leaves get ``−learning_rate · (U + weight_decay · W)`` with
  ``U`` from [`scale_by_kl_shampoo`][kl_optax.recipes.scale_by_kl_shampoo] (see there for the math); every other
  leaf gets AdamW.

  The static choices are ``layout`` ([`kl_optax.Layout`][kl_optax.options.Layout]: which leaves
  are preconditioned, blocking, storage dtype) and ``fallback``
  ([`kl_optax.Fallback`][kl_optax.options.Fallback]: the AdamW of every other leaf). By default
  every leaf with at least two dims larger than one is preconditioned, and
  scalars and vectors (biases, norm scales) go to AdamW.

  Args:
    learning_rate: a float or an ``optax`` schedule.
    b1: momentum keep factor.
    b2: keep factor of the factors and eigenvalue estimates.
    eps: added to ``sqrt(∏ λ)`` in the denominator.
    weight_decay: decoupled weight decay, applied as ``lr · wd · W`` at every
      step including the first.
    precondition_frequency: refresh the eigenbases every this many steps.
    init_factor: starting eigenvalue estimates: ``"spectrum"`` (default),
      ``"rms"`` or a constant such as the paper's 0.1 (see
      [`scale_by_kl_shampoo`][kl_optax.recipes.scale_by_kl_shampoo]). Static when a name.
    max_clamp: bound in the eigenvalue floor ``1/c_k²`` (``None``: no floor).
    refresh_tolerance: adaptive refresh: a factor keeps its basis while
      ``off(QᵀSQ) ≤ refresh_tolerance · ‖S‖_F`` ([`kl_optax.qr_basis_refresh`][kl_optax.parts.qr_basis_refresh]).
    refresh_max_iters: QR iterations per refresh, at most (``None``: 1). Static.
    damping: eigenvalue-increment damping (see [`scale_by_kl_shampoo`][kl_optax.recipes.scale_by_kl_shampoo]).
    normalize_update: divide each tensor's update by its root mean square
      (the authors' ``normalize_grads``). Static.
    update_order: ``"jacobi"`` or ``"authors"`` (see [`scale_by_kl_shampoo`][kl_optax.recipes.scale_by_kl_shampoo]).
      Static.
    dimension_numbers: batch axes (scanned layers, experts) and mode groups
      per leaf ([`kl_optax.dims`][kl_optax.dims]: [`kl_optax.scanned`][kl_optax.dims.scanned], ...); the same
      as ``Layout(dimension_numbers=...)``. Static.
    layout: routing, blocking, storage dtype ([`kl_optax.Layout`][kl_optax.options.Layout]).
    fallback: the other leaves' AdamW ([`kl_optax.Fallback`][kl_optax.options.Fallback]).
    spike_threshold: a leaf's gradient whose norm exceeds this many times
      its running average is scaled back to it before the optimizer sees it
      ([`kl_optax.spike_guard`][kl_optax.safety.spike_guard]; ``None``: off).
    **legacy: older keywords, see `kl_optax.options`.

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
    Lin et al., [Understanding and Improving Shampoo and SOAP via
    Kullback-Leibler Minimization](https://arxiv.org/abs/2509.03378), 2025.
  """
  layout, fallback = options.resolve("kl_shampoo", layout, fallback, legacy,
                                 dimension_numbers=dimension_numbers)
  return with_adam_fallback(
      scale_by_kl_shampoo(b1, b2, eps, precondition_frequency, init_factor, max_clamp,
                          refresh_tolerance=refresh_tolerance,
                          refresh_max_iters=refresh_max_iters, damping=damping,
                          normalize_update=normalize_update, update_order=update_order,
                          layout=layout.without_masks()),
      learning_rate, weight_decay, layout=layout, fallback=fallback,
      spike_threshold=spike_threshold)


def scale_by_kl_soap(
    b1: float = 0.9,
    b2: float = 0.98,
    eps: float = 1e-8,
    precondition_frequency: int = 10,
    init_factor: float | str = 0.1,
    max_clamp: float | None = 4000,
    *,
    refresh_tolerance: float | None = None,
    refresh_max_iters: int | None = None,
    damping: float = 0.0,
    normalize_update: bool = False,
    update_order: str = "jacobi",
    dimension_numbers: Any = None,
    layout: options.Layout | None = None,
    **legacy: Any,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales updates by KL-SOAP: Adam in the eigenbasis of KL-fitted factors.

  SOAP with its factor average replaced by the KL factor update of
  [`scale_by_kl_shampoo`][kl_optax.recipes.scale_by_kl_shampoo] (``docs/math.md``, "KL-SOAP"). The eigenvalue estimates
  ``λ_k`` only whiten the factor updates; they never enter the direction. Per
  step ``t ≥ 1``, with ``G̃ = P(G)`` in the current basis:

  $$
  \begin{aligned}
  \tilde m &\leftarrow b_1 \tilde m + (1 - b_1) \tilde G, \qquad
  \tilde v \leftarrow b_2 \tilde v + (1 - b_2) \tilde G^2 \\
  U &= P^\top\big(\tilde m \oslash (\sqrt{\tilde v} + \epsilon)\big)
  \quad\text{(no bias correction)}
  \end{aligned}
  $$

  then the factor and eigenvalue statistics of KL-Shampoo with this step's
  gradient, and on refresh steps the new basis, into which ``m̃`` is rotated
  (``ṽ`` is not). The first update initializes as KL-Shampoo and returns zero.

  Args:
    b1: first-moment keep factor.
    b2: keep factor of the second moment, the factors and the eigenvalue estimates.
    eps: added to ``sqrt(ṽ)``.
    precondition_frequency: refresh the bases every this many steps.
    init_factor: starting eigenvalue estimates of the factor updates: a
      constant (the paper's 0.1), ``"spectrum"`` or ``"rms"`` (see
      [`scale_by_kl_shampoo`][kl_optax.recipes.scale_by_kl_shampoo]).
    max_clamp: bound in the eigenvalue floor ``1/c_k²`` (``None``: no floor).
    refresh_tolerance: adaptive basis refresh; ``None`` refreshes every time.
    refresh_max_iters: largest number of QR iterations per refresh (``None``:
      1). Static.
    damping: eigenvalue-increment damping (see [`scale_by_kl_shampoo`][kl_optax.recipes.scale_by_kl_shampoo]).
    normalize_update: divide each tensor's update by its RMS. Static.
    update_order: ``"jacobi"`` or ``"authors"``. Static.
    dimension_numbers: batch axes (scanned layers, experts) and mode groups
      per leaf ([`kl_optax.dims`][kl_optax.dims]: [`kl_optax.scanned`][kl_optax.dims.scanned], ...); the same
      as ``Layout(dimension_numbers=...)``. Static.
    layout: blocking and storage dtype ([`kl_optax.Layout`][kl_optax.options.Layout]; its masks
      must be unset: a preconditioner routes nothing).

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
    Lin et al., [Understanding and Improving Shampoo and SOAP via
    Kullback-Leibler Minimization](https://arxiv.org/abs/2509.03378), 2025.
  """
  layout, _ = options.resolve("scale_by_kl_soap", layout, None, legacy,
                                 dimension_numbers=dimension_numbers, takes_fallback=False)
  _check_common(b1, b2, eps, precondition_frequency)
  return transform.kron_transform(
      P.adam_in_eigenbasis(b1, b2, eps),
      # Separate parts: with shared products the Adam-in-eigenbasis direction turns
      # XLA's layout-dependent rounding into 1e-3 differences between a scanned and an
      # unrolled model after 20 steps (tests/test_dims.py).
      *_kl_statistics(b2, init_factor, max_clamp, damping, update_order,
                     shared_products=False),
      P.qr_basis_refresh(precondition_frequency, tolerance=refresh_tolerance,
                         max_iters=refresh_max_iters, rotate_slots=(state_lib.MU_EIG,)),
      *([P.rms_normalize()] if normalize_update else []),
      **layout.transform_options(),
  )


def kl_soap(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.98,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    precondition_frequency: int = 10,
    init_factor: float | str = 0.1,
    max_clamp: float | None = 4000,
    *,
    refresh_tolerance: float | None = None,
    refresh_max_iters: int | None = None,
    damping: float = 0.0,
    normalize_update: bool = False,
    update_order: str = "jacobi",
    dimension_numbers: Any = None,
    layout: options.Layout | None = None,
    fallback: options.Fallback | None = None,
    spike_threshold: float | None = 10.0,
    **legacy: Any,
) -> optax.GradientTransformationExtraArgs:
  r"""KL-SOAP: Adam in the eigenbasis of Kronecker factors fitted by KL minimization.

  Preconditioned leaves get ``−learning_rate · (U + weight_decay · W)`` with
  ``U`` from [`scale_by_kl_soap`][kl_optax.recipes.scale_by_kl_soap]; every other leaf gets AdamW.

  The static choices are ``layout`` ([`kl_optax.Layout`][kl_optax.options.Layout]: which leaves
  are preconditioned, blocking, storage dtype) and ``fallback``
  ([`kl_optax.Fallback`][kl_optax.options.Fallback]: the AdamW of every other leaf). By default
  every leaf with at least two dims larger than one is preconditioned, and
  scalars and vectors (biases, norm scales) go to AdamW.

  Args:
    learning_rate: a float or an ``optax`` schedule.
    b1: first-moment keep factor.
    b2: keep factor of the second moment, factors and eigenvalue estimates.
    eps: added to ``sqrt(ṽ)``.
    weight_decay: decoupled weight decay (every step, the first included).
    precondition_frequency: refresh the eigenbases every this many steps.
    init_factor: initial eigenvalue estimate of the factor updates: the paper's
      0.1, another constant, ``"spectrum"`` or ``"rms"`` (see
      [`scale_by_kl_shampoo`][kl_optax.recipes.scale_by_kl_shampoo]). KL-SOAP's
      results hardly depend on it (docs/benchmarks.md, "Starting eigenvalue
      estimates").
    max_clamp: bound in the eigenvalue floor ``1/c_k²`` (``None``: no floor).
    refresh_tolerance: adaptive refresh: a factor keeps its basis while
      ``off(QᵀSQ) ≤ refresh_tolerance · ‖S‖_F`` ([`kl_optax.qr_basis_refresh`][kl_optax.parts.qr_basis_refresh]).
    refresh_max_iters: QR iterations per refresh, at most (``None``: 1). Static.
    damping: eigenvalue-increment damping (see [`scale_by_kl_shampoo`][kl_optax.recipes.scale_by_kl_shampoo]).
    normalize_update: divide each tensor's update by its root mean square
      (the authors' ``normalize_grads``). Static.
    update_order: ``"jacobi"`` or ``"authors"`` (see [`scale_by_kl_shampoo`][kl_optax.recipes.scale_by_kl_shampoo]).
      Static.
    dimension_numbers: batch axes (scanned layers, experts) and mode groups
      per leaf ([`kl_optax.dims`][kl_optax.dims]: [`kl_optax.scanned`][kl_optax.dims.scanned], ...); the same
      as ``Layout(dimension_numbers=...)``. Static.
    layout: routing, blocking, storage dtype ([`kl_optax.Layout`][kl_optax.options.Layout]).
    fallback: the other leaves' AdamW ([`kl_optax.Fallback`][kl_optax.options.Fallback]).
    spike_threshold: a leaf's gradient whose norm exceeds this many times
      its running average is scaled back to it before the optimizer sees it
      ([`kl_optax.spike_guard`][kl_optax.safety.spike_guard]; ``None``: off).
    **legacy: older keywords, see `kl_optax.options`.

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
    Lin et al., [Understanding and Improving Shampoo and SOAP via
    Kullback-Leibler Minimization](https://arxiv.org/abs/2509.03378), 2025.
  """
  layout, fallback = options.resolve("kl_soap", layout, fallback, legacy,
                                 dimension_numbers=dimension_numbers)
  return with_adam_fallback(
      scale_by_kl_soap(b1, b2, eps, precondition_frequency, init_factor, max_clamp,
                       refresh_tolerance=refresh_tolerance,
                       refresh_max_iters=refresh_max_iters, damping=damping,
                       normalize_update=normalize_update, update_order=update_order,
                       layout=layout.without_masks()),
      learning_rate, weight_decay, layout=layout, fallback=fallback,
      spike_threshold=spike_threshold)


def scale_by_soap(
    b1: float = 0.95,
    b2: float = 0.95,
    eps: float = 1e-8,
    precondition_frequency: int = 10,
    *,
    refresh_tolerance: float | None = None,
    refresh_max_iters: int | None = None,
    dimension_numbers: Any = None,
    layout: options.Layout | None = None,
    **legacy: Any,
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
    dimension_numbers: batch axes (scanned layers, experts) and mode groups
      per leaf ([`kl_optax.dims`][kl_optax.dims]: [`kl_optax.scanned`][kl_optax.dims.scanned], ...); the same
      as ``Layout(dimension_numbers=...)``. Static.
    layout: blocking and storage dtype ([`kl_optax.Layout`][kl_optax.options.Layout]; its masks
      must be unset: a preconditioner routes nothing).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp, kl_optax
    >>> tx = kl_optax.scale_by_soap()
    >>> state = tx.init(jnp.zeros((3, 4)))
    >>> sorted(state.groups[0].slots)
    ['mu_eig', 'nonfinite_skips', 'nu_eig', 'refresh_failures', 'refreshes']

  References:
    Vyas et al., [SOAP: Improving and Stabilizing Shampoo using Adam](https://arxiv.org/abs/2409.11321), 2024.
  """
  layout, _ = options.resolve("scale_by_soap", layout, None, legacy,
                                 dimension_numbers=dimension_numbers, takes_fallback=False)
  _check_common(b1, b2, eps, precondition_frequency)
  return transform.kron_transform(
      P.adam_in_eigenbasis(b1, b2, eps, bias_correction=True),
      P.shampoo_factor_update(b2),
      P.qr_basis_refresh(precondition_frequency, tolerance=refresh_tolerance,
                         max_iters=refresh_max_iters, sort=True,
                         rotate_slots=(state_lib.MU_EIG,), permute_slots=(state_lib.NU_EIG,)),
      **layout.transform_options(),
  )


def soap(
    learning_rate: optax.ScalarOrSchedule = 3e-3,
    b1: float = 0.95,
    b2: float = 0.95,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    precondition_frequency: int = 10,
    *,
    refresh_tolerance: float | None = None,
    refresh_max_iters: int | None = None,
    dimension_numbers: Any = None,
    layout: options.Layout | None = None,
    fallback: options.Fallback | None = None,
    spike_threshold: float | None = 10.0,
    **legacy: Any,
) -> optax.GradientTransformationExtraArgs:
  r"""SOAP: Adam in the eigenbasis of Shampoo's Kronecker factors (a baseline).

  Preconditioned leaves get ``−learning_rate · (U + weight_decay · W)`` with
  ``U`` from [`scale_by_soap`][kl_optax.recipes.scale_by_soap] (see there, including where this differs
  from the authors' code); every other leaf gets AdamW.

  The static choices are ``layout`` ([`kl_optax.Layout`][kl_optax.options.Layout]: which leaves
  are preconditioned, blocking, storage dtype) and ``fallback``
  ([`kl_optax.Fallback`][kl_optax.options.Fallback]: the AdamW of every other leaf). By default
  every leaf with at least two dims larger than one is preconditioned, and
  scalars and vectors (biases, norm scales) go to AdamW.

  Args:
    learning_rate: a float or an ``optax`` schedule.
    b1: first-moment keep factor.
    b2: keep factor of the second moment and the factors.
    eps: added to ``sqrt(ṽ)``.
    weight_decay: decoupled weight decay (every step, the first included).
    precondition_frequency: refresh the eigenbases every this many steps.
    refresh_tolerance: adaptive refresh: a factor keeps its basis while
      ``off(QᵀSQ) ≤ refresh_tolerance · ‖S‖_F`` ([`kl_optax.qr_basis_refresh`][kl_optax.parts.qr_basis_refresh]).
    refresh_max_iters: QR iterations per refresh, at most (``None``: 1). Static.
    dimension_numbers: batch axes (scanned layers, experts) and mode groups
      per leaf ([`kl_optax.dims`][kl_optax.dims]: [`kl_optax.scanned`][kl_optax.dims.scanned], ...); the same
      as ``Layout(dimension_numbers=...)``. Static.
    layout: routing, blocking, storage dtype ([`kl_optax.Layout`][kl_optax.options.Layout]).
    fallback: the other leaves' AdamW ([`kl_optax.Fallback`][kl_optax.options.Fallback]).
    spike_threshold: a leaf's gradient whose norm exceeds this many times
      its running average is scaled back to it before the optimizer sees it
      ([`kl_optax.spike_guard`][kl_optax.safety.spike_guard]; ``None``: off).
    **legacy: older keywords, see `kl_optax.options`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp, kl_optax
    >>> tx = kl_optax.soap()
    >>> state = tx.init({'w': jnp.zeros((8, 4))})

  References:
    Vyas et al., [SOAP: Improving and Stabilizing Shampoo using Adam](https://arxiv.org/abs/2409.11321), 2024.
  """
  layout, fallback = options.resolve("soap", layout, fallback, legacy,
                                 dimension_numbers=dimension_numbers)
  return with_adam_fallback(
      scale_by_soap(b1, b2, eps, precondition_frequency, refresh_tolerance=refresh_tolerance,
                    refresh_max_iters=refresh_max_iters, layout=layout.without_masks()),
      learning_rate, weight_decay, layout=layout, fallback=fallback,
      spike_threshold=spike_threshold)


def scale_by_shampoo(
    b1: float = 0.9,
    b2: float = 0.99,
    eps: float = 1e-12,
    precondition_frequency: int = 10,
    *,
    graft_eps: float = 1e-8,
    refresh_tolerance: float | None = None,
    dimension_numbers: Any = None,
    layout: options.Layout | None = None,
    **legacy: Any,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales updates by Shampoo with Adam grafting (a baseline).

  Per step ``t ≥ 1`` (``docs/math.md``, "The baselines"):

  1. ``D = (⊗_k (S_k + eps I)^{-1/(2K)}) G``, with the inverse roots
     ``Q_k diag(λ_k + eps)^{-1/(2K)} Q_kᵀ`` computed from the eigendecompositions
     ``S_k = Q_k diag(λ_k) Q_kᵀ`` of the last refresh;
  2. grafting: ``D`` is rescaled to the Frobenius norm of Adam's direction
     ``G / (sqrt(ν̂) + graft_eps)``, ``ν ← b2 ν + (1 − b2) G²`` (bias-corrected);
  3. momentum on the grafted direction, ``m ← b1 m + (1 − b1) D``, bias-corrected;
  4. ``S_k ← b2 S_k + (1 − b2) G_(k) G_(k)ᵀ``;
  5. every ``precondition_frequency`` steps ``λ_k, Q_k = eigh(S_k)`` and the
     inverse roots from them.

  The first update initializes ``S_k = (1−b2) G_(k)G_(k)ᵀ`` and its
  eigendecomposition, and returns zero.

  Args:
    b1: momentum keep factor.
    b2: keep factor of the factors and of the grafting second moment.
    eps: added to the factors' eigenvalues.
    precondition_frequency: recompute the eigendecompositions every this many steps.
    graft_eps: Adam's epsilon in the grafting direction.
    refresh_tolerance: skip a factor's eigendecomposition while its basis still
      satisfies the criterion of [`kl_optax.eigh_basis_refresh`][kl_optax.parts.eigh_basis_refresh].
    dimension_numbers: batch axes (scanned layers, experts) and mode groups
      per leaf ([`kl_optax.dims`][kl_optax.dims]: [`kl_optax.scanned`][kl_optax.dims.scanned], ...); the same
      as ``Layout(dimension_numbers=...)``. Static.
    layout: blocking and storage dtype ([`kl_optax.Layout`][kl_optax.options.Layout]; its masks
      must be unset: a preconditioner routes nothing).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp, kl_optax
    >>> tx = kl_optax.scale_by_shampoo()
    >>> state = tx.init(jnp.zeros((3, 4)))

  References:
    Gupta, Koren, Singer, [Shampoo: Preconditioned Stochastic Tensor
    Optimization](https://arxiv.org/abs/1802.09568), 2018.
  """
  layout, _ = options.resolve("scale_by_shampoo", layout, None, legacy,
                                 dimension_numbers=dimension_numbers, takes_fallback=False)
  _check_common(b1, b2, eps, precondition_frequency)
  validation.check_range("graft_eps", graft_eps, 0.0, None)
  return transform.kron_transform(
      # D from the inverse roots the refresh keeps: one product per mode instead of a
      # projection into the eigenbasis and back (the same D as P.inverse_root(eps)).
      P.cached_inverse_root(),
      P.adam_grafting(b2, graft_eps),
      P.momentum(b1, bias_correction=True),
      P.shampoo_factor_update(b2),
      P.eigh_basis_refresh(precondition_frequency, tolerance=refresh_tolerance,
                           inverse_root_eps=eps),
      **layout.transform_options(),
  )


def shampoo(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.99,
    eps: float = 1e-12,
    weight_decay: float = 0.01,
    precondition_frequency: int = 10,
    *,
    graft_eps: float = 1e-8,
    refresh_tolerance: float | None = None,
    dimension_numbers: Any = None,
    layout: options.Layout | None = None,
    fallback: options.Fallback | None = None,
    spike_threshold: float | None = 10.0,
    **legacy: Any,
) -> optax.GradientTransformationExtraArgs:
  r"""Shampoo with Adam grafting (a baseline).

  Preconditioned leaves get ``−learning_rate · (U + weight_decay · W)`` with
  ``U`` from [`scale_by_shampoo`][kl_optax.recipes.scale_by_shampoo]; every other leaf gets AdamW.

  The static choices are ``layout`` ([`kl_optax.Layout`][kl_optax.options.Layout]: which leaves
  are preconditioned, blocking, storage dtype) and ``fallback``
  ([`kl_optax.Fallback`][kl_optax.options.Fallback]: the AdamW of every other leaf). By default
  every leaf with at least two dims larger than one is preconditioned, and
  scalars and vectors (biases, norm scales) go to AdamW.

  Args:
    learning_rate: a float or an ``optax`` schedule.
    b1: momentum keep factor.
    b2: keep factor of the factors and of the grafting second moment.
    eps: added to the factors' eigenvalues.
    weight_decay: decoupled weight decay (every step, the first included).
    precondition_frequency: recompute the eigendecompositions every this many steps.
    graft_eps: Adam's epsilon in the grafting direction.
    refresh_tolerance: skip a factor's eigendecomposition while its basis
      still satisfies the criterion of [`kl_optax.eigh_basis_refresh`][kl_optax.parts.eigh_basis_refresh].
    dimension_numbers: batch axes (scanned layers, experts) and mode groups
      per leaf ([`kl_optax.dims`][kl_optax.dims]: [`kl_optax.scanned`][kl_optax.dims.scanned], ...); the same
      as ``Layout(dimension_numbers=...)``. Static.
    layout: routing, blocking, storage dtype ([`kl_optax.Layout`][kl_optax.options.Layout]).
    fallback: the other leaves' AdamW ([`kl_optax.Fallback`][kl_optax.options.Fallback]).
    spike_threshold: a leaf's gradient whose norm exceeds this many times
      its running average is scaled back to it before the optimizer sees it
      ([`kl_optax.spike_guard`][kl_optax.safety.spike_guard]; ``None``: off).
    **legacy: older keywords, see `kl_optax.options`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp, kl_optax
    >>> tx = kl_optax.shampoo(learning_rate=1e-3)
    >>> state = tx.init({'w': jnp.zeros((8, 4))})

  References:
    Gupta, Koren, Singer, [Shampoo: Preconditioned Stochastic Tensor
    Optimization](https://arxiv.org/abs/1802.09568), 2018.
  """
  layout, fallback = options.resolve("shampoo", layout, fallback, legacy,
                                 dimension_numbers=dimension_numbers)
  return with_adam_fallback(
      scale_by_shampoo(b1, b2, eps, precondition_frequency, graft_eps=graft_eps,
                       refresh_tolerance=refresh_tolerance, layout=layout.without_masks()),
      learning_rate, weight_decay, layout=layout, fallback=fallback,
      spike_threshold=spike_threshold)


def scale_by_eshampoo(
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
    precondition_frequency: int = 10,
    *,
    refresh_tolerance: float | None = 0.01,
    refresh_max_iters: int | None = None,
    dimension_numbers: Any = None,
    layout: options.Layout | None = None,
    **legacy: Any,
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
    dimension_numbers: batch axes (scanned layers, experts) and mode groups
      per leaf ([`kl_optax.dims`][kl_optax.dims]: [`kl_optax.scanned`][kl_optax.dims.scanned], ...); the same
      as ``Layout(dimension_numbers=...)``. Static.
    layout: blocking and storage dtype ([`kl_optax.Layout`][kl_optax.options.Layout]; its masks
      must be unset: a preconditioner routes nothing).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp, kl_optax
    >>> tx = kl_optax.scale_by_eshampoo()
    >>> state = tx.init(jnp.zeros((3, 4)))

  References:
    Eschenhagen et al., [Purifying Shampoo: Investigating Shampoo's Heuristics
    by Decomposing its Preconditioner](https://arxiv.org/abs/2506.03595), 2025.
  """
  layout, _ = options.resolve("scale_by_eshampoo", layout, None, legacy,
                                 dimension_numbers=dimension_numbers, takes_fallback=False)
  _check_common(b1, b2, eps, precondition_frequency)
  return transform.kron_transform(
      P.momentum(b1, bias_correction=True),
      P.eigenvalue_corrected_whiten(b2, eps),
      P.shampoo_factor_update(b2),
      P.qr_basis_refresh(precondition_frequency, tolerance=refresh_tolerance,
                         max_iters=refresh_max_iters),
      **layout.transform_options(),
  )


def eshampoo(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    precondition_frequency: int = 10,
    *,
    refresh_tolerance: float | None = 0.01,
    refresh_max_iters: int | None = None,
    dimension_numbers: Any = None,
    layout: options.Layout | None = None,
    fallback: options.Fallback | None = None,
    spike_threshold: float | None = 10.0,
    **legacy: Any,
) -> optax.GradientTransformationExtraArgs:
  r"""Eigenvalue-corrected Shampoo with adaptive basis refresh (a baseline).

  Preconditioned leaves get ``−learning_rate · (U + weight_decay · W)`` with
  ``U`` from [`scale_by_eshampoo`][kl_optax.recipes.scale_by_eshampoo]; every other leaf gets AdamW.

  The static choices are ``layout`` ([`kl_optax.Layout`][kl_optax.options.Layout]: which leaves
  are preconditioned, blocking, storage dtype) and ``fallback``
  ([`kl_optax.Fallback`][kl_optax.options.Fallback]: the AdamW of every other leaf). By default
  every leaf with at least two dims larger than one is preconditioned, and
  scalars and vectors (biases, norm scales) go to AdamW.

  Args:
    learning_rate: a float or an ``optax`` schedule.
    b1: momentum keep factor.
    b2: keep factor of the corrected eigenvalues and of the factors.
    eps: added to ``sqrt(D̂)``.
    weight_decay: decoupled weight decay (every step, the first included).
    precondition_frequency: check (and refresh) the bases every this many steps.
    refresh_tolerance: adaptive refresh: a factor keeps its basis while
      ``off(QᵀSQ) ≤ refresh_tolerance · ‖S‖_F`` ([`kl_optax.qr_basis_refresh`][kl_optax.parts.qr_basis_refresh]).
    refresh_max_iters: QR iterations per refresh, at most (``None``: 1). Static.
    dimension_numbers: batch axes (scanned layers, experts) and mode groups
      per leaf ([`kl_optax.dims`][kl_optax.dims]: [`kl_optax.scanned`][kl_optax.dims.scanned], ...); the same
      as ``Layout(dimension_numbers=...)``. Static.
    layout: routing, blocking, storage dtype ([`kl_optax.Layout`][kl_optax.options.Layout]).
    fallback: the other leaves' AdamW ([`kl_optax.Fallback`][kl_optax.options.Fallback]).
    spike_threshold: a leaf's gradient whose norm exceeds this many times
      its running average is scaled back to it before the optimizer sees it
      ([`kl_optax.spike_guard`][kl_optax.safety.spike_guard]; ``None``: off).
    **legacy: older keywords, see `kl_optax.options`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp, kl_optax
    >>> tx = kl_optax.eshampoo(learning_rate=1e-3)
    >>> state = tx.init({'w': jnp.zeros((8, 4))})

  References:
    Eschenhagen et al., [Purifying Shampoo: Investigating Shampoo's Heuristics
    by Decomposing its Preconditioner](https://arxiv.org/abs/2506.03595), 2025.
  """
  layout, fallback = options.resolve("eshampoo", layout, fallback, legacy,
                                 dimension_numbers=dimension_numbers)
  return with_adam_fallback(
      scale_by_eshampoo(b1, b2, eps, precondition_frequency,
                        refresh_tolerance=refresh_tolerance,
                        refresh_max_iters=refresh_max_iters, layout=layout.without_masks()),
      learning_rate, weight_decay, layout=layout, fallback=fallback,
      spike_threshold=spike_threshold)


def scale_by_pro_kl_shampoo(
    rank: int = 128,
    b1: float = 0.9,
    b2: float = 0.98,
    eps: float = 1e-8,
    precondition_frequency: int = 10,
    complement_scale: float | None = None,
    ns_steps: int = 5,
    *,
    init_factor: float | str = 0.1,
    max_clamp: float | None = 4000,
    restricted_side: str = "larger",
    ns_coefficients: str | tuple[float, float, float] = "muon",
    ns_dtype: jax.typing.DTypeLike | None = None,
    accumulate: bool = True,
    refresh_tolerance: float | None = None,
    refresh_max_iters: int | None = None,
    dimension_numbers: Any = None,
    layout: options.Layout | None = None,
    **legacy: Any,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales updates by Pro-KLShampoo's preconditioner (``docs/math.md``, "Pro-KLShampoo").

  Each matrix keeps a dense KL-Shampoo factor on one side and a rank-``r``
  spike-and-flat factor ``U diag(λ) Uᵀ + σ (I − UUᵀ)`` on the other (by
  default the larger side). Per step ``t ≥ 1``: momentum
  ``N ← b1 N + (1 − b1) G``; the direction ``Δ∥ + Δ⊥`` of
  [`kl_optax.spike_flat_whiten`][kl_optax.pro.spike_flat_whiten] (KL whitening in the span of ``U``,
  ``κ · NS(X)`` on the complement); the statistics of
  [`kl_optax.spike_flat_projection`][kl_optax.pro.spike_flat_projection]; the dense basis refresh
  ``Q_a ← qr(S_a Q_a).Q`` every ``precondition_frequency`` steps. The first
  update initializes the statistics and returns zero.

  Tensors whose restricted dim is not larger than ``rank`` and tensors of
  order three or more get the full [`scale_by_kl_shampoo`][kl_optax.recipes.scale_by_kl_shampoo] with the same
  hyperparameters (see [`pro_labels`][kl_optax.routing.pro_labels]), so ``rank ≥ max dim`` is exactly
  KL-Shampoo.

  Args:
    rank: ``r``, tracked directions of the restricted factor (static).
    b1: momentum keep factor.
    b2: keep factor of the factors and eigenvalue estimates.
    eps: added to ``sqrt(λ_a λᵀ)`` (and KL-Shampoo's denominator).
    precondition_frequency: basis and subspace refresh every this many steps.
    complement_scale: ``κ`` of the complement direction (``None``: ``√n``;
      ``"sqrt_complement"``, ``"muon"`` or a number, see
      [`kl_optax.spike_flat_whiten`][kl_optax.pro.spike_flat_whiten]).
    ns_steps: Newton–Schulz iterations.
    init_factor: initial eigenvalue estimate: the paper's 0.1, another
      constant, ``"spectrum"`` or ``"rms"``. On short runs the paper's 0.1 trails:
      in the 300-step suite ``1e-3`` was best on three of four workloads and
      ``"spectrum"`` second on all four (docs/benchmarks.md, "Starting eigenvalue
      estimates").
    max_clamp: bound in the eigenvalue floors (``None``: no floors).
    restricted_side: ``"larger"`` (default), ``"smaller"``, ``"rows"`` or
      ``"columns"``: which side of each matrix is restricted.
    ns_coefficients: ``"muon"`` (default), ``"exact"``, a triple or a schedule.
    ns_dtype: Newton–Schulz iteration dtype (``"bfloat16"`` on accelerators).
    accumulate: keep the subspace accumulator ``Y`` (``n × r`` per matrix).
    refresh_tolerance: adaptive refresh of the dense bases (``docs/math.md``,
      "Adaptive basis refresh").
    refresh_max_iters: QR iterations per adaptive refresh (static).
    dimension_numbers: batch axes (scanned layers, experts) and mode groups
      per leaf ([`kl_optax.dims`][kl_optax.dims]: [`kl_optax.scanned`][kl_optax.dims.scanned], ...); the same
      as ``Layout(dimension_numbers=...)``. Static.
    layout: blocking and storage dtype ([`kl_optax.Layout`][kl_optax.options.Layout]; its masks
      must be unset: a preconditioner routes nothing).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  layout, _ = options.resolve("scale_by_pro_kl_shampoo", layout, None, legacy,
                                 dimension_numbers=dimension_numbers, takes_fallback=False)
  rank = validation.static_int(rank, "rank", default=128)
  _check_common(b1, b2, eps, precondition_frequency)
  validation.check_range("ns_steps", ns_steps, 1.0, None)
  pro.restricted_mode((2, 2), restricted_side)
  spike = transform.kron_transform(
      P.momentum(b1),
      pro.spike_flat_whiten(eps, complement_scale=complement_scale, ns_steps=ns_steps,
                            ns_coefficients=ns_coefficients, ns_dtype=ns_dtype,
                            restricted_side=restricted_side),
      pro.spike_flat_projection(rank, b2, precondition_frequency, init_factor=init_factor,
                                max_clamp=max_clamp, restricted_side=restricted_side,
                                accumulate=accumulate),
      P.qr_basis_refresh(precondition_frequency, tolerance=refresh_tolerance,
                         max_iters=refresh_max_iters),
      state_dtype=layout.state_dtype,
      dimension_numbers=layout.dimension_numbers,
      compute_dtype=layout.compute_dtype,
      matmul_precision=layout.matmul_precision,
  )
  dense = scale_by_kl_shampoo(b1, b2, eps, precondition_frequency, init_factor, max_clamp,
                              refresh_tolerance=refresh_tolerance,
                              refresh_max_iters=refresh_max_iters, layout=layout)
  return optax.partition(
      {routing.SPIKE_FLAT: spike, routing.DENSE: dense},
      functools.partial(routing.pro_labels, rank=rank, restricted_side=restricted_side,
                        block_size=layout.block_size, max_precond_dim=layout.max_precond_dim,
                        dimension_numbers=layout.dimension_numbers))


def pro_kl_shampoo(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 128,
    b1: float = 0.9,
    b2: float = 0.98,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    precondition_frequency: int = 10,
    complement_scale: float | None = None,
    ns_steps: int = 5,
    *,
    init_factor: float | str = 0.1,
    max_clamp: float | None = 4000,
    restricted_side: str = "larger",
    ns_coefficients: str | tuple[float, float, float] = "muon",
    ns_dtype: jax.typing.DTypeLike | None = None,
    accumulate: bool = True,
    refresh_tolerance: float | None = None,
    refresh_max_iters: int | None = None,
    dimension_numbers: Any = None,
    layout: options.Layout | None = None,
    fallback: options.Fallback | None = None,
    spike_threshold: float | None = 10.0,
    **legacy: Any,
) -> optax.GradientTransformationExtraArgs:
  r"""Pro-KLShampoo: KL-Shampoo with a spike-and-flat factor and an orthogonalized complement.

  Preconditioned leaves get ``−learning_rate · (U + weight_decay · W)`` with
  ``U`` from [`scale_by_pro_kl_shampoo`][kl_optax.recipes.scale_by_pro_kl_shampoo]; every other leaf gets AdamW.
  Matrices whose restricted side is at most ``rank`` (and tensors of order
  three or more) get full KL-Shampoo.

  The method is reconstructed from the paper's abstract and KL-Shampoo's
  math (``docs/math.md``, "Pro-KLShampoo"); the choices the abstract leaves open are
  options: ``complement_scale``, ``restricted_side``, ``accumulate``,
  ``ns_coefficients``.

  The static choices are ``layout`` ([`kl_optax.Layout`][kl_optax.options.Layout]: which leaves
  are preconditioned, blocking, storage dtype) and ``fallback``
  ([`kl_optax.Fallback`][kl_optax.options.Fallback]: the AdamW of every other leaf). By default
  every leaf with at least two dims larger than one is preconditioned, and
  scalars and vectors (biases, norm scales) go to AdamW.

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
    init_factor: initial eigenvalue estimate: the paper's 0.1, another
      constant, ``"spectrum"`` or ``"rms"``. On short runs the paper's 0.1 trails:
      in the 300-step suite ``1e-3`` was best on three of four workloads and
      ``"spectrum"`` second on all four (docs/benchmarks.md, "Starting eigenvalue
      estimates").
    max_clamp: bound in the eigenvalue floors (``None``: no floors).
    restricted_side: which side of each matrix is restricted (``"larger"``).
    ns_coefficients: Newton–Schulz coefficients (``"muon"``, ``"exact"``, …).
    ns_dtype: Newton–Schulz iteration dtype.
    accumulate: keep the subspace accumulator (``n × r`` per matrix).
    refresh_tolerance: adaptive refresh: a factor keeps its basis while
      ``off(QᵀSQ) ≤ refresh_tolerance · ‖S‖_F`` ([`kl_optax.qr_basis_refresh`][kl_optax.parts.qr_basis_refresh]).
    refresh_max_iters: QR iterations per refresh, at most (``None``: 1). Static.
    dimension_numbers: batch axes (scanned layers, experts) and mode groups
      per leaf ([`kl_optax.dims`][kl_optax.dims]: [`kl_optax.scanned`][kl_optax.dims.scanned], ...); the same
      as ``Layout(dimension_numbers=...)``. Static.
    layout: routing, blocking, storage dtype ([`kl_optax.Layout`][kl_optax.options.Layout]).
    fallback: the other leaves' AdamW ([`kl_optax.Fallback`][kl_optax.options.Fallback]).
    spike_threshold: a leaf's gradient whose norm exceeds this many times
      its running average is scaled back to it before the optimizer sees it
      ([`kl_optax.spike_guard`][kl_optax.safety.spike_guard]; ``None``: off).
    **legacy: older keywords, see `kl_optax.options`.

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
    Sun & Wei, [Pro-KLShampoo: Projected KL-Shampoo with Whitening Recovered by
    Orthogonalization](https://arxiv.org/abs/2605.06316), 2026.
  """
  layout, fallback = options.resolve("pro_kl_shampoo", layout, fallback, legacy,
                                 dimension_numbers=dimension_numbers)
  return with_adam_fallback(
      scale_by_pro_kl_shampoo(
          rank, b1, b2, eps, precondition_frequency, complement_scale, ns_steps,
          init_factor=init_factor, max_clamp=max_clamp, restricted_side=restricted_side,
          ns_coefficients=ns_coefficients, ns_dtype=ns_dtype, accumulate=accumulate,
          refresh_tolerance=refresh_tolerance, refresh_max_iters=refresh_max_iters, layout=layout.without_masks()),
      learning_rate, weight_decay, layout=layout, fallback=fallback,
      spike_threshold=spike_threshold)


# ----------------------------------------------------------------------------
# The table of recipes
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RecipeSpec:
  """One row of [`RECIPES`][kl_optax.recipes.RECIPES]: what the tests, the benchmarks and ``__all__`` need.

  Attributes:
    name: the public name of the complete optimizer.
    constructor: the complete optimizer, ``constructor(learning_rate, **kw)``.
    preconditioner: its ``scale_by_*`` (no learning rate, no routing).
    test_kwargs: keywords for small test problems (shapes of a few entries
      per dim), beside the learning rate.
    static_args: arguments that must be static under
      ``optax.inject_hyperparams`` (they decide shapes).
    learning_rates: peak learning rate per benchmark workload, as found by
      the suite's ``--preset cpu`` sweep (``docs/benchmarks.md``).
    kl: whether it is one of the KL-derived methods (the others are baselines).
  """

  name: str
  constructor: Callable[..., optax.GradientTransformationExtraArgs]
  preconditioner: Callable[..., optax.GradientTransformationExtraArgs]
  test_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  static_args: tuple[str, ...] = ()
  learning_rates: Mapping[str, float] = dataclasses.field(default_factory=dict)
  kl: bool = False

  def make(self, learning_rate: optax.ScalarOrSchedule, **kwargs) -> optax.GradientTransformation:
    """The optimizer with ``test_kwargs`` updated by ``kwargs``."""
    return self.constructor(learning_rate, **{**self.test_kwargs, **kwargs})


RECIPES: dict[str, RecipeSpec] = {spec.name: spec for spec in (
    RecipeSpec("kl_shampoo", kl_shampoo, scale_by_kl_shampoo, kl=True,
               # With its default start ("spectrum"), docs/benchmarks.md.
               learning_rates={"char_gpt": 1.6e-2, "digits_mlp": 1.6e-2, "kron_regression": 6.4e-2}),
    RecipeSpec("kl_soap", kl_soap, scale_by_kl_soap, kl=True,
               learning_rates={"char_gpt": 8e-3, "digits_mlp": 1.6e-2, "kron_regression": 0.256}),
    RecipeSpec("pro_kl_shampoo", pro_kl_shampoo, scale_by_pro_kl_shampoo, kl=True,
               test_kwargs={"rank": 2}, static_args=("rank",),
               learning_rates={"char_gpt": 8e-3, "digits_mlp": 4e-3, "kron_regression": 6.4e-2}),
    RecipeSpec("soap", soap, scale_by_soap,
               learning_rates={"char_gpt": 1.6e-2, "digits_mlp": 8e-3, "kron_regression": 6.4e-2}),
    RecipeSpec("shampoo", shampoo, scale_by_shampoo,
               learning_rates={"char_gpt": 8e-3, "digits_mlp": 4e-3, "kron_regression": 6.4e-2}),
    RecipeSpec("eshampoo", eshampoo, scale_by_eshampoo,
               learning_rates={"char_gpt": 3.2e-2, "digits_mlp": 4e-3, "kron_regression": 6.4e-2}),
)}
"""Every recipe of the package, in the order of the documentation."""

__all__ = ["RECIPES", "RecipeSpec", "with_adam_fallback",
           *sorted([s.name for s in RECIPES.values()]
                   + [s.preconditioner.__name__ for s in RECIPES.values()])]
