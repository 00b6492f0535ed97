"""``attnlab bench rhythm``: the preplan-and-anchor rhythm (I26) on seeded multi-step arithmetic prompts.

Per (model, prompt): the model's greedy answer (plain attention, the same :class:`~attnlab.interventions.decoding.Base`
as ``attnlab eval``), then :func:`attnlab.interventions.rhythm.analyse` on prompt + answer (response = the answer):
WAAD / FAI per head through the ``weights`` hook point, local / global heads, preplan and anchor tokens, their
coupling and its chance expectation. Pooled per model: observed vs expected coupled preplan tokens and a permutation
p-value (anchors shuffled within each prompt). Output ``runs/rhythm-<stamp>/``: ``results.json``, ``results.md``,
``traces.png`` (the WAAD and FAI traces of each model's first prompt), ``results.jsonl`` (per prompt; ``--resume``).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import rhythm as RH

COLUMNS = ["model", "prompts", "correct", "response_tokens", "preplan", "hits", "expected", "coupling", "chance",
           "excess", "p_perm", "local_waad", "global_waad", "seconds"]


@dataclass(frozen=True)
class RhythmConfig:
    """One prompt of one model."""

    model: str
    index: int
    n: int
    steps: int = 4
    max_new: int = 80
    window: int = 10
    head_frac: float = 0.25
    top: float = 0.15
    seed: int = 0

    @property
    def key(self) -> str:
        return f"{self.model}/{self.steps}/{self.seed}/{self.index}/w{self.window}/h{self.head_frac}/t{self.top}"


def run_one(cfg: RhythmConfig) -> dict[str, Any]:
    """Generate the greedy answer to prompt ``cfg.index`` and analyse prompt + answer (a JSON-able record)."""
    import torch

    from .decoding import Base, greedy, stop_ids
    from .runner import load

    model, tok = load(cfg.model)
    ids, answer = RH.arithmetic_prompts(tok, cfg.index + 1, cfg.seed, cfg.steps)[cfg.index]
    t0 = time.perf_counter()
    with Base(model) as base:
        new = greedy(model, torch.tensor([ids]), cfg.max_new, base.new_cache, stop_ids(model, tok))[0].tolist()
        full = ids + new
        res = RH.analyse(model, full, len(ids), RH.Rhythm(cfg.window, cfg.head_frac, cfg.top))
    text = tok.decode(new, skip_special_tokens=True)
    nums = re.findall(r"-?\d+", text)
    return {**asdict(cfg), **res, "answer": answer, "text": text, "correct": bool(nums) and int(nums[-1]) == answer,
            "pieces": [tok.decode([t]) for t in full[len(ids):]], "seconds": time.perf_counter() - t0}


def summarize(records: list[dict[str, Any]], perms: int = 2000, seed: int = 0) -> list[dict[str, Any]]:
    """Per model: prompts, correct answers, pooled hits vs expected, coupling and chance rates, permutation p."""
    rows = []
    for m in dict.fromkeys(r["model"] for r in records):
        mine = [r for r in records if r["model"] == m and "error" not in r]
        pre = sum(len(r["preplan"]) for r in mine)
        hits = sum(r["hits"] for r in mine)
        exp = sum(r["expected"] for r in mine)
        p = RH.permutation_p([(r["eligible"], r["preplan"], len(r["anchors"])) for r in mine], hits, perms, seed)
        rows.append({
            "model": m, "prompts": len(mine), "correct": sum(bool(r["correct"]) for r in mine),
            "response_tokens": sum(r["tokens"] - r["start"] for r in mine), "preplan": pre, "hits": hits,
            "expected": round(exp, 2), "coupling": hits / pre if pre else None, "chance": exp / pre if pre else None,
            "excess": (hits - exp) / pre if pre else None, "p_perm": p,
            "local_waad": sum(r["local_waad"] for r in mine) / max(1, len(mine)),
            "global_waad": sum(r["global_waad"] for r in mine) / max(1, len(mine)),
            "seconds": round(sum(r["seconds"] for r in mine), 1),
        })
    return rows


def plot_traces(records: list[dict[str, Any]], path: Path) -> Path | None:
    """WAAD (local heads) and FAI (global heads) along the response of each model's first prompt, preplan
    tokens marked on the WAAD trace, anchors on the FAI trace."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    firsts = [next(r for r in records if r["model"] == m and "error" not in r)
              for m in dict.fromkeys(r["model"] for r in records if "error" not in r)]
    if not firsts:
        return None
    fig, axes = plt.subplots(2 * len(firsts), 1, figsize=(12, 4.2 * len(firsts)), squeeze=False)
    for i, r in enumerate(firsts):
        s = r["start"]
        xs = list(range(s, r["tokens"]))
        w = r["waad_trace"][s:]
        f = r["fai_trace"][s:]
        a1, a2 = axes[2 * i][0], axes[2 * i + 1][0]
        a1.plot(xs, w, color="tab:blue", lw=1)
        a1.scatter(r["preplan"], [r["waad_trace"][t] for t in r["preplan"]], color="tab:red", zorder=3,
                   label="preplan (top WAAD)")
        a1.set_ylabel(f"WAAD (W={r['window']}), local heads")
        a1.set_title(f"{r['model']}: prompt {r['index']} ({len(r['preplan'])} preplan, {r['hits']} coupled)")
        a1.legend(fontsize=7)
        a2.plot(xs[:-1], f[:-1], color="tab:green", lw=1)
        a2.scatter(r["anchors"], [r["fai_trace"][t] for t in r["anchors"]], color="tab:orange", zorder=3,
                   label="anchor (top FAI)")
        a2.set_ylabel("FAI, global heads")
        a2.set_xticks(xs)
        a2.set_xticklabels([p.replace("\n", "\\n") for p in r["pieces"]], rotation=90, fontsize=6)
        a2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(args: argparse.Namespace) -> int:
    import torch

    from ..bench.common import Report, new_run_dir
    from ..sweep import Executor, run_sweep

    if args.threads:
        torch.set_num_threads(args.threads)
    models = [m.strip() for m in args.model.split(",") if m.strip()]
    RH.Rhythm(args.window, args.head_frac, args.top)  # checks the knobs before anything runs
    if args.n < 1:
        raise SystemExit(f"--n must be >= 1, got {args.n}")
    run_dir = Path(args.resume) if args.resume else new_run_dir("rhythm", args.out_root)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfgs = [RhythmConfig(m, i, args.n, args.steps, args.max_new, args.window, args.head_frac, args.top, args.seed)
            for m in models for i in range(args.n)]
    (run_dir / "config.json").write_text(json.dumps([asdict(c) for c in cfgs[:1]] + [{"models": models}], indent=1))
    t0 = time.perf_counter()
    records = run_sweep(run_one, cfgs, key=lambda c: c.key, path=run_dir / "results.jsonl",
                        executor=Executor.from_args(args, threads=args.threads), description="rhythm prompts",
                        label=lambda r: f"{r.get('model')} prompt {r.get('index')}")
    for r in records:
        if "error" in r:
            print(f"error in {r.get('key')}: {r['error']}")
    rows = summarize(records)
    meta = {"models": models, "n": args.n, "steps": args.steps, "max_new": args.max_new, "window": args.window,
            "head_frac": args.head_frac, "top": args.top, "seed": args.seed, "seconds": round(time.perf_counter() - t0, 1),
            "conventions": "waad-clip, fai-all-future, heads-per-sequence, top-fraction, coupling (t or t+1 an anchor; "
                           "chance: anchors uniform among eligible tokens; p: 2000 within-prompt permutations)"}
    rep = Report("rhythm", COLUMNS, meta=meta)
    for row in rows:
        rep.add(**row)
    rep.plots.append(lambda rp, d: plot_traces(records, d / "traces.png"))
    rep.write(run_dir)
    rep.print("attnlab bench rhythm (preplan tokens coupled with anchors vs chance)")
    print(f"wrote {run_dir} ({time.perf_counter() - t0:.0f} s)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from ..sweep import add_executor_args

    p = sub.add_parser("rhythm", help="preplan-and-anchor rhythm: WAAD / FAI on multi-step arithmetic [I26]")
    p.add_argument("--model", default="smollm2", help="models, comma-separated (smollm2, gemma3, a folder)")
    p.add_argument("--n", type=int, default=6, help="prompts per model")
    p.add_argument("--steps", type=int, default=4, help="arithmetic steps per prompt")
    p.add_argument("--max-new", type=int, default=80, help="greedy answer tokens at most")
    p.add_argument("--window", type=int, default=10, help="WAAD's distance clip W")
    p.add_argument("--head-frac", type=float, default=0.25, help="fraction of heads in each class (local / global)")
    p.add_argument("--top", type=float, default=0.15, help="fraction of response tokens marked preplan / anchor")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest on shared cores)")
    p.add_argument("--out-root", default="runs")
    p.add_argument("--resume", default=None, help="an earlier run folder: run only the missing prompts")
    add_executor_args(p)
    p.set_defaults(func=run)


__all__ = ["COLUMNS", "RhythmConfig", "plot_traces", "register", "run", "run_one", "summarize"]
