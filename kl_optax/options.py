"""The static options of the recipes: one object for the layout, one for the fallback.

A recipe's numeric hyperparameters (``b1``, ``b2``, ``eps``, ``init_factor``,
…) are flat keywords, as in optax, so that ``optax.inject_hyperparams`` can
schedule them. Choices that decide *which* tensors are preconditioned, how
they are cut and stored, and the settings of the AdamW that takes every other
leaf are not hyperparameters: they live in two small frozen objects,

* ``Layout`` — ``precondition_mask``, ``weight_decay_mask``,
  ``max_precond_dim``, ``block_size``, ``state_dtype``,
  ``dimension_numbers``;
* ``Fallback`` — AdamW's ``learning_rate``, ``b1``, ``b2``, ``eps``,
  ``weight_decay``;

validated once, when they are made. ``optax.inject_hyperparams`` passes such
objects through as static arguments, so a callable mask inside a ``Layout`` is
never mistaken for a schedule.

The keywords these objects replaced (``precondition_mask=``,
``adam_b1=``, …) are still accepted by every recipe; they raise a
``DeprecationWarning`` that names the replacement (``resolve``).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import jax

import math

from kl_optax import dims
from kl_optax import kron
from kl_optax import plan as plan_lib
from kl_optax import routing
from kl_optax import trees
from kl_optax import validation

__all__ = ["Fallback", "Layout", "describe", "resolve"]

# Old keyword -> field of Layout / Fallback.
_LAYOUT_KEYWORDS = ("precondition_mask", "weight_decay_mask", "max_precond_dim", "block_size",
                    "state_dtype")
_FALLBACK_KEYWORDS = {"adam_learning_rate": "learning_rate", "adam_b1": "b1", "adam_b2": "b2",
                      "adam_eps": "eps", "adam_weight_decay": "weight_decay"}


def _check_mask(name: str, mask: Any) -> None:
  if mask is None or callable(mask):
    return
  for leaf in jax.tree.leaves(mask):
    if isinstance(leaf, (jax.Array, jax.core.Tracer)):
      raise TypeError(
          f"Layout.{name} must be a pytree of Python bools or a function of the params; "
          f"got an array ({leaf!r}). Was a callable mask evaluated as a schedule by "
          "optax.inject_hyperparams? Pass it inside kl_optax.Layout(...).")


def _check_dimension_numbers(spec: Any) -> None:
  if spec is None or callable(spec) or isinstance(spec, (dims.DimensionNumbers, dims.DimensionRule)):
    return
  for leaf in jax.tree.leaves(spec, is_leaf=lambda x: isinstance(x, dims.DimensionNumbers)):
    if not isinstance(leaf, dims.DimensionNumbers):
      raise TypeError(
          "Layout.dimension_numbers must be None, a kl_optax.DimensionNumbers, a pytree of "
          "them (None leaves allowed), a function of the params or a rule such as "
          f"kl_optax.scanned(...); found the leaf {leaf!r}.")


@dataclasses.dataclass(frozen=True)
class Layout:
  """Which leaves get a Kronecker preconditioner, how they are cut, how state is stored.

  Routing, leaf by leaf (``kl_optax.kron_labels``): size-1 dims are
  squeezed; a leaf whose remaining dims number at least two and that
  ``precondition_mask`` does not exclude gets the Kronecker preconditioner
  when its dims are all ≤ ``max_precond_dim``; with ``block_size`` set, larger
  dims are cut into blocks of at most ``block_size`` (each block
  preconditioned on its own), without it such tensors go to the fallback.
  Very thin tensors, whose factors would hold more than 64 times their own
  entries (4096 × 2, say), go to the fallback. Scalars, vectors (biases, norm
  scales) and excluded leaves (embeddings and output heads are usually better
  there) go to the fallback AdamW (``Fallback``). Non-floating leaves
  raise an error naming the leaf.

  Attributes:
    precondition_mask: a pytree of bools (a prefix of the params is enough),
      or a function of the params returning one (see
      ``kl_optax.exclude``); ``False`` sends a leaf to the fallback.
      ``None``: every eligible leaf is preconditioned.
    weight_decay_mask: where weight decay applies, in both branches, in the
      same forms (``None``: everywhere).
    max_precond_dim: the largest dim preconditioned whole.
    block_size: cut dims larger than ``max_precond_dim`` into blocks of at
      most this length, each with its own preconditioner (``None``: such
      tensors go to the fallback instead). At most ``max_precond_dim``.
    state_dtype: storage dtype of moments, factors and bases (``None``:
      float32; ``jnp.bfloat16`` halves their memory, except the factors of a
      recipe that reads their eigenvalues, ``shampoo``, which stay float32).
      Eigenvalue estimates are always float32; how the products compute is
      ``compute_dtype``'s choice.
    dimension_numbers: which axes of a leaf are a batch of tensors (scanned
      layers, experts) and how its other axes group into modes
      (``kl_optax.dims``): ``None``, a ``kl_optax.DimensionNumbers``, a
      pytree of them (a prefix of the params), a function of the params
      returning one, or a rule such as ``kl_optax.scanned('blocks')``. A
      leaf with batch axes is routed and preconditioned slice by slice,
      exactly as its unstacked slices would be.
    compute_dtype: operand dtype of the preconditioner's mode products and
      Gram matrices (``None``: float32; ``jnp.bfloat16``: bfloat16 operands,
      float32 accumulation; decompositions and eigenvalue estimates stay
      float32). See ``kl_optax.kron_transform``.
    matmul_precision: ``"highest"`` (``None``), ``"high"`` or ``"default"``
      for float32 operands on accelerators. On NVIDIA GPUs ``"high"`` (TF32)
      is the one to try first: on an H200 it cut KL-Shampoo's ordinary update
      on GPT-2 small's shape from 56 to 22 ms (docs/benchmarks.md). A CPU
      ignores it.

  Examples:
    >>> import jax.numpy as jnp, kl_optax
    >>> layout = kl_optax.Layout(precondition_mask=kl_optax.exclude('head'))
    >>> params = {'w': jnp.zeros((8, 4)), 'head': jnp.zeros((4, 10)), 'b': jnp.zeros(4)}
    >>> layout.labels(params)
    {'b': 'adam', 'head': 'adam', 'w': 'kron'}
    >>> tx = kl_optax.kl_shampoo(1e-3, layout=layout)
  """

  precondition_mask: Any = None
  weight_decay_mask: Any = None
  max_precond_dim: int = routing.DEFAULT_MAX_PRECOND_DIM
  block_size: int | None = None
  state_dtype: jax.typing.DTypeLike | None = None
  dimension_numbers: Any = None
  compute_dtype: jax.typing.DTypeLike | None = None
  matmul_precision: str | None = None

  def __post_init__(self):
    block_size, max_dim = validation.check_blocking(
        self.block_size,
        routing.DEFAULT_MAX_PRECOND_DIM if self.max_precond_dim is None else self.max_precond_dim)
    object.__setattr__(self, "block_size", block_size)
    object.__setattr__(self, "max_precond_dim", max_dim)
    validation.storage_dtype(self.state_dtype)
    kron.check_matmul_settings(self.compute_dtype, self.matmul_precision)
    _check_mask("precondition_mask", self.precondition_mask)
    _check_mask("weight_decay_mask", self.weight_decay_mask)
    _check_dimension_numbers(self.dimension_numbers)

  def labels(self, params: Any) -> Any:
    """``'kron'`` or ``'adam'`` per leaf of ``params`` (``kl_optax.kron_labels``)."""
    return routing.kron_labels(params, self.max_precond_dim, self.precondition_mask,
                               block_size=self.block_size,
                               dimension_numbers=self.dimension_numbers)

  def transform_options(self) -> dict[str, Any]:
    """The keywords of ``kl_optax.kron_transform`` this layout sets."""
    return dict(state_dtype=self.state_dtype, block_size=self.block_size,
                max_precond_dim=self.max_precond_dim,
                dimension_numbers=self.dimension_numbers,
                compute_dtype=self.compute_dtype, matmul_precision=self.matmul_precision)

  def without_masks(self) -> Layout:
    """The same layout for a preconditioner, which routes nothing."""
    return dataclasses.replace(self, precondition_mask=None, weight_decay_mask=None)


@dataclasses.dataclass(frozen=True)
class Fallback:
  """The AdamW that takes every leaf without a Kronecker preconditioner.

  Attributes:
    learning_rate: a float or an optax schedule (``None``: the recipe's).
    b1: first-moment decay.
    b2: second-moment decay.
    eps: added to the denominator.
    weight_decay: decoupled weight decay (``None``: the recipe's).

  Examples:
    >>> import kl_optax
    >>> tx = kl_optax.kl_shampoo(3e-3, fallback=kl_optax.Fallback(learning_rate=1e-3))
  """

  learning_rate: Any = None
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float | None = None

  def __post_init__(self):
    validation.check_range("Fallback.b1", self.b1, 0.0, 1.0)
    validation.check_range("Fallback.b2", self.b2, 0.0, 1.0)
    validation.check_range("Fallback.eps", self.eps, 0.0, None)
    validation.check_range("Fallback.weight_decay", self.weight_decay, 0.0, None)


def describe(params: Any, layout: Any = None, *, rank: int | None = None,
             restricted_side: str = "larger") -> dict[str, str]:
  """How every leaf is optimized, one line per leaf path: routing, tensors, blocks.

  A readable view of ``kl_optax.kron_labels`` (and, with ``rank``, of
  ``kl_optax.pro_labels``) under a [`Layout`][kl_optax.options.Layout]: for a Kronecker leaf
  the shape of its tensors after mode grouping and squeezing, how many it
  holds along which batch axes, and its blocks.

  Args:
    params: the parameters (only shapes and dtypes are read).
    layout: a ``kl_optax.Layout`` (``None``: the default).
    rank: Pro-KLShampoo's rank: also say which tensors get a spike-and-flat factor.
    restricted_side: Pro-KLShampoo's restricted side.

  Returns:
    ``{path: description}`` in leaf order.

  Examples:
    >>> import jax.numpy as jnp, kl_optax
    >>> params = {'blocks': {'w': jnp.zeros((12, 64, 256)), 'scale': jnp.zeros((12, 64))},
    ...           'qkv': jnp.zeros((64, 4, 16))}
    >>> layout = kl_optax.Layout(dimension_numbers=kl_optax.scanned('blocks')
    ...                          | kl_optax.attention_heads('qkv'))
    >>> for path, line in kl_optax.describe(params, layout, rank=8).items():
    ...   print(path, '->', line)
    ['blocks']['scale'] -> adam
    ['blocks']['w'] -> kron: 12 tensors (batch axes (0,)) of shape (64, 256); spike_flat
    ['qkv'] -> kron: 1 tensor of shape (64, 64) (modes ((0,), (1, 2))); spike_flat
  """
  layout = Layout() if layout is None else layout
  labels = jax.tree.leaves(layout.labels(params))
  pro = (jax.tree.leaves(routing.pro_labels(params, rank, restricted_side,
                                            block_size=layout.block_size,
                                    max_precond_dim=layout.max_precond_dim,
                                    dimension_numbers=layout.dimension_numbers))
         if rank is not None else [None] * len(labels))
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  specs = dims.resolve(layout.dimension_numbers, params, "describe")
  out = {}
  for (path, leaf), label, pro_label, spec in zip(flat, labels, pro, specs):
    name = trees.leaf_path(path)
    if label != routing.KRON:
      out[name] = label
      continue
    leaf_dims = dims.leaf_dims(name, tuple(leaf.shape), spec, "describe")
    sq = trees.squeezed_shape(leaf_dims.modes)
    n = leaf_dims.count
    line = f"kron: {n} tensor{'s' if n > 1 else ''}"
    if spec is not None and spec.batch_axes:
      line += f" (batch axes {tuple(a % leaf.ndim for a in spec.batch_axes)})"
    line += f" of shape {sq}"
    if spec is not None and spec.mode_axes is not None:
      line += f" (modes {spec.mode_axes})"
    ranges = [plan_lib.block_ranges(d, layout.max_precond_dim, layout.block_size) for d in sq]
    if any(len(r) > 1 for r in ranges):
      line += f", cut into {math.prod(len(r) for r in ranges)} blocks of at most {layout.block_size}"
    if pro_label is not None:
      line += f"; {pro_label}"
    out[name] = line
  return out


def _warn(where: str, old: str, new: str) -> None:
  warnings.warn(f"{where}: the keyword {old}= is deprecated; pass {new} instead.",
                DeprecationWarning, stacklevel=4)


def resolve(
    where: str,
    layout: Layout | None,
    fallback: Fallback | None,
    legacy: dict[str, Any],
    *,
    dimension_numbers: Any = None,
    takes_fallback: bool = True,
) -> tuple[Layout, Fallback | None]:
  """The layout and fallback of a recipe call, with the old keywords folded in.

  Args:
    where: the recipe's name, for messages.
    layout: the ``layout=`` argument (``None``: the default ``Layout``).
    fallback: the ``fallback=`` argument (``None``: the default
      ``Fallback``).
    legacy: the other keywords the recipe received.
    dimension_numbers: the recipe's ``dimension_numbers=`` argument, folded
      into the layout.
    takes_fallback: whether the recipe has a fallback (``scale_by_*`` do not,
      and take only the storage and blocking fields of a layout).

  Raises:
    TypeError: an unknown keyword, or an old keyword given together with the
      object that replaced it.
  """
  legacy = dict(legacy)
  nested = legacy.pop("legacy", None)
  if isinstance(nested, dict):
    # optax.inject_hyperparams binds a recipe's **legacy as one (static) argument.
    legacy.update(nested)
  layout_kw = {k: legacy.pop(k) for k in _LAYOUT_KEYWORDS if k in legacy}
  fallback_kw = ({_FALLBACK_KEYWORDS[k]: legacy.pop(k) for k in list(legacy)
                  if k in _FALLBACK_KEYWORDS} if takes_fallback else {})
  if legacy:
    raise TypeError(f"{where}() got unexpected keyword argument(s) {sorted(legacy)}.")
  if layout_kw and layout is not None:
    raise TypeError(f"{where}(): pass {sorted(layout_kw)} inside layout=, not beside it.")
  if fallback_kw and fallback is not None:
    raise TypeError(f"{where}(): pass {sorted(fallback_kw)} inside fallback=, not beside it.")
  for k in layout_kw:
    _warn(where, k, f"layout=kl_optax.Layout({k}=...)")
  for old, new in _FALLBACK_KEYWORDS.items():
    if new in fallback_kw:
      _warn(where, old, f"fallback=kl_optax.Fallback({new}=...)")
  if layout is not None and not isinstance(layout, Layout):
    raise TypeError(f"{where}(): layout must be a kl_optax.Layout, got {type(layout).__name__}.")
  if fallback is not None and not isinstance(fallback, Fallback):
    raise TypeError(
        f"{where}(): fallback must be a kl_optax.Fallback, got {type(fallback).__name__}.")
  layout = Layout(**layout_kw) if layout is None else layout
  if dimension_numbers is not None:
    if layout.dimension_numbers is not None:
      raise TypeError(f"{where}(): dimension_numbers given both as an argument and in layout=.")
    layout = dataclasses.replace(layout, dimension_numbers=dimension_numbers)
  if not takes_fallback:
    if layout.precondition_mask is not None or layout.weight_decay_mask is not None:
      raise ValueError(
          f"{where} preconditions every leaf it is given and applies no weight decay: "
          "its layout takes no masks. Use the complete recipe, or route leaves with "
          "optax.partition.")
    return layout, None
  return layout, Fallback(**fallback_kw) if fallback is None else fallback
