import pytest
import torch

from attnlab.core.patterns import Causal, Sinks, SlidingWindow
from attnlab.plans.plan import HeadPlan, HeadPolicy


def mixed_plan() -> HeadPlan:
    return HeadPlan(
        ((HeadPolicy.full(), HeadPolicy.stream(4, 32)),
         (HeadPolicy.snap(16, 8), HeadPolicy.drop()),
         (HeadPolicy.topk(4, 8), HeadPolicy.stream(2, 16))),
        q_per_kv=3, name="mixed", meta=(("source", "test"),))


def test_json_round_trip(tmp_path):
    plan = mixed_plan()
    back = HeadPlan.load(plan.save(tmp_path / "p.json"))
    assert back == plan
    assert back[1, 1].kind == "drop" and back[0, 1].window == 32


def test_grid_shows_every_head():
    text = mixed_plan().grid()
    lines = text.splitlines()
    assert lines[2] == "L0 F s" and lines[3] == "L1 k ." and lines[4] == "L2 q s"
    assert "stream(4+32)" in text and "counts: drop=1, full=1, snap=1, stream=2, topk=1" in text


def test_validation_errors():
    with pytest.raises(ValueError, match="kind"):
        HeadPolicy("sparse")
    with pytest.raises(ValueError, match="window"):
        HeadPolicy("stream", sinks=4, window=0)
    with pytest.raises(ValueError, match="same number"):
        HeadPlan(((HeadPolicy.full(),), (HeadPolicy.full(), HeadPolicy.full())))
    with pytest.raises(ValueError, match="not an attnlab head plan"):
        HeadPlan.from_dict({"format": "other"})
    with pytest.raises(ValueError, match="2 layers"):
        HeadPlan.uniform(2, 2, HeadPolicy.full(), 2).check_model(3, 2, 2)


def test_frozen():
    plan = mixed_plan()
    with pytest.raises(AttributeError):
        plan.name = "x"
    assert plan.with_policy(0, 0, HeadPolicy.drop())[0, 0].kind == "drop" and plan[0, 0].kind == "full"


def test_kv_accounting_formula():
    plan = mixed_plan()
    T = 100
    # full 100, stream 4+31=35, snap 16+8=24, drop 0, topk 100, stream 2+15=17
    assert plan.kv_positions(T) == 100 + 35 + 24 + 0 + 100 + 17
    assert plan.kv_bytes(T, head_dim=8) == 2 * 8 * 4 * plan.kv_positions(T)
    assert plan.kv_ratio(T) == pytest.approx(276 / 600)
    short = plan.kv_positions(10)
    assert short == 10 + 10 + 10 + 0 + 10 + 10  # nothing is evicted before the window fills


def test_layer_pattern_matches_policies():
    plan = mixed_plan()
    pat = plan.layer_pattern(0)
    assert pat.num_heads == 6
    dense = pat.dense(40, 40)
    ref_stream = (Causal() & (Sinks(4) | SlidingWindow(32))).dense(40, 40)[0]
    for h in range(3):
        assert torch.equal(dense[h], Causal().dense(40, 40)[0])
        assert torch.equal(dense[3 + h], ref_stream)
    assert type(HeadPlan.uniform(2, 2, HeadPolicy.full(), 2).layer_pattern(1)) is Causal
