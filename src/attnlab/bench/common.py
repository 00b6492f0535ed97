"""Shared benchmark machinery: timing, peak memory, the machine's matmul peak, run folders and reports.

Every ``attnlab bench ...`` command writes ``runs/<kind>-<stamp>/`` with ``results.json``, ``results.md``
and PNG plots, and prints the same table. Speed is reported as ratios measured in the same run.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


def sync(device: torch.device | str | None = None) -> None:
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], Any], reps: int = 5, warmup: int = 1, max_seconds: float = 20.0,
            clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Times of ``reps`` calls after ``warmup`` calls; stops early once ``max_seconds`` (of ``clock``) are
    spent. ``clock``: wall time (default) or ``time.thread_time`` -- this thread's CPU time, which with torch on
    one thread leaves out the time spent waiting for a core on a busy machine."""
    for _ in range(warmup):
        fn()
    sync()
    times: list[float] = []
    start = clock()
    for _ in range(reps):
        t0 = clock()
        fn()
        sync()
        times.append(clock() - t0)
        if clock() - start > max_seconds and len(times) >= 2:
            break
    return times


def bench_qkv(n: int, device: str, dtype: torch.dtype, grad: bool = False, heads: int = 8, head_dim: int = 64,
              std: float = 1.0) -> list[torch.Tensor]:
    """Seeded q, k, v of shape (1, heads, n, head_dim) for the speed sections (the same draw in every run)."""
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, heads, n, head_dim, generator=g).mul_(std).to(device, dtype).requires_grad_(grad)
            for _ in range(3)]


def fwd_bwd(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    """A call of ``fn`` followed by its backward pass (gradient of ones), for timing training steps."""
    def run() -> None:
        out = fn()
        out.backward(torch.ones_like(out))

    return run


def time_pair(base: Callable[[], Any], fn: Callable[[], Any], rounds: int = 5, warmup: int = 1,
              max_seconds: float = 30.0) -> tuple[float, float, float]:
    """Time ``base`` and ``fn`` alternately, one call each per round: (median base s, median fn s, median of the
    per-round ratios base / fn). On a shared machine a burst of load then slows both sides of a round alike,
    so the ratio is steadier than one from two separate series."""
    for _ in range(warmup):
        base()
        fn()
    sync()
    tb: list[float] = []
    ta: list[float] = []
    start = time.perf_counter()
    for _ in range(rounds):
        for f, acc in ((base, tb), (fn, ta)):
            t0 = time.perf_counter()
            f()
            sync()
            acc.append(time.perf_counter() - t0)
        if time.perf_counter() - start > max_seconds and len(tb) >= 2:
            break
    return median(tb), median(ta), median([b / a for b, a in zip(tb, ta)])


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
    )]


def _heap_reader() -> Callable[[], int]:
    """Bytes currently allocated by malloc (glibc mallinfo2: in-use arena + mmapped), else process RSS.

    torch's CPU allocator uses malloc, so this falls when tensors are freed -- unlike RSS, which keeps
    freed pages and would hide every peak after the first.
    """
    try:
        libc = ctypes.CDLL(None)
        fn = libc.mallinfo2
        fn.restype = _MallInfo2

        def read() -> int:
            m = fn()
            return int(m.uordblks + m.hblkhd)

        read()
        return read
    except (OSError, AttributeError):
        import psutil

        proc = psutil.Process(os.getpid())
        return lambda: proc.memory_info().rss


class _PeakSampler:
    """Peak of ``read()`` above its starting value, sampled every half millisecond in a thread."""

    def __init__(self) -> None:
        self.read = _heap_reader()
        self.base = self.read()
        self.peak = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.read())
            time.sleep(0.0005)

    def __enter__(self) -> _PeakSampler:
        self._t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.read())


def peak_memory(fn: Callable[[], Any], device: torch.device | str = "cpu") -> int:
    """Peak bytes allocated while ``fn`` runs, above what was allocated before.

    CUDA: the caching allocator's exact peak. CPU: malloc'd bytes sampled every 0.5 ms (a lower bound
    for peaks shorter than that; good to a few percent for attention-sized buffers).
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with _PeakSampler() as s:
        fn()
    return max(0, s.peak - s.base)


def matmul_peak_gflops(device: torch.device | str = "cpu", n: int = 2048, dtype=torch.float32) -> float:
    """The machine's dense matmul throughput in this run: the ceiling for useful FLOP/s."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = min(time_fn(lambda: a @ b, reps=7, warmup=2))  # best case: the ceiling, not a typical (noisy) call
    return 2 * n**3 / t / 1e9


def attention_flops(pairs: float, batch: int, heads: int, head_dim: int, backward: bool = False) -> float:
    """Useful FLOPs of attention over ``pairs`` allowed (query, key) pairs per head: QK^T and PV."""
    f = 4.0 * pairs * batch * heads * head_dim
    return f * 3.5 if backward else f  # backward: dQ, dK, dV, dP and the recomputed scores: 2.5x forward


@dataclass
class Report:
    """Rows of one benchmark run; ``write`` produces JSON, Markdown and the plots."""

    kind: str
    columns: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    #: functions ``plot(report, run_dir) -> path`` drawn by ``write``
    plots: list[Callable[[Report, Path], Path | None]] = field(default_factory=list)

    def add(self, **row: Any) -> dict[str, Any]:
        self.rows.append(row)
        return row

    def markdown(self) -> str:
        head = "| " + " | ".join(self.columns) + " |"
        sep = "|" + "|".join("---" for _ in self.columns) + "|"
        body = ["| " + " | ".join(_fmt(r.get(c, "")) for c in self.columns) + " |" for r in self.rows]
        return "\n".join([head, sep, *body])

    def write(self, run_dir: Path) -> list[Path]:
        run_dir.mkdir(parents=True, exist_ok=True)
        meta = {**machine_info(), **self.meta}
        (run_dir / "results.json").write_text(json.dumps({"kind": self.kind, "meta": meta, "rows": self.rows}, indent=2))
        lines = [f"# attnlab bench {self.kind}", "", _meta_md(meta), "", self.markdown(), ""]
        written = [run_dir / "results.json", run_dir / "results.md"]
        for plot in self.plots:
            path = plot(self, run_dir)
            if path is not None:
                written.append(path)
                lines.append(f"![{path.stem}]({path.name})")
        (run_dir / "results.md").write_text("\n".join(lines) + "\n")
        return written

    def print(self, title: str | None = None) -> None:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title or f"attnlab bench {self.kind}")
        for c in self.columns:
            table.add_column(c)
        for r in self.rows:
            table.add_row(*(_fmt(r.get(c, "")) for c in self.columns))
        # wide enough that no column is cut, whatever the terminal (CI logs are files)
        Console(width=max(120, 14 * len(self.columns) + 40)).print(table)


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        if x == 0:
            return "0"
        if abs(x) >= 100:
            return f"{x:.0f}"
        if abs(x) >= 1:
            return f"{x:.2f}"
        return f"{x:.3g}"
    return str(x)


def _meta_md(meta: dict[str, Any]) -> str:
    return "\n".join(f"- {k}: {v}" for k, v in meta.items())


def machine_info() -> dict[str, Any]:
    info = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def new_run_dir(kind: str, root: str | os.PathLike = "runs") -> Path:
    """A new folder ``root/kind-YYYYmmdd-HHMMSS`` (``-2``, ``-3``, ... when taken). Creating it is the test:
    two processes started in the same second get different folders."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    Path(root).mkdir(parents=True, exist_ok=True)
    n = 1
    while True:
        path = Path(root) / (f"{kind}-{stamp}" if n == 1 else f"{kind}-{stamp}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            n += 1


def progress(total: int, description: str):
    """A rich progress bar context: ``with progress(n, "timing") as advance: ... advance()``."""
    from contextlib import contextmanager

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    @contextmanager
    def ctx():
        with Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True
        ) as prog:
            task = prog.add_task(description, total=total)

            def advance(label: str | None = None) -> None:
                prog.update(task, advance=1, description=label or description)

            yield advance

    return ctx()
