"""Linear algebra on Kronecker-structured tensors.

A tensor ``X`` of shape ``(d_1, ..., d_K)`` is preconditioned by one square
matrix per mode. These helpers implement the handful of operations every
Kronecker-factored optimizer is made of: mode products, projection into a
Kronecker eigenbasis and back, mode-wise Gram matrices and the symmetric
eigendecomposition / QR used to maintain the bases.

The products of [`mode_product`][kl_optax.kron.mode_product] and [`mode_gram`][kl_optax.kron.mode_gram] (the
projections, whitening and factor statistics) follow the settings of
[`matmul_settings`][kl_optax.kron.matmul_settings]: by default float32 operands at
``precision=HIGHEST`` (on TPU and GPU the default matmul precision rounds operands
to bfloat16 or TF32); inside ``matmul_settings(jnp.bfloat16)`` bfloat16 operands
with float32 accumulation. ``kl_optax.kron_transform`` keeps the products that feed
the decompositions (its initialization step, the power step of a basis refresh) at
float32 ``HIGHEST``.

Every function here acts on a single tensor; batches of same-shape tensors are
handled by ``jax.vmap`` around them.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.linalg  # noqa: F401  (jax.scipy is not imported by jax)

HIGHEST = jax.lax.Precision.HIGHEST

__all__ = [
    "HIGHEST",
    "MATMUL_PRECISIONS",
    "MatmulSettings",
    "current_matmul_settings",
    "eigh_descending",
    "matmul",
    "matmul_settings",
    "mode_gram",
    "mode_product",
    "other_modes_product",
    "outer_product",
    "project",
    "shared_decompositions",
    "project_back",
    "qr_orthonormal",
    "qr_power_step",
]


MATMUL_PRECISIONS = {
    "highest": jax.lax.Precision.HIGHEST,
    "high": jax.lax.Precision.HIGH,
    "default": jax.lax.Precision.DEFAULT,
}
"""Names of ``matmul_precision`` for float32 operands: ``"highest"`` (full float32),
``"high"`` (TF32 on NVIDIA GPUs, three bfloat16 passes on TPU), ``"default"`` (the
backend's fastest: one bfloat16 pass on TPU, TF32 on NVIDIA GPUs). A CPU computes
float32 products in full float32 whatever the name."""


class MatmulSettings(NamedTuple):
  """How the mode products and Gram matrices compute (see [`matmul_settings`][kl_optax.kron.matmul_settings])."""

  compute_dtype: jnp.dtype | None
  precision: jax.lax.Precision


_DEFAULT_SETTINGS = MatmulSettings(None, HIGHEST)
_SETTINGS: contextvars.ContextVar[MatmulSettings] = contextvars.ContextVar(
    "kl_optax_matmul_settings", default=_DEFAULT_SETTINGS)


def check_matmul_settings(compute_dtype, matmul_precision) -> MatmulSettings:
  """Validates ``compute_dtype`` / ``matmul_precision`` and returns the settings.

  Raises:
    ValueError: naming the argument, for a dtype that is not bfloat16/float32
      or a precision name not in ``MATMUL_PRECISIONS``.
  """
  dtype = None
  if compute_dtype is not None:
    try:
      dtype = jnp.dtype(compute_dtype)
    except TypeError as error:
      raise ValueError(f"compute_dtype must be a floating dtype, got {compute_dtype!r}") from error
    if dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
      # float16 would flush the small entries of a factor to zero and overflow at 65504.
      raise ValueError(f"compute_dtype must be bfloat16 or float32 (None: float32), got {dtype}")
    if dtype == jnp.float32:
      dtype = None
  name = "highest" if matmul_precision is None else matmul_precision
  if name not in MATMUL_PRECISIONS:
    raise ValueError(f"matmul_precision must be one of {sorted(MATMUL_PRECISIONS)} or None, "
                     f"got {matmul_precision!r}")
  return MatmulSettings(dtype, MATMUL_PRECISIONS[name])


@contextlib.contextmanager
def matmul_settings(compute_dtype: jax.typing.DTypeLike | None = None,
                    matmul_precision: str | None = None) -> Iterator[MatmulSettings]:
  """Sets how the mode products and Gram matrices traced inside the block compute.

  Args:
    compute_dtype: ``None`` (or float32): operands keep their dtype (float32);
      ``jnp.bfloat16``: operands are rounded to it and the products accumulate
      and return in the operands' original dtype.
    matmul_precision: for float32 operands, a name of ``MATMUL_PRECISIONS``
      (``None``: ``"highest"``).

  Yields:
    The settings in force.

  Examples:
    >>> import jax.numpy as jnp
    >>> from kl_optax import kron
    >>> x = jnp.full((2, 3), 1 + 2 ** -10)
    >>> with kron.matmul_settings(jnp.bfloat16):
    ...   g = kron.mode_gram(x, 0)
    >>> float(g[0, 0]), g.dtype   # the operands were rounded to bfloat16 (1 + 2^-10 -> 1)
    (3.0, dtype('float32'))
    >>> float(kron.mode_gram(x, 0)[0, 0]) > 3.0
    True
  """
  token = _SETTINGS.set(check_matmul_settings(compute_dtype, matmul_precision))
  try:
    yield _SETTINGS.get()
  finally:
    _SETTINGS.reset(token)


def current_matmul_settings() -> MatmulSettings:
  """The settings of the innermost [`matmul_settings`][kl_optax.kron.matmul_settings] block (or the defaults)."""
  return _SETTINGS.get()


def _tensordot(a: jax.Array, b: jax.Array, axes) -> jax.Array:
  settings = _SETTINGS.get()
  out_dtype = jnp.result_type(a, b)
  if settings.compute_dtype is not None and jnp.issubdtype(out_dtype, jnp.floating) and (
      jnp.finfo(out_dtype).bits > jnp.finfo(settings.compute_dtype).bits):
    return jnp.tensordot(a.astype(settings.compute_dtype), b.astype(settings.compute_dtype),
                         axes=axes, preferred_element_type=out_dtype)
  return jnp.tensordot(a, b, axes=axes, precision=settings.precision)


def matmul(a: jax.Array, b: jax.Array) -> jax.Array:
  """``a @ b`` for matrices, under the current [`matmul_settings`][kl_optax.kron.matmul_settings]."""
  return _tensordot(a, b, axes=((a.ndim - 1,), (0,)))


def mode_product(x: jax.Array, a: jax.Array, mode: int) -> jax.Array:
  """Multiplies every mode-``mode`` fibre of ``x`` by the matrix ``a``.

  ``(x ×_k a)[..., i, ...] = Σ_j a[i, j] x[..., j, ...]`` with ``i, j`` at
  position ``k = mode``. For a matrix ``x``: ``x ×_0 a = a @ x`` and
  ``x ×_1 a = x @ a.T``.

  Args:
    x: a tensor of any order.
    a: a matrix of shape ``(p, x.shape[mode])``.
    mode: the axis of ``x`` that ``a`` acts on.

  Returns:
    A tensor with ``x.shape[mode]`` replaced by ``p``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from kl_optax import kron
    >>> x = jnp.arange(6.0).reshape(2, 3)
    >>> a = jnp.eye(3)
    >>> bool(jnp.allclose(kron.mode_product(x, a, 1), x))
    True
  """
  y = _tensordot(a, x, axes=((1,), (mode,)))
  return jnp.moveaxis(y, 0, mode)


def project(x: jax.Array, bases: Sequence[jax.Array]) -> jax.Array:
  """Projects ``x`` into a Kronecker eigenbasis: ``x ×_1 Q_1ᵀ ×_2 Q_2ᵀ …``.

  For a matrix this is ``Q_aᵀ x Q_b``.
  """
  for k, q in enumerate(bases):
    x = mode_product(x, q.T, k)
  return x


def project_back(x: jax.Array, bases: Sequence[jax.Array]) -> jax.Array:
  """Maps ``x`` back from a Kronecker eigenbasis: ``x ×_1 Q_1 ×_2 Q_2 …``.

  For a matrix this is ``Q_a x Q_bᵀ``; it inverts [`project`][kl_optax.kron.project] when every
  ``Q_k`` is orthogonal.
  """
  for k, q in enumerate(bases):
    x = mode_product(x, q, k)
  return x


def other_modes_product(
    x: jax.Array, mats: Sequence[jax.Array | None], skip: int
) -> jax.Array:
  """Applies ``mats[j]`` along every mode ``j != skip`` (``None`` = identity)."""
  for j, a in enumerate(mats):
    if j != skip and a is not None:
      x = mode_product(x, a, j)
  return x


def mode_gram(x: jax.Array, mode: int, y: jax.Array | None = None) -> jax.Array:
  """Returns ``x_(k) y_(k)ᵀ``: the mode-``k`` unfoldings contracted over all other modes.

  With ``y = None`` this is the Gram matrix ``x_(k) x_(k)ᵀ`` of shape
  ``(d_k, d_k)``.
  """
  y = x if y is None else y
  others = tuple(i for i in range(x.ndim) if i != mode)
  return _tensordot(x, y, axes=(others, others))


def outer_product(vectors: Sequence[jax.Array]) -> jax.Array:
  """Outer product ``v_1 ∘ v_2 ∘ …`` as a tensor of shape ``(len(v_1), len(v_2), …)``."""
  out = vectors[0]
  for v in vectors[1:]:
    out = out[..., None] * v
  return out


# How many independent one-matrix LAPACK calls each iteration of the CPU loop of
# `_batch_sequentially` issues: XLA:CPU may run them at the same time
# (the largest stacks hold few, large matrices), and the program stays one loop
# whatever the stack size.
_CPU_CALLS_AT_ONCE = 2


def _in_chunks_on_cpu(fn, x):
  """``fn`` on every matrix of the stack ``x``: ``_CPU_CALLS_AT_ONCE`` calls per
  ``lax.map`` iteration (no loop when the stack is that small)."""
  n = x.shape[0]
  width = min(n, _CPU_CALLS_AT_ONCE)
  rounds, rest = divmod(n, width)

  def chunk(y):
    return jax.tree.map(lambda *a: jnp.stack(a), *[fn(y[i]) for i in range(y.shape[0])])

  if rounds == 1:
    out = chunk(x[:width])
  else:
    out = jax.lax.map(chunk, x[:rounds * width].reshape((rounds, width) + x.shape[1:]))
    out = jax.tree.map(lambda a: a.reshape((rounds * width,) + a.shape[2:]), out)
  if rest:
    out = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), out, chunk(x[rounds * width:]))
  return out


# From this matrix size on, QR of a stack loops over its matrices on NVIDIA GPUs
# (a `lax.map` of one-matrix calls) instead of calling the batched routine. On
# an H200 (jaxlib 0.11.2) the batched QR of 48 matrices of 768 × 768 took
# 1171 ms and the loop 148 ms; of 96, 1310 against 297 ms; of 48 of 256 × 256,
# 47.5 against 36.4 ms; of 12 of 3072 × 3072 both about 223 ms; of 8 of 64 × 64
# the batched call was faster (2.0 against 2.4 ms).
_GPU_QR_LOOP_FROM = 256


def _batch_sequentially(fn, *, gpu_loop_from: int | None = None):
  """Wraps a one-matrix decomposition so that ``vmap`` of it loops where that is faster.

  On CPU: jaxlib 0.10's CPU LAPACK kernels split a batched call into chunks on
  XLA's intra-op thread pool and block until the chunks finish. When as many
  batched calls run at once as the pool has threads (two on a two-core machine
  — which independent per-shape refreshes easily reach) every pool thread
  waits and the program deadlocks. Under ``vmap`` this wrapper lowers on CPU to
  one-matrix LAPACK calls, which run inline: a ``lax.map`` over the batch with
  ``_CPU_CALLS_AT_ONCE`` independent calls per iteration.

  On NVIDIA GPUs (``cuda``), with ``gpu_loop_from`` set, a stack of matrices
  whose smaller side is at least ``gpu_loop_from`` goes through a ``lax.map``
  of one-matrix calls as well (faster there for QR, see ``_GPU_QR_LOOP_FROM``);
  otherwise, and on every other platform, the ordinary batched routine.
  """

  @jax.custom_batching.custom_vmap
  def wrapped(x):
    return fn(x)

  @wrapped.def_vmap
  def _rule(axis_size, in_batched, x):
    del axis_size
    if not in_batched[0]:
      out = wrapped(x)
      return out, jax.tree.map(lambda _: False, out)
    branches = {"cpu": lambda y: _in_chunks_on_cpu(wrapped, y), "default": jax.vmap(fn)}
    if gpu_loop_from is not None and min(x.shape[-2:]) >= gpu_loop_from:
      branches["cuda"] = lambda y: jax.lax.map(wrapped, y)
    out = jax.lax.platform_dependent(x, **branches)
    return out, jax.tree.map(lambda _: True, out)

  return wrapped


# eigh_descending symmetrizes its input itself: eigh's own symmetrization
# would be a second pass (and a second compiled kernel) per call.
_eigh_primal = _batch_sequentially(functools.partial(jnp.linalg.eigh, symmetrize_input=False))
_qr_primal = _batch_sequentially(jnp.linalg.qr, gpu_loop_from=_GPU_QR_LOOP_FROM)
_upper_inverse = _batch_sequentially(
    lambda r: jax.scipy.linalg.solve_triangular(r, jnp.eye(r.shape[-1], dtype=r.dtype)))


# The sequential wrapper (a custom_vmap) has no differentiation rule of its
# own, so reverse mode could not pass it. These custom_jvp rules compute the
# tangents from the decomposition's outputs with matmuls only (the formulas
# of JAX's own eigh and qr rules), which reverse mode can transpose; the
# decompositions themselves still go through the wrapper.
#
# Unlike JAX's rules they stay finite where the derivative does not exist:
# optimizer factors are often rank deficient (a zero gradient, fewer samples
# than rows), with repeated (zero) eigenvalues and singular QR inputs. There
# the rotation inside a repeated eigenspace, or the component along a
# vanishing pivot, gets a zero tangent (the derivative of any quantity that
# does not depend on that arbitrary choice); elsewhere they are JAX's rules.


def _tiny(values: jax.Array) -> jax.Array:
  """The magnitude below which eigenvalue gaps or pivots count as zero."""
  return values.shape[-1] * jnp.finfo(values.dtype).eps * jnp.max(jnp.abs(values))


@jax.custom_jvp
def _eigh(s: jax.Array) -> tuple[jax.Array, jax.Array]:
  w, v = _eigh_primal(s)
  return w, v


@_eigh.defjvp
def _eigh_jvp(primals, tangents):
  (s,), (ds,) = primals, tangents
  w, v = _eigh_primal(s)
  vt_ds_v = jnp.matmul(v.T, jnp.matmul(ds, v, precision=HIGHEST), precision=HIGHEST)
  diff = w[None, :] - w[:, None]
  apart = jnp.abs(diff) > _tiny(w)
  gaps = jnp.where(apart, 1.0 / jnp.where(apart, diff, 1.0), 0.0)
  return (w, v), (jnp.diagonal(vt_ds_v), jnp.matmul(v, gaps * vt_ds_v, precision=HIGHEST))


@jax.custom_jvp
def _qr_orthonormal(x: jax.Array) -> jax.Array:
  q, _ = _qr_primal(x)
  return q


@_qr_orthonormal.defjvp
def _qr_orthonormal_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  q, r = _qr_primal(x)
  # A vanishing pivot becomes an infinite one: that component of R⁻¹ is zero.
  d = jnp.diagonal(r)
  r = r + jnp.diag(jnp.where(jnp.abs(d) > _tiny(d), 0.0, jnp.inf))
  dx_rinv = jnp.matmul(dx, _upper_inverse(r), precision=HIGHEST)
  qt_dx_rinv = jnp.matmul(q.T, dx_rinv, precision=HIGHEST)
  lower = jnp.tril(qt_dx_rinv, -1)
  return q, jnp.matmul(q, lower - lower.T - qt_dx_rinv, precision=HIGHEST) + dx_rinv


_DECOMPOSITIONS: contextvars.ContextVar[list | None] = contextvars.ContextVar(
    "kl_optax_decompositions", default=None)


@contextlib.contextmanager
def shared_decompositions() -> Iterator[None]:
  """Inside the block, [`eigh_descending`][kl_optax.kron.eigh_descending] of one array object is computed once.

  Two parts that decompose the same traced factor (an eigenvalue start and a
  basis on the initialization step) then share one decomposition, instead of
  compiling and running two. The cache holds the arrays themselves (compared
  with ``is``) and ends with the block.

  Examples:
    >>> import jax.numpy as jnp
    >>> from kl_optax import kron
    >>> s = jnp.diag(jnp.array([1.0, 3.0]))
    >>> with kron.shared_decompositions():
    ...   a = kron.eigh_descending(s)
    ...   b = kron.eigh_descending(s)
    >>> a is b, [float(w) for w in a[0]]
    (True, [3.0, 1.0])
  """
  token = _DECOMPOSITIONS.set([])
  try:
    yield
  finally:
    _DECOMPOSITIONS.reset(token)


def eigh_descending(s: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Eigendecomposition of a symmetric matrix, eigenvalues in descending order.

  The matrix is symmetrized and decomposed in float32 (or wider, if given).
  Inside [`shared_decompositions`][kl_optax.kron.shared_decompositions] a second call on the same array
  returns the first call's result.

  Returns:
    ``(eigenvalues, eigenvectors)`` with ``eigenvectors[:, i]`` belonging to
    ``eigenvalues[i]`` and ``eigenvalues[0]`` the largest.
  """
  memo = _DECOMPOSITIONS.get()
  for x, out in memo or ():
    if x is s:
      return out
  dtype = jnp.promote_types(s.dtype, jnp.float32)
  x = s.astype(dtype)
  w, v = _eigh(0.5 * (x + x.T))
  out = (w[::-1], v[:, ::-1])
  if memo is not None:
    memo.append((s, out))
  return out


def qr_orthonormal(x: jax.Array) -> jax.Array:
  """The orthonormal factor ``Q`` of ``x = QR``, computed in float32 (or wider)."""
  return _qr_orthonormal(x.astype(jnp.promote_types(x.dtype, jnp.float32)))


def qr_power_step(s: jax.Array, q: jax.Array) -> jax.Array:
  """One warm-started power step: the orthonormal factor of ``qr(S @ Q)``.

  Runs in float32 (or wider). Column signs are not normalized: a sign flip of a
  basis vector changes nothing an optimizer computes from the basis.
  """
  dtype = jnp.promote_types(s.dtype, jnp.float32)
  power = jnp.matmul(s.astype(dtype), q.astype(dtype), precision=HIGHEST)
  return _qr_orthonormal(power)
