"""``attnlab bench stability``: B252's small-scale proxies for large-scale training instabilities, on CPU.

"Small-scale proxies for large-scale Transformer training instabilities" reproduces two instabilities in small
models by training at high learning rates: attention-logit growth (``max |q . k| / sqrt(d)`` grows until the
attention weights collapse to one-hot; remedy: QK-layernorm) and output-logit divergence (the softmax normalizer
``log Z`` of the output logits drifts away from 0; remedy: z-loss ``1e-4 * log^2 Z``). It measures how much the
final loss depends on the learning rate with the *LR sensitivity*::

    LR sensitivity = E_eta [ min(loss(eta), loss_0) - loss* ],   loss* = min_eta min(loss(eta), loss_0)

the expectation over the learning-rate grid (log-spaced, equal weight per point), ``loss(eta)`` the final loss at
learning rate ``eta``, ``loss_0`` the loss at initialization (a diverged run counts as ``loss_0``).

Here: the bench backbone (``bench/tasks/backbone.py``: short convolution, ``mha`` mixer, MLP) learns a
generated language (:class:`MarkovCopy`: a fixed random Markov chain with a copied segment, every next token
scored) at learning rates spanning three orders of magnitude, for four variants: baseline, ``qk_norm`` (RMSNorm of
q and k per head: ``mha:qk_norm=True``), ``z_loss`` and both. Each (variant, lr, seed) is one configuration of
:func:`attnlab.sweep.run_sweep` (resumable, ``--executor``). The report: final loss per learning rate, the LR
sensitivity per variant, the largest attention logit and ``log Z`` at the end of training at the highest learning
rate; plots of final loss versus learning rate and of the largest attention logit over steps at the highest rate.

    attnlab bench stability --quick                  # about 3 minutes on 2 cores
    attnlab bench stability --resume runs/stability-20250101-120000
    attnlab bench stability --steps 600 --seeds 2 --workers 2
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..sweep import Executor, add_executor_args, run_sweep
from .common import Report, new_run_dir
from .tasks.backbone import BackboneConfig
from .tasks.base import Batch, Task, generator
from .tasks.mechanisms import LayerSpec, build_layer
from .tasks.trainer import StabilityOptions, TrainConfig, train


# ---- the generated language -------------------------------------------------------------------------------
@dataclass(frozen=True)
class MarkovCopyConfig:
    """vocab: tokens; seq_len: scored positions per sequence; branching: successors of each token in the chain;
    copy_len: length of a segment of the first half repeated in the second half (0: none); chain_seed: draws the
    chain (fixed per config, so every run learns the same language)."""

    vocab: int = 64
    seq_len: int = 48
    branching: int = 4
    copy_len: int = 12
    chain_seed: int = 0
    test_size: int = 64
    val_size: int = 256

    def __post_init__(self) -> None:
        if not 2 <= self.branching <= self.vocab:
            raise ValueError(f"branching must lie in [2, vocab={self.vocab}], got {self.branching}")
        if self.copy_len < 0 or (self.copy_len and 2 * self.copy_len > (self.seq_len + 1) // 2 * 2):
            raise ValueError(f"copy_len={self.copy_len} must be >= 0 and fit twice in seq_len={self.seq_len}")


class MarkovCopy(Task):
    """Next-token prediction on a generated language: a random Markov chain (each token has ``branching``
    successors with fixed random probabilities) in which a segment of ``copy_len`` tokens from the first half
    reappears in the second half. The chain part is learnable token by token (the convolution and MLP); the
    copied segment only by attention (induction: find the earlier occurrence, read what followed). Every position
    is scored, as in language modeling.

        x:  t0 t1 ... t_{T-1}        y:  t1 t2 ... t_T        mask: all True
    """

    name = "markov-copy"
    cfg: MarkovCopyConfig

    def __init__(self, cfg: MarkovCopyConfig) -> None:
        super().__init__(cfg)
        g = generator(cfg.chain_seed)
        V, k = cfg.vocab, cfg.branching
        self.successors = torch.rand(V, V, generator=g).topk(k, dim=1).indices  # (V, k) distinct successors
        p = torch.rand(V, k, generator=g) + 0.2  # bounded away from 0: every successor is seen
        self.cumprob = (p / p.sum(1, keepdim=True)).cumsum(1)  # (V, k)

    def sample(self, n: int, gen: torch.Generator) -> Batch:
        c = self.cfg
        T = c.seq_len + 1
        x = torch.empty(n, T, dtype=torch.long)
        x[:, 0] = torch.randint(0, c.vocab, (n,), generator=gen)
        u = torch.rand(n, T, generator=gen)
        for t in range(1, T):  # inverse-CDF draw of each successor
            prev = x[:, t - 1]
            j = (u[:, t, None] > self.cumprob[prev]).sum(1).clamp_max(c.branching - 1)
            x[:, t] = self.successors[prev, j]
        if c.copy_len:
            L = c.copy_len
            a = torch.randint(0, T // 2 - L + 1, (n,), generator=gen)
            b = torch.randint(T // 2, T - L + 1, (n,), generator=gen)
            rows, offs = torch.arange(n)[:, None], torch.arange(L)
            x[rows, b[:, None] + offs] = x[rows, a[:, None] + offs]
        return Batch(x[:, :-1].contiguous(), x[:, 1:].contiguous(), torch.ones(n, T - 1, dtype=torch.bool))

    def chain_entropy(self) -> float:
        """Mean entropy (nats) of the chain's next-token distribution over tokens: the loss floor off the copy."""
        p = torch.diff(self.cumprob, dim=1, prepend=torch.zeros(self.cfg.vocab, 1))
        return float(-(p * p.log()).sum(1).mean())


# ---- the metric ---------------------------------------------------------------------------------------------
def lr_sensitivity(final_losses: Sequence[float | None], initial_loss: float) -> float:
    """B252's LR sensitivity ``mean_eta [min(l(eta), l_0) - min_eta' min(l(eta'), l_0)]`` over a log-spaced grid.

    ``final_losses``: the final loss at each learning rate of the grid (None / nan / inf: diverged, counted as
    ``initial_loss``); ``initial_loss``: the loss at initialization, ``l_0``. 0 when every rate reaches the same
    loss; at most ``l_0 - loss*``."""
    if len(final_losses) < 2:
        raise ValueError(f"final_losses needs at least two learning rates, got {len(final_losses)}")
    if not math.isfinite(initial_loss):
        raise ValueError(f"initial_loss must be finite, got {initial_loss}")
    capped = [initial_loss if x is None or not math.isfinite(x) else min(x, initial_loss) for x in final_losses]
    best = min(capped)
    return sum(c - best for c in capped) / len(capped)


# ---- one configuration ----------------------------------------------------------------------------------------
VARIANTS: dict[str, tuple[bool, float]] = {  # name -> (qk_norm, z_loss coefficient; --z-loss replaces 1e-4)
    "baseline": (False, 0.0),
    "qk_norm": (True, 0.0),
    "z_loss": (False, 1e-4),
    "qk_norm+z_loss": (True, 1e-4),
}


@dataclass(frozen=True)
class StabilityRun:
    """One training run: a variant at one learning rate and seed. The schedule: linear warmup over ``warmup``
    steps, cosine decay to lr/10 at ``steps`` (the trainer's), AdamW (betas 0.9, 0.98) with ``weight_decay``
    (torch's, multiplied by the lr), gradient clipping at 1."""

    variant: str
    lr: float
    seed: int = 0
    qk_norm: bool = False
    z_loss: float = 0.0
    steps: int = 150
    batch_size: int = 16
    warmup: int = 15
    weight_decay: float = 0.0
    log_every: int = 5
    task: MarkovCopyConfig = field(default_factory=MarkovCopyConfig)
    backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig(dim=64, heads=2, layers=2, mlp=True))

    @property
    def key(self) -> str:
        d = asdict(self)
        return "|".join(f"{k}={d[k]}" for k in sorted(d))

    def train_config(self) -> TrainConfig:
        # step-determined (no wall-clock budget, no early stop): the loss at a learning rate does not depend
        # on the machine's speed
        return TrainConfig(lr=self.lr, batch_size=self.batch_size, max_steps=self.steps, budget_s=1e9,
                           eval_every=self.steps, target=None, warmup=self.warmup, decay_steps=self.steps,
                           weight_decay=self.weight_decay)


def run_one(rc: StabilityRun) -> dict[str, Any]:
    """Train one configuration; the losses, why it stopped and the probe log (JSON-able)."""
    t0 = time.perf_counter()
    task = MarkovCopy(rc.task)
    bb = rc.backbone
    spec = LayerSpec("mha", {"qk_norm": True} if rc.qk_norm else {})
    res = train(task, lambda i: build_layer(spec, bb.dim, bb.heads, layer_idx=i, layers=bb.layers), bb,
                rc.train_config(), rc.seed, stability=StabilityOptions(z_loss=rc.z_loss, log_every=rc.log_every))
    return {"variant": rc.variant, "lr": rc.lr, "seed": rc.seed, "steps": res["steps"], "stopped": res["stopped"],
            "initial_loss": res["initial_loss"], "final_loss": res["final_loss"], "log": res["log"],
            "seconds": round(time.perf_counter() - t0, 1)}


def plan(variants: Sequence[str], lrs: Sequence[float], seeds: int, base: StabilityRun,
         z_loss: float = 1e-4) -> list[StabilityRun]:
    """Every (variant, seed, lr) run; ``z_loss``: the coefficient of the variants with z-loss."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; expected some of {list(VARIANTS)}")
    if not z_loss > 0:
        raise ValueError(f"z_loss must be > 0, got {z_loss}")
    out = []
    for v in variants:
        qk, z = VARIANTS[v]
        z = z_loss if z else 0.0
        for seed in range(seeds):
            for lr in lrs:
                out.append(replace(base, variant=v, lr=float(lr), seed=seed, qk_norm=qk, z_loss=z))
    return out


# ---- aggregation ---------------------------------------------------------------------------------------------
def _last_log(row: dict[str, Any]) -> dict[str, Any] | None:
    return row["log"][-1] if row.get("log") else None


def _max_logit(entry: dict[str, Any] | None) -> float | None:
    """Largest attention logit over blocks of one log entry (None: not finite or no entry)."""
    if entry is None or any(v is None for v in entry["max_logit"]):
        return None
    return max(entry["max_logit"])


def summarize(rows: list[dict[str, Any]], variants: Sequence[str], lrs: Sequence[float]) -> list[dict[str, Any]]:
    """One row per variant: final loss per learning rate (mean over seeds; diverged: None), the LR sensitivity
    (per seed, averaged), the best loss and rate, and at the highest rate the largest attention logit and log Z
    at the last logged step, and the peak attention logit over training."""
    out = []
    top = max(lrs)
    for v in variants:
        mine = [r for r in rows if r["variant"] == v and "error" not in r]
        if not mine:
            continue
        seeds = sorted({r["seed"] for r in mine})
        sens, per_lr = [], {}
        for lr in lrs:
            finals = [r["final_loss"] for r in mine if r["lr"] == lr]
            ok = [f for f in finals if f is not None]
            per_lr[lr] = sum(ok) / len(ok) if ok and len(ok) == len(finals) else None
        for s in seeds:
            by_lr = {r["lr"]: r for r in mine if r["seed"] == s}
            if all(lr in by_lr for lr in lrs):
                sens.append(lr_sensitivity([by_lr[lr]["final_loss"] for lr in lrs], by_lr[lrs[0]]["initial_loss"]))
        finite = {lr: x for lr, x in per_lr.items() if x is not None}
        best_lr = min(finite, key=finite.get) if finite else None
        top_rows = [r for r in mine if r["lr"] == top]
        last = [_last_log(r) for r in top_rows]
        peaks = [max((m for e in r["log"] if (m := _max_logit(e)) is not None), default=None) for r in top_rows]
        row = {"variant": v, "lr_sensitivity": round(sum(sens) / len(sens), 4) if sens else None,
               "best_loss": round(finite[best_lr], 4) if best_lr else None, "best_lr": best_lr,
               "diverged": sum(r["stopped"] == "diverged" or r["final_loss"] is None for r in mine),
               "initial_loss": mine[0]["initial_loss"],
               "max_logit_top_lr": _mean([_max_logit(e) for e in last]),
               "peak_logit_top_lr": _mean(peaks),
               "log_z_top_lr": _mean([e["log_z"] if e else None for e in last]),
               "seeds": len(seeds)}
        for lr in lrs:
            row[_lr_col(lr)] = None if per_lr[lr] is None else round(per_lr[lr], 4)
        out.append(row)
    return out


def _mean(xs: list[float | None]) -> float | None:
    if not xs or any(x is None for x in xs):
        return None
    return round(sum(xs) / len(xs), 3)


def _lr_col(lr: float) -> str:
    return f"lr {lr:.0e}"


# ---- plots ------------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss_vs_lr(report: Report, run_dir: Path, lrs: Sequence[float]) -> Path | None:
    """Final loss versus learning rate, one line per variant (diverged runs: a cross at the initial loss)."""
    if not report.rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.3))
    init = report.rows[0]["initial_loss"]
    for r in report.rows:
        ys = [r[_lr_col(lr)] if r[_lr_col(lr)] is not None else math.nan for lr in lrs]
        ax.plot(lrs, ys, marker="o", label=f"{r['variant']} (LR sens. {r['lr_sensitivity']})")
        bad = [lr for lr, y in zip(lrs, ys) if math.isnan(y)]
        ax.scatter(bad, [init] * len(bad), marker="x", color=ax.lines[-1].get_color())
    ax.axhline(init, color="gray", ls=":", lw=1, label="initial loss (cap)")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final validation loss (nats)")
    ax.set_title("final loss vs learning rate (x: diverged)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = run_dir / "stability-loss-vs-lr.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_logits_over_steps(report: Report, run_dir: Path, runs: dict[str, list[dict[str, Any]]],
                           top: float) -> Path | None:
    """The largest attention logit and the mean output log Z over the steps of each variant's run at ``top``."""
    if not runs:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, log in runs.items():
        steps = [e["step"] for e in log]
        axes[0].plot(steps, [_max_logit(e) if _max_logit(e) is not None else math.nan for e in log], label=label)
        axes[1].plot(steps, [e["log_z"] if e["log_z"] is not None else math.nan for e in log], label=label)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("max attention logit |q.k|/sqrt(d) (all blocks)")
    axes[1].set_ylabel("mean log Z of the output logits")
    axes[1].axhline(0, color="gray", lw=0.8)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"training at the highest learning rate, lr={top:g} (seed 0)")
    fig.tight_layout()
    path = run_dir / "stability-logits-top-lr.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- the command --------------------------------------------------------------------------------------------
QUICK_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stability", help="B252: LR sensitivity with/without QK-norm and z-loss; attention-logit "
                                         "growth and output log Z during training")
    p.add_argument("--quick", action="store_true", help="the small form (about 3 minutes on 2 cores)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--lrs", nargs="+", type=float, default=None,
                   help=f"learning-rate grid, log-spaced (default {' '.join(f'{x:g}' for x in QUICK_LRS)})")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (quick 150, full 400)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per (variant, lr) (quick 1, full 2)")
    p.add_argument("--dim", type=int, default=None, help="backbone width (quick 64, full 128)")
    p.add_argument("--z-loss", type=float, default=1e-4,
                   help="z-loss coefficient of the z_loss variants (default 1e-4, the paper's)")
    p.add_argument("--weight-decay", type=float, default=0.0,
                   help="AdamW weight decay (torch's, times the lr; default 0: the setting where both "
                        "instabilities show)")
    add_executor_args(p, workers=2)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per configuration (default 1: a tiny model gains nothing from more, and on "
                        "a busy machine two threads ran a configuration 6x slower)")
    p.add_argument("--resume", default=None, help="a run folder to complete (skips finished configurations)")
    p.add_argument("--out", default="runs", help="folder for the run directory")
    p.set_defaults(func=run)


def base_run(args: argparse.Namespace) -> StabilityRun:
    steps = args.steps or (150 if args.quick else 400)
    dim = args.dim or (64 if args.quick else 128)
    task = MarkovCopyConfig() if args.quick else MarkovCopyConfig(seq_len=64, copy_len=16)
    return StabilityRun(variant="", lr=1.0, steps=steps, warmup=max(1, steps // 10), batch_size=16 if args.quick
                        else 32, weight_decay=args.weight_decay, log_every=max(1, steps // 30), task=task,
                        backbone=BackboneConfig(dim=dim, heads=2, layers=2, mlp=True))


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console()
    lrs = sorted(args.lrs or QUICK_LRS)
    if len(lrs) < 2:
        raise SystemExit("--lrs: the LR sensitivity needs at least two learning rates")
    seeds = args.seeds or (1 if args.quick else 2)
    try:
        configs = plan(args.variants, lrs, seeds, base_run(args), args.z_loss)
        executor = Executor.from_args(args, threads=args.threads)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    run_dir = Path(args.resume) if args.resume else new_run_dir("stability", args.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    rows = run_sweep(run_one, configs, key=lambda c: c.key, path=run_dir / "results.jsonl", executor=executor,
                     label=lambda r: f"{r.get('variant')} lr={r.get('lr')}", description="stability runs")
    errors = [r for r in rows if "error" in r]
    for r in errors:
        console.print(f"[red]{r.get('variant')} lr={r.get('lr')}: {r['error']}[/red]")
    summary = summarize(rows, args.variants, lrs)
    top = max(lrs)
    top_logs = {r["variant"]: r["log"] for r in rows if r.get("lr") == top and r.get("seed") == 0 and "log" in r}
    b = configs[0]
    meta = {
        "paper": "B252 (Wortsman et al., small-scale proxies for large-scale Transformer training instabilities)",
        "task": f"markov-copy: vocab {b.task.vocab}, {b.task.seq_len} scored positions, branching "
                f"{b.task.branching}, copied segment {b.task.copy_len} (chain entropy "
                f"{MarkovCopy(b.task).chain_entropy():.3f} nats)",
        "model": f"bench backbone, {b.backbone.layers} blocks, dim {b.backbone.dim}, {b.backbone.heads} heads, "
                 f"mha (RoPE) + MLP",
        "training": f"{b.steps} steps x batch {b.batch_size}, warmup {b.warmup}, cosine to lr/10, AdamW "
                    f"(0.9, 0.98), weight decay {b.weight_decay}, clip 1, z-loss coefficient {args.z_loss:g} where on",
        "lrs": " ".join(f"{x:g}" for x in lrs),
        "lr_sensitivity": "mean over the lr grid of min(final, initial) - min over the grid (B252)",
        "max_logit": "max |q.k|/sqrt(d) over blocks, heads and causal pairs on the training batch of the last "
                     "logged step (peak: over all logged steps)",
        "seeds": seeds,
        "executor": args.executor,
        "workers": args.workers,
        "threads_per_configuration": args.threads,
        "wall_seconds_now": round(time.time() - started, 1),
        "training_seconds_all": round(sum(r.get("seconds") or 0 for r in rows), 1),
        "errors": len(errors),
    }
    columns = ["variant", "lr_sensitivity", "best_loss", "best_lr", "diverged", *[_lr_col(x) for x in lrs],
               "max_logit_top_lr", "peak_logit_top_lr", "log_z_top_lr"]
    report = Report("stability", columns, summary, meta,
                    plots=[partial(plot_loss_vs_lr, lrs=lrs), partial(plot_logits_over_steps, runs=top_logs, top=top)])
    report.print("bench stability (B252)")
    written = report.write(run_dir)
    console.print(f"wrote {run_dir} ({', '.join(p.name for p in written)})")
    return 0 if not errors else 1

