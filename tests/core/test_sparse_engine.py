"""The one sparse engine (attnlab.core.sparse): every plan form against the float64 reference, outputs and
gradients; all blocks selected equals dense; the engines agree; the one log-sum-exp merge is exact."""

import math

import pytest
import torch
import torch.nn.functional as F

import attnlab
import attnlab.core.sparse as S
from attnlab.core.patterns import Causal, Chunked, Dilated, Neighborhood, PerHead, Sinks, SlidingWindow
from attnlab.core.reference import reference_attention
from attnlab.core.score_mods import ALiBi, Bias, SoftCap, Temperature
from attnlab.core.softmax import lse_merge
from attnlab.testing import grads, max_err, qkv, sdpa_error, tolerance

PATTERNS = [
    Causal(),
    SlidingWindow(5),
    Causal() & (Sinks(2) | SlidingWindow(3)),
    Dilated(2, 3, causal=False),
    Chunked(6, causal=True),
    PerHead((Causal(), SlidingWindow(2), Chunked(5), Causal() & Sinks(1))),
]


def _ref_lse(q, k, mask, scale):
    """float64 log-sum-exp of the allowed scores per row, written plainly (-inf for rows that see nothing)."""
    rep = q.shape[1] // k.shape[1]
    s = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double().repeat_interleave(rep, 1)) * scale
    return torch.logsumexp(s.masked_fill(~mask, float("-inf")), dim=-1)


def _lse_err(a, b):
    """max abs error of two log-sum-exps that must agree on which rows are -inf (rows that see nothing)."""
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    assert torch.equal(fa, fb) and bool((a[~fa] == float("-inf")).all())
    return max_err(a[fa], b[fb])


def _random_blocks(B, H, G, nb, n, seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(nb, generator=g)[:n] for _ in range(B * H * G)]).view(B, H, G, n)
    return idx, torch.rand(B, H, G, n, generator=g) > 0.25


def _block_sets(Tk, blk):
    nb = math.ceil(Tk / blk)
    return (torch.arange(nb).view(nb, 1) * blk + torch.arange(blk)).view(1, 1, nb, blk)


# ---- every plan form against the float64 reference ---------------------------------------------------


@pytest.mark.parametrize("engine", ["python", "explicit"])
@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: type(p).__name__)
def test_pattern_plan_matches_reference(pattern, engine):
    q, k, v = qkv(B=2, H=4, Hkv=2, Tq=23, Tk=30, D=8)
    plan = S.plan_pattern(pattern, 23, 30, q_offset=7, q_block=8)
    out, lse = S.run_lse(q, k, v, plan, 0.3, engine=engine)
    ref = reference_attention(q, k, v, pattern, scale=0.3, q_offset=7)
    assert max_err(out, ref) < 1e-12
    assert max_err(grads(out, (q, k, v)), grads(ref, (q, k, v))) < 1e-12
    mask = pattern.dense(23, 30, 7).unsqueeze(0)
    assert _lse_err(lse, _ref_lse(q, k, mask, 0.3)) < 1e-12
    assert max_err(S.run(q, k, v, plan, 0.3, engine=engine), ref) < 1e-12


def test_pattern_plan_with_score_mod():
    q, k, v = qkv(B=1, H=4, Tq=20, D=8)
    plan = S.plan_pattern(SlidingWindow(6), 20, 20, q_block=4)
    mod = ALiBi(4)
    ref = reference_attention(q, k, v, SlidingWindow(6), mod, scale=0.4, q_offset=0)
    gref = grads(ref, (q, k, v))
    for engine in ("python", "explicit"):
        out = S.run(q, k, v, plan, 0.4, score_mod=mod, engine=engine)
        assert max_err(out, ref) < 1e-12
        assert max_err(grads(out, (q, k, v)), gref) < 1e-12


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("engine", ["python", "explicit"])
def test_block_plan_matches_reference(causal, engine):
    B, H, Hkv, Tq, Tk, qb, kb = 2, 4, 2, 19, 37, 4, 8  # different query/key block sizes, short last blocks
    q, k, v = qkv(B, H, Hkv, Tq, Tk=Tk, D=8)
    G, nb = math.ceil(Tq / qb), math.ceil(Tk / kb)
    idx, ok = _random_blocks(B, H, G, nb, 3, seed=4)
    plan = S.plan_blocks(idx, ok, qb, kb, Tq, Tk, Hkv, q_offset=Tk - Tq, causal=causal)
    allowed = torch.zeros(B, H, Tq, Tk, dtype=torch.bool)
    for b, h, g, n in zip(*torch.nonzero(ok, as_tuple=True)):
        j = int(idx[b, h, g, n])
        allowed[b, h, g * qb : (g + 1) * qb, j * kb : (j + 1) * kb] = True
    if causal:
        allowed &= torch.ones(Tq, Tk, dtype=torch.bool).tril(Tk - Tq)
    out, lse = S.run_lse(q, k, v, plan, 0.5, engine=engine)
    ref = S.masked_reference(q, k, v, allowed, scale=0.5)
    assert max_err(out, ref) < 1e-12
    assert max_err(grads(out, (q, k, v)), grads(ref, (q, k, v))) < 1e-12
    assert _lse_err(lse, _ref_lse(q, k, allowed, 0.5)) < 1e-12
    lay = plan.layout()
    assert torch.equal(lay.to_dense().expand_as(allowed), allowed)
    dense = S.BlockLayout.from_dense(allowed, qb, kb, Tk - Tq)  # the same layout, built from the dense mask
    for b, h, g in zip(*torch.nonzero(dense.kv_count, as_tuple=True)):  # listed blocks holding allowed pairs
        n = int(dense.kv_count[b, h, g])
        ids = lay.kv_index[b, h, g, : int(lay.kv_count[b, h, g])].tolist()
        for i, j in enumerate(dense.kv_index[b, h, g, :n].tolist()):
            assert bool(lay.full[b, h, g, ids.index(j)]) == bool(dense.full[b, h, g, i])
    assert lay.pairs == allowed.sum().item() / (B * H)


@pytest.mark.parametrize("diag", [False, True])
@pytest.mark.parametrize("engine", ["python", "explicit"])
def test_selection_plan_matches_reference(diag, engine):
    B, H, Hkv, T, blk = 2, 4, 1, 40, 8
    q, k, v = qkv(B, H, Hkv, T, D=8)
    sets = _block_sets(T, blk)
    g = torch.Generator().manual_seed(2)
    sel = torch.stack([torch.randperm(5, generator=g)[:2] for _ in range(B * H * T)]).view(B, H, T, 2)
    valid = torch.rand(B, H, T, 2, generator=g) > 0.2
    own = (torch.arange(T) // blk).view(1, 1, T, 1)
    if diag:
        valid = valid & (sel != own)  # the own block runs as the diagonal part
    plan = S.plan_selection(sel, valid, sets, Hkv, T, 0, True, q_block=4, diag_block=blk if diag else None)
    mask = S.selection_mask(sel, valid, sets, T, 0, True)
    if diag:
        mask = mask | (torch.ones(T, T, dtype=torch.bool).tril() & (own.view(T, 1) == own.view(1, T)))
    out = S.run(q, k, v, plan, 0.3, engine=engine)
    ref = S.masked_reference(q, k, v, mask, scale=0.3)
    assert max_err(out, ref) < 1e-12
    assert max_err(grads(out, (q, k, v)), grads(ref, (q, k, v))) < 1e-12
    assert torch.equal(plan.layout().to_dense(), mask)


@pytest.mark.parametrize("engine", ["python", "explicit"])
def test_hand_made_tiles_match_reference(engine):
    # one tile per (batch, head): each query row reads its own random key list (a method's own design)
    B, H, T, n = 1, 2, 12, 5
    q, k, v = qkv(B, H, None, T, D=8)
    g = torch.Generator().manual_seed(6)
    kpos = torch.stack([torch.randperm(T, generator=g)[:n] for _ in range(B * H)]).view(B * H, n)
    q_idx = torch.arange(B * H * T).view(B * H, T)
    k_idx = S.flat_key_index(kpos, torch.zeros(B * H, 1, dtype=torch.long), torch.arange(H).view(-1, 1), H, T)
    mask = kpos.view(B * H, 1, n) <= torch.arange(T).view(1, T, 1)  # causal
    tiles = S.Tiles(q_idx, k_idx, torch.ones_like(q_idx, dtype=torch.bool), mask)
    out = S.run(q, k, v, S.plan_tiles([tiles]), 0.3, engine=engine)
    allowed = torch.zeros(B, H, T, T, dtype=torch.bool)
    for h in range(H):
        allowed[0, h][:, kpos[h]] = True
    allowed &= torch.ones(T, T, dtype=torch.bool).tril()
    ref = S.masked_reference(q, k, v, allowed, scale=0.3)
    assert max_err(out, ref) < 1e-12
    assert max_err(grads(out, (q, k, v)), grads(ref, (q, k, v))) < 1e-12
    assert S.plan_tiles([tiles]).layout() is None


def test_gradient_through_lse_is_exact():
    # a caller that merges run_lse results further differentiates the log-sum-exp too
    B, H, T, blk = 1, 2, 24, 8
    q, k, v = qkv(B, H, None, T, D=8)
    sets = _block_sets(T, blk)
    sel = torch.stack([torch.arange(3)[torch.randperm(3, generator=torch.Generator().manual_seed(i))[:2]]
                       for i in range(B * H * T)]).view(B, H, T, 2)
    valid = torch.ones_like(sel, dtype=torch.bool)
    plan = S.plan_selection(sel, valid, sets, H, T, 0, True, q_block=4)
    mask = S.selection_mask(sel, valid, sets, T, 0, True)
    r = torch.randn(B, H, T, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    for engine in ("python", "explicit"):
        out, lse = S.run_lse(q, k, v, plan, 0.3, engine=engine)
        seen = torch.isfinite(lse)
        loss = (out.sum(-1) * r).sum() + (torch.where(seen, lse, torch.zeros_like(lse)) * r).sum()
        got = torch.autograd.grad(loss, (q, k, v))
        ref_out = S.masked_reference(q, k, v, mask, scale=0.3)
        ref_lse = _ref_lse(q, k, mask, 0.3)
        ref_loss = (ref_out.sum(-1) * r).sum() + (torch.where(seen, ref_lse, torch.zeros_like(ref_lse)) * r).sum()
        want = torch.autograd.grad(ref_loss, (q, k, v))
        assert max_err(got, want) < 1e-12


# ---- every block selected equals dense attention --------------------------------------------------------


def test_all_blocks_selected_is_dense():
    B, H, Hkv, T, blk = 1, 4, 2, 40, 8
    q, k, v = qkv(B, H, Hkv, T, D=8)
    G = T // blk
    every = torch.arange(G).expand(B, H, G, G).contiguous()
    ones = torch.ones_like(every, dtype=torch.bool)
    causal = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    dense = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    for engine in ("python", "explicit"):
        out = S.run(q, k, v, S.plan_blocks(every, ones, blk, blk, T, T, Hkv, causal=True), 8**-0.5, engine=engine)
        assert max_err(out, causal) < 1e-12
        out = S.run(q, k, v, S.plan_blocks(every, ones, blk, blk, T, T, Hkv), 8**-0.5, engine=engine)
        assert max_err(out, dense) < 1e-12
        sel = torch.arange(G).expand(B, H, T, G)
        plan = S.plan_selection(sel, torch.ones_like(sel, dtype=torch.bool), _block_sets(T, blk), Hkv, T)
        assert max_err(S.run(q, k, v, plan, 8**-0.5, engine=engine), causal) < 1e-12
        plan = S.plan_pattern(Causal(), T, T, q_block=8)
        assert max_err(S.run(q, k, v, plan, 8**-0.5, engine=engine), causal) < 1e-12


# ---- the engines agree ---------------------------------------------------------------------------------


def _native_available() -> bool:
    from attnlab.core.sparse import native

    return native.available()


@pytest.mark.parametrize("form", ["pattern", "blocks", "blocks_decode", "selection"])
def test_engines_agree_float32(form):
    B, H, Hkv, T, blk = 1, 4, 2, 96, 16
    q, k, v = qkv(B, H, Hkv, T, D=16, dtype=torch.float32)
    if form == "blocks_decode":  # the last 20 queries over 96 keys (a cache), short last query block
        q = q[:, :, -20:].detach().requires_grad_()
        idx, ok = _random_blocks(B, H, 2, T // blk, 3, seed=2)
        plan = S.plan_blocks(idx, ok, blk, blk, 20, T, Hkv, q_offset=T - 20, causal=True)
        mask = plan.layout().to_dense()
    elif form == "pattern":
        pat = Causal() & (Sinks(4) | SlidingWindow(20))
        plan = S.plan_pattern(pat, T, T, q_block=32)
        mask = pat.dense(T, T, 0).unsqueeze(0)
    elif form == "blocks":
        idx, ok = _random_blocks(B, H, T // blk, T // blk, 3, seed=1)
        plan = S.plan_blocks(idx, ok, blk, blk, T, T, Hkv, causal=True)
        mask = plan.layout().to_dense()
    else:
        sel, valid = _random_blocks(B, H, T, T // blk, 2, seed=3)
        plan = S.plan_selection(sel, valid, _block_sets(T, blk), Hkv, T, q_block=16)
        mask = S.selection_mask(sel, valid, _block_sets(T, blk), T)
    ref = S.masked_reference(q, k, v, mask, scale=0.25)
    has = mask.any(-1, keepdim=True)
    tol = tolerance(torch.float32, sdpa_error(q.detach(), k.detach(), v.detach(), mask | ~has, scale=0.25))
    outs = {e: S.run(q, k, v, plan, 0.25, engine=e) for e in ("python", "explicit")}
    native = _native_available()
    if native:
        outs["native"] = S.run(q, k, v, plan, 0.25, engine="native")
    for name, out in outs.items():
        assert max_err(out * has, ref) <= tol, name
    gs = {name: grads(out, (q, k, v)) for name, out in outs.items()}
    for name, g in gs.items():
        assert max_err(g, gs["explicit"]) <= 10 * tol, name
    # auto takes the native kernel for pattern and block plans when it is built, the Python tiles otherwise
    want = "native" if native and form != "selection" else "python"
    assert S.choose_engine(q, k, v, plan) == want


_T = 64
_MODS = {
    "alibi": ALiBi(4),
    "softcap": SoftCap(2.0),
    "temperature": Temperature(torch.tensor([0.5, 1.0, 1.5, 2.0])),
    "bias": Bias(torch.randn(1, 4, _T, _T, generator=torch.Generator().manual_seed(3))),
    "compose": (Temperature(torch.tensor([2.0, 1.0, 0.5, 1.5])), SoftCap(3.0), ALiBi(4)),
}


@pytest.mark.parametrize("name", list(_MODS))
def test_score_mods_on_every_engine_that_takes_them(name):
    mod = _MODS[name]
    pat = SlidingWindow(20)
    q, k, v = qkv(1, 4, 2, _T, D=16, dtype=torch.float32)
    plan = S.plan_pattern(pat, _T, _T, q_block=16)
    ref = reference_attention(q, k, v, pat, mod, scale=0.25, q_offset=0)
    tol = tolerance(torch.float32, sdpa_error(q.detach(), k.detach(), v.detach(), pat.dense(_T, _T, 0), scale=0.25))
    engines = ["python", "explicit"] + (["native"] if _native_available() else [])
    outs = {e: S.run(q, k, v, plan, 0.25, score_mod=mod, engine=e) for e in engines}
    for e, out in outs.items():
        assert max_err(out, ref) <= 4 * tol, e
    gs = {e: grads(out, (q, k, v)) for e, out in outs.items()}
    for e, g in gs.items():
        assert max_err(g, gs["explicit"]) <= 40 * tol, e
    assert S.choose_engine(q, k, v, plan, mod) == ("native" if _native_available() else "python")


def test_a_modifier_order_the_kernel_cannot_express_stays_on_python():
    q, k, v = qkv(1, 4, None, 16, D=8, dtype=torch.float32)
    plan = S.plan_pattern(SlidingWindow(4), 16, 16)
    mod = (ALiBi(4), SoftCap(3.0))  # the kernel caps before adding ALiBi
    assert S.choose_engine(q, k, v, plan, mod) == "python"
    with pytest.raises((ValueError, RuntimeError), match="native"):
        S.run(q, k, v, plan, 0.5, score_mod=mod, engine="native")


def test_flex_engine_refuses_what_it_cannot_do_clearly():
    q, k, v = qkv(1, 2, None, 16, D=8, dtype=torch.float32, requires_grad=False)
    with pytest.raises(ValueError, match="engine='flex' runs pattern plans"):
        S.run(q, k, v, S.plan_tiles([]), 0.5, engine="flex")
    with pytest.raises(RuntimeError, match="cannot return the log-sum-exp"):
        S.run_lse(q, k, v, S.plan_pattern(Causal(), 16, 16), 0.5, engine="flex")


def test_native_engine_refuses_clearly_without_a_layout():
    q, k, v = qkv(1, 1, None, 8, D=4, dtype=torch.float32)
    tiles = S.Tiles(torch.arange(8).view(1, 8), torch.arange(8).view(1, 8), torch.ones(1, 8, dtype=torch.bool))
    with pytest.raises((ValueError, RuntimeError), match="native"):
        S.run(q, k, v, S.plan_tiles([tiles]), 0.5, engine="native")


def test_bad_engine_and_mismatched_plan_fail_clearly():
    q, k, v = qkv(1, 2, None, 8, D=4)
    plan = S.plan_pattern(Causal(), 8, 8)
    with pytest.raises(ValueError, match="engine must be one of"):
        S.run(q, k, v, plan, 0.5, engine="fast")
    with pytest.raises(ValueError, match="plan is for q_len=8"):
        S.run(q[:, :, :4], k, v, plan, 0.5)
    sel = torch.zeros(1, 2, 8, 1, dtype=torch.long)
    splan = S.plan_selection(sel, torch.ones_like(sel, dtype=torch.bool), _block_sets(8, 4), 2, 8)
    with pytest.raises(ValueError, match="score_mod needs a pattern plan"):
        S.run(q, k, v, splan, 0.5, score_mod=ALiBi(2))
    with pytest.raises(ValueError, match="q_block must be a positive integer"):
        S.plan_pattern(Causal(), 8, 8, q_block=0)
    with pytest.raises(TypeError, match="plan_tiles takes Tiles"):
        S.plan_tiles([plan])


# ---- the one log-sum-exp merge ----------------------------------------------------------------------


def _partial(s, v, keys):
    """softmax over the key subset ``keys`` of score rows s (n, Tk): (out (n, Dv), lse (n,)), written plainly."""
    sub = s[:, keys]
    lse = torch.logsumexp(sub, dim=-1)
    return torch.softmax(sub, dim=-1) @ v[keys], lse


@pytest.mark.parametrize("grad", [False, True])
def test_lse_merge_equals_softmax_over_the_union(grad):
    g = torch.Generator().manual_seed(0)
    n, Tk, Dv = 7, 20, 5
    s = torch.randn(n, Tk, generator=g, dtype=torch.float64) * 3
    v = torch.randn(Tk, Dv, generator=g, dtype=torch.float64)
    perm = torch.randperm(Tk, generator=g)
    sets = [perm[:6], perm[6:9], perm[9:]]
    with torch.set_grad_enabled(grad):
        out, lse = lse_merge([_partial(s, v, ks) for ks in sets])
    assert max_err(out, torch.softmax(s, -1) @ v) < 1e-12
    assert max_err(lse, torch.logsumexp(s, -1)) < 1e-12
    # leading dims are kept
    o3, l3 = lse_merge([(o.view(1, n, Dv), x.view(1, n)) for o, x in (_partial(s, v, ks) for ks in sets)])
    assert o3.shape == (1, n, Dv) and max_err(o3[0], out) < 1e-12 and max_err(l3[0], lse) < 1e-12


@pytest.mark.parametrize("grad", [False, True])
def test_lse_merge_with_row_indices_and_validity(grad):
    # rows appear in some parts only (row indices), once per selected key set; invalid entries do not count
    g = torch.Generator().manual_seed(1)
    rows, Tk, Dv = 6, 12, 3
    s = torch.randn(rows, Tk, generator=g, dtype=torch.float64)
    v = torch.randn(Tk, Dv, generator=g, dtype=torch.float64)
    sets = [torch.arange(0, 4), torch.arange(4, 8), torch.arange(8, 12)]
    chosen = {0: [0, 2], 1: [1], 2: [0, 1, 2], 3: [], 4: [2], 5: [1, 2]}  # row 3 sees nothing
    parts = []
    for j, ks in enumerate(sets):
        r = torch.tensor([i for i in range(rows)] + [0], dtype=torch.long)  # one padding entry (row 0)
        o, lse = _partial(s[r], v, ks)
        ok = torch.tensor([j in chosen[i] for i in range(rows)] + [False])
        parts.append((o, lse, r, ok))
    with torch.set_grad_enabled(grad):
        out, lse = lse_merge(parts, rows=rows)
    for i in range(rows):
        keys = torch.cat([sets[j] for j in chosen[i]]) if chosen[i] else None
        if keys is None:
            assert torch.all(out[i] == 0) and lse[i] == float("-inf")
        else:
            assert max_err(out[i], torch.softmax(s[i, keys], -1) @ v[keys]) < 1e-12
            assert max_err(lse[i], torch.logsumexp(s[i, keys], -1)) < 1e-12


def test_lse_merge_gradients_are_finite_and_exact():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(4, 10, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(10, 3, generator=g, dtype=torch.float64)
    sets = [torch.arange(0, 5), torch.arange(5, 10)]
    out, lse = lse_merge([_partial(s, v, ks) for ks in sets])
    got = torch.autograd.grad(out.sum() + lse.sum(), s)[0]
    want = torch.autograd.grad((torch.softmax(s, -1) @ v).sum() + torch.logsumexp(s, -1).sum(), s)[0]
    assert max_err(got, want) < 1e-12
    with pytest.raises(ValueError, match="rows="):
        lse_merge([(torch.zeros(2, 1), torch.zeros(2), torch.arange(2), None)])


# ---- the layout interface ----------------------------------------------------------------------------


@pytest.mark.parametrize("qb,kb", [(4, 4), (8, 16), (16, 8)])
def test_layout_from_dense_round_trip(qb, kb):
    g = torch.Generator().manual_seed(qb * kb)
    mask = torch.rand(2, 3, 29, 45, generator=g) < 0.15
    mask[..., :8, :8] |= torch.ones(8, 8, dtype=torch.bool).tril()  # some full blocks
    lay = S.BlockLayout.from_dense(mask, qb, kb, q_offset=3)
    assert torch.equal(lay.to_dense(), mask)
    assert lay.kv_index.dtype == torch.int32 and lay.kv_count.dtype == torch.int32
    assert lay.pairs == mask.sum().item() / 6
    for b, h, gq in [(0, 0, 0), (1, 2, lay.num_q_blocks - 1)]:
        n = int(lay.kv_count[b, h, gq])
        ids = lay.kv_index[b, h, gq, :n].tolist()
        assert ids == sorted(ids)
        want = [j for j in range(lay.num_k_blocks) if mask[b, h, gq * qb : (gq + 1) * qb, j * kb : (j + 1) * kb].any()]
        assert ids == want


@pytest.mark.parametrize("kb", [None, 32, 128])
def test_pattern_layout_is_the_pattern(kb, monkeypatch):
    # the layout's block is the machine's tuned choice (a benchmark may have stored any of native._BLOCKS):
    # size the case from it so that it has full blocks (the window spans two blocks) and partial ones
    from attnlab.core.sparse import plan as plan_mod

    if kb is not None:
        monkeypatch.setattr(plan_mod, "layout_block", lambda device_type="cpu": kb)
    b = plan_mod.layout_block("cpu")
    tq = 4 * b - 6
    pat = Causal() & (Sinks(3) | SlidingWindow(2 * b + 22))
    plan = S.plan_pattern(pat, tq, tq + 20, q_offset=20, q_block=32)
    lay = plan.layout()
    assert plan.layout() is lay  # built once
    assert lay.q_block == b and torch.equal(lay.to_dense()[0], pat.dense(tq, tq + 20, 20))
    assert lay.full.any() and lay.bits is not None


# ---- the auto path reaches the native kernel (pattern order, score modifiers, key-centric selections) -----


def _spy_native(monkeypatch):
    """Record the layouts and orders every native kernel call receives (the kernel itself still runs)."""
    from attnlab.core.sparse import native

    seen = []
    real = native.block_attention

    def spy(q, k, v, layout, scale, **kw):
        seen.append((layout, kw.get("q_order"), kw.get("k_order")))
        return real(q, k, v, layout, scale, **kw)

    monkeypatch.setattr(native, "block_attention", spy)
    return seen


_ORDERED = {
    "neighborhood": Neighborhood((12, 12), kernel_size=5),
    "dilated_neighborhood": Neighborhood((12, 12), kernel_size=3, dilation=2),
    "dilated_1d": Dilated(2, 3, causal=True),
}


@pytest.mark.parametrize("name", list(_ORDERED))
def test_attention_auto_runs_ordered_patterns_on_the_kernel_in_their_order(name, monkeypatch):
    if not _native_available():
        pytest.skip("native kernel not built")  # pragma: no cover - the set-up builds it
    from attnlab.core.sparse import native

    pat = _ORDERED[name]
    T = 144
    q, k, v = qkv(1, 4, 2, T, D=16, dtype=torch.float32)
    seen = _spy_native(monkeypatch)
    out = attnlab.attention(q, k, v, pattern=pat, scale=0.25)
    ref = reference_attention(q, k, v, pat, scale=0.25, q_offset=0)
    tol = tolerance(torch.float32, sdpa_error(q.detach(), k.detach(), v.detach(), pat.dense(T, T, 0), scale=0.25))
    assert max_err(out, ref) <= 4 * tol
    assert max_err(grads(out, (q, k, v)), grads(ref, (q, k, v))) <= 40 * tol
    (lay, q_order, k_order), = seen
    assert torch.equal(q_order, pat.query_order(T, 0)) and torch.equal(k_order, pat.query_order(T, 0))
    assert lay.q_block == lay.k_block == min(native.default_block(), T)  # a block never exceeds the sequence
    # the layout is over the reordered sequences (Z-order / residue order): square patches become blocks
    assert torch.equal(lay.to_dense()[0, 0], pat.dense(T, T, 0)[0][q_order][:, k_order])


def test_natural_order_layouts_use_the_kernels_measured_block(monkeypatch):
    from attnlab.core.sparse import native

    monkeypatch.setattr(native, "default_block", lambda device_type="cpu": 32)
    plan = S.plan_pattern(SlidingWindow(40), 200, 200, q_block=64)
    lay = plan.layout()
    assert (lay.q_block, lay.k_block) == (32, 32)
    assert plan.layout_orders() == (None, None)
    assert torch.equal(lay.to_dense()[0, 0], SlidingWindow(40).dense(200, 200, 0)[0])


@pytest.mark.parametrize("mod_name", ["alibi", "softcap", "temperature", "compose"])
def test_attention_auto_sends_fusable_score_mods_to_the_kernel(mod_name, monkeypatch):
    if not _native_available():
        pytest.skip("native kernel not built")  # pragma: no cover
    mod, pat = _MODS[mod_name], SlidingWindow(20)
    q, k, v = qkv(1, 4, 2, _T, D=16, dtype=torch.float32)
    seen = _spy_native(monkeypatch)
    out = attnlab.attention(q, k, v, pattern=pat, score_mod=mod, scale=0.25)
    ref = reference_attention(q, k, v, pat, mod, scale=0.25, q_offset=0)
    tol = tolerance(torch.float32, sdpa_error(q.detach(), k.detach(), v.detach(), pat.dense(_T, _T, 0), scale=0.25))
    assert len(seen) == 1
    assert max_err(out, ref) <= 4 * tol
    assert max_err(grads(out, (q, k, v)), grads(ref, (q, k, v))) <= 40 * tol


def _moba_like(B, H, T, blk, n, seed):
    """Random past-block selections (n per query, distinct, strictly before the own block) and their validity."""
    g = torch.Generator().manual_seed(seed)
    own = torch.arange(T) // blk
    sel = torch.zeros(B, H, T, n, dtype=torch.long)
    valid = torch.zeros(B, H, T, n, dtype=torch.bool)
    for i in range(T):
        past = int(own[i])
        for bh in range(B * H):
            pick = torch.randperm(max(past, 1), generator=g)[:n]
            m = min(n, past)
            sel.view(B * H, T, n)[bh, i, :m] = pick[:m]
            valid.view(B * H, T, n)[bh, i, :m] = True
    return sel, valid


@pytest.mark.parametrize("n", [1, 2])
def test_key_centric_selection_runs_on_the_kernel(n, monkeypatch):
    if not _native_available():
        pytest.skip("native kernel not built")  # pragma: no cover
    from attnlab.core.sparse import native

    kb = native.default_block()
    B, H, Hkv, blk = 2, 4, 2, 2 * kb
    T = 4 * blk
    q, k, v = qkv(B, H, Hkv, T, D=16, dtype=torch.float32)
    sel, valid = _moba_like(B, H, T, blk, n, seed=n)
    plan = S.plan_selection(sel, valid, _block_sets(T, blk), Hkv, T, 0, True, q_block=32, diag_block=blk)
    own = torch.arange(T) // blk
    mask = S.selection_mask(sel, valid, _block_sets(T, blk), T, 0, True)
    mask = mask | (torch.ones(T, T, dtype=torch.bool).tril() & (own.view(T, 1) == own.view(1, T)))
    assert S.choose_engine(q, k, v, plan) == "native"
    seen = _spy_native(monkeypatch)
    out = S.run(q, k, v, plan, 0.25)
    assert len(seen) == 2  # the diagonal and the gathered selection part
    ref = S.masked_reference(q.double(), k.double(), v.double(), mask, scale=0.25)
    tol = tolerance(torch.float32, sdpa_error(q.detach(), k.detach(), v.detach(), mask, scale=0.25))
    assert max_err(out, ref) <= 4 * tol
    g_nat = grads(out, (q, k, v))
    assert max_err(g_nat, grads(ref, (q, k, v))) <= 40 * tol
    py = S.run(q, k, v, plan, 0.25, engine="python")
    assert max_err(out, py) <= 4 * tol
    assert max_err(g_nat, grads(py, (q, k, v))) <= 40 * tol
    # the log-sum-exp merges exactly too (its gradient flows through the kernel's lse)
    o2, L = S.run_lse(q, k, v, plan, 0.25, engine="native")
    o3, L3 = S.run_lse(q, k, v, plan, 0.25, engine="explicit")
    assert max_err(L, L3) <= 4 * tol
    w = torch.randn_like(L)
    ga = torch.autograd.grad((L * w).sum() + o2.sum(), (q, k, v))
    gb = torch.autograd.grad((L3 * w).sum() + o3.sum(), (q, k, v))
    assert max_err(ga, gb) <= 40 * tol


@pytest.mark.parametrize("n, diag", [(1, True), (2, True), (2, False)])
def test_key_centric_inference_merges_in_place_exactly(n, diag, monkeypatch):
    """Without autograd the gathered calls merge into natural-order rows in place (native.merge_gathered_):
    same output and log-sum-exp as the float64 reference, rows chosen several times (n = 2) included."""
    if not _native_available():
        pytest.skip("native kernel not built")  # pragma: no cover
    from attnlab.core.sparse import native

    kb = native.default_block()
    B, H, Hkv, blk = 1, 4, 2, 2 * kb
    T = 4 * blk
    q, k, v = (t.detach() for t in qkv(B, H, Hkv, T, D=16, dtype=torch.float32))
    sel, valid = _moba_like(B, H, T, blk, n, seed=7 + n)
    plan = S.plan_selection(sel, valid, _block_sets(T, blk), Hkv, T, 0, True, q_block=32,
                            diag_block=blk if diag else 0)
    mask = S.selection_mask(sel, valid, _block_sets(T, blk), T, 0, True)
    if diag:
        own = torch.arange(T) // blk
        mask = mask | (torch.ones(T, T, dtype=torch.bool).tril() & (own.view(T, 1) == own.view(1, T)))
    calls = []
    real = native.merge_gathered_
    monkeypatch.setattr(native, "merge_gathered_", lambda *a: (calls.append(1), real(*a)))
    with torch.no_grad():
        out, lse = S.run_lse(q, k, v, plan, 0.25, engine="native")
    assert calls  # the in-place merge ran
    qd, kd, vd = q.double(), k.double(), v.double()
    ref = S.masked_reference(qd, kd, vd, mask, scale=0.25)
    s = (qd @ kd.repeat_interleave(H // Hkv, 1).transpose(-1, -2) * 0.25).masked_fill(~mask, float("-inf"))
    ref_lse = torch.logsumexp(s, -1)
    tol = tolerance(torch.float32, sdpa_error(q, k, v, mask, scale=0.25))
    seen = mask.any(-1).expand_as(ref_lse)
    assert max_err(out, ref) <= 4 * tol
    assert max_err(lse[seen], ref_lse[seen]) <= 4 * tol and torch.isneginf(lse[~seen]).all()
    assert (out[~seen] == 0).all()


def test_key_sets_smaller_than_the_tuned_block_still_reach_the_kernel(monkeypatch):
    """A method's 64-key blocks on a machine tuned to 128-key layout blocks run on the kernel with 64-key tiles."""
    if not _native_available():
        pytest.skip("native kernel not built")  # pragma: no cover
    from attnlab.core.sparse import plan as plan_mod

    monkeypatch.setattr(plan_mod, "layout_block", lambda device_type="cpu": 128)
    B, H, Hkv, blk = 1, 4, 2, 64
    T = 6 * blk
    q, k, v = qkv(B, H, Hkv, T, D=16, dtype=torch.float32)
    sel, valid = _moba_like(B, H, T, blk, 2, seed=3)
    plan = S.plan_selection(sel, valid, _block_sets(T, blk), Hkv, T, 0, True, q_block=32, diag_block=blk)
    assert S.choose_engine(q, k, v, plan) == "native"
    seen = _spy_native(monkeypatch)
    out = S.run(q, k, v, plan, 0.25)
    assert seen and all(lay.k_block == 64 for lay, _, _ in seen)
    own = torch.arange(T) // blk
    mask = S.selection_mask(sel, valid, _block_sets(T, blk), T, 0, True)
    mask = mask | (torch.ones(T, T, dtype=torch.bool).tril() & (own.view(T, 1) == own.view(1, T)))
    ref = S.masked_reference(q.double(), k.double(), v.double(), mask, scale=0.25)
    tol = tolerance(torch.float32, sdpa_error(q.detach(), k.detach(), v.detach(), mask, scale=0.25))
    assert max_err(out, ref) <= 4 * tol
    assert max_err(grads(out, (q, k, v)), grads(ref, (q, k, v))) <= 40 * tol


def test_moba_op_reaches_the_kernel(monkeypatch):
    if not _native_available():
        pytest.skip("native kernel not built")  # pragma: no cover
    from attnlab.core.sparse import native
    from attnlab.mechanisms.routing.moba import moba_attention, moba_mask

    blk = native.default_block()
    T = 4 * blk
    q, k, v = qkv(1, 4, 2, T, D=16, dtype=torch.float32)
    seen = _spy_native(monkeypatch)
    out = moba_attention(q, k, v, blk, 3, 0.25)
    assert len(seen) == 2
    mask = moba_mask(q, k, blk, 3, 0)
    ref = S.masked_reference(q.double(), k.double(), v.double(), mask, scale=0.25)
    tol = tolerance(torch.float32, sdpa_error(q.detach(), k.detach(), v.detach(), mask, scale=0.25))
    assert max_err(out, ref) <= 4 * tol
    assert max_err(grads(out, (q, k, v)), grads(ref, (q, k, v))) <= 40 * tol


# ---- decoding calls: a few query rows are planned per row ------------------------------------------------


def _plain_selection_mask(sel, valid, key_sets, Tk, q_offset):
    """(B, H, Tq, Tk) written with loops: query (b, h, r) sees the in-range keys of its valid sets at or before
    its position (not the planner's vectorized code)."""
    B, H, Tq, n = sel.shape
    mask = torch.zeros(B, H, Tq, Tk, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            sets = key_sets[b if key_sets.shape[0] > 1 else 0, h if key_sets.shape[1] > 1 else 0]
            for r in range(Tq):
                for j in range(n):
                    if valid[b, h, r, j]:
                        for p in sets[int(sel[b, h, r, j])].tolist():
                            if 0 <= p < Tk and p <= q_offset + r:
                                mask[b, h, r, p] = True
    return mask


@pytest.mark.parametrize("Tq", [1, S.ROW_QUERIES, S.ROW_QUERIES + 1])
@pytest.mark.parametrize("sets", ["blocks", "scattered"])
@pytest.mark.parametrize("engine", ["python", "explicit"])
def test_decoding_rows_are_planned_per_row_and_match_reference(Tq, sets, engine):
    """Up to ROW_QUERIES rows: aligned block sets become a block plan of one-row query blocks (the kernel reads
    the blocks in place), other sets one gathered tile per row; one row more is key-centric again. Each equals
    the float64 reference, outputs and gradients, with a short last key block (37 keys, blocks of 8)."""
    B, H, Hkv, Tk, blk = 2, 4, 2, 37, 8
    q, k, v = qkv(B, H, Hkv, Tk, D=8)
    q = q[:, :, -Tq:].detach().requires_grad_()
    g = torch.Generator().manual_seed(Tq)
    nb = -(-Tk // blk)
    if sets == "blocks":
        key_sets = _block_sets(Tk, blk)
    else:  # per head, 6 sets of 5 scattered positions (some out of range: padding)
        key_sets = torch.stack([torch.randperm(Tk + 5, generator=g)[:30] - 2 for _ in range(H)]).view(1, H, 6, 5)
    S_ = key_sets.shape[2] if sets == "scattered" else nb
    sel = torch.stack([torch.randperm(S_, generator=g)[:3] for _ in range(B * H * Tq)]).view(B, H, Tq, 3)
    valid = torch.rand(B, H, Tq, 3, generator=g) > 0.2
    q_offset = Tk - Tq
    plan = S.plan_selection(sel, valid, key_sets, Hkv, Tk, q_offset, True, q_block=4)
    expected = {True: "blocks" if sets == "blocks" else "tiles", False: "selection"}[Tq <= S.ROW_QUERIES]
    assert plan.mode == expected
    if plan.mode == "blocks":
        assert plan.layout().q_block == 1 and plan.layout().k_block == blk
    mask = _plain_selection_mask(sel, valid, key_sets, Tk, q_offset)
    out = S.run(q, k, v, plan, 0.3, engine=engine)
    ref = S.masked_reference(q, k, v, mask, scale=0.3)
    assert max_err(out, ref) < 1e-12
    assert max_err(grads(out, (q, k, v)), grads(ref, (q, k, v))) < 1e-12


def test_a_decoding_block_plan_runs_on_the_kernel_reading_blocks_in_place(monkeypatch):
    """A MoBA decoding step (one row per head, float32) goes to the native kernel as a one-row block layout
    listing only the chosen blocks, and matches the float64 reference of MoBA's own plainly built mask."""
    if not _native_available():
        pytest.skip("native kernel not built")  # pragma: no cover
    from attnlab.mechanisms.routing.moba import moba_attention, moba_mask

    blk, Tk = 16, 16 * 7 + 3
    q, k, v = (t.detach() for t in qkv(1, 4, 2, Tk, D=16, dtype=torch.float32))
    q = q[:, :, -1:]
    seen = _spy_native(monkeypatch)
    out = moba_attention(q, k, v, blk, 3, 0.25)
    assert len(seen) == 1
    lay = seen[0][0]
    assert (lay.q_block, lay.k_block, lay.q_len) == (1, blk, 1)
    assert int(lay.kv_count.max()) == 3  # the own block + 2 chosen, not every block
    mask = moba_mask(q, k, blk, 3, Tk - 1)
    ref = S.masked_reference(q.double(), k.double(), v.double(), mask, scale=0.25)
    tol = tolerance(torch.float32, sdpa_error(q, k, v, mask, scale=0.25))
    assert max_err(out, ref) <= 4 * tol
