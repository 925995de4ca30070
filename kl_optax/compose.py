"""Turning a sequence of parts into an optax transformation.

:func:`kron_transform` is the one wrapper every recipe is built with. It

* squeezes size-1 dims of every leaf and checks that what remains can carry a
  Kronecker preconditioner (order ≥ 2, floating point);
* groups leaves of the same squeezed shape and stores their states as stacks
  (a leading axis per group), so that each part runs once per shape group under
  ``jax.vmap`` — one batched factor update and one batched QR per group, however
  deep the model;
* runs the parts' initialization step on the first update (returning a zero
  update) and their regular step afterwards, chosen by one ``lax.cond``;
* keeps state dtypes stable (float32 by default, optionally a narrower storage
  dtype) so that ``lax.cond``, ``optax.MultiSteps`` and checkpoint restores work.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kl_optax import parts as parts_lib

__all__ = [
    "KronTransformState",
    "TensorPlan",
    "kron_transform",
    "leaf_path",
    "plan_tensors",
    "squeezed_shape",
]


class KronTransformState(NamedTuple):
  """State of :func:`kron_transform`.

  Attributes:
    count: number of updates applied so far (int32). The update with
      ``count == 0`` is the initialization step.
    groups: one stacked :class:`~kl_optax.KronState` per distinct squeezed
      tensor shape, in order of first appearance among the leaves (every
      field has a leading axis over the tensors of that group). When no leaf is
      preconditioned, an empty array instead of a tuple.
  """

  count: jax.Array
  groups: tuple[parts_lib.KronState, ...] | jax.Array


def leaf_path(path) -> str:
  """A readable name for a pytree path (as used in error messages)."""
  name = jax.tree_util.keystr(path)
  return name if name else "<root>"


def squeezed_shape(shape: Sequence[int]) -> tuple[int, ...]:
  """``shape`` without its size-1 dims."""
  return tuple(int(d) for d in shape if d != 1)


def check_floating(path, leaf, where: str) -> None:
  """Raises a ``TypeError`` naming the leaf if it is not a real floating array."""
  dtype = jnp.result_type(leaf.dtype) if hasattr(leaf, "dtype") else None
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
        f"{where}: leaf {leaf_path(path)} has dtype {dtype}; Kronecker-factored "
        "optimizers need real floating-point parameters (float32, bfloat16, "
        "float16 or float64). Remove the leaf from the optimized tree or mark it "
        "as not trainable."
    )


class TensorPlan(NamedTuple):
  """How the leaves of a tree are stacked into shape groups.

  Attributes:
    treedef: the tree structure of the leaves.
    paths: a readable path per leaf.
    shapes: each leaf's original shape.
    group_of: for each leaf, ``(group index, position in the group's stack)``.
    group_shapes: the squeezed tensor shape of each group.
    group_sizes: the number of tensors stacked in each group.
  """

  treedef: Any
  paths: tuple[str, ...]
  shapes: tuple[tuple[int, ...], ...]
  group_of: tuple[tuple[int, int], ...]
  group_shapes: tuple[tuple[int, ...], ...]
  group_sizes: tuple[int, ...]


def plan_tensors(tree, where: str = "kron_transform") -> TensorPlan:
  """Checks every leaf and assigns it to a shape group.

  Raises:
    TypeError: a leaf is not floating point (the message names the leaf).
    ValueError: a leaf has fewer than two dims of size > 1 (the message names
      the leaf and says where such leaves belong).
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  paths, shapes, group_of = [], [], []
  group_index: dict[tuple[int, ...], int] = {}
  group_sizes: list[int] = []
  for path, leaf in flat:
    check_floating(path, leaf, where)
    shape = tuple(int(d) for d in leaf.shape)
    sq = squeezed_shape(shape)
    if len(sq) < 2:
      raise ValueError(
          f"{where}: leaf {leaf_path(path)} has shape {shape}, which has fewer "
          "than two dims larger than one and cannot carry a Kronecker "
          "preconditioner. Use a recipe such as kl_optax.kl_shampoo, which routes "
          "such leaves to AdamW, or route them yourself with optax.partition."
      )
    if sq not in group_index:
      group_index[sq] = len(group_sizes)
      group_sizes.append(0)
    gi = group_index[sq]
    group_of.append((gi, group_sizes[gi]))
    group_sizes[gi] += 1
    paths.append(leaf_path(path))
    shapes.append(shape)
  return TensorPlan(
      treedef=treedef,
      paths=tuple(paths),
      shapes=tuple(shapes),
      group_of=tuple(group_of),
      group_shapes=tuple(group_index),
      group_sizes=tuple(group_sizes),
  )


def _storage_dtype(state_dtype) -> jnp.dtype:
  dtype = jnp.dtype(jnp.float32 if state_dtype is None else state_dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"state_dtype must be a floating dtype, got {dtype}.")
  return dtype


def _cast_state(state: parts_lib.KronState, dtype) -> parts_lib.KronState:
  """Casts factors, bases and floating slots; eigenvalue estimates stay float32."""

  def cast(x):
    return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

  return parts_lib.KronState(
      factors=tuple(cast(x) for x in state.factors),
      bases=tuple(cast(x) for x in state.bases),
      eigvals=tuple(x.astype(jnp.float32) for x in state.eigvals),
      slots={k: cast(v) for k, v in state.slots.items()},
  )


def _run(seq, step: parts_lib.TensorStep) -> parts_lib.TensorStep:
  for fn in seq:
    step = fn(step)
  return step


def kron_transform(
    *parts: parts_lib.Part, state_dtype: Any = None
) -> optax.GradientTransformationExtraArgs:
  """Builds an optax transformation from a sequence of :class:`~kl_optax.Part`.

  Every leaf of the tree the transformation is applied to is preconditioned:
  size-1 dims are squeezed and what remains must have order ≥ 2 (route other
  leaves elsewhere with ``optax.partition``, as the recipes do). Leaves of the
  same squeezed shape are stacked and processed together.

  On the first update (``count == 0``) each part's ``first_update`` runs (the
  statistics are initialized from this gradient) and the returned update is
  zero. On every later update the parts' ``update`` functions run in the given
  order and the final running update is returned, cast to each gradient's
  dtype.

  Args:
    *parts: the parts, in the order they run.
    state_dtype: storage dtype of factors, bases and floating slots (``None``:
      float32; ``jnp.bfloat16`` halves their memory). Eigenvalue estimates
      are always float32. All computation is float32.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (extra keyword arguments of
    ``update`` are accepted and ignored).

  Example:
    >>> import jax, jax.numpy as jnp, optax, kl_optax
    >>> tx = kl_optax.kron_transform(
    ...     kl_optax.momentum(0.9),
    ...     kl_optax.whiten(1e-8),
    ...     kl_optax.kl_factor_update(0.98),
    ...     kl_optax.ema_eigenvalues(0.98),
    ...     kl_optax.qr_basis_refresh(10))
    >>> params = {'w': jnp.ones((4, 3))}
    >>> state = tx.init(params)
    >>> grads = {'w': jnp.arange(12.0).reshape(4, 3)}
    >>> updates, state = tx.update(grads, state)   # initialization: zero update
    >>> float(jnp.abs(updates['w']).max())
    0.0
  """
  for i, p in enumerate(parts):
    if not isinstance(p, parts_lib.Part):
      raise TypeError(
          f"kron_transform: argument {i} is a {type(p).__name__}, not a kl_optax.Part."
      )
  dtype = _storage_dtype(state_dtype)
  later_fns = [p.update for p in parts]
  first_fns = [p.first_update for p in parts if p.first_update is not None]

  def init_tensor(shape):
    slots = {}
    for p in parts:
      if p.init_slots is not None:
        for name, value in p.init_slots(shape).items():
          if name in slots and slots[name].shape != value.shape:
            raise ValueError(
                f"kron_transform: two parts declare slot {name!r} with different "
                f"shapes ({slots[name].shape} and {value.shape})."
            )
          slots[name] = value
    state = parts_lib.init_kron_state(shape, slots)
    for p in parts:
      if p.init_state is not None:
        state = p.init_state(state)
    return state

  def init_fn(params):
    plan = plan_tensors(params, "kron_transform.init")
    if not plan.group_sizes:
      return KronTransformState(
          count=jnp.zeros([], jnp.int32), groups=jnp.zeros((0,), jnp.float32)
      )
    groups = []
    for shape, n in zip(plan.group_shapes, plan.group_sizes):
      one = _cast_state(init_tensor(shape), dtype)
      groups.append(jax.tree.map(lambda x, n=n: jnp.broadcast_to(x, (n,) + x.shape), one))
    return KronTransformState(count=jnp.zeros([], jnp.int32), groups=tuple(groups))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    plan = plan_tensors(updates, "kron_transform.update")
    if not plan.group_sizes:
      return updates, KronTransformState(
          count=optax.safe_increment(state.count), groups=state.groups
      )
    _check_matches_state(plan, state)
    leaves = plan.treedef.flatten_up_to(updates)
    stacks = [[None] * n for n in plan.group_sizes]
    for leaf, (gi, pos) in zip(leaves, plan.group_of):
      stacks[gi][pos] = leaf.reshape(plan.group_shapes[gi]).astype(jnp.float32)
    grads = tuple(jnp.stack(s) for s in stacks)
    states = tuple(_cast_state(g, jnp.float32) for g in state.groups)

    def run_group(seq, st, g, count):
      out = _run(seq, parts_lib.TensorStep(st, g, g, count))
      return out.state, out.update

    def first(states, grads, count):
      new = tuple(
          jax.vmap(lambda st, g: run_group(first_fns, st, g, count)[0])(st, g)
          for st, g in zip(states, grads)
      )
      return new, tuple(jnp.zeros_like(g) for g in grads)

    def later(states, grads, count):
      res = [
          jax.vmap(lambda st, g: run_group(later_fns, st, g, count))(st, g)
          for st, g in zip(states, grads)
      ]
      return tuple(r[0] for r in res), tuple(r[1] for r in res)

    new_states, outs = jax.lax.cond(
        state.count == 0, first, later, states, grads, state.count
    )
    new_states = tuple(_cast_state(s, dtype) for s in new_states)
    new_leaves = [
        outs[gi][pos].reshape(shape).astype(leaf.dtype)
        for leaf, shape, (gi, pos) in zip(leaves, plan.shapes, plan.group_of)
    ]
    new_updates = plan.treedef.unflatten(new_leaves)
    return new_updates, KronTransformState(
        count=optax.safe_increment(state.count), groups=new_states
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_matches_state(plan: TensorPlan, state: KronTransformState) -> None:
  groups = state.groups
  if not isinstance(groups, tuple) or len(groups) != len(plan.group_shapes):
    n = len(groups) if isinstance(groups, tuple) else 0
    raise ValueError(
        "kron_transform.update: the gradients do not match the optimizer state: "
        f"they form {len(plan.group_shapes)} shape group(s) "
        f"{list(plan.group_shapes)}, the state has {n}. Was the state "
        "initialized with parameters of a different structure?"
    )
  for gi, (shape, n) in enumerate(zip(plan.group_shapes, plan.group_sizes)):
    st_shape = tuple(f.shape[-1] for f in groups[gi].factors)
    st_n = groups[gi].factors[0].shape[0]
    if st_shape != shape or st_n != n:
      members = [p for p, (g, _) in zip(plan.paths, plan.group_of) if g == gi]
      raise ValueError(
          "kron_transform.update: the gradients do not match the optimizer state: "
          f"gradient leaves {members} (squeezed shape {shape}, {n} tensors) meet a "
          f"state group for shape {st_shape} with {st_n} tensors. Was the state "
          "initialized with parameters of a different structure?"
      )


def kron_states(opt_state) -> list[KronTransformState]:
  """Every :class:`KronTransformState` inside an optimizer state (e.g. under ``optax.partition``)."""
  found = []

  def visit(x):
    if isinstance(x, KronTransformState):
      found.append(x)
      return True
    return False

  jax.tree_util.tree_flatten(opt_state, is_leaf=visit)
  return found


def refresh_counts(opt_state) -> dict[str, jax.Array]:
  """Basis refreshes performed so far, per shape group, for logging.

  Returns:
    ``{"<d_1>x<d_2>…": counts}`` with ``counts`` of shape
    ``(tensors in the group, modes)``: how many times each factor's basis was
    refreshed (the slot ``'refreshes'`` of the refresh parts). Groups whose
    parts keep no count are left out.

  Example:
    >>> import jax.numpy as jnp, kl_optax
    >>> tx = kl_optax.kl_shampoo(1e-3, precondition_frequency=1)
    >>> params = {'w': jnp.zeros((4, 3))}
    >>> state = tx.init(params)
    >>> for _ in range(3):
    ...   _, state = tx.update({'w': jnp.ones((4, 3))}, state, params)
    >>> kl_optax.refresh_counts(state)['4x3'].tolist()
    [[2, 2]]
  """
  out = {}
  for st in kron_states(opt_state):
    if not isinstance(st.groups, tuple):
      continue
    for group in st.groups:
      if "refreshes" in group.slots:
        key = "x".join(str(f.shape[-1]) for f in group.factors)
        out[key] = group.slots["refreshes"]
  return out
