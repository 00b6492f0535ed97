"""The frontier report: per-cell rows -> suite summary with bootstrap CIs, Pareto fronts, claims, plots, Markdown.

Input: the runner's rows, one per (model, method, budget, task, length) cell (JSON-safe dicts)::

    {"model": "smollm2", "method": "snapkv", "budget": 0.25,      # KV fraction asked (None for dense)
     "family": "dense" | "prefill" | "decode", "protocol": "prefill" | "press" | "dense",
     "task": "passkey", "length": 4096,
     "scores": [1.0, 0.0, ...],     # per sample in [0, 1]; the same samples for every method of a (model, task, length)
     "kv_bytes": 1.2e6, "kv_ratio": 0.26, "prefill_speedup": 1.3, "decode_speedup": 1.1,
     "decode_tok_s": 25.0, "prefill_s": 2.1}

Suite accuracy convention (used everywhere here): **each task weighs the same**; inside a task the samples of
all its lengths are pooled (each sample of the task weighs the same). With ``T`` tasks and ``n_c`` samples in
cell ``c = (task, length)`` of a task holding ``n_task`` samples, the suite mean is
``sum_c n_c / (T * n_task) * mean(scores_c)``. Its CI is a percentile bootstrap stratified by cell: the
samples of each (task, length) cell are resampled within the cell, so every draw keeps the design (the task
weights and how many samples each length contributes) and only the sampling noise varies.

Public API: :func:`bootstrap_ci`, :func:`summarize`, :func:`pareto`, :func:`claims`, :func:`plot`,
:func:`markdown`, :func:`write`, :func:`print_summary`.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

DENSE = "dense"
#: methods whose KV budget comes from an attention analysis (matched as a word of the method name)
INFORMED = ("duo", "probe", "atlas", "moa")
STREAM = "stream"
_GROUP = ("model", "method", "budget", "protocol", "family")
_FAMILY_ORDER = {"dense": 0, "prefill": 1, "decode": 2}
_MAX_INDICES = 4_000_000  # bootstrap indices drawn at once (bounds memory: 32 MB of int64)


# ----------------------------------------------------------------------------------------------- statistics


def _check_alpha(alpha: float, n_boot: int) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")


def _boot_means(strata: Sequence[np.ndarray], weights: Sequence[float], n_boot: int, seed: int) -> np.ndarray:
    """``n_boot`` bootstrap draws of ``sum_s weights[s] * mean(strata[s])``, resampling within each stratum."""
    rng = np.random.default_rng(seed)
    total = np.zeros(n_boot)
    for arr, w in zip(strata, weights):
        n = arr.size
        step = max(1, _MAX_INDICES // n)
        for start in range(0, n_boot, step):
            m = min(step, n_boot - start)
            total[start:start + m] += w * arr[rng.integers(0, n, size=(m, n))].mean(axis=1)
    return total


def _stratified_ci(strata: Sequence[np.ndarray], weights: Sequence[float], n_boot: int, alpha: float,
                   seed: int) -> tuple[float, float]:
    est = float(sum(w * a.mean() for a, w in zip(strata, weights)))
    if all(np.all(a == a[0]) for a in strata):  # no sampling noise: the bootstrap would only add rounding
        return est, est
    lo, hi = np.quantile(_boot_means(strata, weights, n_boot, seed), [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def bootstrap_ci(scores: Sequence[float], *, n_boot: int = 2000, alpha: float = 0.05,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of ``scores``.

    Args:
        scores: per-sample values (n,), finite.
        n_boot: bootstrap resamples (each of size n, with replacement).
        alpha: 1 - coverage (0.05: the 2.5% and 97.5% percentiles of the resampled means).
        seed: seed of the numpy Generator (the same seed gives the same interval).
    Returns: ``(lo, hi)``; ``(x, x)`` when every score equals ``x`` (one sample included).
    Raises: ValueError for no scores, non-finite scores, alpha outside (0, 1) or n_boot < 1.
    """
    _check_alpha(alpha, n_boot)
    arr = np.asarray(list(scores), dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError("bootstrap_ci needs at least one score")
    if not np.all(np.isfinite(arr)):
        raise ValueError("bootstrap_ci got non-finite scores")
    return _stratified_ci([arr], [1.0], n_boot, alpha, seed)


def _design(cells: dict[tuple[str, int], np.ndarray]) -> dict[tuple[str, int], float]:
    """Weight of each (task, length) cell under the convention: tasks equal, samples equal inside a task."""
    per_task: dict[str, int] = {}
    for (task, _), arr in cells.items():
        per_task[task] = per_task.get(task, 0) + arr.size
    return {c: arr.size / (len(per_task) * per_task[c[0]]) for c, arr in cells.items()}


def _num(x: Any) -> float | None:
    """A finite float, or None (missing, None, NaN)."""
    if x is None or isinstance(x, bool):
        return None
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _key(row: dict[str, Any]) -> tuple:
    return tuple(row.get(k) for k in _GROUP)


def _sort_key(r: dict[str, Any]) -> tuple:
    b = r.get("budget")
    return (str(r["model"]), _FAMILY_ORDER.get(r.get("family"), 9), str(r["method"]),
            -1.0 if b is None else float(b), str(r.get("protocol")))


def _cells(group: list[dict[str, Any]]) -> dict[tuple[str, int], np.ndarray]:
    out: dict[tuple[str, int], np.ndarray] = {}
    for r in group:
        c = (str(r["task"]), int(r["length"]))
        if c in out:
            raise ValueError(f"duplicate row for {dict(zip(_GROUP, _key(r)))} at task {c[0]!r}, length {c[1]}")
        arr = np.asarray(r.get("scores") or [], dtype=np.float64).reshape(-1)
        if arr.size and not np.all(np.isfinite(arr)):
            raise ValueError(f"non-finite scores for {r['method']} at {c}")
        if arr.size:  # a cell without samples (a failed cell) carries no accuracy
            out[c] = arr
    return out


def summarize(rows: Sequence[dict[str, Any]], *, n_boot: int = 2000, seed: int = 0) -> list[dict[str, Any]]:
    """One row per (model, method, budget, protocol, family): suite accuracy and costs.

    Accuracy follows the module's convention (each task weighs the same; the samples of a task's lengths are
    pooled); the 95% CI is a bootstrap stratified by (task, length) cell. ``delta_vs_dense`` (points, i.e.
    x100) is the same weighted mean of per-sample differences to the dense row of the model, over the cells
    both rows hold (the plain accuracy difference when the method ran every cell); its CI is a paired bootstrap
    (the samples are the same across methods), None when a cell's sample counts differ from dense's.

    Returns dicts with: model, method, budget, protocol, family, accuracy, ci_lo, ci_hi, n (samples), tasks,
    cells, kv_ratio (mean over samples), kv_bytes (mean), answer_share (mean; see :func:`claims`),
    prefill_speedup and decode_speedup (median over
    cells), delta_vs_dense, delta_ci_lo, delta_ci_hi. Missing metrics are None. Sorted by model, then
    dense / prefill / decode, method, budget.
    Raises: ValueError for a row without model/method/task/length or two rows for the same cell.
    """
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        missing = [k for k in ("model", "method", "task", "length") if r.get(k) is None]
        if missing:
            raise ValueError(f"row lacks {missing}: {r}")
        groups.setdefault(_key(r), []).append(r)
    cells = {k: _cells(g) for k, g in groups.items()}
    dense_key = {}
    for k, g in groups.items():
        if g[0].get("family") == DENSE or g[0]["method"] == DENSE:
            dense_key.setdefault(k[0], k)  # the first dense group of a model is its reference
    out = []
    for k, g in groups.items():
        row: dict[str, Any] = dict(zip(_GROUP, k))
        c = cells[k]
        w = _design(c)
        strata = list(c.values())
        n = sum(a.size for a in strata)
        if n:
            row["accuracy"] = float(sum(w[ck] * a.mean() for ck, a in c.items()))
            row["ci_lo"], row["ci_hi"] = _stratified_ci(strata, [w[ck] for ck in c], n_boot, 0.05, seed)
        else:
            row["accuracy"] = row["ci_lo"] = row["ci_hi"] = None
        row["n"] = n
        row["tasks"] = len({t for t, _ in c})
        row["cells"] = len(c)
        for name in ("kv_ratio", "kv_bytes", "answer_share"):  # means over samples
            vals = [(_num(r.get(name)), len(r.get("scores") or []) or 1) for r in g]
            vals = [(x, m) for x, m in vals if x is not None]
            row[name] = sum(x * m for x, m in vals) / sum(m for _, m in vals) if vals else None
        for name in ("prefill_speedup", "decode_speedup"):
            vals = [v for v in (_num(r.get(name)) for r in g) if v is not None]
            row[name] = statistics.median(vals) if vals else None
        row.update(_delta(c, cells.get(dense_key.get(k[0])), n_boot, seed))
        out.append(row)
    return sorted(out, key=_sort_key)


def _delta(c: dict, dense: dict | None, n_boot: int, seed: int) -> dict[str, float | None]:
    none = {"delta_vs_dense": None, "delta_ci_lo": None, "delta_ci_hi": None}
    if dense is None:
        return none
    common = {ck: a for ck, a in c.items() if ck in dense}
    if not common:
        return none
    w = _design(common)
    dense_w = _design({ck: dense[ck] for ck in common})
    delta = 100 * sum(w[ck] * a.mean() - dense_w[ck] * dense[ck].mean() for ck, a in common.items())
    if any(a.size != dense[ck].size for ck, a in common.items()):
        return {**none, "delta_vs_dense": float(delta)}
    diffs = [100 * (a - dense[ck]) for ck, a in common.items()]
    lo, hi = _stratified_ci(diffs, [w[ck] for ck in common], n_boot, 0.05, seed)
    return {"delta_vs_dense": float(delta), "delta_ci_lo": lo, "delta_ci_hi": hi}


def pareto(points: Sequence[Sequence[float | None]], *, better: Sequence[str] = ("max", "min")) -> list[bool]:
    """Non-dominated flags: ``flags[i]`` is True when no other point is at least as good in every coordinate
    and strictly better in one. Equal points do not dominate each other (both stay on the front).

    Args:
        points: (n, d) coordinates, e.g. (accuracy, kv_ratio) or (accuracy, decode_speedup).
        better: per coordinate ``"max"`` or ``"min"`` (length d).
    Returns: n booleans. A point with a missing (None / NaN) coordinate is False and dominates nothing.
    Raises: ValueError when ``better`` has another length than a point or a value other than max / min.
    """
    if any(b not in ("max", "min") for b in better):
        raise ValueError(f"better must hold 'max' or 'min' per coordinate, got {tuple(better)}")
    sign = np.array([1.0 if b == "max" else -1.0 for b in better])
    vals: list[np.ndarray | None] = []
    for p in points:
        if len(p) != len(better):
            raise ValueError(f"point {tuple(p)} has {len(p)} coordinates but better has {len(better)}")
        xs = [_num(x) for x in p]
        vals.append(None if any(x is None for x in xs) else np.array(xs) * sign)  # larger is better now
    flags = []
    for i, a in enumerate(vals):
        if a is None:
            flags.append(False)
            continue
        flags.append(not any(b is not None and j != i and np.all(b >= a) and np.any(b > a)
                             for j, b in enumerate(vals)))
    return flags


# ----------------------------------------------------------------------------------------------- claims


def _words(method: str) -> set[str]:
    return set(re.split(r"[^a-z0-9]+", str(method).lower())) - {""}


def _is_informed(method: str) -> bool:
    return bool(_words(method) & set(INFORMED))


def _is_stream(method: str) -> bool:
    return STREAM in _words(method) and not _is_informed(method)


def _label(r: dict[str, Any]) -> str:
    b = r.get("budget")
    return f"{r['method']}@{_fmt(b)}" + (f" ({r['protocol']})" if r.get("protocol") not in (None, DENSE) else "")


def claims(summary: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]] | None = None, *,
           kv_max: float = 0.25, points: float = 5.0, speedup: float = 1.3,
           solvable: float = 0.5) -> list[dict[str, Any]]:
    """The four frontier checks per model, each ``{"model", "claim", "value", "target", "passed", "detail"}``.

    "KV held <= ``kv_max``" is checked after decoding, when every cache has appended the answer's tokens: a
    cache compressed to exactly ``kv_max`` of the prompt then holds ``kv_max + (1 - kv_max) * s`` of dense,
    ``s`` = the answer's share of the dense cache, ``new / (length + new)`` per sample (the row's
    ``answer_share``, recorded since 2026-12-04; 0 for older rows: the plain ``kv_ratio <= kv_max``). That is
    the limit (a SnapKV cache at 0.25 of a 4k prompt holds 0.2515x after 10 tokens; TOVA's fixed one 0.249x).

    * ``kv25_within_5pts``: among methods holding ``kv_ratio <= kv_max``, the most accurate is within
      ``points`` of dense (value: its ``delta_vs_dense`` in points);
    * ``informed_vs_stream``: at each asked budget, every attention-informed method (a word of its name in
      :data:`INFORMED`) scores at or above ``stream`` at the same budget (value: the difference in points; one
      claim per budget and method; the stream row of the same family and protocol is preferred, else the
      most accurate stream row of that budget);
    * ``kv25_decode_speedup``: among methods at ``kv_ratio <= kv_max``, the fastest decodes >= ``speedup`` x
      dense (value: that speed-up; the detail names its accuracy);
    * ``dense_solvable`` (only with ``rows``): per (task, length), dense accuracy >= ``solvable``; a failing
      cell is "out of reach" (the methods' numbers there say nothing about sparsity).

    ``passed`` is None when a check has nothing to compare (no dense row, no method under the budget, no
    stream row): not tested rather than failed.
    """
    out: list[dict[str, Any]] = []
    models = sorted({str(r["model"]) for r in summary} | {str(r["model"]) for r in rows or []})
    for model in models:
        rs = [r for r in summary if str(r["model"]) == model and r.get("accuracy") is not None]
        dense = next((r for r in rs if r.get("family") == DENSE or r["method"] == DENSE), None)
        methods = [r for r in rs if r is not dense]
        small = [r for r in methods if r.get("kv_ratio") is not None and r["kv_ratio"] <= kv_limit(r, kv_max)]
        out.append(_claim_accuracy(model, dense, small, kv_max, points, methods))
        out.extend(_claims_informed(model, methods))
        out.append(_claim_speed(model, small, kv_max, speedup, methods))
        if rows is not None:
            out.extend(_claims_solvable(model, [r for r in rows if str(r["model"]) == model], solvable))
    return out


def kv_limit(row: dict[str, Any], kv_max: float) -> float:
    """The KV ratio a cache compressed to ``kv_max`` of the prompt holds once the answer is appended."""
    return kv_max + (1.0 - kv_max) * (_num(row.get("answer_share")) or 0.0) + 1e-9


def _claim(model: str, claim: str, value: Any, target: str, passed: bool | None, detail: str) -> dict[str, Any]:
    return {"model": model, "claim": claim, "value": value, "target": target, "passed": passed, "detail": detail}


def _clean(x: float) -> float:
    """Summation-order noise (1e-15) set to 0, so equal accuracies compare equal."""
    return 0.0 if abs(x) < 1e-9 else x


def _closest(rows: list[dict]) -> str:
    kv = [r for r in rows if r.get("kv_ratio") is not None]
    if not kv:
        return ""
    r = min(kv, key=lambda r: r["kv_ratio"])
    return f" (the least KV held: {_label(r)} at kv {r['kv_ratio']:.3f})"


def _claim_accuracy(model: str, dense: dict | None, small: list[dict], kv_max: float, points: float,
                    others: list[dict]) -> dict[str, Any]:
    name, target = "kv25_within_5pts", f">= -{points:g} pts"
    if dense is None:
        return _claim(model, name, None, target, None, "no dense row")
    if not small:
        return _claim(model, name, None, target, None, f"no method at kv_ratio <= {kv_max:g}" + _closest(others))
    complete = _complete(small, dense)
    if not complete:
        return _claim(model, name, None, target, None, f"no method at kv_ratio <= {kv_max:g} ran every cell dense ran")
    best = max(complete, key=lambda r: r["accuracy"])
    delta = _clean(best["delta_vs_dense"] if best.get("delta_vs_dense") is not None
                   else 100 * (best["accuracy"] - dense["accuracy"]))
    return _claim(model, name, delta, target, delta >= -points,
                  f"best at kv_ratio <= {kv_max:g}: {_label(best)} accuracy {best['accuracy']:.3f} "
                  f"(kv {best['kv_ratio']:.3f}) vs dense {dense['accuracy']:.3f}")


def _complete(rows: list[dict], dense: dict) -> list[dict]:
    """Rows that ran every (task, length) cell the dense row ran (a method that failed on the hard cells is
    not compared with dense over the whole suite)."""
    return [r for r in rows if r.get("accuracy") is not None and r.get("cells") == dense.get("cells")]


def _claims_informed(model: str, methods: list[dict]) -> list[dict[str, Any]]:
    name, target = "informed_vs_stream", ">= 0 pts"
    informed = [r for r in methods if _is_informed(r["method"]) and r.get("budget") is not None]
    streams = [r for r in methods if _is_stream(r["method"]) and r.get("budget") is not None]
    if not informed or not streams:
        return [_claim(model, name, None, target, None,
                       f"needs {STREAM} and one of {', '.join(INFORMED)} at a budget "
                       f"(found {len(streams)} stream, {len(informed)} informed rows)")]
    out = []
    for r in sorted(informed, key=lambda r: (float(r["budget"]), str(r["method"]))):
        same = [s for s in streams if math.isclose(float(s["budget"]), float(r["budget"]))]
        if not same:
            out.append(_claim(model, name, None, target, None, f"{_label(r)}: no {STREAM} row at this budget"))
            continue
        alike = [s for s in same if (s.get("family"), s.get("protocol")) == (r.get("family"), r.get("protocol"))]
        ref = max(alike or same, key=lambda s: s["accuracy"])
        d = _clean(100 * (r["accuracy"] - ref["accuracy"]))
        out.append(_claim(model, name, d, target, d >= 0,
                          f"budget {_fmt(r['budget'])}: {_label(r)} {r['accuracy']:.3f} vs {_label(ref)} "
                          f"{ref['accuracy']:.3f}"))
    return out


def _claim_speed(model: str, small: list[dict], kv_max: float, speedup: float,
                 others: list[dict]) -> dict[str, Any]:
    name, target = "kv25_decode_speedup", f">= {speedup:g}x"
    timed = [r for r in small if r.get("decode_speedup") is not None and r.get("accuracy") is not None]
    if not timed:
        return _claim(model, name, None, target, None, f"no timed method at kv_ratio <= {kv_max:g}"
                      + _closest([r for r in others if r.get("decode_speedup") is not None]))
    # "the best method": the most accurate one at this KV (a fast method that scores 0 does not count)
    best = max(timed, key=lambda r: (r["accuracy"], r["decode_speedup"]))
    fastest = max(timed, key=lambda r: r["decode_speedup"])
    return _claim(model, name, best["decode_speedup"], target, best["decode_speedup"] >= speedup,
                  f"most accurate at kv_ratio <= {kv_max:g}: {_label(best)} {best['decode_speedup']:.2f}x "
                  f"(accuracy {best['accuracy']:.3f}, kv {best['kv_ratio']:.3f}); fastest there: {_label(fastest)} "
                  f"{fastest['decode_speedup']:.2f}x (accuracy {fastest['accuracy']:.3f})")


def _claims_solvable(model: str, rows: list[dict], solvable: float) -> list[dict[str, Any]]:
    dense = [r for r in rows if (r.get("family") == DENSE or r["method"] == DENSE) and r.get("scores")]
    if not dense:
        return [_claim(model, "dense_solvable", None, f">= {solvable:g}", None, "no dense rows")]
    out = []
    for r in sorted(dense, key=lambda r: (str(r["task"]), int(r["length"]))):
        acc = float(np.mean(r["scores"]))
        ok = acc >= solvable - 1e-12
        out.append(_claim(model, "dense_solvable", acc, f">= {solvable:g}", ok,
                          f"{r['task']} @ {r['length']}: dense {acc:.3f} over {len(r['scores'])} samples"
                          + ("" if ok else " -- out of reach")))
    return out


# ----------------------------------------------------------------------------------------------- plots

_AXES = (  # (summary key, file tag, axis label, which way is better)
    ("kv_ratio", "kv", "KV held / dense KV", "min"),
    ("prefill_speedup", "prefill", "prefill speed-up vs dense (x)", "max"),
    ("decode_speedup", "decode", "decode speed-up vs dense (x)", "max"),
)
_PANELS = (("prefill", "prefill-sparse"), ("decode", "decode-sparse / KV compression"))
_MARKERS = {"prefill": "o", "press": "s"}


def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", str(name))


def _place_labels(ax: Any, pts: list[tuple[float, float, str, Any]]) -> None:
    """Label points without overlaps: each label takes the nearest offset (left or right of its point, shifted
    up or down in steps of about a line) whose box clears the labels and markers already placed and stays in
    the axes; when none does, the least overlapping one. Far labels get a leader line. Call it once the
    figure's layout is final (offsets are in points, the boxes in pixels of the current layout)."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    axbox = ax.get_window_extent(renderer)
    px = fig.dpi / 72.0
    marks = [ax.transData.transform((x, y)) for x, y, _, _ in pts]
    taken = [(mx - 4, my - 4, mx + 4, my + 4) for mx, my in marks]
    offsets = sorted(((side * hx, vy) for hx in (6, 22, 44) for vy in range(-96, 97, 8) for side in (1, -1)),
                     key=lambda o: (math.hypot(*o), -o[0]))

    def overlap(a: tuple, b: tuple) -> float:
        return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))

    for i in sorted(range(len(pts)), key=lambda i: -pts[i][1]):  # top down: labels stack like the points
        x, y, text, color = pts[i]
        probe = ax.text(0, 0, text, fontsize=6)
        ext = probe.get_window_extent(renderer)
        w, h = ext.width, ext.height
        probe.remove()
        best: tuple[float, tuple[int, int], tuple] | None = None
        for ox, oy in offsets:
            ax_, ay_ = marks[i][0] + ox * px, marks[i][1] + oy * px
            box = (ax_ if ox > 0 else ax_ - w) - 1, ay_ - h / 2 - 1, (ax_ + w if ox > 0 else ax_) + 1, ay_ + h / 2 + 1
            inside = box[0] >= axbox.x0 and box[2] <= axbox.x1 and box[1] >= axbox.y0 and box[3] <= axbox.y1
            cost = sum(overlap(box, b) for b in taken) + (0.0 if inside else 1e9)
            if best is None or cost < best[0]:
                best = (cost, (ox, oy), box)
            if cost == 0:
                break
        assert best is not None
        off = best[1]
        ax.annotate(text, (x, y), xytext=off, textcoords="offset points", fontsize=6, color=color,
                    ha="left" if off[0] > 0 else "right", va="center",
                    arrowprops={"arrowstyle": "-", "lw": 0.4, "color": color} if math.hypot(*off) > 12 else None)
        taken.append(best[2])


def plot(summary: Sequence[dict[str, Any]], run_dir: str | Path, model: str) -> list[Path]:
    """PNGs of ``model``'s accuracy vs KV held, vs prefill speed-up and vs decode speed-up.

    Each figure has a panel for prefill-sparse and one for decode-sparse methods (only those the rows have);
    markers tell the protocol (circle: compress while prefilling, square: prefill densely then compress),
    colors the method. Error bars are the
    95% CIs, the Pareto front of the panel (dense included) is a step line (the best accuracy reachable at
    that cost or cheaper), dense is a horizontal line with its CI band and a dotted line at its own cost.
    Returns the paths written (``<model>_accuracy_vs_{kv,prefill,decode}.png``); none when the model has no
    rows.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    run_dir = Path(run_dir)
    rs = [r for r in summary if str(r["model"]) == str(model) and r.get("accuracy") is not None]
    if not rs:
        return []
    dense = next((r for r in rs if r.get("family") == DENSE or r["method"] == DENSE), None)
    methods = sorted({str(r["method"]) for r in rs if r is not dense})
    cmap = plt.get_cmap("tab20" if len(methods) > 10 else "tab10")
    color = {m: cmap(i % cmap.N) for i, m in enumerate(methods)}
    # a panel per family the run has (a press-only run draws no empty prefill-sparse panel)
    panels = [p for p in _PANELS if any(r.get("family") == p[0] for r in rs)] or list(_PANELS)
    paths = []
    for key, tag, xlabel, way in _AXES:
        fig, axes = plt.subplots(1, len(panels), figsize=(1.0 + 5.5 * len(panels), 4.8), sharey=True,
                                 squeeze=False)
        axes = axes[0]
        labels = []
        for ax, (family, title) in zip(axes, panels):
            sel = [r for r in rs if r.get("family") == family and _num(r.get(key)) is not None]
            ax.set_title(f"{title}", fontsize=10)
            ax.set_xlabel(xlabel)
            ax.set_ylim(-0.05, 1.08)
            ax.grid(alpha=0.25)
            dx = _num(dense.get(key)) if dense else None
            if dense is not None:
                ax.axhline(dense["accuracy"], color="k", lw=1, label="dense")
                ax.axhspan(dense["ci_lo"], dense["ci_hi"], color="k", alpha=0.07, lw=0)
                if dx is not None:
                    ax.axvline(dx, color="k", lw=0.8, ls=":")
            if not sel:
                ax.text(0.5, 0.5, "no rows", transform=ax.transAxes, ha="center", color="0.5")
                continue
            for r in sel:
                acc = r["accuracy"]
                ax.errorbar(r[key], acc, yerr=[[acc - r["ci_lo"]], [r["ci_hi"] - acc]], fmt=_MARKERS.get(
                    r.get("protocol"), "D"), color=color[str(r["method"])], ms=5, capsize=2, lw=0.8)
            front = sel + ([dense] if dense is not None and dx is not None else [])
            flags = pareto([(r["accuracy"], r[key]) for r in front], better=("max", way))
            fp = sorted(((r[key], r["accuracy"]) for r, f in zip(front, flags) if f))
            xs = [r[key] for r in sel] + ([dx] if dx is not None else [])
            if way == "min" and min(xs) > 0 and max(xs) / min(xs) >= 8:
                ax.set_xscale("log")  # KV fractions span decades: equal ratios, equal distances
            lo, hi = min(xs), max(xs)
            if ax.get_xscale() == "log":
                xlim = (lo / 1.3, hi * 1.3)
                ax.set_xticks([t for t in (0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0) if xlim[0] <= t <= xlim[1]])
                ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
                ax.xaxis.set_minor_formatter(NullFormatter())
            else:
                pad = max((hi - lo) * 0.08, 0.05 * max(abs(lo), abs(hi)), 1e-3)
                xlim = (lo - pad, hi + pad)
            ax.set_xlim(*xlim)
            if fp:  # the front's best accuracy stays reachable at any higher cost: extend it to the edge
                ext = [(xlim[1], fp[-1][1])] if way == "min" else [(xlim[0], fp[0][1])]
                fp = fp + ext if way == "min" else ext + fp
                ax.step([p[0] for p in fp], [p[1] for p in fp], where="post" if way == "min" else "pre",
                        color="tab:red", lw=1.2, alpha=0.7)
            labels.append((ax, [(r[key], r["accuracy"], f"{r['method']} {_fmt(r.get('budget'))}",
                                 color[str(r["method"])]) for r in sel]))
        axes[0].set_ylabel("suite accuracy (95% CI)")
        handles = [Line2D([], [], color="0.3", marker=m, ls="", label=f"protocol {p}") for p, m in _MARKERS.items()]
        handles += [Line2D([], [], color="k", lw=1, label="dense"),
                    Line2D([], [], color="tab:red", lw=1.2, label="Pareto front")]
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
        fig.suptitle(f"{model}: accuracy vs {xlabel}", fontsize=11)
        fig.tight_layout(rect=(0, 0.06, 1, 1))
        fig.canvas.draw()  # labels last: their boxes are measured in the final layout
        for ax, pts in labels:
            _place_labels(ax, pts)
        path = run_dir / f"{_safe(model)}_accuracy_vs_{tag}.png"
        fig.savefig(path, dpi=130)
        plt.close(fig)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------- text


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if not math.isfinite(x):
            return "-"
        if x == 0:
            return "0"
        if abs(x) >= 100:
            return f"{x:.0f}"
        return f"{x:.{digits}g}" if abs(x) < 1 else f"{x:.2f}"
    return str(x)


def _acc(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _pts(x: float | None) -> str:
    return "-" if x is None else f"{x:+.1f}"


def _table(head: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|",
            *("| " + " | ".join(row) + " |" for row in body)]


def _summary_table(rs: list[dict[str, Any]]) -> list[str]:
    rs = sorted(rs, key=lambda r: (_num(r.get("kv_ratio")) is None, _num(r.get("kv_ratio")) or 0.0,
                                   str(r["method"])))
    front = pareto([(r.get("accuracy"), r.get("kv_ratio")) for r in rs], better=("max", "min"))
    body = []
    for r, f in zip(rs, front):
        ci = "-" if r.get("ci_lo") is None else f"[{r['ci_lo']:.3f}, {r['ci_hi']:.3f}]"
        dci = "" if r.get("delta_ci_lo") is None else f" [{r['delta_ci_lo']:+.1f}, {r['delta_ci_hi']:+.1f}]"
        body.append([str(r["method"]), _fmt(r.get("budget")), str(r.get("protocol")), str(r.get("family")),
                     _fmt(r.get("kv_ratio")), _acc(r.get("accuracy")), ci, _pts(r.get("delta_vs_dense")) + dci,
                     _fmt(r.get("prefill_speedup")), _fmt(r.get("decode_speedup")), str(r.get("n")),
                     "*" if f else ""])
    return _table(["method", "budget", "protocol", "family", "kv_ratio", "accuracy", "95% CI",
                   "vs dense (pts) [95% CI]", "prefill x", "decode x", "n", "front"], body)


def _task_table(rows: list[dict[str, Any]]) -> list[str]:
    tasks = sorted({str(r["task"]) for r in rows})
    groups: dict[tuple, dict[tuple[str, Any], list[float]]] = {}
    for r in rows:
        g = groups.setdefault((r["method"], r.get("budget"), r.get("protocol"), r.get("family")), {})
        sc = [float(s) for s in r.get("scores") or []]
        g[(str(r["task"]), int(r["length"]))] = sc
        g.setdefault((str(r["task"]), "all"), []).extend(sc)
    body = []
    for key in sorted(groups, key=lambda k: (_FAMILY_ORDER.get(k[3], 9), str(k[0]),
                                             -1.0 if k[1] is None else float(k[1]), str(k[2]))):
        g = groups[key]
        lengths = sorted({ln for _, ln in g if ln != "all"}) + ["all"]
        for ln in lengths:
            accs = [float(np.mean(g[(t, ln)])) if g.get((t, ln)) else None for t in tasks]
            known = [a for a in accs if a is not None]
            body.append([str(key[0]), _fmt(key[1]), str(key[2]), str(ln), *(_acc(a) for a in accs),
                         _acc(float(np.mean(known)) if known else None)])
    return _table(["method", "budget", "protocol", "length", *tasks, "task mean"], body)


def _claim_value(c: dict[str, Any]) -> str:
    v = c["value"]
    if v is None:
        return "-"
    if c["target"].endswith("pts"):
        return _pts(v)
    return f"{v:.2f}x" if c["target"].endswith("x") else _acc(v)


def _out_of_reach(claims_: Sequence[dict[str, Any]]) -> list[str]:
    bad = [c for c in claims_ if c["claim"] == "dense_solvable" and c["passed"] is False]
    if not bad:
        return ["None: dense reaches the threshold on every (task, length) it ran."]
    return [f"- {c['model']}: {c['detail'].replace(' -- out of reach', '')}" for c in bad]


def markdown(rows: Sequence[dict[str, Any]], summary: Sequence[dict[str, Any]],
             claims_: Sequence[dict[str, Any]]) -> str:
    """The report's Markdown: per model a summary table (sorted by kv_ratio, ``*`` marks the (accuracy,
    kv_ratio) Pareto front), the claims table, per model the method x budget x length table with one
    accuracy column per task (``all`` rows pool the lengths), and the out-of-reach (task, length) list."""
    models = sorted({str(r["model"]) for r in summary} | {str(r["model"]) for r in rows})
    lines = ["## Summary", "",
             "Accuracy: each task weighs the same, samples of a task's lengths pooled; 95% CIs by bootstrap "
             "stratified by (task, length); `vs dense` in points with a paired bootstrap CI.", ""]
    for m in models:
        lines += [f"### {m}", "", *_summary_table([r for r in summary if str(r["model"]) == m]), ""]
    lines += ["## Claims", ""]
    lines += _table(["model", "claim", "value", "target", "passed", "detail"],
                    [[c["model"], c["claim"], _claim_value(c), c["target"],
                      "n/a" if c["passed"] is None else ("PASS" if c["passed"] else "FAIL"), c["detail"]]
                     for c in claims_])
    lines += ["", "## Accuracy per task", ""]
    for m in models:
        lines += [f"### {m}", "", *_task_table([r for r in rows if str(r["model"]) == m]), ""]
    lines += ["## Out of reach (dense below the threshold)", "", *_out_of_reach(claims_), ""]
    return "\n".join(lines)


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, np.generic):
        return _json_safe(x.item())
    return x


def write(rows: Sequence[dict[str, Any]], run_dir: str | Path, meta: dict[str, Any] | None = None) -> list[Path]:
    """Write ``results.json`` (meta incl. the machine, rows, summary, claims), ``results.md`` (the Markdown
    with the plots linked) and the PNGs (:func:`plot`, per model) into ``run_dir``; returns every path."""
    from ..bench.common import machine_info

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = list(rows)
    summary = summarize(rows)
    claims_ = claims(summary, rows)
    meta = {**machine_info(), **(meta or {})}
    pngs = [p for m in sorted({str(r["model"]) for r in summary}) for p in plot(summary, run_dir, m)]
    doc = {"kind": "frontier", "meta": meta, "rows": rows, "summary": summary, "claims": claims_}
    (run_dir / "results.json").write_text(json.dumps(_json_safe(doc), indent=1))
    lines = ["# attnlab frontier", "", *(f"- {k}: {v}" for k, v in meta.items()), "",
             markdown(rows, summary, claims_), "## Plots", ""]
    lines += [f"![{p.stem}]({p.name})" for p in pngs]
    (run_dir / "results.md").write_text("\n".join(lines) + "\n")
    return [run_dir / "results.json", run_dir / "results.md", *pngs]


def print_summary(summary: Sequence[dict[str, Any]], title: str = "attnlab frontier") -> None:
    """Print the summary as a rich table (one row per model x method x budget x protocol)."""
    from rich.console import Console
    from rich.table import Table

    cols = ["model", "method", "budget", "protocol", "kv_ratio", "accuracy", "95% CI", "vs dense", "prefill x",
            "decode x", "n"]
    table = Table(title=title)
    for c in cols:
        table.add_column(c)
    for r in summary:
        ci = "-" if r.get("ci_lo") is None else f"[{r['ci_lo']:.3f}, {r['ci_hi']:.3f}]"
        table.add_row(str(r["model"]), str(r["method"]), _fmt(r.get("budget")), str(r.get("protocol")),
                      _fmt(r.get("kv_ratio")), _acc(r.get("accuracy")), ci, _pts(r.get("delta_vs_dense")),
                      _fmt(r.get("prefill_speedup")), _fmt(r.get("decode_speedup")), str(r.get("n")))
    Console(width=max(120, 14 * len(cols) + 40)).print(table)


__all__ = ["DENSE", "INFORMED", "bootstrap_ci", "claims", "markdown", "pareto", "plot", "print_summary",
           "summarize", "write"]
