"""``attnlab circuit TASK --model M``: find a task's heads, trace their paths, knock them out.

Tasks (prompts from :mod:`.causal_report`, built offline with the model's tokenizer; every answer is one token):

* ``induction``: ``[BOS] x x`` vs the *first-copy corruption* ``[BOS] y x`` (``n`` prompts of ``--length``
  random tokens per copy, seeds ``seed .. seed + n - 1``); re-drawing the first copy changes the keys the
  previous-token heads write, so both halves of the induction circuit carry an effect.
* ``ioi`` (IOI-lite, ABC corruption), ``colors`` (A21, query-swap corruption), ``factual`` (A239, facts stated
  in context, subject-swap corruption; plus the promote / suppress analysis below).

Stages (each runs per prompt through :func:`attnlab.sweep.run_sweep`, so ``--resume DIR`` skips finished
prompts):

1. **screen**: activation patching of every head's ``z`` and DLA on the clean run (``causal_report.task_dla``)
   on the first ``--screen-n`` prompts. Direction: *noising* (``causal.activation_patching`` with the clean and
   corrupted prompts swapped: the clean run gets one head's corrupted ``z``), because a circuit's heads are the
   ones it needs: denoising one head of a serial circuit restores nothing while its partner is still corrupted
   (the induction head copies the corrupted value even when the previous-token head's keys are restored).
   Effect per head: ``(mean clean - mean patched) / (mean clean - mean corrupt)``, the share of the
   clean - corrupted gap that corrupting this head alone causes (means over prompts).
   The circuit: the ``--top`` heads with the largest ``|effect|`` that reach ``--min-effect``.
2. **paths**: Wang et al.'s path patching (``causal.path_patching``, noising like stage 1: the sender's
   corrupted ``z`` reaches only the receiver's input in the clean run, every other head frozen at clean) for
   every ordered pair of circuit heads in different layers, via the receiver's ``q``, ``k`` and ``v``
   separately, on the first ``--path-n`` prompts; normalized like stage 1. An edge says *how* the heads compose (induction: previous-token -> induction via k).
3. **knockout**: on all ``n`` prompts, the metric with the circuit heads' ``z`` zeroed (all together, and each
   alone), and with ``len(circuit)`` random non-circuit heads zeroed (a control, seeded); the drop
   ``m_clean - m_knocked`` per prompt with a percentile bootstrap CI of its mean
   (``frontier.report.bootstrap_ci``), and as a fraction of the clean - corrupted gap (mean drop / mean gap).

Promote / suppress (``factual``; A239's two roles, read by DLA on the clean run at the last position):
``promote = DLA(mean of the correct, not yet said cities) - DLA(mean of the other subject's cities)`` and
``suppress = DLA(the city already said) - DLA(mean of the other subject's cities)``; a head *promotes* when
``promote >= tau`` and *suppresses* when ``suppress <= -tau``, ``tau = --tau x`` the largest ``|score|`` over
heads (a relative threshold, named here because the paper reads the roles off its figures).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..models import hf

CIRCUIT_TASKS = ("induction", "ioi", "colors", "factual")
VIAS = ("q", "k", "v")


# ---------------------------------------------------------------------------------------------------------
# prompts and per-prompt stages (pure: a model in, JSON-able numbers out)
# ---------------------------------------------------------------------------------------------------------
def circuit_prompts(model: nn.Module, tok, task: str, n: int, *, seed: int = 0, length: int = 12) -> list:
    """The ``n`` :class:`~.causal_report.CausalTask` pairs of ``task`` (module docstring)."""
    from .causal_report import colors_task, factual_task, induction_task, ioi_task

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if task == "induction":
        return [induction_task(model, tok, length, seed=seed + i, corrupt="first") for i in range(n)]
    builders = {"ioi": ioi_task, "colors": colors_task, "factual": factual_task}
    if task not in builders:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(CIRCUIT_TASKS)}")
    return builders[task](model, tok, n, seed=seed)


def screen_prompt(model: nn.Module, t, *, batch: int = 16, dla_rows: int | None = 5) -> dict[str, Any]:
    """Stage 1 on one prompt pair: raw patched metric per head ``(L, H)``, clean / corrupted metric, DLA
    ``(L, H)``; for tasks with ``sets`` (factual) also the per-head DLA of each set's tokens."""
    from .causal import activation_patching
    from .causal_report import task_dla

    # noising: the arguments swapped, so each patched run is the clean prompt with one head's corrupted z
    res = activation_patching(model, t.corrupt, t.clean, t.metric(), points=("z",), batch=batch)
    out = {"patched": res.patched["z"].tolist(), "clean": res.corrupt_metric, "corrupt": res.clean_metric,
           "dla": task_dla(model, t, dla_rows).tolist()}
    if t.sets:
        out["sets"] = {name: [set_dla(model, t.clean, tok_id).tolist() for tok_id in ids]
                       for name, ids in t.sets.items()}
    return out


def set_dla(model: nn.Module, ids: Tensor, token: int, position: int = -1) -> Tensor:
    """Per-head DLA ``(L, H)`` of one token's logit (no baseline) at ``position``."""
    from .causal import direct_logit_attribution

    return direct_logit_attribution(model, ids, int(token), position=position).heads


def paths_prompt(model: nn.Module, t, heads: list[tuple[int, int]]) -> dict[str, Any]:
    """Stage 2 on one prompt pair: the path-patched metric for every ordered pair of ``heads`` in different
    layers, via each of q, k, v."""
    from .causal import path_patching

    edges, clean, corrupt = [], None, None
    for s in heads:
        for r in heads:
            if r[0] <= s[0]:
                continue
            for via in VIAS:
                # noising: the senders' corrupted z reach the receiver in the clean run
                res = path_patching(model, t.corrupt, t.clean, t.metric(), [s], [r], via=via)
                clean, corrupt = res.corrupt_metric, res.clean_metric
                edges.append({"sender": list(s), "receiver": list(r), "via": via, "metric": res.metric})
    return {"edges": edges, "clean": clean, "corrupt": corrupt}


def zeroed_metrics(model: nn.Module, t, head_sets: list[list[tuple[int, int]]]) -> list[float]:
    """The metric on ``t.clean`` with each set of heads' ``z`` zeroed (copy ``b`` of one batch zeroes set
    ``b``; an empty set is the plain clean run)."""
    B = len(head_sets)
    per_layer: dict[int, list[tuple[int, int]]] = {}
    for b, hs in enumerate(head_sets):
        for layer, h in hs:
            per_layer.setdefault(int(layer), []).append((b, int(h)))

    def zero(z, ctx):  # z (B, H, T, Dv)
        z = z.clone()
        for b, h in per_layer[ctx.layer]:
            z[b, h] = 0
        return z

    ids = t.clean.expand(B, -1)
    metric = t.metric()
    with torch.no_grad(), hf.hooks(model, {f"blocks.{layer}.attn.z": zero for layer in per_layer}):
        logits = model(input_ids=ids, use_cache=False).logits
    return [float(metric(logits[b : b + 1])) for b in range(B)]


def knock_prompt(model: nn.Module, t, heads: list[tuple[int, int]], control: list[tuple[int, int]]) -> dict:
    """Stage 3 on one prompt pair: clean and corrupted metric, all ``heads`` zeroed, each alone, ``control``."""
    vals = zeroed_metrics(model, t, [[], heads, control] + [[h] for h in heads])
    with torch.no_grad():
        corrupt = float(t.metric()(model(input_ids=t.corrupt, use_cache=False).logits))
    return {"clean": vals[0], "corrupt": corrupt, "all": vals[1], "control": vals[2], "each": vals[3:]}


def promote_suppress(correct: Tensor, said: Tensor, distractors: Tensor, tau: float = 0.25) -> dict[str, Any]:
    """A239's promote / suppress roles from per-head DLA.

    Args:
        correct: ``(..., L, H)`` DLA of each correct (not yet said) answer, stacked on the leading axes.
        said: ``(..., L, H)`` DLA of the previously said answer(s); distractors: ``(..., L, H)`` other answers.
        tau: relative threshold (times the largest ``|score|`` over heads).
    Returns ``promote``, ``suppress`` ``(L, H)`` and ``labels`` ``[[str]]``: "promote", "suppress", "both", "".
    """
    if not 0 < tau < 1:
        raise ValueError(f"tau must be in (0, 1), got {tau}")
    for name, x in (("correct", correct), ("said", said), ("distractors", distractors)):
        if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[-2:] != correct.shape[-2:]:
            raise ValueError(f"{name} must be a tensor (..., layers, heads) like correct, got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    L, H = correct.shape[-2:]

    def mean(x: Tensor) -> Tensor:
        return x.double().reshape(-1, L, H).mean(0)

    ref = mean(distractors)
    promote, suppress = mean(correct) - ref, mean(said) - ref
    scale = float(torch.cat([promote.abs().flatten(), suppress.abs().flatten()]).max())
    thr = tau * scale
    labels = []
    for i in range(L):
        row = []
        for h in range(H):
            p, s = scale > 0 and float(promote[i, h]) >= thr, scale > 0 and float(suppress[i, h]) <= -thr
            row.append("both" if p and s else "promote" if p else "suppress" if s else "")
        labels.append(row)
    return {"promote": promote, "suppress": suppress, "labels": labels, "threshold": thr}


# ---------------------------------------------------------------------------------------------------------
# the sweep function (one stage on one prompt; models loaded once per process)
# ---------------------------------------------------------------------------------------------------------
def _load(name: str):
    from ..models import hf as _hf

    return _hf.shared_model(name)  # a worker loads each model once


def circuit_job(cfg: dict[str, Any]) -> dict[str, Any]:
    """One ``stage`` (screen, paths, knock) on prompt ``index`` of the task described by ``cfg``."""
    torch.set_num_threads(int(cfg.get("threads") or 1))
    model, tok = _load(cfg["model"])
    t = circuit_prompts(model, tok, cfg["task"], cfg["n"], seed=cfg["seed"], length=cfg["length"])[cfg["index"]]
    t0 = time.perf_counter()
    if cfg["stage"] == "screen":
        row = screen_prompt(model, t, batch=cfg["batch"], dla_rows=cfg["dla_rows"])
    elif cfg["stage"] == "paths":
        row = paths_prompt(model, t, [tuple(h) for h in cfg["heads"]])
    elif cfg["stage"] == "knock":
        row = knock_prompt(model, t, [tuple(h) for h in cfg["heads"]], [tuple(h) for h in cfg["control"]])
    else:
        raise ValueError(f"unknown stage {cfg['stage']!r}")
    return {**row, "stage": cfg["stage"], "index": cfg["index"], "seconds": time.perf_counter() - t0}


def _key(cfg: dict[str, Any]) -> str:
    heads = ";".join(f"{a}.{b}" for a, b in cfg.get("heads", []))
    return f"{cfg['stage']}/{cfg['index']}/{heads}"


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def _ci(xs: list[float]) -> list[float]:
    from ..frontier.report import bootstrap_ci

    return list(bootstrap_ci(xs))


def run_circuit(model_name: str, task: str, *, n: int = 8, top: int = 5, min_effect: float = 0.1,
                screen_n: int = 4, path_n: int = 2, seed: int = 0, length: int = 12, batch: int = 16,
                dla_rows: int | None = 5, tau: float = 0.25, lens_steps: int = 0, run_dir: Path, executor=None,
                show_progress: bool = True) -> dict[str, Any]:
    """The three stages for ``model_name`` (a name ``hf.load_model`` accepts) on ``task``; rows go to
    ``run_dir/results.jsonl`` (finished prompts are skipped on rerun). ``lens_steps > 0`` also trains an
    Attention Lens (:mod:`.lens`) on each circuit head, read at the last position of the first clean prompt.
    Returns the summary dict."""
    from ..sweep import run_sweep

    if task not in CIRCUIT_TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(CIRCUIT_TASKS)}")
    for name, v in (("n", n), ("top", top), ("screen_n", screen_n), ("path_n", path_n)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    t0 = time.perf_counter()
    model, tok = _load(model_name)
    prompts = circuit_prompts(model, tok, task, n, seed=seed, length=length)  # fails early on a bad tokenizer
    g = hf.geometry(model)
    L, H = g.num_layers, g.num_heads
    base = {"model": model_name, "task": task, "n": n, "seed": seed, "length": length, "batch": batch,
            "dla_rows": dla_rows}
    path = run_dir / "results.jsonl"

    def sweep(stage, idx, **extra):
        cfgs = [{**base, "stage": stage, "index": i, **extra} for i in idx]
        return run_sweep(circuit_job, cfgs, key=_key, path=path, executor=executor, description=stage,
                         show_progress=show_progress)

    rows = sweep("screen", range(min(screen_n, n)))
    bad = [r for r in rows if "error" in r]
    if bad:
        raise RuntimeError(f"screen failed: {bad[0]['error']}")
    patched = torch.tensor([r["patched"] for r in rows], dtype=torch.float64).mean(0)
    m_clean, m_bad = _mean(r["clean"] for r in rows), _mean(r["corrupt"] for r in rows)
    if m_clean == m_bad:
        raise ValueError(f"the mean metric is the same on clean and corrupted prompts ({m_clean})")
    effect = (m_clean - patched) / (m_clean - m_bad)
    dla = torch.tensor([r["dla"] for r in rows], dtype=torch.float64).mean(0)
    order = effect.abs().flatten().argsort(descending=True)[:top].tolist()
    heads = [divmod(i, H) for i in order if float(effect.flatten()[i].abs()) >= min_effect]

    edges = []
    if any(r[0] > s[0] for s in heads for r in heads):
        prow = sweep("paths", range(min(path_n, n)), heads=[list(h) for h in heads])
        prow = [r for r in prow if "error" not in r]
        if prow:
            pc, pb = _mean(r["clean"] for r in prow), _mean(r["corrupt"] for r in prow)
            for j, e in enumerate(prow[0]["edges"]):
                m = _mean(r["edges"][j]["metric"] for r in prow)
                edges.append({**{k: e[k] for k in ("sender", "receiver", "via")}, "effect": (pc - m) / (pc - pb)})
            edges.sort(key=lambda e: -abs(e["effect"]))

    knock: dict[str, Any] = {}
    if heads:
        rest = [(i, h) for i in range(L) for h in range(H) if (i, h) not in heads]
        control = sorted(random.Random(seed).sample(rest, min(len(heads), len(rest))))
        krows = sweep("knock", range(n), heads=[list(h) for h in heads], control=[list(h) for h in control])
        krows = [r for r in krows if "error" not in r]
        gap = _mean(r["clean"] - r["corrupt"] for r in krows)

        def summary(vals: list[float]) -> dict[str, Any]:
            drops = [r["clean"] - v for r, v in zip(krows, vals, strict=True)]
            d = _mean(drops)
            return {"drop": d, "ci": _ci(drops), "fraction": d / gap if gap else None}

        knock = {"prompts": len(krows), "clean": _mean(r["clean"] for r in krows),
                 "corrupt": _mean(r["corrupt"] for r in krows),
                 "circuit": summary([r["all"] for r in krows]), "control_heads": [list(h) for h in control],
                 "control": summary([r["control"] for r in krows]),
                 "each": [{"head": list(h), **summary([r["each"][j] for r in krows])} for j, h in enumerate(heads)]}

    out: dict[str, Any] = {
        "model": model_name, "task": task, "num_layers": L, "num_heads": H, "n": n, "screen_n": min(screen_n, n),
        "path_n": min(path_n, n), "seed": seed, "clean_metric": m_clean, "corrupt_metric": m_bad,
        "example": {"clean": prompts[0].text.get("clean"), "corrupt": prompts[0].text.get("corrupt")},
        "patch_z": effect.tolist(), "dla": dla.tolist(), "heads": [list(h) for h in heads],
        "head_effects": [float(effect[h]) for h in heads], "edges": edges, "knockout": knock,
    }
    if task == "factual":
        sets = {k: torch.tensor([r["sets"][k] for r in rows], dtype=torch.float64) for k in rows[0]["sets"]}
        ps = promote_suppress(sets["correct"], sets["said"], sets["distractors"], tau)
        out["promote"], out["suppress"] = ps["promote"].tolist(), ps["suppress"].tolist()
        out["roles"] = {"threshold": ps["threshold"],
                        "promote": [[i, h] for i in range(L) for h in range(H) if ps["labels"][i][h] in
                                    ("promote", "both")],
                        "suppress": [[i, h] for i in range(L) for h in range(H) if ps["labels"][i][h] in
                                     ("suppress", "both")]}
    if lens_steps > 0 and heads:
        from .lens import LensConfig, attention_lens_report

        out["lens"] = attention_lens_report(model, tok, heads, cfg=LensConfig(steps=lens_steps, lr=1e-3, batch=32),
                                            probe=prompts[0].clean, seed=seed)
    out["seconds"] = time.perf_counter() - t0
    return out


# ---------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------
def _clean(x):
    if isinstance(x, float):
        return None if not math.isfinite(x) else round(x, 6)
    if isinstance(x, list):
        return [_clean(v) for v in x]
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    return x


def _h(h) -> str:
    return f"L{h[0]}.H{h[1]}"


def _ci_txt(s: dict) -> str:
    frac = "-" if s.get("fraction") is None else f"{s['fraction']:.2f}"
    return f"{s['drop']:.3f} [{s['ci'][0]:.3f}, {s['ci'][1]:.3f}] | {frac}"


def write_circuit_report(d: dict[str, Any], out: Path, *, pngs: bool = True) -> dict[str, Path]:
    """``circuit.json``, ``circuit.md`` and (``pngs``) ``patch_z.png``, ``dla.png`` (factual: ``promote.png``,
    ``suppress.png``) under ``out``."""
    from .causal_report import _heatmap

    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "circuit.json", "md": out / "circuit.md"}
    paths["json"].write_text(json.dumps(_clean(d), indent=1))
    images = {}
    if pngs:
        images = {"patch_z": ("noising patching of z (share of the gap)", d["patch_z"]),
                  "dla": ("direct logit attribution (clean run)", d["dla"])}
        if "promote" in d:
            images |= {"promote": ("promote: DLA correct - distractors", d["promote"]),
                       "suppress": ("suppress: DLA said - distractors", d["suppress"])}
        for key, (title, M) in images.items():
            paths[key] = out / f"{key}.png"
            _heatmap(paths[key], torch.tensor(M, dtype=torch.float64), f"{d['model']} / {d['task']}: {title}", True)
    lines = [f"# Circuit: {d['model']}, task {d['task']}", "",
             f"Prompts: {d['n']} (screen on {d['screen_n']}, paths on {d['path_n']}); metric clean "
             f"{d['clean_metric']:.4g}, corrupted {d['corrupt_metric']:.4g}; {d['seconds']:.1f} s.", "",
             f"Clean: `{d['example']['clean']}`  ", f"Corrupted: `{d['example']['corrupt']}`", "",
             "| head | patch effect | DLA |", "|---|---|---|"]
    for h, e in zip(d["heads"], d["head_effects"], strict=True):
        lines.append(f"| {_h(h)} | {e:.3f} | {d['dla'][h[0]][h[1]]:.3f} |")
    if d["edges"]:
        lines += ["", "Path patching (sender -> receiver via q/k/v, normalized effect):", "",
                  "| sender | receiver | via | effect |", "|---|---|---|---|"]
        lines += [f"| {_h(e['sender'])} | {_h(e['receiver'])} | {e['via']} | {e['effect']:.3f} |"
                  for e in d["edges"][:15]]
    k = d["knockout"]
    if k:
        lines += ["", f"Knockout (z zeroed) on {k['prompts']} prompts: drop = clean - knocked metric, mean "
                  "[95% bootstrap CI] | fraction of the clean - corrupted gap", "",
                  "| zeroed | drop [CI] | fraction |", "|---|---|---|",
                  f"| circuit ({len(d['heads'])} heads) | {_ci_txt(k['circuit'])} |",
                  f"| control ({', '.join(_h(h) for h in k['control_heads'])}) | {_ci_txt(k['control'])} |"]
        lines += [f"| {_h(e['head'])} alone | {_ci_txt(e)} |" for e in k["each"]]
    if "roles" in d:
        r = d["roles"]
        lines += ["", f"Promote / suppress (threshold {r['threshold']:.3f}): promote "
                  f"{', '.join(_h(h) for h in r['promote']) or '-'}; suppress "
                  f"{', '.join(_h(h) for h in r['suppress']) or '-'}"]
    if d.get("lens"):
        lines += ["", "Attention Lens per circuit head (held-out KL to the model's next-token distribution, nats; top "
                  "tokens at the last position of the first clean prompt):", "",
                  "| head | KL per-head logit lens | KL constant | KL trained lens | lens top tokens |",
                  "|---|---|---|---|---|"]
        lines += [f"| L{r['layer']}.H{r['head']} | {r['kl_logit_lens']:.2f} | {r['kl_constant']:.2f} | "
                  f"{r['kl_lens']:.2f} | {', '.join(repr(t) for t in r['top_tokens'])} |" for r in d["lens"]]
    lines.append("")
    lines += [f"![{key}]({key}.png)" for key in images]
    paths["md"].write_text("\n".join(lines) + "\n")
    return paths


def print_circuit(d: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{d['model']} / {d['task']}: circuit (clean {d['clean_metric']:.3g}, corrupted "
                    f"{d['corrupt_metric']:.3g})")
    for col in ("head", "patch z", "DLA", "drop alone [CI]"):
        t.add_column(col, justify="left" if col == "head" else "right")
    each = {tuple(e["head"]): e for e in d["knockout"].get("each", [])}
    for h, e in zip(d["heads"], d["head_effects"], strict=True):
        k = each.get(tuple(h))
        t.add_row(_h(h), f"{e:.3f}", f"{d['dla'][h[0]][h[1]]:.3f}",
                  "-" if k is None else f"{k['drop']:.3f} [{k['ci'][0]:.3f}, {k['ci'][1]:.3f}]")
    Console().print(t)
    k = d["knockout"]
    if k:
        print(f"circuit zeroed: drop {_ci_txt(k['circuit'])} (fraction of gap); control: {_ci_txt(k['control'])}")


# ---------------------------------------------------------------------------------------------------------
# command
# ---------------------------------------------------------------------------------------------------------
def register(sub) -> None:
    from ..sweep import add_executor_args

    p = sub.add_parser(
        "circuit", help="find a task's heads (patching), their paths (path patching) and knock them out",
        description="Build clean / corrupted prompts offline (induction, ioi, colors, factual), find the heads by "
        "activation patching of z, trace paths between them by path patching via q/k/v, zero them and report the "
        "metric's drop with a bootstrap CI; JSON + Markdown + PNG under runs/circuit-*/.")
    p.add_argument("task", choices=CIRCUIT_TASKS)
    p.add_argument("--model", default="smollm2", help="smollm2, gemma3, a local HF folder or a .gguf file")
    p.add_argument("--n", type=int, default=8, help="prompt pairs (knockout runs on all of them)")
    p.add_argument("--top", type=int, default=5, help="at most this many circuit heads")
    p.add_argument("--min-effect", type=float, default=0.1, help="a circuit head's |patching effect| at least")
    p.add_argument("--screen-n", type=int, default=4, help="prompts for the activation-patching screen")
    p.add_argument("--path-n", type=int, default=2, help="prompts for path patching")
    p.add_argument("--length", type=int, default=12, help="induction: random tokens per copy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=16, help="patched runs per forward pass")
    p.add_argument("--dla-rows", type=int, default=5, help="DLA on at most this many metric rows per prompt")
    p.add_argument("--tau", type=float, default=0.25, help="factual: promote/suppress threshold (x max |score|)")
    p.add_argument("--lens-steps", type=int, default=0,
                   help="train an Attention Lens on each circuit head for this many steps (0: none)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--out", default="runs", help="root folder: the report goes to <out>/circuit-<stamp>/")
    p.add_argument("--resume", default=None, help="a circuit-* folder to continue (finished prompts are skipped)")
    p.add_argument("--no-png", action="store_true", help="skip the matplotlib PNGs")
    add_executor_args(p)
    p.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    from ..bench.common import new_run_dir
    from ..sweep import Executor

    torch.set_num_threads(args.threads)
    try:
        _load(args.model)
    except hf.ModelLoadError as e:
        print(f"error: {e}")
        return 2
    run_dir = Path(args.resume) if args.resume else new_run_dir("circuit", args.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        d = run_circuit(args.model, args.task, n=args.n, top=args.top, min_effect=args.min_effect,
                        screen_n=args.screen_n, path_n=args.path_n, seed=args.seed, length=args.length,
                        batch=args.batch, dla_rows=args.dla_rows, tau=args.tau, lens_steps=args.lens_steps,
                        run_dir=run_dir,
                        executor=Executor.from_args(args, threads=args.threads))
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}")
        return 2
    d["model"] = Path(args.model).name
    paths = write_circuit_report(d, run_dir, pngs=not args.no_png)
    print_circuit(d)
    print(f"report: {paths['md']}\njson:   {paths['json']}  ({d['seconds']:.1f} s)")
    return 0


__all__ = ["CIRCUIT_TASKS", "circuit_job", "circuit_prompts", "knock_prompt", "paths_prompt", "promote_suppress",
           "register", "run_circuit", "screen_prompt", "write_circuit_report", "zeroed_metrics"]
