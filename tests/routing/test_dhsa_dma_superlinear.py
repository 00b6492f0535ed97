"""DHSA (D290), Dynamic Mask Attention (D51), Superlinear (D275): fast paths vs the float64 masked reference."""

import pytest
import torch
import torch.nn.functional as F

from attnlab.core.sparse import masked_reference
from attnlab.mechanisms.registry import build, get
from attnlab.mechanisms.routing.dhsa import chunk_keys, chunk_layout, dhsa_attention, dhsa_chunks, dhsa_mask
from attnlab.mechanisms.routing.dma import dma_attention, dma_reference
from attnlab.mechanisms.routing.superlinear import superlinear_attention, superlinear_mask
from attnlab.testing import grads, max_err, qkv


def _segments(lengths, D=8, Hkv=2):
    """Keys (1, Hkv, T, D): segment s is basis vector e_s (adjacent cos 1 inside, 0 across)."""
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    return F.one_hot(ids, D).double().view(1, 1, -1, D).expand(1, Hkv, -1, D).contiguous()


def _causal_bias(T):
    return torch.zeros(T, T, dtype=torch.float64).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))


def _decode_matches(layer, x, prefill):
    full = layer(x)
    assert max_err(full, layer.reference(x)) < 1e-12
    cache = layer.init_cache()
    steps = [layer(x[:, :prefill], cache)] + [layer(x[:, i : i + 1], cache) for i in range(prefill, x.shape[1])]
    assert max_err(torch.cat(steps, 1), full) < 1e-12


# ---- DHSA ---------------------------------------------------------------------------------------------------


def test_dhsa_chunks_follow_content():
    k = _segments([5, 3, 12, 4])
    starts = lambda cid: [0] + [t for t in range(1, cid.shape[1]) if cid[0, t] != cid[0, t - 1]]  # noqa: E731
    assert starts(dhsa_chunks(k, 2, 8, 0.5)) == [0, 5, 8, 16, 20]  # 16: max_len cuts the 12-long segment
    assert starts(dhsa_chunks(k, 4, 8, 0.5)) == [0, 5, 13, 20]  # 8: too short a chunk (3 < min_len)
    s, n, sets = chunk_layout(dhsa_chunks(k, 2, 8, 0.5), 8)
    assert s.tolist() == [[0, 5, 8, 16, 20]] and n.tolist() == [[5, 3, 8, 4, 4]]
    assert sets[0, 0, 1].tolist() == [5, 6, 7, -1, -1, -1, -1, -1]
    # causal: a prefix is chunked the same whatever follows
    _, kr, _ = qkv(2, 2, None, 40, D=4, requires_grad=False)
    full = dhsa_chunks(kr, 2, 6, 0.0)
    assert all(torch.equal(dhsa_chunks(kr[:, :, :t], 2, 6, 0.0), full[:, :t]) for t in (7, 19, 33))
    assert len(set(torch.bincount(full[0]).tolist())) > 1  # variable lengths
    with pytest.raises(ValueError, match="min_len"):
        dhsa_chunks(kr, 5, 4, 0.0)


def test_dhsa_length_normalized_routing():
    k = _segments([2, 8, 2, 4]).clone()
    k[:, :, 10:12] = k[:, :, 0:2]  # chunk 2 has the direction of chunk 0 (same mean, same length)
    cid = dhsa_chunks(k, 2, 8, 0.5)
    _, n, _ = chunk_layout(cid, 8)
    reps = chunk_keys(k, cid, n)
    assert max_err(reps[0, 0, 1], k[0, 0, 2:10].mean(0) * 8**0.5) < 1e-12
    # a query along e_0 + e_1 (equal dot product with both means) prefers the longer chunk 1 (sqrt(8) > sqrt(2))
    q = torch.zeros(1, 2, 16, 8, dtype=torch.float64)
    q[..., 0] = 1.0
    q[..., 1] = 1.0
    v = torch.eye(16, dtype=torch.float64).view(1, 1, 16, 16).expand(1, 2, 16, 16)
    q, k = F.pad(q, (0, 8)), F.pad(k, (0, 8))  # one head size for q, k and the one-hot values
    out = dhsa_attention(q, k, v, 2, 2, 8, 0.5)  # out rows = attention weights over the 16 keys
    row = out[0, 0, 15]
    assert bool((row[2:10] > 0).all()) and bool((row[12:16] > 0).all())
    assert float(row[:2].abs().max()) == 0.0 and float(row[10:12].abs().max()) == 0.0


@pytest.mark.parametrize("top_k", [1, 3])
def test_dhsa_matches_reference(top_k):
    q, k, v = qkv(2, 4, 2, 48, D=8)
    out = dhsa_attention(q, k, v, top_k, 2, 8, 0.0)
    mask = dhsa_mask(q, k, top_k, 2, 8, 0.0)
    ref = masked_reference(q, k, v, mask)
    assert max_err(out, ref) < 1e-12
    assert max_err(grads(out, (q, k, v)), grads(ref, (q, k, v))) < 1e-12
    assert float(mask.sum()) < 0.7 * 48 * 49 / 2 * 8  # really sparse


def test_dhsa_all_chunks_is_causal_attention():
    q, k, v = qkv(1, 4, 2, 40, D=8)
    out = dhsa_attention(q, k, v, 40, 2, 8, 0.0)
    assert max_err(out, F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)) < 1e-12


def test_dhsa_layer_decodes_and_trains():
    torch.manual_seed(0)
    layer = build("dhsa", dim=32, heads=4, kv_heads=2, top_k=2, min_len=2, max_len=5, threshold=0.0).double()
    _decode_matches(layer, torch.randn(2, 25, 32, dtype=torch.float64), 9)
    assert get("dhsa").family == "routing" and get("dhsa").decodes and get("dhsa").papers == ("D290",)
    small = build("dhsa", dim=32, heads=2, min_len=2, max_len=6, top_k=2)
    small(torch.randn(1, 30, 32)).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in small.parameters())
    with pytest.raises(ValueError, match="min_len"):
        build("dhsa", min_len=9, max_len=8)
    with pytest.raises(ValueError, match="q_all"):
        dhsa_attention(*qkv(1, 2, None, 4, Tk=8, D=4), 2, 2, 4)


# ---- Dynamic Mask Attention -------------------------------------------------------------------------------


@pytest.mark.parametrize("window,block", [(1, 8), (5, 8), (7, 16), (60, 4)])
def test_dma_matches_reference(window, block):
    q, k, v = qkv(2, 4, 2, 45, D=8)
    bias = torch.rand(2, 2, 45, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).requires_grad_()
    out = dma_attention(q, k, v, bias, window, block)
    ref = dma_reference(q, k, v, bias, window)
    assert max_err(out, ref) < 1e-12
    assert max_err(grads(out, (q, k, v, bias)), grads(ref, (q, k, v, bias))) < 1e-12
    tail = dma_attention(q[:, :, 38:], k, v, bias, window, block)  # rows at 38.. (decode-like offset)
    assert max_err(tail, dma_reference(q[:, :, 38:], k, v, bias, window)) < 1e-12


def test_dma_full_window_is_dense_attention_with_bias():
    q, k, v = qkv(1, 4, 2, 33, D=8)
    bias = torch.randn(1, 2, 33, dtype=torch.float64)
    dense = F.scaled_dot_product_attention(
        q, k, v, attn_mask=_causal_bias(33) + bias.repeat_interleave(2, 1).unsqueeze(2), enable_gqa=True)
    assert max_err(dma_attention(q, k, v, bias, 33, 8), dense) < 1e-12
    assert max_err(dma_attention(q, k, v, bias, 2, 8), dense) > 1e-3


def test_dma_keeps_the_most_important_keys():
    T = 16
    q = torch.zeros(1, 1, T, T, dtype=torch.float64)
    k = torch.zeros(1, 1, T, T, dtype=torch.float64)
    v = torch.eye(T, dtype=torch.float64).view(1, 1, T, T)
    bias = torch.zeros(1, 1, T, dtype=torch.float64)
    bias[0, 0, 3], bias[0, 0, 10] = 2.0, 1.0
    w = dma_attention(q, k, v, bias, 2, 4)[0, 0]  # rows: attention weights (scores are the bias alone)
    for i in range(T):
        kept = set(w[i].nonzero().flatten().tolist())
        expect = {0, 1} if i < 3 else ({3, 0} if i < 10 else {3, 10})  # ties: earlier position first
        if i == 0:
            expect = {0}
        assert kept == expect, i
    e = torch.exp(torch.tensor([2.0, 1.0], dtype=torch.float64))
    assert max_err(w[12, [3, 10]], e / e.sum()) < 1e-12  # the importance is added to the scores


def test_dma_layer_decodes_and_trains_importance():
    torch.manual_seed(0)
    layer = build("dma", dim=32, heads=4, kv_heads=2, window=6, chunk=4).double()
    x = torch.randn(2, 23, 32, dtype=torch.float64)
    _decode_matches(layer, x, 9)
    params = (layer.dt_proj.weight, layer.a_log)
    g_fast = grads(layer(x), params)
    g_ref = grads(layer.reference(x), params)
    assert max_err(g_fast, g_ref) < 1e-12 and float(g_fast[1].abs().max()) > 0
    assert get("dma").family == "routing" and get("dma").decodes
    with pytest.raises(ValueError, match="window"):
        build("dma", window=0)
    with pytest.raises(TypeError, match="'block' was renamed to 'chunk'"):
        build("dma", block=4)
    with pytest.raises(ValueError, match="bias"):
        dma_attention(*qkv(1, 2, None, 8, D=4), torch.zeros(1, 2, 7), 2)


# ---- Superlinear ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stride,window,top_k,block", [(4, 6, 2, 8), (5, 3, 1, 16), (8, 8, 3, 4)])
def test_superlinear_matches_reference(stride, window, top_k, block):
    q, k, v = qkv(2, 4, 2, 50, D=8)
    out = superlinear_attention(q, k, v, stride, window, top_k, block)
    ref = masked_reference(q, k, v, superlinear_mask(q, k, stride, window, top_k))
    assert max_err(out, ref) < 1e-12
    assert max_err(grads(out, (q, k, v)), grads(ref, (q, k, v))) < 1e-12
    tail = superlinear_attention(q[:, :, 43:], k, v, stride, window, top_k, block)
    assert max_err(tail, masked_reference(q[:, :, 43:], k, v, superlinear_mask(q[:, :, 43:], k, stride, window,
                                                                                 top_k))) < 1e-12


def test_superlinear_limits():
    q, k, v = qkv(1, 4, 2, 40, D=8)
    causal = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert max_err(superlinear_attention(q, k, v, 4, 4, 10), causal) < 1e-12  # every span kept
    # top_k 0: the local part alone, keys from the span start of i - window + 1 to i
    pos = torch.arange(40)
    lo = (pos - 5).clamp(min=0) // 4 * 4
    band = (pos.view(1, -1) >= lo.view(-1, 1)) & (pos.view(1, -1) <= pos.view(-1, 1))
    assert max_err(superlinear_attention(q, k, v, 4, 6, 0), masked_reference(q, k, v, band)) < 1e-12
    assert int(band.sum(1).min()) >= 1 and int(band[20:].sum(1).min()) >= 6


def test_superlinear_span_search_finds_the_anchor():
    q, k, _ = qkv(1, 1, None, 48, D=8, requires_grad=False)
    k = k * 0.01
    k[:, :, 2 * 4 + 2] = q[:, :, 40] * 10  # anchor (centre key) of span 2 matches query 40
    v = torch.eye(48, dtype=torch.float64).view(1, 1, 48, 48)
    q, k = F.pad(q, (0, 40)), F.pad(k, (0, 40))  # one head size for q, k and the one-hot values
    w = superlinear_attention(q, k, v, 4, 6, 1)[0, 0, 40]
    assert set(w.nonzero().flatten().tolist()) == set(range(8, 12)) | set(range(32, 41))


def test_superlinear_layer_decodes():
    torch.manual_seed(0)
    layer = build("superlinear", dim=32, heads=4, kv_heads=2, stride=4, window=5, top_k=2, chunk=4).double()
    _decode_matches(layer, torch.randn(2, 23, 32, dtype=torch.float64), 9)
    assert get("superlinear").family == "routing" and get("superlinear").decodes
    with pytest.raises(ValueError, match="top_k"):
        build("superlinear", top_k=-1)
    with pytest.raises(TypeError, match="'block' was renamed to 'chunk'"):
        build("superlinear", block=4)
