"""``attnlab circuit TASK --model M``: find a task's heads, trace their paths, knock them out.

Tasks (prompts from :mod:`.causal_report`, built offline with the model's tokenizer; every answer is one token):

* ``induction``: ``[BOS] x x`` vs the *first-copy corruption* ``[BOS] y x`` (``n`` prompts of ``--length``
  random tokens per copy, seeds ``seed .. seed + n - 1``); re-drawing the first copy changes the keys the
  previous-token heads write, so both halves of the induction circuit carry an effect.
* ``ioi`` (IOI-lite, ABC corruption), ``colors`` (A21, query-swap corruption), ``factual`` (A239, facts stated
  in context, subject-swap corruption; plus the promote / suppress analysis below).

Stages (each runs per prompt through :func:`attnlab.sweep.run_sweep`, so ``--resume DIR`` skips finished
prompts):

1. **screen** (``--screen path|activation|both``, default ``path``) on the first ``--screen-n`` prompts, plus
   DLA on the clean run (``causal_report.task_dla``). Both screens run in the *noising* direction (the causal
   functions with the clean and corrupted prompts swapped: the clean run gets one head's corrupted ``z``):

   * ``path``: **iterated path patching** (Wang et al. 2022), ``--path-rounds`` rounds (default 3). Round 1:
     path patching to the logits (``causal.path_patching_logits``): the sender's corrupted ``z`` in the clean
     run with every other head's ``z`` frozen at its clean value, MLPs and norms recomputed; it finds the heads
     that act on the logits *directly* (or through MLPs only): the last heads of a circuit (induction heads,
     name movers). Round ``r > 1``: every head in a layer before the last receiver -> the heads *newly found in
     round r - 1* (all together), through their queries, keys and values separately
     (``causal.path_patching_senders``, one recording forward + one per route per batch of senders); it finds
     the heads that act through the earlier finds (previous-token heads via k, S-inhibition-like heads via q).
     Each round keeps at most ``--top`` new heads whose |effect| (on any route) reaches ``--min-effect``; a
     head is recorded once, with the round and the route (``logits``, ``q``, ``k``, ``v``) of its strongest
     effect. The rounds stop early when one finds nothing new (or only layer-0 heads).
   * ``activation``: activation patching of each head's ``z`` (``causal.activation_patching``): the total
     effect, through every downstream head, so it also finds the upstream heads of a serial circuit (noising,
     because denoising one head of a serial circuit restores nothing while its partner is still corrupted).
   * ``both``: both are computed and reported; the circuit is picked by ``path``.

   Each screen's rows (and the DLA rows) are stored apart, so ``--resume`` with another ``--screen`` reuses them.

   Effect per head: ``(mean clean - mean patched) / (mean clean - mean corrupt)``, the share of the
   clean - corrupted gap that corrupting this head alone (along the screen's paths) causes (means over prompts).
   The circuit: the ``--top`` heads with the largest ``|effect|`` that reach ``--min-effect`` (``path``: per
   round, all rounds' heads together).
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
SCREENS = ("path", "activation", "both")
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


def screen_prompt(model: nn.Module, t, *, screen: str = "path", batch: int = 16, dla_rows: int | None = 5,
                  extras: bool = True) -> dict[str, Any]:
    """Stage 1 on one prompt pair with one ``screen`` (``"path"`` or ``"activation"``): raw patched metric per
    head ``(L, H)`` and the clean / corrupted metric; with ``extras`` also DLA ``(L, H)`` and, for tasks with
    ``sets`` (factual), the per-head DLA of each set's tokens."""
    from .causal import activation_patching, path_patching_logits

    # noising: the arguments swapped, so each patched run is the clean prompt with one head's corrupted z
    if screen == "path":
        res = path_patching_logits(model, t.corrupt, t.clean, t.metric(), batch=batch)
    elif screen == "activation":
        res = activation_patching(model, t.corrupt, t.clean, t.metric(), points=("z",), batch=batch)
    else:
        raise ValueError(f"screen must be 'path' or 'activation' per prompt, got {screen!r}")
    out = {"patched": res.patched["z"].tolist(), "clean": res.corrupt_metric, "corrupt": res.clean_metric}
    return {**out, **dla_prompt(model, t, dla_rows=dla_rows)} if extras else out


def round_prompt(model: nn.Module, t, receivers: list[tuple[int, int]], *, batch: int = 16) -> dict[str, Any]:
    """A later round of the path screen on one prompt pair: the raw metric per earlier sender ``(layers before
    the last receiver, H)`` and route (q, k, v) of ``causal.path_patching_senders`` into ``receivers``, noising
    (the clean run with one sender's corrupted ``z``), plus the clean / corrupted metric."""
    from .causal import path_patching_senders

    res = path_patching_senders(model, t.corrupt, t.clean, t.metric(), receivers, VIAS, batch=batch)
    return {"patched": {v: res.patched[v].tolist() for v in VIAS}, "clean": res.corrupt_metric,
            "corrupt": res.clean_metric}


def dla_prompt(model: nn.Module, t, *, dla_rows: int | None = 5) -> dict[str, Any]:
    """DLA ``(L, H)`` on the clean prompt; for tasks with ``sets`` (factual) also the per-head DLA of each set's
    tokens."""
    from .causal_report import task_dla

    out = {"dla": task_dla(model, t, dla_rows).tolist()}
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
        row = screen_prompt(model, t, screen=cfg["screen"], batch=cfg["batch"], extras=False)
    elif cfg["stage"] == "round":
        row = round_prompt(model, t, [tuple(h) for h in cfg["heads"]], batch=cfg["batch"])
    elif cfg["stage"] == "dla":
        row = dla_prompt(model, t, dla_rows=cfg["dla_rows"])
    elif cfg["stage"] == "paths":
        row = paths_prompt(model, t, [tuple(h) for h in cfg["heads"]])
    elif cfg["stage"] == "knock":
        row = knock_prompt(model, t, [tuple(h) for h in cfg["heads"]], [tuple(h) for h in cfg["control"]])
    else:
        raise ValueError(f"unknown stage {cfg['stage']!r}")
    return {**row, "stage": cfg["stage"], "index": cfg["index"], "seconds": time.perf_counter() - t0}


def _key(cfg: dict[str, Any]) -> str:
    heads = ";".join(f"{a}.{b}" for a, b in cfg.get("heads", []))
    stage = f"screen-{cfg['screen']}" if cfg["stage"] == "screen" else cfg["stage"]
    return f"{stage}/{cfg['index']}/{heads}"


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def _ci(xs: list[float]) -> list[float]:
    from ..frontier.report import bootstrap_ci

    return list(bootstrap_ci(xs))


def run_circuit(model_name: str, task: str, *, screen: str = "path", n: int = 8, top: int = 5,
                min_effect: float = 0.1, path_rounds: int = 3, screen_n: int = 4, path_n: int = 2, seed: int = 0, length: int = 12,
                batch: int = 16, dla_rows: int | None = 5, tau: float = 0.25, lens_steps: int = 0, run_dir: Path,
                executor=None, show_progress: bool = True) -> dict[str, Any]:
    """The three stages for ``model_name`` (a name ``hf.load_model`` accepts) on ``task``, the heads picked by
    ``screen`` (:data:`SCREENS`; module docstring); rows go to
    ``run_dir/results.jsonl`` (finished prompts are skipped on rerun). ``lens_steps > 0`` also trains an
    Attention Lens (:mod:`.lens`) on each circuit head, read at the last position of the first clean prompt.
    Returns the summary dict."""
    from ..sweep import run_sweep

    if task not in CIRCUIT_TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(CIRCUIT_TASKS)}")
    if screen not in SCREENS:
        raise ValueError(f"screen must be one of {', '.join(SCREENS)}, got {screen!r}")
    for name, v in (("n", n), ("top", top), ("screen_n", screen_n), ("path_n", path_n),
                    ("path_rounds", path_rounds)):
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

    methods = ["path", "activation"] if screen == "both" else [screen]
    effects: dict[str, Tensor] = {}
    for j, method in enumerate(methods):
        mrows = sweep("screen", range(min(screen_n, n)), screen=method)
        bad = [r for r in mrows if "error" in r]
        if bad:
            raise RuntimeError(f"screen ({method}) failed: {bad[0]['error']}")
        patched = torch.tensor([r["patched"] for r in mrows], dtype=torch.float64).mean(0)
        mc, mb = _mean(r["clean"] for r in mrows), _mean(r["corrupt"] for r in mrows)
        if mc == mb:
            raise ValueError(f"the mean metric is the same on clean and corrupted prompts ({mc})")
        effects[method] = (mc - patched) / (mc - mb)
        if j == 0:
            m_clean, m_bad = mc, mb
    effect = effects[methods[0]]
    rows = sweep("dla", range(min(screen_n, n)))  # DLA (and factual's sets) on the clean prompts
    bad = [r for r in rows if "error" in r]
    if bad:
        raise RuntimeError(f"DLA failed: {bad[0]['error']}")
    dla = torch.tensor([r["dla"] for r in rows], dtype=torch.float64).mean(0)
    order = effect.abs().flatten().argsort(descending=True)[:top].tolist()
    heads = [divmod(i, H) for i in order if float(effect.flatten()[i].abs()) >= min_effect]
    first = "logits" if methods[0] == "path" else "activation"
    found = [{"head": list(h), "round": 1, "route": first, "effect": float(effect[h])} for h in heads]
    rounds: list[dict[str, Any]] = []
    frontier = [h for h in heads if h[0] > 0]
    for rnd in range(2, path_rounds + 1 if methods[0] == "path" else 0):
        if not frontier:
            break  # nothing new last round, or only layer-0 heads: no earlier sender
        rrows = sweep("round", range(min(screen_n, n)), heads=[list(h) for h in frontier])
        bad = [r for r in rrows if "error" in r]
        if bad:
            raise RuntimeError(f"path screen round {rnd} failed: {bad[0]['error']}")
        mc, mb = _mean(r["clean"] for r in rrows), _mean(r["corrupt"] for r in rrows)
        reff = {v: (mc - torch.tensor([r["patched"][v] for r in rrows], dtype=torch.float64).mean(0)) / (mc - mb)
                for v in VIAS}  # (layers before the last receiver, H) per route
        cand = sorted(((float(reff[v][i, h]), (i, h), v) for v in VIAS for i in range(reff[v].shape[0])
                       for h in range(H)), key=lambda c: -abs(c[0]))
        new: list[tuple[int, int]] = []
        known = {tuple(f["head"]) for f in found}
        for e, h, v in cand:
            if abs(e) < min_effect or len(new) >= top:
                break
            if h in known or h in new:
                continue  # a head is recorded once, through its strongest route
            new.append(h)
            found.append({"head": list(h), "round": rnd, "route": v, "effect": e,
                          "routes": {u: float(reff[u][h]) for u in VIAS}})
        rounds.append({"round": rnd, "receivers": [list(h) for h in frontier], "new": [list(h) for h in new],
                       "effects": {v: reff[v].tolist() for v in VIAS}})
        frontier = [h for h in new if h[0] > 0]
    heads = [tuple(f["head"]) for f in found]

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
        "model": model_name, "task": task, "screen": screen, "num_layers": L, "num_heads": H, "n": n,
        "screen_n": min(screen_n, n), "path_n": min(path_n, n), "seed": seed, "clean_metric": m_clean,
        "corrupt_metric": m_bad,
        "example": {"clean": prompts[0].text.get("clean"), "corrupt": prompts[0].text.get("corrupt")},
        "screens": {m: e.tolist() for m, e in effects.items()}, "dla": dla.tolist(),
        "heads": [list(h) for h in heads], "path_rounds": path_rounds, "found": found, "rounds": rounds,
        "head_effects": {m: [float(e[h]) for h in heads] for m, e in effects.items()},
        "min_effect": min_effect, "largest": [[*divmod(i, H), float(effect.flatten()[i])] for i in order],
        "edges": edges, "knockout": knock,
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


SCREEN_COLUMNS = {"path": "path to logits", "activation": "activation patching"}
SCREEN_TITLES = {"path": "noising path patching to the logits", "activation": "noising activation patching of z"}


def _h(h) -> str:
    return f"L{h[0]}.H{h[1]}"


def _none_txt(d: dict[str, Any]) -> str:
    top = ", ".join(f"{_h(r)} {r[2]:.3f}" for r in d["largest"])
    return (f"No head reaches |effect| >= --min-effect {d['min_effect']:g} (largest: {top}); no paths or knockout "
            "were run.")


def _rounds_txt(d: dict[str, Any]) -> str:
    if d["screen"] == "activation":
        return ""
    return f" and {len(d['rounds']) + 1} round(s) of path patching (--path-rounds {d['path_rounds']})"


def _found_columns(d: dict[str, Any]) -> list[str]:
    """Table columns naming a head and, for the path screen, the round / route / effect it was found with."""
    return ["head"] if d["screen"] == "activation" else ["head", "round", "route", "effect found"]


def _found_cells(d: dict[str, Any], j: int) -> list[str]:
    f = d["found"][j]
    if d["screen"] == "activation":
        return [_h(f["head"])]
    return [_h(f["head"]), str(f["round"]), f["route"], f"{f['effect']:.3f}"]


def _strongest(r: dict[str, Any], k: int = 5) -> list[tuple[list[int], str, float]]:
    """The ``k`` largest |effects| of one round as ``(head, route, effect)``."""
    c = [([i, h], v, e) for v, M in r["effects"].items() for i, row in enumerate(M) for h, e in enumerate(row)
         if e is not None]
    return sorted(c, key=lambda x: -abs(x[2]))[:k]


def _ci_txt(s: dict) -> str:
    frac = "-" if s.get("fraction") is None else f"{s['fraction']:.2f}"
    return f"{s['drop']:.3f} [{s['ci'][0]:.3f}, {s['ci'][1]:.3f}] | {frac}"


def write_circuit_report(d: dict[str, Any], out: Path, *, pngs: bool = True) -> dict[str, Path]:
    """``circuit.json``, ``circuit.md`` and (``pngs``) ``{screen}_z.png``, ``round{r}.png`` (path screen rounds
    >= 2: each sender's strongest route), ``dla.png`` (factual: ``promote.png``, ``suppress.png``) under
    ``out``."""
    from .causal_report import _heatmap

    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "circuit.json", "md": out / "circuit.md"}
    paths["json"].write_text(json.dumps(_clean(d), indent=1))
    images = {}
    if pngs:
        images = {f"{m}_z": (f"{SCREEN_TITLES[m]} (share of the gap)", M) for m, M in d["screens"].items()}
        for r in d.get("rounds", []):  # per sender, its strongest route's effect (senders' layers only)
            e = torch.tensor([r["effects"][v] for v in VIAS], dtype=torch.float64)  # (route, layers, H)
            best = e.gather(0, e.abs().argmax(0, keepdim=True))[0]
            to = ", ".join(_h(h) for h in r["receivers"])
            images[f"round{r['round']}"] = (f"round {r['round']}: path patching -> {to} (strongest of q/k/v)",
                                            best.tolist())
        images["dla"] = ("direct logit attribution (clean run)", d["dla"])
        if "promote" in d:
            images |= {"promote": ("promote: DLA correct - distractors", d["promote"]),
                       "suppress": ("suppress: DLA said - distractors", d["suppress"])}
        for key, (title, M) in images.items():
            paths[key] = out / f"{key}.png"
            _heatmap(paths[key], torch.tensor(M, dtype=torch.float64), f"{d['model']} / {d['task']}: {title}", True)
    methods = list(d["screens"])
    lines = [f"# Circuit: {d['model']}, task {d['task']}", "",
             f"Prompts: {d['n']} (screen on {d['screen_n']}, paths on {d['path_n']}); metric clean "
             f"{d['clean_metric']:.4g}, corrupted {d['corrupt_metric']:.4g}; {d['seconds']:.1f} s.", "",
             f"Clean: `{d['example']['clean']}`  ", f"Corrupted: `{d['example']['corrupt']}`", "",
             f"Heads picked by the `{methods[0]}` screen{_rounds_txt(d)} (noising effect, share of the clean - "
             "corrupted gap):", "",
             "| " + " | ".join(_found_columns(d) + [SCREEN_COLUMNS[m] for m in methods]) + " | DLA |",
             "|---|" + "---|" * (len(_found_columns(d)) - 1 + len(methods)) + "---|"]
    for j, h in enumerate(d["heads"]):
        cells = _found_cells(d, j) + [f"{d['head_effects'][m][j]:.3f}" for m in methods]
        lines.append(f"| {' | '.join(cells)} | {d['dla'][h[0]][h[1]]:.3f} |")
    for r in d.get("rounds", []):
        lines += ["", f"Round {r['round']}: every earlier head -> {', '.join(_h(h) for h in r['receivers'])} "
                  f"(q / k / v separately); new: {', '.join(_h(h) for h in r['new']) or 'none'}; strongest: "
                  + ", ".join(f"{_h(h)} via {v} {e:.3f}" for h, v, e in _strongest(r))]
    if not d["heads"]:
        lines += ["", _none_txt(d)]
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

    methods = list(d["screens"])
    t = Table(title=f"{d['model']} / {d['task']}: circuit by the {methods[0]} screen (clean "
                    f"{d['clean_metric']:.3g}, corrupted {d['corrupt_metric']:.3g})")
    for col in _found_columns(d) + [SCREEN_COLUMNS[m] for m in methods] + ["DLA", "drop alone [CI]"]:
        t.add_column(col, justify="left" if col == "head" else "right")
    each = {tuple(e["head"]): e for e in d["knockout"].get("each", [])}
    for j, h in enumerate(d["heads"]):
        k = each.get(tuple(h))
        t.add_row(*_found_cells(d, j), *(f"{d['head_effects'][m][j]:.3f}" for m in methods),
                  f"{d['dla'][h[0]][h[1]]:.3f}",
                  "-" if k is None else f"{k['drop']:.3f} [{k['ci'][0]:.3f}, {k['ci'][1]:.3f}]")
    Console().print(t)
    if not d["heads"]:
        print(_none_txt(d))
    k = d["knockout"]
    if k:
        print(f"circuit zeroed: drop {_ci_txt(k['circuit'])} (fraction of gap); control: {_ci_txt(k['control'])}")


# ---------------------------------------------------------------------------------------------------------
# command
# ---------------------------------------------------------------------------------------------------------
def register(sub) -> None:
    from ..sweep import add_executor_args

    p = sub.add_parser(
        "circuit", help="find a task's heads (path patching), their paths (via q/k/v) and knock them out",
        description="Build clean / corrupted prompts offline (induction, ioi, colors, factual), find the heads by "
        "path patching to the logits (or activation patching of z), trace paths between them by path patching "
        "via q/k/v, zero them and report the metric's drop with a bootstrap CI; JSON + Markdown + PNG under "
        "runs/circuit-*/.")
    p.add_argument("task", choices=CIRCUIT_TASKS)
    p.add_argument("--screen", choices=SCREENS, default="path",
                   help="how heads are picked: path patching to the logits (direct heads), activation patching of "
                   "z (total effect, upstream heads too), or both reported (picked by path)")
    p.add_argument("--model", default="smollm2", help="smollm2, gemma3, a local HF folder or a .gguf file")
    p.add_argument("--n", type=int, default=8, help="prompt pairs (knockout runs on all of them)")
    p.add_argument("--top", type=int, default=5, help="at most this many circuit heads per screen round")
    p.add_argument("--min-effect", type=float, default=0.1, help="a circuit head's |patching effect| at least")
    p.add_argument("--path-rounds", type=int, default=3,
                   help="path screen: rounds of iterated path patching (1: senders -> logits only; round r: every "
                   "earlier head -> the heads found in round r-1, via q, k, v separately)")
    p.add_argument("--screen-n", type=int, default=4, help="prompts for the screen")
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
        d = run_circuit(args.model, args.task, screen=args.screen, n=args.n, top=args.top, min_effect=args.min_effect,
                        path_rounds=args.path_rounds, screen_n=args.screen_n, path_n=args.path_n, seed=args.seed, length=args.length,
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


__all__ = ["CIRCUIT_TASKS", "SCREENS", "circuit_job", "circuit_prompts", "dla_prompt", "knock_prompt", "paths_prompt", "promote_suppress",
           "register", "run_circuit", "screen_prompt", "write_circuit_report", "zeroed_metrics"]
