"""Plan policies, one class per file: ``full``, ``stream``, ``snap``, ``topk`` (Quest), ``drop``, and the
frontier's eviction policies ``knorm``, ``tova``, ``h2o``, ``ada`` (Ada-KV on SnapKV scores).

Each module defines a :class:`Policy` subclass registered with :func:`register_policy` (what the prompt
computes, what the cache keeps, the decode step) and, for the cache-changing kinds, the q/k/v op computing
it over a whole key sequence (``attnlab.ops`` family ``cache``: ``stream``, ``snap``, ``quest``, ``drop``).
Every module of this package is imported with it, so a new policy is one new file here.
"""

import importlib
import pkgutil

from .base import GroupKV, Policy, Slot, kinds, policy_class, register_policy
from .drop import Drop
from .full import Full
from .snap import Snap
from .stream import Stream
from .topk import TopK

for _m in pkgutil.iter_modules(__path__):  # a new policy file registers itself: nothing else to edit
    importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["Drop", "Full", "GroupKV", "Policy", "Slot", "Snap", "Stream", "TopK", "kinds", "policy_class",
           "register_policy"]
