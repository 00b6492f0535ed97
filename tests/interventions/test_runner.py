"""The paired scoring runner on a tiny model: every arm scores the same samples as the plain model, a rerun runs
nothing, a resumed run with a new arm runs only that arm and reuses the fits; the paired CI on synthetic records;
the ``attnlab eval --intervention`` command end to end and its errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ivhelpers import Tok, fake_make, tiny  # noqa: E402

from attnlab.frontier.report import bootstrap_ci  # noqa: E402
from attnlab.interventions import data  # noqa: E402
from attnlab.interventions import runner as RN  # noqa: E402
from attnlab.models import hf  # noqa: E402

ARMS = ("zerotuning:gamma=2.0,heads=all", "decore:alpha=2.0,heads=1.0/1.1", "pause:count=1")


@pytest.fixture(autouse=True)
def tiny_world(monkeypatch):
    """The runner's model cache holds a tiny Llama under the name ``tiny``; tasks are synthetic (same splits)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr(data, "make", fake_make)
    monkeypatch.setitem(hf.SHARED, "tiny", (tiny("llama"), Tok()))
    RN._SAMPLES.clear()
    yield
    RN._SAMPLES.clear()
    torch.set_num_threads(n)


@pytest.fixture
def counted(monkeypatch):
    calls = []
    real = RN.run_config

    def run_config(cfg):
        calls.append(cfg.key)
        return real(cfg)

    monkeypatch.setattr(RN, "run_config", run_config)
    return calls


def _run(arms=ARMS, n=3):
    return RN.Run(("tiny",), tuple(arms), ("kv",), (40,), n, 0, True)


def test_every_arm_scores_the_plain_models_samples(tmp_path, counted):
    out = RN.score(_run(), tmp_path, show_progress=False)
    recs = out["records"]
    assert len(recs) == len(counted) == 3 * (1 + len(ARMS))
    plain = {r["sample"]: r["sample_id"] for r in recs if r["arm"] == RN.PLAIN}
    want = {i: data.sample_id(s) for i, s in enumerate(fake_make(Tok(), "kv", 40, 3))}
    assert plain == want and len(set(want.values())) == 3
    for r in recs:
        assert r["sample_id"] == plain[r["sample"]], r["arm"]
    # configurations ran sample by sample: plain, then each arm, on the same prompt
    assert [k.split("/", 4)[4] for k in counted[:4]] == [RN.PLAIN, *ARMS]
    pause = [r for r in recs if r["arm"] == "pause:count=1"]
    assert all(r["knobs"]["pause"]["every"] in (0, 64, 128) for r in pause)
    rows = {r["arm"]: r for r in out["rows"]}
    assert set(rows) == {RN.PLAIN, *ARMS} and all(r["n"] == 3 for r in rows.values())
    assert rows[RN.PLAIN]["change"] == 0 and rows[RN.PLAIN]["ci_lo"] == rows[RN.PLAIN]["ci_hi"] == 0
    for f in ("results.json", "results.md", "changes.png", "config.json", "results.jsonl"):
        assert (tmp_path / f).is_file(), f
    fits = list((tmp_path / "fits").glob("*.json"))
    assert len(fits) == 1 and "pause" in fits[0].name  # zerotuning and decore were given every knob
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["meta"]["arms"] == list(ARMS) and len(saved["rows"]) == 1 + len(ARMS)


def test_a_rerun_runs_nothing_and_a_new_arm_runs_alone(tmp_path, counted):
    RN.score(_run(), tmp_path, show_progress=False)
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    fit_files = {p: p.stat().st_mtime_ns for p in (tmp_path / "fits").iterdir()}
    counted.clear()
    out = RN.score(_run(), tmp_path, show_progress=False)
    assert counted == []
    assert (tmp_path / "results.jsonl").read_text().splitlines() == lines
    assert all(v["reused"] for v in out["fits"].values())
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "fits").iterdir()} == fit_files
    more = (*ARMS, "act:alpha=1.5,heads=all")
    out = RN.score(_run(more), tmp_path, show_progress=False)
    assert sorted(counted) == [f"tiny/kv/40/{i}/act:alpha=1.5,heads=all" for i in range(3)]
    assert {r["arm"] for r in out["rows"]} == {RN.PLAIN, *more}


def test_fits_use_the_validation_split(tmp_path):
    RN.score(_run(("pause:count=1",), n=2), tmp_path, show_progress=False)
    (meta,) = [json.loads(p.read_text()) for p in (tmp_path / "fits").glob("*.json")]
    test_ids = {data.sample_id(s) for s in fake_make(Tok(), "kv", 40, 2, split="test")}
    assert meta["val_ids"] and not set(meta["val_ids"]) & test_ids
    assert meta["val_ids"] == [data.sample_id(s) for s in fake_make(Tok(), "kv", 40, meta["n_val"], split="val")]


def test_a_plan_intervention_runs_its_own_plan_per_prompt_length(tmp_path, monkeypatch):
    used = []
    real = RN.Base

    class Spy(real):
        def __init__(self, model, plan=None):
            used.append(None if plan is None else plan.name)
            super().__init__(model, plan)

    monkeypatch.setattr(RN, "Base", Spy)
    out = RN.score(RN.Run(("tiny",), ("moa:budget=0.3",), ("kv",), (120,), 1, 0, True), tmp_path,
                   show_progress=False)
    recs = {r["arm"]: r for r in out["records"]}
    assert recs["moa:budget=0.3"]["sample_id"] == recs[RN.PLAIN]["sample_id"]
    assert "moa-elastic-120" in used and used.count(None) >= 1  # the plain arm keeps the model's attention


def test_interventions_calibrate_a_plans_attention(tmp_path):
    from attnlab.plans.plan import HeadPlan, HeadPolicy
    from attnlab.plans.runtime import greedy_generate

    plan = HeadPlan(((HeadPolicy.full(), HeadPolicy.stream(2, 8)), (HeadPolicy.stream(2, 8), HeadPolicy.full())),
                    q_per_kv=2, name="mixed")
    path = plan.save(tmp_path / "plan.json")
    arms = ("zerotuning:gamma=2.0,heads=all", "decore:alpha=2.0,heads=1.0", "pause:count=1")
    out = RN.score(RN.Run(("tiny",), arms, ("kv",), (40,), 2, 0, True, None, str(path)), tmp_path / "run",
                   show_progress=False)
    recs = out["records"]
    assert len(recs) == 2 * 4 and {r["arm"] for r in recs} == {RN.PLAIN, *arms}
    model, tok = hf.SHARED["tiny"]
    s = fake_make(tok, "kv", 40, 2)[0]
    want = greedy_generate(model, torch.tensor([s.ids]), plan, s.max_new_tokens)["tokens"][0].tolist()
    plain = next(r for r in recs if r["arm"] == RN.PLAIN and r["sample"] == 0)
    assert plain["text"] == tok.decode(want)  # the plain arm is the plan's own decoding
    assert all("plan" in k for k in out["fits"])  # fits ran under (and are keyed by) the plan


def _rec(arm, sample, score, sid=None, seconds=1.0, length=40, task="t"):
    return {"model": "m", "task": task, "length": length, "sample": sample, "arm": arm,
            "sample_id": sid or f"s{length}-{sample}", "score": score, "seconds": seconds}


def test_paired_ci_on_synthetic_records():
    plain = [1, 0, 1, 0, 1, 0, 0, 1]
    arm = [1, 1, 1, 0, 1, 1, 0, 1]
    recs = [_rec("plain", i, s, seconds=2.0) for i, s in enumerate(plain)]
    recs += [_rec("a", i, s, seconds=1.0) for i, s in enumerate(arm)]
    recs += [_rec("same", i, s) for i, s in enumerate(plain)]
    rows = {r["arm"]: r for r in RN.aggregate(recs)}
    a = rows["a"]
    diffs = [y - x for x, y in zip(plain, arm)]
    assert a["n"] == 8 and a["change"] == pytest.approx(0.25) and a["score"] == 0.75 and a["plain"] == 0.5
    assert (a["ci_lo"], a["ci_hi"]) == bootstrap_ci(diffs, n_boot=2000, seed=0)
    assert a["ci_lo"] <= a["change"] <= a["ci_hi"] and a["time_ratio"] == 0.5
    # paired: an arm equal to the plain model on every sample has no uncertainty, however noisy the scores
    s = rows["same"]
    assert s["change"] == 0 and s["ci_lo"] == s["ci_hi"] == 0
    assert bootstrap_ci(plain)[1] - bootstrap_ci(plain)[0] > 0.3  # an unpaired interval would be wide


def test_aggregate_pools_lengths_pairs_only_shared_samples_and_refuses_mismatches():
    recs = [_rec("plain", i, 0.0, length=L) for L in (40, 80) for i in range(2)]
    recs += [_rec("a", i, 1.0, length=L) for L in (40, 80) for i in range(2)] + [_rec("a", 5, 1.0)]
    (row,) = [r for r in RN.aggregate(recs) if r["arm"] == "a"]
    assert row["n"] == 4 and row["lengths"] == [40, 80] and row["change"] == 1.0
    bad = recs + [_rec("b", 0, 1.0, sid="other")]
    with pytest.raises(ValueError, match="same prompt"):
        RN.aggregate(bad)


def test_cli_end_to_end_and_resume(tmp_path, counted):
    from attnlab.cli import main

    args = ["eval", "--intervention", "zerotuning:gamma=2,heads=all", "--model", "tiny", "--tasks", "kv",
            "--lengths", "40", "--n", "2", "--out-root", str(tmp_path), "--threads", "1"]
    assert main(args) == 0
    (run_dir,) = [p for p in tmp_path.iterdir() if p.name.startswith("interventions-")]
    assert len(counted) == 4
    counted.clear()
    assert main(["eval", "--resume", str(run_dir)]) == 0
    assert counted == []
    assert main(["eval", "--resume", str(run_dir), "--intervention", "zerotuning:gamma=2,heads=all",
                 "--intervention", "headmask:heads=1.0"]) == 0
    assert sorted(counted) == ["tiny/kv/40/0/headmask:heads=1.0", "tiny/kv/40/1/headmask:heads=1.0"]


@pytest.mark.parametrize("argv, words", [
    (["--intervention", "nope"], ["unknown intervention", "zerotuning"]),
    (["--intervention", "act", "--tasks", "nope"], ["unknown task 'nope'", "passkey"]),
    (["--intervention", "act", "--plan", "a.json", "--plan", "b.json"], ["one --plan"]),
    (["--intervention", "decore+dagcd"], ["at most one decoding function"]),
    (["--intervention", "moa", "--plan", "a.json"], ["cannot run under --plan"]),
])
def test_cli_errors(tmp_path, argv, words):
    from attnlab.cli import main

    with pytest.raises(SystemExit) as e:
        main(["eval", *argv, "--out-root", str(tmp_path)])
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    assert not list(tmp_path.iterdir())  # nothing written before the arguments are checked


def test_an_arm_runs_only_on_the_tasks_its_interventions_support():
    from attnlab.interventions import registry as R

    assert R.get("inject").tasks == ("icl_cls", "icl_map") and R.get("act").tasks is None
    cells = [("kv", 40), ("icl_cls", 40)]
    cfgs = RN.configs(["tiny"], ["zeroshot", "act"], cells, 1)
    assert [(c.task, c.arm) for c in cfgs] == [("kv", "plain"), ("kv", "act"), ("icl_cls", "plain"),
                                               ("icl_cls", "zeroshot"), ("icl_cls", "act")]
    needed = RN.fits_needed("tiny", [R.parse("inject"), R.parse("act")], cells, None, True, 0)
    assert sorted((c.name, task) for _, c, task, _ in needed) == [("act", "icl_cls"), ("act", "kv"),
                                                                  ("inject", "icl_cls")]
