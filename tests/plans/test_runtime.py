"""The per-head runtime and cache on a tiny random Llama: exact against dense references."""

import pytest
import torch

from attnlab.core.patterns import Causal
from attnlab.core.reference import reference_attention
from attnlab.core.sparse import DEFAULT_Q_BLOCK
from attnlab.models.hf import attnlab_attention
from attnlab.plans.cache import PlanCache, dense_cache_bytes
from attnlab.plans.plan import HeadPlan, HeadPolicy
from attnlab.plans.runtime import PlanRunner, greedy_generate, stream_group, use_plan

T = 200
IDS = torch.randint(0, 128, (1, T), generator=torch.Generator().manual_seed(1))


def stream_plan(sinks=2, window=16):
    s = HeadPolicy.stream(sinks, window)
    return HeadPlan(((HeadPolicy.full(), s), (s, HeadPolicy.drop())), q_per_kv=2, name="mix")


def reference_logits(model, plan, ids):
    """Every layer through the float64 oracle with the plan's per-head pattern; dropped heads zeroed."""
    def fn(module, q, k, v, mask, scaling, layer_idx):
        pat = plan.layer_pattern(layer_idx)
        out = reference_attention(q, k, v, pat, None, scaling, k.shape[2] - q.shape[2]).to(q.dtype)
        dropped = [p.kind == "drop" for p in plan.policies[layer_idx] for _ in range(plan.q_per_kv)]
        keep = 1.0 - torch.tensor(dropped, dtype=out.dtype)
        return out * keep.view(1, -1, 1, 1)

    with torch.no_grad(), attnlab_attention(model, fn):
        return model(input_ids=ids, use_cache=False).logits


def test_all_full_plan_equals_native(tiny):
    plan = HeadPlan.uniform(2, 2, HeadPolicy.full(), 2)
    with torch.no_grad():
        ref = tiny(input_ids=IDS).logits
        with use_plan(tiny, plan):
            out = tiny(input_ids=IDS, cache=PlanCache(plan), use_cache=True).logits
    assert (out - ref).abs().max() < 1e-5


def test_mixed_plan_matches_reference(tiny):
    plan = stream_plan()
    ref = reference_logits(tiny, plan, IDS)
    with torch.no_grad(), use_plan(tiny, plan):
        out = tiny(input_ids=IDS, use_cache=False).logits
        cached = tiny(input_ids=IDS, cache=PlanCache(plan), use_cache=True).logits
        native = tiny(input_ids=IDS).logits
    assert (out - ref).abs().max() < 1e-4
    assert (cached - ref).abs().max() < 1e-4
    with torch.no_grad():
        assert (tiny(input_ids=IDS).logits - ref).abs().max() > 1e-2  # the plan really changes the model
    assert (native - ref).abs().max() < 1e-4


def test_mixed_layers_prefill_in_one_per_head_call_then_decode(tiny, monkeypatch):
    """A layer mixing full and stream heads runs its first call as one per-head pattern call (no head split);
    the result, and decoding from the cache that call filled, equal the float64 reference."""
    import attnlab.plans.runtime as rt

    s = HeadPolicy.stream(2, 16)
    plan = HeadPlan(((HeadPolicy.full(), s), (s, HeadPolicy.full())), q_per_kv=2, name="mix2")
    ref = reference_logits(tiny, plan, IDS)
    calls = []
    real = rt.attention
    monkeypatch.setattr(rt, "attention", lambda *a, **kw: (calls.append(kw["pattern"]), real(*a, **kw))[1])
    cache = PlanCache(plan)
    with torch.no_grad(), use_plan(tiny, plan):
        outs = [tiny(input_ids=IDS[:, :150], cache=cache, use_cache=True).logits]
        for t in range(150, T):
            outs.append(tiny(input_ids=IDS[:, t:t + 1], cache=cache, use_cache=True).logits)
    assert len(calls) == 2  # one per layer, prefill only
    assert [p.patterns[::2] for p in calls] == [(Causal(), s.pattern()), (s.pattern(), Causal())]
    assert (torch.cat(outs, 1) - ref).abs().max() < 1e-4
    assert cache.held_positions() == plan.kv_positions(T)


def test_chunked_prefill_and_decode_match_reference(tiny):
    plan = stream_plan()
    ref = reference_logits(tiny, plan, IDS)
    cache = PlanCache(plan)
    outs = []
    with torch.no_grad(), use_plan(tiny, plan):
        for a, b in ((0, 70), (70, 150), (150, 190)):  # chunks, some smaller than the window
            outs.append(tiny(input_ids=IDS[:, a:b], cache=cache, use_cache=True).logits)
        for t in range(190, T):  # decode one token at a time
            outs.append(tiny(input_ids=IDS[:, t:t + 1], cache=cache, use_cache=True).logits)
    got = torch.cat(outs, 1)
    assert (got - ref).abs().max() < 1e-4
    # streaming heads hold sinks + window - 1 positions, full heads everything, dropped heads nothing
    assert cache.held_positions() == plan.kv_positions(T) == T + 17 + 17
    assert cache.nbytes() == plan.kv_bytes(T, head_dim=16)
    assert cache.nbytes() < 0.5 * dense_cache_bytes(2, 2, T, 16)


def test_snap_keeps_budget_and_recent(tiny):
    plan = HeadPlan.uniform(2, 2, HeadPolicy.snap(budget=24, window=8, kernel=3), 2)
    res = greedy_generate(tiny, IDS, plan, max_new_tokens=5)
    # prompt compressed to 24 + 8 at the first decode step, then 4 more tokens appended
    assert res["kv_positions"] == 4 * (24 + 8 + 4)
    cache = PlanCache(plan)
    with torch.no_grad(), use_plan(tiny, plan):
        tiny(input_ids=IDS, cache=cache, use_cache=True)
        g = cache.layers[0].groups[0]
        scores = g.state["_scores"].clone()
        tiny(input_ids=IDS[:, :1], cache=cache, use_cache=True)
    assert scores.shape == (1, 2, T)
    # the kept prompt keys are the recent window plus prompt keys with top pooled scores
    assert g.keys.shape[2] == 24 + 8 + 1


def test_topk_pages_equal_full_when_all_pages_fit_and_differ_when_few(tiny):
    full = HeadPlan.uniform(2, 2, HeadPolicy.full(), 2)
    many = HeadPlan.uniform(2, 2, HeadPolicy.topk(pages=64, block=8), 2)  # 64 * 8 >= T: every page read
    few = HeadPlan.uniform(2, 2, HeadPolicy.topk(pages=2, block=8), 2)
    logits = {}
    for name, plan in (("full", full), ("many", many), ("few", few)):
        cache = PlanCache(plan)
        with torch.no_grad(), use_plan(tiny, plan):
            tiny(input_ids=IDS[:, :-1], cache=cache, use_cache=True)
            logits[name] = tiny(input_ids=IDS[:, -1:], cache=cache, use_cache=True).logits
    assert (logits["many"] - logits["full"]).abs().max() < 1e-5
    assert (logits["few"] - logits["full"]).abs().max() > 1e-4


def test_quest_reads_the_top_bound_pages():
    """One decode step of a topk group equals dense attention over the pages with the highest bound."""
    from attnlab.plans.cache import PlanLayer

    torch.manual_seed(3)
    layer = PlanLayer((HeadPolicy.topk(pages=3, block=4),))
    k = torch.randn(1, 1, 37, 8)
    v = torch.randn(1, 1, 37, 8)
    layer.update(k[:, :, :36], v[:, :, :36])
    lkv, _ = layer.update(k[:, :, 36:], v[:, :, 36:])
    q = torch.randn(1, 2, 1, 8)
    runner = PlanRunner(HeadPlan(((HeadPolicy.topk(pages=3, block=4),),), q_per_kv=2))
    out = runner.attend(0, None, q, lkv, lkv, mask=None, scale=0.3)
    # independent selection: bound per page = sum_d max(q*max, q*min), max over the 2 query heads
    pages = [k[0, 0, i:i + 4] for i in range(0, 37, 4)]
    bound = torch.stack([torch.stack([torch.maximum(q[0, h, 0] * p.amax(0), q[0, h, 0] * p.amin(0)).sum()
                                      for p in pages]) for h in range(2)]).amax(0)
    bound[-1] = float("inf")
    chosen = sorted(bound.topk(3).indices.tolist())
    keys = torch.cat([torch.arange(i * 4, min(37, i * 4 + 4)) for i in chosen])
    ref = torch.softmax((q[0, :, 0] @ k[0, 0, keys].T) * 0.3, -1) @ v[0, 0, keys]
    assert (out[0, :, 0] - ref).abs().max() < 1e-5


def test_padding_mask_is_respected():
    """With a mask the runner computes pattern AND mask exactly, streaming gap included."""
    from attnlab.plans.cache import PlanLayer

    torch.manual_seed(4)
    pol = HeadPolicy.stream(2, 6)
    layer = PlanLayer((pol, HeadPolicy.full()))
    k, v = torch.randn(2, 2, 30, 8), torch.randn(2, 2, 30, 8)
    layer.update(k[:, :, :25], v[:, :, :25])
    lkv, _ = layer.update(k[:, :, 25:], v[:, :, 25:])
    q = torch.randn(2, 2, 5, 8)
    mask = torch.ones(2, 1, 5, 30, dtype=torch.bool)
    mask[1, :, :, :3] = False  # row 1 is left-padded by 3
    mask[1, :, :, 27] = False
    runner = PlanRunner(HeadPlan(((pol, HeadPolicy.full()),), q_per_kv=1))
    out = runner.attend(0, None, q, lkv, lkv, mask=mask, scale=0.35)
    qpos = torch.arange(25, 30).view(5, 1)
    kpos = torch.arange(30).view(1, 30)
    for b in range(2):
        for h, allowed in enumerate([(kpos <= qpos) & ((kpos < 2) | (qpos - kpos < 6)), kpos <= qpos]):
            a = allowed & mask[b, 0]
            s = (q[b, h] @ k[b, h].T * 0.35).masked_fill(~a, float("-inf"))
            ref = torch.softmax(s, -1) @ v[b, h]
            assert (out[b, h] - ref).abs().max() < 1e-5


def test_runner_rejects_wrong_plan(tiny):
    with pytest.raises(ValueError, match="plan"):
        use_plan(tiny, HeadPlan.uniform(3, 2, HeadPolicy.full(), 2))


def test_stream_group_follows_the_window():
    cpu = torch.device("cpu")
    groups = [stream_group(w, cpu) for w in (16, 128, 256, 512, 4096)]
    assert groups == sorted(groups) and groups[0] == 32 and groups[2] == 64  # a tile reads window + rows - 1 keys
    assert all(g & (g - 1) == 0 and g <= DEFAULT_Q_BLOCK["cpu"] for g in groups)


def test_stream_prefill_with_small_tiles_matches_reference():
    from attnlab.core.patterns import Causal, Sinks, SlidingWindow

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 300, 16, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    s = HeadPolicy.stream(4, 40)
    runner = PlanRunner(HeadPlan(((s, s),), q_per_kv=2))
    out = runner.attend(0, None, q, k, v, mask=None, scale=0.25, q_offset=0)
    ref = reference_attention(q, k, v, pattern=Causal() & (Sinks(4) | SlidingWindow(40)), scale=0.25)
    assert (out - ref).abs().max() < 1e-12


def test_removed_interventions_option_names_the_new_way(tiny):
    plan = HeadPlan.uniform(2, 2, HeadPolicy.full(), 2)
    for call in (lambda: PlanRunner(plan, interventions=[]), lambda: use_plan(tiny, plan, interventions=[]),
                 lambda: greedy_generate(tiny, IDS, plan, interventions=[])):
        with pytest.raises(ValueError, match="'interventions' was removed.*hooks"):
            call()
