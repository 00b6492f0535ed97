"""L2ViT's linear global attention with its local concentration module (R288), causal 1-D form.

Linear global attention (LGA): ReLU-kernel linear attention, ``o_i = sum_j relu(q_i).relu(k_j) v_j / sum_j ...``.
The paper finds linear attention's weights too spread out and adds a local concentration module (LCM) on its
output: two depthwise convolutions with a GELU between, ``a + DWConv(GELU(DWConv(a)))``; here the convolutions
are causal along the sequence (kernel ``lcm_kernel``). L2ViT alternates these blocks with local window attention;
build that hybrid with ``TransformerLM(mechanisms=("mha", "l2vit", ...))`` and a ``SlidingWindow`` pattern on the
``mha`` layers (``tests/linear/test_layers.py`` does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.checks import positive_int
from ..common import merge_heads
from ..heads import LayerCache
from ..registry import register
from ._common import LinearHeadsConfig, LinearLayer, causal_depthwise_conv, causal_mask


@dataclass(frozen=True)
class L2ViTConfig(LinearHeadsConfig):
    lcm_kernel: int = 7
    eps: float = 1e-6

    def validate(self) -> None:
        super().validate()
        positive_int("lcm_kernel", self.lcm_kernel)


@register(
    "l2vit",
    family="linear",
    papers=("R288",),
    year=2025,
    summary="L2ViT linear global attention (ReLU kernel) + local concentration module (two causal depthwise convs)",
    config=L2ViTConfig,
)
class L2ViTAttention(LinearLayer):
    """(B, T, dim) -> (B, T, dim); decoding state ``H d (d + 1) + 2 (lcm_kernel - 1) dim`` numbers. Op ``linear``
    (ReLU features, row-normalized), then the local concentration module."""

    op = "linear"

    def __init__(self, cfg: L2ViTConfig) -> None:
        super().__init__(cfg)
        self.conv1 = nn.Parameter(torch.randn(cfg.dim, cfg.lcm_kernel) / cfg.lcm_kernel)
        self.conv2 = nn.Parameter(torch.randn(cfg.dim, cfg.lcm_kernel) / cfg.lcm_kernel)

    def op_options(self) -> dict:
        c = self.cfg
        return {"feature_map": "relu", "normalize": True, "eps": c.eps, "mode": c.mode, "chunk": c.chunk}

    def _lcm(self, a: Tensor, cache: LayerCache | None) -> Tensor:
        ex = cache.state if cache is not None else {}
        h, p1 = causal_depthwise_conv(a, self.conv1, ex.get("conv1"))
        h, p2 = causal_depthwise_conv(F.gelu(h), self.conv2, ex.get("conv2"))
        if cache is not None and self.cfg.lcm_kernel > 1:
            ex["conv1"], ex["conv2"] = p1, p2
        return a + h

    def forward(self, x: Tensor, cache: LayerCache | None = None) -> Tensor:
        q, k, v, start = self.qkv_cached(x, cache)
        o = self.attend(q, k, v, start, None if cache is None else cache.state)
        return self.o_proj(self._lcm(merge_heads(o), cache))

    def reference(self, x: Tensor) -> Tensor:
        """Dense ReLU-kernel weights, row-normalized; the convolutions written tap by tap."""
        q, k, v = self.qkv(x)
        T = x.shape[1]
        A = (F.relu(q) @ F.relu(k).transpose(-1, -2)) * causal_mask(T, x.device)
        a = merge_heads((A @ v) / (A.sum(-1, keepdim=True) + self.cfg.eps))

        def conv(u: Tensor, w: Tensor) -> Tensor:  # y_t = sum_o w[:, K-1-o] u_{t-o}
            K = w.shape[1]
            return sum(w[:, K - 1 - o] * F.pad(u, (0, 0, o, 0))[:, :T] for o in range(K))

        return self.o_proj(a + conv(F.gelu(conv(a, self.conv1)), self.conv2))

    def state_size(self, seq_len: int) -> int:
        return self.heads * self.d * (self.d + 1) + 2 * (self.cfg.lcm_kernel - 1) * self.dim
