"""attnlab.sweep: resume semantics (a rerun runs nothing, a new configuration runs alone, an error is retried),
every executor turns a raising configuration into an error row, the process pool gives the in-process rows,
``--executor ray`` without Ray fails naming the install command, and on a local 2-CPU Ray instance the quality
benchmark, the frontier and the interventions runner give the local executor's results."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "models"))
sys.path.insert(0, str(Path(__file__).resolve().parent / "interventions"))
import hf_tiny  # noqa: E402
import ivhelpers  # noqa: E402
from hf_tiny import VOCAB, tiny  # noqa: E402

from attnlab import sweep  # noqa: E402
from attnlab.models import hf  # noqa: E402
from attnlab.sweep import Executor, append_row, load_rows, run_sweep  # noqa: E402

CALLS: list[int] = []  # the items run in this process (the in-process executor)
FAIL: set[int] = set()  # items whose run raises


def square(item: int) -> dict:
    CALLS.append(item)
    if item in FAIL:
        raise ValueError(f"boom {item}")
    g = torch.Generator().manual_seed(item)
    x = torch.randn(16, 16, generator=g)
    return {"item": item, "value": float((x @ x.T).trace()), "pid": os.getpid()}


def sq_or_fail_on_two(item: int) -> dict:
    """``square`` for a process pool (module state such as FAIL does not travel to spawned workers)."""
    if item == 2:
        raise ValueError("boom 2")
    return square(item)


def raises_on_two(item: int) -> dict:
    if item == 2:
        raise ValueError("boom")
    return {"item": item}


def _key(item: int) -> str:
    return f"k{item}"


# ---- resume ------------------------------------------------------------------------------------------------
def test_rerun_runs_nothing_new_config_runs_alone_errors_are_retried(tmp_path):
    path = tmp_path / "results.jsonl"
    CALLS.clear()
    FAIL.clear()
    FAIL.add(2)
    rows = run_sweep(square, [1, 2, 3], key=_key, path=path, show_progress=False)
    assert CALLS == [1, 2, 3] and [r["key"] for r in rows] == ["k1", "k2", "k3"]
    assert "ValueError: boom 2" in rows[1]["error"] and "value" not in rows[1]  # one failure, the sweep went on
    assert rows[0]["value"] == square(1)["value"]
    CALLS.clear()
    FAIL.clear()
    rows = run_sweep(square, [1, 2, 3, 4], key=_key, path=path, show_progress=False)
    assert CALLS == [2, 4]  # the error row is retried, the new configuration runs, nothing else
    assert [r["item"] for r in rows] == [1, 2, 3, 4] and not any("error" in r for r in rows)
    CALLS.clear()
    assert [r["item"] for r in run_sweep(square, [4, 3], key=_key, path=path, show_progress=False)] == [4, 3]
    assert CALLS == []
    assert len(path.read_text().splitlines()) == 5  # appended: 3 first, then the retried and the new one
    assert {r["key"] for r in load_rows(path)} == {"k1", "k2", "k3", "k4"}  # the retried row supersedes
    FAIL.add(5)
    run_sweep(square, [5], key=_key, path=path, show_progress=False, retry_errors=False)
    CALLS.clear()
    run_sweep(square, [5], key=_key, path=path, show_progress=False, retry_errors=False)
    assert CALLS == []  # kept as done when asked
    FAIL.clear()
    with pytest.raises(ValueError, match="share a key"):
        run_sweep(square, [1, 1], key=_key, path=tmp_path / "dup.jsonl", show_progress=False)


def test_torn_line_is_skipped_and_the_next_row_starts_a_fresh_line(tmp_path):
    path = tmp_path / "r.jsonl"
    append_row(path, {"key": "a", "x": 1})
    with path.open("a") as f:
        f.write('{"key": "b", "x"')  # a crash mid-write
    append_row(path, {"key": "c", "x": float("nan"), "p": Path("q")})  # nan and a repr'd value
    rows = load_rows(path)
    assert [r["key"] for r in rows] == ["a", "c"] and rows[1]["p"] == repr(Path("q"))


def test_error_fields_fill_the_rows_of_configurations_that_did_not_return(tmp_path):
    rows = run_sweep(raises_on_two, [1, 2], key=_key, path=tmp_path / "r.jsonl", show_progress=False,
                     error_fields=lambda it: {"item": it, "task": "t"})
    assert rows[0] == {"item": 1, "key": "k1"}
    assert rows[1]["item"] == 2 and rows[1]["task"] == "t" and rows[1]["error"] == "ValueError: boom"
    assert "raises_on_two" in rows[1]["trace"]


# ---- executors ---------------------------------------------------------------------------------------------
def test_process_pool_gives_the_in_process_rows_and_records_errors(tmp_path):
    items = [0, 1, 2, 3]
    local = run_sweep(sq_or_fail_on_two, items, key=_key, path=tmp_path / "a.jsonl", show_progress=False)
    pool = run_sweep(sq_or_fail_on_two, items, key=_key, path=tmp_path / "b.jsonl", show_progress=False,
                     executor=Executor(workers=2, threads=1))

    def same(rows):  # where it ran (process id, the traceback's frames) aside
        return [{k: v for k, v in r.items() if k not in ("pid", "trace")} for r in rows]

    assert same(pool) == same(local) and len(pool) == 4
    assert pool[2]["error"] == local[2]["error"] == "ValueError: boom 2"  # one failure, the sweep went on
    assert "sq_or_fail_on_two" in pool[2]["trace"]
    assert {r["pid"] for r in pool if "pid" in r} - {os.getpid()}  # they ran elsewhere
    assert {r["pid"] for r in local if "pid" in r} == {os.getpid()}


def test_executor_arguments_are_checked():
    with pytest.raises(ValueError, match="workers"):
        Executor(workers=0)
    with pytest.raises(ValueError, match="unknown executor"):
        Executor("slurm")
    with pytest.raises(ValueError, match="--address is for --executor ray"):
        Executor(address="auto")
    with pytest.raises(ValueError, match="threads"):
        Executor(threads=0)


def test_ray_executor_without_ray_names_the_install_command(monkeypatch, tmp_path):
    from attnlab.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    with pytest.raises(ImportError, match=r"--executor ray needs Ray: pip install -e \.\[ray\]"):
        run_sweep(square, [1], key=_key, path=tmp_path / "r.jsonl", executor=Executor("ray"), show_progress=False)
    assert not (tmp_path / "r.jsonl").exists()
    for argv in (["bench", "tasks", "--tasks", "selective_copy", "--mechanisms", "softmax", "--dry-run"],
                 ["frontier", "--models", "smollm2", "--methods", "stream"]):  # fails before any model loads
        with pytest.raises(SystemExit, match=r"pip install -e \.\[ray\]"):
            main(argv + ["--executor", "ray", "--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())


# ---- Ray: the same results as the local executor --------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_2cpu():
    """One local Ray instance of 2 CPUs for this module's Ray tests; shut down after them."""
    ray = pytest.importorskip("ray", reason="the ray extra: pip install -e .[ray] (scripts/setup.sh --test)")
    # the test helpers travel by value (Ray's workers cannot import this folder)
    for mod in (sys.modules[__name__], hf_tiny, ivhelpers):
        ray.cloudpickle.register_pickle_by_value(mod)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
    for mod in (sys.modules[__name__], hf_tiny, ivhelpers):
        ray.cloudpickle.unregister_pickle_by_value(mod)


def _tiny_tasks_configs():
    from attnlab.bench.tasks import MQAR, LayerSpec, MechSpec, MQARConfig, TrainConfig
    from attnlab.bench.tasks.backbone import BackboneConfig
    from attnlab.bench.tasks.runner import RunConfig, config_key
    from attnlab.core.patterns import SlidingWindow

    task = MQAR(MQARConfig(vocab=32, seq_len=16, num_pairs=4, test_size=64, val_size=64))
    bb = BackboneConfig(dim=32, heads=2)
    out = []
    for label, spec in [("softmax", LayerSpec("mha")), ("window-2", LayerSpec("mha", {"pattern": SlidingWindow(2)})),
                        ("full", LayerSpec("mha", {"pattern": None}))]:  # full: not causal, an error row
        rc = RunConfig("tiny", task, MechSpec(label, (spec,)), bb, TrainConfig(lr=1e-2, max_steps=4, eval_every=2),
                       seed=0)
        out.append(RunConfig(**{**rc.__dict__, "key": config_key(rc.ident())}))
    return out


def _untimed(row: dict) -> dict:
    """A row without what depends on the machine's speed."""
    out = {k: v for k, v in row.items() if k not in ("seconds", "trace")}
    if "curve" in out:
        out["curve"] = [(step, val) for step, _, val in out["curve"]]
    return out


def test_ray_quality_benchmark_equals_the_local_executor(ray_2cpu, tmp_path):
    from attnlab.bench.tasks.runner import execute

    configs = _tiny_tasks_configs()
    before = torch.get_num_threads()
    try:
        local, ran = execute(configs, tmp_path / "local", threads=1, show_progress=False)
    finally:
        torch.set_num_threads(before)
    remote, ran_remote = execute(configs, tmp_path / "ray", executor=Executor("ray", workers=2, threads=1),
                                 show_progress=False)
    assert ran == ran_remote == 3
    assert [r["mechanism"] for r in remote] == ["softmax", "window-2", "full"]
    assert "not causal" in remote[2]["error"] and remote[0]["score"] is not None
    assert [_untimed(r) for r in remote] == [_untimed(r) for r in local]
    # resume under ray: finished configurations are skipped, the error row is run again
    again, ran = execute(configs, tmp_path / "ray", executor=Executor("ray", workers=2, threads=1),
                         show_progress=False)
    assert ran == 1 and [_untimed(r) for r in again] == [_untimed(r) for r in local]


# the frontier on a tiny random model: the loader and a calibrated test method travel to Ray's workers by value
L = 48


class Tok:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def _calibrated_build(ctx, f, L):
    """A method whose window comes from a calibration (computed once, on the driver)."""
    from attnlab.frontier.methods import Setup
    from attnlab.plans.plan import HeadPlan, HeadPolicy

    window = int(ctx.calibrated("sweep-test", lambda: torch.tensor([12.0]))[0])
    plan = HeadPlan.uniform(ctx.num_layers, ctx.num_kv_heads, HeadPolicy.stream(2, window), ctx.q_per_kv, "cal")
    return Setup(plan=ctx.windows(plan, f))


def _cal_method():
    from attnlab.frontier.methods import Method

    return Method("sweep-cal", "decode", ("press",), (), "test: a calibrated streaming window", _calibrated_build)


def tiny_loader(name: str):
    from attnlab.frontier import methods as M

    M.METHODS.setdefault("sweep-cal", _cal_method())  # this process's registry (a Ray worker's) gets the test method
    return tiny("llama"), Tok()


def fake_samples(tok, task, length, n, seed=0):
    from attnlab.plans.tasks import Sample

    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(seed * 1000 + i + length)
        ids = tuple(torch.randint(1, VOCAB, (length,), generator=g).tolist())
        out.append(Sample(task, ids, (str(ids[3]),), length, (i + 0.5) / n, 4))
    return out


def _records(run_dir: Path) -> list[dict]:
    recs = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]
    drop = ("prefill_s", "decode_tok_s", "dense", "trace")
    return sorted(({k: v for k, v in r.items() if k not in drop} for r in recs),
                  key=lambda r: (r["task"], r["length"], r["sample"], r["method"], r["budget"] or 0, r["protocol"]))


def test_ray_frontier_equals_the_local_executor(ray_2cpu, tmp_path, monkeypatch):
    from attnlab.frontier import methods as M
    from attnlab.frontier import run as R

    monkeypatch.setitem(M.METHODS, "sweep-cal", _cal_method())
    monkeypatch.setattr(R, "samples", fake_samples)
    monkeypatch.setattr(R, "make_samples", fake_samples)
    args = (["tiny"], ["snapkv", "stream", "sweep-cal"], [0.5], ["passkey", "kv"], [L], 2)
    kw = dict(loader=tiny_loader, log=lambda s: None)
    R.frontier(*args, tmp_path / "local", **kw)
    R.frontier(*args, tmp_path / "ray", executor=Executor("ray", workers=2), **kw)
    local, remote = _records(tmp_path / "local"), _records(tmp_path / "ray")
    assert len(local) == 2 * 2 * 5  # tasks x samples x (dense, snapkv press, stream prefill/press, sweep-cal press)
    assert not [r for r in remote if "error" in r]  # the calibration reached the workers
    assert remote == local
    assert (tmp_path / "ray" / "calibration-tiny" / "sweep-test.safetensors").is_file()  # computed on the driver
    # resume under ray: a rerun runs nothing; a new budget runs only its configurations and their dense runs
    lines = (tmp_path / "ray" / "samples.jsonl").read_text().splitlines()
    R.frontier(*args, tmp_path / "ray", executor=Executor("ray", workers=2), **kw)
    assert (tmp_path / "ray" / "samples.jsonl").read_text().splitlines() == lines
    R.frontier(args[0], ["stream"], [0.25], ["kv"], [L], 2, tmp_path / "ray", executor=Executor("ray", workers=2),
               **kw)
    added = [json.loads(x) for x in (tmp_path / "ray" / "samples.jsonl").read_text().splitlines()[len(lines):]]
    assert sorted((r["method"], r["budget"], r["protocol"]) for r in added) == sorted(
        [("dense", None, "dense")] * 2 + [("stream", 0.25, "prefill")] * 2 + [("stream", 0.25, "press")] * 2)


def test_a_worker_context_never_computes_a_calibration():
    from attnlab.frontier import run as R

    ctx = R._ShippedContext(**vars(R.context(tiny("llama"), Tok())))
    ctx.cache["x"] = 1
    assert ctx.calibrated("x", lambda: 2) == 1
    with pytest.raises(RuntimeError, match="not computed before dispatch"):
        ctx.calibrated("y", lambda: 2)


def test_a_unit_that_did_not_return_records_an_error_per_configuration():
    from attnlab.frontier import run as R

    s = fake_samples(None, "passkey", L, 1)[0]
    unit = R.Unit("tiny", "tiny", s, 0, (("stream", 0.5, "prefill"), ("snapkv", 0.5, "press")), "shrink", {}, s, ())
    recs = R.unit_error(unit, sweep.error_row(MemoryError("out")))
    assert [(r["method"], r["protocol"]) for r in recs] == [("dense", "dense"), ("stream", "prefill"),
                                                            ("snapkv", "press")]
    assert all(r["error"] == "MemoryError: out" and r["sample"] == 0 and r["model"] == "tiny" for r in recs)
    assert R.aggregate(recs) == []  # errors are reported, never aggregated


# the interventions runner: fits on the driver, scoring on Ray's workers, the tiny world shipped by value
def iv_run_config(cfg):
    """The runner's configuration function; in a Ray worker it first installs the test's tiny model and tasks."""
    from attnlab.interventions import data
    from attnlab.interventions import runner as RN

    if "tiny" not in hf.SHARED:  # a fresh worker process
        torch.set_num_threads(1)
        data.make = ivhelpers.fake_make
        hf.SHARED["tiny"] = (tiny("llama"), ivhelpers.Tok())
    return RN.run_config(cfg)


def _iv_records(run_dir: Path) -> list[dict]:
    recs = [json.loads(x) for x in (run_dir / "results.jsonl").read_text().splitlines()]
    return sorted(({k: v for k, v in r.items() if k != "seconds"} for r in recs), key=lambda r: r["key"])


def test_ray_interventions_runner_equals_the_local_executor(ray_2cpu, tmp_path, monkeypatch):
    from attnlab.interventions import data
    from attnlab.interventions import runner as RN

    monkeypatch.setattr(data, "make", ivhelpers.fake_make)
    monkeypatch.setitem(hf.SHARED, "tiny", (tiny("llama"), ivhelpers.Tok()))
    RN._SAMPLES.clear()
    arms = ("zerotuning:gamma=2.0,heads=all", "decore:alpha=2.0,heads=1.0/1.1", "act")  # act: fitted on the driver
    run = RN.Run(("tiny",), arms, ("kv",), (40,), 2, 0, True, 2)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        local = RN.score(run, tmp_path / "local", show_progress=False)
        with monkeypatch.context() as m:  # what travels to the workers
            m.setattr(RN, "run_config", iv_run_config)
            ray_out = RN.score(run, tmp_path / "ray", executor=Executor("ray", workers=2), show_progress=False)
    finally:
        torch.set_num_threads(before)
        RN._SAMPLES.clear()
    assert not [r for r in ray_out["records"] if "error" in r]
    assert _iv_records(tmp_path / "ray") == _iv_records(tmp_path / "local")
    assert len(_iv_records(tmp_path / "ray")) == 2 * (1 + len(arms))
    untimed = [[{k: v for k, v in r.items() if "time" not in k and "seconds" not in k} for r in out["rows"]]
               for out in (ray_out, local)]
    assert untimed[0] == untimed[1] and {r["arm"] for r in untimed[0]} >= set(arms)
    assert {p.name for p in (tmp_path / "ray" / "fits").iterdir()} == {
        p.name for p in (tmp_path / "local" / "fits").iterdir()}  # act's fit, made on the driver
