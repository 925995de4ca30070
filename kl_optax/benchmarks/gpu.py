"""Step time, compile time and memory of a GPT-2-small-shaped model, in one call.

Usage, on a machine with a GPU (random tokens; no dataset, no download):

    python -m kl_optax.benchmarks.gpu --out runs/gpu

For each optimizer and compute setting: the train step's compile time, the median
and p95 time of ordinary steps and of refresh steps (a Kronecker recipe refreshes
its bases every ``precondition_frequency`` = 10 steps), the update's time (the
ordinary step's time less AdamW's), XLA's estimate of the train step's peak
memory and the device's peak so far (``memory_stats()``, where the backend has it;
it never resets within a process), and XLA's FLOP and byte counts of the compiled
train step (on an H200 XLA's count was far below the analytic one — 1.77
TFLOP for AdamW's train step at the default size, whose forward and backward
alone are about 7 — so read those two columns on CPU only). Compute settings
of the Kronecker recipes (``--compute``, ``harness.COMPUTE``): ``float32``
(``precision=HIGHEST``, the default), ``high`` (``matmul_precision="high"``:
TF32 on NVIDIA GPUs) and ``bfloat16`` (``compute_dtype=jnp.bfloat16``);
``float32`` and ``bfloat16`` run by default. Runs start only while the elapsed time is under ``--budget-minutes`` less the longest run so far;
the rest are listed as not run. ``results.json`` and ``results.md`` in ``--out``
are rewritten after every run, so an interrupted call keeps what it measured.

The model is the package's GPT (``kl_optax.models.GPT``), unrolled blocks, at
GPT-2 small's shape by default (d 768, 12 layers, 12 heads, context 1024, vocabulary
50257; its output head is not tied to the embedding, so 163 M parameters), trained with the suite's optimizers
(``kl_optax.benchmarks.optimizers``: embeddings, norms and biases on AdamW).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np
from flax import nnx

import kl_optax
from kl_optax import models
from kl_optax.benchmarks import harness
from kl_optax.benchmarks.optimizers import make_optimizer

__all__ = ["main", "step_times"]

COMPUTE = harness.COMPUTE
KRONECKER = ("kl_shampoo", "kl_soap", "soap", "shampoo", "eshampoo", "pro_kl_shampoo")


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--d-model", type=int, default=768)
  p.add_argument("--layers", type=int, default=12)
  p.add_argument("--heads", type=int, default=12)
  p.add_argument("--context", type=int, default=1024)
  p.add_argument("--vocab", type=int, default=50257)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--steps", type=int, default=32, help="train steps per run (refreshes at 10, 20, 30)")
  p.add_argument("--optimizers", default="adamw,muon,kl_shampoo,soap,pro_kl_shampoo")
  p.add_argument("--compute", default="float32,bfloat16",
                 help="the Kronecker recipes' compute settings, of " + ", ".join(COMPUTE)
                 + " (AdamW and Muon run once)")
  p.add_argument("--budget-minutes", type=float, default=8.0,
                 help="start no run after this many minutes less the longest run so far")
  p.add_argument("--out", default="runs/gpu")
  return p.parse_args(argv)


def step_times(seconds: list[float], period: int | None) -> dict:
  """Median and p95 of the ordinary and the refresh steps (step ``i`` has count ``i``).

  The first step (the initialization step of the Kronecker recipes) and the
  second are left out; refresh steps are those with ``i % period == 0``.
  """
  def stats(xs):
    if not xs:
      return None, None
    return 1e3 * statistics.median(xs), 1e3 * float(np.percentile(xs, 95))

  ordinary = [t for i, t in enumerate(seconds)
              if i >= 2 and (period is None or i % period != 0)]
  refresh = [t for i, t in enumerate(seconds) if period and i >= period and i % period == 0]
  (om, op), (rm, rp) = stats(ordinary), stats(refresh)
  return {"ordinary_ms": om, "ordinary_p95_ms": op, "refresh_ms": rm, "refresh_p95_ms": rp}


def _peak_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def _table(rows: list[dict], skipped: list[tuple[str, str]], header: str) -> list[str]:
  base = next((r for r in rows if r["optimizer"] == "adamw"), None)
  lines = [header, "",
           "| optimizer | compute | compile s | ordinary ms (median / p95) | refresh ms (median / "
           "p95) | ordinary × AdamW | update ms (ordinary − AdamW's) | step peak GiB (XLA) | "
           "device peak so far GiB | state MiB | step TFLOP / GB (XLA) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  gib = lambda b: f"{b / 2**30:.2f}" if b and b > 0 else "—"
  for r in rows:
    ratio = (f"{r['ordinary_ms'] / base['ordinary_ms']:.2f}" if base and r["ordinary_ms"]
             else "—")
    update = (f"{r['ordinary_ms'] - base['ordinary_ms']:.2f}" if base and r["ordinary_ms"]
              and r is not base else "—")
    refresh = (f"{r['refresh_ms']:.2f} / {r['refresh_p95_ms']:.2f}" if r["refresh_ms"] else "—")
    cost = (f"{r['step_flops'] / 1e12:.2f} / {r['step_bytes'] / 1e9:.1f}"
            if r["step_flops"] > 0 else "—")
    lines.append(f"| {r['optimizer']} | {r['compute']} | {r['compile_s']:.1f} | "
                 f"{r['ordinary_ms']:.2f} / {r['ordinary_p95_ms']:.2f} | {refresh} | {ratio} | "
                 f"{update} | {gib(r['step_peak_bytes'])} | {gib(r['device_peak_bytes'])} | "
                 f"{r['state_bytes'] / 2**20:.1f} | {cost} |")
  for name, compute in skipped:
    lines.append(f"| {name} | {compute} | not run: over the time budget |" + " |" * 8)
  return lines


def main(argv=None) -> list[dict]:
  args = _parse(argv)
  if args.steps < 3:
    raise SystemExit("--steps must be at least 3 (the first two steps are not timed)")
  runs = []
  for name in [n.strip() for n in args.optimizers.split(",") if n.strip()]:
    settings = [c.strip() for c in args.compute.split(",")] if name in KRONECKER else ["float32"]
    for compute in settings:
      if compute not in COMPUTE:
        raise SystemExit(f"--compute: unknown setting {compute!r} (one of {', '.join(COMPUTE)})")
      runs.append((name, compute))
  start = time.perf_counter()
  config = models.GPTConfig(vocab_size=args.vocab, context=args.context, d_model=args.d_model,
                            n_layers=args.layers, n_heads=args.heads)
  setup = harness.make_setup(models.GPT(config, nnx.Rngs(0)), models.loss_fn)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, args.vocab, size=(args.steps + 1, args.batch, args.context + 1),
                        dtype=np.int32)
  batches = lambda i: (tokens[i, :, :-1], tokens[i, :, 1:])
  device = jax.devices()[0]
  print(f"device: {device.device_kind}; model: {setup.num_params:,} parameters", flush=True)
  header = (f"{device.device_kind}, {setup.num_params:,} parameters, batch {args.batch} × "
            f"{args.context} tokens, {args.steps} steps per run.")
  rows, skipped, longest = [], [], 0.0
  for name, compute in runs:
    elapsed = time.perf_counter() - start
    if elapsed + longest > 60 * args.budget_minutes:
      skipped.append((name, compute))
      print(f"  {name:16s} {compute:9s} not run: {elapsed / 60:.1f} of "
            f"{args.budget_minutes} minutes spent", flush=True)
      continue
    run_start = time.perf_counter()
    kwargs = {}
    if name in KRONECKER:
      kwargs["layout"] = kl_optax.Layout(
          precondition_mask=kl_optax.exclude(*models.ADAM_LEAVES), **COMPUTE[compute])
    tx = make_optimizer(name, 1e-3, args.steps, **kwargs)
    result = harness.train(setup, tx, batches, [batches(args.steps)], args.steps,
                           name=name, eval_every=args.steps)
    period = 10 if name in KRONECKER else None
    row = {"optimizer": name, "compute": compute, "compile_s": result.compile_seconds,
           **step_times(result.step_seconds, period),
           # XLA's estimate for this train step; the device's peak so far in the
           # process (it never resets, so it only grows from run to run).
           "step_peak_bytes": result.step_memory.get("peak"),
           "device_peak_bytes": _peak_bytes(),
           "step_flops": result.step_cost.get("flops", -1.0),
           "step_bytes": result.step_cost.get("bytes", -1.0),
           "state_bytes": result.state_bytes, "final_loss": result.train_loss[-1],
           "step_seconds": result.step_seconds}
    rows.append(row)
    longest = max(longest, time.perf_counter() - run_start)
    print(f"  {name:16s} {compute:9s} compile {row['compile_s']:6.1f} s  ordinary "
          f"{row['ordinary_ms']:8.2f} ms  refresh {row['refresh_ms'] or float('nan'):8.2f} ms"
          f"  ({time.perf_counter() - run_start:.0f} s)", flush=True)
    harness.write_report(args.out, "kl_optax.benchmarks.gpu", argv, rows,
                         _table(rows, skipped, header), quiet=True)
  harness.write_report(args.out, "kl_optax.benchmarks.gpu", argv, rows,
                       _table(rows, skipped, header))
  return rows


if __name__ == "__main__":
  main()
