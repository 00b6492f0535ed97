"""``attnlab bench native``: a real model's own attention rule through attnlab's engines vs transformers' SDPA.

``hf.use(model, "native")`` runs each layer's own rule with attnlab (:class:`attnlab.models.hf.NativeRunner`):
on Gemma 3 the five sliding-window layers (window 512) of every six run the ``sliding_window`` op on the sparse
engine (the native kernel on CPU) and the global layers run SDPA causal. Transformers' default ``sdpa`` path
hands SDPA the sliding layers' boolean mask, so it computes the masked full square.

Per length, after an untimed warm-up of both paths, the two prefills alternate ``rounds`` times (the baseline
first in even rounds, second in odd ones); the ratio is the median of per-round ratios, so both see the same
machine load. Prefill is one forward of the prompt with a cache and
``logits_to_keep=1`` (what ``generate`` does). ``--check`` also compares the logits of a ``check_length``
prompt with transformers' eager attention (an fp32 reference computed differently: the full score matrix) and reports the largest deviation.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from torch import nn

from .common import Report, new_run_dir, progress

COLUMNS = ["model", "length", "sdpa_s", "native_s", "speedup", "rounds"]


@torch.no_grad()
def _prefill(model: nn.Module, ids: torch.Tensor) -> float:
    from transformers import DynamicCache

    t0 = time.perf_counter()
    model(input_ids=ids, cache=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1)
    return time.perf_counter() - t0


@torch.no_grad()
def logits_deviation(model: nn.Module, ids: torch.Tensor) -> dict[str, float]:
    """Largest |logit difference| between ``use(model, "native")`` and transformers' eager attention on ``ids``
    (all positions; and the last 4 positions decoded one by one with the model's sliding cache), with the
    largest |logit| for scale."""
    from ..models import hf

    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        ref = model(input_ids=ids, use_cache=False).logits
    finally:
        model.set_attn_implementation(previous)
    with hf.use(model, "native") as h:
        out = model(input_ids=ids, use_cache=False).logits
        # decoding with the model's own cache (sliding layers hold only their window): the last 4 positions
        cache = h.new_cache()
        T = ids.shape[1]
        model(input_ids=ids[:, : T - 4], cache=cache, use_cache=True, logits_to_keep=1)
        steps = [model(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True).logits[:, -1] for t in range(T - 4, T)]
    dec = torch.stack(steps, dim=1)
    return {"max_abs_diff": float((out - ref).abs().max()), "max_abs_logit": float(ref.abs().max()),
            "decode_max_abs_diff": float((dec - ref[:, -4:]).abs().max())}


def measure(model: nn.Module, lengths: list[int], rounds: int = 2, seed: int = 0, name: str = "",
            advance: Any = None) -> list[dict[str, Any]]:
    """Prefill seconds of transformers' SDPA and of ``use(model, "native")``, alternating, per length."""
    from ..models import hf

    g = torch.Generator().manual_seed(seed)
    vocab = int(model.config.get_text_config().vocab_size)
    rows = []
    for T in lengths:
        ids = torch.randint(10, min(vocab, 30000), (1, T), generator=g)
        warm = ids[:, : min(T, 1024)]  # untimed: first calls build the kernel's layouts and warm the allocator
        _prefill(model, warm)
        with hf.use(model, "native"):
            _prefill(model, warm)
        base, native = [], []
        for r in range(rounds):
            order = ("sdpa", "native") if r % 2 == 0 else ("native", "sdpa")  # neither always goes first
            for which in order:
                if which == "sdpa":
                    base.append(_prefill(model, ids))
                else:
                    with hf.use(model, "native"):
                        native.append(_prefill(model, ids))
            if advance is not None:
                advance(f"{name} {T}")
        rows.append({"model": name, "length": T, "sdpa_s": statistics.median(base),
                     "native_s": statistics.median(native),
                     "speedup": statistics.median(b / n for b, n in zip(base, native)), "rounds": rounds})
    return rows


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("native", help="a model's own attention rule through attnlab's engines vs transformers' SDPA "
                                      "(prefill time; logits vs eager with --check)")
    p.add_argument("--model", default="gemma3", help="gemma3 (default), smollm2, a folder or a .gguf file")
    p.add_argument("--lengths", default="8192,16384", help="comma-separated prompt lengths in tokens")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds per length (ratio = median)")
    p.add_argument("--check", action="store_true", help="also compare logits with eager attention")
    p.add_argument("--check-length", type=int, default=2048)
    p.add_argument("--out", default="runs", help="folder for the run directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..models import hf

    lengths = [int(x) for x in str(args.lengths).split(",") if x]
    if not lengths or min(lengths) < 1 or args.rounds < 1:
        raise SystemExit("--lengths needs positive integers and --rounds >= 1")
    model, _ = hf.load_model(args.model)
    meta: dict[str, Any] = {"model": args.model, "rounds": args.rounds, "protocol": "prefill, logits_to_keep=1, "
                            "alternating sdpa / native, ratio = median of per-round ratios"}
    if args.check:
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(10, 30000, (1, args.check_length), generator=g)
        meta["check"] = {"length": args.check_length, **logits_deviation(model, ids)}
        c = meta["check"]
        print(f"logits vs eager at {args.check_length}: max |diff| {c['max_abs_diff']:.3g} (decoding with the "
              f"window cache: {c['decode_max_abs_diff']:.3g}; max |logit| {c['max_abs_logit']:.3g})")
    report = Report("native", COLUMNS, meta=meta)
    with progress(len(lengths) * args.rounds, "prefill") as advance:
        for row in measure(model, lengths, args.rounds, name=args.model, advance=advance):
            report.add(**row)
    run_dir = new_run_dir("native", args.out)
    report.write(run_dir)
    report.print()
    print(f"wrote {run_dir}")
    return 0


__all__ = ["logits_deviation", "measure", "register", "run"]
