"""The Kinetics cost model (attnlab.cost): hand-counted FLOPs and bytes on small cases, invariants (monotone in
budget and length, dense decode = the KV cache read), clear errors, the check's error arithmetic, and the
test-time-compute runner on a tiny model (resuming)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from hf_tiny import VOCAB, tiny  # noqa: E402

from attnlab import ops  # noqa: E402
from attnlab.core.patterns import Causal, Sinks, SlidingWindow  # noqa: E402
from attnlab.cost import check, tts  # noqa: E402
from attnlab.cost import methods as CM  # noqa: E402
from attnlab.cost import model as C  # noqa: E402
from attnlab.models import hf  # noqa: E402
from attnlab.plans.plan import HeadPolicy  # noqa: E402
from attnlab.plans.tasks import Sample  # noqa: E402

D = 2
G1 = C.Heads(heads=1, kv_heads=1, head_dim=D, batch=1, dtype_bytes=4)


def pairs_of(cost: C.Cost, g: C.Heads = G1, extra: float = 0.0) -> float:
    """Attended pairs per head back from the FLOPs (4 D per pair and head)."""
    return (cost.flops - extra) / (4 * g.head_dim * g.heads * g.batch)


# ---- hand-derived counts -----------------------------------------------------------------------------------
def test_causal_four_tokens_is_ten_pairs_and_its_bytes():
    c = C.op_cost("sdpa", G1, 4, 4, causal=True)
    assert c.flops == 4 * D * 10  # 1 + 2 + 3 + 4 pairs, QK and PV
    # q read + o written: 2 x 4 rows x D; k and v: 4 positions each; 4 bytes per element
    assert c.bytes == 4 * (2 * 4 * D + 2 * 4 * D)
    assert C.op_cost("sdpa", G1, 4, 4, causal=False).flops == 4 * D * 16


def test_sliding_window_and_stream_counts():
    # window 2 over 4 tokens: rows see 1, 2, 2, 2 keys
    assert pairs_of(C.op_cost("sliding_window", G1, 4, 4, window=2)) == 7
    # one row at position 9 with window 3: 3 keys read, so 3 positions of k and v
    dec = C.op_cost("sliding_window", G1, 1, 10, window=3)
    assert pairs_of(dec) == 3 and dec.bytes == 4 * 2 * 3 * D
    # sinks 1 + window 2 over 5 tokens: 1, 2, 2+1, 2+1, 2+1 = 12; the pattern's own dense count agrees
    assert C.stream_pairs(5, 5, 1, 2) == 12
    ref = (Causal() & (Sinks(1) | SlidingWindow(2))).count(5, 5)  # counted on its mask (no formula)
    assert ref == 12
    for L in (7, 33, 100):
        assert C.stream_pairs(L, L, 4, 16) == (Causal() & (Sinks(4) | SlidingWindow(16))).count(L, L)


def test_moba_known_blocks():
    """Block 2, top-2 (own + 1 past block), 6 tokens: rows read 1, 2, 1+2, 2+2, 1+2, 2+2 = 17 keys; the gate
    scores 3 block means per row."""
    c = C.op_cost("moba", G1, 6, 6, block=2, top_k=2)
    gate = 2 * D * 3 * 6
    assert pairs_of(c, extra=gate) == 17
    # a decode row at position 5: its own block (2 keys) + one past block (2): 4 positions + 3 pooled keys
    d = C.op_cost("moba", G1, 1, 6, block=2, top_k=2)
    assert pairs_of(d, extra=2 * D * 3) == 4
    assert d.bytes == 4 * (2 * 4 * D + 3 * D)


def test_hip_and_quest_known_blocks():
    # hip block 2, one past block besides its own: 1, 2, 3, 4, 3, 4, 3, 4 = 24 pairs (the tree search adds
    # scores only, counted apart)
    c = C.op_cost("hip", G1, 8, 8, block=2, top_k=1)
    rounds = [0, 0, 0, 0, 1, 1, 2, 2]  # ceil(log2(max(past blocks / top_k, 1))): 0, 0, 1, 1, 2, 2, 3, 3 blocks
    assert pairs_of(c, extra=2 * D * 2 * sum(rounds)) == 24
    # quest: 2 pages of 4 at context 16: 8 positions read + the bounds of 4 pages (kmax, kmin)
    q = C.op_cost("quest", G1, 1, 16, pages=2, block=4)
    assert pairs_of(q, extra=4 * D * 4) == 8
    assert q.bytes == 4 * (2 * 8 * D + 2 * 4 * D)


def test_recycled_schedule_and_delta_correction():
    # prefill=1, stride 2, top_k 1: p0 full (1); p1 full? (1 - 0) % 2 != 0 -> recycles f=0: min(1,1) + 1 = 2;
    # p2 full (3); p3 recycles f=2: 1 + 1 = 2  -> 8 pairs
    c = C.op_cost("recycled", G1, 4, 4, top_k=1, stride=2, prefill=1)
    assert pairs_of(c) == 8
    # delta 2 on a causal window of 1: dense rows at positions 0 and 2 (1 + 3 pairs) on top of 4 window pairs
    d = C.op_cost("sliding_window", G1, 4, 4, window=1, delta=2)
    assert pairs_of(d) == 4 + 1 + 3


def test_linear_decode_is_state_sized():
    g = C.Heads(heads=2, kv_heads=2, head_dim=4)
    a = C.op_cost("retention", g, 1, 10)
    b = C.op_cost("retention", g, 1, 10_000)
    assert a == b  # one token against a fixed state, whatever the length
    state = 2 * 4 * 4 * 4  # heads x D x D, float32
    assert a.bytes == 4 * 2 * 2 * 4 + 2 * state  # k, v of the token, the state read and written


# ---- every op and method -----------------------------------------------------------------------------------
#: the ops registered when the cost model was written: each has a formula
KNOWN_OPS = ("biformer", "cog", "cumulative_softmax", "delta_select", "dhsa", "dma", "drop", "gaam", "hip",
             "lightning", "linear", "lla", "minference", "moba", "mta", "neighborhood", "neural_attn", "pattern",
             "quest", "rcmha", "recycled", "relu_attn", "retention", "routing_transformer", "sdpa", "sentinel",
             "sliding_window", "snap", "sparsifiner", "stream", "superlinear", "vmoba")


def _example_length(opts: dict) -> int:
    return math.prod(opts["grid"]) if opts.get("grid") is not None else 24


@pytest.mark.parametrize("name", ops.names())
def test_every_registered_op_prices_or_says_why(name):
    spec = ops.get(name)
    opts = dict(spec.example)
    if name == "pattern" and "pattern" not in opts:
        opts["pattern"] = SlidingWindow(4)
    L = _example_length(spec.resolve(opts))
    g = C.Heads(heads=4, kv_heads=2, head_dim=8)
    try:
        pre = C.op_cost(name, g, L, L, **opts)
    except C.NotPriced as e:
        assert name not in KNOWN_OPS, f"{name} lost its formula: {e}"
        assert name in str(e)
        return
    assert math.isfinite(pre.flops) and pre.flops >= 0 and pre.bytes >= 0
    assert (pre.flops > 0) == (name != "drop")
    if spec.decodes:
        dec = C.op_decode_cost(name, g, L, **opts)
        assert math.isfinite(dec.flops) and 0 <= dec.flops <= pre.flops


def test_known_ops_are_all_registered_and_priced():
    assert set(KNOWN_OPS) <= set(C.priced_ops())


@pytest.mark.parametrize("name", ["stream", "snapkv", "pyramidkv", "adakv", "knorm", "tova", "h2o", "quest",
                                  "recycled", "delta", "probe", "duo", "atlas", "moba", "hip", "minference",
                                  "minference_blocks", "moba+delta"])
def test_frontier_methods_are_monotone_in_budget(name):
    shape = CM.ModelShape.bare(heads=4, kv_heads=2, head_dim=8)
    prev = None
    for f in (0.125, 0.25, 0.5, 1.0):
        p = CM.price(name, shape, 512, budget=f)
        cur = (p.prefill.flops, p.decode.flops, p.decode.bytes)
        if prev is not None:
            assert all(c >= q - 1e-6 for c, q in zip(cur, prev)), (name, f, prev, cur)
        prev = cur
    dense = CM.price("dense", shape, 512)
    # at most the dense read, plus Quest's page bounds (kmax, kmin per 16 keys: 1/16 of the K and V read)
    assert p.decode.bytes <= dense.decode.bytes * (1 + 1 / 16)


@pytest.mark.parametrize("name", ["dense", "stream", "quest", "moba", "hip", "SlidingWindow:window=64",
                                  "linear", "op:moba:block=16,top_k=2", "dhsa", "superlinear"])
def test_cost_grows_with_length(name):
    shape = CM.ModelShape.bare(heads=4, kv_heads=2, head_dim=8)
    rows = [CM.price(name, shape, L, budget=0.25) for L in (128, 256, 512, 1024)]
    for a, b in zip(rows, rows[1:]):
        assert b.prefill.flops > a.prefill.flops
        assert b.decode.flops >= a.decode.flops and b.decode.bytes >= a.decode.bytes


def test_dense_decode_reads_the_kv_cache():
    """Dense decode bytes at context L = 2 x layers x kv_heads x head_dim x L x dtype bytes."""
    for L in (100, 4096):
        for dtype_bytes in (2, 4):
            shape = CM.ModelShape("m", 3, 8, 2, 16, (None,) * 3, dtype_bytes=dtype_bytes)
            p = CM.price("dense", shape, L)
            assert p.decode_attn.bytes == 2 * 3 * 2 * 16 * L * dtype_bytes
            assert p.held_bytes == p.decode_attn.bytes


def test_sliding_layers_read_their_window():
    """Tiny Gemma 3: layer 0 slides over 4 tokens (the cache keeps 3 + the new one), layer 1 is full."""
    from transformers import Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
                           layer_types=["sliding_attention", "full_attention"])
    shape = CM.ModelShape.from_config(cfg, "tiny-gemma3")
    assert shape.windows == (4, None)
    L = 50
    p = CM.price("dense", shape, L)
    per_pos = 2 * shape.kv_heads * shape.head_dim * 4
    assert p.decode_attn.bytes == per_pos * (3 + L)


def test_model_shape_counts_the_matmul_weights():
    model = tiny("llama")
    shape = CM.ModelShape.from_config(model.config, "tiny")
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert shape.params == linear  # q, k, v, o, gate, up, down per layer + the LM head
    one = shape.other_decode()
    assert one.flops == 2 * linear and one.bytes == 4 * linear
    assert CM.with_batch(shape, 4).other_decode().bytes == linear  # the weight read shared by 4 sequences


def test_policies_use_kept_positions():
    g = C.Heads(heads=4, kv_heads=2, head_dim=8)
    L = 1000
    for pol in (HeadPolicy.stream(4, 60), HeadPolicy.snap(100, 32), HeadPolicy.full()):
        c = C.policy_decode(pol, g, L)
        assert c.bytes == 4 * 2 * 2 * 8 * pol.kept(L)
        assert C.policy_held_bytes(pol, g, L) == c.bytes


def test_unknown_methods_fail_clearly():
    shape = CM.ModelShape.bare()
    with pytest.raises(C.NotPriced, match="unknown method 'nonesuch'"):
        CM.price("nonesuch", shape, 64)
    with pytest.raises(C.NotPriced, match="unknown op"):
        C.op_cost("nonesuch", G1, 4, 4)
    with pytest.raises(ValueError, match="no option 'blocks'"):
        CM.price("moba:blocks=4", shape, 64)
    with pytest.raises(C.NotPriced, match="policy 'weird'"):
        C.policy_decode(type("P", (), {"kind": "weird"})(), G1, 10)
    with pytest.raises(C.NotPriced, match="calibration"):
        CM.price("moa", shape, 256)
    with pytest.raises(ValueError, match="grid"):
        C.op_cost("biformer", G1, 10, 10)  # the default 8 x 8 grid holds 64 tokens
    with pytest.raises(ValueError, match="budget"):
        CM.price("stream", shape, 64, budget=0.0)


def test_parse_method_forms():
    assert CM.parse_method("dense").kind == "dense"
    assert CM.parse_method("moba").kind == "frontier"
    s = CM.parse_method("moba:block=16,top_k=2")
    assert (s.kind, dict(s.options)) == ("op", {"block": 16, "top_k": 2})
    s = CM.parse_method("Neighborhood:grid=(8, 8),kernel_size=3")
    assert (s.kind, dict(s.options)["grid"]) == ("pattern", (8, 8))
    assert CM.parse_method("op:quest").kind == "op"


def test_hardware_eflops_and_roofline():
    hw = C.Hardware(100e9, 10e9)
    c = C.Cost(2e9, 1e9)
    assert hw.intensity == 10
    assert hw.eflops(c) == 2e9 + 10 * 1e9
    assert hw.roofline_s(c) == pytest.approx(0.1)  # memory-bound: 1 GB at 10 GB/s
    assert hw.eflops_s(c) == pytest.approx(0.12)
    assert C.measure_bandwidth(mbytes=8, reps=2) > 1e8


# ---- the check's arithmetic ---------------------------------------------------------------------------------
def test_check_errors_and_overhead_on_synthetic_numbers():
    errs, md = check.errors([1.0, 2.0, 4.0], [1.1, 1.8, 4.0])
    assert errs == pytest.approx([0.1, -0.1, 0.0]) and md == pytest.approx(0.1)
    measured = [0.002, 0.01, 0.5]
    roof = [m - 0.001 for m in measured]
    assert check.fit_overhead(measured, roof) == pytest.approx(0.001)
    assert check.fit_overhead([1.0], [2.0]) == 0.0  # never negative


def test_check_evaluate_recovers_a_planted_overhead():
    hw = C.Hardware(50e9, 5e9)
    rows = []
    for p in check.points(quick=True):
        cost = check.predicted_cost(p)
        rows.append({"kind": p.kind, "method": p.method, "L": p.L, "options": [list(x) for x in p.options],
                     "measured_s": hw.roofline_s(cost) + 2e-4})
    summary = check.evaluate(rows, hw)
    assert summary["overhead_s"] == pytest.approx(2e-4, rel=1e-6)
    assert summary["mdape"] == pytest.approx(0.0, abs=1e-9)
    assert {r["bound"] for r in rows} == {"compute", "memory"}  # prefill computes, long decodes read


# ---- test-time compute -----------------------------------------------------------------------------------
class Tok:
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def _digits(tok, length, n, seed):
    g = torch.Generator().manual_seed(seed)
    return [Sample("digits", tuple(torch.randint(1, VOCAB, (length,), generator=g).tolist()), (str(7 + i),),
                   length, 0.5, 3) for i in range(n)]


def test_vote_and_scores():
    assert tts.vote(["1", "2", "2", None]) == "2"
    assert tts.vote(["3", "1", "1", "3"]) == "3"  # a tie goes to the first seen
    assert tts.vote([None, None]) is None
    assert tts.first_number(" the key is 0123.") == "0123"
    row = {"answers": ["5", "7", "7", None], "voted_ok": [0.0, 1.0, 1.0, 0.0], "scores": [0.0, 1.0, 1.0, 0.0]}
    assert tts.prompt_scores(row, 1) == (0.0, 0.0)
    assert tts.prompt_scores(row, 2) == (0.0, 1.0)  # 5 and 7 tie: 5 first; pass@2 sees the 7
    assert tts.prompt_scores(row, 4) == (1.0, 1.0)
    assert tts.n_grid(8) == [1, 2, 4, 8] and tts.n_grid(6) == [1, 2, 4, 6]


def test_tts_runner_on_a_tiny_model_resumes(tmp_path, monkeypatch):
    monkeypatch.setitem(hf.SHARED, "tiny", (tiny("llama"), Tok()))
    monkeypatch.setitem(tts.TASK_MAKERS, "digits", _digits)
    cfgs = tts.configs("tiny", "digits", 40, 2, [("dense", 1.0), ("stream", 0.25)], n=3, seed=1)
    rows = tts.run_tts(cfgs, tmp_path, show_progress=False)
    assert len(rows) == 4 and all("error" not in r for r in rows)
    for r in rows:
        assert len(r["answers"]) == 3 and len(r["scores"]) == 3
    stream = next(r for r in rows if r["method"] == "stream")
    dense = next(r for r in rows if r["method"] == "dense" and r["sample"] == stream["sample"])
    assert stream["kv_bytes"] < dense["kv_bytes"]
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    calls = []
    monkeypatch.setattr(tts, "run_one", lambda cfg: calls.append(cfg) or {})
    again = tts.run_tts(cfgs, tmp_path, show_progress=False)
    assert calls == [] and again == rows  # every configuration was done: nothing reruns
    assert (tmp_path / "results.jsonl").read_text().splitlines() == lines
    shape = CM.ModelShape.from_config(tiny("llama").config, "tiny")
    pts = tts.aggregate(rows, shape, C.Hardware(50e9, 5e9), n_boot=200)
    by = {(p["method"], p["N"]): p for p in pts}
    assert set(by) == {(m, N) for m in ("dense", "stream") for N in (1, 2, 3)}
    for m in ("dense", "stream"):
        assert by[m, 1]["total_egflop"] < by[m, 2]["total_egflop"] < by[m, 3]["total_egflop"]
        assert by[m, 1]["pass_at_n"] <= by[m, 2]["pass_at_n"] <= by[m, 3]["pass_at_n"]
    assert by["stream", 3]["decode_egflop"] < by["dense", 3]["decode_egflop"]
    json.dumps(pts)  # JSON-able


def test_cli_prices_and_rejects(tmp_path):
    from attnlab.cli import main

    assert main(["cost", "--method", "stream", "--method", "SlidingWindow:window=64", "--length", "256,512",
                 "--model", "none", "--peak-gflops", "100", "--bandwidth-gbs", "10", "--out", str(tmp_path)]) == 0
    run = next(tmp_path.glob("cost-*"))
    rows = json.loads((run / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["dense", "dense", "stream", "stream", "SlidingWindow:window=64",
                                           "SlidingWindow:window=64"]
    assert (run / "decode_eflops_vs_length.png").is_file()
    with pytest.raises(SystemExit, match="unknown method"):
        main(["cost", "--method", "nonesuch", "--model", "none", "--peak-gflops", "1", "--bandwidth-gbs", "1",
              "--out", str(tmp_path)])
