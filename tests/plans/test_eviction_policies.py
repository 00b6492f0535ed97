"""The "prefill densely, then compress" eviction policies (knorm, tova, h2o, ada) against float64 references.

Each reference re-derives what the cache must hold from the paper's definition with plain loops over
(batch, kv head) and its own softmax (never the policies' selection, pooling or masking helpers), then checks
the held keys, the decode outputs (``reference_attention`` restricted to those positions), ``kept()`` and the
bytes held.
"""

import math

import pytest
import torch

from attnlab.core.reference import reference_attention
from attnlab.models import hf
from attnlab.plans import HeadPlan, HeadPolicy, PlanLayer, PlanRunner, greedy_generate, kinds, policy_class
from attnlab.plans.policies import Full, Snap
from attnlab.plans.policies.ada import Ada
from attnlab.plans.policies.h2o import H2O
from attnlab.plans.policies.knorm import KNorm
from attnlab.plans.policies.tova import Tova, tova_keep

SCALE = 0.3
PROMPT = 30
CALLS = [(0, 13), (13, 30), (30, 31), (31, 32), (32, 33), (33, 34)]  # a chunked prompt, then 4 decode steps


def qkv(B, H, Hkv, T, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, T, D, generator=g, dtype=torch.float64) for h in (H, Hkv, Hkv)]


def ref(q, k, v, allowed):
    return reference_attention(q, k, v, scale=SCALE, q_offset=k.shape[2] - q.shape[2], mask=allowed)


def causal(Tq, Tk):
    qpos = torch.arange(Tk - Tq, Tk).view(Tq, 1)
    return (torch.arange(Tk).view(1, Tk) <= qpos).view(1, 1, Tq, Tk)


def allowed_from(held, H, T):
    """Bool (B, H, 1, T) from held[b][j] = list of positions per (batch, kv head) (query heads h // (H / n))."""
    B, n = len(held), len(held[0])
    m = torch.zeros(B, H, 1, T, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            m[b, h, 0, held[b][h // (H // n)]] = True
    return m


def weights(qrow, keys):
    """float64 softmax of one query row over the given keys (D,), (K, D) -> (K,)."""
    return torch.softmax((keys @ qrow) * SCALE, dim=-1)


def run(pol, q, k, v, q_per_kv, calls=CALLS):
    layer = PlanLayer((pol,) * k.shape[1])
    runner = PlanRunner(HeadPlan(((pol,) * k.shape[1],), q_per_kv=q_per_kv))
    outs = []
    for a, b in calls:
        lkv, _ = layer.update(k[:, :, a:b], v[:, :, a:b])
        outs.append(runner.attend(0, None, q[:, :, a:b], lkv, lkv, mask=None, scale=SCALE, q_offset=a))
    return outs, layer


def check_prompt(outs, q, k, v):
    for (a, b), o in zip(CALLS[:2], outs[:2]):  # the prompt is dense causal attention
        assert (o - ref(q[:, :, a:b], k[:, :, :b], v[:, :, :b], causal(b - a, b))).abs().max() < 1e-12


def check_held_keys(slot, k, held):
    for b in range(len(held)):
        for j in range(len(held[0])):
            assert torch.equal(slot.keys[b, j], k[b, j, sorted(held[b][j])])


# ---- knorm --------------------------------------------------------------------------------------------------
def test_knorm_keeps_the_lowest_norm_keys_plus_the_window():
    budget, window = 6, 4
    pol = KNorm(budget, window)
    q, k, v = qkv(2, 4, 2, 34, seed=1)
    outs, layer = run(pol, q, k, v, 2)
    check_prompt(outs, q, k, v)
    held = [[sorted(sorted(range(PROMPT - window), key=lambda i: float((k[b, j, i] ** 2).sum()))[:budget])
             + list(range(PROMPT - window, PROMPT)) for j in range(2)] for b in range(2)]
    assert held[0][0] != held[0][1]  # the heads really choose differently
    for (a, b), o in zip(CALLS[2:], outs[2:]):
        now = [[h + list(range(PROMPT, b)) for h in row] for row in held]
        assert (o - ref(q[:, :, a:b], k[:, :, :b], v[:, :, :b], allowed_from(now, 4, b))).abs().max() < 1e-12
    slot = layer.groups[0]
    check_held_keys(slot, k, [[h + list(range(PROMPT, 34)) for h in row] for row in held])
    assert slot.held() == pol.kept(PROMPT) + 4 == budget + window + 4
    assert slot.nbytes() == 2 * 2 * 2 * slot.held() * 8 * 8 < 2 * 2 * 2 * 34 * 8 * 8


# ---- tova ---------------------------------------------------------------------------------------------------
def tova_reference(q, k, budget, g):
    """Per (b, kv head): held positions after the prompt, then after each decode step (and the decode sets)."""
    B, n = k.shape[:2]
    held = [[None] * n for _ in range(B)]
    seen = {t: [[None] * n for _ in range(B)] for t in range(PROMPT, 34)}
    for b in range(B):
        for j in range(n):
            heads = range(j * g, (j + 1) * g)
            cur = list(range(PROMPT))
            for t in range(PROMPT - 1, 34):  # t = PROMPT - 1: the last prompt query decides the prompt's eviction
                if t >= PROMPT:
                    cur = cur + [t]
                    seen[t][b][j] = list(cur)
                if len(cur) > budget:
                    w = sum(weights(q[b, h, t], k[b, j, cur]) for h in heads) / g
                    others = sorted(range(len(cur) - 1), key=lambda i: -float(w[i]))[: budget - 1]
                    cur = sorted(cur[i] for i in others) + [t]
            held[b][j] = cur
    return held, seen


def test_tova_keeps_a_fixed_budget_by_the_current_query():
    budget = 8
    pol = Tova(budget)
    q, k, v = qkv(2, 4, 2, 34, seed=2)
    outs, layer = run(pol, q, k, v, 2)
    check_prompt(outs, q, k, v)
    held, seen = tova_reference(q, k, budget, 2)
    assert held[0][0] != held[0][1]
    for (a, b), o in zip(CALLS[2:], outs[2:]):
        assert len(seen[a][0][0]) == budget + 1  # each step sees budget + itself
        assert (o - ref(q[:, :, a:b], k[:, :, :b], v[:, :, :b], allowed_from(seen[a], 4, b))).abs().max() < 1e-12
    slot = layer.groups[0]
    check_held_keys(slot, k, held)
    assert slot.held() == pol.kept(34) == budget and all(33 in h for row in held for h in row)
    assert slot.nbytes() == 2 * 2 * 2 * budget * 8 * 8


# ---- h2o ----------------------------------------------------------------------------------------------------
def h2o_reference(q, k, budget, recent, g):
    B, n = k.shape[:2]
    held = [[None] * n for _ in range(B)]
    accs = [[None] * n for _ in range(B)]
    seen = {t: [[None] * n for _ in range(B)] for t in range(PROMPT, 34)}
    for b in range(B):
        for j in range(n):
            heads = range(j * g, (j + 1) * g)
            acc = torch.zeros(34, dtype=torch.float64)
            for i in range(PROMPT):  # every prompt query, causal
                for h in heads:
                    acc[: i + 1] += weights(q[b, h, i], k[b, j, : i + 1])
            old = list(range(PROMPT - recent))
            heavy = sorted(old, key=lambda p: -float(acc[p]))[: budget - recent]
            cur = sorted(heavy) + list(range(PROMPT - recent, PROMPT))
            for t in range(PROMPT, 34):
                cur = cur + [t]
                seen[t][b][j] = list(cur)
                for h in heads:
                    acc[cur] += weights(q[b, h, t], k[b, j, cur])
                if len(cur) > budget:
                    cand = [p for p in cur if p <= t - recent]
                    heavy = sorted(cand, key=lambda p: -float(acc[p]))[: budget - recent]
                    cur = sorted(heavy) + [p for p in cur if p > t - recent]
            held[b][j], accs[b][j] = cur, acc[cur]
    return held, accs, seen


def test_h2o_keeps_recent_plus_heavy_hitters_by_accumulated_attention():
    budget, recent = 8, 3
    pol = H2O(budget, recent)
    q, k, v = qkv(2, 4, 2, 34, seed=3)
    q = 4 * q  # sharp attention: the heavy hitters are not just the earliest keys (which every query sees)
    outs, layer = run(pol, q, k, v, 2)
    check_prompt(outs, q, k, v)
    held, accs, seen = h2o_reference(q, k, budget, recent, 2)
    assert held[0][0] != held[0][1]
    for (a, b), o in zip(CALLS[2:], outs[2:]):
        assert len(seen[a][0][0]) == budget + 1
        assert (o - ref(q[:, :, a:b], k[:, :, :b], v[:, :, :b], allowed_from(seen[a], 4, b))).abs().max() < 1e-12
    slot = layer.groups[0]
    check_held_keys(slot, k, held)
    for b in range(2):
        for j in range(2):
            assert (slot.state["acc"][b, j] - accs[b][j]).abs().max() < 1e-10
    assert slot.held() == pol.kept(34) == budget
    # keys + values, plus the accumulators (the method's own memory, float64 here)
    assert slot.nbytes() == 2 * 2 * 2 * budget * 8 * 8 + 2 * 2 * budget * 8


# ---- ada ----------------------------------------------------------------------------------------------------
def pool(x, kernel):
    r = kernel // 2
    return torch.stack([x[..., max(0, i - r): i + r + 1].amax(-1) for i in range(x.shape[-1])], dim=-1)


def ada_reference(q, k, budget, window, kernel, alpha, g):
    """Per (b, kv head) the kept prompt positions, from SnapKV scores and the Ada-KV allocation."""
    B, n = k.shape[:2]
    L = PROMPT - window
    floor = math.floor(alpha * budget)
    held = []
    for b in range(B):
        pooled = []
        for j in range(n):
            s = torch.zeros(PROMPT, dtype=torch.float64)
            for i in range(PROMPT - window, PROMPT):
                for h in range(j * g, (j + 1) * g):
                    s[: i + 1] += weights(q[b, h, i], k[b, j, : i + 1])
            pooled.append(pool(s[:L], kernel))
        chosen = [set(sorted(range(L), key=lambda p: -float(pooled[j][p]))[:floor]) for j in range(n)]
        # ties (max-pooling plateaus): the lower head, then the earlier position
        rest = sorted((-float(pooled[j][p]), j, p) for j in range(n) for p in range(L) if p not in chosen[j])
        for _, j, p in rest[: n * (budget - floor)]:
            chosen[j].add(p)
        held.append([sorted(c) + list(range(L, PROMPT)) for c in chosen])
    return held


def check_ada(pol, q, k, v, g):
    outs, layer = run(pol, q, k, v, g)
    check_prompt(outs, q, k, v)
    held = ada_reference(q, k, pol.budget, pol.window, pol.kernel, pol.alpha, g)
    B, n = k.shape[:2]
    for (a, b), o in zip(CALLS[2:], outs[2:]):
        now = [[h + list(range(PROMPT, b)) for h in row] for row in held]
        assert (o - ref(q[:, :, a:b], k[:, :, :b], v[:, :, :b], allowed_from(now, q.shape[1], b))).abs().max() < 1e-12
    slot = layer.groups[0]
    lens = [[len(h) for h in row] for row in held]
    assert slot.state["lens"].tolist() == lens
    assert all(sum(row) == n * (pol.budget + pol.window) for row in lens)  # the group total is fixed
    # honest bytes: the packed entries (no padding), the generated ones, and the per-head lengths
    C = pol.budget + pol.window
    assert slot.held() == pol.kept(PROMPT) + 4 == C + 4 and layer.held_positions() == n * (C + 4)
    assert slot.nbytes() == 2 * B * n * (C + 4) * 8 * 8 + B * n * 8
    for b in range(B):  # the packed part holds exactly each head's kept keys, in (head, position) order
        packed = torch.cat([k[b, j, held[b][j]] for j in range(n)])
        assert torch.equal(slot.keys[b, :, :C].reshape(n * C, -1), packed)
    return held, outs


def test_ada_allocates_the_group_budget_across_heads_with_a_floor():
    pol = Ada(budget=5, window=3, kernel=3, alpha=0.4)  # floor 2 per head
    q, k, v = qkv(2, 6, 3, 34, seed=4)
    held, _ = check_ada(pol, q, k, v, 2)
    lens = {len(h) for row in held for h in row}
    assert len(lens) > 1 and min(lens) >= 2 + 3  # heads really differ, none below floor + window


def test_ada_with_alpha_one_is_snapkv():
    q, k, v = qkv(1, 4, 2, 34, seed=5)
    check_ada(Ada(budget=4, window=3, kernel=3, alpha=1.0), q, k, v, 2)  # every head exactly its own budget
    # snap breaks max-pooling ties its own way (topk): compare without pooling, where no ties occur
    _, outs = check_ada(Ada(budget=4, window=3, kernel=1, alpha=1.0), q, k, v, 2)
    snap_outs, _ = run(Snap(4, 3, 1), q, k, v, 2)
    for o, s in zip(outs, snap_outs):
        assert (o - s).abs().max() < 1e-12


def test_ada_when_one_head_takes_the_whole_prompt():
    """A uniform head (zero queries) outbids a sharp one for every prefix entry: its buffer covers the whole
    prompt while the other's is padded; attention never sees the padding."""
    window = 3
    q, k, v = qkv(1, 4, 2, 34, seed=6)
    q[:, :2] = 0.0  # kv head 0: uniform attention
    q[:, 2:] = 20.0 * k[:, 1:2, 5]  # kv head 1: every query stares at key 5
    pol = Ada(budget=PROMPT - window - 1, window=window, kernel=1, alpha=0.0)
    held, _ = check_ada(pol, q, k, v, 2)
    assert len(held[0][0]) == PROMPT and len(held[0][1]) == PROMPT - 2


# ---- all four -----------------------------------------------------------------------------------------------
TIGHT = (KNorm(6, 4), Tova(8), H2O(8, 3), Ada(5, 3, 3, 0.4))


def test_kinds_symbols_labels_and_json_round_trip():
    assert {"knorm", "tova", "h2o", "ada"} <= set(kinds())
    symbols = [policy_class(kd).symbol for kd in kinds()]
    assert len(set(symbols)) == len(symbols)
    plan = HeadPlan(((KNorm(), Tova(), H2O(), Ada()), TIGHT), q_per_kv=2, name="evict")
    back = HeadPlan.from_json(plan.to_json())
    assert back == plan and back.policies[1][3].alpha == 0.4
    assert HeadPolicy("h2o", budget=9, recent=2) == H2O(9, 2)
    assert [p.label() for p in TIGHT] == ["knorm(6/4)", "tova(8)", "h2o(8/3)", "ada(5/3,a0.4)"]
    assert plan.grid().splitlines()[2] == "L0 n t H a"
    assert plan.kv_positions(1000) == 288 + 256 + 256 + 288 + 10 + 8 + 8 + 8


@pytest.mark.parametrize("make", [
    lambda: KNorm(budget=0), lambda: KNorm(window=-1), lambda: KNorm(budget=2.5), lambda: Tova(budget=0),
    lambda: Tova(budget=True), lambda: H2O(budget=8, recent=8), lambda: H2O(budget=8, recent=0),
    lambda: Ada(alpha=1.5), lambda: Ada(alpha=-0.1), lambda: Ada(kernel=0), lambda: Ada(window=0),
    lambda: HeadPolicy("h2o", heavy=4), lambda: HeadPolicy.from_dict({"kind": "tova", "budget": "8"}),
])
def test_bad_knobs_raise(make):
    with pytest.raises(ValueError):
        make()


@pytest.mark.parametrize("pol", [KNorm(30, 8), Tova(40), H2O(40, 8), Ada(30, 8, 3, 0.2)])
def test_a_budget_covering_everything_is_dense_attention(pol):
    q, k, v = qkv(2, 4, 2, 34, seed=7)
    outs, layer = run(pol, q, k, v, 2)
    for (a, b), o in zip(CALLS, outs):
        assert (o - ref(q[:, :, a:b], k[:, :, :b], v[:, :, :b], causal(b - a, b))).abs().max() < 1e-12
    assert layer.held_positions() == 2 * 34 and pol.kept(34) == 34


def test_weights_path_and_padding_mask_agree_with_the_fast_path():
    """attend_weights (a masked softmax over runner.weights_mask and LayerKV.dense) equals attend for every
    policy in one layer, in the prompt and after each cache compressed; a padding mask reaches the buffers."""
    pols = (Full(),) + TIGHT + TIGHT[-1:]  # two ada kv heads: their buffers differ in length
    q, k, v = qkv(2, 12, 6, 34, seed=8)
    mask = torch.ones(2, 1, 1, 34, dtype=torch.bool)
    mask[1, ..., :4] = False
    final = []
    for weights_first in (False, True):  # decode steps observed twice (a hook, then attend) change nothing
        layer = PlanLayer(pols)
        runner = PlanRunner(HeadPlan((pols,), q_per_kv=2))
        for a, b in CALLS:
            lkv, _ = layer.update(k[:, :, a:b], v[:, :, a:b])
            if weights_first and b - a == 1:
                runner.dense_kv(0, lkv, q=q[:, :, a:b], scale=SCALE)
            w = runner.attend_weights(0, q[:, :, a:b], lkv, mask=None, scale=SCALE)
            o = runner.attend(0, None, q[:, :, a:b], lkv, lkv, mask=None, scale=SCALE)
            assert (w - o).abs().max() < 1e-12
            m = runner.weights_mask(0, q[:, :, a:b], lkv)
            assert (o - ref(q[:, :, a:b], k[:, :, :b], v[:, :, :b], m)).abs().max() < 1e-12
            if b - a == 1:
                seen = m[:, 2:, 0].sum(-1)  # tova/h2o see budget + 1, knorm/ada budget + window + generated
                assert seen[:, 2:6].eq(9).all() and seen[:, :2].eq(10 + b - PROMPT).all()
                assert seen[:, 6:].sum(-1).eq(2 * 2 * 8 + 4 * (b - PROMPT)).all()  # the group total
                om = runner.attend(0, None, q[:, :, a:b], lkv, lkv, mask=mask[..., :b], scale=SCALE)
                expect = ref(q[:, :, a:b], k[:, :, :b], v[:, :, :b], m & mask[..., :b])
                assert (om - expect).abs().max() < 1e-12
        assert [g.held() for g in layer.groups] == [34, 14, 8, 8, 12]
        final.append([g.keys for g in layer.groups] + [layer.groups[3].state["acc"]])
    assert all(torch.equal(x, y) for x, y in zip(*final))


# ---- in a model ---------------------------------------------------------------------------------------------
def test_each_policy_in_a_tiny_llama(tiny):
    ids = torch.randint(0, 128, (1, 60), generator=torch.Generator().manual_seed(9))
    dense = greedy_generate(tiny, ids, HeadPlan.uniform(2, 2, Full(), 2), max_new_tokens=6)
    roomy = (KNorm(64, 8), Tova(70), H2O(70, 8), Ada(64, 8, 3, 0.2))  # budgets cover the prompt + generation
    tight = ((KNorm(16, 8), 4 * (24 + 5)), (Tova(24), 4 * 24), (H2O(24, 8), 4 * 24), (Ada(16, 8, 3, 0.2), 4 * 29))
    for pol in roomy:
        res = greedy_generate(tiny, ids, HeadPlan.uniform(2, 2, pol, 2), max_new_tokens=6)
        assert torch.equal(res["tokens"], dense["tokens"]), pol.kind
        assert res["kv_positions"] == dense["kv_positions"] == 4 * 65
    for pol, positions in tight:
        plan = HeadPlan.uniform(2, 2, pol, 2)
        res = greedy_generate(tiny, ids, plan, max_new_tokens=6)
        assert res["kv_positions"] == positions and res["kv_bytes"] < dense["kv_bytes"] / 2, pol.kind
        # hooks computing every call from weights (dense_kv observes) decode the same tokens
        with torch.no_grad(), hf.use(tiny, plan) as h, hf.hooks(tiny, {"blocks.*.attn.weights": lambda w, c: None}):
            cache = h.new_cache()
            toks = [tiny(input_ids=ids, cache=cache, use_cache=True).logits[:, -1].argmax(-1)]
            for _ in range(5):
                toks.append(tiny(input_ids=toks[-1][:, None], cache=cache, use_cache=True).logits[:, -1].argmax(-1))
        assert torch.equal(torch.stack(toks, 1), res["tokens"]), pol.kind
        assert cache.held_positions() == positions


@pytest.mark.parametrize("extra", [1, 2, 5])
def test_tova_keep_one_drop_and_many_drops_follow_the_sorted_rule_with_ties(extra):
    # weights on a coarse grid: many ties, where the rule (keep the earlier of equals) decides
    budget = 6
    w = torch.randint(0, 3, (3, 2, budget + extra), generator=torch.Generator().manual_seed(extra)).double()
    kept = tova_keep(w, budget)
    for b in range(3):
        for j in range(2):
            row = w[b, j].tolist()
            others = sorted(range(len(row) - 1), key=lambda i: -row[i])[: budget - 1]  # stable: earlier first
            assert kept[b, j].tolist() == sorted(others) + [len(row) - 1]
