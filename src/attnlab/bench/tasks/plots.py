"""PNG plots of a tasks run: recall versus state size (the Based / Zoology figure), flip-flop error rates,
induction-copy accuracy versus test length, needle depth x length grids, and the task x mechanism scores.

Each function takes the report (aggregated rows) and the run folder and returns the PNG path, or ``None`` when
the run has nothing to draw.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..common import Report


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _ok(report: Report, task_prefix: str) -> list[dict[str, Any]]:
    return [r for r in report.rows if r.get("score") is not None and r["task"].startswith(task_prefix)]


def recall_vs_state(report: Report, run_dir: Path) -> Path | None:
    rows = [r for r in _ok(report, "mqar") if r.get("state")]
    if not rows:
        return None
    plt = _plt()
    from matplotlib.ticker import NullFormatter

    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        pts = sorted((r for r in rows if r["task"] == task), key=lambda r: r["state"])
        for r in pts:
            ax.scatter(r["state"], r["score"], s=40)
            ax.annotate(r["mechanism"], (r["state"], r["score"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # crowded minor labels on a short log range
        ax.set_ylim(-0.03, 1.05)
        ax.set_xlabel("state size per layer (numbers held to decode the next token)")
        ax.set_ylabel("MQAR accuracy")
        ax.set_title(task)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = run_dir / "tasks-recall-vs-state.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def flipflop_errors(report: Report, run_dir: Path) -> Path | None:
    rows = _ok(report, "flipflop")
    if not rows:
        return None
    plt = _plt()
    splits = list(rows[0]["metrics"])
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(rows) + 2), 4))
    width = 0.8 / len(splits)
    for j, split in enumerate(splits):
        errs = [1 - r["metrics"][split] for r in rows]
        xs = [i + j * width for i in range(len(rows))]
        ax.bar(xs, [max(e, 1e-4) for e in errs], width, label=split)
        for x, e in zip(xs, errs):
            if e <= 0:
                ax.text(x, 1.2e-4, "0", ha="center", va="bottom", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylim(5e-5, 1)
    ax.set_xticks([i + width * (len(splits) - 1) / 2 for i in range(len(rows))])
    ax.set_xticklabels([f"{r['mechanism']}\n({r['task']})" for r in rows], fontsize=8)
    ax.set_ylabel("read error rate (0 drawn at 1e-4)")
    ax.set_title("flip-flop: in-distribution, sparse and dense out-of-distribution")
    ax.legend()
    fig.tight_layout()
    path = run_dir / "tasks-flipflop.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def induction_lengths(report: Report, run_dir: Path) -> Path | None:
    rows = _ok(report, "induction")
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for r in rows:
        xs = [int(k[1:-1]) for k in r["metrics"]]
        ax.plot(xs, list(r["metrics"].values()), marker="o", label=f"{r['mechanism']} ({r['task']})")
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.03, 1.05)
    ax.set_xlabel("test length / training length")
    ax.set_ylabel("copy accuracy")
    ax.set_title("induction copy: length extrapolation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = run_dir / "tasks-induction.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def needle_grid(report: Report, run_dir: Path) -> Path | None:
    rows = _ok(report, "needle")
    if not rows:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows) + 1, 3.4), squeeze=False,
                             constrained_layout=True)
    for n, (ax, r) in enumerate(zip(axes[0], rows)):
        depths = sorted({k.split("/")[0] for k in r["metrics"]}, key=lambda d: float(d[1:]))
        lengths = sorted({k.split("/")[1] for k in r["metrics"]}, key=lambda s: int(s[1:]))
        grid = [[r["metrics"][f"{d}/{L}"] for L in lengths] for d in depths]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(lengths)))
        ax.set_xticklabels([L[1:] for L in lengths])
        ax.set_yticks(range(len(depths)))
        ax.set_yticklabels([d[1:] for d in depths])
        ax.set_xlabel("length")
        if n == 0:
            ax.set_ylabel("needle depth")
        ax.set_title(r["mechanism"], fontsize=9)
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.6 else "k")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    path = run_dir / "tasks-needle.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def score_grid(report: Report, run_dir: Path) -> Path | None:
    rows = [r for r in report.rows if r.get("score") is not None]
    if not rows:
        return None
    plt = _plt()
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    mechs = list(dict.fromkeys(r["mechanism"] for r in rows))
    score = {(r["task"], r["mechanism"]): r["score"] for r in rows}
    fig, ax = plt.subplots(figsize=(1.1 * len(tasks) + 3, 0.45 * len(mechs) + 1.5))
    grid = [[score.get((t, m), float("nan")) for t in tasks] for m in mechs]
    ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels(tasks, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(mechs)))
    ax.set_yticklabels(mechs, fontsize=8)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if v == v:
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.6 else "k")
    ax.set_title("headline score per task (1 = solved)")
    fig.tight_layout()
    path = run_dir / "tasks-scores.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


PLOTS = (recall_vs_state, flipflop_errors, induction_lengths, needle_grid, score_grid)
