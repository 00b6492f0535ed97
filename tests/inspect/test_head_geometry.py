"""RoPE frequency usage (A248), sink reference frames (A130) and local-keys long-context head identification
(A141): planted inputs with known answers and brute-force references written from the definitions."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from hf_tiny import tiny  # noqa: E402

from attnlab.inspect.long_context import (  # noqa: E402
    LongContextConfig,
    bulk_shares,
    long_context_heads,
)
from attnlab.inspect.rope_usage import RopeUsage, inv_freqs, pair_contributions, rope_usage  # noqa: E402
from attnlab.inspect.sink_frame import (  # noqa: E402
    FrameConfig,
    frame_type,
    key_geometry,
    received_mass,
    sink_frames,
)
from attnlab.models import hf  # noqa: E402

torch.set_num_threads(1)


def _ids(T, seed=0):
    return torch.randint(0, 97, (1, T), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------------
# RoPE usage
# --------------------------------------------------------------------------------------------------------
def test_pair_contributions_brute_force():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(3, 5, 8, generator=g, dtype=torch.float64), torch.randn(3, 6, 8, generator=g, dtype=torch.float64)
    c = pair_contributions(q, k)
    assert c.shape == (3, 4, 5, 6)
    for f in range(4):
        ref = torch.zeros(3, 5, 6, dtype=torch.float64)
        for h in range(3):
            for i in range(5):
                for j in range(6):
                    ref[h, i, j] = q[h, i, f] * k[h, j, f] + q[h, i, f + 4] * k[h, j, f + 4]
        torch.testing.assert_close(c[:, f], ref)
    torch.testing.assert_close(c.sum(1), q @ k.transpose(-1, -2))
    planted = torch.zeros(1, 2, 8, dtype=torch.float64)
    planted[..., 2] = 1.0
    planted[..., 6] = 2.0  # pair 2 only
    cp = pair_contributions(planted, planted)
    assert torch.all(cp[:, 2] == 5.0) and cp[:, [0, 1, 3]].abs().sum() == 0
    with pytest.raises(ValueError, match="even head_dim"):
        pair_contributions(torch.zeros(1, 2, 7), torch.zeros(1, 2, 7))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_inv_freqs_rotate_the_models_queries(family):
    """Rotating the pre-RoPE query (q_proj, then Gemma's q_norm) pair f = (f, f + D/2) at position p by
    p * inv_freq[f] gives exactly the seam's post-RoPE q: the pairing and the frequencies are the model's."""
    model = tiny(family)
    g = hf.geometry(model)
    T, D = 12, g.head_dim
    pre = {}
    for layer, attn in hf.attention_modules(model):
        mod = attn.q_norm if hasattr(attn, "q_norm") else attn.q_proj
        mod.register_forward_hook(lambda m, a, out, layer=layer: pre.__setitem__(layer, out.detach()))
    _, cache = hf.run_with_cache(model, _ids(T), ["blocks.*.attn.q"])
    freqs = inv_freqs(model)
    for layer in range(g.num_layers):
        x = pre[layer]  # q_proj: (1, T, H * D); Gemma's q_norm runs after the head split: (1, H, T, D)
        x = (x.view(1, T, -1, D).transpose(1, 2) if x.dim() == 3 else x).double()
        ang = torch.arange(T, dtype=torch.float64).view(-1, 1) * freqs[layer].view(1, -1)  # (T, F)
        a, b = x[..., : D // 2], x[..., D // 2:]
        rot = torch.cat([a * ang.cos() - b * ang.sin(), b * ang.cos() + a * ang.sin()], -1)
        torch.testing.assert_close(rot, cache[f"blocks.{layer}.attn.q"].double(), atol=1e-5, rtol=1e-5)
    if family == "gemma3":  # sliding and full layers have their own bases
        assert not torch.allclose(freqs[0], freqs[1])


def test_rope_usage_matches_reference_from_captured_tensors():
    model = tiny("llama")
    g = hf.geometry(model)
    T, F = 16, g.head_dim // 2
    ids = _ids(T, 3)
    u = rope_usage(model, ids)
    _, cache = hf.run_with_cache(model, ids, ["blocks.*.attn.q", "blocks.*.attn.k", "blocks.*.attn.weights"],
                                 rows=(0, T))
    for layer in range(g.num_layers):
        q = cache[f"blocks.{layer}.attn.q"][0].double()
        k = cache[f"blocks.{layer}.attn.k"][0].double()
        w = cache[f"blocks.{layer}.attn.weights"][0].double()
        for h in range(g.num_heads):
            kh = k[h // g.group]
            tot = torch.zeros(F, dtype=torch.float64)
            nq = torch.zeros(F, dtype=torch.float64)
            nk = torch.zeros(F, dtype=torch.float64)
            for f in range(F):
                dims = [f, f + F]
                tot[f] = (w[h] * (q[h][:, dims] @ kh[:, dims].T).abs()).sum()
                nq[f] = q[h][:, dims].norm(dim=-1).mean()
                nk[f] = kh[:, dims].norm(dim=-1).mean()
            torch.testing.assert_close(u.score_share[layer, h], tot / tot.sum(), atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(u.norm_share[layer, h], nq * nk / (nq * nk).sum(), atol=1e-6, rtol=1e-5)
    assert u.T == T and len(u.per_layer()) == g.num_layers
    with pytest.raises(ValueError, match="one sequence"):
        rope_usage(model, _ids(T)[0])


def test_rope_usage_planted_shares():
    F, T = 8, 100
    freqs = 10000.0 ** (-torch.arange(F, dtype=torch.float64) / F)  # wavelengths 6.28 ... 2*pi*10^3.5
    share = torch.zeros(1, 3, F, dtype=torch.float64)
    share[0, 0, F - 1] = 1.0  # all on the slowest pair
    share[0, 1, 0] = 1.0  # all on the fastest pair
    share[0, 2] = torch.arange(F, dtype=torch.float64) / torch.arange(F).sum()  # grows with f
    u = RopeUsage(share, share, freqs.view(1, -1), T)
    # wavelengths 2 pi 10^(f/2): 6.3, 19.9, 62.8, 198.7, ... -> pairs 3..7 are slower than T = 100 tokens
    assert u.low_mask[0].tolist() == [False] * 3 + [True] * 5
    assert u.low_share[0].tolist() == pytest.approx([1.0, 0.0, (3 + 4 + 5 + 6 + 7) / 28])
    corr = u.high_dim_corr[0]
    assert corr[0] > 0 and corr[1] < 0 and corr[2] == pytest.approx(1.0)
    assert u.positional().tolist() == [[True, False, True]]  # one-hot on the last of 8 pairs: corr 0.54


# --------------------------------------------------------------------------------------------------------
# sink reference frames
# --------------------------------------------------------------------------------------------------------
def _causal_rows(T, planted: dict[int, float]):
    """Causal (T, T) weights: every row puts planted[j] on each visible planted key j, the rest uniformly."""
    w = torch.zeros(T, T, dtype=torch.float64)
    for i in range(T):
        keys = [j for j in planted if j <= i]
        rest = [j for j in range(i + 1) if j not in planted]
        mass = sum(planted[j] for j in keys)
        for j in keys:
            w[i, j] = planted[j] if rest else planted[j] / mass
        for j in rest:
            w[i, j] = (1 - mass) / len(rest)
    return w


def test_received_mass_brute_force():
    g = torch.Generator().manual_seed(2)
    T = 9
    s = torch.randn(2, T, T, generator=g, dtype=torch.float64)
    w = torch.softmax(s.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf")), -1)
    m = received_mass(w, causal=True, burn=2, min_rows=3)
    for h in range(2):
        for j in range(T):
            rows = [i for i in range(2, T) if i >= j]
            if len(rows) < 3:
                assert math.isnan(m[h, j])
            else:
                assert m[h, j] == pytest.approx(sum(float(w[h, i, j]) for i in rows) / len(rows))
    with pytest.raises(ValueError, match="heads, T, T"):
        received_mass(w[0], causal=True)


def test_frame_types_on_planted_maps():
    T, cfg = 40, FrameConfig(min_rows=4)
    burn = 4
    kinds = {"centralized": {0: 0.7}, "distributed": {0: 0.25, 7: 0.25, 15: 0.2}, "none": {}}
    for want, planted in kinds.items():
        m = received_mass(_causal_rows(T, planted).unsqueeze(0), True, burn, cfg.min_rows)[0]
        t, anchors = frame_type(m, cfg, causal=True)
        assert t == want, (want, t, anchors)
        assert sorted(anchors) == sorted(planted)
    # encoder: [CLS] and [SEP] share the frame
    w = torch.full((T, T), 0.4 / (T - 2), dtype=torch.float64)
    w[:, 0], w[:, T - 1] = 0.35, 0.25
    m = received_mass(w.unsqueeze(0), False, 0, 1)[0]
    assert frame_type(m, cfg, causal=False) == ("bidirectional", [0, T - 1])
    # the same two ends in a causal reading are recency, not a frame type of their own
    assert frame_type(m, cfg, causal=True)[0] == "distributed"
    with pytest.raises(ValueError, match="anchor"):
        FrameConfig(anchor=0.0)
    with pytest.raises(ValueError, match="burn"):
        FrameConfig(burn=-1)


def test_key_geometry_planted():
    g = torch.Generator().manual_seed(4)
    D = 6
    others = torch.randn(5, D, generator=g, dtype=torch.float64) + 1.0
    anchor = -2.0 * others.mean(0)
    k = torch.cat([anchor[None], others])
    q = anchor.expand(3, D).clone()  # queries point exactly at the anchor
    geo = key_geometry(q, k, 0, torch.arange(1, 6))
    assert geo["key_cos"] == pytest.approx(-1.0)
    assert geo["key_norm_ratio"] == pytest.approx(float(anchor.norm() / others.norm(dim=-1).median()))
    cos_other = torch.stack([torch.nn.functional.cosine_similarity(anchor, o, dim=0) for o in others]).mean()
    assert geo["query_alignment"] == pytest.approx(1.0 - float(cos_other))


def test_sink_frames_on_tiny_model():
    model = tiny("llama")
    g = hf.geometry(model)
    T = 24
    ids = _ids(T, 5)
    fr = sink_frames(model, ids, FrameConfig(anchor=0.05, eps=0.05))  # min_rows: (24 - 4) // 4 = 5
    _, cache = hf.run_with_cache(model, ids, ["blocks.*.attn.weights"], rows=(0, T))
    for layer in range(g.num_layers):
        w = cache[f"blocks.{layer}.attn.weights"][0].double()
        for h in range(g.num_heads):
            m = [float(w[h, max(j, 4):, j].mean()) if T - max(j, 4) >= 5 else float("nan") for j in range(T)]
            anchors = [j for j in range(T) if not math.isnan(m[j]) and m[j] >= 0.05]
            assert sorted(fr.anchors[layer][h]) == anchors
            assert float(fr.frame_mass[layer, h]) == pytest.approx(sum(m[j] for j in anchors))
    assert sum(fr.counts().values()) == g.num_layers * g.num_heads
    assert fr.model_type() in ("none", "centralized", "distributed")


# --------------------------------------------------------------------------------------------------------
# long-context heads from local keys
# --------------------------------------------------------------------------------------------------------
def _reference_shares(scores, q_pos, visible, cfg):
    H, r, Tk = scores.shape
    hat = torch.full((H, r), float("nan"), dtype=torch.float64)
    true = torch.full((H, r), float("nan"), dtype=torch.float64)
    for h in range(H):
        for a, i in enumerate(q_pos.tolist()):
            vis = [j for j in range(Tk) if visible[a, j]]
            local = [j for j in vis if j < cfg.sinks or i - cfg.window < j <= i]
            bulk = [j for j in vis if j not in local]
            win = bulk if cfg.moments == "bulk" else [j for j in local if j >= cfg.sinks]
            if len(bulk) < cfg.min_bulk or len(win) < 2:
                continue
            s = [float(scores[h, a, j]) for j in range(Tk)]
            mu = sum(s[j] for j in win) / len(win)
            var = sum((s[j] - mu) ** 2 for j in win) / len(win)
            zb_hat = len(bulk) * math.exp(mu + var / 2)
            zl = sum(math.exp(s[j]) for j in local)
            hat[h, a] = zb_hat / (zb_hat + zl)
            true[h, a] = sum(math.exp(s[j]) for j in bulk) / sum(math.exp(s[j]) for j in vis)
    return hat, true


@pytest.mark.parametrize("moments", ["bulk", "window"])
def test_bulk_shares_brute_force(moments):
    g = torch.Generator().manual_seed(6)
    T, cfg = 30, LongContextConfig(sinks=2, window=5, min_bulk=3, moments=moments)
    scores = torch.randn(2, T, T, generator=g, dtype=torch.float64)
    q_pos = torch.arange(T)
    visible = torch.arange(T).view(1, -1) <= q_pos.view(-1, 1)
    hat, true = bulk_shares(scores, q_pos, visible, cfg)
    ref_hat, ref_true = _reference_shares(scores, q_pos, visible, cfg)
    torch.testing.assert_close(hat, ref_hat, equal_nan=True)
    torch.testing.assert_close(true, ref_true, equal_nan=True)
    assert hat[:, :9].isnan().all() and not hat[:, 9:].isnan().any()  # 2 sinks + 5 window + 3 bulk


def test_bulk_shares_planted_gaussian_heads():
    """Head 0: every score iid N(0, 1), so the Gaussian model is right and the estimate tracks the oracle;
    head 1: the recent keys score 8 higher (a local head): both say the bulk carries almost nothing."""
    g = torch.Generator().manual_seed(7)
    Tk, cfg = 3000, LongContextConfig(sinks=0, window=400)
    q_pos = torch.arange(Tk - 5, Tk)
    scores = torch.randn(2, 5, Tk, generator=g, dtype=torch.float64)
    scores[1, :, Tk - 400 - 5:] += 8.0
    visible = torch.arange(Tk).view(1, -1) <= q_pos.view(-1, 1)
    hat, true = bulk_shares(scores, q_pos, visible, cfg)
    torch.testing.assert_close(hat[0], true[0], atol=0.03, rtol=0)
    assert (true[0] > 0.8).all() and (hat[1] < 0.05).all() and (true[1] < 0.05).all()
    # from the window's moments the local head looks long: the window is unlike its bulk
    hat_w, _ = bulk_shares(scores, q_pos, visible, LongContextConfig(sinks=0, window=400, moments="window"))
    assert (hat_w[1] > 0.8).all()


def test_long_context_heads_on_tiny_model_matches_direct_scores():
    model = tiny("llama")
    g = hf.geometry(model)
    T, cfg = 40, LongContextConfig(sinks=1, window=6, threshold=0.3)
    ids = _ids(T, 8)
    res = long_context_heads(model, ids, cfg)
    _, cache = hf.run_with_cache(model, ids, ["blocks.*.attn.q", "blocks.*.attn.k"])
    scale = g.head_dim ** -0.5
    for layer in range(g.num_layers):
        q = cache[f"blocks.{layer}.attn.q"][0].double()
        k = cache[f"blocks.{layer}.attn.k"][0].double().repeat_interleave(g.group, 0)
        s = (q @ k.transpose(-1, -2)) * scale
        p = torch.softmax(s.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf")), -1)
        for h in range(g.num_heads):
            rho = [float(p[h, i, 1:i - 5].sum()) for i in range(8, T)]  # bulk (two keys at least): after the sink, before the window
            assert float(res.rho_mean[layer, h]) == pytest.approx(sum(rho) / len(rho), rel=1e-5)
            assert float(res.true_long[layer, h]) == pytest.approx(sum(x >= 0.3 for x in rho) / len(rho))
    assert res.queries == T - 8
    with pytest.raises(ValueError, match="window"):
        LongContextConfig(window=1)
    with pytest.raises(ValueError, match="threshold"):
        LongContextConfig(threshold=1.0)
    with pytest.raises(ValueError, match="moments"):
        LongContextConfig(moments="all")


def test_long_context_heads_reads_the_sliding_window_from_the_hook_mask():
    """Gemma 3 tiny: layer 0 slides over 4 keys (all local: no bulk, NaN), layer 1 is full (direct reference
    with the model's own scale, query_pre_attn_scalar ** -0.5)."""
    model = tiny("gemma3")
    g = hf.geometry(model)
    T, cfg = 30, LongContextConfig(sinks=1, window=6, threshold=0.3)
    ids = _ids(T, 9)
    res = long_context_heads(model, ids, cfg)
    assert res.rho_mean[0].isnan().all() and res.est_long[0].isnan().all()
    _, cache = hf.run_with_cache(model, ids, ["blocks.1.attn.q", "blocks.1.attn.k"])
    q = cache["blocks.1.attn.q"][0].double()
    k = cache["blocks.1.attn.k"][0].double().repeat_interleave(g.group, 0)
    scale = model.config.query_pre_attn_scalar ** -0.5
    p = torch.softmax(((q @ k.transpose(-1, -2)) * scale).masked_fill(torch.ones(T, T).triu(1).bool(),
                                                                       float("-inf")), -1)
    for h in range(g.num_heads):
        rho = [float(p[h, i, 1:i - 5].sum()) for i in range(8, T)]
        assert float(res.rho_mean[1, h]) == pytest.approx(sum(rho) / len(rho), rel=1e-5)
