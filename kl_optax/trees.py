"""Pytree and leaf helpers shared by the package.

Leaf names for error messages ([`leaf_path`][kl_optax.trees.leaf_path]), squeezed shapes, the
floating-point check, masks given as trees or functions, finding states of a
type inside an optimizer state ([`find_states`][kl_optax.trees.find_states]) and rebuilding the
parameter-shaped sub-trees of one ([`map_state`][kl_optax.trees.map_state]). Imports nothing from the
package.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

__all__ = [
    "broadcast_mask",
    "check_floating",
    "find_states",
    "is_masked",
    "leaf_path",
    "map_state",
    "squeezed_shape",
]


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


def broadcast_mask(mask: Any, params: Any, name: str = "precondition_mask") -> Any:
  """A Python bool per leaf of ``params`` from a (prefix) mask tree or a mask function.

  Raises:
    TypeError: a mask leaf is an array (for example a callable mask that
      ``optax.inject_hyperparams`` took for a schedule and evaluated).
  """
  tree = mask(params) if callable(mask) else mask

  def one(m, sub):
    if isinstance(m, (jax.Array, jax.core.Tracer)):
      raise TypeError(
          f"{name} must hold Python bools, got an array ({m!r}). Under "
          f"optax.inject_hyperparams a callable {name} is taken for a schedule: "
          "pass it inside kl_optax.Layout(...), or list it in static_args.")
    return jax.tree.map(lambda _: bool(m), sub)

  return jax.tree.map(one, tree, params)


def find_states(opt_state: Any, types: type | tuple[type, ...]) -> list[Any]:
  """Every node of ``opt_state`` that is an instance of ``types``, in tree order.

  Nodes of these types are not searched further.
  """
  found = []

  def visit(x):
    if isinstance(x, types):
      found.append(x)
      return True
    return False

  jax.tree_util.tree_flatten(opt_state, is_leaf=visit)
  return found


def is_masked(x) -> bool:
  return isinstance(x, optax.MaskedNode) or x is None


def map_state(
    state: Any,
    params: Any,
    on_params: Callable[[Any], Any],
    on_leaf: Callable[[Any], Any],
    stop: Callable[[Any], Any | None] = lambda node: None,
) -> Any:
  """Rebuilds ``state``, replacing parameter-shaped sub-trees and other leaves.

  A sub-tree is parameter-shaped when it has the tree structure of ``params``
  (entries masked by ``optax.masked``/``partition`` allowed) and each
  unmasked leaf has its parameter's shape, like AdamW's moments.
  ``on_params(flat)`` receives the sub-tree's leaves flattened in the order of
  ``params`` (masked entries as they are) and returns a list of the same length.
  ``on_leaf`` maps every other leaf. ``stop(node)`` may return a replacement
  for a whole node (or ``None`` to look inside it).
  """
  flat_params, treedef = jax.tree_util.tree_flatten(params)

  def as_params(node):
    try:
      flat = treedef.flatten_up_to(node)
    except (ValueError, TypeError):
      return None
    found = False
    for x, p in zip(flat, flat_params):
      if is_masked(x):
        continue
      if not hasattr(x, "shape") or tuple(x.shape) != tuple(p.shape):
        return None
      found = True
    return flat if found else None

  def visit(node):
    replaced = stop(node)
    if replaced is not None:
      return replaced
    if is_masked(node):
      return node
    flat = as_params(node)
    if flat is not None:
      return treedef.unflatten(on_params(flat))
    children, node_def = jax.tree_util.tree_flatten(node, is_leaf=lambda x: x is not node)
    if len(children) == 1 and children[0] is node:
      return on_leaf(node)
    return node_def.unflatten([visit(c) for c in children])

  return visit(state)
