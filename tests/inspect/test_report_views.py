"""The report's interpretability views (issue #16): pooling, the head view, the joint query-key embedding,
knockout / patching heatmaps, circuits, and the page itself in headless Chromium (renders, reacts to clicks,
shows token markup as text, exports PNGs)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_tiny import tiny  # noqa: E402
from test_atlas_report import CHROMIUM, _atlas, _chromium  # noqa: E402

from attnlab.inspect.causal import knockout_effect  # noqa: E402
from attnlab.inspect.causal_report import CausalAnalysis  # noqa: E402
from attnlab.inspect.views import (  # noqa: E402
    HeadViewBuilder,
    ViewConfig,
    build_views,
    causal_heatmaps,
    head_view,
    head_view_bytes_bound,
    pool_attention,
    qk_embedding,
)
from attnlab.models import hf  # noqa: E402

EVIL = "</script><script>window.__pwned=true</script>"
BOLD = "<b>x</b>"


def _causal_rows(T: int, H: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(H, T, T, generator=g, dtype=torch.float64)
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return s.softmax(-1)


def test_pool_attention_known_answer_and_row_sums():
    w = torch.tensor([[1.0, 0, 0, 0, 0], [0.5, 0.5, 0, 0, 0], [0.2, 0.2, 0.6, 0, 0], [0.1, 0.1, 0.1, 0.7, 0],
                      [0, 0, 0, 0.5, 0.5]], dtype=torch.float64)
    P = pool_attention(w, 2)  # bins floor(i * 2 / 5): tokens 0-2 | 3-4
    # bin 0 queries: rows 0..2 put (1, 1, 1) on keys 0-2; bin 1: rows 3, 4 put (0.3, 0) on 0-2, (0.7, 1) on 3-4
    ref = torch.tensor([[1.0, 0.0], [0.15, 0.85]], dtype=torch.float64)
    assert torch.allclose(P, ref)
    big = _causal_rows(37)
    Pb = pool_attention(big, 8)
    assert Pb.shape == (3, 8, 8) and torch.allclose(Pb.sum(-1), torch.ones(3, 8, dtype=torch.float64))
    assert torch.equal(pool_attention(big, 100), big)  # blocks >= T: nothing pooled
    with pytest.raises(ValueError, match="must be"):
        pool_attention(torch.zeros(3, 4), 2)
    with pytest.raises(ValueError, match="ViewConfig.blocks"):
        ViewConfig(blocks=0)


def test_head_view_from_chunks_equals_whole_map():
    T, cfg = 40, ViewConfig(blocks=8, zoom=6, max_zooms=2)
    w = _causal_rows(T)
    labels = [f"tok{i}" for i in range(T)]
    v = head_view(w, labels, heads=[0, 2], cfg=cfg, zooms=[(30, 0), (34, 34)], chunk=7)
    assert v["pooled"] and v["blocks"] == 8 and len(v["labels"]) == 8
    for hd, h in zip(v["heads"], (0, 2)):
        assert hd["overview"] == (pool_attention(w[h], 8) * 1000).round().int().tolist()
        assert hd["zooms"][0] == (w[h, 30:36, 0:6] * 1000).round().int().tolist()
        assert hd["zooms"][1] == (w[h, 34:40, 34:40] * 1000).round().int().tolist()
    assert v["zooms"][1]["qlabels"] == labels[34:40]
    short = head_view(w[:, :5, :5], labels[:5], heads=[1], cfg=cfg)  # T <= zoom: full resolution, no zooms
    assert not short["pooled"] and short["labels"] == labels[:5] and short["zooms"] == []
    with pytest.raises(ValueError, match="max_heads"):
        HeadViewBuilder(T, [(0, i) for i in range(7)])
    with pytest.raises(ValueError, match="does not fit"):
        HeadViewBuilder(T, [(0, 0)], cfg, zooms=[(36, 0)])
    b = HeadViewBuilder(T, [(0, 0)], cfg)
    b.add(0, w[:, :10], 0)
    with pytest.raises(ValueError, match="saw 10 of 40"):
        b.result(labels)


def _reference_embedding(q: np.ndarray, k: np.ndarray) -> np.ndarray:
    """PCA written independently: eigenvectors of the scatter matrix of the stacked, centred, scaled q / k."""
    qc, kc = q - q.mean(0), k - k.mean(0)
    s = np.sqrt(np.linalg.norm(kc, axis=1).mean() / np.linalg.norm(qc, axis=1).mean())
    X = np.vstack([qc * s, kc / s])
    evals, evecs = np.linalg.eigh(X.T @ X)
    return X @ evecs[:, ::-1][:, :2], evals[::-1][:2] / evals.sum()


def test_qk_embedding_equals_direct_svd_and_ignores_q_k_rescaling():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(30, 8, generator=g, dtype=torch.float64) * torch.linspace(0.5, 3, 8) + 2.0
    k = torch.randn(30, 8, generator=g, dtype=torch.float64) * 0.1 - 1.0
    xy, ex = qk_embedding(q, k)
    ref, ref_ex = _reference_embedding(q.numpy(), k.numpy())
    signs = np.sign((xy.numpy() * ref).sum(0))  # eigenvectors are defined up to sign
    assert np.allclose(xy.numpy(), ref * signs, atol=1e-9)
    assert np.allclose(ex.numpy(), ref_ex, atol=1e-12)
    # q -> c q, k -> k / c leaves every score q.k unchanged: the embedding must not move
    xy2, _ = qk_embedding(q * 7.0, k / 7.0)
    assert torch.allclose(xy, xy2, atol=1e-9)
    with pytest.raises(ValueError, match="both be"):
        qk_embedding(q, k[:, :4])


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return tiny("llama", max_position_embeddings=8300)


def test_build_views_matches_the_seam_and_knockout(model):
    T = 24
    ids = torch.randint(3, 97, (1, T), generator=torch.Generator().manual_seed(1))
    labels = [f"t{i}" for i in range(T)]
    cfg = ViewConfig(zoom=8, blocks=6)
    metric = lambda lg: float(lg[0, -1, 5] - lg[0, -1, 6])  # noqa: E731
    v = build_views(model, ids, labels, [(1, 3), (0, 0)], qk_head=(1, 3), circuits=False, cfg=cfg,
                    knockout=dict(metric=metric, rows=[T - 1], keys=[0, 5, 23], layers=[1]))
    _, cache = hf.run_with_cache(model, ids, ["blocks.*.attn.weights", "blocks.1.attn.q", "blocks.1.attn.k"],
                                 rows=(0, T))
    w1 = cache["blocks.1.attn.weights"][0, 3].double()
    assert v.head_view["heads"][0]["overview"] == (pool_attention(w1, 6) * 1000).round().int().tolist()
    # query head 3 reads kv head 1 (4 heads over 2 kv heads)
    q, k = cache["blocks.1.attn.q"][0, 3], cache["blocks.1.attn.k"][0, 1]
    xy, _ = qk_embedding(q, k)
    assert np.allclose(np.array(v.qk["q"]), xy[:T].numpy(), atol=1e-3)
    km = v.heatmaps["knockout"]
    for b, j in enumerate((0, 5, 23)):
        assert km["matrix"][0][b] == pytest.approx(knockout_effect(model, ids, [(1, None, [T - 1], [j])], metric),
                                                   abs=1e-4)
    assert km["xlabels"] == ["t0", "t5", "t23"]
    with pytest.raises(ValueError, match="outside"):
        build_views(model, ids, labels, [(2, 0)])
    with pytest.raises(ValueError, match="labels"):
        build_views(model, ids, labels[:-1], [(0, 0)])


def test_long_prompt_embeds_bounded_data(model):
    """8192 tokens: the head view is pooled as the weights stream by; its JSON stays under a fixed bound."""
    T, cfg = 8192, ViewConfig()
    ids = torch.randint(3, 97, (1, T), generator=torch.Generator().manual_seed(2))
    # both heads in layer 0: only that layer's weights are observed (the seam's chunked softmax dominates)
    v = build_views(model, ids, [f"w{i}" for i in range(T)], [(0, 1), (0, 2)], circuits=False, cfg=cfg)
    hv = v.head_view
    size = len(json.dumps(hv, separators=(",", ":")))
    assert size < head_view_bytes_bound(cfg, 2) < 200_000, size
    assert hv["pooled"] and hv["blocks"] == 64 and len(hv["labels"]) == 64 and hv["labels"][1] == "w128…[128-255]"
    ov = np.array(hv["heads"][0]["overview"])
    assert ov.shape == (64, 64) and np.abs(ov.sum(1) - 1000).max() <= 32  # rows keep their mass (rounding)
    assert np.triu(ov, 1).max() == 0  # causal: no query bin reads a later bin
    assert [z["q"] for z in hv["zooms"]] == [[T - 48, T], [T - 48, T]] and hv["zooms"][0]["k"] == [0, 48]
    assert len(v.qk["q"]) == cfg.max_points and v.json_bytes() < 300_000


def _analysis(L=2, H=4) -> CausalAnalysis:
    g = torch.Generator().manual_seed(0)
    comp = {kk: torch.rand(L, H, L, H, generator=g, dtype=torch.float64) for kk in "qkv"}
    return CausalAnalysis(model="toy", task="induction", tasks=[], clean_metric=1.0, corrupt_metric=0.0,
                          patch=torch.randn(L, H, generator=g, dtype=torch.float64),
                          dla=torch.randn(L, H, generator=g, dtype=torch.float64), composition=comp)


def test_causal_heatmaps_carry_the_analysis():
    a = _analysis()
    maps = causal_heatmaps(a)
    assert set(maps) == {"patch_z", "dla", "k_comp"}
    assert np.allclose(maps["patch_z"]["matrix"], a.patch.numpy(), atol=1e-4) and maps["patch_z"]["signed"]
    assert np.allclose(maps["k_comp"]["matrix"], a.composition["k"].amax((0, 1)).numpy(), atol=1e-4)


def test_circuit_view_layout(model):
    """Composition rows are writer heads, columns reader heads, flattened layer-major; spectra per head."""
    from attnlab.inspect.circuits import composition_scores, ov_circuit, qk_circuit
    from attnlab.inspect.views import circuit_view

    c = circuit_view(model)
    S = composition_scores(model)["k"]
    H = 4
    assert c["composition"]["k"][0 * H + 1][1 * H + 2] == round(float(S[0, 1, 1, 2]) * 1000)
    assert max(max(r) for r in c["composition"]["k"]) > 0 and c["composition"]["k"][H + 2][1] == 0  # l1 < l2 only
    full_qk, full_ov = qk_circuit(model, 1, 3).full(), ov_circuit(model, 1, 3).full()
    assert np.allclose(c["qk_sv"][1][3], torch.linalg.svdvals(full_qk)[:len(c["qk_sv"][1][3])].numpy(), atol=1e-3)
    assert np.allclose(c["ov_sv"][1][3], torch.linalg.svdvals(full_ov)[:len(c["ov_sv"][1][3])].numpy(), atol=1e-3)
    assert all(-1 <= x <= 1 for r in c["copying"] for x in r)


def _viewtest(html: Path) -> dict:
    dom = _chromium(html.as_uri() + "#viewtest", "--dump-dom")
    m = re.search(r'<pre id="viewtest">(.*?)</pre>', dom, re.S)
    assert m and m.group(1), dom[-2000:]
    return json.loads(m.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"').replace("&amp;", "&"))


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs headless Chromium at /usr/bin/chromium")
def test_views_in_headless_chromium(model, tmp_path):
    from attnlab.inspect.report import write_report

    T = 20
    ids = torch.randint(3, 97, (1, T), generator=torch.Generator().manual_seed(0))
    labels = [f"t{i}" for i in range(T)]
    labels[0], labels[T - 1] = EVIL, BOLD
    metric = lambda lg: float(lg[0, -1, 5] - lg[0, -1, 6])  # noqa: E731
    v = build_views(model, ids, labels, [(0, 1), (1, 2)], analysis=_analysis(),
                    knockout=dict(metric=metric, rows=[T - 1], keys=range(8)))
    paths = write_report(_atlas(), tmp_path / "r", views=v)
    for name in ("head_view", "heatmap_patch_z", "heatmap_dla", "heatmap_knockout", "circuits", "composition_k",
                 "qk_embedding"):
        assert paths[name].stat().st_size > 5000, name  # matplotlib PNG of every view
    html = paths["html"].read_text()
    assert "<b>x</b>" not in html and "<script>window.__pwned" not in html
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "") and "https://" not in html
    r = _viewtest(paths["html"])
    assert BOLD in r["hv_tokens"] and EVIL[:20] in r["hv_tokens"][0] and r["pwned"] is False
    full = 2 * T * (T + 1) // 2  # two causal heads, every weight above 0.01 at T = 20 drawn as a line
    assert 0.5 * full < r["hv_lines_before"] <= full
    assert 0 < r["hv_lines_pinned"] <= 2 * T < r["hv_lines_before"] == r["hv_lines_unpinned"]
    assert r["hv_lines_one_head_off"] < r["hv_lines_before"]
    assert set(r["canvases"]) >= {"patch_z", "dla", "knockout", "circ-copy", "circ-sv", "comp"}
    assert min(r["canvases"].values()) > 2  # every canvas view has ink in several colours
    assert r["hm_cap_before"] != r["hm_cap_after"] and r["hm_cap_after"].startswith("layer L1")
    assert (r["circ_before"], r["circ_after"]) == ("0.0", "1.3") and r["comp_before"] == "k" != r["comp_after"]
    assert r["qk_points"] == 2 * T and r["qk_cap_after"].startswith("query at 0: </script>")
    assert set(r["png"]) == {"head_view", "heatmap_patch_z", "heatmap_dla", "heatmap_k_comp", "heatmap_knockout",
                             "copying", "spectra", "composition", "qk_embedding"}
    for name, p in r["png"].items():
        assert p["state"] == "done" and p["head"] == "data:image/png;base64," and p["bytes"] > 1000, (name, p)
    # a URL hash selects a head of the grid
    dom = _chromium(paths["html"].as_uri() + "#head=1.2", "--dump-dom")
    assert re.search(r'<h2 id="detail-title">Layer 1, head 2', dom)
    shot = tmp_path / "shot.png"
    _chromium(paths["html"].as_uri(), f"--screenshot={shot}", "--window-size=1200,2400")
    import matplotlib.image as mpimg

    img = mpimg.imread(shot)
    assert float(img[1200:, :, :3].std()) > 0.02  # the views below the grids are not blank


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs headless Chromium at /usr/bin/chromium")
def test_long_prompt_zoom_in_chromium(tmp_path):
    from attnlab.inspect.report import write_report
    from attnlab.inspect.views import ReportViews

    T = 3000
    w = _causal_rows(T, H=1)
    labels = [f"p{i}" for i in range(T)]
    hv = head_view(w, labels, heads=[0], cfg=ViewConfig(blocks=32, zoom=16), zooms=[(100, 90)])
    paths = write_report(_atlas(), tmp_path / "long", views=ReportViews(head_view=hv), pngs=False)
    r = _viewtest(paths["html"])
    assert len(r["hv_tokens"]) == 64 and r["hv_tokens"][1].startswith("p94…")
    assert r["hv_zoom_tokens"][:16] == labels[100:116] and r["hv_zoom_tokens"][16:] == labels[90:106]
    assert r["hv_zoom_lines"] > 0 and "png" in r and r["png"]["head_view"]["state"] == "done"


def test_inspect_command_adds_the_views(tmp_path):
    """``attnlab inspect --views L.H,...``: the page carries the views, ``views.json`` holds the chosen heads;
    a malformed head list fails before the model loads, a head outside the model with a clear error."""
    import json

    from attnlab.cli import main

    out = tmp_path / "atlas"
    assert main(["inspect", "--model", "minilm", "--probe", "text", "--importance", "none", "--flow-tokens", "0",
                 "--max-tokens", "32", "--views", "0.0,1.2", "--no-png", "--out", str(out)]) == 0
    views = json.loads((out / "views.json").read_text())
    assert "0.0" in json.dumps(views) and "1.2" in json.dumps(views)
    assert "views" in (out / "report.html").read_text()
    assert main(["inspect", "--model", "minilm", "--probe", "text", "--views", "0", "--out",
                 str(tmp_path / "bad")]) == 2
    assert main(["inspect", "--model", "minilm", "--probe", "text", "--views", "99.0", "--importance", "none",
                 "--flow-tokens", "0", "--max-tokens", "16", "--no-png", "--out", str(tmp_path / "bad2")]) == 2
