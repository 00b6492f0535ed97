"""Token mixers of the ViT by name: the vision mixers of this package, or any registered attention layer that
can run non-causally on a set of image tokens.

A mixer maps patch tokens ``(B, T, dim)`` to ``(B, T, dim)``; ``T = prefix + gh * gw`` where ``prefix`` is 1
with a class token, else 0, and the grid tokens are row-major (pixel ``(p // gw, p % gw)``).

Two kinds of names:

* a vision mixer registered here with :func:`register_mixer` (``shift``, ``uniform``, ``lka``, ``spectral``,
  ``window``, ``neighborhood``, ``ulsam``, ``ninformer``, ``a2n``, ``region``, ``tic``, ``tap``).
  ``grid_only`` mixers read the tokens as an image and take no class token (``pooling="mean"``);
* a layer of the mechanism catalogue (``attnlab.mechanisms.registry``). The registry says what a layer can do
  through its config's options (``config_options``): a layer that offers ``causal`` is built with
  ``causal=False``; a layer that does not offer it is non-causal only when its fixed ``causal`` default is
  False (BiFormer, CARE, VMoBA, Sparsifiner) -- a fixed ``causal=True`` (MoBA, the linear recurrences) is
  causal-only and rejected. A layer with a ``grid`` option takes the 2-D grid (a 3-D ``grid`` gets
  ``(1, gh, gw)``) and is grid-only; a layer with a ``pattern`` option gets ``pattern=None`` (all tokens)
  unless the options name one. ``rope`` is turned off: the ViT adds its own 2-D positions.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..mechanisms import registry as mech
from ..mechanisms.heads import HeadsConfig


@dataclass(frozen=True)
class MixerContext:
    """What a mixer is built for: the heads config (``dim``, ``heads``, ...), the patch grid ``(gh, gw)`` and
    the number of tokens before the grid tokens (``prefix``: 1 with a class token)."""

    attn: HeadsConfig
    grid: tuple[int, int]
    prefix: int = 0

    @property
    def dim(self) -> int:
        return self.attn.dim

    @property
    def tokens(self) -> int:
        return self.prefix + self.grid[0] * self.grid[1]


@dataclass(frozen=True)
class MixerEntry:
    name: str
    build: Callable[..., nn.Module]
    papers: tuple[str, ...]
    summary: str
    grid_only: bool  # reads the tokens as an image: no class token


_MIXERS: dict[str, MixerEntry] = {}


def register_mixer(name: str, *, papers: tuple[str, ...], summary: str, grid_only: bool):
    """Decorator of a builder ``fn(ctx: MixerContext, **options) -> nn.Module``."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MIXERS and _MIXERS[name].build is not fn:
            raise ValueError(f"vision mixer {name!r} is already registered")
        _MIXERS[name] = MixerEntry(name, fn, papers, summary, grid_only)
        return fn

    return deco


def _load() -> None:
    # importing the modules registers their mixers
    from . import a2n, dat, lka, ninformer, region, robust, shift, spectral, tic, ulsam, uniform, window  # noqa: F401


def mixer_names() -> list[str]:
    """The vision mixers of this package (catalogue layers are accepted too, see :func:`build_mixer`)."""
    _load()
    return sorted(_MIXERS)


def grid_only(name: str, options: dict[str, Any] | None = None) -> bool:
    """Whether mixer ``name`` reads the tokens as an image (so it cannot take a class token)."""
    _load()
    if name in _MIXERS:
        return _MIXERS[name].grid_only
    entry = _catalogue_entry(name)
    return "grid" in mech.config_options(entry.config) or _grid_pattern(options or {})


def _grid_pattern(options: dict[str, Any]) -> bool:
    from ..core.patterns.neighborhood import GridPattern

    return isinstance(options.get("pattern"), GridPattern)


def _catalogue_entry(name: str) -> mech.Entry:
    try:
        return mech.get(name)
    except KeyError:
        raise KeyError(f"unknown mixer {name!r}: neither a vision mixer ({', '.join(mixer_names())}) nor a "
                       "registered mechanism (`attnlab list`)") from None


def build_mixer(name: str, ctx: MixerContext, **options: Any) -> nn.Module:
    """The token mixer ``name`` for ``ctx``: ``(B, ctx.tokens, dim) -> (B, ctx.tokens, dim)``.

    Raises ``KeyError`` for an unknown name, ``ValueError`` for a causal-only mechanism or a grid-only mixer
    given a class token, ``TypeError`` for unknown options (the mechanism registry's message)."""
    _load()
    if name in _MIXERS:
        if ctx.prefix and _MIXERS[name].grid_only:
            raise ValueError(f"mixer {name!r} reads the tokens as an image and takes no class token; "
                             "use pooling='mean'")
        return _MIXERS[name].build(ctx, **options)
    entry = _catalogue_entry(name)
    return mech.build(name, **catalogue_options(entry, ctx, options))


def catalogue_options(entry: mech.Entry, ctx: MixerContext, options: dict[str, Any]) -> dict[str, Any]:
    """The options a catalogue layer is built with inside the ViT (see the module docstring)."""
    valid = set(mech.config_options(entry.config))
    defaults = {f.name: f.default for f in dataclasses.fields(entry.config)}
    if "causal" not in valid and defaults.get("causal") is not False:
        raise ValueError(f"mechanism {entry.name!r} is causal-only (its config fixes causal=True); a ViT's "
                         "token mixer must see the whole image")
    if options.get("causal"):
        raise ValueError(f"mixer {entry.name!r}: causal=True makes no sense for image tokens")
    opts: dict[str, Any] = {}
    a = ctx.attn
    for k in ("dim", "heads", "kv_heads", "head_dim"):
        if k in valid and (k in ("dim", "heads") or getattr(a, k) is not None):
            opts[k] = getattr(a, k)
    if "causal" in valid:
        opts["causal"] = False
    if "rope" in valid:
        opts["rope"] = False
    if "pattern" in valid:
        opts["pattern"] = None
    if "grid" in valid:
        if ctx.prefix:
            raise ValueError(f"mechanism {entry.name!r} takes a 2-D grid and no class token; use pooling='mean'")
        opts["grid"] = ctx.grid if len(defaults["grid"]) == 2 else (1, *ctx.grid)
        opts.update(fit_to_grid(defaults, opts["grid"]))
    opts.update(options)
    if _grid_pattern(opts) and ctx.prefix:
        raise ValueError(f"mixer {entry.name!r} with a grid pattern takes no class token; use pooling='mean'")
    return opts


#: grid-tied options of the catalogue's grid layers: BiFormer's ``regions``, VMoBA's ``tile``
GRID_TIED = ("regions", "tile")


def fit_to_grid(defaults: dict[str, Any], grid: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """The grid-tied defaults shrunk to divide ``grid`` (per axis the gcd of the default and the side), e.g. BiFormer's
    ``regions=(4, 4)`` on a ``(1, 16)`` sequence grid -> ``(1, 4)``; VMoBA's ``tile=(2, 2, 2)`` on ``(1, 8, 8)`` ->
    ``(1, 2, 2)``. A default that already divides the grid is kept."""
    out = {}
    for k in GRID_TIED:
        d = defaults.get(k)
        if isinstance(d, tuple) and len(d) == len(grid):
            out[k] = tuple(math.gcd(a, g) for a, g in zip(d, grid))
    return out


__all__ = ["GRID_TIED", "MixerContext", "build_mixer", "catalogue_options", "fit_to_grid", "grid_only",
           "mixer_names", "register_mixer"]
