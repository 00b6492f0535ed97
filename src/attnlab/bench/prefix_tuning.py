"""Context-based fine-tuning pieces [B200]: prefix K/V, soft prompts, and the attention-pattern shift.

Prefix-tuning (per layer, ``P`` trainable key and value vectors prepended to every head's keys and values, the
model frozen)::

    A_t = softmax([q_t K_p^T, q_t K_c^T] * scale)          weights over [prefix (P) | content (t + 1)]
    out_t = alpha_t * softmax(q_t K_p^T) V_p + (1 - alpha_t) * softmax(q_t K_c^T) V_c

``alpha_t`` is the attention mass on the prefix. Over the content positions the weights are the frozen layer's
own pattern rescaled by ``1 - alpha_t`` [B200]: renormalized over the content, nothing moves -- given the same
content hidden states. Layer 0 sees the same hidden states, so its content-renormalized pattern is exactly the
original one; deeper layers move only as far as the earlier prefixes change their inputs.
:func:`content_shift` measures that (total variation between the original and the content-renormalized
weights); fine-tuning is measured the same way against the same original.

Pieces:

* :func:`prefix_attend` -- attention over ``[prefix | content]`` with its weights (explicit softmax).
* :class:`PrefixAttention` -- wraps a frozen :class:`~attnlab.mechanisms.heads.OpLayer` (the quality
  benchmark's mixer) with trainable prefix K/V; ``prefix_len=0`` records the plain layer's weights.
* :class:`HFPrefix` -- prefix K/V for a Hugging Face decoder, entering through a pre-filled ``DynamicCache``
  (the content keeps positions ``0..T-1``, so the content's own scores are the frozen model's).
* :class:`HFSoftPrompt` -- ``P`` trainable input embeddings before the content.
* :func:`content_shift`, :func:`hf_weights` -- the diagnostic, per layer and head.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..core.softmax import masked_softmax
from ..mechanisms.heads import OpLayer


def prefix_attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pk: Tensor | None = None,
    pv: Tensor | None = None,
    *,
    scale: float,
    causal: bool = True,
) -> tuple[Tensor, Tensor]:
    """Attention of ``q`` over ``[prefix | content]``; every query sees the whole prefix.

    q (B, H, T, D); k, v (B, Hkv, T, D) content keys/values (grouped heads not repeated); pk, pv (Hkv, P, D)
    or (B, Hkv, P, D) prefix keys/values (None or P = 0: no prefix). Content query ``t`` sees content keys
    ``<= t`` when ``causal``. Returns out (B, H, T, Dv) and weights (B, H, T, P + T).
    """
    B, H, T, _ = q.shape
    Hkv = k.shape[1]
    if H % Hkv:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({Hkv})")
    P = 0 if pk is None else pk.shape[-2]
    if P:
        if pv is None or pv.shape[-2] != P:
            raise ValueError("pk and pv must hold the same number of prefix positions")
        pk = pk.expand(B, *pk.shape[-3:]) if pk.dim() == 3 else pk
        pv = pv.expand(B, *pv.shape[-3:]) if pv.dim() == 3 else pv
        k, v = torch.cat([pk.to(k.dtype), k], dim=2), torch.cat([pv.to(v.dtype), v], dim=2)
    g = H // Hkv
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    mask = None
    if causal:
        content = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        mask = torch.cat([torch.ones(T, P, dtype=torch.bool, device=q.device), content], dim=1)
    w = masked_softmax(scores, mask)
    return w @ v, w


class PrefixAttention(nn.Module):
    """A frozen ``OpLayer`` (projections + RoPE as the layer computes them) with ``prefix_len`` trainable key
    and value vectors per key/value head: ``(B, T, dim) -> (B, T, dim)``.

    The prefix keys are free vectors after RoPE (a prefix has no position). ``keep_weights=True`` stores the
    last call's weights ``(B, H, T, P + T)`` in ``self.weights``. ``prefix_len=0`` is the plain layer
    (explicit softmax instead of the op's kernel).
    """

    def __init__(self, layer: OpLayer, prefix_len: int, *, init: tuple[Tensor, Tensor] | None = None) -> None:
        super().__init__()
        if not isinstance(layer, OpLayer):
            raise TypeError(f"layer must be an attnlab OpLayer, got {type(layer).__name__}")
        if prefix_len < 0:
            raise ValueError(f"prefix_len must be >= 0, got {prefix_len}")
        self.layer = layer
        Hkv, d = layer.cfg.kvh, layer.cfg.d
        if init is not None:
            k0, v0 = init
            if k0.shape != (Hkv, prefix_len, d) or v0.shape != (Hkv, prefix_len, d):
                raise ValueError(
                    f"init must be two ({Hkv}, {prefix_len}, {d}) tensors, got "
                    f"{tuple(k0.shape)}, {tuple(v0.shape)}"
                )
        else:
            k0 = torch.randn(Hkv, prefix_len, d) * d**-0.5
            v0 = torch.randn(Hkv, prefix_len, d) * d**-0.5
        self.prefix_k = nn.Parameter(k0.clone())
        self.prefix_v = nn.Parameter(v0.clone())
        self.keep_weights = False
        self.weights: Tensor | None = None

    @property
    def prefix_len(self) -> int:
        return self.prefix_k.shape[1]

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.layer.project(x, 0)
        P = self.prefix_len
        out, w = prefix_attend(
            q,
            k,
            v,
            self.prefix_k if P else None,
            self.prefix_v if P else None,
            scale=self.layer.cfg.d**-0.5,
            causal=self.layer.cfg.causal,
        )
        if self.keep_weights:
            self.weights = w.detach()
        return self.layer.finish(out, x)


def content_shift(w_ref: Tensor, w_new: Tensor, prefix_len: int = 0) -> tuple[Tensor, Tensor]:
    """How far the content-normalized attention moved, per query row.

    w_ref (..., T, T): the original weights over the content; w_new (..., T, P + T): the adapted model's
    weights over ``[prefix (P) | content]`` (P = 0: a fine-tuned model). Returns ``(tv, mass)``, both
    (..., T): ``tv = 0.5 * sum_j |w_ref_j - w_new_j / sum_content(w_new)|`` (total variation, in [0, 1]) and
    ``mass`` = the attention on the prefix. A row with no content weight (all on the prefix) counts as moved
    completely (tv = 1).
    """
    if w_new.shape[-1] != w_ref.shape[-1] + prefix_len or w_new.shape[:-1] != w_ref.shape[:-1]:
        raise ValueError(
            f"w_new {tuple(w_new.shape)} must be w_ref {tuple(w_ref.shape)} plus {prefix_len} prefix columns"
        )
    content = w_new[..., prefix_len:].double()
    total = content.sum(-1, keepdim=True)
    renorm = torch.where(total > 0, content / total.clamp_min(1e-300), torch.zeros_like(content))
    tv = 0.5 * (w_ref.double() - renorm).abs().sum(-1)
    tv = torch.where(total[..., 0] > 0, tv, torch.ones_like(tv))
    return tv.float(), w_new[..., :prefix_len].sum(-1).float()


# ---------------------------------------------------------------------------------------------------------
# Hugging Face decoders
# ---------------------------------------------------------------------------------------------------------
def _geometry(model: nn.Module) -> tuple[int, int, int]:
    from ..models.hf import geometry

    g = geometry(model)
    return g.num_layers, g.num_kv_heads, g.head_dim


class HFPrefix(nn.Module):
    """Prefix-tuning of a Hugging Face decoder: per layer ``prefix_len`` key and value vectors per key/value
    head (``(L, Hkv, P, D)`` each), entering through a ``DynamicCache`` pre-filled before the content.

    ``forward(model, input_ids)`` runs the model with the content at positions ``0..T-1`` (RoPE exactly as
    without a prefix) and returns its output (logits of the last position only: ``logits_to_keep=1``).
    ``kwargs(input_ids)`` gives the forward arguments (cache, positions, mask) for other callers
    (``run_with_cache``). The prefix keys are free vectors after RoPE.
    """

    def __init__(self, model: nn.Module, prefix_len: int, *, init_ids: Tensor | None = None) -> None:
        super().__init__()
        if prefix_len < 0:
            raise ValueError(f"prefix_len must be >= 0, got {prefix_len}")
        L, Hkv, D = _geometry(model)
        self.config = model.config
        k0 = torch.zeros(L, Hkv, prefix_len, D)
        v0 = torch.zeros(L, Hkv, prefix_len, D)
        if init_ids is not None and prefix_len:
            # start from the keys/values of real tokens (prefix-tuning trains poorly from noise)
            if init_ids.shape != (prefix_len,):
                raise ValueError(f"init_ids must be ({prefix_len},) token ids, got {tuple(init_ids.shape)}")
            with torch.no_grad():
                out = model(input_ids=init_ids[None], use_cache=True)
            cache = out.cache if "cache" in out else out.past_key_values  # transformers 5.x names it cache
            for layer in range(L):
                k0[layer], v0[layer] = (
                    cache.layers[layer].keys[0].float(),
                    cache.layers[layer].values[0].float(),
                )
        self.k = nn.Parameter(k0)
        self.v = nn.Parameter(v0)

    @property
    def prefix_len(self) -> int:
        return self.k.shape[2]

    def cache(self, batch: int, dtype: torch.dtype = torch.float32):
        from transformers.cache_utils import DynamicCache

        c = DynamicCache(config=self.config)
        for layer in range(self.k.shape[0]):
            c.update(
                self.k[layer].to(dtype).expand(batch, -1, -1, -1),
                self.v[layer].to(dtype).expand(batch, -1, -1, -1),
                layer,
            )
        return c

    def kwargs(self, input_ids: Tensor, dtype: torch.dtype = torch.float32) -> dict:
        B, T = input_ids.shape
        return {
            "cache": self.cache(B, dtype),
            "use_cache": True,
            "position_ids": torch.arange(T, device=input_ids.device).expand(B, T),
            "attention_mask": torch.ones(B, self.prefix_len + T, dtype=torch.long, device=input_ids.device),
        }

    def forward(self, model: nn.Module, input_ids: Tensor):
        return model(input_ids=input_ids, logits_to_keep=1, **self.kwargs(input_ids, model.dtype))


class HFSoftPrompt(nn.Module):
    """Prompt tuning: ``prefix_len`` trainable input embeddings before the content (``(P, dim)``).

    ``forward(model, input_ids)`` returns the output for the last position; ``embeds(model, input_ids)`` the
    ``(B, P + T, dim)`` inputs (content at positions ``P..``: a soft prompt is part of the sequence).
    """

    def __init__(self, model: nn.Module, prefix_len: int, *, init_ids: Tensor | None = None) -> None:
        super().__init__()
        emb = model.get_input_embeddings().weight
        if init_ids is not None:
            e0 = emb[init_ids].detach().float().clone()
        else:
            e0 = torch.randn(prefix_len, emb.shape[1]) * emb.detach().float().std()
        if e0.shape[0] != prefix_len:
            raise ValueError(f"init_ids must hold {prefix_len} ids")
        self.e = nn.Parameter(e0)

    @property
    def prefix_len(self) -> int:
        return self.e.shape[0]

    def embeds(self, model: nn.Module, input_ids: Tensor) -> Tensor:
        content = model.get_input_embeddings()(input_ids)
        soft = self.e.to(content.dtype).expand(input_ids.shape[0], -1, -1)
        return torch.cat([soft, content], dim=1)

    def forward(self, model: nn.Module, input_ids: Tensor):
        return model(inputs_embeds=self.embeds(model, input_ids), logits_to_keep=1, use_cache=False)


def hf_weights(model: nn.Module, input_ids: Tensor, adapter: nn.Module | None = None) -> list[Tensor]:
    """Per layer, the weights ``(B, H, T, P + T)`` of the content query rows (``weights`` hook points).

    ``adapter``: None (the model as it is), an :class:`HFPrefix` (keys: prefix + content) or an
    :class:`HFSoftPrompt` (queries: the content rows; keys: soft prompt + content).
    """
    from ..models.hf import run_with_cache

    T = input_ids.shape[1]
    L = _geometry(model)[0]
    names = [f"blocks.{layer}.attn.weights" for layer in range(L)]
    if adapter is None:
        _, store = run_with_cache(model, input_ids, names, rows=(0, T))
    elif isinstance(adapter, HFPrefix):
        with torch.no_grad():
            kw = adapter.kwargs(input_ids, model.dtype)
        _, store = run_with_cache(model, input_ids, names, rows=(0, T), **kw)
    elif isinstance(adapter, HFSoftPrompt):
        P = adapter.prefix_len
        with torch.no_grad():
            emb = adapter.embeds(model, input_ids)
        _, store = run_with_cache(model, None, names, rows=(P, P + T), inputs_embeds=emb)
    else:
        raise TypeError(f"adapter must be None, HFPrefix or HFSoftPrompt, got {type(adapter).__name__}")
    return [store[n].float() for n in names]


__all__ = ["HFPrefix", "HFSoftPrompt", "PrefixAttention", "content_shift", "hf_weights", "prefix_attend"]
