#!/usr/bin/env bash
# The GPU benchmark (python -m kl_optax.benchmarks.gpu) on a machine without a package
# registry, in two steps:
#
#   bash examples/gpu_benchmark.sh prepare   # where pip reaches the registry, on the same
#                                            # platform and Python version as the GPU machine:
#                                            # builds this package's wheel and collects every
#                                            # dependency's wheel in ./wheels
#   (copy the repository, wheels/ included, to the GPU machine)
#   bash examples/gpu_benchmark.sh run [options of kl_optax.benchmarks.gpu]
#                                            # installs from ./wheels only, then writes
#                                            # runs/gpu/results.{json,md}
#
# or, on a GPU machine whose Python already has JAX with GPU support, Flax and optax:
#
#   bash examples/gpu_benchmark.sh installed [options]   # no install: the package from
#                                                        # this checkout, on PYTHONPATH
set -euo pipefail
cd "$(dirname "$0")/.."
packages=("jax[cuda12]" "flax>=0.10" "optax" "chex" "matplotlib" "tqdm")

case "${1:-}" in
  prepare)
    python3 -m pip wheel --wheel-dir wheels . "${packages[@]}"
    ;;
  run)
    shift
    python3 -m venv .venv-gpu
    # shellcheck disable=SC1091
    . .venv-gpu/bin/activate
    python -m pip install --no-index --find-links wheels kl_optax "${packages[@]}"
    python -c "import jax; print('devices:', jax.devices())"
    python -m kl_optax.benchmarks.gpu --out runs/gpu "$@"
    ;;
  installed)
    shift
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    python3 -c "import jax, flax, optax; print('devices:', jax.devices())"
    python3 -m kl_optax.benchmarks.gpu --out runs/gpu "$@"
    ;;
  *)
    echo "usage: bash examples/gpu_benchmark.sh prepare | run | installed [benchmark options]" >&2
    exit 2
    ;;
esac
