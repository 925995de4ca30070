"""Analytic FLOP counts of one update, per recipe (docs/benchmarks.md, "FLOPs per update").

FLOPs are 2 × multiply-adds of the matrix products; elementwise work (momentum,
divisions, the eigenvalue averages: ``O(size)`` per tensor) is left out, and so are
the LAPACK calls (QR, eigh), which XLA's cost analysis does not count either.

For a tensor with ``N`` entries and mode sizes ``d_1 … d_K`` (``D = Σ d_k``), one
mode product with a ``d_k × d_k`` matrix costs ``2 N d_k``, so

* a projection into the eigenbasis, ``P(x) = x ×_k Q_kᵀ`` over every mode, or back,
  costs ``2ND``; so do the Gram matrices ``G_(k) G_(k)ᵀ`` of every mode;
* KL-Shampoo's factor increments need ``A_k = G ×_{j≠k} Q_jᵀ`` (``2N(D − d_k)``) and
  their Gram matrices: ``2NKD`` for all modes.

A refresh adds, per mode, the power step ``S_k Q_k`` (``2 d_k³``) before its QR;
KL-SOAP and SOAP also rotate their eigenbasis moment (``Pᵀ`` then ``P``: ``4ND``);
Shampoo recomputes its inverse roots (``2 d_k³``) after its eigh.

``python -m kl_optax.benchmarks.flops`` compiles every recipe's update for one
tensor of each shape (nothing runs) and prints XLA's count beside these.

Examples:
  >>> from kl_optax.benchmarks import flops
  >>> round(flops.ordinary("kl_shampoo", (768, 3072)) / 1e9, 1)  # 8(m²n + mn²) + 2·min·mn
  76.1
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence

__all__ = ["RECIPES", "main", "measure", "ordinary", "ordinary_transform", "refresh", "xla_flops"]

RECIPES = ("kl_shampoo", "kl_soap", "soap", "shampoo", "eshampoo", "pro_kl_shampoo")


def _nd(shape: Sequence[int]) -> tuple[int, int]:
  return math.prod(shape), sum(shape)


def _newton_schulz(m: int, n: int, steps: int) -> int:
  """``steps`` iterations ``A = XXᵀ; X ← aX + (bA + cA²)X`` on the short side."""
  short, long = min(m, n), max(m, n)
  return steps * (4 * short * short * long + 2 * short ** 3)


def _pro(shape: Sequence[int], rank: int, ns_steps: int) -> int:
  """Pro-KLShampoo's spike-and-flat path on an ``m × n`` working matrix.

  The restricted (spike-and-flat) side is the larger one, ``n``; ``m`` is the
  dense side with its basis ``Q_a``.
  """
  m, n = sorted(shape)
  mnr, mmr, mmn = 2 * m * n * rank, 2 * m * m * rank, 2 * m * m * n
  # G Gᵀ, Q_aᵀ G; G U, Q_aᵀ G U, Wᵀ(W U); Z Zᵀ and Z diag(λ)⁻¹ Zᵀ.
  statistics = 2 * mmn + 3 * mnr + 2 * mmr
  # X U, (XU) Uᵀ, back through Uᵀ, the complement's projection out of U (two);
  # Q_aᵀ C and Q_a(·); Newton–Schulz on the complement.
  direction = 5 * mnr + 2 * mmr + _newton_schulz(m, n, ns_steps)
  return statistics + direction


def ordinary(name: str, shape: Sequence[int], *, rank: int = 128, ns_steps: int = 5) -> int:
  """FLOPs of one update without a refresh, for one tensor of ``shape``.

  Args:
    name: one of ``RECIPES``.
    shape: the preconditioned tensor's mode sizes (a matrix for ``pro_kl_shampoo``,
      whose spike-and-flat path is counted; ``rank`` below the larger dim).
    rank: Pro-KLShampoo's rank.
    ns_steps: Pro-KLShampoo's Newton–Schulz steps.
  """
  n, d = _nd(shape)
  k = len(shape)
  if name == "kl_shampoo":
    # P(M) and back; A_k and their Gram matrices; P(G) from A_k of the smallest mode.
    return 4 * n * d + 2 * n * k * d + 2 * n * min(shape)
  if name == "kl_soap":
    # P(G) (shared by Adam and the eigenvalue estimates) and back; A_k and Grams.
    return 4 * n * d + 2 * n * k * d
  if name == "soap":
    return 6 * n * d  # P(G), back, Gram matrices
  if name == "shampoo":
    return 4 * n * d  # G ×_k R_k with the cached inverse roots R_k, Gram matrices
  if name == "eshampoo":
    return 8 * n * d  # P(G) for the second moment, P(M) and back, Gram matrices
  if name == "pro_kl_shampoo":
    if len(shape) != 2:
      raise ValueError(f"pro_kl_shampoo's spike-and-flat path takes a matrix, got {shape}.")
    return _pro(shape, rank, ns_steps)
  raise ValueError(f"name must be one of {RECIPES}, got {name!r}.")


def refresh(name: str, shape: Sequence[int], *, qr_iterations: int = 1) -> int:
  """FLOPs a refresh step adds to an ordinary one (QR and eigh not counted).

  Args:
    name: one of ``RECIPES``.
    shape: the preconditioned tensor's mode sizes.
    qr_iterations: EShampoo's adaptive QR iterations on ``B = QᵀSQ`` (XLA's
      cost analysis counts one pass of a loop body).
  """
  n, d = _nd(shape)
  cubes = 2 * sum(dk ** 3 for dk in shape)
  if name == "kl_shampoo":
    return cubes  # power step S_k Q_k
  if name in ("kl_soap", "soap"):
    # power step (SOAP's sorting reads diag(QᵀSQ) from the same S_k Q_k); the
    # eigenbasis first moment rotated to the new basis.
    return cubes + 4 * n * d
  if name == "shampoo":
    return cubes  # the inverse roots Q_k diag(·) Q_kᵀ after eigh
  if name == "eshampoo":
    # B = Qᵀ(SQ), then per iteration Q Q_i and Q_iᵀ B Q_i.
    return 2 * cubes + qr_iterations * 3 * cubes
  if name == "pro_kl_shampoo":
    return 2 * min(shape) ** 3  # the dense side's power step; U's QR is LAPACK
  raise ValueError(f"name must be one of {RECIPES}, got {name!r}.")


def xla_flops(tx, shape: Sequence[int]) -> float:
  """XLA's FLOP count of ``tx.update`` for one float32 leaf of ``shape`` (compiled, not run)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  params = {"w": jax.ShapeDtypeStruct(tuple(shape), jnp.float32)}
  state = jax.eval_shape(tx.init, params)
  cost = jax.jit(tx.update).lower(params, state, params).compile().cost_analysis()
  return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def ordinary_transform(name: str, rank: int | None = 128, **options):
  """The recipe's parts without its refresh part (XLA counts a conditional's larger branch).

  ``options`` go to ``kron_transform`` (``compute_dtype``, ``matmul_precision``).
  """
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  import kl_optax as P  # pylint: disable=import-outside-toplevel

  roots = P.Part(update=lambda step: step, name="inverse roots", init_slots=lambda shape: {
      f"inverse_root_{k}": jnp.zeros((d, d)) for k, d in enumerate(shape)})
  parts = {
      "kl_shampoo": (P.momentum(0.9), P.whiten(1e-8), P.kl_statistics(0.98)),
      "kl_soap": (P.adam_in_eigenbasis(0.9, 0.98, 1e-8),
                  P.kl_statistics(0.98, shared_products=False)),
      "soap": (P.adam_in_eigenbasis(0.95, 0.95, 1e-8, bias_correction=True),
               P.shampoo_factor_update(0.95)),
      "shampoo": (P.cached_inverse_root(), P.adam_grafting(0.99, 1e-8),
                  P.momentum(0.9, bias_correction=True), P.shampoo_factor_update(0.99), roots),
      "eshampoo": (P.momentum(0.9, bias_correction=True),
                   P.eigenvalue_corrected_whiten(0.95, 1e-8), P.shampoo_factor_update(0.95)),
      "pro_kl_shampoo": (P.momentum(0.9), P.spike_flat_whiten(1e-8),
                         P.spike_flat_projection(128 if rank is None else rank, 0.98, 10)),
  }[name]
  return P.kron_transform(*parts, **options)


def measure(name: str, shape: Sequence[int]) -> dict:
  """Analytic and XLA counts of one recipe's ordinary update and refresh for ``shape``."""
  import kl_optax as P  # pylint: disable=import-outside-toplevel

  update = xla_flops(ordinary_transform(name), shape)
  full = xla_flops(getattr(P, f"scale_by_{name}")(), shape)
  return {"name": name, "shape": tuple(shape), "analytic": ordinary(name, shape),
          "xla": update, "analytic_refresh": refresh(name, shape), "xla_refresh": full - update}


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description="Analytic and XLA FLOP counts of one update per recipe.")
  p.add_argument("--shapes", default="768x768,768x3072,3072x768,64x96x128")
  p.add_argument("--recipes", default=",".join(RECIPES))
  args = p.parse_args(argv)
  shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")]
  rows = []
  print("| recipe | shape | ordinary, analytic | XLA (×) | refresh adds, analytic | XLA (×) |")
  print("|---|---|---|---|---|---|")
  for name in args.recipes.split(","):
    for shape in shapes:
      if name == "pro_kl_shampoo" and len(shape) != 2:
        continue
      r = measure(name, shape)
      rows.append(r)
      print(f"| {name} | {'×'.join(map(str, shape))} | {r['analytic'] / 1e9:.2f} G | "
            f"{r['xla'] / 1e9:.2f} G ({r['xla'] / r['analytic']:.2f}) | "
            f"{r['analytic_refresh'] / 1e9:.2f} G | {r['xla_refresh'] / 1e9:.2f} G "
            f"({r['xla_refresh'] / r['analytic_refresh']:.2f}) |", flush=True)
  return rows


if __name__ == "__main__":
  main()
