"""The state types every other module works on, and the names of their slots.

This module imports nothing from the rest of the package. It defines:

* [`KronState`][kl_optax.state.KronState]: the preconditioner state of one tensor (factors, bases,
  eigenvalue estimates and named slots);
* [`TensorStep`][kl_optax.state.TensorStep]: what flows through a sequence of parts during one step;
* [`Part`][kl_optax.state.Part]: one building block (a pure ``TensorStep -> TensorStep``
  function plus its initialization);
* [`KronTransformState`][kl_optax.state.KronTransformState]: the state of [`kl_optax.kron_transform`][kl_optax.transform.kron_transform],
  one stacked [`KronState`][kl_optax.state.KronState] per shape group;
* [`SkipNonFiniteState`][kl_optax.state.SkipNonFiniteState] and [`ZeroNonFiniteState`][kl_optax.state.ZeroNonFiniteState]: the states of
  the non-finite guards of [`kl_optax.safety`][kl_optax.safety];
* the slot names shared between modules (``MU``, ``REFRESHES``, …), so that a
  part and the code that reads its slot never spell the name twice;
* [`declare_finite`][kl_optax.state.declare_finite]: how a part tells the
  non-finite guard that a value it wrote cannot be non-finite.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "FLAT",
    "INVERSE_ROOT",
    "MU",
    "MU_EIG",
    "NONFINITE_SKIPS",
    "NU_EIG",
    "NU_GRAFT",
    "REFRESHES",
    "REFRESH_FAILURES",
    "SPIKE_BASIS",
    "SPIKE_EIGVALS",
    "SPIKE_SKETCH",
    "KronState",
    "KronTransformState",
    "Part",
    "Shape",
    "SkipNonFiniteState",
    "SpikeGuardState",
    "ZeroNonFiniteState",
    "TensorStep",
    "all_finite",
    "declare_finite",
    "init_kron_state",
]

Shape = tuple[int, ...]

# Slots of the parts in kl_optax.parts.
MU = "mu"                      # momentum in original coordinates
MU_EIG = "mu_eig"              # first moment in the eigenbasis (SOAP, KL-SOAP)
NU_EIG = "nu_eig"              # second moment in the eigenbasis
NU_GRAFT = "nu_graft"          # Adam second moment of the grafting direction
REFRESHES = "refreshes"        # basis refreshes performed, one count per mode
REFRESH_FAILURES = "refresh_failures"  # refreshes discarded as non-finite, per mode
INVERSE_ROOT = "inverse_root"  # prefix: slot "inverse_root_k" holds mode k's (S_k + eps I)^{-p}
# Slot of kron_transform itself.
NONFINITE_SKIPS = "nonfinite_skips"    # steps a tensor skipped for non-finite values
# Slots of the spike-and-flat factor (kl_optax.pro).
SPIKE_BASIS = "spike_basis"    # U, n × r
SPIKE_EIGVALS = "spike_eigvals"  # λ, r
FLAT = "flat"                  # σ, a scalar
SPIKE_SKETCH = "spike_sketch"  # the subspace accumulator Y, n × r


class KronState(NamedTuple):
  """Preconditioner state of one tensor ``G`` of shape ``(d_1, …, d_K)``.

  Inside [`kl_optax.kron_transform`][kl_optax.transform.kron_transform] every field carries an extra leading
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

  def with_slots(self, **values: jax.Array) -> KronState:
    """A copy with the given slots set (others kept).

    Examples:
      >>> import jax.numpy as jnp, kl_optax
      >>> st = kl_optax.init_kron_state((2, 3)).with_slots(mu=jnp.ones((2, 3)))
      >>> sorted(st.slots)
      ['mu']
    """
    return self._replace(slots={**self.slots, **values})


class TensorStep(NamedTuple):
  """The values a part reads and returns during one step of one tensor.

  Attributes:
    state: the tensor's [`KronState`][kl_optax.state.KronState] (float32).
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
    init_state: ``KronState -> KronState`` applied to the initial state after
      the slots are created (``None``: nothing). A part that keeps a mode's
      factor in another form ([`kl_optax.spike_flat_projection`][kl_optax.pro.spike_flat_projection]) uses it
      to replace that mode's dense factor, basis and eigenvalues by one-row
      placeholders (``(1, d)``, ``(1,)``). It runs in ``init`` and again in
      the initialization step (which rebuilds the initial state rather than
      reading it), as ``init_slots`` does: both should be cheap, deterministic
      functions of their input.
    float32_factors: the part reads eigenvalues of the stored factors
      ([`kl_optax.eigh_basis_refresh`][kl_optax.parts.eigh_basis_refresh]): the factors are then stored in at
      least float32 whatever the storage dtype, because rounding a factor to
      bfloat16 wipes out the small end of its spectrum.
    float32_slots: prefixes of slot names the part keeps in at least float32
      whatever the storage dtype (the cached inverse roots of
      [`kl_optax.eigh_basis_refresh`][kl_optax.parts.eigh_basis_refresh], whose
      entries span the factors' whole spectrum).
  """

  update: Callable[[TensorStep], TensorStep]
  first_update: Callable[[TensorStep], TensorStep] | None = None
  init_slots: Callable[[Shape], dict[str, jax.Array]] | None = None
  name: str = "part"
  init_state: Callable[[KronState], KronState] | None = None
  float32_factors: bool = False
  float32_slots: tuple[str, ...] = ()

  def __call__(self, step: TensorStep) -> TensorStep:
    return self.update(step)


class KronTransformState(NamedTuple):
  """State of [`kl_optax.kron_transform`][kl_optax.transform.kron_transform].

  Attributes:
    count: number of updates applied so far (int32). The update with
      ``count == 0`` is the initialization step: it starts from the initial
      state, whatever ``groups`` holds (setting ``count`` back to 0 starts the
      statistics afresh).
    groups: one stacked [`KronState`][kl_optax.state.KronState] per distinct tensor (block) shape,
      in order of first appearance among the leaves; every field has a
      leading axis over the tensors of that group. An empty tuple when no
      leaf is preconditioned. (Initialized with the leafless placeholder of
      ``optax.tree.map_params``, an empty array, which iterates like an empty
      tuple.)
  """

  count: jax.Array
  groups: tuple[KronState, ...]


class SkipNonFiniteState(NamedTuple):
  """State of [`kl_optax.skip_nonfinite`][kl_optax.safety.skip_nonfinite].

  Attributes:
    skips: per leaf of the gradients, the number of steps it skipped (int32).
    inner_state: the wrapped transformation's state.
  """

  skips: Any
  inner_state: Any


class ZeroNonFiniteState(NamedTuple):
  """State of [`kl_optax.zero_nonfinite`][kl_optax.safety.zero_nonfinite].

  Attributes:
    counts: per leaf, the number of steps in which its gradient had non-finite
      entries (int32).
  """

  counts: Any


class SpikeGuardState(NamedTuple):
  """State of [`kl_optax.spike_guard`][kl_optax.safety.spike_guard]: one entry per leaf, in ``jax.tree.leaves`` order.

  Attributes:
    count: gradients seen (int32).
    sizes: the exponential average of each leaf's (guarded) gradient size
      ``max |g|``, not bias-corrected (float32 vector).
    weight: the total weight of each average, ``1 − decay^n`` over the ``n``
      steps that entered it (float32 vector; the bias correction).
    clips: the number of steps in which each leaf's gradient was scaled back
      (int32 vector).
  """

  count: jax.Array
  sizes: jax.Array
  weight: jax.Array
  clips: jax.Array


def init_kron_state(shape: Shape, slots: Mapping[str, jax.Array] | None = None) -> KronState:
  """The state of one tensor before its first update.

  Factors are zero, bases the identity and eigenvalue estimates one; the
  initialization step (``Part.first_update`` of the parts) replaces them.

  Examples:
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


# ----------------------------------------------------------------------------
# Values a part guarantees finite
# ----------------------------------------------------------------------------

_DECLARED: list[list[tuple[Any, tuple[Any, ...]]]] = []


def all_finite(*arrays: jax.Array) -> jax.Array:
  """Whether every entry of every floating array in ``arrays`` is finite: a scalar bool.

  The same answer as ``jnp.all(jnp.isfinite(x))`` for each array, reached
  through a floating sum: ``x · 0`` is 0 where ``x`` is finite and NaN where
  it is ±inf or NaN, and a NaN survives every summation order. No sum can
  overflow, so nothing finite is ever reported as non-finite. On CPU a
  floating sum runs as one library reduction, where a boolean ``all``
  compiles to three generated kernels (an ``is-finite``, a partial and a
  final reduction); with a check per statistic of every shape group, the sums
  (together with one symmetrization fewer per eigendecomposition) took 8–10%
  off the compile of the benchmark GPT's train step (``docs/benchmarks.md``). Integer and boolean arrays are always finite.

  Examples:
    >>> import jax.numpy as jnp
    >>> from kl_optax.state import all_finite
    >>> bool(all_finite(jnp.ones(3), jnp.arange(2)))
    True
    >>> bool(all_finite(jnp.ones(3), jnp.array([1.0, jnp.inf])))
    False
  """
  sums = [jnp.sum(x * jnp.zeros((), x.dtype)) for x in arrays
          if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.isfinite(sum(sums[1:], sums[0])) if sums else jnp.bool_(True)


def declare_finite(x: jax.Array, given: Sequence[jax.Array] = ()) -> jax.Array:
  """Returns ``x``, noted as finite whenever the arrays in ``given`` are.

  A part calls it on a value it writes into the state when that value cannot
  be non-finite unless its inputs are: it falls back to the previous value
  wherever the new one is not finite (an eigenvalue estimate, a refreshed
  basis), and ``given`` holds those previous values. The non-finite guard of
  [`kron_transform`][kl_optax.transform.kron_transform] then leaves ``x`` out
  of its finiteness check when every array in ``given`` is one the step read
  from the stored state (which the guard keeps finite) or is itself declared
  finite; that saves a pass over ``x`` and the compiled reduction. The guard
  still restores ``x`` when the tensor skips the step. The note holds for the
  array object ``x`` only (compared with ``is``): anything computed from it is
  checked. Outside a guarded step it does nothing.

  Args:
    x: the value the part writes.
    given: the arrays whose finiteness implies ``x``'s (``()``: always finite).

  Examples:
    >>> import jax.numpy as jnp
    >>> from kl_optax.state import declare_finite
    >>> lam, new = jnp.ones(3), jnp.array([2.0, jnp.nan, 3.0])
    >>> declare_finite(jnp.where(jnp.isfinite(new), new, lam), given=[lam])
    Array([2., 1., 3.], dtype=float32)
  """
  if _DECLARED:
    _DECLARED[-1].append((x, tuple(given)))
  return x


@contextlib.contextmanager
def declared_finite() -> Iterator[list[tuple[Any, tuple[Any, ...]]]]:
  """Collects the notes of [`declare_finite`][kl_optax.state.declare_finite] made inside the block."""
  _DECLARED.append([])
  try:
    yield _DECLARED[-1]
  finally:
    _DECLARED.pop()
