"""Head perturbation guidance (I216): SoftPAG's identity limits read from the model's own projections, guided
decoding with caches against uncached forwards, the screen against finite differences, HeadHunter's greedy
search on a toy objective with a known best head, the fit and the registered arm."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ivhelpers import Tok, samples, tiny  # noqa: E402

from attnlab.interventions import decoding as D  # noqa: E402
from attnlab.interventions import fit as F  # noqa: E402
from attnlab.interventions import hpg as P  # noqa: E402
from attnlab.interventions import registry as R  # noqa: E402
from attnlab.models import hf  # noqa: E402

PROMPT = torch.tensor([list(samples(1, seed=5, length=12)[0].ids)])
HEADS = ((0, 1), (1, 3))


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def model(request):
    return tiny(request.param)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _projections(model, layer):
    """Torch forward hooks on the layer's own modules (no attnlab hook): the value projection's output
    ``(B, T, Hkv*D)`` and the output projection's input ``(B, T, H*Dv)`` (the heads' outputs side by side)."""
    attn = hf.attention_modules(model)[layer][1]
    got = {}
    h1 = attn.v_proj.register_forward_hook(lambda m, a, out: got.__setitem__("v", out.detach()))
    h2 = attn.o_proj.register_forward_pre_hook(lambda m, a: got.__setitem__("z", a[0].detach()))
    return got, (h1, h2)


def test_u_zero_is_plain_bit_for_bit(model):
    plain = _logits(model, PROMPT)
    with P.SoftPAG(HEADS, 0.0).attach(model):
        same = _logits(model, PROMPT)
    assert torch.equal(plain, same)
    with P.SoftPAG(HEADS, 0.5).attach(model):
        moved = _logits(model, PROMPT)
    assert not torch.allclose(plain, moved, atol=1e-4)


def test_u_one_outputs_the_heads_own_value(model):
    g = hf.geometry(model)
    layer, head = 1, 3
    D_ = g.head_dim
    got, handles = _projections(model, layer)
    try:
        _logits(model, PROMPT)
        z_plain = got["z"].clone()
        with P.SoftPAG(((layer, head),), 1.0).attach(model):
            _logits(model, PROMPT)
            v, z = got["v"], got["z"]
            kv = head // g.group
            want = v[0, :, kv * D_:(kv + 1) * D_]
            torch.testing.assert_close(z[0, :, head * D_:(head + 1) * D_], want, atol=1e-5, rtol=1e-5)
            # the other heads of the layer are untouched (the chunked-weights path, not bit-equal)
            other = [h for h in range(g.num_heads) if h != head]
            sl = torch.cat([torch.arange(h * D_, (h + 1) * D_) for h in other])
            torch.testing.assert_close(z[..., sl], z_plain[..., sl], atol=1e-5, rtol=1e-5)
            # a decode step with a cache (Gemma 3's sliding layer keeps only its window): still its own value
            cache = DynamicCache(config=model.config)
            with torch.no_grad():
                model(input_ids=PROMPT, cache=cache, use_cache=True)
                model(input_ids=PROMPT[:, :1], cache=cache, use_cache=True)
            v, z = got["v"], got["z"]
            torch.testing.assert_close(z[0, -1, head * D_:(head + 1) * D_], v[0, -1, kv * D_:(kv + 1) * D_],
                                       atol=1e-5, rtol=1e-5)
    finally:
        for h in handles:
            h.remove()


def test_w_zero_is_plain_greedy(model):
    with D.Base(model) as base:
        plain = D.greedy(model, PROMPT, 8, base.new_cache)
        got = P.hpg_greedy(model, PROMPT, 8, base.new_cache, heads=HEADS, u=1.0, w=0.0)
    assert got.tolist() == plain.tolist()


def test_guided_tokens_equal_two_uncached_forwards(model):
    u, w = 0.7, 1.5
    with D.Base(model) as base:
        got = P.hpg_greedy(model, PROMPT, 6, base.new_cache, heads=HEADS, u=u, w=w)[0].tolist()
    ids = PROMPT.clone()
    want, moved = [], False
    for _ in range(6):
        l = _logits(model, ids)[0, -1].double()
        with P.SoftPAG(HEADS, u).attach(model):
            lp = _logits(model, ids)[0, -1].double()
        nxt = int((l + w * (l - lp)).argmax())
        moved |= nxt != int(l.argmax())
        want.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    assert got == want
    assert moved  # the guidance changed at least one token: the comparison can fail
    assert P.guided_logits(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.0]), 2.0).tolist() == [-3.0, 6.0]


def test_guided_nll_matches_its_definition(model):
    pairs = [(list(PROMPT[0]), [5, 9, 2])]
    prompt, target = pairs[0]
    ids = torch.tensor([prompt + target])
    l = _logits(model, ids)[0, len(prompt) - 1:-1].double()
    with P.SoftPAG(HEADS, 0.5).attach(model):
        lp = _logits(model, ids)[0, len(prompt) - 1:-1].double()
    g = torch.log_softmax(l + 2.0 * (l - lp), -1)
    want = -float(sum(g[i, t] for i, t in enumerate(target))) / len(target)
    assert P.guided_nll(model, pairs, HEADS, 0.5, 2.0) == pytest.approx(want, rel=1e-5)
    assert P.guided_nll(model, pairs, [], 0.5, 2.0) == pytest.approx(F.val_nll(model, pairs), rel=1e-9)


def test_screen_equals_finite_differences():
    model = tiny("llama")
    pairs = [(list(s.ids), [int(s.ids[5]), 7]) for s in samples(2, seed=3, length=10)]
    s = P.screen_heads(model, pairs)
    eps = 1e-3
    for head in [(0, 0), (1, 2)]:
        def nll(u, head=head):
            t = torch.zeros(2, 4)
            t[head] = u
            return F.val_nll(model, pairs, lambda: hf.hooks(model, P.softpag_hooks(t)))
        fd = (nll(eps) - nll(-eps)) / (2 * eps)
        assert float(s[head]) == pytest.approx(fd, rel=2e-2, abs=1e-5)


def test_headhunter_picks_the_known_best_head_and_stops():
    gain = {(0, 0): 0.1, (1, 2): 0.5, (2, 1): 0.3, (3, 3): 0.0}

    def objective(heads):  # the first two heads help, any third hurts
        v = 2.0 - sum(gain[h] for h in heads)
        return v + (1.0 if len(heads) >= 3 else 0.0)

    picked, trace = P.headhunter(objective, list(gain), k=5)
    assert picked == [(1, 2), (2, 1)]
    assert trace[-1]["stop"] == "no candidate improves the objective"
    assert P.headhunter(objective, list(gain), k=1)[0] == [(1, 2)]
    assert P.headhunter(lambda hs: 1.0 + len(hs), list(gain), k=3)[0] == []  # nothing helps: identity
    assert P.screen_candidates(torch.tensor([[0.3, -1.0], [0.0, 0.9]]), 3) == [(1, 1), (0, 0)]


def test_fit_is_never_worse_than_plain_and_builds_an_arm():
    model = tiny("llama")
    val = samples(2, seed=1001, length=16)
    fc = F.FitContext(model, Tok(), val, quick=True)
    fitted = P.fit_hpg(fc, {"heads": None, "k": 2, "screen": 4, "u": None, "w": None})
    grid = fitted.trace["grid"]
    assert grid[0]["candidate"]["heads"] == 0
    best = min(x["val_nll"] for x in grid)
    assert P.guided_nll(model, fc.pairs, [tuple(h) for h in fitted.knobs["heads"]], fitted.knobs["u"],
                        fitted.knobs["w"]) == pytest.approx(best, abs=1e-6)
    assert best <= grid[0]["val_nll"]
    assert fitted.tensors["screen"].shape == (2, 4)
    # given knobs: the arm runs the guided loop; the fitted knobs build the same arm
    (c,) = R.parse("hpg:heads=0.1/1.3,u=1,w=1.5")
    assert not c.needs_fit()
    arm = R.build_arm(model, Tok(), [c])
    with D.Base(model) as base:
        got = arm.generate(model, list(PROMPT[0]), 5, base)
        want = P.hpg_greedy(model, PROMPT, 5, base.new_cache, heads=HEADS, u=1.0, w=1.5)
    assert got.tolist() == want.tolist()


def test_clear_errors():
    model = tiny("llama")
    with pytest.raises(ValueError, match="u"):
        P.SoftPAG(HEADS, 1.5)
    with pytest.raises(ValueError, match="outside"):
        P.SoftPAG(((5, 0),), 1.0).table(model)
    with pytest.raises(ValueError, match="k"):
        P.headhunter(lambda hs: 0.0, [(0, 0)], k=-1)
    with pytest.raises(ValueError, match="heads"):
        R.build_arm(model, Tok(), R.parse("hpg:heads=9.0,u=1,w=1"))
