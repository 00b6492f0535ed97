"""The ViT backbone (mixers by name, pooling, positions, bad configs), the image tasks and ``attnlab bench
vision`` (a tiny run, resumed)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from attnlab.core.patterns import Neighborhood
from attnlab.mechanisms.heads import HeadsConfig
from attnlab.mechanisms.registry import build
from attnlab.vision import ImageTask, ViTConfig, build_vit
from attnlab.vision.registry import MixerContext, build_mixer, grid_only, mixer_names
from attnlab.vision.vit import sincos_2d

IMG = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("mixer", ["mha", "shift", "uniform", "lka", "spectral", "ulsam", "window",
                                   "neighborhood", "ninformer", "a2n", "region", "tic", "tap", "biformer",
                                   "sparsifiner", "diff"])
def test_output_shape_every_mixer(mixer):
    opts = {"biformer": {"regions": (2, 2), "top_k": 2}}.get(mixer, {})
    vit = build_vit(image_size=8, patch=2, dim=16, heads=2, depth=1, classes=5, mixer=mixer,
                    mixer_options={mixer: opts} if opts else {})
    out = vit(IMG)
    assert out.shape == (3, 5) and torch.isfinite(out).all()
    out.sum().backward()
    assert vit.embed.proj.weight.grad is not None


def test_cls_and_mean_pooling():
    torch.manual_seed(0)
    cls = build_vit(image_size=8, patch=2, dim=16, heads=2, pooling="cls")
    f = cls.features(IMG)
    assert f.shape == (3, 1 + 16, 16)
    assert torch.allclose(cls(IMG), cls.head(f[:, 0]))
    torch.manual_seed(0)
    mean = build_vit(image_size=8, patch=2, dim=16, heads=2, pooling="mean")
    f = mean.features(IMG)
    assert f.shape == (3, 16, 16)
    assert torch.allclose(mean(IMG), mean.head(f.mean(1)), atol=1e-6)
    # the class token is a learned parameter prepended to the tokens
    assert torch.equal(cls.tokens(IMG)[:, 0], cls.cls[0].expand(3, -1))


def test_mixer_by_name_equals_the_mechanism_called_directly():
    x = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(1))
    ctx = MixerContext(HeadsConfig(dim=16, heads=2, kv_heads=1, causal=False), (4, 4))
    by_name = build_mixer("mha", ctx)
    direct = build("mha", dim=16, heads=2, kv_heads=1, causal=False, rope=False, pattern=None)
    direct.load_state_dict(by_name.state_dict())
    assert torch.equal(by_name(x), direct(x))
    nb = build_mixer("neighborhood", ctx, kernel=3)
    direct = build("mha", dim=16, heads=2, kv_heads=1, causal=False, rope=False,
                   pattern=Neighborhood(grid=(4, 4), kernel_size=3))
    direct.load_state_dict(nb.state_dict())
    assert torch.equal(nb(x), direct(x))
    # not causal: the first token's output depends on the last token
    y = x.clone()
    y[:, -1] += 1
    assert not torch.allclose(by_name(y)[:, 0], by_name(x)[:, 0])


@pytest.mark.parametrize("name", ["moba", "linear", "lightning"])
def test_causal_only_mechanism_is_rejected(name):
    with pytest.raises(ValueError, match="causal-only"):
        build_vit(image_size=8, patch=2, dim=16, heads=2, mixer=name)


def test_mixer_errors():
    with pytest.raises(KeyError, match="unknown mixer"):
        build_vit(image_size=8, patch=2, dim=16, heads=2, mixer="nope")
    with pytest.raises(ValueError, match="class token"):
        build_vit(image_size=8, patch=2, dim=16, heads=2, mixer="lka", pooling="cls")
    with pytest.raises(ValueError, match="class token"):
        build_vit(image_size=8, patch=2, dim=16, heads=2, mixer="biformer", pooling="cls")
    with pytest.raises(TypeError, match="unknown option"):
        build_vit(image_size=8, patch=2, dim=16, heads=2, mixer="mha", mixer_options={"mha": {"bogus": 1}})
    with pytest.raises(ValueError, match="causal=True"):
        build_vit(image_size=8, patch=2, dim=16, heads=2, mixer="mha", mixer_options={"mha": {"causal": True}})
    assert grid_only("lka") and grid_only("biformer") and not grid_only("mha") and not grid_only("uniform")
    assert {"shift", "uniform", "lka", "spectral", "window", "ulsam", "ninformer", "a2n", "region",
            "tic"} <= set(mixer_names())


@pytest.mark.parametrize("bad,match", [
    (dict(patch=3), "patch"),
    (dict(attn=HeadsConfig(dim=16, heads=2)), "causal"),
    (dict(pooling="max"), "pooling"),
    (dict(positions="rope"), "positions"),
    (dict(embed="conv"), "embed"),
    (dict(mixer=("mha",), depth=2), "depth"),
    (dict(mixer_options={"lka": {}}), "mixer_options"),
    (dict(depth=0), "depth"),
    (dict(attn=HeadsConfig(dim=18, heads=2, causal=False)), "sincos"),
])
def test_bad_config(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ViTConfig(image_size=8, **bad)


def test_bad_images():
    vit = build_vit(image_size=8, patch=2, dim=16, heads=2)
    with pytest.raises(ValueError, match="images"):
        vit(torch.zeros(1, 3, 8, 8))


def test_sincos_positions_and_learned():
    p = sincos_2d((2, 3), 8)
    assert p.shape == (6, 8)
    # token (0, 0): sin 0 = 0, cos 0 = 1 on both axes; token 5 sits at (y, x) = (1, 2)
    assert torch.equal(p[0], torch.tensor([0.0, 0, 1, 1, 0, 0, 1, 1]))
    w = torch.tensor([1.0, 0.01])  # 10000^(-k / 2), k = 0, 1
    want = torch.cat([(1 * w).sin(), (1 * w).cos(), (2 * w).sin(), (2 * w).cos()])
    assert torch.allclose(p[5], want)
    learned = build_vit(image_size=8, patch=2, dim=16, heads=2, positions="learned")
    assert learned.pos.requires_grad and learned.pos.shape == (1, 16, 16)
    assert build_vit(image_size=8, patch=2, dim=16, heads=2, positions="none").pos is None


# ---- tasks --------------------------------------------------------------------------------------------
def test_shapes_task_draws_what_it_says():
    task = ImageTask("shapes", 16, noise=0.0)
    x, y = task.sample(64, torch.Generator().manual_seed(0))
    assert x.shape == (64, 1, 16, 16) and set(y.tolist()) == {0, 1}
    for img, label in zip(x[:, 0], y):
        rows, cols = img.nonzero(as_tuple=True)
        side = int(rows.max() - rows.min()) + 1
        assert side == int(cols.max() - cols.min()) + 1
        # square outline: 4 (side - 1) pixels, its corners set; plus sign: 2 side - 1, corners empty
        corner = bool(img[rows.min(), cols.min()])
        assert (int(img.sum()), corner) == ((4 * (side - 1), True) if label == 0 else (2 * side - 1, False))
    a, b = task.split(8, 5), task.split(8, 5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_count_task_and_bad_task():
    task = ImageTask("count", 12, noise=0.0, max_count=3)
    x, y = task.sample(32, torch.Generator().manual_seed(1))
    assert torch.equal(x.sum(dim=(1, 2, 3)), 4.0 * (y + 1))
    with pytest.raises(ValueError, match="kind"):
        ImageTask("dogs")
    with pytest.raises(ValueError, match="size"):
        ImageTask(size=4)


# ---- the command ----------------------------------------------------------------------------------------
def test_bench_vision_runs_and_resumes(tmp_path, capsys):
    from attnlab.bench import cli as bench_cli
    from attnlab.vision import bench

    assert "attnlab.vision.bench" in bench_cli.BENCH_COMMANDS
    parser = argparse.ArgumentParser()
    bench.register(parser.add_subparsers())
    argv = ["vision", "--mixers", "shift", "spectformer", "apla", "--steps", "3", "--batch", "4", "--test", "16",
            "--size", "8", "--depth", "2", "--dim", "16", "--out", str(tmp_path)]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    (run_dir,) = tmp_path.iterdir()
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    assert [r["arm"] for r in rows] == ["shift", "spectformer", "apla"]
    assert all(0 <= r["accuracy"] <= 1 and r["steps"] == 3 for r in rows)
    assert {"results.json", "results.md", "accuracy.png"} <= {p.name for p in run_dir.iterdir()}
    args = parser.parse_args([*argv, "--resume", str(run_dir)])
    assert args.func(args) == 0
    assert rows[2]["trained"] < rows[2]["params"] and "teacher_acc" in rows[2]  # APLA: W_O and the head only
    assert len((run_dir / "results.jsonl").read_text().splitlines()) == 3  # nothing ran again
    with pytest.raises(SystemExit, match="causal-only"):
        args = parser.parse_args([*argv[:2], "moba", *argv[4:]])
        args.func(args)
