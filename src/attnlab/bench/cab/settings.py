"""CAB's four attention settings (B24): which mechanism runs where, the sequence tasks and the cross model.

Settings (B24's taxonomy):

* ``causal-self``: the quality benchmark's backbone as it is (:class:`~attnlab.bench.tasks.backbone.Backbone`),
  mechanisms built with ``causal=True``; task: a small MQAR.
* ``noncausal-self``: the same backbone as an encoder, mechanisms built with ``causal=False``; tasks:
  :class:`ReverseTask` (output ``i`` is input ``T - 1 - i``: the first half needs right context) and the image
  tasks (:mod:`.images`), which run through the vision ViT (:mod:`attnlab.vision.vit`) as patch sequences.
* ``causal-cross`` / ``noncausal-cross``: :class:`CrossModel`, a decoder whose only token mixer is the mechanism
  attending from the target to an encoder memory of the source (same length, aligned positions). Causal cross:
  target ``i`` sees memory ``j <= i`` (B24: e.g. streaming / TTS-like monotonic alignment); non-causal: all.
  Tasks (:class:`CrossTask`): ``stretch`` (target ``i`` translates source ``i // 2``, each source word said
  twice: a monotonic alignment causal cross can do) and ``flip`` (target ``i`` translates source ``n - 1 - i``:
  half of it needs memory after ``i``).

Capabilities come from the registry, never from a list of names (:func:`unsupported`): a config with a
``causal`` option runs both ways; a fixed ``causal`` default decides the only way it runs; cross-attention
needs either a native ``cross(x, context)`` method (Luong; it sees the whole context, so non-causal only) or the
standard :class:`~attnlab.mechanisms.heads.OpLayer` pipeline (``project -> attend -> finish``; queries are
projected from the target, keys and values from the memory). Vision mixers of :mod:`attnlab.vision.registry`
run on image tasks only; grid-only catalogue layers (a ``grid`` option: CARE, BiFormer, VMoBA) get the
sequence as a ``1 x T`` grid. ``neighborhood`` / ``halo`` are ``mha`` with NAT's ``Neighborhood`` / HaloNet's
``HaloBlocks`` over the task's grid (``(T,)`` for sequences, the patch grid for images).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ...core.patterns import Causal
from ...core.patterns.neighborhood import Neighborhood
from ...core.patterns.vision import HaloBlocks
from ...mechanisms import registry
from ...mechanisms.common import RMSNorm
from ...mechanisms.heads import OpLayer
from ...vision.registry import fit_to_grid
from ..tasks.backbone import BackboneConfig, ShortConv
from ..tasks.base import Batch, Task

SETTINGS = ("causal-self", "noncausal-self", "causal-cross", "noncausal-cross")
PATTERNS = ("neighborhood", "halo")  # mha with a local grid pattern


@dataclass(frozen=True)
class CabMech:
    """A mechanism of the benchmark: ``name`` is a catalogue layer, a vision mixer or a pattern of
    :data:`PATTERNS` (``mha`` with that pattern); ``options`` go to its builder."""

    label: str
    name: str
    options: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        opts = ",".join(f"{k}={v!r}" for k, v in sorted(self.options.items()))
        return self.name + (":" + opts if opts else "")


def parse_mech(text: str) -> CabMech:
    """``name`` or ``name:key=value,...`` (values as Python literals)."""
    from ..tasks.mechanisms import parse_options

    name, _, rest = text.partition(":")
    return CabMech(text, name.strip(), parse_options(rest, text))


def is_vision_mixer(name: str) -> bool:
    from ...vision.registry import mixer_names

    return name in mixer_names()


def _entry(name: str) -> registry.Entry:
    return registry.get("mha" if name in PATTERNS else name)


def causal_modes(name: str) -> set[bool]:
    """The ``causal`` values the layer can be built with, from its config."""
    entry = _entry(name)
    if "causal" in registry.config_options(entry.config):
        return {True, False}
    defaults = {f.name: f.default for f in dataclasses.fields(entry.config)}
    return {bool(defaults.get("causal", False))}


def cross_kind(name: str) -> str | None:
    """``"native"`` (a ``cross`` method), ``"projected"`` (the standard OpLayer pipeline) or None."""
    cls = _entry(name).cls
    if hasattr(cls, "cross"):
        return "native"
    if issubclass(cls, OpLayer) and cls.forward is OpLayer.forward:
        return "projected"
    return None


def unsupported(mech: CabMech, setting: str, image: bool = False) -> str | None:
    """Why ``mech`` cannot run in ``setting`` (on an image task when ``image``), or None when it can."""
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}")
    if is_vision_mixer(mech.name) and mech.name not in PATTERNS:
        if not image:
            return "vision mixer: reads image tokens only"
        return None
    try:
        _entry(mech.name)
    except KeyError:
        return f"unknown mechanism {mech.name!r}"
    causal = setting.startswith("causal")
    if causal not in causal_modes(mech.name):
        return f"config fixes causal={not causal}"
    if setting.endswith("cross"):
        kind = cross_kind(mech.name)
        if kind is None:
            return "no cross-attention: forward is not project -> attend -> finish and there is no cross()"
        if kind == "native" and causal:
            return "native cross() sees the whole context (no causal cross)"
    return None


def grid_pattern(name: str, grid: tuple[int, ...], causal: bool) -> Any:
    """The pattern of ``neighborhood`` / ``halo`` on ``grid`` (1-D for sequences)."""
    if name == "neighborhood":
        p = Neighborhood(grid=grid, kernel_size=3 if len(grid) > 1 else 7)
    else:
        p = HaloBlocks(grid=grid, block=2 if len(grid) > 1 else 4, halo=1 if len(grid) > 1 else 2)
    return p & Causal() if causal else p


def build_seq_layer(mech: CabMech, dim: int, heads: int, seq_len: int, causal: bool) -> nn.Module:
    """The layer for a sequence of ``seq_len`` tokens, ``causal`` as the setting says."""
    name = "mha" if mech.name in PATTERNS else mech.name
    entry = registry.get(name)
    valid = set(registry.config_options(entry.config))
    opts: dict[str, Any] = {"dim": dim}
    if "heads" in valid:  # single-head layers (Mega, SHViT) have no such knob
        opts["heads"] = heads
    if "causal" in valid:
        opts["causal"] = causal
    if mech.name in PATTERNS:
        opts["pattern"] = grid_pattern(mech.name, (seq_len,), causal)
    elif "pattern" in valid and not causal:
        opts["pattern"] = None  # every pair (a causal default pattern would hide the right context)
    if "grid" in valid:
        defaults = {f.name: f.default for f in dataclasses.fields(entry.config)}
        opts["grid"] = (1, seq_len) if len(defaults["grid"]) == 2 else (1, 1, seq_len)
        opts.update(fit_to_grid(defaults, opts["grid"]))
    opts.update(mech.options)
    return registry.build(name, **opts)


# ---- sequence tasks -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReverseConfig:
    vocab: int = 16
    seq_len: int = 16
    test_size: int = 500
    val_size: int = 256


class ReverseTask(Task):
    """Output ``i`` is input ``T - 1 - i`` at every position (classes = vocab). A causal model can get the
    second half right and guesses the first half: its accuracy is at most ``1/2 + 1/(2 V)`` (even ``T``)."""

    name = "reverse"

    def sample(self, n: int, gen: torch.Generator) -> Batch:
        c = self.cfg
        x = torch.randint(c.vocab, (n, c.seq_len), generator=gen)
        return Batch(x, x.flip(1), torch.ones(n, c.seq_len, dtype=torch.bool))


@dataclass(frozen=True)
class CrossConfig:
    """kind: stretch | flip; vocab: source words; seq_len: source length = target length; seed: the
    dictionary (a fixed random permutation of the words)."""

    kind: str = "flip"
    vocab: int = 16
    seq_len: int = 16
    seed: int = 0
    test_size: int = 500
    val_size: int = 256

    def __post_init__(self) -> None:
        if self.kind not in ("stretch", "flip"):
            raise ValueError(f"kind must be 'stretch' or 'flip', got {self.kind!r}")


class CrossTask(Task):
    """``x = [source (n) ; n query tokens]`` (the query token is id ``vocab``); target ``i`` (at position
    ``n + i``) is ``dictionary[source[align(i)]]``, ``align(i) = i // 2`` (stretch) or ``n - 1 - i`` (flip)."""

    name = "cross"

    @property
    def vocab(self) -> int:
        return self.cfg.vocab + 1

    @property
    def num_classes(self) -> int:
        return self.cfg.vocab

    def align(self) -> Tensor:
        n = self.cfg.seq_len
        i = torch.arange(n)
        return i // 2 if self.cfg.kind == "stretch" else n - 1 - i

    def dictionary(self) -> Tensor:
        return torch.randperm(self.cfg.vocab, generator=torch.Generator().manual_seed(self.cfg.seed))

    def sample(self, n: int, gen: torch.Generator) -> Batch:
        c = self.cfg
        src = torch.randint(c.vocab, (n, c.seq_len), generator=gen)
        tgt = self.dictionary()[src[:, self.align()]]
        x = torch.cat([src, torch.full_like(src, c.vocab)], 1)
        y = torch.cat([torch.zeros_like(src), tgt], 1)
        mask = torch.cat([torch.zeros_like(src, dtype=torch.bool), torch.ones_like(src, dtype=torch.bool)], 1)
        return Batch(x, y, mask)

    def config_dict(self) -> dict[str, Any]:
        return {"task": f"cross-{self.cfg.kind}", **dataclasses.asdict(self.cfg)}


# ---- the cross model ------------------------------------------------------------------------------------------
class CrossMixer(nn.Module):
    """Target (B, T, dim) attending to memory (B, S, dim) -> (B, T, dim) through a layer of the catalogue."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor, memory: Tensor) -> Tensor:
        if hasattr(self.layer, "cross"):
            return self.layer.cross(x, memory)
        q, _, _ = self.layer.project(x, 0)
        _, k, v = self.layer.project(memory, 0)
        o = self.layer.attend(q, k, v, 0, None)  # the layer's causal flag masks key j > query i (aligned)
        return self.layer.finish(o, x)


class CrossModel(nn.Module):
    """Encoder-decoder in which the mechanism is the only mixer between source and target positions::

        memory = mlp(conv(embed(src) + pos))              # causal conv: memory j depends on source <= j
        g = embed(query) + pos;  per block: g += conv(norm g); g += cross(norm g, norm_mem(memory)); g += mlp
        hidden = [memory ; norm(g)]                        # (B, 2n, dim): the Backbone's interface

    Learned absolute positions on both sides: the alignment is positional (see ``bench/seq2seq.py``)."""

    def __init__(self, cfg: BackboneConfig, mech: CabMech, *, vocab: int, num_classes: int, seq_len: int,
                 causal: bool) -> None:
        super().__init__()
        d = cfg.dim
        self.n = seq_len
        self.embed = nn.Embedding(vocab, d)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.pos_src = nn.Parameter(torch.randn(seq_len, d) * 0.02)
        self.pos_tgt = nn.Parameter(torch.randn(seq_len, d) * 0.02)
        self.enc_conv = ShortConv(d, cfg.conv_kernel)
        self.enc_norm = RMSNorm(d)
        self.enc_mlp = nn.Sequential(RMSNorm(d), nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.norm_mem = RMSNorm(d)
        self.convs = nn.ModuleList(ShortConv(d, cfg.conv_kernel) for _ in range(cfg.layers))
        self.norms = nn.ModuleList(RMSNorm(d) for _ in range(2 * cfg.layers))
        self.cross = nn.ModuleList(
            CrossMixer(build_seq_layer(mech, d, cfg.heads, seq_len, causal)) for _ in range(cfg.layers))
        self.mlps = nn.ModuleList(
            nn.Sequential(RMSNorm(d), nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d)) for _ in range(cfg.layers))
        self.norm = RMSNorm(d)
        self.head = nn.Linear(d, num_classes, bias=False)

    @property
    def mixers(self) -> list[nn.Module]:
        return [c.layer for c in self.cross]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, 2n) = [source ; queries] -> (hidden (B, 2n, dim), aux 0)."""
        n = self.n
        if x.shape[1] != 2 * n:
            raise ValueError(f"x must have 2 * seq_len = {2 * n} positions, got {x.shape[1]}")
        m = self.embed(x[:, :n]) + self.pos_src
        m = m + self.enc_conv(self.enc_norm(m))
        m = m + self.enc_mlp(m)
        mem = self.norm_mem(m)
        g = self.embed(x[:, n:]) + self.pos_tgt
        for i, (conv, cross, mlp) in enumerate(zip(self.convs, self.cross, self.mlps, strict=True)):
            g = g + conv(self.norms[2 * i](g))
            g = g + cross(self.norms[2 * i + 1](g), mem)
            g = g + mlp(g)
        return torch.cat([m, self.norm(g)], 1), torch.zeros((), device=x.device)

    def logits(self, hidden: Tensor) -> Tensor:
        return self.head(hidden)


def setting_leak(model: nn.Module, x: Tensor, at: int, cross: bool) -> float:
    """Largest change of the scored outputs before ``at`` when the inputs from ``at`` on change.

    Self settings: tokens ``at..`` change, outputs ``< at`` are read. Cross settings (``x = [src ; queries]``):
    source tokens ``at..`` change, target outputs ``< at`` are read. 0 means causal. Runs in eval mode."""
    x2 = x.clone()
    vocab = model.embed.num_embeddings
    if cross:
        n = x.shape[1] // 2
        x2[:, at:n] = (x2[:, at:n] + 1) % (vocab - 1)  # stay among the source words
        lo, hi = n, n + at
    else:
        x2[:, at:] = (x2[:, at:] + 1) % vocab
        lo, hi = 0, at
    was_training = model.training
    model.eval()  # the function, not training noise (HeadMask's random heads, SSA's sampled keys) is checked
    try:
        with torch.no_grad():
            a, _ = model(x)
            b, _ = model(x2)
    finally:
        model.train(was_training)
    return float((a[:, lo:hi] - b[:, lo:hi]).abs().max())


__all__ = ["PATTERNS", "SETTINGS", "CabMech", "CrossConfig", "CrossModel", "CrossTask", "ReverseConfig",
           "ReverseTask", "build_seq_layer", "causal_modes", "cross_kind", "parse_mech", "setting_leak",
           "unsupported"]
