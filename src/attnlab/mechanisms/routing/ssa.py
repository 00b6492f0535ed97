"""SSA: stochastically subsampled self-attention [P274] -- train on random, locality-biased key subsets.

During training each step every query block reads only a random subset of the key blocks it may see: its own
block always, plus ``kept - 1`` others drawn without replacement with weight ``(1 + d) ** -local_bias`` (``d`` =
distance in blocks; ``local_bias = 0`` is unbiased subsampling). ``kept = round(rate * n)`` of the ``n``
candidate blocks (causal: blocks ``0..qb``; two-sided: all), so ``rate`` is the realized key fraction up to block
rounding and the attention cost falls ~ ``1 / rate`` (the paper's 4-8x: ``rate`` 0.25-0.125).

The draw is Gumbel-top-k over ``log w(d) + Gumbel(u)`` with ``u`` from the integer hash of (seed, query block,
key block) (``core.patterns.stochastic.block_hash``): a deterministic function of absolute block ids, so decoding
equals the full forward, every engine sees the same subset, and a new ``seed`` (the training step) draws a new
sub-network. At inference the layer runs dense (``eval_mode="dense"``, the default) or one sampled sub-model per
seed; :func:`ensemble_probs` averages the predictions of ``n`` sub-models (the paper's self-ensemble).
Execution: one ``core.sparse.plan_blocks`` plan (query blocks aligned to absolute block boundaries).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from attnlab.core.checks import check_qkv, positive_int
from attnlab.core.patterns.stochastic import block_hash
from attnlab.ops._engine import plan_blocks, run
from attnlab.ops.sparse import sparse_op

from ..registry import register
from ._common import RoutingHeadsConfig, RoutingLayer

_TWO32 = float(1 << 32)


def check_ssa(rate: Any, local_bias: Any, seed: Any, block: Any) -> None:
    """Clear errors for the SSA knobs."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= 1:
        raise ValueError(f"rate must be a number in (0, 1] (the kept key fraction), got {rate!r}")
    if isinstance(local_bias, bool) or not isinstance(local_bias, (int, float)) or not local_bias >= 0:
        raise ValueError(f"local_bias must be a number >= 0 (0 = unbiased subsampling), got {local_bias!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 31:
        raise ValueError(f"seed must be an integer in [0, 2**31), got {seed!r}")
    positive_int("block", block)


def kept_blocks(n: int, rate: float) -> int:
    """Blocks a query block keeps out of ``n`` candidates: ``round(rate * n)``, at least 1 (its own)."""
    return min(n, max(1, int(math.floor(rate * n + 0.5))))


def ssa_select(qblocks: Tensor, nk: int, rate: float, local_bias: float, seed: int, causal: bool
               ) -> tuple[Tensor, Tensor]:
    """Sampled key blocks of absolute query blocks ``qblocks`` (G,): ``(index, valid)``, each (G, n).

    Entry 0 is the query block's own block; the rest are the Gumbel-top-k draw (distinct, valid where used).
    """
    dev = qblocks.device
    qb = qblocks.view(-1, 1).long()
    kb = torch.arange(nk, device=dev).view(1, -1)
    cand = kb <= qb if causal else torch.ones(qb.shape[0], nk, dtype=torch.bool, device=dev)
    n = cand.sum(1)
    u = (block_hash(seed, qb, kb).double() + 0.5) / _TWO32
    score = -local_bias * torch.log1p((qb - kb).abs().double()) - torch.log(-torch.log(u))
    score = score.masked_fill(~cand, float("-inf")).masked_fill(kb == qb, float("inf"))
    kept = torch.tensor([kept_blocks(int(c), rate) for c in n.tolist()], device=dev)
    width = int(kept.max())
    index = score.topk(width, dim=1).indices  # own block first (+inf), then the draw
    valid = torch.arange(width, device=dev).view(1, -1) < kept.view(-1, 1)
    return index.masked_fill(~valid, 0), valid


def ssa_attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, rate: float, block: int,
                  local_bias: float, seed: int, causal: bool) -> Tensor:
    """q (B, H, Tq, D), k, v (B, Hkv, Tk, D) -> (B, H, Tq, Dv): attention over the sampled key blocks."""
    B, H, Hkv, Tq, Tk, D = check_qkv(q, k, v)
    check_ssa(rate, local_bias, seed, block)
    # align the call's rows to absolute blocks: pad r0 rows in front (their outputs are dropped)
    r0 = q_offset % block
    qp = torch.cat([q.new_zeros(B, H, r0, D), q], 2) if r0 else q
    start = q_offset - r0
    G = -(-(Tq + r0) // block)
    nk = -(-Tk // block)
    qblocks = torch.arange(G, device=q.device) + start // block
    index, valid = ssa_select(qblocks, nk, rate, local_bias, seed, causal)
    shape = (B, H, G, index.shape[1])
    plan = plan_blocks(index.expand(shape).contiguous(), valid.expand(shape).contiguous(), block, block,
                       Tq + r0, Tk, Hkv, start, causal)
    out = run(qp, k, v, plan, scale)
    return out[:, :, r0:] if r0 else out


def ssa_mask(q: Tensor, k: Tensor, *, q_offset: int, rate: float = 0.25, block: int = 64,
             local_bias: float = 1.0, seed: int = 0, causal: bool = True, **_: Any) -> Tensor:
    """Dense (B, H, Tq, Tk) bool mask of the sampled key set, written plainly (Python loops over blocks)."""
    Tq, Tk = q.shape[2], k.shape[2]
    nk = -(-Tk // block)
    mask = torch.zeros(Tq, Tk, dtype=torch.bool)
    for i in range(Tq):
        p = q_offset + i
        qb = p // block
        cands = range(qb + 1) if causal else range(nk)
        scored = []
        for j in cands:
            u = (int(block_hash(seed, qb, j)) + 0.5) / _TWO32
            s = math.inf if j == qb else -local_bias * math.log1p(abs(qb - j)) - math.log(-math.log(u))
            scored.append((s, j))
        chosen = [j for _, j in sorted(scored, reverse=True)[: kept_blocks(len(scored), rate)]]
        for j in chosen:
            lo, hi = j * block, min(Tk, (j + 1) * block)
            mask[i, lo:hi] = True
        if causal:
            mask[i, p + 1:] = False
    return mask.to(q.device).view(1, 1, Tq, Tk).expand(q.shape[0], q.shape[1], Tq, Tk)


@sparse_op("ssa", papers=("P274",), summary="stochastically subsampled attention: each query block reads its own "
           "block plus a seeded, locality-biased random subset of key blocks (rate = kept fraction)",
           options={"rate": 0.25, "block": 64, "local_bias": 1.0, "seed": 0, "causal": True},
           weights_mask=ssa_mask, dense_options={"rate": 1.0}, example={"rate": 0.5, "block": 4, "seed": 3})
def ssa_op(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, state: dict, rate: float, block: int,
           local_bias: float, seed: int, causal: bool) -> Tensor:
    """SSA on q (B, H, Tq, D), k, v (B, Hkv, Tk, D) -> (B, H, Tq, Dv); stateless (the draw depends on absolute
    block ids only), so decoding equals the full forward."""
    return ssa_attention(q, k, v, scale=scale, q_offset=q_offset, rate=rate, block=block, local_bias=local_bias,
                         seed=seed, causal=causal)


# ---- the layer: sampled while training, dense or one sub-model at inference --------------------------------


@dataclass(frozen=True)
class SSAConfig(RoutingHeadsConfig):
    dim: int = 64
    heads: int = 4
    rope: bool = True
    rate: float = 0.25  # kept key fraction while training
    block: int = 64
    local_bias: float = 1.0  # sampling weight (1 + block distance) ** -local_bias
    seed: int = 0  # base seed; the training step and a per-layer salt are added
    eval_mode: str = "dense"  # "dense" | "sample" (one sub-model, seed = seed + salt)
    delta: int = 0  # D99 correction stride, 0 = off

    def validate(self) -> None:
        self.check("block")
        check_ssa(self.rate, self.local_bias, self.seed, self.block)
        if self.eval_mode not in ("dense", "sample"):
            raise ValueError(f"eval_mode must be 'dense' or 'sample', got {self.eval_mode!r}")


@register("ssa", family="routing", papers=("P274",), year=2023, config=SSAConfig,
          summary="stochastically subsampled self-attention: a new locality-biased key subset every training step; "
          "dense or a self-ensemble of sub-models at inference")
class SSAAttention(RoutingLayer):
    """Training: the sampled op with seed ``seed + salt + step`` (``step`` counts training calls). Inference:
    dense (``rate = 1``) or, with ``eval_mode="sample"`` or inside :func:`sub_model`, one sampled sub-model."""

    op = "ssa"

    def __init__(self, cfg: SSAConfig):
        super().__init__(cfg)
        # a per-layer salt from the init generator, so layers draw different subsets at one step
        self.salt = int(torch.randint(0, 1 << 20, ()).item())
        self.step = 0
        self.sample_seed: int | None = None

    def call_options(self, q: Tensor, k: Tensor, v: Tensor) -> dict[str, Any]:
        o = self.op_options()
        o.pop("eval_mode", None)
        if self.training:
            o["seed"] = (self.cfg.seed + self.salt + self.step) % (1 << 31)
            self.step += 1
        elif self.sample_seed is not None:
            o["seed"] = (self.sample_seed + self.salt) % (1 << 31)
        elif self.cfg.eval_mode == "sample":
            o["seed"] = (self.cfg.seed + self.salt) % (1 << 31)
        else:
            o["rate"] = 1.0
        return o


def ssa_layers(model: nn.Module) -> list[SSAAttention]:
    return [m for m in model.modules() if isinstance(m, SSAAttention)]


@contextmanager
def sub_model(model: nn.Module, seed: int) -> Iterator[nn.Module]:
    """Inside, every SSA layer of ``model`` runs (in eval mode) the sub-model drawn with ``seed``."""
    layers = ssa_layers(model)
    if not layers:
        raise ValueError("sub_model: the model has no SSA layer")
    old = [m.sample_seed for m in layers]
    for m in layers:
        m.sample_seed = seed
    try:
        yield model
    finally:
        for m, s in zip(layers, old):
            m.sample_seed = s


def ensemble_probs(model: nn.Module, forward: Callable[[nn.Module], Tensor], ensemble: int, seed: int = 0) -> Tensor:
    """The self-ensemble: mean softmax of ``forward(model)`` (logits (..., V)) over ``ensemble`` sub-models drawn
    with seeds ``seed .. seed + ensemble - 1`` (each layer adds its salt)."""
    positive_int("ensemble", ensemble)
    total = None
    for i in range(ensemble):
        with sub_model(model, seed + i):
            p = forward(model).float().softmax(-1)
        total = p if total is None else total + p
    return total / ensemble
