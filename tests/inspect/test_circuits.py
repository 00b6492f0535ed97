"""Weights-only circuits: the planted induction circuit's K-composition and copying, and float64 brute-force
references (full d x d matrices, row-vector convention) on tiny random GQA models."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from hf_tiny import tiny  # noqa: E402
from test_causal import IND_HEAD, PREV_HEAD, planted  # noqa: E402

from attnlab.inspect.circuits import (  # noqa: E402
    composition_scores,
    copying_score,
    copying_scores,
    ov_circuit,
    qk_circuit,
    svd_spectra,
)


def _random_gains(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _ref_mats(model, layer, head):
    """Row-vector convention (x @ W): QK = W_Q W_K^T and OV = W_V W_O, each (d, d), the input RMSNorm gain
    folded into W_Q / W_K / W_V (read from the parameter: Llama ``w``, Gemma ``1 + w``)."""
    cfg = model.config
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    lay = model.model.layers[layer]
    attn = lay.self_attn
    gemma = "Gemma" in type(model).__name__
    gain = lay.input_layernorm.weight.double() + (1.0 if gemma else 0.0)
    kvh = head // (H // Hkv)
    wq = attn.q_proj.weight.double()[head * D:(head + 1) * D] * gain  # (D, d)
    wk = attn.k_proj.weight.double()[kvh * D:(kvh + 1) * D] * gain
    wv = attn.v_proj.weight.double()[kvh * D:(kvh + 1) * D] * gain
    if getattr(attn, "q_norm", None) is not None:
        wq = wq * (attn.q_norm.weight.double() + (1.0 if gemma else 0.0)).view(-1, 1)
        wk = wk * (attn.k_norm.weight.double() + (1.0 if gemma else 0.0)).view(-1, 1)
    wo = attn.o_proj.weight.double()[:, head * D:(head + 1) * D]  # (d, D)
    return (wq.T @ wk).detach(), (wv.T @ wo.T).detach()


def _score(m):
    return torch.linalg.matrix_norm(m)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_circuits_match_full_matrices(family):
    model = _random_gains(tiny(family).double(), 7)
    for layer, head in ((0, 1), (1, 2), (1, 3)):
        qk_ref, ov_ref = _ref_mats(model, layer, head)
        qk, ov = qk_circuit(model, layer, head), ov_circuit(model, layer, head)
        torch.testing.assert_close(qk.full(), qk_ref)  # same d x d matrix in both conventions
        torch.testing.assert_close(ov.full(), ov_ref.T)  # column convention W_O W_V = (row OV)^T
        torch.testing.assert_close(qk.singular_values(), torch.linalg.svdvals(qk_ref)[: qk.left.shape[1]])
        torch.testing.assert_close(ov.singular_values(), torch.linalg.svdvals(ov_ref)[: ov.left.shape[1]])
        assert ov.frobenius() == pytest.approx(float(_score(ov_ref)), rel=1e-9)
    spec = svd_spectra(model)
    assert spec["qk"].shape == (2, 4, 8) and spec["ov"].shape == (2, 4, 8)
    torch.testing.assert_close(spec["ov"][1, 3], ov_circuit(model, 1, 3).singular_values())


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_composition_scores_brute_force(family):
    model = _random_gains(tiny(family).double(), 8)
    s = composition_scores(model)
    assert set(s) == {"q", "k", "v"} and s["k"].shape == (2, 4, 2, 4)
    for kind in "qkv":
        assert s[kind][1, :, :, :].abs().max() == 0 and s[kind][0, :, 0, :].abs().max() == 0  # only l1 < l2
    for h1 in range(4):
        _, ov1 = _ref_mats(model, 0, h1)
        for h2 in range(4):
            qk2, ov2 = _ref_mats(model, 1, h2)
            want = {  # TransformerLens-style row convention, full matrices
                "q": _score(ov1 @ qk2) / (_score(ov1) * _score(qk2)),
                "k": _score(qk2 @ ov1.T) / (_score(ov1) * _score(qk2)),
                "v": _score(ov1 @ ov2) / (_score(ov1) * _score(ov2)),
            }
            for kind, w in want.items():
                assert float(s[kind][0, h1, 1, h2]) == pytest.approx(float(w), rel=1e-8), (kind, h1, h2)


def test_planted_k_composition_is_the_top_pair():
    model = planted()
    s = composition_scores(model)
    k = s["k"]
    assert int(k.flatten().argmax()) == ((0 * 4 + PREV_HEAD) * 2 + 1) * 4 + IND_HEAD
    assert float(k[0, PREV_HEAD, 1, IND_HEAD]) == pytest.approx(0.25, abs=0.01)  # two rank-16 isometries: 1/4
    assert max(float(s["q"].max()), float(s["v"].max())) < 1e-9  # nothing else composes
    others = k.clone()
    others[0, PREV_HEAD, 1, IND_HEAD] = 0
    assert others.max() < 1e-9


def test_copying_scores():
    model = planted()
    c = copying_scores(model)
    assert c[1, IND_HEAD] == pytest.approx(1.0, abs=1e-9)  # copies the attended token into its logit
    assert torch.isnan(c[0, PREV_HEAD])  # writes nothing the unembedding reads
    assert copying_score(model, 1, IND_HEAD) == pytest.approx(float(c[1, IND_HEAD]))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_copying_score_brute_force(family):
    """Against the eigenvalues of the full vocab x vocab OV circuit, embeddings read from the embedding
    module itself (so Gemma's embedding scale is included independently)."""
    model = _random_gains(tiny(family).double(), 9)
    V = model.config.vocab_size
    with torch.no_grad():
        E = model.get_input_embeddings()(torch.arange(V).view(1, -1))[0].double()  # (V, d)
    U = model.lm_head.weight.double().detach()  # (V, d)
    for layer, head in ((0, 0), (1, 3)):
        _, ov = _ref_mats(model, layer, head)
        lam = torch.linalg.eigvals(E @ ov @ U.T)  # (V, V): token -> logits through the head
        want = float(lam.sum().real / lam.abs().sum())
        assert copying_score(model, layer, head) == pytest.approx(want, abs=1e-8)
        idx = torch.randperm(V, generator=torch.Generator().manual_seed(3))[:20]
        lam_s = torch.linalg.eigvals(E[idx] @ ov @ U[idx].T)
        want_s = float(lam_s.sum().real / lam_s.abs().sum())
        assert copying_score(model, layer, head, vocab=20, seed=3) == pytest.approx(want_s, abs=1e-8)


def test_bad_heads_raise():
    model = tiny("llama")
    with pytest.raises(ValueError, match="head"):
        qk_circuit(model, 0, 4)
    with pytest.raises(ValueError, match="layer"):
        ov_circuit(model, 2, 0)
