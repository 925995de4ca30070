"""kl_optax: Kronecker-factored optimizers from Kullback-Leibler minimization, for Optax.

The modules, each one concept (``docs/design.md`` has the import graph):

Ready-made optimizers (``kl_optax.recipes``)
  ``kl_shampoo``, ``kl_soap``, ``pro_kl_shampoo`` and the baselines ``soap``,
  ``shampoo`` and ``eshampoo``, each with its ``scale_by_*`` preconditioner;
  ``with_adam_fallback``; the table of recipes ``RECIPES``.
Static options (``kl_optax.options``)
  ``Layout`` (routing, blocking, storage dtype, dimension numbers),
  ``Fallback`` (the AdamW of the other leaves) and ``describe`` (one line per
  leaf: routing, tensors, batch axes, blocks).
Composable parts (``kl_optax.parts``, ``kl_optax.pro``, ``kl_optax.newton_schulz``)
  Pure functions over an explicit per-tensor state: statistics
  (``kl_factor_update``, ``shampoo_factor_update``, ``ema_eigenvalues``,
  ``spike_flat_projection``), bases (``qr_basis_refresh``,
  ``eigh_basis_refresh``), directions (``whiten``, ``adam_in_eigenbasis``,
  ``eigenvalue_corrected_whiten``, ``inverse_root``, ``cached_inverse_root``,
  ``adam_grafting``, ``spike_flat_whiten``, ``orthogonalize``) and ``momentum``; spike-and-flat
  algebra; Newton–Schulz orthogonalization (``newton_schulz_orthogonalize``,
  ``scale_by_newton_schulz``).
State types (``kl_optax.state``)
  ``KronState``, ``TensorStep``, ``Part``, ``KronTransformState``, the slot names
  ``declare_finite`` (a part's note that a value it wrote needs no check) and
  ``all_finite`` (the finiteness test of the non-finite guard).
The wrapper (``kl_optax.transform``) and the tensor plan (``kl_optax.plan``)
  ``kron_transform`` turns parts into an optax transformation; ``plan_tensors``
  shows how leaves are squeezed, blocked and grouped.
Routing (``kl_optax.routing``)
  ``kron_labels``, ``pro_labels`` and ``exclude``.
Dimension numbers (``kl_optax.dims``)
  ``DimensionNumbers`` (batch axes and mode groups of a leaf: scanned layers,
  experts, attention heads) and the rules ``scanned``, ``attention_heads``,
  ``match``.
Inspection (``kl_optax.inspection``)
  ``kron_states``, ``adam_states``, ``refresh_counts``, ``nonfinite_skips``,
  ``spike_clips``.
Non-finite values (``kl_optax.safety``)
  ``zero_nonfinite``, ``skip_nonfinite``, ``check_gradients``, ``spike_guard``.
Sharding (``kl_optax.sharding``)
  ``state_shardings``: the optimizer-state shardings for a params sharding.
Checkpoints (``kl_optax.checkpoint``)
  ``checkpoint.save`` / ``checkpoint.restore``: Orbax, with a clear error on a mismatch.

Kronecker linear algebra is in ``kl_optax.kron``; checks of options in
``kl_optax.validation``; pytree helpers in ``kl_optax.trees``.
"""

from kl_optax import checkpoint, dims, inspection, kron, plan, recipes, trees
from kl_optax.dims import DimensionNumbers, DimensionRule, attention_heads, match, scanned
from kl_optax.inspection import adam_states, kron_states, nonfinite_skips, refresh_counts, spike_clips
from kl_optax.newton_schulz import (
    EXACT_COEFFICIENTS,
    MUON_COEFFICIENTS,
    newton_schulz_orthogonalize,
    orthogonalize,
    scale_by_newton_schulz,
)
from kl_optax.options import Fallback, Layout, describe
from kl_optax.parts import (
    adam_grafting,
    adam_in_eigenbasis,
    cached_inverse_root,
    eigenvalue_corrected_whiten,
    eigh_basis_refresh,
    ema_eigenvalues,
    initial_eigenvalues,
    inverse_root,
    kl_factor_update,
    kl_statistics,
    momentum,
    qr_basis_refresh,
    rms_normalize,
    shampoo_factor_update,
    whiten,
)
from kl_optax.plan import plan_tensors
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
from kl_optax.recipes import *  # noqa: F401,F403  (the recipes of RECIPES)
from kl_optax.routing import exclude, kron_labels, pro_labels
from kl_optax.safety import check_gradients, skip_nonfinite, spike_guard, zero_nonfinite
from kl_optax.sharding import state_shardings
from kl_optax.state import (
    KronState,
    KronTransformState,
    Part,
    SkipNonFiniteState,
    SpikeGuardState,
    TensorStep,
    ZeroNonFiniteState,
    all_finite,
    declare_finite,
    init_kron_state,
)
from kl_optax.transform import kron_transform

__version__ = "0.1.0"

__all__ = sorted([
    "DimensionNumbers",
    "DimensionRule",
    "EXACT_COEFFICIENTS",
    "Fallback",
    "KronState",
    "KronTransformState",
    "Layout",
    "MUON_COEFFICIENTS",
    "Part",
    "SkipNonFiniteState",
    "SpikeGuardState",
    "SpikeFlat",
    "TensorStep",
    "ZeroNonFiniteState",
    "adam_grafting",
    "all_finite",
    "adam_states",
    "adam_in_eigenbasis",
    "cached_inverse_root",
    "attention_heads",
    "declare_finite",
    "check_gradients",
    "checkpoint",
    "describe",
    "dims",
    "eigenvalue_corrected_whiten",
    "eigh_basis_refresh",
    "ema_eigenvalues",
    "exclude",
    "init_kron_state",
    "initial_eigenvalues",
    "inspection",
    "inverse_root",
    "kl_factor_update",
    "kl_statistics",
    "kron",
    "kron_labels",
    "kron_states",
    "kron_transform",
    "match",
    "momentum",
    "newton_schulz_orthogonalize",
    "nonfinite_skips",
    "orthogonalize",
    "plan",
    "plan_tensors",
    "pro_labels",
    "qr_basis_refresh",
    "refresh_counts",
    "restricted_mode",
    "scale_by_newton_schulz",
    "scanned",
    "shampoo_factor_update",
    "skip_nonfinite",
    "spike_flat_apply",
    "spike_flat_dense",
    "spike_flat_moment_match",
    "spike_flat_projection",
    "spike_flat_reexpress",
    "spike_clips",
    "spike_flat_whiten",
    "spike_guard",
    "state_shardings",
    "trees",
    "whiten",
    "zero_nonfinite",
    *recipes.__all__,
])
