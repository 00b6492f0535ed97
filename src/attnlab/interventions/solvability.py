"""Is a task within the plain model's reach? ``attnlab eval --solvability``.

Before an intervention is scored on a task, the plain model must solve that task above chance at its default
length, or the task is reported as out of reach for that model (an intervention cannot be judged on a task the
model fails anyway). For every (model, task, length) this runs ``n`` seeded test samples through the plain
model (the scoring runner's plain arm: greedy, its own cache, stopping at an end-of-sequence id; on Gemma 3 its
sliding layers on attnlab's native engine), scores them with the
task's own ``score``, and applies a one-sided exact binomial test of accuracy > chance
(:func:`attnlab.interventions.tasks.binomial_test`):

* **solvable** -- p < alpha (0.05);
* **chance** -- the task's own guess rate (``TaskSample.chance``: 1/labels for the closed-set tasks, 1/records for
  toolcall); the long-context tasks of :mod:`attnlab.plans.tasks` (free-form needles: uuids, numbers) have chance
  0, so one correct answer is already above chance -- their row also says how many were right;
* ``faithful`` adds the prior-answer rate (the model named the capital it knows, not the context's), ``toolcall``
  the field-level score (name and amount each worth half).

Each sample is one configuration of :func:`attnlab.sweep.run_sweep` (``results.jsonl``, resumable, ``--executor``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..bench.common import Report
from ..sweep import Executor, run_sweep
from . import data
from .tasks import ALPHA, SOLVABILITY_TEST, binomial_test

RESULTS = "results.jsonl"
COLUMNS = ["model", "task", "length", "n", "correct", "accuracy", "chance", "p_value", "verdict", "prior_rate",
           "partial", "s_per_sample"]


@dataclass(frozen=True)
class Config:
    """One test sample of one task for one model."""

    model: str
    task: str
    length: int
    index: int
    n: int
    seed: int = 0

    @property
    def key(self) -> str:
        return f"{self.model}/{self.task}/{self.length}/{self.index}"


def configs(models: Sequence[str], tasks: Sequence[str], n: int, *, lengths: Sequence[int] | None = None,
            quick: bool = False, seed: int = 0) -> list[Config]:
    """Every sample of every (model, task, length); lengths: ``lengths`` or each task's own
    (:func:`attnlab.interventions.data.lengths_for`)."""
    data.check_split_seeds(seed, n)
    known = data.task_names()
    for t in tasks:
        if t not in known:
            raise ValueError(f"unknown task {t!r}; choose from {', '.join(known)}")
    return [Config(m, t, int(L), i, n, seed) for m in models for t in tasks
            for L in data.lengths_for(t, lengths, quick) for i in range(n)]


def run_config(cfg: Config) -> dict[str, Any]:
    """Greedy continuation of one test sample by the plain model, scored."""
    from . import registry as R
    from .decoding import Base, stop_ids
    from .runner import PLAIN, load, scored_samples

    model, tok = load(cfg.model)
    sample = scored_samples(cfg.model, tok, cfg.task, cfg.length, cfg.n, cfg.seed)[cfg.index]
    with Base(model, None) as base:  # the runner's plain arm, exactly
        t0 = time.perf_counter()
        toks = R.Arm(PLAIN).generate(model, list(sample.ids), int(sample.max_new_tokens), base, stop_ids(model, tok))
        seconds = time.perf_counter() - t0
    text = tok.decode(toks[0].tolist(), skip_special_tokens=True)
    out: dict[str, Any] = {"model": cfg.model, "task": cfg.task, "length": cfg.length, "index": cfg.index,
                           "sample_id": data.sample_id(sample), "score": float(sample.score(text)),
                           "chance": float(getattr(sample, "chance", 0.0)), "text": text,
                           "seconds": round(seconds, 3)}
    if getattr(sample, "prior", None) is not None:
        out["prior"] = float(sample.score_prior(text))
    if getattr(sample, "fields", ()):
        out["partial"] = float(sample.partial(text))
    return out


def aggregate(records: Sequence[dict[str, Any]], alpha: float = ALPHA) -> list[dict[str, Any]]:
    """Per (model, task, length): accuracy, chance, the binomial test's p and verdict. Partial-credit scores
    (recall tasks) count as correct only when whole (the test counts successes)."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for r in records:
        if "error" in r:
            continue
        groups.setdefault((r["model"], r["task"], int(r["length"])), []).append(r)
    rows = []
    for (model, task, length), rs in groups.items():
        n = len(rs)
        correct = sum(1 for r in rs if r["score"] >= 1.0 - 1e-9)
        chance = sum(r["chance"] for r in rs) / n
        p = binomial_test(correct, n, chance)
        row: dict[str, Any] = {"model": model, "task": task, "length": length, "n": n, "correct": correct,
                               "accuracy": correct / n, "chance": round(chance, 4), "p_value": p,
                               "solvable": p < alpha, "verdict": "solvable" if p < alpha else "out of reach",
                               "s_per_sample": round(sum(r["seconds"] for r in rs) / n, 2)}
        if any("prior" in r for r in rs):
            row["prior_rate"] = sum(r.get("prior", 0.0) for r in rs) / n
        if any("partial" in r for r in rs):
            row["partial"] = sum(r.get("partial", 0.0) for r in rs) / n
        rows.append(row)
    return rows


def _plot(rep: Report, run_dir: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = rep.rows
    if not rows:
        return None
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 3.8), squeeze=False)
    for ax, m in zip(axes[0], models):
        rs = [r for r in rows if r["model"] == m]
        labels = [f"{r['task']}\n{r['length']}" for r in rs]
        xs = range(len(rs))
        ax.bar(xs, [r["accuracy"] for r in rs], color=["tab:green" if r["solvable"] else "tab:gray" for r in rs])
        ax.scatter(xs, [r["chance"] for r in rs], marker="_", s=400, color="tab:red", label="chance", zorder=3)
        ax.set_xticks(list(xs), labels, fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{m}: plain accuracy (green: above chance, p < {ALPHA})", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = run_dir / "solvability.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(models: Sequence[str], tasks: Sequence[str], n: int, run_dir: Path, *, lengths: Sequence[int] | None = None,
        quick: bool = False, seed: int = 0, executor: Executor | None = None,
        show_progress: bool = True) -> Report:
    """Score every sample (resuming ``run_dir/results.jsonl``), aggregate, write JSON + Markdown + PNG."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cfgs = configs(models, tasks, n, lengths=lengths, quick=quick, seed=seed)
    t0 = time.perf_counter()
    records = run_sweep(run_config, cfgs, key=lambda c: c.key, path=run_dir / RESULTS, executor=executor,
                        label=lambda r: f"{r.get('model')} {r.get('task')} {r.get('length')}",
                        description="plain model on the test samples", show_progress=show_progress)
    rows = aggregate(records)
    errors = [r for r in records if "error" in r]
    meta = {"models": list(models), "tasks": list(tasks), "n": n, "seed": seed, "quick": quick,
            "test": SOLVABILITY_TEST, "alpha": ALPHA, "errors": len(errors),
            "seconds": round(time.perf_counter() - t0, 1),
            "conventions": "plain model, greedy, its own cache; solvable: one-sided exact binomial test of "
                           "accuracy > chance at alpha; recall tasks count whole answers only"}
    rep = Report("solvability", COLUMNS, rows, meta, plots=[_plot])
    rep.write(run_dir)
    return rep


__all__ = ["COLUMNS", "Config", "aggregate", "configs", "run", "run_config"]
