"""The character-GPT workload shared by the examples and the benchmarks.

One place fixes the command-line options of the model size and the data
protocol: training batch ``i`` is drawn with the seed ``(seed, i)``, so every
optimizer sees the same batches in the same order, and validation uses a fixed
list of batches from the held-out plays.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable

import numpy as np

from kl_optax.benchmarks import gpt, shakespeare

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
  corpus: shakespeare.Corpus
  config: gpt.GPTConfig
  batches: Callable[[int], tuple[np.ndarray, np.ndarray]]
  val: list[tuple[np.ndarray, np.ndarray]]
  seed: int

  def model(self):
    from flax import nnx  # pylint: disable=import-outside-toplevel
    return gpt.GPT(self.config, nnx.Rngs(self.seed))


def from_args(args: argparse.Namespace) -> Workload:
  """Loads the corpus and builds the configuration and batch streams of ``args``."""
  corpus = shakespeare.load_corpus()
  cfg = gpt.GPTConfig(corpus.vocab_size, context=args.context, d_model=args.d_model,
                      n_layers=args.layers, n_heads=args.heads)

  def batches(step):
    return corpus.batch(np.random.default_rng([args.seed, step]), args.batch, args.context)

  val_rng = np.random.default_rng([args.seed, 10**6])
  val = [corpus.batch(val_rng, args.batch, args.context, "val") for _ in range(args.val_batches)]
  return Workload(corpus, cfg, batches, val, args.seed)
