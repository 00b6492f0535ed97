"""``attnlab list``: print the catalogue of layers, or (``--ops``) of attention ops."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="print the catalogue of registered mechanisms (or, with --ops, of attention ops)")
    p.add_argument("--family", choices=None, help="only this family (layers: layers, sparse, routing, linear; "
                   "ops: dense, pattern, routing, linear, cache)")
    p.add_argument("--ops", action="store_true", help="list the attention ops (q/k/v level) instead of the layers")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def _options(opts: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in opts.items())


def run_ops(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from .. import ops

    specs = ops.specs(args.family)
    rows = [s.as_dict() for s in specs]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(title=f"attnlab ops ({len(rows)} ops)")
    for col in ("name", "family", "papers", "options", "cache", "decodes", "summary"):
        table.add_column(col)
    for r in rows:
        papers = "; ".join(f"{p} {t}".strip() for p, t in zip(r["papers"], r["titles"]))
        table.add_row(r["name"], r["family"], papers, _options(r["options"]), r["cache"],
                      "yes" if r["decodes"] else "no", r["summary"])
    Console().print(table)
    return 0


def run(args: argparse.Namespace) -> int:
    if args.ops:
        return run_ops(args)

    from rich.console import Console
    from rich.table import Table

    from .registry import catalogue, presets

    entries = catalogue(args.family)
    if args.json:
        print(json.dumps([e.as_dict() for e in entries], indent=2))
        return 0
    table = Table(title=f"attnlab catalogue ({len(entries)} mechanisms)")
    for col in ("name", "family", "paper", "year", "decodes", "summary"):
        table.add_column(col)
    for e in entries:
        table.add_row(e.name, e.family, ", ".join(e.papers), str(e.year), "yes" if e.decodes else "no", e.summary)
    Console().print(table)
    pres = presets()
    if pres:
        print("presets: " + ", ".join(f"{k} -> {m}" for k, (m, _) in sorted(pres.items())))
    return 0
