"""Checks of options and hyperparameters, in one place.

[`check_range`][kl_optax.validation.check_range] checks numeric hyperparameters; only concrete values are
checked: a traced value (a hyperparameter injected with
``optax.inject_hyperparams`` and read under ``jit``) passes through.
[`static_int`][kl_optax.validation.static_int] is the one check of integer options that decide shapes or
loop counts; [`check_blocking`][kl_optax.validation.check_blocking] and [`storage_dtype`][kl_optax.validation.storage_dtype] check the
layout options. Imports nothing from the package.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["check_blocking", "check_range", "static_int", "storage_dtype"]


def _concrete(value: Any) -> float | None:
  if value is None or callable(value) or isinstance(value, jax.core.Tracer):
    return None
  try:
    arr = np.asarray(value)
  except Exception:  # pylint: disable=broad-except
    return None
  if arr.ndim != 0 or not np.issubdtype(arr.dtype, np.number):
    return None
  return float(arr)


def check_range(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = True,
) -> None:
  """Raises ``ValueError`` naming ``name`` if a concrete ``value`` is outside the range.

  The range is ``[low, high)`` by default; ``low_open`` / ``high_open`` choose
  open or closed ends, and ``None`` leaves an end unbounded. Non-finite values
  are always rejected.
  """
  v = _concrete(value)
  if v is None:
    return
  ok = np.isfinite(v)
  if low is not None:
    ok = ok and (v > low if low_open else v >= low)
  if high is not None:
    ok = ok and (v < high if high_open else v <= high)
  if not ok:
    lo = "-inf" if low is None else f"{low:g}"
    hi = "inf" if high is None else f"{high:g}"
    interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
    raise ValueError(f"{name} must be in {interval}, got {value!r}.")


def static_int(
    value: Any,
    name: str,
    *,
    default: int | None = None,
    minimum: int = 1,
    traced_ok: bool = False,
) -> int | None:
  """``value`` as a Python int, for arguments that decide shapes or loop counts.

  The one check of every static integer option (``rank``, ``block_size``,
  ``max_precond_dim``, ``refresh_max_iters``, ``ns_steps``, …).

  Args:
    value: the argument (``None`` gives ``default``).
    name: named in error messages.
    default: returned for ``None``.
    minimum: the smallest value allowed.
    traced_ok: return ``None`` for a traced value instead of raising.

  Raises:
    TypeError: ``value`` is traced (for example an argument turned into state
      by ``optax.inject_hyperparams``) and ``traced_ok`` is false.
    ValueError: ``value`` is not a whole number ≥ ``minimum``.
  """
  if value is None:
    return default
  if isinstance(value, jax.core.Tracer):
    if traced_ok:
      return None
    raise TypeError(
        f"{name} decides shapes or loop counts and must be a static Python int, got a "
        f"traced value. With optax.inject_hyperparams, list {name!r} in static_args.")
  try:
    number = float(value)
  except (TypeError, ValueError):
    number = None
  if isinstance(value, bool) or number is None or number != int(number) or number < minimum:
    raise ValueError(f"{name} must be an integer ≥ {minimum}, got {value!r}.")
  return int(number)


def check_blocking(
    block_size: Any, max_precond_dim: Any
) -> tuple[int | None, int | None]:
  """Validates the static blocking options; returns them as Python ints (or ``None``).

  Raises:
    TypeError: an option is traced.
    ValueError: an option is not a positive integer, or ``block_size``
      exceeds ``max_precond_dim``.
  """
  block_size = static_int(block_size, "block_size")
  max_precond_dim = static_int(max_precond_dim, "max_precond_dim")
  if block_size is not None and max_precond_dim is not None and block_size > max_precond_dim:
    raise ValueError(
        f"block_size ({block_size}) must not exceed max_precond_dim "
        f"({max_precond_dim}): blocks are cut from dims larger than max_precond_dim.")
  return block_size, max_precond_dim


def storage_dtype(state_dtype: Any) -> jnp.dtype:
  """The storage dtype of Kronecker state (``None``: float32); raises if not floating."""
  dtype = jnp.dtype(jnp.float32 if state_dtype is None else state_dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"state_dtype must be a floating dtype, got {dtype}.")
  return dtype
