"""10,000 steps with the eigenvalue floor active: finite eigenvalues, orthonormal bases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kl_optax
from kl_optax.parts import clamp_floor

STEPS, CHUNK = 10_000, 1_000
SHAPE = (12, 8)


def _drift(state):
  """Largest ‖QᵀQ − I‖_max over every basis of the state (Pro-KLShampoo's ``U`` included)."""
  worst = jnp.float32(0.0)
  for st in kl_optax.kron_states(state):
    for g in st.groups:
      spike = [g.slots["spike_basis"]] if "spike_basis" in g.slots else []   # n × r, UᵀU = I
      # Pro-KLShampoo's restricted mode keeps a one-row placeholder basis.
      for q in [b for b in g.bases if b.shape[-2] == b.shape[-1]] + spike:
        if q.shape[-2] > 0:
          qtq = jnp.einsum("nij,nik->njk", q, q, precision=jax.lax.Precision.HIGHEST)
          worst = jnp.maximum(worst, jnp.abs(qtq - jnp.eye(q.shape[-1])).max())
  return worst


@pytest.mark.parametrize("name,kwargs", [(n, s.test_kwargs) for n, s in kl_optax.RECIPES.items()])
def test_ten_thousand_steps_stay_orthonormal_and_finite(name, kwargs, record_property):
  tx = getattr(kl_optax, name)(1e-3, precondition_frequency=10, **kwargs)
  rng = np.random.default_rng(0)
  target = jnp.asarray(rng.normal(size=SHAPE), jnp.float32)
  scales = jnp.asarray(np.geomspace(1.0, 1e-3, SHAPE[0])[:, None], jnp.float32)
  params = {"w": jnp.zeros(SHAPE)}

  @jax.jit
  def chunk(carry, key):
    def body(c, k):
      p, s = c
      # Small, ill-conditioned gradients: most eigenvalue estimates sit on the floor.
      g = {"w": 1e-3 * scales * (p["w"] - target + jax.random.normal(k, SHAPE))}
      u, s = tx.update(g, s, p)
      return (jax.tree.map(jnp.add, p, u), s), None
    carry, _ = jax.lax.scan(body, carry, jax.random.split(key, CHUNK))
    return carry, _drift(carry[1])

  carry = (params, tx.init(params))
  drifts = []
  for i in range(STEPS // CHUNK):
    carry, drift = chunk(carry, jax.random.key(i))
    drifts.append(float(drift))
  state = carry[1]
  eigvals = [lam for st in kl_optax.kron_states(state) for g in st.groups for lam in g.eigvals
             if lam.size]
  assert all(bool(jnp.all(jnp.isfinite(lam))) for lam in eigvals)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(carry))
  assert max(drifts) <= 1e-4, drifts
  if name in ("kl_shampoo", "kl_soap"):
    floors = [clamp_floor(lam.shape[-1], 4000) for lam in eigvals]
    assert any(bool(jnp.any(lam <= f * (1 + 1e-6))) for lam, f in zip(eigvals, floors))
  record_property("max_orthonormality_drift", max(drifts))
  print(f"{name}: max ‖QᵀQ − I‖ over 10 checkpoints of 1,000 steps: {max(drifts):.2e}")
