"""Each calibration / intervention changes what it should, and only that."""

import math

import torch

from attnlab.core.attention import attention
from attnlab.core.patterns import Causal
from attnlab.plans import calibrate as C
from attnlab.plans.plan import HeadPlan, HeadPolicy
from attnlab.plans.runtime import use_plan

IDS = torch.randint(0, 128, (1, 48), generator=torch.Generator().manual_seed(2))


def weights(q, k, mod=None):
    return attention(q, k, k, pattern=Causal(), score_mod=mod, return_weights=True)[1]


def test_zerotuning_scales_initial_token_weight():
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    zt = C.ZeroTuning(torch.tensor([[2.0, 0.5]]))
    w0, w1 = weights(q, k), weights(q, k, zt.score_mod(0, 2))
    for h, g in enumerate((2.0, 0.5)):
        a = w0[0, h, :, 0]
        expect = g * a / (g * a + 1 - a)
        assert torch.allclose(w1[0, h, :, 0], expect, atol=1e-6)
    # the other keys keep their relative weights
    r0 = w0[0, 0, 5, 1:] / w0[0, 0, 5, 1:].sum()
    r1 = w1[0, 0, 5, 1:] / w1[0, 0, 5, 1:].sum()
    assert torch.allclose(r0, r1, atol=1e-6)
    assert C.ZeroTuning.uniform(3, 2, 1.0).score_mod(1, 2) is None


def test_zerotuning_and_head_mask_in_a_model(tiny):
    plan = HeadPlan.uniform(2, 2, HeadPolicy.full(), 2)
    with torch.no_grad():
        base = tiny(input_ids=IDS).logits
        with use_plan(tiny, plan, [C.ZeroTuning.uniform(2, 4, 3.0, only_layers=[0])]):
            zt = tiny(input_ids=IDS).logits
        with use_plan(tiny, plan, [C.HeadMask.ablate(2, 4, [(1, 2)])]):
            masked = tiny(input_ids=IDS).logits
        from attnlab.models.hf import attnlab_attention, zero_heads

        with attnlab_attention(tiny, zero_heads({1: [2]})):
            ref_masked = tiny(input_ids=IDS).logits
    assert (zt - base).abs().max() > 1e-3
    assert (zt[:, 0] - base[:, 0]).abs().max() < 1e-5  # position 0 only sees itself: unchanged
    assert (masked - ref_masked).abs().max() < 1e-5 and (masked - base).abs().max() > 1e-3


def test_positional_calibration_flattens_a_position_bias():
    torch.manual_seed(1)
    T = 32
    q = torch.zeros(1, 1, 1, 8)
    k = torch.randn(1, 1, T, 8)
    pos = torch.arange(T, dtype=torch.float32)
    curve = 0.02 * (pos - T / 2) ** 2  # U-shaped positional bias
    biased = C.PositionBias(curve.view(1, T), strength=-1.0)  # adds the U shape
    w_biased = attention(q, k, k, score_mod=biased, return_weights=True)[1][0, 0, 0]
    assert w_biased[0] > 5 * w_biased[T // 2]
    cal = C.PositionalCalibration(curve.view(1, 1, T))
    both = (biased, cal.score_mod(0, 1))
    w_cal = attention(q, k, k, score_mod=both, return_weights=True)[1][0, 0, 0]
    assert torch.allclose(w_cal, torch.full((T,), 1 / T), atol=1e-6)  # q = 0: only the bias mattered


def test_estimate_position_bias_shape_and_centring(tiny):
    b = C.estimate_position_bias(tiny, IDS, rows=8)
    assert b.shape == (2, 4, 48 - 8 + 1)
    assert torch.allclose(b.mean(-1), torch.zeros(2, 4), atol=1e-5)


def test_find_and_scale_positional_dimension(tiny):
    torch.manual_seed(2)
    h = torch.randn(40, 16)
    h[:, 11] = torch.linspace(-3, 3, 40) + 0.01 * torch.randn(40)
    assert C.find_positional_dimension(h) == 11
    layer = tiny.model.layers[1]
    seen = []

    def capture(module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).clone())

    with torch.no_grad():
        base = tiny(input_ids=IDS).logits
        with C.ScaleDimension([layer], dim=5, factor=1.0):
            same = tiny(input_ids=IDS).logits
        with C.ScaleDimension([layer], dim=5, factor=0.0):
            handle = layer.register_forward_pre_hook(capture, with_kwargs=True)  # runs after the scaling
            changed = tiny(input_ids=IDS).logits
            handle.remove()
        tiny(input_ids=IDS)  # hooks are gone after the block
    assert seen[0][..., 5].abs().max() == 0 and seen[0][..., 4].abs().max() > 0
    assert (same - base).abs().max() == 0 and (changed - base).abs().max() > 1e-4
    assert not layer._forward_pre_hooks


def test_act_calibrates_hidden_sinks_only():
    torch.manual_seed(3)
    T = 24
    w = torch.softmax(torch.randn(1, 1, T, T), -1)
    w[..., 7] += 2.0  # a hidden sink at position 7
    w[..., 0] += 3.0  # the initial sink
    w = w / w.sum(-1, keepdim=True)
    act = C.ACT(alpha=3.0, beta=0.4)
    w2, sink = act.calibrate(w)
    assert sink[0, 0, 0].nonzero().flatten().tolist() == [7]
    assert torch.allclose(w2.sum(-1), torch.ones(1, 1, T))
    ratio = (w2[..., 7] / w2[..., 3]) / (w[..., 7] / w[..., 3])
    assert torch.allclose(ratio, torch.full_like(ratio, 0.4), atol=1e-5)


def test_act_callback_in_model(tiny):
    from attnlab.models.hf import attnlab_attention

    act = C.ACT(alpha=1.5, beta=0.0)
    with torch.no_grad():
        base = tiny(input_ids=IDS).logits
        with attnlab_attention(tiny, C.ACT(alpha=1e9)):  # threshold never met: identical model
            same = tiny(input_ids=IDS).logits
        with attnlab_attention(tiny, act):
            out = tiny(input_ids=IDS).logits
    assert (same - base).abs().max() < 1e-4
    assert sum(act.found.values()) > 0 and (out - base).abs().max() > 1e-4


def test_decore_formula_and_generation(tiny):
    base = torch.tensor([[2.0, 1.0, 0.0]])
    masked = torch.tensor([[2.0, 0.0, 1.0]])
    out = C.decore_logits(base, masked, alpha=1.0, entropy_guided=False)
    lp, lm = torch.log_softmax(base, -1), torch.log_softmax(masked, -1)
    assert torch.allclose(out, 2 * lp - lm, atol=1e-6)
    guided = C.decore_logits(base, masked, alpha=1.0)
    a = float(-(lp.exp() * lp).sum() / math.log(3))
    assert torch.allclose(guided, (1 + a) * lp - a * lm, atol=1e-6)
    with torch.no_grad():
        greedy = [int(tiny(input_ids=IDS).logits[0, -1].argmax())]
    toks = C.decore_generate(tiny, IDS, [(1, 0)], max_new_tokens=1, alpha=0.0)
    assert toks.tolist() == [greedy]  # alpha 0: plain greedy


def test_lookback_ratios_against_dense_weights(tiny):
    r = C.lookback_ratios(tiny, IDS, n_context=40)
    assert r.shape == (2, 4, 8)
    assert bool(((r > 0) & (r < 1)).all())
    new = C.lookback_guided_generate(tiny, IDS[:, :20], chunks=1, chunk_len=2, candidates=2)
    assert new.shape == (1, 2)


def test_agcd_moves_mass_to_context_tokens():
    logits = torch.zeros(1, 10)  # maximal uncertainty
    att = torch.tensor([[0.7, 0.3]])
    ids = torch.tensor([[4, 6]])
    lp = C.agcd_logits(logits, att, ids, weight=1.0)
    p = lp.exp()[0]
    assert torch.isclose(p.sum(), torch.tensor(1.0, dtype=p.dtype))
    assert p[4] > p[6] > p[0]
    sure = C.agcd_logits(torch.tensor([[50.0] + [0.0] * 9]), att, ids)
    assert sure.exp()[0, 0] > 0.99  # a confident model is left alone


def test_pause_prompt_inserts_markers(smol):
    _, tok = smol
    ids = list(range(1000, 1300))
    out = C.pause_prompt(ids, tok, every=64)
    pause = tok(" [PAUSE]", add_special_tokens=False)["input_ids"]
    assert len(out) == 300 + 3 * len(pause)
    assert out[-(300 - 256):] == ids[256:]  # the end (question) is untouched
    assert [t for t in out if t >= 1000 and t < 1300] == ids


def test_score_mods_follow_heads_through_a_mixed_plan(tiny):
    """A per-head temperature on a plan with two policy groups equals the same mod on the reference."""
    from attnlab.core.reference import reference_attention
    from attnlab.core.score_mods import Temperature
    from attnlab.models.hf import attnlab_attention

    s = HeadPolicy.stream(2, 8)
    plan = HeadPlan(((HeadPolicy.full(), s), (s, HeadPolicy.full())), q_per_kv=2)
    temps = torch.tensor([0.5, 1.0, 1.5, 2.0])

    class Temp:
        def score_mod(self, layer, heads):
            return Temperature(temps)

    def ref(module, q, k, v, mask, scaling, layer_idx):
        return reference_attention(q, k, v, plan.layer_pattern(layer_idx), Temperature(temps), scaling,
                                   k.shape[2] - q.shape[2]).to(q.dtype)

    with torch.no_grad():
        with use_plan(tiny, plan, [Temp()]):
            out = tiny(input_ids=IDS).logits
        with attnlab_attention(tiny, ref):
            expect = tiny(input_ids=IDS).logits
    assert (out - expect).abs().max() < 1e-4
