"""`attnlab inspect` on Gemma 3: the recorder sees the local layers' window, the atlas builds on a tiny random
Gemma 3 (sliding, full, sliding; window 4; 4 query heads over one key/value head), the CLI's --plan keeps the
model's window, and the embedded Gemma 3 270M gets an atlas from a short text."""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from attnlab.cli import main
from attnlab.inspect.atlas import HeadAtlas, build_atlas
from attnlab.inspect.capture import record
from attnlab.inspect.metrics import MetricConfig
from attnlab.inspect.probes import retrieval_probe
from attnlab.models import hf

WINDOW = 4
TYPES = ("sliding_attention", "full_attention", "sliding_attention")


def tiny_gemma3(vocab: int) -> Gemma3ForCausalLM:
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=32,
                           sliding_window=WINDOW, layer_types=list(TYPES), max_position_embeddings=2048,
                           attn_implementation="sdpa")
    return Gemma3ForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def g3(gtok):
    return tiny_gemma3(len(gtok)), gtok


def _eager(model, ids):
    """Independent weights: transformers' eager Gemma 3 attention with output_attentions, (L, H, T, T)."""
    prev = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return torch.stack([a[0] for a in model(input_ids=ids, output_attentions=True).attentions]).double()
    finally:
        model.set_attn_implementation(prev)


def test_recorded_metrics_follow_the_local_window():
    """Metrics recorded through the seam equal float64 formulas over transformers' eager weights, with the
    visible keys of a local layer capped at the window (entropy_norm divides by log(min(i + 1, W)))."""
    model = tiny_gemma3(97)
    T = 24
    ids = torch.randint(0, 97, (1, T), generator=torch.Generator().manual_seed(2))
    A = _eager(model, ids)  # (3, 4, T, T)
    cap = record(model, ids, MetricConfig(chunk=5, window=16, sink_tokens=1))
    i = torch.arange(T, dtype=torch.float64)
    for layer in range(3):
        w = A[layer]
        vis = (i + 1).clamp(max=WINDOW) if TYPES[layer] == "sliding_attention" else i + 1
        if TYPES[layer] == "sliding_attention":  # the eager weights do obey the window
            assert float(w[:, WINDOW:, 0].abs().max()) == 0.0
        sink = w[:, :, 0].mean(-1)
        prev = torch.stack([w[:, r, r - 1] for r in range(1, T)], -1).mean(-1)
        ent = -(w * w.clamp_min(1e-30).log()).sum(-1)  # (H, T)
        many = vis > 1
        ent_norm = (ent[:, many] / vis[many].log()).mean(-1)
        got = cap.stats[layer].finalize()
        assert torch.allclose(got["sink"], sink, atol=1e-5), layer
        assert torch.allclose(got["prev_token"], prev, atol=1e-5), layer
        assert torch.allclose(got["entropy_norm"], ent_norm, atol=1e-4), layer
        if TYPES[layer] == "sliding_attention":  # every key a local row sees is within the metric window
            assert torch.allclose(got["locality"], torch.ones(4, dtype=torch.float64), atol=1e-5)


def test_retrieval_probe_keeps_logits_from_the_first_answer_row(g3):
    model, tok = g3
    p = retrieval_probe(tok)
    first = int(p.answer_rows.min())
    assert p.logits_rows == p.length - first < p.length
    trimmed = record(model, p.input_ids, logits_rows=p.logits_rows).predicted
    every = record(model, p.input_ids, logits_rows=0).predicted
    assert bool((trimmed[:first] == -1).all())
    assert torch.equal(trimmed[first:], every[first:])


def test_atlas_on_tiny_gemma3(g3, tmp_path):
    model, tok = g3
    atlas = build_atlas(model, tok, name="tiny-gemma3", importance="both", flow_tokens=8, max_tokens=64)
    assert (atlas.num_layers, atlas.num_heads, atlas.num_kv_heads) == (3, 4, 1)
    for name in ("sink", "prev_token", "induction", "streaming", "entropy_norm", "retrieval", "ablation",
                 "grad_importance"):
        m = atlas.metric(name)
        assert m.shape == (3, 4) and bool(torch.isfinite(m).all()), name
    kv = atlas.kv_scores()
    assert kv["retrieval"].shape == (3, 1) and kv["streaming"].shape == (3, 1)
    assert atlas.flow is not None and len(atlas.flow["flow"]) == 8
    loaded = HeadAtlas.load(atlas.save(tmp_path / "atlas.json"))
    assert loaded.roles == atlas.roles

    from attnlab.plans import sources

    plan = sources.from_atlas(loaded, full_fraction=1.0, model=model)
    assert [[p.label() for p in row] for row in plan.policies] == [["stream(0+4)"], ["full"], ["stream(0+4)"]]


def test_inspect_cli_plan_keeps_the_local_window(g3, tmp_path):
    """`attnlab inspect --model <folder> --plan all-stream.json` on a saved tiny Gemma 3: the plan recorded is
    the windowed one (local layers: stream(0+4)), and a streaming plan with the metrics' own window gives the
    full layer a streaming share of 1."""
    from attnlab.plans.plan import HeadPlan, HeadPolicy

    model, tok = g3
    folder = tmp_path / "tiny-gemma3"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    plan = HeadPlan.uniform(3, 1, HeadPolicy.stream(4, 16), 4, name="all-stream").save(tmp_path / "plan.json")
    args = ["inspect", "--model", str(folder), "--probe", "text", "--importance", "none", "--max-tokens", "48",
            "--flow-tokens", "0", "--window", "16", "--no-png", "--out", str(tmp_path / "out"), "--plan", str(plan)]
    assert main(args) == 0
    atlas = HeadAtlas.load(tmp_path / "out" / "atlas.json")
    recorded = atlas.meta["plan"]["policies"]
    assert [row[0]["window"] for row in recorded] == [WINDOW, 16, WINDOW]
    assert [row[0]["sinks"] for row in recorded] == [0, 4, 0]
    assert torch.allclose(atlas.metric("streaming")[1], torch.ones(4, dtype=torch.float64), atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# the real Gemma 3 270M
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gemma3():
    return hf.load_model("gemma3")


@pytest.mark.slow
def test_real_gemma3_atlas(gemma3):
    """Gemma 3 270M on the built-in text, induction and retrieval probes (< 200 tokens each): every head is
    measured (the lm head keeps only the rows the probes read) and induction heads exist."""
    model, tok = gemma3
    atlas = build_atlas(model, tok, probes=["text", "induction", "retrieval"], name="gemma3", importance="none",
                        flow_tokens=0)
    assert (atlas.num_layers, atlas.num_heads, atlas.num_kv_heads) == (18, 4, 1)
    for name in ("sink", "prev_token", "induction", "streaming", "entropy_norm", "retrieval"):
        assert bool(torch.isfinite(atlas.metric(name)).all()), name
    assert float(atlas.metric("induction").max()) > 0.3
    assert float(atlas.metric("retrieval").max()) >= 0.6  # heads copying the needle (1.0 on the full layers)
    assert atlas.probes["retrieval"]["answer_rows"] > 0
