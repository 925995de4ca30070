"""XLA's scratch memory of one compiled update (deterministic: compiled, never run).

The initialization and the regular step are chosen by one ``lax.cond`` per shape
group, so that XLA schedules the groups one after another and only one group's
statistics, decompositions and refresh are live at a time (docs/benchmarks.md,
"Beside the JAX port kl_shampoo_jax"). With one ``cond`` around all groups, the
update's scratch memory grew with every group of large factors.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import pytest

import kl_optax as P
from kl_optax import transform


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


def _copied_out_of_conds(compiled_text: str) -> int:
  """Bytes the program's top level copies out of ``cond`` (or other tuple) results."""
  entry = compiled_text[compiled_text.index("\nENTRY"):]
  total = 0
  for dtype, dims in re.findall(r"= (f32|s32|pred)\[([0-9,]*)\]\S* copy\(%get-tuple-element",
                                entry):
    total += math.prod(int(d) for d in dims.split(",") if d) * (1 if dtype == "pred" else 4)
  return total


def _copies_and_state_bytes(tx):
  params = {"a": jnp.ones((16, 24)), "b": jnp.ones((3, 16, 16)), "c": jnp.ones((24, 16)),
            "v": jnp.ones(16)}
  state = tx.init(params)
  text = jax.jit(tx.update, donate_argnums=1).lower(params, state, params).compile().as_text()
  return _copied_out_of_conds(text), sum(x.nbytes for x in jax.tree.leaves(state))


@pytest.mark.parametrize("name", list(P.RECIPES))
def test_a_donated_state_is_updated_in_place(name):
  # The initialization branch rebuilds the initial state instead of reading the
  # stored one, so XLA can write each group's new state into the donated
  # buffers. Shampoo still copies one slot, its momentum (16% of its state here).
  copied, state_bytes = _copies_and_state_bytes(P.RECIPES[name].make(1e-3))
  assert copied < 0.2 * state_bytes, (copied, state_bytes)


def test_an_initialization_that_reads_the_stored_state_copies_it(monkeypatch):
  # The control of the test above: when both branches of the groups' conds read
  # the stored state, XLA copies nearly all of it out of them on every step.
  monkeypatch.setattr(transform, "_initial_state", lambda config, state, shape: state)
  copied, state_bytes = _copies_and_state_bytes(P.kl_shampoo(1e-3))
  assert copied > 0.5 * state_bytes, (copied, state_bytes)
