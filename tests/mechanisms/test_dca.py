"""Dynamic Convolution Attention (L198): the vectorized step (conv1d) vs the float64 step written as explicit tap
sums, with every learned part; the beta-binomial prior (moments); known answer with no filters (the alignment is
the prior applied to the previous one); decoding over a fixed memory; bad inputs."""

from __future__ import annotations

import math

import pytest
import torch
from layer_checks import one_thread  # noqa: F401

from attnlab import ops
from attnlab.mechanisms.layers.dca import FLOOR, beta_binomial
from attnlab.testing import grads, max_err, qkv

F64 = torch.float64


def _rand(*shape, seed):
    return (0.5 * torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(seed))).requires_grad_()


def test_beta_binomial_prior_moments():
    P = beta_binomial(11, 0.1, 0.9)
    n, a, b = 10, 0.1, 0.9
    m = torch.arange(11, dtype=F64)
    assert float(P.sum()) == pytest.approx(1.0, abs=1e-12)
    assert float((P * m).sum()) == pytest.approx(n * a / (a + b), abs=1e-12)
    var = n * a * b * (a + b + n) / ((a + b) ** 2 * (a + b + 1))
    assert float((P * m * m).sum() - (P * m).sum() ** 2) == pytest.approx(var, abs=1e-10)
    assert int(P.argmax()) == 0 and float(P[0]) > 0.7  # a < b: most mass on staying put, a tail of forward moves
    assert torch.allclose(beta_binomial(3, 1.0, 1.0), torch.full((3,), 1 / 3, dtype=F64))  # uniform case


def test_fast_path_equals_tap_sums_with_every_part():
    H, kf, Lf, kg, Lg, A = 4, 2, 5, 2, 3, 3
    q, _, _ = qkv(2, H, 2, 7, D=8, seed=1)
    _, k, v = qkv(2, H, 2, 7, Tk=15, D=8, seed=2)
    opts = dict(dynamic=kg, dynamic_len=Lg, filters=_rand(H, kf, Lf, seed=3), mix=_rand(H, kf + kg, A, seed=4),
                bias=_rand(H, A, seed=5), energy=_rand(H, A, seed=6), prior_len=5, prior_alpha=0.3, prior_beta=0.7)
    mask = torch.ones(2, 1, 7, 15, dtype=torch.bool)
    mask[0, ..., 12:] = False
    params = (q, v, *(t for t in opts.values() if isinstance(t, torch.Tensor)))
    for m in (None, mask):
        out = ops.get("dca")(q, k, v, mask=m, **opts)
        ref = ops.reference("dca", q, k, v, mask=m, **opts)
        assert max_err(out, ref) < 1e-12
        assert max_err(grads(out, params), grads(ref, params)) < 1e-10
    o32 = ops.get("dca")(*(t.detach().float() for t in (q, k, v)),
                         **{n: t.detach().float() if isinstance(t, torch.Tensor) else t for n, t in opts.items()})
    assert o32.dtype == torch.float32 and max_err(o32, ops.reference("dca", q, k, v, **opts)) < 1e-5


def test_known_answer_without_filters_the_prior_moves_the_alignment():
    S = 30
    q = torch.zeros(1, 1, 3, 4, dtype=F64)  # zero dynamic taps: energies are the log prior only
    v = torch.eye(S, dtype=F64).view(1, 1, S, S)  # one-hot values: the output rows are the alignments
    k = torch.zeros(1, 1, S, S, dtype=F64)
    alpha = ops.get("dca")(q.new_zeros(1, 1, 3, S), k, v, dynamic=1, dynamic_len=1)[0, 0]
    P = beta_binomial(11, 0.1, 0.9)
    want = torch.zeros(S, dtype=F64)
    prev = torch.zeros(S, dtype=F64)
    prev[0] = 1.0
    for i in range(3):
        conv = torch.zeros(S, dtype=F64)
        for j in range(S):
            conv[j] = sum(P[l] * prev[j - l] for l in range(11) if j - l >= 0)
        want = torch.clamp(conv, min=FLOOR) / torch.clamp(conv, min=FLOOR).sum()
        assert max_err(alpha[i], want) < 1e-12, i
        prev = want
    assert float(alpha[0, 0]) == pytest.approx(float(P[0]) / (float(P.sum()) + (S - 11) * FLOOR), rel=1e-9)
    centre = (alpha * torch.arange(S, dtype=F64)).sum(-1)
    assert bool((centre[1:] > centre[:-1]).all())  # the prior pushes forward


def test_decoding_over_a_fixed_memory_carries_the_alignment():
    q, _, _ = qkv(1, 2, 1, 9, D=6, seed=4, requires_grad=False)
    _, k, v = qkv(1, 2, 1, 9, Tk=20, D=6, seed=5, requires_grad=False)
    op = ops.get("dca")
    opts = dict(dynamic=2, dynamic_len=3)
    full = op(q, k, v, **opts)
    state = ops.OpState()
    parts = []
    for s, e in [(0, 3)] + [(i, i + 1) for i in range(3, 9)]:
        out, state = op(q[:, :, s:e], k, v, q_offset=s, state=state, **opts)
        parts.append(out)
    assert max_err(torch.cat(parts, 2), full) < 1e-12
    assert max_err(op(q[:, :, 3:], k, v, **opts), full[:, :, 3:]) > 1e-3  # restarting at position 0 differs


def test_bad_inputs_fail_naming_them():
    op = ops.get("dca")
    q, k, v = qkv(1, 2, 1, 5, D=6, requires_grad=False)
    with pytest.raises(ValueError, match="dynamic_len"):
        op(q, k, v, dynamic=1, dynamic_len=2)
    with pytest.raises(ValueError, match="dynamic"):
        op(q, k, v, dynamic=3, dynamic_len=3)  # 9 taps > head_dim 6
    with pytest.raises(ValueError, match="filters"):
        op(q, k, v, dynamic=1, dynamic_len=3, filters=torch.zeros(2, 1, 4, dtype=F64))
    with pytest.raises(ValueError, match="mix"):
        op(q, k, v, dynamic=1, dynamic_len=3, mix=torch.zeros(2, 3, 2, dtype=F64))
    with pytest.raises(ValueError, match="energy"):
        op(q, k, v, dynamic=1, dynamic_len=3, energy=torch.zeros(2, 5, dtype=F64))
    with pytest.raises(ValueError, match="prior_alpha"):
        op(q, k, v, dynamic=1, dynamic_len=3, prior_alpha=0.0)
    with pytest.raises(ValueError, match="state"):
        op(q, k, v, dynamic=1, dynamic_len=3, state=ops.OpState(alpha=torch.zeros(1, 2, 4)))
    assert math.isfinite(float(op(q, k, v, dynamic=1, dynamic_len=3).abs().max()))
