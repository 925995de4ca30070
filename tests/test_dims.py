"""Dimension numbers: scanned layers, experts and attention heads, against their unstacked forms."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import kl_optax
from kl_optax import models

RECIPES = list(kl_optax.RECIPES)


# ----------------------------------------------------------------------------
# A scanned NNX GPT against the same GPT unrolled
# ----------------------------------------------------------------------------

CFG = models.GPTConfig(vocab_size=16, context=8, d_model=8, n_layers=3, n_heads=2)
# The trained comparison's GPT has square MLP matrices. The larger factor of a
# (d, 4d) matrix starts from one gradient of rank <= d, so its eigenbasis is
# arbitrary on a null space of dimension 3d; the directions of the
# Adam-in-eigenbasis recipes depend on that choice, and which basis LAPACK
# returns there follows the last bit of its input (two different programs
# may round a product, or align a buffer, differently). Square matrices give
# full-rank factors whose eigenbases are determined.
TRAIN_CFG = dataclasses.replace(CFG, mlp_ratio=1)


def _unstack(pure):
  """A scanned GPT's pure-dict parameters as the unrolled GPT's."""
  out = dict(pure)
  out["blocks"] = {i: jax.tree.map(lambda x, i=i: x[i], pure["blocks"])
                   for i in range(CFG.n_layers)}
  return out


def _loss_and_grads(model):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(p, x):
    return models.loss_fn(nnx.merge(graphdef, p, rest), x[:, :-1], x[:, 1:])

  return params, jax.jit(jax.value_and_grad(loss))


@functools.lru_cache(maxsize=1)
def _scanned_gpt():
  """The scanned GPT's parameters and jitted loss-and-gradient (compiled once for all recipes)."""
  return _loss_and_grads(models.GPT(dataclasses.replace(TRAIN_CFG, scan=True), nnx.Rngs(1)))


def _batch(t):
  return jax.random.randint(jax.random.key(t), (4, CFG.context + 1), 0, CFG.vocab_size)


def test_scanned_gpt_computes_the_unrolled_function():
  unrolled = models.GPT(CFG, nnx.Rngs(0))
  scanned = models.GPT(dataclasses.replace(CFG, scan=True), nnx.Rngs(1))
  nnx.update(scanned, models.stack_blocks(nnx.state(unrolled, nnx.Param)))
  (p_u, vg_u), (p_s, vg_s) = _loss_and_grads(unrolled), _loss_and_grads(scanned)
  (l_u, g_u), (l_s, g_s) = vg_u(p_u, _batch(0)), vg_s(p_s, _batch(0))
  assert abs(float(l_u - l_s)) <= 1e-6
  g_u = models.stack_blocks(g_u)
  for a, b in zip(jax.tree.leaves(g_u), jax.tree.leaves(nnx.to_pure_dict(g_s))):
    assert float(jnp.linalg.norm(a - b)) <= 1e-5 * float(jnp.linalg.norm(a)) + 1e-9


@pytest.mark.parametrize("name", RECIPES)
def test_scanned_gpt_trains_as_the_unrolled_one(name, steps=20):
  """A scanned GPT's optimizer steps equal those of the unrolled GPT's leaves.

  Both optimizers see the scanned model's gradients (the unrolled one as
  per-layer leaves), and the parameters are compared after 20 steps with
  four basis refreshes. (Training the two models side by side adds the two
  forward passes' float32 rounding difference, ~1e-7, to the gradients;
  eigenbases of rank-deficient factors turn a 1-ulp difference into 1e-3
  after 20 steps for the Adam-in-eigenbasis recipes, whichever layout. The
  model is ``TRAIN_CFG``, whose factors are full rank, for the same reason.)
  """
  params, value_and_grad = _scanned_gpt()
  spec = kl_optax.RECIPES[name]
  layout = kl_optax.Layout(precondition_mask=kl_optax.exclude(*models.ADAM_LEAVES))
  tx_s = spec.make(3e-3, precondition_frequency=4, layout=layout,
                   dimension_numbers=models.SCANNED)
  tx_u = spec.make(3e-3, precondition_frequency=4, layout=layout)
  p_s = params
  p_u = _unstack(nnx.to_pure_dict(params))
  st_s, st_u = tx_s.init(p_s), tx_u.init(p_u)
  up_s, up_u = jax.jit(tx_s.update), jax.jit(tx_u.update)
  for t in range(steps):
    _, g = value_and_grad(p_s, _batch(t))
    u_s, st_s = up_s(g, st_s, p_s)
    u_u, st_u = up_u(_unstack(nnx.to_pure_dict(g)), st_u, p_u)
    p_s, p_u = optax.apply_updates(p_s, u_s), optax.apply_updates(p_u, u_u)
  got = nnx.to_pure_dict(p_s)
  want = models.stack_blocks(p_u)
  rel = jax.tree.map(lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a)), want, got)
  assert max(jax.tree.leaves(rel)) <= 1e-5, rel


def test_scanned_layers_are_preconditioned_one_slice_at_a_time():
  """Each layer's matrices are their own tensors: the fc1 group holds the 3
  layers' (d, 4d) slices, never a (3, d, 4d) tensor with a 3 x 3 factor."""
  params = nnx.state(models.GPT(dataclasses.replace(CFG, scan=True), nnx.Rngs(0)), nnx.Param)
  layout = kl_optax.Layout(precondition_mask=kl_optax.exclude(*models.ADAM_LEAVES))
  state = kl_optax.kl_soap(3e-3, layout=layout, dimension_numbers=models.SCANNED).init(params)
  shapes = {tuple(f.shape[1:] for f in g.factors): g.factors[0].shape[0]
            for ks in kl_optax.kron_states(state) for g in ks.groups}
  d, f = CFG.d_model, CFG.mlp_ratio * CFG.d_model
  assert shapes[((d, d), (f, f))] == CFG.n_layers, shapes   # fc1
  assert shapes[((f, f), (d, d))] == CFG.n_layers, shapes   # fc2
  assert all(n % CFG.n_layers == 0 for n in shapes.values()), shapes
  assert not any(len(s) == 3 for s in shapes), shapes


def test_scanned_labels_send_stacked_vectors_to_adam():
  scanned = models.GPT(dataclasses.replace(CFG, scan=True), nnx.Rngs(0))
  params = nnx.state(scanned, nnx.Param)
  labels = dict((jax.tree_util.keystr(p), v) for p, v in jax.tree_util.tree_flatten_with_path(
      kl_optax.kron_labels(params, dimension_numbers=models.SCANNED))[0])
  assert labels["['blocks']['fc1']['kernel'].value"] == "kron"
  assert labels["['blocks']['ln1']['scale'].value"] == "adam"
  assert labels["['blocks']['o']['bias'].value"] == "adam"
  without = jax.tree.leaves(kl_optax.kron_labels(params))
  assert without.count("kron") > jax.tree.leaves(labels).count("kron")


def test_nnx_optimizer_with_scanned_model():
  scanned = models.GPT(dataclasses.replace(CFG, scan=True), nnx.Rngs(0))
  opt = nnx.Optimizer(scanned, kl_optax.kl_shampoo(1e-3, dimension_numbers=models.SCANNED),
                      wrt=nnx.Param)
  x = jax.random.randint(jax.random.key(0), (2, CFG.context + 1), 0, CFG.vocab_size)

  @nnx.jit
  def step(model, opt):
    loss, grads = nnx.value_and_grad(models.loss_fn)(model, x[:, :-1], x[:, 1:])
    opt.update(model, grads)
    return loss

  first = step(scanned, opt)
  for _ in range(3):
    last = step(scanned, opt)
  assert jnp.isfinite(last) and last < first
  sizes = {g.factors[0].shape for ks in kl_optax.kron_states(opt.opt_state) for g in ks.groups}
  assert (CFG.n_layers, CFG.d_model, CFG.d_model) in sizes


# ----------------------------------------------------------------------------
# Experts and attention kernels against their unstacked, reshaped leaves
# ----------------------------------------------------------------------------

E, D, F, H, HD = 3, 8, 12, 2, 4


def _stacked(key):
  k = jax.random.split(key, 5)
  return {
      "moe": {"experts": jax.random.normal(k[0], (E, D, F))},
      "attn": {"query": {"kernel": jax.random.normal(k[1], (D, H, HD)),
                         "bias": jax.random.normal(k[2], (H, HD))},
               "out": {"kernel": jax.random.normal(k[3], (H, HD, D))}},
      "w": jax.random.normal(k[4], (D, 5)),
  }


def _unstacked(tree):
  return {
      "moe": {"experts": [tree["moe"]["experts"][e] for e in range(E)]},
      "attn": {"query": {"kernel": tree["attn"]["query"]["kernel"].reshape(D, H * HD),
                         "bias": tree["attn"]["query"]["bias"].reshape(H * HD)},
               "out": {"kernel": tree["attn"]["out"]["kernel"].reshape(H * HD, D)}},
      "w": tree["w"],
  }


RULE = (kl_optax.match({r"\['experts'\]": kl_optax.DimensionNumbers(batch_axes=(0,))})
        | kl_optax.attention_heads(r"\['attn'\]"))


@pytest.mark.parametrize("name", RECIPES)
def test_experts_and_attention_heads_match_unstacked_leaves(name):
  spec = kl_optax.RECIPES[name]
  tx_s = spec.make(1e-2, precondition_frequency=3, dimension_numbers=RULE)
  tx_u = spec.make(1e-2, precondition_frequency=3)
  p_s = _stacked(jax.random.key(0))
  p_u = _unstacked(p_s)
  labels = kl_optax.kron_labels(p_s, dimension_numbers=RULE)
  assert labels["attn"]["query"] == {"bias": "adam", "kernel": "kron"}
  st_s, st_u = tx_s.init(p_s), tx_u.init(p_u)
  up_s, up_u = jax.jit(tx_s.update), jax.jit(tx_u.update)
  worst = 0.0
  for t in range(10):
    g_s = _stacked(jax.random.key(t + 1))
    u_s, st_s = up_s(g_s, st_s, p_s)
    u_u, st_u = up_u(_unstacked(g_s), st_u, p_u)
    got, want = jax.tree.leaves(_unstacked(u_s)), jax.tree.leaves(u_u)
    for a, b in zip(got, want):
      worst = max(worst, float(jnp.linalg.norm(a - b) / (jnp.linalg.norm(b) + 1e-30)))
    p_s = optax.apply_updates(p_s, u_s)
    p_u = optax.apply_updates(p_u, u_u)
  assert worst <= 1e-5, worst


def test_nan_in_one_layer_skips_that_layer_only():
  tx = kl_optax.kl_shampoo(1e-2, dimension_numbers=kl_optax.scanned())
  params = {"w": jnp.ones((3, 4, 5))}
  state = tx.init(params)
  g = jax.random.normal(jax.random.key(0), (3, 4, 5))
  _, state = tx.update({"w": g}, state, params)
  bad = g.at[1, 0, 0].set(jnp.nan)
  updates, state = tx.update({"w": bad}, state, params)
  skips = kl_optax.kron_states(state)[0].groups[0].slots["nonfinite_skips"]
  np.testing.assert_array_equal(skips, [0, 1, 0])
  # The skipped layer gets only its weight decay; the others a real step.
  decay_only = -1e-2 * 0.01 * params["w"][1]
  np.testing.assert_allclose(updates["w"][1], decay_only, rtol=1e-6)
  assert float(jnp.abs(updates["w"][0] - decay_only).max()) > 1e-4
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state))


def test_blocking_inside_slices_matches_unstacked():
  layout = kl_optax.Layout(max_precond_dim=4, block_size=4)
  tx_s = kl_optax.kl_shampoo(1e-2, layout=layout, dimension_numbers=kl_optax.scanned())
  tx_u = kl_optax.kl_shampoo(1e-2, layout=layout)
  p_s = {"w": jax.random.normal(jax.random.key(0), (2, 6, 10))}
  p_u = {"w": [p_s["w"][0], p_s["w"][1]]}
  st_s, st_u = tx_s.init(p_s), tx_u.init(p_u)
  up_s, up_u = jax.jit(tx_s.update), jax.jit(tx_u.update)
  for t in range(5):
    g = jax.random.normal(jax.random.key(t + 1), (2, 6, 10))
    u_s, st_s = up_s({"w": g}, st_s, p_s)
    u_u, st_u = up_u({"w": [g[0], g[1]]}, st_u, p_u)
    np.testing.assert_allclose(u_s["w"], jnp.stack(u_u["w"]), rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------
# Forms and errors
# ----------------------------------------------------------------------------


def test_forms_of_dimension_numbers_agree():
  params = {"blocks": {"w": jnp.zeros((3, 4, 5)), "b": jnp.zeros((3, 5))}, "head": jnp.zeros((5, 2))}
  dn = kl_optax.DimensionNumbers(batch_axes=(0,))
  forms = [
      kl_optax.scanned("blocks"),
      {"blocks": dn, "head": None},
      lambda p: {"blocks": jax.tree.map(lambda _: dn, p["blocks"]), "head": None},
      kl_optax.match({"blocks": dn}),
  ]
  want = kl_optax.plan_tensors(
      {"blocks": {"w": params["blocks"]["w"]}, "head": params["head"]},
      dimension_numbers=forms[0])
  for form in forms:
    labels = kl_optax.kron_labels(params, dimension_numbers=form)
    assert labels == {"blocks": {"w": "kron", "b": "adam"}, "head": "kron"}
    got = kl_optax.plan_tensors({"blocks": {"w": params["blocks"]["w"]}, "head": params["head"]},
                                dimension_numbers=form)
    assert (got.group_shapes, got.group_sizes) == (want.group_shapes, want.group_sizes)
  assert want.group_sizes == (3, 1)


@pytest.mark.parametrize("dims, message", [
    (kl_optax.DimensionNumbers(batch_axes=(3,)), "out of range"),
    (kl_optax.DimensionNumbers(batch_axes=(0, 0)), r"repeated: \[0\]"),
    (kl_optax.DimensionNumbers(mode_axes=((0,), (1,))), r"missing: \[2\]"),
    (kl_optax.DimensionNumbers(batch_axes=(0,), mode_axes=((0, 1), (2,))), r"repeated: \[0\]"),
])
def test_bad_dimension_numbers_name_the_leaf(dims, message):
  params = {"layer": {"kernel": jnp.zeros((2, 3, 4))}}
  with pytest.raises(ValueError, match=message) as info:
    kl_optax.kl_shampoo(1e-3, dimension_numbers={"layer": {"kernel": dims}}).init(params)
  assert "['layer']['kernel']" in str(info.value)


def test_dimension_numbers_not_a_prefix():
  with pytest.raises(ValueError, match="prefix"):
    kl_optax.kron_labels({"a": jnp.zeros((2, 2))},
                         dimension_numbers={"b": kl_optax.DimensionNumbers()})
  with pytest.raises(TypeError, match="DimensionNumbers"):
    kl_optax.Layout(dimension_numbers={"a": (0,)})
  with pytest.raises(TypeError, match="both"):
    kl_optax.kl_shampoo(1e-3, dimension_numbers=kl_optax.scanned(),
                        layout=kl_optax.Layout(dimension_numbers=kl_optax.scanned()))


def test_works_under_inject_hyperparams_and_multisteps():
  params = {"blocks": {"w": jnp.ones((2, 4, 3)), "b": jnp.ones((2, 3))}}
  tx = optax.inject_hyperparams(kl_optax.kl_shampoo)(
      learning_rate=1e-2, dimension_numbers=kl_optax.scanned("blocks"))
  tx = optax.MultiSteps(tx, every_k_schedule=2)
  state = tx.init(params)
  g = {"blocks": {"w": jnp.arange(24.0).reshape(2, 4, 3), "b": jnp.ones((2, 3))}}
  for _ in range(4):
    updates, state = jax.jit(tx.update)(g, state, params)
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
  groups = kl_optax.kron_states(state)[0].groups
  assert [g.factors[0].shape for g in groups] == [(2, 4, 4)]


def test_describe_shows_tensors_batch_axes_and_blocks():
  params = {"blocks": {"w": jnp.zeros((3, 8, 40)), "scale": jnp.zeros((3, 8))},
            "attn": jnp.zeros((8, 2, 4)), "emb": jnp.zeros((50, 8))}
  layout = kl_optax.Layout(
      precondition_mask=kl_optax.exclude("emb"), max_precond_dim=16, block_size=16,
      dimension_numbers=kl_optax.scanned("blocks") | kl_optax.attention_heads("attn"))
  lines = kl_optax.describe(params, layout, rank=2)
  assert lines["['blocks']['w']"] == ("kron: 3 tensors (batch axes (0,)) of shape (8, 40), "
                                     "cut into 3 blocks of at most 16; dense")
  assert lines["['blocks']['scale']"] == "adam"
  assert lines["['emb']"] == "adam"
  assert lines["['attn']"] == "kron: 1 tensor of shape (8, 8) (modes ((0,), (1, 2))); spike_flat"
  # The plan agrees: 3 layers x 3 blocks.
  plan = kl_optax.plan_tensors({"w": params["blocks"]["w"]}, max_precond_dim=16, block_size=16,
                               dimension_numbers=kl_optax.scanned())
  assert sum(plan.group_sizes) == 9


def test_rules_compose_and_leave_other_leaves_alone():
  heads = kl_optax.attention_heads(r"\['attn'\]")
  # A fused (d, 3d) projection is a matrix already; a query kernel whose name
  # contains "out" is not the output projection.
  assert heads.for_leaf("['attn']['c_attn']['kernel']", (16, 48)) is None
  assert heads.for_leaf("['attn']['query_dropout_proj']['kernel']", (16, 2, 8)) == \
      kl_optax.DimensionNumbers(mode_axes=((0,), (1, 2)))
  assert heads.for_leaf("['attn']['out']['kernel']", (2, 8, 16)) == \
      kl_optax.DimensionNumbers(mode_axes=((0, 1), (2,)))
  # Scanned attention: the layer axis stays a batch axis.
  both = kl_optax.scanned("blocks") | heads
  assert both.for_leaf("['blocks']['attn']['key']['kernel']", (4, 16, 2, 8)) == \
      kl_optax.DimensionNumbers(batch_axes=(0,), mode_axes=((1,), (2, 3)))
  # match merges with what came before: a scanned expert kernel keeps its layer axis.
  moe = kl_optax.scanned("blocks") | kl_optax.match(
      {"experts": kl_optax.DimensionNumbers(batch_axes=(1,))})
  assert moe.for_leaf("['blocks']['moe']['experts']['w']", (2, 4, 8, 16)) == \
      kl_optax.DimensionNumbers(batch_axes=(0, 1))
  with pytest.raises(ValueError, match=r"\['x'\].*no axis 3"):
    kl_optax.scanned(axis=3).for_leaf("['x']", (2, 3, 4))
  with pytest.raises(TypeError, match=r"\['a'\]"):
    kl_optax.kron_labels({"a": jnp.zeros((2, 2))}, dimension_numbers={"a": "layers"})
