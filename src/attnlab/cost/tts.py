"""``attnlab cost --tts``: accuracy against cost for test-time compute (best-of-N by majority vote), dense
attention against a KV-compressed method, on a seeded long-context retrieval task.

Per prompt and method: one dense prefill (its queries, keys and values recorded through the hook points, shared
by the methods of the prompt), the method's cache rebuilt from it for ``n`` sequences at once
(:func:`attnlab.frontier.run.replay`, the press protocol), then ``n`` answers sampled together at a temperature.
The first ``N`` answers of each prompt give the points ``N = 1, 2, 4, ... n``:

* **majority vote**: the most frequent extracted answer (the first number in the continuation; ties: the one
  seen first) scored by the task; **pass@N** (an oracle verifier): any of the ``N`` answers right;
* **cost** (x): Kinetics eFLOPs of the prompt (once) plus ``N`` sequences decoding the task's generation budget
  (``max_new_tokens - 1`` steps after the prefill's token), decoded together: the weights are read once per
  step for the ``N`` sequences, each reads its own KV cache (:mod:`attnlab.cost.methods`).

Sampling uses the same seed per prompt for every method (common random numbers). Accuracy CIs: percentile
bootstrap over prompts (:func:`attnlab.frontier.report.bootstrap_ci`). Configurations are (prompt, method)
pairs run through :func:`attnlab.sweep.run_sweep` (``results.jsonl``, resumable).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

#: tasks whose answer is a number (the vote compares extracted numbers)
TTS_TASKS = ("passkey", "niah", "multikey")


#: the embedded decoders the test-time-compute runs take (tests add tiny models to ``hf.SHARED``)
MODELS = ("smollm2", "gemma3")


def _plan_tasks(task: str) -> Callable[[Any, int, int, int], list[Any]]:
    def make(tok: Any, length: int, n: int, seed: int) -> list[Any]:
        from ..plans.tasks import make_samples

        return make_samples(tok, task, length, n, seed)

    return make


#: task name -> ``make(tok, length, n, seed) -> [Sample]``; tests add token-level tasks here
TASK_MAKERS: dict[str, Callable[[Any, int, int, int], list[Any]]] = {t: _plan_tasks(t) for t in TTS_TASKS}

_SAMPLES: dict[tuple, list[Any]] = {}
_PREFILL: dict[tuple, dict[str, Any]] = {}  # the last prompt's dense prefill (configs of a prompt run together)


@dataclass(frozen=True)
class TTSConfig:
    """One prompt under one method: ``n`` answers sampled at ``temperature``."""

    model: str
    task: str
    length: int
    prompts: int
    sample: int
    method: str  # "dense" or a plan-based frontier method (stream, snapkv, quest, tova, h2o, ...)
    budget: float
    n: int
    temperature: float = 1.0
    seed: int = 0

    @property
    def key(self) -> str:
        return (f"{self.model}/{self.task}/L{self.length}/p{self.prompts}/s{self.seed}/{self.sample}/"
                f"{self.method}@{self.budget:g}/n{self.n}/T{self.temperature:g}")


def configs(model: str, task: str, length: int, prompts: int, methods: Sequence[tuple[str, float]], n: int,
            temperature: float = 1.0, seed: int = 0) -> list[TTSConfig]:
    """Every (prompt, method), the methods of a prompt next to each other (they share its prefill)."""
    if task not in TASK_MAKERS:
        raise ValueError(f"unknown tts task {task!r}; choose from {', '.join(TASK_MAKERS)}")
    if n < 1 or prompts < 1:
        raise ValueError(f"n and prompts must be >= 1, got n={n}, prompts={prompts}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return [TTSConfig(model, task, length, prompts, i, m, float(b), n, temperature, seed)
            for i in range(prompts) for m, b in methods]


def _model(name: str) -> tuple[Any, Any]:
    from ..models import hf

    if name not in MODELS and name not in hf.SHARED:
        raise ValueError(f"unknown tts model {name!r}; choose from {', '.join(MODELS)}")
    return hf.shared_model(name)


def _samples(cfg: TTSConfig, tok: Any) -> list[Any]:
    key = (cfg.model, cfg.task, cfg.length, cfg.prompts, cfg.seed)
    if key not in _SAMPLES:
        _SAMPLES[key] = TASK_MAKERS[cfg.task](tok, cfg.length, cfg.prompts, cfg.seed)
    return _SAMPLES[key]


def _prefill(model: Any, ids: Any) -> dict[str, Any]:
    """Dense prefill (the dense baseline's runner) recording every layer's q, k, v; the last logits."""
    import torch

    from ..frontier.run import dense_runner
    from ..models import hf

    captured: dict[int, dict[str, Any]] = {}

    def keep(point: str) -> Callable:
        def fn(value: Any, ctx: Any) -> None:
            captured.setdefault(ctx.layer, {"scale": ctx.scale})[point] = value

        return fn

    runner = dense_runner(model)
    handle = hf.use(model, runner) if runner is not None else None
    try:
        with torch.no_grad(), hf.hooks(model, {f"blocks.*.attn.{p}": keep(p) for p in ("q", "k", "v")}):
            out = model(input_ids=ids, use_cache=False, logits_to_keep=1)
    finally:
        if handle is not None:
            handle.remove()
    return {"captured": captured, "logits": out.logits[:, -1].float()}


def plan_for(model: Any, tok: Any, method: str, budget: float, length: int) -> Any:
    """The plan a method decodes with on ``model`` (dense: every head full, sliding layers their window)."""
    from ..frontier import methods as FM
    from ..frontier.run import context
    from ..plans.plan import HeadPlan, HeadPolicy

    ctx = context(model, tok)
    if method == "dense":
        plan = HeadPlan.uniform(ctx.num_layers, ctx.num_kv_heads, HeadPolicy.full(), ctx.q_per_kv, name="dense")
        return ctx.windows(plan, 1.0)
    setup = FM.get(method).build(ctx, budget, length)
    if setup.plan is None or setup.lookahead:
        raise ValueError(f"tts decodes from a replayed cache: {method!r} is "
                         + ("an ops-based method (no plan)" if setup.plan is None else "a lookahead method (LAQ)")
                         + "; use a plan-based one (stream, snapkv, quest, tova, h2o, ...)")
    return setup.plan


def first_number(text: str) -> str | None:
    """The answer a continuation gives: its first run of digits (None when it has none)."""
    m = re.search(r"\d+", text)
    return m.group(0) if m else None


def vote(answers: Sequence[str | None]) -> str | None:
    """Majority vote over the extracted answers (None ignored); ties go to the answer seen first."""
    valid = [a for a in answers if a is not None]
    if not valid:
        return None
    counts = Counter(valid)
    best = max(counts.values())
    return next(a for a in valid if counts[a] == best)


def run_one(cfg: TTSConfig) -> dict[str, Any]:
    """Sample ``cfg.n`` answers for one prompt under one method; return the answers, their scores and the KV
    bytes held (a top-level function of one config: picklable for every executor)."""
    import time

    import torch

    from ..frontier.run import cache_bytes, replay
    from ..models import hf

    model, tok = _model(cfg.model)
    sample = _samples(cfg, tok)[cfg.sample]
    t0 = time.perf_counter()
    pkey = (cfg.model, cfg.task, cfg.length, cfg.prompts, cfg.seed, cfg.sample)
    if pkey not in _PREFILL:
        _PREFILL.clear()
        _PREFILL[pkey] = _prefill(model, torch.tensor([sample.ids]))
    pre = _PREFILL[pkey]
    N = cfg.n
    cap = {layer: {"scale": c["scale"], "q": c["q"].expand(N, -1, -1, -1), "k": c["k"].repeat(N, 1, 1, 1),
                   "v": c["v"].repeat(N, 1, 1, 1)} for layer, c in pre["captured"].items()}
    plan = plan_for(model, tok, cfg.method, cfg.budget, cfg.length)
    cache, runner = replay(plan, cap)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + cfg.sample)

    def draw(logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits.float() / cfg.temperature, dim=-1)
        return torch.multinomial(probs, 1, generator=gen)[:, 0]

    eos = getattr(tok, "eos_token_id", None)
    toks = [draw(pre["logits"].expand(N, -1))]
    done = toks[0] == eos if eos is not None else torch.zeros(N, dtype=torch.bool)
    with torch.no_grad(), hf.use(model, runner):
        for _ in range(sample.max_new_tokens - 1):
            if bool(done.all()):
                break
            out = model(input_ids=toks[-1][:, None], cache=cache, use_cache=True)
            nxt = draw(out.logits[:, -1])
            toks.append(nxt)
            if eos is not None:
                done = done | (nxt == eos)
    seqs = torch.stack(toks, dim=1).tolist()
    texts = []
    for s in seqs:
        if eos is not None and eos in s:
            s = s[: s.index(eos)]
        texts.append(tok.decode(s, skip_special_tokens=True))
    answers = [first_number(t) for t in texts]
    return {**asdict(cfg), "answers": answers, "scores": [float(sample.score(t)) for t in texts],
            "voted_ok": [float(sample.score(a)) if a is not None else 0.0 for a in answers],
            "truth": list(sample.answers), "max_new_tokens": sample.max_new_tokens, "steps": len(toks),
            "kv_bytes": cache_bytes(cache), "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------------------
# aggregation
# ---------------------------------------------------------------------------------------------------------
def n_grid(n: int) -> list[int]:
    """1, 2, 4, ... up to ``n`` (and ``n`` itself)."""
    out, k = [], 1
    while k < n:
        out.append(k)
        k *= 2
    return [*out, n]


def prompt_scores(row: dict[str, Any], N: int) -> tuple[float, float]:
    """(majority-vote score, pass@N) of one prompt from its first ``N`` answers."""
    answers = row["answers"][:N]
    v = vote(answers)
    voted = 0.0 if v is None else row["voted_ok"][answers.index(v)]
    return voted, max(row["scores"][:N])


def cost_of(method: str, budget: float, shape: Any, length: int, new_tokens: int, N: int, hw: Any,
            protocol: str | None = None) -> dict[str, float]:
    """eFLOPs of one prompt (prefill once) and ``N`` sequences decoding ``new_tokens - 1`` steps together."""
    from ..frontier import methods as FM
    from . import methods as CM

    if method != "dense" and protocol is None:
        protos = FM.get(method).protocols
        protocol = "press" if "press" in protos else protos[0]
    spec = CM.parse_method(method)
    steps = max(0, new_tokens - 1)
    pre = CM.price(spec, CM.with_batch(shape, 1), length, budget=budget, protocol=protocol)
    dec = CM.price(spec, CM.with_batch(shape, N), length, budget=budget, decode_tokens=steps, protocol=protocol)
    prefill = hw.eflops(pre.prefill)
    decode = N * hw.eflops(dec.total_decode)
    seconds = hw.roofline_s(pre.prefill) + hw.roofline_s(dec.total_decode * N)
    return {"prefill_eflops": prefill, "decode_eflops": decode, "total_eflops": prefill + decode,
            "decode_attn_share": N * hw.eflops(dec.total_attn) / max(decode, 1e-30), "predicted_s": seconds,
            "kv_mb": dec.held_bytes / 1e6}


def aggregate(rows: Sequence[dict[str, Any]], shape: Any, hw: Any, n_boot: int = 2000) -> list[dict[str, Any]]:
    """One point per (method, budget, N): accuracy (vote) with a bootstrap 95% CI, pass@N, cost."""
    from ..frontier.report import bootstrap_ci

    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["budget"]), []).append(r)
    out = []
    for (method, budget), rs in groups.items():
        n = min(len(r["answers"]) for r in rs)
        length, new = rs[0]["length"], rs[0]["max_new_tokens"]
        for N in n_grid(n):
            votes, passes = zip(*(prompt_scores(r, N) for r in rs))
            lo, hi = bootstrap_ci(votes, n_boot=n_boot)
            plo, phi = bootstrap_ci(passes, n_boot=n_boot)
            cost = cost_of(method, budget, shape, length, new, N, hw)
            out.append({"method": method, "budget": None if method == "dense" else budget, "N": N,
                        "accuracy": sum(votes) / len(votes), "ci_lo": lo, "ci_hi": hi,
                        "pass_at_n": sum(passes) / len(passes), "pass_lo": plo, "pass_hi": phi,
                        "prompts": len(rs), "total_egflop": cost["total_eflops"] / 1e9,
                        "decode_egflop": cost["decode_eflops"] / 1e9, "prefill_egflop": cost["prefill_eflops"] / 1e9,
                        "decode_attn_share": cost["decode_attn_share"], "predicted_s": cost["predicted_s"],
                        "kv_mb": cost["kv_mb"]})
    return out


def equal_cost(points: Sequence[dict[str, Any]], base: str = "dense") -> list[dict[str, Any]]:
    """For each point of ``base``: every other (method, budget)'s largest N costing no more, and its accuracy."""
    out = []
    others = sorted({(p["method"], p["budget"]) for p in points if p["method"] != base},
                    key=lambda mb: (mb[0], mb[1] or 0.0))
    for d in (p for p in points if p["method"] == base):
        for m, b in others:
            cheaper = [p for p in points if (p["method"], p["budget"]) == (m, b)
                       and p["total_egflop"] <= d["total_egflop"] * (1 + 1e-9)]
            if cheaper:
                best = max(cheaper, key=lambda p: p["N"])
                out.append({"base_N": d["N"], "base_accuracy": d["accuracy"], "base_egflop": d["total_egflop"],
                            "method": m, "budget": b, "N": best["N"], "accuracy": best["accuracy"],
                            "egflop": best["total_egflop"]})
    return out


def plot(points: Sequence[dict[str, Any]], run_dir: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharex=True)
    methods = sorted({(p["method"], p["budget"]) for p in points}, key=lambda m: (m[0] != "dense", m[0]))
    for i, (m, b) in enumerate(methods):
        pts = sorted((p for p in points if p["method"] == m and p["budget"] == b), key=lambda p: p["N"])
        x = [p["total_egflop"] for p in pts]
        label = m if b is None else f"{m} @{b:g}"
        for ax, y, lo, hi in ((axes[0], "accuracy", "ci_lo", "ci_hi"), (axes[1], "pass_at_n", "pass_lo", "pass_hi")):
            ys = [p[y] for p in pts]
            err = [[p[y] - p[lo] for p in pts], [p[hi] - p[y] for p in pts]]
            ax.errorbar(x, ys, yerr=err, marker="o", capsize=3, label=label, color=f"C{i}")
            for p, xv, yv in zip(pts, x, ys):
                ax.annotate(f"N={p['N']}", (xv, yv), textcoords="offset points", xytext=(4, -10), fontsize=7)
    for ax, name in ((axes[0], "majority-vote accuracy"), (axes[1], "pass@N (oracle verifier)")):
        ax.set_xscale("log")
        ax.set_xlabel("total cost per prompt (eGFLOP, Kinetics)")
        ax.set_ylabel(name)
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = run_dir / "tts_accuracy_vs_cost.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_tts(cfgs: Sequence[TTSConfig], run_dir: Path, executor: Any = None,
            show_progress: bool = True) -> list[dict[str, Any]]:
    from ..sweep import run_sweep

    return run_sweep(run_one, list(cfgs), key=lambda c: c.key, path=run_dir / "results.jsonl", executor=executor,
                     description="sampling", label=lambda r: f"prompt {r['sample']} {r['method']}",
                     show_progress=show_progress)


__all__ = ["MODELS", "TASK_MAKERS", "TTSConfig", "TTS_TASKS", "aggregate", "configs", "cost_of", "equal_cost",
           "first_number", "n_grid", "plan_for", "plot", "prompt_scores", "run_one", "run_tts", "vote"]
