"""``attnlab inspect``: build a head atlas of a real model, save JSON/CSV, write the HTML + PNG report."""

from __future__ import annotations

import argparse
from contextlib import nullcontext
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "inspect", help="head metrics, roles and an HTML report for a pretrained model (offline)",
        description="Run probes through a pretrained model, measure every head (sinks, locality, previous-token, "
        "induction, retrieval, lookback, positional profile, importance, rollout/flow) and write a head atlas "
        "(JSON, CSV) with a self-contained HTML report and PNGs.",
    )
    p.add_argument("--model", default="smollm2",
                   help="smollm2, gemma3 (Gemma 3 270M: sliding-window layers keep their 512-key window), minilm, "
                        "a local HF folder or a .gguf file")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", help="text for the base probe (replaces the built-in paragraph)")
    src.add_argument("--file", help="read the base probe's text from this file")
    p.add_argument("--probe", default="text,induction,retrieval,basin,lookback",
                   help="comma list of probes: text (alias sinks), induction, retrieval, basin, lookback")
    p.add_argument("--out", help="output folder (default runs/inspect-<stamp>)")
    p.add_argument("--compare", help="another atlas.json to compare with in the report")
    p.add_argument("--plan", help="a per-head plan JSON (attnlab plan ...): record the atlas of the model "
                   "running that plan (hooks compose with it: every metric is the plan's attention; a model's "
                   "sliding-window layers keep their own window)")
    p.add_argument("--importance", default="gradient", choices=["none", "gradient", "ablation", "both"],
                   help="head importance: gradient (one backward) and/or ablation (one forward per head)")
    p.add_argument("--max-tokens", type=int, default=None, help="truncate the base probe to this many tokens")
    p.add_argument("--chunk", type=int, default=256, help="query rows per chunk when measuring")
    p.add_argument("--window", type=int, default=16, help="locality / streaming window")
    p.add_argument("--flow-tokens", type=int, default=12, help="attention flow on this many tokens (0: off)")
    p.add_argument("--views", default=None, metavar="L.H,L.H",
                   help="add the report's views on the base probe for these heads: head view (token lines; long "
                        "prompts pooled, with zooms), QK/OV circuits and composition, the joint query-key embedding "
                        "of the first head (docs/inspect.md, 'The report')")
    p.add_argument("--no-png", action="store_true", help="skip the matplotlib PNGs")
    p.set_defaults(func=run)
    # `attnlab inspect causal ...`: optional, so `attnlab inspect --model M` keeps building the atlas
    sub = p.add_subparsers(dest="inspect_command", metavar="{causal,heads}", required=False)
    c = sub.add_parser(
        "causal", help="activation patching, direct logit attribution and composition scores on a small task",
        description="Build clean and corrupted prompts offline with the model's tokenizer (induction: repeated "
        "random tokens; ioi-lite: 'When A and B ..., B gave a drink to' -> A), patch each head's z from the clean "
        "run into the corrupted one, attribute the clean logits to heads (DLA), score Q/K/V composition from the "
        "weights, and write JSON + Markdown + PNG heatmaps (layers x heads) under runs/causal-*/.",
    )
    c.add_argument("--model", default="smollm2", help="smollm2, gemma3, a local HF folder or a .gguf file")
    c.add_argument("--task", default="induction", choices=["induction", "ioi-lite", "colors", "factual"])
    c.add_argument("--n", type=int, default=None,
                   help="induction: random tokens per copy (default 20); ioi-lite: prompt pairs (default 4)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--top", type=int, default=10, help="heads in the printed table and the report")
    c.add_argument("--batch", type=int, default=16, help="patched runs per forward pass")
    c.add_argument("--out", default="runs", help="root folder: the report goes to <out>/causal-<stamp>/")
    c.add_argument("--dla-rows", type=int, default=5, help="DLA on at most this many metric rows per prompt")
    c.add_argument("--no-composition", action="store_true",
                   help="skip the weights-only composition scores (layers^2 cost; minutes on a busy CPU)")
    c.add_argument("--no-png", action="store_true", help="skip the matplotlib PNGs")
    c.set_defaults(func=run_causal)
    from .head_cli import register_heads

    register_heads(sub)


def run_causal(args: argparse.Namespace) -> int:
    from ..bench.common import new_run_dir, progress
    from ..models.hf import ModelLoadError, load_model
    from .causal_report import causal_analysis, print_top_heads, write_causal_report

    try:
        model, tok = load_model(args.model)
    except ModelLoadError as e:
        print(f"error: {e}")
        return 2
    n_prompts = 1 if args.task == "induction" else (4 if args.n is None else args.n)
    name = Path(args.model).name
    try:
        with progress(2 * n_prompts + 1, f"causal {name} / {args.task}") as advance:
            a = causal_analysis(model, tok, args.task, args.n, seed=args.seed, name=name,
                                batch=args.batch, dla_rows=args.dla_rows, composition=not args.no_composition,
                                progress=advance)
    except ValueError as e:
        print(f"error: {e}")
        return 2
    out = new_run_dir("causal", args.out)
    paths = write_causal_report(a, out, pngs=not args.no_png, top=args.top)
    print_top_heads(a, args.top)
    print(f"report: {paths['md']}\njson:   {paths['json']}  ({a.seconds:.1f} s)")
    return 0


def run(args: argparse.Namespace) -> int:
    from ..bench.common import new_run_dir, progress
    from ..models import hf
    from ..models.hf import ModelLoadError, geometry, load_model
    from .atlas import HeadAtlas, build_atlas
    from .metrics import MetricConfig
    from .probes import ALIASES, PROBES
    from .report import write_report

    text = Path(args.file).read_text(encoding="utf-8") if args.file else args.text
    probes = [s.strip() for s in args.probe.split(",") if s.strip()]
    for s in probes:
        if ALIASES.get(s, s) not in PROBES:
            print(f"unknown probe {s!r}; choose from {', '.join(PROBES + tuple(ALIASES))}")
            return 2
    heads = []
    if args.views:
        try:
            heads = [tuple(int(x) for x in h.split(".")) for h in args.views.split(",") if h.strip()]
        except ValueError:
            heads = []
        if not heads or any(len(h) != 2 for h in heads):
            print(f"error: --views {args.views}: give heads as LAYER.HEAD, comma separated")
            return 2
    other = HeadAtlas.load(args.compare) if args.compare else None
    try:
        model, tok = load_model(args.model)
    except ModelLoadError as e:
        print(f"error: {e}")
        return 2
    g = geometry(model)
    cfg = MetricConfig(chunk=args.chunk, window=args.window)
    out = Path(args.out) if args.out else new_run_dir("inspect")
    n_probes = len(set(ALIASES.get(s, s) for s in probes) | {"text"})
    total = n_probes * (g.num_layers + 1) + 4 + (g.num_layers * g.num_heads // 16 + 1
                                                 if args.importance in ("both", "ablation") else 0)
    plan = None
    if args.plan:
        from ..plans.plan import HeadPlan
        from ..plans.sources import with_model_windows

        try:
            plan = HeadPlan.load(args.plan)
            plan.check_model(g.num_layers, g.num_kv_heads, g.group)
        except (OSError, ValueError) as e:
            print(f"error: --plan {args.plan}: {e}")
            return 2
        plan = with_model_windows(model, plan)  # a local layer never sees beyond the model's window
    name = Path(args.model).name + (f" under {plan.name}" if plan is not None else "")
    with progress(total, f"inspect {name}") as advance, (hf.use(model, plan) if plan is not None else nullcontext()):
        atlas = build_atlas(model, tok, probes, name=name, text=text, cfg=cfg,
                            importance=args.importance, flow_tokens=args.flow_tokens, max_tokens=args.max_tokens,
                            progress=advance)
    if plan is not None:
        atlas.meta["plan"] = plan.to_dict()
    views = None
    if args.views:
        from .probes import TEXT, text_probe
        from .views import build_views

        try:
            probe = text_probe(tok, text or TEXT, args.max_tokens)
            views = build_views(model, probe.input_ids, probe.labels, heads, circuits=g.is_causal,
                                composition=g.is_causal)
        except ValueError as e:
            print(f"error: --views {args.views}: {e}")
            return 2
    paths = write_report(atlas, out, other, pngs=not args.no_png, views=views)
    counts = atlas.role_counts()
    print(f"{atlas.model}: {g.num_layers} layers x {g.num_heads} heads in {atlas.meta['seconds']} s; "
          f"Sink^eps {atlas.meta['sink_ratio']:.2f} (eps {atlas.meta['eps']}); roles: "
          + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print(f"report: {paths['html']}\natlas:  {paths['json']}  {paths['csv']}")
    return 0
