"""Each calibration / intervention changes what it should, and only that; calibrations are hooks on the
seam and compose with each other and with plans (checked layer by layer against the float64 reference)."""

import math

import torch

from attnlab.core.attention import attention
from attnlab.core.patterns import Causal
from attnlab.core.reference import reference_attention
from attnlab.core.score_mods import Temperature
from attnlab.models import hf
from attnlab.plans import calibrate as C
from attnlab.plans.plan import HeadPlan, HeadPolicy

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


def _o_proj_scaled(model, ids, heads, scale):
    """Independent path: scale the heads' slices of o_proj's input with forward pre-hooks."""
    d = model.config.hidden_size // model.config.num_attention_heads
    handles = []
    for layer, head in heads:
        def pre(mod, args, head=head):
            x = args[0].clone()
            x[..., head * d:(head + 1) * d] *= scale
            return (x,)
        handles.append(model.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(pre))
    try:
        return model(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()


def test_zerotuning_and_head_mask_in_a_model(tiny):
    with torch.no_grad():
        base = tiny(input_ids=IDS).logits
        with C.ZeroTuning.uniform(2, 4, 3.0, only_layers=[0]).attach(tiny):
            zt = tiny(input_ids=IDS).logits
        with C.HeadMask.ablate(2, 4, [(1, 2), (0, 3)]).attach(tiny):
            masked = tiny(input_ids=IDS).logits
        ref_masked = _o_proj_scaled(tiny, IDS, [(1, 2), (0, 3)], 0.0)
        again = tiny(input_ids=IDS).logits  # hooks gone after the block
    assert (zt - base).abs().max() > 1e-3
    assert (zt[:, 0] - base[:, 0]).abs().max() < 1e-5  # position 0 only sees itself: unchanged
    assert (masked - ref_masked).abs().max() < 1e-5 and (masked - base).abs().max() > 1e-3
    assert (again - base).abs().max() < 1e-5


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


def test_estimate_position_bias_against_dense_weights(tiny):
    b = C.estimate_position_bias(tiny, IDS, rows=8)
    assert b.shape == (2, 4, 48 - 8 + 1)
    assert torch.allclose(b.mean(-1), torch.zeros(2, 4), atol=1e-5)
    A = _eager_attentions(tiny, IDS).double()
    lw = torch.log(A[:, :, -8:, : 48 - 8 + 1].mean(2) + 1e-6)
    assert torch.allclose(b.double(), lw - lw.mean(-1, keepdim=True), atol=1e-4)


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


def test_act_intervention_in_model(tiny):
    act = C.ACT(alpha=1.5, beta=0.0)
    with torch.no_grad():
        base = tiny(input_ids=IDS).logits
        with C.ACT(alpha=1e9).attach(tiny):  # threshold never met: identical model
            same = tiny(input_ids=IDS).logits
        with act.attach(tiny):
            out = tiny(input_ids=IDS).logits
    assert (same - base).abs().max() < 1e-4
    assert sum(act.found.values()) > 0 and (out - base).abs().max() > 1e-4
    only = C.ACT(alpha=1.5, beta=0.0, layers=(1,))
    with torch.no_grad(), only.attach(tiny):
        tiny(input_ids=IDS)
    assert set(only.found) == {1}


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


def _eager_attentions(model, ids):
    """Independent weights: transformers' eager attention with output_attentions, (L, H, T, T)."""
    prev = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return torch.stack([a[0] for a in model(input_ids=ids, output_attentions=True).attentions])
    finally:
        model.set_attn_implementation(prev)


def test_lookback_ratios_against_dense_weights(tiny):
    n = 40
    r = C.lookback_ratios(tiny, IDS, n_context=n)
    assert r.shape == (2, 4, 8)
    assert bool(((r > 0) & (r < 1)).all())
    A = _eager_attentions(tiny, IDS).double()  # (L, H, T, T)
    for i in range(8):
        row = A[:, :, n + i]
        ctx, gen = row[..., :n].mean(-1), row[..., n: n + i + 1].mean(-1)
        assert torch.allclose(r[..., i].double(), ctx / (ctx + gen), atol=1e-5)
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


MIXED = HeadPlan(((HeadPolicy.full(), HeadPolicy.stream(2, 8)), (HeadPolicy.stream(2, 8), HeadPolicy.full())),
                 q_per_kv=2)


def _under_plan(model, plan, calibrations):
    """Run ``model`` under ``plan`` with ``calibrations`` attached; observers registered after them record each
    layer's q, k, v and z (z after every intervention). Returns ``{(layer, point): tensor}``."""
    seen = {}

    def keep(x, ctx):
        seen[ctx.layer, ctx.name.rsplit(".", 1)[1]] = x.detach().clone()

    with torch.no_grad(), hf.use(model, plan):
        handles = [c.attach(model) for c in calibrations]
        for h in handles:
            h.__enter__()
        try:
            with hf.hooks(model, {f"blocks.*.attn.{p}": keep for p in ("q", "k", "v", "z")}):
                model(input_ids=IDS, use_cache=False)
        finally:
            for h in reversed(handles):
                h.__exit__(None, None, None)
    return seen


def _ref_z(seen, layer, plan, mod=None, weights_fn=None):
    """The float64 reference of one layer from its captured q, k, v, the plan's pattern and a score mod."""
    q, k, v = (seen[layer, p].double() for p in "qkv")
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    scale = q.shape[-1] ** -0.5
    out, w = reference_attention(q, k, v, plan.layer_pattern(layer), mod, scale, 0, return_weights=True)
    if weights_fn is not None:
        out = weights_fn(w) @ v
    return out


def test_score_mods_follow_heads_through_a_mixed_plan(tiny):
    """A per-head temperature (a scores intervention) under a plan with two policy groups == the same mod on
    the plan's own reference attention, layer by layer."""
    temps = torch.tensor([0.5, 1.0, 1.5, 2.0])

    class Temp(C.Intervention):
        def hooks(self):
            return {"blocks.*.attn.scores": C.score_mod_hook(lambda layer, heads: Temperature(temps))}

    seen = _under_plan(tiny, MIXED, [Temp()])
    plain = _under_plan(tiny, MIXED, [])
    for layer in range(2):
        want = _ref_z(seen, layer, MIXED, Temperature(temps.double()))
        assert (seen[layer, "z"].double() - want).abs().max() < 1e-5, layer
    assert (seen[1, "z"] - plain[1, "z"]).abs().max() > 1e-3


def test_calibrations_compose_with_a_plan_and_each_other(tiny):
    """ZeroTuning + ACT + HeadMask under a mixed plan == the calibrations applied to the plan's weights."""
    zt = C.ZeroTuning(torch.tensor([[2.0, 0.5, 1.0, 3.0], [1.0, 1.0, 4.0, 0.25]]))
    act = C.ACT(alpha=1.5, beta=0.3)
    mask = C.HeadMask.ablate(2, 4, [(0, 1), (1, 3)])
    seen = _under_plan(tiny, MIXED, [zt, act, mask])
    plain = _under_plan(tiny, MIXED, [])
    for layer in range(2):
        mod = C.InitialTokenBias(torch.log(zt.gamma[layer].double()))
        want = _ref_z(seen, layer, MIXED, mod, weights_fn=lambda w: act.calibrate(w)[0])
        want = want * mask.factors[layer].double().view(1, -1, 1, 1)
        assert (seen[layer, "z"].double() - want).abs().max() < 1e-5, layer
        assert (seen[layer, "z"] - plain[layer, "z"]).abs().max() > 1e-3
    assert float(seen[0, "z"][0, 1].abs().max()) == 0.0  # the ablated head
    pc = C.PositionalCalibration(torch.linspace(-1, 1, 48).expand(2, 4, 48).contiguous(), layers=(1,))
    seen = _under_plan(tiny, MIXED, [pc])
    for layer in range(2):
        mod = C.PositionBias(pc.bias[layer].double()) if layer == 1 else None
        assert (seen[layer, "z"].double() - _ref_z(seen, layer, MIXED, mod)).abs().max() < 1e-5, layer
