"""``bench numerics`` (B152): the oracle against itself is exact, sdpa in float32 sits within float32's error and
below bfloat16's, the chunked oracle equals the plain one, the inputs are exact in every dtype, the weight-difference
proxy is 0 for identical trainings and positive for different precisions, and the command writes and resumes."""

from __future__ import annotations

import json

import pytest
import torch

from attnlab.bench import numerics
from attnlab.bench.numerics import (
    DeviationCase,
    Side,
    WeightPair,
    deviation_one,
    oracle,
    representable_inputs,
)
from attnlab.cli import main
from attnlab.core.patterns import Causal


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _by_engine(res):
    return {e["engine"]: e for e in res["engines"]}


def test_reference_against_itself_is_exact():
    res = deviation_one(DeviationCase(48, ("float64",), heads=1, head_dim=16, engines=("reference",)))
    e = _by_engine(res)["reference"]
    assert e["out_max"] == 0.0 and e["grad_max"] == 0.0 and e["out_mean"] == 0.0


def test_sdpa_float32_within_float32_error_and_below_bfloat16():
    kw = {"heads": 2, "head_dim": 16, "engines": ("sdpa", "dense_mask", "reference", "blocksparse-python")}
    res = deviation_one(DeviationCase(96, ("float32", "bfloat16"), **kw))["engines"]
    f32 = {e["engine"]: e for e in res if e["dtype"] == "float32"}
    bf16 = {e["engine"]: e for e in res if e["dtype"] == "bfloat16"}
    # outputs are O(1): float32 rounding (eps 1.2e-7) over a 96-term softmax stays far below 1e-5
    assert 0 < f32["sdpa"]["out_max"] < 1e-5 and 0 < f32["sdpa"]["grad_max"] < 1e-4
    for eng in kw["engines"]:
        assert f32[eng]["out_max"] < 1e-5, eng
        assert bf16[eng]["out_max"] > 100 * f32[eng]["out_max"], eng  # bfloat16 keeps 8 bits, float32 24
        assert bf16[eng]["out_mean"] <= bf16[eng]["out_max"]
    assert f32["reference"]["x_baseline"] == 1.0
    assert f32["sdpa"]["x_baseline"] == pytest.approx(f32["sdpa"]["out_max"] / f32["reference"]["out_max"])


def test_unsupported_dtypes_are_skipped_and_failures_recorded():
    res = deviation_one(DeviationCase(32, ("float16",), heads=1, head_dim=16,
                                      engines=("sdpa", "blocksparse-native")))
    assert [e["engine"] for e in res["engines"]] == ["sdpa"]  # the native kernel takes float32 / bfloat16 only
    with pytest.raises(ValueError, match="unknown engine"):
        numerics.run_engine("nope", *representable_inputs(DeviationCase(8))[:3])
    with pytest.raises(ValueError, match="unknown engine"):
        deviation_one(DeviationCase(8, ("float32",), engines=("sdpa", "nope")))


def test_chunked_oracle_equals_one_pass_and_inputs_are_exact():
    q, k, v, g = representable_inputs(DeviationCase(40, heads=2, head_dim=8, seed=3))
    for t in (q, k, v, g):
        assert torch.equal(t.to(torch.bfloat16).double(), t) and torch.equal(t.half().double(), t)
    chunked = oracle(q, k, v, g, chunk=7)
    qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
    scores = (qq @ kk.transpose(-1, -2)) / 8**0.5
    scores = scores.masked_fill(~Causal().dense(40, 40, 0), float("-inf"))
    out = scores.softmax(-1) @ vv
    (out * g).sum().backward()
    for a, b in zip(chunked, (out.detach(), qq.grad, kk.grad, vv.grad)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


SMALL = {"steps": 3, "every": 1, "seq_len": 16, "dim": 16, "batch_size": 4}


def test_weight_difference_zero_for_identical_positive_for_other_precision():
    same = numerics.weight_difference(WeightPair("control", Side("sdpa"), Side("sdpa"), **SMALL))
    assert [c["max"] for c in same["curve"]] == [0.0] * 4
    bf16 = numerics.weight_difference(WeightPair("bf16", Side("sdpa"), Side("sdpa", "float32", "bfloat16"), **SMALL))
    assert bf16["curve"][0]["max"] == 0.0  # one initialization
    assert bf16["final"]["max"] > 0 and bf16["final"]["fro"] > 0 and bf16["final"]["rel"] > 0
    attn = numerics.weight_difference(WeightPair("attn", Side("sdpa"), Side("sdpa", "bfloat16"), **SMALL))
    assert attn["final"]["max"] > 0
    with pytest.raises(ValueError, match="engine"):
        numerics.weight_difference(WeightPair("bad", Side("sdpa"), Side("flex"), **SMALL))


def test_cli_small_run_writes_files_and_resumes(tmp_path, monkeypatch):
    args = ["bench", "numerics", "--quick", "--lengths", "32", "64", "--dtypes", "float32", "bfloat16",
            "--engines", "sdpa", "reference", "--heads", "1", "--head-dim", "16", "--steps", "2",
            "--workers", "1", "--out", str(tmp_path)]
    assert main(args) == 0
    (run,) = tmp_path.iterdir()
    for name in ("results.json", "results.md", "results.jsonl", "numerics-deviation.png", "numerics-weights.png"):
        assert (run / name).is_file(), name
    rows = json.loads((run / "results.json").read_text())["rows"]
    assert {(r["engine"], r["dtype"], r["length"]) for r in rows} == {
        ("reference", "float64", 32), *((e, d, n) for e in ("sdpa", "reference") for d in ("float32", "bfloat16")
                                        for n in (32, 64))}
    assert "Weight difference" in (run / "results.md").read_text()
    lines = (run / "results.jsonl").read_text().splitlines()
    assert len(lines) == 2 + len(numerics.default_pairs())  # one line per length, one per pair

    def boom(item):
        raise AssertionError("a finished configuration ran again")

    monkeypatch.setattr(numerics, "run_item", boom)
    assert main(args[:-2] + ["--resume", str(run)]) == 0
    assert (run / "results.jsonl").read_text().splitlines() == lines
