"""Sparse Attention Decomposition (A168): exact sums against the model's own scores, the SVD against a dense
brute force, and the planted induction circuit (its K-side signal comes from the previous-token head)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from hf_tiny import tiny  # noqa: E402
from test_causal import IND_HEAD, PREV_HEAD, induction_data, planted  # noqa: E402

from attnlab.inspect.sad import factored_svd, n_sparse, rotate, sparse_attention_decomposition  # noqa: E402
from attnlab.models import hf  # noqa: E402

torch.set_num_threads(1)


def test_factored_svd_and_rotation_brute_force():
    g = torch.Generator().manual_seed(0)
    left, right = torch.randn(12, 4, generator=g, dtype=torch.float64), torch.randn(4, 12, generator=g, dtype=torch.float64)
    U, S, V = factored_svd(left, right)
    torch.testing.assert_close(U @ torch.diag(S) @ V.T, left @ right)
    torch.testing.assert_close(S, torch.linalg.svdvals(left @ right)[:4])
    torch.testing.assert_close(U.T @ U, torch.eye(4, dtype=torch.float64))
    # rotate: (R_i q) . (R_j k) = q . (R_{j-i} k), with R_p the RoPE rotation at position p
    freqs = torch.tensor([1.0, 0.3], dtype=torch.float64)
    q, k = torch.randn(4, 1, generator=g, dtype=torch.float64), torch.randn(4, 1, generator=g, dtype=torch.float64)
    lhs = (rotate(q, 5, freqs) * rotate(k, 9, freqs)).sum()
    assert float(lhs) == pytest.approx(float((q * rotate(k, 4, freqs)).sum()))
    assert n_sparse(torch.tensor([[5.0, -4.0, 0.5, 0.5]])).tolist() == [2]
    assert n_sparse(torch.tensor([[1.0, 1.0, 1.0, 1.0]]), mass=0.5).tolist() == [2]


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_terms_and_parts_sum_to_the_models_scores(family):
    model = tiny(family)
    T = 14
    ids = torch.randint(0, 97, (1, T), generator=torch.Generator().manual_seed(1))
    r = sparse_attention_decomposition(model, ids, 1, 3, top=2)
    _, cache = hf.run_with_cache(model, ids, ["blocks.1.attn.scores", "blocks.1.attn.weights"], rows=(0, T))
    sc, w = cache["blocks.1.attn.scores"][0, 3].double(), cache["blocks.1.attn.weights"][0, 3]
    assert r.keys.tolist() == w[1:].argmax(-1).tolist() and r.rows.tolist() == list(range(1, T))
    torch.testing.assert_close(r.scores, sc[r.rows, r.keys], atol=1e-5, rtol=1e-5)
    for side in ("key_all", "query_all"):  # every upstream part, every direction: the whole score
        torch.testing.assert_close(getattr(r, side).sum(-1), r.scores)
    top2 = r.terms.gather(1, r.terms.abs().argsort(1, descending=True)[:, :2]).sum(-1)
    torch.testing.assert_close(r.key_top.sum(-1), top2)
    torch.testing.assert_close(r.query_top.sum(-1), top2)
    assert r.parts[0] == "embed" and r.parts[1:5] == ["L0H0", "L0H1", "L0H2", "L0H3"] and r.parts[-1] == "mlp0"
    ign = sparse_attention_decomposition(model, ids, 1, 3, keys=0, rope="ignore")
    assert (ign.keys == 0).all() and ign.rope == "ignore"


def test_planted_induction_head_reads_the_previous_token_head():
    model = planted()
    clean, _, _, _ = induction_data()
    r = sparse_attention_decomposition(model, clean, 1, IND_HEAD, rows=slice(9, 15))
    assert r.keys.tolist() == [i - 6 for i in range(9, 15)]  # the token after the first occurrence
    assert r.n_sparse.tolist() == [1] * 6  # one singular direction carries the score
    key_src, query_src = r.sources("key"), r.sources("query")
    assert key_src[0][0] == f"L0H{PREV_HEAD}" and abs(key_src[1][1]) < 1e-6 * key_src[0][1]
    assert query_src[0][0] == "embed" and abs(query_src[1][1]) < 1e-6 * query_src[0][1]


def test_bad_inputs():
    model = tiny("llama")
    ids = torch.randint(0, 97, (1, 8))
    with pytest.raises(ValueError, match="layer"):
        sparse_attention_decomposition(model, ids, 5, 0)
    with pytest.raises(ValueError, match="head"):
        sparse_attention_decomposition(model, ids, 1, 9)
    with pytest.raises(ValueError, match="rope"):
        sparse_attention_decomposition(model, ids, 1, 0, rope="absolute")
    with pytest.raises(ValueError, match="keys"):
        sparse_attention_decomposition(model, ids, 1, 0, keys=20)
    with pytest.raises(ValueError, match="after its query"):
        sparse_attention_decomposition(model, ids, 1, 0, keys=7, rows=slice(1, 4))
    with pytest.raises(ValueError, match="q/k"):
        sparse_attention_decomposition(tiny("gemma3"), ids, 1, 0)
    with pytest.raises(ValueError, match="bias"):
        sparse_attention_decomposition(tiny("qwen2"), ids, 1, 0)
