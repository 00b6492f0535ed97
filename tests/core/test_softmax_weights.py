"""The one masked softmax and the chunked weights generator against plain float64 formulas."""

from __future__ import annotations

import math

import pytest
import torch

from attnlab.core.patterns import Causal, Sinks, SlidingWindow
from attnlab.core.score_mods import ALiBi
from attnlab.core.softmax import grouped_apply, grouped_scores, masked_softmax, weights_chunks
from attnlab.testing import qkv


def _plain_weights(q, k, scale, allowed):
    """Row by row from the definition: exp(s_j) / sum_{allowed} exp(s_i); rows with no key are zero."""
    B, H, Tq, D = q.shape
    rep = H // k.shape[1]
    out = torch.zeros(B, H, Tq, k.shape[2], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(Tq):
                js = [j for j in range(k.shape[2]) if allowed[b if allowed.shape[0] > 1 else 0,
                                                              h if allowed.shape[1] > 1 else 0, i, j]]
                if not js:
                    continue
                s = [float(q[b, h, i] @ k[b, h // rep, j]) * scale for j in js]
                m = max(s)
                z = sum(math.exp(x - m) for x in s)
                for j, x in zip(js, s):
                    out[b, h, i, j] = math.exp(x - m) / z
    return out


def test_masked_softmax_zero_rows_and_known_values():
    s = torch.tensor([[0.0, math.log(3.0), 5.0]])
    m = torch.tensor([[True, True, False]])
    w = masked_softmax(s, m)
    assert torch.allclose(w, torch.tensor([[0.25, 0.75, 0.0]]))
    w0 = masked_softmax(s, torch.zeros_like(m))
    assert torch.equal(w0, torch.zeros_like(s)) and not torch.isnan(w0).any()


@pytest.mark.parametrize("rows", [1, 5, 64])
def test_weights_chunks_match_definition_gqa_pattern_and_free_mask(rows):
    q, k, _ = qkv(B=2, H=4, Hkv=2, Tq=7, Tk=11, D=8, requires_grad=False)
    pat = Causal() & (Sinks(1) | SlidingWindow(3))
    free = torch.rand(2, 1, 7, 11, generator=torch.Generator().manual_seed(3)) > 0.2
    allowed = pat.dense(7, 11, 4).unsqueeze(0) & free
    expect = _plain_weights(q, k, 0.3, allowed)
    got = torch.cat([w for _, w in weights_chunks(q, k, scale=0.3, q_offset=4, mask=free, pattern=pat, rows=rows)], 2)
    assert got.shape == expect.shape
    assert (got - expect).abs().max() < 1e-12


def test_weights_chunks_callable_mask_and_score_mod_match_reference():
    from attnlab.core.reference import reference_attention

    q, k, v = qkv(B=1, H=2, Tq=9, D=8, requires_grad=False)
    mod = ALiBi(2)
    starts = []

    def rows_mask(s, e):
        starts.append(s)
        return Causal().dense(e - s, 9, s).unsqueeze(0)

    got = torch.cat([w for _, w in weights_chunks(q, k, scale=0.25, mask=rows_mask, score_mod=mod, rows=4)], 2)
    _, ref = reference_attention(q, k, v, Causal(), mod, 0.25, 0, return_weights=True)
    assert starts == [0, 4, 8]
    assert (got - ref).abs().max() < 1e-12


@pytest.mark.parametrize("H,Hkv", [(6, 2), (4, 4), (3, 1)])
def test_grouped_scores_and_apply_match_per_head_loops(H, Hkv):
    # a row slice (non-contiguous query view, as weights_chunks passes) and a transposed-storage value
    g = torch.Generator().manual_seed(H * 10 + Hkv)
    q = torch.randn(2, H, 7, 5, generator=g, dtype=torch.float64)[:, :, 2:6]
    k = torch.randn(2, Hkv, 9, 5, generator=g, dtype=torch.float64)
    v = torch.randn(2, Hkv, 3, 9, generator=g, dtype=torch.float64).transpose(-1, -2)  # (2, Hkv, 9, 3)
    rep = H // Hkv
    s = grouped_scores(q, k)
    w = torch.softmax(s, -1)
    o = grouped_apply(w, v)
    assert s.shape == (2, H, 4, 9) and o.shape == (2, H, 4, 3)
    for b in range(2):
        for h in range(H):
            assert torch.allclose(s[b, h], q[b, h] @ k[b, h // rep].T)
            assert torch.allclose(o[b, h], w[b, h] @ v[b, h // rep])
