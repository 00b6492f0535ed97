"""``attnlab bench native`` on a tiny random Gemma 3: the timing rows and the eager check (prefill and decoding
with the model's sliding cache)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
import torch  # noqa: E402
from hf_tiny import tiny  # noqa: E402

from attnlab.bench import native  # noqa: E402


def test_measure_rows_and_eager_check():
    model = tiny("gemma3")
    rows = native.measure(model, [40, 56], rounds=2, name="tiny")
    assert [r["length"] for r in rows] == [40, 56]
    assert all(r["sdpa_s"] > 0 and r["native_s"] > 0 and r["speedup"] > 0 and r["rounds"] == 2 for r in rows)
    ids = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(0))
    dev = native.logits_deviation(model, ids)
    assert dev["max_abs_diff"] < 1e-4 and dev["decode_max_abs_diff"] < 1e-4 and dev["max_abs_logit"] > 0
    assert model.config._attn_implementation == "sdpa"  # restored
