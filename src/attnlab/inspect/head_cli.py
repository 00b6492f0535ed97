"""``attnlab inspect heads``: RoPE frequency usage (A248), sink reference frames (A130), local-keys long-context
heads (A141), AttnRank (A170), Sparse Attention Decomposition (A168) and temporal heads (A206) on real models.

Each (model, analysis) pair is one configuration of :func:`attnlab.sweep.run_sweep`: its result is appended to
``results.jsonl`` in the run folder as it finishes, and ``--resume DIR`` skips what is done. The command
writes ``results.json`` / ``results.md`` (one summary row per pair), ``details.md`` (per-layer tables) and
PNGs, and prints the summary table.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

ANALYSES = ("rope", "frames", "long", "attnrank", "sad", "temporal", "lookback")


@dataclass(frozen=True)
class HeadsConfig:
    """One (model, analysis) pair and every knob the analyses read."""

    model: str
    analysis: str
    tokens: int = 128
    long_tokens: int = 512
    window: int = 32
    sinks: int = 4
    k: int = 8
    n: int = 8
    n_calib: int = 8
    sad_head: str | None = None
    alias: bool = False
    seed: int = 0
    lookback_n: int = 16
    lookback_length: int = 256

    @property
    def key(self) -> str:
        return f"{self.model}/{self.analysis}"


def _load(name: str):
    from ..models import hf as _hf

    return _hf.shared_model(name)  # a worker loads each model once


def _filler_ids(tok, tokens: int, seed: int) -> torch.Tensor:
    """Natural filler text (the probes' filler sentences, rotated by ``seed``) truncated by the tokenizer to
    ``tokens`` tokens, so the special tokens it adds ([CLS] ... [SEP], BOS) stay in place."""
    from .probes import FILLER, text_probe

    n = len(FILLER)
    text = " ".join(FILLER[(seed + i) % n] for i in range(max(n, tokens // 8 + 1)))
    return text_probe(tok, text=text, max_tokens=tokens).input_ids


def _repeat_len(tok, want: int = 30) -> int:
    """Random tokens per copy of the induction probe: ``want``, or fewer for a tiny vocabulary (the probe draws
    distinct ordinary ids from the top 90% of the vocabulary)."""
    V = len(tok)
    avail = V - min(1000, V // 10) - len(set(tok.all_special_ids))
    if avail < 2:
        raise ValueError(f"the tokenizer has {V} tokens: too few for an induction probe")
    return min(want, avail)


def _induction_head(model, tok, seed: int) -> tuple[int, int]:
    """The head with the largest mean weight on the induction target (repeated random tokens)."""
    from ..models import hf
    from .probes import induction_probe

    p = induction_probe(tok, n=_repeat_len(tok), seed=seed)
    ids = p.input_ids
    T, n = ids.shape[1], p.info["repeat_len"]
    _, cache = hf.run_with_cache(model, ids, ["blocks.*.attn.weights"], rows=(T - n + 1, T))
    rows = torch.arange(T - n + 1, T)
    best, where = -1.0, (0, 0)
    for name, w in cache.items():
        layer = int(name.split(".")[1])
        s = w[0][:, torch.arange(len(rows)), rows - n + 1].mean(-1)  # (H,)
        h = int(s.argmax())
        if float(s[h]) > best:
            best, where = float(s[h]), (layer, h)
    return where


def run_analysis(cfg: HeadsConfig) -> dict[str, Any]:
    """One (model, analysis): ``{"model", "analysis", "headline", "value", "seconds", "detail"}``."""
    torch.manual_seed(cfg.seed)
    model, tok = _load(cfg.model)
    t0 = time.perf_counter()
    a = cfg.analysis
    if a == "rope":
        from .rope_usage import rope_usage

        u = rope_usage(model, _filler_ids(tok, cfg.tokens, cfg.seed))
        detail = {k: v for k, v in u.to_dict().items() if k in ("T", "per_layer", "low_share", "high_dim_corr")}
        headline, value = "mean low-frequency share", float(u.low_share.mean())
    elif a == "frames":
        from .sink_frame import sink_frames

        fr = sink_frames(model, _filler_ids(tok, cfg.tokens, cfg.seed))
        detail = {k: v for k, v in fr.to_dict().items() if k in ("counts", "model_type", "anchor_positions",
                                                                  "per_layer", "types")}
        headline, value = f"model frame type: {fr.model_type()}", fr.counts()[fr.model_type()]
    elif a == "long":
        from .long_context import LongContextConfig, long_context_heads

        res = long_context_heads(model, _filler_ids(tok, cfg.long_tokens, cfg.seed),
                                 LongContextConfig(sinks=cfg.sinks, window=cfg.window))
        detail = {k: v for k, v in res.to_dict().items() if k in ("summary", "per_layer", "top", "queries", "cfg")}
        headline, value = "label agreement (estimate vs oracle)", res.summary()["agreement"]
    elif a == "attnrank":
        from .attnrank import attnrank_eval

        r = attnrank_eval(model, tok, k=cfg.k, n_eval=cfg.n, n_calib=cfg.n_calib, seed=cfg.seed)
        detail = {"k": r.k, "profile": r.profile, "basin": r.basin, "table": r.table()}
        t = {row["arrangement"]: row for row in r.table()}
        headline, value = "attnrank - retrieval logp", t["attnrank"]["d_logp_vs_retrieval"]
    elif a == "sad":
        from ..models import hf
        from ..models.hf import geometry
        from .probes import induction_probe
        from .sad import sparse_attention_decomposition

        layer, head = tuple(map(int, cfg.sad_head.split("."))) if cfg.sad_head else _induction_head(model, tok, cfg.seed)
        p = induction_probe(tok, n=_repeat_len(tok), seed=cfg.seed)
        T, n = p.input_ids.shape[1], p.info["repeat_len"]
        try:
            r = sparse_attention_decomposition(model, p.input_ids, layer, head, rows=slice(T - n + 1, T))
        except ValueError as e:
            return {"model": cfg.model, "analysis": a, "headline": f"skipped: {e}", "value": float("nan"),
                    "seconds": round(time.perf_counter() - t0, 2), "detail": {}}
        s = r.summary()
        s["induction_target_rows"] = float(((r.rows - r.keys) == n - 1).double().mean())
        # exactness on this model: the summed terms against the model's own scores (seam point)
        name = f"blocks.{layer}.attn.scores"
        _, sc = hf.run_with_cache(model, p.input_ids, [name], rows=(0, T))
        err = (r.scores - sc[name][0, head].double()[r.rows, r.keys]).abs()
        s["score_max_abs_err"] = float(err.max())
        s["score_mean_abs"] = float(r.scores.abs().mean())
        s["num_heads"] = geometry(model).num_heads
        detail = s
        headline, value = f"L{layer}H{head} median directions for 90% of |score|", s["n_sparse_median"]
    elif a == "temporal":
        from .temporal import temporal_heads

        r = temporal_heads(model, tok, n=cfg.n, seed=cfg.seed,
                           sets=("temporal", "control", "alias") if cfg.alias else ("temporal", "control"))
        detail = {k: v for k, v in r.to_dict().items() if k in ("n", "clean", "accuracy", "top")}
        top = r.top(1)[0]
        headline, value = f"top temporal head {top['head']}", top["score"]
    elif a == "lookback":
        from .lookback_lens import lookback_lens_eval

        r = lookback_lens_eval(model, tok, n_train=cfg.lookback_n, n_test=cfg.lookback_n,
                               length=cfg.lookback_length, seed=cfg.seed)
        detail = {k: v for k, v in r.to_dict().items() if k not in ("scores", "labels")}
        detail["top"] = [{"head": h, "weight": w} for h, w in r.top_heads]
        headline, value = (f"Lookback Lens AUROC (planted, test n {r.n_test}; untrained mean ratio "
                           f"{r.baseline_auroc if r.baseline_auroc is None else round(r.baseline_auroc, 3)})"), r.auroc
    else:
        raise ValueError(f"unknown analysis {a!r}; choose from {', '.join(ANALYSES)}")
    return {"model": cfg.model, "analysis": a, "headline": headline, "value": value,
            "seconds": round(time.perf_counter() - t0, 2), "detail": detail, "config": asdict(cfg)}


def register_heads(sub) -> None:
    """Add ``heads`` to the ``attnlab inspect`` subcommands."""
    from ..sweep import add_executor_args

    p = sub.add_parser(
        "heads", help="RoPE frequency usage, sink frames, long-context heads, AttnRank, SAD, temporal heads",
        description="Per-head analyses of issue #16 on real models: RoPE frequency usage (A248), sink reference "
        "frames (A130), long-context heads from local keys (A141), AttnRank reordering (A170), sparse attention "
        "decomposition (A168), temporal heads by ablation (A206) and the Lookback Lens detector's AUROC (A169). Writes JSON + Markdown + PNG under "
        "runs/heads-<stamp>/ (see docs/inspect.md).")
    p.add_argument("--model", default="smollm2", help="comma list: smollm2, gemma3, a local HF folder or .gguf")
    p.add_argument("--analyses", default="rope,frames,long", help=f"comma list of {', '.join(ANALYSES)}")
    p.add_argument("--tokens", type=int, default=128, help="probe length for rope / frames")
    p.add_argument("--long-tokens", type=int, default=512, help="probe length for long")
    p.add_argument("--window", type=int, default=32, help="long: local window (keys)")
    p.add_argument("--sinks", type=int, default=4, help="long: sink keys counted as local")
    p.add_argument("--k", type=int, default=8, help="attnrank: records per prompt")
    p.add_argument("--n", type=int, default=8, help="attnrank: evaluation prompts; temporal: prompts per set")
    p.add_argument("--n-calib", type=int, default=8, help="attnrank: calibration prompts")
    p.add_argument("--sad-head", default=None, help="sad: LAYER.HEAD (default: the strongest induction head)")
    p.add_argument("--alias", action="store_true", help="temporal: also the 'In the year ...' prompts")
    p.add_argument("--lookback-n", type=int, default=16, help="lookback: planted samples to train on and to test on")
    p.add_argument("--lookback-length", type=int, default=256, help="lookback: planted prompt length (tokens)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per configuration")
    p.add_argument("--out", default="runs", help="root folder: the run goes to <out>/heads-<stamp>/")
    p.add_argument("--resume", default=None, help="a run folder of this command: finish what it lacks")
    p.add_argument("--no-png", action="store_true", help="skip the PNGs")
    add_executor_args(p)
    p.set_defaults(func=run_heads)


def _plots(rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for r in rows:
        d, a, m = r.get("detail") or {}, r["analysis"], r["model"]
        if not d or "error" in r:
            continue
        fig, ax = plt.subplots(figsize=(7, 3.5))
        if a == "rope":
            pl = d["per_layer"]
            ax.plot([x["low_share"] for x in pl], label="low-frequency share (score)")
            ax.plot([x["slowest_quarter"] for x in pl], label="slowest quarter of pairs")
            ax.plot([x["fastest_quarter"] for x in pl], label="fastest quarter of pairs")
            ax.set_xlabel("layer")
        elif a == "frames":
            pl = d["per_layer"]
            bottom = [0] * len(pl)
            for t in ("none", "centralized", "distributed", "bidirectional"):
                v = [x[t] for x in pl]
                ax.bar(range(len(pl)), v, bottom=bottom, label=t)
                bottom = [b + x for b, x in zip(bottom, v, strict=True)]
            ax.set_xlabel("layer")
            ax.set_ylabel("heads")
        elif a == "long":
            pl = d["per_layer"]
            for k in ("est_long", "true_long", "agreement"):
                ax.plot([x[k] for x in pl], label=k)
            ax.set_xlabel("layer")
        elif a == "attnrank":
            slots = [x for x in d["table"] if x["arrangement"].startswith("slot")]
            ax.plot([x["logp"] for x in slots], marker="o", label="answer log-prob, relevant record in slot")
            ax2 = ax.twinx()
            ax2.plot(d["profile"], color="gray", ls="--", label="calibrated slot attention")
            ax.set_xlabel("slot")
            ax2.legend(fontsize=7, loc="lower right")
        elif a == "sad":
            ks = d.get("key_sources", [])
            ax.barh([s for s, _ in ks][::-1], [v for _, v in ks][::-1])
            ax.set_xlabel("mean contribution to the score via the key, top directions")
        elif a == "temporal":
            top = d["top"]
            ax.bar([t["head"] for t in top], [t["score"] for t in top])
            ax.set_ylabel("drop temporal - drop control")
        else:
            plt.close(fig)
            continue
        ax.set_title(f"{m}: {a}")
        if a not in ("sad", "temporal"):
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{Path(m).name}_{a}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _details_md(rows: list[dict]) -> str:
    from ..bench.common import _fmt

    lines = ["# attnlab inspect heads: details", ""]
    for r in rows:
        d = r.get("detail") or {}
        lines += [f"## {r['model']} / {r['analysis']}", "", f"{r.get('headline', r.get('error', ''))}", ""]
        table = d.get("per_layer") or d.get("table") or d.get("top")
        if table:
            cols = list(table[0])
            lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            lines += ["| " + " | ".join(_fmt(x.get(c, "")) for c in cols) + " |" for x in table]
            lines.append("")
        rest = {k: v for k, v in d.items() if k not in ("per_layer", "table", "top", "types", "low_share",
                                                         "high_dim_corr")}
        if rest:
            lines += [f"- {k}: {v}" for k, v in rest.items()] + [""]
    return "\n".join(lines)


def run_heads(args: argparse.Namespace) -> int:
    from ..bench.common import Report, new_run_dir
    from ..sweep import Executor, run_sweep

    torch.set_num_threads(args.threads)
    analyses = [a.strip() for a in args.analyses.split(",") if a.strip()]
    bad = [a for a in analyses if a not in ANALYSES]
    if bad or not analyses:
        print(f"error: --analyses {args.analyses!r}: choose from {', '.join(ANALYSES)}")
        return 2
    if args.sad_head is not None:
        parts = args.sad_head.split(".")
        if len(parts) != 2 or not all(x.isdigit() for x in parts):
            print(f"error: --sad-head {args.sad_head!r}: expected LAYER.HEAD, e.g. 18.6")
            return 2
    models = [m.strip() for m in args.model.split(",") if m.strip()]
    cfgs = [HeadsConfig(m, a, args.tokens, args.long_tokens, args.window, args.sinks, args.k, args.n, args.n_calib,
                        args.sad_head, args.alias, args.seed, args.lookback_n, args.lookback_length)
            for m in models for a in analyses]
    out = Path(args.resume) if args.resume else new_run_dir("heads", args.out)
    ex = Executor.from_args(args, threads=args.threads)
    t0 = time.perf_counter()
    rows = run_sweep(run_analysis, cfgs, key=lambda c: c.key, path=out / "results.jsonl", executor=ex,
                     label=lambda r: f"{r.get('model')} {r.get('analysis')}", description="head analyses",
                     error_fields=lambda c: {"model": c.model, "analysis": c.analysis})
    rep = Report("inspect-heads", ["model", "analysis", "headline", "value", "seconds"],
                 meta={"analyses": analyses, "models": models, "tokens": args.tokens,
                       "long_tokens": args.long_tokens, "seconds": round(time.perf_counter() - t0, 1)})
    for r in rows:
        rep.add(model=r.get("model"), analysis=r.get("analysis"),
                headline=r.get("headline", r.get("error", "")), value=r.get("value", float("nan")),
                seconds=r.get("seconds", float("nan")))
    rep.write(out)
    (out / "details.md").write_text(_details_md(rows))
    if not args.no_png:
        pngs = _plots(rows, out)
        with (out / "results.md").open("a") as f:
            f.write("\n" + "\n".join(f"![{p.stem}]({p.name})" for p in pngs) + "\n\nPer-layer tables: details.md\n")
    rep.print("attnlab inspect heads")
    print(f"report: {out / 'results.md'}  details: {out / 'details.md'}")
    return 1 if any("error" in r for r in rows) else 0


__all__ = ["ANALYSES", "HeadsConfig", "register_heads", "run_analysis", "run_heads"]
