"""SpecPrefill (I117): speculate which prompt tokens matter with a cheap pass, prefill only those, decode.

Pipeline for a prompt ``ids`` ``(1, T)``:

1. **draft pass** -- the model's own first ``draft_layers`` decoder layers (default: half of them;
   :func:`truncated`: the layer list is cut for the pass, weights shared, nothing copied) or a smaller ``draft``
   model with the same tokenizer, on the whole prompt, no cache;
2. **token importance** ``(T,)`` -- a scorer. The default, :func:`attention_importance` (convention
   ``max-head-sum-query``): for each draft layer, the softmax attention of the last ``queries`` prompt rows (the
   question) on every key, computed from that layer's own q and k (``q``/``k`` observers on the seam: the layer's
   attention itself stays on SDPA), **max over heads**, **summed over those query rows**, then **averaged over the
   draft layers**. :mod:`attnlab.interventions.repshift` plugs in Representation Shift here;
3. **selection** -- :func:`select_tokens` (convention ``chunk-mean``): the last ``keep_last`` tokens are always
   kept; the prompt is cut into chunks of ``chunk`` tokens aligned at position 0, each scored by the mean of its
   tokens' importance, and whole chunks are added best first until ``ceil(keep * T)`` tokens are kept (so the
   kept count can pass the budget by less than one chunk; ``kept_fraction`` reports what was kept);
4. **sparse prefill** -- only the kept tokens go through the model, **at their original positions**
   (``position_ids`` = the kept positions, so RoPE sees the true distances); the cache then holds only the kept
   tokens;
5. **decoding** -- greedy, the new token ``i`` at position ``T + i`` (explicit ``position_ids``: the cache length
   is not the position any more).

Time to first token (TTFT) = draft pass + selection + sparse prefill (through the first token's logits);
:func:`dense_prefill` is the baseline, timed the same way. ``keep = 1.0`` keeps every token and reproduces dense
greedy decoding token for token (the draft pass still runs).

Layers whose attention the model restricts (sliding windows) are scored with their mask (the hook's ``ctx.mask``);
their window then counts kept tokens, not original positions, in the sparse prefill (a documented approximation;
SmolLM2 has none). Hook observers that read ``ctx.q_offset`` in the sparse prefill see the cache length.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from ..core.softmax import grouped_scores, masked_softmax
from ..inspect.capture import transformer_blocks
from ..models import hf

#: ``scorer(model, ids (1, T), layers) -> (T,)`` importance of each prompt token from one pass of ``model``
#: (``layers``: the decoder layers the pass runs, already truncated to the draft)
Scorer = Callable[[nn.Module, Tensor, Sequence[int]], Tensor]
NewCache = Callable[[], Any]
Stop = int | frozenset[int] | set[int] | None


@dataclass(frozen=True)
class SpecPrefill:
    """SpecPrefill's knobs.

    Attributes:
        keep: fraction of the prompt's tokens prefilled, in (0, 1].
        draft_layers: how many of the model's first decoder layers make the draft (None: half of them, rounded
            up; ignored with a separate draft model, which runs whole). Retrieval heads sit in the middle layers of
            small models (SmolLM2: from layer ~14 of 30), so a draft much shallower than half misses needles.
        queries: the last prompt rows whose attention scores the tokens (the question).
        chunk: selection granularity in tokens (1 = token-level).
        keep_last: the last tokens always kept (the question and the answer cue).
    """

    keep: float = 0.5
    draft_layers: int | None = None
    queries: int = 16
    chunk: int = 32
    keep_last: int = 16

    def __post_init__(self) -> None:
        if not 0.0 < float(self.keep) <= 1.0:
            raise ValueError(f"keep must lie in (0, 1], got {self.keep}")
        for name in ("draft_layers", "queries", "chunk"):
            v = getattr(self, name)
            if name == "draft_layers" and v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if isinstance(self.keep_last, bool) or not isinstance(self.keep_last, int) or self.keep_last < 0:
            raise ValueError(f"keep_last must be a non-negative integer, got {self.keep_last!r}")


# ---------------------------------------------------------------------------------------------------------
# the draft: the model's first layers
# ---------------------------------------------------------------------------------------------------------
def decoder_stack(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """``(parent, attribute, ModuleList)`` of the model's decoder layers (``model.model.layers`` in Llama)."""
    blocks = transformer_blocks(model)
    if not blocks:
        raise ValueError(f"found no decoder layers in {type(model).__name__}")
    names = {m: n for n, m in model.named_modules()}
    path = names[blocks[0][1]].rsplit(".", 1)[0]  # "model.layers"
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    stack = getattr(parent, attr)
    if not isinstance(stack, nn.ModuleList):
        raise ValueError(f"{path} is a {type(stack).__name__}, not the ModuleList of decoder layers")
    return parent, attr, stack


@contextmanager
def truncated(model: nn.Module, layers: int) -> Iterator[nn.Module]:
    """``with truncated(model, n): model(...)`` runs only the first ``n`` decoder layers (then the final norm and
    head as usual). The layer list is swapped for the block and restored after; weights are shared."""
    parent, attr, stack = decoder_stack(model)
    if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= len(stack):
        raise ValueError(f"draft_layers must lie in [1, {len(stack)}] for this model, got {layers!r}")
    setattr(parent, attr, nn.ModuleList(list(stack)[:layers]))
    try:
        yield model
    finally:
        setattr(parent, attr, stack)


# ---------------------------------------------------------------------------------------------------------
# token importance
# ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def attention_importance(model: nn.Module, ids: Tensor, layers: Sequence[int], queries: int = 16) -> Tensor:
    """``(T,)`` importance of each token of ``ids`` ``(1, T)`` (convention ``max-head-sum-query``): per layer in
    ``layers``, the softmax attention ``(H, r, T)`` of the last ``r = min(queries, T)`` rows, max over the
    ``H`` query heads, summed over the ``r`` rows; then the mean over ``layers``. One forward pass without cache;
    each layer's weights are computed here from its q (last rows only) and k, so the layer itself runs on SDPA.
    """
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"ids must be (1, T), got {tuple(ids.shape)}")
    layers = sorted({int(x) for x in layers})
    if not layers:
        raise ValueError("attention_importance needs at least one layer")
    T = ids.shape[1]
    r = min(int(queries), T)
    acc = torch.zeros(T, dtype=torch.float64)
    last_q: dict[int, Tensor] = {}
    masks: dict[int, Tensor | None] = {}

    def on_q(q: Tensor, ctx: Any) -> None:  # q (1, H, T, D): keep only the question's rows
        last_q[ctx.layer] = q[:, :, -r:].float()
        masks[ctx.layer] = None if ctx.mask is None else ctx.mask[..., -r:, :]

    def on_k(k: Tensor, ctx: Any) -> None:  # k (1, Hkv, T, D)
        q = last_q.pop(ctx.layer)
        B, H, _, D = q.shape
        Tk = k.shape[2]
        s = grouped_scores(q, k.float())
        qpos = torch.arange(Tk - r, Tk, device=k.device).view(r, 1)
        allowed = (torch.arange(Tk, device=k.device).view(1, Tk) <= qpos).view(1, 1, r, Tk)
        m = masks.pop(ctx.layer)
        if m is not None:
            allowed = allowed & m.to(k.device)
        w = masked_softmax(s * ctx.scale, allowed)  # (1, H, r, Tk)
        acc.add_(w[0].amax(0).sum(0).double().cpu())

    table: dict[str, Any] = {}
    for layer in layers:
        table[f"blocks.{layer}.attn.q"] = on_q
        table[f"blocks.{layer}.attn.k"] = on_k
    with hf.hooks(model, table):
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    return (acc / len(layers)).float()


def attention_scorer(queries: int = 16) -> Scorer:
    """:func:`attention_importance` as a :data:`Scorer`."""

    def score(model: nn.Module, ids: Tensor, layers: Sequence[int]) -> Tensor:
        return attention_importance(model, ids, layers, queries)

    return score


def select_tokens(scores: Tensor, keep: float, chunk: int = 32, keep_last: int = 16) -> Tensor:
    """Kept positions ``(K,)`` (ascending, int64) from importance ``scores`` ``(T,)`` (convention ``chunk-mean``):
    the last ``keep_last`` always; then whole chunks of ``chunk`` tokens (aligned at 0, the last one possibly
    short), best mean importance first (ties: the earlier chunk), until at least ``ceil(keep * T)`` are kept."""
    if scores.dim() != 1 or scores.numel() == 0:
        raise ValueError(f"scores must be a non-empty (T,) tensor, got {tuple(scores.shape)}")
    if not 0.0 < float(keep) <= 1.0:
        raise ValueError(f"keep must lie in (0, 1], got {keep}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    T = scores.numel()
    budget = max(1, math.ceil(float(keep) * T - 1e-9))
    mask = torch.zeros(T, dtype=torch.bool)
    if keep_last > 0:
        mask[max(0, T - keep_last):] = True
    n = math.ceil(T / chunk)
    s = scores.detach().double().cpu()
    means = torch.stack([s[c * chunk:(c + 1) * chunk].mean() for c in range(n)])
    order = sorted(range(n), key=lambda c: (-float(means[c]), c))
    for c in order:
        if int(mask.sum()) >= budget:
            break
        mask[c * chunk:(c + 1) * chunk] = True
    return mask.nonzero().view(-1)


# ---------------------------------------------------------------------------------------------------------
# prefill at original positions, decoding
# ---------------------------------------------------------------------------------------------------------
def stop_reached(tok: Tensor, eos: Stop) -> bool:
    if eos is None:
        return False
    return int(tok) == eos if isinstance(eos, int) else int(tok) in eos


def prefill_at(model: nn.Module, ids: Tensor, positions: Tensor, cache: Any) -> Tensor:
    """Prefill ``ids`` ``(1, K)`` at absolute ``positions`` ``(K,)`` (ascending) into ``cache``; returns the last
    row's logits ``(1, V)``. The cache afterwards holds exactly these ``K`` tokens."""
    if ids.shape != (1, positions.numel()):
        raise ValueError(f"ids {tuple(ids.shape)} and positions {tuple(positions.shape)} disagree")
    pos = positions.to(ids.device).view(1, -1)
    return model(input_ids=ids, position_ids=pos, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]


@torch.no_grad()
def decode_from(model: nn.Module, cache: Any, logits: Tensor, start: int, max_new_tokens: int,
                eos: Stop = None) -> Tensor:
    """Greedy tokens ``(1, n)`` after a prefill whose last logits are ``logits`` ``(1, V)``: token ``i`` is fed at
    absolute position ``start + i`` (``start`` = the prompt's original length)."""
    nxt = logits.argmax(-1)
    out = [nxt]
    pos = start
    while len(out) < max_new_tokens and not stop_reached(nxt, eos):
        p = torch.tensor([[pos]], device=nxt.device)
        logits = model(input_ids=nxt.view(1, 1), position_ids=p, cache=cache, use_cache=True).logits[:, -1]
        nxt = logits.argmax(-1)
        out.append(nxt)
        pos += 1
    return torch.stack(out, 1)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@torch.no_grad()
def dense_prefill(model: nn.Module, tok: Any, ids: Tensor, max_new_tokens: int, *, new_cache: NewCache | None = None,
                  eos: Stop = None) -> dict[str, Any]:
    """The baseline, timed as :func:`generate` is: dense prefill (TTFT) then greedy decoding.
    Returns dict(tokens (1, n), ttft_s, decode_s, seconds, prompt_tokens)."""
    cache = new_cache() if new_cache is not None else DynamicCache(config=model.config)
    t0 = time.perf_counter()
    logits = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    _sync()
    t1 = time.perf_counter()
    toks = decode_from(model, cache, logits, ids.shape[1], max_new_tokens, eos)
    t2 = time.perf_counter()
    return {"tokens": toks, "ttft_s": t1 - t0, "decode_s": t2 - t1, "seconds": t2 - t0,
            "prompt_tokens": int(ids.shape[1])}


def draft_scores(model: nn.Module, ids: Tensor, config: SpecPrefill, *, draft: nn.Module | None = None,
                 scorer: Scorer | None = None) -> Tensor:
    """``(T,)`` importance of ``ids`` from the draft: ``draft`` whole, or ``model``'s first ``draft_layers``."""
    score = scorer if scorer is not None else attention_scorer(config.queries)
    if draft is not None:
        return score(draft, ids, range(hf.geometry(draft).num_layers))
    n = config.draft_layers
    if n is None:
        n = math.ceil(len(decoder_stack(model)[2]) / 2)
    with truncated(model, n):
        return score(model, ids, range(n))


@torch.no_grad()
def sparse_generate(model: nn.Module, ids: Tensor, scores: Tensor, max_new_tokens: int,
                    config: SpecPrefill | None = None, *, new_cache: NewCache | None = None,
                    eos: Stop = None) -> dict[str, Any]:
    """Steps 3-5 on importance ``scores`` ``(T,)`` already computed: select, prefill the kept tokens at their
    original positions, decode. Returns dict(tokens, kept, kept_fraction, select_s, prefill_s, decode_s)."""
    config = config or SpecPrefill()
    T = ids.shape[1]
    if scores.shape != (T,):
        raise ValueError(f"scores must be ({T},) for a prompt of {T} tokens, got {tuple(scores.shape)}")
    t0 = time.perf_counter()
    kept = select_tokens(scores, config.keep, config.chunk, config.keep_last).to(ids.device)
    t1 = time.perf_counter()
    cache = new_cache() if new_cache is not None else DynamicCache(config=model.config)
    logits = prefill_at(model, ids[:, kept], kept, cache)
    _sync()
    t2 = time.perf_counter()
    toks = decode_from(model, cache, logits, T, max_new_tokens, eos)
    t3 = time.perf_counter()
    return {"tokens": toks, "kept": kept.cpu(), "kept_fraction": kept.numel() / T, "select_s": t1 - t0,
            "prefill_s": t2 - t1, "decode_s": t3 - t2}


@torch.no_grad()
def generate(model: nn.Module, tok: Any, ids: Tensor, max_new_tokens: int, config: SpecPrefill | None = None, *,
             draft: nn.Module | None = None, scorer: Scorer | None = None, new_cache: NewCache | None = None,
             eos: Stop = None) -> dict[str, Any]:
    """SpecPrefill on ``ids`` ``(1, T)`` (``tok`` is not needed: None is fine).

    Returns dict(tokens ``(1, n)``, kept ``(K,)`` original positions, kept_fraction, draft_s (draft pass and
    selection), prefill_s (sparse prefill), ttft_s = draft_s + prefill_s, decode_s, seconds, prompt_tokens).
    """
    config = config or SpecPrefill()
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"ids must be (1, T), got {tuple(ids.shape)}")
    t0 = time.perf_counter()
    scores = draft_scores(model, ids, config, draft=draft, scorer=scorer)
    draft_s = time.perf_counter() - t0
    out = sparse_generate(model, ids, scores, max_new_tokens, config, new_cache=new_cache, eos=eos)
    draft_s += out.pop("select_s")
    return {**out, "draft_s": draft_s, "ttft_s": draft_s + out["prefill_s"],
            "seconds": draft_s + out["prefill_s"] + out["decode_s"], "prompt_tokens": int(ids.shape[1])}


def loop(model: nn.Module, ids: Tensor, max_new_tokens: int, new_cache: NewCache, eos: Stop = None, *,
         config: SpecPrefill | None = None, scorer: Scorer | None = None) -> Tensor:
    """:func:`generate` with the interventions runner's loop signature (:mod:`attnlab.interventions.decoding`):
    the new tokens ``(1, n)``."""
    return generate(model, None, ids, max_new_tokens, config, scorer=scorer, new_cache=new_cache, eos=eos)["tokens"]


__all__ = ["Scorer", "SpecPrefill", "attention_importance", "attention_scorer", "decode_from", "decoder_stack",
           "dense_prefill", "draft_scores", "generate", "loop", "prefill_at", "select_tokens", "sparse_generate",
           "stop_reached", "truncated"]
