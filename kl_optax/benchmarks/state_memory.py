"""Optimizer-state bytes per parameter, measured from ``init`` and compared with the formulas.

Usage:

    python -m kl_optax.benchmarks.state_memory

Nothing is trained: the state is built with ``jax.eval_shape`` of each
preconditioner's ``init`` on ``jax.ShapeDtypeStruct`` parameters (GPT-2-small
weight shapes by default), so the figures are exact and take no memory.
The formulas (float32, an m×n matrix, ``docs/math.md``, "Pro-KLShampoo"): KL-Shampoo keeps one
m×n momentum, ``S`` and ``Q`` per side and ``λ`` per side,
``mn + 2m² + 2n² + m + n`` floats; the SOAP-like recipes keep a second m×n
buffer; Pro-KLShampoo of rank r, restricting the larger side n, keeps
``mn + 2m² + nr (+ nr for the subspace accumulator) + m + r + 1``. Small int32 counters (the step and per-factor refresh counts) are
listed separately.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import kl_optax
from kl_optax.benchmarks.char_gpt import SQUARE_BUFFERS, TENSOR_BUFFERS, state_floats_kl_shampoo
from kl_optax.benchmarks.harness import state_bytes

__all__ = ["measure", "main", "state_floats_pro_kl_shampoo"]

PRECONDITIONERS = {
    "kl_shampoo": kl_optax.scale_by_kl_shampoo,
    "kl_soap": kl_optax.scale_by_kl_soap,
    "soap": kl_optax.scale_by_soap,
    "shampoo": kl_optax.scale_by_shampoo,
    "eshampoo": kl_optax.scale_by_eshampoo,
}


def state_floats_pro_kl_shampoo(m: int, n: int, rank: int, accumulate: bool = True) -> int:
  """Analytic Pro-KLShampoo state of an m×n matrix whose larger side is restricted to ``rank``."""
  m, n = min(m, n), max(m, n)
  if rank >= n:
    return state_floats_kl_shampoo(m, n)
  return m * n + 2 * m * m + (2 if accumulate else 1) * n * rank + m + rank + 1


def measure(name: str, shape: tuple[int, int], **kwargs) -> dict:
  """Bytes of the preconditioner state of one ``shape`` matrix, split into floats and counters."""
  factory = (kl_optax.scale_by_pro_kl_shampoo if name == "pro_kl_shampoo"
             else PRECONDITIONERS[name])
  state = jax.eval_shape(factory(**kwargs).init, {"w": jax.ShapeDtypeStruct(shape, jnp.float32)})
  leaves = jax.tree.leaves(state)
  floats = state_bytes([x for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)])
  counters = state_bytes([x for x in leaves if not jnp.issubdtype(x.dtype, jnp.floating)])
  m, n = shape
  if name == "pro_kl_shampoo":
    analytic = 4 * state_floats_pro_kl_shampoo(m, n, kwargs["rank"],
                                               kwargs.get("accumulate", True))
    label = f"pro_kl_shampoo (rank {kwargs['rank']})"
  else:
    analytic = 4 * state_floats_kl_shampoo(m, n, TENSOR_BUFFERS[name], SQUARE_BUFFERS.get(name, 2))
    label = name
  return {"name": label, "shape": shape, "float_bytes": floats, "counter_bytes": counters,
          "analytic_bytes": analytic, "per_param": floats / (m * n),
          "analytic_per_param": analytic / (m * n)}


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--shapes", default="768x768,768x3072,3072x768")
  p.add_argument("--recipes", default=",".join(PRECONDITIONERS))
  p.add_argument("--pro-ranks", default="32,64,128,256",
                 help="ranks of pro_kl_shampoo to measure ('' for none)")
  args = p.parse_args(argv)
  shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")]
  rows = [measure(r, s) for r in args.recipes.split(",") for s in shapes]
  ranks = [int(r) for r in args.pro_ranks.split(",") if r]
  rows += [measure("pro_kl_shampoo", s, rank=r) for r in ranks for s in shapes]
  print("| preconditioner | shape | measured bytes/param (float state) | analytic | int32 counters (bytes) |")
  print("|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['name']} | {r['shape'][0]}×{r['shape'][1]} | {r['per_param']:.3f} "
          f"| {r['analytic_per_param']:.3f} | {r['counter_bytes']} |")
  print("\nAdamW keeps 8 bytes per parameter (two float32 moments) for comparison.")
  return rows


if __name__ == "__main__":
  main()
