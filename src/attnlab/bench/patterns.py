"""Speed of static patterns through every engine, as ratios against SDPA measured in the same run.

For each case: the baseline (SDPA causal for causal patterns, dense SDPA otherwise), the other SDPA, the naive
dense-mask path (SDPA with the whole boolean mask), ``attnlab`` (``attention()`` as a user calls it: the engine
it picks), ``native`` (attnlab's CPU kernel on the pattern's BlockLayout, when built), ``python`` (the sparse
engine's PyTorch tile path) and (full runs) compiled FlexAttention's forward.

Every engine is timed *alternately* with the baseline, one call each per round, and its ratio is the median of
the per-round ratios (the machine is shared: a burst of load slows both sides of a round alike). Useful GFLOP/s
count allowed pairs only; ``%peak`` is against the fp32 matmul peak measured in the same run. Before the cases,
the native kernel's block size and tile-product engine are measured and stored in the tuning file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from ..core import sparse
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
from ..core.sparse import native
from ..core.sparse.layout import BlockLayout
from .common import (
    Report,
    attention_flops,
    bench_qkv,
    fwd_bwd,
    median,
    peak_memory,
    progress,
    time_fn,
    time_pair,
)
from .speed import SpeedContext

HEADS, HEAD_DIM = 8, 64
SCALE = HEAD_DIM**-0.5


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
    Case("sinks4_window256", lambda n: Sinks(4) & Causal() | SlidingWindow(256), True, (4096, 8192), (4096,)),
    Case("neighborhood_2d_13x13", _neighborhood_2d, False, (96 * 96,), (48 * 48,)),
    # breadth (full runs only): patterns whose keys are not one contiguous band
    Case("dilated_256x2", lambda n: Dilated(256, 2), True, (8192,), ()),
    Case("s2_shards_b64", lambda n: StridedShards(64, HEADS, local_blocks=4), True, (8192,), ()),
    Case("power_b64", lambda n: PowerAttention(64, local_blocks=4), True, (8192,), ()),
    Case("chunked_512", lambda n: Chunked(512, causal=True), True, (8192,), ()),
)


@lru_cache(maxsize=4)
def pattern_layout(pattern: Pattern, n: int, block: int) -> tuple[BlockLayout, torch.Tensor | None]:
    """The pattern's BlockLayout at length ``n`` with square blocks, over the pattern's own query order when it
    has one (2-D grids in Z-order: blocks are square patches), applied to keys too; built once per case."""
    dense = pattern.dense(n, n, 0).unsqueeze(0)  # (1, Hp, n, n)
    order = pattern.query_order(n, 0)
    if order is not None:
        dense = dense[:, :, order][..., order]
    return BlockLayout.from_dense(dense, block, block, 0), order


def native_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, block: int) -> Callable:
    layout, order = pattern_layout(pattern, q.shape[2], block)
    return lambda: native.block_attention(q, k, v, layout, SCALE, q_order=order, k_order=order)[0]


def tune_native(ctx: SpeedContext, n: int) -> tuple[int, str]:
    """Measure the native kernel's block size and tile-product engine on a sliding window (forward plus
    forward+backward, alternated with SDPA causal so load bursts cancel); the fastest is saved for later runs."""
    q, k, v = bench_qkv(n, ctx.device, ctx.dtype, True, HEADS, HEAD_DIM)
    pat = SlidingWindow(512)
    base = fwd_bwd(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    best, best_ratio = (native.default_block(), native.gemm()), 0.0
    for gemm in ("own", "brgemm"):
        try:
            native.set_gemm(gemm)
        except RuntimeError:
            continue
        for block in (64, 128):
            step = fwd_bwd(native_call(q, k, v, pat, block))
            ratio = time_pair(base, step, rounds=2 if ctx.quick else 3)[2]
            if ratio > best_ratio:
                best, best_ratio = (block, gemm), ratio
    native.save_tuning(best[0], best[1], torch.device(ctx.device).type)
    return best


def tune_q_block(ctx: SpeedContext, n: int) -> int:
    """Measure query rows per tile of the Python tile engine on a sliding window; saved for later processes."""
    q, k, v = bench_qkv(n, ctx.device, ctx.dtype, True, HEADS, HEAD_DIM)
    pat = SlidingWindow(512)
    base = fwd_bwd(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    best, best_ratio = sparse.default_q_block(ctx.device), 0.0
    for qb in (64, 128, 256):
        plan = sparse.plan_pattern(pat, n, n, q_block=qb, device=ctx.device)
        step = fwd_bwd(lambda p=plan: sparse.run(q, k, v, p, SCALE, engine="python"))
        ratio = time_pair(base, step, rounds=2)[2]
        if ratio > best_ratio:
            best, best_ratio = qb, ratio
    sparse.save_tuned_q_block(torch.device(ctx.device).type, best)
    return best


def run(ctx: SpeedContext) -> Report:
    longest = max(ctx.lengths) if ctx.lengths else 8192
    n_tune = min(longest, 2048 if ctx.quick else 4096)
    q_block = tune_q_block(ctx, n_tune)
    has_native = torch.device(ctx.device).type == "cpu" and native.available()
    block, gemm = tune_native(ctx, n_tune) if has_native else (None, None)
    cases = [c for c in CASES if ctx.only is None or c.name in ctx.only]
    report = Report(
        kind="speed-patterns",
        columns=[
            "pattern", "length", "pass", "engine", "time_s", "peak_MiB", "density",
            "GFLOP/s", "%peak", "x_vs_sdpa_causal", "x_vs_dense_mask", "x_vs_sdpa_dense",
        ],
        meta={"heads": HEADS, "head_dim": HEAD_DIM, "batch": 1, "dtype": str(ctx.dtype), "q_block": q_block,
              "native_block": block, "native_gemm": gemm,
              "timing": "alternated with the baseline; ratios are medians of per-round ratios"},
        plots=[plot_speedups],
    )
    reps = 3 if ctx.quick else 5
    jobs = [(c, n) for c in cases for n in _lengths(ctx, c)]
    with progress(len(jobs), "patterns") as advance:
        for case, n in jobs:
            _run_case(ctx, report, case, n, reps, block)
            advance(f"{case.name} @ {n}")
    return report


def _lengths(ctx: SpeedContext, case: Case) -> tuple[int, ...]:
    default = case.quick_lengths if ctx.quick else case.lengths
    if ctx.lengths is None or not default:
        return default  # breadth cases stay out of quick runs
    if case.name.startswith("neighborhood"):  # a square grid near each asked length
        return tuple(int(round(n**0.5)) ** 2 for n in ctx.lengths)
    return ctx.lengths


def _run_case(ctx: SpeedContext, report: Report, case: Case, n: int, reps: int, block: int | None) -> None:
    pat = case.make(n)
    density = pat.density(n, n)
    want_bwd = case.backward and (ctx.backward or not ctx.quick or case.name.startswith("sliding"))
    passes = ["fwd"] + (["fwd+bwd"] if want_bwd else [])
    base_name = "sdpa_causal" if case.causal else "sdpa_dense"
    for pas in passes:
        grad = pas == "fwd+bwd"
        qkv = bench_qkv(n, ctx.device, ctx.dtype, grad, HEADS, HEAD_DIM)
        engines = _engines(pat, n, qkv, flex=not grad and not ctx.quick, block=block, device=ctx.device)
        calls = {name: (fwd_bwd(fn) if grad else fn) for name, fn in engines.items()}
        grad_mode = torch.enable_grad if grad else torch.no_grad
        times: dict[str, float] = {}
        ratios: dict[str, float] = {}
        base_times: list[float] = []
        with grad_mode():
            for name, call in calls.items():
                if name == base_name:
                    continue
                tb, ta, r = time_pair(calls[base_name], call, rounds=reps)
                times[name], ratios[name] = ta, r
                base_times.append(tb)
            times[base_name] = median(base_times) if base_times else median(time_fn(calls[base_name], reps=reps))
            ratios[base_name] = 1.0
            peaks = {name: peak_memory(call, ctx.device) for name, call in calls.items()}
        rows = []
        for name in engines:
            pairs = pat.count(n, n) if name not in ("sdpa_causal", "sdpa_dense") else (
                n * (n + 1) / 2 if name == "sdpa_causal" else float(n * n)
            )
            gflops = attention_flops(pairs, 1, HEADS, HEAD_DIM, backward=grad) / times[name] / 1e9
            rows.append(report.add(
                pattern=case.name, length=n, **{"pass": pas}, engine=name, time_s=times[name],
                peak_MiB=peaks[name] / 2**20, density=density if name != "sdpa_dense" else 1.0,
                **{"GFLOP/s": gflops, "%peak": 100 * gflops / ctx.peak_gflops},
            ))
        other = "sdpa_dense" if base_name == "sdpa_causal" else "sdpa_causal"
        for row in rows:
            name = row["engine"]
            row[f"x_vs_{base_name}"] = ratios[name]  # alternated: median of per-round ratios
            row[f"x_vs_{other}"] = times[other] / times[name]  # from medians of separate series
            if "dense_mask" in times:
                row["x_vs_dense_mask"] = times["dense_mask"] / times[name]


def _engines(pat: Pattern, n: int, qkv: list[torch.Tensor], flex: bool, block: int | None,
             device: str) -> dict[str, Callable[[], torch.Tensor]]:
    q, k, v = qkv
    engines: dict[str, Callable[[], torch.Tensor]] = {
        "sdpa_causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "sdpa_dense": lambda: F.scaled_dot_product_attention(q, k, v),
        "attnlab": lambda: attention(q, k, v, pat),
    }
    if not (pat.is_full or type(pat) is Causal):
        engines["dense_mask"] = lambda: attention(q, k, v, pat, backend="dense_mask")
        plan = sparse.plan_pattern(pat, n, n, device=device)
        engines["python"] = lambda: sparse.run(q, k, v, plan, SCALE, engine="python")
        if block is not None:
            engines["native"] = native_call(q, k, v, pat, block)
        if flex:
            engines["flex"] = lambda: attention(q, k, v, pat, backend="flex")
    return engines


def plot_speedups(report: Report, run_dir: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report.rows if r["engine"] in ("attnlab", "native")]
    if not rows:
        return None
    labels = [f"{r['pattern']}\n{r['length']} {r['pass']}\n{r['engine']}" for r in rows]
    causal = [r["x_vs_sdpa_causal"] for r in rows]
    dense = [r["x_vs_sdpa_dense"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows)), 4))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], causal, width=0.4, label="vs SDPA causal")
    ax.bar([x + 0.2 for x in xs], dense, width=0.4, label="vs SDPA dense")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(list(xs), labels, fontsize=6)
    ax.set_ylabel("speed-up (same run)")
    ax.set_title("attnlab vs SDPA (batch 1, 8 heads, head_dim 64)")
    ax.legend()
    fig.tight_layout()
    path = run_dir / "speedup.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
