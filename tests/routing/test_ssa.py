"""SSA [P274]: sampled key blocks vs a loop-built reference, the realized rate, the locality bias, the layer."""

import math

import pytest
import torch

import attnlab
from attnlab.core.patterns.stochastic import block_hash
from attnlab.core.reference import reference_attention
from attnlab.mechanisms.routing.ssa import ensemble_probs, ssa_attention, sub_model
from attnlab.models.lm import LMConfig, TransformerLM
from attnlab.testing import grads, max_err, qkv

pytestmark = pytest.mark.usefixtures("one_thread")


def loop_keys(p: int, Tk: int, block: int, rate: float, bias: float, seed: int, causal: bool) -> set[int]:
    """The key positions query position p reads, built from the definition alone (no op code)."""
    qb, nk = p // block, -(-Tk // block)
    cands = list(range(qb + 1)) if causal else list(range(nk))
    keep = min(len(cands), max(1, math.floor(rate * len(cands) + 0.5)))
    others = []
    for j in cands:
        if j != qb:
            u = (int(block_hash(seed, qb, j)) + 0.5) / 2**32
            others.append((-bias * math.log(1 + abs(qb - j)) - math.log(-math.log(u)), j))
    chosen = [qb] + [j for _, j in sorted(others, reverse=True)[: keep - 1]]
    keys = {t for j in chosen for t in range(j * block, min(Tk, (j + 1) * block))}
    return {t for t in keys if t <= p} if causal else keys


def loop_reference(q, k, v, block, rate, bias, seed, causal, q_offset=0):
    B, H, Tq, _ = q.shape
    Tk = k.shape[2]
    mask = torch.zeros(B, H, Tq, Tk, dtype=torch.bool)
    for i in range(Tq):
        for t in loop_keys(q_offset + i, Tk, block, rate, bias, seed, causal):
            mask[:, :, i, t] = True
    return reference_attention(q, k, v, q_offset=q_offset, mask=mask)


@pytest.mark.parametrize("causal,rate,bias,seed", [(True, 0.25, 1.0, 0), (True, 0.5, 0.0, 7), (False, 0.25, 2.0, 3)])
def test_matches_loop_reference_outputs_and_grads(causal, rate, bias, seed):
    q, k, v = qkv(2, 4, 2, 61, D=8, seed=seed)
    kw = dict(rate=rate, block=4, local_bias=bias, seed=seed, causal=causal)
    out = ssa_attention(q, k, v, scale=8**-0.5, q_offset=0, **kw)
    ref = loop_reference(q, k, v, 4, rate, bias, seed, causal)
    assert max_err(out, ref) < 1e-12
    assert max_err(grads(out, (q, k, v)), grads(ref, (q, k, v))) < 1e-12


def test_offset_call_matches_full_forward_rows():
    q, k, v = qkv(1, 2, 2, 40, D=8, requires_grad=False)
    kw = dict(scale=8**-0.5, rate=0.3, block=4, local_bias=1.0, seed=5, causal=True)
    full = ssa_attention(q, k, v, q_offset=0, **kw)
    part = ssa_attention(q[:, :, 13:29], k[:, :, :29], v[:, :, :29], q_offset=13, **kw)
    assert max_err(part, full[:, :, 13:29]) < 1e-12


def test_realized_key_fraction_matches_rate():
    T, block = 4096, 16
    nb = T // block
    for rate in (0.25, 0.125):
        seen = [len(loop_keys(p, T, block, rate, 1.0, 11, False)) for p in range(0, T, block)]
        assert abs(sum(seen) / (len(seen) * T) - rate) < 0.5 / nb  # block rounding only


def test_sampling_is_locality_biased():
    """Inclusion frequency of a key block falls with its distance under local_bias > 0 and is flat at 0."""
    T, block, rate = 2048, 16, 0.125
    p = T // 2

    def freq(bias):
        hits = torch.zeros(T // block)
        for seed in range(200):
            for t in loop_keys(p, T, block, rate, bias, seed, False):
                if t % block == 0:
                    hits[t // block] += 1
        return hits / 200

    qb = p // block
    near, far = [qb - 2, qb - 1, qb + 1, qb + 2], [0, 1, T // block - 2, T // block - 1]
    biased, flat = freq(1.0), freq(0.0)
    assert biased[qb] == 1 and flat[qb] == 1  # the own block always
    assert biased[near].mean() > 3 * biased[far].mean()
    assert abs(flat[near].mean() - flat[far].mean()) < 0.1
    others = torch.cat([flat[:qb], flat[qb + 1:]])
    assert abs(others.mean().item() - (round(rate * T / block) - 1) / (T / block - 1)) < 0.01


def test_bad_options_fail_clearly():
    q, k, v = qkv(1, 2, 2, 16, D=8)
    for bad, msg in [({"rate": 0.0}, "rate"), ({"rate": 1.5}, "rate"), ({"local_bias": -1.0}, "local_bias"),
                     ({"seed": -1}, "seed"), ({"block": 0}, "block")]:
        kw = dict(rate=0.5, block=4, local_bias=1.0, seed=0, causal=True) | bad
        with pytest.raises(ValueError, match=msg):
            ssa_attention(q, k, v, scale=1.0, q_offset=0, **kw)
    with pytest.raises(ValueError, match="eval_mode"):
        attnlab.build("ssa", dim=32, heads=2, eval_mode="ensemble")


def _lm():
    torch.manual_seed(0)
    cfg = LMConfig(vocab=32, dim=32, layers=2, heads=2, mechanisms="ssa", mechanism_options={"block": 4, "rate": 0.25})
    return TransformerLM(cfg)


def test_layer_trains_sampled_and_evaluates_dense_or_as_sub_models():
    model = _lm()
    x = torch.randint(0, 32, (2, 40))
    model.eval()
    dense = model(x)[0]
    with sub_model(model, 0):
        a = model(x)[0]
    with sub_model(model, 1):
        b = model(x)[0]
    assert max_err(a, b) > 1e-4 and max_err(a, dense) > 1e-4  # different sub-models, neither is dense
    with sub_model(model, 0):
        assert max_err(model(x)[0], a) == 0  # a seed is one fixed sub-model
    assert max_err(model(x)[0], dense) == 0  # back to dense after the context
    model.train()
    s0 = model(x)[0]
    s1 = model(x)[0]
    assert max_err(s0, s1) > 1e-4  # a new subset every training step
    p = ensemble_probs(model.eval(), lambda m: m(x)[0], 3)
    assert torch.allclose(p.sum(-1), torch.ones(2, 40), atol=1e-5)
    with sub_model(model, 0):
        pa = model(x)[0].softmax(-1)
    with sub_model(model, 1):
        pb = model(x)[0].softmax(-1)
    with sub_model(model, 2):
        pc = model(x)[0].softmax(-1)
    assert max_err(p, (pa + pb + pc) / 3) < 1e-6
