"""attnlab bench cab (B24): image generators with known answers, setting routing, skips, the command end to end."""

from __future__ import annotations

import json
from collections import deque

import pytest
import torch

from attnlab.bench.cab.images import Digits, Pathfinder, SameDifferent, image_task
from attnlab.bench.cab.run import CabRun, Scale, expand_mechanisms, plan, run_one
from attnlab.bench.cab.settings import (
    CabMech,
    CrossConfig,
    CrossModel,
    CrossTask,
    ReverseConfig,
    ReverseTask,
    build_seq_layer,
    setting_leak,
    unsupported,
)
from attnlab.bench.tasks.backbone import Backbone, BackboneConfig


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def reachable(img: torch.Tensor, a: tuple[int, int], b: tuple[int, int], jump: int) -> bool:
    """BFS over ink pixels (> 0) with steps of Chebyshev length <= jump."""
    S = img.shape[0]
    seen, todo = {a}, deque([a])
    while todo:
        r, c = todo.popleft()
        if (r, c) == b:
            return True
        for dr in range(-jump, jump + 1):
            for dc in range(-jump, jump + 1):
                n = (r + dr, c + dc)
                if 0 <= n[0] < S and 0 <= n[1] < S and n not in seen and img[n] > 0:
                    seen.add(n)
                    todo.append(n)
    return False


def components(img: torch.Tensor) -> int:
    """Connected components of ink pixels (4-neighbourhood)."""
    S = img.shape[0]
    seen: set[tuple[int, int]] = set()
    count = 0
    for r in range(S):
        for c in range(S):
            if img[r, c] > 0 and (r, c) not in seen:
                count += 1
                seen.add((r, c))
                todo = deque([(r, c)])
                while todo:
                    y, x = todo.popleft()
                    for n in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                        if 0 <= n[0] < S and 0 <= n[1] < S and n not in seen and img[n] > 0:
                            seen.add(n)
                            todo.append(n)
    return count


@pytest.mark.parametrize("dashed,jump", [(True, 2), (False, 1)])
def test_pathfinder_connected_iff_bfs_path(dashed: bool, jump: int) -> None:
    task = Pathfinder(size=16, distractors=1, dashed=dashed, noise=0.0)
    x, y = task.sample(40, gen(3))
    assert 0 < int(y.sum()) < 40
    ink = [int((img > 0).sum()) for img in x[:, 0]]
    # both classes draw the same number of paths: the amount of ink does not separate them
    pos = [i for i, lab in zip(ink, y, strict=True) if lab]
    neg = [i for i, lab in zip(ink, y, strict=True) if not lab]
    assert min(pos) < max(neg) and min(neg) < max(pos)
    for img, label in zip(x[:, 0], y, strict=True):
        dots = [tuple(int(v) for v in p) for p in (img == 1.0).nonzero()]
        assert len(dots) == 2
        assert reachable(img, dots[0], dots[1], jump) == bool(label)
    if dashed:  # a dashed path has gaps: with single steps the dots of a long path are cut apart
        cut = [not reachable(img, *[tuple(int(v) for v in p) for p in (img == 1.0).nonzero()], 1)
               for img, label in zip(x[:, 0], y, strict=True) if label]
        assert any(cut)


def test_generators_are_seeded() -> None:
    for name in ("pathfinder", "connect", "same", "count", "digits"):
        task = image_task(name)
        a, b = task.sample(8, gen(1)), task.sample(8, gen(1))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert not torch.equal(a[0], task.sample(8, gen(2))[0])
        xs, ys = task.split(16, 5)
        assert torch.equal(xs, task.split(16, 5)[0])


def test_connect_is_long_and_solid() -> None:
    clean = Pathfinder(size=16, length=(16, 32), distractors=0, dashed=False, noise=0.0)
    xc, yc = clean.sample(20, gen(0))
    for img, label in zip(xc[:, 0], yc, strict=True):
        dots = [tuple(int(v) for v in p) for p in (img == 1.0).nonzero()]
        assert reachable(img, dots[0], dots[1], 1) == bool(label)
        assert int((img > 0).sum()) >= 2 * 16  # two paths in either class, each at least `size` pixels


def test_same_different_known_answer() -> None:
    task = SameDifferent(size=16, noise=0.0)
    x, y = task.sample(60, gen(4))
    assert 0 < int(y.sum()) < 60
    for img, label in zip(x[:, 0], y, strict=True):
        crops = []
        for half in (img[:, :8], img[:, 8:]):
            rows, cols = (half > 0).nonzero(as_tuple=True)
            crops.append(half[rows.min():rows.max() + 1, cols.min():cols.max() + 1])
        same = crops[0].shape == crops[1].shape and torch.equal(crops[0], crops[1])
        assert same == bool(label)


def test_count_equals_drawn_objects() -> None:
    from attnlab.vision.data import ImageTask

    x, y = ImageTask("count", 16, noise=0.0).sample(30, gen(6))
    for img, label in zip(x[:, 0], y, strict=True):
        assert components(img) == int(label) + 1


def test_digits_load_with_ten_classes() -> None:
    task = Digits(test_size=500)
    xt, yt = task.split(500, 0)
    assert xt.shape == (500, 1, 8, 8) and task.classes == 10
    assert set(yt.tolist()) == set(range(10))
    assert float(xt.min()) >= 0.0 and float(xt.max()) <= 1.0
    train, test = task._parts()  # held-out and training indices split the 1797 images
    assert len(set(train.tolist()) | set(test.tolist())) == 1797 and not set(train.tolist()) & set(test.tolist())
    assert not torch.equal(test, Digits(test_size=500, seed=1)._parts()[1])


def test_sequence_task_answers() -> None:
    b = ReverseTask(ReverseConfig(vocab=8, seq_len=6)).sample(4, gen(0))
    for row_x, row_y in zip(b.x, b.y, strict=True):
        assert [int(v) for v in row_y] == [int(row_x[5 - i]) for i in range(6)]
    for kind in ("flip", "stretch"):
        task = CrossTask(CrossConfig(kind=kind, vocab=8, seq_len=6, seed=2))
        d = task.dictionary()
        b = task.sample(3, gen(1))
        for row_x, row_y, row_m in zip(b.x, b.y, b.mask, strict=True):
            src = [int(v) for v in row_x[:6]]
            want = [int(d[src[5 - i] if kind == "flip" else src[i // 2]]) for i in range(6)]
            assert [int(v) for v in row_y[6:]] == want
            assert row_m.tolist() == [False] * 6 + [True] * 6 and row_x[6:].eq(8).all()
    with pytest.raises(ValueError, match="kind"):
        CrossConfig(kind="copy")


def _self_change(name: str, causal: bool) -> float:
    """Change of outputs 0..3 of a self-attention backbone when token 4 changes (within every local window)."""
    torch.manual_seed(0)
    bb = BackboneConfig(dim=16, heads=2, layers=1)
    model = Backbone(bb, lambda i: build_seq_layer(CabMech(name, name), 16, 2, 8, causal), vocab=10, num_classes=10)
    x = torch.randint(10, (2, 8), generator=gen(0))
    x2 = x.clone()
    x2[:, 4] = (x2[:, 4] + 1) % 10
    with torch.no_grad():
        return float((model(x)[0][:, :4] - model(x2)[0][:, :4]).abs().max())


@pytest.mark.parametrize("name", ["mha", "luong", "neighborhood", "halo"])
def test_self_setting_routes_causality(name: str) -> None:
    assert _self_change(name, causal=False) > 1e-5  # the encoder sees the future
    assert _self_change(name, causal=True) < 1e-6


@pytest.mark.parametrize("name", ["mega", "shvit"])
def test_single_head_layers_build_without_a_heads_knob(name: str) -> None:
    layer = build_seq_layer(CabMech(name, name), 16, 2, 8, causal=True)
    assert layer(torch.randn(2, 8, 16)).shape == (2, 8, 16)


def test_leak_check_reads_the_function_not_training_noise() -> None:
    """HeadMask drops random heads in training mode: two training-mode calls differ everywhere, yet the layer
    is causal; the check runs in eval mode and leaves the model's mode as it was."""
    torch.manual_seed(0)
    bb = BackboneConfig(dim=16, heads=4, layers=1)
    mech = CabMech("headmask", "headmask")
    model = Backbone(bb, lambda i: build_seq_layer(mech, 16, 4, 8, True), vocab=10, num_classes=10).train()
    x = torch.randint(10, (2, 8), generator=gen(0))
    with torch.no_grad():
        first = model(x)[0]
        noisy = max(float((model(x)[0] - first).abs().max()) for _ in range(6))
    assert noisy > 1e-4  # training-mode outputs are random (1 of 4 heads dropped per call)
    assert setting_leak(model, x, 4, cross=False) < 1e-6 and model.training
    model_nc = Backbone(bb, lambda i: build_seq_layer(CabMech("mha", "mha"), 16, 4, 8, False), vocab=10,
                        num_classes=10)
    assert setting_leak(model_nc, x, 4, cross=False) > 1e-5


def test_care_runs_non_causally() -> None:
    assert _self_change("care", causal=False) > 1e-5


def _cross_change(name: str, causal: bool) -> float:
    """Change of target outputs 0..2 when source token 5 changes."""
    torch.manual_seed(0)
    model = CrossModel(BackboneConfig(dim=16, heads=2, layers=1), CabMech(name, name), vocab=9, num_classes=8,
                       seq_len=6, causal=causal)
    x = torch.cat([torch.randint(8, (2, 6), generator=gen(0)), torch.full((2, 6), 8)], 1)
    x2 = x.clone()
    x2[:, 5] = (x2[:, 5] + 1) % 8
    with torch.no_grad():
        return float((model(x)[0][:, 6:9] - model(x2)[0][:, 6:9]).abs().max())


@pytest.mark.parametrize("name", ["mha", "neighborhood"])
def test_cross_setting_routes_causality(name: str) -> None:
    assert _cross_change(name, causal=False) > 1e-5
    assert _cross_change(name, causal=True) < 1e-6


def test_luong_native_cross_sees_the_whole_source() -> None:
    assert _cross_change("luong", causal=False) > 1e-5


def test_unsupported_pairs_have_reasons() -> None:
    assert "causal=True" in unsupported(CabMech("linear", "linear"), "noncausal-self")
    assert "causal=False" in unsupported(CabMech("care", "care"), "causal-self")
    assert "no cross" in unsupported(CabMech("care", "care"), "noncausal-cross")
    assert "whole context" in unsupported(CabMech("luong", "luong"), "causal-cross")
    assert "image" in unsupported(CabMech("shift", "shift"), "noncausal-self")
    assert unsupported(CabMech("shift", "shift"), "noncausal-self", image=True) is None
    assert unsupported(CabMech("mha", "mha"), "causal-cross") is None
    with pytest.raises(ValueError, match="setting"):
        unsupported(CabMech("mha", "mha"), "sideways")
    rc = CabRun("noncausal-self", "reverse", CabMech("linear", "linear"), Scale.quick())
    row = run_one(rc)
    assert row["score"] is None and "error" not in row and "causal=True" in row["skipped"]


def test_plan_covers_every_pair() -> None:
    mechs = (CabMech("mha", "mha"), CabMech("shift", "shift"))
    configs = plan(("causal-self", "noncausal-cross"), mechs, Scale.quick())
    assert len(configs) == 2 * 2 * 2 and len({c.key for c in configs}) == 8
    with pytest.raises(ValueError, match="setting"):
        plan(("nope",), mechs, Scale.quick())


def test_all_is_every_catalogue_layer_vision_mixer_and_pattern() -> None:
    from attnlab.mechanisms import registry
    from attnlab.vision.registry import mixer_names

    names = expand_mechanisms(["mha", "all", "shift"])
    assert names[0] == "mha" and len(names) == len(set(names))  # explicit names keep their place, no repeats
    expected = {e.name for e in registry.catalogue()} | set(mixer_names()) | {"neighborhood", "halo"}
    assert set(names) == expected
    assert expand_mechanisms(["care", "mha:heads=2"]) == ["care", "mha:heads=2"]


def test_command_end_to_end_with_resume(tmp_path) -> None:
    from attnlab.cli import main

    argv = ["bench", "cab", "--quick", "--budget", "0.3", "--image-steps", "2", "--workers", "1",
            "--settings", "noncausal-self", "causal-cross", "--mechanisms", "mha", "linear", "shift",
            "--tasks", "reverse", "flip", "count", "--out", str(tmp_path), "--name", "c"]
    assert main(argv) == 0
    run_dir = tmp_path / "c"
    rows = json.loads((run_dir / "results.json").read_text())["rows"]
    assert len(rows) == 3 * 3  # (reverse, count) x 3 + flip x 3
    by = {(r["setting"], r["task"], r["mechanism"]): r for r in rows}
    assert by[("noncausal-self", "reverse", "linear")]["details"].startswith("skipped")
    assert by[("causal-cross", "flip", "shift")]["details"].startswith("skipped")
    assert by[("noncausal-self", "reverse", "mha")]["score"] is not None
    assert by[("noncausal-self", "reverse", "mha")]["sees_future"] is True
    assert by[("causal-cross", "flip", "linear")]["sees_future"] is False
    assert by[("noncausal-self", "count", "shift")]["score"] is not None
    assert (run_dir / "results.md").exists() and (run_dir / "cab-scores.png").exists()
    lines = (run_dir / "results.jsonl").read_text().splitlines()
    assert main(argv) == 0  # resume: nothing runs again
    assert (run_dir / "results.jsonl").read_text().splitlines() == lines
    assert json.loads((run_dir / "results.json").read_text())["meta"]["ran_now"] == 0


def test_grid_layers_fit_their_regions_and_tiles_to_the_grid() -> None:
    from attnlab.mechanisms.heads import HeadsConfig
    from attnlab.vision.registry import MixerContext, build_mixer, fit_to_grid

    assert fit_to_grid({"regions": (4, 4)}, (1, 16)) == {"regions": (1, 4)}
    assert fit_to_grid({"tile": (2, 2, 2)}, (1, 8, 8)) == {"tile": (1, 2, 2)}
    assert fit_to_grid({"regions": (4, 4)}, (8, 8)) == {"regions": (4, 4)}  # a fitting default is kept
    for name in ("biformer", "vmoba"):  # defaults that do not divide a 1 x 16 sequence grid
        layer = build_seq_layer(CabMech(name, name), 16, 2, 16, causal=False)
        assert layer(torch.randn(2, 16, 16)).shape == (2, 16, 16)
    mixer = build_mixer("vmoba", MixerContext(HeadsConfig(dim=16, heads=2), (8, 8), 0))
    assert mixer(torch.randn(2, 64, 16)).shape == (2, 64, 16)
