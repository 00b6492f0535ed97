"""``score``-kind interventions: analyses of the plain model's own generation that change nothing it does.

A score arm (``attnlab eval --intervention sar``) decodes exactly as the plain arm (greedy, the same
:class:`~attnlab.interventions.decoding.Base`) and then runs its :class:`Scorer` on the prompt and the generated
tokens; the record keeps the scorer's ``measures`` (floats). The runner checks that a score arm's text equals
the plain arm's on every sample, then aggregates per (model, task, arm):

* each measure named in ``Scorer.auroc`` (an uncertainty: higher = the answer is more likely wrong) by its
  **AUROC of predicting an incorrect answer** (convention ``auroc-incorrect``: label 1 when the plain answer's
  task score is below 0.5, the positive class; ties count one half, the Mann-Whitney form) with a 95%
  **stratified bootstrap CI** (convention ``auroc-boot``: correct and incorrect samples resampled separately,
  with replacement, so every resample holds both classes; percentiles of 2000 resamples, seed 0). No CI and no
  AUROC (None) when a class is empty;
* each measure named in ``Scorer.means`` by its mean with the 95% bootstrap CI of
  :func:`attnlab.frontier.report.bootstrap_ci`.

Scorers register here (:func:`register_scorer`); the interventions registry lists the same names as kind
``score`` (:data:`attnlab.interventions.registry.KINDS`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

KIND = "score"
#: a plain answer with task score below this is "incorrect" (the positive class of the AUROC)
INCORRECT_BELOW = 0.5


@dataclass(frozen=True)
class Scorer:
    """``fn(model, tok, knobs, prompt_ids, new_ids, base, eos, max_new_tokens) -> {measure: float}`` (``new_ids``:
    the plain greedy answer; ``base``: the run's :class:`~attnlab.interventions.decoding.Base`); ``auroc``: uncertainty
    measures scored by AUROC against incorrectness; ``means``: measures reported as means with a CI."""

    name: str
    fn: Callable[..., dict[str, float]]
    auroc: tuple[str, ...] = ()
    means: tuple[str, ...] = ()


SCORERS: dict[str, Scorer] = {}


def register_scorer(scorer: Scorer) -> Scorer:
    SCORERS[scorer.name] = scorer
    return scorer


def is_score_arm(arm: str) -> bool:
    """Whether the arm text (``sar`` / ``sar:k=v``) names a score-kind intervention (alone in its arm)."""
    from . import registry as R

    choices = R.parse(arm)
    kinds = [c.spec.kind for c in choices]
    if KIND in kinds and len(choices) > 1:
        raise ValueError(f"{arm!r}: a score analysis ({', '.join(c.name for c in choices if c.spec.kind == KIND)}) "
                         "runs on the plain model's generation and cannot be composed with other interventions")
    return kinds == [KIND]


# ---------------------------------------------------------------------------------------------------------
# AUROC
# ---------------------------------------------------------------------------------------------------------
def auroc(scores: Sequence[float], labels: Sequence[int]) -> float | None:
    """P(score of a random positive > score of a random negative) + 0.5 P(tie) (Mann-Whitney U / (n+ n-)).

    Args: scores (n,) finite; labels (n,) in {0, 1} (1 = positive). Returns None when a class is empty.
    """
    s = np.asarray(list(scores), dtype=np.float64)
    y = np.asarray(list(labels))
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.shape[0]} vs {y.shape[0]}")
    if not np.all(np.isin(y, (0, 1))):
        raise ValueError("labels must be 0 or 1")
    if not np.all(np.isfinite(s)):
        raise ValueError("auroc got non-finite scores")
    pos, neg = s[y == 1], s[y == 0]
    if pos.size == 0 or neg.size == 0:
        return None
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def auroc_ci(scores: Sequence[float], labels: Sequence[int], *, n_boot: int = 2000, alpha: float = 0.05,
             seed: int = 0) -> tuple[float, float] | None:
    """Stratified percentile bootstrap CI of :func:`auroc` (each class resampled with replacement on its own)."""
    s = np.asarray(list(scores), dtype=np.float64)
    y = np.asarray(list(labels))
    pos, neg = s[y == 1], s[y == 0]
    if pos.size == 0 or neg.size == 0:
        return None
    rng = np.random.default_rng(seed)
    p = pos[rng.integers(0, pos.size, size=(n_boot, pos.size))]
    q = neg[rng.integers(0, neg.size, size=(n_boot, neg.size))]
    diff = p[:, :, None] - q[:, None, :]
    vals = ((diff > 0).sum((1, 2)) + 0.5 * (diff == 0).sum((1, 2))) / (pos.size * neg.size)
    lo, hi = np.quantile(vals, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


# ---------------------------------------------------------------------------------------------------------
# aggregation of score arms
# ---------------------------------------------------------------------------------------------------------
def aggregate_scores(records: Sequence[dict[str, Any]], plain: str = "plain", *, n_boot: int = 2000,
                     seed: int = 0) -> list[dict[str, Any]]:
    """One row per (model, task, score arm, measure): ``stat`` (auroc | mean), value, CI, n, n incorrect.
    Labels come from the plain record of the same sample; a score arm whose text differs from the plain
    arm's on a sample raises (it must analyse the plain generation)."""
    from ..frontier.report import bootstrap_ci
    from . import registry as R

    plain_recs = {(r["model"], r["task"], r["length"], r["sample"]): r for r in records
                  if r.get("arm") == plain and "error" not in r}
    groups: dict[tuple[str, str, str], list[tuple[dict, dict]]] = {}
    for r in records:
        if "error" in r or "measures" not in r or r.get("arm") == plain:
            continue
        p = plain_recs.get((r["model"], r["task"], r["length"], r["sample"]))
        if p is None:
            continue
        if p["sample_id"] != r["sample_id"] or p["text"] != r["text"]:
            raise ValueError(f"{r['model']}/{r['task']}/{r['length']}/{r['sample']}: the score arm {r['arm']!r} "
                             "did not analyse the plain model's generation (sample or text differs)")
        groups.setdefault((r["model"], r["task"], r["arm"]), []).append((p, r))
    rows = []
    for (model, task, arm), pairs in groups.items():
        scorer = SCORERS[R.parse(arm)[0].name]
        labels = [int(p["score"] < INCORRECT_BELOW) for p, _ in pairs]
        present = {m for _, r in pairs for m in r["measures"]}  # a measure no record holds gets no row
        for m in (m for m in scorer.auroc if m in present):
            ok = [(r["measures"][m], y) for (_, r), y in zip(pairs, labels)
                  if r["measures"].get(m) is not None and math.isfinite(r["measures"][m])]
            vals, ys = [v for v, _ in ok], [y for _, y in ok]
            a = auroc(vals, ys) if ok else None
            ci = auroc_ci(vals, ys, n_boot=n_boot, seed=seed) if ok else None
            rows.append({"model": model, "task": task, "arm": arm, "measure": m, "stat": "auroc", "value": a,
                         "ci_lo": None if ci is None else ci[0], "ci_hi": None if ci is None else ci[1],
                         "n": len(ok), "n_incorrect": sum(ys),
                         "mean_correct": _mean([v for v, y in ok if y == 0]),
                         "mean_incorrect": _mean([v for v, y in ok if y == 1])})
        for m in (m for m in scorer.means if m in present):
            vals = [r["measures"][m] for _, r in pairs
                    if r["measures"].get(m) is not None and math.isfinite(r["measures"][m])]
            lo, hi = bootstrap_ci(vals, n_boot=n_boot, seed=seed) if vals else (None, None)
            rows.append({"model": model, "task": task, "arm": arm, "measure": m, "stat": "mean",
                         "value": _mean(vals), "ci_lo": lo, "ci_hi": hi, "n": len(vals),
                         "n_incorrect": sum(labels)})
    return rows


def _mean(xs: Sequence[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


SCORE_COLUMNS = ["model", "task", "arm", "measure", "stat", "value", "ci", "n", "n_incorrect"]


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The score arms' table (AUROC of predicting an incorrect answer, or the mean), with 95% CIs."""
    head = "| " + " | ".join(SCORE_COLUMNS) + " |"
    sep = "|" + "|".join("---" for _ in SCORE_COLUMNS) + "|"
    body = []
    for r in rows:
        ci = "-" if r["ci_lo"] is None else f"[{r['ci_lo']:.3f}, {r['ci_hi']:.3f}]"
        val = "-" if r["value"] is None else f"{r['value']:.3f}"
        body.append("| " + " | ".join([r["model"], r["task"], r["arm"], r["measure"], r["stat"], val, ci,
                                       str(r["n"]), str(r["n_incorrect"])]) + " |")
    return "\n".join([head, sep, *body])


def plot(rows: Sequence[dict[str, Any]], path: Any) -> Any | None:
    """AUROC (with its CI) per measure, one row per (model, task, measure)."""
    rows = [r for r in rows if r["stat"] == "auroc" and r["value"] is not None]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.35 * len(rows) + 1.5))
    ys = list(range(len(rows)))[::-1]
    for y, r in zip(ys, rows):
        v = r["value"]
        err = [[v - r["ci_lo"]], [r["ci_hi"] - v]] if r["ci_lo"] is not None else None
        ax.errorbar(v, y, xerr=err, fmt="o", capsize=3)
    ax.set_yticks(ys)
    ax.set_yticklabels([f"{r['model']} | {r['task']} | {r['arm']} | {r['measure']} (n={r['n']}, "
                        f"wrong={r['n_incorrect']})"
                        for r in rows], fontsize=7)
    ax.axvline(0.5, color="grey", lw=0.8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("AUROC, incorrect answer (95% stratified bootstrap CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = ["INCORRECT_BELOW", "KIND", "SCORERS", "SCORE_COLUMNS", "Scorer", "aggregate_scores", "auroc", "auroc_ci",
           "is_score_arm", "markdown", "plot", "register_scorer"]
