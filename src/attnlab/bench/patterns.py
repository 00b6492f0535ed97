"""Speed of static patterns through every engine, as ratios against SDPA measured in the same run.

For each case: SDPA causal (the baseline every sparse pattern must beat), dense SDPA for non-causal
patterns, the naive dense-mask path (SDPA with the whole boolean mask), attnlab's block-sparse engine,
and (full runs) compiled FlexAttention's forward. Useful GFLOP/s count allowed pairs only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..core import blocksparse
from ..core.attention import attention
from ..core.patterns import (
    Causal,
    Chunked,
    Dilated,
    Full,
    Pattern,
    PowerAttention,
    Sinks,
    SlidingWindow,
    StridedShards,
)
from .common import Report, attention_flops, bench_qkv, fwd_bwd, median, peak_memory, progress, time_fn
from .speed import SpeedContext

HEADS, HEAD_DIM = 8, 64


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[int], Pattern]  # length -> pattern
    causal: bool
    lengths: tuple[int, ...]  # full-run lengths
    quick_lengths: tuple[int, ...]
    backward: bool = True  # time forward + backward too


def _neighborhood_2d(n: int) -> Pattern:
    from ..core.patterns import Neighborhood

    side = int(round(n**0.5))
    return Neighborhood(grid=(side, side), kernel_size=13)


CASES: tuple[Case, ...] = (
    Case("causal", lambda n: Causal(), True, (8192,), (2048,)),
    Case("full", lambda n: Full(), False, (8192,), (2048,)),
    Case("sliding_window_512", lambda n: SlidingWindow(512), True, (2048, 8192), (4096,)),
    Case("sinks4_window256", lambda n: Sinks(4) & Causal() | SlidingWindow(256), True, (8192,), (4096,)),
    Case("neighborhood_2d_13x13", _neighborhood_2d, False, (96 * 96,), (48 * 48,), backward=False),
    # breadth (full runs only): patterns whose keys are not one contiguous band
    Case("dilated_256x2", lambda n: Dilated(256, 2), True, (8192,), ()),
    Case("s2_shards_b64", lambda n: StridedShards(64, HEADS, local_blocks=4), True, (8192,), ()),
    Case("power_b64", lambda n: PowerAttention(64, local_blocks=4), True, (8192,), ()),
    Case("chunked_512", lambda n: Chunked(512, causal=True), True, (8192,), ()),
)


def tune_group(ctx: SpeedContext, n: int = 4096) -> int:
    """Measure rows-per-tile for the block-sparse engine on a sliding window, forward plus forward+backward;
    the fastest total wins and is saved for later processes."""
    q, k, v = bench_qkv(n, ctx.device, ctx.dtype, True, HEADS, HEAD_DIM)
    pat = SlidingWindow(512)
    best, best_t = blocksparse.DEFAULT_GROUP.get(torch.device(ctx.device).type, 128), float("inf")
    for group in (64, 128, 256):
        def fwd(g=group):
            with torch.no_grad():
                return attention(q, k, v, pat, backend="blocksparse", group=g)

        step = fwd_bwd(lambda g=group: attention(q, k, v, pat, backend="blocksparse", group=g))
        t = median(time_fn(fwd, reps=3)) + median(time_fn(step, reps=2))
        if t < best_t:
            best, best_t = group, t
    return best


def run(ctx: SpeedContext) -> Report:
    dev_type = torch.device(ctx.device).type
    longest = max(ctx.lengths) if ctx.lengths else 8192
    group = tune_group(ctx, min(longest, 2048 if ctx.quick else 4096))
    blocksparse.DEFAULT_GROUP[dev_type] = group
    blocksparse.save_tuned_group(dev_type, group)
    cases = [c for c in CASES if ctx.only is None or c.name in ctx.only]
    report = Report(
        kind="speed-patterns",
        columns=[
            "pattern", "length", "pass", "engine", "time_s", "peak_MiB", "density",
            "GFLOP/s", "%peak", "x_vs_sdpa_causal", "x_vs_dense_mask", "x_vs_sdpa_dense",
        ],
        meta={"heads": HEADS, "head_dim": HEAD_DIM, "batch": 1, "dtype": str(ctx.dtype), "group": group},
        plots=[plot_speedups],
    )
    reps = 3 if ctx.quick else 5
    jobs = [(c, n) for c in cases for n in _lengths(ctx, c)]
    with progress(len(jobs), "patterns") as advance:
        for case, n in jobs:
            _run_case(ctx, report, case, n, reps)
            advance(f"{case.name} @ {n}")
    return report


def _lengths(ctx: SpeedContext, case: Case) -> tuple[int, ...]:
    default = case.quick_lengths if ctx.quick else case.lengths
    if ctx.lengths is None or not default:
        return default  # breadth cases stay out of quick runs
    if case.name.startswith("neighborhood"):  # a square grid near each asked length
        return tuple(int(round(n**0.5)) ** 2 for n in ctx.lengths)
    return ctx.lengths


def _run_case(ctx: SpeedContext, report: Report, case: Case, n: int, reps: int) -> None:
    pat = case.make(n)
    density = pat.density(n, n)
    passes = ["fwd"] + (["fwd+bwd"] if (case.backward and (ctx.backward or not ctx.quick or case.name.startswith("sliding"))) else [])
    for pas in passes:
        grad = pas == "fwd+bwd"
        engines = _engines(pat, bench_qkv(n, ctx.device, ctx.dtype, grad, HEADS, HEAD_DIM), flex=not grad and not ctx.quick)
        times: dict[str, float] = {}
        for name, fn in engines.items():
            call = fwd_bwd(fn) if grad else fn
            ctxm = torch.enable_grad() if grad else torch.no_grad()
            with ctxm:
                times[name] = median(time_fn(call, reps=reps, warmup=1))
                peak = peak_memory(call, ctx.device)
            pairs = pat.count(n, n) if name in ("attnlab", "dense_mask", "flex") else (
                n * (n + 1) / 2 if name == "sdpa_causal" else float(n * n)
            )
            gflops = attention_flops(pairs, 1, HEADS, HEAD_DIM, backward=grad) / times[name] / 1e9
            report.add(
                pattern=case.name, length=n, **{"pass": pas}, engine=name, time_s=times[name],
                peak_MiB=peak / 2**20, density=density if name != "sdpa_dense" else 1.0,
                **{"GFLOP/s": gflops, "%peak": 100 * gflops / ctx.peak_gflops},
            )
        for row in report.rows[-len(engines):]:
            t = row["time_s"]
            row["x_vs_sdpa_causal"] = times["sdpa_causal"] / t
            row["x_vs_sdpa_dense"] = times["sdpa_dense"] / t
            if "dense_mask" in times:
                row["x_vs_dense_mask"] = times["dense_mask"] / t


def _engines(pat: Pattern, qkv: list[torch.Tensor], flex: bool) -> dict[str, Callable[[], torch.Tensor]]:
    q, k, v = qkv
    engines: dict[str, Callable[[], torch.Tensor]] = {
        "sdpa_causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "sdpa_dense": lambda: F.scaled_dot_product_attention(q, k, v),
        "attnlab": lambda: attention(q, k, v, pat),
    }
    if not (pat.is_full or type(pat) is Causal):
        engines["dense_mask"] = lambda: attention(q, k, v, pat, backend="dense_mask")
        if flex:
            engines["flex"] = lambda: attention(q, k, v, pat, backend="flex")
    return engines


def plot_speedups(report: Report, run_dir: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report.rows if r["engine"] == "attnlab"]
    if not rows:
        return None
    labels = [f"{r['pattern']}\n{r['length']} {r['pass']}" for r in rows]
    causal = [r["x_vs_sdpa_causal"] for r in rows]
    dense = [r["x_vs_sdpa_dense"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows)), 4))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], causal, width=0.4, label="vs SDPA causal")
    ax.bar([x + 0.2 for x in xs], dense, width=0.4, label="vs SDPA dense")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel("speed-up (same run)")
    ax.set_title("attnlab.attention vs SDPA (batch 1, 8 heads, head_dim 64)")
    ax.legend()
    fig.tight_layout()
    path = run_dir / "speedup.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
