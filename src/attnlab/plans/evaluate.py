"""Evaluate plans on long-context tasks: accuracy, KV-cache bytes, prefill time and decode speed.

For every sample the plans run back to back (interleaved), so timing ratios compare runs made under the
same machine load. ``dense`` is the model's own attention with the model's own cache,
``DynamicCache(config=model.config)`` (the baseline the savings are measured against): on a model with
sliding-window layers (Gemma 3) those layers keep only their window, as the model would decode, and run
through ``hf.use(model, "native")`` (the same rule on attnlab's banded engine, not SDPA's masked full square,
so prefill speedups are not flattered by a slow baseline); other models run plain SDPA. Every other row is
a :class:`HeadPlan` installed with :func:`attnlab.models.hf.use` (its
:class:`~attnlab.plans.runtime.PlanRunner`) and decoded with its :class:`~attnlab.plans.cache.PlanCache`
(:func:`attnlab.plans.runtime.greedy_generate`); plans run the model's sliding layers with the model's
window (:func:`attnlab.plans.sources.with_model_windows`). KV bytes are the storage of the key/value entries
the caches hold at the end of decoding.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from ..bench.common import Report, new_run_dir
from ..models import hf
from .plan import HeadPlan
from .runtime import greedy_generate, plan_for_model
from .sources import model_windows, with_model_windows
from .tasks import make_samples

DENSE = "dense"


def _held_bytes(t: torch.Tensor | None) -> int:
    """Bytes of the entries ``t`` holds. A sliding cache layer keeps its window as a view of the last call's
    keys (transformers slices ``[-window + 1:]``): count the window, not the buffer it was sliced from."""
    if t is None:
        return 0
    return min(t.untyped_storage().nbytes(), t.numel() * t.element_size())


@torch.no_grad()
def dense_generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int,
                   native: bool | None = None) -> dict[str, Any]:
    """Greedy decoding with the model's own attention and its own cache, ``DynamicCache(config=...)``
    (the dense path; sliding-window layers keep their window). ``native``: run the layers through
    ``hf.use(model, "native")`` (None: when the model has sliding-window layers)."""
    if native is None:
        native = any(w is not None for w in model_windows(model))
    cache = DynamicCache(config=model.config)
    handle = hf.use(model, "native") if native else None
    try:
        t0 = time.perf_counter()
        out = model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1)
        t1 = time.perf_counter()
        toks = [out.logits[:, -1].argmax(-1)]
        for _ in range(max_new_tokens - 1):
            out = model(input_ids=toks[-1][:, None], cache=cache, use_cache=True)
            toks.append(out.logits[:, -1].argmax(-1))
        t2 = time.perf_counter()
    finally:
        if handle is not None:
            handle.remove()
    held = sum(_held_bytes(layer.keys) + _held_bytes(layer.values) for layer in cache.layers
               if getattr(layer, "keys", None) is not None)
    steps = len(toks) - 1
    return {"tokens": torch.stack(toks, 1), "prefill_s": t1 - t0, "decode_s": t2 - t1,
            "decode_tok_s": steps / (t2 - t1) if steps else float("nan"), "kv_bytes": held}


def evaluate(
    model: nn.Module, tok: Any, plans: Sequence[HeadPlan], tasks: Sequence[str] = ("passkey",),
    lengths: Sequence[int] = (1024, 2048, 4096), n: int = 10, seed: int = 0, include_dense: bool = True,
    chunk: int | None = None, warmup: bool = True, progress: Any = None,
) -> Report:
    """Run ``tasks`` x ``lengths`` x ``n`` samples under each plan (and the dense path); one row per
    (plan, task, length) with accuracy, mean KV bytes, median prefill seconds, decode tokens/s and the
    ratios to the dense path measured on the same samples. Each plan is checked against the model and runs
    the model's sliding-window layers with their window (:func:`~attnlab.plans.sources.with_model_windows`)."""
    plans = [with_model_windows(model, plan_for_model(model, p)) for p in plans]
    names = ([DENSE] if include_dense else []) + [p.name for p in plans]
    if len(set(names)) != len(names):
        raise ValueError(f"plan names must be distinct, got {names}")
    cols = ["plan", "task", "length", "n", "accuracy", "correct", "kv_mib", "kv_ratio", "prefill_s",
            "prefill_speedup", "decode_tok_s", "full_heads", "stream_heads"]
    windows = model_windows(model)
    meta = {"seed": seed, "n": n, "chunk": chunk}
    if any(w is not None for w in windows):
        meta["model_windows"] = windows  # the dense row is the model's own (windowed) cache
    report = Report("plans-eval", cols, meta=meta)
    for task in tasks:
        for length in lengths:
            samples = make_samples(tok, task, length, n, seed)
            res: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
            if warmup:  # first calls build block-sparse plans and warm allocators: not timed
                ids = torch.tensor([samples[0].ids])
                for p in plans:
                    greedy_generate(model, ids, p, max_new_tokens=2, chunk=chunk)
                if include_dense:
                    dense_generate(model, ids, 2)
            for s in samples:
                ids = torch.tensor([s.ids])
                for name in names:
                    if name == DENSE:
                        r = dense_generate(model, ids, s.max_new_tokens)
                    else:
                        plan = plans[names.index(name) - int(include_dense)]
                        r = greedy_generate(model, ids, plan, s.max_new_tokens, chunk=chunk)
                    text = tok.decode(r["tokens"][0].tolist(), skip_special_tokens=True)
                    r["score"] = s.score(text)
                    r["text"] = text
                    res[name].append(r)
                    if progress is not None:
                        progress(f"{task} {length} {name}")
            base = res.get(DENSE)
            for name in names:
                rs = res[name]
                plan = None if name == DENSE else plans[names.index(name) - int(include_dense)]
                row = {
                    "plan": name, "task": task, "length": length, "n": len(rs),
                    "accuracy": sum(r["score"] for r in rs) / len(rs),
                    "correct": sum(r["score"] for r in rs),
                    "kv_mib": statistics.mean(r["kv_bytes"] for r in rs) / 2**20,
                    "prefill_s": statistics.median(r["prefill_s"] for r in rs),
                    "decode_tok_s": statistics.median(r["decode_tok_s"] for r in rs),
                    "full_heads": plan.counts().get("full", 0) if plan else "all",
                    "stream_heads": plan.counts().get("stream", 0) if plan else 0,
                    "samples": [r["text"] for r in rs],
                }
                if base is not None:
                    row["kv_ratio"] = row["kv_mib"] / (statistics.mean(r["kv_bytes"] for r in base) / 2**20)
                    # median of per-sample ratios: each pair ran back to back under the same load
                    row["prefill_speedup"] = statistics.median(
                        b["prefill_s"] / r["prefill_s"] for b, r in zip(base, rs))
                report.add(**row)
    report.plots.append(plot_accuracy_vs_memory)
    return report


def plot_accuracy_vs_memory(report: Report, run_dir: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not report.rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    keys = sorted({(r["task"], r["length"]) for r in report.rows})
    for task, length in keys:
        rows = [r for r in report.rows if r["task"] == task and r["length"] == length]
        ax.plot([r["kv_mib"] for r in rows], [r["accuracy"] for r in rows], "o", label=f"{task} {length}")
        for r in rows:
            ax.annotate(r["plan"], (r["kv_mib"], r["accuracy"]), fontsize=7)
    ax.set_xlabel("KV cache held (MiB)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=7)
    ax.set_title("accuracy vs KV memory per plan")
    fig.tight_layout()
    path = run_dir / "accuracy_vs_kv.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write(report: Report, root: str = "runs") -> Path:
    run_dir = new_run_dir("plans-eval", root)
    report.write(run_dir)
    return run_dir


__all__ = ["DENSE", "dense_generate", "evaluate", "plot_accuracy_vs_memory", "write"]
