"""``attnlab demo``: the main job -- every capability once, on the embedded defaults.

1. ``bench speed`` (patterns, layers, routing, linear kernels) against SDPA in one run;
2. a head atlas of the embedded SmolLM2 (HTML report + JSON/CSV);
3. per-head plans on SmolLM2: dense vs streaming heads -- accuracy, KV bytes, prefill time;
4. the sparse frontier's quick form: every kind of inference-time method on SmolLM2 at one budget.

``--quick`` keeps it to a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the main job: speed bench, head atlas and head plans on embedded models")
    p.add_argument("--quick", action="store_true", help="the few-minute version (default in the README)")
    p.add_argument("--out", default="runs", help="folder for run directories")
    p.add_argument("--skip", nargs="*", default=[], choices=["speed", "atlas", "plans", "frontier"], help="steps to leave out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .bench import speed

    out = Path(args.out)
    t0 = time.perf_counter()
    if "speed" not in args.skip:
        print("== 1/4 speed: attnlab engines and layers vs SDPA ==")
        speed.run(
            argparse.Namespace(
                quick=args.quick, sections=None, patterns=None, lengths=None, backward=False,
                device="cuda" if torch.cuda.is_available() else "cpu", out=str(out),
            )
        )
    for step, name in (("atlas", "2/4 head atlas of SmolLM2"), ("plans", "3/4 per-head plans on SmolLM2"),
                       ("frontier", "4/4 the sparse frontier, quick form (attnlab frontier --quick)")):
        if step in args.skip:
            continue
        print(f"== {name} ==")
        _STEPS[step](out, args.quick)
    print(f"demo finished in {time.perf_counter() - t0:.0f} s; results under {out}/")
    return 0


def _atlas(out: Path, quick: bool) -> None:
    from .inspect import quick_atlas

    path = quick_atlas(out / f"atlas-smollm2-{time.strftime('%Y%m%d-%H%M%S')}")
    print(f"head atlas report: {path}")


def _plans(out: Path, quick: bool) -> None:
    from .models.hf import load_model
    from .plans.cli import quick_check

    model, tok = load_model("smollm2")
    # quick: 6 passkey prompts of 4k tokens, dense and the plan back to back (the figures the issue names)
    figs = quick_check(model, tok, n=6 if quick else 20, length=4096, out_root=str(out))
    held = ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in figs["targets"].items())
    print(f"plan comparison: {figs['run_dir']} ({held})")


def _frontier(out: Path, quick: bool) -> None:
    from .cli import main

    main(["frontier", "--out", str(out)] + (["--quick"] if quick else ["--models", "smollm2", "--lengths", "4096"]))


_STEPS = {"atlas": _atlas, "plans": _plans, "frontier": _frontier}
