"""Small Flax NNX models for the examples and the benchmarks.

This module needs Flax (the ``examples`` or ``test`` extra); ``import kl_optax``
does not import it.

* The character GPT, ``GPT`` (sized by ``GPTConfig``): token and learned
  position embeddings, pre-norm transformer blocks (``Block``) with separate
  ``q``, ``k``, ``v`` and ``o`` projections and a two-layer MLP, a final norm
  and an output head. Every weight matrix of the blocks is 2-D, so it reaches
  the Kronecker preconditioner as a matrix; the embeddings, the position table
  and the head are the leaves usually routed to AdamW (``ADAM_LEAVES``).
  ``PARAM_RULES`` and ``param_spec`` shard it Megatron-style over a mesh axis
  ``"model"``; ``make_train_step`` is a functional train step for ``jax.jit``.
* Digit classifiers, ``MLP`` and ``CNN``: 8×8 images
  (``kl_optax.datasets.load_digits``) to 10 logits; the output layer is
  ``head``.
* ``Bilinear``, ``x, z -> xᵀ W z``: one weight matrix, whose loss curvature is a
  Kronecker product when ``x`` and ``z`` are independent.

``loss_fn`` is the mean cross-entropy of any of the classifiers (GPT, MLP, CNN).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

import kl_optax

__all__ = ["ADAM_LEAVES", "Bilinear", "Block", "CNN", "GPT", "GPTConfig", "MLP", "PARAM_RULES",
           "SCANNED", "loss_fn", "make_train_step", "param_spec", "stack_blocks"]

ADAM_LEAVES = (r"\['embed'\]", r"\['pos'\]", r"\['head'\]")
"""Leaves of the GPT that recipes should send to AdamW (regular expressions on their paths)."""

# The dimension numbers of a GPT built with ``scan=True``: axis 0 of every
# block parameter is the layer.
SCANNED = kl_optax.scanned(r"\['blocks'\]")

# Megatron-style model parallelism over a mesh axis "model": (path pattern,
# partition spec), the first match wins, everything else is replicated.
PARAM_RULES = (
    (r"\['(q|k|v|fc1)'\]\['kernel'\]", P(None, "model")),
    (r"\['fc1'\]\['bias'\]", P("model")),
    (r"\['(o|fc2)'\]\['kernel'\]", P("model", None)),
    (r"\['(embed|pos)'\]", P(None, "model")),
    (r"\['head'\]\['kernel'\]", P("model", None)),
)


def param_spec(path: str, shape: tuple[int, ...], mesh: jax.sharding.Mesh) -> P:
  """The partition spec of one GPT parameter under ``PARAM_RULES``.

  Args:
    path: the parameter's path, as ``jax.tree_util.keystr`` writes it.
    shape: the parameter's shape.
    mesh: the mesh; a dimension that the size of its mesh axis does not divide
      stays whole.

  Returns:
    The spec of the first rule whose pattern matches ``path``, or ``P()``
      (replicated) when none does.
  """
  for pattern, spec in PARAM_RULES:
    if re.search(pattern, path):
      return P(*[a if a is None or shape[i] % mesh.shape[a] == 0 else None
                 for i, a in enumerate(spec)])
  return P()


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  """The size of a ``GPT``.

  >>> GPTConfig(vocab_size=82).matrix_params
  98304

  Attributes:
    vocab_size: the number of tokens.
    context: the longest input sequence (the size of the position table).
    d_model: the width of the residual stream.
    n_layers: the number of blocks.
    n_heads: the attention heads per block (they divide ``d_model``).
    mlp_ratio: the MLP's hidden width as a multiple of ``d_model``.
    scan: stack the blocks' parameters along a leading layer axis
      (``nnx.vmap`` at construction, ``nnx.scan`` in the forward pass), as
      large-model code does: one ``(n_layers, ...)`` leaf per block parameter,
      and a compile time that does not grow with depth. Optimize such a model
      with ``dimension_numbers=SCANNED`` (each layer's slice is preconditioned
      as the unrolled layer's leaf would be).
  """

  vocab_size: int
  context: int = 64
  d_model: int = 64
  n_layers: int = 2
  n_heads: int = 4
  mlp_ratio: int = 4
  scan: bool = False

  @property
  def matrix_params(self) -> int:
    """Number of parameters in the 2-D weight matrices of the blocks."""
    d = self.d_model
    return self.n_layers * (4 * d * d + 2 * self.mlp_ratio * d * d)


def _dense(d_in, d_out, rngs, std, bias=True):
  return nnx.Linear(d_in, d_out, use_bias=bias, rngs=rngs,
                    kernel_init=nnx.initializers.normal(std))


class Block(nnx.Module):
  """A pre-norm transformer block: causal self-attention, then a GELU MLP.

  The ``q``, ``k``, ``v`` projections have no bias; the output projections
  (``o``, ``fc2``) start with a standard deviation scaled down by the depth.
  """

  def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
    d, std = cfg.d_model, 0.02
    out_std = std / (2 * cfg.n_layers) ** 0.5
    self.n_heads = cfg.n_heads
    self.ln1 = nnx.LayerNorm(d, rngs=rngs)
    self.q = _dense(d, d, rngs, std, bias=False)
    self.k = _dense(d, d, rngs, std, bias=False)
    self.v = _dense(d, d, rngs, std, bias=False)
    self.o = _dense(d, d, rngs, out_std)
    self.ln2 = nnx.LayerNorm(d, rngs=rngs)
    self.fc1 = _dense(d, cfg.mlp_ratio * d, rngs, std)
    self.fc2 = _dense(cfg.mlp_ratio * d, d, rngs, out_std)

  def __call__(self, x):
    b, t, d = x.shape
    h = self.ln1(x)
    split = lambda y: y.reshape(b, t, self.n_heads, d // self.n_heads)
    att = jax.nn.dot_product_attention(
        split(self.q(h)), split(self.k(h)), split(self.v(h)), is_causal=True)
    x = x + self.o(att.reshape(b, t, d))
    return x + self.fc2(jax.nn.gelu(self.fc1(self.ln2(x))))


class GPT(nnx.Module):
  """Character GPT: embeddings, ``n_layers`` blocks, final norm, output head.

  Called on int32 tokens of shape ``(batch, time)`` with ``time <= context``,
  it returns logits of shape ``(batch, time, vocab_size)``.
  """

  def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, rngs=rngs,
                           embedding_init=nnx.initializers.normal(0.02))
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (cfg.context, cfg.d_model)))
    if cfg.scan:
      @nnx.split_rngs(splits=cfg.n_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def stacked(rngs):
        return Block(cfg, rngs)
      self.blocks = stacked(rngs)
    else:
      self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layers)])
    self.ln_f = nnx.LayerNorm(cfg.d_model, rngs=rngs)
    self.head = _dense(cfg.d_model, cfg.vocab_size, rngs, 0.02)

  def __call__(self, tokens):
    x = self.embed(tokens) + self.pos[...][: tokens.shape[1]]
    if self.cfg.scan:
      x = _scan_blocks(x, self.blocks)
    else:
      for block in self.blocks:
        x = block(x)
    return self.head(self.ln_f(x))


@nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
def _scan_blocks(x, block):
  return block(x)


def stack_blocks(unrolled: nnx.State | dict) -> dict:
  """The parameters of an unrolled ``GPT`` (``nnx.state(model, nnx.Param)``) as a scanned one's.

  Every block's leaves are stacked along a new leading axis; the result (a
  pure dict) can be given to ``nnx.update`` on a ``GPT`` built with
  ``scan=True`` (same other sizes), which then computes the same function.
  """
  state = nnx.to_pure_dict(unrolled) if isinstance(unrolled, nnx.State) else dict(unrolled)
  blocks = state["blocks"]
  layers = [blocks[i] for i in sorted(blocks)]
  state["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  return state


def loss_fn(model: nnx.Module, inputs: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean cross-entropy (nats) of a classifier's logits against integer labels.

  Args:
    model: a module returning logits, e.g. ``GPT`` (then this is the
      next-character loss), ``MLP`` or ``CNN``.
    inputs: the model's input.
    targets: int labels of the shape of the logits without their last axis.

  Returns:
    The mean loss, a scalar.
  """
  logits = model(inputs)
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def make_train_step(graphdef: nnx.GraphDef, rest: nnx.State,
                    tx: optax.GradientTransformation) -> Callable:
  """A functional train step for a model split with ``nnx.split(model, nnx.Param, ...)``.

  Args:
    graphdef: the model's graph definition.
    rest: the state that is not trained (held fixed).
    tx: the optimizer.

  Returns:
    The function ``step(params, opt_state, inputs, targets) -> (params,
      opt_state, loss)``: one optimizer step on ``loss_fn``, ready for
      ``jax.jit``.
  """
  def step(params, opt_state, inputs, targets):
    def loss(p):
      return loss_fn(nnx.merge(graphdef, p, rest), inputs, targets)
    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value
  return step


class MLP(nnx.Module):
  """Flattened 8×8 image → hidden layers (GELU) → 10 logits (``head``).

  Args:
    hidden: the widths of the hidden layers.
    rngs: the initialization's random streams.
  """

  def __init__(self, hidden: tuple[int, ...], rngs: nnx.Rngs):
    dims = (64, *hidden)
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])
    self.head = nnx.Linear(dims[-1], 10, rngs=rngs)

  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for layer in self.layers:
      x = jax.nn.gelu(layer(x))
    return self.head(x)


class CNN(nnx.Module):
  """Two 3×3 convolutions (the second with stride 2), a dense layer and a ``head``.

  Takes images of shape ``(batch, 8, 8, 1)`` and returns 10 logits. The
  convolution kernels are 4-D, so a Kronecker preconditioner gives them more
  than two factors.

  Args:
    channels: the output channels of the two convolutions.
    hidden: the width of the dense layer.
    rngs: the initialization's random streams.
  """

  def __init__(self, channels: tuple[int, int], hidden: int, rngs: nnx.Rngs):
    c1, c2 = channels
    self.conv1 = nnx.Conv(1, c1, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(c1, c2, (3, 3), strides=(2, 2), rngs=rngs)
    self.dense = nnx.Linear(4 * 4 * c2, hidden, rngs=rngs)
    self.head = nnx.Linear(hidden, 10, rngs=rngs)

  def __call__(self, x):
    x = jax.nn.gelu(self.conv1(x))
    x = jax.nn.gelu(self.conv2(x))
    x = jax.nn.gelu(self.dense(x.reshape(x.shape[0], -1)))
    return self.head(x)


class Bilinear(nnx.Module):
  """``x, z -> xᵀ W z`` with one weight matrix ``W`` (``w``), initialized to zero.

  Args:
    dx: the size of ``x``.
    dz: the size of ``z``.
  """

  def __init__(self, dx: int, dz: int):
    self.w = nnx.Param(jnp.zeros((dx, dz)))

  def __call__(self, x, z):
    return jnp.einsum("bi,ij,bj->b", x, self.w[...], z)
