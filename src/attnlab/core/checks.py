"""Input checks shared by every entry point: one place, clear messages naming the argument."""

from __future__ import annotations

from torch import Tensor


def check_qkv(q: Tensor, k: Tensor, v: Tensor) -> tuple[int, int, int, int, int, int]:
    """Validate (batch, heads, seq, head_dim) inputs; returns (B, Hq, Hkv, Tq, Tk, D).

    Grouped-query attention: Hq must be a multiple of Hkv. Cross-attention: Tq may differ from Tk.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must have shape (batch, heads, seq, head_dim), got {t.dim()}-D shape {tuple(t.shape)}"
            )
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got q={q.dtype}, k={k.dtype}, v={v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got q={q.device}, k={k.device}, v={v.device}")
    B, Hq, Tq, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"batch sizes differ: q={B}, k={k.shape[0]}, v={v.shape[0]}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v must agree in (batch, heads, seq), got k={tuple(k.shape)}, v={tuple(v.shape)}")
    Hkv, Tk = k.shape[1], k.shape[2]
    if k.shape[3] != D:
        raise ValueError(f"q and k head_dim differ: q={D}, k={k.shape[3]}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    if Tq == 0 or Tk == 0:
        raise ValueError(f"empty sequence: q has {Tq} positions, k/v have {Tk}; both must be >= 1")
    if D == 0:
        raise ValueError("head_dim must be >= 1")
    return B, Hq, Hkv, Tq, Tk, D


def positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def nonneg_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return value


def int_tuple(name: str, value: int | tuple[int, ...], ndim: int, *, allow_zero: bool = False) -> tuple[int, ...]:
    """Broadcast an int or a per-axis tuple to ``ndim`` ints, each checked."""
    vals = (value,) * ndim if isinstance(value, int) else tuple(value)
    if len(vals) != ndim:
        raise ValueError(f"{name} must have {ndim} entries (one per axis), got {value!r}")
    check = nonneg_int if allow_zero else positive_int
    return tuple(check(f"{name}[{i}]", v) for i, v in enumerate(vals))


def same_device(name: str, t: Tensor, ref: Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but q is on {ref.device}")


def default_scale(head_dim: int, scale: float | None) -> float:
    if scale is None:
        return head_dim**-0.5
    if not isinstance(scale, (int, float)) or scale <= 0:
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    return float(scale)


__all__ = ["check_qkv", "positive_int", "nonneg_int", "int_tuple", "same_device", "default_scale"]
