"""What every sparse op shares, written once: the delta correction [D99] option, the free mask, the state
convention, the prefill boundary, and the float64 reference (selection mask + the correction written plainly).

A sparse op is registered with :func:`sparse_op` around its *core*::

    @sparse_op("moba", papers=("D56",), summary=..., options={"block": 64, "top_k": 3}, weights_mask=moba_mask)
    def moba_op(q, k, v, *, scale, q_offset, state, block, top_k) -> Tensor: ...

The core gets the call's q ``(B, H, Tq, D)``, k, v ``(B, Hkv, Tk, D)``, the scale, the absolute position of the
first query and a state dict (the caller's ``OpState``, or a scratch dict for a stateless call) and returns
``(B, H, Tq, Dv)``. The registered op adds:

* ``delta`` (every sparse op; 0 = off): the delta correction of [D99] with that sampling stride. Dense attention is
  computed for the rows at absolute positions that are multiples of ``delta`` only; each row gets ``dense -
  sparse`` of the latest sampled row at or before it. Positions are absolute and the last row's delta is carried
  in ``state["delta"]``, so decoding token by token matches the full forward. ``delta=1`` is dense attention.
* ``mask``: a free boolean mask ``(B or 1, H or 1, Tq, Tk)`` is ANDed with the op's selection: the call then runs
  as dense attention over ``weights_mask & mask`` (exact, not sparse: a free mask has no block structure known in
  advance). Ops that keep a state between calls accept a free mask only on a stateless full forward; with
  ``delta`` a free mask is rejected (the sampled dense rows would have to follow it too).
* the ``(out, state)`` return when ``state`` is given.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.checks import check_qkv, default_scale, positive_int
from ..core.reference import reference_attention
from .registry import register_op

DELTA_PAPER = "D99"
#: a count larger than any sequence: "every block / key / cluster" in ``dense_options``
ALL = 1 << 20


def check_delta(stride: Any) -> int:
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 0:
        raise ValueError(f"delta must be a non-negative integer (a sampling stride, 0 = off), got {stride!r}")
    return stride


def check_prefill(prefill: Any) -> None:
    if prefill is not None and (isinstance(prefill, bool) or not isinstance(prefill, int) or prefill < 1):
        raise ValueError(f"prefill must be a positive integer or None (the first call), got {prefill!r}")


def nonneg_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return value


def prefill_end(q_offset: int, Tq: int, state: dict, prefill: int | None) -> int:
    """Positions below this are the prefill: ``prefill``, or (``prefill=None``) the first call (recorded in
    ``state["prefill_end"]`` at ``q_offset == 0``)."""
    if prefill is not None:
        return prefill
    if q_offset == 0:
        state["prefill_end"] = Tq
    return state.get("prefill_end", 0)


def causal_rows(Tq: int, Tk: int, q_offset: int, device=None) -> Tensor:
    """(Tq, Tk) bool: key position <= query position ``q_offset + row``."""
    return torch.arange(Tk, device=device).view(1, Tk) <= (torch.arange(Tq, device=device) + q_offset).view(Tq, 1)


# ---- delta correction [D99] --------------------------------------------------------------------------------


def sampled_dense(
    q: Tensor, k: Tensor, v: Tensor, rows: Tensor, causal: bool = True, scale: float | None = None,
    q_offset: int | None = None,
) -> Tensor:
    """Dense attention of the query rows ``rows`` (n,) only: q (B, H, Tq, D), k, v (B, Hkv, Tk, D) -> (B, H, n, Dv)."""
    B, H, Hkv, Tq, Tk, D = check_qkv(q, k, v)
    q_offset = Tk - Tq if q_offset is None else q_offset
    if causal and q_offset == 0 and Tk == Tq and rows.numel() == Tq and torch.equal(
            rows, torch.arange(Tq, device=rows.device)):  # a whole prompt: SDPA's causal kernel, no mask tensor
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=default_scale(D, scale),
                                              enable_gqa=H != Hkv)
    mask = None
    if causal and rows.numel() and int(rows.min()) + q_offset < Tk - 1:  # rows at the last position see every key
        mask = torch.arange(Tk, device=q.device).view(1, Tk) <= (rows + q_offset).view(-1, 1)
    return F.scaled_dot_product_attention(q[:, :, rows], k, v, attn_mask=mask, scale=default_scale(D, scale),
                                          enable_gqa=H != Hkv)


def correction_terms(
    q: Tensor, k: Tensor, v: Tensor, sparse_out: Tensor, stride: int, causal: bool = True,
    scale: float | None = None, q_offset: int | None = None, carry: Tensor | None = None,
) -> Tensor:
    """The delta added to each row (B, H, Tq, Dv): ``dense - sparse`` of the latest sampled row at or before it.

    Rows are sampled at absolute positions ``q_offset + r`` that are multiples of ``stride``, so a decoding
    call (queries at the end of a cache) samples the same rows as the full forward; rows before the call's first
    sample use ``carry`` (B, H, Dv), the delta of the last row of the previous call (without it, the call's first
    row is sampled too).
    """
    positive_int("stride", stride)
    B, H, Hkv, Tq, Tk, D = check_qkv(q, k, v)
    if sparse_out.shape[:3] != q.shape[:3]:
        raise ValueError(f"sparse_out must be (B, H, Tq, Dv) like q {tuple(q.shape[:3])}, got {tuple(sparse_out.shape)}")
    q_offset = Tk - Tq if q_offset is None else q_offset
    is_sample = (torch.arange(Tq, device=q.device) + q_offset) % stride == 0
    if carry is None:
        is_sample[0] = True
    rows = is_sample.nonzero().flatten()
    delta = sampled_dense(q, k, v, rows, causal, scale, q_offset).to(sparse_out.dtype) - sparse_out[:, :, rows]
    group = torch.cumsum(is_sample.long(), 0) - 1  # latest sample at or before each row (-1: before the first)
    if carry is not None:
        delta, group = torch.cat([carry.to(delta.dtype).unsqueeze(2), delta], 2), group + 1
    return delta[:, :, group]


def delta_correction(
    q: Tensor, k: Tensor, v: Tensor, sparse_out: Tensor, stride: int, causal: bool = True,
    scale: float | None = None, q_offset: int | None = None, carry: Tensor | None = None,
) -> Tensor:
    """Delta-corrected output (B, H, Tq, Dv) from a sparse method's ``sparse_out`` (B, H, Tq, Dv) on q, k, v
    (see :func:`correction_terms` for ``carry``)."""
    return sparse_out + correction_terms(q, k, v, sparse_out, stride, causal, scale, q_offset, carry)


def delta_reference(q: Tensor, k: Tensor, v: Tensor, sparse_ref: Tensor, stride: int, *, scale: float,
                    q_offset: int, causal: bool, end: int | None = None) -> Tensor:
    """The correction written plainly (float64): row ``r`` at position ``p = q_offset + r`` gets ``dense -
    sparse`` of the row at ``stride * floor(p / stride)`` (the call's first row when that one lies before the
    call); rows at positions ``>= end`` get none."""
    Tq, Tk = q.shape[2], k.shape[2]
    rule = causal_rows(Tq, Tk, q_offset, q.device) if causal else torch.ones(Tq, Tk, dtype=torch.bool, device=q.device)
    dense = reference_attention(q, k, v, scale=scale, q_offset=q_offset, mask=rule.view(1, 1, Tq, Tk))
    pos = torch.arange(Tq, device=q.device) + q_offset
    sample = (pos // stride * stride - q_offset).clamp(min=0)
    d = (dense - sparse_ref)[:, :, sample]
    if end is not None:
        d = d * (pos < end).view(1, 1, Tq, 1)
    return sparse_ref + d


# ---- registration ---------------------------------------------------------------------------------------------


def check_mask(name: str, mask: Tensor, q: Tensor, k: Tensor) -> None:
    """A free mask is a bool ``(B or 1, H or 1, Tq, Tk)``."""
    B, H, Tq, Tk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[-2:] != (Tq, Tk) \
            or mask.shape[0] not in (1, B) or mask.shape[1] not in (1, H):
        got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor) else repr(mask)
        raise ValueError(f"op {name!r}: mask must be a bool tensor ({B} or 1, {H} or 1, {Tq}, {Tk}), got {got}")


def sparse_op(
    name: str,
    *,
    papers: tuple[str, ...],
    summary: str,
    options: Mapping[str, Any],
    weights_mask: Callable[..., Tensor] | None,
    family: str = "routing",
    dense: Callable[..., Tensor] | None = None,
    stateful: bool = False,
    causal: Callable[[dict], bool] = lambda o: bool(o.get("causal", True)),
    corrected_end: Callable[..., int | None] | None = None,
    causal_only: bool = False,
    decodes: bool = True,
    renamed: Mapping[str, str] | None = None,
    dense_options: Mapping[str, Any] | None = None,
    example: Mapping[str, Any] | None = None,
) -> Callable[[Callable[..., Tensor]], Callable[..., Any]]:
    """Register ``core(q, k, v, *, scale, q_offset, state, **options) -> out`` as sparse op ``name``.

    ``weights_mask(q, k, *, q_offset, scale, state=None, **options)``: the selection, built plainly (dense bool).
    ``dense(q, k, v, *, scale, q_offset, mask, dtype, **options)``: the op written densely where a mask does not
    describe it (e.g. a score bias); default: dense attention over ``weights_mask & mask``. It is the float64
    reference (``dtype=float64``) and the free-mask path (``dtype=None``). ``stateful``: the op keeps a state
    between calls (a free mask then needs a stateless full forward). ``causal(options)``: whether the dense
    attention the correction samples is causal. ``corrected_end(q_offset, Tq, state, options)``: rows at positions
    from it on get no correction (None: every row).
    """
    opts = {**options, "delta": 0}
    renames = {"delta_correction": "delta", **(renamed or {})}
    papers = tuple(papers) + ((DELTA_PAPER,) if DELTA_PAPER not in papers else ())

    def dense_of(q, k, v, *, scale, q_offset, mask, dtype, **o):
        if dense is not None:
            return dense(q, k, v, scale=scale, q_offset=q_offset, mask=mask, dtype=dtype, **o)
        with torch.no_grad():
            wm = weights_mask(q, k, q_offset=q_offset, scale=scale, **o)
        wm = wm if mask is None else wm & mask
        return reference_attention(q, k, v, scale=scale, q_offset=q_offset, mask=wm, dtype=dtype)

    def reference(q, k, v, *, scale, q_offset, mask=None, delta=0, **o):
        check_delta(delta)
        out = dense_of(q, k, v, scale=scale, q_offset=q_offset, mask=mask, dtype=torch.float64, **o)
        if delta:
            end = None if corrected_end is None else corrected_end(q_offset, q.shape[2], {}, o)
            out = delta_reference(q, k, v, out, delta, scale=scale, q_offset=q_offset, causal=causal(o), end=end)
        return out

    def deco(core: Callable[..., Tensor]) -> Callable[..., Any]:
        def op(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, mask: Tensor | None = None,
               state: dict | None = None, delta: int = 0, **o: Any):
            check_delta(delta)
            st = {} if state is None else state
            if mask is not None:
                check_mask(name, mask, q, k)
                if bool(mask.all()):  # nothing masked: the sparse path
                    mask = None
            if mask is not None:
                if delta:
                    raise ValueError(f"op {name!r}: a free mask cannot be combined with delta={delta} (the sampled "
                                     "dense rows would ignore it); use delta=0")
                if stateful and (state is not None or q_offset != 0 or q.shape[2] != k.shape[2]):
                    raise ValueError(f"op {name!r} keeps a state between calls: a free mask is supported on a "
                                     "stateless full forward only (state=None, q_offset=0, Tq == Tk)")
                out = dense_of(q, k, v, scale=scale, q_offset=q_offset, mask=mask, dtype=None, **o).to(v.dtype)
            else:
                out = core(q, k, v, scale=scale, q_offset=q_offset, state=st, **o)
            if delta:
                d = correction_terms(q, k, v, out, delta, causal(o), scale, q_offset, st.get("delta"))
                end = None if corrected_end is None else corrected_end(q_offset, q.shape[2], st, o)
                if end is not None:
                    d = d * (torch.arange(q.shape[2], device=q.device) + q_offset < end).view(1, 1, -1, 1)
                out = out + d
                st["delta"] = d[:, :, -1].detach()
            return out if state is None else (out, state)

        op.__doc__ = core.__doc__
        op.__name__ = core.__name__
        register_op(name, family=family, papers=papers, summary=summary, options=opts, cache="kv",
                    causal_only=causal_only, weights_mask=weights_mask, renamed=renames, reference=reference,
                    dense_options=dense_options, decodes=decodes, example=example)(op)
        return op

    return deco


__all__ = ["ALL", "causal_rows", "check_delta", "check_prefill", "correction_terms", "delta_correction",
           "delta_reference", "prefill_end", "sampled_dense", "sparse_op"]
