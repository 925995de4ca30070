"""The family's ordering at a longer horizon: tune short, confirm long, several seeds.

Usage (about 1.5 hours on a 2-core CPU):

    python -m kl_optax.benchmarks.horizon --out runs/horizon

On the character GPT (``--d-model 128 --layers 4`` by default) every optimizer's
peak learning rate is swept at ``--sweep-steps`` (a factor-2 grid around its
tuned value on the suite's GPT, extended past an edge optimum), then the best
value is rerun for ``--steps`` steps with ``--seeds`` seeds (the seed changes
the initialization and the batch order). Every run uses the suite's schedule
(warm-up over 10% of the run, cosine decay to 10% of the peak) for its own
length. Reported: the validation loss of each optimizer at the end of the
sweep horizon and of the long runs (mean ± spread over seeds), both orderings,
and the validation curves.

Outputs in ``--out``: ``results.json`` (summary and command), ``results.md``,
``runs.json`` (every long run's curves) and ``curves.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import jax
import numpy as np

from kl_optax import models
from kl_optax.benchmarks import harness, workload
from kl_optax.benchmarks.optimizers import make_optimizer
from kl_optax.benchmarks.suite import QUICK_LEARNING_RATES

__all__ = ["main", "merge", "sweep"]

DEFAULT_OPTIMIZERS = "adamw,muon,soap,kl_soap,kl_shampoo,pro_kl_shampoo"


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  workload.add_arguments(p, d_model=128, layers=4, context=64, batch=32, steps=2000)
  p.add_argument("--sweep-steps", type=int, default=500)
  p.add_argument("--seeds", type=int, default=2)
  p.add_argument("--first-seed", type=int, default=0,
                 help="the long runs use seeds first-seed … first-seed + seeds - 1, so that "
                      "the seeds of one optimizer can run in separate processes and be merged")
  p.add_argument("--learning-rate", type=float, default=None,
                 help="skip the sweep and run the long runs at this peak learning rate "
                      "(e.g. one found by an earlier sweep)")
  p.add_argument("--evals", type=int, default=10, help="validation evaluations per run")
  p.add_argument("--optimizers", default=DEFAULT_OPTIMIZERS,
                 help="comma-separated names; 'name@key=value' passes keyword arguments")
  p.add_argument("--max-extend", type=int, default=2)
  p.add_argument("--out", default="runs/horizon")
  p.add_argument("--merge", nargs="+", metavar="DIR",
                 help="only combine the runs.json of earlier runs (e.g. two processes with "
                      "different --optimizers) into one report in --out")
  return p.parse_args(argv)


def sweep(run, grid, max_extend: int = 2) -> tuple[float, dict]:
  """Runs ``run(lr) -> val loss`` over a geometric ``grid``, extended past an edge optimum.

  Returns the best learning rate and ``{lr: val loss}``.
  """
  grid = sorted(grid)
  losses: dict[float, float] = {}
  for _ in range(max_extend + 1):
    for lr in grid:
      if lr not in losses:
        losses[lr] = run(lr)
    finite = {lr: v for lr, v in losses.items() if np.isfinite(v)}
    if not finite:
      break
    best = min(finite, key=finite.get)
    nxt = harness.extend_grid(grid, grid.index(best))
    if nxt is None:
      break
    grid = sorted(grid + [nxt])
  finite = {lr: v for lr, v in losses.items() if np.isfinite(v)}
  best = min(finite, key=finite.get) if finite else grid[0]
  return best, losses


def _work(args, seed):
  ns = argparse.Namespace(**{**vars(args), "seed": seed})
  work = workload.from_args(ns)
  return work, harness.make_setup(work.model(), models.loss_fn)


def _ordering(table: dict[str, float]) -> str:
  return " < ".join(f"{name} ({value:.4f})" for name, value in sorted(table.items(),
                                                                      key=lambda kv: kv[1]))


def _summary(lr, swept, short, seeds, long_runs) -> dict:
  finals = [r["val_loss"][-1] for r in long_runs]
  return {"learning_rate": lr, "sweep": swept, "short": short, "seeds": list(seeds),
          "long_mean": statistics.mean(finals),
          "long_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
          "long_runs": long_runs}


def _combine(name, d, old, new) -> dict:
  """One optimizer's long runs from two processes (other seeds, same learning rate)."""
  if "seeds" not in old or "seeds" not in new or set(old["seeds"]) & set(new["seeds"]) \
      or old["learning_rate"] != new["learning_rate"]:
    raise SystemExit(f"{d}/runs.json repeats {[name]}, already in an earlier directory (the same "
                     f"optimizer merges only with other seeds at the same learning rate: seeds "
                     f"{old.get('seeds')} vs {new.get('seeds')}, learning rate "
                     f"{old['learning_rate']:g} vs {new['learning_rate']:g})")
  if old["sweep"] and new["sweep"]:
    raise SystemExit(f"{d}/runs.json repeats the sweep of {name!r}")
  swept = old if old["sweep"] else new
  pairs = sorted(zip(old["seeds"] + new["seeds"], old["long_runs"] + new["long_runs"]),
                 key=lambda p: p[0])
  return _summary(old["learning_rate"], swept["sweep"], swept["short"], [p[0] for p in pairs],
                  [p[1] for p in pairs])


def merge(dirs, out: str, argv=None) -> dict:
  """Combines the ``runs.json`` of several runs (same model and steps) into one report.

  The directories hold different optimizers, or different seeds of one optimizer at one
  learning rate (``--first-seed``; at most one of them with its sweep).
  """
  reports = []
  for d in dirs:
    with open(os.path.join(d, "runs.json")) as f:
      reports.append(json.load(f))
  keys = ("d_model", "layers", "heads", "context", "batch", "val_batches", "steps",
          "sweep_steps", "evals")
  first = {k: reports[0]["args"][k] for k in keys}
  for d, r in zip(dirs, reports):
    if {k: r["args"][k] for k in keys} != first:
      raise SystemExit(f"{d}/runs.json was made with other settings than {dirs[0]}: "
                       f"{ {k: r['args'][k] for k in keys} } vs {first}")
  report = {"args": {**reports[0]["args"], "out": out}, "optimizers": {},
            "params": reports[0].get("params")}
  for d, r in zip(dirs, reports):
    first_seed = r["args"].get("first_seed", 0)
    for name, o in r["optimizers"].items():
      # runs.json written before seeds were recorded ran seeds 0 … seeds - 1
      o = {**o, "seeds": o.get("seeds", list(range(first_seed, first_seed + r["args"]["seeds"])))}
      old = report["optimizers"].get(name)
      report["optimizers"][name] = o if old is None else _combine(name, d, old, o)
  report["args"]["optimizers"] = ",".join(report["optimizers"])
  report["args"]["seeds"] = max(len(o["seeds"]) for o in report["optimizers"].values())
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "runs.json"), "w") as f:
    json.dump(report, f)
  _write(report, argparse.Namespace(**report["args"]), argv, params=report["params"])
  return report


def main(argv=None) -> dict:
  args = _parse(argv)
  if args.merge:
    return merge(args.merge, args.out, argv)
  os.makedirs(args.out, exist_ok=True)
  names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
  if args.seeds < 1 or args.first_seed < 0:
    raise SystemExit(f"--seeds must be >= 1 and --first-seed >= 0, got {args.seeds} and "
                     f"{args.first_seed}")
  if args.learning_rate is not None and not args.learning_rate > 0:
    raise SystemExit(f"--learning-rate must be positive, got {args.learning_rate}")
  seeds = list(range(args.first_seed, args.first_seed + args.seeds))
  # The sweep always uses seed 0; without a sweep only the long runs' seeds are needed.
  needed = sorted(set(seeds) | ({0} if args.learning_rate is None else set()))
  works = {seed: _work(args, seed) for seed in needed}
  _, setup0 = works[needed[0]]
  print(f"device: {jax.devices()[0].device_kind}; model: {setup0.num_params:,} parameters "
        f"(d {args.d_model}, {args.layers} layers, context {args.context}, batch {args.batch})",
        flush=True)
  report = {"args": vars(args), "optimizers": {}, "params": setup0.num_params}
  for name in names:
    base, kwargs = harness.parse_variant(name)
    if base == "pro_kl_shampoo":
      kwargs.setdefault("rank", max(4, args.d_model // 4))
    center = QUICK_LEARNING_RATES["char_gpt"][base]

    def run(lr, steps, seed, base=base, kwargs=kwargs):
      work, setup = works[seed]
      tx = make_optimizer(base, lr, steps, **kwargs)
      return harness.train(setup, tx, work.batches, work.val, steps, name=name,
                           learning_rate=lr, eval_every=max(1, steps // args.evals))

    short = {}

    def short_loss(lr, name=name, run=run, short=short):
      result = run(lr, args.sweep_steps, 0)
      short[lr] = result
      loss = result.final_val if not result.diverged else float("nan")
      print(f"  {name:28s} lr {lr:<8.3g} {args.sweep_steps} steps: val {loss:.4f}", flush=True)
      return loss

    if args.learning_rate is None:
      best, losses = sweep(short_loss, [center / 2, center, center * 2], args.max_extend)
    else:
      best, losses = args.learning_rate, {}
    long_runs = []
    for seed in seeds:
      result = run(best, args.steps, seed)
      long_runs.append(result.to_json())
      print(f"  {name:28s} lr {best:<8.3g} {args.steps} steps, seed {seed}: val "
            f"{result.final_val:.4f}  (median step {1e3 * result.median_step:.1f} ms)", flush=True)
    report["optimizers"][name] = _summary(
        best, {str(k): v for k, v in sorted(losses.items())}, losses.get(best), seeds, long_runs)
    with open(os.path.join(args.out, "runs.json"), "w") as f:
      json.dump(report, f)

  _write(report, args, argv, setup0.num_params)
  return report


def _write(report: dict, args, argv, params: int | None) -> None:
  opts = report["optimizers"]
  short = {n: o["short"] for n, o in opts.items() if o.get("short") is not None}
  long = {n: o["long_mean"] for n, o in opts.items()}
  size = f" ({params:,} parameters)" if params else ""
  lines = [f"Character GPT, d {args.d_model}, {args.layers} layers, context {args.context}, "
           f"batch {args.batch}{size}; sweep at {args.sweep_steps} "
           f"steps (seed 0), {args.steps} steps with up to {args.seeds} seeds at the best rate.",
           "",
           f"| optimizer | peak lr | val loss, {args.sweep_steps} steps | val loss, {args.steps} "
           "steps (mean ± std) | sweep |", "|---|---|---|---|---|"]
  for n, o in opts.items():
    grid = ", ".join(f"{float(k):g} → {v:.4f}" for k, v in o["sweep"].items()) or "not swept"
    swept = f"{o['short']:.4f}" if o.get("short") is not None else "not swept"
    seeds = "/".join(str(k) for k in o.get("seeds", []))
    lines.append(f"| {n} | {o['learning_rate']:g} | {swept} | {o['long_mean']:.4f} ± "
                 f"{o['long_std']:.4f} (seeds {seeds}) | {grid} |")
  lines += [""]
  if short:
    lines.append(f"Ordering at {args.sweep_steps} steps: {_ordering(short)}")
  lines.append(f"Ordering at {args.steps} steps: {_ordering(long)}")
  rows = [{"optimizer": n, **{k: v for k, v in o.items() if k != "long_runs"}}
          for n, o in opts.items()]
  harness.write_report(args.out, "kl_optax.benchmarks.horizon", argv, rows, lines)
  _plot(os.path.join(args.out, "curves.png"), opts, args)


def _plot(path, opts, args):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for name, o in opts.items():
    runs = o["long_runs"]
    steps = runs[0]["eval_steps"]
    mean = np.mean([r["val_loss"] for r in runs], axis=0)
    ax.plot(steps, mean, marker="o", ms=3,
            label=f"{name} (lr {o['learning_rate']:g}, {len(runs)} seeds)")
  ax.set(xlabel="step", ylabel="validation loss (mean over seeds)",
         title=f"character GPT d{args.d_model}, {args.layers} layers, {args.steps} steps")
  ax.set_ylim(top=min(3.0, ax.get_ylim()[1]))
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  main()
