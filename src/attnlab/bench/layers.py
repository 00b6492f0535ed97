"""``attnlab bench speed --sections layers``: every registered mechanism against dense ``mha`` of the same size.

For each length, each mechanism of the catalogue (all families) is built with ``dim=512, heads=8`` (only the
options its config has) and timed on one sequence: forward, forward + backward, and one decode step after a
prefill of ``length - 1`` tokens. Ratios are speedups over the ``mha`` layer (causal, SDPA) measured in the
same run: ``t_mha / t_layer``, above 1 is faster. A class may set ``bench_max_len`` to skip longer lengths
(e.g. layers that materialize the score matrix). MoH's default is 50% of heads active (2 shared + top-2 of 6).
Layers over a grid of tokens (images, video: ``vmoba``, ``care``, ``biformer``) get a grid of ``length`` tokens
(power-of-two sides, as even as possible).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from ..mechanisms.registry import build, catalogue, config_options
from .common import Report, median, progress, time_fn
from .speed import SpeedContext

DIM, HEADS, BATCH = 512, 8, 1


def grid_options(entry: Any, length: int) -> dict[str, Any]:
    """``{"grid": sides}`` of ``length`` tokens for layers that take a grid (as many sides as their default grid;
    powers of two as even as possible, larger sides first), else ``{}``."""
    if "grid" not in config_options(entry.config):
        return {}
    default = next(f.default for f in dataclasses.fields(entry.config) if f.name == "grid")
    n = len(default)
    if length < 1 or length & (length - 1):
        raise ValueError(f"{entry.name}: a grid of {length} tokens needs a power-of-two length")
    e = length.bit_length() - 1
    return {"grid": tuple(2 ** (e // n + (i < e % n)) for i in range(n))}


def _build(entry: Any, device: str, length: int) -> torch.nn.Module:
    fields = set(config_options(entry.config))
    opts = {k: v for k, v in (("dim", DIM), ("heads", HEADS)) if k in fields}
    bound = getattr(entry.cls, "length_option", None)  # the option bounding the sequence length, if any
    if bound in fields:  # room for the length plus the decode steps timed after it
        opts[bound] = length + 64
    return build(entry.name, **opts, **grid_options(entry, length)).to(device)


def _times(layer: torch.nn.Module, x: torch.Tensor, reps: int, decodes: bool) -> dict[str, float | None]:
    with torch.no_grad():
        fwd = median(time_fn(lambda: layer(x), reps=reps, warmup=1))
    xg = x.detach().requires_grad_(True)

    def fb() -> None:
        layer(xg).sum().backward()

    fwd_bwd = median(time_fn(fb, reps=reps, warmup=1))
    layer.zero_grad(set_to_none=True)
    dec = None
    if decodes:
        try:
            cache = layer.init_cache(x.shape[0])
        except TypeError:
            cache = None
        if cache is not None:
            with torch.no_grad():
                layer(x[:, :-1], cache)
                last = x[:, -1:]
                # each timed call appends one more position; the growth over a few reps is negligible
                dec = median(time_fn(lambda: layer(last, cache), reps=max(3, reps), warmup=1))
    return {"forward_s": fwd, "fwd_bwd_s": fwd_bwd, "decode_ms": None if dec is None else dec * 1e3}


def run(ctx: SpeedContext) -> Report:
    lengths = ctx.lengths or ((1024,) if ctx.quick else (1024, 8192))
    reps = 2 if ctx.quick else 3
    entries = [e for e in catalogue() if ctx.only is None or e.name in ctx.only or e.name == "mha"]
    entries.sort(key=lambda e: e.name != "mha")  # the baseline first
    report = Report(
        "layers",
        columns=["mechanism", "family", "length", "forward_s", "fwd_bwd_s", "decode_ms",
                 "speedup_fwd", "speedup_fwd_bwd", "speedup_decode", "note"],
        meta={"dim": DIM, "heads": HEADS, "batch": BATCH, "baseline": "mha (causal, SDPA)", "reps": reps},
        plots=[_plot],
    )
    dev = torch.device(ctx.device)
    with progress(len(lengths) * len(entries), "layers") as advance:
        for T in lengths:
            x = torch.randn(BATCH, T, DIM, device=dev, dtype=ctx.dtype, generator=None)
            base: dict[str, float | None] = {}
            for e in entries:
                advance(f"{e.name} @ {T}")
                row: dict[str, Any] = {"mechanism": e.name, "family": e.family, "length": T, "note": ""}
                try:
                    layer = _build(e, ctx.device, T).to(ctx.dtype)
                    limit = getattr(layer, "bench_max_len", None)
                    if limit is not None and T > limit:
                        row["note"] = f"skipped: bench_max_len={limit}"
                        report.add(**row)
                        continue
                    row.update(_times(layer, x, reps, e.decodes))
                except Exception as err:  # a benchmark row, not a crash: say what failed
                    row["note"] = f"{type(err).__name__}: {str(err)[:80]}"
                    report.add(**row)
                    continue
                if e.name == "mha":
                    base = {k: row[k] for k in ("forward_s", "fwd_bwd_s", "decode_ms")}
                for key, col in (("forward_s", "speedup_fwd"), ("fwd_bwd_s", "speedup_fwd_bwd"),
                                 ("decode_ms", "speedup_decode")):
                    if base.get(key) and row.get(key):
                        row[col] = base[key] / row[key]
                report.add(**row)
    for r in report.rows:
        if r["mechanism"] == "moh" and r.get("speedup_fwd"):
            report.meta[f"moh_50pct_vs_mha_at_{r['length']}"] = (
                f"forward {r['speedup_fwd']:.2f}x, forward+backward {r.get('speedup_fwd_bwd', 0):.2f}x"
            )
    return report


def _plot(report: Report, run_dir: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report.rows if r.get("speedup_fwd")]
    if not rows:
        return None
    T = max(r["length"] for r in rows)
    rows = [r for r in rows if r["length"] == T]
    fig, ax = plt.subplots(figsize=(max(6, 0.4 * len(rows)), 4))
    names = [r["mechanism"] for r in rows]
    ax.bar(names, [r["speedup_fwd"] for r in rows])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylabel("forward speedup over mha")
    ax.set_title(f"layers at length {T} (dim {DIM}, {HEADS} heads)")
    ax.tick_params(axis="x", rotation=75)
    fig.tight_layout()
    path = run_dir / "layers_speedup.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
