"""Saving and restoring optimizer state with Orbax, with a clear error on a mismatch.

Optimizer states of every recipe are pytrees of arrays with stable shapes and
dtypes, so Orbax saves and restores them as they are. These two helpers add
what a long run needs around ``orbax.checkpoint.StandardCheckpointer``:

* [`restore`][kl_optax.checkpoint.restore] checks the checkpoint against the target before reading it
  and names the leaves whose shapes or dtypes differ, or that one side lacks;
* restoring onto a mesh places every array with the target's sharding (use
  [`kl_optax.state_shardings`][kl_optax.sharding.state_shardings] to build the target);
* zero-size arrays, which Orbax refuses to write, are left out and recreated
  on restore (no recipe's state holds one; a custom part's slots might);
* checkpoints of Pro-KLShampoo state written before its restricted-mode
  placeholders had one row (they were empty, and left out) restore: the
  placeholders, whose values are never read, are recreated.

Resuming is bit-identical: the restored state, fed the same gradients, gives
the same parameters as a run that never stopped (tested on CPU, across basis
refreshes, sharded and unsharded).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

__all__ = ["abstract_like", "restore", "save"]


def _ocp():
  try:
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  except ImportError as e:  # pragma: no cover
    raise ImportError("kl_optax.checkpoint needs orbax-checkpoint: "
                      "pip install orbax-checkpoint") from e
  return ocp


def save(path: str | os.PathLike, tree: Any) -> None:
  """Saves a pytree of arrays (parameters, optimizer state, or both) to ``path``.

  ``path`` must not exist yet. Blocks until the checkpoint is complete.

  Examples:
    >>> import tempfile, os, jax.numpy as jnp, kl_optax
    >>> tx = kl_optax.kl_shampoo(1e-3)
    >>> params = {'w': jnp.ones((4, 3))}
    >>> state = tx.init(params)
    >>> path = os.path.join(tempfile.mkdtemp(), 'step_0')
    >>> kl_optax.checkpoint.save(path, {'params': params, 'opt_state': state})
    >>> restored = kl_optax.checkpoint.restore(
    ...     path, kl_optax.checkpoint.abstract_like({'params': params, 'opt_state': state}))
    >>> bool((restored['params']['w'] == params['w']).all())
    True
  """
  ocp = _ocp()
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.abspath(path), _strip_empty(tree))
    ckptr.wait_until_finished()


def _is_empty(x) -> bool:
  return hasattr(x, "shape") and 0 in tuple(x.shape)


def _strip_empty(tree, also=frozenset()):
  """Zero-size arrays as ``None`` (Orbax refuses them), and the leaves named in ``also``."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x: None if _is_empty(x) or _name(p) in also else x, tree)


def _is_pro_placeholder(name: str, x) -> bool:
  """A stacked one-row placeholder of Pro-KLShampoo's restricted mode.

  Checkpoints written before the placeholders had a row (they were empty and
  left out) do not hold them; their values are never read, so they are
  recreated as zeros.
  """
  shape = tuple(getattr(x, "shape", ()))
  parts = name.split("/")
  if len(parts) < 3:
    return False
  if parts[-2] in ("factors", "bases"):
    return len(shape) == 3 and shape[1] == 1 < shape[2]
  return parts[-2] == "eigvals" and len(shape) == 2 and shape[1] == 1


def _refill_empty(restored, target, also=frozenset()):
  def fill(p, r, t):
    if not _is_empty(t) and _name(p) not in also:
      return r
    sharding = getattr(t, "sharding", None)
    return jax.device_put(np.zeros(t.shape, t.dtype), sharding) if sharding is not None \
        else jax.numpy.zeros(t.shape, t.dtype)
  return jax.tree_util.tree_map_with_path(fill, restored, target, is_leaf=lambda x: x is None)


def abstract_like(tree: Any, shardings: Any = None) -> Any:
  """``jax.ShapeDtypeStruct``s of ``tree`` (with ``shardings``, or the arrays' own), a restore target."""
  if shardings is None:
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree)
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _name(path) -> str:
  """A path written the same way whether it comes from a NamedTuple or its saved dict."""
  keys = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        keys.append(str(getattr(k, attr)))
        break
    else:
      keys.append(str(k))
  return "/".join(keys) or "<root>"


def _leaves(tree) -> dict[str, Any]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_name(p): x for p, x in flat}


def _metadata_leaves(meta) -> dict[str, Any]:
  tree = getattr(meta, "item_metadata", meta)
  tree = getattr(tree, "tree", tree)
  return _leaves(tree)


def restore(path: str | os.PathLike, target: Any) -> Any:
  """Restores the pytree saved at ``path`` into the structure, shapes and shardings of ``target``.

  Args:
    path: a checkpoint written by [`save`][kl_optax.checkpoint.save] (or Orbax's ``StandardCheckpointer``).
    target: a pytree of ``jax.ShapeDtypeStruct`` (with shardings, to restore
      onto a mesh) or of arrays, for example ``abstract_like(state,
      kl_optax.state_shardings(tx, params))`` or
      ``jax.eval_shape(tx.init, params)``.

  Returns:
    The restored pytree.

  Raises:
    ValueError: the checkpoint does not match ``target``; the message names
      every leaf that is missing on either side or differs in shape or dtype.
  """
  ocp = _ocp()
  path = os.path.abspath(path)
  with ocp.StandardCheckpointer() as ckptr:
    saved = _metadata_leaves(ckptr.metadata(path))
    wanted = {k: v for k, v in _leaves(target).items() if not _is_empty(v)}
    problems = []
    refilled = frozenset(k for k, v in wanted.items()
                         if k not in saved and _is_pro_placeholder(k, v))
    for name in sorted(set(saved) | set(wanted) - refilled):
      if name not in saved:
        problems.append(f"{name}: not in the checkpoint")
      elif name not in wanted:
        problems.append(f"{name}: in the checkpoint but not in the target")
      else:
        s, w = saved[name], wanted[name]
        if tuple(s.shape) != tuple(w.shape) or np.dtype(s.dtype) != np.dtype(w.dtype):
          problems.append(f"{name}: checkpoint has {np.dtype(s.dtype).name}{list(s.shape)}, "
                          f"target has {np.dtype(w.dtype).name}{list(w.shape)}")
    if problems:
      shown = "\n  ".join(problems[:20])
      more = f"\n  … and {len(problems) - 20} more" if len(problems) > 20 else ""
      raise ValueError(
          f"The checkpoint at {path} does not match the restore target "
          f"({len(problems)} leaves differ):\n  {shown}{more}\n"
          "Was it saved for a model or optimizer with other shapes?")
    abstract = target if _is_abstract(target) else abstract_like(target)
    restored = ckptr.restore(path, _strip_empty(abstract, refilled))
    return _refill_empty(restored, abstract, refilled)


def _is_abstract(tree) -> bool:
  return all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree))
