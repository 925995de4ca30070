"""``python -m kl_optax.benchmarks``: the benchmark suite (see [`kl_optax.benchmarks.suite`][kl_optax.benchmarks.suite])."""

from kl_optax.benchmarks.suite import main

if __name__ == "__main__":
  main()
