"""Per-head attention plans for pretrained models: plans, policy classes, a per-head KV cache, the runner,
calibrations, tasks."""

from .cache import LayerKV, PlanCache, PlanLayer
from .plan import HeadPlan, HeadPolicy
from .policies import Policy, kinds, policy_class, register_policy
from .runtime import PlanRunner, greedy_generate, new_cache, prefill, use_plan

__all__ = ["HeadPlan", "HeadPolicy", "LayerKV", "PlanCache", "PlanLayer", "PlanRunner", "Policy",
           "greedy_generate", "kinds", "new_cache", "policy_class", "prefill", "register_policy", "use_plan"]
