"""Monotonic location attention (L218): fast path vs the step-by-step float64 formula (with content mixing and a
memory mask), the length-generalization known answer (one position per step at any source length), monotonicity,
decoding over a fixed memory, bad inputs."""

from __future__ import annotations

import pytest
import torch
from layer_checks import one_thread  # noqa: F401

from attnlab import ops
from attnlab.testing import grads, max_err, qkv

F64 = torch.float64


@pytest.mark.parametrize("content", [True, False])
def test_fast_path_equals_stepwise_formula(content):
    q, _, _ = qkv(2, 4, 2, 8, D=8, seed=1)
    _, k, v = qkv(2, 4, 2, 8, Tk=19, D=8, seed=2)
    mask = torch.ones(2, 1, 8, 19, dtype=torch.bool)
    mask[1, ..., 15:] = False
    for m in (None, mask):
        out = ops.get("monotonic_loc")(q, k, v, content=content, mask=m)
        ref = ops.reference("monotonic_loc", q, k, v, content=content, mask=m)
        assert max_err(out, ref) < 1e-12
        assert max_err(grads(out, (q, k, v)), grads(ref, (q, k, v))) < 1e-10
    o32 = ops.get("monotonic_loc")(*(t.detach().float() for t in (q, k, v)), content=content)
    assert o32.dtype == torch.float32 and max_err(o32, ops.reference("monotonic_loc", q, k, v, content=content)) < 1e-5


def _location_weights(q, S):
    v = torch.eye(S, dtype=F64).view(1, 1, S, S)  # one-hot values: outputs are the weights
    k = torch.zeros(1, 1, S, q.shape[-1], dtype=F64)
    return ops.get("monotonic_loc")(q, k, v, content=False)[0, 0]


@pytest.mark.parametrize("S", [10, 60])
def test_one_position_per_step_at_any_source_length(S):
    T = 8
    q = torch.zeros(1, 1, T, 3, dtype=F64)
    q[..., 0] = 1.0  # step one position
    q[..., 1] = -5.0  # width sigma_min / S
    w = _location_weights(q, S)
    assert w.argmax(-1).tolist() == list(range(1, T + 1))
    assert bool((w.max(-1).values > 0.9).all())


def test_focus_never_moves_back():
    """Each Gaussian is centred at or after the previous expected position, so its mode (the nearest position to
    the centre) is at or after that position rounded. (The expected position itself can step back a little when
    a wide Gaussian is cut by the memory's start and the next one is narrower.)"""
    q, _, _ = qkv(2, 3, 3, 12, D=4, seed=3, requires_grad=False)
    S = 30
    for b in range(2):
        for h in range(3):
            w = _location_weights(q[b : b + 1, h : h + 1], S)
            centre = (w * torch.arange(S, dtype=F64)).sum(-1)
            mode = w.argmax(-1)
            assert bool((mode[1:] >= torch.round(centre[:-1])).all())
            assert int(mode[0]) >= 0 and float(centre[-1]) > float(centre[0])


def test_decoding_over_a_fixed_memory_carries_the_reference_point():
    q, _, _ = qkv(1, 2, 1, 9, D=6, seed=4, requires_grad=False)
    _, k, v = qkv(1, 2, 1, 9, Tk=20, D=6, seed=5, requires_grad=False)
    op = ops.get("monotonic_loc")
    full = op(q, k, v)
    state = ops.OpState()
    parts = []
    for s, e in [(0, 3)] + [(i, i + 1) for i in range(3, 9)]:
        out, state = op(q[:, :, s:e], k, v, q_offset=s, state=state)
        parts.append(out)
    assert max_err(torch.cat(parts, 2), full) < 1e-12
    assert max_err(op(q[:, :, 3:], k, v), full[:, :, 3:]) > 1e-4


def test_bad_inputs_fail_naming_them():
    op = ops.get("monotonic_loc")
    q, k, v = qkv(1, 2, 1, 5, D=2, requires_grad=False)
    with pytest.raises(ValueError, match="head_dim"):
        op(q, k, v)  # content needs a third coordinate (the gate)
    assert op(q, k, v, content=False).shape == (1, 2, 5, 2)
    with pytest.raises(ValueError, match="sigma_min"):
        op(q, k, v, content=False, sigma_min=0)
    with pytest.raises(ValueError, match="content"):
        op(q, k, v, content="yes")
    with pytest.raises(ValueError, match="state"):
        op(q, k, v, content=False, state=ops.OpState(pos=torch.zeros(3)))


# ---- reverse interpolation + relative attention (interp_relative) ------------------------------------------------


def _peaked(H, R=6, peak=40.0):
    """Relative bias (H, 2R + 1): ``peak`` at offset 0, 0 elsewhere."""
    b = torch.zeros(H, 2 * R + 1, dtype=F64)
    b[:, R] = peak
    return b


@pytest.mark.parametrize("S", [10, 41])
def test_reverse_lookup_solved_by_the_reversed_half(S):
    """Gate 1 + relative offset 0: decoder step i attends source position S - 1 - i, at any source length; gate 0
    reads position i (forward lookup). Values are one-hot, so the outputs are the weights."""
    T = 8
    q, _, _ = qkv(1, 2, 2, T, D=4, seed=6, requires_grad=False)
    k = torch.randn(1, 2, S, 4, dtype=F64, generator=torch.Generator().manual_seed(7))
    v = torch.eye(S, dtype=F64).expand(1, 2, S, S)
    op = ops.get("interp_relative")
    w = op(q, k, v, gate=1.0, rel_bias=_peaked(2), q_offset=0)  # decoder steps 0..T-1
    assert w.argmax(-1)[0].tolist() == [[S - 1 - i for i in range(T)]] * 2
    assert bool((w.max(-1).values > 0.99).all())
    w0 = op(q, k, v, gate=0.0, rel_bias=_peaked(2), q_offset=0)
    assert w0.argmax(-1)[0].tolist() == [list(range(T))] * 2
    half = op(q, k, v, gate=0.5, rel_bias=_peaked(2), content=False, q_offset=0)  # no content: exactly half on each
    for i in range(T):
        assert abs(float(half[0, 0, i, i]) - 0.5) < 1e-12 and abs(float(half[0, 0, i, S - 1 - i]) - 0.5) < 1e-12


@pytest.mark.parametrize("content", [True, False])
def test_interp_relative_fast_path_equals_rowwise_formula(content):
    q, _, _ = qkv(2, 4, 2, 7, D=6, seed=8)
    _, k, v = qkv(2, 4, 2, 7, Tk=13, D=6, seed=9)
    bias = torch.randn(4, 9, dtype=F64, generator=torch.Generator().manual_seed(10), requires_grad=True)
    gate_t = torch.rand(2, 1, 7, dtype=F64, generator=torch.Generator().manual_seed(11))
    mask = torch.ones(2, 1, 7, 13, dtype=torch.bool)
    mask[0, ..., :3] = False
    for opts in (dict(), dict(gate=0.3, mask=mask), dict(gate=gate_t), dict(rel_bias=bias, mask=mask)):
        out = ops.get("interp_relative")(q, k, v, content=content, **opts)
        ref = ops.reference("interp_relative", q, k, v, content=content, **opts)
        assert max_err(out, ref) < 1e-12
        leaves = (q, k, v, bias) if "rel_bias" in opts else (q, k, v)
        assert max_err(grads(out, leaves), grads(ref, leaves)) < 1e-10
    # the default gate is sigmoid(q[..., 0]): its gradient reaches q through the gate
    o32 = ops.get("interp_relative")(*(t.detach().float() for t in (q, k, v)), content=content, rel_bias=bias.float())
    ref = ops.reference("interp_relative", q, k, v, content=content, rel_bias=bias)
    assert o32.dtype == torch.float32 and max_err(o32, ref) < 1e-5


def test_interp_relative_rows_at_an_offset_equal_the_full_forward():
    q, _, _ = qkv(1, 2, 1, 9, D=6, seed=12, requires_grad=False)
    _, k, v = qkv(1, 2, 1, 9, Tk=15, D=6, seed=13, requires_grad=False)
    op = ops.get("interp_relative")
    bias = _peaked(2, R=3, peak=2.0)
    full = op(q, k, v, rel_bias=bias, q_offset=0)
    parts = [op(q[:, :, s:e], k, v, q_offset=s, rel_bias=bias) for s, e in [(0, 4), (4, 5), (5, 9)]]
    assert max_err(torch.cat(parts, 2), full) < 1e-12
    assert max_err(op(q[:, :, 4:], k, v, rel_bias=bias, q_offset=0), full[:, :, 4:]) > 1e-4  # the step index matters


def test_interp_relative_bad_inputs_fail_naming_them():
    op = ops.get("interp_relative")
    q, k, v = qkv(1, 2, 1, 5, D=4, requires_grad=False)
    with pytest.raises(ValueError, match="rel_bias"):
        op(q, k, v, rel_bias=torch.zeros(2, 4, dtype=F64))
    with pytest.raises(ValueError, match="rel_bias"):
        op(q, k, v, rel_bias=torch.zeros(3, 5, dtype=F64))
    with pytest.raises(ValueError, match="gate"):
        op(q, k, v, gate=1.5)
    with pytest.raises(ValueError, match="gate"):
        op(q, k, v, gate="reverse")
    with pytest.raises(ValueError, match="content"):
        op(q, k, v, content=1)
