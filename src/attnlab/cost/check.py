"""``attnlab cost --check``: the cost model's predicted times against measured ones on this machine.

Each point is one bare attention call, forward only, timed here: prefill calls of patterns and block-selection
ops through :func:`attnlab.ops.get` (``(1, heads, L, head_dim)`` float32), and decode steps (one query row)
over a dense KV cache of ``L`` positions and over the buffers KV-compressed caches hold (StreamingLLM's sinks +
window, SnapKV's budget + window: plain SDPA over the held buffer, as :class:`~attnlab.plans.runtime.PlanRunner`
decodes them).

Clock: on a shared machine wall-clock times swing with the load (here, ~18 runnable processes on 2 cores, the
same call varied 10x between runs), so by default (``clock="thread"``) the check runs torch on **one thread**
and times each call by that thread's CPU time (``time.thread_time``), and measures the ceilings the same way:
one core's matmul peak and copy bandwidth. ``clock="wall"`` times wall-clock with torch's threads
(:func:`attnlab.bench.common.time_fn`, :func:`~attnlab.bench.common.matmul_peak_gflops`).

Prediction, with nothing fitted per method: the roofline ``max(FLOPs / peak, bytes / bandwidth)`` on the
measured ceilings, plus **one per-call overhead constant** ``c`` fitted once over all points (least squares on
the relative errors: ``c = sum((m - r) / m^2) / sum(1 / m^2)``, clipped at 0). The report gives each point's
error ``(predicted - measured) / measured`` and the median absolute percentage error (MdAPE); Kinetics' additive
form ``FLOPs / peak + bytes / bandwidth`` (= eFLOPs / peak) is reported beside it, with its own constant.
Measured time of a point: the best of its repeats, as the ceilings are best cases (the median is kept too).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .model import Cost, Hardware, Heads, op_cost, policy_decode

#: the call shape of every point
HEADS = Heads(heads=8, kv_heads=8, head_dim=64, batch=1, dtype_bytes=4)
#: decode points cycle through K/V copies of at least this many bytes in all (twice a 32 MiB L3)
ROTATE_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Point:
    """One measured call: ``kind`` is ``prefill`` (``L`` queries over ``L`` keys) or ``decode`` (one query
    over a cache of ``L`` positions); ``method`` an op name, ``stream`` or ``snap`` (decode over their held
    buffers); ``options`` as (name, value) pairs."""

    kind: str
    method: str
    L: int
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def key(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options)
        return f"{self.kind}/{self.method}({opts})/L{self.L}"


PREFILL_METHODS: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = (
    ("sdpa", (("causal", True),)),
    ("sliding_window", (("window", 256),)),
    ("pattern", (("pattern", "Chunked"), ("chunk", 256), ("causal", True))),
    ("moba", (("block", 64), ("top_k", 4))),
)
PREFILL_EXTRA = (
    ("hip", (("block", 64), ("top_k", 4))),
    ("minference", (("mode", "block_topk"), ("block", 64), ("top_k", 4))),
)
DECODE_METHODS: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = (
    ("sdpa", (("causal", True),)),
    ("stream", (("sinks", 4), ("window", 256))),
    ("snap", (("budget", 1024), ("window", 32))),
)


def points(quick: bool = False) -> list[Point]:
    """The measured set: prefill at 1k-4k (8k when not quick), decode at 8k-32k (up to 64k)."""
    pre_L = (1024, 2048, 4096) if quick else (1024, 2048, 4096, 8192)
    dec_L = (8192, 32768) if quick else (4096, 16384, 65536)
    pre = PREFILL_METHODS if quick else PREFILL_METHODS + PREFILL_EXTRA
    out = [Point("prefill", m, L, o) for m, o in pre for L in pre_L]
    out += [Point("decode", m, L, o) for m, o in DECODE_METHODS for L in dec_L]
    return out


def _options(p: Point) -> dict[str, Any]:
    """The op's options; for the ``pattern`` op, ``pattern`` names a class of :mod:`attnlab.core.patterns`
    and the other options are its arguments."""
    from ..core import patterns

    opts = dict(p.options)
    if p.method == "pattern":
        cls = getattr(patterns, opts.pop("pattern"))
        return {"pattern": cls(**opts)}
    return opts


def _policy(p: Point) -> Any:
    from ..plans.plan import HeadPolicy

    o = dict(p.options)
    return HeadPolicy.stream(o["sinks"], o["window"]) if p.method == "stream" else HeadPolicy.snap(o["budget"],
                                                                                                 o["window"])


def predicted_cost(p: Point, g: Heads = HEADS) -> Cost:
    """What the model says one call of ``p`` costs."""
    if p.kind == "prefill":
        return op_cost(p.method, g, p.L, p.L, **_options(p))
    if p.method in ("stream", "snap"):
        return policy_decode(_policy(p), g, p.L)
    return op_cost(p.method, g, 1, p.L, **_options(p))


CLOCKS = ("thread", "wall")


def thread_times(fn: Any, reps: int = 5, warmup: int = 1, max_seconds: float = 10.0) -> list[float]:
    """CPU seconds of this thread per call (:func:`attnlab.bench.common.time_fn` on ``time.thread_time``)."""
    from ..bench.common import time_fn

    return time_fn(fn, reps=reps, warmup=warmup, max_seconds=max_seconds, clock=time.thread_time)


def ceilings(clock: str = "thread") -> Hardware:
    """The matmul peak and copy bandwidth timed with ``clock`` (``thread``: one thread's CPU time, torch on
    one thread; ``wall``: :meth:`Hardware.measure`)."""
    import torch

    if clock == "wall":
        return Hardware.measure()
    if clock != "thread":
        raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
    with one_thread():
        n = 2048
        a, b = torch.randn(n, n), torch.randn(n, n)
        peak = 2 * n**3 / min(thread_times(lambda: a @ b, reps=5, warmup=1))
        x = torch.ones(32 * 2**20)
        y = torch.empty_like(x)
        bw = 2 * x.numel() * 4 / min(thread_times(lambda: y.copy_(x), reps=5, warmup=1))
    return Hardware(peak, bw, "one core, thread CPU time")


class one_thread:
    """``with one_thread():`` torch runs on one thread inside the block (restored after)."""

    def __enter__(self) -> None:
        import torch

        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc: Any) -> None:
        import torch

        torch.set_num_threads(self.n)


def measure(point: dict[str, Any]) -> dict[str, Any]:
    """Time one point (a :class:`Point` as a dict, plus ``clock``): the best of a few calls after a warm-up."""
    import torch

    from .. import ops
    from ..bench.common import median, time_fn

    p = Point(point["kind"], point["method"], int(point["L"]), tuple(tuple(x) for x in point["options"]))
    g = HEADS
    gen = torch.Generator().manual_seed(0)

    def randn(n: int, heads: int) -> torch.Tensor:
        return torch.randn(g.batch, heads, n, g.head_dim, generator=gen)

    if p.kind == "prefill":
        q, k, v = randn(p.L, g.heads), randn(p.L, g.kv_heads), randn(p.L, g.kv_heads)
        op, opts = ops.get(p.method), _options(p)

        def fn() -> Any:
            return op(q, k, v, **opts)

        reps = 5
    else:
        # a real model's decode step finds each layer's cache in DRAM (the other layers and the weights pass
        # through the caches in between): cycle through copies that together exceed the last-level cache
        held = p.L if p.method == "sdpa" else int(_policy(p).kept(p.L))
        q = randn(1, g.heads)
        nbytes = 2 * g.batch * g.kv_heads * held * g.head_dim * g.dtype_bytes
        copies = max(1, min(64, -(-ROTATE_BYTES // nbytes)))
        kvs = [(randn(held, g.kv_heads), randn(held, g.kv_heads)) for _ in range(copies)]
        op = ops.get("sdpa")
        it = iter(range(1 << 62))

        def fn() -> Any:
            k, v = kvs[next(it) % copies]
            return op(q, k, v, causal=True)

        reps = 30
    clock = point.get("clock", "thread")
    with torch.no_grad():
        if clock == "thread":
            with one_thread():
                times = thread_times(fn, reps=reps, warmup=2)
        else:
            times = time_fn(fn, reps=reps, warmup=2, max_seconds=10.0)
    # the best call, as the ceilings are best cases (matmul peak, copy bandwidth); the median beside it
    return {**asdict(p), "options": [list(x) for x in p.options], "measured_s": min(times),
            "median_s": median(times), "reps": len(times), "clock": clock}


def fit_overhead(measured: Sequence[float], predicted: Sequence[float]) -> float:
    """The one constant ``c`` (seconds per call, >= 0) minimizing ``sum(((r + c - m) / m)^2)``."""
    if len(measured) != len(predicted) or not measured:
        raise ValueError("fit_overhead needs as many predictions as measurements (at least one)")
    if any(m <= 0 for m in measured):
        raise ValueError("measured times must be > 0")
    num = sum((m - r) / m**2 for m, r in zip(measured, predicted))
    den = sum(1 / m**2 for m in measured)
    return max(0.0, num / den)


def errors(measured: Sequence[float], predicted: Sequence[float]) -> tuple[list[float], float]:
    """Per point ``(predicted - measured) / measured`` and their median absolute value (MdAPE, a fraction)."""
    if len(measured) != len(predicted) or not measured:
        raise ValueError("errors needs as many predictions as measurements (at least one)")
    errs = [(r - m) / m for m, r in zip(measured, predicted)]
    return errs, statistics.median(abs(e) for e in errs)


def evaluate(rows: list[dict[str, Any]], hw: Hardware, g: Heads = HEADS) -> dict[str, Any]:
    """Add the predictions and errors to measured ``rows`` (in place); return the summary."""
    roof, add = [], []
    for r in rows:
        cost = predicted_cost(Point(r["kind"], r["method"], r["L"], tuple(tuple(x) for x in r["options"])), g)
        r.update(gflop=cost.flops / 1e9, mb=cost.bytes / 1e6, roofline_s=hw.roofline_s(cost),
                 additive_s=hw.eflops_s(cost), bound="memory" if cost.bytes * hw.intensity > cost.flops else "compute")
        roof.append(r["roofline_s"])
        add.append(r["additive_s"])
    m = [r["measured_s"] for r in rows]
    c_roof, c_add = fit_overhead(m, roof), fit_overhead(m, add)
    e_roof, md_roof = errors(m, [x + c_roof for x in roof])
    e_add, md_add = errors(m, [x + c_add for x in add])
    for r, er, ea in zip(rows, e_roof, e_add):
        r.update(predicted_s=r["roofline_s"] + c_roof, rel_error=er, additive_rel_error=ea,
                 measured_ms=r["measured_s"] * 1e3, predicted_ms=(r["roofline_s"] + c_roof) * 1e3)
    per_kind = {k: statistics.median(abs(r["rel_error"]) for r in rows if r["kind"] == k)
                for k in sorted({r["kind"] for r in rows})}
    return {"overhead_s": c_roof, "mdape": md_roof, "additive_overhead_s": c_add, "additive_mdape": md_add,
            "mdape_by_kind": per_kind, "points": len(rows)}


def plot(rows: list[dict[str, Any]], summary: dict[str, Any], run_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    markers = {"prefill": "o", "decode": "s"}
    methods = sorted({r["method"] for r in rows})
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    for r in rows:
        ax.scatter(r["measured_s"], r["predicted_s"], marker=markers[r["kind"]], color=colors[r["method"]], s=36)
    lo = min(min(r["measured_s"], r["predicted_s"]) for r in rows) / 1.5
    hi = max(max(r["measured_s"], r["predicted_s"]) for r in rows) * 1.5
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
    for m in methods:
        ax.scatter([], [], color=colors[m], label=m)
    for k, mk in markers.items():
        ax.scatter([], [], marker=mk, color="gray", label=k)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("measured s per call")
    ax.set_ylabel("predicted s (roofline + one overhead constant)")
    ax.set_title(f"cost model vs measured: MdAPE {summary['mdape'] * 100:.0f}% "
                 f"(c = {summary['overhead_s'] * 1e6:.0f} us)", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path = run_dir / "check_predicted_vs_measured.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_check(run_dir: Path, hw: Hardware, quick: bool = False, executor: Any = None, clock: str = "thread",
              show_progress: bool = True) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Measure every point (resuming ``run_dir/results.jsonl``), predict, fit, return rows and summary. ``hw``
    must come from :func:`ceilings` with the same ``clock``."""
    from ..sweep import run_sweep

    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
    items = [{**asdict(p), "options": [list(x) for x in p.options], "clock": clock} for p in points(quick)]

    def key(it: dict[str, Any]) -> str:
        return f"{it['clock']}:" + Point(it["kind"], it["method"], it["L"], tuple(tuple(x) for x in it["options"])).key

    rows = run_sweep(measure, items, key=key, path=run_dir / "results.jsonl", executor=executor,
                     description="timing", label=lambda r: f"{r['kind']} {r['method']} L={r['L']}",
                     show_progress=show_progress)
    rows = [dict(r) for r in rows if "error" not in r]
    summary = evaluate(rows, hw)
    return rows, summary


__all__ = ["CLOCKS", "DECODE_METHODS", "HEADS", "ceilings", "one_thread", "thread_times", "PREFILL_METHODS", "Point", "errors", "evaluate", "fit_overhead", "measure",
           "plot", "points", "predicted_cost", "run_check"]
