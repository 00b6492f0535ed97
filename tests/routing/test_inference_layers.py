"""Registered inference-time selection layers: hip (D74), minference (B294), delta_select (D42), recycled (D27),
and the delta correction (D99) option on top of each.

Each: forward == reference (dense float64 attention with the same selection as a mask; outputs and gradients),
every key selected == dense causal attention, decoding one token at a time (and in chunks) == full forward."""

import pytest
import torch
import torch.nn.functional as F

from attnlab.core.sparse import selection_mask
from attnlab.mechanisms.registry import build, get
from attnlab.mechanisms.routing.delta import correction_terms, delta_correction
from attnlab.mechanisms.routing.delta_layers import select_row_sets, select_rows, select_tokens
from attnlab.mechanisms.routing.hip import hip_row_mask, hip_row_select
from attnlab.mechanisms.routing.moba import block_sets
from attnlab.mechanisms.routing.recycled import full_rows, recycled_layer_attention, recycled_reference
from attnlab.testing import grads, max_err, qkv

pytestmark = pytest.mark.usefixtures("one_thread")


T = 23
CASES = [  # (name, options, length of the first decoding call)
    ("hip", dict(block=4, top_k=2), 5),
    ("hip", dict(block=4, top_k=1, delta=3), 8),
    ("minference", dict(n_vertical=3, n_slash=3, last_q=4, chunk=8, prefill=14), 14),
    ("minference", dict(mode="block_topk", block=4, top_k=1, prefill=12, delta=3), 15),
    ("delta_select", dict(top_k=4, always=2), 5),
    ("delta_select", dict(top_k=3, always=1, prefill=6, delta=4), 9),
    ("recycled", dict(top_k=4, stride=3), 5),
    ("recycled", dict(top_k=3, stride=4, dense_refresh=False, prefill=6, delta=5), 9),
    ("recycled", dict(top_k=4, stride=5, refresh_below=-0.1, prefill=6), 6),  # 3 extra refreshes
]


def _layer(name, seed=0, **opts):
    torch.manual_seed(seed)
    return build(name, dim=32, heads=4, kv_heads=2, **opts).double()


def _x(B=2, n=T, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, n, 32, generator=g, dtype=torch.float64, requires_grad=True)


def _dense(layer, x):
    q, k, v = layer.project(x)
    return layer.out(F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))


@pytest.mark.parametrize("name,opts,first", CASES)
def test_forward_matches_reference_and_decoding(name, opts, first):
    layer, x = _layer(name, **opts), _x()
    y, r = layer(x), layer.reference(x)
    assert max_err(y, r) < 1e-12
    params = (x, *layer.parameters())
    assert max_err(grads(y, params), grads(r, params)) < 1e-10
    assert max_err(y, _dense(layer, x)) > 1e-3  # the selection really drops keys
    with torch.no_grad():
        for step in (1, 3):
            cache = layer.init_cache()
            ys = [layer(x[:, :first], cache)] + [layer(x[:, i : i + step], cache) for i in range(first, T, step)]
            assert max_err(torch.cat(ys, 1), y) < 1e-12, step


@pytest.mark.parametrize("name,opts", [
    ("hip", dict(block=4, top_k=6)),
    ("minference", dict(n_vertical=T, n_slash=T, last_q=4, chunk=8)),
    ("minference", dict(mode="block_topk", block=4, top_k=6)),
    ("delta_select", dict(top_k=T, always=0)),
    ("recycled", dict(top_k=T, stride=4)),
    ("recycled", dict(top_k=T, stride=3, dense_refresh=False)),
])
def test_every_key_selected_is_dense_causal_attention(name, opts):
    layer, x = _layer(name, **opts), _x()
    assert max_err(layer(x), _dense(layer, x)) < 1e-12
    assert max_err(layer.reference(x), _dense(layer, x)) < 1e-12


def test_registered_entries_and_options():
    for name, paper in (("hip", "D74"), ("minference", "B294"), ("delta_select", "D42"), ("recycled", "D27")):
        e = get(name)
        assert e.family == "routing" and e.papers == (paper,) and e.decodes and e.cls.registry_name == name
        with pytest.raises(ValueError, match="delta"):
            build(name, delta=-1)
        with pytest.raises(TypeError, match="'delta_correction' was renamed to 'delta'"):
            build(name, delta_correction=2)
    with pytest.raises(ValueError, match="mode"):
        build("minference", mode="slash")
    with pytest.raises(ValueError, match="prefill"):
        build("recycled", prefill=0)
    with pytest.raises(TypeError, match="valid options"):
        build("delta_select", stride=3)


# ---- decode semantics -------------------------------------------------------------------------------------


def test_minference_prefill_is_sparse_then_decoding_is_dense():
    layer = _layer("minference", mode="block_topk", block=4, top_k=1)  # prefill=None: the first call
    x = _x()
    full = layer(x)  # all prefill: sparse everywhere
    assert max_err(full[:, :4], _dense(layer, x)[:, :4]) < 1e-12  # the first block sees only itself
    assert max_err(full[:, 8:], _dense(layer, x)[:, 8:]) > 1e-3
    with torch.no_grad():
        cache = layer.init_cache()
        pre = layer(x[:, :12], cache)
        rest = torch.cat([layer(x[:, i : i + 1], cache) for i in range(12, T)], 1)
    assert max_err(pre, layer(x[:, :12])) < 1e-12  # the first call is the sparse prefill
    assert max_err(rest, _dense(layer, x)[:, 12:]) < 1e-12  # later rows attend densely
    assert cache.state["prefill_end"] == 12


def test_hip_per_query_search_finds_the_peak_and_keeps_top_k_blocks():
    q, k, _ = qkv(1, 1, None, 128, D=8, requires_grad=False)
    pos = torch.arange(128, dtype=torch.float64)
    bump = torch.exp(-(((pos - 22 * 4 - 1.5) / 10) ** 2))  # keys rise smoothly to a peak at block 22
    k = 0.01 * k + q[:, :, 127:] * 5 * bump.view(1, 1, 128, 1)
    sel, valid = hip_row_select(q, k, 4, 2, 0)
    assert 22 in sel[0, 0, 127][valid[0, 0, 127]].tolist()
    assert torch.equal(sel[..., 0], (torch.arange(128) // 4).view(1, 1, 128))  # own block first
    assert torch.equal(valid.sum(-1)[0, 0], 1 + (torch.arange(128) // 4).clamp(max=2))
    # the vectorized search and the plain per-row loop pick the same blocks (GQA, ragged last block)
    q, k, _ = qkv(2, 4, 2, 30, D=8, requires_grad=False)
    sel, valid = hip_row_select(q, k, 4, 2, 0)
    assert torch.equal(selection_mask(sel, valid, block_sets(30, 4), 30), hip_row_mask(q, k, 4, 2, 0))


def test_delta_select_rows_are_select_tokens_of_one_query():
    q, k, _ = qkv(2, 4, 2, 20, D=8, requires_grad=False)
    keep = select_rows(q, k, top_k=4, always=3, q_offset=0)
    for i in (0, 2, 9, 19):
        assert torch.equal(keep[:, i, : i + 1], select_tokens(q[:, :, i : i + 1], k[:, :, : i + 1], 4, 3)), i
        assert not keep[:, i, i + 1 :].any()
    kpos, ok = select_row_sets(q, k, 4, 3, 0)  # distinct positions where valid
    for b in range(2):
        for i in range(20):
            p = kpos[b, i][ok[b, i]].tolist()
            assert len(p) == len(set(p)) == int(keep[b, i].sum())


def test_recycled_schedule_known_answers():
    q, _, _ = qkv(1, 2, None, 14, D=4, requires_grad=False)
    assert full_rows(q, 0, 3, 4, None) == [0, 1, 2, 6, 10]
    assert full_rows(q[:, :, 7:], 7, 3, 4, None, last=6, q_ref=q[:, :, 6]) == [3]  # position 10
    q2 = q.clone()
    q2[:, :, 8] = -q2[:, :, 6]  # turns away from the full step at 6
    assert full_rows(q2, 0, 3, 4, -0.9, None) == [0, 1, 2, 6, 8, 12]
    assert full_rows(q2, 0, 3, 4, None, None) == [0, 1, 2, 6, 10]


@pytest.mark.parametrize("dense_refresh", [True, False])
def test_recycled_layer_attention_equals_the_decoder_reference(dense_refresh):
    """The per-position schedule is RecycledDecoder's (prefill = one full step, then a full step every stride)."""
    q, k, v = qkv(2, 4, 2, 26, D=8)
    out = recycled_layer_attention(q, k, v, 5, 3, 10, dense_refresh)
    ref = recycled_reference(q, k, v, 10, 5, 3, dense_refresh)
    assert max_err(out[:, :, 9:], ref) < 1e-12
    assert max_err(grads(out[:, :, 9:], (q, k, v)), grads(ref, (q, k, v))) < 1e-12


# ---- delta correction -------------------------------------------------------------------------------------


def _planted():
    """Queries share a direction that key 0 (a sink) matches; values vary slowly along the sequence."""
    g = torch.Generator().manual_seed(3)
    B, H, n, D = 1, 2, 96, 16
    shared = torch.randn(1, H, 1, D, generator=g, dtype=torch.float64)
    q = shared + 0.3 * torch.randn(B, H, n, D, generator=g, dtype=torch.float64)
    k = 0.5 * torch.randn(B, H, n, D, generator=g, dtype=torch.float64)
    k[:, :, 0] = shared[:, :, 0] * 2
    v = torch.randn(B, H, n // 16 + 1, D, generator=g, dtype=torch.float64)
    v = F.interpolate(v.flatten(0, 1).transpose(1, 2), size=n, mode="linear").transpose(1, 2).reshape(B, H, n, D)
    v[:, :, 0] = 3 * torch.randn(D, generator=g, dtype=torch.float64)
    return q, k, v


def _planted_layer(name, **opts):
    """The layer with its projections replaced by the planted q, k, v (and an identity output projection)."""
    q, k, v = _planted()
    layer = build(name, dim=32, heads=2, rope=False, **opts).double()
    layer.project = lambda x, start=0: tuple(t[:, :, start : start + x.shape[1]] for t in (q, k, v))
    with torch.no_grad():
        layer.o_proj.weight.copy_(torch.eye(32, dtype=torch.float64))
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(1, 96, 32)
    return layer, dense


@pytest.mark.parametrize("name,opts", [("minference", dict(mode="block_topk", block=16, top_k=1)),
                                       ("delta_select", dict(top_k=2, always=8))])
def test_delta_correction_reduces_error_and_is_exact_when_dense(name, opts):
    x = torch.zeros(1, 96, 32, dtype=torch.float64)
    err = {}
    for stride in (0, 8):
        layer, dense = _planted_layer(name, delta=stride, **opts)
        y = layer(x)
        assert max_err(y, layer.reference(x)) < 1e-12
        err[stride] = float((y - dense)[:, 16:].detach().norm())  # rows past the sink's block
    assert err[8] < 0.5 * err[0], err
    layer, dense = _planted_layer(name, delta=1, **opts)  # every row sampled: dense attention
    assert max_err(layer(x), dense) < 1e-12
    dense_opts = dict(opts, top_k=96) if name == "delta_select" else dict(opts, top_k=6)
    layer, dense = _planted_layer(name, delta=8, **dense_opts)  # a dense "sparse" method: exact
    assert max_err(layer(x), dense) < 1e-12


def test_correction_samples_absolute_positions_and_carries_between_calls():
    q, k, v = qkv(1, 2, None, 20, D=8, requires_grad=False)
    sparse = torch.randn(1, 2, 20, 8, dtype=torch.float64)
    full = correction_terms(q, k, v, sparse, 4)
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert max_err(full[:, :, 9], (dense - sparse)[:, :, 8]) < 1e-12  # row 9 uses the sample at 8
    # a call holding rows 10.. of the cache: rows 10, 11 use the carried delta of row 8
    tail = correction_terms(q[:, :, 10:], k, v, sparse[:, :, 10:], 4, carry=full[:, :, 9])
    assert max_err(tail, full[:, :, 10:]) < 1e-12
    # without a carry the call's first row is sampled itself
    assert max_err(delta_correction(q[:, :, 10:], k, v, sparse[:, :, 10:], 4)[:, :, 0], dense[:, :, 10]) < 1e-12
