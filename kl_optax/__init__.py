"""kl_optax: Kronecker-factored optimizers from Kullback-Leibler minimization, for Optax.

Ready-made optimizers (:mod:`kl_optax.recipes`)
  ``kl_shampoo``, ``kl_soap``, ``pro_kl_shampoo`` and the baselines ``soap``, ``shampoo`` and
  ``eshampoo``, each with its ``scale_by_*`` preconditioner.

Composable parts (:mod:`kl_optax.parts`)
  Pure functions over an explicit per-tensor state (:class:`KronState`):
  statistics (``kl_factor_update``, ``shampoo_factor_update``,
  ``ema_eigenvalues``), bases (``qr_basis_refresh``, ``eigh_basis_refresh``),
  directions (``whiten``, ``adam_in_eigenbasis``,
  ``eigenvalue_corrected_whiten``, ``inverse_root``, ``adam_grafting``) and
  ``momentum``; :func:`kron_transform` (:mod:`kl_optax.compose`) turns a
  sequence of them into an optax transformation.

Pro-KLShampoo (:mod:`kl_optax.pro`, :mod:`kl_optax.newton_schulz`)
  ``pro_kl_shampoo``; the parts ``spike_flat_projection`` and
  ``spike_flat_whiten``; spike-and-flat algebra (``SpikeFlat``,
  ``spike_flat_apply``, …); Newton–Schulz orthogonalization as a function
  (``newton_schulz_orthogonalize``), a part (``orthogonalize``) and an optax
  transformation (``scale_by_newton_schulz``).

Routing (:mod:`kl_optax.routing`)
  ``kron_labels`` and ``exclude``: which leaves get a Kronecker preconditioner.
Checkpoints (:mod:`kl_optax.checkpoint`)
  ``checkpoint.save`` / ``checkpoint.restore``: Orbax, with a clear error on a mismatch.
Non-finite values (:mod:`kl_optax.safety`)
  ``zero_nonfinite``, ``skip_nonfinite``, ``check_gradients``, ``nonfinite_skips``.
Sharding (:mod:`kl_optax.sharding`)
  ``state_shardings``: the optimizer-state shardings for a params sharding.

Kronecker linear algebra (:mod:`kl_optax.kron`).
"""

from kl_optax import checkpoint, kron
from kl_optax.compose import (
    KronTransformState,
    kron_states,
    kron_transform,
    plan_tensors,
    refresh_counts,
)
from kl_optax.newton_schulz import (
    EXACT_COEFFICIENTS,
    MUON_COEFFICIENTS,
    newton_schulz_orthogonalize,
    orthogonalize,
    scale_by_newton_schulz,
)
from kl_optax.parts import (
    KronState,
    Part,
    TensorStep,
    adam_grafting,
    adam_in_eigenbasis,
    eigenvalue_corrected_whiten,
    eigh_basis_refresh,
    ema_eigenvalues,
    init_kron_state,
    inverse_root,
    kl_factor_update,
    momentum,
    qr_basis_refresh,
    shampoo_factor_update,
    whiten,
)
from kl_optax.pro import (
    SpikeFlat,
    restricted_mode,
    spike_flat_apply,
    spike_flat_dense,
    spike_flat_moment_match,
    spike_flat_projection,
    spike_flat_reexpress,
    spike_flat_whiten,
)
from kl_optax.recipes import (
    eshampoo,
    kl_shampoo,
    kl_soap,
    pro_kl_shampoo,
    pro_labels,
    scale_by_eshampoo,
    scale_by_kl_shampoo,
    scale_by_kl_soap,
    scale_by_pro_kl_shampoo,
    scale_by_shampoo,
    scale_by_soap,
    shampoo,
    soap,
    with_adam_fallback,
)
from kl_optax.routing import exclude, kron_labels
from kl_optax.safety import (
    SkipNonFiniteState,
    ZeroNonFiniteState,
    check_gradients,
    nonfinite_skips,
    skip_nonfinite,
    zero_nonfinite,
)
from kl_optax.sharding import state_shardings

__version__ = "0.1.0"

__all__ = [
    "SkipNonFiniteState",
    "ZeroNonFiniteState",
    "zero_nonfinite",
    "check_gradients",
    "nonfinite_skips",
    "skip_nonfinite",
    "state_shardings",
    "EXACT_COEFFICIENTS",
    "KronState",
    "KronTransformState",
    "MUON_COEFFICIENTS",
    "Part",
    "SpikeFlat",
    "TensorStep",
    "adam_grafting",
    "adam_in_eigenbasis",
    "eigenvalue_corrected_whiten",
    "eigh_basis_refresh",
    "ema_eigenvalues",
    "eshampoo",
    "exclude",
    "init_kron_state",
    "inverse_root",
    "kl_factor_update",
    "kl_shampoo",
    "kl_soap",
    "kron",
    "kron_labels",
    "kron_states",
    "kron_transform",
    "momentum",
    "newton_schulz_orthogonalize",
    "orthogonalize",
    "plan_tensors",
    "pro_kl_shampoo",
    "pro_labels",
    "qr_basis_refresh",
    "refresh_counts",
    "restricted_mode",
    "scale_by_eshampoo",
    "scale_by_kl_shampoo",
    "scale_by_kl_soap",
    "scale_by_newton_schulz",
    "scale_by_pro_kl_shampoo",
    "scale_by_shampoo",
    "scale_by_soap",
    "shampoo",
    "shampoo_factor_update",
    "soap",
    "spike_flat_apply",
    "spike_flat_dense",
    "spike_flat_moment_match",
    "spike_flat_projection",
    "spike_flat_reexpress",
    "spike_flat_whiten",
    "whiten",
    "with_adam_fallback",
]
