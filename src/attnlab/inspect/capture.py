"""Observers on the hook seam: per-head statistics while a model runs, and slices of attention weights.

``Recorder`` observes ``blocks.*.attn.weights``: the seam hands it one chunk of query rows at a time
(``(1, heads, rows, kv_len)`` weights, never ``heads x T x T``), the same weights that produce each layer's
output, whatever runs the layer (the model's own attention, an op, a per-head plan). It feeds each chunk to
that layer's ``HeadStats`` and never recomputes attention. ``record(model, input_ids, ...)`` runs one forward
pass with the recorder attached (so ``with hf.use(model, plan): record(model, ids)`` records the plan's
attention) and also hooks each transformer block (forward hooks on the residual stream: hidden states are not
an attention hook point) to measure massive activations.

``WeightRows`` observes the same point and keeps only the rows asked for (the last ``n`` queries, or every
query from an absolute position on), per layer: the profiling code of plans and calibrations reads it.
"""

from __future__ import annotations

import inspect as pyinspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..models import hf
from .metrics import HeadStats, MetricConfig, ProbeSpec, massive_activations

WEIGHTS = "blocks.*.attn.weights"
Z = "blocks.*.attn.z"


def _row_positions(ctx: Any) -> Tensor:
    """Absolute positions ``(r,)`` of the query rows of a weights chunk."""
    start, end = ctx.rows
    return torch.arange(start, end) + int(ctx.q_offset or 0)


def visible_keys(ctx: Any, q_pos: Tensor, kv_len: int, heads: int) -> Tensor:
    """Keys each row of a weights chunk may see: ``(heads, r)`` from the hook's mask (the runner's rule, per
    head under a plan), else ``(r,)`` from the model's plain rule (causal or full)."""
    mask = getattr(ctx, "mask", None)
    if mask is not None:
        m = mask[0]  # (H or 1, r, Tk): batch 1
        return m.sum(-1).to(torch.long).cpu().expand(heads, -1)
    if getattr(ctx.module, "is_causal", False):
        return (q_pos + 1).clamp(max=kv_len)
    return torch.full_like(q_pos, kv_len)


class Recorder:
    """Observer computing per-head statistics from the seam's chunked weights (batch 1).

    ``stats[layer]`` is that layer's ``HeadStats`` after a forward pass; ``on_layer(layer)`` is called when a
    layer's output is done (progress bars). Attach with ``hf.hooks(model, recorder.hooks())``.
    """

    def __init__(self, cfg: MetricConfig, spec: ProbeSpec | None = None,
                 on_layer: Callable[[int], None] | None = None):
        self.cfg, self.spec, self.on_layer = cfg, spec, on_layer
        self.stats: dict[int, HeadStats] = {}

    def weights(self, w: Tensor, ctx: Any) -> None:
        """Observer of ``blocks.{l}.attn.weights``: w ``(1, H, r, Tk)`` for rows ``ctx.rows``."""
        B, H, _, Tk = w.shape
        if B != 1:
            raise ValueError(f"the recorder analyses one sequence at a time, got batch {B}")
        q_pos = _row_positions(ctx)
        if ctx.layer not in self.stats or ctx.rows[0] == 0:
            self.stats[ctx.layer] = HeadStats(H, Tk, self.cfg, self.spec)
        stats = self.stats[ctx.layer]
        w = w[0].detach()
        vis = visible_keys(ctx, q_pos, Tk, H)
        for s in range(0, w.shape[1], self.cfg.chunk):  # the seam's chunks may be longer than ours
            e = min(w.shape[1], s + self.cfg.chunk)
            stats.update(w[:, s:e].float().cpu(), q_pos[s:e], vis[..., s:e])

    def layer_done(self, z: Tensor, ctx: Any) -> None:
        """Observer of ``blocks.{l}.attn.z``: the layer's output is complete."""
        if self.on_layer is not None:
            self.on_layer(ctx.layer)

    def hooks(self) -> dict[str, Callable]:
        """The hook points and observers to attach (``hf.hooks(model, recorder.hooks())``)."""
        return {WEIGHTS: self.weights, Z: self.layer_done}


class WeightRows:
    """Observer keeping, per layer, the weights ``(H, r, Tk)`` (float32, CPU) of chosen query rows (batch 1).

    ``last``: the last ``last`` queries of the sequence (the query at absolute position ``Tk - 1`` is the last
    one: self-attention); ``start``: every query at absolute position ``>= start``. Rows outside are never
    copied, so memory stays ``heads x rows x T`` per layer.
    """

    def __init__(self, last: int | None = None, start: int | None = None):
        if (last is None) == (start is None):
            raise ValueError("WeightRows needs exactly one of last= or start=")
        self.last, self.start = last, start
        self.parts: dict[int, list[Tensor]] = {}

    def __call__(self, w: Tensor, ctx: Any) -> None:
        Tk = w.shape[-1]
        first = Tk - self.last if self.last is not None else self.start
        keep = _row_positions(ctx) >= first
        if ctx.rows[0] == 0:
            self.parts[ctx.layer] = []
        if bool(keep.any()):
            self.parts.setdefault(ctx.layer, []).append(w[0][:, keep].detach().float().cpu())

    def hooks(self) -> dict[str, Callable]:
        return {WEIGHTS: self}

    def result(self) -> list[Tensor]:
        """Per layer (in order), ``(H, r, Tk)``."""
        return [torch.cat(self.parts[layer], 1) for layer in sorted(self.parts)]


def forward_kwargs(model: nn.Module, input_ids: Tensor, logits_rows: int = 1, **extra: Any) -> dict:
    """Keyword arguments of one analysis forward pass: no KV cache (it would hold every layer's keys:
    45 MiB per 1k tokens on SmolLM2), and only ``logits_rows`` rows of logits (0: all) where supported."""
    kw = {"input_ids": input_ids, **{k: v for k, v in extra.items() if v is not None}}
    params = pyinspect.signature(model.forward).parameters
    if "use_cache" in params:
        kw["use_cache"] = False
    if "logits_to_keep" in params:
        kw["logits_to_keep"] = logits_rows
    return kw


def observe_rows(model: nn.Module, input_ids: Tensor, last: int | None = None, start: int | None = None) -> list[Tensor]:
    """One no-grad forward pass of ``input_ids`` ``(1, T)``; per layer the weights ``(H, r, T)`` of the chosen
    rows (see ``WeightRows``), from whatever attention runs in ``model`` (its own, an op, a plan)."""
    obs = WeightRows(last=last, start=start)
    with torch.no_grad(), hf.hooks(model, obs.hooks()):
        model(**forward_kwargs(model, input_ids))
    return obs.result()


def transformer_blocks(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """The repeated blocks (``...layers.3``, ``...layer.3``, ``...h.3``) holding each attention module."""
    names = dict(model.named_modules())
    out = []
    for idx, attn in hf.attention_modules(model):
        name = next(n for n, m in names.items() if m is attn)
        m = re.match(r"^(.*?\.\d+)(\.|$)", name)
        if m is None:
            raise ValueError(f"cannot find the block of attention module {name}")
        out.append((idx, names[m.group(1)]))
    return out


@dataclass
class Capture:
    """One recorded forward pass: per-layer head statistics, massive activations, top-1 predictions.

    ``predicted``: ``(T,)`` the model's top-1 next token per row (-1 where logits were not kept).
    """

    stats: dict[int, HeadStats]
    massive: dict[int, dict[str, float]]
    predicted: Tensor | None
    input_ids: Tensor
    extra: dict = field(default_factory=dict)


def record(
    model: nn.Module, input_ids: Tensor, cfg: MetricConfig | None = None, spec: ProbeSpec | None = None,
    on_layer: Callable[[int], None] | None = None, attention_mask: Tensor | None = None,
    logits_rows: int = 1,
) -> Capture:
    """Run ``model`` on ``input_ids`` ``(1, T)`` with a ``Recorder`` attached; returns a ``Capture``.

    Whatever attention runs in ``model`` is recorded: its own, or what ``hf.use`` installed (an op, a plan).

    ``logits_rows``: keep predictions for the last that many rows (0: all). Long prompts keep few, since the
    full ``T x vocab`` logits would dwarf everything else (8k tokens x 49k vocab = 1.6 GB in fp32).
    """
    cfg = cfg or MetricConfig()
    rec = Recorder(cfg, spec, on_layer)
    massive: dict[int, dict[str, float]] = {}
    handles = []
    for idx, block in transformer_blocks(model):
        def hook(mod, args, output, idx=idx):
            h = output[0] if isinstance(output, tuple) else output
            massive[idx] = massive_activations(h[0])
        handles.append(block.register_forward_hook(hook))
    try:
        with torch.no_grad(), hf.hooks(model, rec.hooks()):
            out = model(**forward_kwargs(model, input_ids, logits_rows, attention_mask=attention_mask))
    finally:
        for h in handles:
            h.remove()
    logits = getattr(out, "logits", None)
    predicted = None
    if logits is not None:
        T = input_ids.shape[1]
        predicted = torch.full((T,), -1, dtype=torch.long)
        predicted[T - logits.shape[1]:] = logits[0].argmax(-1).cpu()
    return Capture(rec.stats, massive, predicted, input_ids[0])
