"""The quality benchmark: generators' known answers and invariants, a tiny training run that must learn (and a
control that must not), causality screening, state sizes, resume and compare."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from attnlab.bench.tasks import (
    MQAR,
    FlipFlop,
    FlipFlopConfig,
    InContextRegression,
    Induction,
    InductionConfig,
    LayerSpec,
    ListOps,
    ListOpsConfig,
    MechSpec,
    MQARConfig,
    Needle,
    NeedleConfig,
    RegressionConfig,
    SelectiveCopy,
    SelectiveCopyConfig,
    TrainConfig,
    parse_mechanism,
    train,
)
from attnlab.bench.tasks.backbone import BackboneConfig
from attnlab.bench.tasks.base import generator
from attnlab.bench.tasks.flipflop import IGNORE, ONE, ZERO, R, W
from attnlab.bench.tasks.listops import CLOSE, EQUALS, OP_ID, PAD
from attnlab.bench.tasks.mechanisms import build_layer
from attnlab.bench.tasks.runner import (
    RunConfig,
    aggregate,
    compare,
    config_key,
    execute,
    layer_state,
    load_rows,
    read_run,
    run_one,
)
from attnlab.core.patterns import Causal, SlidingWindow


# ---- generators -------------------------------------------------------------------------------------------------
def test_mqar_known_answers():
    cfg = MQARConfig(vocab=64, seq_len=64, num_pairs=8)
    b = MQAR(cfg).sample(50, generator(1))
    N, half = cfg.num_pairs, cfg.vocab // 2
    for x, y, m in zip(b.x, b.y, b.mask):
        keys, values = x[0 : 2 * N : 2], x[1 : 2 * N : 2]
        assert len(set(keys.tolist())) == N and keys.min() >= 1 and keys.max() < half
        assert values.min() >= half and values.max() < cfg.vocab
        binding = dict(zip(keys.tolist(), values.tolist()))
        pos = m.nonzero().flatten()
        assert len(pos) == N and pos.min() >= 2 * N and (pos % 2 == 0).all()
        # every key asked exactly once, and the target is the value bound to it in the context
        assert sorted(x[pos].tolist()) == sorted(keys.tolist())
        assert all(binding[int(x[p])] == int(y[p]) for p in pos)
        rest = torch.ones(cfg.seq_len, dtype=torch.bool)
        rest[: 2 * N] = False
        rest[pos] = False
        assert (x[rest] == 0).all()


def test_mqar_query_gaps_follow_a_power_law():
    cfg = MQARConfig(vocab=512, seq_len=256, num_pairs=8)
    b = MQAR(cfg).sample(400, generator(2))
    slots = (b.mask.nonzero()[:, 1] - 2 * cfg.num_pairs) // 2
    num_slots = (cfg.seq_len - 2 * cfg.num_pairs) // 2
    first_quarter = float((slots < num_slots // 4).float().mean())
    last_quarter = float((slots >= 3 * num_slots // 4).float().mean())
    assert first_quarter > 2 * last_quarter  # uniform slots would give equal shares
    assert last_quarter > 0  # but long gaps do occur


def test_selective_copy_targets_are_the_data_in_order():
    cfg = SelectiveCopyConfig(vocab=32, seq_len=48, num_tokens=6)
    b = SelectiveCopy(cfg).sample(20, generator(3))
    C = cfg.seq_len - cfg.num_tokens
    for x, y, m in zip(b.x, b.y, b.mask):
        data = x[:C][x[:C] != 0]
        assert len(data) == cfg.num_tokens
        assert y[m].tolist() == data.tolist() and x[C] == 1
        assert x[C + 1 :].tolist() == data[:-1].tolist()  # teacher forcing


def test_induction_copies_and_extrapolation_splits():
    task = Induction(InductionConfig(vocab=300, seq_len=32, extrapolate=(1, 2, 8), test_size=3))
    b = task.sample(40, generator(4))
    L = 8
    starts = set()
    for x, y, m in zip(b.x, b.y, b.mask):
        pos = m.nonzero().flatten()
        assert len(pos) == L - 1 and (pos.diff() == 1).all() and pos[0] >= 16
        # the token at each scored position occurred once before, and the target is what followed it then
        for p in pos.tolist():
            earlier = (x[:p] == x[p]).nonzero().flatten()
            assert len(earlier) == 1 and int(x[earlier + 1]) == int(y[p])
        assert len(set(x.tolist())) == 32 - L  # distinct apart from the repeated segment
        starts.add(int(pos[0]) - int((x[: pos[0]] == x[pos[0]]).nonzero()))
    assert len(starts) > 5  # the distance between the copies varies: no positional shortcut
    sets = task.test_sets(seed=0)
    assert {k: v.x.shape[1] for k, v in sets.items()} == {"T1x": 32, "T2x": 64, "T8x": 256}
    assert task.primary() == ("T1x",)


def _flipflop_reference(ops: list[int], bits: list[int]) -> list[int]:
    out, memory = [], None
    for op, bit in zip(ops, bits):
        if op == W:
            memory = bit
        elif op == R:
            out.append(memory)
    return out


def test_flipflop_reads_return_the_last_write():
    task = FlipFlop(FlipFlopConfig(seq_len=64))
    for batch in task.test_sets(seed=5).values():
        for x, y, m in zip(batch.x[:50], batch.y[:50], batch.mask[:50]):
            ops, bits = x[0::2].tolist(), (x[1::2] - ZERO).tolist()
            assert ops[0] == W and set(ops) <= {W, R, IGNORE}
            assert y[m].tolist() == [b + ZERO for b in _flipflop_reference(ops, bits)]
            assert (x[m] == R).all() and set(x[1::2].tolist()) <= {ZERO, ONE}
    sets = task.test_sets(seed=5)
    ignore = {k: float((v.x[:, 2::2] == IGNORE).float().mean()) for k, v in sets.items()}
    assert ignore["sparse"] > 0.95 and 0.75 < ignore["id"] < 0.85 and ignore["dense"] < 0.15


def test_regression_labels_are_linear_in_context():
    cfg = RegressionConfig(dim=4, num_points=12)
    b = InContextRegression(cfg).sample(6, generator(6))
    xs, ys = b.x[:, 0::2, : cfg.dim], b.x[:, 1::2, cfg.dim]
    for X, Y in zip(xs.double(), ys.double()):
        w = torch.linalg.lstsq(X[: cfg.dim + 1], Y[: cfg.dim + 1, None]).solution
        assert torch.allclose(X @ w, Y[:, None], atol=1e-4)  # one w explains every pair
    assert torch.equal(b.y[:, 0::2], ys) and (b.mask[:, 0::2].sum(1) == cfg.num_points - cfg.dim).all()
    assert not b.mask[:, 1::2].any()


def test_needle_answer_and_depth():
    cfg = NeedleConfig(lengths=(32,), longer=(64,), depths=(0.0, 0.5, 1.0), distractors=2, test_size=10)
    task = Needle(cfg)
    sets = task.test_sets(seed=7)
    assert len(sets) == 6 and len(task.primary()) == 3
    for name, b in sets.items():
        depth = float(name.split("/")[0][1:])
        for x, y, m in zip(b.x, b.y, b.mask):
            L = x.shape[0]
            assert m.nonzero().flatten().tolist() == [L - 1]
            query = int(x[-1])
            where = (x[:-1] == query).nonzero().flatten()
            assert len(where) == 1 and int(x[where + 1]) == int(y[-1])
            keys = ((x[:-1] >= cfg.filler) & (x[:-1] < cfg.filler + cfg.keys)).sum()
            assert keys == cfg.distractors + 1
            assert abs(int(where) / (L - 3) - depth) < 0.1


def _eval_listops(tokens: list[int]) -> int:
    """An independent stack evaluator of the token sequence."""
    ops = {v: k for k, v in OP_ID.items()}
    stack: list[list] = []
    for t in tokens:
        if t in ops:
            stack.append([ops[t]])
        elif t == CLOSE:
            op, *args = stack.pop()
            val = {"MAX": max, "MIN": min, "SM": lambda a: sum(a) % 10,
                   "MED": lambda a: int(statistics.median(a))}[op](args)
            if not stack:
                return val
            stack[-1].append(val)
        else:
            stack[-1].append(t)
    raise AssertionError("unbalanced expression")


def test_listops_labels_match_an_independent_evaluator():
    cfg = ListOpsConfig(max_depth=4, max_args=4, min_len=8, max_len=40)
    b = ListOps(cfg).sample(60, generator(8))
    for x, y in zip(b.x, b.y):
        assert x[-1] == EQUALS
        tokens = [t for t in x[:-1].tolist() if t != PAD]
        assert cfg.min_len <= len(tokens) <= cfg.max_len
        assert _eval_listops(tokens) == int(y[-1])
    assert len(set(b.y[:, -1].tolist())) > 3


def test_test_sets_are_fixed_by_seed():
    task = MQAR(MQARConfig(vocab=64, seq_len=32, num_pairs=4, test_size=8))
    a, b, c = task.test_sets(0)["test"], task.test_sets(0)["test"], task.test_sets(1)["test"]
    assert torch.equal(a.x, b.x) and not torch.equal(a.x, c.x)
    assert not torch.equal(task.val_set(0).x[:8], a.x)


# ---- training ---------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models train fastest on one thread (and do not fight the other tests for the cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY = MQAR(MQARConfig(vocab=32, seq_len=16, num_pairs=4, test_size=200, val_size=200))
BB = BackboneConfig(dim=32, heads=2)


def test_softmax_learns_tiny_mqar_and_a_blind_window_does_not():
    cfg = TrainConfig(lr=1e-2, batch_size=32, eval_every=25, budget_s=40, max_steps=400)
    r = train(TINY, lambda i: build_layer(LayerSpec("mha"), 32, 2), BB, cfg, seed=0)
    assert r["score"] >= 0.9 and r["stopped"] == "target", r["curve"]
    # a window of one key sees no key-value pair: it can only guess among the values (chance about 1/4)
    blind = LayerSpec("mha", {"pattern": SlidingWindow(1)})
    r2 = train(TINY, lambda i: build_layer(blind, 32, 2), BB, TrainConfig(lr=1e-2, batch_size=32, max_steps=150), 0)
    assert r2["score"] < 0.5 and r2["stopped"] != "target"


def test_gated_recurrence_solves_flipflop_exactly_and_a_short_window_does_not():
    """The flip-flop anchor in miniature: RAT with one chunk (a gated linear recurrence) reads the last write
    without error in and out of distribution; a window of 2 tokens cannot see a write further back."""
    task = FlipFlop(FlipFlopConfig(seq_len=32, test_size=300, val_size=64))
    bb = BackboneConfig(dim=32, heads=2)
    cfg = TrainConfig(lr=1e-2, batch_size=32, max_steps=100, eval_every=25, target=None, budget_s=60)
    rnn = LayerSpec("rat", {"block": 1024, "mode": "parallel"})
    r = train(task, lambda i: build_layer(rnn, 32, 2), bb, cfg, seed=0)
    assert r["metrics"] == {"id": 1.0, "sparse": 1.0, "dense": 1.0}, r["curve"]
    # target=None: no early stop although validation reached 1.0; on ties the last checkpoint is scored
    assert r["stopped"] == "max_steps" and r["steps"] == 100 and r["best_step"] == 100
    assert sum(v == 1.0 for _, _, v in r["curve"]) >= 2
    window = LayerSpec("mha", {"pattern": SlidingWindow(2)})
    r2 = train(task, lambda i: build_layer(window, 32, 2), bb, cfg, seed=0)
    assert r2["metrics"]["sparse"] < 0.9


def test_lr_schedule_and_early_stop_options():
    from attnlab.bench.tasks.trainer import lr_at

    const = TrainConfig(lr=1e-2, warmup=10)
    assert lr_at(0, const) == pytest.approx(1e-3) and lr_at(9, const) == lr_at(5000, const) == 1e-2
    cos = TrainConfig(lr=1e-2, warmup=10, decay_steps=110)
    assert lr_at(9, cos) == pytest.approx(1e-2) and lr_at(10, cos) == pytest.approx(1e-2)
    assert lr_at(60, cos) == pytest.approx(0.55e-2)  # halfway: (1 + 0.1) / 2 of the peak
    assert lr_at(110, cos) == pytest.approx(1e-3) and lr_at(10_000, cos) == pytest.approx(1e-3)
    assert all(lr_at(s, cos) >= lr_at(s + 1, cos) for s in range(10, 200))
    with pytest.raises(ValueError, match="decay_steps"):
        TrainConfig(warmup=30, decay_steps=30)
    # a target of 0 stops at the first evaluation; None never stops early
    mk = lambda i: build_layer(LayerSpec("mha"), 32, 2)  # noqa: E731
    stop = train(TINY, mk, BB, TrainConfig(lr=1e-3, batch_size=8, max_steps=30, eval_every=10, target=0.0), 0)
    assert stop["stopped"] == "target" and stop["steps"] == 10
    full = train(TINY, mk, BB, TrainConfig(lr=1e-3, batch_size=8, max_steps=30, eval_every=10, target=None), 0)
    assert full["stopped"] == "max_steps" and full["steps"] == 30 and len(full["curve"]) == 3


def test_task_loss_can_skip_the_score():
    from attnlab.bench.tasks.backbone import Backbone, task_loss

    torch.manual_seed(0)
    model = Backbone(BB, lambda i: build_layer(LayerSpec("mha"), 32, 2), vocab=32, num_classes=32)
    b = TINY.sample(4, generator(0))
    loss, score, _ = task_loss(model, "classify", b.x, b.y, b.mask)
    loss2, none, _ = task_loss(model, "classify", b.x, b.y, b.mask, score=False)
    assert none is None and torch.equal(loss, loss2) and score.shape == (int(b.mask.sum()),)


def test_non_causal_mechanism_is_rejected():
    full = MechSpec("full", (LayerSpec("mha", {"pattern": None}),))
    rc = RunConfig("tiny", TINY, full, BB, TrainConfig(max_steps=5), seed=0)
    row = run_one(rc)
    assert row["score"] is None and "not causal" in row["error"]


def test_state_sizes_follow_the_formulas():
    T, H, d = 64, 2, 16
    assert layer_state(build_layer(LayerSpec("mha"), 32, H), T) == 2 * H * d * T
    window = build_layer(LayerSpec("mha", {"pattern": SlidingWindow(8)}), 32, H)
    assert layer_state(window, T) == 2 * H * d * 8
    lin = build_layer(LayerSpec("linear", {"feature_map": "elu1"}), 32, H)
    assert layer_state(lin, T) == H * d * (d + 1) == layer_state(lin, 4 * T)


def test_parse_mechanism():
    m = parse_mechanism("mha:window=4,qk_norm=True/linear:feature_map='taylor',feature_dim=4")
    assert len(m.layers) == 2 and m.layer(2) == m.layers[0]
    assert m.layers[0].options == {"pattern": SlidingWindow(4) & Causal(), "qk_norm": True}
    assert m.layers[1].options == {"feature_map": "taylor", "feature_dim": 4}
    with pytest.raises(TypeError, match="unknown option"):
        parse_mechanism("mha:nonsense=1")
    with pytest.raises(KeyError):
        parse_mechanism("no-such-mechanism")


# ---- resume and compare -----------------------------------------------------------------------------------------
def _configs() -> list[RunConfig]:
    out = []
    for label, spec in [("softmax", LayerSpec("mha")), ("window-2", LayerSpec("mha", {"pattern": SlidingWindow(2)}))]:
        rc = RunConfig("tiny", TINY, MechSpec(label, (spec,)), BB, TrainConfig(lr=1e-2, max_steps=3), seed=0)
        out.append(RunConfig(**{**rc.__dict__, "key": config_key(rc.ident())}))
    return out


def test_resume_skips_finished_configurations(tmp_path):
    configs = _configs()
    rows, ran = execute(configs[:1], tmp_path, show_progress=False)
    assert ran == 1 and len(rows) == 1
    with (tmp_path / "results.jsonl").open("a") as f:
        f.write('{"key": "cut sho')  # a crash mid-write
    rows, ran = execute(configs, tmp_path, show_progress=False)
    assert ran == 1 and {r["mechanism"] for r in rows} == {"softmax", "window-2"}
    rows, ran = execute(configs, tmp_path, show_progress=False)
    assert ran == 0 and len(load_rows(tmp_path / "results.jsonl")) == 2


def test_aggregate_picks_the_lr_with_the_best_validation_and_compare_reports_changes():
    base = {"task": "t", "seed": 0, "layers": "mha", "state": 10, "details": "", "steps": 1, "seconds": 1.0,
            "stopped": "budget", "params": 1}
    rows = [
        {**base, "mechanism": "a", "lr": 1e-3, "val": 0.5, "score": 0.4, "metrics": {"test": 0.4}},
        {**base, "mechanism": "a", "lr": 3e-3, "val": 0.9, "score": 0.8, "metrics": {"test": 0.8}},
        {**base, "mechanism": "b", "lr": 1e-3, "score": None, "error": "ValueError: boom"},
    ]
    agg = {r["mechanism"]: r for r in aggregate(rows)}
    assert agg["a"]["score"] == 0.8 and agg["a"]["lr"] == 3e-3
    assert agg["b"]["score"] is None and "boom" in agg["b"]["details"]
    new = [{**agg["a"], "score": 0.95}, {"task": "t", "mechanism": "c", "score": 0.1, "state": 5}]
    changes = {c["mechanism"]: c for c in compare(list(agg.values()), new)}
    assert changes["a"]["change"] == "better" and changes["a"]["delta"] == pytest.approx(0.15)
    assert changes["b"]["change"] == "gone" and changes["c"]["change"] == "new"
    assert compare(new, new) == []


def test_cli_writes_resumes_and_compares(tmp_path, capsys):
    from attnlab.cli import main

    args = ["bench", "tasks", "--tasks", "selective_copy", "--mechanisms", "softmax", "--budget", "1",
            "--workers", "1", "--out", str(tmp_path), "--name", "a"]
    assert main(args) == 0
    run = tmp_path / "a"
    assert {"results.jsonl", "results.json", "results.md", "tasks-scores.png"} <= {p.name for p in run.iterdir()}
    first = json.loads((run / "results.json").read_text())["rows"]
    assert [r["mechanism"] for r in first] == ["softmax"] and first[0]["state"] > 0
    capsys.readouterr()
    assert main(args + ["--compare", str(run)]) == 0
    out = capsys.readouterr().out
    assert "0 already done" not in out and "1 already done" in out
    assert "no score changed" in out
    assert len(load_rows(run / "results.jsonl")) == 1
    assert read_run(run)[0]["score"] == first[0]["score"]


def test_full_suite_plans_every_catalogue_mechanism_and_states_its_time(capsys):
    import attnlab
    from attnlab.cli import main

    assert main(["bench", "tasks", "--suite", "full", "--tasks", "flipflop-512", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "full suite" in out and "training takes at most" in out
    planned = {line.split()[1] for line in out.splitlines() if line.startswith("  flipflop-512")}
    assert {e.name for e in attnlab.catalogue()} <= planned and "softmax" in planned
    assert main(["bench", "tasks", "--tasks", "mqar-64x16", "--mechanisms", "softmax", "--lrs", "1e-3",
                 "--steps", "7", "--dry-run"]) == 0
    assert "lr=0.001" in capsys.readouterr().out
