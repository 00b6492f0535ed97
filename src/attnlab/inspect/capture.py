"""Record per-head statistics while a Hugging Face model runs, through ``attnlab.models.hf.install``.

``Recorder`` is an attention callback: for each layer it computes the attention of one query chunk at a time
(``heads x chunk x kv_len`` weights, never ``heads x T x T``), feeds the chunk to that layer's ``HeadStats``
and returns the output ``weights @ v`` of the same chunk, so the model's forward pass is unchanged (checked
against the model's own attention in the tests). ``record(model, input_ids, ...)`` runs one forward pass
under the recorder and also hooks each transformer block to measure massive activations.
"""

from __future__ import annotations

import inspect as pyinspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..models import hf
from .metrics import HeadStats, MetricConfig, ProbeSpec, massive_activations


class Recorder:
    """Attention callback computing chunked weights and per-head statistics (batch 1).

    ``stats[layer]`` is that layer's ``HeadStats`` after a forward pass. ``on_layer(layer_idx)`` is called
    after each layer (progress bars).
    """

    def __init__(self, cfg: MetricConfig, spec: ProbeSpec | None = None,
                 on_layer: Callable[[int], None] | None = None):
        self.cfg, self.spec, self.on_layer = cfg, spec, on_layer
        self.stats: dict[int, HeadStats] = {}

    def __call__(self, module: nn.Module, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
                 scaling: float, layer_idx: int) -> Tensor:
        B, H, Tq, _ = q.shape
        Hkv, Tk = k.shape[1], k.shape[2]
        if B != 1:
            raise ValueError(f"the recorder analyses one sequence at a time, got batch {B}")
        g = H // Hkv
        causal = bool(getattr(module, "is_causal", False))
        offset = Tk - Tq
        stats = self.stats[layer_idx] = HeadStats(H, Tk, self.cfg, self.spec)
        kt = k[0].float().transpose(-1, -2).unsqueeze(1)  # (Hkv, 1, D, Tk)
        vv = v[0].float().unsqueeze(1)  # (Hkv, 1, Tk, Dv)
        kpos = torch.arange(Tk, device=q.device)
        outs = []
        for r0 in range(0, Tq, self.cfg.chunk):
            r1 = min(Tq, r0 + self.cfg.chunk)
            c = r1 - r0
            q_pos = torch.arange(r0, r1, device=q.device) + offset
            qc = q[0, :, r0:r1].float().reshape(Hkv, g, c, -1)
            s = torch.matmul(qc, kt) * scaling  # (Hkv, g, c, Tk)
            if mask is not None:
                allowed = mask[0 if mask.shape[0] == 1 else 0, 0, r0:r1]  # (c, Tk)
            elif causal:
                allowed = kpos.view(1, Tk) <= q_pos.view(c, 1)
            else:
                allowed = None
            if allowed is not None:
                s = s.masked_fill(~allowed.view(1, 1, c, Tk), float("-inf"))
            w = torch.softmax(s, -1).nan_to_num(0.0)  # rows with no key: zeros
            outs.append(torch.matmul(w, vv).reshape(H, c, -1))
            vis = allowed.sum(-1) if allowed is not None else torch.full((c,), Tk, device=q.device)
            stats.update(w.reshape(H, c, Tk).cpu(), q_pos.cpu(), vis.cpu())
        if self.on_layer is not None:
            self.on_layer(layer_idx)
        return torch.cat(outs, 1).unsqueeze(0).to(q.dtype)


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
    """Run ``model`` on ``input_ids`` ``(1, T)`` under a ``Recorder``; returns a ``Capture``.

    ``logits_rows``: keep predictions for the last that many rows (0: all). Long prompts keep few, since the
    full ``T x vocab`` logits would dwarf everything else (8k tokens x 49k vocab = 1.6 GB in fp32).
    """
    cfg = cfg or MetricConfig()
    rec = Recorder(cfg, spec, on_layer)
    massive: dict[int, dict[str, float]] = {}
    hooks = []
    for idx, block in transformer_blocks(model):
        def hook(mod, args, output, idx=idx):
            h = output[0] if isinstance(output, tuple) else output
            massive[idx] = massive_activations(h[0])
        hooks.append(block.register_forward_hook(hook))
    try:
        with torch.no_grad(), hf.attnlab_attention(model, rec):
            kw = {"input_ids": input_ids}
            if attention_mask is not None:
                kw["attention_mask"] = attention_mask
            params = pyinspect.signature(model.forward).parameters
            if "use_cache" in params:
                kw["use_cache"] = False  # a KV cache would hold every layer's keys: 45 MiB per 1k tokens
            if "logits_to_keep" in params:
                kw["logits_to_keep"] = logits_rows
            out = model(**kw)
    finally:
        for h in hooks:
            h.remove()
    logits = getattr(out, "logits", None)
    predicted = None
    if logits is not None:
        T = input_ids.shape[1]
        predicted = torch.full((T,), -1, dtype=torch.long)
        predicted[T - logits.shape[1]:] = logits[0].argmax(-1).cpu()
    return Capture(rec.stats, massive, predicted, input_ids[0])
