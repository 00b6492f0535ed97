"""Train a backbone on a task under a wall-clock budget, stop early at the target, score the fixed test splits.

Batches are sampled online (a fresh stream per seed); the validation set (same distribution as training,
its own seed) decides early stopping and which learning rate of the grid is reported; the test splits are
fixed by the task seed and only read once, at the end, with the best validation checkpoint.

``train(..., stability=StabilityOptions(...))`` adds the probes of ``attnlab bench stability`` (B252): a z-loss
term, a log of the task loss, the mean output ``log Z`` and each block's largest attention logit every
``log_every`` steps, and the validation loss at initialization and of the final (not the best) weights.
Without it (the quality benchmark) training is unchanged.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .backbone import AttentionLogitMonitor, Backbone, BackboneConfig, task_loss
from .base import Batch, Task, generator


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 1e-3
    batch_size: int = 64
    max_steps: int = 100_000
    budget_s: float = 60.0  # wall clock for training and validation of one configuration
    eval_every: int = 50
    # stop once the validation score reaches it; None: train for the whole budget (flip-flop, whose claim is
    # about rare out-of-distribution errors that an in-distribution validation set at 1.0 cannot see)
    target: float | None = 0.99
    warmup: int = 30
    # None: constant after the warmup; N: cosine from lr down to lr / 10 over steps warmup..N, then lr / 10
    decay_steps: int | None = None
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_batch: int = 250

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.batch_size < 1 or self.max_steps < 1 or self.budget_s <= 0:
            raise ValueError("lr, batch_size, max_steps and budget_s must be positive")
        if self.decay_steps is not None and self.decay_steps <= self.warmup:
            raise ValueError(f"decay_steps={self.decay_steps} must exceed warmup={self.warmup}")


@dataclass(frozen=True)
class StabilityOptions:
    """Training extras of the stability benchmark (B252), separate from :class:`TrainConfig` so the quality
    benchmark's configurations (and their resume keys) stay as they were.

    z_loss: coefficient of ``mean(log^2 Z)`` of the output logits added to the loss (0: off; the paper: 1e-4);
    log_every: record step, learning rate, task loss, mean ``log Z`` and each block's max attention logit on the
    training batch every ``log_every`` steps (and at the first and last step; 0: no log)."""

    z_loss: float = 0.0
    log_every: int = 0

    def __post_init__(self) -> None:
        if self.z_loss < 0:
            raise ValueError(f"z_loss must be >= 0, got {self.z_loss}")
        if self.log_every < 0:
            raise ValueError(f"log_every must be >= 0, got {self.log_every}")


def evaluate_loss(model: Backbone, task: Task, batch: Batch, eval_batch: int = 250) -> float:
    """Mean task loss (cross-entropy or squared error, no aux or z-loss) over the scored positions of ``batch``;
    ``nan`` when the model's outputs are not finite."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(batch), eval_batch):
            b = batch.slice(i, i + eval_batch)
            stats: dict[str, float] = {}
            task_loss(model, task.kind, b.x, b.y, b.mask, score=False, stats=stats)
            n = int(b.mask.sum())
            total += stats["task_loss"] * n
            count += n
    model.train()
    return total / max(count, 1)


def evaluate(model: Backbone, task: Task, batch: Batch, eval_batch: int = 250) -> float:
    """Accuracy over the scored positions (classify) or ``1 - MSE`` (regress) of ``batch``."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(batch), eval_batch):
            b = batch.slice(i, i + eval_batch)
            _, score, _ = task_loss(model, task.kind, b.x, b.y, b.mask)
            total += float(score.sum())
            count += score.numel()
    model.train()
    mean = total / max(count, 1)
    return mean if task.kind == "classify" else 1.0 - mean


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then constant (the step count reached within a wall-clock budget is not known in advance),
    or, with ``decay_steps``, a cosine down to ``lr / 10`` at that step (a schedule fixed in steps, so it does
    not depend on the machine's speed; a run that stops earlier simply ends at a higher rate)."""
    warm = min(1.0, (step + 1) / max(cfg.warmup, 1))
    if cfg.decay_steps is None or step < cfg.warmup:
        return cfg.lr * warm
    frac = min(1.0, (step - cfg.warmup) / (cfg.decay_steps - cfg.warmup))
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def train(
    task: Task,
    make_mixer: Callable[[int], nn.Module],
    backbone: BackboneConfig,
    cfg: TrainConfig,
    seed: int,
    *,
    test: dict[str, Batch] | None = None,
    val: Batch | None = None,
    stability: StabilityOptions | None = None,
    build_model: Callable[[], nn.Module] | None = None,
) -> dict[str, Any]:
    """Train one configuration; returns steps, seconds, why it stopped, the validation curve and test metrics.

    ``test`` / ``val`` default to the task's fixed sets for ``seed`` (pass them to share across a grid).
    ``stability``: also ``initial_loss`` / ``final_loss`` (validation task loss before training and of the last
    weights; None when training diverged or the loss is not finite) and ``log`` (rows ``{step, lr, loss, log_z,
    max_logit: [per block]}``), with the z-loss term in the training loss.
    ``build_model``: a model with the Backbone's interface (``forward(x) -> (hidden, aux)``, ``logits``) to train
    instead of the Backbone (``attnlab bench cab``'s cross-attention model); ``make_mixer`` is then unused.
    """
    torch.manual_seed(seed)
    model = build_model() if build_model is not None else Backbone(
        backbone, make_mixer, vocab=task.vocab, num_classes=task.num_classes, in_features=task.in_features
    )
    val = val if val is not None else task.val_set(seed)
    test = test if test is not None else task.test_sets(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    gen = generator(seed * 31 + 17)
    start = time.perf_counter()
    curve: list[tuple[int, float, float]] = []
    best, best_state, best_step, stopped, step = -math.inf, None, 0, "max_steps", 0
    last_loss = math.nan
    extra: dict[str, Any] = {}
    log: list[dict[str, Any]] = []
    if stability is not None:
        extra["initial_loss"] = round(evaluate_loss(model, task, val, cfg.eval_batch), 5)
    while step < cfg.max_steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        b = task.sample(cfg.batch_size, gen)
        if stability is None:
            loss, _, _ = task_loss(model, task.kind, b.x, b.y, b.mask, score=False)
        else:
            loss = _probed_step(model, task, b, stability, step, cfg, log)
        if not torch.isfinite(loss):
            stopped = "diverged"
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        last_loss = float(loss.detach())
        out_of_time = time.perf_counter() - start > cfg.budget_s
        if step % cfg.eval_every == 0 or out_of_time or step == cfg.max_steps:
            v = evaluate(model, task, val, cfg.eval_batch)
            curve.append((step, round(time.perf_counter() - start, 2), round(v, 4)))
            if v >= best:  # on a tie the later, longer-trained checkpoint
                best, best_state, best_step = v, copy.deepcopy(model.state_dict()), step
            if cfg.target is not None and v >= cfg.target:
                stopped = "target"
                break
            if out_of_time:
                stopped = "budget"
                break
    seconds = time.perf_counter() - start
    if stability is not None:
        final = evaluate_loss(model, task, val, cfg.eval_batch) if stopped != "diverged" else math.nan
        extra.update(final_loss=_finite(final), log=log)
    if best_state is not None:
        model.load_state_dict(best_state)
    metrics = {name: round(evaluate(model, task, batch, cfg.eval_batch), 4) for name, batch in test.items()}
    return {
        "steps": step,
        "seconds": round(seconds, 1),
        "stopped": stopped,
        "val": round(best, 4) if best_state is not None else None,
        "best_step": best_step,  # the step of the scored checkpoint
        "loss": round(last_loss, 4),
        "curve": curve,
        "metrics": metrics,
        "score": round(task.score(metrics), 4),
        "params": sum(p.numel() for p in model.parameters()),
        "model": model,
        **extra,
    }


def _probed_step(model: Backbone, task: Task, b: Batch, opts: StabilityOptions, step: int, cfg: TrainConfig,
                 log: list[dict[str, Any]]) -> torch.Tensor:
    """The training loss of one batch with the z-loss term; on a logged step also records the probes."""
    logged = opts.log_every > 0 and (step % opts.log_every == 0 or step == cfg.max_steps - 1)
    if not logged:
        return task_loss(model, task.kind, b.x, b.y, b.mask, score=False, z_loss=opts.z_loss)[0]
    stats: dict[str, float] = {}
    with AttentionLogitMonitor(model) as mon:
        loss = task_loss(model, task.kind, b.x, b.y, b.mask, score=False, z_loss=opts.z_loss, stats=stats)[0]
    log.append({"step": step, "lr": lr_at(step, cfg), "loss": _finite(stats["task_loss"]),
                "log_z": _finite(stats.get("log_z", math.nan)),
                "max_logit": [None if v is None else _finite(v) for v in mon.values()]})
    return loss


def _finite(x: float) -> float | None:
    """Rounded for the JSON log; None for inf / nan (JSON has neither)."""
    return round(x, 5) if math.isfinite(x) else None
