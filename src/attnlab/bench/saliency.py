"""``attnlab bench saliency``: does attention explain what the prediction depends on? [B17]

Per model, layer and head: the attention row of the predicting position against the input saliency of the same
prediction, correlated over the source positions and averaged over samples.

Conventions (named, see docs):

* **Saliency** -- gradient x input: for the predicted output ``y`` (the argmax class) and input vectors
  ``x_j`` (the embeddings the first layer reads), ``s_j = |sum_d (d logit_y / d x_jd) * x_jd|``, normalized
  per row to sum 1 (L1). A position the prediction does not depend on gets 0.
* **Attention** -- each head's softmax weights of the predicting query row over the same source positions,
  read from the ``blocks.{l}.attn.weights`` hook points (``hf.run_with_cache``), never from
  ``output_attentions``. Decoders (SmolLM2): the last position's row. Encoders (MiniLM, a mean-pooled
  sentence encoder): the mean of all query rows, since the pooled output reads every position alike; the
  prediction is the cosine between the pooled embedding of the prompt and that of its answer (prompts:
  ``niah`` in place of ``kv``, whose padding BERT's tokenizer encodes as nothing). Encoder-decoder (our
  cross-attention model): each decoder step's cross-attention row over the source, the saliency of that
  step's predicted token over the source embeddings.
* **Alignment** -- Pearson r and Spearman rho (average ranks for ties) between the attention row and the
  saliency row, per (layer, head), averaged over rows (samples, decoder steps); rows where either side is
  constant are skipped. ``overlap = sum_j min(a_j, s_j)`` is the share of saliency mass the attention covers
  (1 = identical distributions). Aggregates [B17]: the best head; each layer's head-mean attention; the mean
  over all layers and heads. ``explained`` = ``max(r, 0)^2`` averaged over rows: the share of the saliency
  row's variance a linear function of that attention row explains.

    attnlab bench saliency --quick                   # seq2seq, SmolLM2 and MiniLM on short prompts
    attnlab bench saliency --models seq2seq smollm2 minilm --samples 16 --length 256
    attnlab bench saliency --resume runs/saliency-20260101-120000
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .common import Report, new_run_dir

MODELS = ("seq2seq", "smollm2", "minilm")
COLUMNS = [
    "model",
    "rows",
    "layers_x_heads",
    "best_head",
    "best_r",
    "best_explained",
    "best_rho",
    "best_layer_mean_r",
    "all_mean_r",
    "all_mean_explained",
    "all_mean_overlap",
    "head_mean_r",
    "note",
    "seconds",
]


# ---------------------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------------------
def normalize_rows(x: Tensor) -> Tensor:
    """L1-normalize the last axis; all-zero rows stay zero."""
    total = x.sum(-1, keepdim=True)
    return torch.where(total > 0, x / total.clamp_min(1e-30), torch.zeros_like(x))


def grad_x_input(
    forward: Callable[[Tensor], Tensor], embeds: Tensor, target: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Gradient x input saliency of each input position for one output per row.

    forward: ``embeds (B, T, E) -> scores (B, C)`` (logits of the prediction); target: (B,) the class
    explained (None: the argmax). Returns ``(saliency (B, T), target (B,))``, saliency ``|sum_E grad *
    embeds|`` normalized per row. Rows are independent (the gradient of the summed target scores).
    """
    x = embeds.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        scores = forward(x)
        if scores.dim() != 2 or scores.shape[0] != x.shape[0]:
            raise ValueError(
                f"forward must return (B, C) scores for B={x.shape[0]}, got {tuple(scores.shape)}"
            )
        if target is None:
            target = scores.detach().argmax(-1)
        picked = scores.gather(1, target.view(-1, 1)).sum()
        (grad,) = torch.autograd.grad(picked, x)
    return normalize_rows((grad * x.detach()).sum(-1).abs().float()), target


def rankdata(x: Tensor) -> Tensor:
    """Ranks along the last axis (0-based, float), ties get their average rank."""
    order = x.argsort(dim=-1, stable=True)
    sorted_x = x.gather(-1, order)
    n = x.shape[-1]
    pos = torch.arange(n, dtype=torch.float64, device=x.device).expand_as(sorted_x)
    # average rank of each run of equal values: (first + last) / 2 of its positions
    new_run = torch.ones_like(sorted_x, dtype=torch.bool)
    new_run[..., 1:] = sorted_x[..., 1:] != sorted_x[..., :-1]
    run_id = new_run.long().cumsum(-1) - 1
    first = torch.zeros_like(pos).scatter_reduce(-1, run_id, pos, reduce="amin", include_self=False)
    last = torch.zeros_like(pos).scatter_reduce(-1, run_id, pos, reduce="amax", include_self=False)
    avg_sorted = (first.gather(-1, run_id) + last.gather(-1, run_id)) / 2
    return torch.empty_like(avg_sorted).scatter_(-1, order, avg_sorted)


def pearson(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation along the last axis (broadcast); NaN where either side is constant."""
    a, b = torch.broadcast_tensors(a.double(), b.double())
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    den = (a.square().sum(-1) * b.square().sum(-1)).sqrt()
    num = (a * b).sum(-1)
    return torch.where(den > 1e-24, num / den.clamp_min(1e-300), torch.full_like(num, float("nan")))


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation along the last axis (Pearson of average ranks)."""
    a, b = torch.broadcast_tensors(a, b)
    return pearson(rankdata(a), rankdata(b))


def overlap(a: Tensor, b: Tensor) -> Tensor:
    """``sum min(a, b)`` of the L1-normalized rows: the shared mass, 1 for identical distributions."""
    a, b = torch.broadcast_tensors(normalize_rows(a.double()), normalize_rows(b.double()))
    return torch.minimum(a, b).sum(-1)


@dataclass
class Alignment:
    """Running means over rows of the attention-saliency agreement of a model with ``layers`` x ``heads``."""

    layers: int
    heads: int

    def __post_init__(self) -> None:
        L, H = self.layers, self.heads
        self._sum = {k: torch.zeros(L, H, dtype=torch.float64) for k in ("r", "rho", "overlap", "explained")}
        self._cnt = {k: torch.zeros(L, H, dtype=torch.float64) for k in self._sum}
        self._layer = {k: torch.zeros(L, dtype=torch.float64) for k in ("r", "explained")}
        self._layer_cnt = torch.zeros(L, dtype=torch.float64)
        self._all = {"r": 0.0, "explained": 0.0, "overlap": 0.0}
        self._all_cnt = 0
        self.rows = 0

    def add(self, att: Tensor, sal: Tensor) -> None:
        """att (L, H, T) attention rows, sal (T,) saliency of one prediction."""
        if att.shape[:2] != (self.layers, self.heads) or att.shape[-1] != sal.shape[-1]:
            raise ValueError(
                f"att {tuple(att.shape)} must be ({self.layers}, {self.heads}, T) for sal {tuple(sal.shape)}"
            )
        att, sal = att.double(), sal.double()
        r = pearson(att, sal)
        per = {
            "r": r,
            "rho": spearman(att, sal),
            "overlap": overlap(att, sal),
            "explained": r.clamp_min(0) ** 2,
        }
        for k, v in per.items():
            ok = ~torch.isnan(v)
            self._sum[k] += torch.where(ok, v, torch.zeros_like(v))
            self._cnt[k] += ok.double()
        lr = pearson(att.mean(1), sal)
        ok = ~torch.isnan(lr)
        self._layer["r"] += torch.where(ok, lr, torch.zeros_like(lr))
        self._layer["explained"] += torch.where(ok, lr.clamp_min(0) ** 2, torch.zeros_like(lr))
        self._layer_cnt += ok.double()
        mean_att = att.mean((0, 1))
        ar = float(pearson(mean_att, sal))
        if ar == ar:
            self._all["r"] += ar
            self._all["explained"] += max(ar, 0.0) ** 2
            self._all["overlap"] += float(overlap(mean_att, sal))
            self._all_cnt += 1
        self.rows += 1

    def mean(self, key: str) -> Tensor:
        """(L, H) mean of ``r``, ``rho``, ``overlap`` or ``explained`` over rows (NaN where none counted)."""
        return self._sum[key] / self._cnt[key]

    def layer_mean(self, key: str = "r") -> Tensor:
        return self._layer[key] / self._layer_cnt

    def summary(self) -> dict[str, Any]:
        r = self.mean("r")
        flat = torch.nan_to_num(r, nan=-2.0).flatten()
        best = int(flat.argmax())
        bl, bh = divmod(best, self.heads)
        lm = self.layer_mean("r")
        n = max(self._all_cnt, 1)
        return {
            "rows": self.rows,
            "layers_x_heads": f"{self.layers}x{self.heads}",
            "best_head": f"L{bl}.H{bh}",
            "best_r": _f(r[bl, bh]),
            "best_explained": _f(self.mean("explained")[bl, bh]),
            "best_rho": _f(self.mean("rho")[bl, bh]),
            "best_layer_mean_r": _f(torch.nan_to_num(lm, nan=-2.0).max()),
            "best_layer": int(torch.nan_to_num(lm, nan=-2.0).argmax()),
            "all_mean_r": round(self._all["r"] / n, 4),
            "all_mean_explained": round(self._all["explained"] / n, 4),
            "all_mean_overlap": round(self._all["overlap"] / n, 4),
            "head_mean_r": _f(r.nanmean()),
            "pearson": _grid(r),
            "spearman": _grid(self.mean("rho")),
            "overlap": _grid(self.mean("overlap")),
            "layer_mean_r": [_f(x) for x in lm],
        }


def _f(x: Tensor | float) -> float | None:
    v = float(x)
    return None if v != v else round(v, 4)


def _grid(t: Tensor) -> list[list[float | None]]:
    return [[_f(x) for x in row] for row in t]


# ---------------------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------------------
def decoder_rows(model: torch.nn.Module, ids: Tensor) -> tuple[Tensor, Tensor, int]:
    """One prompt ``ids`` (1, T) of a Hugging Face decoder: attention of the last position per layer and head
    ``(L, H, T)`` from the weights hook points, the saliency ``(T,)`` of its predicted next token, that
    token."""
    from ..models import hf

    T = ids.shape[1]
    L = hf.geometry(model).num_layers
    names = [f"blocks.{layer}.attn.weights" for layer in range(L)]
    _, store = hf.run_with_cache(model, ids, names, rows=(T - 1, T), use_cache=False, logits_to_keep=1)
    att = torch.stack([store[n][0, :, 0].float() for n in names])
    emb = model.get_input_embeddings()(ids).detach()

    def forward(x: Tensor) -> Tensor:
        return model(inputs_embeds=x, use_cache=False, logits_to_keep=1).logits[:, -1]

    sal, target = grad_x_input(forward, emb)
    return att, sal[0], int(target[0])


def _pooled(model: torch.nn.Module, embeds: Tensor | None = None, ids: Tensor | None = None) -> Tensor:
    out = model(inputs_embeds=embeds) if embeds is not None else model(input_ids=ids)
    return out.last_hidden_state.mean(1)  # sentence-transformers' mean pooling (no padding here)


def encoder_rows(model: torch.nn.Module, ids: Tensor, answer_ids: Tensor) -> tuple[Tensor, Tensor]:
    """An encoder (BERT family): the mean attention row per layer and head ``(L, H, T)`` and the saliency
    ``(T,)`` of the cosine between the pooled embeddings of ``ids`` and ``answer_ids`` (both (1, T))."""
    from ..models import hf

    T = ids.shape[1]
    L = hf.geometry(model).num_layers
    names = [f"blocks.{layer}.attn.weights" for layer in range(L)]
    _, store = hf.run_with_cache(model, ids, names, rows=(0, T))
    att = torch.stack([store[n][0].float().mean(1) for n in names])
    with torch.no_grad():
        ref = _pooled(model, ids=answer_ids)
    # word embeddings only: BERT adds positions and token types inside, after inputs_embeds
    emb = model.get_input_embeddings()(ids).detach()

    def forward(x: Tensor) -> Tensor:
        return torch.nn.functional.cosine_similarity(_pooled(model, embeds=x), ref).view(-1, 1)

    sal, _ = grad_x_input(forward, emb, torch.zeros(1, dtype=torch.long))
    return att, sal[0]


def seq2seq_rows(model: torch.nn.Module, src: Tensor, tgt_in: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The cross-attention model on a batch: per decoder step, the cross-attention rows ``(B, Tt, L, H, Ts)``,
    the saliency over the source embeddings of that step's predicted token ``(B, Tt, Ts)`` and the predictions
    ``(B, Tt)``."""
    for c in model.cross_layers:
        c.keep_weights = True
    try:
        with torch.no_grad():
            logits = model(src, tgt_in)
        att = torch.stack([c.weights for c in model.cross_layers], dim=1)  # (B, L, H, Tt, Ts)
    finally:
        for c in model.cross_layers:
            c.keep_weights, c.weights = False, None
    pred = logits.argmax(-1)
    emb = model.embed_src(src).detach()
    sal = []
    for t in range(tgt_in.shape[1]):
        s, _ = grad_x_input(lambda x, t=t: model.forward_embedded(x, tgt_in)[:, t], emb, pred[:, t])
        sal.append(s)
    return att.permute(0, 3, 1, 2, 4), torch.stack(sal, dim=1), pred


# ---------------------------------------------------------------------------------------------------------
# the sweep: one configuration per model
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SaliencyConfig:
    model: str
    samples: int = 8
    length: int = 96  # prompt tokens (SmolLM2 / MiniLM)
    tasks: tuple[str, ...] = ("kv", "passkey")
    seed: int = 0
    s2s_steps: int = 300  # training steps of the cross-attention model

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")

    @property
    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def _load(name: str):
    from ..models import hf

    return hf.shared_model(name)  # frozen: the saliency gradients are taken w.r.t. the input embeddings


def _prompts(tok: Any, cfg: SaliencyConfig, length: int, tasks: tuple[str, ...]) -> list[tuple[Tensor, str]]:
    from ..plans.tasks import make_samples

    per = -(-cfg.samples // len(tasks))
    out = []
    for task in tasks:
        for s in make_samples(tok, task, length, per, seed=cfg.seed):
            out.append((torch.tensor([s.ids]), s.answers[0]))
    return out[: cfg.samples]


def run_config(cfg: SaliencyConfig) -> dict[str, Any]:
    """Alignment of one model (top-level and picklable: ``run_sweep`` calls it)."""
    start = time.perf_counter()
    extra: dict[str, Any] = {}
    if cfg.model == "seq2seq":
        from .seq2seq import Seq2SeqConfig, alignment_target, make_batch, train_seq2seq

        s2s = Seq2SeqConfig(seed=cfg.seed)
        model, info = train_seq2seq(s2s, steps=cfg.s2s_steps, seed=cfg.seed)
        for p in model.parameters():
            p.requires_grad_(False)
        src, tgt_in, _ = make_batch(s2s, cfg.samples, torch.Generator().manual_seed(cfg.seed * 31 + 3))
        att, sal, _ = seq2seq_rows(model, src, tgt_in)
        acc = Alignment(s2s.dec_layers, s2s.heads)
        for b in range(att.shape[0]):
            for t in range(att.shape[1]):
                acc.add(att[b, t], sal[b, t])
        gold = alignment_target(s2s.src_len)
        summ = acc.summary()
        bl, bh = (int(x) for x in summ["best_head"][1:].split(".H"))
        extra = {
            "task_accuracy": info["accuracy"],
            "saliency_argmax_on_gold": round(float((sal.argmax(-1) == gold).float().mean()), 4),
            "best_head_argmax_on_gold": round(
                float((att[:, :, bl, bh].argmax(-1) == gold).float().mean()), 4
            ),
        }
        extra["note"] = (
            f"task acc {extra['task_accuracy']:.2f}; argmax on the aligned word: saliency "
            f"{extra['saliency_argmax_on_gold']:.2f}, best head {extra['best_head_argmax_on_gold']:.2f}"
        )
    elif cfg.model == "smollm2":
        model, tok = _load("smollm2")
        L, H = model.config.num_hidden_layers, model.config.num_attention_heads
        acc = Alignment(L, H)
        hits = 0
        for ids, answer in _prompts(tok, cfg, cfg.length, cfg.tasks):
            att, sal, target = decoder_rows(model, ids)
            acc.add(att, sal)
            hits += int(answer.strip().startswith(tok.decode([target]).strip() or "\0"))
        summ = acc.summary()
        extra = {"first_answer_token_correct": round(hits / acc.rows, 4)}
        extra["note"] = f"predicted token starts the answer: {extra['first_answer_token_correct']:.2f}"
    else:
        model, tok = _load("minilm")
        L, H = model.config.num_hidden_layers, model.config.num_attention_heads
        acc = Alignment(L, H)
        cls, sep = tok.cls_token_id, tok.sep_token_id
        # kv pads with " ", which BERT's tokenizer encodes as nothing (plans.tasks would loop): niah instead
        tasks = tuple(dict.fromkeys("niah" if t == "kv" else t for t in cfg.tasks))
        for ids, answer in _prompts(tok, cfg, cfg.length - 2, tasks):  # + [CLS] and [SEP]
            ids = torch.cat([torch.tensor([[cls]]), ids, torch.tensor([[sep]])], dim=1)
            ans = torch.tensor([tok(answer)["input_ids"]])
            att, sal = encoder_rows(model, ids, ans)
            acc.add(att, sal)
        summ = acc.summary()
        extra = {"note": f"tasks {'+'.join(tasks)}; cosine(pooled prompt, pooled answer); mean attention row"}
    return {
        "model": cfg.model,
        **summ,
        **extra,
        "config": asdict(cfg),
        "seconds": round(time.perf_counter() - start, 1),
    }


# ---------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------
def plot_heatmaps(report: Report, run_dir: Path) -> Path | None:
    rows = [r for r in report.rows if r.get("pearson")]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(4.2 * len(rows), 5.2), squeeze=False)
    for ax, r in zip(axes[0], rows, strict=True):
        grid = torch.tensor([[float("nan") if v is None else v for v in row] for row in r["pearson"]])
        im = ax.imshow(grid.numpy(), aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_title(
            f"{r['model']}: Pearson(attention, saliency)\nbest {r['best_head']} r={r['best_r']}", fontsize=9
        )
        L, H = grid.shape
        ax.set_xticks(range(0, H, max(1, H // 12)))
        ax.set_yticks(range(0, L, max(1, L // 15)))
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    path = run_dir / "saliency_alignment.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def register(sub: argparse._SubParsersAction) -> None:
    from ..sweep import add_executor_args

    p = sub.add_parser("saliency", help="attention vs gradient-x-input saliency per layer and head [B17]")
    p.add_argument("--models", nargs="+", choices=MODELS, default=None, help="default: all")
    p.add_argument("--samples", type=int, default=None, help="prompts per model (default 16; quick 6)")
    p.add_argument("--length", type=int, default=None, help="prompt tokens (default 128; quick 80)")
    p.add_argument("--tasks", nargs="+", default=["kv", "passkey"], help="attnlab.plans.tasks generators")
    p.add_argument(
        "--s2s-steps", type=int, default=None, help="training steps of the seq2seq model (default 400)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a small run (about 3 minutes on 2 shared cores)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per model (1: fastest on shared cores, where 2 threads spin)",
    )
    p.add_argument("--out", default="runs")
    p.add_argument(
        "--resume", default=None, help="an earlier run folder: finish it, skipping finished models"
    )
    add_executor_args(p)
    p.set_defaults(func=run)


def configs_from_args(args: argparse.Namespace) -> list[SaliencyConfig]:
    models = args.models or list(MODELS)
    samples = args.samples or (6 if args.quick else 16)
    length = args.length or (80 if args.quick else 128)
    steps = args.s2s_steps or (300 if args.quick else 400)
    return [SaliencyConfig(m, samples, length, tuple(args.tasks), args.seed, steps) for m in models]


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ..sweep import Executor, run_sweep

    configs = configs_from_args(args)
    run_dir = Path(args.resume) if args.resume else new_run_dir("saliency", args.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows = run_sweep(
        run_config,
        configs,
        key=lambda c: c.key,
        path=run_dir / "results.jsonl",
        executor=Executor.from_args(args, threads=args.threads),
        label=lambda r: r["model"],
        description="models",
    )
    report = Report("saliency", COLUMNS, [r for r in rows if "error" not in r], plots=[plot_heatmaps])
    report.meta.update(
        {
            "saliency": "gradient x input on the input embeddings, |sum over dims|, L1 per row; target: "
            "the argmax output (MiniLM: cosine of pooled prompt and answer embeddings)",
            "attention": "hook points blocks.*.attn.weights; decoder: last row; encoder: mean row; seq2seq: "
            "cross-attention row of each decoder step",
            "explained": "max(r, 0)^2 averaged over rows",
            "wall_seconds_now": round(time.perf_counter() - started, 1),
        }
    )
    report.print("bench saliency: attention vs saliency [B17]")
    written = report.write(run_dir)
    Console().print(f"wrote {run_dir} ({', '.join(p.name for p in written)})")
    return 0


__all__ = [
    "Alignment",
    "SaliencyConfig",
    "decoder_rows",
    "encoder_rows",
    "grad_x_input",
    "normalize_rows",
    "overlap",
    "pearson",
    "rankdata",
    "register",
    "run_config",
    "seq2seq_rows",
    "spearman",
]
