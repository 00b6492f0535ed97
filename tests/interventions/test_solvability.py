"""``attnlab eval --solvability``: the binomial verdict on synthetic records (known answers), the plain model's
continuations equal an independent greedy decode, resume, and the command's outputs and errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ivhelpers import Tok, fake_make, tiny  # noqa: E402

from attnlab.interventions import data  # noqa: E402
from attnlab.interventions import runner as RN  # noqa: E402
from attnlab.interventions import solvability as S  # noqa: E402
from attnlab.models import hf  # noqa: E402


@pytest.fixture(autouse=True)
def tiny_world(monkeypatch):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr(data, "make", fake_make)
    monkeypatch.setitem(hf.SHARED, "tiny", (tiny("llama"), Tok()))
    RN._SAMPLES.clear()
    yield
    RN._SAMPLES.clear()
    torch.set_num_threads(n)


def _rec(task, score, chance=0.5, **extra):
    return {"model": "m", "task": task, "length": 10, "score": score, "chance": chance, "seconds": 1.0, **extra}


def test_verdicts_on_known_counts():
    recs = [_rec("a", s) for s in (1, 1, 1, 0)]  # 3/4 at chance 1/2: p = P[X >= 3] = 5/16
    recs += [_rec("b", 1.0, chance=0.0)] + [_rec("b", 0.0, chance=0.0)] * 3  # chance 0: one right is enough
    recs += [_rec("c", 0.5, chance=0.0)] * 4  # partial recall is not a success
    recs += [_rec("d", 1, prior=0.0), _rec("d", 0, prior=1.0), _rec("d", 0, prior=1.0, partial=0.5)]
    recs += [{"key": "x", "error": "boom"}]
    rows = {r["task"]: r for r in S.aggregate(recs)}
    assert rows["a"]["correct"] == 3 and rows["a"]["p_value"] == pytest.approx(5 / 16)
    assert rows["a"]["verdict"] == "out of reach"
    assert rows["b"]["p_value"] == 0.0 and rows["b"]["verdict"] == "solvable" and rows["b"]["accuracy"] == 0.25
    assert rows["c"]["correct"] == 0 and rows["c"]["p_value"] == 1.0
    assert rows["d"]["prior_rate"] == pytest.approx(2 / 3) and rows["d"]["partial"] == pytest.approx(0.5 / 3)
    assert "prior_rate" not in rows["a"]
    strong = S.aggregate([_rec("e", 1)] * 10)[0]  # 10/10 at 1/2: p = 2^-10
    assert strong["p_value"] == pytest.approx(2.0**-10) and strong["solvable"]


def test_plain_continuations_equal_an_independent_greedy_decode_and_resume(tmp_path):
    from attnlab.plans.evaluate import dense_generate

    rep = S.run(["tiny"], ["kv"], 3, tmp_path, lengths=[40], show_progress=False)
    recs = [json.loads(x) for x in (tmp_path / S.RESULTS).read_text().splitlines()]
    assert len(recs) == 3 and rep.rows[0]["n"] == 3
    model, tok = hf.SHARED["tiny"]
    for r, s in zip(sorted(recs, key=lambda r: r["index"]), fake_make(tok, "kv", 40, 3)):
        toks = dense_generate(model, torch.tensor([s.ids]), s.max_new_tokens)["tokens"][0].tolist()
        assert r["text"] == tok.decode(toks) and r["score"] == s.score(r["text"])
        assert r["sample_id"] == data.sample_id(s)
    before = (tmp_path / S.RESULTS).read_text()
    S.run(["tiny"], ["kv"], 3, tmp_path, lengths=[40], show_progress=False)
    assert (tmp_path / S.RESULTS).read_text() == before  # nothing re-run
    for f in ("results.json", "results.md", "solvability.png"):
        assert (tmp_path / f).is_file()


def test_cli(tmp_path):
    from attnlab.cli import main

    assert main(["eval", "--solvability", "--model", "tiny", "--tasks", "kv", "--lengths", "40", "--n", "2",
                 "--out-root", str(tmp_path), "--threads", "1"]) == 0
    (run_dir,) = [p for p in tmp_path.iterdir() if p.name.startswith("solvability-")]
    got = json.loads((run_dir / "results.json").read_text())
    assert got["rows"][0]["task"] == "kv" and got["rows"][0]["n"] == 2
    with pytest.raises(SystemExit, match="plain model alone"):
        main(["eval", "--solvability", "--intervention", "act", "--out-root", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown task"):
        main(["eval", "--solvability", "--model", "tiny", "--tasks", "nope", "--out-root", str(tmp_path)])
