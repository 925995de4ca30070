"""KL-Shampoo beside the public JAX port ``kl_shampoo_jax``: step, refresh, compile, memory.

Usage (the port is not a dependency of this package; install it from its source
first; 5 to 10 minutes on a 2-core CPU):

    pip install git+https://github.com/bentherien/kl_shampoo_jax
    python -m kl_optax.benchmarks.port --out runs/port

On the character GPT (2 layers, context 64, batch 16, at each ``--widths``) four
optimizers train from the same initialization on the same batches, in one
process, interleaved ten steps at a time so that a busy machine slows all of them
alike:

* ``adamw``: ``optax.adamw``, the reference of every ratio;
* ``kl_optax``: ``kl_optax.kl_shampoo`` with its defaults;
* ``kl_optax (port's settings)``: the same recipe with the port's math
  (``init_factor=0.1``, no spike guard), whose losses must follow the port's;
* ``port``: ``kl_shampoo_jax.kl_shampoo_with_adamw`` with float32 compute (its
  default is bfloat16), KL-Shampoo on every matrix and AdamW on the vectors, as
  ``kl_optax`` routes them.

All four use the same schedule (warm-up, cosine decay) and weight decay 0.01.
Reported per width: median and p95 time of ordinary train steps and of refresh
train steps (every 10th step refreshes the bases), the refresh/ordinary ratio, the
train step's compile time (median of ``--compile-repeats`` fresh compiles), XLA's
scratch memory of the train step and the optimizer-state bytes, each also as a
ratio to AdamW; and the largest difference between the train losses of
``kl_optax (port's settings)`` and the port. The train step takes the parameters
and the optimizer state as donated buffers, as training loops do (``--no-donate``:
not). With ``--join-gradients`` every optimizer's update waits for the whole
backward pass (an optimization barrier on the gradients), as this package's
stacks of same-shape tensors do anyway: on a CPU the port's per-leaf updates
otherwise start while the backward pass is still running. Writes
``results.json`` and ``results.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import kl_optax
from kl_optax import models
from kl_optax.benchmarks import harness, workload
from kl_optax.benchmarks.gpu import step_times
from kl_optax.benchmarks.harness import warmup_cosine

__all__ = ["joined", "main", "port_optimizer"]

PERIOD = 10  # both refresh their bases every 10th step
INSTALL = "pip install git+https://github.com/bentherien/kl_shampoo_jax"


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  workload.add_arguments(p, layers=2, context=64, batch=16, steps=200)
  p.add_argument("--widths", default="128,256", help="comma-separated d_model values")
  p.add_argument("--learning-rate", type=float, default=4e-3)
  p.add_argument("--compile-repeats", type=int, default=3)
  p.add_argument("--no-donate", action="store_true",
                 help="do not donate the parameters and the optimizer state to the train step")
  p.add_argument("--join-gradients", action="store_true",
                 help="start every update after the whole backward pass (optimization barrier)")
  p.add_argument("--out", default="runs/port")
  return p.parse_args(argv)


def port_optimizer(schedule, weight_decay: float = 0.01) -> optax.GradientTransformation:
  """The port's KL-Shampoo + AdamW at the paper's settings with float32 compute."""
  try:
    import kl_shampoo_jax  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise SystemExit(f"this benchmark needs the port kl_shampoo_jax, which is not installed "
                     f"(it is not a dependency of kl_optax): {INSTALL}") from e
  return kl_shampoo_jax.kl_shampoo_with_adamw(
      schedule, weight_decay=weight_decay,
      kl_kwargs={"b1": 0.9, "shampoo_b": 0.98, "eps": 1e-8, "precondition_frequency": PERIOD,
                 "init_factor": 0.1, "max_clamp_value": 4000, "cast_dtype": jnp.float32})


def _optimizers(schedule) -> dict[str, optax.GradientTransformation]:
  return {
      "adamw": optax.adamw(schedule, weight_decay=0.01),
      "kl_optax": kl_optax.kl_shampoo(schedule, weight_decay=0.01,
                                      precondition_frequency=PERIOD),
      "kl_optax (port's settings)": kl_optax.kl_shampoo(
          schedule, weight_decay=0.01, precondition_frequency=PERIOD, init_factor=0.1,
          spike_threshold=None),
      "port": port_optimizer(schedule),
  }


def joined(tx) -> optax.GradientTransformation:
  """``tx`` whose update starts once every gradient is computed."""

  def update(updates, state, params=None):
    return tx.update(jax.lax.optimization_barrier(updates), state, params)

  return optax.GradientTransformation(tx.init, update)


def _compile(setup, tx, params, state, batch, donate: bool = True):
  """A fresh jit of the train step, compiled; returns (compiled, seconds)."""
  step = harness.train_step(setup, tx)  # a new function each time: no cache hit
  t0 = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=(0, 1) if donate else ()).lower(
      params, state, setup.rest, *batch).compile()
  return compiled, time.perf_counter() - t0


def _width(args, d_model: int) -> dict:
  ns = argparse.Namespace(**{**vars(args), "d_model": d_model})
  work = workload.from_args(ns)
  setup = harness.make_setup(work.model(), models.loss_fn)
  txs = _optimizers(warmup_cosine(args.learning_rate, args.steps))
  if args.join_gradients:
    txs = {name: joined(tx) for name, tx in txs.items()}
  runs = {}
  for name, tx in txs.items():
    state = tx.init(setup.params)
    compiles = []
    for _ in range(max(1, args.compile_repeats)):
      compiled, seconds = _compile(setup, tx, setup.params, state, work.batches(0),
                                   donate=not args.no_donate)
      compiles.append(seconds)
    runs[name] = {"step": compiled, "params": jax.tree.map(jnp.copy, setup.params),
                  "state": state, "compile_s": statistics.median(compiles),
                  "memory": harness.memory(compiled), "state_bytes": harness.state_bytes(state),
                  "seconds": [], "loss": []}
  for start in range(0, args.steps, PERIOD):  # interleaved, ten steps at a time
    for run in runs.values():
      for i in range(start, min(start + PERIOD, args.steps)):
        x, y = work.batches(i)
        t0 = time.perf_counter()
        run["params"], run["state"], loss = run["step"](run["params"], run["state"],
                                                        setup.rest, x, y)
        run["loss"].append(float(loss))  # blocks
        run["seconds"].append(time.perf_counter() - t0)
  rows = []
  for name, run in runs.items():
    times = step_times(run["seconds"], None if name == "adamw" else PERIOD)
    rows.append({"d_model": d_model, "optimizer": name, "params": setup.num_params,
                 "compile_s": run["compile_s"], "temp_bytes": run["memory"]["temp"],
                 "state_bytes": run["state_bytes"], "final_loss": run["loss"][-1],
                 "loss": run["loss"], **times})
  gap = np.abs(np.subtract(runs["kl_optax (port's settings)"]["loss"], runs["port"]["loss"]))
  return {"rows": rows, "max_loss_gap": float(np.max(gap)), "steps": args.steps}


def _ratio(x, ref) -> str:
  return f"{x / ref:.2f}×" if x is not None and ref else "n/a"


def main(argv=None) -> dict:
  args = _parse(argv)
  if args.steps < 2 * PERIOD + 1:
    raise SystemExit(f"--steps must be at least {2 * PERIOD + 1} (two refreshes), got "
                     f"{args.steps}")
  widths = [int(w) for w in args.widths.split(",") if w.strip()]
  port_optimizer(1e-3)  # fail before any work when the port is missing
  device = jax.devices()[0]
  report = {"device": device.device_kind, "widths": {}}
  lines = [f"{device.device_kind}; character GPT, {args.layers} layers, context {args.context}, "
           f"batch {args.batch}, {args.steps} steps at peak learning rate "
           f"{args.learning_rate:g}; ratios to AdamW in the same process; parameters and "
           f"optimizer state {'not ' if args.no_donate else ''}donated"
           f"{'; every update starts after the whole backward pass' if args.join_gradients else ''}.",
           ""]
  for d_model in widths:
    out = _width(args, d_model)
    report["widths"][d_model] = out
    adamw = next(r for r in out["rows"] if r["optimizer"] == "adamw")
    lines += [f"d_model {d_model} ({adamw['params']:,} parameters); largest train-loss "
              f"difference, kl_optax (port's settings) vs port, over {out['steps']} steps: "
              f"{out['max_loss_gap']:.2e}", "",
              "| optimizer | ordinary step ms (p95) | × AdamW | refresh step ms (p95) | × AdamW "
              "| refresh / ordinary | compile s | × AdamW | scratch MiB | × AdamW | state MiB |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in out["rows"]:
      refresh = (f"{r['refresh_ms']:.1f} ({r['refresh_p95_ms']:.1f})" if r["refresh_ms"]
                 else "no refresh")
      lines.append(
          f"| {r['optimizer']} | {r['ordinary_ms']:.1f} ({r['ordinary_p95_ms']:.1f}) | "
          f"{_ratio(r['ordinary_ms'], adamw['ordinary_ms'])} | {refresh} | "
          f"{_ratio(r['refresh_ms'], adamw['ordinary_ms'])} | "
          f"{_ratio(r['refresh_ms'], r['ordinary_ms'])} | {r['compile_s']:.2f} | "
          f"{_ratio(r['compile_s'], adamw['compile_s'])} | {r['temp_bytes'] / 2**20:.1f} | "
          f"{_ratio(r['temp_bytes'], adamw['temp_bytes'])} | {r['state_bytes'] / 2**20:.2f} |")
    lines.append("")
    print("\n".join(lines[-len(out["rows"]) - 5:]), flush=True)
  rows = [{k: v for k, v in r.items() if k != "loss"}
          for out in report["widths"].values() for r in out["rows"]]
  harness.write_report(args.out, "kl_optax.benchmarks.port", argv, rows, lines)
  return report


if __name__ == "__main__":
  main()
