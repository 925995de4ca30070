"""Scanned against unrolled layers: compile time and step time of the example GPT.

Usage:

    python -m kl_optax.benchmarks.scanned [--layers 12] [--steps 30]

Large-model code stacks its blocks' parameters along a layer axis
(``nnx.vmap`` to build, ``nnx.scan`` to run): the forward and backward
passes then compile once for all layers. An optimizer should keep that
advantage. For AdamW and kl_shampoo on the character GPT
(``kl_optax.models.GPT``; ``GPTConfig(scan=True)`` for the scanned form,
optimized with ``dimension_numbers=models.SCANNED``) this measures:

* the train step's trace-and-lower time and XLA compile time (the whole step:
  forward, backward, update), one fresh ``jit`` each;
* the median step time, and the mean, which includes the basis refreshes
  (every 10 steps), over ``--steps`` steps after the first;

and reports each as a ratio to scanned AdamW measured in the same run. The
configurations are timed in turn, round by round, so that a change in the
machine's load affects them alike. The tokens are random: only time is measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import time

import jax
import optax
from flax import nnx

import kl_optax
from kl_optax import models
from kl_optax.benchmarks import harness

__all__ = ["CONFIGS", "main", "measure_compile"]

CONFIGS = ("adamw/unrolled", "adamw/scanned", "kl_shampoo/unrolled", "kl_shampoo/scanned")


def _optimizer(name: str, scanned: bool) -> optax.GradientTransformation:
  if name == "adamw":
    return optax.adamw(1e-3, weight_decay=0.01)
  layout = kl_optax.Layout(precondition_mask=kl_optax.exclude(*models.ADAM_LEAVES))
  return kl_optax.kl_shampoo(1e-2, layout=layout,
                             dimension_numbers=models.SCANNED if scanned else None)


def _setup(config: str, cfg: models.GPTConfig, batch: int):
  name, form = config.split("/")
  scanned = form == "scanned"
  model = models.GPT(dataclasses.replace(cfg, scan=scanned), nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = _optimizer(name, scanned)
  step = models.make_train_step(graphdef, rest, tx)
  tokens = jax.random.randint(jax.random.key(0), (batch, cfg.context + 1), 0, cfg.vocab_size)
  return step, params, tx.init(params), tokens


def measure_compile(config: str, cfg: models.GPTConfig, batch: int) -> dict:
  """Trace-and-lower and compile seconds of one fresh ``jit`` of the train step."""
  step, params, opt_state, tokens = _setup(config, cfg, batch)
  t0 = time.perf_counter()
  lowered = jax.jit(step).lower(params, opt_state, tokens[:, :-1], tokens[:, 1:])
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  return {"lower_s": t1 - t0, "compile_s": t2 - t1, "compiled": compiled,
          "state": (params, opt_state, tokens)}


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--layers", type=int, default=12)
  p.add_argument("--d-model", type=int, default=64)
  p.add_argument("--context", type=int, default=64)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--steps", type=int, default=30, help="timed steps after the first, per config")
  p.add_argument("--rounds", type=int, default=2, help="compile measurements per config")
  p.add_argument("--out", default="runs/scanned", help="folder for results.json and results.md")
  args = p.parse_args(argv)
  cfg = models.GPTConfig(vocab_size=65, context=args.context, d_model=args.d_model,
                         n_layers=args.layers, n_heads=4)
  lower = {c: [] for c in CONFIGS}
  comp = {c: [] for c in CONFIGS}
  runs = {}
  for _ in range(args.rounds):
    for c in CONFIGS:
      m = measure_compile(c, cfg, args.batch)
      lower[c].append(m["lower_s"])
      comp[c].append(m["compile_s"])
      runs[c] = (m["compiled"], m["state"])
  seconds = {c: [] for c in CONFIGS}
  states = {}
  for c in CONFIGS:
    compiled, (params, opt_state, tokens) = runs[c]
    params, opt_state, loss = compiled(params, opt_state, tokens[:, :-1], tokens[:, 1:])
    jax.block_until_ready(loss)
    states[c] = (params, opt_state, tokens)
  for _ in range(args.steps):        # round robin: one step of each config in turn
    for c in CONFIGS:
      compiled = runs[c][0]
      params, opt_state, tokens = states[c]
      t0 = time.perf_counter()
      params, opt_state, loss = compiled(params, opt_state, tokens[:, :-1], tokens[:, 1:])
      jax.block_until_ready((params, opt_state, loss))
      seconds[c].append(time.perf_counter() - t0)
      states[c] = (params, opt_state, tokens)
  base = "adamw/scanned"
  rows = []
  for c in CONFIGS:
    rows.append({"config": c, "lower_s": min(lower[c]), "compile_s": min(comp[c]),
                 "median_ms": 1e3 * statistics.median(seconds[c]),
                 "mean_ms": 1e3 * statistics.fmean(seconds[c])})
  b = {k: next(r for r in rows if r["config"] == base)[k]
       for k in ("lower_s", "compile_s", "median_ms", "mean_ms")}
  for r in rows:
    r["compile_vs_scanned_adamw"] = (r["lower_s"] + r["compile_s"]) / (b["lower_s"] + b["compile_s"])
    r["median_vs_scanned_adamw"] = r["median_ms"] / b["median_ms"]
    r["mean_vs_scanned_adamw"] = r["mean_ms"] / b["mean_ms"]
  device = jax.devices()[0]
  header = (f"device: {device.device_kind} ({platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPU cores); JAX {jax.__version__}; GPT {args.layers} layers, "
            f"d_model {args.d_model}, context {args.context}, batch {args.batch}; compile: best "
            f"of {args.rounds}; steps: {args.steps} per config, round robin")
  lines = [header, "",
           "| optimizer / layers | trace + lower (s) | XLA compile (s) | × scanned AdamW "
           "| median step (ms) | × | mean step (ms) | × |",
           "|---|---|---|---|---|---|---|---|"]
  lines += [f"| {r['config']} | {r['lower_s']:.2f} | {r['compile_s']:.2f} "
            f"| {r['compile_vs_scanned_adamw']:.2f} | {r['median_ms']:.1f} "
            f"| {r['median_vs_scanned_adamw']:.2f} | {r['mean_ms']:.1f} "
            f"| {r['mean_vs_scanned_adamw']:.2f} |" for r in rows]
  harness.write_report(args.out, "kl_optax.benchmarks.scanned", argv, rows, lines)
  return rows


if __name__ == "__main__":
  main()
