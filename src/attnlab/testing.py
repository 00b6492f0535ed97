"""Test harness shared by every mechanism: tolerances tied to PyTorch's own SDPA error, input factories."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Floors per dtype: added to twice SDPA's own error so tiny-error cases do not fail on rounding noise.
FLOOR = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def tolerance(dtype: torch.dtype, sdpa_err: float) -> float:
    """Allowed max abs error for a fast path in ``dtype``: 2x SDPA's error on the same inputs plus a floor."""
    if dtype not in FLOOR:
        raise KeyError(f"no tolerance for dtype {dtype}")
    return 2.0 * sdpa_err + FLOOR[dtype]


def sdpa_error(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None = None) -> float:
    """Max abs error of PyTorch SDPA (in q's dtype, dense boolean mask) against float64 on these inputs."""
    gqa = q.shape[1] != k.shape[1]
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, scale=scale, enable_gqa=gqa)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    ok = torch.isfinite(ref)
    return float((out.double() - ref)[ok].abs().max()) if bool(ok.any()) else 0.0


def qkv(
    B: int = 2, H: int = 4, Hkv: int | None = None, Tq: int = 33, Tk: int | None = None, D: int = 16,
    dtype: torch.dtype = torch.float64, seed: int = 0, requires_grad: bool = True, device: str = "cpu",
) -> tuple[Tensor, Tensor, Tensor]:
    """Seeded random q, k, v in the standard layout."""
    g = torch.Generator().manual_seed(seed)
    Hkv = H if Hkv is None else Hkv
    Tk = Tq if Tk is None else Tk
    q = torch.randn(B, H, Tq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, Tk, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, Tk, D, generator=g, dtype=torch.float64)
    return tuple(t.to(device=device, dtype=dtype).requires_grad_(requires_grad) for t in (q, k, v))


def grads(out: Tensor, inputs: tuple[Tensor, ...], seed: int = 1) -> tuple[Tensor, ...]:
    """Gradients of ``<out, r>`` for a fixed random ``r`` (a sum would hide sign errors)."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device, out.dtype)
    return torch.autograd.grad((out * r).sum(), inputs, allow_unused=True)


def max_err(a: Tensor | tuple, b: Tensor | tuple) -> float:
    if isinstance(a, (tuple, list)):
        return max((max_err(x, y) for x, y in zip(a, b) if x is not None), default=0.0)
    return float((a.detach().double() - b.detach().double()).abs().max())
