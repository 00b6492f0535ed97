"""Issue #19 vision training pieces: V89 DCAL (uncertainty-weighted multi-task loss, PWCA, inference), V3
PredFormer (the bouncing-squares generator, window structure of each layout, a training step), V292's
token-aware average pooling and V59 TiC's multi-directional cyclic shift."""

from __future__ import annotations

import math

import pytest
import torch

from attnlab.mechanisms.heads import HeadsConfig
from attnlab.testing import grads, max_err
from attnlab.vision import build_vit
from attnlab.vision.registry import MixerContext, build_mixer

IMG = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
LABELS = torch.tensor([0, 1, 2, 1])


def dcal(pooling: str = "mean", **kw):
    from attnlab.vision.dcal import DCALConfig, DCALViT

    torch.manual_seed(1)
    vit = build_vit(image_size=8, patch=2, dim=16, heads=2, depth=2, classes=3, pooling=pooling)
    return DCALViT(vit, DCALConfig(**kw)).double()


# ---- V89 DCAL --------------------------------------------------------------------------------------------
def test_uncertainty_weighting_matches_its_formula():
    from attnlab.vision.dcal import uncertainty_weighted_loss

    losses, w = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([0.0, math.log(2.0), -1.0])
    want = 0.5 * ((1.0 + 0.0) + (2.0 / 2.0 + math.log(2.0)) + (0.5 * math.e - 1.0))
    assert math.isclose(float(uncertainty_weighted_loss(losses, w)), want, rel_tol=1e-6)
    # the optimum of each log-variance is w_i = log L_i: the gradient there vanishes
    w_opt = losses.log().requires_grad_(True)
    uncertainty_weighted_loss(losses, w_opt).backward()
    assert w_opt.grad.abs().max() < 1e-6
    with pytest.raises(ValueError, match="log_vars"):
        uncertainty_weighted_loss(losses, torch.zeros(2))


def test_dcal_total_is_the_weighted_branches_and_trains_every_branch():
    m = dcal()
    with torch.no_grad():
        m.log_vars.copy_(torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64))
    out = m.losses(IMG, LABELS)
    parts = torch.stack([out["sa"], out["glca"], out["pwca"]])
    want = 0.5 * (torch.exp(-m.log_vars) * parts + m.log_vars).sum()
    assert torch.allclose(out["total"], want)
    out["total"].backward()
    for name in ("glca_block.mixer.q_proj.weight", "glca_head.weight", "log_vars",
                 "vit.blocks.0.mixer.q_proj.weight"):
        assert dict(m.named_parameters())[name].grad.abs().sum() > 0, name
    assert m.top == math.ceil(0.1 * 16)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_pwca_with_the_image_as_distractor_is_self_attention(pooling):
    m = dcal(pooling)
    sa = m.sa(IMG)[0]
    assert torch.allclose(m.pwca(IMG, IMG), sa, atol=1e-12)
    assert torch.allclose(sa, m.vit(IMG), atol=1e-12)  # the SA branch is the ViT
    assert not torch.allclose(m.pwca(IMG, IMG.roll(1, 0)), sa, atol=1e-6)


def test_dcal_inference_is_sa_plus_glca_and_never_runs_pwca(monkeypatch):
    import attnlab.vision.dcal as mod

    m = dcal()
    sa, rollout, last = m.sa(IMG)
    want = sa.softmax(-1) + m.glca(last, rollout).softmax(-1)

    def boom(*a, **k):
        raise AssertionError("PWCA ran at inference")

    monkeypatch.setattr(mod, "pair_cross_attention", boom)
    assert torch.allclose(m(IMG), want, atol=1e-14)
    assert torch.allclose(m(IMG).sum(-1), torch.full((4,), 2.0, dtype=torch.float64))
    with pytest.raises(AssertionError, match="PWCA"):
        m.losses(IMG, LABELS)
    assert "pwca" not in dcal(pwca=False).losses(IMG, LABELS)


def test_glca_branch_uses_the_rollout_top_tokens():
    m = dcal(top_ratio=0.25)
    _, rollout, last = m.sa(IMG)
    scores = rollout.mean(1)
    idx = scores.topk(m.top, -1).indices
    b = m.glca_block
    # by hand: the selected rows of a full self-attention of the GLCA block, then residual, MLP, norm, mean
    full = b.mixer(b.norm1(last))
    x = last.gather(1, idx[..., None].expand(-1, -1, 16)) + full.gather(1, idx[..., None].expand(-1, -1, 16))
    x = x + b.mlp(b.norm2(x))
    assert torch.allclose(m.glca(last, rollout), m.glca_head(m.glca_norm(x).mean(1)), atol=1e-12)
    with pytest.raises(ValueError, match="top_ratio"):
        dcal(top_ratio=0.0)


# ---- V3 PredFormer ---------------------------------------------------------------------------------------
def test_bounce_and_generator_known_motion():
    from attnlab.vision.data import VideoTask, bounce

    assert bounce(0, -1, 3, 4) == ([0, 1, 2], 1)
    assert bounce(3, 1, 5, 4) == ([3, 4, 3, 2, 1], -1)
    task = VideoTask(size=8, frames=3, squares=1, side=2)
    x, y = task.sample(5, torch.Generator().manual_seed(2))
    video = torch.cat([x, y], 1)[:, :, 0]  # (5, 6, 8, 8)
    assert x.shape == y.shape == (5, 3, 1, 8, 8)
    assert torch.all(video.sum((-1, -2)) == 4)  # one 2 x 2 square per frame
    for clip in video:
        tops = [tuple(int(v) for v in f.nonzero().min(0).values) for f in clip]
        steps = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(tops, tops[1:])]
        assert all(abs(dr) == 1 and abs(dc) == 1 for dr, dc in steps)  # diagonal, one pixel a frame
        for axis in (0, 1):  # each coordinate follows the reflected walk from its first two positions
            want, _ = bounce(tops[0][axis], steps[0][axis], 6, 6)
            assert [t[axis] for t in tops] == want
    with pytest.raises(ValueError, match="side"):
        VideoTask(size=4, side=3)


def _predformer(layout: str, depth: int = 4):
    from attnlab.vision.predformer import PredFormer, PredFormerConfig

    torch.manual_seed(0)
    cfg = PredFormerConfig(frames=3, image_size=8, patch=4, attn=HeadsConfig(dim=16, heads=2, causal=False),
                           depth=depth, layout=layout)
    return PredFormer(cfg).double()


@pytest.mark.parametrize("layout", ["full", "factorized", "interleaved"])
def test_each_layout_block_respects_its_window(layout):
    m = _predformer(layout)
    t, h, w = m.cfg.grid
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # every weight non-zero (a zero-initialized output projection would hide mixing)
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    x = torch.randn(2, t * h * w, 16, generator=g, dtype=torch.float64)
    y = x.clone()
    y[:, 1 * h * w + 2] += torch.randn(16, generator=g, dtype=torch.float64)  # frame 1, position 2 (a random
    # direction: a constant shift of all channels would vanish in the block's LayerNorm)
    frame, pos = torch.arange(t * h * w) // (h * w), torch.arange(t * h * w) % (h * w)
    reach = {"spatial": (frame == 1) | (torch.arange(t * h * w) == h * w + 2),
             "temporal": pos == 2, "full": torch.ones(t * h * w, dtype=torch.bool)}
    assert m.kinds == {"full": ("full",) * 4, "factorized": ("temporal",) * 2 + ("spatial",) * 2,
                       "interleaved": ("temporal", "spatial", "spatial", "temporal")}[layout]
    for kind, block in zip(m.kinds, m.blocks):
        changed = (block(y) - block(x)).abs().amax(dim=(0, 2)) > 1e-12
        assert torch.equal(changed, reach[kind]), kind


def test_predformer_patches_round_trip_and_one_step_reduces_loss():
    from attnlab.vision.data import VideoTask

    m = _predformer("interleaved").float()
    v = torch.randn(2, 3, 1, 8, 8)
    assert torch.equal(m.unpatchify(m.patchify(v)), v)
    x, y = VideoTask(size=8, frames=3, squares=1).sample(8, torch.Generator().manual_seed(4))
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    before = torch.nn.functional.mse_loss(m(x), y)
    before.backward()
    opt.step()
    with torch.no_grad():
        assert torch.nn.functional.mse_loss(m(x), y) < before
    with pytest.raises(ValueError, match="video must be"):
        m(torch.zeros(1, 2, 1, 8, 8))


# ---- V292 TAP --------------------------------------------------------------------------------------------
def _ctx(dim=12, grid=(4, 6)):
    return MixerContext(HeadsConfig(dim=dim, heads=2, causal=False), grid)


def test_tap_reference_gradients_and_known_answers():
    m = build_mixer("tap", _ctx(), branches=3).double()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    x = torch.randn(2, 24, 12, generator=g, dtype=torch.float64, requires_grad=True)
    tap = m.tap
    out, ref = tap(x), tap.reference(x)
    assert max_err(out, ref) < 1e-12
    params = (x, *tap.parameters())
    assert max_err(grads(out, params), grads(ref, params)) < 1e-10
    assert torch.allclose(m(x), m.attn(ref), atol=1e-12)
    # a zero predictor weighs the branches equally: at pixel (0, 0) the dilation-1 mean is the 2 x 2 corner / 9
    # and the dilation-2 mean is pixels (0, 0), (0, 2), (2, 0), (2, 2) / 9 (zero padding outside)
    with torch.no_grad():
        tap.predict2.weight.zero_()
    d1 = x[:, [0, 1, 6, 7]].sum(1) / 9
    d2 = x[:, [0, 2, 12, 14]].sum(1) / 9
    assert torch.allclose(tap(x)[:, 0], (x[:, 0] + d1 + d2) / 3, atol=1e-12)
    assert torch.allclose(tap.weights(x), torch.full((2, 24, 3), 1 / 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="branches"):
        build_mixer("tap", _ctx(), branches=1)
    with pytest.raises(ValueError, match="temperature"):
        build_mixer("tap", _ctx(), temperature=0)


# ---- V59 TiC cyclic shift --------------------------------------------------------------------------------
def test_tic_cyclic_shift_reference_and_long_range_reach():
    from attnlab.vision.tic import cyclic_shift, cyclic_shift_ref, msa_conv_ref

    grid = (4, 6)
    x = torch.randn(2, 24, 12, generator=torch.Generator().manual_seed(6), dtype=torch.float64,
                    requires_grad=True)
    assert torch.equal(cyclic_shift(x, grid, 2), cyclic_shift_ref(x, grid, 2))
    assert torch.equal(cyclic_shift(x, grid, 0), x)
    m = build_mixer("tic", _ctx(), kernel=3, shift=2).double()
    out, ref = m(x), msa_conv_ref(m.layer, cyclic_shift_ref(x, grid, 2), grid, 3)
    assert max_err(out, ref) < 1e-10
    params = (x, *m.parameters())
    assert max_err(grads(out, params), grads(ref, params)) < 1e-9
    # pixel (0, 0) now depends on pixels 2 rows / columns away cyclically (3 x 3 window alone: not)
    y = x.detach().clone()
    # pixel (2, 0): outside (0, 0)'s window, reached by the 'down' group
    y[:, 2 * 6 + 0] += torch.linspace(-1, 1, 12, dtype=torch.float64)
    plain = build_mixer("tic", _ctx(), kernel=3).double()
    with torch.no_grad():
        plain.load_state_dict(m.layer.state_dict())
        assert (m(y) - m(x))[:, 0].abs().max() > 1e-6
        assert (plain(y) - plain(x))[:, 0].abs().max() == 0
    with pytest.raises(ValueError, match="shift"):
        build_mixer("tic", _ctx(), shift=-1)


# ---- the command: DCAL arm and --task video ------------------------------------------------------------
def _parser():
    import argparse

    from attnlab.vision import bench

    parser = argparse.ArgumentParser()
    bench.register(parser.add_subparsers())
    return parser


def test_bench_vision_dcal_arm_and_video_task(tmp_path):
    import json

    parser = _parser()
    args = parser.parse_args(["vision", "--mixers", "dcal", "--steps", "2", "--batch", "4", "--test", "8",
                              "--size", "8", "--depth", "2", "--dim", "16", "--out", str(tmp_path / "img")])
    assert args.func(args) == 0
    (run_dir,) = (tmp_path / "img").iterdir()
    (row,) = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    assert row["arm"] == "dcal" and 0 <= row["accuracy"] <= 1
    assert row["trained"] == row["params"]  # every branch and the three log-variances move
    argv = ["vision", "--task", "video", "--mixers", "factorized", "interleaved", "--steps", "2", "--batch", "2",
            "--test", "4", "--size", "8", "--patch", "4", "--frames", "2", "--squares", "1", "--depth", "4",
            "--dim", "16", "--out", str(tmp_path / "vid")]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    (run_dir,) = (tmp_path / "vid").iterdir()
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    assert [r["arm"] for r in rows] == ["factorized", "interleaved"]
    assert all(r["test_mse"] > 0 and r["copy_mse"] > 0 for r in rows)
    # the same test clips
    assert rows[0]["copy_mse"] == rows[1]["copy_mse"] and rows[0]["zero_mse"] == rows[1]["zero_mse"]
    assert {"results.json", "results.md", "mse.png"} <= {p.name for p in run_dir.iterdir()}
    with pytest.raises(SystemExit, match="PredFormer layouts"):
        args = parser.parse_args([*argv[:4], "biformer", *argv[6:]])
        args.func(args)


@pytest.mark.parametrize("mixer,opts", [("tap", {}), ("tic", {"shift": 2})])
def test_vit_runs_with_the_new_mixers(mixer, opts):
    vit = build_vit(image_size=8, patch=2, dim=16, heads=2, depth=1, classes=3, mixer=mixer,
                    mixer_options={mixer: opts})
    out = vit(IMG.float())
    assert out.shape == (4, 3) and torch.isfinite(out).all()
    out.sum().backward()
    assert vit.embed.proj.weight.grad is not None
