"""Learning-rate transfer across width: the best peak learning rate at several model widths.

Usage (about 40 minutes on a 2-core CPU):

    python -m kl_optax.benchmarks.width --out runs/width

The character GPT at widths ``--widths`` (same depth, heads, context, batch
and steps) is trained with each optimizer over a factor-2 grid of peak
learning rates around its tuned value on the suite's GPT, extended past an
edge optimum ([`kl_optax.benchmarks.horizon.sweep`][kl_optax.benchmarks.horizon.sweep]). Reported per
optimizer: the best learning rate at each width, the ratio of the largest to
the smallest of them (1 = perfect transfer), and the best validation loss at
each width; plotted: validation loss against learning rate, one panel per
width.

With ``--seeds N`` every learning rate is trained with N seeds (model
initialization, batches and validation text), and the mean validation loss
decides the best one; ``sweeps.json`` keeps each seed's loss.

Outputs in ``--out``: ``results.json``, ``results.md`` and ``width.png``.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from kl_optax import models
from kl_optax.benchmarks import harness, workload
from kl_optax.benchmarks.horizon import sweep
from kl_optax.benchmarks.optimizers import make_optimizer
from kl_optax.benchmarks.suite import QUICK_LEARNING_RATES

__all__ = ["main"]


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  workload.add_arguments(p, d_model=64, layers=2, context=64, batch=32, steps=300)
  p.add_argument("--widths", default="64,128,256")
  p.add_argument("--optimizers", default="adamw,kl_shampoo@init_factor=0.1,kl_shampoo",
                 help="comma-separated names; 'name@key=value' passes keyword arguments")
  p.add_argument("--max-extend", type=int, default=3)
  p.add_argument("--evals", type=int, default=5)
  p.add_argument("--seeds", type=int, default=1,
                 help="seeds per learning rate (--seed, --seed + 1, …); their mean validation "
                      "loss picks the best learning rate")
  p.add_argument("--merge", metavar="DIR",
                 help="also report the optimizers of an earlier run's DIR/sweeps.json (same widths)")
  p.add_argument("--out", default="runs/width")
  return p.parse_args(argv)


def main(argv=None) -> dict:
  args = _parse(argv)
  os.makedirs(args.out, exist_ok=True)
  widths = [int(w) for w in args.widths.split(",")]
  names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
  results: dict[str, dict[int, dict]] = {n: {} for n in names}
  if args.seeds < 1:
    raise SystemExit(f"--seeds must be at least 1, got {args.seeds}")
  seeds = list(range(args.seed, args.seed + args.seeds))
  for width in widths:
    runs = []  # (workload, setup) per seed
    for seed in seeds:
      work = workload.from_args(argparse.Namespace(**{**vars(args), "d_model": width,
                                                      "seed": seed}))
      runs.append((work, harness.make_setup(work.model(), models.loss_fn)))
    print(f"width {width}: {runs[0][1].num_params:,} parameters", flush=True)
    for name in names:
      base, kwargs = harness.parse_variant(name)
      per_seed: dict[float, list[float]] = {}

      def run(lr, base=base, kwargs=kwargs, name=name, per_seed=per_seed):
        losses = []
        for seed, (work, setup) in zip(seeds, runs):
          tx = make_optimizer(base, lr, args.steps, **kwargs)
          r = harness.train(setup, tx, work.batches, work.val, args.steps, name=name,
                            learning_rate=lr, eval_every=max(1, args.steps // args.evals))
          losses.append(float("nan") if r.diverged else r.final_val)
          print(f"  {name:28s} lr {lr:<8.3g} seed {seed} val {losses[-1]:.4f}", flush=True)
        per_seed[lr] = losses
        return float(np.mean(losses))  # NaN if any seed diverged

      center = QUICK_LEARNING_RATES["char_gpt"][base]
      best, losses = sweep(run, [center / 2, center, center * 2], args.max_extend)
      results[name][width] = {"best": best, "loss": losses[best],
                              "sweep": {str(k): v for k, v in sorted(losses.items())},
                              "seeds": {str(k): v for k, v in sorted(per_seed.items())}}
      with open(os.path.join(args.out, "sweeps.json"), "w") as f:
        json.dump({n: {str(w): v for w, v in r.items()} for n, r in results.items()}, f)

  earlier = {}
  if args.merge:  # read at the end: the earlier run may have been running alongside
    with open(os.path.join(args.merge, "sweeps.json")) as f:
      earlier = {n: {int(w): v for w, v in r.items()} for n, r in json.load(f).items()}
  results = {**{n: r for n, r in earlier.items() if n not in results}, **results}
  names = list(results)
  lines = [f"Character GPT, {args.layers} layers, context {args.context}, batch {args.batch}, "
           f"{args.steps} steps, seeds {', '.join(map(str, seeds))}; best peak learning rate "
           "(mean validation loss) per width.", "",
           "| optimizer | " + " | ".join(f"d {w}" for w in widths) + " | max / min best lr |",
           "|---|" + "---|" * (len(widths) + 1)]
  rows = []
  for name in names:
    bests = [results[name][w]["best"] for w in widths]
    cells = [f"{results[name][w]['best']:g} ({results[name][w]['loss']:.4f})" for w in widths]
    lines.append(f"| {name} | " + " | ".join(cells) + f" | {max(bests) / min(bests):.2f}× |")
    rows.append({"optimizer": name, "widths": widths, "best_lr": bests,
                 "loss": [results[name][w]["loss"] for w in widths],
                 "sweeps": [results[name][w]["sweep"] for w in widths],
                 "seed_losses": [results[name][w].get("seeds") for w in widths]})
  harness.write_report(args.out, "kl_optax.benchmarks.width", argv, rows, lines)
  _plot(os.path.join(args.out, "width.png"), results, widths, args)
  return results


def _plot(path, results, widths, args):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  import matplotlib.ticker  # pylint: disable=import-outside-toplevel

  fig, axes = plt.subplots(1, len(widths), figsize=(4 * len(widths), 3.6), sharey=True,
                           squeeze=False)
  for ax, width in zip(axes[0], widths):
    for name, per_width in results.items():
      sw = per_width[width]["sweep"]
      lrs = np.array([float(k) for k in sw])
      losses = np.array([sw[k] for k in sw])
      ax.plot(lrs, losses, marker="o", ms=4, label=name)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set(title=f"d {width}", xlabel="peak learning rate")
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel(f"validation loss after {args.steps} steps")
  lo = min(v["loss"] for r in results.values() for v in r.values())
  axes[0][0].set_ylim(lo - 0.05, lo + 0.6)
  axes[0][-1].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  main()
