"""Whole-model costs: a method (frontier name, op, pattern or saved plan) on a model shape, prefill and decode.

A :class:`ModelShape` is read from a Hugging Face config (no weights): layers, heads, head size, each layer's
sliding window, and the non-attention matmuls (q/k/v/o projections, the gated MLP, the LM head). A method
becomes one *layer program* per layer -- an op with options on every head, or cache policies per key/value head
(a :class:`~attnlab.plans.plan.HeadPlan`, built by the frontier's own method code on a config-only stand-in of the
model) -- and each layer is priced by :mod:`attnlab.cost.model`.

Conventions:

* **non-attention part**: ``2 x params`` FLOPs per token for the projections, the MLP and the LM head (the LM head
  only for the last prompt token in a prefill, as ``logits_to_keep=1`` does, and for every generated token);
  weights are read once per forward call and, when ``batch`` sequences decode together, that read is shared
  (per sequence: ``weight bytes / batch``). Embedding lookups, norms and activations are not counted.
* **attention part**: per layer, the layer program's op or policies (:mod:`attnlab.cost.model`). On models
  with sliding-window layers (Gemma 3) those layers run the model's own window (``stream(0, W)``), or what a
  frontier method's plan puts there (``Context.local``: shrunk with the budget).
* **decode at context L**: the step's query sees ``L`` keys (itself included); ``decode_tokens = N`` sums the
  steps at contexts ``L + 1 .. L + N`` after an ``L``-token prompt.
"""

from __future__ import annotations

import ast
import json
import types
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import nn

from . import model as C
from .model import Cost, Hardware, Heads, NotPriced

MODELS = ("smollm2", "gemma3")
_CACHE_DIRS = {"smollm2": "smollm2-135m-instruct", "gemma3": "gemma3-270m"}


# ---------------------------------------------------------------------------------------------------------
# model shapes
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    """What the cost model needs of a model: its attention geometry, each layer's sliding window (None: full)
    and the sizes of its matmuls. ``hidden == 0``: a bare attention call (no projections, MLP or LM head)."""

    name: str
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    windows: tuple[int | None, ...]
    hidden: int = 0
    intermediate: int = 0
    vocab: int = 0
    batch: int = 1
    dtype_bytes: int = 4

    def __post_init__(self) -> None:
        if len(self.windows) != self.layers:
            raise ValueError(f"windows must list one entry per layer ({self.layers}), got {len(self.windows)}")
        Heads(self.heads, self.kv_heads, self.head_dim, self.batch, self.dtype_bytes)  # validates

    @property
    def q_per_kv(self) -> int:
        return self.heads // self.kv_heads

    @property
    def full_layers(self) -> tuple[int, ...]:
        return tuple(i for i, w in enumerate(self.windows) if w is None)

    def geometry(self, kv_heads: int | None = None) -> Heads:
        """The call shape of a layer, or of ``kv_heads`` of its key/value heads (a policy group)."""
        n = self.kv_heads if kv_heads is None else kv_heads
        return Heads(n * self.q_per_kv, n, self.head_dim, self.batch, self.dtype_bytes)

    # ---- the non-attention part -------------------------------------------------------------------------
    @property
    def layer_params(self) -> int:
        """Matmul parameters of one layer: q, k, v, o projections and the gated MLP (gate, up, down)."""
        if not self.hidden:
            return 0
        proj = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        return proj + 3 * self.hidden * self.intermediate

    @property
    def head_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def params(self) -> int:
        """Matmul parameters a generated token goes through (layers + LM head)."""
        return self.layers * self.layer_params + self.head_params

    @property
    def weight_bytes(self) -> int:
        return self.params * self.dtype_bytes

    def other_prefill(self, L: int) -> Cost:
        """Projections + MLP for ``L`` prompt tokens, the LM head for the last one; weights read once."""
        if not self.hidden:
            return C.ZERO
        flops = 2.0 * (self.layers * self.layer_params * L + self.head_params)
        return Cost(flops * self.batch, float(self.weight_bytes))

    def other_decode(self) -> Cost:
        """Per generated token and sequence: 2 x params FLOPs, the weights' read shared by the batch."""
        if not self.hidden:
            return C.ZERO
        return Cost(2.0 * self.params, self.weight_bytes / self.batch)

    # ---- constructors -----------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: Any, name: str = "model", batch: int = 1, dtype_bytes: int = 4) -> ModelShape:
        """From a transformers config (text part of a multimodal one)."""
        cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        layers = int(cfg.num_hidden_layers)
        heads = int(cfg.num_attention_heads)
        kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
        hidden = int(cfg.hidden_size)
        head_dim = int(getattr(cfg, "head_dim", None) or hidden // heads)
        window = getattr(cfg, "sliding_window", None)
        types_ = getattr(cfg, "layer_types", None)
        if not window:
            windows: tuple[int | None, ...] = (None,) * layers
        elif types_ is None:
            windows = (int(window),) * layers
        else:
            windows = tuple(int(window) if t == "sliding_attention" else None for t in list(types_)[:layers])
        return cls(name, layers, heads, kv, head_dim, windows, hidden, int(cfg.intermediate_size),
                   int(cfg.vocab_size), batch, dtype_bytes)

    @classmethod
    def load(cls, name: str, batch: int = 1, dtype_bytes: int = 4) -> ModelShape:
        """``smollm2`` / ``gemma3`` from the converted model's ``config.json`` (the GGUF's metadata when SmolLM2
        is not converted yet), or a local Hugging Face folder holding a ``config.json``."""
        from transformers import AutoConfig

        from ..models import hf

        key = name.lower()
        if key in _CACHE_DIRS:
            folder = hf.cache_root() / "models" / _CACHE_DIRS[key]
            if (folder / "config.json").is_file():
                cfg = AutoConfig.from_pretrained(str(folder), local_files_only=True)
            elif key == "smollm2":
                gguf = hf.smollm2_gguf()
                cfg = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
            else:
                raise NotPriced(f"no config for {name!r} under {folder}: load it once with "
                                f"attnlab.models.hf.load_model({name!r}) (that converts it and keeps its config)")
        else:
            folder = Path(name).expanduser()
            if not (folder / "config.json").is_file():
                raise ValueError(f"unknown model {name!r}: use {', '.join(MODELS)}, 'none' or a folder with a "
                                 "config.json")
            cfg = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        return cls.from_config(cfg, key if key in _CACHE_DIRS else folder.name, batch, dtype_bytes)

    @classmethod
    def bare(cls, heads: int = 8, kv_heads: int | None = None, head_dim: int = 64, batch: int = 1,
             dtype_bytes: int = 4) -> ModelShape:
        """One attention call ``(batch, heads, L, head_dim)``: one layer, no projections or MLP."""
        return cls("attention", 1, heads, kv_heads or heads, head_dim, (None,), batch=batch,
                   dtype_bytes=dtype_bytes)


class _ConfigOnly(nn.Module):
    """A weightless stand-in whose ``config`` answers what the frontier's method code reads of a model."""

    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        full = shape.full_layers
        window = next((w for w in shape.windows if w is not None), None)
        self.config = types.SimpleNamespace(
            num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
            hidden_size=shape.hidden or shape.heads * shape.head_dim, head_dim=shape.head_dim,
            sliding_window=window, is_decoder=True,
            layer_types=None if window is None else
            ["full_attention" if i in full else "sliding_attention" for i in range(shape.layers)])


# ---------------------------------------------------------------------------------------------------------
# methods by name
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MethodSpec:
    """A method to price. ``kind``: ``dense``, ``frontier`` (a name of :mod:`attnlab.frontier.methods` at a
    budget), ``op`` (an op of :mod:`attnlab.ops` with options), ``pattern`` (a class of
    :mod:`attnlab.core.patterns` with its arguments, run by the ``pattern`` op) or ``plan`` (a saved plan)."""

    kind: str
    name: str
    options: tuple[tuple[str, Any], ...] = ()
    text: str = ""

    @property
    def label(self) -> str:
        return self.text or self.name


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word: a string option (mode=block_topk)


def _parse_options(text: str) -> dict[str, Any]:
    """``a=1,b=(2, 3),c=x`` -> dict (commas inside brackets do not split)."""
    out: dict[str, Any] = {}
    depth, cur, parts = 0, "", []
    for ch in text:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    for part in parts:
        if "=" not in part:
            raise ValueError(f"method option {part!r} must be key=value")
        k, v = part.split("=", 1)
        out[k.strip()] = _literal(v.strip())
    return out


def parse_method(text: str) -> MethodSpec:
    """``dense``; a frontier method (``stream``, ``snapkv``, ``moba``, ...); an op with options
    (``moba:block=64,top_k=4``; ``op:NAME`` for an op a frontier method shadows); a pattern class
    (``SlidingWindow:window=256``, ``Dilated:window=64,dilation=4``); ``plan:PATH`` (a saved HeadPlan)."""
    from .. import ops
    from ..core import patterns
    from ..frontier import methods as FM

    text = text.strip()
    if not text:
        raise ValueError("empty method name")
    if text in ("dense", "full"):
        return MethodSpec("dense", "dense", text=text)
    if text.startswith("plan:"):
        return MethodSpec("plan", text[5:], text=text)
    head, _, rest = text.partition(":")
    if head == "op":
        name, _, rest = rest.partition(":")
        return MethodSpec("op", name, tuple(_parse_options(rest).items()), text)
    opts = _parse_options(rest) if rest else {}
    if head in FM.METHODS and not rest:
        return MethodSpec("frontier", head, text=text)
    if head in ops.names():
        return MethodSpec("op", head, tuple(opts.items()), text)
    if head in patterns.__all__ and head not in ("Pattern", "And", "Or", "PerHead", "GridPattern"):
        return MethodSpec("pattern", head, tuple(opts.items()), text)
    raise NotPriced(f"unknown method {text!r}: use 'dense', a frontier method ({', '.join(FM.METHODS)}), an op "
                    f"({', '.join(ops.names())}) with optional ':key=value,...', a pattern class "
                    "(e.g. SlidingWindow:window=256) or plan:PATH")


def method_names() -> list[str]:
    """Every name ``parse_method`` accepts without options (frontier methods, ops, pattern classes)."""
    from .. import ops
    from ..core import patterns
    from ..frontier import methods as FM

    pats = [p for p in patterns.__all__ if p not in ("Pattern", "And", "Or", "PerHead", "GridPattern")]
    return ["dense", *FM.METHODS, *(n for n in ops.names() if n not in FM.METHODS), *pats]


# ---------------------------------------------------------------------------------------------------------
# layer programs
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerProgram:
    """What one layer runs: ``op`` (name, options) on every head, or ``policies`` per key/value head."""

    op: tuple[str, dict[str, Any]] | None = None
    policies: tuple[Any, ...] | None = None


@dataclass(frozen=True)
class Program:
    """A method on a model: one :class:`LayerProgram` per layer, the protocol the prompt runs under."""

    layers: tuple[LayerProgram, ...]
    protocol: str = "prefill"
    notes: tuple[str, ...] = ()


def _window_program(window: int) -> LayerProgram:
    from ..plans.plan import HeadPolicy

    return LayerProgram(policies=(HeadPolicy.stream(0, window),))  # broadcast over the kv heads


def _dense_layers(shape: ModelShape) -> list[LayerProgram]:
    return [LayerProgram(op=("sdpa", {"causal": True})) if w is None else _window_program(w) for w in shape.windows]


def _plan_program(plan: Any, shape: ModelShape) -> list[LayerProgram]:
    plan.check_model(shape.layers, shape.kv_heads, shape.q_per_kv)
    return [LayerProgram(policies=tuple(row)) for row in plan.policies]


def _pattern_object(name: str, options: dict[str, Any]) -> Any:
    from ..core import patterns

    cls = getattr(patterns, name)
    try:
        return cls(**options)
    except TypeError as e:
        raise ValueError(f"pattern {name}: {e}") from None


def program(spec: MethodSpec, shape: ModelShape, L: int, budget: float = 0.25, protocol: str | None = None,
            calibration: str | Path | None = None) -> Program:
    """The layer programs of ``spec`` on ``shape`` at prompt length ``L`` (frontier methods at ``budget``)."""
    if spec.kind == "dense":
        return Program(tuple(_dense_layers(shape)))
    opts = dict(spec.options)
    full = set(shape.full_layers)
    if spec.kind in ("op", "pattern"):
        if spec.kind == "pattern":
            opts = {"pattern": _pattern_object(spec.name, opts)}
            name = "pattern"
        else:
            name = spec.name
            C.resolve(name, opts)  # bad option names fail here
        layers = [LayerProgram(op=(name, opts)) if i in full else lp for i, lp in enumerate(_dense_layers(shape))]
        notes = () if len(full) == shape.layers else ("sliding-window layers keep the model's window",)
        return Program(tuple(layers), "prefill", notes)
    if spec.kind == "plan":
        from ..plans.plan import HeadPlan

        plan = HeadPlan.load(spec.name)
        return Program(tuple(_plan_program(plan, shape)), protocol or "prefill")
    if spec.kind != "frontier":
        raise NotPriced(f"method kind {spec.kind!r} has no cost formula")
    return _frontier_program(spec.name, shape, L, budget, protocol, calibration)


def _frontier_program(name: str, shape: ModelShape, L: int, budget: float, protocol: str | None,
                      calibration: str | Path | None) -> Program:
    import torch

    from ..frontier import methods as FM

    meth = FM.get(name)
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"budget must be in (0, 1], got {budget}")
    proto = protocol or meth.protocols[0]
    if proto not in meth.protocols:
        raise ValueError(f"frontier method {name!r} runs under {meth.protocols}, not {proto!r}")
    stub = _ConfigOnly(shape)
    ctx = FM.Context(stub, None, shape.layers, shape.kv_heads, shape.q_per_kv, shape.full_layers,
                     store=Path(calibration) if calibration else None)
    notes: list[str] = []
    base = name.split("+")[0]
    if base in ("probe", "duo", "atlas"):
        # the calibration ranks heads; the cost depends only on how many are full: equal scores stand in
        ctx.cache[base] = torch.zeros(shape.layers, shape.kv_heads)
        notes.append("head ranking not calibrated (cost depends only on the number of full heads)")
        split = f"{base}-split-{budget}-{L}"  # whole heads vs uniform windows (FM._uniform_wins)
        if ctx.store is None or FM._load(ctx.store, split) is None:
            ctx.cache[split] = torch.zeros(3)
            notes.append("split not calibrated: the budget rule's whole heads priced")
    try:
        setup = meth.build(ctx, budget, L)
    except Exception:  # a calibration that needs the real model (MoA's profile search)
        raise NotPriced(f"frontier method {name!r} needs a calibration of the model to build its plan; "
                        "pass --calibration DIR (a frontier run's calibration-<model>/ folder holding it) or "
                        "price a saved plan with plan:PATH") from None
    if setup.lookahead:
        raise NotPriced(f"frontier method {name!r} decodes {setup.lookahead} pseudo tokens before it compresses "
                        "(Lookahead Q-Cache); that step has no cost formula: price the method it re-runs (snapkv) "
                        "plus as many decode steps")
    if setup.plan is not None:
        return Program(tuple(_plan_program(setup.plan, shape)), proto, tuple(notes))
    layers = _dense_layers(shape)
    for layer, (op, opts) in setup.ops.items():
        layers[layer] = LayerProgram(op=(op, dict(opts)))
    return Program(tuple(layers), proto, tuple(notes))


# ---------------------------------------------------------------------------------------------------------
# pricing
# ---------------------------------------------------------------------------------------------------------
def _groups(lp: LayerProgram, shape: ModelShape) -> list[tuple[Any, int]]:
    """(policy, number of kv heads) groups of a policy layer (one entry broadcasts to every kv head)."""
    pols = lp.policies
    if len(pols) == 1:
        return [(pols[0], shape.kv_heads)]
    if len(pols) != shape.kv_heads:
        raise ValueError(f"a layer lists {len(pols)} policies for {shape.kv_heads} key/value heads")
    groups: dict[Any, int] = {}
    for p in pols:
        groups[p] = groups.get(p, 0) + 1
    return list(groups.items())


def layer_prefill(lp: LayerProgram, shape: ModelShape, L: int, protocol: str = "prefill",
                  dense: LayerProgram | None = None) -> Cost:
    """The prompt of one layer. ``press``: the dense layer ``dense`` computes it, the policies only record
    what they keep (:func:`attnlab.cost.model.policy_observe`)."""
    if lp.op is not None:
        name, opts = lp.op
        return C.op_cost(name, shape.geometry(), L, L, L, **opts)
    if protocol == "press" and dense is not None:
        base = layer_prefill(dense, shape, L)
        return base + Cost(sum(C.policy_observe(p, shape.geometry(n), L) for p, n in _groups(lp, shape)), 0.0)
    return sum((C.policy_prefill(p, shape.geometry(n), L) for p, n in _groups(lp, shape)), C.ZERO)


def layer_decode(lp: LayerProgram, shape: ModelShape, L: int, prompt: int, exact: bool = False) -> Cost:
    """One generated token at context ``L``: averaged over a period for ops whose rule repeats, or (``exact``)
    the step at position ``L - 1`` itself."""
    if lp.op is not None:
        name, opts = lp.op
        if exact:
            return C.op_cost(name, shape.geometry(), 1, L, prompt, **opts)
        return C.op_decode_cost(name, shape.geometry(), L, prompt, **opts)
    return sum((C.policy_decode(p, shape.geometry(n), L) for p, n in _groups(lp, shape)), C.ZERO)


def layer_held(lp: LayerProgram, shape: ModelShape, L: int) -> float:
    if lp.op is not None:
        name, opts = lp.op
        return C.op_state_bytes(name, shape.geometry(), L, **opts)
    return sum(C.policy_held_bytes(p, shape.geometry(n), L) for p, n in _groups(lp, shape))


@dataclass(frozen=True)
class Priced:
    """One method on one model at prompt length ``L``: prefill (the whole prompt) and decode (one token at
    context ``L``; ``decode_total``: ``decode_tokens`` tokens after the prompt), attention and the rest apart."""

    method: str
    model: str
    length: int
    budget: float | None
    protocol: str
    prefill_attn: Cost
    prefill_other: Cost
    decode_attn: Cost
    decode_other: Cost
    decode_tokens: int = 0
    total_attn: Cost = C.ZERO
    total_other: Cost = C.ZERO
    held_bytes: float = 0.0
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def prefill(self) -> Cost:
        return self.prefill_attn + self.prefill_other

    @property
    def decode(self) -> Cost:
        return self.decode_attn + self.decode_other

    @property
    def total_decode(self) -> Cost:
        return self.total_attn + self.total_other

    def row(self, hw: Hardware) -> dict[str, Any]:
        """A flat, JSON-able row with eFLOPs and predicted seconds on ``hw``."""
        L = self.length
        d_attn, d = hw.eflops(self.decode_attn), hw.eflops(self.decode)
        row = {
            "method": self.method, "model": self.model, "L": L,
            "budget": self.budget, "protocol": self.protocol,
            "prefill_gflop": self.prefill.flops / 1e9, "prefill_gb": self.prefill.bytes / 1e9,
            "prefill_egflop": hw.eflops(self.prefill) / 1e9,
            "prefill_attn_share": hw.eflops(self.prefill_attn) / max(hw.eflops(self.prefill), 1e-30),
            "prefill_s": hw.roofline_s(self.prefill),
            "prefill_gflop_per_tok": self.prefill.flops / 1e9 / L,
            "decode_mflop": self.decode.flops / 1e6, "decode_mb": self.decode.bytes / 1e6,
            "decode_attn_mb": self.decode_attn.bytes / 1e6,
            "decode_egflop": d / 1e9, "decode_attn_share": d_attn / max(d, 1e-30),
            "decode_ms": hw.roofline_s(self.decode) * 1e3,
            "kv_mb": self.held_bytes / 1e6,
            "notes": "; ".join(self.notes),
        }
        if self.decode_tokens:
            row.update({"decode_tokens": self.decode_tokens,
                        "decode_total_egflop": hw.eflops(self.total_decode) / 1e9,
                        "decode_total_s": hw.roofline_s(self.total_decode),
                        "total_egflop": (hw.eflops(self.prefill) + hw.eflops(self.total_decode)) / 1e9})
        return row


def price(spec: MethodSpec | str, shape: ModelShape, L: int, *, budget: float = 0.25, decode_tokens: int = 0,
          protocol: str | None = None, calibration: str | Path | None = None) -> Priced:
    """Price ``spec`` on ``shape``: the prompt of ``L`` tokens and decoding at context ``L`` (and the
    ``decode_tokens`` steps after it). Raises :class:`NotPriced` when no formula covers the method."""
    if isinstance(spec, str):
        spec = parse_method(spec)
    if isinstance(L, bool) or not isinstance(L, int) or L < 1:
        raise ValueError(f"length must be a positive integer, got {L!r}")
    if decode_tokens < 0:
        raise ValueError(f"decode_tokens must be >= 0, got {decode_tokens}")
    prog = program(spec, shape, L, budget, protocol, calibration)
    dense = _dense_layers(shape)
    # identical layers are priced once
    groups: dict[str, tuple[LayerProgram, LayerProgram, int]] = {}
    for lp, dl in zip(prog.layers, dense, strict=True):
        key = repr((lp, dl))
        groups[key] = (lp, dl, groups[key][2] + 1 if key in groups else 1)
    pre, dec, tot, held = C.ZERO, C.ZERO, C.ZERO, 0.0
    for lp, dl, n in groups.values():
        pre = pre + layer_prefill(lp, shape, L, prog.protocol, dl) * n
        dec = dec + layer_decode(lp, shape, L, L - 1) * n
        for t in range(decode_tokens):
            tot = tot + layer_decode(lp, shape, L + 1 + t, L, exact=True) * n
        held += layer_held(lp, shape, L) * n
    return Priced(spec.label, shape.name, L, budget if spec.kind == "frontier" else None, prog.protocol, pre,
                  shape.other_prefill(L), dec, shape.other_decode(), decode_tokens, tot,
                  shape.other_decode() * decode_tokens, held, prog.notes)


def price_many(methods: Sequence[str], shape: ModelShape, lengths: Sequence[int], **kw: Any) -> list[Priced]:
    return [price(m, shape, L, **kw) for m in methods for L in lengths]


def with_batch(shape: ModelShape, batch: int) -> ModelShape:
    return replace(shape, batch=batch)


def shape_dict(shape: ModelShape) -> dict[str, Any]:
    d = {k: getattr(shape, k) for k in ("name", "layers", "heads", "kv_heads", "head_dim", "hidden",
                                        "intermediate", "vocab", "batch", "dtype_bytes")}
    d["windows"] = list(shape.windows)
    d["params"] = shape.params
    return json.loads(json.dumps(d))


__all__ = ["MODELS", "LayerProgram", "MethodSpec", "ModelShape", "Priced", "Program", "layer_decode",
           "layer_held", "layer_prefill", "method_names", "parse_method", "price", "price_many", "program",
           "shape_dict", "with_batch"]

