"""Attention Buckets (I147): run the same prompt through ``n`` parallel passes, each with a different RoPE base
(so each has its own attention "waveform" over relative distance), and merge their next-token distributions, so
that a position in one pass's trough sits on another pass's peak.

* **RoPE base of a pass** -- :func:`rope_base` rewrites the rotary embedding's inverse frequencies in place for the
  block and restores them (transformers 5.x: Llama / Qwen2 / Mistral hold ``model.model.rotary_emb.inv_freq``;
  Gemma 3 one rotary module with ``full_attention_inv_freq`` and ``sliding_attention_inv_freq``).
  :func:`rope_tables` finds them; a bucket's base goes to one table (``rope``; default the one with the largest
  base: the only one in Llama, the global layers' in Gemma 3), the others keep theirs. Only the ``default`` RoPE
  type is supported (a scaled RoPE's frequencies are not ``base ** (-2i/d)``). The frequencies are computed with
  transformers' own formula in float32, so the model's own base reproduces its buffer bit for bit.
* **waveform** -- :func:`waveform` (convention ``roformer-bound``): the relative upper bound of the RoPE score at
  distance ``n`` from RoFormer's long-term-decay analysis, ``(2/d) sum_{j=1..d/2} |sum_{k<j} exp(i n theta_k)|``,
  ``theta_k = base ** (-2k/d)``: it decays while oscillating, and its troughs move with the base.
* **base search** -- :func:`search_bases` (convention ``shortest-stave``): start from the model's own base, then add
  greedily, from a grid of candidates, the base that maximizes the envelope's lowest point over the prompt's
  distances, ``min_{1 <= n < length} max_{b in set} waveform_b(n)`` (the "shortest stave"); the paper's search
  picks bases whose troughs do not coincide, which is what raising the envelope's minimum rewards.
* **merge** (convention ``mean-prob``): the next token is the argmax of the mean over buckets of the softmax
  distributions; ``mean-logprob`` (the mean of log-probabilities, a product of experts) is the alternative.
* **decoding** -- one cache per bucket; every step feeds the chosen token to each bucket (under its base) and
  merges again. Cost: ``n`` prefills and ``n`` decode steps per token.

One bucket with the model's own base is plain greedy decoding.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from . import specprefill as SP

MERGES = ("mean-prob", "mean-logprob")


# ---------------------------------------------------------------------------------------------------------
# the rotary tables of a model
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class RopeTable:
    """One inverse-frequency buffer: ``module.<attr>`` ``(d/2,)``, its layer type (``default`` for a single
    table), the model's base for it and the rotary dimension ``d``."""

    module: nn.Module
    attr: str
    kind: str
    base: float
    dim: int

    @property
    def buffer(self) -> Tensor:
        return getattr(self.module, self.attr)


def inv_freq(base: float, dim: int) -> Tensor:
    """``(dim/2,)`` float32 inverse frequencies ``1 / base ** (2i / dim)``, computed as transformers computes the
    default RoPE (float32 arithmetic), so the model's own base gives its buffer exactly."""
    return 1.0 / (float(base) ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))


def rope_tables(model: nn.Module) -> dict[str, RopeTable]:
    """The rotary inverse-frequency buffers of ``model`` by layer type (``default`` when there is one table).
    Raises ValueError when there is none or the RoPE type is not ``default``."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    params = getattr(cfg, "rope_parameters", None) or {}
    out: dict[str, RopeTable] = {}
    for mod_name, module in model.named_modules():
        for name, buf in module.named_buffers(recurse=False):
            if not name.endswith("inv_freq") or "original" in name or "long" in name or "short" in name:
                continue
            kind = name[: -len("inv_freq")].rstrip("_") or "default"
            p = params.get(kind, params) if isinstance(params.get(kind), dict) else params
            rope_type = p.get("rope_type", "default") if isinstance(p, dict) else "default"
            if rope_type != "default":
                raise ValueError(f"Attention Buckets needs the default RoPE; {mod_name}.{name} is {rope_type!r}")
            dim = 2 * buf.numel()
            base = p.get("rope_theta") if isinstance(p, dict) else None
            if base is None:  # no config entry: read it off the buffer (theta_1 = base ** (-2 / dim))
                base = float(buf[1].double() ** (-dim / 2))
            if not torch.equal(inv_freq(base, dim).to(buf), buf):
                raise ValueError(f"{mod_name}.{name} is not the default RoPE of base {base}: its frequencies are "
                                 "scaled, which Attention Buckets does not support")
            out[kind] = RopeTable(module, name, kind, float(base), dim)
    if not out:
        raise ValueError(f"found no rotary embedding (inv_freq buffer) in {type(model).__name__}")
    return out


def primary_table(model: nn.Module, rope: str | None = None) -> RopeTable:
    """The table a bucket's base goes to: ``rope`` by name, else the one with the largest base."""
    tables = rope_tables(model)
    if rope is not None:
        if rope not in tables:
            raise ValueError(f"rope must be one of {sorted(tables)}, got {rope!r}")
        return tables[rope]
    return max(tables.values(), key=lambda t: t.base)


@contextmanager
def rope_base(model: nn.Module, base: float, rope: str | None = None) -> Iterator[RopeTable]:
    """``with rope_base(model, b): model(...)`` runs with RoPE base ``b`` on the chosen table, restored after."""
    if not (isinstance(base, (int, float)) and math.isfinite(base) and base > 1):
        raise ValueError(f"a RoPE base must be a finite number > 1, got {base!r}")
    table = primary_table(model, rope)
    buf = table.buffer
    saved = buf.clone()
    if float(base) != table.base:
        buf.copy_(inv_freq(float(base), table.dim).to(buf))
    try:
        yield table
    finally:
        buf.copy_(saved)


# ---------------------------------------------------------------------------------------------------------
# waveform and base search
# ---------------------------------------------------------------------------------------------------------
def waveform(base: float, dim: int, distances: int | Tensor) -> Tensor:
    """``(N,)`` float64 RoFormer relative upper bound of the RoPE score at each distance (``distances``: a count
    ``N`` for ``0..N-1``, or a tensor of distances): ``(2/dim) sum_{j=1..dim/2} |S_j(n)|`` with
    ``S_j(n) = sum_{k<j} exp(i n base ** (-2k/dim))``. Equals ``(dim/2 + 1) / 2`` at ``n = 0``."""
    if dim < 2 or dim % 2:
        raise ValueError(f"dim must be an even integer >= 2, got {dim}")
    n = torch.arange(int(distances), dtype=torch.float64) if isinstance(distances, int) else distances.double()
    theta = float(base) ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    partial = torch.cumsum(torch.exp(1j * n[:, None] * theta[None]), dim=1)  # (N, dim/2): S_1 .. S_{dim/2}
    return partial.abs().mean(1)


def shortest_stave(bases: Sequence[float], dim: int, length: int) -> float:
    """``min_{1 <= n < length} max_b waveform_b(n)``: the lowest point of the buckets' envelope."""
    if length < 2:
        raise ValueError(f"length must be >= 2, got {length}")
    env = torch.stack([waveform(b, dim, length)[1:] for b in bases]).amax(0)
    return float(env.min())


def default_candidates(own: float) -> tuple[float, ...]:
    """The search grid: ``own * 2 ** (k / 4)`` for ``k = -4 .. 8`` (half to four times the model's base)."""
    return tuple(float(own * 2 ** (k / 4)) for k in range(-4, 9))


def search_bases(own: float, dim: int, n: int, length: int,
                 candidates: Sequence[float] | None = None) -> tuple[tuple[float, ...], list[dict[str, Any]]]:
    """``n`` bases: ``own`` first, then greedily the candidate raising :func:`shortest_stave` over ``1..length-1``
    the most (ties: the earlier candidate). Returns the bases and the trace (each step's choice and value)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    cands = [float(c) for c in (candidates if candidates is not None else default_candidates(own))]
    waves = {c: waveform(c, dim, length)[1:] for c in [float(own), *cands]}
    chosen = [float(own)]
    env = waves[float(own)].clone()
    trace = [{"base": float(own), "shortest_stave": float(env.min())}]
    while len(chosen) < n:
        pool = [c for c in cands if c not in chosen]
        if not pool:
            raise ValueError(f"only {len(chosen)} distinct bases among the candidates; n={n} is too many")
        best = max(pool, key=lambda c: (float(torch.maximum(env, waves[c]).min()), -pool.index(c)))
        env = torch.maximum(env, waves[best])
        chosen.append(best)
        trace.append({"base": best, "shortest_stave": float(env.min())})
    return tuple(chosen), trace


def parse_bases(text: str) -> tuple[float, ...]:
    """``"100000/150000"`` -> ``(100000.0, 150000.0)`` (the registry's knob syntax: ``/`` separates items)."""
    try:
        out = tuple(float(x) for x in str(text).split("/") if x.strip())
    except ValueError:
        raise ValueError(f"bases: expected numbers separated by '/', got {text!r}") from None
    if not out:
        raise ValueError(f"bases: no base in {text!r}")
    return out


# ---------------------------------------------------------------------------------------------------------
# decoding
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttentionBuckets:
    """Attention Buckets' knobs.

    Attributes:
        bases: one RoPE base per bucket (None: :func:`search_bases` with ``n`` at the prompt's length).
        n: buckets when searching.
        merge: ``mean-prob`` or ``mean-logprob``.
        rope: which rotary table the bases go to (None: the one with the largest base).
        candidates: the search grid (None: :func:`default_candidates`).
    """

    bases: tuple[float, ...] | None = None
    n: int = 3
    merge: str = "mean-prob"
    rope: str | None = None
    candidates: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.merge not in MERGES:
            raise ValueError(f"merge must be one of {MERGES}, got {self.merge!r}")
        if self.bases is not None:
            if len(self.bases) == 0:
                raise ValueError("bases must hold at least one base (or be None to search)")
            for b in self.bases:
                if not (isinstance(b, (int, float)) and math.isfinite(b) and b > 1):
                    raise ValueError(f"bases must be finite numbers > 1, got {b!r}")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be a positive integer, got {self.n!r}")

    def resolve(self, model: nn.Module, length: int) -> tuple[float, ...]:
        """The bases used for a prompt of ``length`` tokens."""
        if self.bases is not None:
            return tuple(float(b) for b in self.bases)
        table = primary_table(model, self.rope)
        return search_bases(table.base, table.dim, self.n, max(2, length), self.candidates)[0]


def merge_logits(logits: Sequence[Tensor], merge: str = "mean-prob") -> Tensor:
    """Merged next-token log-scores ``(B, V)`` of per-bucket logits ``(B, V)``: ``log mean softmax`` (mean-prob)
    or ``mean log_softmax`` (mean-logprob); float64."""
    if merge not in MERGES:
        raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")
    lp = torch.stack([torch.log_softmax(x.double(), -1) for x in logits])  # (n, B, V)
    if merge == "mean-logprob":
        return lp.mean(0)
    return torch.logsumexp(lp, 0) - math.log(lp.shape[0])


@torch.no_grad()
def generate(model: nn.Module, tok: Any, ids: Tensor, max_new_tokens: int, config: AttentionBuckets | None = None,
             *, new_cache: SP.NewCache | None = None, eos: SP.Stop = None) -> dict[str, Any]:
    """Attention Buckets greedy decoding of ``ids`` ``(1, T)`` (``tok`` unused, None is fine).

    Returns dict(tokens ``(1, n)``, bases, prefill_s (all buckets), decode_s, seconds, prompt_tokens)."""
    config = config or AttentionBuckets()
    bases = config.resolve(model, ids.shape[1])
    fresh = new_cache if new_cache is not None else (lambda: DynamicCache(config=model.config))
    caches = [fresh() for _ in bases]
    t0 = time.perf_counter()
    per = []
    for b, c in zip(bases, caches):
        with rope_base(model, b, config.rope):
            per.append(model(input_ids=ids, cache=c, use_cache=True, logits_to_keep=1).logits[:, -1])
    t1 = time.perf_counter()
    out: list[Tensor] = []
    while True:
        nxt = merge_logits(per, config.merge).argmax(-1)
        out.append(nxt)
        if len(out) >= max_new_tokens or SP.stop_reached(nxt, eos):
            break
        per = []
        for b, c in zip(bases, caches):
            with rope_base(model, b, config.rope):
                per.append(model(input_ids=nxt.view(1, 1), cache=c, use_cache=True).logits[:, -1])
    t2 = time.perf_counter()
    return {"tokens": torch.stack(out, 1), "bases": list(bases), "prefill_s": t1 - t0, "decode_s": t2 - t1,
            "seconds": t2 - t0, "prompt_tokens": int(ids.shape[1])}


def loop(model: nn.Module, ids: Tensor, max_new_tokens: int, new_cache: SP.NewCache, eos: SP.Stop = None, *,
         config: AttentionBuckets | None = None) -> Tensor:
    """:func:`generate` with the interventions runner's loop signature: the new tokens ``(1, n)``."""
    return generate(model, None, ids, max_new_tokens, config, new_cache=new_cache, eos=eos)["tokens"]


__all__ = ["MERGES", "AttentionBuckets", "RopeTable", "default_candidates", "generate", "inv_freq", "loop",
           "merge_logits", "parse_bases", "primary_table", "rope_base", "rope_tables", "search_bases",
           "shortest_stave", "waveform"]
