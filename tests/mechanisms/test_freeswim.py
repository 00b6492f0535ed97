"""FreeSwim (P286): the inward window against windows enumerated from the rule (every query keeps a training-size
window, shifted inwards), run on the sparse engine vs a float64 reference; the dual-path cross-attention override on
a toy two-block transformer (outputs and the caching schedule); bad inputs."""

from __future__ import annotations

import itertools

import pytest
import torch
from layer_checks import one_thread  # noqa: F401

import attnlab
from attnlab.mechanisms.layers.freeswim import CrossOverride, inward_window
from attnlab.testing import max_err, qkv


def window(i: int, L: int, t: int) -> range:
    t = min(t, L)
    lo = min(max(i - t // 2, 0), L - t)  # centred (t/2 before for even t), then pushed inside the axis
    return range(lo, lo + t)


def test_inward_window_keeps_the_training_receptive_field():
    grid, train = (6, 10), (4, 5)
    p = inward_window(grid, train)
    n = 60
    d = p.dense(n, n)[0]
    for r, c in itertools.product(range(6), range(10)):
        want = {a * 10 + b for a in window(r, 6, 4) for b in window(c, 10, 5)}
        assert set(d[r * 10 + c].nonzero().flatten().tolist()) == want, (r, c)
    assert bool((d.sum(-1) == 20).all())  # exactly the training-size window everywhere
    assert set(d[0].nonzero().flatten().tolist()) == {a * 10 + b for a in range(4) for b in range(5)}
    assert set(inward_window(5, 8).dense(5, 5)[0, 2].nonzero().flatten().tolist()) == set(range(5))  # clipped
    q, k, v = qkv(1, 2, 1, n, D=8, seed=1)
    out = attnlab.attention(q, k, v, pattern=p, scale=8**-0.5)
    s = q @ k.repeat_interleave(2, 1).transpose(-1, -2) * 8**-0.5
    ref = torch.softmax(s.masked_fill(~d, float("-inf")), -1) @ v.repeat_interleave(2, 1)
    assert max_err(out, ref) < 1e-12


class ToyBlock(torch.nn.Module):
    """x + self-attention (full or windowed) + cross-attention to text; the cross output goes through a hook."""

    def __init__(self, dim: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.wq, self.wk, self.wv = (torch.randn(dim, dim, generator=g, dtype=torch.float64) / dim**0.5
                                     for _ in range(3))

    def forward(self, x, text, pattern, cross_hook):
        q, k, v = (x @ w for w in (self.wq, self.wk, self.wv))
        sa = attnlab.attention(q[:, None], k[:, None], v[:, None], pattern=pattern)[:, 0]
        ca = torch.softmax((x @ self.wq) @ text.transpose(-1, -2), -1) @ text
        return x + sa + cross_hook(ca)


def _run(blocks, x, text, pattern, hook):
    for i, b in enumerate(blocks):
        x = b(x, text, pattern, lambda ca, i=i: hook(i, ca))
    return x


def test_cross_override_uses_the_full_branch_cross_outputs_and_caches_them():
    grid = (4, 6)
    win, full = inward_window(grid, (2, 3)), inward_window(grid, grid)
    blocks = [ToyBlock(8, 0), ToyBlock(8, 1)]
    g = torch.Generator().manual_seed(2)
    text = torch.randn(1, 5, 8, generator=g, dtype=torch.float64)
    xs = [torch.randn(1, 24, 8, generator=g, dtype=torch.float64) for _ in range(4)]  # latents at steps 0..3

    # by hand: the full branch at step 0 records block outputs; steps 1, 2 reuse them (refresh 3); step 3 refreshes
    def full_cross_outputs(x):
        outs = {}
        _run(blocks, x, text, full, lambda i, ca: outs.setdefault(i, ca))
        return outs

    co = CrossOverride(refresh=3)
    for step, x in enumerate(xs):
        got = co.run(step, lambda x=x: _run(blocks, x, text, full, co.full_cross),
                     lambda x=x: _run(blocks, x, text, win, co.window_cross))
        stored = full_cross_outputs(xs[0 if step < 3 else 3])
        want = _run(blocks, x, text, win, lambda i, ca, stored=stored: stored[i])
        assert max_err(got, want) < 1e-12, step
        plain = _run(blocks, x, text, win, lambda i, ca: ca)
        assert max_err(got, plain) > 1e-4  # the override changes the window branch
    assert co.full_runs == 2  # steps 0 and 3


def test_bad_inputs_fail_naming_them():
    with pytest.raises(ValueError, match="train_grid"):
        inward_window((4, 4), (0, 2))
    with pytest.raises(ValueError, match="train_grid"):
        inward_window((4, 4), (2, 2, 2))
    with pytest.raises(ValueError, match="refresh"):
        CrossOverride(refresh=0)
    co = CrossOverride()
    with pytest.raises(ValueError, match="step"):
        co.needs_full(-1)
    co.full_cross(0, torch.zeros(1, 3, 4))
    with pytest.raises(ValueError, match="shape"):
        co.window_cross(0, torch.zeros(1, 5, 4))
    own = torch.ones(1, 3, 4)
    assert co.window_cross(1, own) is own  # nothing stored for that block
