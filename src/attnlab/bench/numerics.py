"""``attnlab bench numerics``: B152's numeric-deviation report ("Is Flash Attention Stable?") on attnlab's engines.

Two measurements, as in the paper:

1. **Numeric deviation of one forward/backward pass.** Each engine of ``attnlab.attention`` (``sdpa``, the sparse
   engine on a causal plan with the native CPU kernel and with the Python tiles, ``flex`` (CPU forward only,
   ``--flex``), ``dense_mask``, and ``reference`` -- the plain formula evaluated in the input dtype, the paper's
   "Baseline Attention") runs causal attention in float32, bfloat16 and float16 (where the engine takes it on
   CPU) at growing lengths. Deviation = the error against the float64 oracle
   (:func:`attnlab.core.reference.reference_attention`) on the same inputs: the max and mean absolute error of the
   output and of the gradients ``dq, dk, dv`` of ``sum(out * g)`` for a fixed random ``g``. The inputs are drawn
   exactly representable in every dtype (bfloat16 values, magnitudes below 2^-14 set to 0, so float16 holds
   them too), so the error is the engine's arithmetic, not input rounding. ``x baseline`` = an engine's max
   output error over ``reference``'s at the same dtype and length (the paper: Flash ~10x Baseline at BF16).
2. **Weight-difference proxy.** The same small model (the bench backbone with an ``mha`` mixer on the
   generated language of ``bench stability``) trains from the same initialization on the same batches twice,
   differing in one thing; the difference of the parameters (max abs, Frobenius norm, Frobenius relative to
   the weights) over steps. Pairs: a control (identical: must stay 0), ``sdpa`` vs the sparse engine with
   attention in float32 and in bfloat16, attention in float32 vs bfloat16, and the known perturbation of the
   paper's comparison: the whole model in float32 vs bfloat16 (autocast).

    attnlab bench numerics --quick          # about 2 minutes on 2 cores
    attnlab bench numerics --lengths 256 1024 4096 8192 --steps 400
    attnlab bench numerics --resume runs/numerics-20250101-120000
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..core import sparse
from ..core.attention import attention
from ..core.patterns import Causal
from ..core.reference import reference_attention
from ..sweep import Executor, add_executor_args, run_sweep
from .common import Report, new_run_dir

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                                  "float64": torch.float64}
#: engine -> (has a backward on CPU, dtypes it is run in)
ENGINES: dict[str, tuple[bool, tuple[str, ...]]] = {
    "sdpa": (True, ("float32", "bfloat16", "float16")),
    "blocksparse-native": (True, ("float32", "bfloat16")),
    "blocksparse-python": (True, ("float32", "bfloat16", "float16")),
    "flex": (False, ("float32", "bfloat16", "float16")),
    "dense_mask": (True, ("float32", "bfloat16", "float16")),
    "reference": (True, ("float32", "bfloat16", "float16", "float64")),
}


# ---- part 1: one pass against the oracle -------------------------------------------------------------------
@dataclass(frozen=True)
class DeviationCase:
    """All engines in all ``dtypes`` at one length (one oracle). Inputs: (batch, heads, length, head_dim), std
    ``std``; an engine runs only the dtypes it takes (``ENGINES``; float64: ``reference`` alone)."""

    length: int
    dtypes: tuple[str, ...] = ("float32", "bfloat16", "float16")
    batch: int = 1
    heads: int = 2
    head_dim: int = 64
    std: float = 1.0
    seed: int = 0
    engines: tuple[str, ...] = ("sdpa", "blocksparse-native", "blocksparse-python", "dense_mask", "reference")

    @property
    def key(self) -> str:
        d = asdict(self)
        return "deviation|" + "|".join(f"{k}={d[k]}" for k in sorted(d))


def representable_inputs(case: DeviationCase) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Seeded float64 q, k, v (B, H, T, D) and upstream gradient g, each exactly representable in bfloat16,
    float16 and float32 (bfloat16 values; magnitudes below 2^-14, float16's smallest normal, set to 0)."""
    g = torch.Generator().manual_seed(case.seed)
    shape = (case.batch, case.heads, case.length, case.head_dim)
    out = []
    for _ in range(4):
        x = (torch.randn(shape, generator=g, dtype=torch.float64) * case.std).to(torch.bfloat16).double()
        out.append(x.masked_fill(x.abs() < 2.0**-14, 0.0))
    return out[0], out[1], out[2], out[3]


def oracle(q: Tensor, k: Tensor, v: Tensor, g: Tensor, chunk: int = 1024) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Causal attention in float64 and the gradients of ``sum(out * g)``: (out, dq, dk, dv). Query rows run in
    chunks (each chunk's keys up to its last row) so long lengths fit in memory."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    T = q.shape[2]
    outs = []
    for s in range(0, T, chunk):
        e = min(T, s + chunk)
        o = reference_attention(q[:, :, s:e], k[:, :, :e], v[:, :, :e], Causal(), q_offset=s)
        (o * g[:, :, s:e]).sum().backward()
        outs.append(o.detach())
    return torch.cat(outs, dim=2), q.grad, k.grad, v.grad


def run_engine(engine: str, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention of (B, H, T, D) inputs on one engine, in the inputs' dtype."""
    scale = q.shape[-1] ** -0.5
    if engine in ("sdpa", "dense_mask", "reference", "flex"):
        return attention(q, k, v, pattern=Causal(), backend=engine, scale=scale)
    if engine in ("blocksparse-native", "blocksparse-python"):
        T = q.shape[2]
        plan = sparse.plan_pattern(Causal(), T, T, 0, None, q.device)
        return sparse.run(q, k, v, plan, scale, engine=engine.split("-")[1])
    raise ValueError(f"unknown engine {engine!r}; expected one of {list(ENGINES)}")


def _errors(x: Tensor, ref: Tensor) -> tuple[float, float]:
    d = (x.detach().double() - ref).abs()
    return float(d.max()), float(d.mean())


def deviation_one(case: DeviationCase) -> dict[str, Any]:
    """Every engine of ``case`` in each of its dtypes against the float64 oracle (JSON-able)."""
    unknown = [d for d in case.dtypes if d not in DTYPES]
    if unknown:
        raise ValueError(f"unknown dtype(s) {unknown}; expected some of {list(DTYPES)}")
    q64, k64, v64, g64 = representable_inputs(case)
    ref, dq, dk, dv = oracle(q64, k64, v64, g64)
    rows = [r for dt in case.dtypes for r in _dtype_rows(case, dt, (q64, k64, v64, g64), (ref, dq, dk, dv))]
    return {"part": "deviation", "length": case.length, "ref_out_mean_abs": float(ref.abs().mean()),
            "ref_grad_mean_abs": float(dq.abs().mean()), "engines": rows}


def _dtype_rows(case: DeviationCase, dtype: str, inputs: tuple[Tensor, ...], exact: tuple[Tensor, ...]
                ) -> list[dict[str, Any]]:
    (q64, k64, v64, g64), (ref, dq, dk, dv) = inputs, exact
    dt = DTYPES[dtype]
    rows = []
    for engine in case.engines:
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}; expected one of {list(ENGINES)}")
        has_bwd, dtypes = ENGINES[engine]
        if dtype not in dtypes:
            continue
        row: dict[str, Any] = {"engine": engine, "dtype": dtype}
        t0 = time.perf_counter()
        try:
            # a copy even in float64: the cached inputs must not become part of a graph
            q, k, v = (t.to(dt, copy=True).requires_grad_(has_bwd) for t in (q64, k64, v64))
            out = run_engine(engine, q, k, v)
            row["out_max"], row["out_mean"] = _errors(out, ref)
            if has_bwd:
                gq, gk, gv = torch.autograd.grad(out, (q, k, v), g64.to(dt))
                errs = [_errors(a, b) for a, b in ((gq, dq), (gk, dk), (gv, dv))]
                row["grad_max"] = max(e[0] for e in errs)
                row["grad_mean"] = sum(e[1] * t.numel() for e, t in zip(errs, (dq, dk, dv))) / (
                    dq.numel() + dk.numel() + dv.numel())
        except (RuntimeError, TypeError, ValueError, NotImplementedError) as e:
            row["unsupported"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        row["seconds"] = round(time.perf_counter() - t0, 2)
        rows.append(row)
    base = next((r.get("out_max") for r in rows if r["engine"] == "reference"), None)
    for r in rows:
        if base and r.get("out_max") is not None:
            r["x_baseline"] = r["out_max"] / base
    return rows


# ---- part 2: the weight-difference proxy -----------------------------------------------------------------------
@dataclass(frozen=True)
class Side:
    """One training run of a pair: the attention engine (``mha``'s backend), the dtype attention runs in (q, k, v
    cast before the op, the output cast back) and the model's precision (``bfloat16``: autocast of the forward)."""

    engine: str = "sdpa"
    attn_dtype: str = "float32"
    precision: str = "float32"

    def describe(self) -> str:
        s = f"{self.engine}/attn {self.attn_dtype}"
        return s + (f"/model {self.precision}" if self.precision != "float32" else "")


@dataclass(frozen=True)
class WeightPair:
    """Two runs from one initialization and one batch order; the parameter difference every ``every`` steps."""

    label: str
    a: Side
    b: Side
    steps: int = 150
    every: int = 10
    lr: float = 3e-3
    batch_size: int = 16
    seq_len: int = 64
    dim: int = 64
    heads: int = 2
    layers: int = 2
    seed: int = 0

    @property
    def key(self) -> str:
        d = asdict(self)
        return "weights|" + "|".join(f"{k}={d[k]}" for k in sorted(d))


def _cast_attention_layer(engine: str, attn_dtype: str, dim: int, heads: int) -> torch.nn.Module:
    from ..mechanisms.layers.mha import MHAConfig, MultiHeadAttention

    dt = DTYPES[attn_dtype]

    class CastAttention(MultiHeadAttention):
        """``mha`` whose op runs in ``attn_dtype`` (outputs cast back to the projections' dtype)."""

        def attend(self, q: Tensor, k: Tensor, v: Tensor, q_offset: int, state: Any = None) -> Tensor:
            was = q.dtype
            return super().attend(q.to(dt), k.to(dt), v.to(dt), q_offset, state).to(was)

    backend = {"sdpa": "sdpa", "blocksparse": "blocksparse", "dense_mask": "dense_mask",
               "reference": "reference"}.get(engine)
    if backend is None:
        raise ValueError(f"Side.engine must be sdpa, blocksparse, dense_mask or reference, got {engine!r}")
    return CastAttention(MHAConfig(dim=dim, heads=heads, backend=backend, causal=True))


def _flat(model: torch.nn.Module) -> Tensor:
    return torch.cat([p.detach().double().flatten() for p in model.parameters()])


def weight_difference(pair: WeightPair) -> dict[str, Any]:
    """Train both sides of ``pair`` in lockstep; the parameter difference over steps (JSON-able)."""
    from .stability import MarkovCopy, MarkovCopyConfig
    from .tasks.backbone import Backbone, BackboneConfig, task_loss
    from .tasks.base import generator

    t0 = time.perf_counter()
    task = MarkovCopy(MarkovCopyConfig(seq_len=pair.seq_len, copy_len=pair.seq_len // 4))
    bb = BackboneConfig(dim=pair.dim, heads=pair.heads, layers=pair.layers, mlp=True)
    models, opts = [], []
    for side in (pair.a, pair.b):
        if side.precision not in ("float32", "bfloat16") or side.attn_dtype not in DTYPES:
            raise ValueError(f"unsupported side {side}")
        torch.manual_seed(pair.seed)  # the same initialization: same draws, and checked below
        m = Backbone(bb, lambda i, s=side: _cast_attention_layer(s.engine, s.attn_dtype, bb.dim, bb.heads),
                     vocab=task.vocab, num_classes=task.num_classes)
        models.append(m)
        opts.append(torch.optim.AdamW(m.parameters(), lr=pair.lr, weight_decay=0.0, betas=(0.9, 0.98)))
    if not torch.equal(_flat(models[0]), _flat(models[1])):
        raise RuntimeError("the two sides did not start from the same weights")
    gen = generator(pair.seed * 31 + 17)
    curve: list[dict[str, Any]] = []
    losses: list[float | None] = [None, None]  # before the first step
    for step in range(pair.steps + 1):
        if step % pair.every == 0 or step == pair.steps:
            wa, wb = _flat(models[0]), _flat(models[1])
            d = wa - wb
            curve.append({"step": step, "max": float(d.abs().max()), "fro": float(d.norm()),
                          "rel": float(d.norm() / wa.norm()), "loss_a": losses[0], "loss_b": losses[1]})
        if step == pair.steps:
            break
        b = task.sample(pair.batch_size, gen)
        for i, (side, m, opt) in enumerate(zip((pair.a, pair.b), models, opts)):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=side.precision == "bfloat16"):
                loss = task_loss(m, task.kind, b.x, b.y, b.mask, score=False)[0]
            opt.zero_grad(set_to_none=True)
            loss.float().backward()
            opt.step()
            losses[i] = round(float(loss.detach()), 4)
    return {"part": "weights", "label": pair.label, "a": pair.a.describe(), "b": pair.b.describe(),
            "curve": curve, "final": curve[-1], "seconds": round(time.perf_counter() - t0, 1)}


def default_pairs(**kw: Any) -> list[WeightPair]:
    """The paper's comparison: engine differences in float32 and bfloat16 attention, against the perturbations
    of low precision (attention alone, the whole model), with an identical pair as the control."""
    fp32, bf16 = "float32", "bfloat16"
    return [
        WeightPair("control: identical", Side("sdpa"), Side("sdpa"), **kw),
        WeightPair("engine, attn fp32: sdpa vs sparse", Side("sdpa"), Side("blocksparse"), **kw),
        WeightPair("engine, attn bf16: sdpa vs sparse", Side("sdpa", bf16), Side("blocksparse", bf16), **kw),
        WeightPair("engine, attn bf16: sdpa vs baseline", Side("sdpa", bf16), Side("reference", bf16), **kw),
        WeightPair("attention precision: fp32 vs bf16", Side("sdpa", fp32), Side("sdpa", bf16), **kw),
        WeightPair("model precision: fp32 vs bf16", Side("sdpa"), Side("sdpa", fp32, bf16), **kw),
    ]


# ---- dispatch, plots, the command ---------------------------------------------------------------------------
def run_item(item: DeviationCase | WeightPair) -> dict[str, Any]:
    """The sweep's one function: a deviation case or a weight pair."""
    return deviation_one(item) if isinstance(item, DeviationCase) else weight_difference(item)


def deviation_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flatten the per-(length, dtype) results into one table row per (engine, dtype, length)."""
    out = []
    for r in rows:
        if r.get("part") != "deviation":
            continue
        for e in r["engines"]:
            out.append({"engine": e["engine"], "dtype": e["dtype"], "length": r["length"],
                        **{k: e.get(k) for k in ("out_max", "out_mean", "grad_max", "grad_mean", "x_baseline")},
                        "note": e.get("unsupported", "")})
    order = list(ENGINES)
    dorder = list(DTYPES)
    return sorted(out, key=lambda x: (dorder.index(x["dtype"]), order.index(x["engine"]), x["length"]))


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_deviation(report: Report, run_dir: Path, rows: list[dict[str, Any]]) -> Path | None:
    """Max output and gradient error versus length, one panel per dtype, one line per engine."""
    rows = [r for r in rows if r["out_max"] is not None and r["dtype"] != "float64"]
    if not rows:
        return None
    plt = _plt()
    dtypes = [d for d in DTYPES if any(r["dtype"] == d for r in rows)]
    fig, axes = plt.subplots(2, len(dtypes), figsize=(4.6 * len(dtypes), 7), squeeze=False)
    for j, dt in enumerate(dtypes):
        for i, (col, what) in enumerate((("out_max", "output"), ("grad_max", "gradient"))):
            ax = axes[i][j]
            for n, eng in enumerate(ENGINES):
                pts = sorted((r["length"], r[col]) for r in rows if r["dtype"] == dt and r["engine"] == eng
                             and r[col] is not None)
                if pts:  # one colour and marker per engine in every panel; engines that agree overlap
                    ax.plot(*zip(*pts), marker="os^vDx"[n], ls=("-", "--", ":")[n % 3], color=f"C{n}",
                            label=eng, alpha=0.85)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{dt}: max |{what} - float64 oracle|", fontsize=9)
            ax.set_xlabel("sequence length")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = run_dir / "numerics-deviation.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_weights(report: Report, run_dir: Path, rows: list[dict[str, Any]]) -> Path | None:
    """Relative Frobenius and max-abs parameter difference over steps, one line per pair."""
    rows = [r for r in rows if r.get("part") == "weights" and "curve" in r]
    if not rows:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in rows:
        steps = [c["step"] for c in r["curve"]]
        for ax, col in zip(axes, ("rel", "max")):
            ys = [c[col] if c[col] > 0 else math.nan for c in r["curve"]]  # log axis: the control stays at 0
            ax.plot(steps, ys, label=r["label"])
    axes[0].set_ylabel("||W_a - W_b||_F / ||W_a||_F")
    axes[1].set_ylabel("max |W_a - W_b|")
    for ax in axes:
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("weight difference between two trainings from one init and one batch order (control: 0, not drawn)")
    fig.tight_layout()
    path = run_dir / "numerics-weights.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("numerics", help="B152: each engine's deviation from the float64 oracle per dtype and "
                                        "length; weight difference of trainings on two engines vs bf16 training")
    p.add_argument("--quick", action="store_true", help="the small form (about 2 minutes on 2 cores)")
    p.add_argument("--lengths", nargs="+", type=int, default=None,
                   help="sequence lengths (quick: 256 1024 4096; default: 256 512 1024 2048 4096 8192)")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "float16"],
                   choices=[d for d in DTYPES if d != "float64"])
    p.add_argument("--engines", nargs="+", default=None, choices=list(ENGINES),
                   help="default: all but flex (its CPU compile takes minutes); float64 runs 'reference' only, "
                        "at the shortest length, as the oracle's self-check")
    p.add_argument("--flex", action="store_true", help="also FlexAttention (compiled; CPU forward only)")
    p.add_argument("--std", type=float, default=1.0, help="std of q, k, v (larger: larger logits)")
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--steps", type=int, default=None, help="training steps of the weight pairs (quick 150, "
                                                            "default 400)")
    p.add_argument("--no-weights", action="store_true", help="skip the weight-difference proxy")
    add_executor_args(p, workers=2)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per configuration (default 1: two configurations at once on 2 cores)")
    p.add_argument("--resume", default=None, help="a run folder to complete (skips finished configurations)")
    p.add_argument("--out", default="runs", help="folder for the run directory")
    p.set_defaults(func=run)


def plan(args: argparse.Namespace) -> list[DeviationCase | WeightPair]:
    lengths = sorted(args.lengths or ((256, 1024, 4096) if args.quick else (256, 512, 1024, 2048, 4096, 8192)))
    engines = tuple(args.engines or [e for e in ENGINES if e != "flex"])
    if args.flex and "flex" not in engines:
        engines = (*engines, "flex")
    items: list[DeviationCase | WeightPair] = []
    common = {"heads": args.heads, "head_dim": args.head_dim, "std": args.std, "engines": engines}
    for i, n in enumerate(lengths):
        if n < 1:
            raise ValueError(f"--lengths must be positive, got {n}")
        # float64 at the shortest length: the oracle's self-check (reference only)
        items.append(DeviationCase(n, (*args.dtypes, "float64") if i == 0 else tuple(args.dtypes), **common))
    if not args.no_weights:
        steps = args.steps or (150 if args.quick else 400)
        items += default_pairs(steps=steps, every=max(1, steps // 15))
    return items


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console()
    try:
        items = plan(args)
        executor = Executor.from_args(args, threads=args.threads)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    run_dir = Path(args.resume) if args.resume else new_run_dir("numerics", args.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    rows = run_sweep(run_item, items, key=lambda c: c.key, path=run_dir / "results.jsonl", executor=executor,
                     label=_label, description="numerics")
    errors = [r for r in rows if "error" in r]
    for r in errors:
        console.print(f"[red]{_label(r)}: {r['error']}[/red]")
    dev = deviation_rows(rows)
    weights = [r for r in rows if r.get("part") == "weights" and "final" in r]
    meta = {
        "paper": "B152 (Is Flash Attention Stable?)",
        "inputs": f"q, k, v ~ N(0, {args.std}^2) (1, {args.heads}, T, {args.head_dim}), causal, exactly "
                  "representable in every dtype; deviation against the float64 oracle on the same inputs",
        "x_baseline": "engine's max output error / the 'reference' formula's in the same dtype (the paper's "
                      "Baseline Attention)",
        "weight_pairs": _pairs_note(items),
        "threads_per_configuration": args.threads,
        "executor": args.executor,
        "wall_seconds_now": round(time.time() - started, 1),
        "errors": len(errors),
    }
    report = Report("numerics", ["engine", "dtype", "length", "out_max", "out_mean", "grad_max", "grad_mean",
                                 "x_baseline", "note"], dev, meta,
                    plots=[partial(plot_deviation, rows=dev), partial(plot_weights, rows=weights)])
    wtable = Report("numerics-weights", ["pair", "a", "b", "steps", "max", "fro", "rel", "rel_vs_model_bf16"],
                    weight_table(weights))
    report.print("bench numerics (B152): deviation from the float64 oracle")
    if weights:
        wtable.print("bench numerics (B152): weight difference after training")
    written = report.write(run_dir)
    if weights:
        with (run_dir / "results.md").open("a") as f:
            f.write("\n## Weight difference after training\n\n" + wtable.markdown() + "\n")
    console.print(f"wrote {run_dir} ({', '.join(p.name for p in written)})")
    return 0 if not errors else 1


def _pairs_note(items: list[DeviationCase | WeightPair]) -> str:
    pair = next((it for it in items if isinstance(it, WeightPair)), None)
    if pair is None:
        return "-"
    return (f"bench backbone ({pair.layers} blocks, dim {pair.dim}, {pair.heads} heads, mha + MLP) on markov-copy "
            f"(seq {pair.seq_len}), AdamW lr {pair.lr:g}, batch {pair.batch_size}, {pair.steps} steps, same init and "
            "batches; rel = ||W_a - W_b||_F / ||W_a||_F over all parameters")


def weight_table(weights: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per pair at its last step; ``rel_vs_model_bf16``: its relative difference over the whole-model
    bfloat16 pair's (the paper's context: how a difference compares with low-precision training's)."""
    ref = next((w["final"]["rel"] for w in weights if w["label"].startswith("model precision")), None)
    return [{"pair": w["label"], "a": w["a"], "b": w["b"], "steps": w["final"]["step"], "max": w["final"]["max"],
             "fro": w["final"]["fro"], "rel": w["final"]["rel"],
             "rel_vs_model_bf16": w["final"]["rel"] / ref if ref else None} for w in weights]


def _label(row: dict[str, Any]) -> str:
    if row.get("part") == "weights" or "label" in row:
        return str(row.get("label"))
    return f"T={row.get('length')}"


__all__ = ["DeviationCase", "ENGINES", "Side", "WeightPair", "default_pairs", "deviation_one", "oracle",
           "representable_inputs", "run_engine", "weight_difference"]
