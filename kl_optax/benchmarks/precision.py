"""What cheaper compute costs in quality: bfloat16 products against float32 at HIGHEST.

Usage (19 minutes on a 2-core CPU shared with two other jobs):

    python -m kl_optax.benchmarks.precision --out runs/precision

For each optimizer, the same run (same initialization, same batches) is made
with ``Layout(compute_dtype=None)`` (float32 operands at ``precision=HIGHEST``)
and with ``Layout(compute_dtype=jnp.bfloat16)`` (bfloat16 operands, float32
accumulation), on the Kronecker regression for ``--steps`` steps and on the
suite's character GPT for ``--gpt-steps`` steps. Reported: the largest
relative deviation of the parameters from the float32 run
(``max |θ_bf16 − θ_f32| / max |θ_f32|``, over all leaves) at the end and at
its worst, the orthogonality of the bases at the end (``max ‖QᵀQ − I‖_F``),
and both validation losses.

A CPU has no bfloat16 matrix unit (the products are emulated), so the times
are not the point here; the rounding is the same as on an accelerator. On a CPU
``matmul_precision`` ("high", "default") changes nothing: XLA's CPU backend
computes float32 products in full float32. On a GPU, ``--low high`` compares
``Layout(matmul_precision="high")`` (TF32 on NVIDIA GPUs) with the float32 run
instead; its columns are then named ``high``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import kl_optax
from kl_optax.benchmarks import harness, suite, tasks
from kl_optax.benchmarks.optimizers import make_optimizer

__all__ = ["compare", "main", "orthogonality"]

DEFAULT_OPTIMIZERS = "kl_shampoo,kl_soap,soap,pro_kl_shampoo"


def orthogonality(opt_state) -> float:
  """``max ‖QᵀQ − I‖_F`` over every stored (square) basis of a state."""
  worst = 0.0
  for state in kl_optax.kron_states(opt_state):
    for group in state.groups:
      for q in group.bases:
        q = jnp.asarray(q, jnp.float32)
        if q.ndim != 3 or q.shape[1] != q.shape[2]:
          continue  # Pro's one-row placeholders
        gram = jnp.einsum("bij,bik->bjk", q, q, precision=jax.lax.Precision.HIGHEST)
        worst = max(worst, float(jnp.max(jnp.linalg.norm(gram - jnp.eye(q.shape[1]),
                                                         axis=(1, 2)))))
  return worst


LOW = {name: harness.COMPUTE[name] for name in ("bfloat16", "high")}


def _run(task, name, lr, steps, compute, evals):
  base, kwargs = harness.parse_variant(name)
  kwargs = {**task.optimizer_kwargs.get(base, {}), **kwargs}
  if base in kl_optax.RECIPES:
    start = suite.default_start(base) if base in suite.KL_RECIPES else None
    if start is not None:  # the suite's start for a short run
      kwargs.setdefault("init_factor", start)
    kwargs["layout"] = kl_optax.Layout(
        precondition_mask=kl_optax.exclude(*task.adam_leaves), **compute)
  tx = make_optimizer(base, lr, steps, **kwargs)
  setup = task.setup
  step_fn = jax.jit(lambda p, s, x, y: _step(setup, tx, p, s, x, y))
  eval_fn = jax.jit(setup.loss)
  params = jax.tree.map(jnp.copy, setup.params)
  state = tx.init(params)
  snapshots = []
  every = max(1, steps // evals)
  for i in range(steps):
    params, state = step_fn(params, state, *task.batches(i))
    if (i + 1) % every == 0 or i + 1 == steps:
      snapshots.append(jax.tree.map(np.asarray, params))
  val = float(np.mean([eval_fn(params, setup.rest, x, y) for x, y in task.val]))
  return snapshots, state, val


def _step(setup, tx, params, state, x, y):
  grads = jax.grad(setup.loss)(params, setup.rest, x, y)
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state


def _deviation(a, b) -> float:
  num = max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  den = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(a))
  if den == 0:  # both still at a zero start
    return 0.0 if num == 0 else float("inf")
  return num / den


def compare(workload: str, name: str, steps: int, evals: int = 10,
            low: str = "bfloat16") -> dict:
  """The float32 run of ``name`` on ``workload`` and its ``low`` run (a key of ``LOW``), side by side."""
  task = tasks.make_task(workload, "cpu", 0)
  lr = suite.QUICK_LEARNING_RATES[workload][harness.parse_variant(name)[0]]
  ref, ref_state, ref_val = _run(task, name, lr, steps, {}, evals)
  cheap, cheap_state, cheap_val = _run(task, name, lr, steps, LOW[low], evals)
  deviations = [_deviation(a, b) for a, b in zip(ref, cheap)]
  return {"workload": workload, "optimizer": name, "steps": steps, "learning_rate": lr,
          "val_float32": ref_val, f"val_{low}": cheap_val,
          "deviation_final": deviations[-1], "deviation_max": max(deviations),
          "orthogonality_float32": orthogonality(ref_state),
          f"orthogonality_{low}": orthogonality(cheap_state)}


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--optimizers", default=DEFAULT_OPTIMIZERS)
  p.add_argument("--steps", type=int, default=1000, help="steps on the Kronecker regression")
  p.add_argument("--gpt-steps", type=int, default=300, help="steps on the character GPT (0: skip)")
  p.add_argument("--low", default="bfloat16", choices=sorted(LOW),
                 help="the cheaper setting compared with float32 at HIGHEST")
  p.add_argument("--out", default="runs/precision")
  args = p.parse_args(argv)
  low = args.low
  names = [n for n in args.optimizers.split(",") if n]
  runs = [("kron_regression", args.steps)] + ([("char_gpt", args.gpt_steps)]
                                              if args.gpt_steps else [])
  rows = []
  print(f"| workload | optimizer | steps | val loss, float32 | val loss, {low} | max rel. "
        f"deviation (end / worst) | max ‖QᵀQ − I‖ (float32 / {low}) |")
  print("|---|---|---|---|---|---|---|")
  for workload, steps in runs:
    for name in names:
      r = compare(workload, name, steps, low=low)
      rows.append(r)
      print(f"| {workload} | {name} | {steps} | {r['val_float32']:.4f} | {r[f'val_{low}']:.4f} "
            f"| {r['deviation_final']:.2e} / {r['deviation_max']:.2e} "
            f"| {r['orthogonality_float32']:.1e} / {r[f'orthogonality_{low}']:.1e} |", flush=True)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump({"command": "python -m kl_optax.benchmarks.precision "
               + " ".join(sys.argv[1:] if argv is None else argv), "rows": rows}, f, indent=1)
  return rows


if __name__ == "__main__":
  main()
