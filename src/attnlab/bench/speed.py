"""``attnlab bench speed``: time every engine and layer in one run, as ratios against SDPA.

Sections (``SECTIONS``) each return a :class:`~attnlab.bench.common.Report`; the command measures the
matmul peak once, runs the sections, prints their tables and writes ``runs/speed-<stamp>/<section>/``.
"""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass

import torch

from .common import Report

# section name -> "module:function"; the function takes a SpeedContext and returns a Report.
SECTIONS: dict[str, str] = {
    "patterns": "attnlab.bench.patterns:run",
    "routing": "attnlab.bench.routing:run",
    "linear": "attnlab.bench.linear:run",
    "layers": "attnlab.bench.layers:run",
    "plan": "attnlab.bench.plan_prefill:run",
}


@dataclass(frozen=True)
class SpeedContext:
    quick: bool
    lengths: tuple[int, ...] | None  # None: the section's defaults (smaller with quick)
    backward: bool  # also time forward + backward
    device: str
    dtype: torch.dtype
    peak_gflops: float  # fp32 matmul peak measured in this run
    only: tuple[str, ...] | None  # restrict to these pattern / mechanism names


def load_section(name: str):
    mod, fn = SECTIONS[name].split(":")
    return getattr(importlib.import_module(mod), fn)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("speed", help="time patterns, layers and linear kernels against SDPA")
    p.add_argument("--quick", action="store_true", help="small lengths and few repeats (a few minutes on 2 cores)")
    p.add_argument("--sections", nargs="+", default=None, help=f"subset of {list(SECTIONS)}")
    p.add_argument("--patterns", nargs="+", default=None, help="only these pattern / mechanism names")
    p.add_argument("--lengths", nargs="+", type=int, default=None, help="sequence lengths")
    p.add_argument("--backward", action="store_true", help="also time forward + backward")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="runs", help="folder for the run directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .common import matmul_peak_gflops, new_run_dir

    sections = args.sections or list(SECTIONS)
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    peak = matmul_peak_gflops(args.device)
    print(f"fp32 matmul peak in this run: {peak:.0f} GFLOP/s on {args.device}")
    ctx = SpeedContext(
        quick=args.quick,
        lengths=tuple(args.lengths) if args.lengths else None,
        backward=args.backward,
        device=args.device,
        dtype=torch.float32,
        peak_gflops=peak,
        only=tuple(args.patterns) if args.patterns else None,
    )
    run_dir = new_run_dir("speed", args.out)
    for name in sections:
        report: Report = load_section(name)(ctx)
        report.meta["matmul_peak_gflops"] = round(peak, 1)
        report.print(f"bench speed: {name}")
        report.write(run_dir / name)
    print(f"wrote {run_dir}")
    return 0
