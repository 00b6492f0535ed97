"""Every inference-time method of the frontier, by name, as a function of a budget.

A budget ``f`` is the fraction of the dense KV cache a method may keep (KV-compression methods) or the fraction
of the keys a sparse prefill may read (prefill-sparse methods), at the prompt length ``L`` of the sample. Each
method turns ``(f, L)`` into a :class:`Setup`: a :class:`~attnlab.plans.plan.HeadPlan` (per-head cache
policies, run by :class:`~attnlab.plans.runtime.PlanRunner`) or a table of ops per layer (run through
:func:`attnlab.models.hf.use`).

Two protocols, reported apart:

* ``prefill`` -- compress while prefilling (the plan way): the method computes the prompt itself (a
  streaming head reads only its window, MoBA only its selected blocks);
* ``press`` -- prefill densely, then compress the cache with the question kept (the kvpress way): one dense
  prefill per sample is shared by every press method; each method's cache is rebuilt from the captured
  queries, keys and values exactly as its policy would have stored them (:func:`attnlab.frontier.run.replay`).

Families (the Sparse Frontier's distinction, B294): ``prefill`` methods make the prompt cheaper (MInference,
MoBA, HiP, streaming prefill), ``decode`` methods make the cache smaller or the decode step cheaper (SnapKV,
PyramidKV, Ada-KV, key-norm, TOVA, H2O, Quest, Recycled, DELTA).

On models with sliding-window layers (Gemma 3) every method acts on the full layers. The local layers
(:attr:`Context.local`) either shrink to the same fraction of their own window, StreamingLLM-style
(``"shrink"``, the default: the budget then covers every layer's cache, as it does on SmolLM2), or keep the
model's own window (``"keep"``: the budget covers the full layers only, and the cache can never go below the
local layers' share -- 0.38x of Gemma 3's dense cache at 4k tokens), or hold ``LOCAL_MIN`` positions each while
the full layers get the rest of the budget (``"min"``: :meth:`Context.layer_fraction`). See
:func:`attnlab.plans.sources.with_model_windows`. Ops-based setups (Recycled, DELTA, MoBA, HiP, MInference)
keep the whole cache and act on the full layers; the local layers run the model's own window.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..plans.plan import HeadPlan, HeadPolicy
from ..plans.policies import Policy


@dataclass(frozen=True)
class Setup:
    """What one method runs at one budget: a plan, or ops per layer (``{layer: (op, options)}``; layers not
    listed run the model's own attention)."""

    plan: HeadPlan | None = None
    ops: dict[int, tuple[str, dict[str, Any]]] | None = None
    #: Lookahead Q-Cache: greedy tokens decoded over the plan's compressed cache whose queries the plan's
    #: policies see before compressing the dense prompt's cache again (press protocol; 0: none)
    lookahead: int = 0


LOCAL_MODES = ("shrink", "keep", "min")
#: positions a sliding-window layer holds under local="min" (4 sinks + a 29-key window)
LOCAL_MIN = 32


@dataclass
class Context:
    """What a method may read to build its setup: the model, its tokenizer, its layers that are full (the
    others slide) and calibrations computed once per model (probe scores, DuoAttention gates, ...)."""

    model: Any
    tok: Any
    num_layers: int
    num_kv_heads: int
    q_per_kv: int
    full_layers: tuple[int, ...]
    cache: dict[str, Any] = field(default_factory=dict)
    #: a folder where calibrations are kept between runs (``calibration-<model>/`` in a frontier run folder)
    store: Path | None = None
    #: sliding-window layers under a KV budget: "shrink" (to the budget's fraction of their window), "keep"
    #: (the model's own window; the budget covers the full layers) or "min" (``LOCAL_MIN`` positions each; the
    #: full layers get the rest of the budget: :meth:`layer_fraction`)
    local: str = "shrink"

    def __post_init__(self) -> None:
        if self.local not in LOCAL_MODES:
            raise ValueError(f"local must be one of {LOCAL_MODES}, got {self.local!r}")

    def _local_windows(self) -> list[int]:
        from ..plans.sources import model_windows

        return [w for w in model_windows(self.model) if w is not None]

    def windows(self, plan: HeadPlan, f: float) -> HeadPlan:
        """``plan`` with the model's sliding-window layers as :attr:`local` says (budget ``f``)."""
        from ..plans.sources import with_model_windows

        if self.local == "min" and (local := self._local_windows()):
            return with_model_windows(self.model, plan, LOCAL_MIN / (min(local) - 1) if f < 1 else None)
        return with_model_windows(self.model, plan, f if self.local == "shrink" else None)

    def _min_split(self, f: float, L: int) -> tuple[float, float]:
        """local="min": (fraction of its ``L`` keys each full layer holds, fraction of its window each sliding
        layer holds) for a budget ``f`` of the dense cache: each sliding layer ``LOCAL_MIN`` positions (or
        less, where ``shrink`` would hold less), the full layers the rest; a budget the full layers cannot
        spend (the rest exceeds them) goes back to the windows."""
        if not self.full_layers:
            raise ValueError("local='min' gives the budget to the full layers; this model has none (every layer "
                             "slides): use 'shrink' or 'keep'")
        local = self._local_windows()
        window = min(local) - 1  # what local_policy's fraction is of
        W = min(L, window)  # positions a sliding layer's dense cache holds after L tokens
        each = min(LOCAL_MIN, f * W)
        dense = len(local) * W + len(self.full_layers) * L
        full = (f * dense - len(local) * each) / (len(self.full_layers) * L)
        if full <= 1.0:
            return max(full, 1.0 / L), each / window
        return 1.0, (f * dense - len(self.full_layers) * L) / len(local) / window

    def layer_fraction(self, f: float, L: int) -> float:
        """The fraction of its ``L`` prompt keys each full layer may hold when a KV method's budget is ``f`` of
        the whole dense cache: ``f``, except under ``local="min"`` (:meth:`_min_split`)."""
        if self.local != "min" or not self._local_windows():
            return f
        return self._min_split(f, L)[0]

    def fit_local(self, setup: Setup, f: float, L: int) -> Setup:
        """local="min": the sliding layers of a KV method's plan hold what :meth:`_min_split` leaves them."""
        if self.local != "min" or setup.plan is None or not self._local_windows():
            return setup
        from ..plans.sources import with_model_windows

        share = self._min_split(f, L)[1]
        return replace(setup, plan=with_model_windows(self.model, setup.plan, share))

    def calibrated(self, key: str, make: Callable[[], Any]) -> Any:
        """``make()`` once per model: kept in memory and, with a ``store``, on disk (tensors as safetensors,
        plans as JSON), so a resumed run reuses the calibration its first part computed."""
        if key in self.cache:
            return self.cache[key]
        value = _load(self.store, key) if self.store is not None else None
        if value is None:
            value = make()
            if self.store is not None:
                _save(self.store, key, value)
        self.cache[key] = value
        return value


def _load(store: Path, key: str) -> Any:
    from safetensors.torch import load_file

    if (store / f"{key}.safetensors").is_file():
        return load_file(str(store / f"{key}.safetensors"))["value"]
    if (store / f"{key}.json").is_file():
        return HeadPlan.load(store / f"{key}.json")
    return None


def _save(store: Path, key: str, value: Any) -> None:
    from safetensors.torch import save_file
    from torch import Tensor

    store.mkdir(parents=True, exist_ok=True)
    if isinstance(value, Tensor):
        save_file({"value": value.detach().contiguous().cpu()}, str(store / f"{key}.safetensors"))
    elif isinstance(value, HeadPlan):
        value.save(store / f"{key}.json")


@dataclass(frozen=True)
class Method:
    """A frontier method: ``build(ctx, f, L) -> Setup``."""

    name: str
    family: str  # "prefill" | "decode"
    protocols: tuple[str, ...]  # ("press",), ("prefill",) or both
    papers: tuple[str, ...]
    summary: str
    build: Callable[[Context, float, int], Setup]


METHODS: dict[str, Method] = {}


def method(name: str, family: str, protocols: tuple[str, ...], papers: tuple[str, ...], summary: str,
           kv: bool | None = None):
    """Register ``fn(ctx, f, L) -> Setup``. ``kv``: ``f`` is a fraction of the KV cache to hold (default: the
    ``decode`` family), so the method's full layers get :meth:`Context.layer_fraction` of theirs; otherwise
    ``f`` is a density of keys read (prefill methods, Quest, Recycled, DELTA) and passes unchanged."""
    holds = family == "decode" if kv is None else kv

    def deco(fn: Callable[[Context, float, int], Setup]) -> Callable[[Context, float, int], Setup]:
        def build(ctx: Context, f: float, L: int) -> Setup:
            return ctx.fit_local(fn(ctx, ctx.layer_fraction(f, L), L), f, L) if holds else fn(ctx, f, L)

        METHODS[name] = Method(name, family, protocols, papers, summary, build)
        return fn

    return deco


def get(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown frontier method {name!r}; choose from {', '.join(METHODS)}") from None


# ---- helpers ----------------------------------------------------------------------------------------------
def _tokens(f: float, L: int, minus: int = 0, floor: int = 1) -> int:
    return max(floor, int(round(f * L)) - minus)


def _uniform(ctx: Context, policy: Policy, name: str, f: float) -> Setup:
    """``policy`` on every key/value head of the full layers (the sliding layers as ``ctx.local`` says)."""
    plan = HeadPlan.uniform(ctx.num_layers, ctx.num_kv_heads, policy, ctx.q_per_kv, name=name)
    return Setup(plan=ctx.windows(plan, f))


def _per_layer(ctx: Context, policies: list[Policy], name: str, f: float) -> Setup:
    rows = tuple((p,) * ctx.num_kv_heads for p in policies)
    return Setup(plan=ctx.windows(HeadPlan(rows, ctx.q_per_kv, name), f))


def _on_full_layers(ctx: Context, op: str, options: dict[str, Any]) -> Setup:
    return Setup(ops={layer: (op, dict(options)) for layer in ctx.full_layers})


#: pseudo tokens LAQ decodes (the answers of the suite are 7-10 tokens)
LOOKAHEAD = 8


def stream_window(f: float, L: int, sinks: int = 4) -> int:
    """The window that makes sinks + window - 1 held positions about ``f * L``."""
    return max(8, _tokens(f, L) - sinks + 1)


# ---- KV compression (decode family) ------------------------------------------------------------------------
@method("stream", "decode", ("prefill", "press"), ("I30",),
        "StreamingLLM: 4 attention sinks + a window on every head")
def _stream(ctx: Context, f: float, L: int) -> Setup:
    return _uniform(ctx, HeadPolicy.stream(4, stream_window(f, L)), "stream", f)


@method("snapkv", "decode", ("press",), (), "SnapKV: the prompt keys the last 32 queries attend to most "
        "(max-pooled, kernel 7) + those 32")
def _snapkv(ctx: Context, f: float, L: int) -> Setup:
    return _uniform(ctx, HeadPolicy.snap(_tokens(f, L, 32), 32, 7), "snapkv", f)


@method("chunkkv", "decode", ("press",), (), "ChunkKV: SnapKV's scores (last 32 queries) summed over chunks of "
        "10 keys; the best whole chunks + those 32")
def _chunkkv(ctx: Context, f: float, L: int) -> Setup:
    # the chunk sum is the paper's grouping; max-pooling (SnapKV's) would blur the chunk boundaries it keeps
    return _uniform(ctx, HeadPolicy("snap", budget=_tokens(f, L, 32), window=32, kernel=1, chunk=10), "chunkkv", f)


@method("laq", "decode", ("press",), (), "Lookahead Q-Cache (LAQ++): SnapKV's selection, re-run with the "
        "queries of 8 tokens first decoded over SnapKV's cache added to the last 32 prompt queries")
def _laq(ctx: Context, f: float, L: int) -> Setup:
    return replace(_snapkv(ctx, f, L), lookahead=LOOKAHEAD)


@method("pyramidkv", "decode", ("press",), (), "PyramidKV: SnapKV with per-layer budgets falling linearly from "
        "1.5x the mean in the first layer to 0.5x in the last")
def _pyramid(ctx: Context, f: float, L: int) -> Setup:
    mean = _tokens(f, L, 32)
    n = ctx.num_layers
    full = [i for i in range(n) if i in ctx.full_layers]
    budgets = {layer: mean for layer in range(n)}
    for rank, layer in enumerate(full):  # the pyramid over the layers the method acts on
        t = rank / max(1, len(full) - 1)
        budgets[layer] = max(1, int(round(mean * (1.5 - t))))
    return _per_layer(ctx, [HeadPolicy.snap(budgets[i], 32, 7) for i in range(n)], "pyramidkv", f)


@method("adakv", "decode", ("press",), (), "Ada-KV on SnapKV: the layer's heads share the budget, allocated "
        "by score across heads (each head keeps at least 20% of its share)")
def _adakv(ctx: Context, f: float, L: int) -> Setup:
    return _uniform(ctx, Policy("ada", budget=_tokens(f, L, 32), window=32, kernel=7, alpha=0.2), "adakv", f)


@method("knorm", "decode", ("press",), (), "key-norm eviction: keep the prompt keys of lowest L2 norm + the "
        "last 32")
def _knorm(ctx: Context, f: float, L: int) -> Setup:
    return _uniform(ctx, Policy("knorm", budget=_tokens(f, L, 32), window=32), "knorm", f)


@method("tova", "decode", ("press",), (), "TOVA: a fixed cache; each step evicts the entry the current query "
        "attends to least")
def _tova(ctx: Context, f: float, L: int) -> Setup:
    return _uniform(ctx, Policy("tova", budget=_tokens(f, L, floor=2)), "tova", f)


@method("h2o", "decode", ("press",), (), "H2O: heavy hitters by accumulated attention + the recent half")
def _h2o(ctx: Context, f: float, L: int) -> Setup:
    budget = _tokens(f, L, floor=4)
    return _uniform(ctx, Policy("h2o", budget=budget, recent=budget // 2), "h2o", f)


@method("quest", "decode", ("prefill",), (), "Quest: dense prefill; each decode step reads the top pages of 16 "
        "keys by the score bound (the whole cache stays)", kv=False)
def _quest(ctx: Context, f: float, L: int) -> Setup:
    return _uniform(ctx, HeadPolicy.topk(max(1, _tokens(f, L) // 16), 16), "quest", 1.0)  # keeps every key


@method("recycled", "decode", ("prefill",), ("D27",), "Recycled attention: a full step every 8 positions records the "
        "top keys; the steps between reuse them (whole cache kept)", kv=False)
def _recycled(ctx: Context, f: float, L: int) -> Setup:
    # prefill=None: the prompt (the first call) is dense, as in the paper; only the decoding steps recycle
    return _on_full_layers(ctx, "recycled", {"top_k": _tokens(f, L), "stride": 8, "prefill": None})


@method("delta", "decode", ("prefill",), ("D42",), "DELTA: head-summed full attention picks one top-k key set per "
        "decoding step (+ 16 recent; whole cache kept)", kv=False)
def _delta(ctx: Context, f: float, L: int) -> Setup:
    return _on_full_layers(ctx, "delta_select", {"top_k": _tokens(f, L), "always": 16, "prefill": None})


# ---- attention-informed plans: streaming heads where the model's analysis allows ---------------------------
def _split(f: float, L: int, heads: int, sinks: int = 4) -> tuple[int, int]:
    """(kv heads kept whole, streaming window) of a head plan holding about ``f`` of ``heads`` kv heads'
    caches at prompt length ``L``.

    DuoAttention-style: a streaming head holds ``sinks`` + a window of ``min(256, f L / 2)`` (at least 16), and
    as many heads as the rest affords are kept whole (rounded, unless that overshoots the budget by more than
    5%). The streaming heads then share what the whole heads leave: their window grows to fill the budget
    (never below the default). With few kv heads (Gemma 3: one per full layer) a plan that can keep none whole
    is StreamingLLM; one that keeps one spends the rest on the others' windows instead of leaving it unused."""
    base = max(16, min(256, _tokens(f, L) // 2))
    hold = sinks + base - 1  # positions a streaming head holds
    budget = f * heads * L
    n_full = max(0, min(heads, int(round((budget - heads * hold) / max(1, L - hold)))))
    while n_full > 0 and n_full * L + (heads - n_full) * hold > 1.05 * budget:
        n_full -= 1
    if n_full == heads:
        return n_full, base
    filled = int((budget - n_full * L) / (heads - n_full)) - sinks + 1
    return n_full, min(L, max(base, filled))


#: passkey prompts (seeds disjoint from every evaluation sample) that decide a plan's split; see :func:`_uniform_wins`
SPLIT_PROBES = 5
SPLIT_SEED = 7_001


def _score_plan(ctx: Context, scores: Any, n_full: int, window: int, f: float, name: str) -> HeadPlan:
    from ..plans.sources import from_scores

    heads = len(ctx.full_layers) * ctx.num_kv_heads
    layers = [i in ctx.full_layers for i in range(ctx.num_layers)]
    plan = from_scores(scores, ctx.q_per_kv, n_full / heads, 4, window, name=name, source=name, layers=layers)
    return ctx.windows(plan, f)


def split_votes(model: Any, tok: Any, plans: list[HeadPlan], samples: list[Any]) -> list[float]:
    """Per plan, the summed task score over ``samples`` under the press protocol (one dense prefill per sample,
    each plan's cache replayed from it, greedy decoding of the sample's answer length)."""
    import torch

    from .run import run_dense, run_press

    votes = [0.0] * len(plans)
    for s in samples:
        dense = run_dense(model, torch.tensor([s.ids]), s.max_new_tokens - 1, capture=True)
        for i, plan in enumerate(plans):
            toks = run_press(model, plan, dense, s.max_new_tokens - 1)["tokens"]
            votes[i] += s.score(tok.decode(toks[0].tolist(), skip_special_tokens=True))
        del dense
    return votes


def _uniform_wins(ctx: Context, scores: Any, f: float, L: int, name: str, rule: tuple[int, int]) -> bool:
    """Whether the head-level split ``rule`` (whole heads + short windows) loses to spending the same budget as
    uniform StreamingLLM windows on :data:`SPLIT_PROBES` passkey prompts of length ``L`` (strictly: a tie keeps
    the split). DuoAttention-style calibration on generated data: on a model whose full layers have few kv heads
    (Gemma 3: one each) the whole heads a budget affords can be too few to retrieve anything, while windows
    twice as long still hold the later half of the context. Computed once per (method, f, L) and kept with the
    run's calibrations."""
    def decide() -> Any:
        import torch

        from ..plans.tasks import make_samples

        plans = [_score_plan(ctx, scores, *rule, f, name), _score_plan(ctx, scores, 0, stream_window(f, L), f, name)]
        probes = make_samples(ctx.tok, "passkey", L, SPLIT_PROBES, seed=SPLIT_SEED)
        votes = split_votes(ctx.model, ctx.tok, plans, probes)
        return torch.tensor([float(votes[1] > votes[0]), votes[0], votes[1]])

    return bool(ctx.calibrated(f"{name}-split-{f}-{L}", decide)[0])


def _from_scores(ctx: Context, scores: Any, f: float, L: int, name: str) -> Setup:
    """The ``scores`` ``(layers, kv_heads)`` highest kv heads of the full layers kept whole, the others streaming
    (:func:`_split`), unless the calibration says uniform windows keep more (:func:`_uniform_wins`); the sliding
    layers as :meth:`Context.windows` says."""
    heads = len(ctx.full_layers) * ctx.num_kv_heads
    n_full, window = _split(f, L, heads)
    if 0 < n_full < heads and _uniform_wins(ctx, scores, f, L, name, (n_full, window)):
        n_full, window = 0, stream_window(f, L)
    return Setup(plan=_score_plan(ctx, scores, n_full, window, f, name))


@method("probe", "decode", ("prefill", "press"), ("A28",), "retrieval-probe plan: full heads where passkey "
        "probes show retrieval or far reads, streaming heads elsewhere")
def _probe(ctx: Context, f: float, L: int) -> Setup:
    from ..plans.sources import probe_scores

    scores = ctx.calibrated("probe", lambda: probe_scores(ctx.model, ctx.tok, n=2, length=1024))
    return _from_scores(ctx, scores, f, L, "probe")


@method("duo", "decode", ("prefill", "press"), ("I30",), "DuoAttention plan: gates optimized to keep outputs "
        "when heads stream; the lowest gates stream")
def _duo(ctx: Context, f: float, L: int) -> Setup:
    from ..plans.sources import duo_gates

    gates = ctx.calibrated("duo", lambda: duo_gates(ctx.model, ctx.tok))
    return _from_scores(ctx, gates, f, L, "duo")


@method("atlas", "decode", ("prefill", "press"), ("A28", "I30"), "head-atlas plan: full heads ranked by the "
        "atlas's retrieval score + (1 - streaming score), streaming heads elsewhere")
def _atlas(ctx: Context, f: float, L: int) -> Setup:
    from ..inspect.atlas import build_atlas
    from ..plans.sources import atlas_scores

    scores = ctx.calibrated("atlas", lambda: atlas_scores(build_atlas(
        ctx.model, ctx.tok, probes=["text", "retrieval"], importance="none", flow_tokens=0)))
    return _from_scores(ctx, scores, f, L, "atlas")


@method("moa", "decode", ("prefill", "press"), ("I58",), "MoA plan: per-head windows minimizing the profiled "
        "lost attention mass within the budget")
def _moa(ctx: Context, f: float, L: int) -> Setup:
    from ..plans.sources import moa_plan

    plan = ctx.calibrated(f"moa-{f}-{L}", lambda: moa_plan(ctx.model, ctx.tok, kv_budget=f, at_length=L))
    return Setup(plan=ctx.windows(plan.renamed("moa"), f))


# ---- prefill-sparse ops on the model's own queries and keys -----------------------------------------------
def _blocks(f: float, L: int, block: int = 64) -> int:
    return max(1, int(round(f * L / block)))


@method("moba", "prefill", ("prefill",), (), "MoBA: per query block the top key blocks by mean-key gate + its "
        "own block (block 64)")
def _moba(ctx: Context, f: float, L: int) -> Setup:
    return _on_full_layers(ctx, "moba", {"block": 64, "top_k": _blocks(f, L)})


@method("hip", "prefill", ("prefill",), ("D74",), "HiP: hierarchical pruning, per query a tree search for the top key "
        "blocks (block 64)")
def _hip(ctx: Context, f: float, L: int) -> Setup:
    # hip's top_k counts the selected blocks besides the query's own (MoBA's counts its own): same budget
    return _on_full_layers(ctx, "hip", {"block": 64, "top_k": max(1, _blocks(f, L) - 1)})


@method("minference", "prefill", ("prefill",), (), "MInference vertical-slash: the top columns and diagonals "
        "estimated from the last 64 queries, half the budget each")
def _minference(ctx: Context, f: float, L: int) -> Setup:
    n = max(1, _tokens(f, L) // 2)
    return _on_full_layers(ctx, "minference", {"mode": "vertical_slash", "n_vertical": n, "n_slash": n})


@method("minference_blocks", "prefill", ("prefill",), (), "MInference block top-k: per query block the top key "
        "blocks by pooled scores (block 64)")
def _minference_blocks(ctx: Context, f: float, L: int) -> Setup:
    # block top-k reads its own block besides top_k others (as hip): the same number of blocks as MoBA
    return _on_full_layers(ctx, "minference", {"mode": "block_topk", "block": 64, "top_k": max(1, _blocks(f, L) - 1)})


def _with_delta(base: str) -> Callable[[Context, float, int], Setup]:
    def build(ctx: Context, f: float, L: int) -> Setup:
        setup = METHODS[base].build(ctx, f, L)
        return Setup(ops={layer: (op, {**opts, "delta": 64}) for layer, (op, opts) in setup.ops.items()})

    return build


for _base in ("moba", "hip", "minference"):
    METHODS[f"{_base}+delta"] = Method(f"{_base}+delta", "prefill", ("prefill",), ("D99",),
                                       f"{_base} with delta correction (dense rows every 64 positions)",
                                       _with_delta(_base))

#: the quick set: one or more of each kind, cheap enough for the README's main job
QUICK = ("stream", "snapkv", "laq", "pyramidkv", "adakv", "knorm", "tova", "h2o", "quest", "probe", "moba",
         "moba+delta", "minference")

__all__ = ["Context", "METHODS", "Method", "QUICK", "SPLIT_PROBES", "Setup", "get", "method", "split_votes",
           "stream_window"]
