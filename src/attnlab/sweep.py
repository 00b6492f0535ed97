"""Independent configurations of a sweep, run in this process, a local process pool or as Ray tasks; each
result appended to a JSONL file as it finishes, so a rerun into the same file skips what is done.

Every command with independent configurations (the quality benchmark, the frontier, the interventions runner,
the ``bench`` sweeps) runs them through :func:`run_sweep`::

    rows = run_sweep(train_one, configs, key=lambda c: c.key, path=run_dir / "results.jsonl",
                     executor=Executor.from_args(args), label=lambda row: row["task"])

``fn`` must be a picklable top-level function of one configuration returning a JSON-able dict; the same
function runs under every executor, so results do not depend on where they ran (tested).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

EXECUTORS = ("local", "ray")


def add_executor_args(parser: argparse.ArgumentParser, workers: int = 1) -> None:
    """``--executor local|ray``, ``--address``, ``--workers`` (one name per knob across commands)."""
    parser.add_argument("--executor", choices=EXECUTORS, default="local",
                        help="local: this machine (a process pool with --workers > 1); ray: Ray tasks "
                             "(pip install -e .[ray]), on --address or a local Ray instance")
    parser.add_argument("--address", default=None,
                        help="ray: the cluster to join (e.g. ray://host:10001 or auto); default: start a local one")
    parser.add_argument("--workers", type=int, default=workers,
                        help=f"configurations run at once (default {workers}; ray: CPUs of a local instance)")


@dataclass(frozen=True)
class Executor:
    """Where configurations run. ``workers``: processes of the local pool (1 = this process) or CPUs of a local
    Ray instance; ``threads``: torch threads per configuration (None = leave as is)."""

    kind: str = "local"
    address: str | None = None
    workers: int = 1
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in EXECUTORS:
            raise ValueError(f"unknown executor {self.kind!r}; expected one of {', '.join(EXECUTORS)}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.address is not None and self.kind != "ray":
            raise ValueError("--address is for --executor ray")

    @classmethod
    def from_args(cls, args: argparse.Namespace, threads: int | None = None) -> Executor:
        return cls(getattr(args, "executor", "local"), getattr(args, "address", None),
                   getattr(args, "workers", 1) or 1, threads)

    def map_unordered(self, fn: Callable[[Any], dict[str, Any]], items: Sequence[Any]) -> Iterator[tuple[Any, dict]]:
        """``(item, fn(item))`` pairs in the order they finish."""
        if not items:
            return iter(())
        if self.kind == "ray":
            return _ray_map(fn, items, self)
        if self.workers <= 1:
            return ((it, _call(fn, it, self.threads)) for it in items)
        return _pool_map(fn, items, self)


def _call(fn: Callable[[Any], dict[str, Any]], item: Any, threads: int | None) -> dict[str, Any]:
    if threads:
        import torch

        torch.set_num_threads(threads)
    return fn(item)


def _pool_map(fn, items, ex: Executor) -> Iterator[tuple[Any, dict]]:
    pool = ProcessPoolExecutor(max_workers=ex.workers, mp_context=get_context("spawn"))
    pending: dict[Future, Any] = {}
    queue = list(items)
    try:
        while queue or pending:
            while queue and len(pending) < ex.workers:
                it = queue.pop(0)
                pending[pool.submit(_call, fn, it, ex.threads)] = it
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                yield pending.pop(fut), fut.result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _ray_map(fn, items, ex: Executor) -> Iterator[tuple[Any, dict]]:
    raise NotImplementedError("the ray executor is being written")


def load_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSONL results file (the last one per key wins: a redone configuration supersedes)."""
    if not path.is_file():
        return []
    out: dict[Any, dict[str, Any]] = {}
    for i, line in enumerate(path.read_text().splitlines()):
        if line.strip():
            row = json.loads(line)
            out[row.get("key", i)] = row
    return list(out.values())


def append_row(path: Path, row: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def run_sweep(fn: Callable[[Any], dict[str, Any]], items: Sequence[Any], *, key: Callable[[Any], str],
              path: Path, executor: Executor | None = None, label: Callable[[dict[str, Any]], str] | None = None,
              description: str = "configurations", show_progress: bool = True,
              retry_errors: bool = True) -> list[dict[str, Any]]:
    """Run the items whose ``key`` is not yet in ``path``; append each result (with ``"key"``) as it finishes;
    return the rows of all ``items`` (old and new), in ``items`` order. Rows with an ``"error"`` field are run
    again on the next call when ``retry_errors``."""
    from .bench.common import progress

    executor = executor or Executor()
    old = {r["key"]: r for r in load_rows(path) if "key" in r}
    done = {k for k, r in old.items() if not (retry_errors and "error" in r)}
    keys = [key(it) for it in items]
    if len(set(keys)) != len(keys):
        raise ValueError("run_sweep: two configurations share a key")
    todo = [it for it, k in zip(items, keys, strict=True) if k not in done]
    if todo:
        bar = progress(len(todo), description) if show_progress else _quiet()
        with bar as advance:
            for it, row in executor.map_unordered(fn, todo):
                row = {**row, "key": key(it)}
                append_row(path, row)
                old[row["key"]] = row
                advance(label(row) if label else None)
    return [old[k] for k in keys if k in old]


class _quiet:
    def __enter__(self) -> Callable[[str | None], None]:
        return lambda label=None: None

    def __exit__(self, *exc: Any) -> None:
        return None


__all__ = ["EXECUTORS", "Executor", "add_executor_args", "append_row", "load_rows", "run_sweep"]
