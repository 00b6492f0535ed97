"""Attention Buckets (I147) on tiny random models: one bucket with the model's own base is plain greedy decoding;
two buckets with the same base equal one; a pass under another base equals a model built with that base (and
differs from the plain one), the buffer is restored; the waveform's closed forms; the greedy base search; the
merge; clear errors (scaled RoPE, bad bases)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ivhelpers import tiny  # noqa: E402

from attnlab.interventions import buckets as B  # noqa: E402
from attnlab.plans.evaluate import dense_generate  # noqa: E402

T = 32
IDS = torch.randint(1, 97, (1, T), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def model(request):
    return tiny(request.param)


def test_one_bucket_with_the_own_base_is_plain_greedy(model):
    want = dense_generate(model, IDS, 8, native=False)["tokens"].tolist()
    own = B.primary_table(model).base
    assert B.generate(model, None, IDS, 8, B.AttentionBuckets(bases=(own,)))["tokens"].tolist() == want
    two = B.generate(model, None, IDS, 8, B.AttentionBuckets(bases=(own, own), merge="mean-logprob"))
    assert two["tokens"].tolist() == want


def test_two_buckets_with_one_base_equal_one(model):
    b = 3 * B.primary_table(model).base
    one = B.generate(model, None, IDS, 8, B.AttentionBuckets(bases=(b,)))
    two = B.generate(model, None, IDS, 8, B.AttentionBuckets(bases=(b, b)))
    assert one["tokens"].tolist() == two["tokens"].tolist()
    x = torch.randn(2, 11)
    torch.testing.assert_close(B.merge_logits([x, x]), torch.log_softmax(x.double(), -1))


def test_another_base_is_a_model_built_with_that_base():
    model = tiny("llama")
    table = B.primary_table(model)
    assert table.kind == "default" and table.base == 10000.0
    before = table.buffer.clone()
    plain = model(input_ids=IDS, use_cache=False).logits
    with B.rope_base(model, 2500.0):
        got = model(input_ids=IDS, use_cache=False).logits
    assert torch.equal(table.buffer, before)  # restored
    ref = tiny("llama", rope_theta=2500.0)  # same seed, same weights, its own base
    torch.testing.assert_close(got, ref(input_ids=IDS, use_cache=False).logits)
    assert (got - plain).abs().max() > 1e-4  # a random tiny model: attention moves logits little, but surely


def test_gemma3_bases_go_to_the_global_layers():
    model = tiny("gemma3")
    tables = B.rope_tables(model)
    assert {k: t.base for k, t in tables.items()} == {"full_attention": 1e6, "sliding_attention": 1e4}
    local = tables["sliding_attention"].buffer.clone()
    with B.rope_base(model, 5e5) as t:
        assert t.kind == "full_attention"
        torch.testing.assert_close(t.buffer, B.inv_freq(5e5, t.dim))
        assert torch.equal(tables["sliding_attention"].buffer, local)
    with B.rope_base(model, 5e3, rope="sliding_attention") as t:
        torch.testing.assert_close(t.buffer, B.inv_freq(5e3, t.dim))
    assert torch.equal(tables["sliding_attention"].buffer, local)


def test_waveform_closed_forms():
    n = torch.arange(50, dtype=torch.float64)
    assert torch.allclose(B.waveform(123.0, 2, 50), torch.ones(50, dtype=torch.float64))
    b = 400.0
    t1 = b ** -0.5  # dim 4: theta = (1, b^-1/2); |S_1| = 1, |S_2| = |2 cos(n (1 - t1) / 2)|
    want = (1 + (2 * torch.cos(n * (1 - t1) / 2)).abs()) / 2
    torch.testing.assert_close(B.waveform(b, 4, 50), want)
    assert float(B.waveform(1e4, 64, 1)[0]) == pytest.approx((32 + 1) / 2)


def test_search_adds_the_base_that_raises_the_shortest_stave_most():
    own, dim, length = 1e4, 16, 200
    cands = (5e3, 2e4, 4e4, 8e4)
    bases, trace = B.search_bases(own, dim, 3, length, cands)
    assert bases[0] == own and len(set(bases)) == 3 and set(bases[1:]) <= set(cands)
    best2 = max(cands, key=lambda c: B.shortest_stave([own, c], dim, length))
    assert bases[1] == best2
    staves = [t["shortest_stave"] for t in trace]
    assert staves == sorted(staves) and staves[-1] == pytest.approx(B.shortest_stave(bases, dim, length))
    assert B.AttentionBuckets(n=2, candidates=cands).resolve(tiny("llama"), length)[0] == 1e4


def test_merge_mean_prob_known_answer():
    a = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    b = torch.log(torch.tensor([[0.1, 0.5, 0.4]]))
    got = B.merge_logits([a, b]).exp()
    torch.testing.assert_close(got, torch.tensor([[0.4, 0.35, 0.25]], dtype=torch.float64))
    geo = B.merge_logits([a, b], "mean-logprob")
    torch.testing.assert_close(geo, torch.log(torch.tensor([[0.07, 0.1, 0.04]], dtype=torch.float64)).mul(0.5))


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="merge"):
        B.AttentionBuckets(merge="max")
    with pytest.raises(ValueError, match="bases"):
        B.AttentionBuckets(bases=(1e4, -1.0))
    with pytest.raises(ValueError, match="bases"):
        B.parse_bases("1e4/abc")
    assert B.parse_bases("10000/2.5e4") == (1e4, 2.5e4)
    with pytest.raises(ValueError, match="default RoPE"):
        B.rope_tables(tiny("llama", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}))
    model = tiny("llama")
    with pytest.raises(ValueError, match="rope must be one of"):
        B.primary_table(model, "full_attention")
    with pytest.raises(ValueError, match="base"), B.rope_base(model, math.inf):
        pass
