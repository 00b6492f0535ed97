"""Head importance (Michel et al., "Are Sixteen Heads Really Better than One?").

* ``ablation_importance``: loss change when one head's output is zeroed before the output projection,
  ``L(head h off) - L(all heads)``: an intervention on ``blocks.*.attn.z`` (each head's output before
  ``o_proj``). The ablations run batched: copy ``b`` of the batch zeroes its own head.
* ``gradient_importance``: ``|dL/d xi_h|`` for head gates ``xi`` (all 1) multiplying each head's output
  (a differentiable ``z`` intervention) -- Michel et al.'s proxy, one backward pass.

Both act through the hook seam, so they compose with whatever runs the attention (``hf.use(model, plan)``:
the importance of each head under the plan).

The loss is the causal LM's mean next-token cross-entropy. Encoders without an LM head (MiniLM) use the
embedding change ``1 - cos(mean-pooled output, unablated one)`` for ablation; gradient importance is then
not defined (its gradient at the unablated point is zero) and is returned as NaN.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models import hf

Z = "blocks.*.attn.z"


def _is_lm(model: nn.Module) -> bool:
    return hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None


def _per_sequence_loss(model: nn.Module, ids: Tensor, base_emb: Tensor | None = None) -> Tensor:
    out = model(input_ids=ids)
    if _is_lm(model):
        logits = out.logits[:, :-1]
        logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # (B, T-1)
        return nll.mean(1)
    emb = out.last_hidden_state.mean(1)  # (B, dim)
    if base_emb is None:
        return emb
    return 1 - F.cosine_similarity(emb, base_emb.expand_as(emb), dim=-1)


def each_head_zeroed(model: nn.Module, evaluate: Callable[[int], Tensor], batch: int = 16,
                     on_batch: Callable[[], None] | None = None) -> Tensor:
    """``(L, H)``: ``evaluate(n) -> (n,)`` run on a batch of ``n`` copies of the input where copy ``b`` has one
    head's output ``z`` zeroed (the ``blocks.*.attn.z`` hook point), every head in turn."""
    g = hf.geometry(model)
    heads = [(layer, h) for layer in range(g.num_layers) for h in range(g.num_heads)]
    out = torch.zeros(g.num_layers, g.num_heads, dtype=torch.float64)
    with torch.no_grad():
        for s in range(0, len(heads), batch):
            part = heads[s : s + batch]
            keep = torch.ones(len(part), g.num_layers, g.num_heads)
            for b, (layer, h) in enumerate(part):
                keep[b, layer, h] = 0.0

            def fn(z, ctx, keep=keep):  # z (B, H, Tq, Dv): copy b keeps all heads but its own
                return z * keep[:, ctx.layer].to(z.dtype).view(z.shape[0], -1, 1, 1)

            with hf.hooks(model, {Z: fn}):
                vals = evaluate(len(part))
            for b, (layer, h) in enumerate(part):
                out[layer, h] = float(vals[b])
            if on_batch is not None:
                on_batch()
    return out


def ablation_importance(model: nn.Module, ids: Tensor, batch: int = 16, on_batch=None) -> Tensor:
    """``(L, H)`` loss increase when each head is zeroed; ids ``(1, T)``."""
    if _is_lm(model):
        # a batch's logits are (batch, T, vocab) floats, twice over in the loss: cap them near 64M entries
        # (Gemma 3's 262k vocabulary: 5 copies of 48 tokens; SmolLM2's 49k keeps the default 16)
        vocab = model.get_output_embeddings().weight.shape[0]
        batch = max(1, min(batch, (1 << 26) // max(1, ids.shape[1] * vocab)))
    with torch.no_grad():
        base = _per_sequence_loss(model, ids)
    base_emb = None if _is_lm(model) else base
    base_loss = float(base[0]) if _is_lm(model) else 0.0
    return each_head_zeroed(model, lambda n: _per_sequence_loss(model, ids.expand(n, -1), base_emb) - base_loss,
                            batch, on_batch)


def gradient_importance(model: nn.Module, ids: Tensor) -> Tensor:
    """``(L, H)`` ``|dL/d gate|`` at gates = 1 (NaN for models without an LM head)."""
    g = hf.geometry(model)
    if not _is_lm(model):
        return torch.full((g.num_layers, g.num_heads), float("nan"), dtype=torch.float64)
    gates = torch.ones(g.num_layers, g.num_heads, requires_grad=True)

    def gate(z, ctx):  # z (B, H, Tq, Dv) times the layer's gates
        return z * gates[ctx.layer].to(z.dtype).view(1, -1, 1, 1)

    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with torch.enable_grad(), hf.hooks(model, {Z: gate}):
            loss = _per_sequence_loss(model, ids).mean()
            (grad,) = torch.autograd.grad(loss, gates)
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    return grad.abs().double()
