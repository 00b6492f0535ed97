"""``attnlab bench cab``: every applicable mechanism x setting x task in one run (B24, CAB's four settings).

    attnlab bench cab --quick --threads 1                          # a few minutes on 2 cores
    attnlab bench cab --quick --settings noncausal-self --mechanisms mha care luong
    attnlab bench cab --quick --name c1                            # resumable: rerun the same line to finish it

One row per (setting, task, mechanism). A pair the mechanism cannot run (its config fixes the other
``causal``, it has no cross-attention, a vision mixer on a sequence task) is a row with the reason in
``skipped``, never an error. Before training, a causal setting checks that no earlier output changes when later
inputs change (the tasks benchmark's screen); a non-causal setting records whether the outputs do see the future
(``sees_future``) instead of rejecting the mechanism -- so CARE and Luong, rejected as non-causal by
``bench tasks``, are scored here. Sequence settings train in the tasks benchmark's backbone / trainer
(time budget, validation early stop, fixed test split); image tasks train the vision ViT for a fixed number of
steps (``attnlab.vision.bench.fit``) and score the test split's accuracy.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ...sweep import Executor, add_executor_args, load_rows, run_sweep
from ..common import Report, new_run_dir
from ..tasks.backbone import Backbone, BackboneConfig
from ..tasks.base import Task, generator
from ..tasks.trainer import TrainConfig, train
from .images import IMAGE_TASKS, image_task
from .settings import (
    PATTERNS,
    SETTINGS,
    CabMech,
    CrossConfig,
    CrossModel,
    CrossTask,
    ReverseConfig,
    ReverseTask,
    build_seq_layer,
    parse_mech,
    setting_leak,
    unsupported,
)

#: the tasks of each setting; "reverse" / "flip" also run where they cannot be solved, to show the setting matters
SETTING_TASKS: dict[str, tuple[str, ...]] = {
    "causal-self": ("mqar", "reverse"),
    "noncausal-self": ("reverse", *IMAGE_TASKS),
    "causal-cross": ("stretch", "flip"),
    "noncausal-cross": ("stretch", "flip"),
}
DEFAULT_MECHANISMS = ("mha", "linear", "lightning", "efficient_attn", "luong", "care", "neighborhood", "halo", "moba",
                      "shift", "lka", "spectral", "window", "uniform")
COLUMNS = ["setting", "task", "mechanism", "score", "details", "steps", "seconds", "sees_future"]


def all_mechanisms() -> list[str]:
    """Every catalogue layer, every vision mixer and the grid patterns: what ``--mechanisms all`` scores (each
    in the settings its registry entry supports; the rest become skipped rows with their reason)."""
    from ...mechanisms import registry
    from ...vision.registry import mixer_names

    names = [e.name for e in registry.catalogue()] + list(PATTERNS)
    return names + [m for m in mixer_names() if m not in names]


def expand_mechanisms(names: list[str]) -> list[str]:
    """``names`` with ``all`` replaced by :func:`all_mechanisms` (duplicates dropped, order kept)."""
    out: list[str] = []
    for n in names:
        for m in all_mechanisms() if n == "all" else [n]:
            if m not in out:
                out.append(m)
    return out


@dataclass(frozen=True)
class Scale:
    """Sizes and budgets of a run (``--quick`` or the default)."""

    seq_len: int = 32
    vocab: int = 32
    image_size: int = 16
    patch: int = 2
    dim: int = 64
    heads: int = 2
    layers: int = 2
    budget_s: float = 60.0  # sequence tasks: wall clock per configuration
    lr: float = 3e-3
    batch: int = 64
    image_steps: int = 1000
    test_size: int = 1000

    @classmethod
    def quick(cls) -> Scale:
        return cls(seq_len=16, vocab=16, dim=32, budget_s=8.0, batch=32, image_steps=150, test_size=300)


@dataclass(frozen=True)
class CabRun:
    setting: str
    task: str
    mech: CabMech
    scale: Scale
    seed: int = 0
    key: str = field(default="", compare=False)

    def ident(self) -> dict[str, Any]:
        return {"setting": self.setting, "task": self.task, "mechanism": self.mech.label,
                "layers": self.mech.describe(), "scale": asdict(self.scale), "seed": self.seed}


def config_key(ident: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(ident, sort_keys=True, default=repr).encode()).hexdigest()[:16]


def plan(settings: tuple[str, ...], mechanisms: tuple[CabMech, ...], scale: Scale, seed: int = 0) -> list[CabRun]:
    """Every mechanism x setting x task, in that nesting (skipped pairs included: they become rows)."""
    out = []
    for s in settings:
        if s not in SETTINGS:
            raise ValueError(f"unknown setting {s!r}; one of {SETTINGS}")
        for t in SETTING_TASKS[s]:
            for m in mechanisms:
                rc = CabRun(s, t, m, scale, seed)
                out.append(replace(rc, key=config_key(rc.ident())))
    return out


def seq_task(rc: CabRun) -> Task:
    sc = rc.scale
    if rc.task == "mqar":
        from ..tasks.mqar import MQAR, MQARConfig

        return MQAR(MQARConfig(vocab=4 * sc.vocab, seq_len=2 * sc.seq_len, num_pairs=sc.seq_len // 4,
                               test_size=sc.test_size))
    if rc.task == "reverse":
        return ReverseTask(ReverseConfig(vocab=sc.vocab, seq_len=sc.seq_len, test_size=sc.test_size))
    return CrossTask(CrossConfig(kind=rc.task, vocab=sc.vocab, seq_len=sc.seq_len, test_size=sc.test_size))


def seq_models(rc: CabRun, task: Task):
    """(make_mixer, build_model or None, cross) for a sequence configuration."""
    sc = rc.scale
    causal = rc.setting.startswith("causal")
    bb = BackboneConfig(dim=sc.dim, heads=sc.heads, layers=sc.layers)
    if rc.setting.endswith("cross"):
        def build() -> CrossModel:
            return CrossModel(bb, rc.mech, vocab=task.vocab, num_classes=task.num_classes, seq_len=sc.seq_len,
                              causal=causal)
        return bb, None, build, True

    def make_mixer(i: int) -> torch.nn.Module:
        return build_seq_layer(rc.mech, sc.dim, sc.heads, task.train_len, causal)

    def build_bb() -> Backbone:
        return Backbone(bb, make_mixer, vocab=task.vocab, num_classes=task.num_classes, in_features=task.in_features)
    return bb, make_mixer, build_bb, False


def run_seq(rc: CabRun) -> dict[str, Any]:
    task = seq_task(rc)
    bb, make_mixer, build, cross = seq_models(rc, task)
    torch.manual_seed(0)
    x = task.sample(2, generator(0)).x
    at = (x.shape[1] // (4 if cross else 2))
    leak = setting_leak(build(), x, at, cross)
    if rc.setting.startswith("causal") and leak > 1e-4:
        raise ValueError(f"not causal: outputs before a position change by {leak:.2g} with later inputs")
    sc = rc.scale
    tcfg = TrainConfig(lr=sc.lr, batch_size=sc.batch, budget_s=sc.budget_s, eval_every=25)
    result = train(task, make_mixer, bb, tcfg, rc.seed, build_model=build if cross else None)
    result.pop("model")
    return {"score": result["score"], "details": task.describe(result["metrics"]), "steps": result["steps"],
            "seconds": result["seconds"], "stopped": result["stopped"], "sees_future": leak > 1e-4,
            "params": result["params"]}


def run_image(rc: CabRun) -> dict[str, Any]:
    from ...core.patterns.vision import HaloBlocks
    from ...mechanisms.heads import HeadsConfig
    from ...vision.bench import accuracy, fit
    from ...vision.vit import ViT, ViTConfig, param_count

    sc = rc.scale
    task = image_task(rc.task, sc.image_size)
    patch = sc.patch if task.size % sc.patch == 0 else 1
    mixer, mixer_options = rc.mech.name, dict(rc.mech.options)
    if mixer == "halo":
        g = task.size // patch
        mixer, mixer_options = "mha", {"pattern": HaloBlocks(grid=(g, g), block=2, halo=1), **mixer_options}
    cfg = ViTConfig(image_size=task.size, patch=patch, channels=1, attn=HeadsConfig(dim=sc.dim, heads=sc.heads,
                    causal=False), depth=sc.layers, classes=task.classes, mixer=mixer, pooling="mean",
                    mixer_options={mixer: mixer_options} if mixer_options else {})
    torch.manual_seed(rc.seed)
    model = ViT(cfg)
    # a non-causal setting: does an early patch's output depend on later patches? (recorded, never rejected)
    with torch.no_grad():
        img = task.sample(1, generator(0))[0]
        t1 = model.features(img)
        img2 = img.clone()
        img2[..., task.size // 2:, :] += 1.0
        t2 = model.features(img2)
    sees = bool((t1[:, :1] - t2[:, :1]).abs().max() > 1e-4)
    losses, seconds = fit(model, list(model.parameters()), task,
                          {"steps": sc.image_steps, "lr": sc.lr, "batch": sc.batch}, rc.seed)
    model.eval()
    acc = accuracy(model, task, sc.test_size, 10_007 + rc.seed)
    return {"score": round(acc, 4), "details": f"test={acc:.3f} loss={losses[-1]:.3f}", "steps": sc.image_steps,
            "seconds": round(seconds, 1), "stopped": "max_steps", "sees_future": sees,
            "params": param_count(model)}


def run_one(rc: CabRun, threads: int | None = None) -> dict[str, Any]:
    """One configuration: a skipped row (with its reason), a scored row, or an error row."""
    if threads:
        torch.set_num_threads(threads)
    row: dict[str, Any] = {"key": rc.key, **rc.ident()}
    image = rc.task in IMAGE_TASKS
    reason = unsupported(rc.mech, rc.setting, image=image)
    if reason is not None:
        row.update(score=None, skipped=reason)
        return row
    t0 = time.perf_counter()
    try:
        row.update(run_image(rc) if image else run_seq(rc))
    except Exception as e:  # noqa: BLE001 - recorded, the run goes on
        row.update(error=f"{type(e).__name__}: {e}", score=None, seconds=round(time.perf_counter() - t0, 1))
    return row


def _error_fields(rc: CabRun) -> dict[str, Any]:
    return {**rc.ident(), "score": None}


def _label(row: dict[str, Any]) -> str:
    s = row.get("score")
    what = "skipped" if "skipped" in row else ("error" if s is None else f"{s:.3f}")
    return f"{row['setting']} {row['task']} {row['mechanism']}: {what}"


def execute(configs: list[CabRun], run_dir: Path, executor: Executor, show_progress: bool = True
            ) -> list[dict[str, Any]]:
    """Run the configurations not yet in ``run_dir/results.jsonl`` (error rows are run again)."""
    return run_sweep(run_one, configs, key=lambda rc: rc.key, path=run_dir / "results.jsonl", executor=executor,
                     label=_label, description="cab", show_progress=show_progress, error_fields=_error_fields)


def table_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The report's rows: details say why a row has no score."""
    out = []
    for r in rows:
        t = {c: r.get(c) for c in COLUMNS}
        if "skipped" in r:
            t["details"] = "skipped: " + r["skipped"]
        elif "error" in r:
            t["details"] = "error: " + r["error"][:100]
        out.append(t)
    return out


def plot_scores(report: Report, run_dir: Path) -> Path | None:
    """A mechanism x (setting, task) heatmap of the scores; blank where skipped or failed."""
    cols = list(dict.fromkeys(f"{r['setting']}\n{r['task']}" for r in report.rows))
    mechs = list(dict.fromkeys(r["mechanism"] for r in report.rows))
    if not any(r.get("score") is not None for r in report.rows):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid = np.full((len(mechs), len(cols)), np.nan)
    for r in report.rows:
        if r.get("score") is not None:
            grid[mechs.index(r["mechanism"]), cols.index(f"{r['setting']}\n{r['task']}")] = r["score"]
    fig, ax = plt.subplots(figsize=(1.0 * len(cols) + 2.5, 0.4 * len(mechs) + 2.0))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=7)
    ax.set_yticks(range(len(mechs)), mechs, fontsize=8)
    for i in range(len(mechs)):
        for j in range(len(cols)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=6, color="w")
    fig.colorbar(im, ax=ax, label="score (accuracy)")
    ax.set_title("attnlab bench cab: score per mechanism x setting / task (blank: skipped or failed)")
    fig.tight_layout()
    path = run_dir / "cab-scores.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cab", help="CAB (B24): every mechanism in the four attention settings, sequence and "
                                   "image tasks")
    p.add_argument("--quick", action="store_true", help="small sizes and budgets (a few minutes)")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    p.add_argument("--mechanisms", nargs="+", default=None,
                   help="catalogue names, vision mixers, " + " / ".join(PATTERNS) + ", name:key=value,..., or "
                        "'all' (every catalogue layer, vision mixer and pattern); default: all, and with "
                        "--quick " + " ".join(DEFAULT_MECHANISMS))
    p.add_argument("--tasks", nargs="+", default=None, help="only these tasks (default: every task of a setting)")
    p.add_argument("--budget", type=float, default=None, help="seconds per sequence configuration")
    p.add_argument("--image-steps", type=int, default=None, help="training steps per image configuration")
    p.add_argument("--seed", type=int, default=0)
    add_executor_args(p, workers=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per configuration")
    p.add_argument("--out", default="runs", help="folder for the run directory")
    p.add_argument("--name", default=None, help="run folder name under --out; an existing one is resumed")
    p.add_argument("--resume", default=None, help="a run folder to finish (same arguments)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    scale = Scale.quick() if args.quick else Scale()
    over = {"budget_s": args.budget, "image_steps": args.image_steps}
    scale = replace(scale, **{k: v for k, v in over.items() if v})
    names = args.mechanisms or (list(DEFAULT_MECHANISMS) if args.quick else ["all"])
    mechs = tuple(parse_mech(m) for m in expand_mechanisms(names))
    configs = plan(tuple(args.settings), mechs, scale, args.seed)
    if args.tasks:
        configs = [c for c in configs if c.task in args.tasks]
    if args.resume:
        run_dir = Path(args.resume)
    elif args.name:
        run_dir = Path(args.out) / args.name
        run_dir.mkdir(parents=True, exist_ok=True)
    else:
        run_dir = new_run_dir("cab" + ("-quick" if args.quick else ""), args.out)
    done = {r["key"] for r in load_rows(run_dir / "results.jsonl") if "error" not in r}
    todo = sum(c.key not in done for c in configs)
    print(f"cab: {len(configs)} configurations ({todo} to run) -> {run_dir}")
    t0 = time.perf_counter()
    rows = execute(configs, run_dir, Executor.from_args(args, threads=args.threads))
    wall = round(time.perf_counter() - t0, 1)
    report = Report(kind="cab", columns=COLUMNS, meta={"scale": asdict(scale), "wall_s": wall,
                                                       "configurations": len(configs), "ran_now": todo},
                    plots=[plot_scores])
    for r in table_rows(rows):
        report.add(**r)
    report.write(run_dir)
    report.print()
    ok = sum(r.get("score") is not None for r in rows)
    skipped = sum("skipped" in r for r in rows)
    print(f"{ok} scored, {skipped} skipped, {len(rows) - ok - skipped} failed; {wall} s; {run_dir}")
    return 0
