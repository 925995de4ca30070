"""XLA's scratch memory of one compiled update (deterministic: compiled, never run).

The initialization and the regular step are chosen by one ``lax.cond`` per shape
group, so that XLA schedules the groups one after another and only one group's
statistics, decompositions and refresh are live at a time (docs/benchmarks.md,
"Beside the JAX port kl_shampoo_jax"). With one ``cond`` around all groups, the
update's scratch memory grew with every group of large factors.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import kl_optax as P


def _update_scratch_bytes(tx, params) -> int:
  state = tx.init(params)
  compiled = jax.jit(tx.update, donate_argnums=1).lower(params, state, params).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("recipe", [P.scale_by_kl_shampoo, P.scale_by_soap])
def test_a_second_shape_group_adds_little_scratch_memory(recipe):
  # Two groups, (512, 64) and (64, 512), each with a 512×512 factor (1 MiB).
  one = {"a": jnp.ones((512, 64))}
  two = {"a": jnp.ones((512, 64)), "b": jnp.ones((64, 512))}
  tx = recipe()
  alone, both = _update_scratch_bytes(tx, one), _update_scratch_bytes(tx, two)
  # Here 1.06× (KL-Shampoo) and 1.26× (SOAP: the first group's new state waits
  # while the second runs); a cond around both groups needed 1.56× and 1.53×.
  assert both <= 1.35 * alone, (both / 2**20, alone / 2**20)
