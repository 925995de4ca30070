"""The optimizers compared by the benchmarks, each built for a peak learning rate.

Every optimizer gets the same schedule family (linear warm-up over the first
10% of steps, cosine decay to 10% of the peak) and the same decoupled weight
decay; only the peak learning rate is tuned. The Kronecker recipes send
embeddings, the position table and the output head to AdamW
(:data:`kl_optax.benchmarks.gpt.ADAM_LEAVES`).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import optax

import kl_optax
from kl_optax.benchmarks import gpt
from kl_optax.benchmarks.harness import warmup_cosine

__all__ = ["OPTIMIZERS", "WEIGHT_DECAY", "make_optimizer"]

WEIGHT_DECAY = 0.01


def _adamw(schedule, **kw):
  return optax.adamw(schedule, weight_decay=WEIGHT_DECAY, **kw)


def _kronecker(recipe):
  def make(schedule, **kw):
    kw.setdefault("precondition_mask", kl_optax.exclude(*gpt.ADAM_LEAVES))
    return recipe(schedule, weight_decay=WEIGHT_DECAY, **kw)
  return make


def _muon(schedule, **kw):
  # Muon's own routing: 2-D leaves are orthogonalized, others get AdamW. The
  # embeddings, position table and head are 2-D, so route them explicitly.
  def dims(params):
    labels = kl_optax.kron_labels(params, precondition_mask=kl_optax.exclude(*gpt.ADAM_LEAVES))
    return jax.tree.map(
        lambda label: optax.contrib.MuonDimensionNumbers() if label == "kron" else None, labels)
  return optax.contrib.muon(schedule, weight_decay=WEIGHT_DECAY,
                            muon_weight_dimension_numbers=dims, **kw)


OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "adamw": _adamw,
    "muon": _muon,
    "kl_shampoo": _kronecker(kl_optax.kl_shampoo),
    "kl_soap": _kronecker(kl_optax.kl_soap),
    "soap": _kronecker(kl_optax.soap),
    "shampoo": _kronecker(kl_optax.shampoo),
    "eshampoo": _kronecker(kl_optax.eshampoo),
    "pro_kl_shampoo": _kronecker(kl_optax.pro_kl_shampoo),
}


def make_optimizer(name: str, peak_lr: float, steps: int, **kwargs) -> optax.GradientTransformation:
  """The optimizer ``name`` with the standard schedule peaking at ``peak_lr``."""
  if name not in OPTIMIZERS:
    raise ValueError(f"Unknown optimizer {name!r}; known: {sorted(OPTIMIZERS)}")
  return OPTIMIZERS[name](warmup_cosine(peak_lr, steps), **kwargs)
