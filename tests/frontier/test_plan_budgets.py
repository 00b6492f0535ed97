"""The attention-informed plans (DuoAttention, retrieval probe, head atlas) spend their KV budget: whole heads
as the budget affords, the rest shared as the streaming heads' windows. On a model with one kv head per full
layer (Gemma 3) a plan that can keep no head whole is exactly StreamingLLM there."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from hf_tiny import tiny  # noqa: E402

from attnlab.frontier import methods as M  # noqa: E402
from attnlab.frontier import run as R  # noqa: E402
from attnlab.plans.plan import HeadPolicy  # noqa: E402

from .test_run import Tok, sample  # noqa: E402

INFORMED = ("duo", "probe", "atlas")


def held(n_full: int, window: int, heads: int, L: int, sinks: int = 4) -> int:
    """Positions the plan holds, written from the policy's definition: a whole head L, a streaming head its
    sinks and window - 1 recent keys."""
    return n_full * L + (heads - n_full) * min(L, sinks + window - 1)


def test_split_known_answers():
    # SmolLM2 at 4k: 90 kv heads; the streaming window stays the DuoAttention default of 256
    assert M._split(0.125, 4096, 90) == (6, 256)
    assert M._split(0.25, 4096, 90) == (18, 256)
    assert M._split(0.5, 4096, 90) == (42, 256)
    # Gemma 3 at 4k: 3 kv heads (one per global layer)
    assert M._split(0.25, 4096, 3) == (0, M.stream_window(0.25, 4096))  # no head affordable: StreamingLLM
    assert M._split(0.125, 4096, 3) == (0, M.stream_window(0.125, 4096))
    assert M._split(0.5, 4096, 3) == (1, 1021)  # one whole, the other two share 2,048 positions
    assert M._split(1.0, 4096, 3) == (3, 256)


@pytest.mark.parametrize("heads", [1, 2, 3, 7, 30, 90])
@pytest.mark.parametrize("L", [256, 1024, 4096, 16384])
def test_split_holds_its_budget(heads, L):
    for f in (0.0625, 0.1, 0.125, 0.2, 0.25, 0.33, 0.5, 0.66, 0.75, 0.9):
        n_full, window = M._split(f, L, heads)
        assert 0 <= n_full <= heads and window >= 16
        if f * L < 64:  # under the 16-key floor of a streaming window the budget cannot be met
            continue
        budget = f * heads * L
        assert held(n_full, window, heads, L) <= 1.05 * budget + 1, (f, n_full, window)
        # unused budget is at most rounding: less than one position per streaming head
        if n_full < heads and window < L:
            assert held(n_full, window, heads, L) >= budget - (heads - n_full), (f, n_full, window)


def _ctx(kv_heads: int):
    model = tiny("gemma3", num_key_value_heads=kv_heads, num_attention_heads=4)
    ctx = R.context(model, Tok())
    # calibrations injected: a real model's probes are not needed to test the budget arithmetic
    scores = torch.tensor([[0.0] * kv_heads, [float(h) for h in range(kv_heads)]])
    for name in INFORMED:
        ctx.cache[name] = scores
    return model, ctx


@pytest.mark.parametrize("name", INFORMED)
def test_plan_that_keeps_no_head_whole_is_streamingllm(name):
    """Gemma-like: at 0.25 no kv head of the full layer is affordable, so the plan streams every head with
    StreamingLLM's window, holds the same cache and decodes the same tokens."""
    model, ctx = _ctx(1)
    T = 200
    plan = M.get(name).build(ctx, 0.25, T).plan
    stream = M.get("stream").build(ctx, 0.25, T).plan
    assert plan.policies == stream.policies
    ids = torch.tensor([sample(5, length=T).ids])
    dense = R.run_dense(model, ids, 3, capture=True)
    a, b = R.run_press(model, plan, dense, 3), R.run_press(model, stream, dense, 3)
    assert torch.equal(a["tokens"], b["tokens"]) and a["kv_bytes"] == b["kv_bytes"]


@pytest.mark.parametrize("name", INFORMED)
def test_plan_keeps_the_top_head_and_fills_the_rest(name):
    """Two kv heads at 0.7 of 200 positions: the higher-scoring head whole, the other streams with the 77-key
    window that spends what is left (the default would be 70); the prompt's cache held is the budget."""
    model, ctx = _ctx(2)
    T = 200
    ctx.cache[f"{name}-split-0.7-{T}"] = torch.tensor([0.0, 2.0, 1.0])  # the calibration kept the split
    plan = M.get(name).build(ctx, 0.7, T).plan
    assert plan.policies[1][1].kind == "full"  # score 1 > 0
    assert plan.policies[1][0] == HeadPolicy.stream(4, 77)
    assert held(1, 77, 2, T) == 280 == round(0.7 * 2 * T)
    ids = torch.tensor([sample(6, length=T).ids])
    dense = R.run_dense(model, ids, 2, capture=True)
    res = R.run_press(model, plan, dense, 2)
    stream = R.run_press(model, M.get("stream").build(ctx, 0.7, T).plan, dense, 2)
    # equal KV at the prompt (spent differently); decoding, the whole head also keeps the 2 new positions
    per_position = 2 * 8 * 4  # key + value, head_dim 8, float32
    assert res["kv_bytes"] - stream["kv_bytes"] == 2 * per_position


def test_atlas_scores_rank_retrieval_and_non_streaming_heads():
    from attnlab.plans.sources import atlas_scores

    class Atlas:
        def __init__(self, kv):
            self._kv = kv

        def kv_scores(self):
            return self._kv

    s = atlas_scores(Atlas({"retrieval": torch.tensor([[0.9, float("nan")]]),
                            "streaming": torch.tensor([[0.2, 1.0]])}))
    assert torch.allclose(s, torch.tensor([[0.9 + 0.8, 0.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match="neither"):
        atlas_scores(Atlas({"sink": torch.zeros(1, 2)}))


@pytest.mark.parametrize("name", INFORMED)
def test_calibration_can_choose_uniform_windows(name):
    """When the calibration's probes score higher with the budget spent as uniform windows, the plan is
    StreamingLLM on the full layers; the decision is read from the run's calibrations (not recomputed)."""
    model, ctx = _ctx(2)
    T = 200
    ctx.cache[f"{name}-split-0.7-{T}"] = torch.tensor([1.0, 0.0, 2.0])
    plan = M.get(name).build(ctx, 0.7, T).plan
    assert plan.policies == M.get("stream").build(ctx, 0.7, T).plan.policies


def test_split_votes_count_what_each_plan_decodes():
    """Known answer: samples whose answer is the dense model's own continuation; a whole-cache plan reproduces
    every one, a 2-key window (sinks 0) loses at least one."""
    from attnlab.plans.plan import HeadPlan
    from attnlab.plans.tasks import Sample

    model = tiny("llama")
    tok = Tok()
    samples = []
    for seed in range(3):
        base = sample(10 + seed, length=64)
        dense = R.run_dense(model, torch.tensor([base.ids]), base.max_new_tokens - 1, capture=False)
        answer = tok.decode(dense["tokens"][0].tolist())
        samples.append(Sample("passkey", base.ids, (answer,), 64, 0.5, base.max_new_tokens))
    whole = HeadPlan.uniform(2, 2, HeadPolicy.full(), 2, name="whole")
    short = HeadPlan.uniform(2, 2, HeadPolicy.stream(0, 2), 2, name="short")
    votes = M.split_votes(model, tok, [whole, short], samples)
    assert votes[0] == 3.0 and votes[1] < 3.0
