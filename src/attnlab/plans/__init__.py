"""Per-head attention plans for pretrained models: plans, a per-head KV cache, calibrations, tasks."""

from .cache import PlanCache, PlanLayer
from .plan import HeadPlan, HeadPolicy
from .runtime import PlanRunner, greedy_generate, new_cache, prefill, use_plan

__all__ = ["HeadPlan", "HeadPolicy", "PlanCache", "PlanLayer", "PlanRunner", "greedy_generate", "new_cache",
           "prefill", "use_plan"]
