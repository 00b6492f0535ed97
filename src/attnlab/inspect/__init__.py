"""Look inside real models: per-head metrics, a head atlas with roles, and an offline HTML report.

Entry points: ``build_atlas(model, tok, probes)`` -> ``HeadAtlas`` (save/load JSON, CSV, ``kv_scores()``),
``write_report(atlas, out_dir, compare=None)``, ``quick_atlas(out_dir)`` (SmolLM2 on the built-in probes),
and the ``attnlab inspect`` command. Causal tools (``causal``: activation and path patching, attention knockout,
direct logit attribution, logit lens) and weights-only circuits (``circuits``: QK/OV circuits, composition and
copying scores) run on the hook seam. Norm-based maps, collapse and massive activations (``norms``), episodic
lag-CRP measures (``episodic``) and BERT-style token-kind attention and head clustering (``encoder``) read the
same hook points. See docs/inspect.md.
"""

from __future__ import annotations

from pathlib import Path

from .atlas import HeadAtlas, RoleThresholds, assign_roles, build_atlas
from .attnrank import attnrank_eval, attnrank_order
from .causal import (
    activation_patching,
    attention_knockout,
    direct_logit_attribution,
    knockout_effect,
    logit_lens,
    path_patching,
    path_patching_logits,
    path_patching_senders,
)
from .circuit_cli import promote_suppress, run_circuit
from .circuits import composition_scores, copying_scores, ov_circuit, qk_circuit
from .encoder import classical_mds, encoder_analysis, js_distances
from .episodic import cmr_fit, episodic_scan, lag_crp
from .lens import AttentionLens, attention_lens_report
from .long_context import LongContextConfig, long_context_heads
from .metrics import MetricConfig, ProbeSpec, head_metrics
from .norms import collapse_by_layer, find_massive, massive_intervention, mixing_ratio, norm_maps
from .report import write_report
from .rope_usage import rope_usage
from .sad import sparse_attention_decomposition
from .sink_frame import FrameConfig, sink_frames
from .temporal import temporal_heads
from .views import ReportViews, ViewConfig, build_views


def quick_atlas(out_dir: str | Path, model: str = "smollm2", progress: bool = True) -> Path:
    """Atlas of an embedded model on the built-in probes, with its report; returns the report.html path.

    Uses gradient importance only (ablation runs one forward per head: ``attnlab inspect --importance both``).
    """
    from ..models.hf import load_model

    m, tok = load_model(model)
    if progress:
        from ..bench.common import progress as bar

        with bar(200, f"head atlas of {model}") as advance:
            atlas = build_atlas(m, tok, name=model, importance="gradient", progress=advance)
    else:
        atlas = build_atlas(m, tok, name=model, importance="gradient")
    return write_report(atlas, out_dir)["html"]


__all__ = ["HeadAtlas", "MetricConfig", "ProbeSpec", "RoleThresholds", "activation_patching", "assign_roles",
           "attention_knockout", "build_atlas", "classical_mds", "cmr_fit", "collapse_by_layer", "composition_scores",
           "copying_scores", "direct_logit_attribution", "encoder_analysis", "episodic_scan", "find_massive",
           "head_metrics", "js_distances", "knockout_effect", "lag_crp", "logit_lens", "massive_intervention",
           "mixing_ratio", "norm_maps", "ov_circuit", "path_patching", "path_patching_logits", "path_patching_senders", "qk_circuit", "quick_atlas", "write_report",
           "FrameConfig", "LongContextConfig", "attnrank_eval", "attnrank_order", "long_context_heads", "rope_usage",
           "sink_frames", "sparse_attention_decomposition", "temporal_heads", "ReportViews", "ViewConfig",
           "build_views", "AttentionLens", "attention_lens_report", "promote_suppress", "run_circuit"]
