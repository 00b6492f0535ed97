"""Which mechanism fills the backbone: a label, and one (name, options) per layer (cycled over the blocks).

``MechSpec("softmax", (LayerSpec("mha"),))`` puts ``attnlab.build("mha", dim=d, heads=h)`` in every block;
``MechSpec("based+swa", (LayerSpec("based"), LayerSpec("mha", {"pattern": SlidingWindow(16)})))`` alternates
a Taylor linear-attention block with a sliding-window block (a Based-style hybrid).

From the command line: ``name``, ``name:key=value,key=value`` (values parsed as Python literals) and
``spec/spec`` for per-layer hybrids; ``window=W`` on ``mha`` means ``pattern=SlidingWindow(W)``.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ...core.patterns import Causal, SlidingWindow
from ...mechanisms import registry


@dataclass(frozen=True)
class LayerSpec:
    name: str
    options: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        if not self.options:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v!r}" for k, v in sorted(self.options.items()))


@dataclass(frozen=True)
class MechSpec:
    label: str
    layers: tuple[LayerSpec, ...]

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError(f"{self.label}: no layers")

    def layer(self, i: int) -> LayerSpec:
        return self.layers[i % len(self.layers)]

    def describe(self) -> str:
        return " / ".join(ls.describe() for ls in self.layers)

    def available(self) -> bool:
        names = {e.name for e in registry.catalogue()} | set(registry.presets())
        return all(ls.name in names for ls in self.layers)


def config_fields(name: str) -> set[str]:
    """The options the layer takes."""
    return set(registry.config_options(registry.get(name).config))


def build_layer(spec: LayerSpec, dim: int, heads: int, layer_idx: int = 0, layers: int = 1) -> nn.Module:
    """``attnlab.build`` with the backbone's width and heads; the layer's place when its config asks for it."""
    fields = config_fields(spec.name)
    opts: dict[str, Any] = {}
    if "layer_idx" in fields and "layers" in fields:
        opts.update(layer_idx=layer_idx, layers=layers)
    if "causal" in fields and "pattern" not in spec.options:  # a given pattern decides (None: bidirectional)
        opts["causal"] = True
    opts.update(spec.options)
    return registry.build(spec.name, dim=dim, heads=heads, **opts)


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_options(rest: str, text: str) -> dict[str, Any]:
    """``key=value,...`` (values as Python literals) of a ``name:key=value,...`` spec ``text``."""
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"option {item!r} of {text!r} is not key=value")
        options[key.strip()] = _literal(value.strip())
    return options


def parse_layer(text: str) -> LayerSpec:
    name, _, rest = text.partition(":")
    options = parse_options(rest, text)
    if "window" in options and "window" not in config_fields(name) and "pattern" in config_fields(name):
        options["pattern"] = SlidingWindow(int(options.pop("window"))) & Causal()
    return LayerSpec(name.strip(), options)


def parse_mechanism(text: str, known: dict[str, MechSpec] | None = None) -> MechSpec:
    """A suite label (from ``known``), a catalogue name or preset, ``name:k=v,...``, or ``a/b`` per layer."""
    if known and text in known:
        return known[text]
    layers = tuple(parse_layer(part) for part in text.split("/"))
    for ls in layers:
        registry.make_config(ls.name, **ls.options)  # unknown names or options fail here, loudly
    return MechSpec(text, layers)
