"""Turning a sequence of parts into an optax transformation.

[`kron_transform`][kl_optax.transform.kron_transform] is the one wrapper every recipe is built with. One
update is a pipeline of named steps:

1. [`kl_optax.plan_tensors`][kl_optax.plan.plan_tensors] splits leaves into their tensors along their
   batch axes, groups modes, squeezes size-1 dims, cuts large dims into
   blocks and groups same-shape tensors; the state is checked against the plan;
2. [`kl_optax.plan.pack`][kl_optax.plan.pack] stacks the gradients per group (on a mesh:
   padded, then moved to the devices that own them);
3. the stored state is cast to the compute dtype (float32; float64 for float64 storage);
4. one ``lax.cond`` per group picks the initialization step (``count == 0``:
   `_initialize_tensor`) or the regular step (`_update_tensor`),
   each run on every tensor of the group by
   [`kl_optax.sharding.map_stacks`][kl_optax.sharding.map_stacks] (``vmap``, per device under a mesh),
   and each guarded against non-finite values (`_guard`);
5. the state is cast back to its storage dtype and the updates are unpacked
   into the gradients' shapes and dtypes.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec

from kl_optax import kron
from kl_optax import plan as plan_lib
from kl_optax import sharding
from kl_optax import trees
from kl_optax import validation
from kl_optax.state import (NONFINITE_SKIPS, KronState, KronTransformState, Part, TensorStep,
                            all_finite, declared_finite, init_kron_state)

__all__ = ["kron_transform"]


class _Config(NamedTuple):
  """The static choices of one [`kron_transform`][kl_optax.transform.kron_transform]."""

  parts: tuple[Part, ...]
  dtype: Any
  block_size: int | None
  max_precond_dim: int | None
  compute_dtype: Any = None
  matmul_precision: str | None = None

  @property
  def factor_dtype(self) -> Any:
    """The factors' storage: at least float32 when a part reads their eigenvalues."""
    if any(p.float32_factors for p in self.parts):
      return jnp.promote_types(self.dtype, jnp.float32)
    return self.dtype

  @property
  def float32_slots(self) -> tuple[str, ...]:
    """Prefixes of the slots stored in at least float32 whatever the storage dtype."""
    return tuple(prefix for p in self.parts for prefix in p.float32_slots)

  def plan(self, tree, where: str, dimension_numbers: Any) -> plan_lib.TensorPlan:
    return plan_lib.plan_tensors(tree, where, self.max_precond_dim, self.block_size,
                                 dimension_numbers)


# ----------------------------------------------------------------------------
# One tensor
# ----------------------------------------------------------------------------


def _tensor_state(parts: tuple[Part, ...], shape: tuple[int, ...]) -> KronState:
  """The initial state of one tensor: the parts' slots, the skip counter, their hooks."""
  slots: dict[str, jax.Array] = {}
  for p in parts:
    for name, value in (p.init_slots(shape) if p.init_slots is not None else {}).items():
      if name in slots and slots[name].shape != value.shape:
        raise ValueError(
            f"kron_transform: two parts declare slot {name!r} with different "
            f"shapes ({slots[name].shape} and {value.shape}).")
      slots[name] = value
  slots[NONFINITE_SKIPS] = jnp.zeros((), jnp.int32)
  state = init_kron_state(shape, slots)
  for p in parts:
    if p.init_state is not None:
      state = p.init_state(state)
  return state


def _all_finite(tree, old=None, known=()) -> jax.Array:
  """Whether every floating leaf of ``tree`` is finite.

  Leaves that are arrays of ``old`` (the same traced value: a part passed the
  slot through unchanged) are not checked again: the state is finite by
  construction, and skipping them saves a pass over every factor and basis a
  step leaves alone (and its compiled reduction). Nor are the arrays that
  ``known`` (the notes of [`kl_optax.state.declare_finite`][kl_optax.state.declare_finite]) shows finite
  given ``old``.
  """
  finite = _finite_given(jax.tree.leaves(old) if old is not None else [], known)
  return all_finite(*(x for x in jax.tree.leaves(tree) if not finite(x)))


def _finite_given(old_leaves, known):
  """``x -> bool``: whether a note in ``known`` makes ``x`` finite, given the
  finite arrays ``old_leaves`` (compared with ``is``)."""

  def finite(x, depth=0):
    if any(x is o for o in old_leaves):
      return True
    return depth < 8 and any(
        k is x and all(finite(g, depth + 1) for g in given) for k, given in known)

  return finite


def _guard(old: KronState, new: KronState, ok: jax.Array, finite: jax.Array) -> KronState:
  """``new`` where ``ok``, else ``old``; a skip is counted unless ``ok & finite``.

  A leaf a step passed through unchanged is kept as it is (no select).
  """
  kept = jax.tree.map(lambda n, o: o if n is o else jnp.where(ok, n, o), new, old)
  skips = old.slots[NONFINITE_SKIPS] + (~(ok & finite)).astype(jnp.int32)
  return kept.with_slots(**{NONFINITE_SKIPS: skips})


def _run(fns, state: KronState, grad: jax.Array, count: jax.Array) -> TensorStep:
  step = TensorStep(state, grad, grad, count)
  for fn in fns:
    step = fn(step)
  return step


def _stored_initial_state(config: _Config, shape) -> KronState:
  """The initial state of one tensor in its storage dtypes, as ``init`` stores it."""
  return _cast_state(_tensor_state(config.parts, shape), config.dtype, config.factor_dtype,
                     config.float32_slots)


def _initial_state(config: _Config, state: KronState, shape) -> KronState:
  """The stored initial state of one tensor, cast to ``state``'s (compute) dtypes.

  Rebuilt (constants) rather than taken from ``state``: a branch that does
  not read the stored state lets XLA write the new state in place into
  donated buffers, where reading it in both branches of the ``lax.cond`` made
  XLA copy every stored array out of the ``cond`` on every step.
  """
  return jax.tree.map(lambda fresh, x: fresh.astype(x.dtype),
                      _stored_initial_state(config, shape), state)


def _initialize_tensor(config: _Config, state: KronState, grad: jax.Array, count: jax.Array):
  """The initialization step of one tensor: statistics from ``grad``, zero update.

  It starts from the initial state (`_initial_state`), whatever ``state``
  holds: at ``count == 0`` the stored state is the one ``init`` made, unless
  it was edited by hand. A non-finite gradient initializes from zeros.
  """
  parts = config.parts
  state = _initial_state(config, state, grad.shape)
  finite = all_finite(grad)
  grad = jnp.where(finite, grad, 0.0)
  fns = [p.first_update for p in parts if p.first_update is not None]
  # e.g. the eigenvalue start and the basis: one eigh
  with kron.shared_decompositions(), declared_finite() as known:
    new = _run(fns, state, grad, count).state
  return _guard(state, new, _all_finite(new, state, known), finite), jnp.zeros_like(grad)


def _update_tensor(parts, state: KronState, grad: jax.Array, count: jax.Array):
  """A regular step of one tensor.

  A non-finite gradient, or statistics or an update that overflowed: the
  tensor skips the step (state kept, zero update).
  """
  finite = all_finite(grad)
  grad = jnp.where(finite, grad, 0.0)
  with declared_finite() as known:
    out = _run([p.update for p in parts], state, grad, count)
  ok = finite & _all_finite((out.state, out.update), state, known)
  return _guard(state, out.state, ok, finite), jnp.where(ok, out.update, 0.0)


# ----------------------------------------------------------------------------
# Stacks
# ----------------------------------------------------------------------------


def _run_groups(config: _Config, states, grads, count):
  """The initialization or the regular step on every tensor of every group.

  Each group has its own ``lax.cond``: XLA then schedules the groups one
  after another, so that only one group's intermediates (and, at
  ``count == 0``, its eigendecompositions) are live at a time. A single
  ``cond`` around all groups made the initialization branch's peak, every
  group's statistics and decompositions at once, the scratch memory of
  every step.
  """
  init = functools.partial(_float32_products, _initialize_tensor, config)
  regular = functools.partial(_update_tensor, config.parts)
  results = [jax.lax.cond(count == 0,
                          functools.partial(sharding.map_stacks, init),
                          functools.partial(sharding.map_stacks, regular),
                          st, g, count)
             for st, g in zip(states, grads)]
  return tuple(r[0] for r in results), tuple(r[1] for r in results)


def _float32_products(fn, *args):
  """``fn(*args)`` traced with float32 products at HIGHEST (the initialization's
  statistics feed its eigendecompositions)."""
  with kron.matmul_settings():
    return fn(*args)


def _compute_dtype(storage) -> Any:
  """float32, or float64 for float64 storage (bfloat16 storage computes in float32)."""
  return jnp.promote_types(storage, jnp.float32)


def _cast_state(state: KronState, dtype, factor_dtype=None,
                float32_slots: tuple[str, ...] = ()) -> KronState:
  """Casts factors (to ``factor_dtype``, default ``dtype``), bases and floating slots.

  Eigenvalue estimates, and slots whose name starts with one of
  ``float32_slots``, stay at least float32.
  """
  factor_dtype = dtype if factor_dtype is None else factor_dtype
  wide = jnp.promote_types(dtype, jnp.float32)

  def cast(x, to=dtype):
    return x.astype(to) if jnp.issubdtype(x.dtype, jnp.floating) else x

  return KronState(
      factors=tuple(cast(x, factor_dtype) for x in state.factors),
      bases=tuple(cast(x) for x in state.bases),
      eigvals=tuple(x.astype(_compute_dtype(dtype)) for x in state.eigvals),
      slots={k: cast(v, wide if k.startswith(float32_slots) else dtype)
             for k, v in state.slots.items()},
  )


def _pack_gradients(tensor_plan, leaves, padded, dtype) -> tuple[jax.Array, ...]:
  """The gradient stacks; on a mesh, whole tensors move to the devices that own them."""
  grads = plan_lib.pack(tensor_plan, leaves, padded, dtype)
  mesh = sharding.context_mesh()
  if mesh is None:
    return grads
  grads = tuple(sharding.constrain(g, PartitionSpec()) for g in grads)
  return tuple(sharding.constrain(g, sharding.stack_spec(g.shape[0], g.ndim, mesh))
               for g in grads)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _step(config: _Config, tensor_plan, padded, leaves, groups, count):
  """Pack, cast up, initialize or update every tensor, cast down, unpack.

  Jitted on its own (the static choices, the plan and the stack sizes are its
  cache key), so that an un-jitted ``update`` compiles once instead of tracing
  and compiling its ``lax.cond`` branches on every call; under an outer
  ``jit`` it is inlined.
  """
  compute = _compute_dtype(config.dtype)
  grads = _pack_gradients(tensor_plan, leaves, padded, compute)
  states = tuple(_cast_state(g, compute) for g in groups)
  new_states, outs = _run_groups(config, states, grads, count)
  new_states = tuple(_cast_state(s, config.dtype, config.factor_dtype, config.float32_slots)
                     for s in new_states)
  if sharding.context_mesh() is not None:
    outs = tuple(sharding.constrain(o, PartitionSpec()) for o in outs)
  return plan_lib.unpack(tensor_plan, outs, leaves), new_states


# ----------------------------------------------------------------------------
# init and update
# ----------------------------------------------------------------------------


def _is_placeholder(params) -> bool:
  """Whether ``params`` is a single opaque pytree node without leaves.

  ``optax.tree.map_params`` initializes with such a placeholder to find the
  parameter-shaped parts of a state.
  """
  containers = (dict, list, tuple, type(None), optax.MaskedNode)
  return not jax.tree.leaves(params, is_leaf=trees.is_masked) and not isinstance(params, containers)


def _init(config: _Config, dimension_numbers, params) -> KronTransformState:
  tensor_plan = config.plan(params, "kron_transform.init", dimension_numbers)
  count = jnp.zeros([], jnp.int32)
  if _is_placeholder(params):
    # The groups are unknown; an empty array leaf is a prefix of any groups, so
    # that map_params leaves the stacks (which are not parameter-shaped) alone.
    return KronTransformState(count=count, groups=jnp.zeros((0,), jnp.float32))
  mesh = sharding.context_mesh()
  if mesh is None and tensor_plan.group_sizes:
    sharding.warn_if_sharded_without_mesh(jax.tree.leaves(params), "kron_transform.init")
  groups = []
  for shape, n in zip(tensor_plan.group_shapes, tensor_plan.group_sizes):
    n = sharding.padded_stack_size(n, mesh)
    one = _stored_initial_state(config, shape)
    stack = jax.tree.map(lambda x, n=n: jnp.broadcast_to(x, (n,) + x.shape), one)
    if mesh is not None:
      stack = jax.tree.map(
          lambda x: sharding.constrain(x, sharding.stack_spec(x.shape[0], x.ndim, mesh)), stack)
    groups.append(stack)
  return KronTransformState(count=count, groups=tuple(groups))


def _update(config: _Config, dimension_numbers, updates, state: KronTransformState, params=None,
            **extra_args):
  del params, extra_args
  tensor_plan = config.plan(updates, "kron_transform.update", dimension_numbers)
  count = optax.safe_increment(state.count)
  if not tensor_plan.group_sizes:
    return updates, KronTransformState(count=count, groups=state.groups)
  mesh = sharding.context_mesh()
  plan_lib.check_matches_state(tensor_plan, state.groups, mesh.size if mesh is not None else None)
  leaves = tensor_plan.treedef.flatten_up_to(updates)
  padded = tuple(g.factors[0].shape[0] for g in state.groups)
  step = functools.partial(_step, config, tensor_plan, padded)
  if mesh is not None and sharding.has_explicit_axes(mesh):
    # Inside auto_axes the context mesh has the same axes, typed Auto.
    leaf_specs = [jax.typeof(x).sharding.spec for x in leaves]
    state_specs = jax.tree.map(
        lambda x: sharding.stack_spec(x.shape[0], x.ndim, mesh), state.groups)
    step = jax.sharding.auto_axes(step, out_sharding=(leaf_specs, state_specs))
  with kron.matmul_settings(config.compute_dtype, config.matmul_precision):
    new_leaves, new_states = step(leaves, state.groups, state.count)
  return (tensor_plan.treedef.unflatten(list(new_leaves)),
          KronTransformState(count=count, groups=tuple(new_states)))


def kron_transform(
    *parts: Part,
    state_dtype: Any = None,
    block_size: int | None = None,
    max_precond_dim: int | None = None,
    dimension_numbers: Any = None,
    compute_dtype: jax.typing.DTypeLike | None = None,
    matmul_precision: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Builds an optax transformation from a sequence of [`Part`][kl_optax.state.Part].

  Every leaf of the tree the transformation is applied to is preconditioned:
  size-1 dims are squeezed and what remains must have order ≥ 2 (route other
  leaves elsewhere with ``optax.partition``, as the recipes do). With
  ``dimension_numbers``, a leaf's batch axes make it a stack of tensors (one
  per scanned layer or expert), each preconditioned on its own, and its other
  axes are grouped into modes ([`kl_optax.dims`][kl_optax.dims]). With
  ``block_size``, dims larger than ``max_precond_dim`` are cut into blocks of
  at most ``block_size`` and every block gets its own preconditioner. Tensors
  (blocks) of the same shape are stacked and processed together: one
  ``vmap``-ed step per shape group, however deep the model.

  On the first update (``count == 0``) each part's ``first_update`` runs on
  the initial state (the statistics are initialized from this gradient; the
  stored groups are not read, so a state edited by hand before its first
  update, or whose ``count`` was set back to 0, starts again from the initial
  state) and the returned update is zero. On every later update the parts' ``update`` functions run in the given
  order and the final running update is returned, cast to each gradient's
  dtype.

  Non-finite values never enter the state: a tensor (block) whose gradient
  is not finite, or whose new statistics or update would not be finite
  (overflow), keeps its previous state for the step and gets a zero update;
  the slot ``'nonfinite_skips'`` counts such steps per tensor. On the first
  update a non-finite gradient initializes the statistics from zeros.

  Under ``jax.set_mesh(mesh)`` the stacks are padded to a multiple of the
  number of devices and sharded along their leading axis; each device runs
  the parts on its share of the tensors (see [`kl_optax.sharding`][kl_optax.sharding]).

  Args:
    *parts: the parts, in the order they run.
    state_dtype: storage dtype of factors, bases and floating slots (``None``:
      float32; ``jnp.bfloat16`` halves their memory). Eigenvalue estimates
      are at least float32. Computation is float32 (float64 with
      ``jnp.float64`` storage, under ``jax.enable_x64``).
    block_size: cut dims larger than ``max_precond_dim`` into blocks of this
      length (``None``: no blocking). Static.
    max_precond_dim: the largest dim kept whole when ``block_size`` is set
      (``None``: ``block_size``). Static.
    dimension_numbers: batch axes and mode groups, per leaf or as a rule
      ([`kl_optax.DimensionNumbers`][kl_optax.dims.DimensionNumbers], [`kl_optax.scanned`][kl_optax.dims.scanned], ...;
      ``None``: each leaf is one tensor and each axis a mode). Static.
    compute_dtype: operand dtype of the mode products and Gram matrices (the
      projections, the whitening and the factor statistics): ``None`` keeps
      float32; ``jnp.bfloat16`` rounds the operands to bfloat16 and accumulates
      in float32 (the tensor cores' rate on accelerators). Eigendecompositions,
      QR, the products that feed them (the whole initialization step and the
      power step of a basis refresh) and the eigenvalue arithmetic stay
      float32; Pro-KLShampoo's spike-and-flat products, its subspace power
      step included, follow the setting. The transformation sets its own
      [`kl_optax.kron.matmul_settings`][kl_optax.kron.matmul_settings] (``None`` means float32): an enclosing
      ``matmul_settings`` block does not change it ([`kl_optax.kron.matmul_settings`][kl_optax.kron.matmul_settings]). Static.
    matmul_precision: for float32 operands, ``"highest"`` (``None``, full
      float32), ``"high"`` (TF32 on NVIDIA GPUs, bf16×3 on TPU) or
      ``"default"``. A CPU ignores it. Static.

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
    if not isinstance(p, Part):
      raise TypeError(
          f"kron_transform: argument {i} is a {type(p).__name__}, not a kl_optax.Part.")
  block_size, max_precond_dim = validation.check_blocking(block_size, max_precond_dim)
  kron.check_matmul_settings(compute_dtype, matmul_precision)  # errors now, not at trace time
  config = _Config(tuple(parts), validation.storage_dtype(state_dtype), block_size,
                   max_precond_dim, compute_dtype, matmul_precision)
  return optax.GradientTransformationExtraArgs(
      functools.partial(_init, config, dimension_numbers),
      functools.partial(_update, config, dimension_numbers))
