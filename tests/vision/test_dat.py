"""DAT++ deformable attention [D197]: fast path (strided conv + grid_sample) vs the plain float64 reference,
known sample points, the mixer in a ViT, bad options."""

import pytest
import torch

from attnlab.mechanisms.heads import HeadsConfig
from attnlab.testing import grads, max_err
from attnlab.vision.dat import DeformableAttention
from attnlab.vision.registry import MixerContext, build_mixer


def _x(grid, B=2, C=16):
    return torch.randn(B, grid[0] * grid[1], C, generator=torch.Generator().manual_seed(1), dtype=torch.float64,
                       requires_grad=True)


@pytest.mark.parametrize("grid,stride,kernel,groups", [((6, 8), 2, 5, 2), ((5, 7), 3, 3, 4), ((4, 4), 1, 3, 1)])
def test_dat_matches_reference(grid, stride, kernel, groups):
    torch.manual_seed(0)
    m = DeformableAttention(16, grid, heads=4, groups=groups, stride=stride, kernel=kernel, offset_range=1.5).double()
    x = _x(grid)
    out, ref = m(x), m.reference(x)
    assert max_err(out, ref) < 1e-12
    params = (x, *m.parameters())
    assert max_err(grads(out, params), grads(ref, params)) < 1e-10  # offsets get gradients through sampling


def _plain(m, x, rows, cols):
    """Attention of every token over the tokens at pixels (rows x cols) (0 outside the image)."""
    gh, gw = m.grid
    img = x.view(x.shape[0], gh, gw, -1)
    picked = torch.stack([img[:, r, c] if r < gh and c < gw else torch.zeros_like(img[:, 0, 0])
                          for r in rows for c in cols], 1)
    return m._attend(x, picked)


@torch.no_grad()
def test_dat_samples_the_reference_points_then_moves_them():
    torch.manual_seed(0)
    m = DeformableAttention(16, (6, 8), heads=4, groups=2, stride=2, kernel=3, offset_range=1.0).double()
    x = _x((6, 8)).detach()
    m.off_pw.weight.zero_()  # no offsets: the keys are the tokens at the strided grid
    assert max_err(m(x), _plain(m, x, range(0, 6, 2), range(0, 8, 2))) < 1e-12
    m.off_dw.weight.zero_()
    m.off_dw.bias.fill_(1.0)
    m.off_pw.weight[0] = 50.0  # dy = tanh(400) = 1 exactly, dx = 0: one row down
    assert max_err(m(x), _plain(m, x, range(1, 7, 2), range(0, 8, 2))) < 1e-12
    assert max_err(m.reference(x), _plain(m, x, range(1, 7, 2), range(0, 8, 2))) < 1e-12


def test_dat_mixer_and_bad_options():
    ctx = MixerContext(HeadsConfig(dim=16, heads=4), (6, 8))
    mixer = build_mixer("dat", ctx, stride=3).double()
    x = _x((6, 8))
    assert mixer(x).shape == x.shape and max_err(mixer(x), mixer.reference(x)) < 1e-12
    with pytest.raises(ValueError, match="class token"):
        build_mixer("dat", MixerContext(HeadsConfig(dim=16, heads=4), (6, 8), prefix=1))
    with pytest.raises(ValueError, match="kernel"):
        build_mixer("dat", ctx, kernel=4)
    with pytest.raises(ValueError, match="groups"):
        build_mixer("dat", ctx, groups=3)
    with pytest.raises(ValueError, match="offset_range"):
        build_mixer("dat", ctx, offset_range=-1.0)
    with pytest.raises(ValueError, match="stride"):
        build_mixer("dat", ctx, stride=0)
