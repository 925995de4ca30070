"""The character-GPT workload of the benchmarks, built from command-line options.

One place fixes the command-line options of the model size and the data
protocol of ``kl_optax.benchmarks.char_gpt`` and the suite's ``char_gpt``
workload: the model is ``kl_optax.models.GPT``, training batch ``i`` is drawn
with the seed ``(seed, i)`` (``kl_optax.datasets.Corpus.batches``), so every
optimizer sees the same batches in the same order, and validation uses a fixed
list of batches from the held-out plays.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable

import numpy as np

from kl_optax import datasets, models

__all__ = ["Workload", "add_arguments", "from_args"]


def add_arguments(parser: argparse.ArgumentParser, *, d_model: int = 64, layers: int = 2,
                  heads: int = 4, context: int = 64, batch: int = 32, steps: int = 300,
                  val_batches: int = 16) -> argparse.ArgumentParser:
  """Adds the model-size, data and step-count options with the given defaults."""
  parser.add_argument("--d-model", type=int, default=d_model)
  parser.add_argument("--layers", type=int, default=layers)
  parser.add_argument("--heads", type=int, default=heads)
  parser.add_argument("--context", type=int, default=context)
  parser.add_argument("--batch", type=int, default=batch)
  parser.add_argument("--steps", type=int, default=steps)
  parser.add_argument("--val-batches", type=int, default=val_batches)
  parser.add_argument("--seed", type=int, default=0)
  return parser


@dataclasses.dataclass
class Workload:
  corpus: datasets.Corpus
  config: models.GPTConfig
  batches: Callable[[int], tuple[np.ndarray, np.ndarray]]
  val: list[tuple[np.ndarray, np.ndarray]]
  seed: int

  def model(self) -> models.GPT:
    from flax import nnx  # pylint: disable=import-outside-toplevel
    return models.GPT(self.config, nnx.Rngs(self.seed))


def from_args(args: argparse.Namespace) -> Workload:
  """Loads the corpus and builds the configuration and batch streams of ``args``."""
  corpus = datasets.load_corpus()
  cfg = models.GPTConfig(corpus.vocab_size, context=args.context, d_model=args.d_model,
                         n_layers=args.layers, n_heads=args.heads)
  batches = corpus.batches(args.seed, args.batch, args.context)
  val = corpus.validation_batches(args.seed, args.batch, args.context, args.val_batches)
  return Workload(corpus, cfg, batches, val, args.seed)
