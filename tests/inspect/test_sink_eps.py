"""Sink^eps (Gu et al., A262) on attention weights with known first-token mass, and on a tiny model against
the model's own (eager) attention probabilities."""

from __future__ import annotations

import pytest
import torch

from attnlab.inspect.capture import record
from attnlab.inspect.metrics import MetricConfig, head_metrics, is_sink, sink_ratio
from tests.models.hf_tiny import tiny


def first_token_head(T: int, mass: list[float]) -> torch.Tensor:
    """(T, T) causal weights: row i puts ``mass[i]`` on key 0 and the rest uniformly on keys 1..i (row 0: 1)."""
    w = torch.zeros(T, T, dtype=torch.float64)
    w[0, 0] = 1.0
    for i in range(1, T):
        w[i, 0] = mass[i]
        w[i, 1 : i + 1] = (1.0 - mass[i]) / i
    return w


T = 20
MASSES = {
    "half": [0.5] * T,  # alpha = (1 + 0.5 * 19) / 20 = 0.525
    "low": [0.2] * T,  # alpha = (1 + 0.2 * 19) / 20 = 0.24
    "split": [0.9] * 10 + [0.0] * 10,  # rows 0..9 heavy, 10..19 none: alpha = (1 + 0.9 * 9) / 20 = 0.455
    "edge": [0.25] * T,  # alpha = (1 + 0.25 * 19) / 20 = 0.2875
}
ALPHA = {"half": 0.525, "low": 0.24, "split": 0.455, "edge": 0.2875}
# rows (out of 20) whose own first-token weight exceeds 0.3: row 0 (weight 1) plus the heavy rows
ROWS_03 = {"half": 20, "low": 1, "split": 10, "edge": 1}


@pytest.fixture(scope="module")
def weights() -> torch.Tensor:
    return torch.stack([first_token_head(T, MASSES[k]) for k in ALPHA]).float()


def test_known_first_token_mass(weights):
    m, _ = head_metrics(weights, MetricConfig(eps=0.3))
    for h, k in enumerate(ALPHA):
        assert float(m["sink"][h]) == pytest.approx(ALPHA[k], abs=1e-6), k
        assert float(m["sink_rows"][h]) == pytest.approx(ROWS_03[k] / T), k
    assert m["is_sink"].tolist() == [1.0, 0.0, 1.0, 0.0]


def test_eps_drives_the_flags(weights):
    # 0.25 lies between 0.24 ("low") and 0.2875 ("edge"); 0.5 only "half" passes
    m, _ = head_metrics(weights, MetricConfig(eps=0.25))
    assert m["is_sink"].tolist() == [1.0, 0.0, 1.0, 1.0]
    assert float(m["sink_rows"][3]) == pytest.approx(1 / T)  # rows of "edge" sit at 0.25, not above: only row 0
    assert float(m["sink_rows"][1]) == pytest.approx(1 / T)
    m, _ = head_metrics(weights, MetricConfig(eps=0.5))
    assert m["is_sink"].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert float(m["sink_rows"][0]) == pytest.approx(1 / T)  # 0.5 is not > 0.5: only row 0
    assert float(m["sink_rows"][2]) == pytest.approx(10 / T)


def test_chunked_equals_whole(weights):
    a, _ = head_metrics(weights, MetricConfig(eps=0.3))
    b, _ = head_metrics(weights, MetricConfig(eps=0.3), chunk=3)
    for k in ("sink", "is_sink", "sink_rows"):
        torch.testing.assert_close(a[k], b[k])


def test_sink_ratio_known_answers():
    alpha = torch.tensor([[0.5, 0.1, 0.31, 0.3], [0.9, 0.29, 0.0, 1.0]])
    assert sink_ratio(alpha, 0.3) == pytest.approx(4 / 8)  # 0.3 itself is not above 0.3
    assert sink_ratio(alpha, 0.05) == pytest.approx(7 / 8)
    assert sink_ratio(alpha, 0.95) == pytest.approx(1 / 8)
    with_nan = torch.tensor([[0.5, float("nan")], [0.1, 0.2]])
    assert sink_ratio(with_nan, 0.3) == pytest.approx(1 / 3)  # the unmeasured head is left out
    flags = is_sink(with_nan, 0.3)
    assert flags[0, 0] == 1.0 and flags[1, 0] == 0.0 and bool(flags[0, 1].isnan())


@pytest.mark.parametrize("eps", [-0.1, 1.0, 1.5])
def test_bad_eps(eps):
    with pytest.raises(ValueError, match="eps"):
        MetricConfig(eps=eps)
    with pytest.raises(ValueError, match="eps"):
        sink_ratio(torch.tensor([0.5]), eps)


def test_sink_ratio_empty():
    with pytest.raises(ValueError, match="no measured head"):
        sink_ratio(torch.tensor([float("nan")]))


def test_tiny_model_against_eager_probabilities():
    model = tiny("llama", attn="eager")
    ids = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        att = model(ids, output_attentions=True).attentions  # L x (1, H, T, T)
    ref = torch.stack([a[0, :, :, 0].double().mean(-1) for a in att])  # (L, H) mean first-token weight
    # an eps halfway between two middle values, so every flag is decided with room to spare
    vals = ref.flatten().sort().values
    mid = len(vals) // 2
    eps = float(vals[mid - 1] + vals[mid]) / 2
    cap = record(model, ids, MetricConfig(eps=eps, chunk=5))
    L = len(att)
    got = torch.stack([cap.stats[layer].finalize()["sink"] for layer in range(L)])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    flags = torch.stack([cap.stats[layer].finalize()["is_sink"] for layer in range(L)])
    assert flags.tolist() == (ref > eps).double().tolist()
    assert sink_ratio(got, eps) == pytest.approx(float((ref > eps).double().mean()))
    assert sink_ratio(got, eps) == pytest.approx((len(vals) - mid) / len(vals))  # the upper half by design
