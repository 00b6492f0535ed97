"""The layers speed section times every layer it is given -- grid layers (video, images) on a grid of the
benchmark's length -- instead of printing an error row."""

import torch

from attnlab.bench.layers import grid_options, run
from attnlab.bench.speed import SpeedContext
from attnlab.mechanisms.registry import build, get


def test_grid_layers_get_a_grid_of_the_length():
    assert grid_options(get("care"), 1024) == {"grid": (32, 32)}
    assert grid_options(get("vmoba"), 1024) == {"grid": (16, 8, 8)}
    assert grid_options(get("vmoba"), 8192) == {"grid": (32, 16, 16)}
    assert grid_options(get("mha"), 1024) == {}
    for name in ("care", "vmoba", "biformer"):  # the layers accept their grids at the bench's width
        layer = build(name, dim=64, heads=4, **grid_options(get(name), 256))
        assert layer(torch.randn(1, 256, 64)).shape == (1, 256, 64)


def test_layers_section_times_grid_layers_without_error_rows():
    ctx = SpeedContext(quick=True, lengths=(64,), backward=False, device="cpu", dtype=torch.float32,
                       peak_gflops=1.0, only=("care", "vmoba"))
    rows = {r["mechanism"]: r for r in run(ctx).rows}
    assert set(rows) == {"mha", "care", "vmoba"}
    for r in rows.values():
        assert r["note"] == "" and r["forward_s"] > 0 and r["speedup_fwd"] > 0, r
    assert rows["care"]["decode_ms"] is None and rows["mha"]["decode_ms"] > 0  # care does not decode


def test_length_bounded_layers_get_room_for_the_timed_decode_steps():
    """super_attn accepts at most max_len positions; the section sizes it to the length plus the decode steps, so
    a length equal to the default bound still times instead of erroring (the demo's 1024 row did)."""
    from attnlab.bench import layers as bench_layers

    entry = get("super_attn")
    layer = bench_layers._build(entry, "cpu", 32)
    assert layer.cfg.max_len == 32 + 64
    assert bench_layers._build(get("dhsa"), "cpu", 32).cfg.max_len == 64  # dhsa's max_len is a chunk length
    ctx = SpeedContext(quick=True, lengths=(32,), backward=False, device="cpu", dtype=torch.float32,
                       peak_gflops=1.0, only=("super_attn",))
    rows = {r["mechanism"]: r for r in run(ctx).rows}
    assert rows["super_attn"]["note"] == "" and rows["super_attn"]["decode_ms"] > 0
