"""Checks of hyperparameters at construction time.

Only concrete values are checked: a traced value (a hyperparameter injected
with ``optax.inject_hyperparams`` and read under ``jit``) passes through.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

__all__ = ["check_range"]


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
