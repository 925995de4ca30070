"""The optimizers compared by the benchmarks, each built for a peak learning rate.

Every optimizer gets the same schedule family (linear warm-up over the first
10% of steps, cosine decay to 10% of the peak) and the same decoupled weight
decay; only the peak learning rate is tuned. The Kronecker recipes and Muon
send the leaves matched by ``adam_leaves`` (regular expressions on leaf paths;
by default the GPT's embeddings, position table and output head,
[`kl_optax.models.ADAM_LEAVES`][kl_optax.models.ADAM_LEAVES]) to AdamW.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import optax

import kl_optax
from kl_optax import models
from kl_optax.benchmarks.harness import warmup_cosine

__all__ = ["OPTIMIZERS", "WEIGHT_DECAY", "make_optimizer"]

WEIGHT_DECAY = 0.01


def _adamw(schedule, adam_leaves=(), **kw):
  del adam_leaves
  return optax.adamw(schedule, weight_decay=WEIGHT_DECAY, **kw)


def _kronecker(recipe):
  def make(schedule, adam_leaves=models.ADAM_LEAVES, **kw):
    kw.setdefault("layout", kl_optax.Layout(precondition_mask=kl_optax.exclude(*adam_leaves)))
    return recipe(schedule, weight_decay=WEIGHT_DECAY, **kw)
  return make


def _muon_dims(leaf, label):
  """Muon's view of a preconditioned leaf: the last axis is the output axis."""
  if label != "kron":
    return None
  if leaf.ndim == 2:
    return optax.contrib.MuonDimensionNumbers()
  return optax.contrib.MuonDimensionNumbers(reduction_axis=tuple(range(leaf.ndim - 1)),
                                            output_axis=(leaf.ndim - 1,))


def _muon(schedule, adam_leaves=models.ADAM_LEAVES, **kw):
  # Muon orthogonalizes exactly the leaves the Kronecker recipes precondition
  # (convolution kernels as (inputs, outputs) matrices); the rest get AdamW.
  def dims(params):
    labels = kl_optax.kron_labels(params, precondition_mask=kl_optax.exclude(*adam_leaves))
    return jax.tree.map(_muon_dims, params, labels)
  return optax.contrib.muon(schedule, weight_decay=WEIGHT_DECAY,
                            muon_weight_dimension_numbers=dims, **kw)


OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "adamw": _adamw,
    "muon": _muon,
    **{name: _kronecker(spec.constructor) for name, spec in kl_optax.RECIPES.items()},
}


def make_optimizer(name: str, peak_lr: float, steps: int, **kwargs) -> optax.GradientTransformation:
  """The optimizer ``name`` with the standard schedule peaking at ``peak_lr``."""
  if name not in OPTIMIZERS:
    raise ValueError(f"Unknown optimizer {name!r}; known: {sorted(OPTIMIZERS)}")
  return OPTIMIZERS[name](warmup_cosine(peak_lr, steps), **kwargs)
