"""``bench speed --sections plan``: the headline plan's prefill against dense on SmolLM2 (a short prompt)."""

import torch

from attnlab.bench import plan_prefill
from attnlab.bench.speed import SECTIONS, SpeedContext


def test_plan_section_times_the_headline_plan_against_dense():
    assert SECTIONS["plan"] == "attnlab.bench.plan_prefill:run"
    ctx = SpeedContext(quick=True, lengths=(512,), backward=False, device="cpu", dtype=torch.float32,
                       peak_gflops=100.0, only=None)
    rep = plan_prefill.run(ctx)
    (row,) = rep.rows
    assert row["model"] == "smollm2" and row["length"] == 512 and row["rounds"] == 2
    streaming, total = map(int, row["stream_kv_heads"].split("/"))
    assert total == 90 and streaming >= 45  # at least half of SmolLM2's kv heads stream
    # 4 sinks + a 256-key window on the streaming heads, everything on the others, at 512 tokens
    want = ((total - streaming) * 512 + streaming * (4 + 256 - 1)) / (total * 512)
    assert abs(row["kv_ratio"] - want) < 1e-9
    assert row["dense_s"] > 0 and row["plan_s"] > 0 and row["speedup"] > 0
