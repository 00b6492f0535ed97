"""Sparse Attention Decomposition (A168): exact sums against the model's own scores, the SVD against a dense
brute force, and the planted induction circuit (its K-side signal comes from the previous-token head); Gemma 3
(q/k norms, sandwich norms, scaled embedding) and Qwen2 (q/k biases) against float64 scores and a forward pass
written here from the weights."""

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
    with pytest.raises(ValueError, match="soft-capping"):
        sparse_attention_decomposition(tiny("gemma3", attn_logit_softcapping=30.0), ids, 1, 0)


# ---------------------------------------------------------------------------------------------------------
# Gemma 3 and Qwen2: random norm gains and biases (the tiny models start at gain 1, bias 0), float64
# ---------------------------------------------------------------------------------------------------------
def _randomized(family: str, **extra):
    model = tiny(family, **extra).double()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):  # Gemma's gain is 1 + w: move w off zero
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def gemma3():
    return _randomized("gemma3", num_hidden_layers=3,
                       layer_types=["sliding_attention", "full_attention", "sliding_attention"])


CASES = [("gemma3", 1, 2), ("gemma3", 2, 1), ("qwen2", 1, 3), ("llama_bias", 1, 0)]


@pytest.mark.parametrize("family,layer,head", CASES)
def test_terms_sum_to_float64_scores_and_parts_to_signals(family, layer, head):
    """llama_bias: Llama with ``attention_bias`` (q/k/v and o_proj biases: the ``L0bias`` part)."""
    model = (gemma3() if family == "gemma3" else _randomized("llama", attention_bias=True)
             if family == "llama_bias" else _randomized(family))
    T = 12
    ids = torch.randint(0, 97, (1, T), generator=torch.Generator().manual_seed(2))
    r = sparse_attention_decomposition(model, ids, layer, head, top=3)
    _, cache = hf.run_with_cache(model, ids, [f"blocks.{layer}.attn.scores"], rows=(0, T))
    sc = cache[f"blocks.{layer}.attn.scores"][0, head]
    assert sc.dtype == torch.float64
    # (1) the terms sum to the model's own score at every traced pair (the models' RMSNorms, and RoPE's cos/sin,
    # compute in float32 inside even a float64 model, so the model's own score carries float32 rounding)
    tol = 1e-5 if family == "gemma3" else 1e-6
    torch.testing.assert_close(r.scores, sc[r.rows, r.keys], atol=tol, rtol=tol)
    torch.testing.assert_close(r.terms, model.model.layers[layer].self_attn.scaling * r.sigma * r.query_signal
                               * r.key_signal)
    # (2) upstream parts sum to each top direction's signals, and through every direction to the score
    torch.testing.assert_close(r.key_dir.sum(1), r.key_signal.gather(1, r.top_dirs))
    torch.testing.assert_close(r.query_dir.sum(1), r.query_signal.gather(1, r.top_dirs))
    for side in ("key_all", "query_all"):
        torch.testing.assert_close(getattr(r, side).sum(-1), r.scores)
    top3 = r.terms.gather(1, r.top_dirs).sum(-1)
    torch.testing.assert_close(r.key_top.sum(-1), top3)
    torch.testing.assert_close(r.query_top.sum(-1), top3)
    heads = [f"L{lp}H{h}" for lp in range(layer) for h in range(4)]
    assert r.parts[0] == "embed" and all(h in r.parts for h in heads) and f"mlp{layer - 1}" in r.parts
    assert (r.parts[-1] == "bias") == (family != "gemma3")
    assert ("L0bias" in r.parts) == (family == "llama_bias")
    assert r.sigma.shape[1] == 8  # rank <= head_dim, also in homogeneous coordinates


def _rope(x: torch.Tensor, pos: torch.Tensor, base: float) -> torch.Tensor:
    """Rotate-half RoPE of ``x (T, D)`` at absolute positions ``pos (T,)``, written here."""
    D = x.shape[-1]
    inv = base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = pos.double().view(-1, 1) * inv.view(1, -1)
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def _rms(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def test_gemma3_brute_force_score_and_head_parts():
    """Layer 0 of Gemma 3 written out from the weights (scaled embedding, input norm, q/k norms, RoPE, the
    sliding mask, softmax, o_proj, post-attention norm); then layer 1's score of one pair and the share of one
    layer-0 head through the key, compared with the decomposition."""
    model, layer, head, T = gemma3(), 1, 2, 10
    ids = torch.randint(0, 97, (1, T), generator=torch.Generator().manual_seed(4))
    r = sparse_attention_decomposition(model, ids, layer, head, keys=3, rows=slice(5, 8))
    L = model.model.layers
    d, H, D, scale = 32, 4, 8, 32 ** -0.5
    pos = torch.arange(T)

    def qk(lay, x, base):
        a = lay.self_attn
        q = (x @ a.q_proj.weight.T).view(T, H, D)
        k = (x @ a.k_proj.weight.T).view(T, 2, D)
        q = q / _rms(q) * (1 + a.q_norm.weight)
        k = k / _rms(k) * (1 + a.k_norm.weight)
        rot = [_rope(q[:, h], pos, base) for h in range(H)], [_rope(k[:, h], pos, base) for h in range(2)]
        return rot

    with torch.no_grad():
        e = model.model.embed_tokens.weight[ids[0]] * d ** 0.5
        x0 = e / _rms(e) * (1 + L[0].input_layernorm.weight)
        qs, ks = qk(L[0], x0, 1e4)
        v = (x0 @ L[0].self_attn.v_proj.weight.T).view(T, 2, D)
        i_, j_ = pos.view(-1, 1), pos.view(1, -1)
        allowed = (j_ <= i_) & (i_ - j_ < 4)
        wo = L[0].self_attn.o_proj.weight.view(d, H, D)
        o_h = []
        for h in range(H):
            s = (qs[h] @ ks[h // 2].T * scale).masked_fill(~allowed, float("-inf")).softmax(-1)
            o_h.append((s @ v[:, h // 2]) @ wo[:, h].T)  # (T, d)
        o = sum(o_h)
        part = [(1 + L[0].post_attention_layernorm.weight) * oh / _rms(o) for oh in o_h]
        resid = model(ids, output_hidden_states=True).hidden_states[1][0]  # entering layer 1
        torch.testing.assert_close(e + sum(part) + (resid - e - sum(part)), resid)
        gin = (1 + L[1].input_layernorm.weight) / _rms(resid)
        x1 = resid * gin
        qs1, ks1 = qk(L[1], x1, 1e6)
        a1 = L[1].self_attn
        for n, i in enumerate(range(5, 8)):
            j = 3
            # Gemma's RMSNorm runs in float32 inside the model (the residual and head outputs we read)
            assert float(r.scores[n]) == pytest.approx(float(scale * qs1[head][i] @ ks1[head // 2][j]), rel=1e-5)
            # key side, part L0H1: k of that part alone, with the key's own 1/rms(W_K x_j) and gain
            kfull = (x1[j] @ a1.k_proj.weight.T).view(2, D)[head // 2]
            kp = (part[1][j] * gin[j] @ a1.k_proj.weight.T).view(2, D)[head // 2]
            kp = kp / _rms(kfull) * (1 + a1.k_norm.weight)
            kp = _rope(kp.view(1, D), torch.tensor([j]), 1e6)[0]
            want = float(scale * qs1[head][i] @ kp)
            assert float(r.key_all[n, r.parts.index("L0H1")]) == pytest.approx(want, rel=1e-5, abs=1e-9)


def test_qwen2_brute_force_score_and_bias_part():
    """Qwen2 layer 1 from the model's residual and the weights (biases included); the ``bias`` part's share
    through the key is the query against the rotated key bias alone."""
    model, layer, head, T = _randomized("qwen2"), 1, 3, 9
    ids = torch.randint(0, 97, (1, T), generator=torch.Generator().manual_seed(5))
    r = sparse_attention_decomposition(model, ids, layer, head, keys=2, rows=slice(4, 7))
    a = model.model.layers[1].self_attn
    D = 8
    with torch.no_grad():
        resid = model(ids, output_hidden_states=True).hidden_states[1][0]
        x = resid / _rms(resid) * model.model.layers[1].input_layernorm.weight
        q = (x @ a.q_proj.weight.T + a.q_proj.bias).view(T, 4, D)[:, head]
        k = (x @ a.k_proj.weight.T + a.k_proj.bias).view(T, 2, D)[:, head // 2]
        q, k = _rope(q, torch.arange(T), 1e4), _rope(k, torch.arange(T), 1e4)
        kb = _rope(a.k_proj.bias.view(2, D)[head // 2].view(1, D), torch.tensor([2]), 1e4)[0]
        for n, i in enumerate(range(4, 7)):
            # float32 inside the model: its RMSNorm and RoPE's cos/sin
            assert float(r.scores[n]) == pytest.approx(float(D ** -0.5 * q[i] @ k[2]), rel=1e-6)
            want = float(D ** -0.5 * q[i] @ kb)
            assert float(r.key_all[n, r.parts.index("bias")]) == pytest.approx(want, rel=1e-6)


def test_o_proj_bias_is_its_own_part():
    """Llama with ``attention_bias``: layer 0's ``o_proj`` bias written to the residual, normalized by layer 1's
    input norm, read through layer 1's key projection (no k bias: that is the ``bias`` part)."""
    model, head, T = _randomized("llama", attention_bias=True), 0, 8
    ids = torch.randint(0, 97, (1, T), generator=torch.Generator().manual_seed(6))
    r = sparse_attention_decomposition(model, ids, 1, head, keys=1, rows=slice(3, 6))
    a, base = model.model.layers[1].self_attn, model.config.rope_parameters["rope_theta"]
    D = 8
    with torch.no_grad():
        resid = model(ids, output_hidden_states=True).hidden_states[1][0]
        gin = model.model.layers[1].input_layernorm.weight / _rms(resid)
        q = ((resid * gin) @ a.q_proj.weight.T + a.q_proj.bias).view(T, 4, D)[:, head]
        q = _rope(q, torch.arange(T), base)
        ob = model.model.layers[0].self_attn.o_proj.bias
        kp = ((ob * gin[1]) @ a.k_proj.weight.T).view(2, D)[head // 2]
        kp = _rope(kp.view(1, D), torch.tensor([1]), base)[0]
        for n, i in enumerate(range(3, 6)):
            want = float(D ** -0.5 * q[i] @ kp)
            assert float(r.key_all[n, r.parts.index("L0bias")]) == pytest.approx(want, rel=1e-6)
