"""Dimension numbers: which axes of a leaf are a batch of tensors, and how the rest form modes.

Models rarely store each weight matrix as its own leaf. A transformer whose
blocks are built with ``nnx.scan``/``nnx.vmap`` holds one ``(L, d, f)`` array
for the L layers' kernels; a mixture of experts holds ``(E, d, f)``; a Flax
attention kernel is ``(d, heads, head_dim)``. [`DimensionNumbers`][kl_optax.dims.DimensionNumbers] says
how such a leaf is meant:

* ``batch_axes``: each slice along these axes is its own tensor (a layer, an
  expert). It is routed and preconditioned exactly as the same-shaped leaf on
  its own would be: a matrix slice gets its own factors, a vector slice (a
  stacked LayerNorm scale) goes to the AdamW fallback;
* ``mode_axes``: the remaining axes grouped into Kronecker modes, e.g.
  ``((0,), (1, 2))`` preconditions a ``(d, heads, head_dim)`` kernel as a
  ``d × (heads · head_dim)`` matrix. ``None``: every remaining axis is a mode.

After grouping, size-1 modes are squeezed and large modes blocked, as for any
leaf. A recipe's ``dimension_numbers=`` takes, for the whole tree,

* ``None`` (every leaf as it is);
* a [`DimensionNumbers`][kl_optax.dims.DimensionNumbers] (for every leaf);
* a pytree of ``DimensionNumbers``/``None`` that is a prefix of the params;
* a function of the params returning such a pytree (under
  ``optax.inject_hyperparams`` a function passed as a recipe's keyword is
  taken for a schedule: pass it inside ``kl_optax.Layout(...)``, list it in
  ``static_args``, or use a rule);
* a [`DimensionRule`][kl_optax.dims.DimensionRule] from [`scanned`][kl_optax.dims.scanned], [`attention_heads`][kl_optax.dims.attention_heads] or
  [`match`][kl_optax.dims.match], combined with ``|`` (rules read leaf paths and shapes, so
  the same rule fits the params, the masked trees ``optax.partition`` passes
  on and the state of ``nnx.Optimizer``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax

from kl_optax import trees

__all__ = [
    "DimensionNumbers",
    "DimensionRule",
    "LeafDims",
    "attention_heads",
    "leaf_dims",
    "match",
    "resolve",
    "scanned",
]


def _axes(value: Any, name: str) -> tuple[int, ...]:
  if isinstance(value, int):
    return (value,)
  try:
    out = tuple(value)
  except TypeError:
    raise TypeError(f"DimensionNumbers.{name} must be a tuple of ints, got {value!r}.") from None
  if not all(isinstance(a, int) and not isinstance(a, bool) for a in out):
    raise TypeError(f"DimensionNumbers.{name} must hold ints, got {value!r}.")
  return out


@dataclasses.dataclass(frozen=True)
class DimensionNumbers:
  """How one leaf's axes split into a batch of tensors and the tensors' Kronecker modes.

  Attributes:
    batch_axes: axes whose slices are preconditioned independently (scanned
      layers, experts). Negative axes count from the end.
    mode_axes: the other axes grouped into modes, in order, as a tuple of
      tuples (``None``: each other axis is one mode). Together with
      ``batch_axes`` it must name every axis exactly once.

  Examples:
    >>> import jax.numpy as jnp, kl_optax
    >>> params = {'layers': jnp.zeros((4, 8, 8)), 'scales': jnp.zeros((4, 8)),
    ...           'qkv': jnp.zeros((8, 2, 4))}
    >>> dims = {'layers': kl_optax.DimensionNumbers(batch_axes=(0,)),
    ...         'scales': kl_optax.DimensionNumbers(batch_axes=(0,)),
    ...         'qkv': kl_optax.DimensionNumbers(mode_axes=((0,), (1, 2)))}
    >>> kl_optax.kron_labels(params, dimension_numbers=dims)
    {'layers': 'kron', 'qkv': 'kron', 'scales': 'adam'}
  """

  batch_axes: tuple[int, ...] = ()
  mode_axes: tuple[tuple[int, ...], ...] | None = None

  def __post_init__(self):
    object.__setattr__(self, "batch_axes", _axes(self.batch_axes, "batch_axes"))
    if self.mode_axes is not None:
      object.__setattr__(
          self, "mode_axes", tuple(_axes(m, "mode_axes") for m in self.mode_axes))


class LeafDims(NamedTuple):
  """One leaf's dimension numbers, checked against its shape.

  Attributes:
    perm: the leaf's axes in the order batch axes, then mode by mode.
    batch_shape: the sizes of the batch axes.
    modes: the size of each mode (the product of its axes).
  """

  perm: tuple[int, ...]
  batch_shape: tuple[int, ...]
  modes: tuple[int, ...]

  @property
  def count(self) -> int:
    """The number of tensors (slices) the leaf holds."""
    return math.prod(self.batch_shape)

  @property
  def is_identity(self) -> bool:
    return not self.batch_shape and self.perm == tuple(range(len(self.perm)))


def leaf_dims(path: str, shape: tuple[int, ...], dims: DimensionNumbers | None,
              where: str) -> LeafDims:
  """Checks ``dims`` against a leaf of ``shape``; ``None`` is the leaf as it is.

  Raises:
    ValueError: an axis is out of range or named twice, or the axes do not
      cover the leaf (the message names the leaf ``path``).
  """
  ndim = len(shape)
  if dims is None:
    return LeafDims(tuple(range(ndim)), (), tuple(shape))
  if not isinstance(dims, DimensionNumbers):
    raise TypeError(
        f"{where}: the dimension numbers of leaf {path} are a {type(dims).__name__}; "
        "expected a kl_optax.DimensionNumbers or None.")

  def norm(a):
    if not -ndim <= a < ndim:
      raise ValueError(
          f"{where}: leaf {path} has shape {shape}; its dimension numbers {dims} name "
          f"axis {a}, which is out of range for {ndim} dims.")
    return a % ndim

  batch = tuple(norm(a) for a in dims.batch_axes)
  rest = [a for a in range(ndim) if a not in batch]
  groups = tuple((a,) for a in rest) if dims.mode_axes is None else tuple(
      tuple(norm(a) for a in g) for g in dims.mode_axes)
  named = batch + tuple(a for g in groups for a in g)
  if any(not g for g in groups):
    raise ValueError(f"{where}: leaf {path}: {dims} has an empty mode group.")
  if len(set(named)) != len(named) or sorted(named) != list(range(ndim)):
    repeated = sorted({a for a in named if named.count(a) > 1})
    missing = sorted(set(range(ndim)) - set(named))
    raise ValueError(
        f"{where}: leaf {path} has shape {shape}; its dimension numbers {dims} must "
        f"name every axis exactly once (repeated: {repeated}, missing: {missing}).")
  return LeafDims(
      perm=named,
      batch_shape=tuple(shape[a] for a in batch),
      modes=tuple(math.prod(shape[a] for a in g) for g in groups),
  )


# ----------------------------------------------------------------------------
# Rules
# ----------------------------------------------------------------------------


RuleFn = Callable[[str, tuple[int, ...], "DimensionNumbers | None"], "DimensionNumbers | None"]


@dataclasses.dataclass(frozen=True)
class DimensionRule:
  """Dimension numbers computed per leaf from its path and shape.

  Made by [`scanned`][kl_optax.dims.scanned], [`attention_heads`][kl_optax.dims.attention_heads] and [`match`][kl_optax.dims.match];
  ``a | b`` applies ``a`` and then ``b`` (``b`` sees the dimension numbers
  ``a`` chose, so ``scanned('blocks') | attention_heads('attn')`` handles a
  scanned attention kernel). A rule is not callable, so that
  ``optax.inject_hyperparams`` never takes it for a schedule.

  Attributes:
    steps: the rules' functions, applied in order, each
      ``(path, shape, dims so far) -> dims``.
  """

  steps: tuple[RuleFn, ...]

  def __or__(self, other: DimensionRule) -> DimensionRule:
    if not isinstance(other, DimensionRule):
      return NotImplemented
    return DimensionRule(self.steps + other.steps)

  def for_leaf(self, path: str, shape: tuple[int, ...]) -> DimensionNumbers | None:
    """The dimension numbers of one leaf (``path`` as written by ``jax.tree_util.keystr``)."""
    dims = None
    for step in self.steps:
      dims = step(path, tuple(shape), dims)
    return dims

  def tree(self, tree: Any) -> Any:
    """The dimension numbers of every leaf of ``tree``, in its structure."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: self.for_leaf(trees.leaf_path(p), tuple(x.shape)), tree)


def _searcher(patterns):
  compiled = [re.compile(p) for p in patterns]
  return lambda path: any(c.search(path) for c in compiled)


def scanned(*patterns: str, axis: int = 0) -> DimensionRule:
  """Axis ``axis`` of every leaf whose path matches a pattern is a batch of layers.

  For models whose blocks are stacked by ``nnx.scan``/``nnx.vmap`` (or
  ``flax.linen.scan``): every leaf under the stacked module — kernels,
  biases, norm scales — holds one slice per layer, and each slice is
  optimized as the unstacked layer's leaf would be. Patterns are regular
  expressions searched in the leaf's path as written by
  ``jax.tree_util.keystr`` (``"['blocks']['mlp']['kernel'].value"`` for an
  NNX parameter); with no pattern every leaf matches.

  Examples:
    >>> import jax.numpy as jnp, kl_optax
    >>> params = {'blocks': {'w': jnp.zeros((3, 8, 8)), 'scale': jnp.zeros((3, 8))},
    ...           'head': jnp.zeros((8, 10))}
    >>> kl_optax.kron_labels(params, dimension_numbers=kl_optax.scanned('blocks'))
    {'blocks': {'scale': 'adam', 'w': 'kron'}, 'head': 'kron'}
    >>> tx = kl_optax.kl_shampoo(1e-3, dimension_numbers=kl_optax.scanned('blocks'))
  """
  matches = _searcher(patterns) if patterns else (lambda path: True)

  def step(path, shape, dims):
    if not matches(path) or not shape:
      return dims
    if not -len(shape) <= axis < len(shape):
      raise ValueError(
          f"kl_optax.scanned: leaf {path} has shape {shape}, which has no axis {axis}.")
    dims = dims or DimensionNumbers()
    a = axis % len(shape)
    if a in {b % len(shape) for b in dims.batch_axes}:
      return dims
    return dataclasses.replace(dims, batch_axes=dims.batch_axes + (a,))

  return DimensionRule((step,))


def attention_heads(*patterns: str, output: str = r"\['out'\]",
                    bias: str = r"\['bias'\]") -> DimensionRule:
  """Heads and head dims of matching attention leaves form one mode.

  Flax's ``MultiHeadAttention`` keeps its query, key and value kernels as
  ``(d, heads, head_dim)``, their biases as ``(heads, head_dim)`` and the
  output kernel as ``(heads, head_dim, d)``. As the model uses them, these
  are a ``d × (heads·head_dim)`` matrix, vectors, and a
  ``(heads·head_dim) × d`` matrix; this rule says so (and so the biases go
  to the fallback, as biases do). Among the matching leaves, those with three
  (non-batch) axes whose path also matches ``output`` (Flax's ``['out']``)
  have their first two axes grouped, the others their last two; those with
  two whose path matches ``bias`` become vectors; every other leaf (a fused
  ``(d, 3d)`` projection, say) is left as it is. Batch axes already chosen
  (``scanned(...) | attention_heads(...)``) are kept.

  Examples:
    >>> import jax.numpy as jnp, kl_optax
    >>> params = {'attn': {'query': {'kernel': jnp.zeros((16, 2, 8)), 'bias': jnp.zeros((2, 8))},
    ...                    'out': {'kernel': jnp.zeros((2, 8, 16))}}}
    >>> rule = kl_optax.attention_heads('attn')
    >>> kl_optax.kron_labels(params, dimension_numbers=rule)['attn']['query']
    {'bias': 'adam', 'kernel': 'kron'}
    >>> rule.for_leaf("['attn']['out']['kernel']", (2, 8, 16))
    DimensionNumbers(batch_axes=(), mode_axes=((0, 1), (2,)))
  """
  matches = _searcher(patterns) if patterns else (lambda path: True)
  is_output = _searcher([output])
  is_bias = _searcher([bias])

  def step(path, shape, dims):
    if not matches(path):
      return dims
    before = dims
    dims = dims or DimensionNumbers()
    batch = {b % len(shape) for b in dims.batch_axes} if shape else set()
    rest = [a for a in range(len(shape)) if a not in batch]
    if dims.mode_axes is not None or len(rest) not in (2, 3):
      return before
    if len(rest) == 2:
      return dataclasses.replace(dims, mode_axes=(tuple(rest),)) if is_bias(path) else before
    if is_output(path):
      return dataclasses.replace(dims, mode_axes=((rest[0], rest[1]), (rest[2],)))
    return dataclasses.replace(dims, mode_axes=((rest[0],), (rest[1], rest[2])))

  return DimensionRule((step,))


def match(rules: Mapping[str, DimensionNumbers | None]) -> DimensionRule:
  """The dimension numbers of the first pattern that matches a leaf's path (else unchanged).

  After an earlier rule (``scanned(...) | match(...)``) the two are merged:
  the batch axes of both, and the mode groups of ``match`` where it gives
  them. Axes are the leaf's own, so an ``(L, E, d, f)`` scanned expert
  kernel takes ``DimensionNumbers(batch_axes=(1,))`` for its expert axis. A
  ``None`` value resets the leaf to no dimension numbers.

  Examples:
    >>> import kl_optax
    >>> rule = kl_optax.match({'experts': kl_optax.DimensionNumbers(batch_axes=(0,))})
    >>> rule.for_leaf("['moe']['experts']['w_in']", (4, 16, 64))
    DimensionNumbers(batch_axes=(0,), mode_axes=None)
  """
  compiled = [(re.compile(p), d) for p, d in rules.items()]
  for _, d in compiled:
    if d is not None and not isinstance(d, DimensionNumbers):
      raise TypeError(f"kl_optax.match: values must be DimensionNumbers or None, got {d!r}.")

  def step(path, shape, dims):
    for c, d in compiled:
      if c.search(path):
        if d is None or dims is None:
          return d
        merged = dims.batch_axes + tuple(
            a for a in d.batch_axes
            if a % max(len(shape), 1) not in {b % max(len(shape), 1) for b in dims.batch_axes})
        return DimensionNumbers(merged, d.mode_axes if d.mode_axes is not None else dims.mode_axes)
    return dims

  return DimensionRule((step,))


# ----------------------------------------------------------------------------
# Resolution
# ----------------------------------------------------------------------------


def _is_spec_leaf(x) -> bool:
  return x is None or isinstance(x, DimensionNumbers)


def resolve(spec: Any, tree: Any, where: str) -> list[DimensionNumbers | None]:
  """The dimension numbers of every leaf of ``tree``, in ``jax.tree.leaves`` order.

  Args:
    spec: any of the forms listed in this module's docstring.
    tree: the parameters (or gradients, possibly masked by ``optax.partition``).
    where: named in error messages.

  Raises:
    ValueError: a pytree ``spec`` is not a prefix of ``tree``.
  """
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  if spec is None:
    return [None] * len(flat)
  if isinstance(spec, DimensionNumbers):
    return [spec] * len(flat)
  if isinstance(spec, DimensionRule):
    return [spec.for_leaf(trees.leaf_path(p), tuple(x.shape)) for p, x in flat]
  if callable(spec):
    spec = spec(tree)
  if isinstance(spec, (jax.Array, jax.core.Tracer)):
    raise TypeError(
        f"{where}: dimension_numbers evaluated to an array; was a function passed to "
        "optax.inject_hyperparams and taken for a schedule? Use a kl_optax.DimensionRule "
        "(kl_optax.scanned, ...) or pass it inside kl_optax.Layout(...).")
  spec_def = jax.tree_util.tree_structure(spec, is_leaf=_is_spec_leaf)
  try:
    subtrees = spec_def.flatten_up_to(tree)
  except (ValueError, TypeError) as e:
    raise ValueError(
        f"{where}: dimension_numbers must be a prefix of the params tree, or a function "
        f"of the params returning one, or a rule such as kl_optax.scanned(...): {e}") from None
  out = []
  spec_leaves = jax.tree_util.tree_flatten_with_path(spec, is_leaf=_is_spec_leaf)[0]
  for (path, d), sub in zip(spec_leaves, subtrees):
    if not _is_spec_leaf(d):
      raise TypeError(f"{where}: dimension_numbers at {trees.leaf_path(path)} is {d!r}; its "
                      "leaves must be DimensionNumbers or None.")
    out.extend([d] * len(jax.tree.leaves(sub)))
  return out
