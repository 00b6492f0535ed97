"""The native CPU block-sparse kernel against the float64 reference: outputs, log-sum-exp and gradients.

Layouts here are built by a small private builder from a dense boolean mask (block lists, full flags, bits),
independently of the kernel and of the engine's planner; the reference is
:func:`attnlab.core.reference.reference_attention` with the pattern (or the dense mask) in float64.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pattern_zoo import pattern_zoo  # tests/core is on the path (rootdir-relative, no package)

from attnlab.core.reference import reference_attention
from attnlab.core.score_mods import ALiBi, Bias, SoftCap, Temperature
from attnlab.core.sparse import native
from attnlab.core.sparse.layout import BlockLayout
from attnlab.testing import grads, max_err, qkv, tolerance

# ---- helpers (independent of the kernel) -------------------------------------------------------------------


def dense_layout(mask: torch.Tensor, q_block: int, k_block: int, q_offset: int = 0, *,
                 all_partial: bool = False) -> BlockLayout:
    """BlockLayout of a dense bool mask ``(Bp, Hp, Tq, Tk)``: every block pair with an allowed pair is listed,
    in increasing key-block order; ``full`` where every existing pair is allowed (never with ``all_partial``)."""
    Bp, Hp, Tq, Tk = mask.shape
    Gq, Gk = -(-Tq // q_block), -(-Tk // k_block)
    pad = torch.zeros(Bp, Hp, Gq * q_block, Gk * k_block, dtype=torch.bool)
    pad[..., :Tq, :Tk] = mask
    exists = torch.zeros_like(pad)
    exists[..., :Tq, :Tk] = True

    def blocks(t: torch.Tensor) -> torch.Tensor:  # (Bp, Hp, Gq, Gk, qb, kb)
        return t.view(Bp, Hp, Gq, q_block, Gk, k_block).permute(0, 1, 2, 4, 3, 5)

    blk = blocks(pad)
    any_b = blk.any(-1).any(-1)
    full_b = (blk | ~blocks(exists)).all(-1).all(-1) & any_b
    count = any_b.sum(-1)
    N = max(1, int(count.max()))
    kv_index = torch.zeros(Bp, Hp, Gq, N, dtype=torch.int32)
    full = torch.zeros(Bp, Hp, Gq, N, dtype=torch.bool)
    bits = torch.zeros(Bp, Hp, Gq, N, q_block, k_block, dtype=torch.bool)
    for b in range(Bp):
        for h in range(Hp):
            for g in range(Gq):
                for n, j in enumerate(any_b[b, h, g].nonzero().flatten().tolist()):
                    kv_index[b, h, g, n] = j
                    full[b, h, g, n] = bool(full_b[b, h, g, j]) and not all_partial
                    bits[b, h, g, n] = blk[b, h, g, j]
    used = torch.arange(N) < count.unsqueeze(-1)
    keep_bits = not bool((full | ~used).all())
    return BlockLayout(q_block, k_block, Tq, Tk, q_offset, kv_index, count.to(torch.int32), full,
                       bits if keep_bits else None, float(mask.sum()) / (Bp * Hp))


def ref_lse(q, k, v, mask, scale, mods=None, q_offset=0):
    """float64 log-sum-exp of the masked, modified scores (``-inf`` for rows seeing nothing)."""
    rep = q.shape[1] // k.shape[1]
    s = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double().repeat_interleave(rep, 1)) * scale
    if mods:
        B, H, Tq, Tk = s.shape
        b = torch.arange(B).view(B, 1, 1, 1)
        h = torch.arange(H).view(1, H, 1, 1)
        qp = torch.arange(q_offset, q_offset + Tq).view(Tq, 1)
        kp = torch.arange(Tk).view(1, Tk)
        for m in mods:
            s = m.score_mod(s, b, h, qp, kp)
    s = s.masked_fill(~mask, float("-inf"))
    return torch.logsumexp(s, dim=-1)


def sdpa_errors(q, k, v, mask, scale):
    """PyTorch SDPA's own max error in q's dtype vs float64, output and gradients (rows seeing nothing are
    opened to every key so SDPA stays finite)."""
    m = mask | ~mask.any(-1, keepdim=True)
    gqa = q.shape[1] != k.shape[1]

    def run(dt):
        a = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        o = F.scaled_dot_product_attention(*a, attn_mask=m, scale=scale, enable_gqa=gqa)
        return o, grads(o, tuple(a))

    o1, g1 = run(q.dtype)
    o2, g2 = run(torch.float64)
    return max_err(o1, o2), max_err(g1, g2)


def check(q, k, v, mask, layout, scale, *, mods=(), fused=None, q_offset=0, with_lse=True, extra_inputs=()):
    """Compare kernel and reference (outputs, lse, gradients of <out, r> + <lse, r'>); ``mask`` is in natural
    order (the layout may be over reordered rows, given by ``fused["q_order"]`` / ``fused["k_order"]``)."""
    fused = fused or {}
    out, lse = native.block_attention(q, k, v, layout, scale, **fused)
    ref = reference_attention(q, k, v, mask=mask, scale=scale, q_offset=q_offset, score_mod=list(mods) or None)
    rl = ref_lse(q, k, v, mask, scale, mods, q_offset)
    fe, ge = sdpa_errors(q, k, v, mask.expand(q.shape[0], q.shape[1], -1, -1), scale)
    tol_o = tolerance(q.dtype, fe)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert max_err(out, ref) <= tol_o, (max_err(out, ref), tol_o)
    seen = torch.isfinite(rl)
    assert torch.equal(torch.isfinite(lse), seen)
    if bool(seen.any()):
        assert max_err(lse[seen], rl[seen]) <= 4 * tol_o
    inputs = (q, k, v, *extra_inputs)
    g = torch.Generator().manual_seed(3)
    r2 = torch.randn(lse.shape, generator=g, dtype=torch.float64)
    total = (out.double() * torch.randn(out.shape, generator=g.manual_seed(4), dtype=torch.float64)).sum()
    total_ref = (ref * torch.randn(out.shape, generator=g.manual_seed(4), dtype=torch.float64)).sum()
    if with_lse:
        total = total + (lse.double().masked_fill(~seen, 0) * r2).sum()
        total_ref = total_ref + (rl.masked_fill(~seen, 0) * r2).sum()
    gk = torch.autograd.grad(total, inputs, allow_unused=True)
    gr = torch.autograd.grad(total_ref, inputs, allow_unused=True)
    tol_g = tolerance(q.dtype, max(fe, ge))
    for name, a, b in zip(("dq", "dk", "dv", "extra0", "extra1"), gk, gr):
        assert a is not None and b is not None, name
        scale_b = max(1.0, float(b.abs().max()))
        assert max_err(a, b) <= tol_g * scale_b, (name, max_err(a, b), tol_g * scale_b)
    return out, lse


def test_extension_builds_here():
    # the project's machines have g++: the kernel must build (a missing compiler is covered below)
    assert native.available()
    assert native.supports_backward()


# ---- the pattern zoo ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,pattern,n", pattern_zoo(), ids=[z[0] for z in pattern_zoo()])
def test_pattern_zoo_matches_reference(name, pattern, n):
    H = 4  # per-head zoo patterns have 4 heads; 2 kv heads exercise grouped-query attention
    q, k, v = qkv(B=2, H=H, Hkv=2, Tq=n, D=8, dtype=torch.float32, seed=len(name))
    mask = pattern.dense(n, n, 0).unsqueeze(0)  # (1, Hp, n, n): the pattern's own rule, not the kernel's
    layout = dense_layout(mask, 8, 8)
    out = native.block_attention(q, k, v, layout, 0.3)[0]
    ref = reference_attention(q, k, v, pattern, scale=0.3)  # the reference evaluates the pattern itself
    assert max_err(out, ref) <= tolerance(torch.float32, sdpa_errors(q, k, v, mask.expand(2, H, -1, -1), 0.3)[0])
    check(q, k, v, mask, layout, 0.3)


# ---- drawn shapes, GQA, offsets, fused modifiers -----------------------------------------------------------


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    B=st.integers(1, 2), Hkv=st.integers(1, 2), rep=st.sampled_from([1, 2, 3]), Tq=st.integers(1, 37),
    extra=st.integers(0, 20), D=st.sampled_from([4, 8, 16]), Dv=st.sampled_from([4, 8, 24]),
    qb=st.sampled_from([4, 8, 16]), kb=st.sampled_from([4, 8, 16]), density=st.floats(0.05, 1.0),
    per_batch=st.booleans(), per_head=st.booleans(), all_partial=st.booleans(),
    use_bias=st.booleans(), use_alibi=st.booleans(), use_cap=st.booleans(), use_temp=st.booleans(),
    reorder=st.booleans(), seed=st.integers(0, 10_000),
)
def test_drawn_shapes_and_mods(B, Hkv, rep, Tq, extra, D, Dv, qb, kb, density, per_batch, per_head,
                               all_partial, use_bias, use_alibi, use_cap, use_temp, reorder, seed):
    H, Tk = Hkv * rep, Tq + extra
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=g).requires_grad_()
    k = torch.randn(B, Hkv, Tk, D, generator=g).requires_grad_()
    v = torch.randn(B, Hkv, Tk, Dv, generator=g).requires_grad_()
    mask = torch.rand(B if per_batch else 1, H if per_head else 1, Tq, Tk, generator=g) < density
    mods, fused, extra_in = [], {}, []
    if reorder:  # the layout is over permuted rows and keys; everything else stays in natural order
        qo, ko = torch.randperm(Tq, generator=g), torch.randperm(Tk, generator=g)
        fused.update(q_order=qo, k_order=ko)
        layout = dense_layout(mask[:, :, qo][..., ko], qb, kb, q_offset=Tk - Tq, all_partial=all_partial)
    else:
        layout = dense_layout(mask, qb, kb, q_offset=Tk - Tq, all_partial=all_partial)
    if use_temp:
        temp = (0.5 + torch.rand(H, generator=g)).requires_grad_()
        mods.append(Temperature(temp))
        fused["temperature"] = temp
        extra_in.append(temp)
    if use_cap:
        mods.append(SoftCap(2.0))
        fused["softcap"] = 2.0
    if use_bias:
        bias = torch.randn(B, 1, Tq, Tk, generator=g).requires_grad_()
        mods.append(Bias(bias, q_offset=Tk - Tq))
        fused["bias"] = bias
        extra_in.append(bias)
    if use_alibi:
        slopes = torch.rand(H, generator=g) * 0.3
        mods.append(ALiBi(H, slopes))
        fused["alibi"] = slopes
    check(q, k, v, mask, layout, 1 / math.sqrt(D), mods=mods, fused=fused, q_offset=Tk - Tq,
          extra_inputs=tuple(extra_in))


def test_gqa_ratios_read_kv_in_place():
    for Hkv, H in ((1, 8), (2, 8), (4, 8), (8, 8)):
        q, k, v = qkv(B=1, H=H, Hkv=Hkv, Tq=45, D=16, dtype=torch.float32, seed=H + Hkv)
        i = torch.arange(45)
        mask = ((i[None] <= i[:, None]) & (i[:, None] - i[None] < 12))[None, None]
        check(q, k, v, mask, dense_layout(mask, 16, 16), 0.25)


def test_strided_inputs_are_read_in_place():
    # (B, T, H, D) projections viewed as (B, H, T, D): not contiguous, last dim contiguous
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 30, 4, 8, generator=g).transpose(1, 2).requires_grad_()
    k = torch.randn(2, 30, 2, 8, generator=g).transpose(1, 2).requires_grad_()
    v = torch.randn(2, 30, 2, 8, generator=g).transpose(1, 2).requires_grad_()
    i = torch.arange(30)
    mask = (i[None] <= i[:, None])[None, None]
    check(q, k, v, mask, dense_layout(mask, 8, 8), 0.3)


def test_length_one_decode():
    q, k, v = qkv(B=2, H=4, Hkv=2, Tq=1, Tk=53, D=16, dtype=torch.float32, seed=9)
    kp = torch.arange(53)
    mask = (kp > 52 - 20).view(1, 1, 1, 53)  # a sliding window of 20 at the last position
    check(q, k, v, mask, dense_layout(mask, 16, 16, q_offset=52), 0.25, q_offset=52)


def test_empty_rows_give_zero_output_lse_minus_inf_and_zero_grads():
    q, k, v = qkv(B=1, H=2, Tq=20, D=8, dtype=torch.float32, seed=2)
    i = torch.arange(20)
    mask = (i[None] <= i[:, None]).clone()
    mask[3] = False
    mask[12:16] = False  # a whole query block of 4 sees nothing (it is listed with no block)
    mask = mask[None, None]
    layout = dense_layout(mask, 4, 4)
    assert int(layout.kv_count[0, 0, 3]) == 0 and int(layout.kv_count[0, 0, 0]) == 1
    out, lse = native.block_attention(q, k, v, layout, 0.3)
    dead = torch.tensor([3, 12, 13, 14, 15])
    assert torch.equal(out[:, :, dead], torch.zeros_like(out[:, :, dead]))
    assert bool(torch.isneginf(lse[:, :, dead]).all())
    dq = torch.autograd.grad((out * torch.randn_like(out)).sum(), q)[0]
    assert torch.equal(dq[:, :, dead], torch.zeros_like(dq[:, :, dead]))
    check(q, k, v, mask, layout, 0.3)


def test_full_blocks_skip_the_mask_and_bits_are_exact():
    # the same mask described with full blocks (bits unused there) and with every block partial agree
    q, k, v = qkv(B=1, H=2, Tq=64, D=16, dtype=torch.float32, seed=4)
    i = torch.arange(64)
    mask = (i[None] <= i[:, None])[None, None]
    a = dense_layout(mask, 16, 16)
    b = dense_layout(mask, 16, 16, all_partial=True)
    assert bool(a.full.any()) and not bool(b.full.any())
    oa, la = native.block_attention(q, k, v, a, 0.25)
    ob, lb = native.block_attention(q, k, v, b, 0.25)
    assert max_err(oa, ob) <= 1e-5 and max_err(la, lb) <= 1e-5
    # a wrong full flag really skips the mask: marking the diagonal blocks full breaks causality
    wrong = BlockLayout(a.q_block, a.k_block, a.q_len, a.kv_len, 0, a.kv_index, a.kv_count,
                        torch.ones_like(a.full), a.bits, a.pairs)
    ow = native.block_attention(q, k, v, wrong, 0.25)[0]
    assert max_err(ow, oa) > 1e-3


def test_bfloat16_within_twice_sdpa_error():
    q, k, v = qkv(B=1, H=4, Hkv=2, Tq=70, D=32, dtype=torch.bfloat16, seed=6)
    i = torch.arange(70)
    mask = ((i[None] <= i[:, None]) & (i[:, None] - i[None] < 24))[None, None]
    check(q, k, v, mask, dense_layout(mask, 16, 16), 1 / math.sqrt(32))


def test_block_selection_lists_match_reference():
    # dynamic selection (MoBA-like): every query block picks its own key blocks plus its diagonal block
    B, H, T, blk = 2, 4, 50, 8
    q, k, v = qkv(B=B, H=H, Hkv=2, Tq=T, D=16, dtype=torch.float32, seed=8)
    G = -(-T // blk)
    g = torch.Generator().manual_seed(1)
    chosen = torch.rand(B, H, G, G, generator=g) < 0.35
    chosen |= torch.eye(G, dtype=torch.bool)
    qblk = torch.arange(T) // blk
    mask = chosen[:, :, qblk][..., qblk]  # (B, H, T, T) block choice expanded to positions
    mask &= torch.arange(T).view(T, 1) >= torch.arange(T).view(1, T)  # causal
    check(q, k, v, mask, dense_layout(mask, blk, blk), 0.25)


def test_grid_in_z_order_visits_fewer_blocks_and_matches_reference():
    # 2-D neighborhood: in the pattern's Z-order, square patches are blocks, so fewer block pairs are listed
    from attnlab.core.patterns import Neighborhood

    big = Neighborhood(grid=(64, 64), kernel_size=13)
    m, o = big.dense(4096, 4096, 0).unsqueeze(0), big.query_order(4096, 0)
    assert int(dense_layout(m[:, :, o][..., o], 64, 64).kv_count.sum()) < int(dense_layout(m, 64, 64).kv_count.sum())
    pat = Neighborhood(grid=(12, 12), kernel_size=5)
    n = 144
    q, k, v = qkv(B=1, H=2, Tq=n, D=16, dtype=torch.float32, seed=13)
    mask = pat.dense(n, n, 0).unsqueeze(0)
    order = pat.query_order(n, 0)
    zorder = dense_layout(mask[:, :, order][..., order], 16, 16)
    slopes = torch.tensor([0.1, 0.2])
    check(q, k, v, mask, zorder, 0.25, mods=[ALiBi(2, slopes)],
          fused={"q_order": order, "k_order": order, "alibi": slopes})
    with pytest.raises(RuntimeError, match="permutation"):
        native.block_attention(q, k, v, zorder, 0.25, q_order=torch.zeros(n, dtype=torch.long))


def test_layout_length_mismatch_is_a_clear_error():
    q, k, v = qkv(B=1, H=2, Tq=16, D=8, dtype=torch.float32, requires_grad=False)
    mask = torch.ones(1, 1, 12, 12, dtype=torch.bool)
    with pytest.raises(ValueError, match="layout is for q_len=12"):
        native.block_attention(q, k, v, dense_layout(mask, 4, 4), 0.3)
    with pytest.raises(TypeError, match="float32 and bfloat16"):
        native.block_attention(q.double(), k.double(), v.double(), dense_layout(torch.ones(1, 1, 16, 16, dtype=torch.bool), 4, 4), 0.3)


def test_gemm_engines_agree():
    q, k, v = qkv(B=1, H=2, Tq=75, D=64, dtype=torch.float32, seed=11, requires_grad=False)
    i = torch.arange(75)
    mask = (i[None] <= i[:, None])[None, None]
    layout = dense_layout(mask, 16, 32)
    before = native.gemm()
    try:
        outs = []
        for name in ("own", "brgemm"):
            native.set_gemm(name)
            outs.append(native.block_attention(q, k, v, layout, 0.125)[0])
    finally:
        native.set_gemm(before)
    assert max_err(outs[0], outs[1]) <= 1e-5
    with pytest.raises(ValueError, match="gemm must be one of"):
        native.set_gemm("mkl")


# ---- no compiler: one warning, the Python engine runs ------------------------------------------------------


def test_without_the_extension_attnlab_warns_once_and_uses_python(monkeypatch):
    from attnlab.core.attention import attention
    from attnlab.core.patterns import SlidingWindow

    def no_compiler(verbose):
        raise RuntimeError("no C++ compiler found (install g++)")

    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setattr(native, "_error", None)
    monkeypatch.setattr(native, "_warned", False)
    monkeypatch.setattr(native, "_compile", no_compiler)
    q, k, v = qkv(B=1, H=2, Tq=40, D=8, dtype=torch.float32, seed=12)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert not native.available()
        assert not native.available()
        out = attention(q, k, v, SlidingWindow(8))
        out2 = attention(q, k, v, SlidingWindow(8))
    msgs = [str(w.message) for w in seen if "native CPU kernel is unavailable" in str(w.message)]
    assert len(msgs) == 1 and "no C++ compiler" in msgs[0]
    ref = reference_attention(q, k, v, SlidingWindow(8))
    assert max_err(out, ref) <= 1e-5 and max_err(out2, ref) <= 1e-5
    (out * torch.randn_like(out)).sum().backward()  # the Python engine's backward works too
    assert q.grad is not None
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        native.block_attention(q, k, v, dense_layout(torch.ones(1, 1, 40, 40, dtype=torch.bool), 8, 8), 0.3)


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path) -> None:
    import time

    from attnlab.core.sparse.native import STALE_LOCK_S, clear_stale_lock

    assert clear_stale_lock(tmp_path) is False  # no lock
    lock = tmp_path / "lock"
    lock.touch()
    assert clear_stale_lock(tmp_path) is False and lock.exists()  # a build may be running
    with pytest.warns(UserWarning, match="stale build lock"):
        assert clear_stale_lock(tmp_path, now=time.time() + STALE_LOCK_S + 1) is True
    assert not lock.exists()
