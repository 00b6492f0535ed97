"""GMM location-relative attention (L198): fast path (one vectorized pass) vs the step-by-step float64 formula,
known answers (means move by softplus steps, the alignment centres on them), decoding over a fixed memory with the
carried means, bad inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from layer_checks import one_thread  # noqa: F401

from attnlab import ops
from attnlab.mechanisms.layers.gmm_attn import gmm_alignment
from attnlab.testing import grads, max_err, qkv

F64 = torch.float64


def test_fast_path_equals_stepwise_formula_cross_attention():
    q, _, _ = qkv(2, 4, 2, 9, D=8, seed=1)
    _, k, v = qkv(2, 4, 2, 9, Tk=17, D=8, seed=2)
    mask = torch.ones(2, 1, 9, 17, dtype=torch.bool)
    mask[1, ..., 14:] = False  # padded memory of the second sequence
    for m in (None, mask):
        out = ops.get("gmm_attn")(q, k, v, mixtures=2, mask=m)
        ref = ops.reference("gmm_attn", q, k, v, mixtures=2, mask=m)
        assert out.shape == (2, 4, 9, 8) and max_err(out, ref) < 1e-12
        assert max_err(grads(out, (q, v)), grads(ref, (q, v))) < 1e-10
    o32 = ops.get("gmm_attn")(*(t.detach().float() for t in (q, k, v)), mixtures=2)
    assert o32.dtype == torch.float32 and max_err(o32, ops.reference("gmm_attn", q, k, v, mixtures=2)) < 1e-5


def test_known_answer_one_component_walks_one_position_per_step():
    T, S = 6, 40
    q = torch.zeros(1, 1, T, 3, dtype=F64)
    q[..., 1] = torch.log(torch.expm1(torch.tensor(2.0)))  # softplus -> step 2
    q[..., 2] = torch.log(torch.expm1(torch.tensor(1.2)))  # softplus -> sigma 1.2
    alpha, last = gmm_alignment(q, S, mixtures=1, mu0=torch.full((1, 1, 1), 10.0, dtype=F64))
    j = torch.arange(S, dtype=F64)
    assert alpha[0, 0].argmax(-1).tolist() == [12, 14, 16, 18, 20, 22]
    # whole Gaussians inside the memory: mass 1 and mean mu (integer sampling errors ~1e-12 at sigma 1.2)
    assert torch.allclose(alpha[0, 0].sum(-1), torch.ones(T, dtype=F64), atol=1e-9)
    assert torch.allclose((alpha[0, 0] * j).sum(-1), 10.0 + 2.0 * torch.arange(1, T + 1, dtype=F64), atol=1e-9)
    assert float(last) == pytest.approx(22.0)


def test_alignment_moves_forward_for_any_query():
    q, _, _ = qkv(2, 3, 3, 12, D=9, seed=3, requires_grad=False)
    q[..., 6:9] = q[..., 6:9].abs() + 1.0  # sigma >= 1.3: integer sampling of each density is exact to ~1e-14
    alpha, _ = gmm_alignment(q, 200, mixtures=3, mu0=torch.full((2, 3, 3), 50.0, dtype=F64))
    delta = F.softplus(q[..., 3:6])
    mu = torch.cumsum(delta, 2) + 50.0
    assert bool((mu[:, :, 1:] >= mu[:, :, :-1]).all())
    centre = (alpha * torch.arange(200, dtype=F64)).sum(-1) / alpha.sum(-1)
    w = q[..., :3].softmax(-1)
    assert torch.allclose(centre, (w * mu).sum(-1), atol=1e-9)  # mixture mean (components well inside)


def test_decoding_over_a_fixed_memory_carries_the_means():
    q, _, _ = qkv(1, 2, 1, 10, D=6, seed=4, requires_grad=False)
    _, k, v = qkv(1, 2, 1, 10, Tk=25, D=6, seed=5, requires_grad=False)
    op = ops.get("gmm_attn")
    full = op(q, k, v)
    state = ops.OpState()
    parts = []
    for s, e in [(0, 4)] + [(i, i + 1) for i in range(4, 10)]:
        out, state = op(q[:, :, s:e], k, v, q_offset=s, state=state)
        parts.append(out)
    assert max_err(torch.cat(parts, 2), full) < 1e-12
    without = op(q[:, :, 4:], k, v, q_offset=4)  # no carried means: restarts at position 0
    assert max_err(without, full[:, :, 4:]) > 1e-3


def test_bad_inputs_fail_naming_them():
    op = ops.get("gmm_attn")
    q, k, v = qkv(1, 2, 1, 5, D=5, requires_grad=False)
    with pytest.raises(ValueError, match="mixtures"):
        op(q, k, v, mixtures=2)  # 6 > head_dim 5
    with pytest.raises(ValueError, match="mixtures"):
        op(q, k, v, mixtures=0)
    with pytest.raises(ValueError, match="state"):
        op(q, k, v, mixtures=1, state=ops.OpState(mu=torch.zeros(1, 2, 3)))
    with pytest.raises(ValueError, match="mask"):
        op(q, k, v, mixtures=1, mask=torch.ones(5, 5, dtype=torch.bool))
