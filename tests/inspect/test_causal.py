"""Causal tools on a hand-built induction circuit (a real LlamaForCausalLM with planted weights) and brute-force
checks on tiny random models."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from hf_tiny import VOCAB, tiny  # noqa: E402

from attnlab.inspect.causal import (  # noqa: E402
    activation_patching,
    attention_knockout,
    direct_logit_attribution,
    knockout_effect,
    logit_lens,
    path_patching,
    path_patching_logits,
    path_patching_senders,
)
from attnlab.models import hf  # noqa: E402

# ---------------------------------------------------------------------------------------------------------
# the planted induction circuit
# ---------------------------------------------------------------------------------------------------------
# residual layout (d = 64): token one-hot [0, 16), previous-token one-hot [16, 32), output [32, 48), a constant 1
# at 48, junk0 [49, 56) (written by the layer-0 distractors), junk1 [56, 64) (never written).
NV, D_MODEL, HEAD_DIM, PREV_HEAD, IND_HEAD = 16, 64, 32, 0, 0
TOK, PREV, OUT, CONST, JUNK0, JUNK1 = 0, 16, 32, 48, 49, 56


def _content_dim(t: int) -> int:
    """Head dim carrying token t in the induction head: the low-frequency RoPE pairs 8..15 (rotation < 0.02
    over 20 positions, so content matching survives RoPE)."""
    return 8 + t // 2 + (HEAD_DIM // 2) * (t % 2)


def planted(seed: int = 0) -> LlamaForCausalLM:
    """2 layers, 4 heads, MLPs zeroed. Layer 0 head 0: previous-token head (RoPE-only pattern from the constant
    direction) copying the token into the PREV block; layer 1 head 0: induction head (query: current token,
    key: PREV block -> K-composition with layer 0 head 0), copying the attended token into OUT, which the
    unembedding reads. Other heads are random distractors that cannot compose with anything."""
    cfg = LlamaConfig(vocab_size=NV, hidden_size=D_MODEL, intermediate_size=8, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, head_dim=HEAD_DIM, max_position_embeddings=64,
                      rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=False,
                      attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    half = HEAD_DIM // 2
    theta = [1e6 ** (-p / half) for p in range(half)]
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for n in [model.model.norm] + [m for layer in model.model.layers
                                      for m in (layer.input_layernorm, layer.post_attention_layernorm)]:
            n.weight.fill_(1.0)
        emb = model.model.embed_tokens.weight
        for t in range(NV):
            emb[t, TOK + t] = 1.0
            emb[t, CONST] = 1.0
            model.lm_head.weight[t, OUT + t] = 1.0
        a0, a1 = model.model.layers[0].self_attn, model.model.layers[1].self_attn

        def rows(mod, h):
            return slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)

        # layer 0 head 0: score(i, j) ~ sum_p cos(theta_p (1 - (i - j))), peaked at j = i - 1
        A = 2.5
        for p in range(3):
            a0.q_proj.weight[p, CONST] = A
            a0.k_proj.weight[p, CONST] = A * math.cos(theta[p])
            a0.k_proj.weight[p + half, CONST] = A * math.sin(theta[p])
        x_hat = math.sqrt(D_MODEL / 2)  # RMSNorm of tok + const
        for t in range(NV):
            a0.v_proj.weight[t, TOK + t] = 1.0 / x_hat
            a0.o_proj.weight[PREV + t, t] = 1.0
        # layer 1 head 0: induction
        B = 3.0
        for t in range(NV):
            a1.q_proj.weight[_content_dim(t), TOK + t] = B
            a1.k_proj.weight[_content_dim(t), PREV + t] = B
            a1.v_proj.weight[t, TOK + t] = 1.0
            a1.o_proj.weight[OUT + t, t] = 1.0
        # distractors: layer 0 reads tok + const and writes junk0; layer 1 reads junk1 + const, writes OUT
        reads0 = list(range(TOK, TOK + NV)) + [CONST]
        reads1 = list(range(JUNK1, D_MODEL)) + [CONST]
        for h in (1, 2, 3):
            r = rows(None, h)
            for proj in (a0.q_proj, a0.k_proj, a0.v_proj):
                proj.weight[r, reads0] = torch.randn(HEAD_DIM, len(reads0), generator=g) * 0.5
            a0.o_proj.weight[JUNK0:JUNK1, r] = torch.randn(JUNK1 - JUNK0, HEAD_DIM, generator=g) * 0.005
            for proj in (a1.q_proj, a1.k_proj, a1.v_proj):
                proj.weight[r, reads1] = torch.randn(HEAD_DIM, len(reads1), generator=g) * 0.5
            a1.o_proj.weight[OUT:OUT + NV, r] = torch.randn(NV, HEAD_DIM, generator=g) * 0.005
    return model


BOS = NV - 1


def induction_data(seed: int = 0):
    """clean = [BOS, A, A], corrupt = [BOS, A', A] with A, A' disjoint (7 tokens each, never BOS), T = 15;
    the induction answer at the last position (14) is A[0] (position 8), whose key says "after A[6]"."""
    perm = torch.randperm(NV - 2, generator=torch.Generator().manual_seed(seed))
    a, a2 = perm[:7], perm[7:]
    bos = torch.tensor([BOS])
    clean = torch.cat([bos, a, a]).view(1, -1)
    corrupt = torch.cat([bos, a2, a]).view(1, -1)
    ans = int(a[0])

    def metric(logits):
        return float((logits[0, -1, ans] - logits[0, -1].mean()).detach())

    return clean, corrupt, ans, metric


@pytest.fixture(scope="module")
def circuit():
    return planted()


def test_planted_circuit_works(circuit):
    clean, corrupt, ans, metric = induction_data()
    _, cache = hf.run_with_cache(circuit, clean, ["blocks.0.attn.weights", "blocks.1.attn.weights"])
    prev = cache["blocks.0.attn.weights"].argmax[0, PREV_HEAD]
    assert prev.tolist() == [0] + list(range(14))  # previous-token head
    assert cache["blocks.0.attn.weights"].max[0, PREV_HEAD, 1:].min() > 0.99
    ind = cache["blocks.1.attn.weights"].argmax[0, IND_HEAD, 8:]
    assert ind.tolist() == list(range(2, 9))  # second copy attends the token after the previous occurrence
    assert cache["blocks.1.attn.weights"].max[0, IND_HEAD, 8:].min() > 0.99
    with torch.no_grad():
        logits = circuit(input_ids=clean).logits
    assert logits[0, 8:].argmax(-1).tolist() == clean[0, 2:9].tolist()  # it predicts the repeat
    assert metric(logits) > 3 and metric(circuit(input_ids=corrupt).logits) < 1


# ---------------------------------------------------------------------------------------------------------
# activation patching
# ---------------------------------------------------------------------------------------------------------
def test_activation_patching_finds_the_circuit(circuit):
    clean, corrupt, _, metric = induction_data()
    res = activation_patching(circuit, clean, corrupt, metric, points=("z",))
    e = res.effects["z"]
    assert e.shape == (2, 4)
    assert {idx for idx, _ in res.top("z", 2)} == {(0, PREV_HEAD), (1, IND_HEAD)}
    assert e[1, IND_HEAD] == pytest.approx(1.0, abs=0.02) and e[0, PREV_HEAD] > 0.9
    others = e.clone()
    others[0, PREV_HEAD] = others[1, IND_HEAD] = 0
    assert others.abs().max() < 0.05
    # per position: the previous-token head matters where it writes the key (position 8), the induction head
    # at the last position
    rp = activation_patching(circuit, clean, corrupt, metric, points=("z", "k", "q", "out"), positions=True,
                             batch=32)
    assert rp.effects["z"].shape == (2, 4, 15)
    assert rp.top("z", 2)[0][0] in {(0, PREV_HEAD, 8), (1, IND_HEAD, 14)}
    assert {idx for idx, _ in rp.top("z", 2)} == {(0, PREV_HEAD, 8), (1, IND_HEAD, 14)}
    assert rp.effects["k"][1, IND_HEAD, 8] > 0.9  # the matching key
    assert rp.effects["q"][1].abs().max() < 0.05  # queries carry nothing (the same tokens in both runs)
    assert rp.effects["out"].shape == (2, 15) and rp.effects["out"][1, 14] == pytest.approx(1.0, abs=0.05)
    # patching every head of a layer together
    rl = activation_patching(circuit, clean, corrupt, metric, heads=False, layers=[1])
    assert rl.effects["z"].shape == (1,) and rl.effects["z"][0] == pytest.approx(1.0, abs=1e-4)


def test_activation_patching_brute_force():
    """Each entry equals a hand-written single-slice patch (no batching, a plain hook)."""
    model = tiny("llama")
    g = torch.Generator().manual_seed(1)
    clean, corrupt = torch.randint(0, VOCAB, (1, 7), generator=g), torch.randint(0, VOCAB, (1, 7), generator=g)

    def metric(logits):
        return float(logits[0, -1, 3] - logits[0, -1, 5])

    res = activation_patching(model, clean, corrupt, metric, points=("z", "v"), positions=[2, -1], batch=5)
    with torch.no_grad():
        mc, mx = metric(model(input_ids=clean).logits), metric(model(input_ids=corrupt).logits)
        for point, nh in (("z", 4), ("v", 2)):
            for layer in range(2):
                name = f"blocks.{layer}.attn.{point}"
                _, cache = hf.run_with_cache(model, clean, [name])
                for h in range(nh):
                    for i, p in enumerate((2, 6)):
                        def fn(value, ctx, h=h, p=p, src=cache[name]):
                            value = value.clone()
                            value[:, h, p] = src[:, h, p]
                            return value
                        with hf.hooks(model, {name: fn}):
                            m = metric(model(input_ids=corrupt).logits)
                        assert res.effects[point][layer, h, i].item() == pytest.approx((m - mx) / (mc - mx), abs=1e-5)
    assert res.clean_metric == pytest.approx(mc) and res.corrupt_metric == pytest.approx(mx)
    # every head's z of a layer together == that layer's o_proj output (o_proj is linear, no bias)
    whole = activation_patching(model, clean, corrupt, metric, points=("z", "out"), heads=False, positions=True)
    assert whole.effects["z"].shape == whole.effects["out"].shape == (2, 7)
    torch.testing.assert_close(whole.effects["z"], whole.effects["out"], rtol=1e-4, atol=1e-4)


def test_activation_patching_rejects_bad_inputs(circuit):
    clean, corrupt, _, metric = induction_data()
    with pytest.raises(ValueError, match="points"):
        activation_patching(circuit, clean, corrupt, metric, points=("weights",))
    with pytest.raises(ValueError, match="shape"):
        activation_patching(circuit, clean, corrupt[:, :5], metric)
    with pytest.raises(ValueError, match="same"):
        activation_patching(circuit, clean, clean, metric)
    with pytest.raises(ValueError, match="layers"):
        activation_patching(circuit, clean, corrupt, metric, layers=[2])


# ---------------------------------------------------------------------------------------------------------
# path patching
# ---------------------------------------------------------------------------------------------------------
def test_path_patching_k_carries_q_does_not(circuit):
    clean, corrupt, _, metric = induction_data()
    s, r = [(0, PREV_HEAD)], [(1, IND_HEAD)]
    k = path_patching(circuit, clean, corrupt, metric, s, r, via="k")
    q = path_patching(circuit, clean, corrupt, metric, s, r, via="q")
    v = path_patching(circuit, clean, corrupt, metric, s, r, via="v")
    assert k.effect > 0.9
    assert abs(q.effect) < 0.02 and abs(v.effect) < 0.02
    assert k.patched == ((1, "k", IND_HEAD),)
    # a distractor sender carries nothing through the induction head's keys
    assert abs(path_patching(circuit, clean, corrupt, metric, [(0, 2)], r, via="k").effect) < 0.05
    with pytest.raises(ValueError, match="after"):
        path_patching(circuit, clean, corrupt, metric, [(1, 0)], [(0, 0)], via="k")
    with pytest.raises(ValueError, match="via"):
        path_patching(circuit, clean, corrupt, metric, s, r, via="z")


def test_path_patching_brute_force_gqa():
    """Independent implementation of the passes with plain hooks on a GQA model (4 query, 2 kv heads)."""
    model = tiny("llama")
    g = torch.Generator().manual_seed(2)
    clean, corrupt = torch.randint(0, VOCAB, (1, 6), generator=g), torch.randint(0, VOCAB, (1, 6), generator=g)

    def metric(logits):
        return float(logits[0, -1, 7])

    with torch.no_grad():
        mc, mx = metric(model(input_ids=clean).logits), metric(model(input_ids=corrupt).logits)
        zc = {i: hf.run_with_cache(model, clean, [f"blocks.{i}.attn.z"])[1][f"blocks.{i}.attn.z"] for i in range(2)}
        zx = {i: hf.run_with_cache(model, corrupt, [f"blocks.{i}.attn.z"])[1][f"blocks.{i}.attn.z"] for i in range(2)}
        for via, idx in (("q", 3), ("k", 1), ("v", 1)):  # query head 3 reads kv head 1
            def z0(value, ctx):
                out = zx[0].clone()
                out[:, 1] = zc[0][:, 1]  # sender (0, 1)
                return out

            seen = {}

            def grab(value, ctx, seen=seen):
                seen["x"] = value.clone()

            def z1(value, ctx):
                return zx[1]

            with hf.hooks(model, {"blocks.0.attn.z": z0, f"blocks.1.attn.{via}": grab, "blocks.1.attn.z": z1}):
                model(input_ids=corrupt)

            def put(value, ctx, idx=idx, seen=seen):
                value = value.clone()
                value[:, idx] = seen["x"][:, idx]
                return value

            with hf.hooks(model, {f"blocks.1.attn.{via}": put}):
                m = metric(model(input_ids=corrupt).logits)
            res = path_patching(model, clean, corrupt, metric, [(0, 1)], [(1, 3)], via=via)
            assert res.effect == pytest.approx((m - mx) / (mc - mx), abs=1e-6)
            assert res.patched == ((1, via, idx),)


def test_path_patching_to_logits_finds_only_the_direct_head(circuit):
    """The planted previous-token head acts only through the induction head's keys: activation patching of its
    z restores most of the gap, path patching to the logits (the induction head frozen) restores nothing, while
    the induction head, which writes the answer directly, keeps its full effect."""
    clean, corrupt, _, metric = induction_data()
    act = activation_patching(circuit, clean, corrupt, metric, points=("z",)).effects["z"]
    assert act[0, PREV_HEAD] > 0.8 and act[1, IND_HEAD] == pytest.approx(1.0, abs=0.02)
    for a, b in ((clean, corrupt), (corrupt, clean)):  # denoising, and noising (the ids swapped)
        res = path_patching_logits(circuit, a, b, metric, batch=3)
        e = res.effects["z"]
        assert e.shape == (2, 4) and res.layers == (0, 1) and res.positions is None
        assert e[1, IND_HEAD] == pytest.approx(1.0, abs=0.02)
        assert abs(float(e[0, PREV_HEAD])) < 0.02
        others = e.clone()
        others[1, IND_HEAD] = 0
        assert others.abs().max() < 0.02
        assert [idx for idx, _ in res.top("z", 1)] == [(1, IND_HEAD)]
    # a sender subset
    only0 = path_patching_logits(circuit, clean, corrupt, metric, layers=[0])
    assert only0.effects["z"].shape == (1, 4) and only0.effects["z"].abs().max() < 0.02


def test_path_patching_senders_equals_path_patching(circuit):
    """Every earlier head -> the receivers' q / k / v, batched (one recording pass + one pass per route per batch
    of senders), equals the one-sender :func:`path_patching` (itself checked by brute force above); on the planted
    circuit only the previous-token head reaches the induction head, and only through its keys."""
    clean, corrupt, _, metric = induction_data()
    for a, b in ((clean, corrupt), (corrupt, clean)):  # denoising, and noising
        res = path_patching_senders(circuit, a, b, metric, [(1, IND_HEAD)], batch=3)
        assert set(res.effects) == {"q", "k", "v"} and res.layers == (0,) and res.effects["k"].shape == (1, 4)
        for h in range(4):
            for via in ("q", "k", "v"):
                one = path_patching(circuit, a, b, metric, [(0, h)], [(1, IND_HEAD)], via=via)
                assert float(res.patched[via][0, h]) == pytest.approx(one.metric, rel=1e-5, abs=1e-5)
        e = torch.stack([res.effects[v][0] for v in ("q", "k", "v")])  # (route, head)
        assert e[1, PREV_HEAD] > 0.8
        e[1, PREV_HEAD] = 0
        assert e.abs().max() < 0.02


def test_path_patching_senders_gqa_and_layers():
    """GQA (4 query, 2 kv heads): the k / v routes patch the receivers' kv group; receivers in several layers get
    senders from every layer before the last one; each value equals the one-sender path_patching."""
    model = tiny("llama")
    g = torch.Generator().manual_seed(3)
    clean, corrupt = torch.randint(0, VOCAB, (1, 6), generator=g), torch.randint(0, VOCAB, (1, 6), generator=g)

    def metric(logits):
        return float(logits[0, -1, 5] - logits[0, -1, 9])

    res = path_patching_senders(model, clean, corrupt, metric, [(1, 3), (1, 2)], vias=("k", "q"), batch=5)
    assert set(res.effects) == {"k", "q"} and res.layers == (0,)
    for h in range(4):
        for via in ("k", "q"):
            one = path_patching(model, clean, corrupt, metric, [(0, h)], [(1, 3), (1, 2)], via=via)
            assert float(res.patched[via][0, h]) == pytest.approx(one.metric, rel=1e-5, abs=1e-6)
            assert float(res.effects[via][0, h]) == pytest.approx(one.effect, rel=1e-4, abs=1e-5)
    assert res.effects["k"].abs().max() > 1e-4  # the routes carry something here, so the equality means something


def test_path_patching_senders_rejects_bad_inputs(circuit):
    clean, corrupt, _, metric = induction_data()
    with pytest.raises(ValueError, match="layer 0"):
        path_patching_senders(circuit, clean, corrupt, metric, [(0, PREV_HEAD)])
    with pytest.raises(ValueError, match="receivers"):
        path_patching_senders(circuit, clean, corrupt, metric, [])
    with pytest.raises(ValueError, match="not a head"):
        path_patching_senders(circuit, clean, corrupt, metric, [(1, 4)])
    with pytest.raises(ValueError, match="vias"):
        path_patching_senders(circuit, clean, corrupt, metric, [(1, 0)], vias=("z",))
    with pytest.raises(ValueError, match="vias"):
        path_patching_senders(circuit, clean, corrupt, metric, [(1, 0)], vias=("k", "k"))
    with pytest.raises(ValueError, match="batch"):
        path_patching_senders(circuit, clean, corrupt, metric, [(1, 0)], batch=0)
    with pytest.raises(ValueError, match="same"):
        path_patching_senders(circuit, clean, clean, metric, [(1, 0)])
    with pytest.raises(ValueError, match="shape"):
        path_patching_senders(circuit, clean, corrupt[:, :5], metric, [(1, 0)])


def _o_proj_inputs(model, ids) -> list[Tensor]:
    """Each layer's o_proj input (1, T, H * Dv) from a plain forward (torch pre-hooks, not the seam)."""
    got: dict[int, Tensor] = {}
    handles = [layer.self_attn.o_proj.register_forward_pre_hook(
        lambda mod, args, i=i: got.__setitem__(i, args[0].detach().clone()))
        for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    return [got[i] for i in range(len(model.model.layers))]


def _frozen_forward(model, ids, zs: list[Tensor]) -> Tensor:
    """Logits with every attention output fixed to ``o_proj(zs[layer])``: embeddings, then per layer the frozen
    attention output added (through Gemma's post-attention norm) and the MLP recomputed, final norm, LM head."""
    base = model.model
    with torch.no_grad():
        x = base.embed_tokens(ids)
        for i, layer in enumerate(base.layers):
            a = layer.self_attn.o_proj(zs[i])
            if hasattr(layer, "pre_feedforward_layernorm"):  # Gemma 3 sandwich norms
                x = x + layer.post_attention_layernorm(a)
                x = x + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(x)))
            else:
                x = x + a
                x = x + layer.mlp(layer.post_attention_layernorm(x))
        return model.lm_head(base.norm(x))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_path_patching_to_logits_brute_force(family):
    """Each sender's raw metric equals a hand-written forward in which no attention is computed at all: every
    head's output is a constant (the corrupted run's, the sender's the clean run's), only MLPs and norms run."""
    model = tiny(family).double()
    g = torch.Generator().manual_seed(7)
    clean, corrupt = torch.randint(0, VOCAB, (1, 6), generator=g), torch.randint(0, VOCAB, (1, 6), generator=g)

    def metric(logits):
        return float(logits[0, -1, 3] - logits[0, -1, 8])

    zc, zx = _o_proj_inputs(model, clean), _o_proj_inputs(model, corrupt)
    with torch.no_grad():
        plain = model(input_ids=corrupt).logits
    torch.testing.assert_close(_frozen_forward(model, corrupt, zx), plain, rtol=1e-9, atol=1e-9)  # the reference
    res = path_patching_logits(model, clean, corrupt, metric, batch=3)
    Dv = zc[0].shape[-1] // 4
    for layer in range(2):
        for h in range(4):
            zs = [z.clone() for z in zx]
            zs[layer][..., h * Dv:(h + 1) * Dv] = zc[layer][..., h * Dv:(h + 1) * Dv]
            want = metric(_frozen_forward(model, corrupt, zs))
            assert float(res.patched["z"][layer, h]) == pytest.approx(want, rel=1e-7, abs=1e-9)
    with torch.no_grad():
        assert res.clean_metric == pytest.approx(metric(model(input_ids=clean).logits), abs=1e-9)
    # a last-layer sender has no head downstream: path patching to the logits == activation patching of its z
    act = activation_patching(model, clean, corrupt, metric, points=("z",), layers=[1])
    torch.testing.assert_close(res.effects["z"][1:], act.effects["z"], rtol=1e-7, atol=1e-9)
    # in layer 0 the two differ (the layer-1 heads re-read the sender in activation patching, not here)
    act0 = activation_patching(model, clean, corrupt, metric, points=("z",), layers=[0]).effects["z"]
    assert (act0 - res.effects["z"][:1]).abs().max() > 1e-3


def test_path_patching_to_logits_rejects_bad_inputs(circuit):
    clean, corrupt, _, metric = induction_data()
    with pytest.raises(ValueError, match="shape"):
        path_patching_logits(circuit, clean, corrupt[:, :5], metric)
    with pytest.raises(ValueError, match="same"):
        path_patching_logits(circuit, clean, clean, metric)
    with pytest.raises(ValueError, match="layers"):
        path_patching_logits(circuit, clean, corrupt, metric, layers=[2])
    with pytest.raises(ValueError, match="layers"):
        path_patching_logits(circuit, clean, corrupt, metric, layers=[])
    with pytest.raises(ValueError, match="batch"):
        path_patching_logits(circuit, clean, corrupt, metric, batch=0)
    with pytest.raises(ValueError, match="clean_ids"):
        path_patching_logits(circuit, clean[0], corrupt, metric)


# ---------------------------------------------------------------------------------------------------------
# attention knockout
# ---------------------------------------------------------------------------------------------------------
def test_knockout_kills_induction(circuit):
    clean, _, ans, metric = induction_data()
    base = metric(circuit(input_ids=clean).logits)
    # the induction head's last query stops reading position 8 (the token after the previous occurrence)
    drop = knockout_effect(circuit, clean, [(1, IND_HEAD, 14, 8)], metric)
    assert drop < -0.9 * base
    # knocking out the previous-token head's edge 8 -> 7 breaks the key the induction head matches (the head
    # then reads positions 6 and 8 and attends diffusely: what is left is the uniform-attention share)
    assert knockout_effect(circuit, clean, [(0, PREV_HEAD, 8, 7)], metric) < -0.75 * base
    # an irrelevant edge (another head) changes little
    assert abs(knockout_effect(circuit, clean, [(1, 2, 14, 8)], metric)) < 0.1 * base
    with pytest.raises(ValueError, match="every key"):
        attention_knockout(circuit, clean, [(0, None, 2, [0, 1, 2])])


def test_knockout_matches_reference_attention():
    """Knockout == a float64 reference attention with the blocked entries removed before the softmax."""
    model = tiny("llama").double()
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(3))
    blocks = [(0, [1, 2], [3, 5], [0, 2]), (1, None, -1, [1, 4])]

    def ref(module, q, k, v, mask, scaling, layer):
        H, Hkv, T = q.shape[1], k.shape[1], q.shape[2]
        k = k.repeat_interleave(H // Hkv, 1)
        v = v.repeat_interleave(H // Hkv, 1)
        s = (q @ k.transpose(-1, -2)) * scaling
        allowed = torch.ones(1, H, T, T, dtype=torch.bool).tril()
        if layer == 0:
            for h in (1, 2):
                for f in (3, 5):
                    for t in (0, 2):
                        allowed[0, h, f, t] = False
        else:
            allowed[0, :, 5, 1] = False
            allowed[0, :, 5, 4] = False
        return torch.softmax(s.masked_fill(~allowed, -math.inf), -1) @ v

    with torch.no_grad(), hf.attnlab_attention(model, ref):
        want = model(input_ids=ids).logits
    got = attention_knockout(model, ids, blocks)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------------------------------
# direct logit attribution and the logit lens
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_dla_sums_to_the_logit(family):
    model = tiny(family).double()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # non-trivial norm gains, so the frozen scale is exercised
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    ids = torch.randint(0, VOCAB, (1, 7), generator=g)
    r = direct_logit_attribution(model, ids, (5, 9))
    assert r.heads.shape == (2, 4) and r.mlp.shape == (2,)
    total = r.heads.sum() + r.mlp.sum() + r.attn_bias.sum() + r.embed + r.unembed_bias
    assert float(total) == pytest.approx(float(r.total), abs=1e-9)
    assert float(r.total) == pytest.approx(float(r.logit), abs=1e-5)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1].double()
    assert float(r.logit) == pytest.approx(float(logits[5] - logits[9]), abs=1e-9)
    allpos = direct_logit_attribution(model, ids, 5, position=None)
    assert allpos.heads.shape == (2, 4, 7)
    torch.testing.assert_close(allpos.total, model(input_ids=ids).logits[0, :, 5].double(), rtol=0, atol=1e-5)
    if family == "qwen2":  # q/k/v biases only; o_proj has none
        assert r.attn_bias.abs().max() == 0


def test_dla_head_term_by_hand():
    """One head's DLA from an independent computation: z_h @ W_O[:, h]^T, times gain / rms(final residual)."""
    model = tiny("llama").double()
    with torch.no_grad():
        model.model.norm.weight.mul_(torch.linspace(0.5, 1.5, 32, dtype=torch.float64))
    ids = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(5))
    r = direct_logit_attribution(model, ids, 11, position=2)
    _, cache = hf.run_with_cache(model, ids, ["blocks.1.attn.z"])
    final = {}
    h = model.model.norm.register_forward_hook(lambda m, a, o: final.setdefault("x", a[0].detach()))
    with torch.no_grad():
        model(input_ids=ids)
    h.remove()
    x = final["x"][0, 2]
    inv = 1 / torch.sqrt((x ** 2).mean() + model.config.rms_norm_eps)
    z = cache["blocks.1.attn.z"][0, 3, 2]  # layer 1, head 3, position 2
    contrib = model.model.layers[1].self_attn.o_proj.weight[:, 24:32] @ z
    want = float(((contrib * inv * model.model.norm.weight) @ model.lm_head.weight[11]).detach())
    assert float(r.heads[1, 3]) == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_dla_on_the_planted_circuit(circuit):
    clean, _, ans, _ = induction_data()
    r = direct_logit_attribution(circuit, clean, ans)
    assert int(r.heads.abs().flatten().argmax()) == 1 * 4 + IND_HEAD  # the induction head writes the answer
    assert r.heads[0].abs().max() < 1e-6 and r.embed.abs() < 1e-6  # nothing else reads into OUT directly


def test_logit_lens(circuit):
    model = tiny("llama").double()
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(6))
    lens = logit_lens(model, ids, position=3, top=4, heads=True, full_heads=True)
    logits = model(input_ids=ids).logits[0, 3].float()
    assert lens.logits.shape == (3, VOCAB)
    torch.testing.assert_close(lens.logits[-1], logits, rtol=1e-5, atol=1e-5)
    assert lens.top_tokens[-1].tolist() == logits.topk(4).indices.tolist()
    # layer 0 row: the residual after layer 0 through the final norm and the head, by hand
    out = model(input_ids=ids, output_hidden_states=True)
    want0 = model.lm_head(model.model.norm(out.hidden_states[1][0, 3])).float()
    torch.testing.assert_close(lens.logits[1], want0, rtol=1e-5, atol=1e-5)
    assert lens.head_logits.shape == (2, 4, VOCAB) and lens.head_top_tokens.shape == (2, 4, 4)
    # the per-head lens at the last layer is that layer's DLA term per token
    dla = direct_logit_attribution(model, ids, 7, position=3)
    assert float(lens.head_logits[1, 2, 7]) == pytest.approx(float(dla.heads[1, 2]), rel=1e-5, abs=1e-6)
    # planted: the induction head's lens at the last position names the answer; the final row is the logits
    clean, _, ans, _ = induction_data()
    pl = logit_lens(circuit, clean, heads=True)
    assert int(pl.head_top_tokens[1, IND_HEAD, 0]) == ans and int(pl.top_tokens[-1, 0]) == ans
