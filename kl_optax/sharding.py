"""Laying out optimizer state on a device mesh.

The rule, for a [`kron_transform`][kl_optax.transform.kron_transform] traced under
``jax.set_mesh(mesh)``:

* Each shape group's stack (factors, bases, eigenvalues, moments: every field
  has a leading axis over the tensors — or blocks — of that group) is padded
  to a multiple of the number of devices and sharded along that leading axis
  over all mesh axes. Each device stores and processes its share of the
  tensors: one batched factor update and one batched QR/eigh per group and
  device, inside ``jax.shard_map``, so the compiler never splits a single
  factor's linear algebra across devices. Padding tensors see zero gradients
  and are never returned.
* Gradients are gathered once per step and group to hand whole tensors to
  the devices that own them; updates are gathered back and leave in the
  gradients' own sharding.
* Everything else in an optax state follows the parameters: moments of the
  AdamW fallback get their parameter's sharding, counters are replicated.

[`state_shardings`][kl_optax.sharding.state_shardings] returns these shardings for any optax transformation
(for ``jit``'s ``out_shardings``, buffer donation and checkpoint restore).
Without a mesh in context nothing is padded or constrained: parameters
placed on several devices with ``NamedSharding`` but an ``init`` outside
``jax.set_mesh`` leave the Kronecker state whole on every device, and
``init`` warns once ([`warn_if_sharded_without_mesh`][kl_optax.sharding.warn_if_sharded_without_mesh]) with the fix.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from typing import Any

import warnings

import jax
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from kl_optax import trees
from kl_optax.state import KronTransformState

__all__ = [
    "constrain",
    "context_mesh",
    "has_explicit_axes",
    "map_stacks",
    "padded_stack_size",
    "stack_axes",
    "stack_spec",
    "state_shardings",
    "warn_if_sharded_without_mesh",
]

_warned_without_mesh = False


def warn_if_sharded_without_mesh(leaves, where: str) -> None:
  """Warns (once per process) when arrays live on several devices but no mesh is set.

  Without ``jax.set_mesh(mesh)`` around ``init`` and the train step, the
  Kronecker state is neither padded nor sharded: every device would hold all
  of it. Only concrete arrays are looked at (tracers carry no devices).
  """
  global _warned_without_mesh
  if _warned_without_mesh or context_mesh() is not None:
    return
  for x in leaves:
    sharding = getattr(x, "sharding", None) if isinstance(x, jax.Array) else None
    if sharding is not None and not isinstance(x, jax.core.Tracer) and len(sharding.device_set) > 1:
      _warned_without_mesh = True
      mesh = getattr(sharding, "mesh", None)
      shape = dict(mesh.shape) if mesh is not None else f"{len(sharding.device_set)} devices"
      warnings.warn(
          f"{where}: the parameters are placed on {len(sharding.device_set)} devices "
          f"(mesh {shape}) but no mesh is set, so the optimizer state will not be spread "
          "over them: each device would hold all of it. Call tx.init and the train step "
          "under `with jax.set_mesh(mesh):` (and jit the init with "
          "out_shardings=kl_optax.state_shardings(tx, params)); see docs/sharding.md.",
          UserWarning, stacklevel=4)
      return


def context_mesh() -> jax.sharding.AbstractMesh | None:
  """The mesh set with ``jax.set_mesh`` (or ``None`` when there is none)."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty else mesh


def has_explicit_axes(mesh) -> bool:
  return any(t == AxisType.Explicit for t in mesh.axis_types)


def padded_stack_size(n: int, mesh) -> int:
  """``n`` rounded up to a multiple of the number of devices of ``mesh`` (``n`` without one)."""
  if mesh is None or n == 0:
    return n
  return math.ceil(n / mesh.size) * mesh.size


def stack_axes(n: int, mesh) -> tuple[str, ...]:
  """Mesh axes the leading (stack) axis of size ``n`` is sharded over.

  All axes when their product divides ``n`` (always so for state initialized
  under the same mesh); otherwise the subset with the largest product that
  divides ``n`` (possibly none: replicated).
  """
  if mesh is None or n == 0:
    return ()
  names = tuple(mesh.axis_names)
  sizes = dict(zip(names, mesh.axis_sizes))
  best: tuple[str, ...] = ()
  best_size = 1
  for k in range(len(names), 0, -1):
    for subset in itertools.combinations(names, k):
      size = math.prod(sizes[a] for a in subset)
      if n % size == 0 and size > best_size:
        best, best_size = subset, size
  return best


def stack_spec(n: int, ndim: int, mesh) -> PartitionSpec:
  """The ``PartitionSpec`` of a stacked state array of shape ``(n, …)`` with ``ndim`` dims."""
  del ndim  # trailing dims are never sharded; the spec leaves them out
  axes = stack_axes(n, mesh)
  if not axes:
    return PartitionSpec()
  return PartitionSpec(axes[0] if len(axes) == 1 else axes)


def constrain(x: jax.Array, spec: PartitionSpec) -> jax.Array:
  """Places ``x`` with ``spec`` on the context mesh (``reshard`` for explicit axes)."""
  mesh = context_mesh()
  if mesh is None:
    return x
  if has_explicit_axes(mesh):
    return jax.sharding.reshard(x, spec)
  return jax.lax.with_sharding_constraint(x, spec)


def _vmapped(fn, states, grads, count):
  return jax.vmap(fn, in_axes=(0, 0, None))(states, grads, count)


def _closes_over_tracers(fn, *args) -> bool:
  """Whether ``fn`` uses traced values it does not receive as arguments."""
  consts = jax.make_jaxpr(fn)(*args).consts
  return any(isinstance(c, jax.core.Tracer) for c in consts)


def map_stacks(fn: Callable, states: Any, grads: jax.Array, count: jax.Array):
  """Runs ``fn(state, grad, count) -> (state, update)`` on every tensor of a stack.

  ``states`` and ``grads`` have a leading axis over the tensors of one shape
  group; ``fn`` is written for one tensor and mapped with ``jax.vmap``. Under a
  mesh whose axes divide the stack, each device runs ``fn`` on its own share
  (``jax.shard_map``), so no factor's linear algebra is split across devices.
  Hyperparameters traced from outside (``optax.inject_hyperparams``) cannot
  enter ``shard_map`` as closures; such stacks are left to XLA's partitioner,
  which splits the mapped batch the same way.
  """
  local = functools.partial(_vmapped, fn)
  mesh = context_mesh()
  axes = stack_axes(grads.shape[0], mesh)
  if axes and not _closes_over_tracers(local, states, grads, count):
    spec = stack_spec(grads.shape[0], 1, mesh)
    local = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, PartitionSpec()),
                          out_specs=(spec, spec))
  return local(states, grads, count)


def _concrete_mesh(mesh):
  if mesh is not None:
    return mesh
  mesh = jax.sharding.get_mesh()
  if mesh is None or mesh.empty:
    raise ValueError(
        "state_shardings: no mesh given and none set with jax.set_mesh(mesh)."
    )
  return mesh


def _param_sharding(leaf, mesh, given):
  if given is not None:
    if isinstance(given, PartitionSpec):
      return NamedSharding(mesh, given)
    return given
  sharding = getattr(leaf, "sharding", None)
  if isinstance(sharding, NamedSharding):
    return sharding
  return NamedSharding(mesh, PartitionSpec())


def state_shardings(
    tx: optax.GradientTransformation,
    params: Any,
    mesh: jax.sharding.Mesh | None = None,
    *,
    params_shardings: Any = None,
    state: Any = None,
) -> Any:
  """The ``NamedSharding`` of every leaf of ``tx.init(params)`` on ``mesh``.

  Works for any optax transformation built from ``kl_optax`` recipes and
  ``optax`` transforms (``chain``, ``partition``, ``masked``,
  ``inject_hyperparams``, …):

  * stacked Kronecker state ([`KronTransformState`][kl_optax.state.KronTransformState] groups) is
    sharded along its leading axis ([`stack_spec`][kl_optax.sharding.stack_spec]);
  * a sub-tree with the structure and shapes of ``params`` (AdamW moments,
    momentum buffers; masked entries allowed) gets the parameters' shardings;
  * every other leaf (counters, hyperparameters) is replicated.

  Args:
    tx: the optimizer.
    params: the parameters (arrays or ``jax.ShapeDtypeStruct``); their
      ``NamedSharding`` is used unless ``params_shardings`` is given.
    mesh: the mesh (``None``: the one set with ``jax.set_mesh``).
    params_shardings: optional tree (matching ``params``) of ``NamedSharding``
      or ``PartitionSpec``.
    state: an existing state (arrays or ``jax.ShapeDtypeStruct``) to lay
      out instead of the one ``tx.init`` makes under ``mesh``. Without it the
      shardings fit a state initialized under ``jax.set_mesh(mesh)``, whose
      stacks are padded to a multiple of the devices; a state initialized
      without a mesh has unpadded stacks, which those shardings cannot
      divide. With it, each stack is sharded over the mesh axes whose sizes
      divide its length (replicated if none do): ``jax.device_put(state,
      state_shardings(tx, params, mesh, state=state))`` always works. (To
      spread such a state evenly, initialize it again under the mesh.)

  Returns:
    A tree of ``NamedSharding`` with the structure of ``tx.init(params)``,
    for ``jax.jit(..., out_shardings=...)``, donation and Orbax restore.

  Examples:
    >>> import jax, jax.numpy as jnp, kl_optax
    >>> from jax.sharding import PartitionSpec as P
    >>> mesh = jax.make_mesh((1,), ('data',))
    >>> params = {'w': jnp.zeros((8, 4)), 'b': jnp.zeros((4,))}
    >>> tx = kl_optax.kl_shampoo(1e-3)
    >>> with jax.set_mesh(mesh):
    ...   shardings = kl_optax.state_shardings(tx, params)
    ...   state = jax.jit(tx.init, out_shardings=shardings)(params)
    >>> jax.tree.structure(shardings) == jax.tree.structure(state)
    True
  """
  mesh = _concrete_mesh(mesh)
  if state is not None:
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  else:
    with jax.set_mesh(mesh):
      abstract = jax.eval_shape(tx.init, params)
  flat_params, ptreedef = jax.tree_util.tree_flatten(params)
  given = (
      [None] * len(flat_params)
      if params_shardings is None
      else ptreedef.flatten_up_to(params_shardings)
  )
  param_shardings = [
      _param_sharding(leaf, mesh, g) for leaf, g in zip(flat_params, given)
  ]
  replicated = NamedSharding(mesh, PartitionSpec())

  def kron(node):
    if not isinstance(node, KronTransformState):
      return None

    def place(x):
      return NamedSharding(mesh, stack_spec(x.shape[0], x.ndim, mesh))

    return KronTransformState(count=replicated, groups=jax.tree.map(place, node.groups))

  def on_params(flat):
    return [x if trees.is_masked(x) else s for x, s in zip(flat, param_shardings)]

  return trees.map_state(abstract, params, on_params, lambda _: replicated, stop=kron)
