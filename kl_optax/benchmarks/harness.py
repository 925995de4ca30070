"""Training, evaluation, timing and memory accounting for optimizer comparisons.

Everything is jitted functional JAX around a Flax NNX model split into its
graph definition and parameter state, so the step being timed contains the
forward pass, the backward pass and the optimizer update and nothing else.

Timing follows the benchmark protocol: ``block_until_ready`` around each timed
call, the median of at least 20 calls after a warm-up, and optimizers compared
by their ratio to ``optax.adamw`` measured in the same process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

__all__ = [
    "COMPUTE",
    "RunResult",
    "TrainSetup",
    "cost",
    "extend_grid",
    "make_setup",
    "median_time",
    "memory",
    "parse_variant",
    "per_device_bytes",
    "state_bytes",
    "train",
    "train_step",
    "update_cost",
    "warmup_cosine",
    "write_report",
]


# The compute settings of the Kronecker recipes the benchmarks compare, as
# `kl_optax.Layout` keywords: float32 at HIGHEST (the default), TF32 on NVIDIA
# GPUs (a CPU ignores it), bfloat16 operands with float32 accumulation.
COMPUTE = {"float32": {}, "high": {"matmul_precision": "high"},
           "bfloat16": {"compute_dtype": "bfloat16"}}


def write_report(out: str, module: str, argv, rows: list[dict], lines: list[str],
                 *, quiet: bool = False) -> None:
  """Prints ``lines`` (a markdown table) and writes ``results.md`` and ``results.json`` to ``out``.

  The JSON holds the command that reproduces the run (``python -m <module> <argv>``),
  the device, the JAX version and ``rows``. ``quiet`` writes without printing.
  """
  if not quiet:
    print("\n".join(lines))
  os.makedirs(out, exist_ok=True)
  args = sys.argv[1:] if argv is None else argv
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump({"command": " ".join(["python -m", module, *args]),
               "device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": rows},
              f, indent=1)
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")


def warmup_cosine(peak: float, steps: int, warmup_frac: float = 0.1,
                  final_frac: float = 0.1) -> optax.Schedule:
  """Linear warm-up to ``peak`` then cosine decay to ``final_frac · peak``."""
  warmup = max(1, int(round(warmup_frac * steps)))
  return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, steps, final_frac * peak)


def state_bytes(tree) -> int:
  """Total bytes of the arrays in a pytree (works on ``ShapeDtypeStruct`` too)."""
  return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def per_device_bytes(tree) -> tuple[int, int]:
  """(bytes on the fullest device, total bytes) of the arrays of ``tree``, from their shards."""
  per_device: dict = {}
  total = 0
  for leaf in jax.tree.leaves(tree):
    total += leaf.nbytes
    for shard in leaf.addressable_shards:
      per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
  return max(per_device.values()), total


def median_time(fn: Callable[[], Any], repeats: int = 20, warmup: int = 3) -> float:
  """Median wall-clock seconds of ``fn()`` (its result is blocked on)."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


@dataclasses.dataclass
class TrainSetup:
  """A model split for functional training, plus its jitted loss."""

  graphdef: Any
  params: Any
  rest: Any
  loss: Callable  # (params, rest, inputs, targets) -> scalar

  @property
  def num_params(self) -> int:
    return int(sum(x.size for x in jax.tree.leaves(self.params)))


def make_setup(model: nnx.Module, loss_fn: Callable) -> TrainSetup:
  """Splits ``model`` into graph, parameters and other state."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params, rest, inputs, targets):
    return loss_fn(nnx.merge(graphdef, params, rest), inputs, targets)

  return TrainSetup(graphdef, params, rest, loss)


@dataclasses.dataclass
class RunResult:
  """What one training run measured."""

  name: str
  learning_rate: float
  steps: list[int]
  train_loss: list[float]
  eval_steps: list[int]
  val_loss: list[float]
  step_seconds: list[float]
  compile_seconds: float
  state_bytes: int
  diverged: bool = False
  step_memory: dict[str, int] = dataclasses.field(default_factory=dict)
  step_cost: dict[str, float] = dataclasses.field(default_factory=dict)

  @property
  def final_val(self) -> float:
    return self.val_loss[-1] if self.val_loss else float("nan")

  @property
  def median_step(self) -> float:
    timed = self.step_seconds[3:] if len(self.step_seconds) > 23 else self.step_seconds
    return statistics.median(timed) if timed else float("nan")

  def to_json(self) -> dict:
    out = dataclasses.asdict(self)
    out["final_val"] = self.final_val
    out["median_step"] = self.median_step
    return out


def train_step(setup: TrainSetup, tx: optax.GradientTransformation) -> Callable:
  """The function ``step(params, opt_state, rest, inputs, targets) -> (params, opt_state,
  loss)`` the benchmarks jit: one optimizer step on ``setup.loss`` (a new function on
  every call, so that each ``jax.jit`` of it compiles afresh)."""
  def step(params, opt_state, rest, inputs, targets):
    loss, grads = jax.value_and_grad(setup.loss)(params, rest, inputs, targets)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return step


def train(
    setup: TrainSetup,
    tx: optax.GradientTransformation,
    batches: Callable[[int], tuple[np.ndarray, np.ndarray]],
    val_batches: Sequence[tuple[np.ndarray, np.ndarray]],
    steps: int,
    *,
    name: str = "",
    learning_rate: float = float("nan"),
    eval_every: int = 50,
    progress: Callable[[int, float], None] | None = None,
) -> RunResult:
  """Trains from ``setup.params`` for ``steps`` steps and evaluates on ``val_batches``.

  Args:
    setup: the split model (its parameters are not modified).
    tx: the optimizer.
    batches: ``step -> (inputs, targets)`` for training.
    val_batches: a fixed list of validation batches.
    steps: number of optimizer steps.
    name: label of the run.
    learning_rate: the peak learning rate (recorded only).
    eval_every: evaluate every this many steps (and after the last step).
    progress: optional ``(step, loss) -> None`` called after every step.

  Returns:
    A [`RunResult`][kl_optax.benchmarks.harness.RunResult] (its attribute ``opt_state`` holds the final optimizer
    state). A run whose loss becomes non-finite stops early and is marked
    ``diverged``.
  """

  eval_fn = jax.jit(setup.loss)
  params = jax.tree.map(jnp.copy, setup.params)
  opt_state = tx.init(params)
  x0, y0 = batches(0)
  t0 = time.perf_counter()
  step_fn = jax.jit(train_step(setup, tx), donate_argnums=(0, 1)).lower(
      params, opt_state, setup.rest, x0, y0).compile()
  compile_seconds = time.perf_counter() - t0

  def evaluate(p):
    return float(np.mean([eval_fn(p, setup.rest, x, y) for x, y in val_batches]))

  result = RunResult(name, float(learning_rate), [], [], [], [], [], compile_seconds,
                     state_bytes(opt_state), step_memory=memory(step_fn),
                     step_cost=cost(step_fn))
  for step in range(steps):
    x, y = batches(step)
    t0 = time.perf_counter()
    params, opt_state, loss = step_fn(params, opt_state, setup.rest, x, y)
    loss = float(loss)  # blocks
    result.step_seconds.append(time.perf_counter() - t0)
    result.steps.append(step + 1)
    result.train_loss.append(loss)
    if progress is not None:
      progress(step + 1, loss)
    if not np.isfinite(loss):
      result.diverged = True
      result.eval_steps.append(step + 1)
      result.val_loss.append(float("nan"))
      break
    if (step + 1) % eval_every == 0 or step + 1 == steps:
      result.eval_steps.append(step + 1)
      result.val_loss.append(evaluate(params))
  result.opt_state = opt_state
  return result


def update_cost(tx: optax.GradientTransformation, setup: TrainSetup, batch,
                calls: int = 20) -> tuple[float, float]:
  """(median seconds, XLA-counted FLOPs) of ``tx.update`` alone, after its initialization step.

  The FLOPs come from ``compiled.cost_analysis()``: a deterministic figure that
  shows an eigendecomposition or QR compiled into every step.
  """
  x, y = batch
  grads = jax.grad(setup.loss)(setup.params, setup.rest, x, y)
  state = tx.init(setup.params)
  compiled = jax.jit(tx.update).lower(grads, state, setup.params).compile()
  _, state = compiled(grads, state, setup.params)  # leave the initialization step
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
  median = median_time(lambda: compiled(grads, state, setup.params), repeats=calls)
  return median, flops


def memory(compiled) -> dict[str, int]:
  """XLA's memory analysis of a compiled function, in bytes.

  ``temp`` is its scratch memory; ``peak`` estimates its peak as arguments +
  outputs + temporaries − aliased (donated) buffers. Both are -1 where the
  backend gives no analysis.
  """
  mem = compiled.memory_analysis()
  if mem is None:
    return {"temp": -1, "peak": -1}
  get = lambda name: int(getattr(mem, name, 0) or 0)
  peak = (get("argument_size_in_bytes") + get("output_size_in_bytes")
          + get("temp_size_in_bytes") - get("alias_size_in_bytes"))
  return {"temp": get("temp_size_in_bytes"), "peak": peak}


def cost(compiled) -> dict[str, float]:
  """XLA's cost analysis of a compiled function: ``flops`` and ``bytes`` accessed.

  The backend's own count: on CPU it matches the analytic count of the
  products (``tests/test_flops.py``); on an H200 it was far below it
  (docs/benchmarks.md, "A GPU benchmark in one call"). Solver calls (QR, eigh)
  have no FLOP count. Both are -1 where the backend gives no analysis.
  """
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis:
    return {"flops": -1.0, "bytes": -1.0}
  return {"flops": float(analysis.get("flops", -1.0)),
          "bytes": float(analysis.get("bytes accessed", -1.0))}


def parse_variant(name: str) -> tuple[str, dict]:
  """``'kl_shampoo@init_factor=1e-3@rank=8'`` → (``'kl_shampoo'``, keyword arguments).

  Values are read as int, float, ``None``/``True``/``False``, or else kept as
  strings (``kl_shampoo@init_factor=rms``).
  """
  base, *items = name.split("@")
  kwargs = {}
  for item in items:
    key, _, value = item.partition("=")
    for convert in (int, float):
      try:
        kwargs[key] = convert(value)
        break
      except ValueError:
        pass
    else:
      kwargs[key] = {"None": None, "True": True, "False": False}.get(value, value)
  return base, kwargs


def extend_grid(grid: list[float], best: int) -> float | None:
  """The next point of a geometric grid beyond an edge optimum at index ``best``, or None.

  A grid of one point is not extended (it is a fixed learning rate, not a sweep).
  """
  if len(grid) < 2:
    return None
  ratio = grid[1] / grid[0]
  if best == 0:
    return grid[0] / ratio
  if best == len(grid) - 1:
    return grid[-1] * ratio
  return None
