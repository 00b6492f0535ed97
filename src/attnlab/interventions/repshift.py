"""Representation Shift (I232): how much a layer changes each token, as a token-importance score that needs no
attention weights -- so it works with fused (SDPA / FlashAttention) attention, the paper's point.

Score of token ``t`` at decoder layer ``l`` (convention ``repshift-l2``): ``||delta_t||_2`` where ``delta`` is the
change the chosen ``site`` makes to the residual stream:

* ``block`` (default) -- the whole decoder layer, ``delta = h_out - h_in`` (its input and output hidden states);
* ``attn``  -- the attention sublayer's output (its residual update in pre-norm Llama-style layers; in Gemma 3,
  before the post-attention norm);
* ``mlp``   -- the MLP's output (likewise; Gemma 3: before the post-feed-forward norm).

``distance``: ``l2`` (the paper's), ``l1``, or ``cos`` (``1 - cos(h_in, h_out)``, block only). High shift = the
layer rewrote the token = kept. Everything is read by plain PyTorch forward hooks on the decoder layer and its
submodules: attnlab's seam is not involved, no ``weights``/``scores`` hook point is used, and the model keeps its
own attention implementation (SDPA).

Two uses:

* **prefill pruning** -- :func:`scorer` is a :data:`~attnlab.interventions.specprefill.Scorer`: SpecPrefill's
  pipeline (draft = the model's first ``draft_layers``, chunk selection, sparse prefill at original positions)
  with Representation Shift in place of the attention scores (:func:`prefill_generate`). The default layer is the
  draft's last;
* **KV-cache keep score** -- :func:`kv_generate`: dense prefill (the score read on the way, same pass), then every
  layer's cache keeps only the tokens :func:`attnlab.interventions.specprefill.select_tokens` picks; decoding
  continues at the original positions. The first new token comes from the dense prefill, so it is the dense one.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from ..inspect.capture import transformer_blocks
from ..models import hf
from . import specprefill as SP

SITES = ("block", "attn", "mlp")
DISTANCES = ("l2", "l1", "cos")


@dataclass(frozen=True)
class RepShift:
    """Representation Shift's knobs: ``layer`` (None: the last layer the pass runs), ``site``, ``distance``."""

    layer: int | None = None
    site: str = "block"
    distance: str = "l2"

    def __post_init__(self) -> None:
        if self.site not in SITES:
            raise ValueError(f"site must be one of {SITES}, got {self.site!r}")
        if self.distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {self.distance!r}")
        if self.distance == "cos" and self.site != "block":
            raise ValueError("distance 'cos' compares h_in and h_out: it needs site='block'")
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)
                                       or self.layer < 0):
            raise ValueError(f"layer must be a non-negative integer or None, got {self.layer!r}")


def _first(x: Any) -> Tensor:
    return x[0] if isinstance(x, (tuple, list)) else x


class ShiftRecorder:
    """Forward hooks on one decoder layer recording ``h_in``, ``h_out`` (block) or the sublayer's output
    ``(B, T, dim)`` of the last call; :meth:`delta` -> ``(B, T, dim)`` and :meth:`score` -> ``(B, T)``."""

    def __init__(self, model: nn.Module, layer: int, site: str = "block", distance: str = "l2") -> None:
        RepShift(layer, site, distance)  # validates
        blocks = transformer_blocks(model)
        if not 0 <= layer < len(blocks):
            raise ValueError(f"layer must lie in [0, {len(blocks) - 1}] for this model, got {layer}")
        self.block = blocks[layer][1]
        self.site, self.distance = site, distance
        self.h_in: Tensor | None = None
        self.h_out: Tensor | None = None
        if site == "attn":
            mods = dict(hf.attention_modules(model))
            self.module: nn.Module = mods[blocks[layer][0]]
        elif site == "mlp":
            mlp = getattr(self.block, "mlp", None)
            if not isinstance(mlp, nn.Module):
                raise ValueError(f"decoder layer {layer} ({type(self.block).__name__}) has no .mlp submodule")
            self.module = mlp
        else:
            self.module = self.block

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        h = args[0] if args else kwargs.get("hidden_states")
        self.h_in = h.detach()

    def _post(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.h_out = _first(output).detach()

    @contextmanager
    def attached(self) -> Iterator[ShiftRecorder]:
        handles = [self.module.register_forward_hook(self._post)]
        if self.site == "block":
            handles.append(self.block.register_forward_pre_hook(self._pre, with_kwargs=True))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def delta(self) -> Tensor:
        """``(B, T, dim)``: ``h_out - h_in`` (block) or the sublayer's output (attn, mlp)."""
        if self.h_out is None:
            raise RuntimeError("no forward pass was recorded")
        if self.site != "block":
            return self.h_out.float()
        return self.h_out.float() - self.h_in.float()

    def score(self) -> Tensor:
        """``(B, T)`` Representation Shift of each token."""
        d = self.delta()
        if self.distance == "l2":
            return d.norm(dim=-1)
        if self.distance == "l1":
            return d.abs().sum(-1)
        return 1.0 - torch.nn.functional.cosine_similarity(self.h_in.float(), self.h_out.float(), dim=-1)


@torch.no_grad()
def shift_scores(model: nn.Module, ids: Tensor, config: RepShift | None = None) -> Tensor:
    """``(T,)`` Representation Shift of each token of ``ids`` ``(1, T)`` at ``config.layer`` (None: the model's
    last layer), one forward pass without cache."""
    config = config or RepShift()
    n = len(transformer_blocks(model))
    layer = n - 1 if config.layer is None else config.layer
    rec = ShiftRecorder(model, layer, config.site, config.distance)
    with rec.attached():
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    return rec.score()[0].cpu()


def scorer(config: RepShift | None = None) -> SP.Scorer:
    """Representation Shift as SpecPrefill's :data:`~attnlab.interventions.specprefill.Scorer` (``layer`` None:
    the last layer the draft runs)."""
    config = config or RepShift()

    def score(model: nn.Module, ids: Tensor, layers: Sequence[int]) -> Tensor:
        layer = max(layers) if config.layer is None else config.layer
        if layer not in set(layers):
            raise ValueError(f"Representation Shift layer {layer} is not among the draft's layers "
                             f"0..{max(layers)}; lower layer or raise draft_layers")
        return shift_scores(model, ids, RepShift(layer, config.site, config.distance))

    return score


def prefill_generate(model: nn.Module, tok: Any, ids: Tensor, max_new_tokens: int,
                     config: SP.SpecPrefill | None = None, shift: RepShift | None = None, *,
                     draft: nn.Module | None = None, new_cache: SP.NewCache | None = None,
                     eos: SP.Stop = None) -> dict[str, Any]:
    """SpecPrefill's pipeline scored by Representation Shift (see :func:`attnlab.interventions.specprefill.
    generate` for the returned dict)."""
    return SP.generate(model, tok, ids, max_new_tokens, config, draft=draft, scorer=scorer(shift),
                       new_cache=new_cache, eos=eos)


def prefill_loop(model: nn.Module, ids: Tensor, max_new_tokens: int, new_cache: SP.NewCache, eos: SP.Stop = None,
                 *, config: SP.SpecPrefill | None = None, shift: RepShift | None = None) -> Tensor:
    """:func:`prefill_generate` with the interventions runner's loop signature: the new tokens ``(1, n)``."""
    return prefill_generate(model, None, ids, max_new_tokens, config, shift, new_cache=new_cache, eos=eos)["tokens"]


# ---------------------------------------------------------------------------------------------------------
# KV-cache keep score
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RepShiftKV:
    """KV-cache pruning by Representation Shift: ``keep`` fraction of the prompt's entries, ``chunk`` and
    ``keep_last`` as in :func:`~attnlab.interventions.specprefill.select_tokens` (chunk 1: token level), the
    score of ``shift`` (its layer None: the middle layer)."""

    keep: float = 0.5
    chunk: int = 1
    keep_last: int = 16
    shift: RepShift = RepShift()

    def __post_init__(self) -> None:
        SP.SpecPrefill(keep=self.keep, chunk=self.chunk, keep_last=self.keep_last)  # validates


def prune_cache(cache: Any, kept: Tensor) -> int:
    """Keep only positions ``kept`` ``(K,)`` in every full layer of a transformers ``DynamicCache`` (in place);
    sliding-window layers (which hold only their window) are left as they are. Returns the layers pruned."""
    n = 0
    for layer in getattr(cache, "layers", []):
        if type(layer).__name__ != "DynamicLayer" or getattr(layer, "keys", None) is None:
            continue
        idx = kept.to(layer.keys.device)
        layer.keys = layer.keys.index_select(-2, idx)
        layer.values = layer.values.index_select(-2, idx)
        n += 1
    if n == 0:
        raise ValueError(f"found no full DynamicLayer to prune in {type(cache).__name__}")
    return n


@torch.no_grad()
def kv_generate(model: nn.Module, tok: Any, ids: Tensor, max_new_tokens: int, config: RepShiftKV | None = None, *,
                new_cache: SP.NewCache | None = None, eos: SP.Stop = None) -> dict[str, Any]:
    """Dense prefill of ``ids`` ``(1, T)`` scoring every token by Representation Shift on the way, cache pruned to
    the kept tokens, greedy decoding at the original positions. Returns dict(tokens ``(1, n)``, kept, kept_fraction,
    prefill_s, decode_s, seconds, prompt_tokens)."""
    config = config or RepShiftKV()
    T = ids.shape[1]
    n = len(transformer_blocks(model))
    layer = n // 2 if config.shift.layer is None else config.shift.layer
    rec = ShiftRecorder(model, layer, config.shift.site, config.shift.distance)
    cache = new_cache() if new_cache is not None else DynamicCache(config=model.config)
    t0 = time.perf_counter()
    with rec.attached():
        logits = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    kept = SP.select_tokens(rec.score()[0].cpu(), config.keep, config.chunk, config.keep_last)
    prune_cache(cache, kept)
    t1 = time.perf_counter()
    toks = SP.decode_from(model, cache, logits, T, max_new_tokens, eos)
    t2 = time.perf_counter()
    return {"tokens": toks, "kept": kept, "kept_fraction": kept.numel() / T, "prefill_s": t1 - t0,
            "decode_s": t2 - t1, "seconds": t2 - t0, "prompt_tokens": T}


def kv_loop(model: nn.Module, ids: Tensor, max_new_tokens: int, new_cache: SP.NewCache, eos: SP.Stop = None, *,
            config: RepShiftKV | None = None) -> Tensor:
    """:func:`kv_generate` with the runner's loop signature (``new_cache()`` must give a cache of
    ``DynamicLayer`` layers: a plan's ``PlanCache`` cannot be pruned this way and raises)."""
    return kv_generate(model, None, ids, max_new_tokens, config, new_cache=new_cache, eos=eos)["tokens"]


__all__ = ["DISTANCES", "SITES", "RepShift", "RepShiftKV", "ShiftRecorder", "kv_generate", "kv_loop",
           "prefill_generate", "prefill_loop", "prune_cache", "scorer", "shift_scores"]
