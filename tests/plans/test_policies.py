"""Each plan policy class on its own (cache kept, prompt, decode step) and its op, against float64 references
whose masks are written here from positions (never from the policies' own pattern or selection code)."""

import pytest
import torch
import torch.nn.functional as F

from attnlab import ops
from attnlab.core.reference import reference_attention
from attnlab.plans import HeadPlan, HeadPolicy, PlanLayer, PlanRunner, kinds, policy_class
from attnlab.plans.policies import Drop, Full, Snap, Stream, TopK

SCALE = 0.3


def qkv(B, H, Hkv, T, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, h, T, D, generator=g, dtype=torch.float64) for h in (H, Hkv, Hkv))


def ref(q, k, v, allowed):
    """float64 softmax attention restricted to ``allowed`` (B or 1, H or 1, Tq, Tk); empty rows give 0."""
    return reference_attention(q, k, v, scale=SCALE, q_offset=k.shape[2] - q.shape[2], mask=allowed)


def causal(Tq, Tk):
    qpos = torch.arange(Tk - Tq, Tk).view(Tq, 1)
    return (torch.arange(Tk).view(1, Tk) <= qpos).view(1, 1, Tq, Tk)


def stream_rule(Tq, Tk, sinks, window):
    qpos = torch.arange(Tk - Tq, Tk).view(Tq, 1)
    kpos = torch.arange(Tk).view(1, Tk)
    return ((kpos <= qpos) & ((kpos < sinks) | (qpos - kpos < window))).view(1, 1, Tq, Tk)


def run_calls(policies, q_per_kv, q, k, v, bounds):
    """Feed ``bounds`` = [(start, end), ...] through one PlanLayer + PlanRunner; returns outputs and the layer."""
    layer = PlanLayer(tuple(policies))
    runner = PlanRunner(HeadPlan((tuple(policies),), q_per_kv=q_per_kv))
    outs = []
    for a, b in bounds:
        lkv, _ = layer.update(k[:, :, a:b], v[:, :, a:b])
        outs.append(runner.attend(0, None, q[:, :, a:b], lkv, lkv, mask=None, scale=SCALE, q_offset=a))
    return outs, layer, runner


CALLS = [(0, 13), (13, 30), (30, 31), (31, 32), (32, 33), (33, 34)]  # chunked prompt, then decode steps


# ---- the registry and the vocabulary ------------------------------------------------------------------------
def test_kinds_constructors_and_errors():
    assert kinds()[:5] == ("full", "stream", "snap", "topk", "drop")
    assert HeadPolicy("stream", sinks=1, window=3) == Stream(1, 3) == HeadPolicy.stream(1, 3)
    assert isinstance(HeadPolicy.snap(8, 4), Snap) and isinstance(HeadPolicy.topk(2, 4), TopK)
    assert HeadPolicy() == Full() and HeadPolicy.drop() == Drop()
    assert len({policy_class(k).symbol for k in kinds()}) == len(kinds())
    with pytest.raises(ValueError, match="kind"):
        HeadPolicy("sparse")
    with pytest.raises(ValueError, match="no option 'windw'"):
        HeadPolicy("stream", windw=3)
    with pytest.raises(ValueError, match="'page' was renamed to 'block'"):
        HeadPolicy.from_dict({"kind": "topk", "pages": 2, "page": 8})
    with pytest.raises(ValueError, match="budget"):
        Snap(budget=0)
    for kind in kinds()[:5]:
        p = policy_class(kind)()
        assert HeadPolicy.from_dict(p.as_dict()) == p and hash(p) == hash(HeadPolicy.from_dict(p.as_dict()))
        spec = ops.get(p.op)
        assert spec.family == ("dense" if kind == "full" else "cache")
        assert set(p.op_options()) <= set(spec.options)


# ---- each policy: what the cache keeps and what the calls compute ---------------------------------------------
def test_full_keeps_everything_and_is_causal():
    q, k, v = qkv(1, 4, 2, 34)
    outs, layer, _ = run_calls([Full(), Full()], 2, q, k, v, CALLS)
    for (a, b), o in zip(CALLS, outs):
        assert (o - ref(q[:, :, a:b], k[:, :, :b], v[:, :, :b], causal(b - a, b))).abs().max() < 1e-12
    assert layer.held_positions() == 2 * 34


def test_stream_truncates_its_cache_and_stays_exact():
    sinks, window = 2, 5
    q, k, v = qkv(2, 2, 1, 34, seed=1)
    layer = PlanLayer((Stream(sinks, window),))
    runner = PlanRunner(HeadPlan(((Stream(sinks, window),),), q_per_kv=2))
    for a, b in CALLS:
        lkv, _ = layer.update(k[:, :, a:b], v[:, :, a:b])
        g = lkv.groups[0]
        if g.buffer_len < b:  # the buffer is [sinks | recent | new] at these absolute positions
            pos = torch.cat([torch.arange(sinks), torch.arange(b - (g.buffer_len - sinks), b)])
            assert torch.equal(g.positions(), pos) and torch.equal(g.keys, k[:, :, pos])
        out = runner.attend(0, None, q[:, :, a:b], lkv, lkv, mask=None, scale=SCALE)
        expect = ref(q[:, :, a:b], k[:, :, :b], v[:, :, :b], stream_rule(b - a, b, sinks, window))
        assert (out - expect).abs().max() < 1e-12
        assert layer.held_positions() == min(b, sinks + window - 1)
    assert layer.nbytes() == 2 * 2 * (sinks + window - 1) * 8 * 8  # keys + values, float64


def _pool(x, kernel):
    """max over the ``kernel`` neighbours of each position (clipped at the ends), written out."""
    r = kernel // 2
    return torch.stack([x[..., max(0, i - r): i + r + 1].amax(-1) for i in range(x.shape[-1])], dim=-1)


def _window_scores(q, k, window, prompt):
    """SnapKV's scores written out: the last ``window`` prompt queries' softmax (causal), summed over rows and heads."""
    s = (q[0, :, prompt - window: prompt] @ k[0, 0, :prompt].T) * SCALE
    s = s.masked_fill(~causal(window, prompt)[0], float("-inf"))
    return torch.softmax(s, -1).sum(dim=(0, 1))


def _check_decode_over(layer, runner, q, k, v, kept, prompt):
    """The decode calls after the prompt attend to exactly ``kept`` prompt positions + everything after it."""
    for a, b in CALLS[2:]:
        lkv, _ = layer.update(k[:, :, a:b], v[:, :, a:b])
        out = runner.attend(0, None, q[:, :, a:b], lkv, lkv, mask=None, scale=SCALE)
        allowed = torch.zeros(1, 1, 1, b, dtype=torch.bool)
        allowed[..., kept + list(range(prompt, b))] = True
        assert (out - ref(q[:, :, a:b], k[:, :, :b], v[:, :, :b], allowed)).abs().max() < 1e-12
        yield b


def test_snap_records_the_window_then_keeps_budget_plus_window():
    budget, window, kernel = 4, 3, 3
    prompt = 30
    q, k, v = qkv(1, 2, 1, 34, seed=2)
    pol = Snap(budget, window, kernel)
    layer = PlanLayer((pol,))
    runner = PlanRunner(HeadPlan(((pol,),), q_per_kv=2))
    for a, b in CALLS[:2]:
        lkv, _ = layer.update(k[:, :, a:b], v[:, :, a:b])
        out = runner.attend(0, None, q[:, :, a:b], lkv, lkv, mask=None, scale=SCALE)
        assert (out - ref(q[:, :, a:b], k[:, :, :b], v[:, :, :b], causal(b - a, b))).abs().max() < 1e-12
    # the recorded scores: attention of the last `window` prompt queries, summed over rows and query heads
    expect = _window_scores(q, k, window, prompt)
    assert (layer.groups[0].state["_scores"][0, 0] - expect).abs().max() < 1e-5
    pooled = _pool(expect[: prompt - window], kernel)
    kept = sorted(pooled.topk(budget).indices.tolist()) + list(range(prompt - window, prompt))
    for b in _check_decode_over(layer, runner, q, k, v, kept, prompt):
        assert layer.held_positions() == budget + window + (b - prompt)


def _chunk_reference(scores, budget, chunk):
    """ChunkKV's selection written out: chunks of ``chunk`` positions from 0 ranked by summed score, taken whole
    until the budget; the last one taken keeps its best positions."""
    L = len(scores)
    chunks = [list(range(a, min(a + chunk, L))) for a in range(0, L, chunk)]
    ranked = sorted(chunks, key=lambda c: -sum(scores[i] for i in c))
    kept = []
    for c in ranked:
        room = budget - len(kept)
        kept += c if len(c) <= room else sorted(c, key=lambda i: -scores[i])[:room]
        if len(kept) == budget:
            break
    return sorted(kept)


@pytest.mark.parametrize("budget,chunk,L", [(8, 4, 30), (10, 4, 30), (3, 5, 23), (4, 3, 8), (7, 10, 41)])
def test_chunk_selection_keeps_the_best_whole_chunks(budget, chunk, L):
    from attnlab.plans.policies.snap import chunk_top, snap_select

    g = torch.Generator().manual_seed(budget * 100 + L)
    scores = torch.rand(2, 3, L, generator=g, dtype=torch.float64)
    got = chunk_top(scores, budget, chunk).sort(-1).values
    for b in range(2):
        for h in range(3):
            assert got[b, h].tolist() == _chunk_reference(scores[b, h].tolist(), budget, chunk)
    # through snap_select: the last `window` positions are kept as well, and chunk=1 is SnapKV's top-k
    keep = snap_select(scores, L, budget=budget, window=2, kernel=1, chunk=chunk)
    assert keep[0, 0].tolist() == _chunk_reference(scores[0, 0, : L - 2].tolist(), budget, chunk) + [L - 2, L - 1]
    plain = snap_select(scores, L, budget=budget, window=2, kernel=1, chunk=1)
    assert plain[0, 0, :budget].tolist() == sorted(scores[0, 0, : L - 2].topk(budget).indices.tolist())


def test_chunk_selection_breaks_ties_by_whole_chunks():
    """Chunks of equal score are taken whole, the earlier first (not their best keys interleaved)."""
    from attnlab.plans.policies.snap import chunk_top

    scores = torch.tensor([[[1.0, 0.0, 0.0, 1.0, 0.0, 0.0]]])
    assert chunk_top(scores, 2, 2).sort(-1).values.tolist() == [[[0, 1]]]
    assert chunk_top(scores, 3, 2).sort(-1).values.tolist() == [[[0, 1, 3]]]
    assert chunk_top(torch.zeros(1, 1, 7), 4, 3).sort(-1).values.tolist() == [[[0, 1, 2, 3]]]


def test_chunk_selection_keeps_a_needle_that_token_selection_splits():
    """A 6-token needle whose first token is attended most and whose tail barely: top-k keeps 3 of its tokens,
    chunks of 6 aligned with it keep all of them."""
    from attnlab.plans.policies.snap import snap_select

    scores = torch.full((1, 1, 40), 0.05, dtype=torch.float64)
    scores[0, 0, 12:18] = torch.tensor([3.0, 1.0, 0.5, 0.01, 0.01, 0.01])
    scores[0, 0, [2, 25, 31]] = 0.6  # three distractors beat the needle's tail token by token
    tok = snap_select(scores, 40, budget=6, window=2, kernel=1, chunk=1)[0, 0, :6].tolist()
    assert set(range(12, 18)) - set(tok) == {15, 16, 17}
    chunked = snap_select(scores, 40, budget=6, window=2, kernel=1, chunk=6)[0, 0, :6].tolist()
    assert chunked == list(range(12, 18))


def test_snap_policy_with_chunks_decodes_over_the_chunks_it_kept():
    budget, window, chunk, prompt = 6, 3, 3, 30
    q, k, v = qkv(1, 2, 1, 34, seed=5)
    pol = Snap(budget, window, 1, chunk)
    assert pol.label() == "snap(6/3)c3" and HeadPolicy.from_dict(pol.as_dict()) == pol
    layer = PlanLayer((pol,))
    runner = PlanRunner(HeadPlan(((pol,),), q_per_kv=2))
    for a, b in CALLS[:2]:
        lkv, _ = layer.update(k[:, :, a:b], v[:, :, a:b])
        runner.attend(0, None, q[:, :, a:b], lkv, lkv, mask=None, scale=SCALE)
    expect = _window_scores(q, k, window, prompt)
    kept = _chunk_reference(expect[: prompt - window].tolist(), budget, chunk) + list(range(prompt - window, prompt))
    assert len(list(_check_decode_over(layer, runner, q, k, v, kept, prompt))) == len(CALLS) - 2
    with pytest.raises(ValueError, match="chunk"):
        Snap(budget, window, 1, 0)
    with pytest.raises(ValueError, match="'chunk'"):
        ops.get("snap")(q, k, v, scale=SCALE, chunk=0)


def test_snap_compresses_once_then_a_second_turn_appends():
    """Shared-context multi-turn (SCBench): the prompt is compressed at the first decode step; a later multi-row
    call (the next turn's question) and its decode steps attend to the kept keys plus everything after the first
    prompt, and nothing is selected again (a second selection over the held buffer used to crash)."""
    budget, window, kernel = 4, 3, 3
    prompt = 30
    q, k, v = qkv(1, 2, 1, 44, seed=5)
    pol = Snap(budget, window, kernel)
    layer = PlanLayer((pol,))
    runner = PlanRunner(HeadPlan(((pol,),), q_per_kv=2))
    calls = [(0, 13), (13, 30), (30, 31), (31, 32), (32, 40), (40, 41), (41, 42), (42, 44)]
    kept = None
    for a, b in calls:
        lkv, _ = layer.update(k[:, :, a:b], v[:, :, a:b])
        out = runner.attend(0, None, q[:, :, a:b], lkv, lkv, mask=None, scale=SCALE)
        if a == prompt:
            kept = layer.groups[0].state["_kept"][0, 0].tolist()
        if kept is None:
            allowed = causal(b - a, b)
        else:
            allowed = torch.zeros(1, 1, b - a, b, dtype=torch.bool)
            allowed[..., kept + list(range(prompt, b))] = True
            allowed &= causal(b - a, b)
            assert layer.held_positions() == budget + window + (b - prompt)
            assert layer.groups[0].state["_kept"][0, 0].tolist() == kept  # selected once
        assert (out - ref(q[:, :, a:b], k[:, :, :b], v[:, :, :b], allowed)).abs().max() < 1e-12


def test_topk_page_extrema_follow_chunks_and_decode_reads_top_pages():
    pages, block = 2, 4
    q, k, v = qkv(1, 2, 1, 34, seed=3)
    pol = TopK(pages, block)
    outs, layer, _ = run_calls([pol], 2, q, k, v, CALLS)
    st = layer.groups[0].state
    for p, s in enumerate(range(0, 34, block)):
        assert torch.equal(st["kmax"][0, 0, p], k[0, 0, s: s + block].amax(0))
        assert torch.equal(st["kmin"][0, 0, p], k[0, 0, s: s + block].amin(0))
    assert layer.nbytes() == (2 * 34 + 2 * 9) * 8 * 8  # keys, values and the page summaries are held
    for (a, b), o in zip(CALLS, outs):
        if b - a > 1:
            allowed = causal(b - a, b)
        else:  # the decode step: the `pages` pages of highest bound (the current page always)
            starts = list(range(0, b, block))
            bound = [max(float(torch.maximum(q[0, h, a] * k[0, 0, s: s + block].amax(0),
                                             q[0, h, a] * k[0, 0, s: s + block].amin(0)).sum()) for h in range(2))
                     for s in starts]
            bound[-1] = float("inf")
            allowed = torch.zeros(1, 1, 1, b, dtype=torch.bool)
            for i in sorted(range(len(starts)), key=lambda i: -bound[i])[:pages]:
                allowed[..., starts[i]: starts[i] + block] = True
        assert (o - ref(q[:, :, a:b], k[:, :, :b], v[:, :, :b], allowed)).abs().max() < 1e-12


def test_drop_holds_nothing_and_outputs_zero_beside_other_heads():
    q, k, v = qkv(1, 4, 2, 34, seed=4)
    outs, layer, _ = run_calls([Drop(), Full()], 2, q, k, v, CALLS)
    for (a, b), o in zip(CALLS, outs):
        assert o[:, :2].abs().max() == 0
        assert (o[:, 2:] - ref(q[:, 2:, a:b], k[:, 1:, :b], v[:, 1:, :b], causal(b - a, b))).abs().max() < 1e-12
    assert layer.groups[0].nbytes() == 0 and layer.held_positions() == 34


def test_weights_path_equals_each_policy_fast_path():
    """attend_weights (one masked softmax over runner.weights_mask and LayerKV.dense) equals attend, for every
    policy, in the prompt and after the caches compressed (snap evicted, quest selecting, stream slid)."""
    pols = (Full(), Stream(2, 5), Snap(4, 3, 3), TopK(2, 4), Drop())
    q, k, v = qkv(2, 10, 5, 34, seed=5)
    layer = PlanLayer(pols)
    runner = PlanRunner(HeadPlan((pols,), q_per_kv=2))
    for a, b in CALLS:
        lkv, _ = layer.update(k[:, :, a:b], v[:, :, a:b])
        w = runner.attend_weights(0, q[:, :, a:b], lkv, mask=None, scale=SCALE)
        o = runner.attend(0, None, q[:, :, a:b], lkv, lkv, mask=None, scale=SCALE)
        assert (w - o).abs().max() < 1e-12
        m = runner.weights_mask(0, q[:, :, a:b], lkv)
        assert m.shape[1:] == (10, b - a, b) and not m[:, 8:].any()  # dropped heads attend nothing
        dk, _ = runner.dense_kv(0, lkv)
        assert torch.equal(runner.weights_mask(0, q[:, :, a:b], dk), m)  # dense keys map back to the cache


def test_padding_mask_with_a_compressed_snap_cache():
    """A free mask over absolute keys reaches a snap buffer through its kept positions (per head)."""
    pol = Snap(4, 3, 3)
    q, k, v = qkv(2, 2, 2, 32, seed=6)
    outs, layer, runner = run_calls([pol, pol], 1, q, k, v, CALLS[:3])
    lkv, _ = layer.update(k[:, :, 31:32], v[:, :, 31:32])
    mask = torch.ones(2, 1, 1, 32, dtype=torch.bool)
    mask[1, ..., :6] = False
    out = runner.attend(0, None, q[:, :, 31:32], lkv, lkv, mask=mask, scale=SCALE)
    held = runner.weights_mask(0, q[:, :, 31:32], lkv)
    assert held.sum(-1).max() == 4 + 3 + 2
    expect = ref(q[:, :, 31:32], k, v, held & mask)
    assert (out - expect).abs().max() < 1e-12


# ---- the ops each policy file registers ------------------------------------------------------------------------
def test_stream_op_against_reference_and_option_errors():
    spec = ops.get("stream")
    q, k, v = qkv(2, 4, 2, 150, seed=7)
    for Tq in (150, 20, 1):  # sparse tiles, a dense masked call, one decode row
        out = spec(q[:, :, 150 - Tq:], k, v, scale=SCALE, sinks=3, window=17)
        expect = ref(q[:, :, 150 - Tq:], k, v, stream_rule(Tq, 150, 3, 17))
        assert (out - expect).abs().max() < 1e-12
    mask = torch.rand(2, 1, 150, 150, generator=torch.Generator().manual_seed(0)) > 0.3
    out = spec(q, k, v, scale=SCALE, mask=mask, sinks=3, window=17)
    assert (out - ref(q, k, v, stream_rule(150, 150, 3, 17) & mask)).abs().max() < 1e-12
    assert torch.equal(spec.weights_mask(q, k, q_offset=0, sinks=3, window=17), stream_rule(150, 150, 3, 17))
    dense = spec(q, k, v, scale=SCALE, **spec.dense_options)
    assert (dense - ref(q, k, v, causal(150, 150))).abs().max() < 1e-12
    with pytest.raises(ValueError, match="'window'"):
        spec(q, k, v, window=0)
    with pytest.raises(ValueError, match="no option 'windw'"):
        spec(q, k, v, windw=4)


def test_drop_op_is_zero_and_its_weights_are_empty():
    q, k, v = qkv(1, 2, 1, 9)
    spec = ops.get("drop")
    assert spec(q, k, v).abs().max() == 0
    assert not spec.weights_mask(q, k, q_offset=0).any()
    out, st = spec(q, k, v, state=ops.OpState())
    assert out.shape == (1, 2, 9, 8) and out.abs().max() == 0


def test_snap_op_decodes_over_what_it_kept_like_the_policy():
    spec = ops.get("snap")
    opts = {"budget": 4, "window": 3, "kernel": 3}
    q, k, v = qkv(1, 2, 1, 34, seed=2)
    st = ops.OpState()
    policy_outs, _, _ = run_calls([Snap(**opts)], 2, q, k, v, CALLS)
    for (a, b), po in zip(CALLS, policy_outs):
        out, st = spec(q[:, :, a:b], k[:, :, :b], v[:, :, :b], scale=SCALE, q_offset=a, state=st, **opts)
        assert (out - po).abs().max() < 1e-12
        wm = spec.weights_mask(q[:, :, a:b], k[:, :, :b], q_offset=a, state=st, **opts)
        assert (out - ref(q[:, :, a:b], k[:, :, :b], v[:, :, :b], wm)).abs().max() < 1e-12
    assert st["kept"].shape == (1, 1, 7)
    # stateless it is causal attention
    assert (spec(q, k, v, scale=SCALE, **opts) - ref(q, k, v, causal(34, 34))).abs().max() < 1e-12


def test_quest_op_matches_the_policy_and_its_weights_mask():
    spec = ops.get("quest")
    opts = {"pages": 2, "block": 4}
    q, k, v = qkv(1, 2, 1, 34, seed=3)
    policy_outs, _, _ = run_calls([TopK(**opts)], 2, q, k, v, CALLS)
    st = ops.OpState()
    for (a, b), po in zip(CALLS, policy_outs):
        out, st = spec(q[:, :, a:b], k[:, :, :b], v[:, :, :b], scale=SCALE, q_offset=a, state=st, **opts)
        stateless = spec(q[:, :, a:b], k[:, :, :b], v[:, :, :b], scale=SCALE, q_offset=a, **opts)
        assert (out - po).abs().max() < 1e-12 and (stateless - po).abs().max() < 1e-12
        wm = spec.weights_mask(q[:, :, a:b], k[:, :, :b], q_offset=a, **opts)
        assert (out - ref(q[:, :, a:b], k[:, :, :b], v[:, :, :b], wm)).abs().max() < 1e-12
    with pytest.raises(ValueError, match="'pages'"):
        spec(q, k, v, pages=0)


def test_quest_bound_is_an_upper_bound():
    """q.max(q*kmax, q*kmin) summed over dims bounds every score of the page (why skipping pages is safe)."""
    from attnlab.plans.policies.topk import page_extrema

    q, k, _ = qkv(1, 1, 1, 40, seed=8)
    kmax, kmin = page_extrema(k, 8)
    bound = torch.maximum(q[0, 0, -1] * kmax[0, 0], q[0, 0, -1] * kmin[0, 0]).sum(-1)
    scores = (k[0, 0] @ q[0, 0, -1]).view(5, 8)
    assert bool((scores <= bound.view(5, 1) + 1e-12).all())
    assert F.relu(scores.amax(-1) - bound).max() == 0


def test_every_file_of_the_policies_package_registers_its_policy():
    """A new policy is one file: the package imports every module in it (none is listed anywhere else)."""
    import pkgutil

    import attnlab.plans.policies as P

    files = {m.name for m in pkgutil.iter_modules(P.__path__)} - {"base"}
    owners = {policy_class(k).__module__ for k in kinds()}
    assert {f"{P.__name__}.{f}" for f in files} <= owners and len(files) >= 5


def test_look_ahead_adds_the_pseudo_queries_attention_to_the_scores_of_scoring_policies():
    """PlanRunner.look_ahead routes each kv head's query heads to its policy: SnapKV and Ada-KV add the
    rows' softmax over the prompt keys (every key visible) to their recorded scores; a streaming head ignores
    them. Written out in float64 per kv head."""
    from attnlab.plans.policies import policy_class

    prompt, G, window = 20, 3, 4
    q, k, v = qkv(1, 6, 3, prompt, seed=11)
    qa = torch.randn(1, 6, G, 8, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    ada = policy_class("ada")(budget=6, window=window, kernel=1, alpha=0.5)
    pols = (Snap(6, window, 1), Stream(2, 6), ada)
    layer = PlanLayer(pols)
    runner = PlanRunner(HeadPlan((pols,), q_per_kv=2))
    lkv, _ = layer.update(k, v)
    runner.observe(q, lkv, scale=SCALE)
    before = {i: g.slot.state.get("_scores") for i, g in enumerate(lkv.groups)}
    before = {i: None if t is None else t.clone() for i, t in before.items()}
    runner.look_ahead(qa, lkv, scale=SCALE)
    for i, g in enumerate(lkv.groups):
        h = int(g.index[0])
        if isinstance(g.policy, Stream):
            assert "_scores" not in g.slot.state
            continue
        att = torch.softmax((qa[0, 2 * h: 2 * h + 2] @ k[0, h].T) * SCALE, -1).sum(dim=(0, 1))
        assert (g.slot.state["_scores"][0, 0].double() - before[i][0, 0].double() - att).abs().max() < 1e-5
