"""Character-GPT benchmark: learning-rate sweeps, loss, step time, compile time, memory.

Usage (CPU defaults; about 25 minutes on a 2-core machine):

    python -m kl_optax.benchmarks.char_gpt --out runs/char_gpt

For every optimizer the peak learning rate is swept over the same grid; when the
best value sits at an edge of the grid the grid is extended on that side (up to
``--max-extend`` times), so that no reported optimum is an edge value. All runs
see the same data in the same order and start from the same initialization.

Reported per optimizer, at its best learning rate: final validation loss (held-out
plays), median whole-train-step time, median optimizer-update time, compile time,
optimizer-update FLOPs (XLA cost analysis), train-step temporary memory (XLA
memory analysis) and optimizer-state bytes per parameter — times and compile
times also as ratios to ``optax.adamw`` measured in the same process.

Outputs in ``--out``: ``results.json``, ``results.md`` and ``curves.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import jax
import numpy as np

import kl_optax
from kl_optax import models
from kl_optax.benchmarks import harness, workload
from kl_optax.benchmarks.optimizers import OPTIMIZERS, make_optimizer

__all__ = ["main", "state_floats_kl_shampoo"]


# Tensor-shaped buffers each Kronecker recipe keeps per preconditioned matrix.
TENSOR_BUFFERS = {"kl_shampoo": 1, "kl_soap": 2, "soap": 2, "shampoo": 2, "eshampoo": 2}
# Square matrices per side: S and Q; Shampoo also keeps its inverse root.
SQUARE_BUFFERS = {"shampoo": 3}


def state_floats_kl_shampoo(m: int, n: int, buffers: int = 1, squares: int = 2) -> int:
  """Analytic state of an m×n matrix: ``buffers`` m×n moments, ``squares`` square
  matrices per side (S and Q), λ per side.

  With the defaults this is KL-Shampoo's ``mn + 2m² + 2n² + m + n``
  (``docs/math.md``, "Pro-KLShampoo").
  """
  return buffers * m * n + squares * (m * m + n * n) + m + n


def analytic_state_bytes(params, labels, buffers: int = 1, squares: int = 2) -> int:
  """Float32 bytes the optimizer state should take: the Kronecker count for 'kron' leaves,
  AdamW's two moments for the rest (step counters and refresh counters not included)."""
  total = 0
  for leaf, label in zip(jax.tree.leaves(params), jax.tree.leaves(labels)):
    shape = [d for d in leaf.shape if d != 1]
    if label == kl_optax.routing.KRON and len(shape) == 2:
      total += 4 * state_floats_kl_shampoo(*shape, buffers=buffers, squares=squares)
    else:
      total += 4 * 2 * int(np.prod(leaf.shape))
  return total


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  workload.add_arguments(p, d_model=128, layers=4, context=128)
  p.add_argument("--eval-every", type=int, default=50)
  p.add_argument("--optimizers", default="adamw,kl_shampoo",
                 help="comma-separated names from kl_optax.benchmarks.optimizers.OPTIMIZERS; "
                      "'name@key=value' passes keyword arguments (e.g. "
                      "kl_shampoo@refresh_tolerance=0.05)")
  p.add_argument("--lrs", default="1e-3,2e-3,4e-3,8e-3,1.6e-2",
                 help="comma-separated peak learning rates (a geometric grid)")
  p.add_argument("--max-extend", type=int, default=3)
  p.add_argument("--timing-calls", type=int, default=30)
  p.add_argument("--kl-init-factor", type=float, default=None,
                 help="init_factor of kl_shampoo, kl_soap and pro_kl_shampoo (default: the recipes' 0.1)")
  p.add_argument("--out", default="runs/char_gpt")
  return p.parse_args(argv)


def _plot(path, best_runs, title):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for name, run in best_runs.items():
    smooth = np.convolve(run["train_loss"], np.ones(10) / 10, mode="valid")
    axes[0].plot(np.arange(len(smooth)) + 10, smooth, label=f"{name} (lr {run['learning_rate']:.2g})")
    axes[1].plot(run["eval_steps"], run["val_loss"], marker="o", label=name)
  axes[0].set(xlabel="step", ylabel="train loss (10-step mean)", title=title)
  axes[1].set(xlabel="step", ylabel="validation loss (held-out plays)")
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None) -> dict:
  args = _parse(argv)
  os.makedirs(args.out, exist_ok=True)
  work = workload.from_args(args)
  cfg, batches, val = work.config, work.batches, work.val
  setup = harness.make_setup(work.model(), models.loss_fn)
  names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
  kwargs = {n: harness.parse_variant(n)[1] for n in names}
  for n in names:
    base = n.split("@")[0]
    if base not in OPTIMIZERS:
      raise SystemExit(f"unknown optimizer {base!r}; known: {sorted(OPTIMIZERS)}")
    if args.kl_init_factor is not None and base in ("kl_shampoo", "kl_soap", "pro_kl_shampoo"):
      kwargs[n].setdefault("init_factor", args.kl_init_factor)

  print(f"device: {jax.devices()[0].device_kind} ({platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores); model: {setup.num_params:,} parameters "
        f"({cfg.matrix_params:,} in block matrices)", flush=True)
  sweeps: dict[str, list[dict]] = {}
  for name in names:
    grid = sorted(float(v) for v in args.lrs.split(","))
    results: dict[float, dict] = {}
    extensions = 0
    while True:
      for lr in grid:
        if lr in results:
          continue
        tx = make_optimizer(name.split("@")[0], lr, args.steps, **kwargs[name])
        t0 = time.perf_counter()
        run = harness.train(setup, tx, batches, val, args.steps, name=name,
                            learning_rate=lr, eval_every=args.eval_every)
        results[lr] = run.to_json()
        counts = kl_optax.refresh_counts(run.opt_state)
        if counts:
          freq = kwargs[name].get("precondition_frequency", 10)
          # Updates t = 0 (initialization) … steps − 1; refreshes at t = freq, 2 freq, ….
          results[lr]["refreshes"] = int(sum(np.asarray(c).sum() for c in counts.values()))
          results[lr]["refresh_opportunities"] = int(
              sum(np.asarray(c).size for c in counts.values()) * ((args.steps - 1) // freq))
        print(f"{name:>12s} lr {lr:<9.3g} val {run.final_val:.4f}  "
              f"step {1e3 * run.median_step:6.1f} ms  ({time.perf_counter() - t0:.0f}s)", flush=True)
      finals = [results[lr]["final_val"] if not results[lr]["diverged"] else math.inf for lr in grid]
      best = int(np.argmin(finals))
      nxt = harness.extend_grid(grid, best)
      if nxt is None or extensions >= args.max_extend:
        break
      grid = sorted(grid + [nxt])
      extensions += 1
    sweeps[name] = [results[lr] for lr in grid]

  best_runs = {n: min((r for r in sweeps[n] if not r["diverged"]), key=lambda r: r["final_val"])
               for n in names}
  labels = kl_optax.kron_labels(setup.params, precondition_mask=kl_optax.exclude(*models.ADAM_LEAVES))
  timing_batch = batches(0)
  summary = {}
  for name in names:
    tx = make_optimizer(name.split("@")[0], best_runs[name]["learning_rate"], args.steps,
                        **kwargs[name])
    upd, flops = harness.update_cost(tx, setup, timing_batch, args.timing_calls)
    summary[name] = {
        "best_lr": best_runs[name]["learning_rate"],
        "final_val": best_runs[name]["final_val"],
        "edge_optimum": best_runs[name]["learning_rate"] in (sweeps[name][0]["learning_rate"],
                                                              sweeps[name][-1]["learning_rate"]),
        "step_ms": 1e3 * best_runs[name]["median_step"],
        "update_ms": 1e3 * upd,
        "compile_s": best_runs[name]["compile_seconds"],
        "update_gflops": flops / 1e9,
        "step_temp_mb": best_runs[name]["step_memory"]["temp"] / 2**20,
        "state_bytes_per_param": best_runs[name]["state_bytes"] / setup.num_params,
        "refreshes": best_runs[name].get("refreshes"),
        "refresh_opportunities": best_runs[name].get("refresh_opportunities"),
    }
  if "adamw" in summary:
    base = summary["adamw"]
    for s in summary.values():
      s["step_vs_adamw"] = s["step_ms"] / base["step_ms"]
      s["update_vs_adamw"] = s["update_ms"] / base["update_ms"]
      s["compile_vs_adamw"] = s["compile_s"] / base["compile_s"]
  analytic = {"adamw": 8.0}
  for name in names:
    base = name.split("@")[0]
    if base in TENSOR_BUFFERS:
      analytic[name] = analytic_state_bytes(setup.params, labels, TENSOR_BUFFERS[base],
                                            SQUARE_BUFFERS.get(base, 2)) / setup.num_params
  report = {
      "command": "python -m kl_optax.benchmarks.char_gpt " + " ".join(sys.argv[1:] if argv is None else argv),
      "device": jax.devices()[0].device_kind,
      "cpu_count": os.cpu_count(),
      "jax": jax.__version__,
      "model": {"params": setup.num_params, "matrix_params": cfg.matrix_params,
                "d_model": cfg.d_model, "layers": cfg.n_layers, "context": cfg.context,
                "batch": args.batch, "steps": args.steps},
      "summary": summary,
      "analytic_state_bytes_per_param": analytic,
      "sweeps": sweeps,
  }
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(report, f, indent=1)
  table = _markdown(report)
  with open(os.path.join(args.out, "results.md"), "w") as f:
    f.write(table)
  _plot(os.path.join(args.out, "curves.png"), best_runs,
        f"char GPT {setup.num_params / 1e6:.2f}M params, {args.steps} steps")
  print("\n" + table)
  return report


def _markdown(report) -> str:
  rows = ["| optimizer | best peak lr | val loss | train step (ms) | × AdamW | update (ms) | × AdamW "
          "| compile (s) | × AdamW | update GFLOPs | state bytes/param |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
  for name, s in report["summary"].items():
    rows.append(
        f"| {name} | {s['best_lr']:.3g}{' (edge)' if s['edge_optimum'] else ''} | {s['final_val']:.4f} "
        f"| {s['step_ms']:.1f} | {s.get('step_vs_adamw', float('nan')):.2f} "
        f"| {s['update_ms']:.2f} | {s.get('update_vs_adamw', float('nan')):.2f} "
        f"| {s['compile_s']:.2f} | {s.get('compile_vs_adamw', float('nan')):.2f} "
        f"| {s['update_gflops']:.3f} | {s['state_bytes_per_param']:.2f} |")
  sweep_rows = ["", "| optimizer | " + " | ".join(["lr → final val loss"]) + " |", "|---|---|"]
  for name, runs in report["sweeps"].items():
    cells = ", ".join(f"{r['learning_rate']:.3g} → {'diverged' if r['diverged'] else format(r['final_val'], '.4f')}"
                      for r in runs)
    sweep_rows.append(f"| {name} | {cells} |")
  refresh = [f"- {n}: {s['refreshes']} of {s['refresh_opportunities']} factor refreshes performed"
             for n, s in report["summary"].items() if s.get("refreshes") is not None]
  if refresh:
    rows += ["", "Basis refreshes at the best learning rate (factors × refresh steps):", ""] + refresh
  analytic = report["analytic_state_bytes_per_param"]
  mem = ["", "Optimizer-state bytes per parameter, measured from the state pytree vs analytic "
         "(float32; KL-Shampoo per m×n matrix: mn + 2m² + 2n² + m + n floats, AdamW 2 per entry):", ""]
  for name, s in report["summary"].items():
    if name in analytic:
      mem.append(f"- {name}: measured {s['state_bytes_per_param']:.3f}, analytic {analytic[name]:.3f}")
  return "\n".join(rows + sweep_rows + mem) + "\n"


if __name__ == "__main__":
  main()
