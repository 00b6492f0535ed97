"""A new plan policy is one class in one file: this file defines an H2O-style toy policy (heavy hitters +
recent keys), registers it, and runs it in plans, the cache, the runner and a model -- nothing else changes."""

from dataclasses import dataclass

import torch

from attnlab.core.softmax import masked_softmax
from attnlab.plans import HeadPlan, HeadPolicy, PlanLayer, PlanRunner, greedy_generate, kinds
from attnlab.plans.policies import GroupKV, Policy, Slot, register_policy


@register_policy
@dataclass(frozen=True)
class HeavyHitters(Policy):
    """Keep the ``heavy`` keys that received the most attention so far plus the ``recent`` last keys (H2O);
    eviction happens when the next call arrives, so after a call the cache holds at most
    ``heavy + recent`` old keys plus that call's."""

    heavy: int = 4
    recent: int = 4

    kind = "toy_h2o"
    symbol = "h"

    def kept(self, seq_len: int) -> int:
        return min(seq_len, self.heavy + self.recent + 1)

    def observe(self, q, view: GroupKV, *, scale: float) -> None:
        # attention each buffer entry receives in this call (buffer positions increase: causal at indices)
        B, H, Tq, _ = q.shape
        n, Tb = view.keys.shape[1], view.buffer_len
        s = (q.view(B, n, H // n, Tq, -1) @ view.keys.unsqueeze(2).transpose(-1, -2)) * scale
        rule = torch.arange(Tb).view(1, Tb) <= torch.arange(Tb - Tq, Tb).view(Tq, 1)
        got = masked_softmax(s, rule).sum(dim=(2, 3))  # (B, n, Tb)
        acc = view.slot.state.get("acc")
        if acc is not None:
            got[:, :, : acc.shape[2]] += acc
        view.slot.state["acc"] = got

    def append(self, slot: Slot, k, v, past: int):
        st = slot.state
        pos = st.get("pos")
        if slot.keys is not None and slot.held() > self.heavy + self.recent and "acc" in st:
            old = slot.held() - self.recent
            top = st["acc"][:, :, :old].topk(self.heavy, dim=-1).indices.sort(dim=-1).values
            keep = torch.cat([top, torch.arange(old, slot.held()).expand(*top.shape[:2], self.recent)], dim=-1)
            slot.hold(*(torch.gather(t, 2, keep.unsqueeze(-1).expand(-1, -1, -1, t.shape[-1])) for t in
                        (slot.keys, slot.values)))
            st["acc"] = torch.gather(st["acc"], 2, keep)
            pos = torch.gather(pos, 2, keep)
        new = torch.arange(past, past + k.shape[2]).expand(k.shape[0], k.shape[1], -1)
        st["pos"] = new if pos is None else torch.cat([pos, new], dim=-1)
        kb, vb = slot.extend(k, v)
        slot.hold(kb, vb)
        return kb, vb

    def positions(self, view: GroupKV):
        return view.slot.state["pos"]


def test_the_toy_policy_registers_and_round_trips():
    assert "toy_h2o" in kinds()
    p = HeadPolicy("toy_h2o", heavy=3, recent=2)
    assert isinstance(p, HeavyHitters) and HeadPolicy.from_dict(p.as_dict()) == p
    plan = HeadPlan(((p, HeadPolicy.full()),), q_per_kv=2, name="toy")
    assert HeadPlan.from_json(plan.to_json()) == plan
    assert plan.grid().splitlines()[2] == "L0 h F" and "toy_h2o(3,2)" in plan.grid()


def test_the_toy_policy_keeps_its_budget_and_its_weights_are_what_it_computes():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 30, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    pols = (HeavyHitters(3, 2), HeadPolicy.full())
    layer = PlanLayer(pols)
    runner = PlanRunner(HeadPlan((pols,), q_per_kv=2))
    for a, b in [(0, 20)] + [(t, t + 1) for t in range(20, 30)]:
        lkv, _ = layer.update(k[:, :, a:b], v[:, :, a:b])
        w = runner.attend_weights(0, q[:, :, a:b], lkv, mask=None, scale=0.3)
        o = runner.attend(0, None, q[:, :, a:b], lkv, lkv, mask=None, scale=0.3)
        assert (w - o).abs().max() < 1e-12
        if b > 20:
            assert layer.groups[0].held() == 3 + 2 + 1
            seen = runner.weights_mask(0, q[:, :, a:b], lkv)[0, :2, 0]
            assert seen.sum(-1).tolist() == [6, 6] and bool(seen[:, b - 1].all())


def test_the_toy_policy_runs_in_a_model(tiny):
    ids = torch.randint(0, 128, (1, 60), generator=torch.Generator().manual_seed(5))
    full = HeadPlan.uniform(2, 2, HeadPolicy.full(), 2)
    roomy = HeadPlan.uniform(2, 2, HeavyHitters(64, 64), 2)  # nothing is ever evicted: the full model
    tight = HeadPlan(((HeavyHitters(4, 4), HeadPolicy.full()), (HeadPolicy.full(), HeavyHitters(4, 4))), 2)
    res = {name: greedy_generate(tiny, ids, p, max_new_tokens=6) for name, p in
           (("full", full), ("roomy", roomy), ("tight", tight))}
    assert torch.equal(res["roomy"]["tokens"], res["full"]["tokens"])
    assert res["roomy"]["kv_positions"] == res["full"]["kv_positions"] == 4 * 65
    assert res["tight"]["kv_positions"] == 2 * 65 + 2 * (4 + 4 + 1)
