"""KL-Shampoo in a plain JAX training loop: a dict of arrays, explicit optax state, ``jax.jit``.

    pip install -e ".[examples]"
    python examples/plain_jax.py            # about 20 s on a 2-core CPU

No Flax: the model is an MLP written as a function of a parameter dict, the
optimizer state is an ordinary pytree threaded through a jitted step, and the
learning rate follows a warm-up + cosine schedule. ``kl_optax.kl_shampoo``
preconditions the hidden weight matrices; the output layer ("head") is routed
to AdamW with ``Layout(precondition_mask=...)``, and the biases go there by themselves. The
data are scikit-learn's 1,797 real 8×8 handwritten digits (1,437 to train, 360
held out; ``kl_optax.datasets.load_digits``). The script prints the loss and
accuracy every few steps, and the optimizer-state size per preconditioned and
AdamW leaf.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import kl_optax
from kl_optax.datasets import load_digits


def init_params(key: jax.Array, sizes: tuple[int, ...]) -> dict:
  """He-initialized dense layers ``hidden0, hidden1, …, head``."""
  params = {}
  keys = jax.random.split(key, len(sizes) - 1)
  for i, (k, d_in, d_out) in enumerate(zip(keys, sizes[:-1], sizes[1:])):
    name = "head" if i == len(sizes) - 2 else f"hidden{i}"
    params[name] = {"w": jax.random.normal(k, (d_in, d_out)) * jnp.sqrt(2.0 / d_in),
                    "b": jnp.zeros(d_out)}
  return params


def logits_fn(params: dict, images: jax.Array) -> jax.Array:
  x = images.reshape(images.shape[0], -1)
  for name in sorted(k for k in params if k != "head"):
    x = jax.nn.gelu(x @ params[name]["w"] + params[name]["b"])
  return x @ params["head"]["w"] + params["head"]["b"]


def loss_fn(params: dict, images: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits_fn(params, images), labels).mean()


def make_optimizer(peak_lr: float, steps: int) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(0.0, peak_lr, max(1, steps // 10), steps,
                                                0.1 * peak_lr)
  return kl_optax.kl_shampoo(schedule, weight_decay=1e-4, init_factor=1e-3,
                             layout=kl_optax.Layout(precondition_mask=kl_optax.exclude("head")))


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--hidden", type=int, default=256)
  p.add_argument("--lr", type=float, default=1.6e-2)
  p.add_argument("--log-every", type=int, default=50)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)

  x_train, y_train, x_val, y_val = load_digits()
  params = init_params(jax.random.key(args.seed), (64, args.hidden, args.hidden, 10))
  tx = make_optimizer(args.lr, args.steps)
  opt_state = tx.init(params)

  labels = kl_optax.kron_labels(params, precondition_mask=kl_optax.exclude("head"))
  print("routing:", {k: {n: str(v) for n, v in layer.items()} for k, layer in labels.items()})
  print(f"optimizer state: {optax.tree.size(opt_state):,} numbers for "
        f"{optax.tree.size(params):,} parameters")

  @jax.jit
  def train_step(params, opt_state, images, targets):
    loss, grads = jax.value_and_grad(loss_fn)(params, images, targets)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def evaluate(params):
    logits = logits_fn(params, x_val)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y_val).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) == y_val)

  rng = np.random.default_rng(args.seed)
  history = []
  t0 = time.perf_counter()
  for step in range(1, args.steps + 1):
    idx = rng.integers(0, len(y_train), args.batch)
    params, opt_state, loss = train_step(params, opt_state, x_train[idx], y_train[idx])
    if step % args.log_every == 0 or step == args.steps:
      val_loss, val_acc = (float(v) for v in evaluate(params))
      history.append((step, float(loss), val_loss, val_acc))
      print(f"step {step:5d}  train loss {float(loss):.4f}  val loss {val_loss:.4f}  "
            f"val accuracy {100 * val_acc:.1f}%")
  print(f"{args.steps} steps in {time.perf_counter() - t0:.1f} s (compilation included); "
        f"non-finite skips: {sum(int(np.sum(v)) for v in kl_optax.nonfinite_skips(opt_state).values())}")
  return {"history": history, "params": params, "opt_state": opt_state}


if __name__ == "__main__":
  main()
