"""A cost model of the optimizer update at GPT-2 and LLaMA shapes: a projection.

Usage (compiles only, nothing is trained; a few minutes on a 2-core CPU):

    python -m kl_optax.benchmarks.cost --out runs/cost

For every weight matrix shape of a model, every recipe's update of one matrix is
compiled (``jax.eval_shape`` for the state, XLA's cost analysis for FLOPs and
bytes accessed) without running it; the model's figures are these times the
number of matrices of that shape. Embeddings, norms and biases take AdamW (as in
the recipes' default routing, where a dim above ``max_precond_dim`` or a vector
is not preconditioned). Per step:

* ``F_upd`` = ordinary update FLOPs + refresh FLOPs / ``precondition_frequency``
  (the refresh's QR and eigh are LAPACK or cuSOLVER calls XLA does not count, and
  they are not in this model either);
* ``B_upd`` = bytes the ordinary update reads and writes (XLA's count);
* projected update time ``t_upd = max(F_upd / peak(dtype), B_upd / bandwidth)``,
  the roofline of the whole update (optimistic: it assumes full use of one of the
  two);
* forward+backward FLOPs ``F_model = 6 (N + V d) T + 12 L d s T`` for ``N``
  matrix parameters of the blocks, the output head's ``V d`` (vocabulary × width),
  ``T`` tokens per step, ``L`` layers, width ``d``, context ``s``, at
  the bfloat16 peak: ``t_model = F_model / peak(bf16)``, equally optimistic.

Reported: ``t_upd / t_model`` at 0.5 M and 64 k tokens per step, per recipe and per
compute dtype (``float32`` at ``HIGHEST``: the non-tensor-core rate; ``"high"``:
TF32; ``bfloat16``). These are projections from published peak rates, not
measurements.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os

import jax
import jax.numpy as jnp
import optax

import kl_optax
from kl_optax.benchmarks import flops, harness

__all__ = ["ACCELERATORS", "MODELS", "Model", "main", "model_flops", "update_cost"]


@dataclasses.dataclass(frozen=True)
class Model:
  """A decoder-only transformer's weight shapes.

  Attributes:
    d: width.
    layers: blocks.
    mlp: hidden width of the MLP.
    vocab: vocabulary size.
    context: sequence length.
    gated: a SwiGLU MLP (three matrices) instead of two.
    tied: input and output embeddings shared.
    fused_qkv: one ``d × 3d`` matrix for the attention's inputs (GPT-2) instead of
      three ``d × d`` (LLaMA).
    source: where the configuration comes from.
  """

  d: int
  layers: int
  mlp: int
  vocab: int
  context: int
  gated: bool
  tied: bool
  fused_qkv: bool
  source: str

  def matrices(self) -> dict[tuple[int, int], int]:
    """``{shape: count}`` of the preconditioned matrices (the blocks' weights)."""
    d, f = self.d, self.mlp
    per_layer: dict[tuple[int, int], int] = {}

    def add(shape, n=1):
      per_layer[shape] = per_layer.get(shape, 0) + n

    if self.fused_qkv:
      add((d, 3 * d))
    else:
      add((d, d), 3)
    add((d, d))              # attention output
    add((d, f), 2 if self.gated else 1)
    add((f, d))
    return {s: n * self.layers for s, n in per_layer.items()}

  def matrix_params(self) -> int:
    return sum(math.prod(s) * n for s, n in self.matrices().items())

  def other_params(self) -> int:
    """Embeddings (positions too, for GPT-2), norms and biases: AdamW's leaves."""
    emb = self.vocab * self.d * (1 if self.tied else 2)
    pos = self.context * self.d if self.fused_qkv else 0
    norms = (2 * self.layers + 1) * self.d
    biases = 0
    if self.fused_qkv:  # GPT-2 has biases and LayerNorm shifts
      biases = self.layers * (3 * self.d + self.d + self.mlp + self.d) + norms
    return emb + pos + norms + biases


MODELS = {
    "gpt2-124m": Model(768, 12, 3072, 50257, 1024, gated=False, tied=True, fused_qkv=True,
                       source="GPT-2 small (Radford et al., 2019): d 768, 12 layers, context 1024"),
    "gpt2-350m": Model(1024, 24, 4096, 50257, 1024, gated=False, tied=True, fused_qkv=True,
                       source="GPT-2 medium: d 1024, 24 layers, context 1024"),
    "llama-134m": Model(768, 12, 2048, 32000, 256, gated=True, tied=False, fused_qkv=False,
                        source="LLaMA-style, d 768, 12 layers, SwiGLU 2048, vocab 32000, untied "
                               "(GaLore's 130M configuration; 134.1 M parameters), context 256"),
    "tiny": Model(32, 2, 64, 100, 16, gated=True, tied=False, fused_qkv=False,
                  source="a tiny configuration for tests"),
}

# Published dense peak rates (FLOP/s) per compute dtype and HBM bandwidth (bytes/s).
ACCELERATORS = {
    "H100 SXM": {"float32": 66.9e12, "high": 494.7e12, "bfloat16": 989.4e12, "bandwidth": 3.35e12},
    "H200 SXM": {"float32": 66.9e12, "high": 494.7e12, "bfloat16": 989.4e12, "bandwidth": 4.8e12},
}
COMPUTE = {"float32": {}, "high": {"matmul_precision": "high"},
           "bfloat16": {"compute_dtype": jnp.bfloat16}}


def _recipe(name: str, compute: str, rank: int | None):
  if name == "adamw":
    return optax.adamw(1e-3)
  if name == "muon":
    return optax.contrib.muon(1e-3)
  kwargs = {"rank": rank} if name == "pro_kl_shampoo" else {}
  return getattr(kl_optax, name)(1e-3, layout=kl_optax.Layout(**COMPUTE[compute]), **kwargs)


def _compiled_cost(tx, shape) -> tuple[float, float, int]:
  params = {"w": jax.ShapeDtypeStruct(tuple(shape), jnp.float32)}
  state = jax.eval_shape(tx.init, params)
  cost = jax.jit(tx.update).lower(params, state, params).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"]), float(cost.get("bytes accessed", 0.0)), harness.state_bytes(state)


@functools.lru_cache(maxsize=None)
def update_cost(name: str, shape: tuple[int, int], compute: str = "float32",
                rank: int | None = None,
                precondition_frequency: int = 10) -> dict:
  """FLOPs (amortized refresh included), bytes and state bytes of one matrix's update.

  The ordinary update's FLOPs and bytes are XLA's count of the recipe's parts without
  the refresh (the refresh branch of the whole update's conditional is counted
  separately and divided by ``precondition_frequency``).
  """
  if compute == "high":
    # The matmul precision changes neither the FLOPs nor the bytes, only the rate.
    return update_cost(name, shape, "float32", rank, precondition_frequency)
  full_flops, full_bytes, state = _compiled_cost(_recipe(name, compute, rank), shape)
  if name == "pro_kl_shampoo" and rank is None:
    rank = 128  # the recipe's default
  if name in flops.RECIPES and (name != "pro_kl_shampoo" or rank < max(shape)):
    ordinary, ordinary_bytes, _ = _compiled_cost(
        flops.ordinary_transform(name, rank=rank, **COMPUTE[compute]), shape)
    refresh = full_flops - ordinary
  else:
    ordinary, ordinary_bytes, refresh = full_flops, full_bytes, 0.0
  # (Cached: the models share shapes.)
  return {"flops": ordinary + refresh / precondition_frequency, "ordinary_flops": ordinary,
          "refresh_flops": refresh, "bytes": ordinary_bytes, "state_bytes": state}


def model_flops(model: Model, tokens: int) -> float:
  """Forward+backward FLOPs of one step: ``6 (N + V d) T + 12 L d s T``.

  ``N``: the blocks' matrix parameters; ``V d``: the output head's logits product
  (tied or not); ``12 L d s``: attention scores and their use, per token.
  """
  head = model.vocab * model.d
  return (6 * (model.matrix_params() + head) * tokens
          + 12 * model.layers * model.d * model.context * tokens)


def _adamw_other(model: Model) -> dict:
  """AdamW on the embeddings, norms and biases: 2 moments; bytes as XLA counts per entry."""
  n = model.other_params()
  f, b, s = _compiled_cost(optax.adamw(1e-3), (1024, 1024))
  per = 1024 * 1024
  return {"flops": f / per * n, "bytes": b / per * n, "state_bytes": s / per * n}


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--models", default="gpt2-124m,gpt2-350m,llama-134m")
  p.add_argument("--recipes", default="adamw,muon,kl_shampoo,kl_soap,soap,pro_kl_shampoo")
  p.add_argument("--ranks", default="32,128,256", help="Pro-KLShampoo's ranks")
  p.add_argument("--compute", default="float32,high,bfloat16")
  p.add_argument("--tokens", default="524288,65536")
  p.add_argument("--accelerator", default="H100 SXM", choices=sorted(ACCELERATORS))
  p.add_argument("--precondition-frequency", type=int, default=10)
  p.add_argument("--out", default="runs/cost")
  return p.parse_args(argv)


def main(argv=None) -> list[dict]:
  args = _parse(argv)
  acc = ACCELERATORS[args.accelerator]
  tokens = [int(t) for t in args.tokens.split(",")]
  variants = []
  for name in args.recipes.split(","):
    if name == "pro_kl_shampoo":
      variants += [(name, int(r)) for r in args.ranks.split(",")]
    else:
      variants.append((name, None))
  rows = []
  for model_name in args.models.split(","):
    model = MODELS[model_name]
    other = _adamw_other(model)
    for name, rank in variants:
      for compute in args.compute.split(","):
        if name in ("adamw", "muon") and compute != "float32":
          continue  # optax's own updates: no compute option
        total = {"flops": other["flops"], "bytes": other["bytes"],
                 "state_bytes": other["state_bytes"]}
        for shape, count in model.matrices().items():
          c = update_cost(name, shape, compute, rank, args.precondition_frequency)
          for k in total:
            total[k] += count * c[k]
        peak = acc[compute]
        t_upd = max(total["flops"] / peak, total["bytes"] / acc["bandwidth"])
        row = {"model": model_name, "recipe": name if rank is None else f"{name} (rank {rank})",
               "compute": compute, **total, "update_ms": 1e3 * t_upd,
               "params": model.matrix_params() + model.other_params()}
        for t in tokens:
          row[f"fraction_{t}"] = t_upd / (model_flops(model, t) / acc["bfloat16"])
        rows.append(row)
        print(f"  {model_name:11s} {row['recipe']:24s} {compute:9s} "
              f"{total['flops'] / 1e12:7.3f} TFLOP {total['bytes'] / 1e9:6.2f} GB "
              f"{t_upd * 1e3:7.2f} ms  " +
              "  ".join(f"{100 * row[f'fraction_{t}']:6.2f}% @{t}" for t in tokens), flush=True)
  lines = _markdown(rows, tokens, args)
  harness.write_report(args.out, "kl_optax.benchmarks.cost", argv, rows, lines)
  _plot(os.path.join(args.out, "cost.png"), rows, tokens[0], args)
  return rows


def _markdown(rows, tokens, args) -> list[str]:
  heads = " | ".join(f"update / fwd+bwd at {t:,} tokens" for t in tokens)
  lines = [f"Projection for one {args.accelerator} (roofline from published peaks; QR and eigh "
           f"not included; refresh every {args.precondition_frequency} steps amortized).", "",
           f"| model | recipe | compute | update TFLOP | update GB | state GB | projected "
           f"update ms | {heads} |", "|---|---|---|---|---|---|---|" + "---|" * len(tokens)]
  for r in rows:
    fr = " | ".join(f"{100 * r[f'fraction_{t}']:.2f} %" for t in tokens)
    lines.append(f"| {r['model']} | {r['recipe']} | {r['compute']} | {r['flops'] / 1e12:.3f} | "
                 f"{r['bytes'] / 1e9:.2f} | {r['state_bytes'] / 1e9:.2f} | {r['update_ms']:.2f} "
                 f"| {fr} |")
  return lines


def _plot(path, rows, t, args):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  models = list(dict.fromkeys(r["model"] for r in rows))
  labels = list(dict.fromkeys(f"{r['recipe']}, {r['compute']}" for r in rows))
  fig, ax = plt.subplots(figsize=(9, 0.32 * len(labels) + 1.5))
  height = 0.8 / len(models)
  for i, m in enumerate(models):
    vals = {f"{r['recipe']}, {r['compute']}": 100 * r[f"fraction_{t}"] for r in rows
            if r["model"] == m}
    y = np.arange(len(labels)) + i * height
    ax.barh(y, [vals.get(lab, 0.0) for lab in labels], height, label=m)
  ax.set_yticks(np.arange(len(labels)) + 0.4 - height / 2, labels, fontsize=7)
  ax.invert_yaxis()
  ax.set_xscale("log")
  ax.axvline(5, color="k", lw=0.8, ls="--", label="5 %")
  ax.set_xlabel(f"projected update time, % of forward+backward at {t:,} tokens/step "
                f"({args.accelerator}, a projection)")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3, axis="x")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  main()
