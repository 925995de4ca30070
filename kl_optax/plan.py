"""The tensor plan: how the leaves of a tree become stacks of same-shape tensors.

[`plan_tensors`][kl_optax.plan.plan_tensors] checks every leaf, splits it into its tensors along its
batch axes and groups its other axes into modes (its dimension numbers,
[`kl_optax.dims`][kl_optax.dims]), squeezes size-1 modes, cuts modes larger than
``max_precond_dim`` into blocks and assigns every tensor (block) to a *shape
group*. [`pack`][kl_optax.plan.pack] stacks the leaves' blocks per group (zero
padding a stack to a given length, for meshes); [`unpack`][kl_optax.plan.unpack] is its
inverse. [`check_matches_state`][kl_optax.plan.check_matches_state] compares a plan with the stacks of an
existing state and names the leaves when they disagree.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from kl_optax import dims as dims_lib
from kl_optax import trees
from kl_optax.state import KronState

__all__ = [
    "TensorPlan",
    "block_ranges",
    "check_matches_state",
    "pack",
    "plan_tensors",
    "unpack",
]

Block = tuple[int, int, tuple[int, ...], tuple[int, ...]]


class TensorPlan(NamedTuple):
  """How the leaves of a tree are cut into blocks and stacked into shape groups.

  Attributes:
    treedef: the tree structure of the leaves.
    paths: a readable path per leaf.
    shapes: each leaf's original shape.
    dims: each leaf's checked dimension numbers ([`kl_optax.dims.LeafDims`][kl_optax.dims.LeafDims]).
    squeezed: the shape of each leaf's tensors (the leaf itself, or one slice
      along its batch axes), modes grouped, without size-1 modes.
    blocks: per leaf, its blocks in row-major order, each
      ``(group index, position in the group's stack, starts, sizes)``; a
      leaf with ``n`` tensors has ``n`` consecutive positions per block,
      from the one given.
    grids: per leaf, the number of blocks along each squeezed dim.
    group_shapes: the tensor (block) shape of each group.
    group_sizes: the number of tensors (blocks) stacked in each group.
  """

  treedef: Any
  paths: tuple[str, ...]
  shapes: tuple[tuple[int, ...], ...]
  dims: tuple[dims_lib.LeafDims, ...]
  squeezed: tuple[tuple[int, ...], ...]
  blocks: tuple[tuple[Block, ...], ...]
  grids: tuple[tuple[int, ...], ...]
  group_shapes: tuple[tuple[int, ...], ...]
  group_sizes: tuple[int, ...]

  def group_members(self, group: int) -> list[str]:
    """The paths of the leaves with a tensor (block) in ``group``, sorted."""
    return sorted({self.paths[i] for i, bl in enumerate(self.blocks)
                   if any(b[0] == group for b in bl)})


def block_ranges(dim: int, max_precond_dim: int | None, block_size: int | None):
  """``(start, size)`` of the blocks of one dim: one block unless ``dim > max_precond_dim``.

  A dim larger than ``max_precond_dim`` is cut into consecutive blocks of
  ``block_size`` (the last one holds the remainder). Without ``block_size``
  nothing is cut.

  Examples:
    >>> from kl_optax import plan
    >>> plan.block_ranges(10, 6, 4)
    [(0, 4), (4, 4), (8, 2)]
  """
  if block_size is None or dim <= (block_size if max_precond_dim is None else max_precond_dim):
    return [(0, dim)]
  return [(s, min(block_size, dim - s)) for s in range(0, dim, block_size)]


def _check_order(path, shape, squeezed, leaf_dims, where):
  if len(squeezed) < 2:
    what = (f"has shape {shape}, which has" if leaf_dims.is_identity else
            f"has shape {shape}, whose tensors (batch {leaf_dims.batch_shape}, modes "
            f"{leaf_dims.modes}) have")
    raise ValueError(
        f"{where}: leaf {path} {what} fewer "
        "than two dims larger than one and cannot carry a Kronecker "
        "preconditioner. Use a recipe such as kl_optax.kl_shampoo, which routes "
        "such leaves to AdamW, or route them yourself with optax.partition."
    )


def plan_tensors(
    tree: Any,
    where: str = "kron_transform",
    max_precond_dim: int | None = None,
    block_size: int | None = None,
    dimension_numbers: Any = None,
) -> TensorPlan:
  """Checks every leaf, cuts it into blocks and assigns each block to a shape group.

  Args:
    tree: the parameters or gradients.
    where: named in error messages.
    max_precond_dim: dims larger than this are cut into blocks (``None``:
      ``block_size``).
    block_size: the block length along a cut dim (``None``: no blocking).
    dimension_numbers: batch axes and mode groups per leaf (see
      [`kl_optax.dims`][kl_optax.dims]; ``None``: every leaf is one tensor, each axis a mode).

  Raises:
    TypeError: a leaf is not floating point (the message names the leaf).
    ValueError: a leaf's tensors have fewer than two dims of size > 1, or its
      dimension numbers do not fit its shape (the message names the leaf).

  Examples:
    >>> import jax.numpy as jnp, kl_optax
    >>> p = kl_optax.plan_tensors({'a': jnp.zeros((4, 3)), 'b': jnp.zeros((1, 4, 3))})
    >>> p.group_shapes, p.group_sizes
    (((4, 3),), (2,))
    >>> p = kl_optax.plan_tensors({'layers': jnp.zeros((5, 4, 3))},
    ...                           dimension_numbers=kl_optax.scanned())
    >>> p.group_shapes, p.group_sizes
    (((4, 3),), (5,))
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  leaf_specs = dims_lib.resolve(dimension_numbers, tree, where)
  paths, shapes, all_dims, squeezed, blocks, grids = [], [], [], [], [], []
  group_index: dict[tuple[int, ...], int] = {}
  group_sizes: list[int] = []
  for (path, leaf), spec in zip(flat, leaf_specs):
    trees.check_floating(path, leaf, where)
    name = trees.leaf_path(path)
    shape = tuple(int(d) for d in leaf.shape)
    leaf_dims = dims_lib.leaf_dims(name, shape, spec, where)
    sq = trees.squeezed_shape(leaf_dims.modes)
    _check_order(name, shape, sq, leaf_dims, where)
    count = leaf_dims.count
    ranges = [block_ranges(d, max_precond_dim, block_size) for d in sq]
    leaf_blocks = []
    for combo in itertools.product(*ranges):
      starts = tuple(c[0] for c in combo)
      sizes = tuple(c[1] for c in combo)
      gi = group_index.setdefault(sizes, len(group_sizes))
      if gi == len(group_sizes):
        group_sizes.append(0)
      leaf_blocks.append((gi, group_sizes[gi], starts, sizes))
      group_sizes[gi] += count
    paths.append(name)
    shapes.append(shape)
    all_dims.append(leaf_dims)
    squeezed.append(sq)
    blocks.append(tuple(leaf_blocks))
    grids.append(tuple(len(r) for r in ranges))
  return TensorPlan(
      treedef=treedef,
      paths=tuple(paths),
      shapes=tuple(shapes),
      dims=tuple(all_dims),
      squeezed=tuple(squeezed),
      blocks=tuple(blocks),
      grids=tuple(grids),
      group_shapes=tuple(group_index),
      group_sizes=tuple(group_sizes),
  )


def _tensors(x: jax.Array, leaf_dims: dims_lib.LeafDims, sq: tuple[int, ...]) -> jax.Array:
  """A leaf as ``(count, *sq)``: its tensors stacked, modes grouped and squeezed."""
  if not leaf_dims.is_identity:
    x = jnp.transpose(x, leaf_dims.perm)
  return x.reshape((leaf_dims.count,) + sq)


def _untensors(y: jax.Array, leaf_dims: dims_lib.LeafDims, shape: tuple[int, ...]) -> jax.Array:
  """The inverse of `_tensors`."""
  if leaf_dims.is_identity:
    return y.reshape(shape)
  y = y.reshape(tuple(shape[a] for a in leaf_dims.perm))
  inverse = [0] * len(shape)
  for i, a in enumerate(leaf_dims.perm):
    inverse[a] = i
  return jnp.transpose(y, inverse)


def pack(plan: TensorPlan, leaves: Sequence[jax.Array], padded_sizes: Sequence[int] | None = None,
         dtype: jax.typing.DTypeLike = jnp.float32) -> tuple[jax.Array, ...]:
  """Stacks the blocks of ``leaves`` per group, zero-padded to ``padded_sizes``.

  Args:
    plan: the plan of ``leaves``.
    leaves: one array per leaf, in the plan's order.
    padded_sizes: the stack length of each group (``None``: no padding).
    dtype: the stacks' dtype (the computation's).

  Returns:
    One ``(n, *group_shape)`` array per group.
  """
  padded_sizes = plan.group_sizes if padded_sizes is None else padded_sizes
  pieces = [[] for _ in plan.group_sizes]
  for leaf, leaf_dims, sq, leaf_blocks in zip(leaves, plan.dims, plan.squeezed, plan.blocks):
    x = _tensors(leaf.astype(dtype), leaf_dims, sq)
    for gi, _, starts, sizes in leaf_blocks:
      whole = sizes == sq
      pieces[gi].append(
          x if whole else x[(slice(None),) + tuple(slice(a, a + n) for a, n in zip(starts, sizes))])
  out = []
  for gi, p in enumerate(pieces):
    stack = p[0] if len(p) == 1 else jnp.concatenate(p)
    pad = padded_sizes[gi] - stack.shape[0]
    if pad:
      stack = jnp.pad(stack, [(0, pad)] + [(0, 0)] * (stack.ndim - 1))
    out.append(stack)
  return tuple(out)


def _assemble(pieces: list[jax.Array], grid: tuple[int, ...], axis: int = 0) -> jax.Array:
  """Concatenates row-major ``pieces`` (``(count, *block)``, on a ``grid``) into one tensor stack."""
  if axis == len(grid):
    return pieces[0]
  k = grid[axis]
  step = len(pieces) // k
  parts = [_assemble(pieces[i * step:(i + 1) * step], grid, axis + 1) for i in range(k)]
  return parts[0] if k == 1 else jnp.concatenate(parts, axis=axis + 1)


def unpack(plan: TensorPlan, stacks: Sequence[jax.Array],
           leaves: Sequence[jax.Array]) -> list[jax.Array]:
  """The inverse of [`pack`][kl_optax.plan.pack]: one array per leaf, in the leaf's shape and dtype.

  Args:
    plan: the plan the stacks were packed with.
    stacks: one array per group (padding rows are ignored).
    leaves: the leaves whose shapes and dtypes the result takes.
  """
  result = []
  for leaf, shape, leaf_dims, grid, leaf_blocks in zip(
      leaves, plan.shapes, plan.dims, plan.grids, plan.blocks):
    n = leaf_dims.count
    pieces = [stacks[gi][pos:pos + n] for gi, pos, _, _ in leaf_blocks]
    y = _untensors(_assemble(pieces, grid), leaf_dims, shape)
    result.append(y.astype(leaf.dtype))
  return result


def check_matches_state(
    plan: TensorPlan, groups: tuple[KronState, ...], mesh_size: int | None = None
) -> None:
  """Raises ``ValueError`` naming the leaves when a plan does not fit the state's stacks.

  Args:
    plan: the plan of this step's gradients.
    groups: the stacked states.
    mesh_size: the number of devices the stacks were padded for (``None``: no
      padding allowed).
  """
  if len(groups) != len(plan.group_shapes):
    raise ValueError(
        "kron_transform.update: the gradients do not match the optimizer state: "
        f"they form {len(plan.group_shapes)} shape group(s) "
        f"{list(plan.group_shapes)}, the state has {len(groups)}. Was the state "
        "initialized with parameters of a different structure?"
    )
  for gi, (shape, n) in enumerate(zip(plan.group_shapes, plan.group_sizes)):
    st_shape = tuple(f.shape[-1] for f in groups[gi].factors)
    st_n = groups[gi].factors[0].shape[0]
    padded = mesh_size is not None and st_n > n and st_n % mesh_size == 0 and st_n - n < mesh_size
    if st_shape != shape or not (st_n == n or padded):
      raise ValueError(
          "kron_transform.update: the gradients do not match the optimizer state: "
          f"gradient leaves {plan.group_members(gi)} (squeezed block shape {shape}, "
          f"{n} tensors) meet a state group for shape {st_shape} with {st_n} tensors. "
          "Was the state initialized with parameters of a different structure (or "
          "under a different mesh)?"
      )
