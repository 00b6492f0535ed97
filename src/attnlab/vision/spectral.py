"""SpectFormer's spectral blocks (V67, Patro et al. 2023): a few Fourier gating blocks before the attention blocks.

The spectral gating mixer transforms the token image to the frequency domain, multiplies every frequency of
every channel by a learned complex weight and transforms back (GFNet's global filter, which SpectFormer's
spectral layers use):

    Z[u, v, c] = DFT2(X)[u, v, c]          (orthonormal, v = 0 .. gw // 2: the real input's half spectrum)
    Y          = IDFT2_real(W (*) Z)        (W: a learned complex (gh, gw // 2 + 1, C) tensor)

Cost ``O(N log N C)`` for the FFTs plus ``N C`` for the gating; a global (circular) receptive field in one layer.
SpectFormer puts ``alpha`` spectral blocks first and attention blocks after (its best: the first half of the
blocks spectral); :func:`spectformer_mixers` gives that layout for :class:`attnlab.vision.vit.ViTConfig`.
Deviations: one learned filter per block (no extra gating by a second filter); filters initialized as
``N(0, 0.02^2)`` like GFNet.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..core.checks import nonneg_int, positive_int
from .registry import MixerContext, register_mixer


class SpectralGating(nn.Module):
    """(B, gh * gw, C) -> (B, gh * gw, C): ``irfft2(W * rfft2(X))`` over the grid axes, per channel."""

    def __init__(self, dim: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.grid = grid
        gh, gw = grid
        self.weight = nn.Parameter(torch.randn(gh, gw // 2 + 1, dim, 2) * 0.02)  # (real, imag)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        gh, gw = self.grid
        if T != gh * gw:
            raise ValueError(f"expected {gh} x {gw} = {gh * gw} grid tokens, got {T}")
        img = x.reshape(B, gh, gw, C)
        z = torch.fft.rfft2(img.float() if img.dtype in (torch.bfloat16, torch.float16) else img, dim=(1, 2),
                            norm="ortho")
        w = torch.view_as_complex(self.weight.to(z.real.dtype).contiguous())
        y = torch.fft.irfft2(z * w, s=(gh, gw), dim=(1, 2), norm="ortho")
        return y.reshape(B, T, C).to(x.dtype)

    def reference(self, x: Tensor) -> Tensor:
        """The transforms as explicit sums: the half-spectrum DFT, the inverse DFT along rows, and the real
        inverse along columns ``y[n] = (Re Y[0] + 2 sum_{0 < v < gw/2} Re(Y[v] e^{2 pi i v n / gw})
        [+ Re Y[gw/2] (-1)^n]) / sqrt(gw)`` (the imaginary parts of the self-conjugate columns drop out)."""
        B, T, C = x.shape
        gh, gw = self.grid
        img = x.reshape(B, gh, gw, C).to(torch.complex128)
        m, n = torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64)
        u, v = m, torch.arange(gw // 2 + 1, dtype=torch.float64)
        e_h = torch.exp(-2j * math.pi * torch.outer(u, m) / gh)  # (u, m)
        e_w = torch.exp(-2j * math.pi * torch.outer(v, n) / gw)  # (v, n)
        z = torch.einsum("um,vn,bmnc->buvc", e_h, e_w, img) / math.sqrt(gh * gw)
        w = torch.complex(self.weight[..., 0].double(), self.weight[..., 1].double())
        z = z * w
        rows = torch.einsum("mu,buvc->bmvc", e_h.conj().T, z) / math.sqrt(gh)  # inverse along the row axis
        coef = torch.full((gw // 2 + 1,), 2.0, dtype=torch.float64)
        coef[0] = 1.0
        if gw % 2 == 0:
            coef[-1] = 1.0
        phase = e_w.conj()  # (v, n): e^{+2 pi i v n / gw}
        y = torch.einsum("v,bmvc,vn->bmnc", coef.to(torch.complex128), rows, phase).real / math.sqrt(gw)
        return y.reshape(B, T, C).to(x.dtype)


@register_mixer("spectral", papers=("V67",), summary="SpectFormer / GFNet spectral gating: FFT, learned complex "
                "filter per frequency and channel, inverse FFT", grid_only=True)
def build_spectral(ctx: MixerContext) -> SpectralGating:
    return SpectralGating(ctx.dim, ctx.grid)


def spectformer_mixers(depth: int, spectral: int | None = None, attention: str = "mha") -> tuple[str, ...]:
    """SpectFormer's layout: ``spectral`` spectral blocks (default: the first half) then ``attention`` blocks."""
    positive_int("depth", depth)
    spectral = depth // 2 if spectral is None else nonneg_int("spectral", spectral)
    if spectral > depth:
        raise ValueError(f"spectral ({spectral}) must be at most depth ({depth})")
    return ("spectral",) * spectral + (attention,) * (depth - spectral)
