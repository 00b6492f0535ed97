"""``attnlab bench speed --sections plan``: prefill of an embedded model under a per-head plan vs dense.

The plan is the headline one (:func:`attnlab.plans.cli.quick_check`'s: a probe plan with 64% of SmolLM2's
key/value heads streaming, 4 sinks + a 256-key window, calibrated on 2 passkey prompts of 1,024 tokens). The
prompt is seeded random tokens. Dense prefill is the model's own SDPA attention with its own cache; the plan's
prefill runs under :class:`~attnlab.plans.runtime.PlanRunner` with its :class:`~attnlab.plans.cache.PlanCache`
(a layer mixing full and streaming heads runs its prompt as one per-head pattern call on the sparse engine).
Both are one forward of the prompt with ``logits_to_keep=1``; after an untimed warm-up they alternate
(:func:`attnlab.bench.common.time_pair`), and the speed-up is the median of the per-round ratios.
"""

from __future__ import annotations

import torch

from .common import Report, time_pair
from .speed import SpeedContext

COLUMNS = ["model", "length", "plan", "stream_kv_heads", "kv_ratio", "dense_s", "plan_s", "speedup", "rounds"]


def run(ctx: SpeedContext, model_name: str = "smollm2") -> Report:
    from transformers import DynamicCache

    from ..models import hf
    from ..plans import sources
    from ..plans.cli import QUICK_FULL_FRACTION
    from ..plans.runtime import PlanRunner, prefill

    if torch.device(ctx.device).type != "cpu":
        raise SystemExit("the plan section times the embedded models on CPU")
    rep = Report("plan", COLUMNS, meta={"model": model_name, "batch": 1})
    model, tok = hf.load_model(model_name)
    plan = sources.probe_plan(model, tok, QUICK_FULL_FRACTION, 4, 256, n=2, length=1024)
    own = sources.uniform(model, "full")  # the model's own cache (its sliding layers keep their window)
    rounds = 2 if ctx.quick else 5
    for n in ctx.lengths or ((1024,) if ctx.quick else (4096,)):
        ids = torch.randint(100, min(20000, model.config.vocab_size), (1, n), generator=torch.Generator().manual_seed(0))

        @torch.no_grad()
        def dense(ids: torch.Tensor = ids) -> None:
            model(input_ids=ids, cache=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1)

        def planned(ids: torch.Tensor = ids) -> None:
            with hf.use(model, PlanRunner(plan)) as handle:
                prefill(model, ids, handle.new_cache())

        tb, ta, sp = time_pair(dense, planned, rounds=rounds, warmup=1, max_seconds=600.0)
        counts = plan.counts()
        rep.add(model=model_name, length=n, plan=plan.name,
                stream_kv_heads=f"{counts.get('stream', 0)}/{sum(counts.values())}",
                kv_ratio=plan.kv_positions(n) / own.kv_positions(n), dense_s=tb, plan_s=ta, speedup=sp, rounds=rounds)
    return rep


__all__ = ["run"]
