"""``attnlab bench vision``: the ViT with each selected mixer trained from scratch on a tiny image task.

Each arm is a mixer layout of :class:`attnlab.vision.vit.ViTConfig`: a vision mixer (``shift``, ``uniform``,
``lka``, ``ulsam``, ``ninformer``, ``a2n``, ``region``, ``tic``, ``window``, ``neighborhood``, ``spectral``),
a catalogue layer by name (``mha``, ``biformer``, ...), or a named layout -- ``spectformer`` (spectral blocks
then ``mha``, V67), ``vitdet`` (window blocks with evenly spaced global ``mha`` blocks, V193), ``aps``
(``mha`` with V149's polyphase-anchored patch embedding and no absolute positions). ``--transfer`` adds arms on
an ``mha`` ViT that this command first trains on ``--pretrain-task`` (the teacher, cached per worker):
``finetune`` (all weights, new head), ``apla`` (V210: only each block's ``W_O`` and the head), ``distill`` / ``copy`` (V124: a fresh
student with the teacher's attention maps as a loss / as its maps) and ``adl`` (V292's attention
diversification loss, no teacher). Every arm trains the same number of steps with AdamW (the quality
benchmark's :class:`TrainConfig` and its warmup + cosine ``lr_at``), batches drawn online from a seeded
generator, and is scored once on a fixed test set (its own seed) and on the same test images with the noise
std raised from 0.1 to ``--noise-test`` (``acc_noisy``: the corruption robustness V292 is about). One (arm,
seed) is one configuration of :func:`attnlab.sweep.run_sweep` (resume with ``--resume``, ``--executor``).

``tic_shift`` is ``tic`` with V59's multi-directional cyclic shift of half the patch grid; ``tap`` (a vision
mixer) is V292's token-aware average pooling before ``mha``. The arm ``dcal`` is V89's dual cross-attention
learning on an ``mha`` ViT (SA + GLCA + PWCA branches, the uncertainty-weighted loss; scored with SA + GLCA
probabilities), to compare with ``mha`` at equal steps.
``--task video`` trains V3's PredFormer layouts (``full``, ``factorized``, ``interleaved``) on the bouncing
squares of :class:`attnlab.vision.data.VideoTask` (MSE of the next frames; ``copy_mse`` repeats the last input
frame, the baseline to beat; ``zero_mse`` predicts blank frames, the trivial solution of an MSE on sparse
frames).

    attnlab bench vision --quick --transfer           # 17 arms x 150 steps on 16 x 16 shapes
    attnlab bench vision --mixers mha shift lka --steps 400 --task count
    attnlab bench vision --resume runs/vision-20250101-120000
    attnlab bench vision --mixers mha dcal --steps 300     # V89 DCAL vs plain ViT
    attnlab bench vision --task video --size 8 --patch 2 --squares 1 --frames 3 --steps 1500 --lr 3e-3
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..bench.common import Report, new_run_dir
from ..bench.tasks.trainer import TrainConfig, lr_at
from ..mechanisms.heads import HeadsConfig
from ..sweep import Executor, add_executor_args, run_sweep
from .apla import apla
from .attn_transfer import attention_maps, copy_logits, distillation_loss, forward_with_maps
from .data import TASKS, ImageTask, VideoTask
from .dcal import DCALViT
from .predformer import LAYOUTS as VIDEO_ARMS
from .predformer import PredFormer, PredFormerConfig
from .robust import diversification_loss
from .spectral import spectformer_mixers
from .vit import ViT, ViTConfig, param_count
from .window import vitdet_mixers

DEFAULT_ARMS = ("mha", "shift", "uniform", "lka", "spectformer", "vitdet", "ulsam", "ninformer", "a2n", "region",
                "tic", "aps")
LAYOUTS = ("spectformer", "vitdet", "aps", "dcal", "tic_shift")
BENCH_TASKS = (*TASKS, "video")
# arms on a ViT attnlab trains first (the teacher: mha, on --pretrain-task): V210, V124, V292 (no teacher)
TRANSFER_ARMS = ("finetune", "apla", "distill", "copy", "adl")


def vit_config(cfg: dict[str, Any], task: str | None = None) -> ViTConfig:
    """The ViT of one configuration (``arm`` plus the shared shape knobs); transfer arms are ``mha``."""
    arm, depth = cfg["arm"], cfg["depth"]
    image_task = ImageTask(task or cfg["task"], cfg["size"])
    extra: dict[str, Any] = {}
    if arm == "spectformer":
        mixer: str | tuple[str, ...] = spectformer_mixers(depth)
    elif arm == "vitdet":
        mixer = vitdet_mixers(depth)
        extra["mixer_options"] = {"window": {"window": 2}}
    elif arm == "tic_shift":  # V59 with the multi-directional cyclic shift of half the grid
        mixer = "tic"
        extra["mixer_options"] = {"tic": {"shift": max(1, cfg["size"] // cfg["patch"] // 2)}}
    elif arm == "aps":
        mixer = "mha"
        extra.update(embed="aps", positions="none")
    elif arm in TRANSFER_ARMS or arm == "dcal":
        mixer = "mha"
    else:
        mixer = arm
    return ViTConfig(image_size=cfg["size"], patch=cfg["patch"], channels=1,
                     attn=HeadsConfig(dim=cfg["dim"], heads=cfg["heads"], causal=False), depth=depth,
                     classes=image_task.classes, mixer=mixer, **extra)


def config_key(cfg: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def describe(mixers: tuple[str, ...]) -> str:
    """``("spectral", "spectral", "mha", "mha")`` -> ``"spectral x2, mha x2"``."""
    parts: list[list] = []
    for m in mixers:
        if parts and parts[-1][0] == m:
            parts[-1][1] += 1
        else:
            parts.append([m, 1])
    return ", ".join(m if n == 1 else f"{m} x{n}" for m, n in parts)


def fit(forward: Callable[[Tensor], Tensor], params: list[torch.nn.Parameter], task: ImageTask,
        cfg: dict[str, Any], seed: int, extra_loss: Callable[[Tensor, Tensor], Tensor] | None = None,
        weight_decay: float = 0.05,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None) -> tuple[list[float], float]:
    """``steps`` AdamW steps of cross-entropy (plus ``extra_loss(x, logits)``; or ``loss_fn(x, y)`` instead of
    both) on batches drawn online from ``task.sample``; the quality benchmark's schedule (:class:`TrainConfig`,
    ``lr_at``). Returns (losses, seconds)."""
    steps = cfg["steps"]
    warmup = max(1, min(30, steps // 10))
    tc = TrainConfig(lr=cfg["lr"], batch_size=cfg["batch"], max_steps=steps, warmup=warmup,
                     decay_steps=max(steps, warmup + 1), weight_decay=weight_decay)
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    gen = torch.Generator().manual_seed(seed * 31 + 17)
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, tc)
        x, y = task.sample(tc.batch_size, gen)
        if loss_fn is not None:
            loss = loss_fn(x, y)
        else:
            logits = forward(x)
            loss = F.cross_entropy(logits, y)
            if extra_loss is not None:
                loss = loss + extra_loss(x, logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        opt.step()
        losses.append(float(loss.detach()))
    return losses, time.perf_counter() - start


def accuracy(forward: Callable[[Tensor], Tensor], task: ImageTask, n: int, seed: int) -> float:
    x, y = task.split(n, seed)
    with torch.no_grad():
        return float((forward(x).argmax(-1) == y).float().mean())


_TEACHERS: dict[str, ViT] = {}  # per process: each worker trains a teacher once


def teacher(cfg: dict[str, Any]) -> ViT:
    """The mha ViT trained on ``pretrain`` (same shape and steps as the arms), cached per process."""
    tcfg = {**cfg, "arm": "mha", "task": cfg["pretrain"]}
    key = config_key({k: tcfg[k] for k in ("task", "size", "patch", "dim", "heads", "depth", "steps", "batch",
                                           "lr", "seed")})
    if key not in _TEACHERS:
        torch.manual_seed(1000 + cfg["seed"])
        model = ViT(vit_config(tcfg))
        model.train()
        fit(model, list(model.parameters()), ImageTask(cfg["pretrain"], cfg["size"]), tcfg, 1000 + cfg["seed"])
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        _TEACHERS[key] = model
    return _TEACHERS[key]


def train_one(cfg: dict[str, Any]) -> dict[str, Any]:
    """Train one arm for ``steps`` and score it on the fixed test set and on a noisier copy of the task."""
    if cfg["task"] == "video":
        return train_video(cfg)
    arm = cfg["arm"]
    task = ImageTask(cfg["task"], cfg["size"])
    vcfg = vit_config(cfg)
    torch.manual_seed(cfg["seed"])
    model = ViT(vcfg)
    params, decay = list(model.parameters()), 0.05
    forward: Callable[[Tensor], Tensor] = model
    extra: Callable[[Tensor, Tensor], Tensor] | None = None
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None
    out: dict[str, Any] = {}
    if arm == "dcal":  # V89: SA + GLCA + PWCA, uncertainty-weighted; scored by SA + GLCA probabilities
        model = DCALViT(model)
        forward, params = model, list(model.parameters())

        def loss_fn(x: Tensor, y: Tensor) -> Tensor:
            return model.losses(x, y)["total"]
    elif arm in ("finetune", "apla", "distill", "copy"):
        t = teacher(cfg)
        out["teacher_acc"] = round(accuracy(t, ImageTask(cfg["pretrain"], cfg["size"]), cfg["test"],
                                            20_000 + cfg["seed"]), 4)
        if arm in ("finetune", "apla"):
            head = model.head
            model = copy.deepcopy(t)
            model.head = head  # a new head for the new task's classes
            for p in model.parameters():
                p.requires_grad_(True)
            forward = model
            params = list(model.parameters())
            if arm == "apla":
                params, decay = apla(model, fraction=cfg["apla_fraction"], seed=cfg["seed"]), 0.0
        elif arm == "distill":
            def forward(x: Tensor) -> Tensor:  # noqa: F811  (the student's forward; maps kept for the loss)
                logits, forward.maps = forward_with_maps(model, x)
                return logits

            def extra(x: Tensor, logits: Tensor) -> Tensor:
                with torch.no_grad():
                    target = attention_maps(t, x)
                return cfg["distill_weight"] * distillation_loss(forward.maps, target)
        else:  # copy: the teacher's maps at training and at test time
            def forward(x: Tensor) -> Tensor:  # noqa: F811
                with torch.no_grad():
                    maps = attention_maps(t, x)
                return copy_logits(model, maps, x)
    elif arm == "adl":
        def forward(x: Tensor) -> Tensor:  # noqa: F811
            logits, forward.maps = forward_with_maps(model, x)
            return logits

        def extra(x: Tensor, logits: Tensor) -> Tensor:
            return cfg["adl_weight"] * diversification_loss(forward.maps)
    model.train()
    losses, train_s = fit(forward, params, task, cfg, cfg["seed"], extra, decay, loss_fn)
    model.eval()
    acc = accuracy(forward, task, cfg["test"], 10_000 + cfg["seed"])
    noisy = ImageTask(cfg["task"], cfg["size"], noise=cfg["noise_test"])
    acc_noisy = accuracy(forward, noisy, cfg["test"], 10_000 + cfg["seed"])
    tail = losses[-max(1, cfg["steps"] // 10):]
    return {**cfg, "mixers": describe(vcfg.mixers), "params": param_count(model),
            # parameters the optimizer moved (copy: no queries or keys; apla: W_O and the head)
            "trained": sum(p.numel() for p in params if p.grad is not None),
            "accuracy": round(acc, 4), "acc_noisy": round(acc_noisy, 4),
            "final_loss": round(sum(tail) / len(tail), 4), "train_s": round(train_s, 2),
            "ms_step": round(1000 * train_s / cfg["steps"], 2), **out}


def video_task(cfg: dict[str, Any]) -> VideoTask:
    return VideoTask(size=cfg["size"], frames=cfg["frames"], squares=cfg["squares"])


def video_config(cfg: dict[str, Any]) -> PredFormerConfig:
    return PredFormerConfig(frames=cfg["frames"], image_size=cfg["size"], patch=cfg["patch"],
                            attn=HeadsConfig(dim=cfg["dim"], heads=cfg["heads"], causal=False),
                            depth=cfg["depth"], layout=cfg["arm"])


def train_video(cfg: dict[str, Any]) -> dict[str, Any]:
    """V3: one PredFormer layout trained ``steps`` AdamW steps on the MSE of the next frames; scored by the test
    MSE, next to the copy-last-frame baseline on the same clips."""
    task = video_task(cfg)
    torch.manual_seed(cfg["seed"])
    model = PredFormer(video_config(cfg))
    model.train()

    def loss_fn(x: Tensor, y: Tensor) -> Tensor:
        return F.mse_loss(model(x), y)

    losses, train_s = fit(model, list(model.parameters()), task, cfg, cfg["seed"], loss_fn=loss_fn)
    model.eval()
    x, y = task.split(cfg["test"], 10_000 + cfg["seed"])
    with torch.no_grad():
        mse = float(F.mse_loss(model(x), y))
    copy_mse = float(F.mse_loss(x[:, -1:].expand_as(y), y))
    zero_mse = float(y.square().mean())  # predicting blank frames
    tail = losses[-max(1, cfg["steps"] // 10):]
    return {**cfg, "mixers": describe(model.kinds), "params": param_count(model), "test_mse": round(mse, 5),
            "copy_mse": round(copy_mse, 5), "zero_mse": round(zero_mse, 5),
            "vs_copy": round(mse / copy_mse, 3),
            "final_loss": round(sum(tail) / len(tail), 5), "train_s": round(train_s, 2),
            "ms_step": round(1000 * train_s / cfg["steps"], 2)}


def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    steps = args.steps or (150 if args.quick else 300)
    if args.task == "video":
        arms = list(dict.fromkeys(args.mixers or VIDEO_ARMS))
        bad = [a for a in arms if a not in VIDEO_ARMS]
        if bad or args.transfer:
            raise ValueError(f"--task video takes the PredFormer layouts {VIDEO_ARMS} as --mixers "
                             f"(no --transfer), got {bad or '--transfer'}")
        cfgs = [{"arm": arm, "task": "video", "size": args.size, "patch": args.patch, "dim": args.dim,
                 "heads": args.heads, "depth": args.depth, "frames": args.frames, "squares": args.squares,
                 "steps": steps, "batch": args.batch, "lr": args.lr, "seed": seed, "test": args.test}
                for arm in arms for seed in range(args.seeds)]
        for c in cfgs:
            video_task(c), video_config(c)
        return cfgs
    arms = list(dict.fromkeys([*(args.mixers or DEFAULT_ARMS), *(TRANSFER_ARMS if args.transfer else ())]))
    cfgs = []
    for arm in arms:
        for seed in range(args.seeds):
            c = {"arm": arm, "task": args.task, "size": args.size, "patch": args.patch, "dim": args.dim,
                 "heads": args.heads, "depth": args.depth, "steps": steps, "batch": args.batch, "lr": args.lr,
                 "seed": seed, "test": args.test, "noise_test": args.noise_test}
            if arm in TRANSFER_ARMS:
                c.update(pretrain=args.pretrain_task, distill_weight=args.distill_weight,
                         adl_weight=args.adl_weight, apla_fraction=args.apla_fraction)
            cfgs.append(c)
    for c in cfgs:  # fail before training on a bad arm or shape
        ViT(vit_config(c))
    return cfgs


VIDEO_COLUMNS = ["arm", "mixers", "params", "steps", "seeds", "test_mse", "copy_mse", "zero_mse", "vs_copy",
                 "final_loss", "train_s", "ms_step"]


def summarize(rows: list[dict[str, Any]], video: bool = False) -> list[dict[str, Any]]:
    """One row per arm: means over seeds."""
    out = []
    score = "test_mse" if video else "accuracy"
    video_means = (("test_mse", 5), ("copy_mse", 5), ("zero_mse", 5), ("vs_copy", 3), ("final_loss", 5))
    image_means = (("accuracy", 4), ("acc_noisy", 4), ("final_loss", 4))
    means = (video_means if video else image_means) + (("train_s", 1), ("ms_step", 1))
    for arm in dict.fromkeys(r["arm"] for r in rows):
        rs = [r for r in rows if r["arm"] == arm and score in r]
        if not rs:
            continue
        row = {"arm": arm, "mixers": rs[0]["mixers"], "params": rs[0]["params"], "steps": rs[0]["steps"],
               "seeds": len(rs)}
        if not video:
            row["trained"] = rs[0]["trained"]
        for k, nd in means:
            row[k] = round(sum(r[k] for r in rs) / len(rs), nd)
        out.append(row)
    return out


def plot_mse(report: Report, run_dir: Path) -> Path | None:
    if not report.rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report.rows
    fig, ax = plt.subplots(figsize=(1.5 + 1.0 * len(rows), 3.5))
    xs = list(range(len(rows)))
    ax.bar(xs, [r["test_mse"] for r in rows], width=0.6, color="tab:blue", label="PredFormer")
    ax.axhline(rows[0]["copy_mse"], color="tab:red", ls="--", label="copy last frame")
    ax.axhline(rows[0]["zero_mse"], color="tab:gray", ls=":", label="blank frames")
    for x, r in zip(xs, rows):
        ax.annotate(f"{r['ms_step']:.0f} ms", (x, r["test_mse"]), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(xs, [r["arm"] for r in rows])
    ax.set_ylabel("test MSE (next frames)")
    ax.legend(fontsize=7)
    ax.set_title(f"PredFormer layouts on {report.meta.get('task', '')} (label: ms per step)", fontsize=9)
    fig.tight_layout()
    path = run_dir / "mse.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_accuracy(report: Report, run_dir: Path) -> Path | None:
    if not report.rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report.rows
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(rows), 3.5))
    xs = list(range(len(rows)))
    bars = ax.bar([x - 0.2 for x in xs], [r["accuracy"] for r in rows], width=0.4, color="tab:blue",
                  label="test")
    ax.bar([x + 0.2 for x in xs], [r["acc_noisy"] for r in rows], width=0.4, color="tab:orange",
           label="test, more noise")
    for b, r in zip(bars, rows):
        ax.annotate(f"{r['ms_step']:.0f} ms", (b.get_x() + b.get_width(), max(r["accuracy"], r["acc_noisy"])),
                    ha="center", va="bottom", fontsize=7)
    ax.set_xticks(xs, [r["arm"] for r in rows])
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(f"ViT mixers on {report.meta.get('task', '')} (label: ms per training step)", fontsize=9)
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.tight_layout()
    path = run_dir / "accuracy.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("vision", help="issue #19: a small ViT with each vision mixer trained on a tiny image task")
    p.add_argument("--mixers", nargs="+", default=None,
                   help=f"arms: vision mixers, catalogue layers, layouts {LAYOUTS} or transfer arms "
                        f"{TRANSFER_ARMS} (default: {' '.join(DEFAULT_ARMS)}); with --task video the "
                        f"PredFormer layouts {VIDEO_ARMS} (default: all three)")
    p.add_argument("--transfer", action="store_true",
                   help=f"add the arms on a ViT trained here first: {', '.join(TRANSFER_ARMS)}")
    p.add_argument("--pretrain-task", choices=TASKS, default="count", help="the teacher's task (transfer arms)")
    p.add_argument("--distill-weight", type=float, default=1.0, help="V124 attention distillation weight")
    p.add_argument("--adl-weight", type=float, default=0.5, help="V292 attention diversification loss weight")
    p.add_argument("--apla-fraction", type=float, default=1.0, help="V210: fraction of W_O columns trained")
    p.add_argument("--noise-test", type=float, default=0.4,
                   help="noise std of the corrupted test set (acc_noisy; training noise is 0.1)")
    p.add_argument("--task", choices=BENCH_TASKS, default="shapes",
                   help="an image task, or video: V3 PredFormer layouts on bouncing squares")
    p.add_argument("--frames", type=int, default=4, help="video: input frames (= predicted frames)")
    p.add_argument("--squares", type=int, default=2, help="video: bouncing squares per clip")
    p.add_argument("--size", type=int, default=16, help="image side")
    p.add_argument("--patch", type=int, default=2)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--steps", type=int, default=None, help="training steps per arm (quick 150, default 300)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--test", type=int, default=500, help="test images")
    p.add_argument("--quick", action="store_true", help="150 steps per arm")
    add_executor_args(p, workers=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads per configuration")
    p.add_argument("--resume", default=None, help="a run folder to complete (skips finished configurations)")
    p.add_argument("--out", default="runs", help="folder for the run directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console()
    try:
        cfgs = plan(args)
        executor = Executor.from_args(args, threads=args.threads)
    except (ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"bench vision: {e}") from None
    run_dir = Path(args.resume) if args.resume else new_run_dir("vision", args.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    rows = run_sweep(train_one, cfgs, key=config_key, path=run_dir / "results.jsonl", executor=executor,
                     label=lambda r: f"{r.get('arm')} seed {r.get('seed')}", description="vision")
    errors = [r for r in rows if "error" in r]
    for r in errors:
        console.print(f"[red]{r.get('arm')}: {r['error']}[/red]")
    c = cfgs[0]
    if c["task"] == "video":
        meta = {"issue": "#19 vision family, V3 PredFormer",
                "task": f"video {c['size']}x{c['size']}, {c['frames']} frames -> next {c['frames']}, "
                        f"{c['squares']} bouncing squares",
                "model": f"patch {c['patch']}, dim {c['dim']}, heads {c['heads']}, depth {c['depth']}, SwiGLU",
                "training": f"{c['steps']} steps x batch {c['batch']}, AdamW lr {c['lr']} warmup + cosine, "
                            "MSE, "
                            f"{args.seeds} seed(s); test {c['test']} fixed clips",
                "wall_seconds_now": round(time.time() - started, 1), "errors": len(errors)}
        report = Report("vision-video", VIDEO_COLUMNS, summarize(rows, video=True), meta,
                        plots=[partial(plot_mse)])
        report.print("bench vision --task video: PredFormer layouts")
        written = report.write(run_dir)
        console.print(f"wrote {run_dir} ({', '.join(p.name for p in written)})")
        return 0 if not errors else 1
    meta = {"issue": "#19 vision family", "task": f"{c['task']} {c['size']}x{c['size']}",
            "vit": f"patch {c['patch']}, dim {c['dim']}, heads {c['heads']}, depth {c['depth']}, mean pooling, "
                   "sin-cos 2-D positions (aps: none)",
            "training": f"{c['steps']} steps x batch {c['batch']}, AdamW lr {c['lr']} warmup + cosine, "
                        f"{args.seeds} seed(s); test {c['test']} fixed images (noise std 0.1, as in training); "
                        f"acc_noisy: the same images with noise std {c['noise_test']}",
            "transfer": f"teacher: mha ViT trained on {args.pretrain_task} with the same shape and steps; "
                        f"finetune/apla start from it (new head), distill (weight {args.distill_weight}) / "
                        f"copy use its maps, adl (weight {args.adl_weight}) needs none" if args.transfer else "-",
            "wall_seconds_now": round(time.time() - started, 1),
            "train_seconds_all_arms": round(sum(r.get("train_s", 0.0) for r in rows), 1), "errors": len(errors)}
    columns = ["arm", "mixers", "params", "trained", "steps", "seeds", "accuracy", "acc_noisy", "final_loss",
               "train_s", "ms_step"]
    report = Report("vision", columns, summarize(rows), meta, plots=[partial(plot_accuracy)])
    report.print("bench vision: ViT mixers trained from scratch")
    written = report.write(run_dir)
    console.print(f"wrote {run_dir} ({', '.join(p.name for p in written)})")
    return 0 if not errors else 1
