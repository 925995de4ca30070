"""Un-jitted updates: the first call, the calls after it, and equality with the jitted update.

Usage:

    python -m kl_optax.benchmarks.eager_update

Debugging sessions, notebooks and unit tests often call ``tx.update`` without
``jax.jit``. For each optimizer this runs the same sequence of gradients
through the un-jitted and the jitted ``update`` on a small tree (a 64×32
matrix, a 4×8×8 tensor and a bias by default) and reports:

* the first un-jitted call, which compiles each shape group's internal step;
* the median of the un-jitted calls after it (each a real step of the run);
* the median of the jitted calls after the first (which compiles);
* the largest difference between the un-jitted and the jitted updates;
* the un-jitted median as a ratio to ``optax.adamw``'s, measured in the same run.

Training loops should still ``jit`` their whole step (forward, backward and
update), which is what every example does.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import kl_optax
from kl_optax.benchmarks import harness

__all__ = ["OPTIMIZERS", "main", "measure", "small_tree"]

# Every recipe with its defaults, except Pro-KLShampoo at rank 8, so that the
# 64×32 matrix gets a spike-and-flat factor (the default rank 128 exceeds it).
OPTIMIZERS = {"adamw": lambda lr: optax.adamw(lr, weight_decay=0.01),
              **{name: spec.constructor for name, spec in kl_optax.RECIPES.items()},
              "pro_kl_shampoo": lambda lr: kl_optax.pro_kl_shampoo(lr, rank=8)}


def small_tree(m: int = 64, n: int = 32) -> dict:
  """An ``(m, n)`` matrix, a ``(4, 8, 8)`` tensor and an ``(n,)`` bias."""
  rng = np.random.default_rng(0)
  return {"w": jnp.asarray(rng.normal(size=(m, n)), jnp.float32),
          "t": jnp.asarray(rng.normal(size=(4, 8, 8)), jnp.float32),
          "b": jnp.zeros((n,), jnp.float32)}


def _grads(params, t: int):
  return jax.tree.map(lambda p: jnp.cos(p + t) + 0.1 * t, params)


def _timed_run(update, tx, params, calls: int):
  """``(seconds per call, updates per call)`` over ``calls + 1`` steps from a fresh state."""
  state = tx.init(params)
  seconds, outputs = [], []
  for t in range(calls + 1):
    grads = jax.block_until_ready(_grads(params, t))
    t0 = time.perf_counter()
    updates, state = update(grads, state, params)
    jax.block_until_ready((updates, state))
    seconds.append(time.perf_counter() - t0)
    outputs.append(updates)
  return seconds, outputs


def measure(name: str, params, calls: int = 20, learning_rate: float = 1e-2) -> dict:
  """The un-jitted and jitted timings of optimizer ``name`` on ``params``."""
  tx = OPTIMIZERS[name](learning_rate)
  eager_s, eager_u = _timed_run(tx.update, tx, params, calls)
  jit_s, jit_u = _timed_run(jax.jit(tx.update), tx, params, calls)
  diff = max(float(jnp.max(jnp.abs(a - b)))
             for ue, uj in zip(eager_u, jit_u)
             for a, b in zip(jax.tree.leaves(ue), jax.tree.leaves(uj)))
  return {"name": name, "first_s": eager_s[0], "eager_ms": 1e3 * statistics.median(eager_s[1:]),
          "jit_ms": 1e3 * statistics.median(jit_s[1:]), "max_abs_diff": diff, "calls": calls}


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                 help="comma-separated names; adamw is always measured (the ratios' base)")
  p.add_argument("--calls", type=int, default=20, help="timed calls after the first")
  p.add_argument("--shape", default="64x32", help="the matrix leaf, MxN")
  p.add_argument("--out", default="runs/eager_update", help="folder for results.json and results.md")
  args = p.parse_args(argv)
  names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
  for n in names:
    if n not in OPTIMIZERS:
      raise SystemExit(f"unknown optimizer {n!r}; known: {', '.join(OPTIMIZERS)}")
  names = ["adamw"] + [n for n in names if n != "adamw"]
  m, n = (int(d) for d in args.shape.split("x"))
  params = small_tree(m, n)
  rows = [measure(name, params, args.calls) for name in names]
  base = rows[0]["eager_ms"]
  for r in rows:
    r["eager_vs_adamw"] = r["eager_ms"] / base
  device = jax.devices()[0]
  header = (f"device: {device.device_kind} ({platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPU cores); JAX {jax.__version__}; tree: {m}×{n} matrix, "
            f"4×8×8 tensor, ({n},) bias; median of {args.calls} calls after the first")
  lines = [header, "",
           "| optimizer | first call (s) | later calls (ms) | × AdamW | jitted (ms) "
           "| max difference |",
           "|---|---|---|---|---|---|"]
  lines += [f"| {r['name']} | {r['first_s']:.2f} | {r['eager_ms']:.1f} | {r['eager_vs_adamw']:.1f} "
            f"| {r['jit_ms']:.2f} | {r['max_abs_diff']:.1e} |" for r in rows]
  harness.write_report(args.out, "kl_optax.benchmarks.eager_update", argv, rows, lines)
  return rows


if __name__ == "__main__":
  main()
