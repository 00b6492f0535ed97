"""`attnlab bench speed` writes its report (timings themselves are benchmarks, not tests)."""

import json

import torch

from attnlab.bench.common import Report, attention_flops, new_run_dir, peak_memory
from attnlab.cli import main


def test_bench_speed_writes_json_markdown_png(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ATTNLAB_CACHE", str(tmp_path / "cache"))
    rc = main([
        "bench", "speed", "--quick", "--sections", "patterns", "--patterns", "sliding_window_512",
        "--lengths", "1024", "--out", str(tmp_path),
    ])
    assert rc == 0
    (run,) = [p for p in tmp_path.iterdir() if p.name.startswith("speed-")]
    data = json.loads((run / "patterns" / "results.json").read_text())
    rows = data["rows"]
    engines = {r["engine"] for r in rows}
    assert {"sdpa_causal", "sdpa_dense", "attnlab", "dense_mask"} <= engines
    ours = [r for r in rows if r["engine"] == "attnlab"]
    assert all(r["time_s"] > 0 and r["x_vs_sdpa_causal"] > 0 for r in ours)
    assert abs(ours[0]["density"] - 0.3755) < 0.01  # 512-window at 1024: (512*513/2 + 512*512) / 1024^2
    assert (run / "patterns" / "results.md").read_text().count("| sliding_window_512 |") == len(rows)
    assert (run / "patterns" / "speedup.png").stat().st_size > 1000
    assert data["meta"]["matmul_peak_gflops"] > 0
    assert data["meta"]["q_block"] in (64, 128, 256)  # the sparse engine's tile rows (the old "group")
    assert json.loads((tmp_path / "cache" / "tuning.json").read_text())["q_block/cpu"] == data["meta"]["q_block"]
    assert "sliding_window_512" in capsys.readouterr().out


def test_peak_memory_sees_a_known_allocation():
    n = 2**24  # 64 MiB of float32
    peak = peak_memory(lambda: torch.ones(n).add_(1).sum())
    assert 0.9 * 4 * n <= peak <= 1.5 * 4 * n


def test_attention_flops_counts_two_matmuls():
    assert attention_flops(10, 2, 3, 4) == 4 * 10 * 2 * 3 * 4
    assert attention_flops(10, 1, 1, 1, backward=True) == 4 * 10 * 3.5


def test_report_markdown_table():
    r = Report(kind="x", columns=["a", "b"])
    r.add(a=1, b=0.5)
    assert r.markdown().splitlines() == ["| a | b |", "|---|---|", "| 1 | 0.5 |"]


def test_time_pair_alternates_and_reports_the_median_ratio():
    import time

    from attnlab.bench.common import time_pair

    calls = []
    base = lambda: (calls.append("b"), time.sleep(0.02))  # noqa: E731
    fn = lambda: (calls.append("f"), time.sleep(0.01))  # noqa: E731
    tb, ta, ratio = time_pair(base, fn, rounds=3, warmup=1)
    assert calls == ["b", "f"] * 4  # warm-up round, then strictly alternating
    assert tb > ta and 1.4 < ratio < 2.6


def test_new_run_dir_never_hands_out_a_taken_folder(tmp_path, monkeypatch):
    import time as _time

    monkeypatch.setattr(_time, "strftime", lambda fmt: "20260101-000000")  # every call in the same second
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "frontier-20260101-000000").mkdir()  # another process made it first
    a = new_run_dir("frontier", tmp_path / "runs")
    b = new_run_dir("frontier", tmp_path / "runs")
    assert (a.name, b.name) == ("frontier-20260101-000000-2", "frontier-20260101-000000-3")
    assert a.is_dir() and b.is_dir()
    assert new_run_dir("x", tmp_path / "new" / "root").is_dir()  # missing parents are made
