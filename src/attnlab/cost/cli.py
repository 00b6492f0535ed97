"""``attnlab cost``: the Kinetics cost model (B77) of every attention method, its check against measured times,
and accuracy against cost for test-time compute.

    attnlab cost --method dense --method stream --method moba --length 4096 [--model smollm2,gemma3,none]
                 [--budget 0.25] [--decode-tokens N] [--batch B]
    attnlab cost --check [--quick]        # predicted vs measured times on this machine, MdAPE, PNG
    attnlab cost --tts [--quick]          # best-of-N accuracy vs eFLOPs, dense vs a KV-compressed method
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from ..sweep import Executor, add_executor_args

DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}
TTS_QUICK = {"model": "smollm2", "task": "multikey", "length": 512, "prompts": 4, "n": 8,
             "methods": (("dense", 1.0), ("quest", 0.5))}
TTS_FULL = {"model": "smollm2", "task": "multikey", "length": 1024, "prompts": 24, "n": 16,
            "methods": (("dense", 1.0), ("quest", 0.125), ("stream", 0.25))}
#: multikey (4 needles, one asked) at T = 0.7: SmolLM2's single answers are right about half the time at 512
#: tokens and the distractors' values compete, so voting has something to do (T = 1.5 gives mostly no number)
TTS_TEMPERATURE = 0.7


def _csv(text: str | None, cast=str) -> list:
    return [] if text is None else [cast(x) for x in str(text).split(",") if x.strip()]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cost", help="Kinetics cost model (FLOPs, bytes, eFLOPs, predicted time) of every attention "
                                    "method; --check against measured times; --tts accuracy vs cost")
    p.add_argument("--method", action="append", default=None,
                   help="repeatable: dense, a frontier method (stream, snapkv, quest, moba, ...), an op with "
                        "options (moba:block=64,top_k=4; op:NAME for one a frontier name shadows), a pattern "
                        "class (SlidingWindow:window=256) or plan:PATH; see --list")
    p.add_argument("--length", default="4096", help="prompt / context lengths, comma-separated (default 4096)")
    p.add_argument("--model", default="smollm2,gemma3,none",
                   help="comma-separated: smollm2, gemma3 (shapes from their HF config, no weights), none (a bare "
                        "(batch, heads, L, head_dim) attention call) or a folder with a config.json")
    p.add_argument("--budget", type=float, default=0.25, help="frontier methods' budget fraction (default 0.25)")
    p.add_argument("--decode-tokens", type=int, default=0, help="also price N generated tokens after the prompt")
    p.add_argument("--batch", type=int, default=1,
                   help="sequences decoded together (they share each step's weight read); the bare call's batch")
    p.add_argument("--protocol", choices=("prefill", "press"), default=None,
                   help="frontier methods: compress while prefilling or after a dense prefill (default: the "
                        "method's first)")
    p.add_argument("--calibration", default=None, help="a frontier calibration folder (MoA's plans live there)")
    p.add_argument("--heads", type=int, default=8, help="bare call: query heads (default 8)")
    p.add_argument("--kv-heads", type=int, default=None, help="bare call: key/value heads (default = heads)")
    p.add_argument("--head-dim", type=int, default=64, help="bare call: head size (default 64)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="element type of weights, KV, "
                                                                             "activations (default float32)")
    p.add_argument("--peak-gflops", type=float, default=None, help="skip measuring: the matmul peak (GFLOP/s)")
    p.add_argument("--bandwidth-gbs", type=float, default=None, help="skip measuring: memory bandwidth (GB/s)")
    p.add_argument("--list", action="store_true", help="list the method names and exit")
    p.add_argument("--check", action="store_true", help="measure a set of calls here and report the model's "
                                                       "prediction error")
    p.add_argument("--clock", choices=("thread", "wall"), default="thread",
                   help="how the ceilings (and --check's calls) are timed: thread (default: torch on one thread, "
                        "its CPU time, steady on a busy machine: one core's peak and bandwidth) or wall "
                        "(wall-clock with torch's threads)")
    p.add_argument("--tts", action="store_true", help="test-time compute: majority-vote accuracy vs eFLOPs")
    p.add_argument("--quick", action="store_true", help="--check / --tts: the small set (a few minutes)")
    p.add_argument("--tts-model", default=None, help="--tts: model (default smollm2)")
    p.add_argument("--tts-task", default=None, help="--tts: passkey, niah or multikey (default multikey)")
    p.add_argument("--tts-methods", default=None,
                   help="--tts: method@budget,... (default dense,quest@0.5 quick; dense,quest@0.125,stream@0.25)")
    p.add_argument("--tts-length", type=int, default=None, help="--tts: prompt length (512 quick, 1024 full)")
    p.add_argument("--prompts", type=int, default=None, help="--tts: prompts (4 quick, 24 full)")
    p.add_argument("--samples", type=int, default=None, help="--tts: answers sampled per prompt, N max (8 / 16)")
    p.add_argument("--temperature", type=float, default=TTS_TEMPERATURE,
                   help=f"--tts: sampling temperature (default {TTS_TEMPERATURE})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", default=None, help="--check / --tts: a run folder to continue")
    p.add_argument("--out", default="runs", help="folder for the run directory")
    add_executor_args(p)
    p.set_defaults(func=run)


def hardware(args: argparse.Namespace, run_dir: Path | None = None, measure: Any = None) -> Any:
    """The machine's ceilings: given, read back from a resumed run, or measured now (``measure()``, default
    :meth:`Hardware.measure`)."""
    from .model import Hardware

    saved = run_dir / "hardware.json" if run_dir is not None else None
    if args.peak_gflops and args.bandwidth_gbs:
        hw = Hardware(args.peak_gflops * 1e9, args.bandwidth_gbs * 1e9, "given")
    elif saved is not None and saved.is_file():
        d = json.loads(saved.read_text())
        hw = Hardware(d["peak_gflops"] * 1e9, d["bandwidth_gbs"] * 1e9, d["name"])
    else:
        hw = (measure or Hardware.measure)()
        if args.peak_gflops:
            hw = Hardware(args.peak_gflops * 1e9, hw.bandwidth, "peak given, bandwidth measured")
        elif args.bandwidth_gbs:
            hw = Hardware(hw.peak_flops, args.bandwidth_gbs * 1e9, "peak measured, bandwidth given")
    if saved is not None:
        saved.write_text(json.dumps(hw.as_dict(), indent=1))
    return hw


def _ceilings(clock: str) -> Any:
    from .check import ceilings

    return ceilings(clock)


def _run_dir(args: argparse.Namespace, kind: str) -> Path:
    from ..bench.common import new_run_dir

    if args.resume:
        path = Path(args.resume)
        if not path.is_dir():
            raise SystemExit(f"--resume: {path} is not a folder")
        return path
    return new_run_dir(kind, args.out)


def run(args: argparse.Namespace) -> int:
    from .methods import method_names

    if args.list:
        print("\n".join(method_names()))
        return 0
    if args.check and args.tts:
        raise SystemExit("--check and --tts are separate runs; pick one")
    try:
        executor = Executor.from_args(args)
        executor.check()
    except (ImportError, ValueError) as e:
        raise SystemExit(str(e)) from None
    if args.check:
        return run_check(args, executor)
    if args.tts:
        return run_tts(args, executor)
    return run_price(args)


# ---------------------------------------------------------------------------------------------------------
# the price table
# ---------------------------------------------------------------------------------------------------------
PRICE_COLUMNS = ["model", "method", "L", "budget", "protocol", "prefill_gflop", "prefill_gb", "prefill_egflop",
                 "prefill_attn_share", "prefill_s", "decode_mflop", "decode_mb", "decode_egflop",
                 "decode_attn_share", "decode_ms", "kv_mb"]


def shapes(args: argparse.Namespace, skipped: list[str] | None = None) -> list[Any]:
    """The model shapes of ``--model``; one whose config cannot be read is noted in ``skipped`` (when given)
    instead of failing the run."""
    from .methods import ModelShape
    from .model import NotPriced

    dt = DTYPES[args.dtype]
    out = []
    for name in _csv(args.model):
        if name == "none":
            out.append(ModelShape.bare(args.heads, args.kv_heads, args.head_dim, args.batch, dt))
            continue
        try:
            out.append(ModelShape.load(name, args.batch, dt))
        except (NotPriced, OSError) as e:
            if skipped is None:
                raise
            skipped.append(f"{name}: {e}")
    if not out:
        raise SystemExit("--model: no shape could be read" + "".join(f"\n  {s}" for s in skipped or []))
    return out


def run_price(args: argparse.Namespace) -> int:
    from ..bench.common import Report
    from .methods import parse_method, price, shape_dict
    from .model import NotPriced

    methods = args.method or ["dense"]
    lengths = _csv(args.length, int)
    if not lengths or any(L < 1 for L in lengths):
        raise SystemExit(f"--length: positive integers, got {args.length!r}")
    failures: list[str] = []
    try:
        specs = [parse_method(m) for m in methods]
        if not any(s.kind == "dense" for s in specs):
            specs.insert(0, parse_method("dense"))  # the reference every row is read against
        models = shapes(args, failures)
    except (NotPriced, ValueError) as e:
        raise SystemExit(str(e)) from None
    run_dir = _run_dir(args, "cost")
    hw = hardware(args, run_dir, lambda: _ceilings(args.clock))
    cols = PRICE_COLUMNS + (["decode_tokens", "decode_total_egflop", "decode_total_s", "total_egflop"]
                            if args.decode_tokens else []) + ["notes"]
    rep = Report("cost", cols, meta={"hardware": hw.as_dict(), "clock": args.clock, "budget": args.budget, "batch": args.batch,
                                     "dtype": args.dtype, "shapes": [shape_dict(s) for s in models]})
    for shape in models:
        for spec in specs:
            for L in lengths:
                try:
                    p = price(spec, shape, L, budget=args.budget, decode_tokens=args.decode_tokens,
                              protocol=args.protocol if spec.kind == "frontier" else None,
                              calibration=args.calibration)
                except (NotPriced, ValueError) as e:
                    failures.append(f"{shape.name} / {spec.label} @ {L}: {e}")
                    continue
                rep.add(**p.row(hw))
    if not rep.rows:
        raise SystemExit("nothing priced:\n" + "\n".join(failures))
    rep.meta["not_priced"] = failures
    if len(lengths) > 1:
        rep.plots.append(_decode_plot)
    written = rep.write(run_dir)
    rep.print(f"attnlab cost (peak {hw.peak_flops / 1e9:.0f} GFLOP/s, {hw.bandwidth / 1e9:.1f} GB/s, "
              f"I = {hw.intensity:.1f} FLOP/byte)")
    for f in failures:
        print(f"not priced: {f}")
    print(f"wrote {', '.join(str(w) for w in written)}")
    return 0


def _decode_plot(rep: Any, run_dir: Path) -> Path:
    """Decode eFLOPs per token against context length, per model and method (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rep.rows})
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 4.2), squeeze=False)
    for ax, m in zip(axes[0], models):
        rows = [r for r in rep.rows if r["model"] == m]
        for i, meth in enumerate(dict.fromkeys(r["method"] for r in rows)):
            rs = sorted((r for r in rows if r["method"] == meth), key=lambda r: r["L"])
            ax.plot([r["L"] for r in rs], [r["decode_egflop"] for r in rs], marker="o", label=meth, color=f"C{i}")
        dense = sorted((r for r in rows if r["method"] in ("dense", "full")), key=lambda r: r["L"])
        if dense:  # the non-attention floor: what remains with no attention at all
            ax.plot([r["L"] for r in dense], [r["decode_egflop"] * (1 - r["decode_attn_share"]) for r in dense],
                    "k:", label="non-attention part")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length L")
        ax.set_ylabel("decode eGFLOP per token")
        ax.set_title(m, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = run_dir / "decode_eflops_vs_length.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------
# --check
# ---------------------------------------------------------------------------------------------------------
CHECK_COLUMNS = ["kind", "method", "L", "bound", "gflop", "mb", "measured_ms", "predicted_ms", "rel_error"]


def run_check(args: argparse.Namespace, executor: Executor) -> int:
    from ..bench.common import Report
    from . import check

    if executor.kind != "local" or executor.workers != 1:
        raise SystemExit("--check times calls: run it in this process (--executor local --workers 1)")
    run_dir = _run_dir(args, "cost-check")
    t0 = time.perf_counter()
    hw = hardware(args, run_dir, lambda: _ceilings(args.clock))
    rows, summary = check.run_check(run_dir, hw, quick=args.quick, executor=executor, clock=args.clock)
    rep = Report("cost --check", CHECK_COLUMNS, rows=rows,
                 meta={"hardware": hw.as_dict(), "clock": args.clock,
                       "shape": "B=1, H=8, Hkv=8, D=64, float32, forward only",
                       "prediction": "roofline max(FLOPs/peak, bytes/bandwidth) + one overhead constant c fitted "
                                     "over all points", **{k: v for k, v in summary.items()},
                       "seconds": time.perf_counter() - t0})
    rep.plots.append(lambda r, d: check.plot(rows, summary, d))
    written = rep.write(run_dir)
    rep.print(f"attnlab cost --check: MdAPE {summary['mdape'] * 100:.1f}% (roofline + c = "
              f"{summary['overhead_s'] * 1e6:.0f} us); additive eFLOPs form {summary['additive_mdape'] * 100:.1f}%")
    print(f"wrote {', '.join(str(w) for w in written)}")
    return 0


# ---------------------------------------------------------------------------------------------------------
# --tts
# ---------------------------------------------------------------------------------------------------------
TTS_COLUMNS = ["method", "budget", "N", "accuracy", "ci_lo", "ci_hi", "pass_at_n", "prompts", "prefill_egflop",
               "decode_egflop", "total_egflop", "decode_attn_share", "predicted_s", "kv_mb"]


def _tts_methods(text: str | None, default: tuple) -> list[tuple[str, float]]:
    if text is None:
        return list(default)
    out = []
    for part in _csv(text):
        name, _, b = part.partition("@")
        out.append((name, float(b) if b else (1.0 if name == "dense" else 0.25)))
    return out


def run_tts(args: argparse.Namespace, executor: Executor) -> int:
    from ..bench.common import Report
    from . import tts
    from .methods import ModelShape

    d = TTS_QUICK if args.quick else TTS_FULL
    model = args.tts_model or d["model"]
    task = args.tts_task or d["task"]
    length = args.tts_length or d["length"]
    prompts = args.prompts or d["prompts"]
    n = args.samples or d["n"]
    methods = _tts_methods(args.tts_methods, d["methods"])
    try:
        cfgs = tts.configs(model, task, length, prompts, methods, n, args.temperature, args.seed)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    run_dir = _run_dir(args, "cost-tts")
    t0 = time.perf_counter()
    hw = hardware(args, run_dir, lambda: _ceilings(args.clock))
    rows = [r for r in tts.run_tts(cfgs, run_dir, executor) if "error" not in r]
    if not rows:
        raise SystemExit(f"no configuration finished; see {run_dir / 'results.jsonl'}")
    from ..models import hf

    m, _ = hf.SHARED.get(model, (None, None))  # loaded by the runs in this process
    shape = ModelShape.from_config(m.config, model) if m is not None else ModelShape.load(model)
    points = tts.aggregate(rows, shape, hw)
    same = tts.equal_cost(points)
    rep = Report("cost --tts", TTS_COLUMNS, rows=points,
                 meta={"hardware": hw.as_dict(), "clock": args.clock, "model": model, "task": task, "length": length,
                       "prompts": prompts, "samples": n, "temperature": args.temperature, "seed": args.seed,
                       "methods": [f"{a}@{b:g}" for a, b in methods], "equal_cost": same,
                       "seconds": time.perf_counter() - t0,
                       "sampling_seconds": sum(r.get("seconds", 0.0) for r in rows),
                       "cost": "prefill once + N sequences x the task's generation budget, weights read once per "
                               "step for the N sequences (Kinetics eFLOPs on this machine)"})
    title = f"{model} {task} L={length}: {prompts} prompts, N up to {n}, T={args.temperature:g}"
    rep.plots.append(lambda r, dd: tts.plot(points, dd, title))
    written = rep.write(run_dir)
    rep.print(f"attnlab cost --tts: {title}")
    for s in same:
        print(f"at dense N={s['base_N']} ({s['base_egflop']:.0f} eGFLOP, acc {s['base_accuracy']:.2f}): "
              f"{s['method']}@{s['budget']:g} affords N={s['N']} ({s['egflop']:.0f} eGFLOP, "
              f"acc {s['accuracy']:.2f})")
    print(f"wrote {', '.join(str(w) for w in written)}")
    return 0
