"""Light Forcing [P281]: the sparse engine vs a plain loop reference (float64, outputs and gradients), chunk by
chunk decoding = full forward, budget 1 = dense chunk-causal attention, a planted salient frame found at the frame
level, the chunk-aware growth schedule, bad arguments.

The reference builds each query block's key set with Python loops from the paper's rule and its own schedule
solver; it imports nothing from the op's selection code.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from attnlab import ops
from attnlab.core.reference import reference_attention
from attnlab.mechanisms.routing.light_forcing import growth_schedule, light_forcing_mask
from attnlab.testing import grads, max_err, qkv, tolerance

TOL = tolerance(torch.float64, 0.0)
pytestmark = pytest.mark.usefixtures("one_thread")
SPEC = ops.get("light_forcing")


def _densities(chunks, budget, base, F_, local):
    """CAG densities solved independently: scan beta on a fine grid, then refine by secant steps."""
    w = [max(0, i * F_ - local) for i in range(chunks)]
    if budget >= 1 or sum(w) == 0:
        return [1.0] * chunks

    def d(beta):
        return [1.0] + [min(1.0, max(0.0, base + beta * i ** -0.5)) for i in range(1, chunks)]

    def gap(beta):
        return sum(x * y for x, y in zip(d(beta), w)) - budget * sum(w)

    a, b = 0.0, 1.0
    while gap(b) < 0:
        a, b = b, 2 * b
    for _ in range(200):  # regula falsi (gap is monotone and piecewise linear)
        m = b - gap(b) * (b - a) / (gap(b) - gap(a)) if gap(b) != gap(a) else 0.5 * (a + b)
        m = min(max(m, a), b)
        if gap(m) < 0:
            a = m
        else:
            b = m
        if abs(gap(m)) < 1e-12:
            return d(m)
    return d(a if abs(gap(a)) < abs(gap(b)) else b)  # one end converges to the root


def _reference_mask(q, k, q_offset, frame, chunk_frames, block, budget, base_density=0.0, frame_ratio=2.0,
                    local_frames=1, chunks=None):
    """(B, H, Tq, Tk) bool built with loops: own chunk + local frames + frame-level then block-level top-k."""
    q, k = q.detach(), k.detach()
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    hw = frame[0] * frame[1]
    ct = hw * chunk_frames
    bpf = hw // block
    n_chunks = chunks or Tk // ct
    dens = _densities(n_chunks, budget, base_density, chunk_frames, local_frames)
    mask = torch.zeros(B, H, Tq, Tk, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            kh = h // (H // Hkv)
            for g in range(Tq // block):
                p0 = q_offset + g * block
                c = p0 // ct
                qbar = q[b, h, g * block:(g + 1) * block].mean(0)
                first_local = max(0, c * chunk_frames - local_frames)
                keys = set(range(first_local * hw, (c + 1) * ct))  # local frames + own chunk
                S = first_local
                if S > 0:
                    n_keep = min(S * bpf, math.ceil(dens[c] * S * bpf - 1e-9))
                    n_frames = min(S, math.ceil(frame_ratio * n_keep / bpf - 1e-9))
                    fs = [(float(qbar @ k[b, kh, f * hw:(f + 1) * hw].mean(0)), f) for f in range(S)]
                    frames = [f for _, f in sorted(fs, reverse=True)[:n_frames]]
                    blocks = []
                    for f in frames:
                        for j in range(bpf):
                            s0 = f * hw + j * block
                            blocks.append((float(qbar @ k[b, kh, s0:s0 + block].mean(0)), s0))
                    for _, s0 in sorted(blocks, reverse=True)[:n_keep]:
                        keys.update(range(s0, s0 + block))
                for key in keys:
                    mask[b, h, g * block:(g + 1) * block, key] = True
    return mask


CASES = [
    dict(frame=(2, 4), chunk_frames=2, block=4, budget=0.3, local_frames=1, frame_ratio=2.0),
    dict(frame=(2, 2), chunk_frames=1, block=2, budget=0.5, local_frames=0, frame_ratio=1.0, base_density=0.1),
    dict(frame=(4, 2), chunk_frames=3, block=2, budget=0.2, local_frames=2, frame_ratio=1.5),
]


@pytest.mark.parametrize("case", CASES)
def test_engine_equals_loop_reference_float64(case):
    hw = case["frame"][0] * case["frame"][1]
    T = 5 * case["chunk_frames"] * hw  # five chunks
    q, k, v = qkv(2, 4, 2, T, D=8, seed=0, requires_grad=True)
    out = SPEC(q, k, v, **case)
    with torch.no_grad():
        m = _reference_mask(q, k, 0, **case)
    ref = reference_attention(q, k, v, mask=m)
    assert max_err(out, ref) < TOL
    assert max_err(grads(out, (q, k, v)), grads(ref, (q, k, v))) < TOL
    assert torch.equal(light_forcing_mask(q, k, q_offset=0, **case), m)
    assert not bool(m.all())  # something was dropped


def test_decode_chunk_by_chunk_equals_full_forward():
    case = CASES[0]
    ct = case["chunk_frames"] * 8
    q, k, v = qkv(1, 4, 2, 6 * ct, D=8, seed=1)
    full = SPEC(q, k, v, chunks=6, **case)
    assert max_err(full, SPEC(q, k, v, **case)) == 0  # chunks = what the keys hold
    state = ops.OpState()
    outs = []
    for c in range(6):
        s, e = c * ct, (c + 1) * ct
        out, state = SPEC(q[:, :, s:e], k[:, :, :e], v[:, :, :e], q_offset=s, state=state, chunks=6, **case)
        outs.append(out)
    assert max_err(torch.cat(outs, 2), full) < TOL


@pytest.mark.parametrize("case", CASES)
def test_budget_one_is_dense_chunk_causal(case):
    hw = case["frame"][0] * case["frame"][1]
    ct = case["chunk_frames"] * hw
    T = 4 * ct
    q, k, v = qkv(2, 4, 2, T, D=8, seed=2)
    c = torch.arange(T) // ct
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=c.view(1, T) <= c.view(T, 1), enable_gqa=True)
    assert max_err(SPEC(q, k, v, **{**case, "budget": 1.0, "base_density": 0.0}), dense) < TOL
    assert max_err(SPEC(q, k, v, **case), dense) > 1e-3


def test_planted_salient_frame_is_selected_at_frame_level():
    """History frame 2 of 9 holds keys along the queries' direction: with one frame kept, every query block of
    the last chunk reads it (and only blocks of it beyond its local context)."""
    hw, Fc, block = 4, 1, 4
    T = 10 * hw
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, T, 8, generator=g, dtype=torch.float64) * 0.1
    k = torch.randn(1, 2, T, 8, generator=g, dtype=torch.float64) * 0.1
    q[..., 0] += 1.0
    k[:, :, 2 * hw:3 * hw, 0] += 3.0  # the salient frame
    opts = dict(frame=(2, 2), chunk_frames=Fc, block=block, budget=0.12, local_frames=1, frame_ratio=1.0)
    m = light_forcing_mask(q, k, q_offset=0, **opts)
    last = m[0, :, -hw:]  # queries of the last chunk (frame 9)
    assert bool(last[..., 2 * hw:3 * hw].all())  # the planted frame
    assert bool(last[..., 8 * hw:].all())  # local frame 8 + own frame 9
    assert int(last[0, 0].sum()) == 3 * hw  # nothing else
    assert torch.equal(m, _reference_mask(q, k, 0, **opts))


def test_growth_schedule_matches_flops_and_grows_sparsity():
    for n, budget, base, Fc, loc in [(8, 0.3, 0.0, 2, 1), (12, 0.5, 0.2, 1, 0), (5, 0.1, 0.05, 3, 2)]:
        d = growth_schedule(n, budget, base, Fc, loc)
        w = [max(0, i * Fc - loc) for i in range(n)]
        assert abs(sum(x * y for x, y in zip(d, w)) - budget * sum(w)) < 1e-9  # equal FLOPs
        hist = [x for x, wi in zip(d, w) if wi > 0]
        assert all(a >= b for a, b in zip(hist, hist[1:])) and hist[0] > hist[-1]  # sparsity increases
        assert max(abs(a - b) for a, b in zip(d, _densities(n, budget, base, Fc, loc))) < 1e-9
    assert growth_schedule(6, 1.0) == [1.0] * 6


def test_measured_density_follows_budget():
    case = dict(frame=(4, 4), chunk_frames=2, block=4, local_frames=0, frame_ratio=2.0)
    T = 8 * 32
    q, k, _ = qkv(1, 2, 2, T, D=8, seed=4, requires_grad=False)
    c = torch.arange(T) // 32
    hist = (c.view(1, T) < c.view(T, 1))  # history pairs (the selectable ones, local_frames=0)
    dens = []
    for budget in (0.1, 0.3, 0.6):
        m = light_forcing_mask(q, k, q_offset=0, budget=budget, **case)[0, 0]
        dens.append(float((m & hist).sum()) / float(hist.sum()))
        assert budget <= dens[-1] < budget + 0.08  # ceil rounding per chunk only adds
    assert dens == sorted(dens)


def test_free_mask_is_anded():
    case = CASES[1]
    q, k, v = qkv(2, 4, 2, 20, D=8, seed=5)
    mask = torch.rand(2, 1, 20, 20, generator=torch.Generator().manual_seed(6)) < 0.8
    out = SPEC(q, k, v, mask=mask, **case)
    ref = reference_attention(q, k, v, mask=_reference_mask(q, k, 0, **case) & mask)
    assert max_err(out, ref) < TOL


@pytest.mark.parametrize("bad, match", [
    (dict(budget=0.0), "budget"), (dict(budget=1.5), "budget"), (dict(block=3), "block"),
    (dict(base_density=0.6), "base_density"), (dict(frame_ratio=0.5), "frame_ratio"),
    (dict(local_frames=-1), "local_frames"), (dict(frame=(2,)), "frame"), (dict(chunks=1), "chunks"),
])
def test_bad_arguments_fail_naming_them(bad, match):
    q, k, v = qkv(1, 2, 2, 24, D=8, seed=0, requires_grad=False)
    with pytest.raises(ValueError, match=match):
        SPEC(q, k, v, **{**SPEC.example, **bad})


def test_decoding_needs_whole_chunks_and_the_chunk_count():
    q, k, v = qkv(1, 2, 2, 24, D=8, seed=0, requires_grad=False)
    with pytest.raises(ValueError, match="chunks"):
        SPEC(q[:, :, 8:], k, v, q_offset=8, **SPEC.example)
    with pytest.raises(ValueError, match="whole chunks"):
        SPEC(q[:, :, 7:], k, v, q_offset=7, chunks=6, **SPEC.example)
