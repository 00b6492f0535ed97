"""The ``attnlab`` command. Each area adds its subcommands from its own module (see ``COMMANDS``)."""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules with ``register(subparsers)``; each registered parser sets ``func(args) -> int``.
COMMANDS = [
    "attnlab.mechanisms.cli",
    "attnlab.bench.cli",
    "attnlab.inspect.cli",
    "attnlab.inspect.circuit_cli",
    "attnlab.demo",
    "attnlab.plans.cli",
    "attnlab.frontier.cli",
    "attnlab.cost.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnlab", description="Attention mechanisms: build, run, inspect, compare.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
