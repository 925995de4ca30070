"""Keeping non-finite numbers out of optimizer state.

The policy of every recipe:

* a Kronecker-preconditioned tensor (or block) whose gradient is not finite
  (NaN or ±Inf), or whose statistics or update would come out not finite
  (overflow), skips the step: its state keeps its previous values and its
  update is zero apart from the decoupled weight decay, which does not depend
  on the gradient (inside [`kron_transform`][kl_optax.transform.kron_transform], counted per
  tensor);
* in the AdamW branch, non-finite gradient entries are zeroed and magnitudes
  capped ([`zero_nonfinite`][kl_optax.safety.zero_nonfinite], counted per leaf), so the moments stay
  finite;
* everything else updates as usual, so one bad tensor does not stop training;
* gradients that do not match the state raise an error naming the leaf
  ([`check_gradients`][kl_optax.safety.check_gradients]).

[`skip_nonfinite`][kl_optax.safety.skip_nonfinite] is the stricter rule for any optax transformation:
leaf by leaf, a bad gradient, update or parameter-shaped state makes the
whole leaf skip the step. It costs a few operations per leaf. To drop a whole
step whenever any gradient is bad, wrap the optimizer in
``optax.apply_if_finite``; all of these compose.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from kl_optax import trees
from kl_optax import validation
from kl_optax.state import (KronTransformState, SkipNonFiniteState, SpikeGuardState,
                             ZeroNonFiniteState, all_finite)

__all__ = [
    "check_gradients",
    "skip_nonfinite",
    "spike_guard",
    "zero_nonfinite",
]


def _finite(x) -> jax.Array:
  return all_finite(x)


def skip_nonfinite(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """Wraps ``inner`` so that a leaf with a non-finite gradient, update or state skips the step.

  Args:
    inner: any optax transformation.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    [`SkipNonFiniteState`][kl_optax.state.SkipNonFiniteState].

  Examples:
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
    owners = trees.map_state(
        new_inner, updates,
        lambda flat_state: [x if trees.is_masked(x) else i for i, x in enumerate(flat_state)],
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


def zero_nonfinite(max_abs: float = 1e15) -> optax.GradientTransformation:
  """Zeroes non-finite gradient entries and caps magnitudes at ``max_abs``; counts, per leaf.

  Placed in front of a moment-based transformation (the recipes put it in
  front of their AdamW branch), it keeps NaN and Inf out of the moments and
  the cap keeps squared gradients from overflowing float32. It is elementwise,
  so it fuses into the update and costs next to nothing.

  Args:
    max_abs: largest gradient magnitude passed on.

  Returns:
    An ``optax.GradientTransformation`` with state [`ZeroNonFiniteState`][kl_optax.state.ZeroNonFiniteState].

  Examples:
    >>> import jax.numpy as jnp, kl_optax
    >>> tx = kl_optax.zero_nonfinite()
    >>> state = tx.init({'a': jnp.zeros(3)})
    >>> g, state = tx.update({'a': jnp.array([1.0, jnp.inf, jnp.nan])}, state)
    >>> g['a'].tolist(), int(state.counts['a'])
    ([1.0, 0.0, 0.0], 1)
  """
  cap = float(max_abs)

  def init_fn(params):
    return ZeroNonFiniteState(jax.tree.map(lambda _: jnp.zeros([], jnp.int32), params))

  def update_fn(updates, state, params=None):
    del params
    finite = jax.tree.map(jnp.isfinite, updates)
    out = jax.tree.map(
        lambda g, f: jnp.where(f, _cap(g, cap), jnp.zeros_like(g)).astype(g.dtype),
        updates, finite)
    counts = jax.tree.map(lambda c, f: c + (~jnp.all(f)).astype(jnp.int32), state.counts, finite)
    return out, ZeroNonFiniteState(counts)

  return optax.GradientTransformation(init_fn, update_fn)


def spike_guard(threshold: float | None = 10.0, decay: float = 0.98,
                warmup: int = 5) -> optax.GradientTransformation:
  """Scales back a gradient whose norm jumps far above its running average; counts, per leaf.

  A Kronecker preconditioner whitens this step's momentum with the previous
  step's statistics, so a sudden gradient a million times larger than usual
  makes one step ~1e5 times too long, and it enters the factor and
  eigenvalue averages, which take ~1/(1 − b2) steps to forget it. This guard
  keeps such a spike out of both: per leaf, with ``s = max |g|`` the size of
  its gradient and ``a`` the bias-corrected exponential average (``decay``)
  of its past sizes, a gradient with ``s > threshold · a`` is scaled by
  ``threshold · a / s`` before anything sees it, and the scaled size is what
  enters ``a``. The first ``warmup`` steps are never scaled (they set the
  average: a large gradient at the start of training is normal). Zero and
  non-finite sizes leave the average alone (the non-finite policy handles the
  latter). A gradient that stays no further than ``threshold`` times above
  the average passes unchanged, bit for bit; the largest entry, unlike a
  norm, never overflows, and costs one reduction per leaf.

  Args:
    threshold: how many times its running average a leaf's gradient size
      may reach (``None``: the guard does nothing and keeps no state).
    decay: keep factor of the running average of sizes.
    warmup: steps before the guard may act.

  Returns:
    An ``optax.GradientTransformation`` with state [`SpikeGuardState`][kl_optax.state.SpikeGuardState]
    (one entry per leaf, in ``jax.tree.leaves`` order, in three small
    vectors; ``kl_optax.spike_clips(state, params)`` names them).

  Examples:
    >>> import jax.numpy as jnp, kl_optax
    >>> tx = kl_optax.spike_guard(threshold=10.0, warmup=2)
    >>> state = tx.init({'w': jnp.zeros(3)})
    >>> for scale in (1.0, 1.0, 1.0, 1e6):
    ...   g, state = tx.update({'w': jnp.full(3, scale)}, state)
    >>> float(jnp.max(g['w'])) <= 10.0 * 1.0001, state.clips.tolist()
    (True, [1])
  """
  if threshold is None:
    return optax.identity()
  validation.check_range("spike threshold", threshold, 1.0, None, low_open=True)
  validation.check_range("spike decay", decay, 0.0, 1.0)
  warmup = validation.static_int(warmup, "warmup", default=5)

  def init_fn(params):
    n = len(jax.tree.leaves(params))
    return SpikeGuardState(count=jnp.zeros([], jnp.int32), sizes=jnp.zeros((n,), jnp.float32),
                           weight=jnp.zeros((n,), jnp.float32), clips=jnp.zeros((n,), jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    flat = jax.tree.leaves(updates)
    if len(flat) != state.sizes.shape[0]:
      raise ValueError(
          f"spike_guard: the gradients have {len(flat)} leaves, the state was initialized "
          f"for {state.sizes.shape[0]}. Was it initialized with different parameters?")
    if not flat:
      return updates, state._replace(count=optax.safe_increment(state.count))
    # Every leaf's size, then the guard's logic once on the vectors of them.
    scale, sizes, weight, clipped = _guard(jnp.stack([_size(g) for g in flat]), state.sizes,
                                           state.weight, state.count >= warmup, threshold, decay)
    # Only a step with a spike touches the gradients; the others pass as they are.
    out = jax.lax.cond(jnp.any(clipped),
                       lambda: [g * scale[i].astype(g.dtype) for i, g in enumerate(flat)],
                       lambda: list(flat))
    return jax.tree.unflatten(jax.tree.structure(updates), out), SpikeGuardState(
        optax.safe_increment(state.count), sizes, weight,
        state.clips + clipped.astype(jnp.int32))

  return optax.GradientTransformation(init_fn, update_fn)


def _size(g: jax.Array) -> jax.Array:
  """The largest magnitude in ``g``, in float32 (0 for an empty leaf): the guard's statistic.

  One reduction per leaf, finite for any finite gradient (a norm's sum of
  squares would overflow for 1e30-sized entries).
  """
  return jnp.max(jnp.abs(g)).astype(jnp.float32) if g.size else jnp.float32(0.0)


def _guard(size, avg, weight, active, threshold, decay):
  """The guard on vectors of sizes: per-leaf scale (1 or smaller), new average and weight, clips."""
  cap = threshold * avg / jnp.maximum(weight, 1e-30)
  clip = active & (weight > 0) & (size > cap) & jnp.isfinite(size)
  scale = jnp.where(clip, cap / jnp.where(clip, size, 1.0), 1.0)
  seen = jnp.where(clip, cap, size)
  # Steps without a usable norm (zero, non-finite) keep the average as it is.
  usable = jnp.isfinite(seen) & (seen > 0)
  return (scale, jnp.where(usable, decay * avg + (1.0 - decay) * seen, avg),
          jnp.where(usable, decay * weight + (1.0 - decay), weight), clip)


def _cap(g: jax.Array, cap: float) -> jax.Array:
  """``g`` with magnitudes above ``cap`` brought down to ``cap`` (complex: keeping the phase)."""
  if jnp.issubdtype(g.dtype, jnp.complexfloating):
    mag = jnp.abs(g)
    return jnp.where(mag > cap, g * (cap / jnp.maximum(mag, cap)), g)
  return jnp.clip(g, -cap, cap)


def _paths(tree) -> list[str]:
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=trees.is_masked)[0]
  return [trees.leaf_path(p) for p, _ in flat]


def check_gradients(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """Wraps ``inner`` with a check, at trace time only, that the gradients match the state.

  The leaf paths are compared with the counters of the first
  [`SkipNonFiniteState`][kl_optax.state.SkipNonFiniteState] in the state, and each leaf's shape with every
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
  found = trees.find_states(state, (SkipNonFiniteState, ZeroNonFiniteState))
  if not found:
    return None
  return found[0].skips if isinstance(found[0], SkipNonFiniteState) else found[0].counts


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
  flat_updates, treedef = jax.tree_util.tree_flatten(updates, is_leaf=trees.is_masked)
  paths = _paths(updates)

  def check(node):
    # Only nodes shaped like the gradients (moments) are compared. Comparing the
    # structures first is cheap; a failing ``flatten_up_to`` would format the
    # whole node, arrays included, into its error message.
    if jax.tree_util.tree_structure(node, is_leaf=trees.is_masked) != treedef:
      return
    flat = treedef.flatten_up_to(node)
    if not all(trees.is_masked(x) or hasattr(x, "shape") for x in flat):
      return
    pairs = [(x, g, path) for x, g, path in zip(flat, flat_updates, paths)
             if not (trees.is_masked(x) or trees.is_masked(g))]
    # Moments are floating point; per-leaf counters (int32) are not parameter-shaped.
    if not pairs or not all(jnp.issubdtype(x.dtype, jnp.inexact) for x, _, _ in pairs):
      return
    for x, g, path in pairs:
      if tuple(x.shape) != tuple(g.shape):
        raise ValueError(
            f"The gradients do not match the optimizer state: leaf {path} has shape "
            f"{tuple(g.shape)}, the state holds {tuple(x.shape)} for it. Was the state "
            "initialized with parameters of other shapes?")

  def visit(node):
    if isinstance(node, jax.Array) or node is None or trees.is_masked(node):
      return
    if isinstance(node, SkipNonFiniteState):   # its counters are scalars per leaf
      visit(node.inner_state)
      return
    if isinstance(node, (ZeroNonFiniteState, SpikeGuardState)):   # scalars per leaf
      return
    if isinstance(node, KronTransformState):   # checks its own gradients
      return
    check(node)
    children, _ = jax.tree_util.tree_flatten(node, is_leaf=lambda x: x is not node)
    if not (len(children) == 1 and children[0] is node):
      for c in children:
        visit(c)

  visit(state)
