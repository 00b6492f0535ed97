"""``attnlab bench ...``: benchmarks are commands that write JSON, Markdown and PNG under ``runs/``."""

from __future__ import annotations

import argparse
import importlib

# Modules with ``register(bench_subparsers)``.
BENCH_COMMANDS = [
    "attnlab.bench.speed",
    "attnlab.bench.selection",
    "attnlab.bench.native",
    "attnlab.bench.tasks.cli",
    "attnlab.bench.cab.run",
    "attnlab.bench.stability",
    "attnlab.bench.numerics",
    "attnlab.bench.prefix",
    "attnlab.bench.saliency",
    "attnlab.bench.scbench",
    "attnlab.vision.bench",
    "attnlab.interventions.rhythm_cli",
]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="speed and quality benchmarks")
    bench_sub = p.add_subparsers(dest="bench_command", required=True)
    for name in BENCH_COMMANDS:
        importlib.import_module(name).register(bench_sub)
