"""``attnlab frontier``: every inference-time method x budget x task x length on real models, in one run.

Per sample (one prompt of a task at one length) every configuration runs back to back, so the speed ratios
compare runs made under the same machine load:

1. ``dense``: the model's own attention (on models with sliding-window layers, their window through
   :class:`attnlab.models.hf.NativeRunner`, attnlab's fastest exact path) with the model's own cache; the
   prefill records every layer's queries, keys and values (hook points ``blocks.*.attn.{q,k,v}``) when press
   methods are asked for;
2. ``press`` configurations: the dense prefill is shared; :func:`replay` rebuilds the method's cache from the
   recorded tensors exactly as its policy stores a prompt, then greedy decoding runs under the method (its
   prefill time is the dense prefill plus the replay);
3. ``prefill`` configurations: the method prefills the prompt itself, then decodes.

Greedy decoding runs the sample's ``max_new_tokens`` steps; the score is the task's (:meth:`Sample.score`).
KV bytes are the storage the cache holds after decoding. Results are appended to ``samples.jsonl`` as each
sample finishes (``--resume DIR`` skips finished samples), then aggregated into one row per (model, method,
budget, protocol, task, length) for :mod:`attnlab.frontier.report`.

Samples run in this process by default; with an :class:`attnlab.sweep.Executor` (``--executor ray``, or
``--workers N``) each sample with the configurations it lacks is a :class:`Unit` run in a worker that loads the
model once, with the calibrations computed on the driver first.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from .. import ops
from ..models import hf
from ..plans.cache import PlanCache
from ..plans.plan import HeadPlan
from ..plans.runtime import PlanRunner
from ..plans.tasks import Sample, depth_grid, make_samples
from ..sweep import Executor
from . import methods as M

DEFAULT_BUDGETS = (0.5, 0.25, 0.125)
DEFAULT_TASKS = ("passkey", "niah", "multikey", "multivalue", "vartrack", "cwe", "fwe", "kv", "grid")
DEFAULT_LENGTHS = (1024, 2048, 4096)
FULL_LENGTHS = {"smollm2": (1024, 2048, 4096, 8192), "gemma3": (1024, 2048, 4096, 8192, 16384)}


# ---------------------------------------------------------------------------------------------------------
# one configuration on one sample
# ---------------------------------------------------------------------------------------------------------
def cache_bytes(cache: Any) -> int:
    """Storage of the keys/values a cache holds (``PlanCache.nbytes`` or the tensors of a ``DynamicCache``)."""
    if hasattr(cache, "nbytes"):
        return int(cache.nbytes())
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, Tensor) and t.numel():
                total += t.untyped_storage().nbytes()
    return total


@torch.no_grad()
def decode(model: nn.Module, first: Tensor, cache: Any, steps: int) -> tuple[Tensor, float, float]:
    """Greedy decoding from the first generated token ``(B,)``: ``steps`` more tokens. Returns the tokens
    ``(B, 1 + steps)``, the seconds of the first step (where press policies compress the prompt's cache) and
    the seconds of the steps after it (steady-state decoding)."""
    toks = [first]
    marks = [time.perf_counter()]
    for _ in range(steps):
        out = model(input_ids=toks[-1][:, None], cache=cache, use_cache=True)
        toks.append(out.logits[:, -1].argmax(-1))
        marks.append(time.perf_counter())
    first_s = marks[1] - marks[0] if steps else 0.0
    return torch.stack(toks, dim=1), first_s, marks[-1] - marks[min(1, steps)]


def dense_runner(model: nn.Module) -> Any:
    """The dense baseline's runner: None (the model's own attention) or, with sliding layers, NativeRunner."""
    from ..plans.sources import model_windows

    return hf.NativeRunner() if any(w is not None for w in model_windows(model)) else None


@torch.no_grad()
def prefill_dense(model: nn.Module, ids: Tensor | Sequence[int], capture: bool = False
                  ) -> tuple[DynamicCache, Tensor, dict[int, dict[str, Any]], Any, float]:
    """The model's own attention over ``ids`` (``(1, T)`` or a list; with sliding layers through
    :func:`dense_runner`) into a fresh ``DynamicCache``, recording every layer's q, k, v (hook points
    ``blocks.*.attn.{q,k,v}``) when ``capture``.

    Returns ``(cache, last logits (vocab,), captured {layer: {"q", "k", "v", "scale"}}, handle, seconds)``:
    ``handle`` is the installed runner's handle (None for the model's own attention), left installed so that
    decoding continues under it; the caller removes it. ``seconds``: the forward alone."""
    captured: dict[int, dict[str, Any]] = {}

    def keep(point: str) -> Callable:
        def fn(value: Tensor, ctx: hf.HookContext) -> None:
            captured.setdefault(ctx.layer, {"scale": ctx.scale})[point] = value

        return fn

    if not isinstance(ids, Tensor):
        ids = torch.tensor([list(ids)])
    runner = dense_runner(model)
    handle = hf.use(model, runner) if runner is not None else None
    names = {f"blocks.*.attn.{p}": keep(p) for p in ("q", "k", "v")} if capture else {}
    try:
        with hf.hooks(model, names):
            cache = DynamicCache(config=model.config)
            t0 = time.perf_counter()
            out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
            seconds = time.perf_counter() - t0
    except BaseException:
        if handle is not None:
            handle.remove()
        raise
    return cache, out.logits[0, -1], captured, handle, seconds


def method_runner(model: nn.Module, setup: M.Setup) -> Any:
    """What a method computes its own prompt with: a :class:`~attnlab.plans.runtime.PlanRunner` for a plan;
    for ops, the ops on their layers and the model's own rule elsewhere (:class:`~attnlab.models.hf.NativeRunner`
    on models with sliding layers, else ``OpRunner``)."""
    if setup.plan is not None:
        return PlanRunner(setup.plan)
    table = {layer: (ops.get(op), opts) for layer, (op, opts) in setup.ops.items()}
    return hf.NativeRunner(table) if dense_runner(model) is not None else hf.OpRunner(table)


def run_dense(model: nn.Module, ids: Tensor, steps: int, capture: bool) -> dict[str, Any]:
    """Dense prefill (recording q, k, v per layer when ``capture``) and greedy decoding."""
    cache, logits, captured, handle, prefill_s = prefill_dense(model, ids, capture)
    try:
        first = logits.argmax(-1).view(1)
        toks, first_s, decode_s = decode(model, first, cache, steps)
    finally:
        if handle is not None:
            handle.remove()
    return {"tokens": toks, "prefill_s": prefill_s + first_s, "decode_s": decode_s,
            "kv_bytes": cache_bytes(cache), "first": first, "captured": captured, "dense_prefill_s": prefill_s}


@torch.no_grad()
def replay(plan: HeadPlan, captured: dict[int, dict[str, Any]],
           ahead: dict[int, Tensor] | None = None) -> tuple[PlanCache, PlanRunner]:
    """The cache ``plan`` would hold after a dense prefill: each layer's recorded keys/values go through its
    policies' ``append`` and the recorded queries through ``observe`` (what :class:`PlanRunner` does on a
    prompt call, minus the output, which the dense prefill already computed). ``ahead``: per layer, queries
    of tokens after the prompt ``(B, H, G, D)`` shown to the policies before they compress (``look_ahead``)."""
    cache, runner = PlanCache(plan), PlanRunner(plan)
    for layer in range(plan.num_layers):
        rec = captured[layer]
        lkv, _ = cache.layers[layer].update(rec["k"], rec["v"])
        runner.observe(rec["q"], lkv, scale=rec["scale"])
        if ahead is not None:
            runner.look_ahead(ahead[layer], lkv, scale=rec["scale"])
    return cache, runner


@torch.no_grad()
def pseudo_queries(model: nn.Module, plan: HeadPlan, dense: dict[str, Any], count: int) -> dict[int, Tensor]:
    """Lookahead Q-Cache's pseudo queries: ``count`` greedy tokens decoded from the first one over the cache
    ``plan`` keeps after the dense prompt (the method never reads what it evicts), and every layer's queries
    of those steps, ``{layer: (B, H, count, D)}`` (positions prompt .. prompt + count - 1)."""
    cache, runner = replay(plan, dense["captured"])
    rows: dict[int, list[Tensor]] = {}

    def keep(value: Tensor, ctx: hf.HookContext) -> None:
        rows.setdefault(ctx.layer, []).append(value)

    with hf.use(model, runner), hf.hooks(model, {"blocks.*.attn.q": keep}):
        decode(model, dense["first"], cache, count)
    return {layer: torch.cat(qs, dim=2) for layer, qs in rows.items()}


@torch.no_grad()
def run_press(model: nn.Module, plan: HeadPlan, dense: dict[str, Any], steps: int,
              lookahead: int = 0) -> dict[str, Any]:
    """Compress the dense prompt's cache with ``plan`` (after ``lookahead`` pseudo tokens, LAQ), then decode;
    the prefill seconds count the dense prompt, the compression and the pseudo decoding."""
    t0 = time.perf_counter()
    ahead = pseudo_queries(model, plan, dense, lookahead) if lookahead else None
    cache, runner = replay(plan, dense["captured"], ahead)
    replay_s = time.perf_counter() - t0
    with hf.use(model, runner):
        toks, first_s, decode_s = decode(model, dense["first"], cache, steps)
    return {"tokens": toks, "prefill_s": dense["dense_prefill_s"] + replay_s + first_s, "decode_s": decode_s,
            "kv_bytes": cache_bytes(cache)}


@torch.no_grad()
def run_prefill(model: nn.Module, setup: M.Setup, ids: Tensor, steps: int) -> dict[str, Any]:
    with hf.use(model, method_runner(model, setup)) as handle:
        cache = handle.new_cache()
        t0 = time.perf_counter()
        out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        prefill_s = time.perf_counter() - t0
        toks, first_s, decode_s = decode(model, out.logits[:, -1].argmax(-1), cache, steps)
    return {"tokens": toks, "prefill_s": prefill_s + first_s, "decode_s": decode_s, "kv_bytes": cache_bytes(cache)}


# ---------------------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------------------
def configs(names: Sequence[str], budgets: Sequence[float],
            protocols: Sequence[str] = ("prefill", "press")) -> list[tuple[M.Method, float, str]]:
    """``(method, budget, protocol)`` for every asked method, budget and protocol it supports (of
    ``protocols``)."""
    return [(M.get(n), float(b), p) for n in names for b in budgets for p in M.get(n).protocols if p in protocols]


def context(model: nn.Module, tok: Any, store: Path | None = None, local: str = "shrink") -> M.Context:
    """The methods' view of ``model``; ``store``: where its calibrations are kept between runs; ``local``:
    what a KV budget does to sliding-window layers (:attr:`attnlab.frontier.methods.Context.local`)."""
    from ..plans.sources import model_windows

    geo = hf.geometry(model)
    windows = model_windows(model)
    full = tuple(i for i, w in enumerate(windows) if w is None)
    return M.Context(model, tok, geo.num_layers, geo.num_kv_heads, geo.group, full, store=store, local=local)


def model_label(name: str, ctx: M.Context) -> str:
    """The name records carry: ``name`` (``local="shrink"``, or a model without sliding-window layers),
    ``name:own-windows`` (``keep``: the windows whole under every budget) or ``name:local-min`` (``min``), so
    the conventions never share cells."""
    if len(ctx.full_layers) == ctx.num_layers or ctx.local == "shrink":
        return name
    return f"{name}:own-windows" if ctx.local == "keep" else f"{name}:local-min"


def _key(rec: dict[str, Any]) -> tuple:
    return (rec["model"], rec["task"], rec["length"], rec["sample"], rec["method"], rec["budget"], rec["protocol"])


def load_records(path: Path) -> list[dict[str, Any]]:
    """The records of ``samples.jsonl``, the last one per (model, task, length, sample, method, budget,
    protocol) (a redone sample appends new lines; the old ones are superseded)."""
    if not path.is_file():
        return []
    out: dict[tuple, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            out[_key(rec)] = rec
    return list(out.values())


def run_sample(model: nn.Module, tok: Any, ctx: M.Context, sample: Sample, cfgs, *, model_name: str,
               index: int, advance: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Every configuration on one sample, dense first; one record each."""
    ids = torch.tensor([sample.ids])
    steps = sample.max_new_tokens - 1
    base = {"model": model_name, "task": sample.task, "length": sample.length, "sample": index,
            "depth": sample.depth}

    def record(method: str, budget: float | None, protocol: str, family: str, res: dict[str, Any]) -> dict:
        text = tok.decode(res["tokens"][0].tolist(), skip_special_tokens=True)
        n_steps = res["tokens"].shape[1] - 2  # steady-state steps: after the first decode step
        return {**base, "method": method, "budget": budget, "protocol": protocol, "family": family,
                "score": sample.score(text), "text": text, "kv_bytes": res["kv_bytes"],
                "new_tokens": int(res["tokens"].shape[1]),
                "prefill_s": res["prefill_s"],
                "decode_tok_s": n_steps / res["decode_s"] if n_steps and res["decode_s"] > 0 else None}

    # always captured: the dense run takes one path (attnlab's dispatch) whichever methods are asked for
    dense = run_dense(model, ids, steps, capture=True)
    out = [record("dense", None, "dense", "dense", dense)]
    # the dense run this sample's configurations are paired with (a resumed run may redo dense later)
    base["dense"] = {k: out[0][k] for k in ("prefill_s", "decode_tok_s", "kv_bytes")}
    if advance:
        advance(f"{model_name} {sample.task} {sample.length} dense")
    for meth, budget, protocol in cfgs:
        try:
            setup = meth.build(ctx, budget, sample.length)
            if protocol == "press":
                res = run_press(model, setup.plan, dense, steps, setup.lookahead)
            else:
                res = run_prefill(model, setup, ids, steps)
            out.append(record(meth.name, budget, protocol, meth.family, res))
        except Exception as e:  # one broken configuration must not lose the run: recorded, reported
            out.append({**base, "method": meth.name, "budget": budget, "protocol": protocol, "family": meth.family,
                        "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc(limit=-3)})
        if advance:
            advance(f"{model_name} {sample.task} {sample.length} {meth.name} {budget} {protocol}")
    dense.pop("captured", None)
    return out


def aggregate(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, method, budget, protocol, task, length), with ratios to the dense run of each
    sample (paired: both ran back to back)."""
    dense = {(r["model"], r["task"], r["length"], r["sample"]): r for r in records if r["method"] == "dense"}
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        if "error" in r:
            continue
        groups.setdefault((r["model"], r["method"], r["budget"], r["protocol"], r["family"], r["task"],
                           r["length"]), []).append(r)
    rows = []
    for (model, method, budget, protocol, family, task, length), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["sample"])
        # each record's own dense partner (same sample, run just before it); older records: the dense record
        pairs = [(r, r["dense"] if "dense" in r else dense[(model, task, length, r["sample"])]) for r in rs
                 if "dense" in r or (model, task, length, r["sample"]) in dense]
        dec = [r["decode_tok_s"] / d["decode_tok_s"] for r, d in pairs if r.get("decode_tok_s") and d.get(
            "decode_tok_s")]
        rows.append({
            "model": model, "method": method, "budget": budget, "protocol": protocol, "family": family,
            "task": task, "length": length, "n": len(rs), "scores": [r["score"] for r in rs],
            "accuracy": statistics.mean(r["score"] for r in rs),
            "kv_bytes": statistics.mean(r["kv_bytes"] for r in rs),
            "kv_ratio": statistics.mean(r["kv_bytes"] / d["kv_bytes"] for r, d in pairs) if pairs else None,
            # the answer's share of the dense cache (the claims' KV limit); None for records before new_tokens
            "answer_share": statistics.mean(r["new_tokens"] / (length + r["new_tokens"]) for r in rs)
            if all("new_tokens" in r for r in rs) else None,
            "prefill_speedup": statistics.median(d["prefill_s"] / r["prefill_s"] for r, d in pairs) if pairs else None,
            "decode_speedup": statistics.median(dec) if dec else None,
            "decode_tok_s": statistics.median(r["decode_tok_s"] for r in rs if r.get("decode_tok_s")) if any(
                r.get("decode_tok_s") for r in rs) else None,
            "prefill_s": statistics.median(r["prefill_s"] for r in rs),
        })
    return rows


#: methods whose calibration depends on the prompt length (kept out of the short warm-up)
CALIBRATED = ("moa",)

#: the needle depth x length grid: one niah sample per depth, from the start to the very end of the context
GRID = "grid"


def samples(tok: Any, task: str, length: int, n: int, seed: int = 0) -> list[Sample]:
    """``n`` samples of ``task`` (depths spread over 5%..95%); ``grid``: one needle per depth of
    :data:`attnlab.plans.tasks.DEFAULT_DEPTHS` (0.0 .. 0.9, 0.98, 1.0; ``n`` is ignored)."""
    if task == GRID:
        return [dataclasses.replace(s, task=GRID) for s in depth_grid(tok, "niah", length, seed=seed)]
    return make_samples(tok, task, length, n, seed)


def depth_table(records: Sequence[dict[str, Any]]) -> str:
    """Markdown: accuracy per (model, method, budget, protocol) and needle depth of the ``grid`` task."""
    grid = [r for r in records if r.get("task") == GRID and "error" not in r]
    if not grid:
        return ""
    depths = sorted({r["depth"] for r in grid})
    cells: dict[tuple, dict[float, list[float]]] = {}
    for r in grid:
        key = (r["model"], r["length"], r["method"], r["budget"], r["protocol"])
        cells.setdefault(key, {}).setdefault(r["depth"], []).append(r["score"])
    head = "| model | length | method | budget | protocol | " + " | ".join(f"{d:.2f}" for d in depths) + " |"
    lines = ["## Needle depth x length grid (niah; accuracy per depth, 1.00 = right before the question)", "",
             head, "|" + "---|" * (5 + len(depths))]
    for key in sorted(cells, key=lambda k: (k[0], k[1], k[2] != "dense", k[2], -(k[3] or 1), k[4])):
        row = cells[key]
        vals = [f"{statistics.mean(row[d]):.2f}" if d in row else "" for d in depths]
        lines.append("| " + " | ".join(str(x if x is not None else "-") for x in key) + " | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def solvable_rows(rows: Sequence[dict[str, Any]], threshold: float = 0.5) -> list[dict[str, Any]]:
    """The rows of the (model, task, length) cells whose dense accuracy is at least ``threshold`` (a method
    cannot lose what the dense model never had: the suite mean over these cells is the fairer comparison)."""
    ok = {(r["model"], r["task"], r["length"]) for r in rows
          if r["method"] == "dense" and r.get("accuracy") is not None and r["accuracy"] >= threshold}
    return [r for r in rows if (r["model"], r["task"], r["length"]) in ok]


# ---------------------------------------------------------------------------------------------------------
# sweep units: one sample with the configurations it lacks, run anywhere (attnlab.sweep)
# ---------------------------------------------------------------------------------------------------------
Cfg = tuple[str, float, str]  # (method name, budget, protocol): what a unit ships (method objects stay here)


@dataclasses.dataclass(frozen=True, eq=False)
class Unit:
    """One (model, task, length, sample) with the configurations it still lacks: what one worker runs
    (:func:`run_unit`). Dense always runs with them (the others are paired with it).

    ``calibrations``: every :meth:`~attnlab.frontier.methods.Context.calibrated` value the configurations read,
    computed once on the driver (and stored in its run folder) before dispatch, so workers never compute one
    (concurrently, or differently from a local run). ``loader``: a picklable ``name -> (model, tokenizer)``
    (None: :func:`attnlab.models.hf.load_model`)."""

    model: str
    label: str
    sample: Sample
    index: int
    cfgs: tuple[Cfg, ...]
    local: str
    calibrations: dict[str, Any]
    warm: Sample
    warm_cfgs: tuple[Cfg, ...]
    loader: Callable[[str], tuple[Any, Any]] | None = None

    def base(self) -> dict[str, Any]:
        return {"model": self.label, "task": self.sample.task, "length": self.sample.length, "sample": self.index,
                "depth": self.sample.depth}


class _ShippedContext(M.Context):
    """A worker's context: the calibrations the driver shipped; one not shipped is an error, never computed
    here (several workers would compute it at once, and it could differ from the driver's)."""

    def calibrated(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self.cache:
            raise RuntimeError(f"calibration {key!r} was not computed before dispatch (see the driver's log)")
        return self.cache[key]


#: this worker process's model: (loader, name, local) -> (model, tokenizer, context); one model at a time
_LOADED: dict[tuple, tuple[nn.Module, Any, M.Context]] = {}


def _methods(cfgs: Sequence[Cfg]) -> list[tuple[M.Method, float, str]]:
    return [(M.get(name), budget, protocol) for name, budget, protocol in cfgs]


def run_unit(unit: Unit) -> dict[str, Any]:
    """Run one unit in this process: ``{"records": [...]}`` (dense first), as :func:`run_sample` writes them.
    The model loads once per process (the first unit also runs the untimed warm-up)."""
    key = (unit.loader, unit.model, unit.local)
    if key not in _LOADED:
        _LOADED.clear()  # a frontier runs its models one after another: hold one
        model, tok = (unit.loader or hf.load_model)(unit.model)
        ctx = _ShippedContext(**vars(context(model, tok, None, unit.local)))
        ctx.cache.update(unit.calibrations)
        run_sample(model, tok, ctx, unit.warm, _methods(unit.warm_cfgs), model_name=unit.label, index=-1)
        _LOADED[key] = (model, tok, ctx)
    model, tok, ctx = _LOADED[key]
    ctx.cache.update(unit.calibrations)
    return {"records": run_sample(model, tok, ctx, unit.sample, _methods(unit.cfgs), model_name=unit.label,
                                  index=unit.index)}


def unit_error(unit: Unit, row: dict[str, Any]) -> list[dict[str, Any]]:
    """The records of a unit that did not return (its model did not load, dense failed, its worker died): an
    error record for dense and each configuration, so the report names them and a rerun retries them."""
    err = {"error": row.get("error", "no result"), "trace": row.get("trace", "")}
    out = [{**unit.base(), "method": "dense", "budget": None, "protocol": "dense", "family": "dense", **err}]
    for meth, budget, protocol in _methods(unit.cfgs):
        out.append({**unit.base(), "method": meth.name, "budget": budget, "protocol": protocol,
                    "family": meth.family, **err})
    return out


def calibrate(ctx: M.Context, needs: dict[int, set[tuple[M.Method, float]]],
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build every (method, budget) at its lengths once on the driver, so that every calibration they read is
    computed (or loaded from the run folder) here; returns them (``ctx.cache``). A build that fails is logged:
    its configurations fail again in the workers and are recorded as errors."""
    for L in sorted(needs):
        for meth, budget in sorted(needs[L], key=lambda mb: (mb[0].name, mb[1])):
            try:
                meth.build(ctx, budget, L)
            except Exception as e:  # noqa: BLE001 - recorded by the workers' records
                log(f"  {meth.name} {budget} at {L}: {type(e).__name__}: {e}")
    return dict(ctx.cache)


def _write(path: Path, recs: list[dict[str, Any]], records: list[dict[str, Any]],
           log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Append ``recs`` to ``samples.jsonl``; the records with them superseding their keys."""
    with path.open("a") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    new = {_key(x) for x in recs}
    for r in recs:
        if "error" in r:
            log(f"  error: {r['method']} {r['budget']} {r['protocol']} on {r['task']} {r['length']}: {r['error']}")
    return [r for r in records if _key(r) not in new] + recs


def frontier(models: Sequence[str], method_names: Sequence[str], budgets: Sequence[float], tasks: Sequence[str],
             lengths: Sequence[int] | dict[str, Sequence[int]], n: int, run_dir: Path, seed: int = 0,
             progress: Callable[[int], Any] | None = None, log: Callable[[str], None] = print,
             protocols: Sequence[str] = ("prefill", "press"), local: str = "shrink",
             executor: Executor | None = None,
             loader: Callable[[str], tuple[Any, Any]] | None = None) -> list[dict]:
    """Run everything; appends to ``run_dir/samples.jsonl`` and returns all records (old and new).
    ``local``: what budgets do to sliding-window layers ("shrink", "keep" or "min", see :class:`methods.Context`).

    ``executor`` (:mod:`attnlab.sweep`; default: this process): where the samples run. In this process every
    sample runs in turn on the loaded model; otherwise each (model, task, length, sample) with the
    configurations it lacks is a :class:`Unit` run by :func:`run_unit` in a worker (a local process or a Ray
    task), with the calibrations computed here first. The records are the same either way; the timings are
    each worker's own (every speed ratio pairs a configuration with the dense run of its own sample and
    worker). ``loader``: a picklable ``name -> (model, tokenizer)`` (default :func:`attnlab.models.hf.load_model`)."""
    executor = executor or Executor()
    executor.check()
    path = run_dir / "samples.jsonl"
    records = load_records(path)
    done = {_key(r) for r in records if "error" not in r}  # a failed configuration is retried
    cfgs = configs(method_names, budgets, protocols)
    for load_name in models:
        model, tok = (loader or hf.load_model)(load_name)
        ctx = context(model, tok, run_dir / f"calibration-{load_name}", local)
        name = model_label(load_name, ctx)
        lens = lengths.get(load_name, ()) if isinstance(lengths, dict) else lengths
        units = [(task, L, i, s) for task in tasks for L in lens for i, s in enumerate(samples(tok, task, L, n, seed))]
        todo = [u for u in units if any((name, u[0], u[1], u[2], m.name, b, p) not in done for m, b, p in cfgs)
                or (name, u[0], u[1], u[2], "dense", None, "dense") not in done]
        log(f"{name}: {len(units)} samples x {1 + len(cfgs)} configurations; {len(units) - len(todo)} done already")
        if not todo:
            continue
        # warm-up (untimed, a short prompt): the first calls build kernels' layouts and warm the allocators
        warm = make_samples(tok, "passkey", min(512, min(lens)), 1, seed + 999)[0]
        warm_cfgs = [c for c in cfgs if c[0].name not in CALIBRATED][:4]
        # only the configurations a sample lacks (dense always reruns: the others are paired with it)
        need = {(t, L, i): [c for c in cfgs if (name, t, L, i, c[0].name, c[1], c[2]) not in done]
                for t, L, i, _ in todo}
        total = sum(1 + len(need[t, L, i]) for t, L, i, _ in todo)
        if executor.in_process:
            if executor.threads:
                torch.set_num_threads(executor.threads)
            run_sample(model, tok, ctx, warm, warm_cfgs, model_name=name, index=-1)
        else:
            lengths_needed: dict[int, set[tuple[M.Method, float]]] = {warm.length: {(m, b) for m, b, _ in warm_cfgs}}
            for t, L, i, _ in todo:
                lengths_needed.setdefault(L, set()).update((m, b) for m, b, _ in need[t, L, i])
            calibrations = calibrate(ctx, lengths_needed, log)
            jobs = [Unit(load_name, name, sample, i, tuple((m.name, b, p) for m, b, p in need[t, L, i]), local,
                         calibrations, warm, tuple((m.name, b, p) for m, b, p in warm_cfgs), loader)
                    for t, L, i, sample in todo]
        ctxmgr = progress(total) if progress else None
        advance = ctxmgr.__enter__() if ctxmgr else None
        try:
            if executor.in_process:
                for task, L, i, sample in todo:
                    recs = run_sample(model, tok, ctx, sample, need[task, L, i], model_name=name, index=i,
                                      advance=advance)
                    records = _write(path, recs, records, log)
            else:
                for unit, row in executor.map_unordered(run_unit, jobs):
                    recs = row["records"] if "records" in row else unit_error(unit, row)
                    records = _write(path, recs, records, log)
                    for r in recs:
                        if advance:
                            advance(f"{name} {r['task']} {r['length']} {r['method']} {r['budget']} {r['protocol']}")
        finally:
            if ctxmgr:
                ctxmgr.__exit__(None, None, None)
        del model, ctx
    return records


__all__ = ["GRID", "depth_table", "samples", "solvable_rows", "DEFAULT_BUDGETS", "DEFAULT_LENGTHS", "DEFAULT_TASKS", "aggregate", "cache_bytes", "configs", "context", "model_label",
           "decode", "frontier", "load_records", "method_runner", "prefill_dense", "replay", "run_dense", "run_press", "run_prefill", "run_sample",
           "Unit", "calibrate", "run_unit", "unit_error"]
