"""CARE (R45): decoupled dual-interactive linear attention over an image grid, bidirectional, with a memory.

A CARE block on ``X (hw x d)`` (tokens of an ``H x W`` grid in raster order) does three things:

* **Asymmetrical feature decoupling.** The channels are split: ``Xbar = X[:, :d1]`` goes to linear attention
  (long-range dependencies), ``Xtilde = X[:, d1:]`` (``d2 = d - d1`` channels) to depthwise convolutions (local
  inductive bias). Linear attention costs ``O(hw d1^2)``, so the paper gives it the smaller share, ``d1 = d / 3``
  (``d1 = d2 / 2``); the local part is itself decoupled across two depthwise kernels, 3x3 and 7x7, each on its own
  share of the ``d2`` channels.
* **Dual interaction.** ``Inter(x, y) = Conv1x1 -> DWConv3x3 -> Conv1x1 (Norm(x (+) y))`` with ``(+)`` channel
  concatenation and expansion 4. ``Inter1(Xbar', Xtilde')`` mixes the global and local features (``d -> d``);
  ``Inter2(Inter1(...), Z)`` mixes them with the memory and returns both the output and the new memory:
  ``X_t, Z_t = Inter2(Inter1(Xbar_t, Xtilde_t), Z_{t-1})``.
* **Dynamic memory unit.** ``Z (hw x d1)`` travels along the network: each block reads the previous block's memory
  and writes its own; at a stage boundary ``Z_0^s = Conv2x2_stride2(X_last^{s-1} (+) Z_last^{s-1})``
  (:class:`CareDownsample`). :class:`CareStack` chains blocks at one resolution.

The global branch: ``o_i = phi(q_i) S / (phi(q_i) z + eps)`` with ``S = sum_j phi(k_j)^T v_j``, ``z = sum_j
phi(k_j)`` over *all* tokens (non-causal), per head; the state can be accumulated chunk by chunk
(``chunk``) or streamed (:meth:`CareAttention.accumulate`) with the same result. ``reference`` writes the
dense ``hw x hw`` weights, the convolutions tap by tap and the norm from its definition.

Choices where the paper's text leaves it open (each stated again in ``docs/mechanisms/linear.md``):

1. Split: ``d1 = heads * round(dim * global_ratio / heads)`` (a whole number of heads), ``global_ratio = 1/3``;
   the global branch takes the first ``d1`` channels. The local channels are split as evenly as possible between
   ``local_kernels`` (first groups get the remainder); convolutions use zero "same" padding and a bias.
2. Linear attention: per-head ``q, k, v`` projections of ``Xbar`` (no bias), kernel ``phi = elu + 1``
   (``feature_map``), row-normalized, no output projection of its own (Inter1's first 1x1 convolution mixes its
   channels) and no positional encoding.
3. ``Norm`` is a LayerNorm over the concatenated channels of each token (batch-independent; a BatchNorm at
   inference is an affine map that the 1x1 convolution absorbs); a GELU follows the depthwise convolution (the
   text lists no activation; without one the block would be linear).
4. Inter2 maps back to ``d + d1`` channels and splits them: the first ``d`` are the block's output, the last
   ``d1`` the new memory (no residual on the memory).
5. A fresh memory (``forward`` or ``memory=None``) is zeros: the first block of a network has no earlier layer.
6. The layer is the token mixer only; :class:`CareStack` adds the residual ``x + y`` between blocks and the
   feed-forward parts of the paper's blocks are left to the model. The paper's first two stages (convolutions
   only, no linear attention) are a model choice, not this layer.

Non-causal and defined on the whole grid: no cache, no decoding (``decodes=False``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.checks import int_tuple, positive_int
from ..base import check_hidden
from ..common import merge_heads, split_heads
from ..heads import HeadsConfig, OpLayer
from ..registry import register
from ._common import feature_map

CARE_FEATURE_MAPS = ("elu1", "relu", "sigmoid")  # non-negative, so the normalizer is positive


@dataclass(frozen=True)
class CareConfig(HeadsConfig):
    """grid: (H, W) of the tokens (seq = H * W, raster order); global_ratio: share of channels for linear attention
    (rounded to whole heads); local_kernels: depthwise kernels sharing the local channels; expansion and
    inter_kernel: the interaction blocks' width factor and depthwise kernel; chunk: tokens per step when
    accumulating the global state (None: one shot; the result is the same). Bidirectional (no ``causal``)."""

    dim: int = 256
    heads: int = 4
    causal: bool = False
    grid: tuple[int, int] = (8, 8)
    global_ratio: float = 1 / 3
    local_kernels: tuple[int, ...] = (3, 7)
    expansion: int = 4
    inter_kernel: int = 3
    feature_map: str = "elu1"
    eps: float = 1e-6
    norm_eps: float = 1e-5
    chunk: int | None = None

    fixed = ("kv_heads", "head_dim", "causal", "rope", "rope_base")
    renamed = {"chunk_size": "chunk"}

    def validate(self) -> None:
        int_tuple("grid", self.grid, 2)
        if isinstance(self.global_ratio, bool) or not isinstance(self.global_ratio, (int, float)) or not (
            0.0 < self.global_ratio < 1.0
        ):
            raise ValueError(f"global_ratio must be a number strictly between 0 and 1, got {self.global_ratio!r}")
        kernels = tuple(self.local_kernels) if isinstance(self.local_kernels, (tuple, list)) else ()
        if not kernels:
            raise ValueError(f"local_kernels must be a non-empty tuple of odd kernel sizes, got {self.local_kernels!r}")
        for i, k in enumerate(kernels):
            if positive_int(f"local_kernels[{i}]", k) % 2 == 0:
                raise ValueError(f"local_kernels[{i}] must be odd (centred 'same' padding), got {k}")
        positive_int("expansion", self.expansion)
        if positive_int("inter_kernel", self.inter_kernel) % 2 == 0:
            raise ValueError(f"inter_kernel must be odd, got {self.inter_kernel}")
        if self.feature_map not in CARE_FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {CARE_FEATURE_MAPS}, got {self.feature_map!r}")
        if self.chunk is not None:
            positive_int("chunk", self.chunk)
        care_split(self)  # the split must leave both branches channels

    @property
    def seq_len(self) -> int:
        return self.grid[0] * self.grid[1]


def care_split(cfg: CareConfig) -> tuple[int, int]:
    """(d1, d2): channels of the global (linear attention) and local (depthwise convolution) branches."""
    d1 = cfg.heads * max(1, round(cfg.dim * cfg.global_ratio / cfg.heads))
    d2 = cfg.dim - d1
    if d2 < len(cfg.local_kernels):
        raise ValueError(
            f"global_ratio={cfg.global_ratio} with dim={cfg.dim}, heads={cfg.heads} gives the linear attention {d1} "
            f"channels (whole heads), leaving {d2} for {len(cfg.local_kernels)} local kernels; lower global_ratio"
        )
    return d1, d2


def even_split(total: int, parts: int) -> list[int]:
    """``total`` channels in ``parts`` groups as even as possible, the first groups one larger."""
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


# ---- plain depthwise convolution and norm, for the references ------------------------------------------------------


def depthwise_conv_taps(x: Tensor, weight: Tensor, bias: Tensor | None, grid: tuple[int, int]) -> Tensor:
    """Depthwise 2-D cross-correlation with zero 'same' padding, written tap by tap.

    x ``(B, hw, C)`` in raster order, weight ``(C, k, k)``: ``y[p] = sum_{a,b} w[:, a, b] x[p + (a - r, b - r)]``.
    """
    B, T, C = x.shape
    H, W = grid
    k = weight.shape[-1]
    r = k // 2
    img = F.pad(x.view(B, H, W, C), (0, 0, r, r, r, r))  # (B, H + 2r, W + 2r, C)
    y = sum(weight[:, a, b] * img[:, a : a + H, b : b + W] for a in range(k) for b in range(k))
    if bias is not None:
        y = y + bias
    return y.reshape(B, T, C)


def depthwise_conv(x: Tensor, weight: Tensor, bias: Tensor | None, grid: tuple[int, int]) -> Tensor:
    """The same through ``F.conv2d`` (groups = channels). x ``(B, hw, C)``, weight ``(C, k, k)``."""
    B, T, C = x.shape
    img = x.transpose(1, 2).reshape(B, C, *grid)
    y = F.conv2d(img, weight[:, None], bias, padding=weight.shape[-1] // 2, groups=C)
    return y.reshape(B, C, T).transpose(1, 2)


def layer_norm_plain(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * weight + bias


class Interaction(nn.Module):
    """``Inter(x, y)``: concatenate, LayerNorm, 1x1 conv to ``expansion x`` width, depthwise ``k x k`` conv, GELU,
    1x1 conv to ``out_ch``. Input ``(B, hw, in_ch)`` (already concatenated) -> ``(B, hw, out_ch)``."""

    def __init__(self, in_ch: int, out_ch: int, expansion: int, kernel: int, eps: float) -> None:
        super().__init__()
        hid = expansion * in_ch
        self.eps = eps
        self.norm = nn.LayerNorm(in_ch, eps=eps)
        self.fc1 = nn.Linear(in_ch, hid)
        self.dw_weight = nn.Parameter(torch.randn(hid, kernel, kernel) / kernel)
        self.dw_bias = nn.Parameter(torch.zeros(hid))
        self.fc2 = nn.Linear(hid, out_ch)

    def forward(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        h = self.fc1(self.norm(x))
        return self.fc2(F.gelu(depthwise_conv(h, self.dw_weight, self.dw_bias, grid)))

    def reference(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        h = layer_norm_plain(x, self.norm.weight, self.norm.bias, self.eps) @ self.fc1.weight.T + self.fc1.bias
        h = F.gelu(depthwise_conv_taps(h, self.dw_weight, self.dw_bias, grid))
        return h @ self.fc2.weight.T + self.fc2.bias


@register(
    "care",
    family="linear",
    papers=("R45",),
    year=2025,
    summary="CARE: channels split 1:2 into linear attention (global) and depthwise convs (local), dual interaction "
    "with a memory carried across layers; bidirectional over an (H, W) grid",
    config=CareConfig,
    decodes=False,
)
class CareAttention(OpLayer):
    """(B, H*W, dim) -> (B, H*W, dim); with :meth:`forward_with_memory` also memory (B, H*W, d1) in and out.
    The global branch is op ``linear`` (bidirectional) on its own ``d1``-channel projections."""

    op = "linear"

    def __init__(self, cfg: CareConfig) -> None:
        super().__init__(cfg, proj="")
        self.d1, self.d2 = care_split(cfg)
        d1 = self.d1
        self.q_proj = nn.Linear(d1, d1, bias=False)
        self.k_proj = nn.Linear(d1, d1, bias=False)
        self.v_proj = nn.Linear(d1, d1, bias=False)
        self.local_sizes = even_split(self.d2, len(cfg.local_kernels))
        self.local_weight = nn.ParameterList(
            nn.Parameter(torch.randn(c, k, k) / k) for c, k in zip(self.local_sizes, cfg.local_kernels)
        )
        self.local_bias = nn.ParameterList(nn.Parameter(torch.zeros(c)) for c in self.local_sizes)
        self.inter1 = Interaction(cfg.dim, cfg.dim, cfg.expansion, cfg.inter_kernel, cfg.norm_eps)
        self.inter2 = Interaction(cfg.dim + d1, cfg.dim + d1, cfg.expansion, cfg.inter_kernel, cfg.norm_eps)

    # ---- checks -----------------------------------------------------------------------------------------------------

    def _check(self, x: Tensor, memory: Tensor | None) -> None:
        check_hidden(x, self.dim)
        H, W = self.cfg.grid
        if x.shape[1] != H * W:
            raise ValueError(f"care needs seq = H * W = {H * W} tokens for grid {self.cfg.grid}, got seq={x.shape[1]}")
        if memory is not None and tuple(memory.shape) != (x.shape[0], x.shape[1], self.d1):
            want = (x.shape[0], x.shape[1], self.d1)
            raise ValueError(f"memory must have shape (batch, seq, d1) = {want}, got {tuple(memory.shape)}")

    def init_memory(self, x: Tensor) -> Tensor:
        """A fresh memory for input x (B, hw, dim): zeros (B, hw, d1) -- no earlier layer has written anything."""
        return x.new_zeros(x.shape[0], x.shape[1], self.d1)

    # ---- global branch: non-causal linear attention -----------------------------------------------------------------

    def _features(self, xg: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """xg (B, hw, d1) -> phi(q), phi(k) (B, H, hw, d1 / H) and v (B, H, hw, d1 / H)."""
        fm = self.cfg.feature_map
        q = feature_map(split_heads(self.q_proj(xg), self.heads), fm)
        k = feature_map(split_heads(self.k_proj(xg), self.heads), fm)
        return q, k, split_heads(self.v_proj(xg), self.heads)

    @staticmethod
    def accumulate(fk: Tensor, v: Tensor, state: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """Add tokens to the global state: ``S += phi(K)^T V`` (B, H, F, Dv), ``z += sum phi(K)`` (B, H, F).
        fk (B, H, n, F), v (B, H, n, Dv); any split of the tokens gives the same state (a sum)."""
        S, z = fk.transpose(-1, -2) @ v, fk.sum(2)
        if state is not None:
            S, z = state[0] + S, state[1] + z
        return S, z

    def global_state(self, fk: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """The state over all tokens, ``chunk`` tokens at a time (None: one shot)."""
        c = self.cfg.chunk
        if c is None:
            return self.accumulate(fk, v)
        state = None
        for i in range(0, fk.shape[2], c):
            state = self.accumulate(fk[:, :, i : i + c], v[:, :, i : i + c], state)
        return state

    def _global(self, xg: Tensor) -> Tensor:
        fq, fk, v = self._features(xg)
        if self.cfg.chunk is None:  # the op: every token sees every token
            o = self.spec(fq, fk, v, feature_map="identity", normalize=True, eps=self.cfg.eps, causal=False)
        else:
            S, z = self.global_state(fk, v)
            o = (fq @ S) / ((fq @ z[..., None]) + self.cfg.eps)  # (B, H, hw, Dv)
        return merge_heads(o)

    # ---- local branch: depthwise convolutions on channel groups ------------------------------------------------------

    def _local(self, xl: Tensor, conv=depthwise_conv) -> Tensor:
        parts = xl.split(self.local_sizes, dim=-1)
        return torch.cat(
            [conv(p, w, b, self.cfg.grid) for p, w, b in zip(parts, self.local_weight, self.local_bias)], dim=-1
        )

    # ---- the block ---------------------------------------------------------------------------------------------------

    def forward_with_memory(self, x: Tensor, memory: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x (B, hw, dim), memory (B, hw, d1) or None (fresh) -> y (B, hw, dim), new memory (B, hw, d1)."""
        self._check(x, memory)
        if memory is None:
            memory = self.init_memory(x)
        xg, xl = x.split([self.d1, self.d2], dim=-1)
        mixed = self.inter1(torch.cat([self._global(xg), self._local(xl)], dim=-1), self.cfg.grid)
        out = self.inter2(torch.cat([mixed, memory], dim=-1), self.cfg.grid)
        return out.split([self.dim, self.d1], dim=-1)

    def forward(self, x: Tensor, cache: object | None = None) -> Tensor:
        if cache is not None:
            raise TypeError("care is bidirectional over an image grid and does not decode with a cache")
        return self.forward_with_memory(x)[0]

    def init_cache(self, batch: int = 1) -> object:
        raise TypeError("care is bidirectional over an image grid and does not decode with a cache")

    def reference_with_memory(self, x: Tensor, memory: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The block written plainly: dense ``hw x hw`` linear-attention weights ``A = phi(Q) phi(K)^T`` normalized
        by their row sums, convolutions tap by tap, LayerNorm from its definition."""
        self._check(x, memory)
        if memory is None:
            memory = x.new_zeros(x.shape[0], x.shape[1], self.d1)
        xg, xl = x[..., : self.d1], x[..., self.d1 :]
        fq, fk, v = self._features(xg)
        A = fq @ fk.transpose(-1, -2)  # (B, H, hw, hw): every token sees every token
        glob = merge_heads((A @ v) / (A.sum(-1, keepdim=True) + self.cfg.eps))
        loc = self._local(xl, conv=depthwise_conv_taps)
        mixed = self.inter1.reference(torch.cat([glob, loc], dim=-1), self.cfg.grid)
        out = self.inter2.reference(torch.cat([mixed, memory], dim=-1), self.cfg.grid)
        return out[..., : self.dim], out[..., self.dim :]

    def reference(self, x: Tensor) -> Tensor:
        return self.reference_with_memory(x)[0]


class CareStack(nn.Module):
    """``depth`` CARE blocks at one resolution passing the memory along (the dynamic memory unit):

        y_i, Z_{i+1} = block_i(X_i, Z_i),      X_{i+1} = X_i + y_i

    forward(x (B, hw, dim), memory (B, hw, d1) or None) -> (x, memory) after the last block."""

    def __init__(self, cfg: CareConfig, depth: int) -> None:
        super().__init__()
        positive_int("depth", depth)
        self.blocks = nn.ModuleList(CareAttention(cfg) for _ in range(depth))

    def forward(self, x: Tensor, memory: Tensor | None = None) -> tuple[Tensor, Tensor]:
        for block in self.blocks:
            y, memory = block.forward_with_memory(x, memory)
            x = x + y
        return x, memory


class CareDownsample(nn.Module):
    """Between stages: ``X' = Conv2x2_s2(X)`` and the next stage's first memory ``Z_0 = Conv2x2_s2(X (+) Z)``.

    x (B, H*W, dim_in), memory (B, H*W, mem_in) -> x (B, H/2 * W/2, dim_out), memory (B, H/2 * W/2, mem_out)."""

    def __init__(self, grid: tuple[int, int], dim_in: int, dim_out: int, mem_in: int, mem_out: int) -> None:
        super().__init__()
        self.grid = int_tuple("grid", grid, 2)
        if any(g % 2 for g in self.grid):
            raise ValueError(f"grid {grid} must have even sides to halve")
        self.x_conv = nn.Conv2d(dim_in, dim_out, 2, stride=2)
        self.z_conv = nn.Conv2d(dim_in + mem_in, mem_out, 2, stride=2)

    @property
    def out_grid(self) -> tuple[int, int]:
        return self.grid[0] // 2, self.grid[1] // 2

    def _conv(self, conv: nn.Conv2d, x: Tensor) -> Tensor:
        B, T, C = x.shape
        y = conv(x.transpose(1, 2).reshape(B, C, *self.grid))
        return y.flatten(2).transpose(1, 2)

    def forward(self, x: Tensor, memory: Tensor) -> tuple[Tensor, Tensor]:
        H, W = self.grid
        if x.shape[1] != H * W or memory.shape[:2] != x.shape[:2]:
            raise ValueError(f"x and memory must hold H * W = {H * W} tokens of grid {self.grid} each, "
                             f"got {tuple(x.shape)} and {tuple(memory.shape)}")
        return self._conv(self.x_conv, x), self._conv(self.z_conv, torch.cat([x, memory], dim=-1))
