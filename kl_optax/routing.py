"""Which parameters get a Kronecker preconditioner, and which go to AdamW.

The rule (``docs/math.md``, "Which tensors are preconditioned"), applied leaf by leaf
(to each of a leaf's tensors, when its dimension numbers give it batch axes;
[`kl_optax.dims`][kl_optax.dims]):

1. Modes are grouped as the dimension numbers say (by default each axis is
   a mode) and size-1 modes are squeezed.
2. A leaf is preconditioned when what remains has order ≥ 2 and the user's
   ``precondition_mask`` (if any) is ``True`` for it. Dims larger than
   ``max_precond_dim`` are cut into blocks of at most ``block_size``, each
   block preconditioned on its own; without ``block_size`` such tensors go to
   the fallback instead.
3. A tensor whose factors would hold more than ``MAX_FACTOR_RATIO`` (64)
   times its own number of entries — a very thin matrix such as 4096 × 2, whose
   4096² factor would be 2048 times its size — goes to the fallback: for such
   shapes a dense factor costs far more than it can help.
4. Everything else — scalars, vectors (biases, norm scales), and leaves the
   user excluded (embeddings and output heads, typically) — goes to the AdamW
   fallback.

Complex leaves go to the fallback (optax's AdamW handles them); other
non-floating leaves are an error (the message names the leaf).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import jax

import jax.numpy as jnp

from kl_optax import dims as dims_lib
from kl_optax import pro
from kl_optax import trees

__all__ = [
    "DEFAULT_MAX_PRECOND_DIM",
    "DENSE",
    "FALLBACK",
    "KRON",
    "MAX_FACTOR_RATIO",
    "SPIKE_FLAT",
    "exclude",
    "kron_labels",
    "pro_labels",
]

KRON = "kron"
FALLBACK = "adam"
SPIKE_FLAT = "spike_flat"
DENSE = "dense"
DEFAULT_MAX_PRECOND_DIM = 10_000
# A tensor whose Kronecker factors would hold more entries than this many times
# its own goes to the fallback (a 4096 × 2 matrix would need a 4096² factor).
MAX_FACTOR_RATIO = 64.0

MaskOrFn = Any  # a pytree of bools (or a prefix of the params tree), or params -> such a tree


def kron_labels(
    params: Any,
    max_precond_dim: int = DEFAULT_MAX_PRECOND_DIM,
    precondition_mask: MaskOrFn | None = None,
    *,
    block_size: int | None = None,
    max_factor_ratio: float = MAX_FACTOR_RATIO,
    dimension_numbers: Any = None,
) -> Any:
  """Labels each leaf ``'kron'`` (Kronecker preconditioner) or ``'adam'`` (fallback).

  Args:
    params: the parameter (or update) tree; only shapes and dtypes are read.
    max_precond_dim: the largest dim a preconditioned tensor may have.
    precondition_mask: optional pytree of bools with the structure of
      ``params`` (or a prefix of it), or a function of ``params`` returning one;
      ``False`` sends a leaf to the fallback whatever its shape.
    block_size: when set, tensors with dims larger than ``max_precond_dim``
      stay ``'kron'`` (they are cut into blocks there) instead of going to
      the fallback.
    max_factor_ratio: a tensor (or block) whose factors would hold more than
      this many times its own number of entries goes to the fallback.
    dimension_numbers: batch axes and mode groups ([`kl_optax.dims`][kl_optax.dims]); a
      leaf with batch axes is routed as one of its slices would be.

  Returns:
    A tree of labels with the structure of ``params``, for ``optax.partition``.

  Examples:
    >>> import jax.numpy as jnp, kl_optax
    >>> params = {'w': jnp.zeros((8, 4)), 'b': jnp.zeros((4,)),
    ...           'conv': jnp.zeros((1, 3, 3, 16))}
    >>> kl_optax.kron_labels(params)
    {'b': 'adam', 'conv': 'kron', 'w': 'kron'}
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  if precondition_mask is None:
    allowed = [True] * len(flat)
  else:
    allowed = treedef.flatten_up_to(trees.broadcast_mask(precondition_mask, params))
  leaf_specs = dims_lib.resolve(dimension_numbers, params, "kron_labels")
  labels = []
  for (path, leaf), ok, spec in zip(flat, allowed, leaf_specs):
    if _is_complex(leaf):
      labels.append(FALLBACK)
      continue
    trees.check_floating(path, leaf, "kron_labels")
    sq = tensor_shape(path, leaf, spec, "kron_labels")
    blocked = block_size is not None
    eligible = ok and len(sq) >= 2 and (blocked or max(sq) <= max_precond_dim)
    if eligible:
      block = [min(d, block_size) if blocked and d > max_precond_dim else d for d in sq]
      eligible = sum(d * d for d in block) <= max_factor_ratio * math.prod(block)
    labels.append(KRON if eligible else FALLBACK)
  return treedef.unflatten(labels)


def _is_complex(leaf) -> bool:
  return hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.complexfloating)


def tensor_shape(path, leaf, dims: dims_lib.DimensionNumbers | None, where: str) -> tuple[int, ...]:
  """The squeezed shape of the tensors a leaf holds (the leaf, or one slice of it)."""
  name = path if isinstance(path, str) else trees.leaf_path(path)
  leaf_dims = dims_lib.leaf_dims(name, tuple(int(d) for d in leaf.shape), dims, where)
  return trees.squeezed_shape(leaf_dims.modes)


def exclude(*patterns: str) -> Callable[[Any], Any]:
  """A ``precondition_mask`` that sends leaves whose path matches a pattern to the fallback.

  Each pattern is a regular expression searched in the leaf's path as written
  by ``jax.tree_util.keystr`` (for Flax NNX parameters, for example,
  ``"['embed']['embedding'].value"``).

  Examples:
    >>> import jax.numpy as jnp, kl_optax
    >>> params = {'embed': jnp.zeros((50, 8)), 'mlp': jnp.zeros((8, 8))}
    >>> kl_optax.kron_labels(params, precondition_mask=kl_optax.exclude('embed'))
    {'embed': 'adam', 'mlp': 'kron'}
  """
  compiled = [re.compile(p) for p in patterns]

  def mask(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any(c.search(trees.leaf_path(path)) for c in compiled), params
    )

  return mask


def pro_labels(tree, rank: int, restricted_side: str = "larger", *,
               block_size: int | None = None, max_precond_dim: int | None = None,
               dimension_numbers: Any = None):
  """Labels each leaf ``'spike_flat'`` (Pro-KLShampoo factor) or ``'dense'`` (full KL-Shampoo).

  A leaf gets a spike-and-flat factor when its squeezed shape is a matrix
  whose restricted dim is larger than ``rank``; tensors of order three or
  more, matrices with ``rank ≥`` the restricted dim, and (with
  ``block_size``) matrices with a dim larger than ``max_precond_dim``, which are
  blocked, keep full KL-Shampoo factors. With ``dimension_numbers`` the rule
  applies to each of a leaf's tensors ([`kl_optax.dims`][kl_optax.dims]).

  Examples:
    >>> import jax.numpy as jnp, kl_optax
    >>> tree = {'a': jnp.zeros((8, 64)), 'b': jnp.zeros((8, 16)), 'c': jnp.zeros((4, 4, 4))}
    >>> kl_optax.pro_labels(tree, rank=16)
    {'a': 'spike_flat', 'b': 'dense', 'c': 'dense'}
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  leaf_specs = dims_lib.resolve(dimension_numbers, tree, "pro_labels")
  labels = []
  for (path, leaf), spec in zip(flat, leaf_specs):
    sq = tensor_shape(path, leaf, spec, "pro_labels")
    blocked = block_size is not None and max(sq, default=0) > (max_precond_dim or block_size)
    spike = len(sq) == 2 and not blocked and sq[pro.restricted_mode(sq, restricted_side)] > rank
    labels.append(SPIKE_FLAT if spike else DENSE)
  return treedef.unflatten(labels)
