"""The vision mixers of issue #19: each fast path against its float64 reference (outputs and gradients), a
known-answer property per mixer, and bad configurations failing with errors that name the option."""

from __future__ import annotations

import math

import pytest
import torch

from attnlab.core.patterns import MaxViTBlock
from attnlab.mechanisms.heads import HeadsConfig
from attnlab.mechanisms.registry import build
from attnlab.testing import grads, max_err
from attnlab.vision.aps import PolyphaseAnchoredEmbed
from attnlab.vision.common import to_image, to_tokens
from attnlab.vision.lka import LargeKernelAttention
from attnlab.vision.probe import AttentiveProbe, ProbedViT
from attnlab.vision.registry import MixerContext, build_mixer
from attnlab.vision.shift import Shift
from attnlab.vision.spectral import SpectralGating, spectformer_mixers
from attnlab.vision.ulsam import ULSAM
from attnlab.vision.uniform import UniformAttention
from attnlab.vision.vit import build_vit
from attnlab.vision.window import vitdet_mixers, window_attention_ref

GRID = (4, 6)
DIM = 12


def ctx(dim: int = DIM, heads: int = 2, grid: tuple[int, int] = GRID, prefix: int = 0) -> MixerContext:
    return MixerContext(HeadsConfig(dim=dim, heads=heads, causal=False), grid, prefix)


def tokens(B: int = 2, grid: tuple[int, int] = GRID, dim: int = DIM, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, grid[0] * grid[1], dim, generator=g, dtype=torch.float64).requires_grad_(True)


def randomize(m: torch.nn.Module, seed: int = 3) -> torch.nn.Module:
    """Non-trivial float64 parameters (biases and small inits too)."""
    g = torch.Generator().manual_seed(seed)
    m.double()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    return m


def check_reference(m: torch.nn.Module, x: torch.Tensor, ref=None) -> None:
    """Fast path == reference in float64: outputs and gradients w.r.t. the input and every parameter."""
    params = tuple(p for p in m.parameters() if p.requires_grad)
    out = m(x)
    want = m.reference(x) if ref is None else ref(x)
    assert out.shape == want.shape
    assert max_err(out, want) < 1e-10
    assert max_err(grads(out, (x, *params)), grads(want, (x, *params))) < 1e-9


# ---- ShiftViT (V125) ------------------------------------------------------------------------------------
def test_shift_reference_and_gradients():
    check_reference(Shift(GRID, fraction=2 / 3), tokens())


def test_shift_moves_exactly_the_chosen_groups_with_zero_fill():
    m = build_mixer("shift", ctx())  # fraction 1/3 of 12 channels: one channel per direction
    x = tokens().detach()
    img, out = to_image(x, GRID), to_image(m(x), GRID)
    assert torch.equal(out[:, 0, :, :-1], img[:, 0, :, 1:]) and not out[:, 0, :, -1].any()  # left
    assert torch.equal(out[:, 1, :, 1:], img[:, 1, :, :-1]) and not out[:, 1, :, 0].any()  # right
    assert torch.equal(out[:, 2, :-1], img[:, 2, 1:]) and not out[:, 2, -1].any()  # up
    assert torch.equal(out[:, 3, 1:], img[:, 3, :-1]) and not out[:, 3, 0].any()  # down
    assert torch.equal(out[:, 4:], img[:, 4:])  # the rest untouched
    assert sum(p.numel() for p in m.parameters()) == 0


@pytest.mark.parametrize("fraction", [0, 1.5, True])
def test_shift_bad_fraction(fraction):
    with pytest.raises(ValueError, match="fraction"):
        Shift(GRID, fraction)


def test_shift_too_few_channels():
    with pytest.raises(ValueError, match="fraction"):
        build_mixer("shift", ctx(dim=8))


# ---- uniform attention (V136) ---------------------------------------------------------------------------
@pytest.mark.parametrize("project", [True, False])
def test_uniform_reference_and_gradients(project):
    check_reference(randomize(UniformAttention(DIM, project)), tokens())


def test_uniform_output_is_mean_of_values():
    x = tokens().detach()
    plain = UniformAttention(DIM, project=False).double()
    assert torch.allclose(plain(x), x.mean(1, keepdim=True).expand_as(x), atol=1e-14)
    m = randomize(UniformAttention(DIM))
    values = x @ m.v_proj.weight.T
    want = values.mean(1) @ m.o_proj.weight.T  # mean of the values, then W_O
    out = m(x)
    assert torch.allclose(out, want[:, None].expand_as(out), atol=1e-12)


def test_uniform_bad_option():
    with pytest.raises(ValueError, match="project"):
        build_mixer("uniform", ctx(), project="yes")


# ---- VAN large-kernel attention (V65) -------------------------------------------------------------------
def test_lka_reference_and_gradients():
    m = randomize(LargeKernelAttention(DIM, GRID, kernel=3, dilated_kernel=3, dilation=2))
    check_reference(m, tokens())


def test_lka_receptive_field():
    """kernel 3, dilated kernel 3 with dilation 2: a pixel reaches 1 + 2 = 3 pixels per axis, no further."""
    grid = (9, 9)
    m = randomize(LargeKernelAttention(DIM, grid, kernel=3, dilated_kernel=3, dilation=2))
    x = tokens(grid=grid).detach()
    y = x.clone()
    y[:, 4 * 9 + 4] += 1.0  # the centre pixel
    diff = to_image(m(y) - m(x), grid).abs().amax(dim=(0, 1))  # (9, 9)
    assert diff[4, 1] > 0 and diff[1, 4] > 0 and diff[7, 7] > 0  # reaches distance 3
    assert diff[0].max() == 0 and diff[:, 0].max() == 0 and diff[8].max() == 0  # distance 4: untouched


@pytest.mark.parametrize("bad", [dict(kernel=4), dict(dilated_kernel=2), dict(dilation=0)])
def test_lka_bad_config(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        build_mixer("lka", ctx(), **bad)


# ---- SpectFormer spectral gating (V67) ------------------------------------------------------------------
@pytest.mark.parametrize("grid", [(4, 6), (3, 5)])
def test_spectral_reference_and_gradients(grid):
    check_reference(randomize(SpectralGating(DIM, grid)), tokens(grid=grid))


def test_spectral_known_filters():
    """All-ones filter: identity; a linear phase filter: an exact circular shift of the token image."""
    m = SpectralGating(DIM, GRID).double()
    x = tokens().detach()
    with torch.no_grad():
        m.weight.zero_()
        m.weight[..., 0] = 1.0
    assert torch.allclose(m(x), x, atol=1e-12)
    gh, gw = GRID
    sy, sx = 1, 2
    u = torch.arange(gh, dtype=torch.float64)[:, None]
    v = torch.arange(gw // 2 + 1, dtype=torch.float64)[None, :]
    phase = -2 * math.pi * (u * sy / gh + v * sx / gw)
    with torch.no_grad():
        m.weight[..., 0] = torch.cos(phase)[..., None]
        m.weight[..., 1] = torch.sin(phase)[..., None]
    want = to_tokens(torch.roll(to_image(x, GRID), shifts=(sy, sx), dims=(2, 3)))
    assert torch.allclose(m(x), want, atol=1e-12)


def test_spectformer_layout():
    assert spectformer_mixers(4) == ("spectral", "spectral", "mha", "mha")
    assert spectformer_mixers(3, spectral=1, attention="window") == ("spectral", "window", "window")
    with pytest.raises(ValueError, match="spectral"):
        spectformer_mixers(2, spectral=3)


# ---- ViTDet window attention (V193) ---------------------------------------------------------------------
def test_window_reference_and_gradients():
    m = build_mixer("window", ctx(), window=2).double()
    check_reference(m, tokens(), ref=lambda x: window_attention_ref(m, x, GRID, 2))
    m3 = build_mixer("window", ctx(), window=3).double()  # 4 x 6 grid: a partial last window row
    x = tokens()
    assert max_err(m3(x), window_attention_ref(m3, x, GRID, 3)) < 1e-10


def test_window_no_information_crosses_windows():
    m = build_mixer("window", ctx(), window=2).double()
    x = tokens().detach()
    y = x.clone()
    win = [r * GRID[1] + c for r in (2, 3) for c in (2, 3)]  # one 2 x 2 window
    y[:, win] += torch.randn(2, 4, DIM, dtype=torch.float64)
    changed = (m(y) - m(x)).abs().amax(dim=(0, 2)) > 0
    assert changed[win].all()
    others = torch.ones(GRID[0] * GRID[1], dtype=torch.bool)
    others[win] = False
    assert not changed[others].any()


def test_window_equals_mha_with_the_pattern():
    m = build_mixer("window", ctx(), window=2).double()
    direct = build("mha", dim=DIM, heads=2, causal=False, rope=False, pattern=MaxViTBlock(grid=GRID, window=2))
    direct.double().load_state_dict(m.state_dict())
    x = tokens().detach()
    assert torch.equal(m(x), direct(x))


def test_vitdet_layout_and_bad_window():
    assert vitdet_mixers(12, 4) == tuple("mha" if i in (2, 5, 8, 11) else "window" for i in range(12))
    assert vitdet_mixers(4) == ("window", "window", "window", "mha")
    with pytest.raises(ValueError, match="global_blocks"):
        vitdet_mixers(2, 3)
    with pytest.raises(ValueError, match="window"):
        build_mixer("window", ctx(), window=0)
    with pytest.raises(ValueError, match="class token"):
        build_mixer("window", ctx(prefix=1))


# ---- ULSAM (V61) ----------------------------------------------------------------------------------------
def test_ulsam_reference_and_gradients():
    check_reference(randomize(ULSAM(DIM, GRID, groups=3)), tokens())


def test_ulsam_constant_logits_give_uniform_maps():
    """Zero pointwise weights: every map is softmax of a constant = 1 / N, so F^ = F (1 + 1 / N)."""
    m = randomize(ULSAM(DIM, GRID, groups=4))
    with torch.no_grad():
        m.pw.weight.zero_()
    x = tokens().detach()
    n = GRID[0] * GRID[1]
    assert torch.allclose(m(x), x * (1 + 1 / n), atol=1e-13)


def test_ulsam_bad_groups():
    with pytest.raises(ValueError, match="groups"):
        build_mixer("ulsam", ctx(), groups=5)


# ---- adaptive polyphase anchoring (V149) ----------------------------------------------------------------
def test_aps_embed_reference_and_gradients():
    g = torch.Generator().manual_seed(1)
    m = randomize(PolyphaseAnchoredEmbed(2, 6, 2))
    img = torch.randn(3, 2, 8, 8, generator=g, dtype=torch.float64).requires_grad_(True)
    check_reference(m, img)


@pytest.mark.parametrize("shift", [(1, 0), (0, 3), (5, 7), (2, 2)])
def test_aps_vit_is_invariant_to_circular_shifts(shift):
    """Anchored embedding + dense attention + no absolute positions + mean pooling: exact invariance, while the
    plain patch embedding is not invariant to shifts by a non-multiple of the patch."""
    torch.manual_seed(0)
    aps = build_vit(image_size=8, patch=2, embed="aps", positions="none", depth=2, dim=16, heads=2,
                    classes=3).double().eval()
    plain = build_vit(image_size=8, patch=2, embed="patch", positions="none", depth=2, dim=16, heads=2,
                      classes=3).double().eval()
    img = torch.randn(4, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    rolled = torch.roll(img, shifts=shift, dims=(2, 3))
    assert max_err(aps(img), aps(rolled)) < 1e-10
    if shift[0] % 2 or shift[1] % 2:
        assert max_err(plain(img), plain(rolled)) > 1e-4


def test_aps_bad_image():
    with pytest.raises(ValueError, match="patch"):
        PolyphaseAnchoredEmbed(1, 4, 3)(torch.zeros(1, 1, 8, 8))


# ---- attentive probing (V36) ----------------------------------------------------------------------------
@pytest.mark.parametrize("heads,queries", [(1, 1), (2, 3)])
def test_probe_reference_and_gradients(heads, queries):
    check_reference(randomize(AttentiveProbe(DIM, 5, heads=heads, queries=queries)), tokens())


def test_probe_known_answers_and_frozen_backbone():
    m = randomize(AttentiveProbe(DIM, 4, heads=2, queries=2))
    f = tokens().detach()
    # identical tokens: every softmax averages copies of one value, whatever the queries
    same = f[:, :1].expand_as(f)
    want = (same[:, 0] @ m.v_proj.weight.T @ m.o_proj.weight.T) @ m.head.weight.T + m.head.bias
    assert torch.allclose(m(same), want, atol=1e-12)
    # a pooling: permuting the tokens changes nothing
    assert torch.allclose(m(f[:, torch.randperm(f.shape[1])]), m(f), atol=1e-12)
    vit = build_vit(image_size=8, patch=2, dim=DIM, heads=2)
    probed = ProbedViT(vit, AttentiveProbe(DIM, 2))
    probed(torch.randn(2, 1, 8, 8)).sum().backward()
    assert all(p.grad is None for p in vit.parameters())
    assert all(p.grad is not None for p in probed.probe.parameters())


def test_probe_bad_config():
    with pytest.raises(ValueError, match="heads"):
        AttentiveProbe(DIM, 2, heads=5)
    with pytest.raises(ValueError, match="queries"):
        AttentiveProbe(DIM, 2, queries=0)


# ---- NiNformer (V93) ------------------------------------------------------------------------------------
def test_ninformer_reference_and_gradients():
    from attnlab.vision.ninformer import NiNGating

    check_reference(randomize(NiNGating(DIM, GRID[0] * GRID[1], token_hidden=5, channel_hidden=7)), tokens())


def test_ninformer_gate_mixes_tokens_and_gates_the_projection():
    from attnlab.vision.ninformer import NiNGating

    m = randomize(NiNGating(DIM, GRID[0] * GRID[1]))
    x = tokens().detach()
    assert torch.allclose(m(x), m.proj(x) * m.gate(x), atol=1e-14)
    y = x.clone()
    y[:, -1] += torch.randn(DIM, dtype=torch.float64)  # not a constant shift, which LayerNorm removes
    assert not torch.allclose(m(y)[:, 0], m(x)[:, 0])  # the gate of token 0 sees the last token
    with torch.no_grad():  # zero token and channel MLPs: the gate is the input itself
        for p in (m.tok2.weight, m.tok2.bias, m.ch2.weight, m.ch2.bias):
            p.zero_()
    assert torch.allclose(m(x), m.proj(x) * x, atol=1e-14)
    with pytest.raises(ValueError, match="tokens"):
        m(x[:, :5])
    with pytest.raises(ValueError, match="token_hidden"):
        build_mixer("ninformer", ctx(), token_hidden=0)


# ---- attention in attention (V233) ----------------------------------------------------------------------
def test_a2n_reference_and_gradients():
    from attnlab.vision.a2n import AttentionInAttention

    check_reference(randomize(AttentionInAttention(DIM, GRID, reduction=3, temperature=0.5)), tokens())


def test_a2n_branch_weights():
    """The two weights sum to one per image; a decisive dynamic-weight bias selects one branch."""
    from attnlab.vision.a2n import AttentionInAttention

    m = randomize(AttentionInAttention(DIM, GRID))
    x = tokens().detach()
    img = to_image(x, GRID)
    pi = m.weights(img)
    assert pi.shape == (2, 2) and torch.allclose(pi.sum(-1), torch.ones(2, dtype=torch.float64))
    with torch.no_grad():
        m.fc2.weight.zero_()
        m.fc2.bias.copy_(torch.tensor([0.0, 200.0]))  # all weight on the non-attention branch
    want = to_tokens(m.out(m.conv_n(img)))
    assert torch.allclose(m(x), want, atol=1e-12)
    with pytest.raises(ValueError, match="temperature"):
        build_mixer("a2n", ctx(), temperature=0)


# ---- region attention (V82) -----------------------------------------------------------------------------
def _region_layer():
    from attnlab.vision.region import RegionAttention

    m = randomize(RegionAttention(DIM, 2))
    g = torch.Generator().manual_seed(4)
    m.set_regions(torch.randint(3, (2, GRID[0] * GRID[1]), generator=g))
    return m


def test_region_reference_and_gradients():
    check_reference(_region_layer(), tokens())


def test_region_attention_stays_inside_regions():
    m = _region_layer()
    x = tokens().detach()
    y = x.clone()
    inside = m.regions == 1
    y[inside] += torch.randn(int(inside.sum()), DIM, dtype=torch.float64)
    changed = (m(y) - m(x)).abs().amax(-1) > 0  # (B, N)
    assert torch.equal(changed, inside)
    # one region: plain dense attention
    m.set_regions(torch.zeros(2, GRID[0] * GRID[1], dtype=torch.long))
    B, N, D = x.shape
    q, k, v = (p(x).view(B, N, 2, D // 2).transpose(1, 2) for p in (m.q_proj, m.k_proj, m.v_proj))
    dense = m.o_proj(torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D))
    assert torch.allclose(m(x), dense, atol=1e-12)


def test_region_labels_and_errors():
    from attnlab.vision.region import intensity_regions

    img = torch.zeros(1, 1, 4, 4)
    img[0, 0, :2, :2] = 1.0  # the top-left patch bright
    assert intensity_regions(img, 2).tolist() == [[1, 0, 0, 0]]
    vit = build_vit(image_size=4, patch=2, dim=DIM, heads=2, mixer="region")
    assert vit(img).shape == (1, 2)
    assert vit(img, regions=torch.tensor([[0, 0, 1, 1]])).shape == (1, 2)
    with pytest.raises(ValueError, match="regions"):
        vit(img, regions=torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="region attention"):
        build_vit(image_size=4, patch=2, dim=DIM, heads=2)(img, regions=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="set_regions"):
        build_mixer("region", ctx())(tokens().float())


# ---- PredFormer spatial / temporal attention (V3) -------------------------------------------------------
@pytest.mark.parametrize("kind", ["spatial", "temporal", "full"])
def test_predformer_attention_reference_and_gradients(kind):
    from attnlab.vision.predformer import video_attention, video_attention_ref

    grid = (3, 2, 2)
    layer = video_attention(kind, HeadsConfig(dim=DIM, heads=2, kv_heads=1, causal=False), grid).double()
    x = tokens(grid=(3, 4))
    check_reference(layer, x, ref=lambda t: video_attention_ref(layer, t, grid, kind))


def test_predformer_spatial_stays_in_frame_temporal_at_position():
    from attnlab.vision.predformer import predformer_layout, video_attention

    grid = (3, 2, 2)
    x = tokens(grid=(3, 4)).detach()
    y = x.clone()
    y[:, 5] += torch.randn(DIM, dtype=torch.float64)  # frame 1, position 1
    frame = torch.arange(12) // 4
    pos = torch.arange(12) % 4
    for kind, reach in (("spatial", frame == 1), ("temporal", pos == 1)):
        layer = video_attention(kind, HeadsConfig(dim=DIM, heads=2, causal=False), grid).double()
        changed = (layer(y) - layer(x)).abs().amax(dim=(0, 2)) > 0
        assert torch.equal(changed, reach), kind
    assert predformer_layout(8) == ("temporal", "spatial", "spatial", "temporal") * 2
    assert predformer_layout(4, "factorized") == ("temporal", "temporal", "spatial", "spatial")
    with pytest.raises(ValueError, match="multiple of 4"):
        predformer_layout(6)
    with pytest.raises(ValueError, match="kind"):
        video_attention("diagonal", HeadsConfig(dim=DIM, heads=2, causal=False), grid)


def test_predformer_swiglu():
    from attnlab.vision.predformer import SwiGLU

    m = randomize(SwiGLU(DIM, 8))
    x = tokens().detach()
    with torch.no_grad():  # a constant second branch of 1: the gate alone
        m.w2.weight.zero_()
        m.w2.bias.fill_(1.0)
    assert torch.allclose(m(x), m.w3(torch.nn.functional.silu(m.w1(x))), atol=1e-14)


# ---- TiC MSA-Conv (V59) ---------------------------------------------------------------------------------
def test_tic_reference_gradients_and_window():
    from attnlab.vision.tic import msa_conv_ref

    m = build_mixer("tic", ctx(), kernel=3).double()
    check_reference(m, tokens(), ref=lambda x: msa_conv_ref(m, x, GRID, 3))
    x = tokens().detach()
    y = x.clone()
    y[:, 1 * GRID[1] + 1] += torch.randn(DIM, dtype=torch.float64)  # pixel (1, 1)
    changed = (m(y) - m(x)).abs().amax(dim=(0, 2)).view(GRID) > 0
    want = torch.zeros(GRID, dtype=torch.bool)
    want[0:3, 0:3] = True  # the pixels whose 3 x 3 window holds (1, 1)
    assert torch.equal(changed, want)
    with pytest.raises(ValueError, match="kernel"):
        build_mixer("tic", ctx(), kernel=2)
