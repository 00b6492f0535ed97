"""TransNormerLLM's gated linear attention (R18) on the Lightning Attention kernel (R16).

``O = Norm(Lightning(Q, K, V)) * U`` with ``U = X W_u`` (the output gate), then the output projection; queries and
keys through SiLU, per-head decay ``exp(-(8 h / H) (1 - l / L))`` set by the layer's place ``l`` of ``L``.
TransNormerLLM's LRPE relative position encoding is not included (the decay already orders positions).
"""

from __future__ import annotations

from torch import Tensor, nn

from ..registry import register
from .lightning import LightningAttention, LightningConfig


@register(
    "tnl",
    family="linear",
    papers=("R18", "R16"),
    year=2024,
    summary="TransNormerLLM gated linear attention: Norm(decayed QK^T V) * XW_u, per-head, per-layer decay",
    config=LightningConfig,
)
class TransNormerAttention(LightningAttention):
    """(B, T, dim) -> (B, T, dim); decoding state ``H * d * d`` numbers at any length."""

    def __init__(self, cfg: LightningConfig) -> None:
        super().__init__(cfg)
        self.u_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def finish(self, o: Tensor, x: Tensor) -> Tensor:
        from ..common import merge_heads

        return self.o_proj(merge_heads(self._norm(o)) * self.u_proj(x))
