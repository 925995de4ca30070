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

import itertools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec

from kl_optax import parts as parts_lib
from kl_optax import sharding as sharding_lib

SKIP_SLOT = "nonfinite_skips"

__all__ = [
    "SKIP_SLOT",
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
  """How the leaves of a tree are cut into blocks and stacked into shape groups.

  Attributes:
    treedef: the tree structure of the leaves.
    paths: a readable path per leaf.
    shapes: each leaf's original shape.
    squeezed: each leaf's shape without size-1 dims.
    blocks: per leaf, its blocks in row-major order, each
      ``(group index, position in the group's stack, starts, sizes)``.
    grids: per leaf, the number of blocks along each squeezed dim.
    group_shapes: the tensor (block) shape of each group.
    group_sizes: the number of tensors (blocks) stacked in each group.
  """

  treedef: Any
  paths: tuple[str, ...]
  shapes: tuple[tuple[int, ...], ...]
  squeezed: tuple[tuple[int, ...], ...]
  blocks: tuple[tuple[tuple[int, int, tuple[int, ...], tuple[int, ...]], ...], ...]
  grids: tuple[tuple[int, ...], ...]
  group_shapes: tuple[tuple[int, ...], ...]
  group_sizes: tuple[int, ...]


def block_ranges(dim: int, max_precond_dim: int | None, block_size: int | None):
  """``(start, size)`` of the blocks of one dim: one block unless ``dim > max_precond_dim``.

  A dim larger than ``max_precond_dim`` is cut into consecutive blocks of
  ``block_size`` (the last one holds the remainder). Without ``block_size``
  nothing is cut.
  """
  if block_size is None or dim <= (block_size if max_precond_dim is None else max_precond_dim):
    return [(0, dim)]
  return [(s, min(block_size, dim - s)) for s in range(0, dim, block_size)]


def plan_tensors(
    tree: Any,
    where: str = "kron_transform",
    max_precond_dim: int | None = None,
    block_size: int | None = None,
) -> TensorPlan:
  """Checks every leaf, cuts it into blocks and assigns each block to a shape group.

  Args:
    tree: the parameters or gradients.
    where: named in error messages.
    max_precond_dim: dims larger than this are cut into blocks (``None``:
      ``block_size``).
    block_size: the block length along a cut dim (``None``: no blocking).

  Raises:
    TypeError: a leaf is not floating point (the message names the leaf).
    ValueError: a leaf has fewer than two dims of size > 1 (the message names
      the leaf and says where such leaves belong).
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  paths, shapes, squeezed, blocks, grids = [], [], [], [], []
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
    ranges = [block_ranges(d, max_precond_dim, block_size) for d in sq]
    leaf_blocks = []
    for combo in itertools.product(*ranges):
      starts = tuple(c[0] for c in combo)
      sizes = tuple(c[1] for c in combo)
      if sizes not in group_index:
        group_index[sizes] = len(group_sizes)
        group_sizes.append(0)
      gi = group_index[sizes]
      leaf_blocks.append((gi, group_sizes[gi], starts, sizes))
      group_sizes[gi] += 1
    paths.append(leaf_path(path))
    shapes.append(shape)
    squeezed.append(sq)
    blocks.append(tuple(leaf_blocks))
    grids.append(tuple(len(r) for r in ranges))
  return TensorPlan(
      treedef=treedef,
      paths=tuple(paths),
      shapes=tuple(shapes),
      squeezed=tuple(squeezed),
      blocks=tuple(blocks),
      grids=tuple(grids),
      group_shapes=tuple(group_index),
      group_sizes=tuple(group_sizes),
  )


def _pack(plan: TensorPlan, leaves, padded_sizes) -> tuple[jax.Array, ...]:
  """Stacks the float32 blocks of ``leaves`` per group, zero-padded to ``padded_sizes``."""
  stacks = [[None] * n for n in plan.group_sizes]
  for leaf, sq, leaf_blocks in zip(leaves, plan.squeezed, plan.blocks):
    x = leaf.reshape(sq).astype(jnp.float32)
    for gi, pos, starts, sizes in leaf_blocks:
      if sizes == sq:
        stacks[gi][pos] = x
      else:
        stacks[gi][pos] = x[tuple(slice(a, a + n) for a, n in zip(starts, sizes))]
  out = []
  for gi, s in enumerate(stacks):
    stack = jnp.stack(s)
    pad = padded_sizes[gi] - stack.shape[0]
    if pad:
      stack = jnp.pad(stack, [(0, pad)] + [(0, 0)] * (stack.ndim - 1))
    out.append(stack)
  return tuple(out)


def _unpack(plan: TensorPlan, outs, leaves) -> list[jax.Array]:
  """The inverse of :func:`_pack`: one array per leaf, in the leaf's shape and dtype."""
  result = []
  for leaf, shape, grid, leaf_blocks in zip(leaves, plan.shapes, plan.grids, plan.blocks):
    pieces = [outs[gi][pos] for gi, pos, _, _ in leaf_blocks]

    def assemble(pieces, axis):
      if axis == len(grid):
        return pieces[0]
      k = grid[axis]
      step = len(pieces) // k
      parts = [assemble(pieces[i * step:(i + 1) * step], axis + 1) for i in range(k)]
      return parts[0] if k == 1 else jnp.concatenate(parts, axis=axis)

    result.append(assemble(pieces, 0).reshape(shape).astype(leaf.dtype))
  return result


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
    *parts: parts_lib.Part,
    state_dtype: Any = None,
    block_size: int | None = None,
    max_precond_dim: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Builds an optax transformation from a sequence of :class:`~kl_optax.Part`.

  Every leaf of the tree the transformation is applied to is preconditioned:
  size-1 dims are squeezed and what remains must have order ≥ 2 (route other
  leaves elsewhere with ``optax.partition``, as the recipes do). With
  ``block_size``, dims larger than ``max_precond_dim`` are cut into blocks of
  at most ``block_size`` and every block gets its own preconditioner. Tensors
  (blocks) of the same shape are stacked and processed together: one
  ``vmap``-ed step per shape group, however deep the model.

  On the first update (``count == 0``) each part's ``first_update`` runs (the
  statistics are initialized from this gradient) and the returned update is
  zero. On every later update the parts' ``update`` functions run in the given
  order and the final running update is returned, cast to each gradient's
  dtype.

  Non-finite values never enter the state: a tensor (block) whose gradient
  is not finite, or whose new statistics or update would not be finite
  (overflow), keeps its previous state for the step and gets a zero update;
  the slot ``'nonfinite_skips'`` counts such steps per tensor. On the first
  update a non-finite gradient initializes the statistics from zeros.

  Under ``jax.set_mesh(mesh)`` the stacks are padded to a multiple of the
  number of devices and sharded along their leading axis; each device runs
  the parts on its share of the tensors (see :mod:`kl_optax.sharding`).

  Args:
    *parts: the parts, in the order they run.
    state_dtype: storage dtype of factors, bases and floating slots (``None``:
      float32; ``jnp.bfloat16`` halves their memory). Eigenvalue estimates
      are always float32. All computation is float32.
    block_size: cut dims larger than ``max_precond_dim`` into blocks of this
      length (``None``: no blocking). Static.
    max_precond_dim: the largest dim kept whole when ``block_size`` is set
      (``None``: ``block_size``). Static.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (extra keyword arguments of
    ``update`` are accepted and ignored).

  Examples:
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
  block_size, max_precond_dim = check_blocking(block_size, max_precond_dim)
  later_fns = [p.update for p in parts]
  first_fns = [p.first_update for p in parts if p.first_update is not None]

  def plan_of(tree, where):
    return plan_tensors(tree, where, max_precond_dim, block_size)

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
    slots[SKIP_SLOT] = jnp.zeros((), jnp.int32)
    state = parts_lib.init_kron_state(shape, slots)
    for p in parts:
      if p.init_state is not None:
        state = p.init_state(state)
    return state

  def init_fn(params):
    plan = plan_of(params, "kron_transform.init")
    if not plan.group_sizes:
      return KronTransformState(
          count=jnp.zeros([], jnp.int32), groups=jnp.zeros((0,), jnp.float32)
      )
    mesh = sharding_lib.context_mesh()
    groups = []
    for shape, n in zip(plan.group_shapes, plan.group_sizes):
      n = sharding_lib.padded_stack_size(n, mesh)
      one = _cast_state(init_tensor(shape), dtype)
      stack = jax.tree.map(lambda x, n=n: jnp.broadcast_to(x, (n,) + x.shape), one)
      if mesh is not None:
        stack = jax.tree.map(
            lambda x: sharding_lib.constrain(
                x, sharding_lib.stack_spec(x.shape[0], x.ndim, mesh)), stack)
      groups.append(stack)
    return KronTransformState(count=jnp.zeros([], jnp.int32), groups=tuple(groups))

  def run_groups(seq, states, grads, count, mesh, with_update):
    """Runs ``seq`` on every group, each device on its share of the stack."""
    new_states, outs = [], []
    for st, g in zip(states, grads):

      def local(st, g, count):
        def one(s, x):
          finite = jnp.all(jnp.isfinite(x))
          x = jnp.where(finite, x, 0.0)
          out = _run(seq, parts_lib.TensorStep(s, x, x, count))
          new = out.state
          if with_update:
            # A non-finite gradient, or statistics or an update that overflowed:
            # this tensor skips the step (state kept, zero update).
            ok = finite & _all_finite(new) & jnp.all(jnp.isfinite(out.update))
          else:
            # Initialization: a non-finite gradient initializes from zeros.
            ok = _all_finite(new)
          new = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, s)
          slots = dict(new.slots)
          slots[SKIP_SLOT] = s.slots[SKIP_SLOT] + (~(ok & finite)).astype(jnp.int32)
          new = new._replace(slots=slots)
          return (new, jnp.where(ok, out.update, 0.0)) if with_update else new
        return jax.vmap(one)(st, g)

      axes = sharding_lib.stack_axes(g.shape[0], mesh)
      if axes and not _closes_over_tracers(local, st, g, count):
        # Each device runs the parts on its own tensors. (Hyperparameters
        # traced from outside, as with optax.inject_hyperparams, cannot enter
        # shard_map as closures; the stacks are then left to XLA's
        # partitioner, which splits the vmapped batch the same way.)
        spec = sharding_lib.stack_spec(g.shape[0], 1, mesh)
        out_specs = (spec, spec) if with_update else spec
        local = jax.shard_map(
            local, mesh=mesh, in_specs=(spec, spec, PartitionSpec()),
            out_specs=out_specs)
      res = local(st, g, count)
      if with_update:
        new_states.append(res[0])
        outs.append(res[1])
      else:
        new_states.append(res)
        outs.append(jnp.zeros_like(g))
    return tuple(new_states), tuple(outs)

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    plan = plan_of(updates, "kron_transform.update")
    if not plan.group_sizes:
      return updates, KronTransformState(
          count=optax.safe_increment(state.count), groups=state.groups
      )
    _check_matches_state(plan, state)
    leaves = plan.treedef.flatten_up_to(updates)
    mesh = sharding_lib.context_mesh()
    padded = tuple(g.factors[0].shape[0] for g in state.groups)

    def step(leaves, groups, count):
      # Inside ``auto_axes`` the context mesh has the same axes, typed Auto.
      mesh = sharding_lib.context_mesh()
      grads = _pack(plan, leaves, padded)
      if mesh is not None:
        # Whole tensors move to the devices that own them: gather, then slice.
        grads = tuple(sharding_lib.constrain(g, PartitionSpec()) for g in grads)
        grads = tuple(
            sharding_lib.constrain(g, sharding_lib.stack_spec(g.shape[0], g.ndim, mesh))
            for g in grads)
      states = tuple(_cast_state(g, jnp.float32) for g in groups)
      new_states, outs = jax.lax.cond(
          count == 0,
          lambda s, g, c: run_groups(first_fns, s, g, c, mesh, False),
          lambda s, g, c: run_groups(later_fns, s, g, c, mesh, True),
          states, grads, count,
      )
      new_states = tuple(_cast_state(s, dtype) for s in new_states)
      if mesh is not None:
        outs = tuple(sharding_lib.constrain(o, PartitionSpec()) for o in outs)
      return _unpack(plan, outs, leaves), new_states

    if mesh is not None and sharding_lib.has_explicit_axes(mesh):
      leaf_specs = [jax.typeof(x).sharding.spec for x in leaves]
      state_specs = jax.tree.map(
          lambda x: sharding_lib.stack_spec(x.shape[0], x.ndim, mesh), state.groups)
      step = jax.sharding.auto_axes(step, out_sharding=(leaf_specs, state_specs))
    new_leaves, new_states = step(leaves, state.groups, state.count)
    new_updates = plan.treedef.unflatten(list(new_leaves))
    return new_updates, KronTransformState(
        count=optax.safe_increment(state.count), groups=tuple(new_states)
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _closes_over_tracers(fn, *args) -> bool:
  """Whether ``fn`` uses traced values it does not receive as arguments."""
  consts = jax.make_jaxpr(fn)(*args).consts
  return any(isinstance(c, jax.core.Tracer) for c in consts)


def check_blocking(block_size, max_precond_dim) -> tuple[int | None, int | None]:
  """Validates the static blocking options; returns them as Python ints (or ``None``)."""
  for name, value in (("block_size", block_size), ("max_precond_dim", max_precond_dim)):
    if isinstance(value, jax.core.Tracer):
      raise TypeError(
          f"{name} decides state shapes and must be a static Python int, got a "
          f"traced value. With optax.inject_hyperparams, list {name!r} in static_args."
      )
    if value is not None and (int(value) != value or value < 1):
      raise ValueError(f"{name} must be a positive integer, got {value!r}.")
  block_size = None if block_size is None else int(block_size)
  max_precond_dim = None if max_precond_dim is None else int(max_precond_dim)
  if block_size is not None and max_precond_dim is not None and block_size > max_precond_dim:
    raise ValueError(
        f"block_size ({block_size}) must not exceed max_precond_dim "
        f"({max_precond_dim}): blocks are cut from dims larger than max_precond_dim."
    )
  return block_size, max_precond_dim


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
  mesh = sharding_lib.context_mesh()
  for gi, (shape, n) in enumerate(zip(plan.group_shapes, plan.group_sizes)):
    st_shape = tuple(f.shape[-1] for f in groups[gi].factors)
    st_n = groups[gi].factors[0].shape[0]
    ok_n = st_n == n or (st_n > n and st_n % (mesh.size if mesh is not None else st_n + 1) == 0
                         and st_n - n < mesh.size)
    if st_shape != shape or not ok_n:
      members = sorted({plan.paths[i] for i, bl in enumerate(plan.blocks)
                        if any(b[0] == gi for b in bl)})
      raise ValueError(
          "kron_transform.update: the gradients do not match the optimizer state: "
          f"gradient leaves {members} (squeezed block shape {shape}, {n} tensors) "
          f"meet a state group for shape {st_shape} with {st_n} tensors. Was the "
          "state initialized with parameters of a different structure (or under "
          "a different mesh)?"
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
  out = {}
  for st in kron_states(opt_state):
    if not isinstance(st.groups, tuple):
      continue
    for group in st.groups:
      if "refreshes" in group.slots:
        key = "x".join(str(f.shape[-1]) for f in group.factors)
        out[key] = group.slots["refreshes"]
  return out
