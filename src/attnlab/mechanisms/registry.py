"""The catalogue: every attention layer registered by name with its paper, family and a one-line summary.

    @register("moh", family="layers", papers=("L35",), year=2024, summary="...", config=MoHConfig)
    class MoHAttention(AttentionLayer): ...

    layer = attnlab.build("moh", dim=512, heads=8, active_heads=4)

Configs are frozen dataclasses (subclasses of :class:`attnlab.mechanisms.heads.HeadsConfig`); an unknown option
fails loudly with the list of valid ones, a renamed one names its new name (the config's ``renamed``).
Paper ids refer to ``shared/papers.md`` (the family letter and number are stable).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

FAMILIES = {
    "layers": "Attention layers and head structure",
    "sparse": "Static sparse patterns",
    "routing": "Content-based sparse attention",
    "linear": "Linear, recurrent and hybrid attention",
}


@dataclass(frozen=True)
class Entry:
    name: str
    cls: type[nn.Module]
    config: type
    family: str
    papers: tuple[str, ...]
    year: int
    summary: str
    decodes: bool  # supports incremental decoding with a cache
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": self.family,
            "papers": list(self.papers),
            "year": self.year,
            "titles": [paper_title(p) for p in self.papers],
            "summary": self.summary,
            "decodes": self.decodes,
            "config": config_options(self.config),
        }


_REGISTRY: dict[str, Entry] = {}
_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {}


def register(
    name: str,
    *,
    family: str,
    papers: tuple[str, ...],
    year: int,
    summary: str,
    config: type,
    decodes: bool = True,
) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator adding a layer to the catalogue."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {sorted(FAMILIES)}")
    if not dataclasses.is_dataclass(config) or not config.__dataclass_params__.frozen:
        raise TypeError(f"config for {name!r} must be a frozen dataclass")

    def deco(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _REGISTRY and _REGISTRY[name].cls is not cls:
            raise ValueError(f"mechanism {name!r} is already registered by {_REGISTRY[name].cls.__name__}")
        unknown = [p for p in papers if p not in _titles()]
        if unknown:
            raise ValueError(f"{name}: paper ids {unknown} are not in shared/papers.md")
        _REGISTRY[name] = Entry(name, cls, config, family, tuple(papers), year, summary, decodes)
        cls.registry_name = name
        return cls

    return deco


def preset(name: str, mechanism: str, **options: Any) -> None:
    """A named set of options, e.g. ``preset("moh-50", "moh", active_heads=4)``."""
    if name in _REGISTRY:
        raise ValueError(f"preset name {name!r} clashes with a mechanism")
    _PRESETS[name] = (mechanism, options)


def _load_all() -> None:
    # Importing the package registers every built-in layer.
    from attnlab import mechanisms  # noqa: F401


def get(name: str) -> Entry:
    _load_all()
    if name in _PRESETS:
        name = _PRESETS[name][0]
    if name not in _REGISTRY:
        raise KeyError(f"unknown mechanism {name!r}; `attnlab list` shows the {len(_REGISTRY)} registered ones")
    return _REGISTRY[name]


def config_options(config: type) -> list[str]:
    """The option names a config takes (its fields, less the heads options the layer keeps ``fixed``)."""
    fixed = set(getattr(config, "fixed", ()))
    return [f.name for f in dataclasses.fields(config) if f.name not in fixed]


def renamed_options(config: type) -> dict[str, str]:
    """``{old: new}`` option names of a config."""
    return dict(getattr(config, "renamed", {}) or {})


def check_options(name: str, config: type, options: Any) -> None:
    """Unknown or renamed option names raise ``TypeError`` naming them."""
    renamed = renamed_options(config)
    for key in options:
        if key in renamed:
            raise TypeError(f"{name}: option {key!r} was renamed to {renamed[key]!r}")
    valid = set(config_options(config))
    unknown = sorted(set(options) - valid)
    if unknown:
        raise TypeError(f"{name}: unknown option(s) {unknown}; valid options are {sorted(valid)}")


def make_config(name: str, **options: Any) -> Any:
    """Build the frozen config of ``name`` (a mechanism or a preset); unknown or renamed options raise."""
    _load_all()
    if name in _PRESETS:
        base, preset_opts = _PRESETS[name]
        options = {**preset_opts, **options}
        name = base
    entry = get(name)
    check_options(name, entry.config, options)
    return entry.config(**options)


def build(name: str, **options: Any) -> nn.Module:
    """Instantiate a registered layer (or preset) from keyword options."""
    cfg = make_config(name, **options)
    return get(name).cls(cfg)


def catalogue(family: str | None = None) -> list[Entry]:
    _load_all()
    entries = sorted(_REGISTRY.values(), key=lambda e: (list(FAMILIES).index(e.family), e.name))
    return [e for e in entries if family is None or e.family == family]


def presets() -> dict[str, tuple[str, dict[str, Any]]]:
    _load_all()
    return dict(_PRESETS)


def _titles() -> dict[str, str]:
    from .papers import TITLES

    return TITLES


def paper_title(pid: str) -> str:
    """Title of a paper id of ``shared/papers.md``."""
    return _titles().get(pid, "")
