"""The paired scoring runner: the plain model and each intervened arm on the same samples, back to back.

For every (model, task, length, sample) the plain model (``arm = "plain"``: the model's own attention, or the
``--plan``) runs first, then each arm, with greedy decoding (Lookback-Lens samples its candidates, seeded) and
the same stopping rule (``max_new_tokens`` of the sample, or the end-of-sequence token). Each configuration is
one (model, task, length, sample, arm), keyed ``model/task/length/sample/arm`` and run through
:func:`attnlab.sweep.run_sweep` (``results.jsonl``: a rerun into the same folder runs only missing keys);
configurations are listed sample by sample, so with the local executor an arm runs right after the plain model
on the same prompt. A record holds the score in [0, 1], the generated text, the seconds of generation, the
sample's id (a hash of its prompt: :func:`attnlab.interventions.data.sample_id`) and the prompt's length.

Knobs are set first, in this process, on the validation split (:mod:`attnlab.interventions.fit`), once per
(model, intervention, given knobs, task, length, plan, sizes, seed), and kept in ``fits/`` (JSON + safetensors);
a resumed run reads them back, and workers only read them.

Aggregation (:func:`aggregate`) per (model, task, arm): the mean score of the arm and of the plain model over the
samples both hold (every length of the task pooled, each sample weighs the same), the change (arm - plain), its
95% paired bootstrap CI (:func:`attnlab.frontier.report.bootstrap_ci` on the per-sample differences: samples are
resampled with both arms' scores together), n, and the median per-sample time ratio (arm / plain). A plain and an
arm record of the same (model, task, length, sample) with different sample ids raise: the arms did not see the same
prompt.

Score arms (kind ``score``: ``sar``, ``rhythm``; :mod:`attnlab.interventions.scoring`) decode exactly as the plain
arm and add the scorer's ``measures`` to the record; they are left out of the change table and aggregated by
:func:`attnlab.interventions.scoring.aggregate_scores` (AUROC of predicting a wrong plain answer, or means), written
as ``scores`` in ``results.json``, a second table in ``results.md`` and ``scores.png``.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..bench.common import Report, progress
from ..sweep import Executor, load_rows, run_sweep
from . import data
from . import fit as F
from . import registry as R
from . import scoring as SC
from .decoding import Base, stop_ids

PLAIN = "plain"
RESULTS = "results.jsonl"
CONFIG = "config.json"

_SAMPLES: dict[tuple, list[Any]] = {}
_PLANS: dict[tuple[str, str], Any] = {}


def load(name: str) -> tuple[nn.Module, Any]:
    """The model and tokenizer of ``name``, loaded once per process (:func:`attnlab.models.hf.shared_model`;
    tests put tiny models in ``hf.SHARED``)."""
    from ..models import hf

    return hf.shared_model(name)


def scored_samples(model_name: str, tok: Any, task: str, length: int, n: int, seed: int) -> list[Any]:
    key = (model_name, task, length, n, seed)
    if key not in _SAMPLES:
        _SAMPLES[key] = data.make(tok, task, length, n, seed, "test")
    return _SAMPLES[key]


def load_plan(model_name: str, model: nn.Module, path: str | None) -> Any:
    if path is None:
        return None
    key = (model_name, path)
    if key not in _PLANS:
        from ..plans.plan import HeadPlan
        from ..plans.sources import with_model_windows

        _PLANS[key] = with_model_windows(model, HeadPlan.load(path))
    return _PLANS[key]


def _tag(name: str) -> str:
    return Path(name).name.replace(".", "_") if ("/" in name or name.endswith(".gguf")) else name


@dataclass(frozen=True)
class Config:
    """One arm on one sample. ``arm`` is the arm's text (``plain`` or ``A[:k=v]+B``), ``run_dir`` holds the fits."""

    model: str
    task: str
    length: int
    sample: int
    arm: str
    n: int
    seed: int = 0
    quick: bool = True
    run_dir: str = "."
    plan: str | None = None
    n_val: int | None = None

    @property
    def key(self) -> str:
        return f"{self.model}/{self.task}/{self.length}/{self.sample}/{self.arm}"


def fit_key(model_name: str, choice: R.Choice, task: str, length: int, plan: str | None, quick: bool,
            seed: int, n_val: int | None = None) -> str:
    scope: dict[str, Any] = {"task": task, "len": length}
    if n_val is not None:
        scope["nval"] = n_val
    if plan is not None:
        scope["plan"] = Path(plan).stem
    return F.FitStore.key(_tag(model_name), choice.name, scope, {k: str(v) for k, v in choice.given}, quick, seed)


Cells = Sequence[tuple[str, int]]


def cells(tasks: Sequence[str], lengths: Sequence[int] | None, quick: bool) -> list[tuple[str, int]]:
    """Every (task, length): the lengths given, or each task's own (:func:`attnlab.interventions.data.lengths_for`)."""
    return [(t, n) for t in tasks for n in data.lengths_for(t, lengths, quick)]


def fits_needed(model_name: str, arms: Sequence[Sequence[R.Choice]], cells: Cells, plan: str | None, quick: bool,
                seed: int, n_val: int | None = None) -> list[tuple[str, R.Choice, str, int]]:
    """``(key, choice, task, length)`` of every fit the arms need (each once)."""
    out, seen = [], set()
    for arm in arms:
        for c in arm:
            if not c.needs_fit():
                continue
            for task, length in cells:
                if not runs_on(arm, task):
                    continue
                k = fit_key(model_name, c, task, length, plan, quick, seed, n_val)
                if k not in seen:
                    seen.add(k)
                    out.append((k, c, task, length))
    return out


def run_fits(model_name: str, arms: Sequence[Sequence[R.Choice]], cells: Cells, run_dir: Path, *,
             n_val: int | None = None, plan: str | None = None, quick: bool = True, seed: int = 0,
             show_progress: bool = True) -> dict[str, dict[str, Any]]:
    """Set every needed knob on the validation split (skipping fits already in ``run_dir/fits``). Returns
    ``{key: {"intervention", "task", "length", "knobs", "seconds", "reused"}}``."""
    store = F.FitStore(run_dir / "fits")
    todo = fits_needed(model_name, arms, cells, plan, quick, seed, n_val)
    if not todo:
        return {}
    model, tok = load(model_name)
    sizes = F.QUICK if quick else F.FULL
    n_val = n_val or sizes["n_val"]
    out: dict[str, dict[str, Any]] = {}
    bar = progress(len(todo), "fitting knobs on the validation split") if show_progress else None
    with (bar if bar is not None else _null()) as advance, Base(model, load_plan(model_name, model, plan)) as base:
        for key, choice, task, length in todo:
            fitted = store.load(key)
            info = {"intervention": choice.label, "task": task, "length": length}
            if fitted is None:
                val = data.make(tok, task, length, n_val, seed, "val")
                fc = F.FitContext(model, tok, val, quick=quick, seed=seed, base=base)
                t0 = time.perf_counter()
                fitted = choice.spec.fit(fc, choice.knobs)
                secs = time.perf_counter() - t0
                store.save(key, fitted, {**info, "seconds": round(secs, 2), "n_val": n_val,
                                         "val_ids": [data.sample_id(s) for s in val]})
                out[key] = {**info, "knobs": fitted.knobs, "seconds": round(secs, 2), "reused": False}
            else:
                out[key] = {**info, "knobs": fitted.knobs, "reused": True}
            if advance is not None:
                advance(f"fit {choice.name} {task} {length}")
    return out


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def build_arm(cfg: Config, model: nn.Module, tok: Any) -> R.Arm:
    choices = R.parse(cfg.arm)
    store = F.FitStore(Path(cfg.run_dir) / "fits")
    fitted: dict[str, F.Fitted] = {}
    for c in choices:
        if c.needs_fit():
            key = fit_key(cfg.model, c, cfg.task, cfg.length, cfg.plan, cfg.quick, cfg.seed, cfg.n_val)
            got = store.load(key)
            if got is None:
                raise RuntimeError(f"{c.label}: no fitted knobs {key} in {store.root} (run the fits first)")
            fitted[c.name] = got
    return R.build_arm(model, tok, choices, fitted)


def run_config(cfg: Config) -> dict[str, Any]:
    """One arm on one test sample: score, text, seconds (a JSON-able record)."""
    model, tok = load(cfg.model)
    sample = scored_samples(cfg.model, tok, cfg.task, cfg.length, cfg.n, cfg.seed)[cfg.sample]
    plan = load_plan(cfg.model, model, cfg.plan)
    arm = R.Arm(PLAIN) if cfg.arm == PLAIN else build_arm(cfg, model, tok)
    eos = stop_ids(model, tok)
    own = arm.plan_for(len(arm.prompt(list(sample.ids))))
    if own is not None and plan is not None:
        raise ValueError(f"{cfg.arm}: a plan intervention cannot run under --plan")
    extra: dict[str, Any] = {}
    with Base(model, own if own is not None else plan) as base:
        t0 = time.perf_counter()
        toks = arm.generate(model, list(sample.ids), int(sample.max_new_tokens), base, eos)
        secs = time.perf_counter() - t0
        new = toks[0].tolist()
        if cfg.arm != PLAIN and SC.is_score_arm(cfg.arm):  # a score arm analyses the plain generation
            part = arm.parts[0]
            t1 = time.perf_counter()
            extra["measures"] = SC.SCORERS[part.name].fn(model, tok, part.knobs, list(sample.ids), new, base, eos,
                                                         int(sample.max_new_tokens))
            extra["score_seconds"] = time.perf_counter() - t1
    text = tok.decode(new, skip_special_tokens=True)
    return {
        "model": cfg.model, "task": cfg.task, "length": cfg.length, "sample": cfg.sample, "arm": cfg.arm,
        "sample_id": data.sample_id(sample), "score": float(sample.score(text)), "text": text,
        "seconds": secs, "prompt_tokens": len(arm.prompt(list(sample.ids))), "new_tokens": len(new),
        "depth": getattr(sample, "depth", None), "knobs": {p.name: p.knobs for p in arm.parts}, **extra,
    }


def runs_on(arm: Sequence[R.Choice], task: str) -> bool:
    """Whether every intervention of ``arm`` supports ``task`` (``Spec.tasks``)."""
    return all(c.spec.supports(task) for c in arm)


def configs(models: Sequence[str], arms: Sequence[str], cells: Cells, n: int, *, seed: int = 0, quick: bool = True,
            run_dir: str | Path = ".", plan: str | None = None, n_val: int | None = None) -> list[Config]:
    """Every (model, task, length, sample) with the plain arm first, then each arm (sample by sample); an arm is
    left out of the tasks one of its interventions does not support."""
    out = []
    parsed = {a: R.parse(a) for a in arms}
    for m in models:
        for task, length in cells:
            for i in range(n):
                for arm in (PLAIN, *(a for a in arms if runs_on(parsed[a], task))):
                    out.append(Config(m, task, int(length), i, arm, n, seed, quick, str(run_dir), plan, n_val))
    return out


# ---------------------------------------------------------------------------------------------------------
# aggregation and report
# ---------------------------------------------------------------------------------------------------------
def aggregate(records: Sequence[dict[str, Any]], *, n_boot: int = 2000, seed: int = 0) -> list[dict[str, Any]]:
    """Per (model, task, arm): mean score, plain mean on the same samples, change, its 95% paired bootstrap CI,
    n and the median time ratio. The plain rows have change 0. Raises ValueError when an arm's record and the
    plain record of the same (model, task, length, sample) hold different sample ids."""
    from ..frontier.report import bootstrap_ci

    plain: dict[tuple, dict[str, Any]] = {}
    arms: dict[tuple, dict[tuple, dict[str, Any]]] = {}
    order: list[tuple] = []
    for r in records:
        if "error" in r or "measures" in r:  # score arms: scoring.aggregate_scores
            continue
        cell = (r["model"], r["task"])
        sid = (r["length"], r["sample"])
        if r["arm"] == PLAIN:
            plain[(*cell, *sid)] = r
        key = (*cell, r["arm"])
        if key not in arms:
            arms[key] = {}
            order.append(key)
        arms[key][sid] = r
    rows = []
    for key in order:
        model, task, arm = key
        recs = arms[key]
        pairs = []
        for sid, r in sorted(recs.items()):
            p = plain.get((model, task, *sid))
            if p is None:
                continue
            if p["sample_id"] != r["sample_id"]:
                raise ValueError(f"{model}/{task}/{sid}: arm {arm!r} scored sample {r['sample_id']}, the plain model "
                                 f"{p['sample_id']}: the arms did not see the same prompt")
            pairs.append((p, r))
        if not pairs:
            continue
        diffs = [r["score"] - p["score"] for p, r in pairs]
        lo, hi = bootstrap_ci(diffs, n_boot=n_boot, seed=seed)
        ratios = [r["seconds"] / p["seconds"] for p, r in pairs if p["seconds"] > 0]
        rows.append({
            "model": model, "task": task, "arm": arm, "n": len(pairs),
            "lengths": sorted({sid[0] for sid in recs}),
            "score": statistics.fmean(r["score"] for _, r in pairs),
            "plain": statistics.fmean(p["score"] for p, _ in pairs),
            "change": statistics.fmean(diffs), "ci_lo": lo, "ci_hi": hi,
            "seconds": statistics.median(r["seconds"] for _, r in pairs),
            "time_ratio": statistics.median(ratios) if ratios else None,
        })
    return rows


COLUMNS = ["model", "task", "arm", "n", "plain", "score", "change_pts", "ci_pts", "time_ratio", "seconds"]


def report(rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> Report:
    """A :class:`~attnlab.bench.common.Report` of the aggregated rows (changes in points, x100) with the plot."""
    rep = Report("interventions", COLUMNS, meta=dict(meta))
    for r in rows:
        rep.add(**r, change_pts=round(100 * r["change"], 2),
                ci_pts=f"[{100 * r['ci_lo']:+.1f}, {100 * r['ci_hi']:+.1f}]")
    rep.plots.append(plot_changes)
    return rep


def plot_changes(rep: Report, run_dir: Path) -> Path | None:
    """Change vs plain (points) with its 95% CI, one row per (arm, task), one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rep.rows if r["arm"] != PLAIN]
    if not rows:
        return None
    models = sorted({r["model"] for r in rows})
    tasks = sorted({r["task"] for r in rows})
    colors = {t: plt.get_cmap("tab10")(i % 10) for i, t in enumerate(tasks)}
    height = max(2.5, 0.35 * max(sum(1 for r in rows if r["model"] == m) for m in models) + 1.2)
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), height), squeeze=False)
    for ax, m in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == m]
        mine.sort(key=lambda r: (r["arm"], r["task"]))
        ys = list(range(len(mine)))[::-1]
        for y, r in zip(ys, mine):
            c = 100 * r["change"]
            ax.errorbar(c, y, xerr=[[c - 100 * r["ci_lo"]], [100 * r["ci_hi"] - c]], fmt="o",
                        color=colors[r["task"]], capsize=3)
        ax.set_yticks(ys)
        ax.set_yticklabels([f"{r['arm']} | {r['task']} (n={r['n']})" for r in mine], fontsize=7)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_xlabel("change vs plain (points, 95% paired bootstrap CI)")
        ax.set_title(m)
    fig.tight_layout()
    path = run_dir / "changes.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------
# the whole run
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    """What ``attnlab eval --intervention`` runs (saved as ``config.json``; ``--resume`` reads it back)."""

    models: tuple[str, ...]
    arms: tuple[str, ...]
    tasks: tuple[str, ...]
    lengths: tuple[int, ...]  # empty: each task's own length
    n: int
    seed: int = 0
    quick: bool = True
    n_val: int | None = None
    plan: str | None = None

    def save(self, run_dir: Path) -> None:
        (run_dir / CONFIG).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, run_dir: Path) -> Run:
        d = json.loads((run_dir / CONFIG).read_text())
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def score(run: Run, run_dir: Path, executor: Executor | None = None, show_progress: bool = True,
          log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fit, run every configuration (resuming what ``run_dir/results.jsonl`` holds), aggregate, write the report.
    Returns ``{"rows", "records", "fits", "report", "seconds"}``."""
    data.check_split_seeds(run.seed, run.n)
    parsed = [R.parse(a) for a in run.arms]
    run_dir.mkdir(parents=True, exist_ok=True)
    run.save(run_dir)
    t0 = time.perf_counter()
    grid = cells(run.tasks, run.lengths, run.quick)
    fits: dict[str, Any] = {}
    for m in run.models:
        fits.update(run_fits(m, parsed, grid, run_dir, n_val=run.n_val, plan=run.plan, quick=run.quick,
                             seed=run.seed, show_progress=show_progress))
    fit_s = time.perf_counter() - t0
    cfgs = configs(run.models, run.arms, grid, run.n, seed=run.seed, quick=run.quick, run_dir=run_dir,
                   plan=run.plan, n_val=run.n_val)
    t1 = time.perf_counter()
    records = run_sweep(run_config, cfgs, key=lambda c: c.key, path=run_dir / RESULTS, executor=executor,
                        label=lambda r: f"{r.get('model')} {r.get('task')} {r.get('length')} {r.get('arm')}",
                        description="scoring arms", show_progress=show_progress)
    score_s = time.perf_counter() - t1
    errors = [r for r in records if "error" in r]
    for r in errors:
        log(f"error in {r.get('key')}: {r['error']}")
    rows = aggregate(records)
    score_rows = SC.aggregate_scores(records, PLAIN)
    meta = {"models": list(run.models), "arms": list(run.arms), "tasks": list(run.tasks),
            "lengths": sorted({n for _, n in grid}), "n": run.n, "seed": run.seed, "quick": run.quick, "plan": run.plan,
            "fit_seconds": round(fit_s, 1), "score_seconds": round(score_s, 1), "configurations": len(cfgs),
            "fits": {k: {kk: vv for kk, vv in v.items() if kk != "knobs"} | {"knobs": _short(v["knobs"])}
                     for k, v in fits.items()},
            "conventions": "greedy decoding (lookback: seeded sampled candidates); change = arm - plain on the "
                           "same samples, 95% paired bootstrap CI (2000 resamples); knobs set on the val split"}
    rep = report(rows, meta)
    rep.write(run_dir)
    if score_rows:
        write_scores(run_dir, score_rows)
        log(SC.markdown(score_rows))
    return {"rows": rows, "records": records, "fits": fits, "report": rep, "seconds": time.perf_counter() - t0,
            "scores": score_rows}


def write_scores(run_dir: Path, score_rows: Sequence[dict[str, Any]]) -> None:
    """Add the score arms' rows to ``results.json`` (``scores``) and ``results.md`` (a second table), and draw
    ``scores.png``."""
    path = run_dir / "results.json"
    doc = json.loads(path.read_text())
    doc["scores"] = list(score_rows)
    path.write_text(json.dumps(doc, indent=2))
    lines = ["", "## Score arms (stat auroc: AUROC of predicting an incorrect plain answer, label = task score < "
             f"{SC.INCORRECT_BELOW}, 95% stratified bootstrap CI; stat mean: the mean, 95% bootstrap CI)", "",
             SC.markdown(score_rows), ""]
    png = SC.plot(score_rows, run_dir / "scores.png")
    if png is not None:
        lines.append("![scores](scores.png)")
    with (run_dir / "results.md").open("a") as f:
        f.write("\n".join(lines) + "\n")


def _short(knobs: dict[str, Any]) -> dict[str, Any]:
    """Knobs for the report: long head lists cut to their length."""
    out = {}
    for k, v in knobs.items():
        out[k] = f"{len(v)} items" if isinstance(v, list) and len(v) > 6 else v
    return out


def done_keys(run_dir: Path) -> set[str]:
    return {r["key"] for r in load_rows(run_dir / RESULTS) if "key" in r and "error" not in r}


__all__ = ["CONFIG", "COLUMNS", "PLAIN", "RESULTS", "Config", "Run", "aggregate", "build_arm", "cells", "configs",
           "done_keys", "fit_key", "fits_needed", "load", "plot_changes", "report", "run_config", "run_fits", "score",
           "scored_samples", "write_scores"]
