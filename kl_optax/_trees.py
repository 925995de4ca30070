"""Finding the parameter-shaped sub-trees of an optimizer state."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax


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
