"""Independent configurations of a sweep, run in this process, a local process pool or as Ray tasks; each
result appended to a JSONL file as it finishes, so a rerun into the same file skips what is done.

Every command with independent configurations (the quality benchmark, the frontier, the interventions runner,
the ``bench`` sweeps) runs them through :func:`run_sweep` (or, where one configuration gives several records,
:meth:`Executor.map_unordered`)::

    rows = run_sweep(train_one, configs, key=lambda c: c.key, path=run_dir / "results.jsonl",
                     executor=Executor.from_args(args), label=lambda row: row["task"])

``fn`` must be a picklable top-level function of one configuration returning a JSON-able dict; the same
function runs under every executor, so results do not depend on where they ran (tested). A configuration whose
``fn`` raises (or whose worker dies) becomes a row with an ``"error"`` field under every executor: one failed
configuration never loses the sweep, and the next run retries it.

Executors:

* ``local`` with ``workers == 1``: this process, configurations in order;
* ``local`` with ``workers > 1``: a pool of spawned processes, results in the order they finish;
* ``ray``: one Ray task per configuration (``threads or 1`` CPUs each) on the cluster at ``address``, or on a
  local Ray instance of ``workers * (threads or 1)`` CPUs; results stream back in the order they finish.
  Ray is optional (``pip install -e .[ray]``) and imported only here.
"""

from __future__ import annotations

import argparse
import json
import os
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

EXECUTORS = ("local", "ray")
RAY_INSTALL = "pip install -e .[ray]"


def add_executor_args(parser: argparse.ArgumentParser, workers: int | None = 1,
                      workers_help: str | None = None) -> None:
    """``--executor local|ray``, ``--address``, ``--workers`` (one name per knob across commands).
    ``workers``: the default of ``--workers`` (None: the command decides, said in ``workers_help``)."""
    parser.add_argument("--executor", choices=EXECUTORS, default="local",
                        help="local: this machine (a process pool with --workers > 1); ray: one Ray task per "
                             f"configuration ({RAY_INSTALL}), on --address or a local Ray instance")
    parser.add_argument("--address", default=None,
                        help="ray: the cluster to join (auto, HOST:6379 or ray://HOST:10001); default: start a "
                             "local Ray instance with --workers configurations at once")
    parser.add_argument("--workers", type=int, default=workers,
                        help=workers_help or f"configurations run at once on this machine (default {workers}; "
                                             "ray: sizes a local instance, a cluster decides its own)")


@dataclass(frozen=True)
class Executor:
    """Where configurations run. ``workers``: configurations at once on this machine (1 = this process; ray: a
    local instance gets ``workers * (threads or 1)`` CPUs); ``threads``: torch threads per configuration (None =
    leave as is; a Ray task reserves ``threads or 1`` CPUs)."""

    kind: str = "local"
    address: str | None = None
    workers: int = 1
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in EXECUTORS:
            raise ValueError(f"unknown executor {self.kind!r}; expected one of {', '.join(EXECUTORS)}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {self.threads}")
        if self.address is not None and self.kind != "ray":
            raise ValueError("--address is for --executor ray")

    @classmethod
    def from_args(cls, args: argparse.Namespace, threads: int | None = None) -> Executor:
        return cls(getattr(args, "executor", "local"), getattr(args, "address", None),
                   getattr(args, "workers", 1) or 1, threads)

    @property
    def in_process(self) -> bool:
        """True when configurations run in this process, one after another."""
        return self.kind == "local" and self.workers <= 1

    def check(self) -> None:
        """Fail early (before models load) when this executor cannot run here: ``ray`` without Ray."""
        if self.kind == "ray":
            _import_ray()

    def map_unordered(self, fn: Callable[[Any], dict[str, Any]], items: Sequence[Any]) -> Iterator[tuple[Any, dict]]:
        """``(item, fn(item))`` pairs in the order they finish; an item whose ``fn`` raised (or whose worker
        died) comes back as ``{"error": "Type: message", "trace": ...}``."""
        if not items:
            return iter(())
        if self.kind == "ray":
            return _ray_map(fn, items, self)
        if self.in_process:
            return ((it, _call(fn, it, self.threads)) for it in items)
        return _pool_map(fn, items, self)


def error_row(e: BaseException) -> dict[str, Any]:
    """The row of a configuration that raised ``e``."""
    return {"error": f"{type(e).__name__}: {e}", "trace": "".join(traceback.format_exception(e, limit=-3))}


def _call(fn: Callable[[Any], dict[str, Any]], item: Any, threads: int | None) -> dict[str, Any]:
    """``fn(item)`` with ``threads`` torch threads; an exception becomes an error row (in the worker, so the
    row says what failed even when the exception itself does not pickle)."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        return fn(item)
    except Exception as e:  # noqa: BLE001 - one configuration must not lose the sweep: recorded, retried later
        return error_row(e)


def _pool_map(fn, items, ex: Executor) -> Iterator[tuple[Any, dict]]:
    def new_pool() -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=ex.workers, mp_context=get_context("spawn"))

    pool = new_pool()
    pending: dict[Future, Any] = {}
    queue = list(items)
    try:
        while queue or pending:
            while queue and len(pending) < ex.workers:
                it = queue.pop(0)
                pending[pool.submit(_call, fn, it, ex.threads)] = it
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            broken = False
            for fut in finished:
                it = pending.pop(fut)
                try:
                    row = fut.result()
                except BrokenProcessPool as e:  # a worker died (killed, out of memory): the others go on
                    broken, row = True, error_row(e)
                except Exception as e:  # noqa: BLE001 - e.g. a result that does not pickle
                    row = error_row(e)
                yield it, row
            if broken:
                # every configuration in flight died with the pool: recorded as errors, a new pool runs the rest
                for it in list(pending.values()):
                    yield it, error_row(BrokenProcessPool("a worker of the process pool died"))
                pending.clear()
                pool.shutdown(wait=False, cancel_futures=True)
                pool = new_pool()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise ImportError(f"--executor ray needs Ray: {RAY_INSTALL}") from e
    return ray


def _ray_init(ray: Any, ex: Executor) -> None:
    """Join the cluster at ``ex.address``, or start a local instance sized by ``workers`` and ``threads``;
    a Ray already initialized in this process (a test's, an earlier sweep's) is reused as it is."""
    if ray.is_initialized():
        return
    import logging

    kwargs: dict[str, Any] = {"log_to_driver": False, "ignore_reinit_error": True, "logging_level": logging.WARNING}
    if ex.address is None:  # a new local instance ("local": never a cluster that happens to run here), our size
        kwargs.update(num_cpus=ex.workers * (ex.threads or 1), include_dashboard=False)
    ray.init(address=ex.address or "local", **kwargs)


def _ray_map(fn, items, ex: Executor) -> Iterator[tuple[Any, dict]]:
    ray = _import_ray()
    _ray_init(ray, ex)
    # Ray retries a task whose worker died (a lost node); an exception in fn is a row already (_call)
    task = ray.remote(num_cpus=ex.threads or 1)(_call)
    fn_ref = ray.put(fn)  # shipped once, not with every task
    pending = {task.remote(fn_ref, it, ex.threads): it for it in items}
    try:
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            it = pending.pop(ref)
            try:
                row = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - a worker died, the task was cancelled, ...: recorded
                row = error_row(e)
            yield it, row
    finally:
        for ref in pending:  # interrupted (Ctrl-C, the consumer stopped): do not leave tasks running
            ray.cancel(ref, force=True)


def load_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSONL results file (the last one per key wins: a redone configuration supersedes); a line
    cut short by a crash is ignored."""
    if not path.is_file():
        return []
    out: dict[Any, dict[str, Any]] = {}
    for i, line in enumerate(path.read_text().splitlines()):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            out[row.get("key", i) if isinstance(row, dict) else i] = row
    return list(out.values())


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Append one JSON line (values JSON cannot hold are written as their ``repr``) and flush it to disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(row, default=repr) + "\n"
    with path.open("ab+") as f:
        # a line cut short by a crash has no newline: start a fresh line so this row stays readable
        if f.seek(0, os.SEEK_END) > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                text = "\n" + text
        f.write(text.encode())
        f.flush()
        os.fsync(f.fileno())


def run_sweep(fn: Callable[[Any], dict[str, Any]], items: Sequence[Any], *, key: Callable[[Any], str],
              path: Path, executor: Executor | None = None, label: Callable[[dict[str, Any]], str] | None = None,
              description: str = "configurations", show_progress: bool = True,
              retry_errors: bool = True,
              error_fields: Callable[[Any], dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Run the items whose ``key`` is not yet in ``path``; append each result (with ``"key"``) as it finishes;
    return the rows of all ``items`` (old and new), in ``items`` order. Rows with an ``"error"`` field are run
    again on the next call when ``retry_errors``. ``error_fields(item)``: fields added to the error row of an
    item that did not return (``fn`` raised, its worker died), so error rows carry what other rows do."""
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
                if "error" in row and error_fields is not None:
                    row = {**error_fields(it), **row}
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


__all__ = ["EXECUTORS", "RAY_INSTALL", "Executor", "add_executor_args", "append_row", "error_row", "load_rows",
           "run_sweep"]
