"""Per-head attention plans for pretrained models: which attention each (layer, key/value head) gets.

A :class:`HeadPlan` is a frozen ``(layers, kv_heads)`` grid of policies. A policy is a class, one file each
under :mod:`attnlab.plans.policies` (what the prompt computes, what the cache keeps, the decode step):

* ``full``   -- the head attends to every past key and the cache keeps every position (retrieval heads);
* ``stream`` -- ``sinks`` first tokens plus a causal window of ``window`` keys (streaming heads,
  DuoAttention I30 / StreamingLLM); the cache keeps ``sinks + window - 1`` positions only;
* ``snap``   -- SnapKV-like prompt eviction: after the prompt, keep the ``budget`` prompt keys the last
  ``window`` queries attend to most (pooled over ``kernel`` neighbours) plus those last ``window`` keys;
* ``topk``   -- Quest-like query-aware pages for decoding: the cache keeps everything, each decode step
  reads the ``pages`` pages of ``block`` keys whose upper-bound score is highest (prefill is causal);
* ``drop``   -- the head is ablated: its query heads output zero and the cache holds nothing for it.

``HeadPolicy`` is the policy base class: ``HeadPolicy.stream(4, 256)`` or ``HeadPolicy("stream", sinks=4,
window=256)`` build the registered class of that kind.

Plans are keyed by *key/value* heads because that is the unit a KV cache stores (grouped-query attention
shares one key/value head between ``q_per_kv`` query heads, which therefore share its policy).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..core.patterns import Causal, Pattern, PerHead, SlidingWindow
from .policies import Policy, kinds, policy_class

#: the policy base class under its historical name
HeadPolicy = Policy


@dataclass(frozen=True)
class HeadPlan:
    """A policy per (layer, key/value head): ``policies[layer][kv_head]``.

    ``q_per_kv`` query heads share each key/value head (grouped-query attention). ``name`` and ``meta``
    (a tuple of (key, value) pairs, e.g. the source and its budget) travel with the JSON form.
    """

    policies: tuple[tuple[HeadPolicy, ...], ...]
    q_per_kv: int = 1
    name: str = "plan"
    meta: tuple[tuple[str, Any], ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        pol = tuple(tuple(row) for row in self.policies)
        if not pol or not pol[0]:
            raise ValueError("a plan needs at least one layer and one key/value head")
        widths = {len(row) for row in pol}
        if len(widths) != 1:
            raise ValueError(f"every layer must list the same number of key/value heads, got {sorted(widths)}")
        for row in pol:
            for p in row:
                if not isinstance(p, Policy) or type(p) is Policy:
                    raise TypeError(f"plan entries must be policies (HeadPolicy), got {type(p).__name__}")
        if self.q_per_kv < 1:
            raise ValueError(f"q_per_kv must be >= 1, got {self.q_per_kv}")
        object.__setattr__(self, "policies", pol)
        object.__setattr__(self, "meta", tuple(tuple(kv) for kv in self.meta))

    # ---- shape -----------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.policies)

    @property
    def num_kv_heads(self) -> int:
        return len(self.policies[0])

    def __getitem__(self, index: tuple[int, int]) -> HeadPolicy:
        layer, head = index
        return self.policies[layer][head]

    # ---- constructors ----------------------------------------------------------------------------
    @classmethod
    def uniform(
        cls, num_layers: int, num_kv_heads: int, policy: HeadPolicy, q_per_kv: int = 1, name: str | None = None
    ) -> HeadPlan:
        row = (policy,) * num_kv_heads
        return cls((row,) * num_layers, q_per_kv, name or f"all-{policy.label()}", (("source", "uniform"),))

    @classmethod
    def from_mask(
        cls,
        retrieval: list[list[bool]],
        streaming: HeadPolicy,
        q_per_kv: int = 1,
        name: str = "plan",
        meta: tuple[tuple[str, Any], ...] = (),
    ) -> HeadPlan:
        """Full where ``retrieval[layer][head]`` is True, ``streaming`` elsewhere."""
        full = HeadPolicy.full()
        pol = tuple(tuple(full if r else streaming for r in row) for row in retrieval)
        return cls(pol, q_per_kv, name, meta)

    def with_policy(self, layer: int, head: int, policy: HeadPolicy) -> HeadPlan:
        rows = [list(r) for r in self.policies]
        rows[layer][head] = policy
        return replace(self, policies=tuple(tuple(r) for r in rows))

    def renamed(self, name: str) -> HeadPlan:
        return replace(self, name=name)

    # ---- summaries -------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        return dict(Counter(p.kind for row in self.policies for p in row))

    def fraction(self, kind: str) -> float:
        return self.counts().get(kind, 0) / (self.num_layers * self.num_kv_heads)

    def kv_positions(self, seq_len: int) -> int:
        """Cached positions summed over layers and key/value heads after ``seq_len`` tokens."""
        return sum(p.kept(seq_len) for row in self.policies for p in row)

    def kv_ratio(self, seq_len: int) -> float:
        """Predicted KV-cache size relative to a dense cache at ``seq_len`` tokens."""
        return self.kv_positions(seq_len) / (seq_len * self.num_layers * self.num_kv_heads)

    def kv_bytes(self, seq_len: int, head_dim: int, batch: int = 1, dtype_bytes: int = 4) -> int:
        """Predicted KV-cache bytes (keys and values) at ``seq_len`` tokens."""
        return 2 * batch * head_dim * dtype_bytes * self.kv_positions(seq_len)

    def layer_pattern(self, layer: int) -> Pattern:
        """Prefill pattern of ``layer`` over its *query* heads: a ``PerHead`` (dropped heads see nothing
        but their own position, so the pattern stays defined; the engine zeroes their output)."""
        pats: list[Pattern] = []
        for p in self.policies[layer]:
            pat = p.pattern()
            pats.extend([pat if pat is not None else Causal() & SlidingWindow(1)] * self.q_per_kv)
        if all(type(p) is Causal for p in pats):
            return Causal()
        return PerHead(tuple(pats))

    def grid(self) -> str:
        """A printable ``layer x kv_head`` grid: F full, s stream, k snap, q topk, . dropped (each policy
        class has its ``symbol``)."""
        w = len(str(self.num_layers - 1))
        head = " " * (w + 2) + " ".join(str(h % 10) for h in range(self.num_kv_heads))
        lines = [f"{self.name}: {self.num_layers} layers x {self.num_kv_heads} kv heads ({self.q_per_kv} q/kv)",
                 head]
        for i, row in enumerate(self.policies):
            lines.append(f"L{i:<{w}} " + " ".join(p.symbol for p in row))
        labels = sorted({p.label() for row in self.policies for p in row})
        counts = self.counts()
        legend = ", ".join(f"{policy_class(k).symbol} {k}" for k in kinds())
        lines.append(f"legend: {legend} | " + ", ".join(labels))
        lines.append("counts: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
        return "\n".join(lines)

    # ---- JSON ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "attnlab.HeadPlan/1",
            "name": self.name,
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "q_per_kv": self.q_per_kv,
            "meta": dict(self.meta),
            "policies": [[p.as_dict() for p in row] for row in self.policies],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HeadPlan:
        if d.get("format") != "attnlab.HeadPlan/1":
            raise ValueError(f"not an attnlab head plan (format={d.get('format')!r})")
        pol = tuple(tuple(HeadPolicy.from_dict(p) for p in row) for row in d["policies"])
        plan = cls(pol, int(d.get("q_per_kv", 1)), d.get("name", "plan"), tuple(d.get("meta", {}).items()))
        if plan.num_layers != d["num_layers"] or plan.num_kv_heads != d["num_kv_heads"]:
            raise ValueError("plan JSON: num_layers / num_kv_heads disagree with the policy grid")
        return plan

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, default=_jsonable)

    @classmethod
    def from_json(cls, text: str) -> HeadPlan:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, path: str | Path) -> HeadPlan:
        return cls.from_json(Path(path).read_text())

    def check_model(self, num_layers: int, num_kv_heads: int, q_per_kv: int) -> None:
        if (self.num_layers, self.num_kv_heads, self.q_per_kv) != (num_layers, num_kv_heads, q_per_kv):
            raise ValueError(
                f"plan {self.name!r} is for {self.num_layers} layers x {self.num_kv_heads} kv heads "
                f"({self.q_per_kv} q/kv), the model has {num_layers} x {num_kv_heads} ({q_per_kv} q/kv)"
            )


def _jsonable(x: Any) -> Any:
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)


__all__ = ["HeadPlan", "HeadPolicy", "kinds"]
