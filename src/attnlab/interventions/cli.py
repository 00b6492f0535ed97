"""``attnlab eval --intervention NAME[:key=value,...]`` (the parser lives in :mod:`attnlab.plans.cli`, which
hands the intervention runs to :func:`run_eval`)."""

from __future__ import annotations

import argparse
from pathlib import Path

#: --quick: small sizes everywhere (validation grids of fit.QUICK, few samples); lengths: each task's own
#: (attnlab.interventions.data.lengths_for) unless --lengths is given
QUICK = {"n": 4}
DEFAULT = {"n": 20}


def _csv(text: str | None) -> list[str]:
    return [t.strip() for t in str(text).split(",") if t.strip()] if text else []


def resolve(args: argparse.Namespace):
    """The :class:`~attnlab.interventions.runner.Run` the arguments ask for (``--resume``: the saved one, with
    any arms, tasks, lengths or n given on the command line replacing it) and the run folder."""
    from ..bench.common import new_run_dir
    from . import data
    from . import registry as R
    from .runner import CONFIG, Run

    saved = None
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / CONFIG).is_file():
            raise SystemExit(f"--resume {run_dir}: no {CONFIG} there (not an interventions run folder)")
        saved = Run.load(run_dir)
    arms = [a.strip() for a in (args.intervention or []) if a.strip()]
    if not arms and saved is None:
        raise SystemExit("give at least one --intervention NAME[:key=value,...] "
                         f"(interventions: {', '.join(R.names())})")
    parsed = []
    for a in arms:
        try:
            parsed.append(R.parse(a))
        except ValueError as e:
            raise SystemExit(str(e)) from None
    arms = [R.arm_label(p) for p in parsed] or list(saved.arms)
    if len(set(arms)) != len(arms):
        raise SystemExit(f"an arm is given twice: {arms}")
    if not parsed:
        parsed = [R.parse(a) for a in arms]
    if len(args.plan) > 1:
        raise SystemExit("interventions run on one --plan at a time (it is the plain arm's attention too)")
    plan = args.plan[0] if args.plan else (saved.plan if saved else None)
    if plan is not None and any(c.spec.kind == "plan" for p in parsed for c in p):
        raise SystemExit("moa decides what runs the attention (a plan per prompt length); it cannot run under --plan")
    models = _csv(args.model) if args.model else list(saved.models if saved else ["smollm2"])
    available = data.task_names()
    tasks = _csv(args.tasks) or (list(saved.tasks) if saved else R.default_tasks([c for p in parsed for c in p],
                                                                                  available))
    for t in tasks:
        if t not in available:
            raise SystemExit(f"unknown task {t!r}; choose from {', '.join(available)}")
    sizes = QUICK if args.quick else DEFAULT
    lengths = [int(x) for x in _csv(args.lengths)] or (list(saved.lengths) if saved else [])
    n = args.n or (saved.n if saved else sizes["n"])
    quick = bool(args.quick) or (saved.quick if saved and not args.quick else False)
    run = Run(tuple(models), tuple(arms), tuple(tasks), tuple(lengths), int(n), int(args.seed), quick,
              args.n_val if args.n_val else (saved.n_val if saved else None), plan)
    run_dir = Path(args.resume) if args.resume else new_run_dir("interventions", args.out_root)
    return run, run_dir


def run_eval(args: argparse.Namespace) -> int:
    import torch

    from ..sweep import Executor
    from . import registry as R
    from .runner import COLUMNS, score

    if getattr(args, "list_interventions", False):
        print(R.describe())
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if getattr(args, "solvability", False):
        return run_solvability(args)
    run, run_dir = resolve(args)
    lengths = ", ".join(map(str, run.lengths)) or "each task's own"
    print(f"run folder {run_dir}; arms {', '.join(run.arms)}; tasks {', '.join(run.tasks)}; lengths {lengths}; "
          f"n {run.n}; models {', '.join(run.models)}")
    out = score(run, run_dir, executor=Executor.from_args(args, threads=args.threads))
    rep = out["report"]
    rep.columns = COLUMNS
    rep.print("attnlab eval --intervention (change vs plain in points, 95% paired bootstrap CI)")
    print(f"wrote {run_dir} ({out['seconds']:.0f} s)")
    return 0


def run_solvability(args: argparse.Namespace) -> int:
    """``attnlab eval --solvability``: the plain model on each task's test samples, accuracy vs chance."""
    from ..bench.common import new_run_dir
    from ..sweep import Executor
    from . import solvability as S
    from . import tasks as T

    if args.intervention or args.plan:
        raise SystemExit("--solvability scores the plain model alone (no --intervention, no --plan)")
    from . import registry as R

    models = _csv(args.model) or ["smollm2"]
    # default: every intervention task, then the long-context tasks the interventions target
    tasks = _csv(args.tasks) or list(dict.fromkeys([*T.TASKS, *(t for n_ in R.names()
                                                                 for t in R.get(n_).default_tasks)]))
    n = args.n or (QUICK if args.quick else DEFAULT)["n"]
    lengths = [int(x) for x in _csv(args.lengths)] or None
    run_dir = Path(args.resume) if args.resume else new_run_dir("solvability", args.out_root)
    print(f"run folder {run_dir}; tasks {', '.join(tasks)}; n {n}; models {', '.join(models)}")
    try:
        rep = S.run(models, tasks, n, run_dir, lengths=lengths, quick=bool(args.quick), seed=args.seed,
                    executor=Executor.from_args(args, threads=args.threads))
    except ValueError as e:
        raise SystemExit(str(e)) from None
    rep.print("attnlab eval --solvability (plain model; solvable: accuracy above chance, p < 0.05)")
    print(f"wrote {run_dir} ({rep.meta['seconds']:.0f} s)")
    return 0


__all__ = ["DEFAULT", "QUICK", "resolve", "run_eval", "run_solvability"]
