"""The frontier report: bootstrap CIs, Pareto flags, the suite summary, claims and the written files, checked on
hand-made data with numbers worked out by hand (or against formulas written here)."""

import json
import math
import random

import numpy as np
import pytest

from attnlab.frontier import report as R


def _row(method, budget, task, length, scores, *, model="m", family="decode", protocol="press", kv=None,
         pre=None, dec=None):
    return {"model": model, "method": method, "budget": budget, "family": family, "protocol": protocol,
            "task": task, "length": length, "scores": [float(s) for s in scores], "kv_bytes": 1000.0 * (kv or 1),
            "kv_ratio": kv, "prefill_speedup": pre, "decode_speedup": dec, "decode_tok_s": 20.0, "prefill_s": 1.0}


def _dense(task, length, scores, model="m"):
    return _row("dense", None, task, length, scores, model=model, family="dense", protocol="dense", kv=1.0,
                pre=1.0, dec=1.0)


# ------------------------------------------------------------------------------------------ bootstrap_ci


def test_bootstrap_known_answer_two_samples():
    # resampled means of [0, 1] are 0, 0.5, 1 with probability 1/4, 1/2, 1/4: the 2.5/97.5 percentiles are 0, 1
    assert R.bootstrap_ci([0.0, 1.0]) == (0.0, 1.0)


def test_bootstrap_degenerate_and_errors():
    assert R.bootstrap_ci([0.7] * 9) == (0.7, 0.7)
    assert R.bootstrap_ci([0.25]) == (0.25, 0.25)
    with pytest.raises(ValueError, match="at least one"):
        R.bootstrap_ci([])
    with pytest.raises(ValueError, match="non-finite"):
        R.bootstrap_ci([1.0, float("nan")])
    with pytest.raises(ValueError, match="alpha"):
        R.bootstrap_ci([0.0, 1.0], alpha=1.5)
    with pytest.raises(ValueError, match="n_boot"):
        R.bootstrap_ci([0.0, 1.0], n_boot=0)


def test_bootstrap_contains_mean_shrinks_and_is_seeded():
    rng = random.Random(1)
    small = [float(rng.random() < 0.6) for _ in range(40)]
    big = [float(rng.random() < 0.6) for _ in range(1000)]
    for xs in (small, big):
        lo, hi = R.bootstrap_ci(xs)
        assert lo < sum(xs) / len(xs) < hi
    w_small = np.subtract(*R.bootstrap_ci(small)[::-1])
    w_big = np.subtract(*R.bootstrap_ci(big)[::-1])
    assert w_big < w_small / 3  # width ~ 1/sqrt(n): 40 -> 1000 samples is a factor 5
    assert R.bootstrap_ci(small, seed=3) == R.bootstrap_ci(small, seed=3)
    cont = [rng.random() for _ in range(30)]  # continuous scores: the percentiles move with the draws
    assert R.bootstrap_ci(cont, seed=3) != R.bootstrap_ci(cont, seed=4)


def test_bootstrap_matches_the_normal_interval():
    xs = [float(i % 2) for i in range(400)]  # mean 0.5, sd 0.5
    lo, hi = R.bootstrap_ci(xs, n_boot=4000)
    half = 1.959964 * 0.5 / math.sqrt(400)
    assert lo == pytest.approx(0.5 - half, abs=0.15 * half) and hi == pytest.approx(0.5 + half, abs=0.15 * half)


# ------------------------------------------------------------------------------------------ pareto


def test_pareto_hand_made_accuracy_vs_kv():
    pts = [(0.9, 0.5), (0.8, 0.25), (0.7, 0.25), (0.9, 0.5), (0.5, 0.1), (0.6, 0.6), (None, 0.05), (0.9, 0.7)]
    assert R.pareto(pts, better=("max", "min")) == [True, True, False, True, True, False, False, False]


def test_pareto_hand_made_accuracy_vs_speedup():
    pts = [(0.9, 1.0), (0.8, 1.5), (0.85, 1.2), (0.7, 1.4), (0.8, 1.5), (float("nan"), 9.0)]
    assert R.pareto(pts, better=("max", "max")) == [True, True, True, False, True, False]


def test_pareto_agrees_with_the_definition_on_random_points():
    rng = random.Random(0)
    pts = [(rng.choice([0.2, 0.4, 0.6, 0.8]), rng.choice([0.1, 0.25, 0.5, 1.0])) for _ in range(60)]
    flags = R.pareto(pts, better=("max", "min"))
    for (a, c), f in zip(pts, flags):
        dominated = any(a2 >= a and c2 <= c and (a2 > a or c2 < c) for a2, c2 in pts)
        assert f == (not dominated)


def test_pareto_errors():
    with pytest.raises(ValueError, match="max' or 'min"):
        R.pareto([(1, 2)], better=("max", "up"))
    with pytest.raises(ValueError, match="coordinates"):
        R.pareto([(1, 2, 3)], better=("max", "min"))


# ------------------------------------------------------------------------------------------ summarize


def _hand_rows():
    return [
        _dense("A", 1, [1, 1, 0, 1]), _dense("A", 2, [1, 0]), _dense("B", 1, [1, 1, 1, 1]),
        _row("snapkv", 0.25, "A", 1, [1, 0, 0, 1], kv=0.3, pre=1.0, dec=1.5),
        _row("snapkv", 0.25, "A", 2, [0, 0], kv=0.2, pre=1.2, dec=1.3),
        _row("snapkv", 0.25, "B", 1, [1, 1, 0, 1], kv=0.25, pre=1.1, dec=2.0),
    ]


def test_summarize_hand_made_numbers():
    s = {r["method"]: r for r in R.summarize(_hand_rows())}
    d, k = s["dense"], s["snapkv"]
    # tasks weigh the same, lengths pooled inside a task: dense A = 4/6, B = 1 -> 5/6 (pooled would be 8/10)
    assert d["accuracy"] == pytest.approx(5 / 6)
    assert k["accuracy"] == pytest.approx((2 / 6 + 3 / 4) / 2)
    assert k["delta_vs_dense"] == pytest.approx(100 * ((2 / 6 + 3 / 4) / 2 - 5 / 6))
    assert d["delta_vs_dense"] == 0 and (d["delta_ci_lo"], d["delta_ci_hi"]) == (0, 0)
    assert (k["n"], k["tasks"], k["cells"]) == (10, 2, 3)
    assert k["kv_ratio"] == pytest.approx((4 * 0.3 + 2 * 0.2 + 4 * 0.25) / 10)  # mean over samples
    assert k["prefill_speedup"] == pytest.approx(1.1) and k["decode_speedup"] == pytest.approx(1.5)
    assert k["budget"] == 0.25 and d["budget"] is None and d["family"] == "dense"
    for r in (d, k):
        assert r["ci_lo"] < r["accuracy"] < r["ci_hi"]
    assert k["delta_ci_lo"] < k["delta_vs_dense"] < k["delta_ci_hi"]
    assert [r["method"] for r in R.summarize(_hand_rows())] == ["dense", "snapkv"]  # dense first


def test_summarize_groups_by_budget_and_protocol_and_model():
    rows = _hand_rows() + [
        _row("snapkv", 0.5, "A", 1, [1, 1, 1, 1], kv=0.5), _row("snapkv", 0.25, "A", 1, [1, 1, 1, 1],
                                                                  protocol="prefill", kv=0.25),
        _dense("A", 1, [0, 0], model="other"), _row("tova", 0.1, "A", 1, [1, 0], model="other", kv=0.1),
    ]
    s = R.summarize(rows)
    keys = [(r["model"], r["method"], r["budget"], r["protocol"]) for r in s]
    assert keys == [("m", "dense", None, "dense"), ("m", "snapkv", 0.25, "prefill"), ("m", "snapkv", 0.25, "press"),
                    ("m", "snapkv", 0.5, "press"), ("other", "dense", None, "dense"), ("other", "tova", 0.1, "press")]
    # a method that ran fewer cells: delta over the cells it shares with dense (A@1: 1.0 vs 0.75)
    assert s[3]["budget"] == 0.5 and s[3]["accuracy"] == 1.0 and s[3]["delta_vs_dense"] == pytest.approx(25.0)
    assert s[5]["delta_vs_dense"] == pytest.approx(50.0)  # against its own model's dense


def test_summarize_ci_matches_the_stratified_normal_interval():
    rng = random.Random(0)
    design = {("A", 1): (300, 0.9), ("A", 2): (100, 0.5), ("B", 1): (200, 0.3)}
    rows = [_dense(t, n, [float(rng.random() < p) for _ in range(m)]) for (t, n), (m, p) in design.items()]
    (r,) = R.summarize(rows, n_boot=4000)
    cells = {(x["task"], x["length"]): np.array(x["scores"]) for x in rows}
    # weights by hand: task A holds 400 samples (300 + 100), B 200; each task weighs 1/2
    w = {("A", 1): 0.5 * 300 / 400, ("A", 2): 0.5 * 100 / 400, ("B", 1): 0.5}
    mean = sum(w[c] * cells[c].mean() for c in cells)
    sd = math.sqrt(sum(w[c] ** 2 * cells[c].var() / cells[c].size for c in cells))
    assert r["accuracy"] == pytest.approx(mean)
    assert r["ci_lo"] == pytest.approx(mean - 1.96 * sd, abs=0.15 * 1.96 * sd)
    assert r["ci_hi"] == pytest.approx(mean + 1.96 * sd, abs=0.15 * 1.96 * sd)


def test_summarize_errors_and_missing_dense():
    with pytest.raises(ValueError, match="duplicate"):
        R.summarize(_hand_rows() + [_dense("A", 1, [1])])
    with pytest.raises(ValueError, match="lacks"):
        R.summarize([{"model": "m", "method": "x", "scores": [1.0]}])
    (r,) = R.summarize([_row("snapkv", 0.25, "A", 1, [1, 0], kv=0.25)])
    assert r["delta_vs_dense"] is None and r["accuracy"] == 0.5


# ------------------------------------------------------------------------------------------ claims


def _s(method, budget, acc, kv, dec=1.0, *, family="decode", protocol="press", model="m", cells=3):
    return {"model": model, "method": method, "budget": budget, "family": family, "protocol": protocol,
            "accuracy": acc, "ci_lo": acc - 0.05, "ci_hi": acc + 0.05, "kv_ratio": kv, "prefill_speedup": 1.0,
            "decode_speedup": dec, "n": 10, "cells": cells}


def _by(cl, name):
    return [c for c in cl if c["claim"] == name]


def test_claims_pass():
    summary = [_s("dense", None, 0.80, 1.0, family="dense", protocol="dense"),
               _s("snapkv", 0.25, 0.77, 0.24, dec=1.4), _s("quest", 0.5, 0.79, 0.5, dec=1.1),
               _s("stream", 0.25, 0.60, 0.25, dec=1.6, protocol="prefill"),
               _s("duo", 0.25, 0.70, 0.25, protocol="prefill"), _s("probe-plan", 0.25, 0.60, 0.25, protocol="prefill")]
    cl = R.claims(summary)
    assert all(set(c) == {"model", "claim", "value", "target", "passed", "detail"} for c in cl)
    (acc,) = _by(cl, "kv25_within_5pts")
    assert acc["passed"] is True and acc["value"] == pytest.approx(-3.0) and "snapkv" in acc["detail"]
    inf = _by(cl, "informed_vs_stream")
    assert [(c["value"], c["passed"]) for c in inf] == [(pytest.approx(10.0), True), (0.0, True)]  # tie passes
    (speed,) = _by(cl, "kv25_decode_speedup")  # the most accurate method at kv <= 0.25, not the fastest
    assert speed["passed"] is True and speed["value"] == 1.4 and speed["detail"].split(";")[0].count("snapkv")
    assert "fastest there: stream" in speed["detail"]
    assert not _by(cl, "dense_solvable")  # needs the rows


def test_claims_allow_the_decoded_answer_on_top_of_the_budget():
    """A cache compressed to 0.25x of the prompt holds 0.25 + 0.75 * s of dense once the answer (share s of the
    dense cache) is appended: that counts as KV <= 0.25x, a cache above it does not (a plan 2% over its budget
    stays out), and rows without answer_share keep the plain limit."""
    s = 10 / (4096 + 10)
    summary = [_s("dense", None, 0.80, 1.0, family="dense", protocol="dense"),
               dict(_s("pyramidkv", 0.25, 0.78, 0.25 + 0.75 * s, dec=1.4), answer_share=s),
               dict(_s("tova", 0.25, 0.70, 0.2494, dec=1.5), answer_share=s),
               dict(_s("probe", 0.25, 0.80, 0.255, dec=2.0), answer_share=s)]
    (acc,) = _by(R.claims(summary), "kv25_within_5pts")
    assert acc["passed"] is True and "pyramidkv" in acc["detail"] and acc["value"] == pytest.approx(-2.0)
    assert R.kv_limit(summary[1], 0.25) == pytest.approx(0.25183, abs=1e-5)
    plain = [{k: v for k, v in r.items() if k != "answer_share"} for r in summary]
    (acc,) = _by(R.claims(plain), "kv25_within_5pts")
    assert acc["passed"] is False and "tova" in acc["detail"]


def test_aggregate_records_the_answers_share_of_the_dense_cache():
    from attnlab.frontier.run import aggregate

    base = {"model": "m", "task": "t", "length": 90, "budget": 0.25, "protocol": "press", "family": "decode",
            "text": "", "prefill_s": 1.0, "decode_tok_s": 1.0}
    dense = [dict(base, method="dense", budget=None, protocol="dense", family="dense", sample=i, score=1.0,
                  kv_bytes=100, new_tokens=10) for i in range(2)]
    recs = dense + [dict(base, method="snapkv", sample=i, score=1.0, kv_bytes=32.5, new_tokens=10) for i in range(2)]
    (row,) = [r for r in aggregate(recs) if r["method"] == "snapkv"]
    assert row["answer_share"] == pytest.approx(0.1) and row["kv_ratio"] == pytest.approx(0.325)
    assert row["kv_ratio"] <= R.kv_limit(row, 0.25)  # 0.25 of the prompt + the 10 answer tokens
    old = [{k: v for k, v in r.items() if k != "new_tokens"} for r in recs]
    assert all(r["answer_share"] is None for r in aggregate(old))


def test_claims_ignore_methods_that_skipped_cells():
    """A method that ran fewer (task, length) cells than dense is not compared with dense's whole suite."""
    summary = [_s("dense", None, 0.80, 1.0, family="dense", protocol="dense"),
               _s("snapkv", 0.25, 0.99, 0.24, cells=2), _s("tova", 0.25, 0.70, 0.25)]
    (acc,) = _by(R.claims(summary), "kv25_within_5pts")
    assert acc["passed"] is False and "tova" in acc["detail"] and acc["value"] == pytest.approx(-10.0)


def test_claims_fail_and_not_tested():
    summary = [_s("dense", None, 0.80, 1.0, family="dense", protocol="dense"),
               _s("snapkv", 0.25, 0.70, 0.25, dec=1.2), _s("stream", 0.25, 0.72, 0.25, dec=1.25),
               _s("atlas", 0.25, 0.71, 0.25), _s("moa", 0.5, 0.9, 0.5),
               _s("dense", None, 0.5, 1.0, family="dense", protocol="dense", model="g"),
               _s("snapkv", 0.25, 0.5, 0.3, model="g")]
    cl = R.claims(summary)
    m = [c for c in cl if c["model"] == "m"]
    (acc,) = _by(m, "kv25_within_5pts")
    assert acc["passed"] is False and acc["value"] == pytest.approx(-8.0)
    inf = _by(m, "informed_vs_stream")
    assert [c["passed"] for c in inf] == [False, None]  # atlas below stream at 0.25; no stream at 0.5
    assert inf[0]["value"] == pytest.approx(-1.0)
    assert _by(m, "kv25_decode_speedup")[0]["passed"] is False
    g = [c for c in cl if c["model"] == "g"]
    assert _by(g, "kv25_within_5pts")[0]["passed"] is None  # kv 0.3 > 0.25: nothing to test
    assert "0.300" in _by(g, "kv25_within_5pts")[0]["detail"]
    assert _by(g, "informed_vs_stream")[0]["passed"] is None


def test_claims_dense_solvable_marks_out_of_reach():
    rows = [_dense("A", 1024, [1, 1, 0]), _dense("B", 2048, [0, 0, 1]), _dense("B", 1024, [1, 0])]
    cl = R.claims(R.summarize(rows), rows)
    sol = {(c["detail"].split(":")[0]): c for c in _by(cl, "dense_solvable")}
    assert sol["A @ 1024"]["passed"] is True and sol["A @ 1024"]["value"] == pytest.approx(2 / 3)
    assert sol["B @ 1024"]["passed"] is True  # 0.5 is enough
    assert sol["B @ 2048"]["passed"] is False and "out of reach" in sol["B @ 2048"]["detail"]
    md = R.markdown(rows, R.summarize(rows), cl)
    reach = md.split("## Out of reach")[1]
    assert "B @ 2048" in reach and "A @ 1024" not in reach


# ------------------------------------------------------------------------------------------ text and files


def _suite_rows():
    rows = []
    rng = random.Random(0)
    methods = [("dense", None, "dense", "dense", 1.0)]
    methods += [(m, b, "decode", "press", b + 0.01) for m in ("snapkv", "tova") for b in (0.1, 0.25)]
    methods += [("stream", 0.25, "decode", "prefill", 0.26), ("duo", 0.25, "decode", "prefill", 0.26),
                ("minference", 0.3, "prefill", "prefill", 1.0), ("moba", 0.3, "prefill", "prefill", 1.0)]
    for model in ("smollm2", "gemma3"):
        for m, b, fam, prot, kv in methods:
            for task in ("passkey", "niah"):
                for length in (256, 512):
                    rows.append(_row(m, b, task, length, [float(rng.random() < 0.7) for _ in range(6)],
                                     model=model, family=fam, protocol=prot, kv=kv,
                                     pre=1.0 if b is None else 1 + rng.random(), dec=1 + (1 - kv) * rng.random()))
    rows[-1]["decode_speedup"] = float("nan")  # a failed timing must not break the report
    return rows


def test_write_produces_every_file(tmp_path):
    rows = _suite_rows()
    paths = R.write(rows, tmp_path / "run", {"seed": 0, "note": "test"})
    names = {p.name for p in paths}
    assert {"results.json", "results.md"} <= names
    for model in ("smollm2", "gemma3"):
        for tag in ("kv", "prefill", "decode"):
            assert f"{model}_accuracy_vs_{tag}.png" in names
    for p in paths:
        assert p.is_file() and p.stat().st_size > 0
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def no_nan(c):
        raise AssertionError(f"non-JSON constant {c}")

    doc = json.loads((tmp_path / "run" / "results.json").read_text(), parse_constant=no_nan)
    assert {"meta", "rows", "summary", "claims"} <= set(doc)
    assert doc["meta"]["seed"] == 0 and "torch" in doc["meta"] and len(doc["rows"]) == len(rows)
    md = (tmp_path / "run" / "results.md").read_text()
    for method in {r["method"] for r in rows}:
        assert f"| {method} |" in md
    for section in ("## Summary", "## Claims", "## Accuracy per task", "## Out of reach"):
        assert section in md
    assert "![smollm2_accuracy_vs_kv](smollm2_accuracy_vs_kv.png)" in md
    assert "| length | niah | passkey | task mean |" in md  # one column per task


def test_markdown_summary_sorted_by_kv_ratio():
    rows = _suite_rows()
    s = R.summarize(rows)
    md = R.markdown(rows, s, R.claims(s, rows))
    table = md.split("### smollm2")[1].split("## Claims")[0]  # models sort by name: smollm2 comes last
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert lines[0].split("|")[5].strip() == "kv_ratio"
    kvs = [float(line.split("|")[5]) for line in lines[1:]]
    assert kvs == sorted(kvs) and kvs[-1] == 1.0


def test_plot_labels_do_not_overlap(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = random.Random(2)
    pts = [(x, 0.3 + 0.5 * rng.random(), f"method{i} {x:g}", "k") for i, x in
           enumerate([0.1] * 7 + [0.25] * 7 + [0.5] * 6)]
    fig, ax = plt.subplots(figsize=(6, 4.8))
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o")
    ax.set_xlim(0.0, 0.6)
    ax.set_ylim(-0.05, 1.08)
    fig.canvas.draw()
    R._place_labels(ax, pts)
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    assert len(boxes) == 20
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    plt.close(fig)
    assert R.plot([], tmp_path, "none") == []


def test_print_summary(capsys):
    R.print_summary(R.summarize(_hand_rows()))
    out = capsys.readouterr().out
    assert "snapkv" in out and "dense" in out and "-29.2" in out


def test_plot_draws_a_panel_per_family_present(tmp_path):
    import struct

    def width(path):  # PNG IHDR: width at bytes 16..20
        return struct.unpack(">I", path.read_bytes()[16:20])[0]

    rows = [r for r in _suite_rows() if r["model"] == "smollm2"]
    press = [r for r in rows if r["family"] != "prefill"]
    (tmp_path / "both").mkdir()
    (tmp_path / "one").mkdir()
    both = R.plot(R.summarize(rows), tmp_path / "both", "smollm2")
    one = R.plot(R.summarize(press), tmp_path / "one", "smollm2")
    assert len(both) == len(one) == 3
    for a, b in zip(both, one):
        assert width(b) < 0.6 * width(a)  # one panel (decode-sparse), not an empty prefill-sparse beside it
