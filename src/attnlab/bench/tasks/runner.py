"""The quality benchmark: every (task, mechanism, learning rate, seed) configuration trained in the same
backbone, appended to ``results.jsonl`` as it finishes, then aggregated into a table and plots.

Resuming: a configuration is identified by a key hashed from everything that decides its result (task config,
mechanism layers and options, backbone, training config, seed); rerunning into the same run folder skips the
keys already in ``results.jsonl`` (a row with an ``error`` is run again), so an interrupted run loses only the
configurations in flight. The configurations run through :func:`attnlab.sweep.run_sweep`: in this process, a
local process pool or as Ray tasks (``--executor ray``), with the same rows.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ...sweep import Executor, load_rows, run_sweep
from ..common import Report
from .backbone import Backbone, BackboneConfig, causality_leak
from .base import Task
from .mechanisms import MechSpec, build_layer
from .trainer import TrainConfig, train

COLUMNS = ["task", "mechanism", "state", "score", "details", "lr", "steps", "seconds", "stopped"]


@dataclass(frozen=True)
class TaskRun:
    """One task of a suite: the generator, its training settings and the mechanisms scored on it."""

    label: str
    task: Task
    train: TrainConfig
    lrs: tuple[float, ...]
    mechanisms: tuple[str, ...]  # labels of the suite's mechanisms


@dataclass(frozen=True)
class Suite:
    name: str
    backbone: BackboneConfig
    mechanisms: dict[str, MechSpec]
    tasks: tuple[TaskRun, ...]
    seeds: int = 1
    workers: int = 2
    note: str = ""


@dataclass(frozen=True)
class RunConfig:
    """One training run: what the JSONL line records and a worker needs."""

    task_label: str
    task: Task
    mech: MechSpec
    backbone: BackboneConfig
    train: TrainConfig
    seed: int
    key: str = field(default="", compare=False)

    def ident(self) -> dict[str, Any]:
        return {
            "task": self.task_label,
            "task_config": self.task.config_dict(),
            "mechanism": self.mech.label,
            "layers": self.mech.describe(),
            "backbone": asdict(self.backbone),
            "train": asdict(self.train),
            "seed": self.seed,
        }


def config_key(ident: dict[str, Any]) -> str:
    blob = json.dumps(ident, sort_keys=True, default=repr)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def plan(
    suite: Suite, seeds: int | None = None, budget_s: float | None = None, max_steps: int | None = None
) -> list[RunConfig]:
    """Every configuration of ``suite`` whose mechanisms are in the catalogue, in execution order.

    ``budget_s`` / ``max_steps`` override every task's wall-clock budget / step limit."""
    out = []
    for tr in suite.tasks:
        for label in tr.mechanisms:
            mech = suite.mechanisms[label]
            if not mech.available():
                continue
            for seed in range(seeds or suite.seeds):
                for lr in tr.lrs:
                    over = {"budget_s": budget_s, "max_steps": max_steps}
                    tcfg = replace(tr.train, lr=lr, **{k: v for k, v in over.items() if v})
                    rc = RunConfig(tr.label, tr.task, mech, suite.backbone, tcfg, seed)
                    out.append(replace(rc, key=config_key(rc.ident())))
    return out


def missing_mechanisms(suite: Suite) -> list[str]:
    return [label for label, m in suite.mechanisms.items() if not m.available()]


# ---- one configuration ---------------------------------------------------------------------------------------
def layer_state(layer: torch.nn.Module, seq_len: int) -> int | None:
    """Numbers a layer holds per sequence to decode after ``seq_len`` tokens (its own ``state_size``;
    softmax layers count the keys the last query may see, so a sliding window reports ``2 d w``)."""
    try:
        return int(layer.state_size(seq_len))
    except (TypeError, NotImplementedError, AttributeError):
        return None


def mixer_factory(rc: RunConfig) -> Callable[[int], torch.nn.Module]:
    bb = rc.backbone
    return lambda i: build_layer(rc.mech.layer(i), bb.dim, bb.heads, layer_idx=i, layers=bb.layers)


def check_causal(rc: RunConfig) -> float:
    """Run the untrained backbone with this mechanism and measure how much earlier outputs see later inputs."""
    torch.manual_seed(0)
    task = rc.task
    model = Backbone(rc.backbone, mixer_factory(rc), vocab=task.vocab, num_classes=task.num_classes,
                     in_features=task.in_features)
    x = task.sample(2, torch.Generator().manual_seed(0)).x
    return causality_leak(model, x, x.shape[1] // 2)


def run_one(rc: RunConfig, threads: int | None = None) -> dict[str, Any]:
    """Train and score one configuration; failures become a row with ``error`` (one bad layer never stops a run)."""
    if threads:
        torch.set_num_threads(threads)
    row: dict[str, Any] = {"key": rc.key, **rc.ident(), "lr": rc.train.lr}
    t0 = time.perf_counter()
    try:
        leak = check_causal(rc)
        if leak > 1e-4:
            raise ValueError(f"not causal: outputs before a position change by {leak:.2g} with later inputs")
        result = train(rc.task, mixer_factory(rc), rc.backbone, rc.train, rc.seed)
        model = result.pop("model")
        states = [layer_state(m, rc.task.train_len) for m in model.mixers]
        row.update(result)
        row["state"] = round(sum(states) / len(states)) if all(s is not None for s in states) else None
        row["details"] = rc.task.describe(result["metrics"])
    except Exception as e:  # noqa: BLE001 - recorded, shown in the table, the run goes on
        row.update(error=f"{type(e).__name__}: {e}", score=None, seconds=round(time.perf_counter() - t0, 1))
    return row


# ---- the run folder --------------------------------------------------------------------------------------------
def execute(
    configs: Sequence[RunConfig],
    run_dir: Path,
    workers: int = 1,
    threads: int | None = None,
    show_progress: bool = True,
    executor: Executor | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """Run the configurations not yet in ``run_dir/results.jsonl`` (rows with an ``error`` are run again);
    returns (their rows, number run now). ``executor``: where they run (default: ``workers`` local processes,
    ``threads`` torch threads each; see :mod:`attnlab.sweep`)."""
    path = run_dir / "results.jsonl"
    executor = executor or Executor(workers=workers, threads=threads)
    done = {r["key"] for r in load_rows(path) if "error" not in r}
    ran = sum(rc.key not in done for rc in configs)
    rows = run_sweep(run_one, configs, key=lambda rc: rc.key, path=path, executor=executor, label=_label,
                     description="tasks", show_progress=show_progress, error_fields=_ident)
    return rows, ran


def _ident(rc: RunConfig) -> dict[str, Any]:
    """What a row of ``rc`` says about it (the fields of an error row whose worker never returned)."""
    return {**rc.ident(), "lr": rc.train.lr, "score": None}


def _label(row: dict[str, Any]) -> str:
    score = row.get("score")
    s = "error" if score is None else f"{score:.3f}"
    return f"{row['task']} {row['mechanism']} lr={row['lr']:g}: {s}"


# ---- aggregation -----------------------------------------------------------------------------------------------
def aggregate(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (task, mechanism): per seed the learning rate with the best validation score, then the mean
    of the seeds' test metrics. Configurations that failed show their error."""
    groups: dict[tuple[str, str], dict[int, list[dict[str, Any]]]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["mechanism"]), {}).setdefault(r["seed"], []).append(r)
    out = []
    for (task, mech), by_seed in groups.items():
        best = []
        for runs in by_seed.values():
            ok = [r for r in runs if r.get("score") is not None]
            if ok:
                best.append(max(ok, key=lambda r: (r.get("val") or -math.inf, r["score"])))
        if not best:
            err = next(iter(by_seed.values()))[0].get("error", "failed")
            out.append({"task": task, "mechanism": mech, "state": None, "score": None, "details": err[:120],
                        "error": err})
            continue
        metrics = {k: round(sum(b["metrics"][k] for b in best) / len(best), 4) for k in best[0]["metrics"]}
        out.append({
            "task": task,
            "mechanism": mech,
            "layers": best[0]["layers"],
            "state": best[0]["state"],
            "score": round(sum(b["score"] for b in best) / len(best), 4),
            "metrics": metrics,
            "details": best[0]["details"] if len(best) == 1 else " ".join(f"{k}={v:.3f}" for k, v in metrics.items()),
            "lr": best[0]["lr"] if len(best) == 1 else "/".join(f"{b['lr']:g}" for b in best),
            "steps": round(sum(b["steps"] for b in best) / len(best)),
            "seconds": round(sum(b["seconds"] for b in best) / len(best), 1),
            "stopped": ",".join(sorted({b["stopped"] for b in best})),
            "seeds": len(best),
            "params": best[0]["params"],
        })
    return out


def compare(old: Sequence[dict[str, Any]], new: Sequence[dict[str, Any]], tol: float = 0.01) -> list[dict[str, Any]]:
    """Aggregated rows of two runs matched by (task, mechanism): what changed by more than ``tol``, and what is
    only in one of them."""
    a = {(r["task"], r["mechanism"]): r for r in old}
    b = {(r["task"], r["mechanism"]): r for r in new}
    changes = []
    for k in sorted(set(a) | set(b)):
        ra, rb = a.get(k), b.get(k)
        sa = ra.get("score") if ra else None
        sb = rb.get("score") if rb else None
        if ra is None or rb is None:
            what = "new" if ra is None else "gone"
        elif sa is None or sb is None:
            if sa is None and sb is None:
                continue
            what = "now fails" if sb is None else "now runs"
        elif abs(sb - sa) > tol:
            what = "better" if sb > sa else "worse"
        elif (ra.get("state") != rb.get("state")):
            what = "state changed"
        else:
            continue
        delta = None if sa is None or sb is None else round(sb - sa, 4)
        changes.append({"task": k[0], "mechanism": k[1], "old": sa, "new": sb, "delta": delta, "change": what})
    return changes


def read_run(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Aggregated rows of an earlier run: its folder (``results.json`` or ``results.jsonl``) or either file."""
    p = Path(path)
    if p.is_dir():
        if (p / "results.json").exists():
            p = p / "results.json"
        elif (p / "results.jsonl").exists():
            p = p / "results.jsonl"
        else:
            raise FileNotFoundError(f"{path}: no results.json or results.jsonl")
    if p.suffix == ".jsonl":
        return aggregate(load_rows(p))
    return json.loads(p.read_text())["rows"]


def build_report(suite_name: str, rows: list[dict[str, Any]], meta: dict[str, Any]) -> Report:
    from .plots import PLOTS

    report = Report(kind=f"tasks-{suite_name}", columns=COLUMNS, meta=meta, plots=list(PLOTS))
    for r in rows:
        report.add(**r)
    return report
