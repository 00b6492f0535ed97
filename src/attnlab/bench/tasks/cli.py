"""``attnlab bench tasks``: score mechanisms on synthetic tasks in one backbone (see ``docs/benchmarks.md``).

    attnlab bench tasks --suite quick                      # about 15 minutes on 2 cores
    attnlab bench tasks --suite quick --name q1            # resumable: rerun to finish an interrupted run
    attnlab bench tasks --mechanisms softmax "mha:window=4" --tasks mqar-64x16 --budget 30
    attnlab bench tasks --suite quick --compare runs/tasks-quick-20250101-120000
    attnlab bench tasks --suite full --executor ray --address auto --name f1   # on a Ray cluster
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace
from pathlib import Path

from ...sweep import Executor, add_executor_args
from ..common import new_run_dir


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tasks", help="train every mechanism on synthetic tasks (MQAR, flip-flop, ...) and score it")
    p.add_argument("--suite", choices=["quick", "full"], default="quick")
    p.add_argument("--mechanisms", nargs="+", default=None,
                   help="suite labels, catalogue names, name:key=value,... or per-layer a/b (default: the suite's)")
    p.add_argument("--tasks", nargs="+", default=None, help="task labels of the suite (default: all)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per configuration (default: the suite's)")
    p.add_argument("--budget", type=float, default=None, help="wall-clock seconds per configuration")
    p.add_argument("--steps", type=int, default=None,
                   help="also stop after this many steps (a step-matched comparison, independent of speed)")
    p.add_argument("--lrs", nargs="+", type=float, default=None, help="learning-rate grid (default: the suite's)")
    add_executor_args(p, workers=None, workers_help="configurations trained at once on this machine (default: the "
                                                    "suite's; ray: sizes a local instance, a cluster decides its own)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per configuration (a Ray task reserves "
                                                          "as many CPUs)")
    p.add_argument("--compare", default=None, help="an earlier run folder (or its results.json): print what changed")
    p.add_argument("--out", default="runs", help="folder for the run directory")
    p.add_argument("--name", default=None, help="run folder name under --out; an existing one is resumed")
    p.add_argument("--dry-run", action="store_true", help="print the plan and its time bound, train nothing")
    p.set_defaults(func=run)


def select(args: argparse.Namespace):
    """The suite narrowed to the requested tasks, mechanisms and learning rates."""
    from .mechanisms import parse_mechanism
    from .suites import SUITES

    suite = SUITES[args.suite]()
    tasks = suite.tasks
    if args.tasks:
        labels = {t.label for t in tasks}
        unknown = [t for t in args.tasks if t not in labels]
        if unknown:
            raise SystemExit(f"unknown task(s) {unknown}; the {suite.name} suite has {sorted(labels)}")
        tasks = tuple(t for t in tasks if t.label in args.tasks)
    mechanisms = dict(suite.mechanisms)
    if args.mechanisms:
        chosen = [parse_mechanism(m, mechanisms) for m in args.mechanisms]
        mechanisms.update({m.label: m for m in chosen})
        tasks = tuple(replace(t, mechanisms=tuple(m.label for m in chosen)) for t in tasks)
    if args.lrs:
        tasks = tuple(replace(t, lrs=tuple(args.lrs)) for t in tasks)
    return replace(suite, tasks=tasks, mechanisms=mechanisms)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from .runner import aggregate, build_report, compare, execute, missing_mechanisms, plan, read_run

    console = Console()
    suite = select(args)
    configs = plan(suite, seeds=args.seeds, budget_s=args.budget, max_steps=args.steps)
    missing = missing_mechanisms(suite)
    if missing:
        console.print(f"[yellow]not in the catalogue (skipped): {', '.join(missing)}[/yellow]")
    workers = args.workers or suite.workers
    try:  # a bad --executor/--address/--workers, or --executor ray without Ray, fails here with its reason
        executor = Executor(args.executor, args.address, workers, args.threads)
        executor.check()
    except (ImportError, ValueError) as e:
        raise SystemExit(str(e)) from None
    run_dir = Path(args.out) / args.name if args.name else None
    done = set()
    if run_dir is not None and (run_dir / "results.jsonl").exists():
        from .runner import load_rows

        done = {r["key"] for r in load_rows(run_dir / "results.jsonl") if "error" not in r}
    todo = [c for c in configs if c.key not in done]
    bound = sum(c.train.budget_s for c in todo) / max(workers, 1)
    where = (f"Ray tasks on {args.address}, {args.threads} thread(s) each; training takes at most "
             f"{_duration(sum(c.train.budget_s for c in todo))} of task time" if args.address else
             f"{workers} {'Ray task' if args.executor == 'ray' else 'worker'}(s) x {args.threads} thread(s); "
             f"training takes at most {_duration(bound)}")
    console.print(
        f"{suite.name} suite: {len(configs)} configurations ({len(configs) - len(todo)} already done), "
        f"{where} plus evaluation (early stops make it shorter)"
    )
    if args.dry_run:
        for c in todo:
            console.print(f"  {c.task_label:18} {c.mech.label:14} lr={c.train.lr:g} seed={c.seed} "
                          f"budget={c.train.budget_s:g}s  " + escape(f"[{c.mech.describe()}]"))
        return 0
    if run_dir is None:
        run_dir = new_run_dir(f"tasks-{suite.name}", args.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    load_before = _load()
    rows, ran = execute(configs, run_dir, executor=executor)
    order = {k: i for i, k in enumerate(dict.fromkeys((c.task_label, c.mech.label) for c in configs))}
    agg = sorted(aggregate(rows), key=lambda r: order.get((r["task"], r["mechanism"]), len(order)))
    meta = {
        "suite": suite.name,
        "backbone": (
            f"{suite.backbone.layers} blocks, dim {suite.backbone.dim}, {suite.backbone.heads} heads, "
            f"short conv {suite.backbone.conv_kernel}, mlp {suite.backbone.mlp}"
        ),
        "configurations": len(configs),
        "trained_now": ran,
        "executor": args.executor + (f" ({args.address})" if args.address else ""),
        "workers": workers,
        "threads_per_worker": args.threads,
        "wall_seconds_now": round(time.time() - started, 1),
        "training_seconds_all_configurations": round(sum(r.get("seconds") or 0 for r in rows), 1),
        "load_average_before_after": f"{load_before} / {_load()}",
        "state": "per-layer numbers held to decode the next token at the task's training length",
        "not_in_catalogue": ", ".join(missing) or "-",
    }
    if suite.note:
        meta["note"] = suite.note
    report = build_report(suite.name, agg, meta)
    report.print(f"bench tasks: {suite.name}")
    written = report.write(run_dir)
    console.print(f"wrote {run_dir} ({', '.join(p.name for p in written)})")
    if args.compare:
        changes = compare(read_run(args.compare), agg)
        table = Table(title=f"changes since {args.compare}")
        for c in ("task", "mechanism", "old", "new", "delta", "change"):
            table.add_column(c)
        for ch in changes:
            table.add_row(*(str(ch[c]) if ch[c] is not None else "-" for c in ("task", "mechanism", "old", "new",
                                                                                 "delta", "change")))
        console.print(table if changes else f"no score changed by more than 0.01 since {args.compare}")
    return 0


def _load() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "?"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
