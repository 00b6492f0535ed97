"""The cost model: FLOPs and memory traffic of every attention op and cache policy, and the machine they run on.

Kinetics (B77) prices inference by *effective* FLOPs: ``eFLOPs = FLOPs + I x bytes``, where ``I`` is the
hardware's arithmetic intensity (peak FLOP/s divided by memory bandwidth in bytes/s), so a byte moved costs what
the machine could have computed meanwhile. :class:`Hardware` holds the two ceilings (measured here: the dense
matmul peak of :func:`attnlab.bench.common.matmul_peak_gflops` and a STREAM-style copy bandwidth,
:func:`measure_bandwidth`) and turns a :class:`Cost` into eFLOPs and predicted seconds.

Conventions (named in ``docs``):

* **FLOPs** are the matrix products of attention: ``4 x head_dim`` per attended (query, key) pair and query head
  (``QK^T`` and ``PV``, a multiply-add = 2 FLOPs), plus what a method spends choosing its keys (gate scores,
  pooled keys, page bounds, recomputed weights), counted the same way. Softmax exponentials and comparisons are
  not counted (Kinetics counts matmuls).
* **Bytes** are *compulsory traffic*: queries read and outputs written once (a decode step's one query and
  output stay in cache); each key/value position a call needs read once per key/value head (``min(L, pairs)``
  positions: exact for one decode row and for a prefill that touches every key); the method's own metadata
  (pooled keys, page extrema, recurrent states) read and written once. Ops that materialize their weights (no
  fused kernel: cog, relu, GAAM, MTA, neural, LLA) also write and read each score once.
* A call has ``Tq`` query rows at the last positions of ``L`` keys (``q_offset = L - Tq``): a prefill is
  ``Tq = L``, a decode step ``Tq = 1`` with context ``L`` (the step's own key included). ``prompt`` is the
  prefill length for ops whose rule differs after it (MInference, Recycled, DELTA, SnapKV).

Every op of :mod:`attnlab.ops` has a formula here (``op_cost``); a name without one raises :class:`NotPriced`.
Cache policies of :mod:`attnlab.plans.policies` are priced by :func:`policy_prefill` / :func:`policy_decode`
from their knobs and :meth:`Policy.kept`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


class NotPriced(ValueError):
    """The cost model has no formula for this method (or these options); the message says why."""


# ---------------------------------------------------------------------------------------------------------
# costs and the machine
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cost:
    """FLOPs and bytes of memory traffic."""

    flops: float = 0.0
    bytes: float = 0.0

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.flops + other.flops, self.bytes + other.bytes)

    def __mul__(self, s: float) -> Cost:
        return Cost(self.flops * s, self.bytes * s)

    __rmul__ = __mul__

    def eflops(self, intensity: float) -> float:
        """Kinetics' effective FLOPs: ``flops + intensity * bytes``."""
        return self.flops + intensity * self.bytes


ZERO = Cost()


@dataclass(frozen=True)
class Hardware:
    """Peak FLOP/s and memory bandwidth (bytes/s) of the machine a cost is priced on."""

    peak_flops: float
    bandwidth: float
    name: str = "this machine"

    def __post_init__(self) -> None:
        if not (self.peak_flops > 0 and self.bandwidth > 0):
            raise ValueError(f"peak_flops and bandwidth must be > 0, got {self.peak_flops}, {self.bandwidth}")

    @property
    def intensity(self) -> float:
        """Arithmetic intensity ``I`` (FLOPs per byte) at which compute and memory take equal time."""
        return self.peak_flops / self.bandwidth

    def eflops(self, cost: Cost) -> float:
        return cost.eflops(self.intensity)

    def roofline_s(self, cost: Cost) -> float:
        """Roofline time: ``max(FLOPs / peak, bytes / bandwidth)`` (compute and traffic overlap)."""
        return max(cost.flops / self.peak_flops, cost.bytes / self.bandwidth)

    def eflops_s(self, cost: Cost) -> float:
        """eFLOPs / peak = ``FLOPs / peak + bytes / bandwidth`` (no overlap: Kinetics' additive cost)."""
        return self.eflops(cost) / self.peak_flops

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "peak_gflops": self.peak_flops / 1e9, "bandwidth_gbs": self.bandwidth / 1e9,
                "intensity_flops_per_byte": self.intensity}

    @classmethod
    def measure(cls, device: str = "cpu", mbytes: int = 128) -> Hardware:
        """The matmul peak and copy bandwidth of ``device``, measured now."""
        from ..bench.common import matmul_peak_gflops

        return cls(matmul_peak_gflops(device) * 1e9, measure_bandwidth(device, mbytes), f"measured ({device})")


def measure_bandwidth(device: str = "cpu", mbytes: int = 128, reps: int = 5) -> float:
    """Memory bandwidth in bytes/s from a STREAM-style copy ``b[:] = a`` of ``mbytes`` MiB (float32), larger
    than the caches: bytes read + bytes written per copy (STREAM's convention), best of ``reps``."""
    from ..bench.common import time_fn

    if mbytes < 1:
        raise ValueError(f"mbytes must be >= 1, got {mbytes}")
    n = mbytes * 2**20 // 4
    a = torch.ones(n, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    t = min(time_fn(lambda: b.copy_(a), reps=reps, warmup=1))
    return 2 * a.numel() * a.element_size() / t


# ---------------------------------------------------------------------------------------------------------
# one attention call
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Heads:
    """Shape of one attention call: ``(batch, heads, L, head_dim)`` queries over ``kv_heads`` key/value heads,
    ``dtype_bytes`` per element (4: float32, 2: bfloat16)."""

    heads: int = 8
    kv_heads: int = 8
    head_dim: int = 64
    batch: int = 1
    dtype_bytes: int = 4

    def __post_init__(self) -> None:
        for name in ("heads", "kv_heads", "head_dim", "batch", "dtype_bytes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")


def causal_pairs(Tq: int, L: int) -> float:
    """(query, key) pairs of causal attention for the last ``Tq`` of ``L`` positions: sum of ``p + 1``."""
    return Tq * L - Tq * (Tq - 1) / 2


def _rows(Tq: int, L: int) -> np.ndarray:
    return np.arange(L - Tq, L, dtype=np.float64)


def attention(g: Heads, Tq: int, L: int, pairs: float, *, k_read: float | None = None,
              v_read: float | None = None, extra_flops: float = 0.0, extra_bytes: float = 0.0,
              unfused: bool = False, pair_flops: float | None = None) -> Cost:
    """Cost of a call attending ``pairs`` (query, key) pairs per query head (summed over its ``Tq`` rows).

    ``k_read`` / ``v_read``: key / value positions read per key/value head (default ``min(L, pairs)``);
    ``extra_flops`` / ``extra_bytes``: the method's own work per batch element (all heads); ``pair_flops``:
    FLOPs per pair and query head (default ``4 * head_dim``); ``unfused``: the weights go through memory.
    """
    D, dt = g.head_dim, g.dtype_bytes
    read = min(float(L), float(pairs))
    k_read = read if k_read is None else k_read
    v_read = read if v_read is None else v_read
    pf = 4.0 * D if pair_flops is None else pair_flops
    flops = g.heads * pf * pairs + extra_flops
    qo = 2 * g.heads * Tq * D if Tq > 1 else 0  # one decode row's q and o stay in cache (fused step)
    nbytes = dt * (qo + g.kv_heads * D * (k_read + v_read)) + extra_bytes
    if unfused:
        nbytes += 2 * g.heads * pairs * dt
    return Cost(flops * g.batch, nbytes * g.batch)


# ---------------------------------------------------------------------------------------------------------
# op formulas: fn(g, Tq, L, prompt, opts) -> Cost, opts resolved by the op's spec (defaults filled in)
# ---------------------------------------------------------------------------------------------------------
Formula = Callable[[Heads, int, int, int, dict[str, Any]], Cost]
_FORMULAS: dict[str, Formula] = {}
#: ops whose rule repeats every so many positions (blocks, strides, full-step schedules): a decode token's cost
#: is the mean over one period of steps
_PERIOD: dict[str, Callable[[dict[str, Any]], int]] = {}


def formula(*names: str, period: Callable[[dict[str, Any]], int] | None = None):
    def deco(fn: Formula) -> Formula:
        for n in names:
            _FORMULAS[n] = fn
            if period is not None:
                _PERIOD[n] = period
        return fn

    return deco


def priced_ops() -> list[str]:
    """Op names with a formula (registered ops only)."""
    from .. import ops

    return [n for n in ops.names() if n in _FORMULAS]


def _spec(name: str):
    from .. import ops

    try:
        return ops.get(name)
    except KeyError:
        raise NotPriced(f"unknown op {name!r}; registered ops: {', '.join(ops.names())}") from None


def resolve(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The op's options with defaults filled in; unknown option names raise ``ValueError`` naming them."""
    return _spec(name).resolve(options)


def op_cost(name: str, g: Heads, Tq: int, L: int, prompt: int | None = None, **options: Any) -> Cost:
    """Cost of one call of op ``name`` (``Tq`` rows at the end of ``L`` keys; ``prompt``: the prefill length,
    default ``L`` for a multi-row call and ``L - 1`` for one row). Raises :class:`NotPriced` for an op without
    a formula, ``ValueError`` for bad options or lengths."""
    spec = _spec(name)
    opts = spec.resolve(options)
    if name not in _FORMULAS:
        raise NotPriced(f"op {name!r} has no cost formula; priced ops: {', '.join(priced_ops())}")
    _check_lengths(Tq, L)
    if prompt is None:
        prompt = L if Tq > 1 else L - 1
    cost = _FORMULAS[name](g, Tq, L, prompt, opts)
    delta = int(opts.get("delta", 0) or 0)
    if delta:
        cost = cost + _delta_correction(g, Tq, L, delta, causal=bool(opts.get("causal", True)))
    return cost


def op_decode_cost(name: str, g: Heads, L: int, prompt: int | None = None, **options: Any) -> Cost:
    """Cost of one generated token at context ``L`` (one-row call over ``L`` keys). Ops whose rule repeats
    (a row's place in its block, Recycled's full steps, the delta correction's dense rows) are averaged over
    one period of steps from ``L`` on."""
    opts = resolve(name, options)
    period = max(_PERIOD[name](opts) if name in _PERIOD else 1, int(opts.get("delta", 0) or 0), 1)
    prompt = L - 1 if prompt is None else prompt
    total = ZERO
    for t in range(period):
        total = total + op_cost(name, g, 1, L + t, prompt, **options)
    return total * (1.0 / period)


def _check_lengths(Tq: int, L: int) -> None:
    for n, v in (("Tq", Tq), ("L", L)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{n} must be a positive integer, got {v!r}")
    if Tq > L:
        raise ValueError(f"Tq ({Tq}) cannot exceed the keys L ({L})")


def _delta_correction(g: Heads, Tq: int, L: int, stride: int, causal: bool) -> Cost:
    """D99: dense rows at the positions that are multiples of ``stride``, over every visible key (a decode step
    on such a row also reads every key and value)."""
    r = _rows(Tq, L)
    sampled = r[r % stride == 0]
    if not sampled.size:
        return ZERO
    pairs = float((sampled + 1).sum()) if causal else float(sampled.size * L)
    reread = 2.0 * g.kv_heads * L * g.head_dim * g.dtype_bytes if Tq == 1 else 0.0
    return Cost(4.0 * g.head_dim * g.heads * pairs * g.batch, reread * g.batch)


# ---- dense family -------------------------------------------------------------------------------------------
def _dense_pairs(Tq: int, L: int, causal: bool) -> float:
    return causal_pairs(Tq, L) if causal else float(Tq * L)


@formula("sdpa")
def _sdpa(g, Tq, L, prompt, o):
    return attention(g, Tq, L, _dense_pairs(Tq, L, o["causal"]))


@formula("cog", "relu_attn", "gaam")
def _unfused_dense(g, Tq, L, prompt, o):
    return attention(g, Tq, L, _dense_pairs(Tq, L, o["causal"]), unfused=True)


@formula("sentinel")
def _sentinel(g, Tq, L, prompt, o):
    # one sink key/value per head joins every row's keys
    return attention(g, Tq, L, _dense_pairs(Tq, L, o["causal"]) + Tq)


@formula("mta")
def _mta(g, Tq, L, prompt, o):
    pairs = _dense_pairs(Tq, L, o["causal"])
    # the (query_kernel x key_kernel) convolution over the score map and the head mix of the weights
    conv = 2.0 * o["query_kernel"] * o["key_kernel"] + 2.0 * o["head_kernel"]
    return attention(g, Tq, L, pairs, pair_flops=4.0 * g.head_dim + conv, unfused=True)


@formula("neural_attn")
def _neural(g, Tq, L, prompt, o):
    D = g.head_dim
    n = int(o["w1"].shape[1]) if o.get("w1") is not None else D
    pairs = _dense_pairs(Tq, L, o["causal"])
    # per pair: add the two first-layer halves, activation, second layer (2n), then PV (2D);
    # per token: the first layer's halves W1q q and W1k k (2 x 2 D n)
    per_token = 2 * 2 * D * n * (Tq + L) * g.heads
    return attention(g, Tq, L, pairs, pair_flops=4.0 * n + 2.0 * D, extra_flops=per_token, unfused=True)


@formula("rcmha")
def _rcmha(g, Tq, L, prompt, o):
    D, H = g.head_dim, g.heads
    pairs = _dense_pairs(Tq, L, o["causal"])
    dists = Tq + L - 1
    # (q + w) against one projected sinusoid per distance, the W_R projection of those sinusoids, the bias read
    extra = 2 * D * Tq * dists * H + 2 * (H * D) ** 2 * dists
    return attention(g, Tq, L, pairs, extra_flops=extra, extra_bytes=H * pairs * g.dtype_bytes)


@formula("lla")
def _lla(g, Tq, L, prompt, o):
    D = g.head_dim
    pairs = _dense_pairs(Tq, L, True)
    # per pair: score (2D), weighted sums of k and v (4D), covariance and cross-covariance (2D^2 + 2D^2);
    # per row: the ridge solve (~D^3 / 3 x 2) and the read-out (2 D^2)
    pf = 2.0 * D + 4.0 * D + 4.0 * D * D
    solve = Tq * (2.0 * D**3 / 3 + 2.0 * D * D) * g.heads
    return attention(g, Tq, L, pairs, pair_flops=pf, extra_flops=solve, unfused=True)


# ---- static patterns --------------------------------------------------------------------------------------
#: largest q_len x kv_len a pattern without a count formula (And / Or) is counted on its dense mask
DENSE_COUNT_LIMIT = 1 << 24


def pattern_pairs(pattern: Any, Tq: int, L: int) -> float:
    """Allowed pairs per query head of ``pattern`` for the last ``Tq`` of ``L`` positions (its ``count``)."""
    from ..core.patterns.base import _Combine

    if isinstance(pattern, _Combine) and Tq * L > DENSE_COUNT_LIMIT:
        raise NotPriced(f"pattern {pattern!r} combines patterns with & or |, which have no count formula; "
                        f"counting its mask needs Tq x L <= {DENSE_COUNT_LIMIT} (got {Tq} x {L}); price the parts")
    return float(pattern.count(Tq, L, L - Tq))


def pattern_cost(pattern: Any, g: Heads, Tq: int, L: int) -> Cost:
    if pattern.num_heads is not None and pattern.num_heads != g.heads:
        raise ValueError(f"per-head pattern has {pattern.num_heads} heads, the call has {g.heads} query heads")
    return attention(g, Tq, L, pattern_pairs(pattern, Tq, L))


@formula("pattern")
def _pattern(g, Tq, L, prompt, o):
    if o["pattern"] is None:
        raise NotPriced("op 'pattern' needs a pattern object (pattern=...)")
    return pattern_cost(o["pattern"], g, Tq, L)


@formula("sliding_window")
def _sliding(g, Tq, L, prompt, o):
    from ..core.patterns import SlidingWindow

    return pattern_cost(SlidingWindow(o["window"], o["causal"]), g, Tq, L)


@formula("neighborhood")
def _neighborhood(g, Tq, L, prompt, o):
    from ..core.patterns import Neighborhood

    grid = tuple(o["grid"]) if o["grid"] is not None else (L,)
    if math.prod(grid) != L:
        raise ValueError(f"neighborhood: the grid {grid} holds {math.prod(grid)} tokens, the call has L={L}")
    pat = Neighborhood(grid, o["kernel_size"], o["dilation"], o["stride"], o["causal"])
    return pattern_cost(pat, g, Tq, L)


def stream_pairs(Tq: int, L: int, sinks: int, window: int) -> float:
    """Pairs of ``Causal & (Sinks(sinks) | SlidingWindow(window))`` for the last ``Tq`` of ``L`` positions:
    row ``p`` sees ``min(p + 1, window)`` recent keys plus the sinks older than its window."""
    p = _rows(Tq, L)
    recent = np.minimum(p + 1, window)
    old = np.clip(p + 1 - window, 0, sinks)
    return float((recent + old).sum())


@formula("stream")
def _stream(g, Tq, L, prompt, o):
    return attention(g, Tq, L, stream_pairs(Tq, L, o["sinks"], o["window"]))


# ---- block and token selections (routing) ------------------------------------------------------------------
def _blocks_pairs(p: np.ndarray, block: int, others: int | np.ndarray) -> np.ndarray:
    """Own block read causally plus ``others`` full past blocks (capped by the past blocks there are)."""
    cur = np.floor(p / block)
    return (p - cur * block + 1) + np.minimum(others, cur) * block


@formula("moba", period=lambda o: o["block"])
def _moba(g, Tq, L, prompt, o):
    b, k = o["block"], o["top_k"]
    p = _rows(Tq, L)
    pairs = float(_blocks_pairs(p, b, k - 1).sum())
    nb = math.ceil(L / b)
    # gate: each row scores every block's mean key; the means are pooled keys kept per block (nb x D read)
    gate = 2.0 * g.head_dim * nb * Tq * g.heads
    pooled = g.kv_heads * nb * g.head_dim * g.dtype_bytes
    return attention(g, Tq, L, pairs, extra_flops=gate, extra_bytes=pooled)


@formula("hip", period=lambda o: o["block"])
def _hip(g, Tq, L, prompt, o):
    b, k = o["block"], o["top_k"]
    p = _rows(Tq, L)
    cur = np.floor(p / b)
    pairs = float(_blocks_pairs(p, b, k).sum())
    # tree search: ceil(log2(past blocks / top_k)) rounds, 2 top_k representative keys scored per round
    rounds = np.ceil(np.log2(np.maximum(cur / k, 1.0)))
    reps = 2.0 * k * rounds
    sel = 2.0 * g.head_dim * float(reps.sum()) * g.heads
    k_read = min(float(L), pairs + float(reps.sum()))
    return attention(g, Tq, L, pairs, k_read=k_read, extra_flops=sel)


@formula("minference")
def _minference(g, Tq, L, prompt, o):
    P = o["prefill"] if o["prefill"] is not None else prompt
    p = _rows(Tq, L)
    sparse = p < P
    dense = float((p[~sparse] + 1).sum())
    ps = p[sparse]
    if o["mode"] == "vertical_slash":
        # upper bound: the kept columns and diagonals never overlap and are all visible
        sp = float(np.minimum(ps + 1, o["n_vertical"] + o["n_slash"]).sum())
        est = 2.0 * g.head_dim * min(o["last_q"], P) * P * g.heads if ps.size else 0.0
    elif o["mode"] == "block_topk":
        b = o["block"]
        sp = float(_blocks_pairs(ps, b, o["top_k"]).sum())
        nb = math.ceil(P / b)
        est = 2.0 * g.head_dim * nb * (nb + 1) / 2 * g.heads if ps.size else 0.0  # pooled q blocks x k blocks
    else:
        raise NotPriced(f"minference mode {o['mode']!r} has no cost formula")
    return attention(g, Tq, L, sp + dense, extra_flops=est)


def _quest_step(g: Heads, L: int, pages: int, block: int) -> Cost:
    """One decode row of Quest at context ``L``: the page bounds (kmax, kmin per page) scored and read, then
    the top pages (the current one included) attended."""
    nb = math.ceil(L / block)
    read = float(min(L, pages * block))
    score = 4.0 * g.head_dim * nb * g.heads  # q * kmax, q * kmin, max, sum per channel and page
    meta = 2.0 * g.kv_heads * nb * g.head_dim * g.dtype_bytes
    return attention(g, 1, L, read, extra_flops=score, extra_bytes=meta)


@formula("quest")
def _quest(g, Tq, L, prompt, o):
    if Tq > 1:  # the prompt is causal; the page extrema are built over its keys (2 compares per channel)
        return attention(g, Tq, L, causal_pairs(Tq, L), extra_flops=2.0 * g.kv_heads * L * g.head_dim)
    return _quest_step(g, L, o["pages"], o["block"])


@formula("recycled", period=lambda o: o["stride"])
def _recycled(g, Tq, L, prompt, o):
    if o["refresh_below"] is not None:
        raise NotPriced("recycled with refresh_below: the refresh schedule depends on the queries; price the "
                        "fixed stride (refresh_below=None)")
    P = o["prefill"] if o["prefill"] is not None else prompt
    K, s = o["top_k"], o["stride"]
    p = _rows(Tq, L)
    full = (p < P) | ((p - (P - 1)) % s == 0)
    f = (P - 1) + s * np.floor((p - (P - 1)) / s)  # the last full step at or before p
    recycled = np.minimum(K, f + 1) + (p - f)
    if o["dense_refresh"]:
        pairs = np.where(full, p + 1, recycled)
        scored = 0.0
    else:  # a full step scores every key, then attends its own top-k
        pairs = np.where(full, np.minimum(K, p + 1), recycled)
        scored = 2.0 * g.head_dim * float((p[full] + 1).sum()) * g.heads
    total = float(pairs.sum())
    k_read = min(float(L), total + float((p[full] + 1).sum()))
    return attention(g, Tq, L, total, k_read=k_read, extra_flops=scored)


@formula("delta_select")
def _delta_select(g, Tq, L, prompt, o):
    P = o["prefill"] if o["prefill"] is not None else prompt
    p = _rows(Tq, L)
    dense = p < P
    sel = ~dense
    # a step scores every past key (head-summed full attention), then attends top_k + always keys
    att = np.minimum(p[sel] + 1, o["top_k"] + o["always"])
    pairs = float((p[dense] + 1).sum() + att.sum())
    scores = 2.0 * g.head_dim * float((p[sel] + 1).sum()) * g.heads
    k_read = min(float(L), float((p + 1).sum()))
    return attention(g, Tq, L, pairs, k_read=k_read, extra_flops=scores)


@formula("dma")
def _dma(g, Tq, L, prompt, o):
    p = _rows(Tq, L)
    pairs = float(np.minimum(p + 1, o["window"]).sum())
    # the importance of each new key (mean over the value channels of the kv heads); kept per key and read back
    imp = 2.0 * g.kv_heads * g.head_dim * Tq
    imp_bytes = g.kv_heads * L * g.dtype_bytes
    return attention(g, Tq, L, pairs, extra_flops=imp, extra_bytes=imp_bytes)


@formula("dhsa", period=lambda o: max(1, round((o["min_len"] + o["max_len"]) / 2)))
def _dhsa(g, Tq, L, prompt, o):
    # chunk lengths depend on the keys: priced at the mean of min_len and max_len
    m = (o["min_len"] + o["max_len"]) / 2
    p = _rows(Tq, L)
    pairs = float(_blocks_pairs(p, m, o["top_k"] - 1).sum())
    route = 2.0 * g.head_dim * float(np.floor(p / m).sum()) * g.heads  # query-chunk rep x past chunk reps
    sim = 3.0 * g.kv_heads * g.head_dim * Tq  # adjacent-key cosine similarity of the new keys
    chunks = g.kv_heads * math.ceil(L / m) * g.head_dim * g.dtype_bytes
    return attention(g, Tq, L, pairs, extra_flops=route + sim, extra_bytes=chunks)


@formula("superlinear", period=lambda o: o["stride"])
def _superlinear(g, Tq, L, prompt, o):
    s, w, k = o["stride"], o["window"], o["top_k"]
    p = _rows(Tq, L)
    first = p - w + 1
    eligible = np.where(first > 0, np.floor(np.maximum(first, 0) / s), 0)
    local = np.where(first > 0, p - s * eligible + 1, p + 1)
    pairs = float((local + np.minimum(k, eligible) * s).sum())
    search = 2.0 * g.head_dim * float(eligible.sum()) * g.heads  # one anchor key per eligible span
    k_read = min(float(L), pairs + float(eligible.sum()))
    return attention(g, Tq, L, pairs, k_read=k_read, extra_flops=search)


def _grid_tokens(name: str, grid: Any, L: int) -> int:
    T = math.prod(tuple(grid))
    if T != L:
        raise ValueError(f"{name}: the grid {tuple(grid)} holds {T} tokens, the call has L={L} (set grid=...)")
    return T


@formula("biformer")
def _biformer(g, Tq, L, prompt, o):
    T = _grid_tokens("biformer", o["grid"], L)
    nR = math.prod(tuple(o["regions"]))
    r = T / nR
    pairs = Tq * min(o["top_k"], nR) * r
    C = g.heads * g.head_dim
    route = 2.0 * T * C + 2.0 * nR * nR * C  # region means of q and k, region affinity (heads together)
    return attention(g, Tq, L, pairs, k_read=L, v_read=L, extra_flops=route)


@formula("routing_transformer")
def _routing(g, Tq, L, prompt, o):
    C = o["clusters"]
    # balanced clusters: each row sees 1 / clusters of its visible keys; assignments of the call's q and k
    pairs = _dense_pairs(Tq, L, o["causal"]) / C
    assign = 2.0 * g.head_dim * C * 2 * Tq * g.heads
    return attention(g, Tq, L, pairs, extra_flops=assign)


@formula("sparsifiner")
def _sparsifiner(g, Tq, L, prompt, o):
    K = min(o["top_k"], L)
    if o["connectivity"] is not None:  # the predictor's scores are given: read them
        sel, sel_bytes, k_read = 0.0, g.heads * Tq * L * g.dtype_bytes, None
    else:  # ranked by the attention scores themselves: every score computed
        sel, sel_bytes, k_read = 2.0 * g.head_dim * Tq * L * g.heads, 0.0, float(L)
    return attention(g, Tq, L, float(Tq * K), k_read=k_read, extra_flops=sel, extra_bytes=sel_bytes)


@formula("vmoba")
def _vmoba(g, Tq, L, prompt, o):
    grid = tuple(o["grid"])
    T = _grid_tokens("vmoba", grid, L)
    tile = tuple(o["tile"])
    part = o["partition"]
    if part == "1d":
        block = tile[0] * math.prod(grid[1:])
    elif part == "2d":
        block = math.prod(tile[1:])
    elif part == "3d":
        block = math.prod(tile)
    else:
        raise NotPriced(f"vmoba partition {part!r} has no cost formula")
    nb = math.ceil(T / block)
    pairs = Tq * min(o["top_k"], nb) * block  # threshold mode: at most top_k blocks (an upper bound)
    gate = 2.0 * g.head_dim * nb * Tq * g.heads
    return attention(g, Tq, L, pairs, extra_flops=gate)


# ---- cache ops (registered by the plan policies) ------------------------------------------------------------
@formula("snap")
def _snap(g, Tq, L, prompt, o):
    p = _rows(Tq, L)
    before = p < prompt
    kept = o["budget"] + o["window"]
    # after a prompt longer than budget + window, a row sees the kept prompt keys plus what came after it
    after = np.where(prompt > kept, kept + (p - prompt + 1), p + 1)
    pairs = float((p[before] + 1).sum() + after[~before].sum())
    observe = 2.0 * g.head_dim * min(o["window"], Tq) * L * g.heads if bool(before.any()) else 0.0
    return attention(g, Tq, L, pairs, extra_flops=observe)


@formula("drop")
def _drop(g, Tq, L, prompt, o):
    return ZERO


# ---- linear / recurrent -------------------------------------------------------------------------------------
def _linear_cost(g: Heads, Tq: int, mode: str, chunk: int, state_cols: int, decay: bool, causal: bool = True) -> Cost:
    """Decayed linear attention on ``Tq`` new tokens (the keys of earlier calls live in the state).

    The state is ``(heads, head_dim, state_cols)`` per sequence, float32 (bf16 inputs run in fp32). Parallel:
    the quadratic form. Chunked: causal products inside each chunk + read and update of the carried state per
    token. Recurrent (and any one-row call): per token a state read (``q S``) and update (``S += k^T v``)."""
    D, Dc, H = g.head_dim, state_cols, g.heads
    state = H * D * Dc * 4
    qkvo = g.dtype_bytes * ((2 * H * Tq * D if Tq > 1 else 0) + 2 * g.kv_heads * Tq * D)  # as attention()
    if not causal:
        flops = H * Tq * 4.0 * D * Dc  # sum of phi(k)^T v, then one read per query
        return Cost(flops * g.batch, (qkvo + state) * g.batch)
    if mode == "parallel" and Tq > 1:
        flops = H * causal_pairs(Tq, Tq) * (2.0 * D + 2.0 * Dc)
        return Cost(flops * g.batch, (qkvo + 2 * state) * g.batch)
    per_token = 4.0 * D * Dc + (D * Dc if decay else 0.0)
    if mode == "chunked" and Tq > 1:
        p = np.arange(Tq, dtype=np.float64)
        intra = float((p % chunk + 1).sum()) * (2.0 * D + 2.0 * Dc)
        flops = H * (intra + Tq * per_token)
        moves = 2 * state * math.ceil(Tq / chunk)  # the carried state read and written once per chunk
        return Cost(flops * g.batch, (qkvo + moves) * g.batch)
    return Cost(H * Tq * per_token * g.batch, (qkvo + 2 * state * Tq) * g.batch)


@formula("linear")
def _linear(g, Tq, L, prompt, o):
    return _linear_cost(g, Tq, o["mode"], o["chunk"], g.head_dim + (1 if o["normalize"] else 0), False,
                        o["causal"])


@formula("retention", "lightning")
def _retention(g, Tq, L, prompt, o):
    return _linear_cost(g, Tq, o["mode"], o["chunk"], g.head_dim, True)


@formula("cumulative_softmax")
def _cumsoftmax(g, Tq, L, prompt, o):
    # per key feature: the exp-weighted value sum (D x Dv), its normalizer and running max (two more columns)
    return _linear_cost(g, Tq, o["mode"], o["chunk"], g.head_dim + 2, True)


def linear_state_bytes(name: str, g: Heads, **options: Any) -> float:
    """Bytes of the recurrent state of a linear op per sequence (float32), for every query head."""
    o = resolve(name, options)
    cols = {"linear": g.head_dim + (1 if o.get("normalize") else 0), "cumulative_softmax": g.head_dim + 2}
    return float(g.heads * g.head_dim * cols.get(name, g.head_dim) * 4)


def op_state_bytes(name: str, g: Heads, L: int, **options: Any) -> float:
    """Bytes an op keeps per layer after ``L`` tokens: its KV cache (``cache="kv"``) or recurrent state."""
    spec = _spec(name)
    if name == "drop":
        return 0.0
    if spec.cache == "recurrent":
        return linear_state_bytes(name, g, **options) * g.batch
    return 2.0 * g.kv_heads * L * g.head_dim * g.dtype_bytes * g.batch


# ---------------------------------------------------------------------------------------------------------
# cache policies (plans): per group of key/value heads sharing one policy
# ---------------------------------------------------------------------------------------------------------
PRICED_POLICIES = ("full", "stream", "snap", "topk", "drop", "knorm", "tova", "h2o", "ada")


def _check_policy(policy: Any) -> str:
    kind = getattr(policy, "kind", None)
    if kind not in PRICED_POLICIES:
        raise NotPriced(f"plan policy {kind!r} has no cost formula; priced policies: {', '.join(PRICED_POLICIES)}")
    return kind


def policy_observe(policy: Any, g: Heads, L: int) -> float:
    """FLOPs a policy spends on an ``L``-token prompt to decide what to keep (on top of attending it)."""
    kind = _check_policy(policy)
    D, H = g.head_dim, g.heads
    if kind in ("snap", "ada"):  # the last `window` queries' weights, recomputed over every key
        return 2.0 * D * min(policy.window, L) * L * H * g.batch
    if kind in ("knorm", "topk"):  # one L2 norm per key / the page extrema (2 compares per channel)
        return 2.0 * D * L * g.kv_heads * g.batch
    if kind == "tova":  # the last query's weights
        return 2.0 * D * L * H * g.batch
    if kind == "h2o":  # every prompt query's weights, accumulated
        return 2.0 * D * causal_pairs(L, L) * H * g.batch
    return 0.0


def policy_prefill(policy: Any, g: Heads, L: int) -> Cost:
    """Prompt of ``L`` tokens computed by ``policy`` itself for the heads of ``g`` (the ``prefill`` protocol: a
    streaming head reads only its sinks and window; the others attend causally), plus what it records to
    compress (:func:`policy_observe`). Under the ``press`` protocol the prompt is the dense one instead."""
    kind = _check_policy(policy)
    if kind == "drop":
        return ZERO
    if kind == "stream":
        return attention(g, L, L, stream_pairs(L, L, policy.sinks, policy.window))
    return attention(g, L, L, causal_pairs(L, L)) + Cost(policy_observe(policy, g, L), 0.0)


def policy_positions(policy: Any, L: int) -> float:
    """Key/value positions a decode step at context ``L`` reads per key/value head."""
    kind = _check_policy(policy)
    if kind == "topk":
        return float(min(policy.kept(L), policy.pages * policy.block))
    return float(policy.kept(L))


def policy_decode(policy: Any, g: Heads, L: int) -> Cost:
    """One generated token at context ``L``: the step reads the positions the policy holds
    (:meth:`Policy.kept`; Quest: its top pages and the page bounds)."""
    kind = _check_policy(policy)
    if kind == "drop":
        return ZERO
    if kind == "topk":
        return _quest_step(g, L, policy.pages, policy.block)
    return attention(g, 1, L, policy_positions(policy, L))


def policy_held_bytes(policy: Any, g: Heads, L: int) -> float:
    """Cache bytes the policy holds for the heads of ``g`` after ``L`` tokens (Quest: + page extrema)."""
    kind = _check_policy(policy)
    kv = 2.0 * g.kv_heads * policy.kept(L) * g.head_dim * g.dtype_bytes
    if kind == "topk":
        kv += 2.0 * g.kv_heads * math.ceil(L / policy.block) * g.head_dim * g.dtype_bytes
    return kv * g.batch


__all__ = ["Cost", "DENSE_COUNT_LIMIT", "Hardware", "Heads", "NotPriced", "PRICED_POLICIES", "ZERO", "attention",
           "causal_pairs", "linear_state_bytes", "measure_bandwidth", "op_cost", "op_decode_cost", "op_state_bytes",
           "pattern_cost", "pattern_pairs", "policy_decode", "policy_held_bytes", "policy_positions",
           "policy_observe", "policy_prefill", "priced_ops", "resolve", "stream_pairs"]
