"""The backbone every mechanism is scored in: only the sequence mixer changes.

Zoology's recipe, 2 blocks by default::

    h = embed(x)                                   # tokens (B, T) -> (B, T, d); real features via a linear map
    for each block:
        h = h + conv(norm(h))                      # short causal depthwise convolution (kernel 4)
        h = h + mixer(norm(h))                     # the attention mechanism under test
        h = h + mlp(norm(h))                       # optional
    logits = head(norm(h)[mask])                   # only the scored positions are projected

There are no position embeddings: position enters through the convolution and the mechanism itself (e.g. RoPE),
so a mechanism that extrapolates in length is not held back by the backbone.

Stability probes (B252, "Small-scale proxies for large-scale Transformer training instabilities"): ``log_z``
and ``output_z_loss`` on the output logits (``task_loss(..., z_loss=c, stats=d)``), and
:class:`AttentionLogitMonitor`, the largest attention logit ``max |q . k| * scale`` per block. QK-norm is a mixer
option (``mha:qk_norm=True``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...mechanisms.common import RMSNorm


@dataclass(frozen=True)
class BackboneConfig:
    dim: int = 64
    heads: int = 2
    layers: int = 2
    conv_kernel: int = 4
    mlp: bool = False
    mlp_ratio: int = 2
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.dim % self.heads:
            raise ValueError(f"dim={self.dim} must be divisible by heads={self.heads}")
        if self.layers < 1 or self.conv_kernel < 1:
            raise ValueError("layers and conv_kernel must be >= 1")


class ShortConv(nn.Module):
    """Causal depthwise convolution over time: (B, T, d) -> (B, T, d); position t sees t-k+1..t."""

    def __init__(self, dim: int, kernel: int) -> None:
        super().__init__()
        self.kernel = kernel
        self.conv = nn.Conv1d(dim, dim, kernel, groups=dim, padding=kernel - 1)

    def forward(self, x: Tensor) -> Tensor:
        T = x.shape[1]
        return self.conv(x.transpose(1, 2))[..., :T].transpose(1, 2)


class Block(nn.Module):
    def __init__(self, cfg: BackboneConfig, mixer: nn.Module) -> None:
        super().__init__()
        self.norm_conv = RMSNorm(cfg.dim)
        self.conv = ShortConv(cfg.dim, cfg.conv_kernel)
        self.norm_mix = RMSNorm(cfg.dim)
        self.mixer = mixer
        self.mlp = None
        if cfg.mlp:
            self.norm_mlp = RMSNorm(cfg.dim)
            self.mlp = nn.Sequential(
                nn.Linear(cfg.dim, cfg.mlp_ratio * cfg.dim), nn.GELU(), nn.Linear(cfg.mlp_ratio * cfg.dim, cfg.dim)
            )

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        h = h + self.conv(self.norm_conv(h))
        if hasattr(self.mixer, "forward_with_aux"):
            y, aux = self.mixer.forward_with_aux(self.norm_mix(h))
        else:
            y, aux = self.mixer(self.norm_mix(h)), {}
        h = h + y
        if self.mlp is not None:
            h = h + self.mlp(self.norm_mlp(h))
        aux_total = sum(aux.values(), torch.zeros((), device=h.device))
        return h, aux_total


class Backbone(nn.Module):
    """``forward(x) -> (hidden (B, T, d), aux loss scalar)``; ``logits(hidden[mask]) -> (N, classes)``.

    ``x`` is ``(B, T)`` token ids when ``vocab`` is given, else ``(B, T, in_features)`` real features.
    ``make_mixer(layer_index)`` builds the mechanism of each block.
    """

    def __init__(
        self,
        cfg: BackboneConfig,
        make_mixer: Callable[[int], nn.Module],
        *,
        vocab: int | None,
        num_classes: int,
        in_features: int = 0,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        if vocab is not None:
            self.embed: nn.Module = nn.Embedding(vocab, cfg.dim)
            nn.init.normal_(self.embed.weight, std=0.02)
        else:
            self.embed = nn.Linear(in_features, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, make_mixer(i)) for i in range(cfg.layers))
        self.norm = RMSNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, num_classes, bias=False)
        if cfg.tie_embeddings:
            if vocab is None or vocab != num_classes:
                raise ValueError("tie_embeddings needs token inputs and outputs over the same vocabulary")
            self.head.weight = self.embed.weight

    @property
    def mixers(self) -> list[nn.Module]:
        return [b.mixer for b in self.blocks]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.embed(x)
        aux = torch.zeros((), device=h.device)
        for block in self.blocks:
            h, a = block(h)
            aux = aux + a
        return self.norm(h), aux

    def logits(self, hidden: Tensor) -> Tensor:
        """(N, d) -> (N, classes)."""
        return self.head(hidden)


def log_z(logits: Tensor) -> Tensor:
    """(N, C) output logits -> (N,) ``log Z`` with ``Z = sum_c exp(logit_c)``, the softmax normalizer.

    Cross-entropy only sees logits up to a shift, so ``log Z`` is free to drift; B252's output-logit divergence is
    this drift (``log Z`` far from 0), which z-loss pins near 0. Computed in float32 at least."""
    return torch.logsumexp(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, dim=-1)


def output_z_loss(logits: Tensor, coef: float) -> Tensor:
    """``coef * mean(log^2 Z)`` over the rows of (N, C) logits (B252 after PaLM; the paper uses ``coef = 1e-4``)."""
    return coef * log_z(logits).pow(2).mean()


def task_loss(
    model: Backbone, kind: str, x: Tensor, y: Tensor, mask: Tensor, *, score: bool = True, z_loss: float = 0.0,
    stats: dict[str, float] | None = None,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """(loss incl. aux, per-position correctness or squared error (N,), aux) over the masked positions.

    ``score=False`` skips the correctness (``None``): training does not need it, and at MQAR's vocabulary of
    8192 the argmax over the logits costs about 5% of a step. ``z_loss``: add ``z_loss * mean(log^2 Z)`` of the
    output logits (classify only; 0 = off, the default). ``stats``: a dict that receives the task loss alone
    (``"task_loss"``, without aux or z-loss) and, for classify, the mean ``log Z`` (``"log_z"``)."""
    hidden, aux = model(x)
    out = model.logits(hidden[mask])
    target = y[mask]
    if z_loss and kind != "classify":
        raise ValueError("z_loss applies to classification logits only (kind='classify')")
    if kind == "classify":
        loss = F.cross_entropy(out, target)
        if stats is not None:
            stats["task_loss"] = float(loss.detach())
            stats["log_z"] = float(log_z(out.detach()).mean())
        if z_loss:
            loss = loss + output_z_loss(out, z_loss)
        correct = (out.argmax(-1) == target).float() if score else None
    else:
        pred = out.squeeze(-1)
        err = (pred - target) ** 2
        loss, correct = err.mean(), err.detach()
        if stats is not None:
            stats["task_loss"] = float(loss.detach())
    return loss + aux, correct, aux


def causality_leak(model: Backbone, x: Tensor, at: int) -> float:
    """Largest change of the hidden states before position ``at`` when the inputs from ``at`` on change.

    Zero for a causal model; a mechanism that looks ahead would score tasks by reading the answer.
    """
    x2 = x.clone()
    if x.dtype == torch.long:
        x2[:, at:] = (x2[:, at:] + 1) % model.embed.num_embeddings
    else:
        x2[:, at:] = x2[:, at:] + 1.0
    with torch.no_grad():
        a, _ = model(x)
        b, _ = model(x2)
    return float((a[:, :at] - b[:, :at]).abs().max())


class AttentionLogitMonitor:
    """While active, records each block's largest attention logit ``max |q . k| * scale`` (B252's attention-logit
    growth), over the (query, key) pairs the mixer's rule allows (its ``pattern`` when it has one, else causal
    when ``causal``, else all pairs), for every forward pass; ``values()`` gives the maximum per block since the
    last ``reset()`` (None for a block whose mixer has no q/k projections to read).

    It wraps each mixer's ``project`` (``OpLayer``: q, k after QK-norm and RoPE, exactly what the op receives),
    so the training forward itself is observed and nothing is recomputed but the (detached) scores::

        with AttentionLogitMonitor(model) as mon:
            loss = task_loss(model, ...)[0]
        mon.values()   # [block 0 max logit, block 1, ...]
    """

    def __init__(self, model: Backbone) -> None:
        self.model = model
        self._max: list[float | None] = [None] * len(model.mixers)
        self._patched: list[nn.Module] = []

    def reset(self) -> None:
        self._max = [None] * len(self.model.mixers)

    def values(self) -> list[float | None]:
        return list(self._max)

    def _record(self, i: int, mixer: nn.Module, q: Tensor, k: Tensor, start: int) -> None:
        if start:
            raise ValueError("AttentionLogitMonitor observes forward passes without a cache (start=0)")
        q, k = q.detach().float(), k.detach().float()  # (B, H, Tq, d), (B, Hkv, Tk, d)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        cfg = mixer.cfg
        scores = (q @ k.transpose(-1, -2)).abs() * cfg.d**-0.5  # (B, H, Tq, Tk)
        Tq, Tk = scores.shape[-2:]
        pattern = getattr(cfg, "pattern", None)
        # q and k of one call without a cache (training): both cover the same positions, query row i = key i
        if pattern is not None:
            allowed = pattern.dense(Tq, Tk, 0).to(scores.device)  # (Hp, Tq, Tk)
        elif getattr(cfg, "causal", False):
            allowed = torch.ones(Tq, Tk, dtype=torch.bool, device=scores.device).tril()
        else:
            allowed = None
        if allowed is not None:
            scores = scores.masked_fill(~allowed, 0.0)
        m = float(scores.max())
        self._max[i] = m if self._max[i] is None else max(self._max[i], m)

    def __enter__(self) -> AttentionLogitMonitor:
        for i, mixer in enumerate(self.model.mixers):
            if not (hasattr(mixer, "project") and hasattr(mixer, "cfg") and hasattr(mixer, "q_proj")):
                continue
            original = mixer.project

            def project(x: Tensor, start: int = 0, _orig=original, _i=i, _m=mixer) -> tuple[Tensor, Tensor, Tensor]:
                q, k, v = _orig(x, start)
                self._record(_i, _m, q, k, start)
                return q, k, v

            mixer.project = project  # an instance attribute shadows the method until __exit__
            self._patched.append(mixer)
        return self

    def __exit__(self, *exc: object) -> None:
        for mixer in self._patched:
            del mixer.project
        self._patched = []
