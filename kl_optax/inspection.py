"""Reading an optimizer state for logging: refresh and skip counters, Kronecker states.

Every function here walks the state once with `_counters`, which
finds the [`KronTransformState`][kl_optax.state.KronTransformState] and non-finite guard states
wherever they sit (under ``optax.chain``, ``partition``,
``inject_hyperparams``, ``MultiSteps``, …).
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from kl_optax import trees
from kl_optax.state import (
    NONFINITE_SKIPS,
    REFRESHES,
    KronState,
    KronTransformState,
    SkipNonFiniteState,
    SpikeGuardState,
    ZeroNonFiniteState,
)

__all__ = ["adam_states", "group_name", "kron_states", "nonfinite_skips", "refresh_counts",
           "spike_clips"]

_STATES = (KronTransformState, SkipNonFiniteState, ZeroNonFiniteState)


def group_name(group: KronState) -> str:
  """The name of a stacked shape group in logs: its tensor shape, ``"<d_1>x<d_2>…"``."""
  return "x".join(str(f.shape[-1]) for f in group.factors)


def _counters(opt_state, slot: str) -> dict[str, Any]:
  """Per-leaf counters of the guards and, per shape group, the Kronecker slot ``slot``."""
  out: dict[str, Any] = {}
  for node in trees.find_states(opt_state, _STATES):
    if isinstance(node, KronTransformState):
      out.update({group_name(g): g.slots[slot] for g in node.groups if slot in g.slots})
    elif slot == NONFINITE_SKIPS:
      counts = node.skips if isinstance(node, SkipNonFiniteState) else node.counts
      for path, count in jax.tree_util.tree_flatten_with_path(counts)[0]:
        concrete = not isinstance(count, jax.core.Tracer)
        out[trees.leaf_path(path)] = int(count) if concrete else count
  return out


def kron_states(opt_state: optax.OptState) -> list[KronTransformState]:
  """Every [`KronTransformState`][kl_optax.state.KronTransformState] inside an optimizer state (e.g. under ``optax.partition``).

  Examples:
    >>> import jax.numpy as jnp, kl_optax
    >>> tx = kl_optax.kl_shampoo(1e-3)
    >>> state = tx.init({'w': jnp.zeros((4, 3)), 'b': jnp.zeros(3)})
    >>> [kl_optax.inspection.group_name(g) for g in kl_optax.kron_states(state)[0].groups]
    ['4x3']
  """
  return trees.find_states(opt_state, KronTransformState)


def adam_states(opt_state: optax.OptState) -> list[Any]:
  """Every ``optax.ScaleByAdamState`` inside an optimizer state: the fallback's moments.

  In a recipe's state there is one, holding AdamW's ``mu`` and ``nu`` for the
  leaves routed to the fallback (other leaves are ``optax.MaskedNode``).

  Examples:
    >>> import jax.numpy as jnp, kl_optax
    >>> tx = kl_optax.kl_shampoo(1e-3)
    >>> state = tx.init({'w': jnp.zeros((4, 3)), 'b': jnp.zeros(3)})
    >>> kl_optax.adam_states(state)[0].mu['b'].shape
    (3,)
  """
  return trees.find_states(opt_state, optax.ScaleByAdamState)


def refresh_counts(opt_state: optax.OptState) -> dict[str, jax.Array]:
  """Basis refreshes performed so far, per shape group, for logging.

  Returns:
    ``{"<d_1>x<d_2>…": counts}`` with ``counts`` of shape
    ``(tensors in the group, modes)``: how many times each factor's basis was
    refreshed (the slot ``'refreshes'`` of the refresh parts). Groups whose
    parts keep no count are left out.

  Examples:
    >>> import jax.numpy as jnp, kl_optax
    >>> tx = kl_optax.kl_shampoo(1e-3, precondition_frequency=1)
    >>> params = {'w': jnp.zeros((4, 3))}
    >>> state = tx.init(params)
    >>> for _ in range(3):
    ...   _, state = tx.update({'w': jnp.ones((4, 3))}, state, params)
    >>> kl_optax.refresh_counts(state)['4x3'].tolist()
    [[2, 2]]
  """
  return _counters(opt_state, REFRESHES)


def nonfinite_skips(opt_state: optax.OptState) -> dict[str, Any]:
  """Steps skipped because of non-finite values, for logging.

  Returns:
    ``{leaf path: count}`` from [`kl_optax.zero_nonfinite`][kl_optax.safety.zero_nonfinite] (the recipes'
    AdamW leaves: steps with non-finite entries) or
    [`kl_optax.skip_nonfinite`][kl_optax.safety.skip_nonfinite] (steps skipped), and
    ``{"<d_1>x<d_2>…": counts}`` per Kronecker shape group (steps skipped, one
    count per stacked tensor or block), whichever the state holds.

  Examples:
    >>> import jax.numpy as jnp, kl_optax
    >>> tx = kl_optax.kl_shampoo(1e-3)
    >>> params = {'w': jnp.zeros((4, 3)), 'b': jnp.zeros(3)}
    >>> state = tx.init(params)
    >>> _, state = tx.update({'w': jnp.full((4, 3), jnp.nan), 'b': jnp.ones(3)}, state, params)
    >>> skips = kl_optax.nonfinite_skips(state)
    >>> skips["['b']"], skips['4x3'].tolist()
    (0, [1])
  """
  return _counters(opt_state, NONFINITE_SKIPS)


def spike_clips(opt_state: optax.OptState, params: Any = None) -> dict[str, Any]:
  """Steps in which [`kl_optax.spike_guard`][kl_optax.safety.spike_guard] scaled a gradient back, per leaf.

  Args:
    opt_state: an optimizer state.
    params: the parameters (or any tree of their structure), to name the
      leaves by path; without them the keys are the leaves' positions in
      ``jax.tree.leaves`` order (``"leaf 0"``, …).

  Examples:
    >>> import jax.numpy as jnp, kl_optax
    >>> tx = kl_optax.kl_shampoo(1e-3)
    >>> params = {'w': jnp.zeros((4, 3)), 'b': jnp.zeros(3)}
    >>> state = tx.init(params)
    >>> kl_optax.spike_clips(state, params)
    {"['b']": 0, "['w']": 0}
  """
  names = None if params is None else [
      trees.leaf_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  out: dict[str, Any] = {}
  for node in trees.find_states(opt_state, SpikeGuardState):
    counts = node.clips if isinstance(node.clips, jax.core.Tracer) else [int(c) for c in node.clips]
    for i in range(node.clips.shape[0]):
      out[names[i] if names else f"leaf {i}"] = counts[i]
  return out
