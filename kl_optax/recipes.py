r"""Ready-made optimizers: short compositions of the parts.

``scale_by_<algo>`` preconditions only (no learning rate, no sign flip, no
weight decay) and accepts only tensors that can carry a Kronecker
preconditioner; ``<algo>`` is the complete optimizer: the preconditioner chained
with decoupled weight decay and the learning rate, and routed with
``optax.partition`` so that every other leaf goes to AdamW.
"""

from __future__ import annotations

from typing import Any

import optax

from kl_optax import parts as P
from kl_optax import routing
from kl_optax.compose import kron_transform
from kl_optax.validation import check_range

__all__ = ["kl_shampoo", "scale_by_kl_shampoo", "with_adam_fallback"]


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
    state_dtype: Any = None,
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
      updates and interacts with width; values between 1e-3 and 0.1 are
      reasonable.
    max_clamp: eigenvalue estimates are kept ≥ ``1 / c_k²`` with
      ``c_k = max(10, min(d_k, max_clamp))``.
    state_dtype: storage dtype of momentum, factors and bases (``None``:
      float32). Computation is always float32; eigenvalue estimates are
      always stored in float32.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp, optax, kl_optax
    >>> tx = kl_optax.scale_by_kl_shampoo()
    >>> params = jnp.ones((3, 4))
    >>> state = tx.init(params)
    >>> g = jnp.arange(12.0).reshape(3, 4)
    >>> u, state = tx.update(g, state)           # t = 0: initialization
    >>> u, state = tx.update(g, state)           # t = 1: (1 - b1) g / 0.1
    >>> bool(jnp.allclose(u, g, rtol=1e-5))
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
      P.qr_basis_refresh(precondition_frequency),
      state_dtype=state_dtype,
  )


def with_adam_fallback(
    preconditioner: optax.GradientTransformation,
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: Any,
    weight_decay_mask: Any,
    *,
    max_precond_dim: int | None,
    precondition_mask: Any,
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
  weight_decay=adam_weight_decay or weight_decay)``. The split follows
  :func:`kl_optax.kron_labels`.
  """
  max_dim = routing.resolve_static_int(
      max_precond_dim, "max_precond_dim", routing.DEFAULT_MAX_PRECOND_DIM
  )
  check_range("max_precond_dim", max_dim, 1.0, None)
  check_range("weight_decay", weight_decay, 0.0, None)

  def labels(params):
    return routing.kron_labels(params, max_dim, precondition_mask)

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
  return optax.partition(
      {routing.KRON: kron_branch, routing.FALLBACK: adam_branch}, labels
  )


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
    state_dtype: Any = None,
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

  Routing, leaf by leaf: size-1 dims are squeezed; a leaf whose remaining dims
  number at least two, are all ≤ ``max_precond_dim`` and that
  ``precondition_mask`` does not exclude gets the Kronecker preconditioner.
  Scalars, vectors (biases, norm scales), larger tensors and excluded leaves
  (embeddings and output heads are usually better there) go to AdamW with its
  own hyperparameters. Non-floating leaves raise an error naming the leaf.

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
    weight_decay_mask: pytree of bools (or a function of the params returning
      one): where weight decay applies, in both branches. ``None``: everywhere.
    precondition_mask: pytree of bools, or a function of the params returning
      one (see :func:`kl_optax.exclude`): ``False`` sends a leaf to AdamW.
    max_precond_dim: largest dim a preconditioned tensor may have (``None``:
      10,000). Decides shapes, so it must be static.
    state_dtype: storage dtype of momentum, factors and bases (``None``:
      float32; ``jnp.bfloat16`` halves their memory).
    adam_learning_rate: AdamW's learning rate (``None``: ``learning_rate``).
    adam_b1: AdamW's first-moment decay.
    adam_b2: AdamW's second-moment decay.
    adam_eps: AdamW's epsilon.
    adam_weight_decay: AdamW's weight decay (``None``: ``weight_decay``).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
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
  return with_adam_fallback(
      scale_by_kl_shampoo(
          b1, b2, eps, precondition_frequency, init_factor, max_clamp,
          state_dtype=state_dtype,
      ),
      learning_rate,
      weight_decay,
      weight_decay_mask,
      max_precond_dim=max_precond_dim,
      precondition_mask=precondition_mask,
      adam_learning_rate=adam_learning_rate,
      adam_b1=adam_b1,
      adam_b2=adam_b2,
      adam_eps=adam_eps,
      adam_weight_decay=adam_weight_decay,
  )
