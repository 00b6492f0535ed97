"""SDM read operator and the softmax-beta fit (R172): the circle intersection against brute-force enumeration, the
op against the enumerated-neuron reference, the paper's claim (the SDM read is close to softmax attention with the
fitted beta) on bipolar patterns, bad inputs."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from layer_checks import one_thread  # noqa: F401

from attnlab import ops
from attnlab.mechanisms.layers.sdm import circle_intersection, fit_beta
from attnlab.testing import grads, max_err, qkv


def _enumerate(n: int, radius: int, dv: int) -> int:
    a = (0,) * n
    b = (1,) * dv + (0,) * (n - dv)
    ham = lambda x, y: sum(i != j for i, j in zip(x, y))  # noqa: E731
    return sum(ham(x, a) <= radius and ham(x, b) <= radius for x in itertools.product((0, 1), repeat=n))


@pytest.mark.parametrize("n", [5, 7])
def test_circle_intersection_equals_enumeration(n):
    for radius in range(n + 1):
        table = circle_intersection(n, radius)
        assert table.tolist() == [_enumerate(n, radius, dv) for dv in range(n + 1)], radius


def test_circle_intersection_known_values():
    t = circle_intersection(64, 11)
    assert t[0] == sum(math.comb(64, i) for i in range(12))  # one ball
    assert bool((t[23:] == 0).all()) and t[22] > 0  # empty beyond 2d
    assert bool((t[1:23] <= t[:22]).all())  # non-increasing
    # staircase: an odd distance 2m - 1 shares the intersection of 2m (a point's parity of distances is fixed)
    assert all(t[2 * m - 1] == t[2 * m] for m in range(1, 12)) and bool((t[2:23:2] < t[0:21:2]).all())


def test_fit_beta_is_a_good_log_linear_fit_and_softmax_approximates_the_read():
    beta, r2 = fit_beta(64, 11)
    assert 0.5 < beta < 0.7 and r2 > 0.95
    g = torch.Generator().manual_seed(0)
    n = 64
    K = (torch.randint(0, 2, (1, 1, 200, n), generator=g) * 2 - 1).double()
    V = torch.randn(1, 1, 200, 16, generator=g, dtype=torch.float64)
    Q = K[:, :, :50].clone()
    for i in range(50):  # queries: stored patterns with 8 bits flipped
        Q[0, 0, i, torch.randperm(n, generator=g)[:8]] *= -1
    sdm = ops.get("sdm")(Q, K, V, radius=11, causal=False)
    soft = torch.softmax(beta / 2 * Q @ K.transpose(-1, -2), -1) @ V
    rel = float(((sdm - soft).norm(dim=-1) / sdm.norm(dim=-1)).mean())
    assert rel < 0.01  # measured 0.0015
    # a wrong beta is much worse
    soft2 = torch.softmax(beta / 8 * Q @ K.transpose(-1, -2), -1) @ V
    assert float(((sdm - soft2).norm(dim=-1) / sdm.norm(dim=-1)).mean()) > 10 * rel


@pytest.mark.parametrize("causal", [True, False])
def test_op_equals_enumerated_neurons_reference(causal):
    q, k, v = qkv(2, 4, 2, 15, D=8, seed=1)
    g = torch.Generator().manual_seed(2)
    mask = torch.rand(2, 1, 15, 15, generator=g) < 0.8
    for m in (None, mask):
        out = ops.get("sdm")(q, k, v, radius=2, causal=causal, mask=m)
        ref = ops.reference("sdm", q, k, v, radius=2, causal=causal, mask=m)
        assert max_err(out, ref) < 1e-12
        gq, gk, gv = grads(out, (q, k, v))
        rq, rk, rv = grads(ref, (q, k, v))
        assert max_err(gv, rv) < 1e-12 and float(gv.abs().max()) > 0
        assert all(g_ is None or float(g_.abs().max()) == 0 for g_ in (gq, gk, rq, rk))  # binary addresses
    # radius 0: only exact address matches count, equally
    qb = torch.where(q.detach() >= 0, 1.0, -1.0).double()
    out0 = ops.get("sdm")(qb, qb[:, ::2], v.detach(), radius=0, causal=False)
    assert max_err(out0, ops.reference("sdm", qb, qb[:, ::2], v.detach(), radius=0, causal=False)) < 1e-12


def test_bad_inputs_fail_naming_them():
    q, k, v = qkv(1, 2, 2, 6, D=8, requires_grad=False)
    with pytest.raises(ValueError, match="radius"):
        ops.get("sdm")(q, k, v, radius=9)
    with pytest.raises(ValueError, match="radius"):
        ops.get("sdm")(q, k, v, radius=-1)
    with pytest.raises(ValueError, match="radius"):
        circle_intersection(8, 9)
    with pytest.raises(ValueError, match="fewer than two"):
        fit_beta(8, 0)
    q2, k2, v2 = qkv(1, 2, 2, 6, D=16, requires_grad=False)
    with pytest.raises(ValueError, match="head_dim <= 12"):
        ops.reference("sdm", q2, k2, v2)
