"""XLA's FLOP count of one update against the analytic count (docs/benchmarks.md, "FLOPs per update").

XLA's cost analysis of a compiled update counts the larger branch of every
conditional, so the count of a recipe's update includes its refresh branch (the
power step ``S_k Q_k``; the QR itself is a LAPACK call XLA does not count). The
non-refresh update is counted on the same parts without the refresh part.
"""

from __future__ import annotations

import pytest

import kl_optax as P
from kl_optax.benchmarks import flops

_xla_flops = flops.xla_flops  # compiled only: nothing runs


def kl_shampoo_update_flops(m: int, n: int) -> int:
  """Direction ``Pᵀ(P(M) ⊘ D)`` 4(m²n + mn²); statistics 4(m²n + mn²) + 2·min(m, n)·mn."""
  return 8 * (m * m * n + m * n * n) + 2 * min(m, n) * m * n


def soap_update_flops(m: int, n: int) -> int:
  """``P(G)`` and ``Pᵀ(update)`` 4(m²n + mn²); factors ``GGᵀ``, ``GᵀG`` 2(m²n + mn²)."""
  return 6 * (m * m * n + m * n * n)


def power_step_flops(m: int, n: int) -> int:
  """``S_k Q_k`` for both factors (a refresh; its QR is not counted)."""
  return 2 * (m ** 3 + n ** 3)


SHAPES = [(64, 256), (256, 64), (96, 96)]


@pytest.mark.parametrize("shape", SHAPES)
def test_kl_shampoo_update_reaches_the_analytic_count(shape):
  m, n = shape
  update = _xla_flops(P.kron_transform(P.momentum(0.9), P.whiten(1e-8), P.kl_statistics(0.98)),
                      shape)
  analytic = kl_shampoo_update_flops(m, n)
  # Elementwise work (momentum, the division by D, the λ averages) is O(mn): a few % here.
  assert analytic <= update <= 1.05 * analytic, (update, analytic)
  full = _xla_flops(P.scale_by_kl_shampoo(), shape)
  assert full - update == pytest.approx(power_step_flops(m, n), rel=0.05)


@pytest.mark.parametrize("shape", SHAPES)
def test_soap_update_reaches_the_analytic_count(shape):
  m, n = shape
  update = _xla_flops(P.kron_transform(
      P.adam_in_eigenbasis(0.95, 0.95, 1e-8, bias_correction=True),
      P.shampoo_factor_update(0.95)), shape)
  analytic = soap_update_flops(m, n)
  assert analytic <= update <= 1.05 * analytic, (update, analytic)


# ----------------------------------------------------------------------------
# Every recipe against kl_optax.benchmarks.flops, at GPT-2-small matrix shapes
# ----------------------------------------------------------------------------

RECIPE_SHAPES = [(768, 768), (768, 3072), (3072, 768), (64, 96, 128)]


@pytest.mark.parametrize("name", flops.RECIPES)
def test_every_recipe_reaches_its_analytic_count(name):
  for shape in RECIPE_SHAPES:
    if name == "pro_kl_shampoo" and len(shape) != 2:
      continue  # a 3-tensor takes Pro-KLShampoo's dense (KL-Shampoo) path
    r = flops.measure(name, shape)
    # Matrices: the products as written, plus O(size) elementwise work. 3-tensors:
    # XLA also shares a mode product two of the A_k have in common (KL recipes).
    low, high = (1.0, 1.05) if len(shape) == 2 else (0.9, 1.2)
    assert low * r["analytic"] <= r["xla"] <= high * r["analytic"], r
    # The refresh branch (XLA counts the larger branch of the conditional) adds its
    # products and O(d²) elementwise work per mode.
    rel = 0.05 if len(shape) == 2 else 0.1
    assert r["xla_refresh"] == pytest.approx(r["analytic_refresh"], rel=rel), r
