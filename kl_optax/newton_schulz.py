r"""Newton–Schulz orthogonalization (``docs/math.md``, "Newton–Schulz orthogonalization").

``NS(X) ≈ polar(X) = U_X V_Xᵀ`` for ``X = U_X Σ V_Xᵀ``: an odd matrix polynomial
iterated on ``X / ‖X‖_F`` pushes every singular value towards one. Each step
is ``A = X Xᵀ; X ← a X + (b A + c A²) X`` on the wide orientation of ``X``
(``X Xᵀ`` is then the smaller Gram matrix).

Three forms:

* [`newton_schulz_orthogonalize`][kl_optax.newton_schulz.newton_schulz_orthogonalize] — the array function (one matrix; use
  ``jax.vmap`` for a stack);
* [`orthogonalize`][kl_optax.newton_schulz.orthogonalize] — a [`Part`][kl_optax.state.Part] replacing the running
  update of a Kronecker optimizer by its orthogonalization;
* [`scale_by_newton_schulz`][kl_optax.newton_schulz.scale_by_newton_schulz] — a stand-alone optax transformation (the
  direction of Muon, without its momentum and scaling).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import optax

from kl_optax import kron
from kl_optax import validation
from kl_optax.state import Part, TensorStep
from kl_optax.trees import check_floating, leaf_path, squeezed_shape

__all__ = [
    "EXACT_COEFFICIENTS",
    "MUON_COEFFICIENTS",
    "newton_schulz_coefficients",
    "newton_schulz_orthogonalize",
    "orthogonalize",
    "scale_by_newton_schulz",
]

MUON_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
"""Muon's quintic: fast, maps singular values into roughly [0.7, 1.2], not to 1."""
EXACT_COEFFICIENTS = (3.0, -16.0 / 5.0, 6.0 / 5.0)
"""A quintic with fixed point 1 (``a + b + c = 1``, ``|p'(1)| = 0.6``): every singular value in
(0, 1] converges to one, at the price of more steps."""

_PRESETS = {"muon": MUON_COEFFICIENTS, "exact": EXACT_COEFFICIENTS}


def newton_schulz_coefficients(coefficients: str | tuple[float, float, float], steps: int) -> list[tuple[float, float, float]]:
  """The ``(a, b, c)`` of every step.

  Args:
    coefficients: ``"muon"``, ``"exact"``, one ``(a, b, c)`` triple used at
      every step, or a sequence of ``steps`` triples (a per-step schedule).
    steps: the number of iterations.

  Raises:
    ValueError: an unknown preset, a malformed triple or a schedule whose
      length is not ``steps``.
  """
  if validation.static_int(steps, "ns_steps", traced_ok=True) is None:
    triple = _single_triple(coefficients)
    if triple is None:
      raise TypeError(
          "ns_steps is traced (for example by optax.inject_hyperparams), which "
          "needs one (a, b, c) triple for every step; a per-step schedule needs "
          "ns_steps in static_args.")
    return [triple]
  steps = validation.static_int(steps, "ns_steps", traced_ok=True)
  if isinstance(coefficients, str):
    if coefficients not in _PRESETS:
      raise ValueError(
          f"ns_coefficients: unknown preset {coefficients!r}; use one of "
          f"{sorted(_PRESETS)} or an (a, b, c) triple.")
    return [_PRESETS[coefficients]] * steps
  coefficients = tuple(coefficients)
  if len(coefficients) == 3 and all(isinstance(c, (int, float)) for c in coefficients):
    return [tuple(float(c) for c in coefficients)] * steps
  schedule = [tuple(float(c) for c in triple) for triple in coefficients]
  if len(schedule) != steps or any(len(t) != 3 for t in schedule):
    raise ValueError(
        f"ns_coefficients: a per-step schedule needs {steps} (a, b, c) triples, "
        f"got {len(schedule)} entries.")
  return schedule


def _single_triple(coefficients: str | tuple[float, float, float]) -> tuple[float, float, float] | None:
  if isinstance(coefficients, str):
    return _PRESETS.get(coefficients)
  coefficients = tuple(coefficients)
  if len(coefficients) == 3 and all(isinstance(c, (int, float)) for c in coefficients):
    return tuple(float(c) for c in coefficients)
  return None


def newton_schulz_orthogonalize(
    x: jax.Array,
    *,
    steps: int = 5,
    coefficients: str | tuple[float, float, float] = "muon",
    dtype: jax.typing.DTypeLike | None = None,
    eps: float = 1e-7,
) -> jax.Array:
  r"""Approximates the orthogonal polar factor of a matrix.

  ``X ← X / (‖X‖_F + eps)``; on the wide orientation (``X`` is transposed
  when it has more rows than columns) ``steps`` iterations
  ``A = X Xᵀ; X ← a X + (b A + c A²) X`` run; the result has ``x``'s shape and
  dtype. A zero matrix stays zero.

  Args:
    x: a 2-D array.
    steps: number of iterations (may be traced when ``coefficients`` is one
      triple or a preset).
    coefficients: ``"muon"`` ([`MUON_COEFFICIENTS`][kl_optax.newton_schulz.MUON_COEFFICIENTS]), ``"exact"``
      ([`EXACT_COEFFICIENTS`][kl_optax.newton_schulz.EXACT_COEFFICIENTS]), an ``(a, b, c)`` triple or a per-step
      schedule of ``steps`` triples.
    dtype: iteration dtype (``None``: float32, or ``x``'s dtype if wider).
      ``"bfloat16"`` is faster on accelerators and good enough for Muon's
      coefficients.
    eps: added to the Frobenius norm before dividing.

  Returns:
    ``NS(x)``, of ``x``'s shape and dtype.

  Examples:
    >>> import jax, jax.numpy as jnp, kl_optax
    >>> x = jax.random.normal(jax.random.key(0), (4, 16))
    >>> q = kl_optax.newton_schulz_orthogonalize(x, steps=25, coefficients="exact")
    >>> bool(jnp.allclose(q @ q.T, jnp.eye(4), atol=1e-3))
    True
  """
  if x.ndim != 2:
    raise ValueError(f"newton_schulz_orthogonalize expects a matrix, got shape {x.shape}.")
  schedule = newton_schulz_coefficients(coefficients, steps)
  work = jnp.dtype(jnp.promote_types(x.dtype, jnp.float32) if dtype is None else dtype)
  precision = kron.HIGHEST if jnp.finfo(work).bits >= 32 else None
  tall = x.shape[0] > x.shape[1]
  y = (x.T if tall else x).astype(jnp.float32)
  y = (y / (jnp.linalg.norm(y) + eps)).astype(work)

  def iterate(y, a, b, c):
    gram = jnp.matmul(y, y.T, precision=precision)
    poly = b * gram + c * jnp.matmul(gram, gram, precision=precision)
    return a * y + jnp.matmul(poly, y, precision=precision)

  if validation.static_int(steps, "ns_steps", traced_ok=True) is None:  # a traced count: one triple, a loop
    a, b, c = schedule[0]
    y = jax.lax.fori_loop(0, steps, lambda _, y: iterate(y, a, b, c), y)
  else:
    for a, b, c in schedule:
      y = iterate(y, a, b, c)
  y = y.T if tall else y
  return y.astype(x.dtype)


def _as_matrix(x: jax.Array) -> jax.Array:
  """Squeezes size-1 dims and unfolds what remains along its first mode."""
  sq = squeezed_shape(x.shape)
  return x.reshape(sq[0], -1)


def orthogonalize(
    steps: int = 5,
    coefficients: str | tuple[float, float, float] = "muon",
    *,
    dtype: jax.typing.DTypeLike | None = None,
) -> Part:
  """A part replacing the running update by ``NS(update)``.

  Tensors of order above two are orthogonalized as their mode-1 unfolding.

  Args:
    steps: Newton–Schulz iterations.
    coefficients: see [`newton_schulz_orthogonalize`][kl_optax.newton_schulz.newton_schulz_orthogonalize].
    dtype: iteration dtype.

  Returns:
    A [`Part`][kl_optax.state.Part] without state.
  """
  newton_schulz_coefficients(coefficients, steps)  # validate now

  def update(step: TensorStep) -> TensorStep:
    u = step.update
    out = newton_schulz_orthogonalize(
        u.reshape(u.shape[0], -1), steps=steps, coefficients=coefficients, dtype=dtype)
    return step._replace(update=out.reshape(u.shape))

  return Part(update=update, name="orthogonalize")


def scale_by_newton_schulz(
    steps: int = 5,
    coefficients: str | tuple[float, float, float] = "muon",
    *,
    dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformation:
  """Replaces every update leaf by its Newton–Schulz orthogonalization.

  Size-1 dims are squeezed; a leaf of higher order is orthogonalized as its
  mode-1 unfolding (``d_1 × rest``). The transformation is stateless: chain
  it after ``optax.trace`` for Muon's momentum, and route vectors and scalars
  elsewhere with ``optax.partition``.

  Args:
    steps: Newton–Schulz iterations.
    coefficients: see [`newton_schulz_orthogonalize`][kl_optax.newton_schulz.newton_schulz_orthogonalize].
    dtype: iteration dtype.

  Returns:
    An ``optax.GradientTransformation``.

  Raises:
    ValueError: at ``update``, for a leaf with fewer than two dims larger than
      one (the message names the leaf).

  Examples:
    >>> import jax.numpy as jnp, optax, kl_optax
    >>> tx = optax.chain(optax.trace(0.95), kl_optax.scale_by_newton_schulz())
    >>> params = {'w': jnp.ones((3, 5))}
    >>> updates, _ = tx.update(params, tx.init(params))
    >>> updates['w'].shape
    (3, 5)
  """
  newton_schulz_coefficients(coefficients, steps)

  def update_fn(updates, state, params=None):
    del params

    def one(path, u):
      check_floating(path, u, "scale_by_newton_schulz")
      if len(squeezed_shape(u.shape)) < 2:
        raise ValueError(
            f"scale_by_newton_schulz: leaf {leaf_path(path)} has shape {u.shape}; "
            "only tensors with at least two dims larger than one can be "
            "orthogonalized. Route the others elsewhere with optax.partition.")
      out = newton_schulz_orthogonalize(
          _as_matrix(u), steps=steps, coefficients=coefficients, dtype=dtype)
      return out.reshape(u.shape)

    return jax.tree_util.tree_map_with_path(one, updates), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)
