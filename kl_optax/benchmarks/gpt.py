"""A small character-level GPT in Flax NNX.

Pre-norm transformer blocks with separate ``q``, ``k``, ``v`` and ``o``
projections and a two-layer MLP, so that every weight matrix is 2-D and reaches
the Kronecker preconditioner as a matrix. Token and position embeddings, the
output head, layer-norm scales and biases are the leaves usually routed to
AdamW (see :data:`ADAM_LEAVES`).
"""

from __future__ import annotations

import dataclasses
import re

import jax
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

__all__ = ["ADAM_LEAVES", "GPT", "GPTConfig", "PARAM_RULES", "loss_fn", "make_train_step",
           "param_spec"]

# Leaves that recipes should send to AdamW (regular expressions on their paths).
ADAM_LEAVES = (r"\['embed'\]", r"\['pos'\]", r"\['head'\]")

# Megatron-style model parallelism over a mesh axis "model": (path pattern,
# partition spec), the first match wins, everything else is replicated.
PARAM_RULES = (
    (r"\['(q|k|v|fc1)'\]\['kernel'\]", P(None, "model")),
    (r"\['fc1'\]\['bias'\]", P("model")),
    (r"\['(o|fc2)'\]\['kernel'\]", P("model", None)),
    (r"\['(embed|pos)'\]", P(None, "model")),
    (r"\['head'\]\['kernel'\]", P("model", None)),
)


def param_spec(path: str, shape, mesh) -> P:
  """The spec of one parameter under :data:`PARAM_RULES` (a dim that does not divide stays whole)."""
  for pattern, spec in PARAM_RULES:
    if re.search(pattern, path):
      return P(*[a if a is None or shape[i] % mesh.shape[a] == 0 else None
                 for i, a in enumerate(spec)])
  return P()


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  vocab_size: int
  context: int = 64
  d_model: int = 64
  n_layers: int = 2
  n_heads: int = 4
  mlp_ratio: int = 4

  @property
  def matrix_params(self) -> int:
    """Number of parameters in the 2-D weight matrices of the blocks."""
    d = self.d_model
    return self.n_layers * (4 * d * d + 2 * self.mlp_ratio * d * d)


def _dense(d_in, d_out, rngs, std, bias=True):
  return nnx.Linear(d_in, d_out, use_bias=bias, rngs=rngs,
                    kernel_init=nnx.initializers.normal(std))


class Block(nnx.Module):
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
  """Character GPT: embeddings, ``n_layers`` blocks, final norm, output head."""

  def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, rngs=rngs,
                           embedding_init=nnx.initializers.normal(0.02))
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (cfg.context, cfg.d_model)))
    self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layers)])
    self.ln_f = nnx.LayerNorm(cfg.d_model, rngs=rngs)
    self.head = _dense(cfg.d_model, cfg.vocab_size, rngs, 0.02)

  def __call__(self, tokens):
    x = self.embed(tokens) + self.pos[...][: tokens.shape[1]]
    for block in self.blocks:
      x = block(x)
    return self.head(self.ln_f(x))


def loss_fn(model: GPT, inputs, targets):
  """Mean next-character cross-entropy (nats)."""
  logits = model(inputs)
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def make_train_step(graphdef, rest, tx):
  """``(params, opt_state, inputs, targets) -> (params, opt_state, loss)`` for a split GPT."""
  def step(params, opt_state, inputs, targets):
    def loss(p):
      return loss_fn(nnx.merge(graphdef, p, rest), inputs, targets)
    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value
  return step
