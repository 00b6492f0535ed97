"""``attnlab list``: print the catalogue."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="print the catalogue of registered mechanisms")
    p.add_argument("--family", choices=None, help="only this family (layers, sparse, routing, linear)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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
