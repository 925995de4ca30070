"""The benchmark suite: every optimizer on every workload, under one protocol.

Usage:

    python -m kl_optax.benchmarks                    # quick: 2.7 minutes on a 2-core CPU
    python -m kl_optax.benchmarks --preset cpu       # full CPU protocol (40 minutes, 2 cores)
    python -m kl_optax.benchmarks --preset gpu       # larger models, for an accelerator
    python -m kl_optax.benchmarks --preset cpu --workloads digits_mlp --optimizers adamw,kl_shampoo

Workloads ([`kl_optax.benchmarks.tasks`][kl_optax.benchmarks.tasks]): a character GPT on Shakespeare,
an MLP and a CNN on real 8×8 handwritten digits, and stochastic Kronecker
regression. Optimizers ([`kl_optax.benchmarks.optimizers`][kl_optax.benchmarks.optimizers]): ``optax.adamw``,
``optax.contrib.muon`` and every recipe of the package.

Protocol (the conventions of Shampoo-family papers and peer libraries): every
optimizer gets the same schedule family (linear warm-up over 10% of the steps,
cosine decay to 10% of the peak) and the same tuning budget: a sweep of the peak learning rate over one
geometric grid per workload, extended on the side of an edge optimum (up to
``--max-extend`` points). The best learning rate (seed 0) is then rerun with
more seeds (the seed changes the initialization and the batch order). Reported
per optimizer, against ``optax.adamw`` measured in the same process:

* final validation loss (mean and standard deviation over seeds);
* steps and wall-clock to AdamW's final validation loss (the target), linearly
  interpolated on the seed-mean validation curve;
* median whole-train-step time and median optimizer-update time (≥ 20 calls
  after warm-up, ``block_until_ready`` around each), and compile time;
* optimizer-state bytes per parameter (from the state pytree), the train
  step's peak memory (XLA's memory analysis of the compiled step) and the
  optimizer update's FLOPs (XLA's cost analysis).

The ``quick`` preset skips the sweep: it runs each optimizer once at the best
learning rate that the ``cpu`` preset found ([`QUICK_LEARNING_RATES`][kl_optax.benchmarks.suite.QUICK_LEARNING_RATES]),
every optimizer on the digits MLP and AdamW, Muon and KL-Shampoo on the character
GPT, and does not time the optimizer update on its own.

Outputs in ``--out``: ``results.json`` (every run), ``results.md`` (tables),
and per workload ``<workload>.png`` (validation loss against steps and
wall-clock, step-time and memory bars).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
import platform
import statistics
import sys
import time

import jax
import numpy as np
from tqdm.auto import tqdm

import kl_optax
from kl_optax.benchmarks import harness, tasks
from kl_optax.benchmarks.optimizers import OPTIMIZERS, make_optimizer

__all__ = ["PRESETS", "QUICK_LEARNING_RATES", "main", "steps_to_target"]

KL_RECIPES = tuple(name for name, spec in kl_optax.RECIPES.items() if spec.kl)

# Peak learning-rate grids (factor 2 apart), the same for every optimizer of a workload.
LR_GRIDS = {
    "char_gpt": (2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2),
    "digits_mlp": (1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2),
    "digits_cnn": (1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2),
    "kron_regression": (4e-3, 1.6e-2, 6.4e-2, 2.56e-1, 1.024),
}

# Best peak learning rates found by ``--preset cpu`` (docs/benchmarks.md).
# The baselines' values are here; the recipes' are in their rows of kl_optax.RECIPES.
QUICK_LEARNING_RATES = {
    workload: {**baselines, **{name: spec.learning_rates[workload]
                               for name, spec in kl_optax.RECIPES.items()
                               if workload in spec.learning_rates}}
    for workload, baselines in {
        "char_gpt": {"adamw": 4e-3, "muon": 3.2e-2},
        "digits_mlp": {"adamw": 3.2e-2, "muon": 1.6e-2},
        "kron_regression": {"adamw": 0.256, "muon": 0.256},
    }.items()
}


@dataclasses.dataclass(frozen=True)
class Preset:
  size: str
  workloads: tuple[str, ...]
  optimizers: tuple[str, ...]
  steps: int
  seeds: int
  sweep: bool
  timing_calls: int = 30
  # Per workload, the optimizers when they differ from ``optimizers``.
  per_workload: tuple[tuple[str, tuple[str, ...]], ...] = ()

  def optimizers_for(self, workload: str) -> tuple[str, ...]:
    return dict(self.per_workload).get(workload, self.optimizers)


ALL_OPTIMIZERS = ("adamw", "muon", *kl_optax.RECIPES)

PRESETS = {
    # 2.7 minutes on a 2-core CPU: every optimizer on the digits MLP; AdamW, Muon and
    # KL-Shampoo on the character GPT (its Kronecker train steps take ~10 s each to compile).
    "quick": Preset("cpu", ("digits_mlp", "char_gpt"), ALL_OPTIMIZERS, 300, 1, False,
                    timing_calls=0,
                    per_workload=(("char_gpt", ("adamw", "muon", "kl_shampoo")),)),
    "cpu": Preset("cpu", tuple(tasks.TASKS), ALL_OPTIMIZERS, 300, 3, True),
    "gpu": Preset("gpu", tuple(tasks.TASKS), ALL_OPTIMIZERS, 2000, 3, True),
    "tiny": Preset("tiny", tuple(tasks.TASKS), ALL_OPTIMIZERS, 8, 2, True),
}


def _init_factor(value: str):
  try:
    return float(value)
  except ValueError:
    return value


SHORT_RUN_INIT_FACTOR = 1e-3  # for recipes whose default start is a constant


def default_start(base: str):
  """The suite's init_factor for a KL recipe when none is given (see --kl-init-factor)."""
  default = inspect.signature(kl_optax.RECIPES[base].constructor).parameters["init_factor"].default
  return None if isinstance(default, str) else SHORT_RUN_INIT_FACTOR


def _parse(argv):
  p = argparse.ArgumentParser(prog="python -m kl_optax.benchmarks",
                              description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", choices=sorted(PRESETS), default="quick",
                 help="sizes, workloads, optimizers, steps, seeds and whether to sweep (default: quick)")
  p.add_argument("--workloads", help=f"comma-separated subset of {sorted(tasks.TASKS)}")
  p.add_argument("--optimizers",
                 help=f"comma-separated subset of {sorted(OPTIMIZERS)}; 'name@key=value' passes "
                      "keyword arguments (e.g. kl_shampoo@init_factor=0.1)")
  p.add_argument("--steps", type=int, help="optimizer steps per run")
  p.add_argument("--seeds", type=int, help="seeds at the best learning rate")
  p.add_argument("--lrs", help="comma-separated peak learning rates replacing every workload's grid")
  p.add_argument("--max-extend", type=int, default=2,
                 help="grid points added beyond an edge optimum (default 2)")
  p.add_argument("--evals", type=int, default=20, help="validation evaluations per run")
  p.add_argument("--timing-calls", type=int, default=None,
                 help="calls of the optimizer update timed on its own, after compiling it "
                      "separately (0: skip; default 30, 0 for the quick preset)")
  p.add_argument("--kl-init-factor", type=_init_factor, default=None,
                 help="init_factor of kl_shampoo, kl_soap and pro_kl_shampoo: a number or a rule "
                      "name. Default: each recipe's own start where it is a rule (kl_shampoo: "
                      "'spectrum'), 1e-3 where it is the paper's constant 0.1, which is meant "
                      "for runs of thousands of steps")
  p.add_argument("--out", default="runs/benchmarks")
  p.add_argument("--no-plots", action="store_true")
  p.add_argument("--no-progress", action="store_true")
  p.add_argument("--replot", metavar="DIR",
                 help="only rewrite results.md and the plots from DIR/results.json")
  return p.parse_args(argv)


def replot(out: str) -> dict:
  """Rewrites ``results.md`` and the plots of ``out`` from its ``results.json``."""
  with open(os.path.join(out, "results.json")) as f:
    report = json.load(f)
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(markdown(report))
  for workload, w in report["workloads"].items():
    plot(os.path.join(out, f"{workload}.png"), workload, w)
  return report


def steps_to_target(steps, losses, target: float) -> float | None:
  """First step at which ``losses`` (measured at ``steps``) reach ``target``, interpolated linearly.

  >>> steps_to_target([10, 20, 30], [3.0, 2.0, 1.0], 1.5)
  25.0
  >>> steps_to_target([10, 20], [3.0, 2.0], 1.0) is None
  True
  """
  prev = None
  for s, loss in zip(steps, losses):
    if not math.isfinite(loss):
      return None
    if loss <= target:
      if prev is None or prev[1] == loss:
        return float(s)
      s0, l0 = prev
      return s0 + (s - s0) * (l0 - target) / (l0 - loss)
    prev = (s, loss)
  return None


class _Runner:
  """Trains runs of one workload, caching a task per seed."""

  def __init__(self, workload, size, steps, evals, bar, kl_init_factor):
    self.workload, self.size, self.steps = workload, size, steps
    self.eval_every = max(1, steps // evals)
    self.bar, self.kl_init_factor = bar, kl_init_factor
    self._tasks: dict[int, tasks.Task] = {}

  def task(self, seed: int) -> tasks.Task:
    if seed not in self._tasks:
      self._tasks[seed] = tasks.make_task(self.workload, self.size, seed)
    return self._tasks[seed]

  def optimizer_kwargs(self, name: str, seed: int = 0) -> tuple[str, dict]:
    base, kwargs = harness.parse_variant(name)
    return base, {**self.task(seed).optimizer_kwargs.get(base, {}), **kwargs}

  def optimizer(self, name: str, lr: float, seed: int = 0):
    base, kwargs = self.optimizer_kwargs(name, seed)
    task = self.task(seed)
    if base in KL_RECIPES:
      start = self.kl_init_factor if self.kl_init_factor is not None else default_start(base)
      if start is not None:
        kwargs.setdefault("init_factor", start)
    if base != "adamw":
      kwargs.setdefault("adam_leaves", task.adam_leaves)
    return make_optimizer(base, lr, self.steps, **kwargs)

  def run(self, name: str, lr: float, seed: int) -> dict:
    task = self.task(seed)
    self.bar.set_description(f"{self.workload} {name} lr={lr:.3g} seed={seed}")

    def progress(step, loss):
      self.bar.update(1)
      if step % 25 == 0:
        self.bar.set_postfix(loss=f"{loss:.3f}")

    run = harness.train(task.setup, self.optimizer(name, lr, seed), task.batches, task.val,
                        self.steps, name=name, learning_rate=lr, eval_every=self.eval_every,
                        progress=progress)
    self.bar.update(self.steps - len(run.step_seconds))  # a diverged run stops early
    out = run.to_json()
    out["seed"] = seed
    return out


def _sweep(runner: _Runner, name: str, grid: list[float], max_extend: int) -> list[dict]:
  results: dict[float, dict] = {}
  extensions = 0
  while True:
    for lr in grid:
      if lr not in results:
        results[lr] = runner.run(name, lr, seed=0)
    finals = [math.inf if results[lr]["diverged"] else results[lr]["final_val"] for lr in grid]
    nxt = harness.extend_grid(grid, int(np.argmin(finals)))
    if nxt is None or extensions >= max_extend or all(math.isinf(f) for f in finals):
      return [results[lr] for lr in grid]
    grid = sorted(grid + [nxt])
    runner.bar.total += runner.steps
    runner.bar.refresh()
    extensions += 1


def _mean_curve(runs: list[dict]) -> tuple[list[int], list[float]]:
  ok = [r for r in runs if not r["diverged"]]
  if not ok:
    return [], []
  steps = ok[0]["eval_steps"]
  return steps, [float(np.mean([r["val_loss"][i] for r in ok])) for i in range(len(steps))]


def refresh_period(name: str, kwargs: dict | None = None) -> int | None:
  """How often the optimizer ``name`` refreshes its bases (``None``: it never does).

  >>> refresh_period("kl_shampoo"), refresh_period("soap", {"precondition_frequency": 5})
  (10, 5)
  >>> refresh_period("adamw") is None
  True
  """
  if name not in kl_optax.RECIPES:
    return None
  if kwargs and "precondition_frequency" in kwargs:
    return int(kwargs["precondition_frequency"])
  params = inspect.signature(kl_optax.RECIPES[name].constructor).parameters
  return int(params["precondition_frequency"].default)


def step_statistics(step_seconds: list[float], period: int | None) -> dict:
  """Median and 95th-percentile step time, and refresh steps against the others.

  The first step (the initialization, with its decompositions) is left out. With
  a refresh ``period``, steps ``t`` (0-based, as the optimizer counts its updates)
  with ``t mod period == 0`` are refresh steps; ``refresh_ratio`` is their median
  time over the median of the other steps.

  >>> s = step_statistics([9.0] + [1.0] * 9 + [4.0] + [1.0] * 9, period=10)
  >>> s["refresh_ratio"], s["median_ms"]
  (4.0, 1000.0)
  """
  times = np.asarray(step_seconds[1:], dtype=float)
  out = {"median_ms": float(1e3 * np.median(times)) if times.size else math.nan,
         "p95_ms": float(1e3 * np.percentile(times, 95)) if times.size else math.nan,
         "refresh_ms": None, "ordinary_ms": None, "refresh_ratio": None}
  if period and times.size > period:
    t = np.arange(1, len(step_seconds))
    refresh, ordinary = times[t % period == 0], times[t % period != 0]
    out.update(refresh_ms=float(1e3 * np.median(refresh)),
               ordinary_ms=float(1e3 * np.median(ordinary)))
    out["refresh_ratio"] = out["refresh_ms"] / out["ordinary_ms"]
  return out


def _wallclock(run: dict) -> list[float]:
  """Cumulative train-step seconds at each evaluation (compile and evaluation excluded)."""
  cum = np.cumsum(run["step_seconds"])
  return [float(cum[s - 1]) for s in run["eval_steps"]]


def _summarize(runner: _Runner, name: str, sweep: list[dict], seeds: list[dict],
               timing_calls: int) -> dict:
  valid = [r for r in sweep if not r["diverged"]]
  best = min(valid, key=lambda r: r["final_val"]) if valid else sweep[0]
  runs = [best] + seeds
  finals = [r["final_val"] if not r["diverged"] else math.nan for r in runs]
  lr = best["learning_rate"]
  task = runner.task(0)
  if timing_calls > 0:
    upd, flops = harness.update_cost(runner.optimizer(name, lr), task.setup, task.batches(0),
                                     timing_calls)
  else:  # not measured (the quick preset saves the update's second compilation)
    upd, flops = math.nan, math.nan
  lrs = [r["learning_rate"] for r in sweep]
  curve_steps, curve_val = _mean_curve(runs)
  base, kwargs = runner.optimizer_kwargs(name)
  period = refresh_period(base, kwargs)
  per_run = [step_statistics(r["step_seconds"], period) for r in runs if not r["diverged"]] or [
      step_statistics(runs[0]["step_seconds"], period)]
  pooled = lambda key: (None if per_run[0][key] is None
                        else statistics.median(p[key] for p in per_run))
  return {
      "best_lr": lr,
      "edge_optimum": len(sweep) > 1 and lr in (min(lrs), max(lrs)),
      "final_val": float(np.mean(finals)),
      "final_val_std": float(np.std(finals)) if len(finals) > 1 else 0.0,
      "final_val_seeds": finals,
      "diverged_seeds": sum(r["diverged"] for r in runs),
      "step_ms": 1e3 * statistics.median(r["median_step"] for r in runs),
      "p95_step_ms": pooled("p95_ms"),
      "refresh_period": period,
      "refresh_step_ms": pooled("refresh_ms"),
      "refresh_ratio": pooled("refresh_ratio"),
      "update_ms": 1e3 * upd,
      "update_mflops": flops / 1e6,
      "compile_s": statistics.median(r["compile_seconds"] for r in runs),
      "state_bytes_per_param": best["state_bytes"] / task.setup.num_params,
      "peak_mib": best["step_memory"].get("peak", -1) / 2**20,
      "temp_mib": best["step_memory"].get("temp", -1) / 2**20,
      "curve_steps": curve_steps,
      "curve_val": curve_val,
      "curve_seconds": [float(np.mean(c)) for c in zip(*(_wallclock(r) for r in runs
                                                          if not r["diverged"]))],
      "sweep": [{"lr": r["learning_rate"], "final_val": r["final_val"], "diverged": r["diverged"]}
                for r in sweep],
  }


def _relative(summary: dict) -> None:
  """Adds ratios to AdamW and the steps/time to AdamW's final loss."""
  if "adamw" not in summary:
    return
  base = summary["adamw"]
  target = base["final_val"]
  for s in summary.values():
    for key in ("step_ms", "update_ms", "compile_s", "peak_mib"):
      s[f"{key}_vs_adamw"] = s[key] / base[key] if base[key] > 0 else math.nan
    s["target"] = target
    reached = steps_to_target(s["curve_steps"], s["curve_val"], target)
    s["steps_to_target"] = reached
    # Measured: the seed-mean cumulative train-step time, interpolated on the same curve.
    s["seconds_to_target"] = steps_to_target(s["curve_seconds"], s["curve_val"], target)
    # An estimate beside it: steps × the median step time (hides slow refresh steps).
    s["seconds_to_target_median"] = None if reached is None else reached * s["step_ms"] / 1e3
  base_steps, base_seconds = base["steps_to_target"], base["seconds_to_target"]
  for s in summary.values():
    s["steps_to_target_vs_adamw"] = (s["steps_to_target"] / base_steps
                                     if s["steps_to_target"] and base_steps else None)
    s["seconds_to_target_vs_adamw"] = (s["seconds_to_target"] / base_seconds
                                       if s["seconds_to_target"] and base_seconds else None)


def _fmt(value, spec=".2f", missing="—"):
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    return missing
  return format(value, spec)


def _with_unit(value, unit: str, missing: str = "—", spec: str = ".2f") -> str:
  text = _fmt(value, spec, missing)
  return text if text == missing else text + unit


def markdown(report: dict) -> str:
  """The results as Markdown: one table per workload, then the sweeps."""
  lines = [f"Device: {report['device']}; JAX {report['jax']}; preset `{report['preset']}`; "
           f"{report['steps']} steps; {report['seeds']} seed(s) at the best learning rate.", "",
           f"Command: `{report['command']}`", ""]
  for workload, w in report["workloads"].items():
    lines += [f"### {workload}", "", w["description"] + ".", "",
              "| optimizer | peak lr | val loss | steps to AdamW's loss (× AdamW) "
              "| time to it, measured (× AdamW) | steps × median step | step ms (× AdamW) "
              "| p95 step ms | refresh / ordinary step | update ms (× AdamW) "
              "| compile s (× AdamW) | update MFLOPs | state B/param | peak MiB (× AdamW) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in w["summary"].items():
      val = _fmt(s["final_val"], ".4f")
      if len(s["final_val_seeds"]) > 1:
        val += f" ± {_fmt(s['final_val_std'], '.4f')}"
      if s["diverged_seeds"]:
        val += f" ({s['diverged_seeds']} diverged)"
      lines.append(
          f"| {name} | {s['best_lr']:.3g}{' (edge)' if s['edge_optimum'] else ''} | {val} "
          f"| {_fmt(s.get('steps_to_target'), '.0f', 'not reached')} "
          f"({_fmt(s.get('steps_to_target_vs_adamw'))}) "
          f"| {_with_unit(s.get('seconds_to_target'), ' s', 'not reached')} "
          f"({_fmt(s.get('seconds_to_target_vs_adamw'))}) "
          f"| {_with_unit(s.get('seconds_to_target_median'), ' s')} "
          f"| {s['step_ms']:.2f} ({_fmt(s.get('step_ms_vs_adamw'))}) "
          f"| {_fmt(s.get('p95_step_ms'), '.2f')} | {_fmt(s.get('refresh_ratio'), '.1f')} "
          f"| {_fmt(s['update_ms'], '.3f')} ({_fmt(s.get('update_ms_vs_adamw'))}) "
          f"| {s['compile_s']:.2f} ({_fmt(s.get('compile_s_vs_adamw'))}) "
          f"| {_fmt(s['update_mflops'], '.2f')} | {s['state_bytes_per_param']:.2f} "
          f"| {_fmt(s['peak_mib'], '.1f')} ({_fmt(s.get('peak_mib_vs_adamw'))}) |")
    lines.append("")
    if any(len(s["sweep"]) > 1 for s in w["summary"].values()):
      lines += ["Learning-rate sweeps (seed 0; peak lr → final validation loss):", ""]
      for name, s in w["summary"].items():
        cells = ", ".join(f"{r['lr']:.3g} → {'diverged' if r['diverged'] else format(r['final_val'], '.4f')}"
                          for r in s["sweep"])
        lines.append(f"- {name}: {cells}")
      lines.append("")
  return "\n".join(lines)


def plot(path: str, workload: str, w: dict) -> None:
  """Validation loss against steps and wall-clock; step-time and memory bars."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  summary = w["summary"]
  names = list(summary)
  colors = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}
  fig, axes = plt.subplots(2, 2, figsize=(12, 8))
  (a_step, a_time), (a_bar_t, a_bar_m) = axes
  for name, s in summary.items():
    if not s["curve_steps"]:
      continue
    label = f"{name} ({s['final_val']:.3f})"
    a_step.plot(s["curve_steps"], s["curve_val"], marker=".", color=colors[name], label=label)
    a_time.plot(s["curve_seconds"], s["curve_val"], marker=".", color=colors[name], label=name)
  for ax, xlabel in ((a_step, "step"), (a_time, "train-step wall-clock (s)")):
    if "adamw" in summary:
      ax.axhline(summary["adamw"]["final_val"], color="gray", ls=":", lw=1)
    finite = [v for s in summary.values() for v in s["curve_val"] if math.isfinite(v)]
    if finite:
      lo, hi = min(finite), float(np.percentile(finite, 90))
      if lo > 0 and hi / lo > 5:  # losses spanning decades (the regression): log scale
        ax.set_yscale("log")
        ax.set_ylim(0.9 * lo, max(finite))
      elif hi > lo:
        ax.set_ylim(lo - 0.05 * (hi - lo), hi)
    ax.set(xlabel=xlabel, ylabel="validation loss (seed mean)")
    ax.grid(alpha=0.3)
  a_step.set_title(f"{workload}: validation loss (dotted: AdamW's final)")
  a_step.legend(fontsize=8)
  a_time.set_title("against train-step time")
  x = np.arange(len(names))
  update_ms = [summary[n]["update_ms"] for n in names]
  if all(math.isnan(v) for v in update_ms):  # not measured (the quick preset)
    a_bar_t.bar(x, [summary[n]["step_ms"] for n in names], 0.6, label="train step")
  else:
    a_bar_t.bar(x - 0.2, [summary[n]["step_ms"] for n in names], 0.4, label="train step")
    a_bar_t.bar(x + 0.2, update_ms, 0.4, label="optimizer update")
  a_bar_t.set(ylabel="ms (median)", title="time per step")
  a_bar_m.bar(x - 0.2, [summary[n]["state_bytes_per_param"] for n in names], 0.4,
              label="optimizer state (bytes/param)")
  twin = a_bar_m.twinx()
  twin.bar(x + 0.2, [summary[n]["peak_mib"] for n in names], 0.4, color="tab:orange",
           label="train-step peak (MiB)")
  a_bar_m.set(ylabel="bytes per parameter", title="memory")
  twin.set_ylabel("MiB")
  # Headroom above the bars of both axes, so that the legend covers none of them.
  for ax in (a_bar_m, twin):
    top = max([b.get_height() for b in ax.patches] + [1e-9])
    ax.set_ylim(0, 1.35 * top)
  handles = a_bar_m.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
  a_bar_m.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="upper left", ncol=2)
  for ax in (a_bar_t, a_bar_m):
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.grid(alpha=0.3, axis="y")
  a_bar_t.legend(fontsize=8, loc="upper left", ncol=2)
  a_bar_t.set_ylim(0, 1.35 * max([b.get_height() for b in a_bar_t.patches if np.isfinite(b.get_height())] + [1e-9]))
  fig.suptitle(w["description"], fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def summary_lines(report: dict) -> list[str]:
  """A short plain-text table per workload: what a first run should show."""
  lines = []
  for workload, w in report["workloads"].items():
    summary = w["summary"]
    target = summary.get("adamw", {}).get("final_val")
    lines += ["", f"{workload}: {w['description']}"]
    if target is not None:
      lines.append(f"  target: AdamW's final validation loss, {target:.4f}")
    header = (f"  {'optimizer':<16s} {'val loss':>9s} {'steps to target':>16s} "
              f"{'time to target':>15s} {'step time':>10s} {'state':>12s}")
    lines += [header, "  " + "-" * (len(header) - 2)]
    ranked = sorted(summary.items(), key=lambda kv: (math.isnan(kv[1]["final_val"]),
                                                      kv[1]["final_val"]))
    for name, s in ranked:
      reached = s.get("steps_to_target")
      steps = "not reached" if reached is None else f"{reached:.0f}"
      seconds = _with_unit(s.get("seconds_to_target"), " s", "not reached", ".1f")
      if name != "adamw" and target is not None:
        if reached is not None:
          steps += f" ({_fmt(s.get('steps_to_target_vs_adamw'))}×)"
        if s.get("seconds_to_target") is not None:
          seconds += f" ({_fmt(s.get('seconds_to_target_vs_adamw'))}×)"
      ratio = "" if target is None else f"{_fmt(s.get('step_ms_vs_adamw'))}×"
      lines.append(f"  {name:<16s} {_fmt(s['final_val'], '.4f'):>9s} {steps:>16s} {seconds:>15s} "
                   f"{ratio:>10s} {s['state_bytes_per_param']:>6.1f} B/par")
  if any("adamw" in w["summary"] for w in report["workloads"].values()):
    lines += ["", "Steps and time to target: when the optimizer's seed-mean validation curve first "
              "reaches AdamW's final loss (time: measured train-step wall-clock); step time: "
              "median train step as a multiple of AdamW's; state: optimizer-state bytes per "
              "parameter."]
  return lines


def _print_summary(report: dict) -> None:
  print("\n".join(["", "Summary (validation loss: mean over seeds)"] + summary_lines(report)))


def main(argv=None) -> dict:
  """Runs the suite and writes ``results.json``, ``results.md`` and the plots to ``--out``."""
  args = _parse(argv)
  if args.replot:
    report = replot(args.replot)
    _print_summary(report)
    return report
  preset = PRESETS[args.preset]
  workloads = args.workloads.split(",") if args.workloads else list(preset.workloads)
  for w in workloads:
    if w not in tasks.TASKS:
      raise SystemExit(f"unknown workload {w!r}; known: {sorted(tasks.TASKS)}")

  def optimizers_for(workload):
    names = (args.optimizers.split(",") if args.optimizers
             else list(preset.optimizers_for(workload)))
    for n in names:
      if harness.parse_variant(n)[0] not in OPTIMIZERS:
        raise SystemExit(f"unknown optimizer {harness.parse_variant(n)[0]!r}; "
                         f"known: {sorted(OPTIMIZERS)}")
    if "adamw" in names:  # AdamW first: it sets the target
      names = ["adamw"] + [n for n in names if n != "adamw"]
    return names

  names_by_workload = {w: optimizers_for(w) for w in workloads}
  steps = args.steps or preset.steps
  timing_calls = args.timing_calls if args.timing_calls is not None else preset.timing_calls
  seeds = args.seeds or preset.seeds
  lrs = [float(v) for v in args.lrs.split(",")] if args.lrs else None
  sweep = preset.sweep or lrs is not None

  def grid(workload, name):
    if lrs is not None:
      return sorted(lrs)
    if sweep:
      return list(LR_GRIDS[workload])
    try:  # a variant (name@key=value) runs at its recipe's tuned rate
      return [QUICK_LEARNING_RATES[workload][harness.parse_variant(name)[0]]]
    except KeyError:
      raise SystemExit(f"the quick preset has no tuned learning rate for {name!r} on {workload!r}; "
                       "pass --lrs or --preset cpu") from None

  grids = {(w, n): grid(w, n) for w in workloads for n in names_by_workload[w]}  # checks first
  os.makedirs(args.out, exist_ok=True)
  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPU cores); JAX {jax.__version__}; preset {args.preset}: "
        f"{len(grids)} optimizer–workload pairs, {steps} steps per run, {seeds} seed(s)",
        flush=True)
  total = steps * sum(len(g) + seeds - 1 for g in grids.values())
  report = {
      "command": "python -m kl_optax.benchmarks " + " ".join(sys.argv[1:] if argv is None else argv),
      "device": device.device_kind, "platform": device.platform, "cpu_count": os.cpu_count(),
      "jax": jax.__version__, "kl_optax": kl_optax.__version__, "preset": args.preset,
      "steps": steps, "seeds": seeds, "kl_init_factor": args.kl_init_factor, "workloads": {},
  }
  t_start = time.perf_counter()
  with tqdm(total=total, unit="step", disable=args.no_progress, dynamic_ncols=True,
            smoothing=0.05) as bar:
    for workload in workloads:
      runner = _Runner(workload, preset.size, steps, args.evals, bar, args.kl_init_factor)
      summary, runs = {}, {}
      for name in names_by_workload[workload]:
        sweep_runs = _sweep(runner, name, grids[workload, name], args.max_extend)
        valid = [r for r in sweep_runs if not r["diverged"]] or sweep_runs
        best_lr = min(valid, key=lambda r: r["final_val"])["learning_rate"]
        seed_runs = [runner.run(name, best_lr, seed) for seed in range(1, seeds)]
        summary[name] = _summarize(runner, name, sweep_runs, seed_runs, timing_calls)
        runs[name] = sweep_runs + seed_runs
        tqdm.write(f"{workload:>16s} {name:>16s}: lr {best_lr:<8.3g} val "
                   f"{summary[name]['final_val']:.4f}  step {summary[name]['step_ms']:.2f} ms",
                   file=sys.stdout)
      _relative(summary)
      task = runner.task(0)
      report["workloads"][workload] = {
          "description": task.description, "params": task.setup.num_params,
          "summary": summary, "runs": runs}
      with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(report, f, indent=1)
      if not args.no_plots:
        plot(os.path.join(args.out, f"{workload}.png"), workload, report["workloads"][workload])
  report["seconds"] = time.perf_counter() - t_start
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(report, f, indent=1)
  with open(os.path.join(args.out, "results.md"), "w") as f:
    f.write(markdown(report))
  _print_summary(report)
  print(f"\n{report['seconds'] / 60:.1f} min; results in {args.out}/ (results.json, results.md"
        f"{', ' + ', '.join(w + '.png' for w in workloads) if not args.no_plots else ''})")
  return report
