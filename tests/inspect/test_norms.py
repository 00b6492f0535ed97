"""Norm-based maps, collapse and massive activations: brute-force recomputation from the weights on tiny random
models, known answers on planted weights and activations, each stage's vectors summing to the model's own
activations (read with separate hooks), and clear errors on bad inputs."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from hf_tiny import VOCAB, tiny  # noqa: E402

from attnlab.inspect.norms import (  # noqa: E402
    STAGES,
    collapse,
    collapse_by_layer,
    find_massive,
    massive_intervention,
    massive_means,
    massive_sites,
    mixing_ratio,
    norm_maps,
)

T = 7


def _ids(batch: int = 1, n: int = T, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def _perturb(model, seed: int = 0, mlp_scale: float = 1.0):
    """Random norm gains (so that they matter) and, optionally, larger FF weights (so that the FF is far from
    linear over the path and Integrated Gradients has work to do)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() and p.dim() == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
            elif mlp_scale != 1.0 and any(k in name for k in ("gate_proj", "up_proj", "down_proj", "intermediate.dense",
                                                               "output.dense.weight")) and "attention" not in name:
                p.mul_(mlp_scale)
    return model


def _bert(act: str = "gelu", seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    return BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=64, hidden_act=act,
                                attn_implementation="eager")).eval()


# ---------------------------------------------------------------------------------------------------------
# brute force from the weights (row-vector convention, float64)
# ---------------------------------------------------------------------------------------------------------
def _rope(t: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate ``t (heads, T, D)`` by position (rotate-half convention), written from the RoPE formula."""
    D = t.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.arange(t.shape[1], dtype=torch.float64)[:, None] * inv[None]
    ang = torch.cat([ang, ang], -1)
    rot = torch.cat([-t[..., D // 2:], t[..., : D // 2]], -1)
    return t * ang.cos() + rot * ang.sin()


def _llama_by_hand(model, layer: int, x: torch.Tensor):
    """``(alpha (H, T, T), f (H, T, d))`` of one Llama layer on its input ``x (T, d)``, from the weights."""
    cfg = model.config
    lay = model.model.layers[layer]
    a = lay.self_attn
    H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    x = x.double()
    xn = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps) * lay.input_layernorm.weight.double()
    Tn = x.shape[0]
    q = (xn @ a.q_proj.weight.double().T).view(Tn, H, D).transpose(0, 1)
    k = (xn @ a.k_proj.weight.double().T).view(Tn, Hkv, D).transpose(0, 1)
    v = (xn @ a.v_proj.weight.double().T).view(Tn, Hkv, D).transpose(0, 1)
    theta = cfg.rope_parameters["rope_theta"]
    q, k = _rope(q, theta), _rope(k, theta)
    k, v = k.repeat_interleave(H // Hkv, 0), v.repeat_interleave(H // Hkv, 0)
    s = q @ k.transpose(-1, -2) / math.sqrt(D)
    s = s.masked_fill(torch.ones(Tn, Tn, dtype=torch.bool).triu(1), float("-inf"))
    alpha = s.softmax(-1)
    wo = a.o_proj.weight.double()  # (d, H * D)
    f = torch.stack([v[h] @ wo[:, h * D:(h + 1) * D].T for h in range(H)])
    return alpha, f


def _layer_inputs(model, ids):
    with torch.no_grad():
        return model(ids, output_hidden_states=True).hidden_states


def test_llama_maps_match_brute_force_from_the_weights():
    """Per-head maps alpha ||f||, and the ATB / ATB+RES / ATB+RES+LN maps, recomputed by hand (RMSNorm, RoPE,
    causal softmax, GQA, the o_proj slice, the frozen FF-input RMSNorm) on both layers of a tiny GQA Llama."""
    model = _perturb(tiny("llama"))
    ids = _ids(batch=2)
    hs = _layer_inputs(model, ids)
    got = norm_maps(model, ids, ffn=False)
    assert sorted(got) == [0, 1]
    for layer in (0, 1):
        r = got[layer]
        assert r.kind == "pre-norm" and set(r.maps) == {"attn", "attn_res", "attn_res_ln"}
        for b in range(2):
            x = hs[layer][b].double()
            alpha, f = _llama_by_hand(model, layer, x)
            assert torch.allclose(r.weights[b], alpha, atol=1e-5)
            assert torch.allclose(r.value_norms[b], f.norm(dim=-1), rtol=1e-5, atol=1e-6)
            heads = torch.stack([alpha[h] * f[h].norm(dim=-1)[None, :] for h in range(alpha.shape[0])])
            assert torch.allclose(r.heads[b], heads, rtol=1e-4, atol=1e-6)
            c = torch.zeros(T, T, x.shape[1], dtype=torch.float64)
            for i in range(T):
                for j in range(T):
                    c[i, j] = sum(alpha[h, i, j] * f[h, j] for h in range(alpha.shape[0]))
            assert torch.allclose(r.maps["attn"][b], c.norm(dim=-1), rtol=1e-4, atol=1e-6)
            for i in range(T):
                c[i, i] = c[i, i] + x[i]
            assert torch.allclose(r.maps["attn_res"][b], c.norm(dim=-1), rtol=1e-4, atol=1e-6)
            h = c.sum(1)  # the residual stream after attention (no o_proj bias in Llama)
            gain = model.model.layers[layer].post_attention_layernorm.weight.double()
            scale = 1.0 / torch.sqrt(h.pow(2).mean(-1) + model.config.rms_norm_eps)
            ln = c * gain * scale[:, None, None]
            assert torch.allclose(r.maps["attn_res_ln"][b], ln.norm(dim=-1), rtol=1e-4, atol=1e-6)


def test_bert_head_maps_match_brute_force_with_value_bias():
    """BERT: f^h(x) = (x W_V + b_V) W_O^h with the value bias, alpha from the model's own eager attentions."""
    model = _perturb(_bert())
    ids = _ids()
    with torch.no_grad():
        out = model(ids, output_hidden_states=True, output_attentions=True)
    r = norm_maps(model, ids, [1], ffn=False)[1]
    assert r.kind == "post-norm"
    sa = model.encoder.layer[1].attention
    x = out.hidden_states[1][0].double()
    H, D = 4, 8
    v = x @ sa.self.value.weight.double().T + sa.self.value.bias.double()
    wo = sa.output.dense.weight.double()
    f = torch.stack([v[:, h * D:(h + 1) * D] @ wo[:, h * D:(h + 1) * D].T for h in range(H)])
    alpha = out.attentions[1][0].double()
    assert torch.allclose(r.weights[0], alpha, atol=1e-5)
    assert torch.allclose(r.heads[0], alpha * f.norm(dim=-1)[:, None, :], rtol=1e-4, atol=1e-6)
    assert float(r.heads[0].triu(1).sum()) > 0  # bidirectional: keys after the query contribute


# ---------------------------------------------------------------------------------------------------------
# known answers
# ---------------------------------------------------------------------------------------------------------
def test_head_with_zero_output_projection_has_a_zero_map():
    model = tiny("llama")
    D = model.config.head_dim
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[:, 1 * D:2 * D] = 0.0
    r = norm_maps(model, _ids(), [0], ffn=False)[0]
    assert torch.count_nonzero(r.heads[:, 1]) == 0
    assert torch.count_nonzero(r.value_norms[:, 1]) == 0
    visible = torch.ones(T, T, dtype=torch.bool).tril()
    for h in (0, 2, 3):
        assert float(r.heads[0, h][visible].min()) > 0  # the other heads see every visible key


def test_identity_value_path_gives_alpha_times_normalized_input_norm():
    """One head with W_V = W_O = I and unit input-norm gain: the map is alpha_ij ||RMSNorm(x_j)||, with x the
    embeddings looked up by hand and alpha from the model's eager attention weights."""
    torch.manual_seed(0)
    d = 16
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=d, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=1, num_key_value_heads=1, head_dim=d,
                                         attn_implementation="eager")).eval()
    a = model.model.layers[0].self_attn
    with torch.no_grad():
        a.v_proj.weight.copy_(torch.eye(d))
        a.o_proj.weight.copy_(torch.eye(d))
        model.model.layers[0].input_layernorm.weight.fill_(1.0)
    ids = _ids()
    with torch.no_grad():
        alpha = model(ids, output_attentions=True).attentions[0][0, 0].double()
    e = model.model.embed_tokens.weight[ids[0]].double()
    xn = e / torch.sqrt(e.pow(2).mean(-1, keepdim=True) + model.config.rms_norm_eps)
    r = norm_maps(model, ids, ffn=False)[0]
    assert torch.allclose(r.heads[0, 0], alpha * xn.norm(dim=-1)[None, :], rtol=1e-5, atol=1e-7)
    assert torch.allclose(r.maps["attn"][0], r.heads[0, 0], atol=1e-12)  # one head: ATB = the head map


def test_mixing_ratio_known_answers():
    assert torch.equal(mixing_ratio(torch.eye(4)), torch.zeros(4))
    assert torch.allclose(mixing_ratio(torch.ones(2, 5, 5)), torch.full((2, 5), 0.8))
    m = torch.tensor([[1.0, 0.0], [3.0, 1.0]])
    assert torch.allclose(mixing_ratio(m), torch.tensor([0.0, 0.75]))
    with pytest.raises(ValueError, match="square"):
        mixing_ratio(torch.ones(3, 4))


# ---------------------------------------------------------------------------------------------------------
# the decomposition sums to the model's own activations
# ---------------------------------------------------------------------------------------------------------
def _grab(model, table):
    """Forward hooks of our own: name -> ('in' | 'out', module) -> the tensor the model computed."""
    seen, handles = {}, []
    for name, (where, mod) in table.items():
        if where == "in":
            handles.append(mod.register_forward_pre_hook(lambda m, a, name=name: seen.__setitem__(name, a[0])))
        else:
            handles.append(mod.register_forward_hook(
                lambda m, a, o, name=name: seen.__setitem__(name, o[0] if isinstance(o, tuple) else o)))
    return seen, handles


def _real(model, ids, table):
    seen, handles = _grab(model, table)
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in handles:
            h.remove()
    return {k: v.double() for k, v in seen.items()}


def _sum(r, stage):
    parts, const = r.vectors[stage]
    return parts.sum(2) + const


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_decoder_stages_sum_to_the_real_activations(family):
    """Every stage's vectors sum (over the input tokens, plus the constant) to what the model computed there;
    nothing flows from later tokens (causal); the FF's Integrated-Gradients error shrinks with the steps."""
    model = _perturb(tiny(family), mlp_scale=8.0)
    ids = _ids(batch=2)
    lay = model.model.layers[1]
    ff_norm = lay.pre_feedforward_layernorm if family == "gemma3" else lay.post_attention_layernorm
    real = _real(model, ids, {"h": ("in", ff_norm), "ln": ("out", ff_norm), "layer": ("out", lay)})
    errs = {}
    for steps in (2, 64):
        r = norm_maps(model, ids, [1], steps=steps, keep_vectors=True)[1]
        assert r.kind == ("sandwich" if family == "gemma3" else "pre-norm")
        assert tuple(s for s in STAGES if s in r.maps) == ("attn", "attn_res", "attn_res_ln", "ff", "ff_res")
        assert torch.allclose(_sum(r, "attn_res"), real["h"], atol=1e-5)
        assert torch.allclose(_sum(r, "attn_res_ln"), real["ln"], atol=1e-4)
        errs[steps] = float((_sum(r, "ff_res") - real["layer"]).abs().max())
        for stage, m in r.maps.items():
            assert m.shape == (2, T, T)
            assert float(m.triu(1).abs().max()) == 0.0, stage
        assert torch.equal(r.layer_map, r.maps["ff_res"])
    ff_size = float((real["layer"] - real["h"]).abs().max())
    assert errs[64] < 1e-3 * ff_size, (errs, ff_size)
    assert errs[2] > 20 * errs[64], errs  # the FF is non-linear here: a 2-point path is visibly worse


def test_bert_stages_sum_to_the_real_activations():
    model = _perturb(_bert(), mlp_scale=6.0)
    ids = _ids()
    lay = model.encoder.layer[0]
    real = _real(model, ids, {"ln1_in": ("in", lay.attention.output.LayerNorm),
                              "ln1": ("out", lay.attention.output.LayerNorm),
                              "ln2_in": ("in", lay.output.LayerNorm), "out": ("out", lay)})
    r = norm_maps(model, ids, [0], steps=64, keep_vectors=True)[0]
    assert tuple(s for s in STAGES if s in r.maps) == STAGES
    assert torch.allclose(_sum(r, "attn_res"), real["ln1_in"], atol=1e-5)
    assert torch.allclose(_sum(r, "attn_res_ln"), real["ln1"], atol=1e-5)
    scale = float(real["ln2_in"].abs().max())
    assert float((_sum(r, "ff_res") - real["ln2_in"]).abs().max()) < 1e-3 * scale
    assert float((_sum(r, "ff_res_ln") - real["out"]).abs().max()) < 1e-3
    assert torch.equal(r.layer_map, r.maps["ff_res_ln"])


def test_ff_split_in_row_chunks_equals_one_chunk(monkeypatch):
    from attnlab.inspect import norms

    model = _perturb(tiny("llama"), mlp_scale=8.0)
    ids = _ids(batch=2)
    whole = norm_maps(model, ids, [0], steps=8, keep_vectors=True)[0]
    monkeypatch.setattr(norms, "_FF_CHUNK", 2 * (T + 1) * 64 * 3)  # 3 query rows per chunk
    chunked = norm_maps(model, ids, [0], steps=8, keep_vectors=True)[0]
    for k in (0, 1):
        assert torch.allclose(whole.vectors["ff"][k], chunked.vectors["ff"][k], atol=1e-12)


def test_ff_with_linear_activation_is_exact():
    """Gated MLP with a linear activation is quadratic, h = (W_g z) * (W_u z): the path integral is linear in the
    path parameter, so one midpoint is exact: part p gets W_d ((W_g z_p) * (W_u z) + (W_g z) * (W_u z_p)) / 2."""
    model = _perturb(tiny("llama", hidden_act="linear"), mlp_scale=4.0)
    ids = _ids()
    r = norm_maps(model, ids, [0], steps=1, keep_vectors=True)[0]
    z, zc = r.vectors["attn_res_ln"]
    assert float(zc.abs().max()) == 0.0  # no biases anywhere: the FF input is the token parts alone
    mlp = model.model.layers[0].mlp
    wg, wu, wd = (m.weight.double() for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    zt = z.sum(2, keepdim=True)
    want = 0.5 * (((z @ wg.T) * (zt @ wu.T) + (zt @ wg.T) * (z @ wu.T)) @ wd.T)
    ff, ffc = r.vectors["ff"]
    assert torch.allclose(ff, want, atol=1e-10)
    assert float(ffc.abs().max()) == 0.0


def test_bert_ff_with_linear_activation_is_exact():
    """BERT with a linear activation: the FF is affine, part p gets W_2 W_1 z_p and the biases go to the
    constant."""
    model = _perturb(_bert(act="linear"))
    r = norm_maps(model, _ids(), [1], steps=1, keep_vectors=True)[1]
    z, zc = r.vectors["attn_res_ln"]
    lay = model.encoder.layer[1]
    w1, b1 = lay.intermediate.dense.weight.double(), lay.intermediate.dense.bias.double()
    w2, b2 = lay.output.dense.weight.double(), lay.output.dense.bias.double()
    ff, ffc = r.vectors["ff"]
    assert torch.allclose(ff, z @ w1.T @ w2.T, atol=1e-10)
    assert torch.allclose(ffc, (zc @ w1.T + b1) @ w2.T + b2, atol=1e-10)


def test_norm_maps_bad_inputs():
    model = tiny("llama")
    with pytest.raises(ValueError, match="integer token ids"):
        norm_maps(model, torch.zeros(1, 4))
    with pytest.raises(ValueError, match="integer token ids"):
        norm_maps(model, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="layers"):
        norm_maps(model, _ids(), [2])
    with pytest.raises(ValueError, match="steps"):
        norm_maps(model, _ids(), steps=0)
    model.model.layers[1].mlp = nn.Sequential(nn.Linear(32, 32))  # not a gated MLP
    with pytest.raises(ValueError, match="ffn=False"):
        norm_maps(model, _ids(), [1])
    assert set(norm_maps(model, _ids(), [1], ffn=False)[1].maps) == {"attn", "attn_res", "attn_res_ln"}
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=32)).eval()
    with pytest.raises(ValueError, match="norm maps support"):
        norm_maps(gpt2, _ids())


# ---------------------------------------------------------------------------------------------------------
# collapse
# ---------------------------------------------------------------------------------------------------------
def test_collapse_known_answers_and_brute_force():
    same = torch.randn(1, 32).expand(6, 32)
    cos, res, rel = collapse(same)
    assert abs(float(cos) - 1.0) < 1e-12 and float(res) < 1e-12 and float(rel) < 1e-12
    n = 5
    cos, res, rel = collapse(torch.eye(n))  # orthogonal tokens
    assert abs(float(cos)) < 1e-12
    assert abs(float(res) - math.sqrt(n - 1)) < 1e-12 and abs(float(rel) - math.sqrt((n - 1) / n)) < 1e-12
    x = torch.randn(3, 6, 16, generator=torch.Generator().manual_seed(0))
    cos, res, rel = collapse(x)
    for b in range(3):
        pairs = [torch.nn.functional.cosine_similarity(x[b, i], x[b, j], dim=0) for i in range(6) for j in range(6)
                 if i != j]
        assert abs(float(cos[b]) - float(sum(pairs) / len(pairs))) < 1e-6
        centered = x[b] - x[b].mean(0)
        assert abs(float(res[b]) - float(centered.norm())) < 1e-5
    sink = torch.cat([torch.randn(1, 32) * 100, same[:4]])  # a different first token, then identical ones
    assert float(collapse(sink)[0]) < 0.99 and abs(float(collapse(sink, skip=1)[0]) - 1.0) < 1e-12
    with pytest.raises(ValueError, match="at least 2 tokens"):
        collapse(torch.randn(3, 8), skip=2)
    with pytest.raises(ValueError, match="skip"):
        collapse(torch.randn(3, 8), skip=-1)


def test_collapse_by_layer_on_a_model():
    model = tiny("llama")
    ids = _ids(batch=2)
    c = collapse_by_layer(model, ids, skip=1)
    assert c.cosine.shape == c.residual.shape == c.relative.shape == (3, 2)
    emb = model.model.embed_tokens.weight[ids].detach()  # row 0: the embeddings, looked up by hand
    assert torch.allclose(c.cosine[0], collapse(emb, skip=1)[0], atol=1e-6)
    hs = _layer_inputs(model, ids)
    assert torch.allclose(c.residual[1], collapse(hs[1], skip=1)[1], rtol=1e-5)  # after block 0
    same = torch.full((1, 6), 5)  # one token repeated: every representation is identical at every depth
    assert torch.allclose(collapse_by_layer(model, same).cosine, torch.ones(3, 1, dtype=torch.float64), atol=1e-6)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        collapse_by_layer(model, _ids(n=2), skip=1)


# ---------------------------------------------------------------------------------------------------------
# massive activations
# ---------------------------------------------------------------------------------------------------------
def test_planted_activation_is_found_with_the_thresholds_as_arguments():
    h = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    h[3, 17] = -5000.0
    h[5, 2] = 400.0  # > 100 but only ~600x the median: not massive at ratio 1000
    sites = massive_sites(h, layer=4)
    assert [(s.layer, s.token, s.dim, s.value) for s in sites] == [(4, 3, 17, -5000.0)]
    assert [(s.token, s.dim) for s in massive_sites(h, ratio=100.0)] == [(3, 17), (5, 2)]
    assert massive_sites(h, min_abs=1e4) == []
    with pytest.raises(ValueError, match="thresholds"):
        massive_sites(h, ratio=-1.0)
    with pytest.raises(ValueError, match=r"\(T, d\)"):
        massive_sites(h[None])


def _planted_model(dim: int = 5, tok: int = 11, value: float = 3000.0):
    """Tiny Llama whose embedding of token ``tok`` carries ``value`` at ``dim``: the residual stream keeps it."""
    model = tiny("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[tok, dim] = value
    return model


def _ids_with(tok: int, at: int, n: int = 8, seed: int = 1) -> torch.Tensor:
    ids = torch.randint(12, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))
    ids[0, at] = tok
    return ids


def test_massive_activation_planted_in_the_model_is_found_and_zeroing_it_changes_the_loss():
    model = _planted_model()
    ids = _ids_with(11, at=2)
    rep = find_massive(model, ids)
    assert rep.layers() == [0, 1]
    assert {(s.token, s.dim) for s in rep.sites} == {(2, 5)}
    first = rep.first_sites()
    assert [(s.layer, s.token, s.dim) for s in first] == [(0, 2, 5)] and abs(first[0].value - 3000.0) < 5.0
    assert rep.summary[0]["count"] == 1 and rep.summary[0]["token"] == 2 and rep.summary[0]["dim"] == 5
    assert find_massive(model, ids, min_abs=5000.0).sites == ()

    iv = massive_intervention(model, ids, first, "zero")
    # brute force: the same edit with a hook of our own, and the loss computed by hand
    lay0 = model.model.layers[0]

    def zero(m, a, out):
        out = out.clone()
        out[0, 2, 5] = 0.0
        return out

    h = lay0.register_forward_hook(zero)
    try:
        with torch.no_grad():
            logits = model(ids).logits[0].double()
    finally:
        h.remove()
    with torch.no_grad():
        plain = model(ids).logits[0].double()

    def ce(lg):
        return float(-lg[:-1].log_softmax(-1).gather(1, ids[0, 1:, None]).mean())

    assert abs(iv.loss - ce(plain)) < 1e-5 and abs(iv.loss_intervened - ce(logits)) < 1e-5
    assert abs(iv.delta) > 1e-2
    assert abs(iv.perplexity - math.exp(iv.loss)) < 1e-9

    # mean over inputs that carry the same planted value at the same place: setting it to its mean is a no-op
    others = [_ids_with(11, at=2, seed=s) for s in (2, 3, 4)]
    means = massive_means(model, others, first)
    assert abs(float(means[0]) - first[0].value) < 5.0
    same = massive_intervention(model, ids, first, "mean", means)
    assert abs(same.delta) < 1e-3 * abs(iv.delta)


def test_massive_bad_inputs():
    model = _planted_model()
    ids = _ids_with(11, at=2)
    with pytest.raises(ValueError, match=r"\(1, T\)"):
        find_massive(model, ids.expand(2, -1))
    with pytest.raises(ValueError, match="mode"):
        massive_intervention(model, ids, [(0, 2, 5)], "half")
    with pytest.raises(ValueError, match="needs means"):
        massive_intervention(model, ids, [(0, 2, 5)], "mean")
    with pytest.raises(ValueError, match="2 means for 1 sites"):
        massive_intervention(model, ids, [(0, 2, 5)], "mean", [1.0, 2.0])
    with pytest.raises(ValueError, match="outside"):
        massive_intervention(model, ids, [(2, 2, 5)])
    with pytest.raises(ValueError, match="outside"):
        massive_intervention(model, ids, [(0, 8, 5)])
    with pytest.raises(ValueError, match="at least one"):
        massive_intervention(model, ids, [])
    with pytest.raises(ValueError, match="at least 2 tokens"):
        massive_intervention(model, ids[:, :1], [(0, 0, 5)])
    with pytest.raises(ValueError, match="at least one input"):
        massive_means(model, [], [(0, 2, 5)])
    with pytest.raises(ValueError, match="causal LM"):
        massive_intervention(_bert(), _ids(), [(0, 1, 3)])


# ---------------------------------------------------------------------------------------------------------
# one real model
# ---------------------------------------------------------------------------------------------------------
def test_smollm2_massive_activation_on_the_first_token(smollm2):
    """SmolLM2-135M: one massive activation (first token, one dimension) from the middle layers on; zeroing it
    where it emerges wrecks the next-token loss, its mean over other prompts leaves the loss unchanged (Sun et
    al.); the layer's norm-map vectors still sum to the layer's output."""
    model, tok = smollm2
    ids = tok("The quick brown fox jumps over the lazy dog. Paris is the capital of France, and",
              return_tensors="pt").input_ids
    rep = find_massive(model, ids)
    assert rep.sites and {s.token for s in rep.sites} == {0} and len({s.dim for s in rep.sites}) == 1
    assert max(abs(s.value) for s in rep.sites) > 1e4
    first = rep.first_sites()[:1]
    iv = massive_intervention(model, ids, first, "zero")
    means = massive_means(model, [tok("Water boils at one hundred degrees Celsius at sea level.",
                                      return_tensors="pt").input_ids], first)
    mean = massive_intervention(model, ids, first, "mean", means)
    assert iv.delta > 5.0 and abs(mean.delta) < 0.05, (iv, mean)

    layer = first[0].layer
    real = _real(model, ids, {"out": ("out", model.model.layers[layer])})["out"]
    r = norm_maps(model, ids, [layer], steps=16, keep_vectors=True)[layer]
    err = float((_sum(r, "ff_res") - real).abs().max())
    assert err < 1e-3 * float(real.abs().max()), err
