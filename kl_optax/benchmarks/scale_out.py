"""Scale-out benchmark: compile time against depth, per-device state bytes, sharded step time.

    python -m kl_optax.benchmarks.scale_out --out runs/scale_out

5 min 48 s on a 2-core x86_64 CPU, run alone. Three measurements, each against
``optax.adamw`` in the same process:

1. **Compile time** of the jitted train step (forward, backward, optimizer
   update) and of the optimizer update alone, for the character GPT at two
   depths (``--depths``, default 12 and 48 layers). Same-shape factors are
   stacked, so the optimizer's share should not grow with depth.
2. **Per-device optimizer-state bytes** on meshes of 1, 2, 4 and 8 devices,
   read from the arrays' shards after ``jax.jit(tx.init, out_shardings=
   kl_optax.state_shardings(...))``. Parameters are sharded Megatron-style
   over the mesh ([`kl_optax.models.PARAM_RULES`][kl_optax.models.PARAM_RULES]). Goal:
   ``≤ 1.25 · total / devices + replicated``.
3. **Step time** on a ``(data, model)`` mesh of all devices (eight simulated
   host devices on a CPU machine): median train step, and the refresh steps
   (every ``precondition_frequency``) against the others.

``kl_shampoo_b128`` is KL-Shampoo with every dim cut into blocks of 128: all
blocks of a model of width 128 then share one stack, which balances the
stacks across devices.

No data is needed (random tokens); results go to ``--out`` as JSON and Markdown.
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse  # pylint: disable=wrong-import-position
import json  # pylint: disable=wrong-import-position
import statistics  # pylint: disable=wrong-import-position
import time  # pylint: disable=wrong-import-position

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
from flax import nnx  # pylint: disable=wrong-import-position
from jax.sharding import AxisType, NamedSharding  # pylint: disable=wrong-import-position
from jax.sharding import PartitionSpec as P  # pylint: disable=wrong-import-position

import kl_optax  # pylint: disable=wrong-import-position
from kl_optax import models  # pylint: disable=wrong-import-position
from kl_optax.benchmarks import harness  # pylint: disable=wrong-import-position
from kl_optax.benchmarks.harness import per_device_bytes, state_bytes  # pylint: disable=wrong-import-position
from kl_optax.benchmarks.optimizers import make_optimizer  # pylint: disable=wrong-import-position

VOCAB = 82  # the Shakespeare character vocabulary (docs/benchmarks.md)


def _optimizer(name, steps):
  """``adamw``, a recipe, or ``<recipe>_b<N>``: the recipe with every dim cut into blocks
  of N; ``@key=value`` suffixes pass keyword arguments (``kl_shampoo@spike_threshold=None``).
  Recipes run with their defaults otherwise."""
  name, kwargs = harness.parse_variant(name)
  if "_b" in name:
    name, block = name.rsplit("_b", 1)
    kwargs["layout"] = kl_optax.Layout(block_size=int(block), max_precond_dim=int(block))
  return make_optimizer(name, 1e-3, steps, **kwargs)


def _model(d_model, layers, context, heads=4):
  cfg = models.GPTConfig(VOCAB, context=context, d_model=d_model, n_layers=layers, n_heads=heads)
  return nnx.split(models.GPT(cfg, nnx.Rngs(0)), nnx.Param, ...)


def _batch(batch, context, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, VOCAB, size=(batch, context + 1))
  return tokens[:, :-1], tokens[:, 1:]


def _compile_seconds(fn, *args):
  t0 = time.perf_counter()
  jax.jit(fn).lower(*args).compile()
  return time.perf_counter() - t0


def compile_times(optimizers, depths, d_model, context, batch) -> dict:
  out = {}
  x, y = _batch(batch, context)
  for layers in depths:
    graphdef, params, rest = _model(d_model, layers, context)
    for name in optimizers:
      tx = _optimizer(name, 100)
      state = tx.init(params)
      grads = jax.tree.map(lambda p: p * 0.5, params)
      step_s = _compile_seconds(models.make_train_step(graphdef, rest, tx), params, state, x, y)
      update_s = _compile_seconds(lambda g, s, p: tx.update(g, s, p), grads, state, params)
      out[f"{name}@{layers}"] = {"train_step_s": step_s, "update_s": update_s}
      print(f"  compile  {name:>10s}  {layers:3d} layers: train step {step_s:6.2f} s, "
            f"update {update_s:6.2f} s", flush=True)
  return out


def _shard_params(params, mesh):
  shardings = jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(mesh, models.param_spec(jax.tree_util.keystr(path), x.shape,
                                                         mesh)), params)
  return jax.device_put(params, shardings), shardings


def state_memory(optimizers, device_counts, d_model, layers, context) -> dict:
  out = {}
  _, params, _ = _model(d_model, layers, context)
  for name in optimizers:
    tx = _optimizer(name, 100)
    total = state_bytes(jax.eval_shape(tx.init, params))
    for n in device_counts:
      mesh = jax.make_mesh((1, n), ("data", "model"), devices=jax.devices()[:n],
                           axis_types=(AxisType.Auto, AxisType.Auto))
      with jax.set_mesh(mesh):
        p, _ = _shard_params(params, mesh)
        state = jax.jit(tx.init, out_shardings=kl_optax.state_shardings(tx, p))(p)
      fullest, stored = per_device_bytes(state)
      replicated = sum(x.nbytes for x in jax.tree.leaves(state) if x.sharding.is_fully_replicated)
      bound = 1.25 * total / n + replicated
      out[f"{name}@{n}"] = {"devices": n, "total_bytes": total, "stored_bytes": stored,
                            "per_device_bytes": fullest, "replicated_bytes": replicated,
                            "ideal_bytes": total / n, "bound_bytes": bound,
                            "within_goal": fullest <= bound}
      print(f"  memory   {name:>10s}  {n} device(s): {fullest / 2**20:7.3f} MiB on the fullest "
            f"device; total {total / 2**20:7.3f} MiB; replicated {replicated / 2**20:.3f} MiB; "
            f"{fullest / (total / n):.2f}× total/devices", flush=True)
  return out


def step_times(optimizers, d_model, layers, context, batch, model_parallel, steps,
               frequency) -> dict:
  out = {}
  n = jax.device_count()
  mesh = jax.make_mesh((n // model_parallel, model_parallel), ("data", "model"),
                       axis_types=(AxisType.Auto, AxisType.Auto))
  x, y = _batch(batch, context)
  for name in optimizers:
    with jax.set_mesh(mesh):
      graphdef, params, rest = _model(d_model, layers, context)
      params, p_shardings = _shard_params(params, mesh)
      tx = _optimizer(name, 10 * steps)
      s_shardings = kl_optax.state_shardings(tx, params)
      state = jax.jit(tx.init, out_shardings=s_shardings)(params)
      data = NamedSharding(mesh, P("data", None))
      inputs, targets = jax.device_put(x, data), jax.device_put(y, data)
      step = jax.jit(models.make_train_step(graphdef, rest, tx), donate_argnums=(0, 1),
                     out_shardings=(p_shardings, s_shardings, NamedSharding(mesh, P())))
      times = []
      for t in range(steps + 2):
        t0 = time.perf_counter()
        params, state, loss = step(params, state, inputs, targets)
        jax.block_until_ready((params, state, loss))
        times.append(time.perf_counter() - t0)
    # Step t (0-based) runs the update with count == t; bases refresh when
    # count % frequency == 0 (count ≥ 1). The first two steps (compile, init) are dropped.
    timed = list(enumerate(times))[2:]
    refresh = [s for t, s in timed if t % frequency == 0]
    other = [s for t, s in timed if t % frequency != 0]
    out[name] = {"median_ms": 1e3 * statistics.median(s for _, s in timed),
                 "mean_ms": 1e3 * statistics.fmean(s for _, s in timed),
                 "refresh_median_ms": 1e3 * statistics.median(refresh) if refresh else None,
                 "other_median_ms": 1e3 * statistics.median(other), "steps": len(timed),
                 "final_loss": float(loss)}
    print(f"  step     {name:>10s}: median {out[name]['median_ms']:.1f} ms, mean "
          f"{out[name]['mean_ms']:.1f} ms (refresh steps {out[name]['refresh_median_ms'] or 0:.1f}"
          f" ms, others {out[name]['other_median_ms']:.1f} ms)", flush=True)
  return out


def _markdown(report) -> str:
  lines = [f"Device: {report['device']} ({report['device_count']} devices).", "",
           "| compile (s) | " + " | ".join(
               f"{k.rsplit('@', 1)[0]} L{k.rsplit('@', 1)[1]}" for k in report["compile"]) + " |",
           "|---|" + "---|" * len(report["compile"])]
  for field in ("train_step_s", "update_s"):
    lines.append(f"| {field} | " + " | ".join(
        f"{v[field]:.2f}" for v in report["compile"].values()) + " |")
  lines += ["", "| optimizer | devices | fullest device (MiB) | total/devices (MiB) | "
                "replicated (MiB) | within 1.25× goal |", "|---|---|---|---|---|---|"]
  for k, v in report["memory"].items():
    lines.append(f"| {k.rsplit('@', 1)[0]} | {v['devices']} | {v['per_device_bytes'] / 2**20:.3f} | "
                 f"{v['ideal_bytes'] / 2**20:.3f} | {v['replicated_bytes'] / 2**20:.3f} | "
                 f"{'yes' if v['within_goal'] else 'no'} |")
  lines += ["", "| optimizer | median step (ms) | × AdamW | refresh steps (ms) | others (ms) |",
            "|---|---|---|---|---|"]
  base = report["steps"]["adamw"]["median_ms"]
  for k, v in report["steps"].items():
    refresh = "–" if v["refresh_median_ms"] is None else f"{v['refresh_median_ms']:.1f}"
    lines.append(f"| {k} | {v['median_ms']:.1f} | {v['median_ms'] / base:.2f} | {refresh} | "
                 f"{v['other_median_ms']:.1f} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--optimizers", default="adamw,kl_shampoo,kl_shampoo_b128",
                 help="adamw first; <recipe>_b<N> cuts every dim into blocks of N")
  p.add_argument("--depths", default="12,48")
  p.add_argument("--d-model", type=int, default=64)
  p.add_argument("--context", type=int, default=64)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--memory-d-model", type=int, default=128)
  p.add_argument("--memory-layers", type=int, default=12)
  p.add_argument("--devices", default="1,2,4,8")
  p.add_argument("--step-layers", type=int, default=4)
  p.add_argument("--model-parallel", type=int, default=4)
  p.add_argument("--steps", type=int, default=40)
  p.add_argument("--out", default="runs/scale_out")
  args = p.parse_args(argv)
  names = args.optimizers.split(",")
  if names[0] != "adamw":
    raise ValueError("--optimizers must start with adamw (the reference)")
  device_counts = [n for n in map(int, args.devices.split(",")) if n <= jax.device_count()]
  report = {"device": jax.devices()[0].device_kind, "device_count": jax.device_count(),
            "args": vars(args)}
  print("compile time", flush=True)
  report["compile"] = compile_times(names, [int(d) for d in args.depths.split(",")],
                                    args.d_model, args.context, args.batch)
  print("optimizer-state bytes per device", flush=True)
  report["memory"] = state_memory(names, device_counts, args.memory_d_model,
                                  args.memory_layers, args.context)
  print("step time", flush=True)
  report["steps"] = step_times(names, args.d_model, args.step_layers, args.context, args.batch,
                               args.model_parallel, args.steps, frequency=10)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(report, f, indent=1)
  md = _markdown(report)
  with open(os.path.join(args.out, "results.md"), "w") as f:
    f.write(md)
  print(md)
  return report


if __name__ == "__main__":
  main()
