"""``attnlab inspect causal``: a causal / circuit report of one model on one small task.

``induction_task`` and ``ioi_task`` build clean and corrupted prompts offline with the model's tokenizer;
``causal_analysis(model, tok, task)`` runs activation patching of each head's ``z`` (denoising: clean ``z`` into
the corrupted run, normalized effect), direct logit attribution on the clean run and the weights-only
composition scores (from :mod:`.causal` and :mod:`.circuits`); ``write_causal_report`` writes JSON, Markdown
and PNG heatmaps (layers x heads).

Tasks (the metric is read on the clean run, the corrupted run and every patched run alike):

* ``induction``: ``[BOS] x x`` with ``x`` ``n`` random ordinary tokens; corrupted: ``[BOS] x y``, the second
  copy re-drawn (``y`` shares no token with ``x``). Metric: the mean logit of the correct next token ``x[i + 1]``
  at the second-copy rows ``i = 0 .. n - 2``. The first copy is the same in both runs, so the heads that write
  its keys (previous-token heads) have the same output in both and show no patching effect; the heads that
  read the repeat (induction heads and what follows them) do.
* ``ioi-lite`` (Wang et al. 2022, "Interpretability in the Wild", the ABC corruption): "When A and B went to
  the store, B gave a drink to" -> " A"; corrupted: the repeated subject B replaced by a third name C. Metric:
  ``logit(A) - logit(B)`` at the last position. ``n`` prompts (templates x single-token names); the patched,
  clean and corrupted metrics are averaged over prompts before normalizing.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..models import hf

TASKS = ("induction", "ioi-lite", "colors", "factual")
# names checked one by one against the tokenizer: only single-token " Name"s are used
NAMES = ("Mary", "John", "Tom", "James", "Anna", "Paul", "Sarah", "David", "Lisa", "Mark", "Emma", "Peter",
         "Laura", "Jack", "Kate", "Mike", "Alice", "Bob", "Sam", "Rose")
IOI_TEMPLATES = (
    "When {A} and {B} went to the store, {S} gave a drink to",
    "After {A} and {B} went to the park, {S} handed a ball to",
    "While {A} and {B} were at the cafe, {S} passed a cup to",
    "Then {A} and {B} had a long chat, and {S} wrote a letter to",
)
COLORS = ("red", "blue", "green", "black", "white", "yellow", "brown", "pink", "purple", "gray")  # no "a orange"
OBJECTS = ("pen", "cup", "book", "ball", "hat", "box", "key", "lamp", "bag", "car")
COLOR_TEMPLATES = (
    "On the table, I see a {c0} {o0}, a {c1} {o1} and a {c2} {o2}. What color is the {q}? The {q} is",
    "On the floor, there is a {c0} {o0}, a {c1} {o1} and a {c2} {o2}. What color is the {q}? The {q} is",
    "In the room, I see a {c0} {o0}, a {c1} {o1} and a {c2} {o2}. What color is the {q}? The {q} is",
)
CITIES = ("Paris", "Rome", "London", "Berlin", "Tokyo", "Madrid", "Oslo", "Vienna", "Cairo", "Lima", "Dublin",
          "Moscow", "Athens", "Prague", "Boston", "Sydney")
FACT_TEMPLATE = "{A} has visited {a0}, {a1} and {a2}. {B} has visited {b0}, {b1} and {b2}. {S} has visited {s} and"


@dataclass(frozen=True)
class CausalTask:
    """One clean / corrupted prompt pair and where the metric reads it.

    ``clean``, ``corrupt``: ``(1, T)`` ids of equal length; ``rows``: the query rows the metric reads;
    ``targets``: the correct next token at each row; ``baselines``: a token whose logit is subtracted at each
    row (None: the raw logit); ``text``: decoded prompts for the report; ``sets``: named token-id lists some
    tasks add (a row may repeat, so a mean over a set of targets is one metric).
    """

    clean: Tensor
    corrupt: Tensor
    rows: tuple[int, ...]
    targets: tuple[int, ...]
    baselines: tuple[int, ...] | None = None
    text: dict = field(default_factory=dict)
    sets: dict = field(default_factory=dict)  # named token-id lists (factual: correct, said, distractors)

    def metric(self) -> Callable[[Tensor], float]:
        """``metric(logits (1, T, V)) -> float``: mean over ``rows`` of ``logit[target] (- logit[baseline])``."""
        rows, tg = torch.tensor(self.rows), torch.tensor(self.targets)
        bl = torch.tensor(self.baselines) if self.baselines is not None else None

        def fn(logits: Tensor) -> float:
            lg = logits[0].double()
            m = lg[rows, tg] - (lg[rows, bl] if bl is not None else 0.0)
            return float(m.mean().detach())
        return fn


def _vocab(model: nn.Module, tok) -> int:
    n = model.get_input_embeddings().num_embeddings
    return min(n, len(tok)) if tok is not None and hasattr(tok, "__len__") else n


def _decode(tok, ids: list[int]) -> str:
    try:
        return tok.decode(ids)
    except Exception:  # a stub tokenizer without decode: the ids themselves
        return " ".join(map(str, ids))


def induction_task(model: nn.Module, tok, n: int = 20, *, seed: int = 0, corrupt: str = "second") -> CausalTask:
    """Repeated random tokens (module docstring). ``n``: tokens per copy (T = 2n, plus BOS if the tokenizer has
    one); the re-drawn copy shares no token with the other. ``corrupt="second"``: ``[BOS] x y`` (the default of
    ``inspect causal``: previous-token heads show no effect); ``"first"``: ``[BOS] y x``, the first copy re-drawn,
    so the previous-token heads that write the keys of the first copy carry the effect too (``attnlab circuit``).
    The metric rows are the second copy's in both."""
    if corrupt not in ("first", "second"):
        raise ValueError(f"corrupt must be 'first' or 'second', got {corrupt!r}")
    if n < 2:
        raise ValueError(f"induction needs n >= 2 tokens per copy, got {n}")
    special = set(getattr(tok, "all_special_ids", None) or [])
    pool = [t for t in range(_vocab(model, tok)) if t not in special]
    if len(pool) < 2 * n:
        raise ValueError(f"induction with n={n} needs {2 * n} ordinary tokens; the vocabulary has {len(pool)}")
    rng = random.Random(seed)
    draw = rng.sample(pool, 2 * n)  # x and its replacement y, disjoint so the corruption breaks every match
    x, y = draw[:n], draw[n:]
    bos = getattr(tok, "bos_token_id", None)
    pre = [bos] if bos is not None else []
    clean = pre + x + x
    bad = pre + x + y if corrupt == "second" else pre + y + x
    p0 = len(pre)
    rows = tuple(p0 + n + i for i in range(n - 1))  # second-copy token x[i] predicts x[i + 1]
    targets = tuple(x[i + 1] for i in range(n - 1))
    return CausalTask(torch.tensor([clean]), torch.tensor([bad]), rows, targets, None,
                      {"clean": _decode(tok, clean), "corrupt": _decode(tok, bad)})


def _encode(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _single_tokens(model: nn.Module, tok, words: tuple[str, ...]) -> list[tuple[str, int]]:
    """``(word, id)`` for each word whose " word" is one real token of ``tok`` that decodes back to it (a word the
    vocabulary lacks may come back as one unknown token: only real, round-tripping ones are kept)."""
    V = _vocab(model, tok)
    unk = getattr(tok, "unk_token_id", None)
    out = []
    for w in words:
        ids = _encode(tok, " " + w)
        if len(ids) == 1 and ids[0] < V and ids[0] != unk and _decode(tok, ids).strip() == w:
            out.append((w, ids[0]))
    return out


Draw = Callable[[random.Random, int, list[int]], "tuple[list[int], list[int], Callable[[int], CausalTask]]"]


def _equal_length_pairs(tok, task: str, n: int, seed: int, draw: Draw) -> list[CausalTask]:
    """``n`` prompt pairs from ``draw(rng, attempt, prefix) -> (clean ids, corrupt ids, make(T) -> CausalTask)``;
    pairs whose clean and corrupted prompts tokenize to different lengths (a word merged with its neighbour) are
    drawn again, up to ``50 n`` attempts. ``prefix``: the BOS token, when the tokenizer has one."""
    rng = random.Random(seed)
    bos = getattr(tok, "bos_token_id", None)
    pre = [bos] if bos is not None else []
    tasks: list[CausalTask] = []
    for attempt in range(50 * n):
        if len(tasks) == n:
            break
        clean, bad, make = draw(rng, attempt, pre)
        if len(clean) == len(bad):
            tasks.append(make(len(clean)))
    if len(tasks) < n:
        raise ValueError(f"{task}: only {len(tasks)} of {n} prompt pairs tokenize to equal lengths")
    return tasks


def ioi_task(model: nn.Module, tok, n: int = 4, *, seed: int = 0) -> list[CausalTask]:
    """``n`` IOI-lite prompt pairs (module docstring) from single-token names of the tokenizer."""
    if n < 1:
        raise ValueError(f"ioi-lite needs n >= 1 prompts, got {n}")
    names = _single_tokens(model, tok, NAMES)
    if len(names) < 3:
        raise ValueError(f"ioi-lite needs 3 names that are single tokens; this tokenizer has {len(names)} "
                         f"({[n for n, _ in names]}) among {list(NAMES)}")

    def draw(rng: random.Random, attempt: int, pre: list[int]):
        (a, ia), (b, ib), (c, _) = rng.sample(names, 3)
        tpl = IOI_TEMPLATES[attempt % len(IOI_TEMPLATES)]
        clean = pre + _encode(tok, tpl.format(A=a, B=b, S=b))
        bad = pre + _encode(tok, tpl.format(A=a, B=b, S=c))
        return clean, bad, lambda T: CausalTask(
            torch.tensor([clean]), torch.tensor([bad]), (T - 1,), (ia,), (ib,),
            {"clean": _decode(tok, clean), "corrupt": _decode(tok, bad), "io": a, "s": b})

    return _equal_length_pairs(tok, "ioi-lite", n, seed, draw)


def colors_task(model: nn.Module, tok, n: int = 8, *, seed: int = 0) -> list[CausalTask]:
    """``n`` colored-objects prompt pairs with the query-swap corruption (module docstring)."""
    if n < 1:
        raise ValueError(f"colors needs n >= 1 prompts, got {n}")
    colors, objects = _single_tokens(model, tok, COLORS), _single_tokens(model, tok, OBJECTS)
    if len(colors) < 3 or len(objects) < 3:
        raise ValueError(f"colors needs 3 single-token colours and objects; this tokenizer has {len(colors)} "
                         f"colours and {len(objects)} objects")

    def draw(rng: random.Random, attempt: int, pre: list[int]):
        cs, os_ = rng.sample(colors, 3), rng.sample(objects, 3)
        qi = rng.randrange(3)
        qj = (qi + 1 + rng.randrange(2)) % 3  # the corrupted query: another object of the list
        fill = {f"c{i}": cs[i][0] for i in range(3)} | {f"o{i}": os_[i][0] for i in range(3)}
        tpl = COLOR_TEMPLATES[attempt % len(COLOR_TEMPLATES)]
        clean = pre + _encode(tok, tpl.format(q=os_[qi][0], **fill))
        bad = pre + _encode(tok, tpl.format(q=os_[qj][0], **fill))
        return clean, bad, lambda T: CausalTask(
            torch.tensor([clean]), torch.tensor([bad]), (T - 1,), (cs[qi][1],), (cs[qj][1],),
            {"clean": _decode(tok, clean), "corrupt": _decode(tok, bad), "answer": cs[qi][0],
             "corrupt_answer": cs[qj][0]})

    return _equal_length_pairs(tok, "colors", n, seed, draw)


def factual_task(model: nn.Module, tok, n: int = 8, *, seed: int = 0) -> list[CausalTask]:
    """``n`` one-to-many prompt pairs, facts stated in context, subject-swap corruption (module docstring)."""
    if n < 1:
        raise ValueError(f"factual needs n >= 1 prompts, got {n}")
    names, cities = _single_tokens(model, tok, NAMES), _single_tokens(model, tok, CITIES)
    if len(names) < 2 or len(cities) < 6:
        raise ValueError(f"factual needs 2 single-token names and 6 cities; this tokenizer has {len(names)} "
                         f"names and {len(cities)} cities")

    def draw(rng: random.Random, attempt: int, pre: list[int]):
        (a, _), (b, _) = rng.sample(names, 2)
        cs = rng.sample(cities, 6)
        ac, bc = cs[:3], cs[3:]
        k = rng.randrange(3)  # the city already said
        fill = {f"a{i}": ac[i][0] for i in range(3)} | {f"b{i}": bc[i][0] for i in range(3)}
        clean = pre + _encode(tok, FACT_TEMPLATE.format(A=a, B=b, S=a, s=ac[k][0], **fill))
        bad = pre + _encode(tok, FACT_TEMPLATE.format(A=a, B=b, S=b, s=bc[k][0], **fill))
        rest_a = [ac[i][1] for i in range(3) if i != k]
        rest_b = [bc[i][1] for i in range(3) if i != k]
        return clean, bad, lambda T: CausalTask(
            torch.tensor([clean]), torch.tensor([bad]), (T - 1, T - 1), tuple(rest_a), tuple(rest_b),
            {"clean": _decode(tok, clean), "corrupt": _decode(tok, bad), "subject": a, "said": ac[k][0]},
            {"correct": rest_a, "said": [ac[k][1]], "distractors": [c[1] for c in bc]})

    return _equal_length_pairs(tok, "factual", n, seed, draw)


def build_tasks(model: nn.Module, tok, task: str, n: int | None = None, *, seed: int = 0) -> list[CausalTask]:
    """The prompt pairs of ``task`` (``TASKS``); ``n`` defaults to 20 tokens (induction), 4 prompts (IOI) or 8
    prompts (colors, factual)."""
    if task == "induction":
        return [induction_task(model, tok, 20 if n is None else n, seed=seed)]
    if task == "ioi-lite":
        return ioi_task(model, tok, 4 if n is None else n, seed=seed)
    if task == "colors":
        return colors_task(model, tok, 8 if n is None else n, seed=seed)
    if task == "factual":
        return factual_task(model, tok, 8 if n is None else n, seed=seed)
    raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")


@dataclass
class CausalAnalysis:
    """Everything the report shows, per head ``(layers, heads)`` float64.

    ``patch``: normalized effect of patching the head's clean ``z`` into the corrupted run (mean patched
    metric over prompts, normalized by the mean clean / corrupted metrics); ``dla``: the head's direct
    contribution to the metric on the clean run (mean over rows and prompts); ``composition[kind]``
    ``(L, H, L, H)`` for kind in q, k, v (``[l1, h1, l2, h2]``: head 2 reads what head 1 writes).
    """

    model: str
    task: str
    tasks: list[CausalTask]
    clean_metric: float
    corrupt_metric: float
    patch: Tensor
    dla: Tensor
    composition: dict[str, Tensor]
    seconds: float = 0.0

    def top_heads(self, k: int = 10) -> list[dict]:
        """The ``k`` heads with the largest ``|patch|``, each with its DLA and its strongest Q/K/V source head
        (the earlier head it reads most from, by composition score)."""
        L, H = self.patch.shape
        order = self.patch.abs().flatten().argsort(descending=True)[:k].tolist()
        out = []
        for i in order:
            layer, head = divmod(i, H)
            row = {"layer": layer, "head": head, "patch": float(self.patch[layer, head]),
                   "dla": float(self.dla[layer, head])}
            for kind, s in self.composition.items():
                src = s[:, :, layer, head]  # (L, H): what each head contributes to this head's q/k/v
                if layer == 0 or float(src.max()) <= 0:
                    row[f"{kind}_source"] = None
                    continue
                j = int(src.flatten().argmax())
                row[f"{kind}_source"] = {"layer": j // H, "head": j % H, "score": float(src.flatten()[j])}
            out.append(row)
        return out

    def top_pairs(self, kind: str = "k", k: int = 10) -> list[dict]:
        """The ``k`` largest ``kind``-composition scores as ``{writer, reader, score}``."""
        s = self.composition[kind]
        L, H = s.shape[:2]
        flat = s.flatten()
        order = flat.argsort(descending=True)[:k].tolist()
        res = []
        for i in order:
            l1, h1, l2, h2 = (int(t) for t in torch.unravel_index(torch.tensor(i), s.shape))
            if float(flat[i]) <= 0:
                break
            res.append({"writer": [l1, h1], "reader": [l2, h2], "score": float(flat[i])})
        return res

    def to_dict(self, top: int = 10) -> dict:
        def clean(x):
            if isinstance(x, Tensor):
                x = x.tolist()
            if isinstance(x, float):
                return None if not math.isfinite(x) else round(x, 6)
            if isinstance(x, list):
                return [clean(v) for v in x]
            if isinstance(x, dict):
                return {k: clean(v) for k, v in x.items()}
            return x

        L, H = self.patch.shape
        return clean({
            "model": self.model, "task": self.task, "num_layers": L, "num_heads": H,
            "prompts": [{"clean": t.text.get("clean"), "corrupt": t.text.get("corrupt"),
                         "clean_ids": t.clean[0].tolist(), "corrupt_ids": t.corrupt[0].tolist(),
                         "rows": list(t.rows), "targets": list(t.targets),
                         "baselines": list(t.baselines) if t.baselines is not None else None} for t in self.tasks],
            "clean_metric": self.clean_metric, "corrupt_metric": self.corrupt_metric,
            "patch_z": self.patch, "dla": self.dla,
            # per reader head: the largest score over writer heads (full (L, H, L, H) tensors stay out of JSON)
            "composition_max_in": {k: v.flatten(0, 1).max(0).values for k, v in self.composition.items()},
            "top_heads": self.top_heads(top),
            "top_pairs": {k: self.top_pairs(k, top) for k in self.composition},
            "seconds": round(self.seconds, 2),
        })


def task_dla(model: nn.Module, t: CausalTask, dla_rows: int | None = 5) -> Tensor:
    """Per-head DLA ``(layers, heads)`` of ``t``'s metric on the clean run, mean over at most ``dla_rows`` of its
    metric rows, evenly spaced (each row one traced forward pass; None: all rows)."""
    from .causal import direct_logit_attribution

    pairs = list(zip(t.rows, t.targets, t.baselines or [None] * len(t.rows)))
    if dla_rows is not None and len(pairs) > dla_rows:
        pick = torch.linspace(0, len(pairs) - 1, dla_rows).round().long().unique().tolist()
        pairs = [pairs[i] for i in pick]
    out = 0
    for row, tg, bl in pairs:
        out = out + direct_logit_attribution(model, t.clean, tg if bl is None else (tg, bl), position=row).heads
    return out / len(pairs)


def causal_analysis(
    model: nn.Module, tok, task: str = "induction", n: int | None = None, *, seed: int = 0,
    name: str = "model", batch: int = 16, dla_rows: int | None = 5, composition: bool = True,
    progress: Callable[[str], None] | None = None,
) -> CausalAnalysis:
    """Build ``task``'s prompts with ``tok`` and run patching (z per head), DLA and composition on ``model``.

    ``tok`` only needs ``all_special_ids``/``bos_token_id``/``decode`` (induction; all optional) or a
    ``__call__`` returning ``input_ids`` (ioi-lite). ``dla_rows``: DLA on at most that many of a prompt's metric
    rows, evenly spaced (each row is one traced forward pass with its own target; None: all rows).
    ``composition=False`` skips the weights-only scores (their cost grows with layers^2: minutes on a busy CPU
    for 30 layers); the report then has no source heads. Returns a :class:`CausalAnalysis`.
    """
    from .causal import activation_patching
    from .circuits import composition_scores

    t0 = time.perf_counter()
    tick = progress or (lambda label: None)
    tasks = build_tasks(model, tok, task, n, seed=seed)
    g = hf.geometry(model)
    L, H = g.num_layers, g.num_heads
    patched = torch.zeros(L, H, dtype=torch.float64)
    dla = torch.zeros(L, H, dtype=torch.float64)
    m_clean = m_bad = 0.0
    for k, t in enumerate(tasks):
        res = activation_patching(model, t.clean, t.corrupt, t.metric(), points=("z",), batch=batch)
        patched += res.patched["z"]
        m_clean += res.clean_metric
        m_bad += res.corrupt_metric
        tick(f"patching {k + 1}/{len(tasks)}")
        dla += task_dla(model, t, dla_rows)
        tick(f"DLA {k + 1}/{len(tasks)}")
    N = len(tasks)
    patched, dla, m_clean, m_bad = patched / N, dla / N, m_clean / N, m_bad / N
    if m_clean == m_bad:
        raise ValueError(f"the mean metric is the same on clean and corrupted prompts ({m_clean})")
    effect = (patched - m_bad) / (m_clean - m_bad)
    comp = composition_scores(model) if composition else {}
    tick("composition")
    return CausalAnalysis(name, task, tasks, m_clean, m_bad, effect, dla, comp, time.perf_counter() - t0)


def _heatmap(path: Path, M: Tensor, title: str, signed: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L, H = M.shape
    fig, ax = plt.subplots(figsize=(max(3.0, 0.45 * H + 1.8), max(2.5, 0.22 * L + 1.2)))
    a = M.numpy()
    if signed:
        v = float(M.abs().max()) or 1.0
        im = ax.imshow(a, cmap="RdBu_r", vmin=-v, vmax=v, aspect="auto")
    else:
        im = ax.imshow(a, cmap="viridis", aspect="auto")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(H))
    ax.set_yticks(range(0, L, max(1, L // 15)))
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt_src(s: dict | None) -> str:
    return "-" if s is None else f"L{s['layer']}.H{s['head']} ({s['score']:.2f})"


def write_causal_report(a: CausalAnalysis, out: str | Path, *, pngs: bool = True, top: int = 10) -> dict[str, Path]:
    """Write ``causal.json``, ``causal.md`` and (``pngs``) ``patch_z.png``, ``dla.png``, ``k_comp.png`` under
    ``out``; returns the paths by kind."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    d = a.to_dict(top)
    paths = {"json": out / "causal.json", "md": out / "causal.md"}
    paths["json"].write_text(json.dumps(d, indent=1))
    images = {}
    if pngs:
        images = {"patch": ("patch_z.png", a.patch, "activation patching of z (normalized effect)", True),
                  "dla": ("dla.png", a.dla, "direct logit attribution (clean run)", True),
                  }
        if "k" in a.composition:
            images["k_comp"] = ("k_comp.png", a.composition["k"].flatten(0, 1).max(0).values,
                                "K-composition: max over writer heads", False)
        for key, (fname, M, title, signed) in images.items():
            _heatmap(out / fname, M, f"{a.model} / {a.task}: {title}", signed)
            paths[key] = out / fname
    lines = [f"# Causal report: {a.model}, task {a.task}", "",
             f"Prompt pairs: {len(a.tasks)}; metric clean {a.clean_metric:.4g}, corrupted {a.corrupt_metric:.4g} "
             f"({a.seconds:.1f} s).", "", f"Clean: `{a.tasks[0].text.get('clean')}`  ",
             f"Corrupted: `{a.tasks[0].text.get('corrupt')}`", "",
             "Patching effect: clean `z` of one head patched into the corrupted run, "
             "`(m_patched - m_corrupt) / (m_clean - m_corrupt)`. DLA: the head's direct contribution to the "
             "metric on the clean run. Sources: the earlier head each one reads most from (composition score).",
             "", "| rank | head | patch | DLA | K source | Q source | V source |", "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(d["top_heads"], 1):
        lines.append(f"| {i} | L{r['layer']}.H{r['head']} | {r['patch']:.3f} | {r['dla']:.3f} | "
                     f"{_fmt_src(r.get('k_source'))} | {_fmt_src(r.get('q_source'))} | "
                     f"{_fmt_src(r.get('v_source'))} |")
    if "k" in d["top_pairs"]:
        lines += ["", "Top K-composition pairs (writer -> reader): " + ", ".join(
            f"L{p['writer'][0]}.H{p['writer'][1]} -> L{p['reader'][0]}.H{p['reader'][1]} ({p['score']:.2f})"
            for p in d["top_pairs"]["k"][:5])]
    lines.append("")
    for key in images:
        lines.append(f"![{key}]({paths[key].name})")
    paths["md"].write_text("\n".join(lines) + "\n")
    return paths


def print_top_heads(a: CausalAnalysis, k: int = 10) -> None:
    """A rich table of the top heads by ``|patch effect|``."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{a.model} / {a.task}: top heads (clean {a.clean_metric:.3g}, corrupted "
                    f"{a.corrupt_metric:.3g})")
    for col in ("head", "patch z", "DLA", "K source", "V source"):
        t.add_column(col, justify="right" if col in ("patch z", "DLA") else "left")
    for r in a.top_heads(k):
        t.add_row(f"L{r['layer']}.H{r['head']}", f"{r['patch']:.3f}", f"{r['dla']:.3f}",
                  _fmt_src(r.get("k_source")), _fmt_src(r.get("v_source")))
    Console().print(t)


__all__ = ["TASKS", "CausalAnalysis", "CausalTask", "build_tasks", "causal_analysis", "colors_task", "factual_task",
           "induction_task", "ioi_task", "print_top_heads", "task_dla", "write_causal_report"]
