"""kl_optax: Kronecker-factored optimizers from Kullback-Leibler minimization, for Optax.

Ready-made optimizers (:mod:`kl_optax.recipes`)
  ``kl_shampoo`` / ``scale_by_kl_shampoo``.

Composable parts (:mod:`kl_optax.parts`)
  ``momentum``, ``whiten``, ``kl_factor_update``, ``ema_eigenvalues``,
  ``qr_basis_refresh`` — pure functions over an explicit per-tensor state
  (:class:`KronState`), turned into an optax transformation by
  :func:`kron_transform` (:mod:`kl_optax.compose`).

Routing (:mod:`kl_optax.routing`)
  ``kron_labels`` and ``exclude``: which leaves get a Kronecker preconditioner.

Kronecker linear algebra (:mod:`kl_optax.kron`).
"""

from kl_optax import kron
from kl_optax.compose import KronTransformState, kron_transform, plan_tensors
from kl_optax.parts import (
    KronState,
    Part,
    TensorStep,
    ema_eigenvalues,
    init_kron_state,
    kl_factor_update,
    momentum,
    qr_basis_refresh,
    whiten,
)
from kl_optax.recipes import kl_shampoo, scale_by_kl_shampoo, with_adam_fallback
from kl_optax.routing import exclude, kron_labels

__version__ = "0.1.0"

__all__ = [
    "KronState",
    "KronTransformState",
    "Part",
    "TensorStep",
    "ema_eigenvalues",
    "exclude",
    "init_kron_state",
    "kl_factor_update",
    "kl_shampoo",
    "kron",
    "kron_labels",
    "kron_transform",
    "momentum",
    "plan_tensors",
    "qr_basis_refresh",
    "scale_by_kl_shampoo",
    "whiten",
    "with_adam_fallback",
]
