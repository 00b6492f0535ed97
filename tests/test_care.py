"""CARE (R45): fast path = the plain dense/tap-by-tap form (float64, outputs, memory and gradients), the global
state accumulated in chunks or streamed = one shot, the memory carried across layers, known answers, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from attnlab.cli import main
from attnlab.mechanisms.linear.care import (
    CareAttention,
    CareConfig,
    CareDownsample,
    CareStack,
    care_split,
    depthwise_conv,
    depthwise_conv_taps,
)
from attnlab.mechanisms.registry import build, get, paper_title
from attnlab.testing import grads, max_err

DIM, HEADS, GRID = 24, 2, (4, 5)
T = GRID[0] * GRID[1]


def _layer(**opts) -> CareAttention:
    torch.manual_seed(0)
    layer = build("care", **{"dim": DIM, "heads": HEADS, "grid": GRID, **opts}).double()
    with torch.no_grad():  # non-trivial values for parameters initialized to constants (biases, norm weights)
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return layer


def _x(B: int = 2, seed: int = 1, width: int = DIM) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, width, generator=g, dtype=torch.float64, requires_grad=True)


def test_registered_non_causal_and_listed(capsys) -> None:
    e = get("care")
    assert e.family == "linear" and e.papers == ("R45",) and e.year == 2025 and not e.decodes
    assert paper_title("R45").startswith("CARE Transformer")
    assert main(["list", "--family", "linear", "--json"]) == 0
    listed = {x["name"]: x for x in json.loads(capsys.readouterr().out)}
    assert "care" in listed and "grid" in listed["care"]["config"] and "global_ratio" in listed["care"]["config"]


def test_split_is_asymmetric_one_third_in_whole_heads() -> None:
    assert care_split(CareConfig(dim=24, heads=2)) == (8, 16)
    assert care_split(CareConfig(dim=256, heads=4)) == (84, 172)  # 256 / 3 = 85.3 -> 21 heads of 4
    assert care_split(CareConfig(dim=24, heads=2, global_ratio=0.5)) == (12, 12)  # the symmetric ablation
    layer = _layer(local_kernels=(3, 5, 7))
    assert layer.local_sizes == [6, 5, 5] and [w.shape[-1] for w in layer.local_weight] == [3, 5, 7]


CASES = [
    {},
    {"global_ratio": 0.5, "feature_map": "relu", "local_kernels": (1, 3, 5)},
    {"heads": 4, "expansion": 2, "inter_kernel": 5, "chunk": 7},
]


@pytest.mark.parametrize("opts", CASES, ids=range(len(CASES)))
def test_forward_matches_reference(opts: dict) -> None:
    layer = _layer(**opts)
    x = _x()
    y, r = layer(x), layer.reference(x)
    assert y.shape == x.shape
    assert max_err(y, r) < 1e-12
    params = (x, *layer.parameters())
    assert max_err(grads(y, params), grads(r, params)) < 1e-10


@pytest.mark.parametrize("opts", CASES[:2], ids=range(2))
def test_forward_with_memory_matches_reference(opts: dict) -> None:
    layer = _layer(**opts)
    x, m = _x(), _x(seed=2, width=layer.d1)
    y, z = layer.forward_with_memory(x, m)
    ry, rz = layer.reference_with_memory(x, m)
    assert z.shape == m.shape
    assert max_err(y, ry) < 1e-12 and max_err(z, rz) < 1e-12
    params = (x, m, *layer.parameters())
    both, rboth = torch.cat([y, z], -1), torch.cat([ry, rz], -1)
    assert max_err(grads(both, params), grads(rboth, params)) < 1e-10


@pytest.mark.parametrize("chunk", [1, 3, 7, T, 64])
def test_chunked_global_state_equals_one_shot(chunk: int) -> None:
    one = _layer()
    chunked = _layer(chunk=chunk)  # same seed: same weights
    x = _x()
    assert max_err(chunked(x), one(x)) < 1e-12
    # the state itself, and streamed in uneven pieces through accumulate()
    fq, fk, v = one._features(x[..., : one.d1])
    S, z = one.global_state(fk, v)
    state = None
    for a, b in ((0, 5), (5, 6), (6, 13), (13, T)):
        state = one.accumulate(fk[:, :, a:b], v[:, :, a:b], state)
    assert max_err(state, (S, z)) < 1e-12
    assert max_err(chunked.global_state(fk, v), (S, z)) < 1e-12


def test_every_token_sees_every_token() -> None:
    # non-causal and global: the first token's output changes when only the last token changes,
    # even though the last token is far outside every convolution's reach of the first (grid 4 x 5, kernels <= 7)
    layer = _layer(local_kernels=(3,), inter_kernel=1)  # the only path from token T-1 to token 0 is attention
    x = _x().detach()
    x2 = x.clone()
    x2[:, -1] += 1.0
    assert (layer(x2)[:, 0] - layer(x)[:, 0]).abs().max() > 1e-6
    x3 = x.clone()
    x3[:, -1, layer.d1 :] += 1.0  # local channels only: no path to token 0 (3x3 conv, 1x1 interactions)
    assert (layer(x3)[:, 0] - layer(x)[:, 0]).abs().max() < 1e-14


def test_depthwise_conv_known_answer_and_forms_agree() -> None:
    # an impulse at the centre returns the kernel itself (cross-correlation: y[c - (a - r), c - (b - r)] = w[a, b])
    grid = (5, 5)
    w = torch.arange(9, dtype=torch.float64).view(1, 3, 3)
    x = torch.zeros(1, 25, 1, dtype=torch.float64)
    x[0, 12, 0] = 1.0
    y = depthwise_conv_taps(x, w, None, grid).view(5, 5)
    assert torch.equal(y[1:4, 1:4], w[0].flip(0, 1)) and y.abs().sum() == w.sum()
    xr = torch.randn(2, 20, 3, dtype=torch.float64)
    wr, br = torch.randn(3, 5, 5, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    assert max_err(depthwise_conv(xr, wr, br, (4, 5)), depthwise_conv_taps(xr, wr, br, (4, 5))) < 1e-12


def test_memory_changes_output_and_is_rewritten() -> None:
    layer = _layer()
    x = _x().detach()
    m1, m2 = torch.zeros(2, T, layer.d1, dtype=torch.float64), _x(seed=3, width=layer.d1).detach()
    y0, z0 = layer.forward_with_memory(x)
    y1, z1 = layer.forward_with_memory(x, m1)
    y2, z2 = layer.forward_with_memory(x, m2)
    assert torch.equal(y0, y1) and torch.equal(z0, z1)  # a fresh memory is zeros
    assert torch.equal(layer(x), y0)
    assert (y2 - y1).abs().max() > 1e-6 and (z2 - z1).abs().max() > 1e-6
    assert (z1 - m1).abs().max() > 1e-6  # the block writes a new memory


def test_stack_passes_memory_and_equals_manual_chaining() -> None:
    cfg = CareConfig(dim=DIM, heads=HEADS, grid=GRID)
    torch.manual_seed(0)
    stack = CareStack(cfg, depth=3).double()
    x = _x().detach()
    out, mem = stack(x)
    h, z = x, None
    for block in stack.blocks:
        y, z = block.forward_with_memory(h, z)
        h = h + y
    assert torch.equal(out, h) and torch.equal(mem, z)
    # the memory written by block 0 reaches the last block: perturb the memory block 0 receives
    m = torch.zeros(2, T, stack.blocks[0].d1, dtype=torch.float64)
    m[:, 3] = 1.0
    out2, _ = stack(x, m)
    assert (out2 - out).abs().max() > 1e-6
    # the plain references chain the same way
    h, z = x, None
    for block in stack.blocks:
        y, z = block.reference_with_memory(h, z)
        h = h + y
    assert max_err(out, h) < 1e-12 and max_err(mem, z) < 1e-12


def test_downsample_hands_the_memory_to_the_next_stage() -> None:
    # Z_0^s = Conv2x2_s2(X (+) Z): a 2x2 stride-2 convolution is a linear map of each 2x2 patch
    torch.manual_seed(0)
    cfg1 = CareConfig(dim=12, heads=2, grid=(4, 6))
    cfg2 = CareConfig(dim=24, heads=2, grid=(2, 3))
    s1, s2 = CareStack(cfg1, 2).double(), CareStack(cfg2, 2).double()
    d1a, d1b = s1.blocks[0].d1, s2.blocks[0].d1
    down = CareDownsample((4, 6), 12, 24, d1a, d1b).double()
    assert down.out_grid == (2, 3)
    x = torch.randn(2, 24, 12, dtype=torch.float64)
    h, z = s1(x)
    h2, z2 = down(h, z)
    assert h2.shape == (2, 6, 24) and z2.shape == (2, 6, d1b)
    both = torch.cat([h, z], -1).view(2, 2, 2, 3, 2, 12 + d1a)  # (B, i, a, j, b, C): row 2i + a, column 2j + b
    patches = both.permute(0, 1, 3, 5, 2, 4).reshape(2, 6, -1)  # (B, patch, C * 2 * 2) in Conv2d weight order
    want = patches @ down.z_conv.weight.reshape(d1b, -1).T + down.z_conv.bias
    assert max_err(z2, want) < 1e-12
    y, m = s2(h2, z2)
    assert y.shape == (2, 6, 24) and m.shape == (2, 6, d1b) and torch.isfinite(y).all()


def test_bad_inputs_fail_clearly() -> None:
    layer = _layer()
    with pytest.raises(ValueError, match=r"seq = H \* W = 20"):
        layer(torch.randn(1, 19, DIM, dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        layer(torch.randn(1, T, DIM + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="memory must have shape"):
        layer.forward_with_memory(_x(), torch.zeros(2, T, layer.d1 + 1, dtype=torch.float64))
    for bad in (0.0, 1.0, 1.5, -0.2, True):
        with pytest.raises(ValueError, match="global_ratio"):
            build("care", dim=DIM, heads=HEADS, global_ratio=bad)
    with pytest.raises(ValueError, match="lower global_ratio"):
        build("care", dim=8, heads=2, global_ratio=0.95)  # 8 * 0.95 -> 8 channels for attention, none left
    with pytest.raises(ValueError, match="odd"):
        build("care", dim=DIM, heads=HEADS, local_kernels=(3, 4))
    with pytest.raises(ValueError, match="grid"):
        build("care", grid=(0, 4))
    with pytest.raises(ValueError, match="feature_map"):
        build("care", feature_map="identity")  # signed features would break the normalizer
    with pytest.raises(TypeError, match="does not decode"):
        layer(_x(), cache=object())
    with pytest.raises(TypeError, match="does not decode"):
        layer.init_cache()
    with pytest.raises(ValueError, match="even sides"):
        CareDownsample((3, 4), 8, 8, 4, 4)
