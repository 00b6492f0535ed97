"""The preplan-and-anchor rhythm (I26): WAAD / FAI against brute force from the definitions on planted maps and on a
tiny model's eager weights (read through the seam's hooks), head classes, token marks, the coupling statistic and
its exact chance, the arithmetic prompts, ``attnlab bench rhythm`` end to end with ``--resume``, and ``rhythm`` as a
score arm of ``attnlab eval``."""

from __future__ import annotations

import itertools
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ivhelpers import Tok, fake_make, tiny  # noqa: E402

from attnlab.interventions import data  # noqa: E402
from attnlab.interventions import rhythm as RH  # noqa: E402
from attnlab.interventions import rhythm_cli as RC  # noqa: E402
from attnlab.interventions import runner as RN  # noqa: E402
from attnlab.models import hf  # noqa: E402


def brute(a, window):
    """WAAD and FAI by loops over the definitions; a: (H, T, T)."""
    H, T, _ = a.shape
    waad = torch.zeros(H, T, dtype=torch.float64)
    fai = torch.full((H, T), math.nan, dtype=torch.float64)
    for h in range(H):
        for i in range(T):
            waad[h, i] = sum(float(a[h, i, j]) * min(i - j, window) for j in range(i + 1))
        for j in range(T - 1):
            fai[h, j] = sum(float(a[h, i, j]) for i in range(j + 1, T)) / (T - 1 - j)
    return waad, fai


def same(x, y, tol=1e-6):
    return torch.equal(torch.isnan(x), torch.isnan(y)) and torch.allclose(x.nan_to_num(), y.nan_to_num(), atol=tol)


def test_planted_maps():
    T, W = 12, 4
    prev = torch.zeros(T, T)
    prev[0, 0] = 1
    prev[torch.arange(1, T), torch.arange(T - 1)] = 1  # every query on the previous token
    sink = torch.zeros(T, T)
    sink[:, 0] = 1  # every query on token 0
    uni = torch.tril(torch.ones(T, T)) / torch.arange(1, T + 1).view(-1, 1)
    a = torch.stack([prev, sink, uni])
    waad, fai = RH.waad_fai_from_weights(a, W)
    assert torch.equal(waad[0, 1:], torch.ones(T - 1, dtype=torch.float64)) and waad[0, 0] == 0
    assert fai[1, 0] == 1 and torch.equal(fai[1, 1:T - 1], torch.zeros(T - 2, dtype=torch.float64))
    assert torch.equal(waad[1], torch.arange(T).clamp(max=W).double())  # distances clipped at W
    rw, rf = brute(a, W)
    assert same(waad, rw) and same(fai, rf) and math.isnan(fai[0, -1])
    with pytest.raises(ValueError, match="window"):
        RH.waad_fai_from_weights(a, 0)
    with pytest.raises(ValueError, match="H, T, T"):
        RH.waad_fai_from_weights(a[:, :3], 4)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_hook_values_equal_an_eager_computation(family):
    torch.set_num_threads(1)
    ids = torch.randint(1, 90, (14,), generator=torch.Generator().manual_seed(3)).tolist()
    waad, fai = RH.waad_fai(tiny(family), ids, window=3)
    with torch.no_grad():
        att = tiny(family, attn="eager")(input_ids=torch.tensor([ids]), output_attentions=True).attentions
    for layer in range(2):
        rw, rf = brute(att[layer][0].double(), 3)
        assert same(waad[layer], rw) and same(fai[layer], rf), layer
    one, _ = RH.waad_fai(tiny(family), ids, window=3, layers=[1])
    assert one.shape == (1, 4, 14) and torch.allclose(one[0], waad[1])
    with pytest.raises(ValueError, match="outside"):
        RH.waad_fai(tiny(family), ids, layers=[5])


def test_head_classes_marks_and_coupling():
    waad = torch.zeros(2, 2, 10, dtype=torch.float64)
    waad[0, 0] = 1.0
    waad[0, 1] = 5.0
    waad[1, 0] = 3.0
    waad[1, 1, 4:] = 9.0  # highest mean from position 4 on only
    local, glob = RH.head_classes(waad, 4, 0.25)
    assert local == [(0, 0)] and glob == [(1, 1)]
    ws = torch.tensor([0, 0, 0, 0, 5, 1, 7, 1, 1, 9], dtype=torch.float64)
    fs = torch.tensor([0, 0, 0, 0, 1, 2, 1, 8, 1, math.nan], dtype=torch.float64)
    el, pre, anc = RH.mark_tokens(ws, fs, 4, 0.3)
    assert el == [4, 5, 6, 7, 8] and pre == [4, 6] and anc == [5, 7]  # the last token (FAI undefined) excluded
    assert RH.coupling(pre, anc) == 2 and RH.coupling([4, 8], [4]) == 1 and RH.coupling([7], [4, 6]) == 0


@pytest.mark.parametrize("n, pre, a", [(6, [0, 2, 5], 2), (5, [4], 1), (7, [1, 3], 3), (4, [0, 1, 2, 3], 4)])
def test_expected_coupling_equals_enumeration(n, pre, a):
    el = list(range(n))
    subsets = list(itertools.combinations(el, a))
    want = sum(RH.coupling(pre, s) for s in subsets) / len(subsets)
    assert RH.expected_coupling(el, pre, a) == pytest.approx(want, abs=1e-12)


def test_permutation_p():
    prompts = [(list(range(20)), [2, 9, 15], 3)] * 4
    assert RH.permutation_p(prompts, 12, perms=300) < 0.01  # every preplan token coupled: far above chance
    assert RH.permutation_p(prompts, 0, perms=300) == 1.0


def test_arithmetic_prompts_are_seeded_and_answered():
    for seed in range(5):
        q, ans = RH.arithmetic_problem(seed, 4)
        assert RH.arithmetic_problem(seed, 4) == (q, ans)
        x = int(re.search(r"x = (\d+)", q).group(1))
        for op, v in re.findall(r"(Add|Subtract|Multiply) (?:x by )?(\d+)", q):
            x = x + int(v) if op == "Add" else x - int(v) if op == "Subtract" else x * int(v)
        assert x == ans and len(re.findall(r"(Add|Subtract|Multiply)", q)) == 4
    assert RH.arithmetic_problem(0, 4) != RH.arithmetic_problem(1, 4)
    with pytest.raises(ValueError, match="steps"):
        RH.arithmetic_problem(0, 0)


@pytest.fixture
def tiny_world(monkeypatch):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setitem(hf.SHARED, "tiny", (tiny("llama"), Tok()))
    monkeypatch.setattr(data, "make", fake_make)
    RN._SAMPLES.clear()
    yield
    RN._SAMPLES.clear()
    torch.set_num_threads(n)


def test_bench_rhythm_end_to_end_and_resume(tmp_path, tiny_world, monkeypatch):
    from attnlab.cli import main

    calls = []
    real = RC.run_one
    monkeypatch.setattr(RC, "run_one", lambda cfg: calls.append(cfg.index) or real(cfg))
    argv = ["bench", "rhythm", "--model", "tiny", "--n", "2", "--max-new", "12", "--window", "4", "--top", "0.25",
            "--out-root", str(tmp_path)]
    assert main(argv) == 0
    (run_dir,) = [p for p in tmp_path.iterdir() if p.name.startswith("rhythm-")]
    for f in ("results.json", "results.md", "traces.png", "results.jsonl"):
        assert (run_dir / f).is_file(), f
    recs = [json.loads(x) for x in (run_dir / "results.jsonl").read_text().splitlines()]
    assert calls == [0, 1] and len(recs) == 2
    for r in recs:
        assert r["tokens"] - r["start"] == 12 and len(r["preplan"]) == len(r["anchors"]) == 3
        assert r["hits"] == RH.coupling(r["preplan"], r["anchors"])
    (row,) = json.loads((run_dir / "results.json").read_text())["rows"]
    assert row["hits"] == sum(r["hits"] for r in recs) and row["preplan"] == 6 and 0 < row["p_perm"] <= 1
    calls.clear()
    assert main([*argv[:-2], "--resume", str(run_dir)]) == 0
    assert calls == []
    with pytest.raises(ValueError, match="top"):
        main([*argv, "--top", "0"])


def test_rhythm_as_a_score_arm(tmp_path, tiny_world):
    run = RN.Run(("tiny",), ("rhythm:top=0.5,window=3",), ("kv",), (40,), 2, 0, True)
    out = RN.score(run, tmp_path, show_progress=False, log=lambda s: None)
    arm = [r for r in out["records"] if r["arm"] != "plain"]
    model, _ = hf.SHARED["tiny"]
    for r in arm:
        s = fake_make(Tok(), "kv", 40, 2)[r["sample"]]
        new = [int(w) for w in r["text"].split()]
        want = RH.analyse(model, list(s.ids) + new, len(s.ids), RH.Rhythm(3, 0.25, 0.5))
        assert r["measures"]["coupling"] == pytest.approx(want["coupling"])
        assert r["measures"]["excess"] == pytest.approx(want["coupling"] - want["chance"])
    rows = {row["measure"]: row for row in out["scores"]}
    assert set(rows) == {"coupling", "chance", "excess"} and all(r["stat"] == "mean" for r in rows.values())
    assert rows["coupling"]["value"] == pytest.approx(sum(r["measures"]["coupling"] for r in arm) / 2)
