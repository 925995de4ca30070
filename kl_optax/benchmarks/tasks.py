"""The benchmark suite's workloads: real data that installs offline, and one problem of known curvature.

Each workload is built by a function ``(size, seed) -> Task`` registered in
[`TASKS`][kl_optax.benchmarks.tasks.TASKS]. A [`Task`][kl_optax.benchmarks.tasks.Task] holds the model split for functional training
([`TrainSetup`][kl_optax.benchmarks.harness.TrainSetup]), a training-batch stream
``step -> (inputs, targets)`` drawn with the seed ``(seed, step)`` (so every
optimizer sees the same batches in the same order), a fixed list of validation
batches, and the leaves the Kronecker recipes and Muon send to AdamW.

* ``char_gpt`` — a character GPT on Shakespeare, validated on held-out plays
  (``kl_optax.datasets.load_corpus``, ``kl_optax.models.GPT``).
* ``digits_mlp`` / ``digits_cnn`` — scikit-learn's 1,797 real 8×8 handwritten
  digits (``kl_optax.datasets.load_digits``, bundled with scikit-learn), a fixed
  split of 1,437 training and 360 validation images, cross-entropy loss
  (``kl_optax.models.MLP``, ``kl_optax.models.CNN``).
* ``kron_regression`` — stochastic matrix regression ``y = xᵀ W* z + noise``
  with rotated, ill-conditioned ``Σx`` and ``Σz``: the Hessian is ``Σx ⊗ Σz``,
  which a Kronecker preconditioner can capture and a diagonal one cannot
  (``kl_optax.models.Bilinear``).

``size`` is ``"tiny"`` (tests), ``"cpu"`` (sizes that train in
minutes on a 2-core CPU) or ``"gpu"`` (larger models for an accelerator).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from kl_optax import models
from kl_optax.benchmarks import harness, workload
from kl_optax.datasets import load_digits

__all__ = ["SIZES", "TASKS", "Task", "make_task"]

SIZES = ("tiny", "cpu", "gpu")


@dataclasses.dataclass
class Task:
  """One workload at one size and seed.

  Attributes:
    name: the workload's name in [`TASKS`][kl_optax.benchmarks.tasks.TASKS].
    setup: the model split into graph, parameters and other state, with its loss.
    batches: ``step -> (inputs, targets)``.
    val: the fixed validation batches.
    adam_leaves: path patterns of the leaves routed to AdamW by every recipe and Muon.
    description: a one-line description with the model size.
    optimizer_kwargs: extra keyword arguments per optimizer name (e.g. Pro-KLShampoo's rank).
  """

  name: str
  setup: harness.TrainSetup
  batches: Callable[[int], tuple[np.ndarray, np.ndarray]]
  val: list[tuple[np.ndarray, np.ndarray]]
  adam_leaves: tuple[str, ...]
  description: str
  optimizer_kwargs: dict[str, dict] = dataclasses.field(default_factory=dict)


# ----------------------------------------------------------------------------- character GPT

_GPT_SIZES = {
    "tiny": dict(d_model=16, layers=1, heads=2, context=16, batch=4, val_batches=1),
    "cpu": dict(d_model=64, layers=2, heads=4, context=64, batch=32, val_batches=16),
    # About 10.7 M parameters in the blocks (d = 384, 6 layers), context 256.
    "gpu": dict(d_model=384, layers=6, heads=6, context=256, batch=64, val_batches=32),
}


def char_gpt(size: str, seed: int) -> Task:
  """A character GPT on Shakespeare; validation on whole held-out plays."""
  cfg = dict(_GPT_SIZES[size])
  args = argparse.Namespace(seed=seed, steps=0, **cfg)
  work = workload.from_args(args)
  setup = harness.make_setup(work.model(), models.loss_fn)
  d = work.config.d_model
  return Task("char_gpt", setup, work.batches, work.val, models.ADAM_LEAVES,
              f"character GPT on Shakespeare, d={d}, {work.config.n_layers} layers, context "
              f"{work.config.context}, batch {cfg['batch']} ({setup.num_params / 1e6:.2f} M parameters)",
              {"pro_kl_shampoo": {"rank": max(4, d // 4)}})


# ----------------------------------------------------------------------------- digits

_DIGITS_BATCH = {"tiny": 16, "cpu": 64, "gpu": 256}


def _digits_task(name, model, size, seed, description) -> Task:
  x_train, y_train, x_val, y_val = load_digits()
  batch = _DIGITS_BATCH[size]

  def batches(step):
    idx = np.random.default_rng([seed, step]).integers(0, len(y_train), batch)
    return x_train[idx], y_train[idx]

  val = [(x_val[i:i + 180], y_val[i:i + 180]) for i in range(0, len(y_val), 180)]
  if size == "tiny":
    val = val[:1]
  setup = harness.make_setup(model, models.loss_fn)
  return Task(name, setup, batches, val, (r"\['head'\]",),
              f"{description}, batch {batch} ({setup.num_params / 1e3:.0f} k parameters)",
              {"pro_kl_shampoo": {"rank": 16 if size != "tiny" else 4}})


def digits_mlp(size: str, seed: int) -> Task:
  """An MLP on scikit-learn's real 8×8 handwritten digits."""
  hidden = {"tiny": (16,), "cpu": (256, 256), "gpu": (1024, 1024, 1024)}[size]
  return _digits_task("digits_mlp", models.MLP(hidden, nnx.Rngs(seed)), size, seed,
                      f"MLP 64-{'-'.join(map(str, hidden))}-10 on 8×8 digits")


def digits_cnn(size: str, seed: int) -> Task:
  """A small CNN on scikit-learn's real 8×8 handwritten digits (4-D kernels get 3 factors)."""
  channels, hidden = {"tiny": ((4, 8), 16), "cpu": ((32, 64), 128), "gpu": ((128, 256), 512)}[size]
  return _digits_task("digits_cnn", models.CNN(channels, hidden, nnx.Rngs(seed)), size, seed,
                      f"CNN conv{channels[0]}-conv{channels[1]}-{hidden}-10 on 8×8 digits")


# ----------------------------------------------------------------------------- Kronecker regression

def _rotated_cov(rng: np.random.Generator, d: int, cond: float) -> np.ndarray:
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))
  return (q * np.geomspace(1.0, 1.0 / cond, d)) @ q.T


def _squared_error(model, inputs, targets):
  x, z = inputs
  return 0.5 * jnp.mean((model(x, z) - targets) ** 2)


def kron_regression(size: str, seed: int) -> Task:
  """Stochastic matrix regression with Kronecker-structured curvature (condition number 100 per side).

  The problem (``Σx``, ``Σz``, ``W*``) is the same for every seed; the seed
  changes the sample stream. The validation loss is measured on 4,096 held-out
  samples and includes the noise floor ``σ²/2 = 0.005``.
  """
  dx, dz, batch = {"tiny": (6, 4, 8), "cpu": (48, 32, 32), "gpu": (512, 256, 256)}[size]
  cond, noise = 100.0, 0.1
  problem = np.random.default_rng(2024)
  sx, sz = _rotated_cov(problem, dx, cond), _rotated_cov(problem, dz, cond)
  lx, lz = np.linalg.cholesky(sx), np.linalg.cholesky(sz)
  w_star = problem.normal(size=(dx, dz))

  def sample(rng, n):
    x = (rng.normal(size=(n, dx)) @ lx.T).astype(np.float32)
    z = (rng.normal(size=(n, dz)) @ lz.T).astype(np.float32)
    y = np.einsum("bi,ij,bj->b", x, w_star, z) + noise * rng.normal(size=n)
    return (x, z), y.astype(np.float32)

  def batches(step):
    return sample(np.random.default_rng([seed, step]), batch)

  val_rng = np.random.default_rng([seed, 10**6])
  val = [sample(val_rng, 1024) for _ in range(1 if size == "tiny" else 4)]
  setup = harness.make_setup(models.Bilinear(dx, dz), _squared_error)
  return Task("kron_regression", setup, batches, val, (),
              f"matrix regression y = xᵀW*z + noise, W {dx}×{dz}, Σx, Σz rotated with "
              f"condition number {cond:g}, batch {batch}", {"pro_kl_shampoo": {"rank": max(2, dx // 4)}})


TASKS: dict[str, Callable[[str, int], Task]] = {
    "char_gpt": char_gpt,
    "digits_mlp": digits_mlp,
    "digits_cnn": digits_cnn,
    "kron_regression": kron_regression,
}
"""The suite's workloads by name: each maps ``(size, seed)`` to a [`Task`][kl_optax.benchmarks.tasks.Task]."""


def make_task(name: str, size: str = "cpu", seed: int = 0) -> Task:
  """The workload ``name`` at ``size`` ("tiny", "cpu" or "gpu") with its model initialized from ``seed``."""
  if name not in TASKS:
    raise ValueError(f"Unknown workload {name!r}; known: {sorted(TASKS)}")
  if size not in SIZES:
    raise ValueError(f"Unknown size {size!r}; known: {SIZES}")
  return TASKS[name](size, seed)
