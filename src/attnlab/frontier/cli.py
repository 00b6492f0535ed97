"""``attnlab frontier``: accuracy against KV held, prefill speed-up and decode speed for every inference-time
method, budget, task and length, on the embedded models (see :mod:`attnlab.frontier.run`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..sweep import Executor, add_executor_args
from . import methods as M
from .run import DEFAULT_BUDGETS, DEFAULT_LENGTHS, DEFAULT_TASKS, FULL_LENGTHS

QUICK = {"models": ("smollm2",), "tasks": ("passkey", "kv"), "lengths": (1024,), "n": 2, "budgets": (0.25,)}


def _csv(text: str | None, cast=str) -> tuple | None:
    return None if text is None else tuple(cast(x) for x in str(text).split(",") if x.strip())


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("frontier", help="every inference-time sparse / KV method x budget x task on real models: "
                                        "accuracy vs KV held, prefill speed-up, decode speed (Pareto fronts)")
    p.add_argument("--models", default=None, help="comma-separated: smollm2,gemma3 (default both)")
    p.add_argument("--methods", default=None, help=f"comma-separated; available: {','.join(M.METHODS)}")
    p.add_argument("--budgets", default=None, help="KV / density fractions (default 0.5,0.25,0.125)")
    p.add_argument("--tasks", default=None, help=f"default {','.join(DEFAULT_TASKS)}; 'grid' = a niah needle at "
                                                 "depths 0.0 .. 0.9, 0.98, 1.0 (--n ignored)")
    p.add_argument("--lengths", default=None, help="prompt lengths in tokens (default 1024,2048,4096)")
    p.add_argument("--protocols", default="prefill,press", help="prefill (compress while prefilling), press (dense "
                                                                "prefill, then compress), or both")
    p.add_argument("--local-windows", dest="local", choices=M.LOCAL_MODES, default="shrink",
                   help="sliding-window layers (Gemma 3) under a KV budget: shrink them to the same fraction "
                        "(default; the budget covers every layer), keep the model's own window (records are "
                        "labelled MODEL:own-windows), or min: 4 sinks + a short window each, the rest of the "
                        "budget to the full layers (MODEL:local-min)")
    p.add_argument("--n", type=int, default=None, help="samples per task and length (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a few minutes: SmolLM2, passkey + kv at 1024, n=2, "
                                                        "budget 0.25, the quick method set")
    p.add_argument("--full", action="store_true", help="also 8k (both models) and 16k (Gemma 3)")
    p.add_argument("--resume", default=None, help="a run folder to continue (finished samples are skipped)")
    p.add_argument("--out", default="runs", help="folder for the run directory")
    p.add_argument("--list", action="store_true", help="list the methods and exit")
    add_executor_args(p, workers=1, workers_help="samples run at once on this machine (default 1: this process; "
                                                  "more: a process each, loading the model once; ray: sizes a "
                                                  "local instance, a cluster decides its own)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per sample (default: torch's; a Ray task reserves as many CPUs, 1 if unset)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..bench.common import machine_info, new_run_dir, progress
    from . import report
    from .run import GRID, aggregate, depth_table, frontier, solvable_rows

    if args.list:
        for m in M.METHODS.values():
            print(f"{m.name:18s} {m.family:8s} {'/'.join(m.protocols):15s} {m.summary}")
        return 0
    try:  # a bad --executor/--address/--workers, or --executor ray without Ray, fails before anything loads
        executor = Executor.from_args(args, threads=args.threads)
        executor.check()
    except (ImportError, ValueError) as e:
        raise SystemExit(str(e)) from None
    q = QUICK if args.quick else {}
    models = _csv(args.models) or q.get("models", ("smollm2", "gemma3"))
    names = _csv(args.methods) or (M.QUICK if args.quick else tuple(M.METHODS))
    for name in names:
        M.get(name)  # unknown names fail before anything loads
    budgets = _csv(args.budgets, float) or q.get("budgets", DEFAULT_BUDGETS)
    if any(not 0 < b <= 1 for b in budgets):
        raise SystemExit(f"--budgets are fractions in (0, 1], got {budgets}")
    tasks = _csv(args.tasks) or q.get("tasks", DEFAULT_TASKS)
    from ..plans.tasks import GENERATORS

    bad = [t for t in tasks if t not in GENERATORS and t != GRID]
    if bad:
        raise SystemExit(f"unknown task(s) {bad}; choose from {sorted(GENERATORS)}")
    lengths = _csv(args.lengths, int) or q.get("lengths")
    if lengths is None:
        lengths = {m: FULL_LENGTHS.get(m, DEFAULT_LENGTHS) for m in models} if args.full else DEFAULT_LENGTHS
    n = args.n or q.get("n", 5)
    protocols = _csv(args.protocols)
    if not protocols or set(protocols) - {"prefill", "press"}:
        raise SystemExit(f"--protocols takes prefill and/or press, got {args.protocols!r}")
    run_dir = Path(args.resume) if args.resume else new_run_dir("frontier", args.out)
    _same_samples(run_dir, n, args.seed)
    meta = {"models": list(models), "methods": list(names), "budgets": list(budgets), "tasks": list(tasks),
            "lengths": lengths if isinstance(lengths, dict) else list(lengths), "n": n, "seed": args.seed,
            "local_windows": args.local, "executor": args.executor + (f" ({args.address})" if args.address else ""),
            "workers": args.workers,
            **machine_info()}
    print(f"frontier run in {run_dir}")
    records = frontier(models, names, budgets, tasks, lengths, n, run_dir, seed=args.seed,
                       progress=lambda total: progress(total, "frontier"), protocols=protocols,
                       local=args.local, executor=executor)
    errors = sorted({f"{r['model']} {r['method']} {r['budget']} {r['protocol']}: {r['error']}"
                     for r in records if "error" in r})
    meta["errors"] = errors
    rows = aggregate(records)
    report.write(rows, run_dir, meta)
    solvable = solvable_rows(rows)
    if solvable and len(solvable) < len(rows):  # the same report over the cells the dense model solves
        summary = report.summarize(solvable)
        text = report.markdown(solvable, summary, report.claims(summary, solvable))
        md = run_dir / "results.md"
        md.write_text(md.read_text() + "\n# Over the cells the dense model solves (dense accuracy >= 0.5)\n\n"
                      + text.replace("\n## ", "\n### ").replace("\n# ", "\n## "))
    grid = depth_table(records)
    if grid:  # the depth grid's own table, after the report's sections
        md = run_dir / "results.md"
        md.write_text(md.read_text() + "\n" + grid)
    report.print_summary(report.summarize(rows))
    for e in errors:
        print(f"error: {e}")
    print(f"wrote {run_dir}")
    return 0


def _same_samples(run_dir: Path, n: int, seed: int) -> None:
    """A resumed run must draw the samples it already holds: sample i's depth depends on ``n`` (depths spread
    over the n samples) and its keys on ``seed``, and finished samples are recognised by their index alone.
    The folder's ``sampling.json`` (written before the first sample runs, so an interrupted run has it; older
    folders: the meta of ``results.json``) says which were drawn."""
    import json

    old: dict = {}
    for name, read in (("sampling.json", lambda d: d), ("results.json", lambda d: d.get("meta", {}))):
        if (run_dir / name).is_file():
            old = read(json.loads((run_dir / name).read_text()))
            break
    for flag, asked in (("n", n), ("seed", seed)):
        if flag in old and old[flag] != asked:
            raise SystemExit(f"{run_dir} was run with --{flag} {old[flag]}; its samples depend on it (sample i's "
                             f"depth on --n, its keys on --seed): resume with --{flag} {old[flag]}, or start a "
                             "new run folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "sampling.json").write_text(json.dumps({"n": n, "seed": seed}) + "\n")


__all__ = ["QUICK", "register", "run"]
