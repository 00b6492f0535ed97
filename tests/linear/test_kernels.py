"""The three forms of the linear-attention kernels agree (outputs, states, gradients) and stay finite at 65k."""

from __future__ import annotations

import pytest
import torch

from attnlab.core import linear as L
from attnlab.testing import grads, max_err, qkv

F64 = torch.float64


def _decay(kind: str, B: int, H: int, T: int, seed: int = 3) -> torch.Tensor | None:
    g = torch.Generator().manual_seed(seed)
    if kind == "none":
        return None
    if kind == "head":
        return (-torch.rand(H, generator=g, dtype=F64) * 0.7).requires_grad_()
    return (-torch.rand(B, H, T, generator=g, dtype=F64) * 0.7).requires_grad_()


def _inputs(T: int, normalize: bool, seed: int = 0):
    q, k, v = qkv(B=2, H=3, Tq=T, D=5, seed=seed)
    if normalize:  # positive features, as a feature map gives
        q = torch.nn.functional.elu(q.detach()).add(1).requires_grad_()
        k = torch.nn.functional.elu(k.detach()).add(1).requires_grad_()
    return q, k, v


@pytest.mark.parametrize("decay", ["none", "head", "token"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("T,C", [(24, 8), (29, 8), (13, 32), (1, 4)])
def test_three_forms_agree(decay: str, normalize: bool, T: int, C: int) -> None:
    q, k, v = _inputs(T, normalize)
    g = _decay(decay, 2, 3, T)
    cols = v.shape[-1] + int(normalize)
    S0 = torch.rand(2, 3, q.shape[-1], cols, dtype=F64, generator=torch.Generator().manual_seed(9))
    S0.requires_grad_()
    inputs = tuple(t for t in (q, k, v, g, S0) if t is not None)
    res = {}
    for mode in L.MODES:
        o, S = L.linear_attention(q, k, v, g, state=S0, normalize=normalize, mode=mode, chunk=C)
        res[mode] = (o, S, grads(torch.cat([o.flatten(), S.flatten()]), inputs))
    ref_o, ref_S, ref_g = res["parallel"]
    for mode in ("chunked", "recurrent"):
        o, S, gr = res[mode]
        assert max_err(o, ref_o) < 1e-10, mode
        assert max_err(S, ref_S) < 1e-10, mode
        assert max_err(gr, ref_g) < 1e-9, mode


def test_parallel_matches_the_written_out_sum() -> None:
    # o_t = sum_{s<=t} (prod_{s<r<=t} a_r) (q_t . k_s) v_s -- independent of the kernel's cumsum trick
    q, k, v = qkv(B=1, H=2, Tq=7, D=3, requires_grad=False)
    g = -torch.rand(1, 2, 7, dtype=F64)
    o, _ = L.linear_attention(q, k, v, g, mode="parallel")
    want = torch.zeros_like(o)
    for t in range(7):
        for s in range(t + 1):
            decay = g[:, :, s + 1 : t + 1].sum(-1).exp()[..., None]
            want[:, :, t] += decay * (q[:, :, t] * k[:, :, s]).sum(-1, keepdim=True) * v[:, :, s]
    assert max_err(o, want) < 1e-12


@pytest.mark.parametrize("split", [1, 5, 16])
def test_state_carries_across_calls(split: int) -> None:
    q, k, v = _inputs(40, True)
    g = _decay("token", 2, 3, 40)
    full, S_full = L.linear_attention(q, k, v, g, normalize=True, chunk=8)
    o1, S = L.linear_attention(q[:, :, :split], k[:, :, :split], v[:, :, :split], g[..., :split], normalize=True)
    o2, S = L.linear_attention(q[:, :, split:], k[:, :, split:], v[:, :, split:], g[..., split:], state=S,
                               normalize=True, chunk=8)
    assert max_err(torch.cat([o1, o2], 2), full) < 1e-12
    assert max_err(S, S_full) < 1e-12


def test_segments_of_the_chunked_form(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(L, "SEGMENT_CHUNKS", 4)
    T = 2 * 4 * 2 + 3  # chunk 2, segments of 8 tokens: three segments, the last one padded
    q, k, v = qkv(B=1, H=2, Tq=T, D=4)
    g = -torch.rand(2, dtype=F64)
    ref, S_ref = L.linear_attention(q, k, v, g, mode="parallel")
    o, S = L.linear_attention(q, k, v, g, chunk=2)
    assert max_err(o, ref) < 1e-10 and max_err(S, S_ref) < 1e-10
    assert max_err(grads(o, (q, k, v)), grads(ref, (q, k, v))) < 1e-9


def test_bad_inputs_fail_loudly() -> None:
    q, k, v = qkv(B=1, H=2, Tq=5, D=4, requires_grad=False)
    with pytest.raises(ValueError, match="log_decay"):
        L.linear_attention(q, k, v, torch.ones(2))
    with pytest.raises(ValueError, match="heads"):
        L.linear_attention(q, k, v, -torch.ones(3))
    with pytest.raises(ValueError, match="mode"):
        L.linear_attention(q, k, v, mode="fast")
    with pytest.raises(ValueError, match="state"):
        L.linear_attention(q, k, v, state=torch.zeros(1, 2, 4, 4), normalize=True)


# ---- long sequences in low precision: no overflow, bounded error against float64 -----------------------------


def _long(T: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 1, T, 16, generator=g, dtype=F64)
    k = torch.randn(1, 1, T, 16, generator=g, dtype=F64)
    v = torch.randn(1, 1, T, 16, generator=g, dtype=F64)
    return q, k, v


@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_long_sequence_decay_and_normalizer(dtype: torch.dtype, bound: float) -> None:
    T = 65536
    q, k, v = _long(T)
    q, k = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
    cases = {
        # no decay, normalized: sums over 65k tokens
        "normalized": dict(log_decay=None, normalize=True),
        # strong and weak per-head decays (TransNormerLLM's range: -8 .. ~0), unnormalized
        "decay-8": dict(log_decay=torch.tensor([-8.0]), normalize=False),
    }
    for name, kw in cases.items():
        low = tuple(t.to(dtype) for t in (q, k, v))
        ref, _ = L.linear_attention(*(t.double() for t in low), **kw)  # float64 on the same rounded inputs
        out, S = L.linear_attention(*low, **kw)
        assert torch.isfinite(out.float()).all() and torch.isfinite(S).all(), name
        rel = max_err(out, ref) / float(ref.abs().max())
        print(f"{name} {dtype}: max rel err vs float64 {rel:.2e}")
        assert rel < bound, (name, rel)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_cumulative_softmax_with_huge_logits(dtype: torch.dtype) -> None:
    T = 65536
    q, s, v = _long(T, seed=1)
    # exp(s) overflows fp32 and bf16 by far (logits up to ~3000); the running max keeps exponents <= 0.
    # Jumps of +-1000 between chunks and +2000 half-way: the carried state must be rescaled, not overflow.
    # (Within one chunk the logits vary by ~60 here: the documented limit of the chunked form is ~80 in fp32.)
    t = torch.arange(T, dtype=F64)[:, None]
    s = s * 8.0 + 1000.0 * ((t // 64) % 3) + 2000.0 * (t >= T // 2)
    low = tuple(t.to(dtype) for t in (q, s, v))
    ref, _ = L.cumulative_softmax_attention(*(t.double() for t in low))
    out, st = L.cumulative_softmax_attention(*low)
    assert torch.isfinite(out.float()).all() and all(torch.isfinite(t).all() for t in st)
    rel = max_err(out, ref) / float(ref.abs().max())
    print(f"cumulative softmax {dtype}: max rel err vs float64 {rel:.2e}")
    assert rel < (1e-4 if dtype == torch.float32 else 3e-2)


# ---- per-feature softmax over the prefix -------------------------------------------------------------------------


@pytest.mark.parametrize("T,C", [(24, 8), (29, 8), (5, 16)])
def test_cumulative_softmax_forms_agree(T: int, C: int) -> None:
    q, s, v = qkv(B=2, H=2, Tq=T, D=4, seed=4)
    with torch.no_grad():
        s.mul_(6.0)
    res = {}
    for mode in L.MODES:
        o, st = L.cumulative_softmax_attention(q, s, v, mode=mode, chunk=C)
        res[mode] = (o, grads(o, (q, s, v)), st)
    for mode in ("chunked", "recurrent"):
        assert max_err(res[mode][0], res["parallel"][0]) < 1e-10, mode
        assert max_err(res[mode][1], res["parallel"][1]) < 1e-9, mode
        a, b = res[mode][2], res["parallel"][2]
        # states agree once expressed against the same reference (relative: exp(ref) is large)
        assert max_err(a.num / a.den[..., None], b.num / b.den[..., None]) < 1e-10
        assert max_err((a.den.log() + a.ref) / (b.den.log() + b.ref), torch.ones_like(a.den)) < 1e-12


def test_cumulative_softmax_known_answer_and_carry() -> None:
    q, s, v = qkv(B=1, H=2, Tq=9, D=3, requires_grad=False, seed=5)
    o, _ = L.cumulative_softmax_attention(q, s, v, mode="parallel")
    w = torch.softmax(s[:, :, :4], dim=2)  # prefix of 4 tokens: row t = 3
    want = torch.einsum("bhf,bhjf,bhjd->bhd", q[:, :, 3], w, v[:, :, :4])
    assert max_err(o[:, :, 3], want) < 1e-12
    for split in (1, 4):
        a, st = L.cumulative_softmax_attention(q[:, :, :split], s[:, :, :split], v[:, :, :split])
        for mode in L.MODES:
            b, _ = L.cumulative_softmax_attention(q[:, :, split:], s[:, :, split:], v[:, :, split:], state=st, mode=mode)
            assert max_err(torch.cat([a, b], 2), o) < 1e-12, (split, mode)


# ---- Mega's EMA ---------------------------------------------------------------------------------------------------


def test_ema_fft_equals_recurrence_and_carries_state() -> None:
    g = torch.Generator().manual_seed(0)
    u = torch.randn(2, 30, 6, generator=g, dtype=F64, requires_grad=True)
    alpha = torch.rand(6, 3, generator=g, dtype=F64).requires_grad_()
    delta = torch.rand(6, 3, generator=g, dtype=F64).requires_grad_()
    eta = torch.randn(6, 3, generator=g, dtype=F64).requires_grad_()
    y_r, h_r = L.ema(u, alpha, delta, eta, mode="recurrent")
    y_f, h_f = L.ema(u, alpha, delta, eta)
    assert max_err(y_f, y_r) < 1e-12 and max_err(h_f, h_r) < 1e-12
    ins = (u, alpha, delta, eta)
    assert max_err(grads(y_f, ins), grads(y_r, ins)) < 1e-10
    y1, h1 = L.ema(u[:, :11], alpha, delta, eta)
    y2, h2 = L.ema(u[:, 11:], alpha, delta, eta, state=h1)
    assert max_err(torch.cat([y1, y2], 1), y_r) < 1e-12 and max_err(h2, h_r) < 1e-12
    # first step by hand: h_0 = alpha * u_0
    assert max_err(y_r[:, 0], (alpha * eta).sum(-1) * u[:, 0]) < 1e-14
