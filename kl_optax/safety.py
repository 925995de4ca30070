"""Keeping non-finite numbers out of optimizer state.

The policy of every recipe:

* a tensor whose gradient is not finite (NaN or ±Inf), or whose update or
  state would come out not finite (overflow), skips the step: its state keeps
  its previous values and its update is zero (a Kronecker-preconditioned
  tensor still gets its decoupled weight decay, which does not depend on the
  gradient);
* skips are counted (:func:`nonfinite_skips`): per stacked tensor inside
  :func:`~kl_optax.kron_transform`, per leaf in the AdamW branch, which
  :func:`skip_nonfinite` wraps;
* the other tensors update as usual, so one bad tensor does not stop training.

:func:`skip_nonfinite` applies the rule to any optax transformation, leaf by
leaf, for the parameter-shaped parts of its state (AdamW's moments, for
example); any other floating-point state entry that would come out not finite
keeps its previous value. Shared counters (the step count of an AdamW branch,
learning-rate schedules) still advance. To drop a whole step instead whenever
any gradient is bad, wrap the optimizer in ``optax.apply_if_finite``; both
compose.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kl_optax import _trees
from kl_optax.compose import SKIP_SLOT, kron_states, leaf_path

__all__ = ["SkipNonFiniteState", "check_gradients", "nonfinite_skips", "skip_nonfinite"]


class SkipNonFiniteState(NamedTuple):
  """State of :func:`skip_nonfinite`.

  Attributes:
    skips: per leaf of the gradients, the number of steps it skipped (int32).
    inner_state: the wrapped transformation's state.
  """

  skips: Any
  inner_state: Any


def _finite(x) -> jax.Array:
  return jnp.all(jnp.isfinite(x))


def skip_nonfinite(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """Wraps ``inner`` so that a leaf with a non-finite gradient, update or state skips the step.

  Args:
    inner: any optax transformation.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`SkipNonFiniteState`.

  Example:
    >>> import jax.numpy as jnp, optax, kl_optax
    >>> tx = kl_optax.skip_nonfinite(optax.adam(1e-2))
    >>> params = {'a': jnp.ones(2), 'b': jnp.ones(2)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({'a': jnp.array([1.0, jnp.nan]), 'b': jnp.ones(2)},
    ...                            state, params)
    >>> updates['a'].tolist(), kl_optax.nonfinite_skips(state)
    ([0.0, 0.0], {"['a']": 1, "['b']": 0})
  """
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    skips = jax.tree.map(lambda _: jnp.zeros([], jnp.int32), params)
    return SkipNonFiniteState(skips=skips, inner_state=inner.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    _check_matches(updates, state)
    flat, treedef = jax.tree_util.tree_flatten(updates)
    finite = [_finite(g) for g in flat]
    # The inner transformation sees the gradients as they are (a zeroed
    # gradient would still move its statistics); whatever a bad leaf touches
    # is put back below.
    new_updates, new_inner = inner.update(updates, state.inner_state, params, **extra_args)
    new_flat = treedef.flatten_up_to(new_updates)
    ok = [f & _finite(u) for f, u in zip(finite, new_flat)]

    # Parameter-shaped state entries belong to their leaf and must be finite too.
    owners = _trees.map_state(
        new_inner, updates,
        lambda flat_state: [x if _trees.is_masked(x) else i for i, x in enumerate(flat_state)],
        lambda _: -1)
    for x, owner in zip(jax.tree.leaves(new_inner), jax.tree.leaves(owners)):
      if owner >= 0:
        ok[owner] = ok[owner] & _finite(x)
    def keep(new, old, owner):
      if owner >= 0:
        return jnp.where(ok[owner], new, old)
      if jnp.issubdtype(new.dtype, jnp.inexact):   # shared state: never non-finite
        return jnp.where(_finite(new), new, old)
      return new

    kept = jax.tree.map(keep, new_inner, state.inner_state, owners)
    out = treedef.unflatten([jnp.where(k, u, jnp.zeros_like(u)) for k, u in zip(ok, new_flat)])
    skips = treedef.unflatten([c + (~k).astype(jnp.int32)
                               for c, k in zip(treedef.flatten_up_to(state.skips), ok)])
    return out, SkipNonFiniteState(skips=skips, inner_state=kept)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _paths(tree) -> list[str]:
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_trees.is_masked)[0]
  return [leaf_path(p) for p, _ in flat]


def check_gradients(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """Wraps ``inner`` with a check, at trace time only, that the gradients match the state.

  The leaf paths are compared with the counters of the first
  :class:`SkipNonFiniteState` in the state, and each leaf's shape with every
  parameter-shaped sub-tree of the state (AdamW's moments, for example). A
  mismatch raises ``ValueError`` naming the leaves. Nothing is added to the
  compiled step.
  """
  inner = optax.with_extra_args_support(inner)

  def update_fn(updates, state, params=None, **extra_args):
    _check_matches(updates, state)
    return inner.update(updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def _first_skips(state):
  found = []

  def visit(x):
    if isinstance(x, SkipNonFiniteState):
      found.append(x.skips)
      return True
    return False

  jax.tree_util.tree_flatten(state, is_leaf=visit)
  return found[0] if found else None


def _check_matches(updates, state) -> None:
  """Raises ``ValueError`` naming the leaves where the gradients and the state disagree."""
  skips = _first_skips(state)
  if skips is not None:
    have, want = _paths(updates), _paths(skips)
    if have != want:
      extra = sorted(set(have) - set(want))
      missing = sorted(set(want) - set(have))
      raise ValueError(
          "The gradients do not match the optimizer state: "
          + (f"leaves not in the state: {extra}; " if extra else "")
          + (f"leaves missing from the gradients: {missing}; " if missing else "")
          + ("the same leaves in a different order; " if not extra and not missing else "")
          + "was the state initialized with different parameters?")
  flat_updates, treedef = jax.tree_util.tree_flatten(updates, is_leaf=_trees.is_masked)
  paths = _paths(updates)

  def check(node):
    try:
      flat = treedef.flatten_up_to(node)
    except (ValueError, TypeError):
      return
    if not all(_trees.is_masked(x) or hasattr(x, "shape") for x in flat):
      return
    for x, g, path in zip(flat, flat_updates, paths):
      if _trees.is_masked(x) or _trees.is_masked(g):
        continue
      if tuple(x.shape) != tuple(g.shape):
        raise ValueError(
            f"The gradients do not match the optimizer state: leaf {path} has shape "
            f"{tuple(g.shape)}, the state holds {tuple(x.shape)} for it. Was the state "
            "initialized with parameters of other shapes?")

  def visit(node):
    if isinstance(node, jax.Array) or node is None or _trees.is_masked(node):
      return
    if isinstance(node, SkipNonFiniteState):   # its counters are scalars per leaf
      visit(node.inner_state)
      return
    check(node)
    children, _ = jax.tree_util.tree_flatten(node, is_leaf=lambda x: x is not node)
    if not (len(children) == 1 and children[0] is node):
      for c in children:
        visit(c)

  visit(state)


def nonfinite_skips(opt_state) -> dict[str, Any]:
  """Steps skipped because of non-finite values, for logging.

  Returns:
    ``{leaf path: count}`` from :func:`skip_nonfinite` (whole leaves) and
    ``{"<d_1>x<d_2>…": counts}`` per Kronecker shape group (one count per
    stacked tensor or block), whichever the state holds.
  """
  out: dict[str, Any] = {}

  def visit(x):
    if isinstance(x, SkipNonFiniteState):
      for path, count in jax.tree_util.tree_flatten_with_path(x.skips)[0]:
        out[leaf_path(path)] = int(count) if not isinstance(count, jax.core.Tracer) else count
      return True
    return False

  jax.tree_util.tree_flatten(opt_state, is_leaf=visit)
  for st in kron_states(opt_state):
    if isinstance(st.groups, tuple):
      for group in st.groups:
        if SKIP_SLOT in group.slots:
          key = "x".join(str(f.shape[-1]) for f in group.factors)
          out[key] = group.slots[SKIP_SLOT]
  return out
