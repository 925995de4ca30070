"""Regression test: many shape groups refreshing at once must not deadlock on CPU.

jaxlib 0.10's batched CPU LAPACK kernels block XLA's intra-op thread pool while
waiting for their own chunks; concurrent batched QRs from independent shape
groups used to hang the whole process. The run happens in a subprocess with a
time limit so that a regression fails instead of hanging the test session.
"""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kl_optax

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, kl_optax
    shapes = {f"a{i}": (24, 24) for i in range(6)}
    shapes.update({f"b{i}": (24, 96) for i in range(3)})
    shapes.update({f"c{i}": (96, 24) for i in range(3)})
    shapes.update({"d": (4, 6, 8), "e": (48, 48)})
    tx = kl_optax.scale_by_kl_shampoo(precondition_frequency=1)
    state = tx.init({k: jnp.zeros(s) for k, s in shapes.items()})
    update = jax.jit(tx.update)
    for i in range(60):
        grads = {k: jax.random.normal(jax.random.key(i), s) for k, s in shapes.items()}
        updates, state = update(grads, state)
        jax.block_until_ready(updates)
    print("finished")
""")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU LAPACK only")
def test_concurrent_refreshes_do_not_deadlock():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                        timeout=240, env=env)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "finished" in proc.stdout


def test_sequential_batching_matches_batched_linear_algebra():
  x = jax.random.normal(jax.random.key(0), (3, 4, 6, 6))
  sym = x + jnp.swapaxes(x, -1, -2)
  w, v = jax.jit(jax.vmap(jax.vmap(kl_optax.kron.eigh_descending)))(sym)
  w_ref = np.linalg.eigvalsh(np.asarray(sym, np.float64))[..., ::-1]
  np.testing.assert_allclose(w, w_ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(jnp.einsum("abij,abj,abkj->abik", v, w, v), sym, atol=1e-4)
  eye = jnp.broadcast_to(jnp.eye(6), x.shape)
  q = jax.jit(jax.vmap(jax.vmap(kl_optax.kron.qr_power_step)))(sym, eye)
  np.testing.assert_allclose(jnp.abs(q), jnp.abs(jnp.linalg.qr(sym)[0]), atol=1e-5)


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_stacks_of_any_size_decompose_like_one_matrix_at_a_time(n):
  # The CPU path issues the one-matrix calls two at a time, with a remainder.
  x = jax.random.normal(jax.random.key(n), (n, 5, 5))
  sym = x + jnp.swapaxes(x, -1, -2)
  w, v = jax.jit(jax.vmap(kl_optax.kron.eigh_descending))(sym)
  q = jax.jit(jax.vmap(kl_optax.kron.qr_orthonormal))(sym)
  for i in range(n):
    w_i, v_i = kl_optax.kron.eigh_descending(sym[i])
    np.testing.assert_allclose(w[i], w_i, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jnp.abs(v[i]), jnp.abs(v_i), atol=1e-4)
    np.testing.assert_allclose(q[i], kl_optax.kron.qr_orthonormal(sym[i]), atol=1e-5)



def _cuda_qr_calls(fn, *args):
  """The operand types of the cuSOLVER QR calls of ``fn(*args)`` lowered for an NVIDIA
  GPU (``jax.export`` lowers for a platform this machine does not have), and whether
  the program loops."""
  import re  # pylint: disable=import-outside-toplevel
  from jax import export  # pylint: disable=import-outside-toplevel
  text = export.export(jax.jit(fn), platforms=["cuda"])(*args).mlir_module()
  operands = re.findall(r"custom_call @cusolver_geqrf\w*\([^)]*\)[^\n]*:\s*\((tensor<[^>]*>)", text)
  return operands, "stablehlo.while" in text


def test_qr_of_large_stacks_loops_on_gpu_and_small_ones_stay_batched():
  qr = jax.vmap(kl_optax.kron.qr_orthonormal)
  stack = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  assert _cuda_qr_calls(qr, stack(6, 256, 256)) == (["tensor<256x256xf32>"], True)
  assert _cuda_qr_calls(qr, stack(6, 64, 64)) == (["tensor<6x64x64xf32>"], False)
  # Through a recipe's refresh: the stack of two 256 x 256 leaves is QR'd one matrix at a time.
  tx = kl_optax.kl_shampoo(1e-3, precondition_frequency=1)
  params = {"a": stack(256, 256), "b": stack(256, 256)}
  state = jax.eval_shape(tx.init, params)
  operands, _ = _cuda_qr_calls(lambda g, s: tx.update(g, s, g), params, state)
  assert operands and set(operands) == {"tensor<256x256xf32>"}
