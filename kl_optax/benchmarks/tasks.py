"""The benchmark suite's workloads: real data that installs offline, and one problem of known curvature.

Each workload is built by a function ``(size, seed) -> Task`` registered in
:data:`TASKS`. A :class:`Task` holds the model split for functional training
(:class:`~kl_optax.benchmarks.harness.TrainSetup`), a training-batch stream
``step -> (inputs, targets)`` drawn with the seed ``(seed, step)`` (so every
optimizer sees the same batches in the same order), a fixed list of validation
batches, and the leaves the Kronecker recipes and Muon send to AdamW.

* ``char_gpt`` — a character GPT on Shakespeare, validated on held-out plays
  (:mod:`kl_optax.benchmarks.shakespeare`, :mod:`kl_optax.benchmarks.gpt`).
* ``digits_mlp`` / ``digits_cnn`` — scikit-learn's 1,797 real 8×8 handwritten
  digits (``sklearn.datasets.load_digits``, bundled with the package), a fixed
  split of 1,437 training and 360 validation images, cross-entropy loss.
* ``kron_regression`` — stochastic matrix regression ``y = xᵀ W* z + noise``
  with rotated, ill-conditioned ``Σx`` and ``Σz``: the Hessian is ``Σx ⊗ Σz``,
  which a Kronecker preconditioner can capture and a diagonal one cannot.

``size`` is ``"tiny"`` (tests), ``"cpu"`` (sizes that train in
minutes on a 2-core CPU) or ``"gpu"`` (larger models for an accelerator).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from kl_optax.benchmarks import gpt, harness, workload

__all__ = ["SIZES", "TASKS", "Task", "load_digits", "make_task"]

SIZES = ("tiny", "cpu", "gpu")


@dataclasses.dataclass
class Task:
  """One workload at one size and seed.

  Attributes:
    name: the workload's name in :data:`TASKS`.
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


def _cross_entropy(model, inputs, targets):
  return optax.softmax_cross_entropy_with_integer_labels(model(inputs), targets).mean()


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
  setup = harness.make_setup(work.model(), gpt.loss_fn)
  d = work.config.d_model
  return Task("char_gpt", setup, work.batches, work.val, gpt.ADAM_LEAVES,
              f"character GPT on Shakespeare, d={d}, {work.config.n_layers} layers, context "
              f"{work.config.context}, batch {cfg['batch']} ({setup.num_params / 1e6:.2f} M parameters)",
              {"pro_kl_shampoo": {"rank": max(4, d // 4)}})


# ----------------------------------------------------------------------------- digits

@functools.lru_cache(maxsize=1)
def load_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """scikit-learn's 8×8 digits as (train images, train labels, val images, val labels).

  Images are float32 in [0, 1] with shape (n, 8, 8, 1); the split (1,437 / 360)
  is a fixed permutation, stratification-free.
  """
  try:
    from sklearn import datasets  # pylint: disable=import-outside-toplevel
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("the digits workloads need scikit-learn: pip install scikit-learn") from e
  digits = datasets.load_digits()
  images = (digits.images / 16.0).astype(np.float32)[..., None]
  labels = digits.target.astype(np.int32)
  order = np.random.default_rng(1234).permutation(len(labels))
  n_val = 360
  val, train = order[:n_val], order[n_val:]
  return images[train], labels[train], images[val], labels[val]


class MLP(nnx.Module):
  """Flattened 8×8 image → hidden layers (GELU) → 10 logits (``head``)."""

  def __init__(self, hidden: tuple[int, ...], rngs: nnx.Rngs):
    dims = (64, *hidden)
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])
    self.head = nnx.Linear(dims[-1], 10, rngs=rngs)

  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for layer in self.layers:
      x = jax.nn.gelu(layer(x))
    return self.head(x)


class CNN(nnx.Module):
  """Two 3×3 convolutions (the second with stride 2), a dense layer and a ``head``."""

  def __init__(self, channels: tuple[int, int], hidden: int, rngs: nnx.Rngs):
    c1, c2 = channels
    self.conv1 = nnx.Conv(1, c1, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(c1, c2, (3, 3), strides=(2, 2), rngs=rngs)
    self.dense = nnx.Linear(4 * 4 * c2, hidden, rngs=rngs)
    self.head = nnx.Linear(hidden, 10, rngs=rngs)

  def __call__(self, x):
    x = jax.nn.gelu(self.conv1(x))
    x = jax.nn.gelu(self.conv2(x))
    x = jax.nn.gelu(self.dense(x.reshape(x.shape[0], -1)))
    return self.head(x)


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
  setup = harness.make_setup(model, _cross_entropy)
  return Task(name, setup, batches, val, (r"\['head'\]",),
              f"{description}, batch {batch} ({setup.num_params / 1e3:.0f} k parameters)",
              {"pro_kl_shampoo": {"rank": 16 if size != "tiny" else 4}})


def digits_mlp(size: str, seed: int) -> Task:
  """An MLP on scikit-learn's real 8×8 handwritten digits."""
  hidden = {"tiny": (16,), "cpu": (256, 256), "gpu": (1024, 1024, 1024)}[size]
  return _digits_task("digits_mlp", MLP(hidden, nnx.Rngs(seed)), size, seed,
                      f"MLP 64-{'-'.join(map(str, hidden))}-10 on 8×8 digits")


def digits_cnn(size: str, seed: int) -> Task:
  """A small CNN on scikit-learn's real 8×8 handwritten digits (4-D kernels get 3 factors)."""
  channels, hidden = {"tiny": ((4, 8), 16), "cpu": ((32, 64), 128), "gpu": ((128, 256), 512)}[size]
  return _digits_task("digits_cnn", CNN(channels, hidden, nnx.Rngs(seed)), size, seed,
                      f"CNN conv{channels[0]}-conv{channels[1]}-{hidden}-10 on 8×8 digits")


# ----------------------------------------------------------------------------- Kronecker regression

class Bilinear(nnx.Module):
  """``x, z -> xᵀ W z`` with one weight matrix ``W``."""

  def __init__(self, dx: int, dz: int):
    self.w = nnx.Param(jnp.zeros((dx, dz)))

  def __call__(self, x, z):
    return jnp.einsum("bi,ij,bj->b", x, self.w[...], z)


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
  setup = harness.make_setup(Bilinear(dx, dz), _squared_error)
  return Task("kron_regression", setup, batches, val, (),
              f"matrix regression y = xᵀW*z + noise, W {dx}×{dz}, Σx, Σz rotated with "
              f"condition number {cond:g}, batch {batch}", {"pro_kl_shampoo": {"rank": max(2, dx // 4)}})


TASKS: dict[str, Callable[[str, int], Task]] = {
    "char_gpt": char_gpt,
    "digits_mlp": digits_mlp,
    "digits_cnn": digits_cnn,
    "kron_regression": kron_regression,
}


def make_task(name: str, size: str = "cpu", seed: int = 0) -> Task:
  """The workload ``name`` at ``size`` ("tiny", "cpu" or "gpu") with its model initialized from ``seed``."""
  if name not in TASKS:
    raise ValueError(f"Unknown workload {name!r}; known: {sorted(TASKS)}")
  if size not in SIZES:
    raise ValueError(f"Unknown size {size!r}; known: {SIZES}")
  return TASKS[name](size, seed)
