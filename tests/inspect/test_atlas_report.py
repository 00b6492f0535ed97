"""HeadAtlas (roles, per-KV scores, JSON/CSV, compare), atlases of the real models, the CLI and the HTML
report in a real headless Chromium."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from attnlab.cli import main
from attnlab.inspect.atlas import HeadAtlas, RoleThresholds, assign_roles, build_atlas
from attnlab.inspect.metrics import MetricConfig
from attnlab.inspect.report import embed_json, write_report

CHROMIUM = "/usr/bin/chromium"
EVIL = "<script>window.__pwned=true</script><img src=x onerror=\"window.__pwned=true\">"


def _atlas(L=2, H=4, Hkv=2, seed=0) -> HeadAtlas:
    g = torch.Generator().manual_seed(seed)
    metrics = {n: torch.rand(L, H, generator=g, dtype=torch.float64) for n in ("sink", "streaming", "retrieval")}
    metrics["induction"] = torch.full((L, H), float("nan"), dtype=torch.float64)
    a = HeadAtlas("toy", L, H, Hkv, True, metrics={k: v.tolist() for k, v in metrics.items()},
                  roles=assign_roles(metrics))
    return a


def test_roles_follow_thresholds():
    m = {k: torch.zeros(1, 6, dtype=torch.float64) for k in
         ("induction", "retrieval", "prev_token", "sink", "streaming")}
    m["induction"][0, 0] = 0.5
    m["retrieval"][0, 0] = 0.9  # induction wins: listed first
    m["retrieval"][0, 1] = 0.6
    m["prev_token"][0, 2] = 0.7
    m["sink"][0, 3] = 0.95
    m["streaming"][0, 3] = 0.99
    m["streaming"][0, 4] = 0.9
    m["induction"][0, 5] = float("nan")  # not measured: never fires
    assert assign_roles(m, RoleThresholds())[0] == ["induction", "retrieval", "previous-token", "sink", "local",
                                                     "mixed"]


def test_kv_scores_save_load_csv_compare(tmp_path):
    a = _atlas()
    kv = a.kv_scores()
    r, s = a.metric("retrieval"), a.metric("streaming")
    assert torch.equal(kv["retrieval"], torch.stack([r[:, 0:2].max(1).values, r[:, 2:4].max(1).values], 1))
    assert torch.equal(kv["streaming"], torch.stack([s[:, 0:2].min(1).values, s[:, 2:4].min(1).values], 1))
    b = HeadAtlas.load(a.save(tmp_path / "a.json"))
    assert torch.allclose(b.metric("sink"), a.metric("sink"), atol=1e-6)
    assert torch.isnan(b.metric("induction")).all() and b.roles == a.roles
    rows = (tmp_path / "a.csv").open().read().splitlines() if a.to_csv(tmp_path / "a.csv") else []
    assert len(rows) == 1 + 2 * 4 and rows[0].startswith("layer,head,kv_head,role")
    c = a.compare(_atlas(seed=1))
    assert c["same_shape"] and c["metrics"]["sink"]["max_abs_diff"] > 0
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a head atlas"):
        HeadAtlas.load(tmp_path / "bad.json")


def test_embed_json_cannot_close_the_script():
    s = embed_json({"t": "</script><script>alert(1)</script> & <!--"})
    assert "<" not in s and ">" not in s and "&" not in s
    assert json.loads(s)["t"].startswith("</script>")


def test_smollm2_atlas_finds_known_head_types(smollm2):
    model, tok = smollm2
    atlas = build_atlas(model, tok, ["text", "induction", "retrieval"], name="smollm2", max_tokens=48,
                        importance="gradient", flow_tokens=6, importance_tokens=16, cfg=MetricConfig(window=8))
    assert (atlas.num_layers, atlas.num_heads, atlas.num_kv_heads) == (30, 9, 3)
    sink, ind, prev = atlas.metric("sink"), atlas.metric("induction"), atlas.metric("prev_token")
    assert float(sink.max()) > 0.9  # attention sinks on the first token
    assert float(ind.max()) > 0.5 and float(ind.median()) < 0.2  # a few induction heads, not all
    assert float(prev.max()) > 0.5
    assert "induction" in {r for row in atlas.roles for r in row}
    kv = atlas.kv_scores()
    assert kv["retrieval"].shape == (30, 3) and kv["streaming"].shape == (30, 3)
    assert float(kv["retrieval"].max()) > 0  # some head copies the needle
    assert torch.isnan(atlas.metric("lookback")).all()  # lookback probe not run
    f = atlas.flow
    assert len(f["flow"]) == 6 and abs(sum(f["rollout"][5]) - 1) < 1e-6
    assert all(math.isfinite(x) for x in atlas.metrics["grad_importance"][0])
    # Sink^eps (A262): the share of the 270 heads whose mean first-token weight exceeds eps, counted here
    above = sum(1 for row in atlas.metrics["sink"] for a in row if a > atlas.meta["eps"])
    assert atlas.meta["sink_ratio"] == pytest.approx(above / 270) and 0 < above < 270


def _chromium(url: str, *extra: str) -> str:
    with tempfile.TemporaryDirectory() as prof:
        res = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={prof}", "--virtual-time-budget=5000", *extra, url],
            capture_output=True, text=True, timeout=90,
        )
    return res.stdout


@pytest.fixture(scope="module")
def minilm_reports(tmp_path_factory, minilm):
    """Two MiniLM atlases through the CLI (the second compares with the first, on text containing HTML)."""
    root = tmp_path_factory.mktemp("inspect")
    a, b = root / "a", root / "b"
    assert main(["inspect", "--model", "minilm", "--out", str(a), "--importance", "both", "--flow-tokens", "5"]) == 0
    text = f"The cat sat on the mat. {EVIL} The dog slept by the door."
    assert main(["inspect", "--model", "minilm", "--out", str(b), "--text", text, "--probe", "sinks,induction",
                 "--compare", str(a / "atlas.json"), "--importance", "none"]) == 0
    return a, b


def test_cli_writes_atlas_csv_html_pngs(minilm_reports):
    a, b = minilm_reports
    for d in (a, b):
        for name in ("atlas.json", "atlas.csv", "report.html", "roles.png", "grid_sink.png", "depth.png"):
            assert (d / name).stat().st_size > 0, (d, name)
    atlas = HeadAtlas.load(a / "atlas.json")
    assert (atlas.num_layers, atlas.num_heads, atlas.is_causal) == (6, 12, False)
    assert torch.isfinite(atlas.metric("ablation")).all() and float(atlas.metric("ablation").max()) > 0
    assert torch.isnan(atlas.metric("grad_importance")).all()  # no LM head: not defined
    assert torch.isnan(atlas.metric("retrieval")).all()  # needs a causal LM
    assert (b / "compare.png").exists()
    html = (b / "report.html").read_text()
    assert "<script>window.__pwned" not in html and "<img src=x" not in html
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "") and "https://" not in html


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs headless Chromium at /usr/bin/chromium")
def test_report_in_headless_chromium(minilm_reports, tmp_path):
    a_dir, b_dir = minilm_reports
    # tokenizers split markup into pieces; put whole tags into labels to test the renderer itself
    atlas = HeadAtlas.load(b_dir / "atlas.json")
    labels = atlas.maps["text"]["labels"]
    labels[1] = "<script>window.__pwned=true</script>"
    labels[2] = '<img src=x onerror="window.__pwned=true">'
    b = tmp_path / "evil"
    write_report(atlas, b, HeadAtlas.load(a_dir / "atlas.json"), pngs=False)
    dom = _chromium((b / "report.html").as_uri() + "#selftest", "--dump-dom")
    m = re.search(r'<pre id="selftest">(.*?)</pre>', dom, re.S)
    assert m and m.group(1), dom[-2000:]
    res = json.loads(m.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"').replace("&amp;", "&"))
    assert res["cells"] == 6 * 12
    assert res["title_before"] != res["title_after"] and res["title_after"].startswith("Layer 1, head 1")
    assert res["map_before"] == 0 and res["map_after"] > 100  # the click drew the head's attention map
    assert "<script>window._" in res["labels"]  # shown as text (labels are cut to 16 characters)...
    assert "<img src=x onerr" in res["labels"]
    assert res["pwned"] is False  # ...never executed
    assert res["script_tags"] == 4  # the page's own: atlas data, compare data, colours, code
    assert res["compare"] and res["diff_cells"] == 6 * 12 and res["fills"] > 5
    shot = tmp_path / "shot.png"
    _chromium((b / "report.html").as_uri(), f"--screenshot={shot}", "--window-size=1200,900")
    import matplotlib.image as mpimg

    img = mpimg.imread(shot)
    assert img.shape[0] > 100 and float(img[..., :3].std()) > 0.02  # not a blank page


@pytest.mark.skipif(shutil.which("attnlab") is None, reason="the attnlab script is installed with the package")
def test_cli_help_lists_inspect():
    out = subprocess.run(["attnlab", "inspect", "--help"], capture_output=True, text=True, timeout=60).stdout
    assert "--compare" in out and "--probe" in out


def test_cli_atlas_under_a_plan(smollm2, tmp_path):
    """`attnlab inspect --plan`: the atlas is the plan's. An all-stream plan whose sinks and window are the
    metrics' own gives every head a streaming share of exactly 1; the plain model's heads read further."""
    from attnlab.models.hf import ModelGeometry
    from attnlab.plans import sources

    plan = sources.uniform(smollm2[0], "stream", sinks=4, window=16).save(tmp_path / "plan.json")
    common = ["inspect", "--model", "smollm2", "--probe", "text", "--importance", "none", "--max-tokens", "48",
              "--flow-tokens", "0", "--window", "16", "--no-png"]
    assert main([*common, "--out", str(tmp_path / "plan"), "--plan", str(plan)]) == 0
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    under, plain = (HeadAtlas.load(tmp_path / d / "atlas.json") for d in ("plan", "plain"))
    assert torch.allclose(under.metric("streaming"), torch.ones(30, 9, dtype=torch.float64), atol=1e-5)
    assert float(plain.metric("streaming").min()) < 0.9
    assert under.meta["plan"]["name"] == "all-stream(4+16)" and "plan" not in plain.meta
    bad = sources.uniform(ModelGeometry(2, 4, 2, 8, True), "full").save(tmp_path / "bad.json")
    assert main([*common, "--out", str(tmp_path / "bad"), "--plan", str(bad)]) == 2
