"""Interventions by name, with typed knobs, parsed from ``NAME[:key=value,...]``; ``+`` composes several into
one arm (``act+zerotuning:gamma=1.5``).

Each intervention is one of five kinds:

* ``hooks``  -- a context manager on the model (hooks on the seam, or ScaleDimension's pre-hooks): zerotuning,
  act, fim, scale_dim, headmask. Any number stack in one arm;
* ``decode`` -- a generation loop of its own (:mod:`attnlab.interventions.decoding`): decore, dagcd, lookback.
  At most one per arm (two loops cannot both pick the next token);
* ``prompt`` -- a prompt transform: pause;
* ``plan``   -- what runs the attention, a :class:`~attnlab.plans.plan.HeadPlan` for the prompt's length: moa
  (MoA's elastic per-head windows). At most one per arm, and not with ``--plan``;
* ``score``  -- an analysis of the plain model's own generations that changes nothing (SAR's uncertainty, the
  preplan-and-anchor rhythm; :mod:`attnlab.interventions.scoring`). Alone in its arm.

An intervention that only makes sense on some tasks lists them in ``Spec.tasks``; the runner skips its arm on
the others (``zeroshot`` / ``inject`` need in-context-learning prompts).

A knob left at ``None`` (or ``heads=fit`` / ``detector=fit``) is set by the intervention's procedure on the
validation split (:mod:`attnlab.interventions.fit`); a knob given on the command line is used as given.
Knob values: numbers, words, ``none``; layer lists ``0-3/7`` (``/`` separates items: ``,`` separates knobs);
head lists ``LAYER.HEAD/...`` (``3.1/5.2``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from ..models import hf
from ..plans import calibrate as C
from . import buckets as BK
from . import decoding as D
from . import fit as F
from . import focus as FO
from . import repshift as RS
from . import specprefill as SP

KINDS = ("hooks", "decode", "prompt", "plan", "score")


# ---------------------------------------------------------------------------------------------------------
# knobs
# ---------------------------------------------------------------------------------------------------------
def _parse_layers(text: str) -> tuple[int, ...]:
    out: list[int] = []
    for part in text.split("/"):
        part = part.strip()
        if re.fullmatch(r"\d+-\d+", part):
            a, b = (int(x) for x in part.split("-"))
            if b < a:
                raise ValueError(f"layer range {part!r} runs backwards")
            out.extend(range(a, b + 1))
        elif re.fullmatch(r"\d+", part):
            out.append(int(part))
        else:
            raise ValueError(f"expected layers like 0-3/7, got {text!r}")
    return tuple(out)


def _parse_heads(text: str) -> tuple[tuple[int, int], ...]:
    out = []
    for part in text.split("/"):
        m = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", part)
        if m is None:
            raise ValueError(f"expected heads like 3.1/5.2 (layer.head), got {text!r}")
        out.append((int(m.group(1)), int(m.group(2))))
    return tuple(out)


def _parse_bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true/false, got {text!r}")


_PARSERS: dict[str, Callable[[str], Any]] = {
    "float": float, "int": int, "str": str, "bool": _parse_bool, "layers": _parse_layers, "heads": _parse_heads,
}


@dataclass(frozen=True)
class Knob:
    """One typed knob: ``type`` in float | int | str | bool | layers | heads; ``default`` None = fitted on the
    validation split; ``choices`` for words."""

    name: str
    type: str
    default: Any = None
    help: str = ""
    choices: tuple[str, ...] | None = None
    unset: str = "fitted"  # what None means

    def parse(self, text: str) -> Any:
        if text.strip().lower() == "none":
            return None
        try:
            value = _PARSERS[self.type](text.strip())
        except ValueError as e:
            raise ValueError(f"knob {self.name!r}: expected {self.type}, got {text!r} ({e})") from None
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"knob {self.name!r}: choose from {', '.join(self.choices)}, got {text!r}")
        return value

    def describe(self) -> str:
        d = self.unset if self.default is None else repr(self.default)
        ch = f" in {{{', '.join(self.choices)}}}" if self.choices else ""
        return f"{self.name} ({self.type}{ch}, default {d}): {self.help}"


# ---------------------------------------------------------------------------------------------------------
# what an intervention installs
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Applied:
    """One intervention ready to run: ``attach(model)`` (hooks), ``loop`` (a generation loop of
    :mod:`decoding`'s signature) or ``prompt(ids) -> ids``; ``knobs`` as resolved (JSON-able)."""

    name: str
    kind: str
    knobs: dict[str, Any]
    attach: Callable[[nn.Module], AbstractContextManager] | None = None
    loop: Callable[..., Tensor] | None = None
    prompt: Callable[[list[int]], list[int]] | None = None
    plan_for: Callable[[int], Any] | None = None  # prompt length -> HeadPlan


@dataclass
class Arm:
    """Interventions applied together: prompt transforms in order, every hook, one generation loop (greedy when
    none replaces it)."""

    label: str
    parts: list[Applied] = field(default_factory=list)

    def prompt(self, ids: Sequence[int]) -> list[int]:
        out = list(ids)
        for p in self.parts:
            if p.prompt is not None:
                out = p.prompt(out)
        return out

    def plan_for(self, length: int) -> Any | None:
        """The plan a ``plan`` intervention runs at this prompt length (None: the arm keeps the run's attention)."""
        for p in self.parts:
            if p.plan_for is not None:
                return p.plan_for(length)
        return None

    def generate(self, model: nn.Module, ids: Sequence[int], max_new_tokens: int, base: D.Base,
                 eos: D.Stop = None) -> Tensor:
        """New tokens ``(1, n)`` for the prompt ``ids`` (transformed by the arm's prompt interventions)."""
        loops = [p.loop for p in self.parts if p.loop is not None]
        loop = loops[0] if loops else D.greedy
        x = torch.tensor([self.prompt(ids)])
        with ExitStack() as stack:
            for p in self.parts:
                if p.attach is not None:
                    stack.enter_context(p.attach(model))
            with torch.no_grad():
                return loop(model, x, max_new_tokens, base.new_cache, eos)


# ---------------------------------------------------------------------------------------------------------
# the registry
# ---------------------------------------------------------------------------------------------------------
Builder = Callable[[nn.Module, Any, dict[str, Any], dict[str, Tensor]], Applied]


@dataclass(frozen=True)
class Spec:
    """A registered intervention: kind, papers, knobs, default tasks (from its paper), when it needs its
    validation procedure (``needs_fit(knobs)``), the procedure (``fit``) and the builder."""

    name: str
    kind: str
    papers: tuple[str, ...]
    summary: str
    knobs: tuple[Knob, ...]
    default_tasks: tuple[str, ...]
    build: Builder
    fit: Callable[[F.FitContext, dict[str, Any]], F.Fitted] | None = None
    needs_fit: Callable[[dict[str, Any]], bool] = lambda knobs: False
    #: the tasks it can run on (None: every task)
    tasks: tuple[str, ...] | None = None

    def supports(self, task: str) -> bool:
        return self.tasks is None or task in self.tasks

    def knob(self, name: str) -> Knob:
        for k in self.knobs:
            if k.name == name:
                return k
        raise ValueError(f"intervention {self.name!r} has no knob {name!r}; its knobs: "
                         + "; ".join(k.describe() for k in self.knobs))

    def defaults(self) -> dict[str, Any]:
        return {k.name: k.default for k in self.knobs}


REGISTRY: dict[str, Spec] = {}


def register(spec: Spec) -> Spec:
    if spec.kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {spec.kind!r}")
    REGISTRY[spec.name] = spec
    return spec


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def get(name: str) -> Spec:
    if name not in REGISTRY:
        raise ValueError(f"unknown intervention {name!r}; choose from {', '.join(REGISTRY)}")
    return REGISTRY[name]


@dataclass(frozen=True)
class Choice:
    """A parsed ``NAME[:key=value,...]``: the name, the knobs given (``given``) and all knobs (defaults
    filled in)."""

    name: str
    given: tuple[tuple[str, Any], ...]

    @property
    def spec(self) -> Spec:
        return get(self.name)

    @property
    def knobs(self) -> dict[str, Any]:
        return {**self.spec.defaults(), **dict(self.given)}

    @property
    def label(self) -> str:
        if not self.given:
            return self.name
        return self.name + ":" + ",".join(f"{k}={_fmt_value(v)}" for k, v in self.given)

    def needs_fit(self) -> bool:
        return self.spec.fit is not None and self.spec.needs_fit(self.knobs)


def _fmt_value(v: Any) -> str:
    if isinstance(v, tuple) and v and isinstance(v[0], tuple):
        return "/".join(f"{a}.{b}" for a, b in v)
    if isinstance(v, tuple):
        return "/".join(str(x) for x in v)
    return str(v)


def parse_one(text: str) -> Choice:
    """``NAME[:key=value,...]`` -> :class:`Choice` (unknown names, knobs or values raise ValueError naming the
    valid ones)."""
    text = text.strip()
    name, _, rest = text.partition(":")
    spec = get(name.strip())
    given: dict[str, Any] = {}
    if rest.strip():
        for item in rest.split(","):
            if "=" not in item:
                raise ValueError(f"{spec.name}: expected key=value, got {item!r}; its knobs: "
                                 + "; ".join(k.describe() for k in spec.knobs))
            k, _, v = item.partition("=")
            knob = spec.knob(k.strip())
            if knob.name in given:
                raise ValueError(f"{spec.name}: knob {knob.name!r} given twice")
            try:
                given[knob.name] = knob.parse(v)
            except ValueError as e:
                raise ValueError(f"{spec.name}: {e}") from None
    return Choice(spec.name, tuple(sorted(given.items())))


_SPLIT = re.compile(r"\+(?=\s*[A-Za-z_][A-Za-z0-9_]*\s*(?::|\+|$))")


def parse(text: str) -> tuple[Choice, ...]:
    """One arm: ``A[:k=v,...]+B[:k=v,...]`` -> its choices. At most one decoding intervention, no repeats."""
    parts = [p for p in _SPLIT.split(text) if p.strip()]
    if not parts:
        raise ValueError(f"empty intervention {text!r}; choose from {', '.join(REGISTRY)}")
    out = tuple(parse_one(p) for p in parts)
    seen = [c.name for c in out]
    dup = sorted({n for n in seen if seen.count(n) > 1})
    if dup:
        raise ValueError(f"{text!r}: {', '.join(dup)} appears twice in one arm")
    plans = [c.name for c in out if c.spec.kind == "plan"]
    if len(plans) > 1:
        raise ValueError(f"{text!r}: {' and '.join(plans)} each decide what runs the attention; one per arm")
    loops = [c.name for c in out if c.spec.kind == "decode"]
    if len(loops) > 1:
        raise ValueError(f"{text!r}: an arm runs at most one decoding function, and {' and '.join(loops)} each "
                         "replace the generation loop; score them as separate --intervention arms "
                         "(hook and prompt interventions compose with any one of them)")
    return out


def arm_label(choices: Sequence[Choice]) -> str:
    return "+".join(c.label for c in choices)


def apply(model: nn.Module, tok: Any, choice: Choice, fitted: F.Fitted | None = None) -> Applied:
    """Build ``choice`` on ``model`` with its fitted knobs (required when ``choice.needs_fit()``)."""
    if choice.needs_fit() and fitted is None:
        raise ValueError(f"{choice.label} sets knobs on the validation split; fit it first (fit.{choice.name})")
    knobs = dict(choice.knobs)
    tensors: dict[str, Tensor] = {}
    if fitted is not None:
        knobs.update({k: v for k, v in fitted.knobs.items()})
        tensors = fitted.tensors
    return choice.spec.build(model, tok, knobs, tensors)


def build_arm(model: nn.Module, tok: Any, choices: Sequence[Choice],
              fitted: dict[str, F.Fitted] | None = None) -> Arm:
    fitted = fitted or {}
    return Arm(arm_label(choices), [apply(model, tok, c, fitted.get(c.name)) for c in choices])


# ---------------------------------------------------------------------------------------------------------
# the interventions
# ---------------------------------------------------------------------------------------------------------
def _geo(model: nn.Module) -> tuple[int, int]:
    g = hf.geometry(model)
    return g.num_layers, g.num_heads


def _json(knobs: dict[str, Any]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in knobs.items()}


def _build_zerotuning(model, tok, knobs, tensors) -> Applied:
    L, H = _geo(model)
    if "gamma" in tensors:
        zt = C.ZeroTuning(tensors["gamma"].float())
    else:
        g = knobs["gamma"]
        zt = C.ZeroTuning.uniform(L, H, 1.0 if g is None else float(g), only_layers=knobs.get("layers"))
    return Applied("zerotuning", "hooks", _json(knobs), attach=zt.attach)


def _build_act(model, tok, knobs, tensors) -> Applied:
    layers = tuple(knobs["layers"]) if knobs.get("layers") is not None else None
    heads = tensors.get("heads")

    def attach(m: nn.Module) -> AbstractContextManager:  # a fresh ACT per use: it records what it found
        return F.HeadACT(alpha=float(knobs["alpha"]), beta=float(knobs["beta"]), layers=layers, heads=heads).attach(m)

    return Applied("act", "hooks", _json(knobs), attach=attach)


def _build_fim(model, tok, knobs, tensors) -> Applied:
    if "bias" not in tensors:
        raise ValueError("fim needs its position bias (fit on the validation split)")
    layers = knobs.get("layers")
    pc = C.PositionalCalibration(tensors["bias"], float(knobs["strength"] or 0.0),
                                 tuple(layers) if layers is not None else None)
    if not pc.strength or (layers is not None and len(layers) == 0):
        return Applied("fim", "hooks", _json(knobs))  # the fit kept the plain model
    return Applied("fim", "hooks", _json(knobs), attach=pc.attach)


def _build_scale_dim(model, tok, knobs, tensors) -> Applied:
    blocks = F.decoder_layers(model)
    layers = knobs.get("layers")
    layers = list(range(len(blocks))) if layers is None else list(layers)
    if knobs.get("dim") is None:
        raise ValueError("scale_dim needs its dimension (dim=... or a fit)")
    factor = 1.0 if knobs.get("factor") is None else float(knobs["factor"])
    return Applied("scale_dim", "hooks", _json(knobs),
                   attach=lambda m: C.ScaleDimension([blocks[i] for i in layers], int(knobs["dim"]), factor))


def _build_headmask(model, tok, knobs, tensors) -> Applied:
    L, H = _geo(model)
    heads = [tuple(x) for x in (knobs.get("heads") or [])]
    f = torch.ones(L, H)
    for layer, h in heads:
        if not (0 <= layer < L and 0 <= h < H):
            raise ValueError(f"headmask: head {layer}.{h} is outside the model's {L} layers x {H} heads")
        f[layer, h] = float(knobs["factor"])
    return Applied("headmask", "hooks", _json(knobs), attach=C.HeadMask(f).attach)


def _check_heads(model: nn.Module, name: str, heads: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    L, H = _geo(model)
    out = [(int(a), int(b)) for a, b in heads]
    bad = [f"{a}.{b}" for a, b in out if not (0 <= a < L and 0 <= b < H)]
    if bad:
        raise ValueError(f"{name}: heads {bad} are outside the model's {L} layers x {H} heads")
    return out


def _build_decore(model, tok, knobs, tensors) -> Applied:
    heads = _check_heads(model, "decore", knobs.get("heads") or [])
    alpha = float(knobs["alpha"] or 0.0)
    loop = partial(D.decore_greedy, heads=heads, alpha=alpha, entropy_guided=bool(knobs["entropy"]))
    return Applied("decore", "decode", _json(knobs), loop=loop)


def _build_dagcd(model, tok, knobs, tensors) -> Applied:
    heads = _check_heads(model, "dagcd", knobs.get("heads") or [])
    weight = float(knobs["weight"] or 0.0)
    if not heads or weight == 0:
        return Applied("dagcd", "decode", _json(knobs), loop=D.greedy)  # the fit kept the plain model
    return Applied("dagcd", "decode", _json(knobs), loop=partial(D.dagcd_greedy, heads=heads, weight=weight))


def _build_lookback(model, tok, knobs, tensors) -> Applied:
    loop = partial(D.lookback_generate, weights=tensors.get("weights"), bias=float(knobs.get("bias") or 0.0),
                   chunk_len=int(knobs["chunk_len"]), candidates=int(knobs["candidates"]),
                   temperature=float(knobs["temperature"]), seed=int(knobs["seed"]))
    return Applied("lookback", "decode", _json(knobs), loop=loop)


def _build_pause(model, tok, knobs, tensors) -> Applied:
    every, count = int(knobs["every"] or 0), int(knobs["count"] or 0)
    if every <= 0 or count <= 0:
        return Applied("pause", "prompt", _json(knobs))  # the fit kept the plain prompt
    marker = str(knobs["marker"]) * count
    return Applied("pause", "prompt", _json(knobs),
                   prompt=lambda ids: C.pause_prompt(ids, tok, every=every, marker=marker))


# default tasks, from each paper's evaluation: the intervention tasks (attnlab.interventions.tasks) first, a
# long-context task of attnlab.plans.tasks after them (used when the former are absent). Lost in the middle
# (I201, I244): multi-document QA with the gold document at every position, key-value retrieval; ZeroTuning
# (I41) and ACT (I31): classification / multiple choice in context; DeCoRe (I234), DAGCD (I242), Lookback
# Lens (A169), PAUSE (I34): context faithfulness (a counterfactual context), then multi-document QA.
_POSITION = ("mdqa", "kv")
_FAITH = ("faithful", "mdqa", "kv")
_ICL = ("icl_cls", "icl_map", "kv")

LAYERS_HELP = "layers to act on (0-3/7)"

register(Spec(
    "zerotuning", "hooks", ("I41",),
    "head-specific scaling of the attention to the initial token (additive log gamma on key 0)",
    (Knob("gamma", "float", None, "scale of the initial token's weight (None: searched on validation)"),
     Knob("heads", "str", "fit", "fit: the up-/down-effective heads of the validation screen; all: every head",
          ("fit", "all")),
     Knob("layers", "layers", None, LAYERS_HELP, unset="all layers"),
     Knob("screen", "str", "grad", "how heads are screened: grad (first order, one backward per sample) or scan "
          "(the paper's head-by-head scaling)", ("grad", "scan"))),
    _ICL, _build_zerotuning, F.fit_zerotuning,
    lambda k: k["heads"] == "fit" or k["gamma"] is None))

register(Spec(
    "act", "hooks", ("I31",),
    "attention calibration: hidden sinks (keys past the first over alpha/kv_len mean weight) scaled by beta",
    (Knob("alpha", "float", 5.0, "sink threshold, in multiples of the uniform weight 1/kv_len"),
     Knob("beta", "float", 0.4, "factor on a hidden sink's weight (rows renormalized)"),
     Knob("heads", "str", "fit", "fit: the heads where calibration helps on validation; all: every head",
          ("fit", "all")),
     Knob("layers", "layers", None, LAYERS_HELP, unset="all layers")),
    _ICL, _build_act, F.fit_act, lambda k: k["heads"] == "fit"))

register(Spec(
    "fim", "hooks", ("I201",),
    "found in the middle: subtract the positional attention bias (estimated on neutral text) from the scores",
    (Knob("strength", "float", None, "multiple of the bias removed (None: searched)"),
     Knob("layers", "layers", None, "layers calibrated (None: searched among the full-attention layers)"),
     Knob("rows", "int", 16, "query rows the bias is averaged over"),
     Knob("tail", "int", 64, "last prompt positions left uncalibrated (the local window and the question)")),
    _POSITION, _build_fim, F.fit_fim, lambda k: True))

register(Spec(
    "scale_dim", "hooks", ("I244",),
    "scale the positional hidden-state dimension at the input of chosen decoder layers",
    (Knob("dim", "int", None, "the hidden dimension (None: found on validation prompts)"),
     Knob("factor", "float", None, "its multiplier (None: searched)"),
     Knob("layers", "layers", None, LAYERS_HELP + " (None: searched)")),
    _POSITION, _build_scale_dim, F.fit_scale_dim,
    lambda k: k["dim"] is None or k["factor"] is None or k["layers"] is None))

register(Spec(
    "headmask", "hooks", (),
    "head ablation: the listed heads' outputs times factor (default: the top retrieval heads, zeroed)",
    (Knob("heads", "heads", None, "heads to mask (3.1/5.2)", unset="the top retrieval heads of the atlas"),
     Knob("top", "int", 8, "how many retrieval heads when heads is None"),
     Knob("factor", "float", 0.0, "output factor of the masked heads")),
    ("mdqa", "kv"), _build_headmask, F.fit_headmask, lambda k: k["heads"] is None))

register(Spec(
    "decore", "decode", ("I234",),
    "contrast the model with its retrieval heads masked: (1 + a) log p - a log p_masked, a entropy-guided",
    (Knob("k", "int", None, "retrieval heads masked (None: searched)"),
     Knob("alpha", "float", None, "contrast strength (None: searched)"),
     Knob("heads", "heads", None, "the masked heads (3.1/5.2)", unset="the top k retrieval heads of the atlas"),
     Knob("entropy", "bool", True, "scale alpha by the base distribution's normalized entropy")),
    _FAITH, _build_decore, F.fit_decore, lambda k: k["heads"] is None or k["alpha"] is None))

register(Spec(
    "dagcd", "decode", ("I242",),
    "dynamic attention-guided context decoding: the probe-selected heads' attention on the prompt, spread onto "
    "the vocabulary and added with the entropy weight",
    (Knob("k", "int", None, "heads used (None: searched)"),
     Knob("weight", "float", None, "weight of the attention distribution (None: searched)"),
     Knob("heads", "heads", None, "the heads (3.1/5.2)", unset="the top k heads of the validation probe")),
    _FAITH, _build_dagcd, F.fit_dagcd, lambda k: k["heads"] is None or k["weight"] is None))

register(Spec(
    "lookback", "decode", ("A169",),
    "Lookback-Lens guided decoding: per chunk, sampled candidates ranked by a lookback-ratio detector",
    (Knob("chunk_len", "int", 4, "tokens per chunk"),
     Knob("candidates", "int", 4, "sampled candidates per chunk"),
     Knob("temperature", "float", 1.0, "sampling temperature of the candidates"),
     Knob("seed", "int", 0, "seed of the candidates' sampling"),
     Knob("detector", "str", "fit", "fit: a logistic detector trained on the validation split; mean: the mean "
          "lookback ratio", ("fit", "mean")),
     Knob("train", "str", "planted", "the detector's examples: planted (summaries with a planted unsupported fact "
          "vs supported ones, the paper's span labels; falls back to continuations without that task) or "
          "continuations (sampled answers labelled by the task's score)", ("planted", "continuations"))),
    _FAITH, _build_lookback, F.fit_lookback, lambda k: k["detector"] == "fit"))

register(Spec(
    "pause", "prompt", ("I34",),
    "PAUSE prompting: insert pause markers every few tokens of the prompt (the question left intact)",
    (Knob("every", "int", None, "tokens between insertions (None: searched)"),
     Knob("count", "int", None, "markers per insertion (None: searched)"),
     Knob("marker", "str", " [PAUSE]", "the marker text")),
    _FAITH, _build_pause, F.fit_pause, lambda k: k["every"] is None or k["count"] is None))


def _build_moa(model, tok, knobs, tensors) -> Applied:
    if "alpha" not in tensors:
        raise ValueError("moa needs its per-head rules (fit on the validation split)")
    alpha, beta, sinks = tensors["alpha"], tensors["beta"], int(knobs["sinks"])
    return Applied("moa", "plan", _json(knobs), plan_for=lambda n: F.moa_plan_at(model, alpha, beta, sinks, n))


register(Spec(
    "moa", "plan", ("I58",),
    "MoA: elastic per-head attention spans (window = alpha + beta * N, per kv head) under a KV budget",
    (Knob("budget", "float", 0.5, "mean kept fraction of the keys at each profiled length"),
     Knob("sinks", "int", 4, "initial tokens every streaming head keeps")),
    _POSITION, _build_moa, F.fit_moa, lambda k: True))


_PREFILL = ("mdqa", "niah")  # SpecPrefill (I117): LongBench / RULER; Representation Shift (I232) on the same pipeline
_TOOL = ("toolcall", "mdqa")  # Attention Buckets (I147): ToolBench tool use, then RAG / multi-document QA
_DISTRACT = ("mdqa", "kv")  # Focus directions (I128): long contexts with irrelevant (distracting) documents


def _prefill_config(knobs: dict[str, Any]) -> SP.SpecPrefill:
    return SP.SpecPrefill(keep=float(knobs["keep"]), draft_layers=knobs.get("draft_layers"),
                          queries=int(knobs["queries"]), chunk=int(knobs["chunk"]), keep_last=int(knobs["keep_last"]))


_PREFILL_KNOBS = (
    Knob("keep", "float", 0.5, "fraction of the prompt's tokens prefilled (whole chunks, the last tokens always)"),
    Knob("draft_layers", "int", None, "the model's first decoder layers that make the draft", unset="half of them"),
    Knob("queries", "int", 16, "SpecPrefill scorer: the last prompt rows whose attention scores the tokens"),
    Knob("chunk", "int", 32, "selection granularity in tokens (1: token level)"),
    Knob("keep_last", "int", 16, "the last prompt tokens always kept (the question)"),
)


def _build_specprefill(model, tok, knobs, tensors) -> Applied:
    return Applied("specprefill", "decode", _json(knobs), loop=partial(SP.loop, config=_prefill_config(knobs)))


def _build_repshift(model, tok, knobs, tensors) -> Applied:
    shift = RS.RepShift(knobs.get("layer"), str(knobs["site"]), str(knobs["distance"]))
    if knobs["use"] == "kv":
        cfg = RS.RepShiftKV(float(knobs["keep"]), int(knobs["chunk"]), int(knobs["keep_last"]), shift)
        return Applied("repshift", "decode", _json(knobs), loop=partial(RS.kv_loop, config=cfg))
    return Applied("repshift", "decode", _json(knobs),
                   loop=partial(RS.prefill_loop, config=_prefill_config(knobs), shift=shift))


def _build_buckets(model, tok, knobs, tensors) -> Applied:
    bases = BK.parse_bases(knobs["bases"]) if knobs.get("bases") is not None else None
    cfg = BK.AttentionBuckets(bases=bases, n=int(knobs["n"]), merge=str(knobs["merge"]), rope=knobs.get("rope"))
    return Applied("buckets", "decode", _json(knobs), loop=partial(BK.loop, config=cfg))


def _build_focus(model, tok, knobs, tensors) -> Applied:
    if "directions" not in tensors:
        raise ValueError("focus needs its contextual heads and directions (fit on the validation split)")
    fd = FO.from_tensors(tensors, float(knobs["alpha"] or 0.0))
    if fd.alpha == 0:
        return Applied("focus", "hooks", _json(knobs))  # the fit kept the plain model
    return Applied("focus", "hooks", _json(knobs), attach=fd.attach)


register(Spec(
    "specprefill", "decode", ("I117",),
    "SpecPrefill: the model's first layers score the prompt's tokens by the question's attention (max over heads, "
    "summed over the last rows); only the best chunks are prefilled, at their original positions",
    _PREFILL_KNOBS, _PREFILL, _build_specprefill))

register(Spec(
    "repshift", "decode", ("I232",),
    "Representation Shift: ||h_out - h_in|| of a layer as token importance (no attention weights: SDPA stays); "
    "use=prefill prunes the prompt on SpecPrefill's pipeline, use=kv prunes the dense prefill's cache",
    (Knob("use", "str", "prefill", "prefill (SpecPrefill's pipeline) or kv (a KV-cache keep score)",
          ("prefill", "kv")),
     *_PREFILL_KNOBS,
     Knob("layer", "int", None, "the layer scored", unset="prefill: the draft's last; kv: the middle layer"),
     Knob("site", "str", "block", "what changes the token: the whole layer, its attention or its MLP",
          RS.SITES),
     Knob("distance", "str", "l2", "l2 (the paper's), l1, or cos (block only)", RS.DISTANCES)),
    _PREFILL, _build_repshift))

register(Spec(
    "buckets", "decode", ("I147",),
    "Attention Buckets: parallel passes with different RoPE bases (one cache each), next-token distributions "
    "averaged; bases searched so the waveforms' troughs do not coincide",
    (Knob("n", "int", 3, "buckets when the bases are searched"),
     Knob("bases", "str", None, "RoPE bases, 100000/150000", unset="searched at the prompt's length (the "
          "model's own base, then greedily the one raising the envelope's lowest point)"),
     Knob("merge", "str", "mean-prob", "mean of probabilities, or of log-probabilities", BK.MERGES),
     Knob("rope", "str", None, "the rotary table the bases go to", unset="the one with the largest base")),
    _TOOL, _build_buckets))

register(Spec(
    "focus", "hooks", ("I128",),
    "Focus directions: the contextual heads' queries shifted along the mean key difference between relevant and "
    "irrelevant context (alpha in units of the head's query norm)",
    (Knob("k", "int", 8, "contextual heads (most attention on the relevant span on validation)"),
     Knob("alpha", "float", None, "strength, in query-norm units (None: searched on validation)"),
     Knob("tail", "int", 32, "last prompt tokens (the question) left out of the irrelevant context")),
    _DISTRACT, _build_focus, FO.fit_focus, lambda k: True))


def default_tasks(choices: Sequence[Choice], available: Sequence[str]) -> list[str]:
    """The union of the arms' papers' tasks that ``available`` holds (in order), else ``kv``."""
    out: list[str] = []
    for c in choices:
        own = [t for t in c.spec.default_tasks if t in available]
        for t in own[:2]:
            if t not in out:
                out.append(t)
    return out or ["kv"]


def describe() -> str:
    """One paragraph per intervention: kind, papers, summary, knobs (``attnlab eval --list-interventions``)."""
    lines = []
    for s in REGISTRY.values():
        lines.append(f"{s.name} [{s.kind}] {'/'.join(s.papers) or '-'}: {s.summary}")
        lines.extend(f"    {k.describe()}" for k in s.knobs)
    return "\n".join(lines)


__all__ = ["Applied", "Arm", "Choice", "KINDS", "Knob", "REGISTRY", "Spec", "apply", "arm_label", "build_arm",
           "default_tasks", "describe", "get", "names", "parse", "parse_one", "register"]
# modules that register themselves: hpg (I216); zeroshot, inject (I228); sar (I122); rhythm (I26)
from . import hpg, inject, rhythm, sar  # noqa: E402,F401
