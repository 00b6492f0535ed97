"""The head atlas: every metric for every head of a model, a role per head, maps for the report.

``build_atlas(model, tok, probes=...)`` runs the probes (one recorded forward pass each), the importance
measures and rollout / flow, and returns a ``HeadAtlas``. ``HeadAtlas.save/load`` round-trip JSON;
``to_csv`` writes one row per head; ``kv_scores()`` gives per (layer, kv_head) retrieval and streaming scores
for per-head plans (a key/value head can be streamed only if all its query heads can: streaming takes the
minimum over the group, retrieval the maximum).

Roles (first rule that holds, thresholds in ``RoleThresholds``): induction, retrieval, previous-token,
sink, local/streaming, else mixed.
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..models import hf
from .capture import record
from .flow import attention_flow, rollout
from .importance import ablation_importance, gradient_importance
from .metrics import MetricConfig, retrieval_score, sink_ratio
from .probes import Probe, build_probes

ROLES = ("induction", "retrieval", "previous-token", "sink", "local", "mixed")
# which probe each metric is read from (the first listed probe that ran)
SOURCES = {
    "sink": ("text",), "entropy": ("text",), "entropy_norm": ("text",), "distance": ("text",),
    "locality": ("text",), "streaming": ("text",), "prev_token": ("text",), "induction": ("induction",),
    "lookback": ("lookback",), "basin": ("basin",),
}


@dataclass(frozen=True)
class RoleThresholds:
    induction: float = 0.3
    retrieval: float = 0.4  # one needle of ~5 tokens: at least two copy-paste events
    prev_token: float = 0.5
    sink: float = 0.7
    local: float = 0.8  # streaming score (sink tokens + window)


def assign_roles(metrics: dict[str, Tensor], th: RoleThresholds = RoleThresholds()) -> list[list[str]]:
    """``(L, H)`` role names from the metrics (missing or NaN metrics never fire)."""
    some = next(iter(metrics.values()))
    L, H = some.shape

    def get(name):
        t = metrics.get(name)
        return None if t is None else t.nan_to_num(float("-inf"))

    rules = [("induction", "induction", th.induction), ("retrieval", "retrieval", th.retrieval),
             ("previous-token", "prev_token", th.prev_token), ("sink", "sink", th.sink),
             ("local", "streaming", th.local)]
    roles = [["mixed"] * H for _ in range(L)]
    for layer in range(L):
        for h in range(H):
            for role, name, t in rules:
                m = get(name)
                if m is not None and float(m[layer, h]) >= t:
                    roles[layer][h] = role
                    break
    return roles


def _clean(x):
    """JSON-safe: NaN/inf -> None, tensors -> lists, floats rounded."""
    if isinstance(x, Tensor):
        return _clean(x.tolist())
    if isinstance(x, float):
        return None if not math.isfinite(x) else round(x, 6)
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _tensor(x) -> Tensor:
    def fix(v):
        if isinstance(v, list):
            return [fix(u) for u in v]
        return float("nan") if v is None else v

    return torch.tensor(fix(x), dtype=torch.float64)


@dataclass
class HeadAtlas:
    """Per-head metrics ``(layers, heads)`` and roles of one model on one set of probes.

    ``metrics[name]``: nested lists ``(L, H)`` (None = not measured); ``layer_metrics[name]``: ``(L,)``;
    ``profile``: ``(L, H, bins)``; ``maps[probe]``: ``{"labels": [...], "weights": (L, H, n, n) per-mille
    ints}``; ``flow``: ``{"labels", "rollout" (T, T), "flow" (T,), "target"}``.
    """

    model: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    is_causal: bool
    metrics: dict[str, list] = field(default_factory=dict)
    roles: list[list[str]] = field(default_factory=list)
    layer_metrics: dict[str, list] = field(default_factory=dict)
    profile: list | None = None
    maps: dict[str, dict] = field(default_factory=dict)
    flow: dict | None = None
    probes: dict[str, dict] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    # ---- access -------------------------------------------------------------------------------------
    def metric(self, name: str) -> Tensor:
        """``(L, H)`` float64 tensor (NaN where not measured)."""
        if name not in self.metrics:
            raise KeyError(f"metric {name!r} not in this atlas; it has {sorted(self.metrics)}")
        return _tensor(self.metrics[name])

    def per_kv(self, name: str, reduce: str = "max") -> Tensor:
        """``(L, Hkv)``: the metric reduced over the query heads of each key/value group."""
        m = self.metric(name)
        g = self.num_heads // self.num_kv_heads
        grouped = m.view(self.num_layers, self.num_kv_heads, g)
        if reduce == "max":
            return grouped.max(-1).values
        if reduce == "min":
            return grouped.min(-1).values
        if reduce == "mean":
            return grouped.mean(-1)
        raise ValueError(f"reduce must be max, min or mean, got {reduce!r}")

    def kv_scores(self) -> dict[str, Tensor]:
        """Per (layer, kv_head) scores for per-head plans: ``retrieval`` (max over the group's query heads)
        and ``streaming`` (min over the group: a shared KV head streams only if all its heads can)."""
        out = {}
        if "retrieval" in self.metrics:
            out["retrieval"] = self.per_kv("retrieval", "max")
        out["streaming"] = self.per_kv("streaming", "min")
        return out

    def role_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(ROLES, 0)
        for row in self.roles:
            for r in row:
                counts[r] = counts.get(r, 0) + 1
        return counts

    # ---- persistence --------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return _clean(asdict(self))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), separators=(",", ":")))
        return path

    @classmethod
    def from_dict(cls, d: dict) -> HeadAtlas:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    @classmethod
    def load(cls, path: str | Path) -> HeadAtlas:
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read a head atlas from {path}: {e}") from e
        if "metrics" not in d or "num_layers" not in d:
            raise ValueError(f"{path} is not a head atlas (no metrics / num_layers)")
        return cls.from_dict(d)

    def to_csv(self, path: str | Path) -> Path:
        """One row per head: layer, head, kv_head, role, then every metric."""
        path = Path(path)
        names = sorted(self.metrics)
        g = self.num_heads // self.num_kv_heads
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["layer", "head", "kv_head", "role", *names])
            for layer in range(self.num_layers):
                for h in range(self.num_heads):
                    vals = [self.metrics[n][layer][h] for n in names]
                    w.writerow([layer, h, h // g, self.roles[layer][h],
                                *["" if v is None else f"{v:.6g}" for v in vals]])
        return path

    def compare(self, other: HeadAtlas) -> dict:
        """Summary of two atlases: mean per metric, role counts, and ``(L, H)`` differences if shapes match."""
        same = (self.num_layers, self.num_heads) == (other.num_layers, other.num_heads)
        out: dict = {"a": self.model, "b": other.model, "same_shape": same, "metrics": {}}
        for name in sorted(set(self.metrics) & set(other.metrics)):
            a, b = self.metric(name), other.metric(name)
            entry = {"mean_a": float(a.nanmean()), "mean_b": float(b.nanmean())}
            if same:
                entry["diff"] = (b - a).tolist()
                entry["max_abs_diff"] = float((b - a).abs().nan_to_num(0).max())
            out["metrics"][name] = entry
        out["roles_a"], out["roles_b"] = self.role_counts(), other.role_counts()
        if same:
            out["role_changes"] = sum(ra != rb for xa, xb in zip(self.roles, other.roles) for ra, rb in zip(xa, xb))
        return _clean(out)


# ---------------------------------------------------------------------------------------------------------
# building
# ---------------------------------------------------------------------------------------------------------
def _quantize_maps(stats, L: int) -> list:
    # (L, H, n, n) per-mille integers: compact in JSON and plenty for a colour map
    return [(stats[layer].attention_map() * 1000).round().to(torch.int32).tolist() for layer in range(L)]


def _pooled_labels(labels: tuple[str, ...], nb: int) -> list[str]:
    T = len(labels)
    if nb == T:
        return list(labels)
    out = []
    for b in range(nb):
        lo, hi = -(-b * T // nb), -(-(b + 1) * T // nb) - 1
        out.append(f"{labels[lo].strip() or '·'}…[{lo}-{hi}]")
    return out


def build_atlas(
    model: nn.Module, tok, probes: list[str] | None = None, name: str = "model", text: str | None = None,
    cfg: MetricConfig | None = None, importance: str = "both", flow_tokens: int = 12, max_tokens: int | None = None,
    importance_tokens: int = 48, progress=None, seed: int = 0, thresholds: RoleThresholds = RoleThresholds(),
) -> HeadAtlas:
    """Run the probes on ``model`` and collect every head metric into a ``HeadAtlas``.

    Args:
        probes: names from ``attnlab.inspect.probes.PROBES`` (default: all that apply to the model).
        text: replaces the built-in text probe's paragraph (e.g. a long document).
        importance: ``"both"``, ``"gradient"``, ``"ablation"`` or ``"none"``.
        flow_tokens: attention flow on the first that many tokens of the text probe (0: skip).
        max_tokens: truncate the text probe.
        progress: a callable ``progress(label)`` called after each unit of work (layers, probes).
    """
    t0 = time.perf_counter()
    cfg = cfg or MetricConfig()
    g = hf.geometry(model)
    probes = list(probes or ["text", "induction", "retrieval", "basin", "lookback"])
    if "text" not in probes:
        probes.insert(0, "text")  # the base metrics (sink, entropy, locality) come from it
    tick = progress or (lambda label=None: None)
    plist: list[Probe] = build_probes(probes, model, tok, g.is_causal, text, max_tokens, seed)
    L, H = g.num_layers, g.num_heads
    nan = torch.full((L, H), float("nan"), dtype=torch.float64)
    metrics: dict[str, Tensor] = {}
    atlas = HeadAtlas(name, L, H, g.num_kv_heads, g.is_causal)
    text_stats = None
    for p in plist:
        cap = record(model, p.input_ids, cfg, p.spec, on_layer=lambda i, p=p: tick(f"{p.name}: layer {i + 1}/{L}"),
                     logits_rows=p.logits_rows)
        per_layer = [cap.stats[layer].finalize() for layer in range(L)]
        for mname, sources in SOURCES.items():
            if p.name in sources and mname not in metrics:
                metrics[mname] = torch.stack([per_layer[layer][mname] for layer in range(L)])
        if p.name == "retrieval" and cap.predicted is not None and len(p.answer_rows):
            metrics["retrieval"] = torch.stack([
                retrieval_score(cap.stats[layer].argmax, p.answer_rows, p.needle_pos, p.input_ids[0],
                                cap.predicted) for layer in range(L)])
        if p.name == "basin":
            profs = [cap.stats[layer].profile() for layer in range(L)]
            if all(x is not None for x in profs):
                atlas.profile = torch.stack(profs).tolist()
        if p.name == "text":
            text_stats = cap.stats
            atlas.layer_metrics = {
                k: [cap.massive[layer][k] for layer in range(L)] for k in ("max_abs", "median_abs", "ratio", "count")
            }
            atlas.layer_metrics["massive_token"] = [cap.massive[layer]["token"] for layer in range(L)]
            atlas.layer_metrics["massive_dim"] = [cap.massive[layer]["dim"] for layer in range(L)]
        nb = cap.stats[0].nb
        atlas.maps[p.name] = {"labels": _pooled_labels(p.labels, nb), "weights": _quantize_maps(cap.stats, L)}
        atlas.probes[p.name] = {"tokens": p.length, **p.info}
        tick(f"{p.name} done")
    for mname in (*SOURCES, "retrieval"):
        metrics.setdefault(mname, nan.clone())
    text_probe = next(p for p in plist if p.name == "text")
    ids = text_probe.input_ids
    if importance in ("both", "ablation"):
        metrics["ablation"] = ablation_importance(model, ids[:, :importance_tokens],
                                                  on_batch=lambda: tick("head ablation"))
    if importance in ("both", "gradient"):
        metrics["grad_importance"] = gradient_importance(model, ids[:, :importance_tokens])
        tick("gradient importance")
    if flow_tokens and text_stats is not None:
        n = min(flow_tokens, ids.shape[1])
        if text_stats[0].mean_map is not None and n > 1:
            short = record(model, ids[:, :n], cfg).stats
            maps = torch.stack([short[layer].mean_map for layer in range(L)])
            target = n - 1 if g.is_causal else 0
            atlas.flow = {"labels": list(text_probe.labels[:n]), "rollout": rollout(maps).tolist(),
                          "flow": attention_flow(maps, target).tolist(), "target": target}
            tick("attention flow")
    atlas.metrics = {k: v.tolist() for k, v in metrics.items()}
    atlas.roles = assign_roles(metrics, thresholds)
    atlas.meta = {"seconds": round(time.perf_counter() - t0, 2), "config": asdict(cfg),
                  "thresholds": asdict(thresholds), "kv_group": g.group, "head_dim": g.head_dim,
                  # A262's model-level Sink^eps: the share of heads whose sink score reaches eps
                  "eps": cfg.eps, "sink_ratio": sink_ratio(metrics["sink"], cfg.eps)}
    return atlas
