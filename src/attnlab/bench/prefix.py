"""``attnlab bench prefix``: when do prompting and prefix-tuning work? [B200]

Context-based fine-tuning (a discrete prompt, a trained soft prompt, prefix-tuning) against full
fine-tuning on generated tasks of two kinds, in two models:

* **elicit** -- the model already has the skill; the context must only select it. Prefix-tuning should work.
* **new** -- the task needs an attention pattern over the content that the model does not have. A
  prefix cannot change the relative attention over the content, only add a term in a fixed direction per
  layer [B200]: it should fail where fine-tuning succeeds.

Models:

* ``backbone`` -- the quality benchmark's backbone (``bench/tasks/backbone.py``: short conv + ``mha`` mixer
  + MLP, 2 blocks), pretrained here on a mixture of two skills, each announced by a marker token:
  ``x = [marker, fill, fill, fill, s_1 .. s_n]`` (the fillers keep the marker out of the content's short
  convolution, so the skill reaches the content only through attention, as a prefix would). Skills:
  ``first`` (every position outputs ``s_1``), ``max`` / ``min`` (running maximum / minimum), ``lagK`` (the
  token ``K`` positions back). Pretraining: ``first`` + ``max``. Adaptation tasks use a neutral marker never
  seen in pretraining: ``first`` (elicit), ``lag5`` (new: a relative-position pattern), ``min`` (new: the
  reverse of a content pattern the model has). Scored: content positions 5.. (beyond the convolution's reach).
* ``smollm2`` -- SmolLM2-135M on word lists ``" k1: v1, k2: v2, ... kq:"``: ``kv`` (elicit: answer the
  value of the queried key, associative recall) and ``kv-prev`` (new: answer the value of the pair *before*
  the queried key). Accuracy: the argmax next token over the whole vocabulary equals the answer word.

Methods: ``zero`` (the model as it is), ``prompt`` (backbone: the best single discrete marker token on the
validation set; SmolLM2: ``fewshot``, three solved examples in the prompt), ``soft`` (``P`` trained input
embeddings before the content), ``prefix`` (``P`` trained key and value vectors per layer and key/value head),
``finetune`` (every weight trained; on SmolLM2 only outside ``--quick``).

Diagnostic [B200], per layer and head: with a context (soft prompt, prefix) or after fine-tuning, how far the
content-normalized attention moved from the original model's on the same test inputs: the total variation
``0.5 * sum_j |A_orig(t, j) - A_new(t, j) / sum_content A_new(t)|`` averaged over content query rows
``t >= 1`` (the first row has one key). It is exactly 0 in the first layer for any context, where the content
hidden states are unchanged (in the backbone a soft prompt also enters the short convolution before the first
mixer, so only a prefix is exactly 0 there). ``nosink``: the same without the first content position, where
decoders park their attention sink, which a context takes over. ``prefix_mass``: mean attention on the
prefix.

    attnlab bench prefix --quick
    attnlab bench prefix --models backbone --seeds 0 1 2
    attnlab bench prefix --resume runs/prefix-20260101-120000
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import Report, new_run_dir
from .prefix_tuning import HFPrefix, HFSoftPrompt, PrefixAttention, content_shift, hf_weights

MODELS = ("backbone", "smollm2")
BACKBONE_TASKS = {"first": "elicit", "lag5": "new", "min": "new", "max": "elicit"}
HF_TASKS = {"kv": "elicit", "kv-prev": "new"}
BACKBONE_METHODS = ("zero", "prompt", "soft", "prefix", "finetune")
HF_METHODS = ("zero", "fewshot", "soft", "prefix", "finetune")
COLUMNS = [
    "model",
    "task",
    "kind",
    "method",
    "seed",
    "trainable",
    "steps",
    "accuracy",
    "shift_mean",
    "shift_l0",
    "shift_last",
    "shift_nosink",
    "prefix_mass",
    "seconds",
]


# ---------------------------------------------------------------------------------------------------------
# backbone skills
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SkillConfig:
    """The backbone's generated skills. ``symbols`` content tokens, ``length`` content positions, ``gap``
    filler tokens between the marker and the content, ``skip`` content positions not scored, ``pretrain`` the
    skills learned with their markers."""

    symbols: int = 16
    length: int = 12
    gap: int = 3
    skip: int = 5
    pretrain: tuple[str, ...] = ("first", "max")

    def __post_init__(self) -> None:
        if self.skip >= self.length:
            raise ValueError(f"skip ({self.skip}) must be < length ({self.length})")
        for s in self.pretrain:
            skill_targets(s, torch.zeros(1, self.length, dtype=torch.long))

    def marker(self, skill: str) -> int:
        return self.symbols + self.pretrain.index(skill)

    @property
    def filler(self) -> int:
        return self.symbols + len(self.pretrain)

    @property
    def neutral(self) -> int:
        return self.filler + 1

    @property
    def vocab(self) -> int:
        return self.neutral + 1


def skill_targets(skill: str, s: Tensor) -> Tensor:
    """(n, T) targets of ``skill`` on content ``s`` (n, T)."""
    if skill == "first":
        return s[:, :1].expand_as(s).clone()
    if skill == "max":
        return s.cummax(1).values
    if skill == "min":
        return s.cummin(1).values
    if skill.startswith("lag") and skill[3:].isdigit():
        k = int(skill[3:])
        y = torch.zeros_like(s)
        y[:, k:] = s[:, :-k]
        return y
    raise ValueError(f"unknown skill {skill!r}: first, max, min or lagK")


def skill_batch(cfg: SkillConfig, skill: str, n: int, gen: torch.Generator, marker: int | None = None):
    """``(x, y, mask)``: x ``(n, 1 + gap + length)`` = ``[marker, fill * gap, content]``; ``marker`` None: the
    neutral one. Scored: content positions ``skip..``."""
    from .tasks.base import Batch

    if skill.startswith("lag") and int(skill[3:]) > cfg.skip:
        raise ValueError(f"{skill}: the lag must be <= skip ({cfg.skip}) so every scored target exists")
    s = torch.randint(0, cfg.symbols, (n, cfg.length), generator=gen)
    head = torch.full((n, 1 + cfg.gap), cfg.filler)
    head[:, 0] = cfg.neutral if marker is None else marker
    x = torch.cat([head, s], 1)
    y = torch.cat([torch.zeros(n, 1 + cfg.gap, dtype=torch.long), skill_targets(skill, s)], 1)
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[:, 1 + cfg.gap + cfg.skip :] = True
    return Batch(x, y, mask)


def pretrain_batch(cfg: SkillConfig, n: int, gen: torch.Generator):
    """A batch mixing the pretraining skills, each with its marker."""
    from .tasks.base import Batch

    parts = [skill_batch(cfg, s, n // len(cfg.pretrain), gen, cfg.marker(s)) for s in cfg.pretrain]
    return Batch(*(torch.cat([getattr(b, f) for b in parts]) for f in ("x", "y", "mask")))


@dataclass(frozen=True)
class BackboneSetup:
    dim: int = 32
    heads: int = 2
    layers: int = 2
    pretrain_steps: int = 600
    batch: int = 32
    lr: float = 3e-3


def build_backbone(skills: SkillConfig, setup: BackboneSetup, seed: int) -> nn.Module:
    from .tasks.backbone import Backbone, BackboneConfig
    from .tasks.mechanisms import LayerSpec, build_layer

    torch.manual_seed(seed)
    cfg = BackboneConfig(dim=setup.dim, heads=setup.heads, layers=setup.layers, mlp=True)
    return Backbone(
        cfg,
        lambda i: build_layer(LayerSpec("mha"), setup.dim, setup.heads, i, setup.layers),
        vocab=skills.vocab,
        num_classes=skills.symbols,
    )


def backbone_hidden(model: nn.Module, x: Tensor, soft: Tensor | None = None) -> Tensor:
    """The backbone's final hidden states of the content ``(B, T, d)``; ``soft`` (P, d) embeddings go before
    it (the backbone's own forward, with the soft prompt spliced in after the embedding)."""
    h = model.embed(x)
    P = 0 if soft is None else soft.shape[0]
    if P:
        h = torch.cat([soft.expand(x.shape[0], -1, -1), h], dim=1)
    for block in model.blocks:
        h, _ = block(h)
    return model.norm(h)[:, P:]


def backbone_loss(model: nn.Module, batch, soft: Tensor | None = None) -> tuple[Tensor, float]:
    h = backbone_hidden(model, batch.x, soft)
    out = model.logits(h[batch.mask])
    target = batch.y[batch.mask]
    return F.cross_entropy(out, target), float((out.argmax(-1) == target).float().mean())


def _fit(params: list[Tensor], loss_fn, steps: int, lr: float, seed: int) -> float:
    """Adam with a short warmup; returns the last loss."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(seed)
    loss = torch.zeros(())
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 20)
        loss = loss_fn(gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    return float(loss.detach())


def pretrain_backbone(
    skills: SkillConfig, setup: BackboneSetup, seed: int
) -> tuple[nn.Module, dict[str, float]]:
    """Train the backbone on the pretraining mixture; returns it (frozen, eval) and its per-skill accuracy."""
    model = build_backbone(skills, setup, seed)
    _fit(
        list(model.parameters()),
        lambda g: backbone_loss(model, pretrain_batch(skills, setup.batch, g))[0],
        setup.pretrain_steps,
        setup.lr,
        seed * 7 + 1,
    )
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed * 7 + 2)
    with torch.no_grad():
        acc = {
            s: round(backbone_loss(model, skill_batch(skills, s, 256, gen, skills.marker(s)))[1], 4)
            for s in skills.pretrain
        }
    return model, acc


def wrap_prefix(model: nn.Module, prefix_len: int) -> nn.Module:
    """A copy of the backbone whose mixers carry ``prefix_len`` trainable K/V (0: plain, recording)."""
    m = copy.deepcopy(model)
    for block in m.blocks:
        block.mixer = PrefixAttention(block.mixer, prefix_len)
    return m


def backbone_weights(model: nn.Module, x: Tensor, soft: Tensor | None = None) -> list[Tensor]:
    """Per layer the weights ``(B, H, T, P + T)`` of the content queries (``PrefixAttention`` mixers)."""
    for b in model.blocks:
        b.mixer.keep_weights = True
    try:
        with torch.no_grad():
            backbone_hidden(model, x, soft)
        P = 0 if soft is None else soft.shape[0]
        return [b.mixer.weights[:, :, P:] for b in model.blocks]
    finally:
        for b in model.blocks:
            b.mixer.keep_weights, b.mixer.weights = False, None


def shift_summary(w_ref: list[Tensor], w_new: list[Tensor], prefix_len: int) -> dict[str, Any]:
    """Per layer and head: the content-attention shift (mean TV over query rows >= 1 and samples) and the
    prefix mass; ``nosink``: the same with the first content position left out of both sides (rows >= 2),
    since a context relocates the attention sink that decoders park on their first token."""
    grid, mass, nosink = [], [], []
    for a, b in zip(w_ref, w_new, strict=True):
        tv, m = content_shift(a, b, prefix_len)
        grid.append(tv[:, :, 1:].mean((0, 2)))
        mass.append(m[:, :, 1:].mean((0, 2)))
        rest = a[..., 1:]
        rest = rest / rest.sum(-1, keepdim=True).clamp_min(1e-30)
        tv2, _ = content_shift(
            rest, torch.cat([b[..., :prefix_len], b[..., prefix_len + 1 :]], -1), prefix_len
        )
        nosink.append(tv2[:, :, 2:].mean((0, 2)))
    g = torch.stack(grid)
    by_layer = g.mean(1)
    ns = torch.stack(nosink).mean(1)
    return {
        "shift_by_layer": [round(float(x), 5) for x in by_layer],
        "shift_grid": [[round(float(x), 5) for x in row] for row in g],
        "shift_nosink_by_layer": [round(float(x), 5) for x in ns],
        "prefix_mass_by_layer": [round(float(x), 4) for x in torch.stack(mass).mean(1)],
        "shift_mean": round(float(by_layer.mean()), 5),
        "shift_l0": round(float(by_layer[0]), 6),
        "shift_last": round(float(by_layer[-1]), 5),
        "shift_nosink": round(float(ns.mean()), 5),
        "prefix_mass": round(float(torch.stack(mass).mean()), 4) if prefix_len else 0.0,
    }


# ---------------------------------------------------------------------------------------------------------
# SmolLM2 word lists
# ---------------------------------------------------------------------------------------------------------
_WORDS = (
    "apple river stone cloud maple tiger violin garden candle harbor silver meadow copper falcon "
    "lantern orchid pepper quartz saddle timber velvet walnut willow anchor basket cactus fossil "
    "glacier hammer island kettle ladder magnet needle oyster ribbon spiral umbrella valley wagon "
    "beacon cobalt echo ivory jungle lotus"
).split()


def single_token_words(tok: Any) -> list[str]:
    """The words of the list that the tokenizer encodes as one token after a space."""
    return [w for w in _WORDS if len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1]


def kv_example(
    task: str, rng: random.Random, keys: list[str], values: list[str], pairs: int
) -> tuple[str, str]:
    """``(" k1: v1, ... kq:", answer)``; the queried pair is never the first (``kv-prev`` reads the one
    before it)."""
    ks, vs = rng.sample(keys, pairs), rng.sample(values, pairs)
    q = rng.randrange(1, pairs)
    answer = vs[q] if task == "kv" else vs[q - 1]
    return "".join(f" {k}: {v}," for k, v in zip(ks, vs, strict=True)) + f" {ks[q]}:", answer


def kv_set(tok: Any, task: str, n: int, seed: int, pairs: int = 4, shots: int = 0) -> tuple[Tensor, Tensor]:
    """``n`` prompts ``(n, T)`` (every prompt the same length: one token per word) and answers ``(n,)``."""
    if task not in HF_TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {tuple(HF_TASKS)}")
    words = single_token_words(tok)
    half = len(words) // 2
    keys, values = words[:half], words[half:]
    rng = random.Random(f"{task}-{seed}")
    xs, ys = [], []
    for _ in range(n):
        demos = [kv_example(task, rng, keys, values, pairs) for _ in range(shots)]
        text, answer = kv_example(task, rng, keys, values, pairs)
        full = "".join(f"{d} {a}\n" for d, a in demos) + text
        xs.append(tok(full, add_special_tokens=False)["input_ids"])
        ys.append(tok(" " + answer, add_special_tokens=False)["input_ids"][0])
    if len({len(x) for x in xs}) != 1:
        raise RuntimeError("kv prompts of unequal length: a word is not one token")
    return torch.tensor(xs), torch.tensor(ys)


def _hf_model(name: str):
    from ..models import hf

    return hf.shared_model(name)  # frozen: only the prefixes train


def _hf_accuracy(logits_fn, X: Tensor, Y: Tensor, batch: int = 16) -> float:
    hits = 0
    with torch.no_grad():
        for i in range(0, len(X), batch):
            hits += int((logits_fn(X[i : i + batch]).argmax(-1) == Y[i : i + batch]).sum())
    return hits / len(X)


# ---------------------------------------------------------------------------------------------------------
# one configuration
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PrefixConfig:
    """One (model, task, method, seed). ``steps``/``batch``/``lr``: adaptation; ``prefix_len``: P for soft
    prompts and prefixes; ``test``: test prompts (backbone: sequences); ``cache_dir``: where the pretrained
    backbone is kept (not part of the key)."""

    model: str
    task: str
    method: str
    seed: int = 0
    steps: int = 200
    batch: int = 32
    lr: float = 1e-2
    prefix_len: int = 4
    test: int = 500
    skills: SkillConfig = field(default_factory=SkillConfig)
    setup: BackboneSetup = field(default_factory=BackboneSetup)
    cache_dir: str = ""

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        tasks, methods = (
            (BACKBONE_TASKS, BACKBONE_METHODS) if self.model == "backbone" else (HF_TASKS, HF_METHODS)
        )
        if self.task not in tasks:
            raise ValueError(f"{self.model}: task must be one of {tuple(tasks)}, got {self.task!r}")
        if self.method not in methods:
            raise ValueError(f"{self.model}: method must be one of {methods}, got {self.method!r}")
        if self.prefix_len < 1:
            raise ValueError(f"prefix_len must be >= 1, got {self.prefix_len}")

    @property
    def key(self) -> str:
        d = asdict(self)
        d.pop("cache_dir")
        return json.dumps(d, sort_keys=True)


_PRETRAINED: dict[str, tuple[nn.Module, dict]] = {}


def pretrained(cfg: PrefixConfig) -> tuple[nn.Module, dict]:
    """The pretrained backbone of ``cfg`` (skills, setup, seed): from memory, from ``cache_dir``, or
    trained now."""
    tag = json.dumps([asdict(cfg.skills), asdict(cfg.setup), cfg.seed], sort_keys=True)
    if tag in _PRETRAINED:
        return _PRETRAINED[tag]
    path = None
    if cfg.cache_dir:
        import hashlib

        path = Path(cfg.cache_dir) / f"backbone-{hashlib.sha1(tag.encode()).hexdigest()[:12]}.pt"
    model = build_backbone(cfg.skills, cfg.setup, cfg.seed)
    if path is not None and path.is_file():
        blob = torch.load(path, weights_only=True)
        model.load_state_dict(blob["state"])
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        info = json.loads(blob["info"])
    else:
        start = time.perf_counter()
        model, acc = pretrain_backbone(cfg.skills, cfg.setup, cfg.seed)
        info = {"pretrain_accuracy": acc, "pretrain_seconds": round(time.perf_counter() - start, 1)}
        if path is not None:
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            torch.save({"state": model.state_dict(), "info": json.dumps(info)}, tmp)
            tmp.replace(path)  # atomic: parallel workers may race to write it
    _PRETRAINED[tag] = (model, info)
    return model, info


def run_backbone(cfg: PrefixConfig) -> dict[str, Any]:
    base, info = pretrained(cfg)
    sk = cfg.skills
    test = skill_batch(sk, cfg.task, cfg.test, torch.Generator().manual_seed(cfg.seed * 101 + 7))
    val = skill_batch(sk, cfg.task, 256, torch.Generator().manual_seed(cfg.seed * 101 + 8))

    def batches(g):
        return skill_batch(sk, cfg.task, cfg.batch, g)

    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    soft, model, trainable, extra = None, base, 0, {}
    if cfg.method == "prompt":
        # the best single discrete token in the marker slot, chosen on the validation set
        def with_marker(b, tok):
            x = b.x.clone()
            x[:, 0] = tok
            return type(b)(x, b.y, b.mask)

        with torch.no_grad():
            scores = [backbone_loss(base, with_marker(val, t))[1] for t in range(sk.vocab)]
        best = max(range(sk.vocab), key=lambda t: scores[t])
        test = with_marker(test, best)
        extra["prompt_token"] = best
    elif cfg.method == "soft":
        soft = nn.Parameter(torch.randn(cfg.prefix_len, cfg.setup.dim) * 0.02)
        trainable = soft.numel()
        _fit([soft], lambda g: backbone_loss(base, batches(g), soft)[0], cfg.steps, cfg.lr, cfg.seed * 13 + 3)
    elif cfg.method == "prefix":
        model = wrap_prefix(base, cfg.prefix_len)
        params = [p for b in model.blocks for p in (b.mixer.prefix_k, b.mixer.prefix_v)]
        for p in params:
            p.requires_grad_(True)
        trainable = sum(p.numel() for p in params)
        _fit(params, lambda g: backbone_loss(model, batches(g))[0], cfg.steps, cfg.lr, cfg.seed * 13 + 3)
    elif cfg.method == "finetune":
        model = copy.deepcopy(base)
        params = list(model.parameters())
        for p in params:
            p.requires_grad_(True)
        trainable = sum(p.numel() for p in params)
        _fit(params, lambda g: backbone_loss(model, batches(g))[0], cfg.steps, cfg.lr, cfg.seed * 13 + 3)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        acc = backbone_loss(model, test, soft)[1]
    row: dict[str, Any] = {
        "accuracy": round(acc, 4),
        "trainable": trainable,
        "steps": cfg.steps if trainable else 0,
        "seconds": round(seconds, 1),
        **info,
        **extra,
    }
    if cfg.method in ("soft", "prefix", "finetune"):
        x = test.x[:128]
        ref = backbone_weights(wrap_prefix(base, 0), x)
        if cfg.method == "prefix":
            new = backbone_weights(model, x)
        else:
            new = backbone_weights(wrap_prefix(model, 0), x, soft)
        row.update(shift_summary(ref, new, 0 if cfg.method == "finetune" else cfg.prefix_len))
    return row


def run_hf(cfg: PrefixConfig) -> dict[str, Any]:
    model, tok = _hf_model(cfg.model)
    X, Y = kv_set(tok, cfg.task, cfg.test, seed=cfg.seed * 101 + 7)
    init = torch.tensor(
        tok(" key: value, key: value", add_special_tokens=False)["input_ids"][: cfg.prefix_len]
    )
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed * 13 + 3)
    start = time.perf_counter()
    trainable, adapter, tuned = 0, None, None

    def train(params: list[Tensor], logits_fn) -> None:
        opt = torch.optim.Adam(params, lr=cfg.lr)
        for _ in range(cfg.steps):
            xb, yb = kv_set(tok, cfg.task, cfg.batch, seed=rng.randrange(10**9))
            loss = F.cross_entropy(logits_fn(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    if cfg.method == "zero":
        acc = _hf_accuracy(
            lambda x: model(input_ids=x, logits_to_keep=1, use_cache=False).logits[:, -1], X, Y
        )
    elif cfg.method == "fewshot":
        Xf, Yf = kv_set(tok, cfg.task, cfg.test, seed=cfg.seed * 101 + 7, shots=3)
        acc = _hf_accuracy(
            lambda x: model(input_ids=x, logits_to_keep=1, use_cache=False).logits[:, -1], Xf, Yf
        )
    elif cfg.method in ("soft", "prefix"):
        adapter = (HFPrefix if cfg.method == "prefix" else HFSoftPrompt)(model, cfg.prefix_len, init_ids=init)
        trainable = sum(p.numel() for p in adapter.parameters())
        train(list(adapter.parameters()), lambda x: adapter(model, x).logits[:, -1])
        acc = _hf_accuracy(lambda x: adapter(model, x).logits[:, -1], X, Y)
    else:  # finetune: every weight, a private copy
        tuned = copy.deepcopy(model)
        params = list(tuned.parameters())
        for p in params:
            p.requires_grad_(True)
        trainable = sum(p.numel() for p in params)
        train(params, lambda x: tuned(input_ids=x, logits_to_keep=1, use_cache=False).logits[:, -1])
        tuned.eval()
        for p in params:
            p.requires_grad_(False)
        acc = _hf_accuracy(
            lambda x: tuned(input_ids=x, logits_to_keep=1, use_cache=False).logits[:, -1], X, Y
        )
    seconds = time.perf_counter() - start
    row: dict[str, Any] = {
        "accuracy": round(acc, 4),
        "trainable": trainable,
        "steps": cfg.steps if trainable else 0,
        "seconds": round(seconds, 1),
    }
    if trainable:
        x = X[:8]
        ref = hf_weights(model, x)
        new = hf_weights(tuned, x) if tuned is not None else hf_weights(model, x, adapter)
        row.update(shift_summary(ref, new, 0 if tuned is not None else cfg.prefix_len))
    return row


def run_config(cfg: PrefixConfig) -> dict[str, Any]:
    """One configuration (top level and picklable: ``run_sweep`` calls it)."""
    row = run_backbone(cfg) if cfg.model == "backbone" else run_hf(cfg)
    kinds = BACKBONE_TASKS if cfg.model == "backbone" else HF_TASKS
    return {
        "model": cfg.model,
        "task": cfg.task,
        "kind": kinds[cfg.task],
        "method": cfg.method,
        "seed": cfg.seed,
        **row,
    }


# ---------------------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------------------
def plan(args: argparse.Namespace, cache_dir: str) -> list[PrefixConfig]:
    quick = args.quick
    models = args.models or list(MODELS)
    seeds = args.seeds or [0]
    out = []
    for model in models:
        if model == "backbone":
            tasks = args.tasks_backbone or (["first", "lag5"] if quick else ["first", "max", "lag5", "min"])
            methods = args.methods or list(BACKBONE_METHODS)
            setup = BackboneSetup(pretrain_steps=args.pretrain_steps or (600 if quick else 1500))
            steps, batch, test = (300 if quick else 600), 32, 500
            rates = {"soft": 1e-2, "prefix": 1e-2, "finetune": 2e-3}
        else:
            tasks = args.tasks_hf or list(HF_TASKS)
            methods = args.methods or [m for m in HF_METHODS if not (quick and m == "finetune")]
            setup = BackboneSetup()
            steps, batch, test = (12 if quick else 60), (4 if quick else 8), (16 if quick else 64)
            rates = {"soft": 1e-2, "prefix": 3e-2, "finetune": 2e-5}
        valid = BACKBONE_METHODS if model == "backbone" else HF_METHODS
        for task in tasks:
            for method in methods:
                if method not in valid:
                    continue  # e.g. "fewshot" asked for the backbone
                for seed in seeds:
                    out.append(
                        PrefixConfig(
                            model,
                            task,
                            method,
                            seed,
                            args.steps or steps,
                            batch,
                            rates.get(method, 0.0),
                            args.prefix_len,
                            test,
                            setup=setup,
                            cache_dir=cache_dir,
                        )
                    )
    return out


def register(sub: argparse._SubParsersAction) -> None:
    from ..sweep import add_executor_args

    p = sub.add_parser(
        "prefix",
        help="prompting / soft prompts / prefix-tuning vs fine-tuning, attention shift per layer [B200]",
    )
    p.add_argument("--models", nargs="+", choices=MODELS, default=None, help="default: backbone smollm2")
    p.add_argument("--tasks-backbone", nargs="+", choices=sorted(BACKBONE_TASKS), default=None)
    p.add_argument("--tasks-hf", nargs="+", choices=sorted(HF_TASKS), default=None)
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help=f"backbone: {', '.join(BACKBONE_METHODS)}; smollm2: {', '.join(HF_METHODS)}",
    )
    p.add_argument("--seeds", nargs="+", type=int, default=None)
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="adaptation steps (default: backbone 600, smollm2 60; quick 300 / 12)",
    )
    p.add_argument("--prefix-len", type=int, default=4, help="P: soft-prompt tokens / prefix K/V per layer")
    p.add_argument(
        "--pretrain-steps", type=int, default=None, help="backbone pretraining (default 1500; quick 600)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per configuration (1: fastest on shared cores, where 2 threads spin)",
    )
    p.add_argument("--quick", action="store_true", help="a small run (about 4 minutes on 2 quiet cores)")
    p.add_argument("--out", default="runs")
    p.add_argument(
        "--resume", default=None, help="an earlier run folder: finish it, skipping done configurations"
    )
    add_executor_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ..sweep import Executor, run_sweep

    run_dir = Path(args.resume) if args.resume else new_run_dir("prefix", args.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    configs = plan(args, str(run_dir))
    if not configs:
        raise SystemExit("no configuration: check --models / --methods / --tasks-*")
    started = time.perf_counter()
    rows = run_sweep(
        run_config,
        configs,
        key=lambda c: c.key,
        path=run_dir / "results.jsonl",
        executor=Executor.from_args(args, threads=args.threads),
        label=lambda r: f"{r['model']} {r['task']} {r['method']}",
        description="configurations",
    )
    rows = [r for r in rows if "error" not in r]
    report = Report("prefix", COLUMNS, rows, plots=[plot_accuracy, plot_shift])
    report.meta.update(
        {
            "shift": "total variation between the original and the content-renormalized attention, mean over "
            "content query rows >= 1 and heads; 0 = the relative pattern over the content is unchanged",
            "backbone": "2 blocks (conv 4 + mha + MLP), dim 32, 2 heads; pretrained on first + max "
            "with markers",
            "smollm2_accuracy": "argmax next token over the vocabulary == the answer word",
            "claims": "; ".join(claims(rows)) or "-",
            "wall_seconds_now": round(time.perf_counter() - started, 1),
        }
    )
    report.print("bench prefix: prompting, soft prompts, prefix-tuning, fine-tuning [B200]")
    written = report.write(run_dir)
    Console().print(f"wrote {run_dir} ({', '.join(p.name for p in written)})")
    return 0


def _mean_acc(rows: list[dict], model: str, task: str, method: str) -> float | None:
    xs = [r["accuracy"] for r in rows if (r["model"], r["task"], r["method"]) == (model, task, method)]
    return sum(xs) / len(xs) if xs else None


def claims(rows: list[dict]) -> list[str]:
    """The paper's claims checked on the rows (seed means): on an elicit task the prefix reaches 0.9 or gains
    0.3 over the model as it is; on a new task it stays below 0.5 while fine-tuning gains 0.3 over it."""
    out = []
    for model, task in dict.fromkeys((r["model"], r["task"]) for r in rows):
        kind = (BACKBONE_TASKS if model == "backbone" else HF_TASKS)[task]
        pre, zero, ft = (_mean_acc(rows, model, task, m) for m in ("prefix", "zero", "finetune"))
        if pre is None:
            continue
        if kind == "elicit" and zero is not None:
            holds = pre >= 0.9 or pre - zero >= 0.3
            out.append(
                f"{model}/{task} (elicit): prefix {pre:.2f} vs zero {zero:.2f} -> "
                f"{'holds' if holds else 'not reproduced'}"
            )
        elif kind == "new":
            if pre >= 0.5:
                verdict = "not reproduced: the prefix learned it, the pattern was available"
            elif ft is None:
                verdict = "prefix fails; fine-tuning not run"
            else:
                verdict = "holds" if ft - pre >= 0.3 else "not reproduced: fine-tuning fails too"
            out.append(
                f"{model}/{task} (new): prefix {pre:.2f}"
                + (f" vs fine-tune {ft:.2f}" if ft is not None else "")
                + f" -> {verdict}"
            )
    return out


def plot_accuracy(report: Report, run_dir: Path) -> Path | None:
    if not report.rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in report.rows))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 3.8), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        rows = [r for r in report.rows if r["model"] == model]
        tasks = list(dict.fromkeys(r["task"] for r in rows))
        methods = list(dict.fromkeys(r["method"] for r in rows))
        width = 0.8 / max(len(methods), 1)
        for i, m in enumerate(methods):
            vals = [_mean_acc(rows, model, t, m) for t in tasks]
            ax.bar(
                [j + i * width for j in range(len(tasks))],
                [v if v is not None else 0 for v in vals],
                width,
                label=m,
            )
        kinds = BACKBONE_TASKS if model == "backbone" else HF_TASKS
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))])
        ax.set_xticklabels([f"{t}\n({kinds[t]})" for t in tasks])
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("test accuracy")
        ax.set_title(model)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = run_dir / "prefix_accuracy.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_shift(report: Report, run_dir: Path) -> Path | None:
    rows = [r for r in report.rows if r.get("shift_by_layer")]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["model"], r["task"]) for r in rows))
    cols = min(4, len(panels))
    nrow = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrow, cols, figsize=(4 * cols, 3.2 * nrow), squeeze=False)
    for ax, (model, task) in zip(axes.flat, panels, strict=False):
        for i, m in enumerate(dict.fromkeys(r["method"] for r in rows)):
            sel = [r for r in rows if (r["model"], r["task"], r["method"]) == (model, task, m)]
            if sel:
                color = f"C{i}"
                mean = torch.tensor([r["shift_by_layer"] for r in sel]).mean(0)
                ax.plot(range(len(mean)), mean.numpy(), marker="o", ms=3, color=color, label=m)
                ns = torch.tensor([r["shift_nosink_by_layer"] for r in sel]).mean(0)
                ax.plot(range(len(ns)), ns.numpy(), ls="--", color=color, label=f"{m} (no sink)")
        ax.set_title(f"{model} / {task}", fontsize=9)
        ax.set_xlabel("layer")
        ax.set_ylabel("content-attention shift (TV)")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    path = run_dir / "prefix_shift.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = [
    "BackboneSetup",
    "PrefixConfig",
    "SkillConfig",
    "backbone_hidden",
    "backbone_weights",
    "claims",
    "kv_set",
    "plan",
    "pretrain_backbone",
    "register",
    "run_config",
    "shift_summary",
    "skill_batch",
    "skill_targets",
    "wrap_prefix",
]
