"""Combiner-Fixed (P283): factorized full attention. The probabilities over all keys sum to 1, every visible key
has a positive share, and they equal the reference's explicit factorization; known answers (block 1 and one
block covering everything are dense attention); gradients, grouped heads, offsets, bad inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from layer_checks import one_thread  # noqa: F401

from attnlab import ops
from attnlab.mechanisms.layers.combiner import combiner_probs
from attnlab.testing import grads, max_err, qkv

T, D = 23, 8


def _explicit_probs(q, k, **opts):
    """The reference's factorized p(j|i), read by applying it to one-hot values (v = identity)."""
    B, Hkv, Tk = k.shape[0], k.shape[1], k.shape[2]
    eye = torch.eye(Tk, dtype=torch.float64).expand(B, Hkv, Tk, Tk)
    return ops.reference("combiner", q, k, eye, q_offset=opts.pop("q_offset", None), **opts)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("pool", ["max", "mean"])
@pytest.mark.parametrize("block", [4, 5])
def test_probabilities_sum_to_one_and_equal_the_explicit_factorization(causal, pool, block):
    q, k, _ = qkv(1, 4, 2, T, D=D, requires_grad=False)
    p = combiner_probs(q, k, scale=D**-0.5, causal=causal, block=block, pool=pool)
    assert torch.allclose(p.sum(-1), torch.ones(1, 4, T, dtype=torch.float64), atol=1e-12)
    visible = torch.ones(T, T, dtype=torch.bool)
    if causal:
        visible = visible.tril()
    assert bool((p[..., visible] > 0).all())  # full attention: every visible key is reachable
    assert bool((p[..., ~visible] == 0).all())
    ref = _explicit_probs(q, k, causal=causal, block=block, pool=pool)
    assert max_err(p, ref) < 1e-12


def test_direct_block_is_plain_softmax_mass_and_other_blocks_are_spread():
    """Inside the own block the ratio of two keys' probabilities is exp(s_ij - s_ij'); inside an abstracted block
    it is the in-span distribution, independent of the query."""
    q, k, _ = qkv(1, 1, 1, 12, D=D, requires_grad=False, seed=3)
    p = combiner_probs(q, k, scale=D**-0.5, causal=True, block=4)
    s = (q[0, 0] @ k[0, 0].T) * D**-0.5
    i = 11  # block 2 (8..11); blocks 0 and 1 abstracted
    assert torch.allclose(p[0, 0, i, 9] / p[0, 0, i, 8], torch.exp(s[i, 9] - s[i, 8]))
    ratio_a = p[0, 0, 10, :4] / p[0, 0, 10, :4].sum()
    ratio_b = p[0, 0, 11, :4] / p[0, 0, 11, :4].sum()
    assert torch.allclose(ratio_a, ratio_b)  # r_c(j) does not depend on the query
    assert not torch.allclose(ratio_a, torch.full((4,), 0.25, dtype=torch.float64))


@pytest.mark.parametrize("causal", [True, False])
def test_known_answers_equal_dense_attention(causal):
    q, k, v = qkv(2, 4, 2, T, D=D, requires_grad=False, seed=1)
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    for block in (1, T, 64):  # every key its own block (abstraction == the key), or one block with everything
        out = ops.get("combiner")(q, k, v, causal=causal, block=block)
        assert max_err(out, dense) < 1e-12, block
    assert max_err(ops.get("combiner")(q, k, v, causal=causal, block=4), dense) > 1e-3


@pytest.mark.parametrize("causal", [True, False])
def test_fast_path_float32_and_gradients_against_reference(causal):
    sq = torch.randn(4, D, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    opts = dict(causal=causal, block=5, pool="max", span_query=sq)
    q, k, v = qkv(2, 4, 2, T, D=D, seed=2)
    out = ops.get("combiner")(q, k, v, **opts)
    ref = ops.reference("combiner", q, k, v, **opts)
    assert max_err(out, ref) < 1e-12
    assert max_err(grads(out, (q, k, v)), grads(ref, (q, k, v))) < 1e-10
    q32, k32, v32 = (t.detach().float() for t in (q, k, v))
    out32 = ops.get("combiner")(q32, k32, v32, **{**opts, "span_query": sq.float()})
    assert out32.dtype == torch.float32 and max_err(out32, ref) < 1e-5
    # the learned in-span vector changes the result
    assert max_err(ops.get("combiner")(q, k, v, causal=causal, block=5), out) > 1e-4


def test_suffix_rows_with_an_offset_equal_the_full_forward():
    q, k, v = qkv(1, 2, 2, T, D=D, requires_grad=False, seed=4)
    full = ops.get("combiner")(q, k, v, block=4)
    for start in (7, 8, 22):
        part = ops.get("combiner")(q[:, :, start:], k, v, block=4, q_offset=start)
        assert max_err(part, full[:, :, start:]) < 1e-12


def test_bad_inputs_fail_naming_them():
    q, k, v = qkv(1, 2, 1, 8, D=D, requires_grad=False)
    op = ops.get("combiner")
    with pytest.raises(ValueError, match="block"):
        op(q, k, v, block=0)
    with pytest.raises(ValueError, match="pool"):
        op(q, k, v, pool="avg")
    with pytest.raises(ValueError, match="span_query"):
        op(q, k, v, span_query=torch.zeros(3, D, dtype=torch.float64))
    with pytest.raises(ValueError, match="mask"):
        op(q, k, v, mask=torch.ones(1, 1, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="kv_len"):
        op(q, k[:, :, :5], v[:, :, :5], q_offset=0)


# ---- Axial and Logsparse factorizations ------------------------------------------------------------------------


@pytest.mark.parametrize("factorization", ["axial", "logsparse"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("pool", ["max", "mean"])
@pytest.mark.parametrize("block", [3, 4])
def test_factorizations_are_full_attention_equal_to_the_explicit_loops(factorization, causal, pool, block):
    q, k, _ = qkv(1, 4, 2, T, D=D, requires_grad=False, seed=7)
    opts = dict(causal=causal, block=block, pool=pool, factorization=factorization)
    p = combiner_probs(q, k, scale=D**-0.5, **opts)
    assert torch.allclose(p.sum(-1), torch.ones(1, 4, T, dtype=torch.float64), atol=1e-12)
    visible = torch.ones(T, T, dtype=torch.bool)
    if causal:
        visible = visible.tril()
    assert bool((p[..., visible] > 0).all()) and bool((p[..., ~visible] == 0).all())
    assert max_err(p, _explicit_probs(q, k, **opts)) < 1e-12
    assert max_err(p, combiner_probs(q, k, scale=D**-0.5, **{**opts, "factorization": "fixed"})) > 1e-4


def test_axial_own_row_direct_and_one_abstraction_per_column():
    """Rows of 4: query 13 (row 3, column 1) sees keys 12, 13 directly; column c's earlier keys (c, c+4, c+8)
    share one abstraction whose members keep the query-independent in-span ratios."""
    q, k, _ = qkv(1, 1, 1, 16, D=D, requires_grad=False, seed=8)
    p = combiner_probs(q, k, scale=D**-0.5, block=4, factorization="axial")[0, 0]
    s = (q[0, 0] @ k[0, 0].T) * D**-0.5
    assert torch.allclose(p[13, 13] / p[13, 12], torch.exp(s[13, 13] - s[13, 12]))
    for c in range(4):
        col = [c, c + 4, c + 8]
        a, b = p[13, col] / p[13, col].sum(), p[14, col] / p[14, col].sum()
        assert torch.allclose(a, b)  # same span for every query of row 3
    # row 2 (query 9) abstracts only rows 0, 1: the in-span shares of column 1 differ from row 3's
    assert not torch.allclose(p[9, [1, 5]] / p[9, [1, 5]].sum(), p[13, [1, 5]] / p[13, [1, 5]].sum())


def test_logsparse_spans_tile_the_past_with_geometric_sizes():
    import math

    from attnlab.mechanisms.layers.combiner import logsparse_spans

    for nb in (1, 7, 16, 37, 100):
        for causal in (True, False):
            for b, spans in enumerate(logsparse_spans(nb, causal)):
                blocks = []
                for lv, idx in spans:
                    blocks += list(range(idx << lv, (idx + 1) << lv))
                want = [c for c in range(nb) if (c < b if causal else c != b)]
                assert sorted(blocks) == want and len(blocks) == len(set(blocks))  # a partition of the others
                left = [lv for lv, idx in spans if (idx << lv) < b]
                assert all(left[t] <= t for t in range(len(left)))  # the t-th nearest span has <= 2^t blocks
    for nb in range(2, 600):  # O(log nb) spans per row: <= log2(nb) + 1 causal, <= 3 log2(nb) bidirectional
        assert max(map(len, logsparse_spans(nb, True))) <= math.log2(nb) + 1
        assert max(map(len, logsparse_spans(nb, False))) <= 3 * math.log2(nb)
    assert logsparse_spans(16, True)[8] == ((0, 7), (0, 6), (1, 2), (2, 0))  # blocks 7 | 6 | 4-5 | 0-3


@pytest.mark.parametrize("factorization", ["axial", "logsparse"])
@pytest.mark.parametrize("causal", [True, False])
def test_factorizations_fast_path_and_gradients_against_reference(factorization, causal):
    sq = torch.randn(4, D, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    q, k, v = qkv(2, 4, 2, T, D=D, seed=10)
    for span_query in (None, sq):
        opts = dict(causal=causal, block=4, pool="max", span_query=span_query, factorization=factorization)
        out = ops.get("combiner")(q, k, v, **opts)
        ref = ops.reference("combiner", q, k, v, **opts)
        assert max_err(out, ref) < 1e-12
        assert max_err(grads(out, (q, k, v)), grads(ref, (q, k, v))) < 1e-10
    q32, k32, v32 = (t.detach().float() for t in (q, k, v))
    out32 = ops.get("combiner")(q32, k32, v32, causal=causal, block=4, factorization=factorization)
    ref = ops.reference("combiner", q, k, v, causal=causal, block=4, factorization=factorization)
    assert out32.dtype == torch.float32 and max_err(out32, ref) < 1e-5


@pytest.mark.parametrize("factorization", ["axial", "logsparse"])
def test_factorizations_known_answers_and_decoding(factorization):
    q, k, v = qkv(1, 2, 2, T, D=D, requires_grad=False, seed=11)
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    op = ops.get("combiner")
    assert max_err(op(q, k, v, block=T, factorization=factorization), dense) < 1e-12  # one block: dense
    full = op(q, k, v, block=4, factorization=factorization)
    for start in (5, 8, 22):  # suffix rows at an offset over the keys so far = the full forward (decode)
        part = op(q[:, :, start : start + 1], k[:, :, : start + 1], v[:, :, : start + 1], block=4,
                  factorization=factorization, q_offset=start)
        assert max_err(part, full[:, :, start : start + 1]) < 1e-12


def test_factorization_layer_and_bad_value():
    from attnlab.mechanisms.registry import build

    x = torch.randn(1, 11, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    for factorization in ("axial", "logsparse"):
        layer = build("combiner", dim=16, heads=2, kv_heads=1, block=3, factorization=factorization).double()
        full = layer(x)
        assert max_err(full, layer.reference(x)) < 1e-12
        cache = layer.init_cache()  # prefill 4 positions, then one token at a time with the KV cache
        steps = [layer(x[:, :4], cache)] + [layer(x[:, i : i + 1], cache) for i in range(4, 11)]
        assert max_err(torch.cat(steps, 1), full) < 1e-12
    with pytest.raises(ValueError, match="factorization"):
        build("combiner", dim=16, heads=2, factorization="strided")
    q, k, v = qkv(1, 2, 1, 8, D=D, requires_grad=False)
    with pytest.raises(ValueError, match="factorization"):
        ops.get("combiner")(q, k, v, factorization="axis")
